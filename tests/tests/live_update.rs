//! Live update drills without root (DESIGN.md "Live update", docs/live-update.md): two
//! constellations joined by keepnet's memory wire, as in `tcp_wire.rs`. Instance a runs a
//! TCP and a UDP echo service; an application on instance b echoes through them, TCP echo
//! after echo (each byte checked) and a UDP echo run that never resends and counts every
//! datagram whose echo never came (`kn-udp-app echo-client`). Meanwhile `keepnet update`
//! replaces a's servers: 20 times in a row per server (nothing lost, generation +20, no
//! restart); with bad builds (wrapper scripts with `KEEPNET_FAULT`) that must be refused or
//! rolled back with the old build serving on; from state format 1 to 2 and back (the udp
//! server's format-2 variant); a second update while one runs; and with the supervisor
//! killed in the middle, after which one instance serves, `keepnet up` re-adopts it, and
//! nothing of the update is left once the instance is down.
//!
//! Every test has its own temp directory, instance names and run directory, brings its
//! instances down on every exit path (Drop) and kills, by pid, any process they leave
//! behind (found by the run directory in its environment), under a watchdog.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keepnet_tests::harness::{exited, heavy_lock, Watchdog};
use keepnet_tests::lab::{binary, counter, echoed, run_keepnet, server};
use keepnet_tests::update::{
    describe_process, environ, exe, kill_all, processes_logging_to, processes_of_run_dir,
    summary_ms, update, wrapper, UpdateRun,
};

/// The updates in a row per server.
const UPDATES: u64 = 20;
/// Bytes per TCP echo: a few seconds each on a debug build, so that several connections,
/// each opened after some of the updates, run across them.
const ECHO_BYTES: u64 = 16 << 20;
/// How long a test waits for the heavy-test lock: one pair of busy constellations at a
/// time on a 2-core machine (the drills measure readiness limits of a few seconds).
const HEAVY_WAIT: Duration = Duration::from_secs(1200);
/// keepnet's address on side a (the echo services), and side b's.
const A_ADDR: &str = "198.18.20.1";
const B_ADDR: &str = "198.18.20.2";
const SERVERS: [&str; 4] = ["driver", "ip", "udp", "tcp"];

static SEQ: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------
// Two constellations over the memory wire.

/// Instances a (echo services) and b (the application's side) over one memory wire, in a
/// temp directory of their own; brought down, and their leftovers killed, on every exit path.
struct Pair {
    dir: PathBuf,
    run_dir: PathBuf,
    a_name: String,
    b_name: String,
    a_config: PathBuf,
    b_config: PathBuf,
    up: bool,
    began: Instant,
}

