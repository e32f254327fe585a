//! A lab for end-to-end tests against the Linux kernel over TAP: a unique namespace, instance
//! and runtime directory per test, torn down on every exit path (Drop). Needs root; without it
//! [`root_or_skip`] says so loudly and the test skips, except under CI=true where it fails.
//! All traffic stays inside the namespace the lab creates, on 198.18.0.0/15.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// keepnet's address in a lab with the default config.
pub const KEEPNET_IP: &str = "198.18.0.2";
/// keepnet's MAC with the default config.
pub const KEEPNET_MAC: &str = "02:6b:6e:00:00:02";

/// True if running as root; otherwise prints a loud skip notice and returns false, or
/// panics under CI=true (CI must not skip).
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root, and CI=true forbids skipping");
    }
    eprintln!("\n*** SKIPPED {test}: needs root (TAP devices and network namespaces) ***\n");
    false
}

/// The directory holding the workspace's binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/NAME-HASH`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of workspace binary `name`, checked to be built.
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{name} is not built in {}: run `cargo test --workspace` (it builds every binary)",
        bin_dir().display()
    );
    p
}

fn servers_built(keepnet: &Path) {
    let dir = keepnet.parent().expect("binary dir");
    for b in [
        "keepnet-driver",
        "keepnet-ip",
        "keepnet-udp",
        "keepnet-service",
    ] {
        assert!(
            dir.join(b).is_file(),
            "{b} is not built beside keepnet: run `cargo test --workspace` (it builds every server)"
        );
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A lab: a unique namespace, instance and runtime directory, torn down on every exit path.
pub struct Lab {
    pub ns: String,
    pub instance: String,
    pub config: PathBuf,
    pub run_dir: PathBuf,
    pub keepnet: PathBuf,
    up: bool,
}

impl Lab {
    /// A lab whose config is `instance = ...` followed by `extra_config`, run with the
    /// `keepnet` binary at `keepnet`.
    pub fn with_binary(keepnet: &Path, tag: &str, extra_config: &str) -> Lab {
        servers_built(keepnet);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{}-{n}", tag, std::process::id());
        let run_dir = std::env::temp_dir().join(format!("kn-run-{id}"));
        std::fs::create_dir_all(&run_dir).expect("create run dir");
        let config = run_dir.join("keepnet.toml");
        std::fs::write(&config, format!("instance = \"{id}\"\n{extra_config}"))
            .expect("write config");
        Lab {
            ns: format!("kn-{id}"),
            instance: id,
            config,
            run_dir,
            keepnet: keepnet.to_path_buf(),
            up: false,
        }
    }

    /// [`Lab::with_binary`] with the workspace's `keepnet`.
    pub fn new(tag: &str, extra_config: &str) -> Lab {
        Lab::with_binary(&binary("keepnet"), tag, extra_config)
    }

    /// Runs `keepnet ARGS --config CONFIG` against this lab, echoing what it printed.
    pub fn keepnet(&self, args: &[&str]) -> Output {
        echoed(
            "",
            run_keepnet(&self.keepnet, &self.config, &self.run_dir, args),
            args,
        )
    }

    /// `keepnet up --netns NS`, asserting success.
    pub fn up(&mut self) {
        let ns = self.ns.clone();
        let out = self.keepnet(&["up", "--netns", &ns]);
        assert!(out.status.success(), "keepnet up failed");
        self.up = true;
    }

    /// Records that the instance was stopped by the test itself (Drop will not `down` it).
    pub fn mark_down(&mut self) {
        self.up = false;
    }

    /// Runs `cmd` inside the lab's namespace (the kernel side).
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }

    /// A command for an application on keepnet attached to this lab's instance.
    pub fn app_command(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.env("KEEPNET_RUN_DIR", &self.run_dir)
            .env("KEEPNET_INSTANCE", &self.instance);
        c
    }

    /// `keepnet status --json` without echoing it (for tight polling loops); `None` if the
    /// command failed or printed no JSON.
    pub fn status_quiet(&self) -> Option<serde_json::Value> {
        let out = Command::new(&self.keepnet)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .env("KEEPNET_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Starts `bash -c SCRIPT` inside the lab's namespace (the kernel side), in a process
    /// group of its own so that every process of a pipeline is killed with it.
    pub fn spawn_sh(&self, script: &str) -> NsJob {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "bash", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn bash in the lab's namespace");
        NsJob {
            child,
            script: script.to_string(),
            status: None,
        }
    }

    /// `keepnet status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.keepnet(&["status", "--json"]);
        assert!(out.status.success(), "status failed");
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.up {
            let _ = self.keepnet(&["down"]);
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A background job in a lab's namespace (see [`Lab::spawn_sh`]): its whole process group is
/// killed (by the group id, which is the job's own pid) and reaped on drop.
pub struct NsJob {
    child: Child,
    script: String,
    status: Option<ExitStatus>,
}

impl NsJob {
    /// True while the job has not exited.
    pub fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_none()
    }

    /// Waits for the job to exit, at most `limit` (then kills it); returns its exit status
    /// (`None` if it had to be killed), stdout and stderr.
    pub fn finish(mut self, limit: Duration) -> (Option<ExitStatus>, String, String) {
        let end = Instant::now() + limit;
        while self.running() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.running() {
            eprintln!(
                "job {:?} still running after {limit:?}: killing it",
                self.script
            );
            self.kill_group();
        }
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (self.status, out, err)
    }

    fn kill_group(&mut self) {
        if self.status.is_some() {
            return;
        }
        // The group id is the job's pid (process_group(0)); it is not reaped yet, so neither
        // id can have been reused.
        let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        self.status = self.child.wait().ok();
    }
}

impl Drop for NsJob {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// SHA-256 (hex) of `n` bytes where byte i is `i mod 251` (what the http service's
/// `/bytes/N` serves).
pub fn bytes_sha256(n: u64) -> String {
    use sha2::{Digest, Sha256};
    let mut pattern = vec![0u8; 251 * 4096];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(pattern.len() as u64) as usize;
        h.update(&pattern[..k]);
        left -= k as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Server `name` in a status report.
pub fn server<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no server {name} in status"))
}

/// Counter `name` of server `srv` (`drop.X` is looked up among the drops too).
pub fn counter(st: &serde_json::Value, srv: &str, name: &str) -> u64 {
    let s = server(st, srv);
    s["counters"][name]
        .as_u64()
        .or_else(|| s["drops"][name.trim_start_matches("drop.")].as_u64())
        .unwrap_or(0)
}

/// Runs `KEEPNET ARGS --config CONFIG` with `KEEPNET_RUN_DIR=RUN_DIR` and no stdin; what it
/// printed comes back, not echoed.
pub fn run_keepnet(keepnet: &Path, config: &Path, run_dir: &Path, args: &[&str]) -> Output {
    Command::new(keepnet)
        .args(args)
        .arg("--config")
        .arg(config)
        .env("KEEPNET_RUN_DIR", run_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run keepnet")
}

/// Echoes a `keepnet` run to stderr (`$ keepnet ARGS (WHO) -> status`, then its output) and
/// returns it.
pub fn echoed(who: &str, out: Output, args: &[&str]) -> Output {
    let who = if who.is_empty() {
        String::new()
    } else {
        format!(" ({who})")
    };
    eprintln!(
        "$ keepnet {}{who} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
