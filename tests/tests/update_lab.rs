//! Live update end to end (DESIGN.md "Live update"), against the Linux kernel over TAP in a
//! private namespace, as `recovery_lab.rs` does for crashes: while the kernel's curl
//! downloads 1 GiB from keepnet's http service (another one as soon as one ends) and the
//! kernel's UDP probe echoes datagrams off keepnet's UDP echo service without resending,
//! `keepnet update SERVER` (the default grace period) replaces each server 20 times in a
//! row: driver, ip, udp, tcp. Every update must say `updated`; every download must finish
//! with the right SHA-256 (no reset); not one UDP datagram may be lost; each server's
//! generation must go up by exactly 20, with no restart and no other server touched.
//!
//! Needs root: skips loudly without it, fails under CI=true. Traffic stays inside the
//! test's own namespace on 198.18.0.0/15; every load is bounded in count and time, and the
//! namespace and every process are removed on every exit path (Drop guards, a watchdog).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keepnet_tests::harness::{heavy_lock, Watchdog};
use keepnet_tests::lab::{root_or_skip, server, Lab};
use keepnet_tests::loads::{udp_probe, Downloads, UdpLoad};
use keepnet_tests::update::{summary_ms, update};

const GIB: u64 = 1 << 30;
const SERVERS: [&str; 4] = ["driver", "ip", "udp", "tcp"];
/// The updates in a row per server.
const UPDATES: u64 = 20;
/// How long the test waits for the heavy-test lock (one busy constellation at a time on a
/// 2-core machine; see recovery_lab.rs).
const HEAVY_WAIT: Duration = Duration::from_secs(1200);

/// One server as status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Srv {
    pid: u64,
    generation: u64,
    restarts: u64,
    state: String,
}

fn servers(lab: &Lab) -> BTreeMap<&'static str, Srv> {
    let end = Instant::now() + Duration::from_secs(10);
    let st = loop {
        if let Some(st) = lab.status_quiet() {
            break st;
        }
        assert!(Instant::now() < end, "keepnet status failed for 10 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    SERVERS
        .iter()
        .map(|&n| {
            let s = server(&st, n);
            (
                n,
                Srv {
                    pid: s["pid"].as_u64().unwrap_or(0),
                    generation: s["generation"].as_u64().unwrap_or(0),
                    restarts: s["restarts"].as_u64().unwrap_or(0),
                    state: s["state"].as_str().unwrap_or("?").to_string(),
                },
            )
        })
        .collect()
}

/// The warnings, errors and update events in the lab's log of `who`, for a failure.
fn log_news(lab: &Lab, who: &str) -> String {
    let p = lab.run_dir.join(&lab.instance).join(format!("{who}.log"));
    let text = std::fs::read_to_string(&p).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["WARN", "ERROR", "panicked", "update"]
                .iter()
                .any(|w| l.contains(w))
        })
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[test]
fn every_server_updated_twenty_times_during_a_download_loses_nothing() {
    const TEST: &str = "every_server_updated_twenty_times_during_a_download_loses_nothing";
    if !root_or_skip(TEST) {
        return;
    }
    let _l = heavy_lock(HEAVY_WAIT);
    let _w = Watchdog::arm(TEST, Duration::from_secs(420));
    let mut lab = Lab::new("upd", "");
    lab.up();
    let t = Instant::now();
    let mut prev = servers(&lab);
    let udp = UdpLoad::start(&lab);
    let mut dls = Downloads::start(&lab, GIB);
    let mut report = Vec::new();
    for name in SERVERS {
        let g0 = prev[name].generation;
        let mut blackouts = Vec::new();
        let mut mid = 0;
        let began = Instant::now();
        for k in 1..=UPDATES {
            // A download under way for every update (the next one starts when one ends).
            dls.ensure_running();
            mid += u64::from(dls.running());
            let r = update(&lab.keepnet, &lab.config, &lab.run_dir, &[name]);
            if r.code != Some(0) || r.result() != "updated" {
                eprintln!(
                    "supervisor log:\n{}\n{name} log:\n{}",
                    log_news(&lab, "supervisor"),
                    log_news(&lab, name)
                );
                panic!("update {k} of {name}: exit {:?}: {}", r.code, r.text());
            }
            assert_eq!(
                r.generation(),
                Some(g0 + k),
                "update {k} of {name}: {}",
                r.line()
            );
            match r.blackout_ms() {
                Some(ms) => blackouts.push(ms),
                None => panic!("update {k} of {name}: no blackout: {}", r.line()),
            }
        }
        let now = servers(&lab);
        for n in SERVERS {
            let (b, a) = (&prev[n], &now[n]);
            assert_eq!(a.state, "running", "{n} after {name}'s updates: {a:?}");
            assert_eq!(
                a.restarts, b.restarts,
                "{n} restarted during {name}'s updates"
            );
            if n == name {
                assert_eq!(
                    a.generation,
                    b.generation + UPDATES,
                    "{n}: generation {} -> {} over {UPDATES} updates",
                    b.generation,
                    a.generation
                );
                assert_ne!(a.pid, b.pid, "{n}: the same pid after {UPDATES} updates");
            } else {
                assert_eq!(a, b, "{n} changed while {name} was updated");
            }
        }
        let line = format!(
            "{name}: {UPDATES} updates in {:.1} s ({mid} started with a download under way), \
             blackouts {}",
            began.elapsed().as_secs_f64(),
            summary_ms(&blackouts)
        );
        println!("{line}");
        report.push(line);
        prev = now;
    }
    let downloads = dls.finish();
    let u = udp.stop();
    println!(
        "{} updates over {downloads} download(s) of {GIB} bytes, every one complete with the \
         right SHA-256, in {:.1} s",
        UPDATES * SERVERS.len() as u64,
        t.elapsed().as_secs_f64()
    );
    for l in &report {
        println!("  {l}");
    }
    println!(
        "udp echo during the updates: {} runs, {} sent, {} echoed ok, {} lost, {} late or \
         duplicate, {} mismatched, {} unsent",
        u.runs, u.sent, u.echoed_ok, u.lost, u.late_or_duplicate, u.mismatched, u.unsent
    );
    assert!(u.sent > 0, "the UDP load sent nothing");
    assert_eq!(u.failed_runs, 0, "UDP probe runs that printed no summary");
    assert_eq!(u.mismatched, 0, "echoes that match no datagram sent");
    assert_eq!(
        (u.lost, u.unsent),
        (0, 0),
        "UDP datagrams lost or unsent during the updates (zero loss is required)"
    );
    // And UDP echo still works without a resend afterwards.
    let v = udp_probe(&lab.ns, &lab.keepnet, 200, 0, 4242);
    assert_eq!(v["echoed_ok"].as_u64(), Some(200), "udp echo after: {v}");
}