impl Pair {
    /// Brings up a (with `extra_a` appended to its config) and then b.
    fn up(tag: &str, extra_a: &str) -> Pair {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{tag}{}x{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("kn-lu-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (a_name, b_name) = (format!("{id}a"), format!("{id}b"));
        let a_config = dir.join("a.toml");
        let b_config = dir.join("b.toml");
        std::fs::write(
            &a_config,
            format!(
                "instance = \"{a_name}\"\n\
                 services = [{{ name = \"tcp-echo\", args = [\"tcp-echo\", \"--port\", \"7\"] }}, \
                 {{ name = \"udp-echo\", args = [\"udp-echo\", \"--port\", \"7\"] }}]\n\
                 [link]\nbackend = \"wire\"\nwire_side = \"a\"\n\
                 [ip]\naddr = \"{A_ADDR}/24\"\nmac = \"02:6b:6e:00:14:01\"\n{extra_a}"
            ),
        )
        .expect("write a.toml");
        std::fs::write(
            &b_config,
            format!(
                "instance = \"{b_name}\"\nservices = []\n\
                 [link]\nbackend = \"wire\"\nwire_side = \"b\"\nwire_peer = \"{a_name}\"\n\
                 [ip]\naddr = \"{B_ADDR}/24\"\nmac = \"02:6b:6e:00:14:02\"\n"
            ),
        )
        .expect("write b.toml");
        // Marked up from the start: a failing `up` is brought down too.
        let p = Pair {
            run_dir: dir.join("run"),
            dir,
            a_name,
            b_name,
            a_config,
            b_config,
            up: true,
            began: Instant::now(),
        };
        assert!(p.a(&["up"]).status.success(), "keepnet up (a) failed");
        assert!(p.b(&["up"]).status.success(), "keepnet up (b) failed");
        p
    }

    /// `keepnet ARGS` against instance a, echoed.
    fn a(&self, args: &[&str]) -> Output {
        let out = run_keepnet(&binary("keepnet"), &self.a_config, &self.run_dir, args);
        echoed("a", out, args)
    }

    /// `keepnet ARGS` against instance b, echoed.
    fn b(&self, args: &[&str]) -> Output {
        let out = run_keepnet(&binary("keepnet"), &self.b_config, &self.run_dir, args);
        echoed("b", out, args)
    }

    /// `keepnet update ARGS` against instance a.
    fn update(&self, args: &[&str]) -> UpdateRun {
        update(&binary("keepnet"), &self.a_config, &self.run_dir, args)
    }

    /// `keepnet update ARGS` against instance a, started in the background (its output goes
    /// to files in the temp dir; [`Pair::finish_update`] collects it).
    fn spawn_update(&self, args: &[&str]) -> (Child, Instant) {
        eprintln!("$ keepnet update {} & (a)", args.join(" "));
        let child = Command::new(binary("keepnet"))
            .arg("update")
            .args(args)
            .arg("--config")
            .arg(&self.a_config)
            .env("KEEPNET_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .stdout(File::create(self.dir.join("bg-update.out")).expect("output file"))
            .stderr(File::create(self.dir.join("bg-update.err")).expect("output file"))
            .spawn()
            .expect("spawn keepnet update");
        (child, Instant::now())
    }

    /// Waits (at most `limit`, then kills it) for a background update and reads its output.
    fn finish_update(&self, (mut child, began): (Child, Instant), limit: Duration) -> UpdateRun {
        let end = began + limit;
        let code = loop {
            if let Some(st) = child.try_wait().expect("wait keepnet update") {
                break st.code();
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("keepnet update still running {limit:?} after it began");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let run = UpdateRun {
            code,
            stdout: std::fs::read_to_string(self.dir.join("bg-update.out")).unwrap_or_default(),
            stderr: std::fs::read_to_string(self.dir.join("bg-update.err")).unwrap_or_default(),
            took: began.elapsed(),
        };
        eprintln!(
            "(background update) -> {:?} after {:.0} ms\n{}",
            run.code,
            run.took.as_secs_f64() * 1000.0,
            run.text().trim_end()
        );
        run
    }

    /// `keepnet status --json` of instance a, quietly (None if it fails).
    fn status_quiet(&self) -> Option<serde_json::Value> {
        let out = run_keepnet(
            &binary("keepnet"),
            &self.a_config,
            &self.run_dir,
            &["status", "--json"],
        );
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `keepnet status --json` of instance a, retried for up to 10 s.
    fn status(&self) -> serde_json::Value {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = self.status_quiet() {
                return v;
            }
            assert!(Instant::now() < end, "keepnet status (a) failing for 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Server `name` of instance a as status shows it now.
    fn srv(&self, name: &str) -> Srv {
        Srv::of(&self.status(), name)
    }

    /// A command for an application attached to instance b.
    fn app(&self, bin: &str) -> Command {
        let mut c = Command::new(binary(bin));
        c.env("KEEPNET_RUN_DIR", &self.run_dir)
            .env("KEEPNET_INSTANCE", &self.b_name)
            .stdin(Stdio::null());
        c
    }

    /// Instance a's log of `who` (a server, or `supervisor`).
    fn log_path(&self, who: &str) -> PathBuf {
        self.run_dir.join(&self.a_name).join(format!("{who}.log"))
    }

    /// The warnings and errors in instance a's log of `who`, for a failure message.
    fn log_news(&self, who: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(who)).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                ["WARN", "ERROR", "panicked", "update", "re-adopt"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Brings both instances down and returns the processes that outlived that (each
    /// described), killing them by pid.
    fn down(&mut self) -> Vec<String> {
        if self.up {
            let _ = self.b(&["down"]);
            let _ = self.a(&["down"]);
            self.up = false;
        }
        // `down` returns once the supervisor stopped; give its children a moment to go.
        let end = Instant::now() + Duration::from_secs(3);
        let mut left = processes_of_run_dir(&self.run_dir);
        while !left.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            left = processes_of_run_dir(&self.run_dir);
        }
        let described: Vec<String> = left.iter().map(|&p| describe_process(p)).collect();
        kill_all(&left);
        described
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let left = self.down();
        if !left.is_empty() {
            eprintln!("killed processes left behind: {left:#?}");
        }
        println!(
            "instances {} and {}: {:.1} s from up to down",
            self.a_name,
            self.b_name,
            self.began.elapsed().as_secs_f64()
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One server of instance a as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Srv {
    pid: u32,
    generation: u64,
    restarts: u64,
    state: String,
}

impl Srv {
    fn of(st: &serde_json::Value, name: &str) -> Srv {
        let s = server(st, name);
        Srv {
            pid: s["pid"].as_u64().unwrap_or(0) as u32,
            generation: s["generation"].as_u64().unwrap_or(0),
            restarts: s["restarts"].as_u64().unwrap_or(0),
            state: s["state"].as_str().unwrap_or("?").to_string(),
        }
    }
}

/// The executable of server `name`'s build in the workspace (what "the old build" is).
fn server_binary(name: &str) -> PathBuf {
    let p = binary(&format!("keepnet-{name}"));
    std::fs::canonicalize(&p).unwrap_or(p)
}

// ---------------------------------------------------------------------------------------
// The traffic: TCP echo after TCP echo, and a UDP echo run, from side b through side a.

/// `kn-tcp-app echo-client` runs one after another (each a new connection) until stopped.
struct TcpEchoes {
    stop: Arc<AtomicBool>,
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl TcpEchoes {
    fn start(p: &Pair) -> TcpEchoes {
        let stop = Arc::new(AtomicBool::new(false));
        let abort = Arc::new(AtomicBool::new(false));
        let (s, a) = (stop.clone(), abort.clone());
        let (dir, run_dir, instance) = (p.dir.clone(), p.run_dir.clone(), p.b_name.clone());
        let app = binary("kn-tcp-app");
        let thread = std::thread::spawn(move || {
            let mut results = Vec::new();
            // Bounded: each echo by the client's own time limit, the loop by the count.
            for n in 0..1000u64 {
                if s.load(Ordering::SeqCst) || a.load(Ordering::SeqCst) {
                    break;
                }
                let out = dir.join(format!("tcp-echo-{n}.out"));
                let file = File::create(&out).expect("echo output file");
                let mut child = Command::new(&app)
                    .args([
                        "echo-client",
                        &format!("{A_ADDR}:7"),
                        &ECHO_BYTES.to_string(),
                        &(100 + n).to_string(),
                    ])
                    .env("KEEPNET_RUN_DIR", &run_dir)
                    .env("KEEPNET_INSTANCE", &instance)
                    .stdin(Stdio::null())
                    .stdout(file)
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("spawn kn-tcp-app");
                let status = loop {
                    if let Some(st) = child.try_wait().expect("wait kn-tcp-app") {
                        break Some(st);
                    }
                    if a.load(Ordering::SeqCst) {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                let said = std::fs::read_to_string(&out).unwrap_or_default();
                let said = said.trim().to_string();
                let ok = status.is_some_and(|s| s.success()) && said.starts_with("ok ");
                eprintln!("tcp echo {}: {status:?}: {said}", results.len() + 1);
                results.push(if ok {
                    said
                } else {
                    format!("FAILED ({status:?}): {said}")
                });
                if !ok {
                    break;
                }
            }
            results
        });
        TcpEchoes {
            stop,
            abort,
            thread: Some(thread),
        }
    }

    /// Lets the echo under way finish (bounded by the client's own limit); the number of
    /// echoes if there was at least one and all were intact, else why not.
    fn check(mut self, what: &str) -> Result<usize, String> {
        self.stop.store(true, Ordering::SeqCst);
        let results = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .ok_or_else(|| format!("{what}: the TCP echo thread panicked"))?;
        if results.is_empty() {
            return Err(format!("{what}: no TCP echo ran"));
        }
        let bad: Vec<&String> = results.iter().filter(|r| !r.starts_with("ok ")).collect();
        if !bad.is_empty() {
            return Err(format!(
                "{what}: a TCP echo failed: {bad:?} (all: {results:?})"
            ));
        }
        Ok(results.len())
    }

    /// [`TcpEchoes::check`], asserted.
    fn finish(self, what: &str) -> usize {
        self.check(what).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for TcpEchoes {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a `kn-udp-app echo-client` run reported.
#[derive(Debug, Default)]
struct UdpSummary {
    sent: u64,
    echoed: u64,
    lost: u64,
    late: u64,
    duplicate: u64,
    mismatched: u64,
    unsent: u64,
}

/// One `kn-udp-app echo-client` run (no resends) until stopped.
struct UdpEcho {
    child: Option<Child>,
    stop_file: PathBuf,
    out: PathBuf,
}

impl UdpEcho {
    fn start(p: &Pair) -> UdpEcho {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let stop_file = p.dir.join(format!("udp-stop-{n}"));
        let out = p.dir.join(format!("udp-echo-{n}.out"));
        let child = p
            .app("kn-udp-app")
            .args([
                "echo-client",
                &format!("{A_ADDR}:7"),
                stop_file.to_str().expect("utf-8 path"),
                &(7000 + u64::from(n)).to_string(),
            ])
            .stdout(File::create(&out).expect("udp output file"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn kn-udp-app");
        UdpEcho {
            child: Some(child),
            stop_file,
            out,
        }
    }

    /// Stops the run (it waits for the echoes still due); its summary if some datagrams went
    /// through and none was lost, unsent, mismatched or echoed twice, else why not.
    fn check(mut self, what: &str) -> Result<UdpSummary, String> {
        std::fs::write(&self.stop_file, b"stop").expect("write stop file");
        let mut child = self.child.take().expect("udp echo child");
        let end = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = child.try_wait().expect("wait kn-udp-app") {
                break Some(st);
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let line = std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .trim()
            .to_string();
        let word = |k: &str| -> u64 {
            let mut w = line.split_whitespace();
            while let Some(x) = w.next() {
                if x == k {
                    return w.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                }
            }
            0
        };
        let s = UdpSummary {
            sent: word("sent"),
            echoed: word("echoed"),
            lost: word("lost"),
            late: word("late"),
            duplicate: word("duplicate"),
            mismatched: word("mismatched"),
            unsent: word("unsent"),
        };
        println!("{what}: udp echo: {line}");
        if status.is_none() {
            return Err(format!("{what}: the UDP echo client did not stop"));
        }
        if !line.starts_with("sent ") {
            return Err(format!(
                "{what}: the UDP echo client printed no summary ({status:?}): {line:?}"
            ));
        }
        if s.sent == 0 {
            return Err(format!("{what}: the UDP echo sent nothing: {line}"));
        }
        if (s.lost, s.unsent, s.mismatched, s.duplicate) != (0, 0, 0, 0) {
            return Err(format!(
                "{what}: UDP datagrams lost, unsent, mismatched or echoed twice (zero loss is \
                 required): {line}"
            ));
        }
        Ok(s)
    }

    /// [`UdpEcho::check`], asserted.
    fn finish(self, what: &str) -> UdpSummary {
        self.check(what).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// 20 updates in a row of each server.

/// 20 updates of `name` in a row with traffic running; what went wrong, if anything.
fn twenty_updates_in_a_row(p: &Pair, name: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let st = p.status();
    let before: Vec<Srv> = SERVERS.iter().map(|n| Srv::of(&st, n)).collect();
    let tcp = TcpEchoes::start(p);
    let udp = UdpEcho::start(p);
    std::thread::sleep(Duration::from_millis(300));
    let i = SERVERS.iter().position(|n| *n == name).expect("server");
    let g0 = before[i].generation;
    let mut blackouts = Vec::new();
    let t = Instant::now();
    for k in 1..=UPDATES {
        let r = p.update(&[name, "--grace", "20"]);
        if r.code != Some(0) || r.result() != "updated" {
            failures.push(format!(
                "update {k}: exit {:?}: {}",
                r.code,
                r.text().trim()
            ));
            break;
        }
        if r.generation() != Some(g0 + k) {
            failures.push(format!(
                "update {k}: generation {:?}, not {} ({})",
                r.generation(),
                g0 + k,
                r.line()
            ));
        }
        match r.blackout_ms() {
            Some(ms) => blackouts.push(ms),
            None => failures.push(format!("update {k}: no blackout measured: {}", r.line())),
        }
    }
    let took = t.elapsed();
    let what = format!("{name} updates");
    let echoes = tcp.check(&what).unwrap_or_else(|e| {
        failures.push(e);
        0
    });
    let u = udp.check(&what).unwrap_or_else(|e| {
        failures.push(e);
        UdpSummary::default()
    });
    let st = p.status();
    let after: Vec<Srv> = SERVERS.iter().map(|n| Srv::of(&st, n)).collect();
    println!(
        "{name}: {UPDATES} updates in {:.1} s; blackouts {} ({blackouts:.3?}); {echoes} TCP \
         echoes of {ECHO_BYTES} bytes intact; UDP {} sent, {} echoed, {} lost",
        took.as_secs_f64(),
        summary_ms(&blackouts),
        u.sent,
        u.echoed + u.late,
        u.lost
    );
    for (j, n) in SERVERS.iter().enumerate() {
        let (b, a) = (&before[j], &after[j]);
        if a.state != "running" || a.restarts != b.restarts {
            failures.push(format!(
                "{n} after the updates of {name}: {a:?} (before: {b:?})"
            ));
        }
        if j == i {
            if a.generation != b.generation + UPDATES || a.pid == b.pid {
                failures.push(format!(
                    "{n}: {b:?} -> {a:?} over {UPDATES} updates (generation +{UPDATES} expected)"
                ));
            }
        } else if a != b {
            failures.push(format!(
                "{n} changed while {name} was updated: {b:?} -> {a:?}"
            ));
        }
    }
    let last = &server(&st, name)["last_update"];
    if last["result"] != "updated"
        || last["generation"].as_u64() != Some(g0 + UPDATES)
        || last["grace_ms"].as_u64() != Some(20)
    {
        failures.push(format!("last_update {last}"));
    }
    if !failures.is_empty() {
        eprintln!(
            "supervisor log:\n{}\n{name} log:\n{}",
            p.log_news("supervisor"),
            p.log_news(name)
        );
    }
    failures
        .into_iter()
        .map(|f| format!("{name}: {f}"))
        .collect()
}

/// For each server in turn (driver, ip, udp, tcp), 20 `keepnet update SERVER --grace 20` in
/// a row on side a, while side b echoes TCP (connection after connection) and UDP (no
/// resends) through a's services: each update says `updated` with the next generation and
/// a blackout, the server's generation goes up by exactly 20, no server restarts, the other
/// servers keep their pids, every echo is intact and no datagram is lost.
#[test]
fn every_server_updated_twenty_times_in_a_row_loses_nothing() {
    const TEST: &str = "every_server_updated_twenty_times_in_a_row_loses_nothing";
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(TEST, Duration::from_secs(240));
    let mut p = Pair::up("tw", "");
    let failures: Vec<String> = SERVERS
        .iter()
        .flat_map(|name| twenty_updates_in_a_row(&p, name))
        .collect();
    let left = p.down();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}

// ---------------------------------------------------------------------------------------
// Bad builds: refused or rolled back, the old build serving on.

/// What a drill expects of an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Refused before anything started: `keepnet: error: SERVER not updated: ...`.
    Error,
    /// `refused`: the old instance never stopped.
    Refused,
    /// `rolled back`: a new instance of the old build serves.
    RolledBack,
}

/// Runs `keepnet update ARGS` on instance a and checks the result, the message (every one
/// of `says`) and what serves afterwards: the old pid and generation after a refusal; after
/// a rollback a new pid (not the bad build's) running the old build's executable without
/// the bad build's fault in its environment. A process of the bad build still running 3 s
/// later is added to `problems` (the caller fails after the other drills ran).
fn drill(
    p: &Pair,
    args: &[&str],
    expect: Expect,
    says: &[&str],
    problems: &mut Vec<String>,
) -> UpdateRun {
    let name = args[0];
    let before = p.srv(name);
    let faulty_before: Vec<u32> = processes_of_run_dir(&p.run_dir)
        .into_iter()
        .filter(|&q| environ(q).iter().any(|e| e.starts_with("KEEPNET_FAULT=")))
        .collect();
    let r = p.update(args);
    let text = r.text();
    let what = format!("keepnet update {}", args.join(" "));
    let want = match expect {
        Expect::Error => "error",
        Expect::Refused => "refused",
        Expect::RolledBack => "rolled back",
    };
    if r.result() != want || says.iter().any(|s| !text.contains(s)) {
        eprintln!(
            "supervisor log:\n{}\n{name} log:\n{}",
            p.log_news("supervisor"),
            p.log_news(name)
        );
    }
    assert_eq!(r.result(), want, "{what}: {text}");
    assert_eq!(r.code, Some(1), "{what}: exit code ({text})");
    for s in says {
        assert!(text.contains(s), "{what}: no {s:?} in {text:?}");
    }
    if expect == Expect::Error {
        assert!(
            text.contains(&format!("keepnet: error: {name} not updated: ")),
            "{what}: {text}"
        );
    }
    let st = p.status();
    let after = Srv::of(&st, name);
    assert_eq!(after.state, "running", "{what}: {name} after it: {after:?}");
    match expect {
        Expect::Error | Expect::Refused => {
            assert_eq!(after.pid, before.pid, "{what}: {name}'s pid changed");
            assert_eq!(
                after.generation, before.generation,
                "{what}: {name}'s generation changed"
            );
        }
        Expect::RolledBack => {
            let (from, to) = r
                .pids()
                .unwrap_or_else(|| panic!("{what}: no pids in {text}"));
            assert_eq!(from, before.pid, "{what}: the report's old pid");
            assert_eq!(
                to, after.pid,
                "{what}: the report's pid is not the one serving"
            );
            assert_ne!(
                after.pid, before.pid,
                "{what}: no new instance after a rollback"
            );
            assert!(
                !exited(after.pid),
                "{what}: the rolled back {name} is not alive"
            );
            assert!(
                after.generation > before.generation,
                "{what}: generation {} -> {}",
                before.generation,
                after.generation
            );
            let exe = exe(after.pid).map(|e| std::fs::canonicalize(&e).unwrap_or(e));
            assert_eq!(
                exe,
                Some(server_binary(name)),
                "{what}: the rolled back {name} does not run the old build's executable"
            );
            let env = environ(after.pid);
            assert!(
                !env.iter().any(|e| e.starts_with("KEEPNET_FAULT=")),
                "{what}: the rolled back {name} runs with the bad build's fault: {env:?}"
            );
        }
    }
    let last = &server(&st, name)["last_update"];
    if expect != Expect::Error {
        assert_eq!(last["result"], want, "{what}: last_update {last}");
        assert_eq!(
            last["from_pid"].as_u64(),
            Some(u64::from(before.pid)),
            "{what}: last_update {last}"
        );
        assert_eq!(
            last["pid"].as_u64(),
            Some(u64::from(after.pid)),
            "{what}: last_update {last}"
        );
    }
    // Nothing this drill started is left running with the bad build's fault (a standby
    // that hung is killed, says the reason): collected, so that every drill still runs.
    let end = Instant::now() + Duration::from_secs(3);
    let bad = || -> Vec<u32> {
        processes_of_run_dir(&p.run_dir)
            .into_iter()
            .filter(|q| !faulty_before.contains(q))
            .filter(|&q| environ(q).iter().any(|e| e.starts_with("KEEPNET_FAULT=")))
            .collect()
    };
    while !bad().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<String> = bad().into_iter().map(describe_process).collect();
    if !left.is_empty() {
        problems.push(format!(
            "{what}: the bad build still runs 3 s after the update ended ({}): {left:#?}",
            r.line()
        ));
    }
    r
}

/// Every kind of bad build, with a TCP echo (connection after connection) and a UDP echo
/// running across them all: each is refused or rolled back with its reason, the old build
/// serves on, and no byte or datagram is lost.
#[test]
fn bad_builds_are_refused_or_rolled_back_while_traffic_flows() {
    const TEST: &str = "bad_builds_are_refused_or_rolled_back_while_traffic_flows";
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(TEST, Duration::from_secs(180));
    let mut p = Pair::up("rb", "");
    let tcp_bin = server_binary("tcp");
    let bad = |server: &str, fault: &str| {
        let target = server_binary(server);
        wrapper(
            &p.dir,
            &format!("{server}-{fault}.sh"),
            &format!("KEEPNET_FAULT={fault}"),
            &target,
        )
        .to_str()
        .expect("utf-8 path")
        .to_string()
    };
    let tcp = TcpEchoes::start(&p);
    let udp = UdpEcho::start(&p);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut problems = Vec::new();

    let w = bad("tcp", "crash-at-start");
    drill(
        &p,
        &["tcp", "--binary", &w],
        Expect::Refused,
        &[
            "before it was ready in standby",
            "the old instance never stopped",
        ],
        &mut problems,
    );
    let w = bad("ip", "crash-at-start");
    drill(
        &p,
        &["ip", "--binary", &w],
        Expect::Refused,
        &[
            "before it was ready in standby",
            "the old instance never stopped",
        ],
        &mut problems,
    );
    let w = bad("tcp", "refuse-state");
    drill(
        &p,
        &["tcp", "--binary", &w],
        Expect::RolledBack,
        &["the new build refused the state"],
        &mut problems,
    );
    let w = bad("udp", "refuse-state");
    drill(
        &p,
        &["udp", "--binary", &w],
        Expect::RolledBack,
        &["the new build refused the state"],
        &mut problems,
    );
    let w = bad("tcp", "hang-before-ready");
    let r = drill(
        &p,
        &["tcp", "--binary", &w],
        Expect::Refused,
        &[
            "was not ready in standby within 5 s",
            "the old instance never stopped",
        ],
        &mut problems,
    );
    assert!(
        r.took >= Duration::from_secs(5) && r.took < Duration::from_secs(15),
        "the hung standby was given up after {:?}",
        r.took
    );
    let w = bad("tcp", "crash-after-ms=50");
    drill(
        &p,
        &["tcp", "--binary", &w, "--grace", "300"],
        Expect::RolledBack,
        &["into its 300 ms grace period"],
        &mut problems,
    );
    let missing = p.dir.join("no-such-keepnet-tcp");
    drill(
        &p,
        &["tcp", "--binary", missing.to_str().expect("utf-8 path")],
        Expect::Error,
        &["No such file or directory", "tcp left as it is"],
        &mut problems,
    );
    // After all that, a good build still updates.
    let r = p.update(&[
        "tcp",
        "--binary",
        tcp_bin.to_str().expect("path"),
        "--grace",
        "20",
    ]);
    assert_eq!(
        r.result(),
        "updated",
        "a good update after the drills: {}",
        r.text()
    );
    let took = t.elapsed();
    let echoes = tcp.finish(TEST);
    let u = udp.finish(TEST);
    let st = p.status();
    for n in SERVERS {
        let s = Srv::of(&st, n);
        assert_eq!(s.state, "running", "{n}: {s:?}");
        println!("{n} after the drills: {s:?}");
    }
    println!(
        "bad builds: 8 drills and a good update in {:.1} s, {echoes} TCP echoes intact, UDP \
         {} sent, {} lost",
        took.as_secs_f64(),
        u.sent,
        u.lost
    );
    let left = p.down();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}

// ---------------------------------------------------------------------------------------
// State format evolution (the udp server's format-2 variant).

/// Forward: format 1 -> the format-2 build restores it with the default (`state.handoffs`
/// starts from 0), and format 2 -> format 2 carries it on. Backward: the format-1 build is
/// refused before it starts (it does not read format 2), and with `--skip-check` it refuses
/// the snapshot itself and the update is rolled back to the format-2 build.
#[test]
fn udp_state_format_goes_forward_and_is_refused_going_back() {
    const TEST: &str = "udp_state_format_goes_forward_and_is_refused_going_back";
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(TEST, Duration::from_secs(120));
    let mut p = Pair::up("fm", "");
    let plain = server_binary("udp");
    let plain = plain.to_str().expect("utf-8 path");
    let v2 = wrapper(
        &p.dir,
        "udp-v2.sh",
        "KEEPNET_UDP_STATE_FORMAT=2",
        Path::new(plain),
    );
    let v2 = v2.to_str().expect("utf-8 path");
    let tcp = TcpEchoes::start(&p);
    let udp = UdpEcho::start(&p);
    std::thread::sleep(Duration::from_millis(300));
    let mut problems = Vec::new();
    let fields = |st: &serde_json::Value| {
        let s = server(st, "udp");
        (
            s["state_format"].as_u64(),
            s["state_formats_read"].as_str().unwrap_or("?").to_string(),
            counter(st, "udp", "state.handoffs"),
        )
    };
    let st = p.status();
    assert_eq!(fields(&st).0, Some(1), "udp before: {}", server(&st, "udp"));
    assert_eq!(fields(&st).1, "1-1");

    // Forward, from format 1.
    let r = p.update(&["udp", "--binary", v2, "--grace", "20"]);
    assert_eq!(r.result(), "updated", "to the format-2 build: {}", r.text());
    assert!(r.line().contains("state format 1 ("), "{}", r.line());
    let st = p.status();
    let last = &server(&st, "udp")["last_update"];
    assert_eq!(
        last["state_format"].as_u64(),
        Some(1),
        "snapshot handed over: {last}"
    );
    assert_eq!(
        fields(&st),
        (Some(2), "1-2".to_string(), 1),
        "udp after the first update to format 2 (format 1 restored with handoffs = 0, then \
         counted): {}",
        server(&st, "udp")
    );
    // Format 2 to format 2: the field is carried on.
    let r = p.update(&["udp", "--binary", v2, "--grace", "20"]);
    assert_eq!(r.result(), "updated", "format 2 to format 2: {}", r.text());
    assert!(r.line().contains("state format 2 ("), "{}", r.line());
    let st = p.status();
    let last = &server(&st, "udp")["last_update"];
    assert_eq!(
        last["state_format"].as_u64(),
        Some(2),
        "snapshot handed over: {last}"
    );
    assert_eq!(
        fields(&st),
        (Some(2), "1-2".to_string(), 2),
        "{}",
        server(&st, "udp")
    );

    // Backward: refused before it starts.
    drill(
        &p,
        &["udp", "--binary", plain, "--grace", "20"],
        Expect::Error,
        &[
            "writes format 2, newer than it reads",
            "refused before it started",
        ],
        &mut problems,
    );
    // Backward without the check: the old build refuses the snapshot; rolled back to the
    // format-2 build (the running instance's own executable and environment).
    let r = drill(
        &p,
        &["udp", "--binary", plain, "--skip-check", "--grace", "20"],
        Expect::RolledBack,
        &["snapshot state format 2 is newer than this build reads"],
        &mut problems,
    );
    let st = p.status();
    let pid = Srv::of(&st, "udp").pid;
    assert!(
        environ(pid)
            .iter()
            .any(|e| e == "KEEPNET_UDP_STATE_FORMAT=2"),
        "the rollback does not run the format-2 variant: {}",
        describe_process(pid)
    );
    assert_eq!(
        fields(&st),
        (Some(2), "1-2".to_string(), 3),
        "udp after the rollback (the format-2 snapshot restored): {} ({})",
        server(&st, "udp"),
        r.line()
    );
    let echoes = tcp.finish(TEST);
    let u = udp.finish(TEST);
    println!(
        "state formats: 1 -> 2 -> 2 updated, 2 -> 1 refused and rolled back; {echoes} TCP \
         echoes intact, UDP {} sent, {} lost",
        u.sent, u.lost
    );
    let left = p.down();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}

// ---------------------------------------------------------------------------------------
// One update at a time.

/// Polls instance a's status until server `name`'s `updating` contains `step` (at most
/// `limit`); returns that status.
fn wait_updating(p: &Pair, name: &str, step: &str, limit: Duration) -> serde_json::Value {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = p.status_quiet() {
            let u = &server(&st, name)["updating"];
            if u.as_str().is_some_and(|s| s.contains(step)) {
                eprintln!("{name} updating: {u}");
                return st;
            }
            assert!(
                Instant::now() < end,
                "{name} not at {step:?} within {limit:?}: updating {u}"
            );
        } else {
            assert!(Instant::now() < end, "keepnet status failing");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// While an update waits for a hung standby (5 s), a second update, of the same server or
/// another, is refused at once; once the first has ended, updates work again.
#[test]
fn a_second_update_while_one_runs_is_refused() {
    const TEST: &str = "a_second_update_while_one_runs_is_refused";
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(TEST, Duration::from_secs(120));
    let mut p = Pair::up("two", "");
    let w = wrapper(
        &p.dir,
        "tcp-hang.sh",
        "KEEPNET_FAULT=hang-before-ready",
        &server_binary("tcp"),
    );
    let tcp = TcpEchoes::start(&p);
    let first = p.spawn_update(&["tcp", "--binary", w.to_str().expect("utf-8 path")]);
    wait_updating(&p, "tcp", "loading", Duration::from_secs(3));
    for args in [["udp", "--grace", "20"], ["tcp", "--grace", "20"]] {
        let r = p.update(&args);
        assert_eq!(r.result(), "error", "a second update: {}", r.text());
        assert_eq!(r.code, Some(1));
        assert!(
            r.stderr.contains("an update of tcp is under way"),
            "a second update: {}",
            r.stderr
        );
        assert!(
            r.took < Duration::from_secs(2),
            "the second update was answered after {:?}, not at once",
            r.took
        );
    }
    let r = p.finish_update(first, Duration::from_secs(20));
    assert_eq!(r.result(), "refused", "the first update: {}", r.text());
    assert!(r.text().contains("was not ready in standby within 5 s"));
    let r = p.update(&["udp", "--grace", "20"]);
    assert_eq!(r.result(), "updated", "an update after: {}", r.text());
    let echoes = tcp.finish(TEST);
    println!("second updates refused at once; {echoes} TCP echoes intact");
    let left = p.down();
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}

// ---------------------------------------------------------------------------------------
// The supervisor killed in the middle of an update.

/// Starts `keepnet update tcp ARGS`, waits until status says `step`, kills the supervisor
/// with SIGKILL, and checks: the update's client fails; after a moment one instance of tcp
/// serves and `keepnet up` re-adopts it (the expected pid and generation); TCP echoes
/// running across it all are intact, and a UDP echo after it loses nothing; another update
/// works; and once both instances are down, no process of theirs is left (a standby of the
/// interrupted update included).
fn supervisor_killed_mid_update(
    test: &str,
    tag: &str,
    args: impl Fn(&Pair) -> Vec<String>,
    step: &str,
    took_over: bool,
) {
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(test, Duration::from_secs(150));
    let mut p = Pair::up(tag, "");
    let before = p.srv("tcp");
    let tcp = TcpEchoes::start(&p);
    std::thread::sleep(Duration::from_millis(300));
    let args = args(&p);
    let mut full = vec!["tcp"];
    full.extend(args.iter().map(String::as_str));
    let bg = p.spawn_update(&full);
    let st = wait_updating(&p, "tcp", step, Duration::from_secs(4));
    let sup = st["supervisor_pid"].as_u64().unwrap_or(0) as u32;
    assert!(sup > 1, "no supervisor pid in status");
    let log = p.log_path("tcp");
    let during: Vec<String> = processes_logging_to(&p.run_dir, &log)
        .into_iter()
        .map(describe_process)
        .collect();
    eprintln!("tcp processes when the supervisor is killed: {during:#?}");
    keepnet_tests::harness::kill_supervisor_and_wait(sup);
    let r = p.finish_update(bg, Duration::from_secs(10));
    assert_eq!(r.code, Some(1), "the update's client: {}", r.text());
    // Standbys of the interrupted update withdraw (their supervisor is gone), or take over
    // if the old instance had handed over to them.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        p.status_quiet().is_none(),
        "status answered with the supervisor dead"
    );
    let alone: Vec<u32> = processes_logging_to(&p.run_dir, &log);
    let alone_said: Vec<String> = alone.iter().map(|&q| describe_process(q)).collect();
    eprintln!("tcp processes with the supervisor dead: {alone_said:#?}");
    let out = p.a(&["up"]);
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || !said.contains("re-adopted instance") {
        eprintln!(
            "supervisor log:\n{}\ntcp log:\n{}",
            p.log_news("supervisor"),
            p.log_news("tcp")
        );
    }
    assert!(
        out.status.success(),
        "keepnet up after the supervisor died mid-update failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("re-adopted instance"),
        "keepnet up did not re-adopt: {said}"
    );
    let after = p.srv("tcp");
    assert_eq!(after.state, "running", "tcp after re-adoption: {after:?}");
    assert!(
        !exited(after.pid),
        "the re-adopted tcp {after:?} is not alive"
    );
    assert!(
        alone.contains(&after.pid),
        "the re-adopted tcp pid {} is none of the processes alive before: {alone_said:#?}",
        after.pid
    );
    if took_over {
        assert_ne!(after.pid, before.pid, "the successor did not take over");
        assert_eq!(after.generation, before.generation + 1, "{after:?}");
    } else {
        assert_eq!(after.pid, before.pid, "the old instance does not serve");
        assert_eq!(after.generation, before.generation, "{after:?}");
    }
    // Exactly one process of tcp is left: re-adoption ends the standbys of the interrupted
    // update (those that did not withdraw on their own).
    let end = Instant::now() + Duration::from_secs(3);
    let others = || -> Vec<u32> {
        processes_logging_to(&p.run_dir, &log)
            .into_iter()
            .filter(|&q| q != after.pid)
            .collect()
    };
    while !others().is_empty() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra: Vec<String> = others().into_iter().map(describe_process).collect();
    assert!(
        extra.is_empty(),
        "besides the serving tcp (pid {}), processes of the interrupted update are alive 3 s \
         after re-adoption: {extra:#?}",
        after.pid
    );
    // Traffic: the echoes across it all, a UDP echo now, and another update.
    let udp = UdpEcho::start(&p);
    std::thread::sleep(Duration::from_millis(1000));
    let r = p.update(&["tcp", "--grace", "20"]);
    assert_eq!(
        r.result(),
        "updated",
        "an update after re-adoption: {}",
        r.text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let echoes = tcp.finish(test);
    let u = udp.finish(test);
    let left = p.down();
    println!(
        "supervisor killed at {step:?}: re-adopted tcp pid {} generation {}; {echoes} TCP echoes \
         intact, UDP {} sent, {} lost; left after down: {}",
        after.pid,
        after.generation,
        u.sent,
        u.lost,
        left.len()
    );
    assert!(
        left.is_empty(),
        "processes of the instance left after `keepnet down` (killed now): {left:#?}"
    );
}

/// Killed while the update waits for a new build that hangs in standby: the old instance
/// never stopped and serves on.
#[test]
fn supervisor_killed_while_an_update_loads_leaves_the_old_instance_serving() {
    const TEST: &str = "supervisor_killed_while_an_update_loads_leaves_the_old_instance_serving";
    let hang = |p: &Pair| {
        let w = wrapper(
            &p.dir,
            "tcp-hang.sh",
            "KEEPNET_FAULT=hang-before-ready",
            &server_binary("tcp"),
        );
        vec!["--binary".to_string(), w.display().to_string()]
    };
    supervisor_killed_mid_update(TEST, "sk", hang, "loading", false);
}

/// Killed in the grace period of a good update (`--grace 2000`): the new build serves on.
#[test]
fn supervisor_killed_in_an_update_grace_period_leaves_the_new_build_serving() {
    const TEST: &str = "supervisor_killed_in_an_update_grace_period_leaves_the_new_build_serving";
    let grace = |_: &Pair| vec!["--grace".to_string(), "2000".to_string()];
    supervisor_killed_mid_update(TEST, "sg", grace, "grace period", true);
}
