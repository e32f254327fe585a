//! `keepnet bench ipc --json --quick` end to end: the built binary, its peer processes, and
//! the shape of the JSON it prints. Nothing here judges a time or a speed.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const WATCHDOG: Duration = Duration::from_secs(120);

const PLACEMENTS: [&str; 2] = ["pinned", "shared_core"];
const TRANSPORTS: [&str; 5] = ["ring", "pipe", "uds", "eventfd", "bare"];
const FIGURES: [&str; 4] = [
    "rtt_p50_ns",
    "rtt_p99_ns",
    "oneway_batched_per_s",
    "oneway_unbatched_per_s",
];

/// Kills the child if the test ends (or panics) before it has been waited for.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs keepnet with `args`, killing it after [`WATCHDOG`]; returns (success, stdout).
fn run_keepnet(args: &[&str]) -> (bool, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_keepnet"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start keepnet");
    let mut guard = Guard(child);
    let mut stdout = guard.0.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).map(|_| s)
    });
    let deadline = Instant::now() + WATCHDOG;
    let status = loop {
        if let Some(status) = guard.0.try_wait().expect("poll keepnet") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = guard.0.kill();
            let _ = guard.0.wait();
            panic!("keepnet {args:?} ran longer than {WATCHDOG:?}; killed it");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader
        .join()
        .expect("stdout reader thread")
        .expect("read keepnet's stdout");
    (status.success(), out)
}

#[test]
fn bench_ipc_quick_json_has_every_figure() {
    let (ok, out) = run_keepnet(&["bench", "ipc", "--json", "--quick"]);
    assert!(ok, "keepnet bench ipc failed; stdout: {out}");
    // Exactly one JSON value on stdout (from_str rejects trailing content).
    let v: Value = serde_json::from_str(out.trim()).expect("stdout is one JSON value");
    let top = v.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = top.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["pinned", "shared_core"]);
    for p in PLACEMENTS {
        let per = v[p].as_object().expect("placement object");
        let mut ts: Vec<&str> = per.keys().map(String::as_str).collect();
        ts.sort_unstable();
        let mut want = TRANSPORTS;
        want.sort_unstable();
        assert_eq!(ts, want, "transports under {p}");
        for t in TRANSPORTS {
            let fig = v[p][t].as_object().expect("figures object");
            assert_eq!(
                fig.len(),
                FIGURES.len(),
                "{p}.{t} has exactly the four figures"
            );
            for k in FIGURES {
                let x = fig
                    .get(k)
                    .and_then(Value::as_f64)
                    .unwrap_or_else(|| panic!("{p}.{t}.{k} is a number"));
                assert!(x.is_finite() && x > 0.0, "{p}.{t}.{k} = {x}");
            }
        }
    }
}

#[test]
fn help_lists_only_what_works() {
    let (ok, out) = run_keepnet(&["--help"]);
    assert!(ok);
    assert!(out.contains("bench"));
    assert!(
        !out.contains("__bench-peer"),
        "the peer subcommand is internal: {out}"
    );
    let (ok, out) = run_keepnet(&["bench", "ipc", "--help"]);
    assert!(ok);
    assert!(out.contains("--json") && out.contains("--quick"), "{out}");
}

#[test]
fn the_peer_subcommand_refuses_to_run_by_hand() {
    let (ok, _) = run_keepnet(&[
        "__bench-peer",
        "--transport",
        "ring",
        "--placement",
        "pinned",
        "--cpu",
        "0",
        "--parent-pid",
        "1",
    ]);
    assert!(!ok);
}
