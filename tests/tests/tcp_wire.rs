//! Two full constellations joined by keepnet's memory wire, each side losing 2% of the frames
//! it sends (seeded): an application on one echoes 64 MiB of random data through the other's
//! TCP echo service, byte for byte. No TAP, no namespace, no root: every frame stays in
//! shared memory between the two instances' drivers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use keepnet_tests::harness::Watchdog;
use keepnet_tests::lab::binary;

/// An instance brought up by the test and brought down again on every exit path.
struct Instance {
    config: PathBuf,
    run_dir: PathBuf,
    up: bool,
}

impl Instance {
    fn keepnet(&self, args: &[&str]) -> Output {
        let out = Command::new(binary("keepnet"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("KEEPNET_RUN_DIR", &self.run_dir)
            .output()
            .expect("run keepnet");
        eprintln!(
            "$ keepnet {} -> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn up(dir: &Path, name: &str, toml: &str) -> Instance {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).expect("write config");
        let mut i = Instance {
            config,
            run_dir: dir.join("run"),
            up: false,
        };
        let out = i.keepnet(&["up"]);
        assert!(out.status.success(), "keepnet up {name} failed");
        i.up = true;
        i
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.up {
            let _ = self.keepnet(&["down"]);
        }
    }
}

#[test]
fn two_constellations_over_a_lossy_memory_wire_echo_64_mib_intact() {
    let _w = Watchdog::arm("two constellations over the wire", Duration::from_secs(300));
    let tag = format!("w{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("kn-wire-{tag}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let a_name = format!("{tag}a");
    let b_name = format!("{tag}b");
    let a = Instance::up(
        &dir,
        "a",
        &format!(
            "instance = \"{a_name}\"\n\
             services = [{{ name = \"tcp-echo\", args = [\"tcp-echo\", \"--port\", \"7\"] }}]\n\
             [link]\nbackend = \"wire\"\nwire_side = \"a\"\n\
             wire_faults = {{ seed = 11, loss = 0.02 }}\n\
             [ip]\naddr = \"198.18.7.1/24\"\nmac = \"02:6b:6e:00:07:01\"\n"
        ),
    );
    let b = Instance::up(
        &dir,
        "b",
        &format!(
            "instance = \"{b_name}\"\nservices = []\n\
             [link]\nbackend = \"wire\"\nwire_side = \"b\"\nwire_peer = \"{a_name}\"\n\
             wire_faults = {{ seed = 12, loss = 0.02 }}\n\
             [ip]\naddr = \"198.18.7.2/24\"\nmac = \"02:6b:6e:00:07:02\"\n"
        ),
    );
    let out = Command::new(binary("kn-tcp-app"))
        .args([
            "echo-client",
            "198.18.7.1:7",
            &(64u64 << 20).to_string(),
            "21",
        ])
        .env("KEEPNET_RUN_DIR", &b.run_dir)
        .env("KEEPNET_INSTANCE", &b_name)
        .output()
        .expect("run kn-tcp-app");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "kn-tcp-app: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The wire really lost frames both ways, and TCP carried on.
    let lost = |i: &Instance| -> u64 {
        let st = i.keepnet(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap_or_default();
        keepnet_tests::lab::counter(&v, "driver", "wire.lost")
    };
    let (lost_a, lost_b) = (lost(&a), lost(&b));
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        stdout.starts_with("ok "),
        "echo through the wire failed: {stdout}"
    );
    assert!(
        lost_a > 100 && lost_b > 100,
        "wire losses: a {lost_a}, b {lost_b}"
    );
}
