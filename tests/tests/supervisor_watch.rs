//! The supervisor watching its servers: `keepnet kill` (signals, a hang made with SIGSTOP,
//! a server scribbling garbage before it dies), restarts with their recovery time, backoff
//! and the restart intensity limit of a crash loop, restart-all, and `kill`'s argument
//! errors. Every instance uses the memory wire (`link.backend = "wire"`) with no peer, and a
//! runtime directory of its own: no TAP, no namespace, no root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use keepnet_tests::harness::{heavy_lock, Watchdog};
use keepnet_tests::lab::{binary, echoed, run_keepnet};
use serde_json::Value;

/// An instance on the memory wire, brought up by the test and down again on every exit path.
struct Instance {
    dir: PathBuf,
    config: PathBuf,
    run_dir: PathBuf,
    name: String,
    up: bool,
}

impl Instance {
    /// A fresh temp dir and config `instance = ...` + wire link + `extra`; not started.
    fn new(tag: &str, extra: &str) -> Instance {
        let name = format!("sw{tag}{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("kn-watch-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("keepnet.toml");
        std::fs::write(
            &config,
            format!("instance = \"{name}\"\nlink = {{ backend = \"wire\" }}\n{extra}"),
        )
        .expect("write config");
        Instance {
            run_dir: dir.join("run"),
            dir,
            config,
            name,
            up: false,
        }
    }

    fn keepnet(&self, args: &[&str]) -> Output {
        echoed("", self.keepnet_quiet(args), args)
    }

    fn keepnet_quiet(&self, args: &[&str]) -> Output {
        run_keepnet(&binary("keepnet"), &self.config, &self.run_dir, args)
    }

    fn start(&mut self) {
        let out = self.keepnet(&["up"]);
        self.up = true;
        assert!(out.status.success(), "keepnet up {} failed", self.name);
    }

    /// `keepnet status --json`, servers by name.
    fn servers(&self) -> BTreeMap<String, Value> {
        let out = self.keepnet_quiet(&["status", "--json"]);
        assert!(
            out.status.success(),
            "keepnet status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["servers"]
            .as_array()
            .expect("servers array")
            .iter()
            .map(|s| (s["name"].as_str().unwrap_or("?").to_string(), s.clone()))
            .collect()
    }

    /// Polls the status until `done` holds for it, at most `limit`; returns it, or panics
    /// with the last status.
    fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&BTreeMap<String, Value>) -> bool,
    ) -> BTreeMap<String, Value> {
        let end = Instant::now() + limit;
        loop {
            let s = self.servers();
            if done(&s) {
                return s;
            }
            if Instant::now() >= end {
                panic!("{what}: not within {limit:?}; status: {s:#?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join(&self.name).join("supervisor.log"))
            .unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.up {
            let _ = self.keepnet(&["down"]);
            if std::thread::panicking() {
                eprintln!("--- supervisor log ---\n{}", self.log());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pid(v: &Value) -> u64 {
    v["pid"].as_u64().unwrap_or(0)
}

fn generation(v: &Value) -> u64 {
    v["generation"].as_u64().unwrap_or(0)
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or("")
}

/// Asserts that every server but `except` kept its pid and generation.
fn others_untouched(
    before: &BTreeMap<String, Value>,
    after: &BTreeMap<String, Value>,
    except: &str,
) {
    for (name, b) in before {
        if name == except {
            continue;
        }
        let a = &after[name];
        assert_eq!(pid(a), pid(b), "{name} changed pid: {a:#}");
        assert_eq!(
            generation(a),
            generation(b),
            "{name} changed generation: {a:#}"
        );
        assert_eq!(text(a, "state"), "running", "{name}: {a:#}");
        assert_eq!(a["restarts"].as_u64(), Some(0), "{name}: {a:#}");
    }
}

/// Kills `server` with `keepnet kill SERVER ARGS...` and waits for its successor to run;
/// returns the status before and after.
fn kill_and_wait(
    inst: &Instance,
    server: &str,
    args: &[&str],
) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
    let before = inst.servers();
    let old = pid(&before[server]);
    let mut cmd = vec!["kill", server];
    cmd.extend_from_slice(args);
    let out = inst.keepnet(&cmd);
    assert!(out.status.success(), "keepnet kill {server} failed");
    let after = inst.wait_for(
        &format!("{server} restarted"),
        Duration::from_secs(10),
        |s| {
            let v = &s[server];
            pid(v) != 0
                && pid(v) != old
                && text(v, "state") == "running"
                && !v["last_recovery_us"].is_null()
        },
    );
    (before, after)
}

#[test]
fn killed_servers_restart_with_their_recovery_time_and_neighbours_untouched() {
    let _w = Watchdog::arm("killed servers restart", Duration::from_secs(180));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut inst = Instance::new(
        "k",
        "services = [{ name = \"udp-echo\", args = [\"udp-echo\", \"--port\", \"7\"] }]\n",
    );
    inst.start();
    for (server, signal) in [("tcp", None), ("driver", Some("KILL")), ("udp", Some("9"))] {
        let args: Vec<&str> = signal.map(|s| vec!["--signal", s]).unwrap_or_default();
        let (before, after) = kill_and_wait(&inst, server, &args);
        let v = &after[server];
        eprintln!("{server} after kill: {v:#}");
        assert_eq!(v["restarts"].as_u64(), Some(1), "{v:#}");
        assert_eq!(generation(v), generation(&before[server]) + 1, "{v:#}");
        assert!(text(v, "last_exit").contains("SIGKILL"), "{v:#}");
        let us = v["last_recovery_us"].as_u64().expect("last_recovery_us");
        assert!(us > 0 && us < 5_000_000, "recovery {us} us");
        // The others carry on, as they were (each killed one restarted once).
        for (name, b) in &before {
            if name == server {
                continue;
            }
            assert_eq!(pid(&after[name]), pid(b), "{name} changed pid");
            assert_eq!(text(&after[name], "state"), "running", "{name}");
        }
    }
    // The udp service stayed attached across the udp server's restart.
    let st: Value =
        serde_json::from_slice(&inst.keepnet(&["status", "--json"]).stdout).expect("status");
    let services = st["services"].as_array().cloned().unwrap_or_default();
    assert!(
        services
            .iter()
            .any(|s| text(s, "name") == "udp-echo" && pid(s) != 0),
        "{st:#}"
    );
    let human = inst.keepnet(&["status"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(
        human.contains("tcp: restarts 1, last exit: killed by signal 9 (SIGKILL)"),
        "{human}"
    );
    let log = inst.log();
    for event in ["detected", "restarting", "serving again", "recovery_us="] {
        assert!(
            log.contains(event),
            "no {event:?} in the supervisor log:\n{log}"
        );
    }
}

#[test]
fn a_stopped_server_is_caught_by_its_heartbeat_and_replaced() {
    let _w = Watchdog::arm("hang caught by heartbeat", Duration::from_secs(120));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut inst = Instance::new("h", "services = []\n[servers.ip]\nheartbeat_ms = 100\n");
    inst.start();
    let t0 = Instant::now();
    let (before, after) = kill_and_wait(&inst, "ip", &["--signal", "STOP"]);
    let took = t0.elapsed();
    let v = &after["ip"];
    eprintln!("ip after SIGSTOP ({took:?}): {v:#}");
    assert_eq!(generation(v), generation(&before["ip"]) + 1, "{v:#}");
    assert_eq!(v["restarts"].as_u64(), Some(1), "{v:#}");
    let exit = text(v, "last_exit");
    let ms: u64 = exit
        .strip_prefix("hung: no heartbeat for ")
        .and_then(|r| r.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last_exit {exit:?} does not name the heartbeat"));
    // Seen after two periods (200 ms), within a few more.
    assert!((200..2000).contains(&ms), "{exit}");
    // Measured from the SIGSTOP, which came up to one park (50 ms) after the last beat.
    let us = v["last_recovery_us"].as_u64().unwrap_or(0);
    assert!((100_000..3_000_000).contains(&us), "recovery {us} us");
    assert!(took < Duration::from_secs(5), "{took:?}");
    others_untouched(&before, &after, "ip");
}

#[test]
fn a_server_scribbling_garbage_on_its_rings_takes_no_neighbour_down() {
    let _w = Watchdog::arm("scribble", Duration::from_secs(120));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut inst = Instance::new("s", "services = []\n");
    inst.start();
    for server in ["ip", "udp", "driver"] {
        let (before, after) = kill_and_wait(&inst, server, &["--scribble"]);
        let v = &after[server];
        assert!(text(v, "last_exit").contains("SIGABRT"), "{v:#}");
        assert_eq!(generation(v), generation(&before[server]) + 1, "{v:#}");
        // Give the neighbours time to trip over the garbage, then check they did not.
        std::thread::sleep(Duration::from_millis(500));
        let later = inst.servers();
        for (name, b) in &before {
            if name == server {
                continue;
            }
            assert_eq!(
                pid(&later[name]),
                pid(b),
                "{name} died after {server} scribbled"
            );
            assert_eq!(text(&later[name], "state"), "running", "{name}");
        }
    }
    let log = inst.log();
    assert!(log.contains("scribble"), "{log}");
}

/// A udp "binary" that runs the real server the first time and fails at once afterwards.
fn crash_after_first_start(dir: &Path) -> PathBuf {
    let script = dir.join("udp-once.sh");
    let marker = dir.join("udp-started-once");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ ! -e '{m}' ]; then : > '{m}'; exec '{real}' \"$@\"; fi\nexit 1\n",
            m = marker.display(),
            real = binary("keepnet-udp").display()
        ),
    )
    .expect("write script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

#[test]
fn a_crash_loop_backs_off_and_stops_at_the_restart_limit() {
    let _w = Watchdog::arm("crash loop", Duration::from_secs(120));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut inst = Instance::new("c", "");
    let script = crash_after_first_start(&inst.dir);
    let extra = format!(
        "services = []\n[servers.udp]\nbinary = \"{}\"\nmax_restarts = 3\nwindow_s = 10\n\
         backoff_initial_ms = 200\nbackoff_max_ms = 400\n",
        script.display()
    );
    let text_cfg = std::fs::read_to_string(&inst.config).expect("config");
    std::fs::write(&inst.config, format!("{text_cfg}{extra}")).expect("config");
    inst.start();
    let before = inst.servers();
    let out = inst.keepnet(&["kill", "udp"]);
    assert!(out.status.success());
    let mut states = Vec::new();
    let after = inst.wait_for("udp failed", Duration::from_secs(20), |s| {
        let st = text(&s["udp"], "state").to_string();
        if states.last() != Some(&st) {
            states.push(st.clone());
        }
        st == "failed"
    });
    eprintln!("udp states seen: {states:?}");
    let v = &after["udp"];
    eprintln!("{v:#}");
    assert!(states.iter().any(|s| s == "backoff"), "{states:?}");
    assert_eq!(pid(v), 0);
    assert_eq!(v["restarts"].as_u64(), Some(3), "{v:#}");
    assert_eq!(text(v, "last_exit"), "exited with code 1");
    assert_eq!(
        text(v, "detail"),
        "failed: 3 restarts in 10 s, limit reached; not restarting"
    );
    others_untouched(&before, &after, "udp");
    // It stays down, and says so to `keepnet kill` too.
    std::thread::sleep(Duration::from_millis(700));
    let later = inst.servers();
    assert_eq!(text(&later["udp"], "state"), "failed");
    others_untouched(&before, &later, "udp");
    let out = inst.keepnet(&["kill", "udp"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("udp is not running (state failed)"), "{err}");
    let human = String::from_utf8_lossy(&inst.keepnet(&["status"]).stdout).to_string();
    assert!(
        human.contains("failed: 3 restarts in 10 s, limit reached"),
        "{human}"
    );
    let log = inst.log();
    assert!(log.contains("backoff_ms=200"), "{log}");
    assert!(log.contains("backoff_ms=400"), "{log}");
    assert!(log.contains("server failed"), "{log}");
}

#[test]
fn restart_all_restarts_every_server_once_then_stops_the_looping_one() {
    let _w = Watchdog::arm("restart-all", Duration::from_secs(120));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut inst = Instance::new("r", "");
    let script = crash_after_first_start(&inst.dir);
    let extra = format!(
        "services = []\n[servers]\non_limit = \"restart-all\"\n[servers.udp]\nbinary = \"{}\"\n\
         max_restarts = 2\nwindow_s = 30\nbackoff_initial_ms = 20\nbackoff_max_ms = 40\n",
        script.display()
    );
    let text_cfg = std::fs::read_to_string(&inst.config).expect("config");
    std::fs::write(&inst.config, format!("{text_cfg}{extra}")).expect("config");
    inst.start();
    let before = inst.servers();
    assert!(inst.keepnet(&["kill", "udp"]).status.success());
    let after = inst.wait_for(
        "udp failed after a restart-all",
        Duration::from_secs(20),
        |s| {
            text(&s["udp"], "state") == "failed"
                && ["driver", "ip", "tcp"]
                    .iter()
                    .all(|n| text(&s[*n], "state") == "running" && pid(&s[*n]) != pid(&before[*n]))
        },
    );
    eprintln!("{after:#?}");
    for name in ["driver", "ip", "tcp"] {
        let v = &after[name];
        assert_eq!(generation(v), generation(&before[name]) + 1, "{v:#}");
        assert_eq!(v["restarts"].as_u64(), Some(1), "{v:#}");
        assert!(text(v, "last_exit").contains("restart-all"), "{v:#}");
        assert!(!v["last_recovery_us"].is_null(), "{v:#}");
    }
    let detail = text(&after["udp"], "detail");
    assert!(
        detail.contains("limit reached again within 30 s of a restart of every server"),
        "{detail}"
    );
    assert!(inst.log().contains("restarting every server"));
}

#[test]
fn kill_refuses_unknown_servers_and_signals_plainly() {
    let _w = Watchdog::arm("kill arguments", Duration::from_secs(60));
    let inst = Instance::new("a", "services = []\n");
    for (args, says) in [
        (
            &["kill", "tpc"][..],
            "unknown server \"tpc\": use one of driver, ip, udp, tcp",
        ),
        (
            &["kill", "tcp", "--signal", "FOO"][..],
            "unknown signal \"FOO\"",
        ),
        (
            &["kill", "tcp", "--signal", "0"][..],
            "unknown signal \"0\"",
        ),
        (
            &["kill", "tcp", "--signal", "99"][..],
            "unknown signal \"99\"",
        ),
        (
            &["kill", "tcp", "--signal", "KILL", "--scribble"][..],
            "cannot be used with",
        ),
        (&["kill"][..], "SERVER"),
        // Valid arguments, but no instance of that name runs.
        (&["kill", "tcp", "--signal", "sigterm"][..], "is running"),
    ] {
        let out = inst.keepnet(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// A "binary" for `server` that runs the real one the first time and fails at once afterwards.
fn crash_after_first_start_of(dir: &Path, server: &str) -> PathBuf {
    let script = dir.join(format!("{server}-once.sh"));
    let marker = dir.join(format!("{server}-started-once"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ ! -e '{m}' ]; then : > '{m}'; exec '{real}' \"$@\"; fi\nexit 1\n",
            m = marker.display(),
            real = binary(&format!("keepnet-{server}")).display()
        ),
    )
    .expect("write script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// Kills and reaps a child process on every exit path.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 6: an application blocked reading a TCP connection (and another thread of it in
/// accept) when its tcp server goes down for good. Two constellations on the memory wire: a
/// serves a TCP echo, b runs the application and a tcp "binary" that fails every start after
/// the first. `keepnet kill tcp` on b: two restarts fail, the server ends `failed`, the
/// supervisor tells b's applications, and the blocked read returns a clear error at once
/// instead of waiting for ever.
#[test]
fn an_app_blocked_on_a_failed_tcp_server_gets_a_clear_error() {
    let _w = Watchdog::arm("app on a failed tcp server", Duration::from_secs(120));
    let _l = heavy_lock(Duration::from_secs(600));
    let mut a = Instance::new("da", "");
    std::fs::write(
        &a.config,
        format!(
            "instance = \"{}\"\n\
             services = [{{ name = \"tcp-echo\", args = [\"tcp-echo\", \"--port\", \"7\"] }}]\n\
             [link]\nbackend = \"wire\"\nwire_side = \"a\"\n\
             [ip]\naddr = \"198.18.9.1/24\"\nmac = \"02:6b:6e:00:09:01\"\n",
            a.name
        ),
    )
    .expect("config a");
    a.start();
    let mut b = Instance::new("db", "");
    // The wire's far side is found through a's control socket: one run directory.
    b.run_dir = a.run_dir.clone();
    let script = crash_after_first_start_of(&b.dir, "tcp");
    std::fs::write(
        &b.config,
        format!(
            "instance = \"{}\"\nservices = []\n\
             [link]\nbackend = \"wire\"\nwire_side = \"b\"\nwire_peer = \"{}\"\n\
             [ip]\naddr = \"198.18.9.2/24\"\nmac = \"02:6b:6e:00:09:02\"\n\
             [servers.tcp]\nbinary = \"{}\"\nmax_restarts = 2\nwindow_s = 30\n\
             backoff_initial_ms = 20\nbackoff_max_ms = 40\n",
            b.name,
            a.name,
            script.display()
        ),
    )
    .expect("config b");
    b.start();

    let mut app = Command::new(binary("kn-tcp-app"))
        .args(["wait-down", "198.18.9.1:7"])
        .env("KEEPNET_RUN_DIR", &b.run_dir)
        .env("KEEPNET_INSTANCE", &b.name)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("run kn-tcp-app");
    let stdout = app.stdout.take().expect("app stdout");
    let app = Reaped(app);
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send((line, Instant::now())).is_err() {
                break;
            }
        }
    });
    let (ready, _) = lines
        .recv_timeout(Duration::from_secs(20))
        .expect("kn-tcp-app never said ready");
    assert_eq!(ready, "ready");
    // It is blocked now, in read and in accept.
    std::thread::sleep(Duration::from_millis(300));
    assert!(lines.try_recv().is_err(), "kn-tcp-app returned early");

    let before = b.servers();
    assert!(b.keepnet(&["kill", "tcp"]).status.success());
    let after = b.wait_for("tcp failed", Duration::from_secs(20), |s| {
        text(&s["tcp"], "state") == "failed"
    });
    let failed_seen = Instant::now();
    let v = &after["tcp"];
    eprintln!("{v:#}");
    assert_eq!(v["restarts"].as_u64(), Some(2), "{v:#}");
    others_untouched(&before, &after, "tcp");

    let (line, at) = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the blocked read did not return within 5 s of the tcp server failing");
    eprintln!(
        "kn-tcp-app: {line} ({:?} after the status said failed)",
        at.checked_duration_since(failed_seen)
    );
    assert!(
        line.starts_with(
            "down ConnectionAborted ConnectionAborted: keepnet: the tcp server is down \
             (restart limit reached: 2 restarts in 30 s; not restarting)"
        ),
        "{line}"
    );
    let mut app = app;
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = app.0.try_wait().expect("wait kn-tcp-app") {
            break st;
        }
        assert!(Instant::now() < deadline, "kn-tcp-app did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "kn-tcp-app: {status}");
    let log = b.log();
    assert!(
        log.contains("applications told the server is down"),
        "{log}"
    );
}
