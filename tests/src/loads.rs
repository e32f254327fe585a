//! The loads of the end-to-end suites over TAP, run from the kernel side of a [`Lab`]: a
//! curl download of the http service's `/bytes/N` checked by SHA-256 ([`Download`], one
//! after another: [`Downloads`]) and runs of `keepnet __udp-probe` against the UDP echo
//! service ([`UdpLoad`]).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::{bytes_sha256, Lab, NsJob, KEEPNET_IP};

/// Datagrams a UDP probe run keeps in flight.
pub const UDP_OUTSTANDING: usize = 4;

/// `curl http://KEEPNET/bytes/N | sha256sum` in the lab's namespace.
pub struct Download {
    job: NsJob,
    bytes: u64,
    limit: Duration,
}

impl Download {
    /// Starts the download, bounded by `limit` (curl's `--max-time`).
    pub fn start(lab: &Lab, bytes: u64, limit: Duration) -> Download {
        let secs = limit.as_secs().max(1);
        let job = lab.spawn_sh(&format!(
            "curl -sS --fail --max-time {secs} http://{KEEPNET_IP}/bytes/{bytes} | sha256sum; \
             echo \"curl_exit=${{PIPESTATUS[0]}}\""
        ));
        Download {
            job,
            bytes,
            limit: limit + Duration::from_secs(10),
        }
    }

    /// True while the download has not ended.
    pub fn running(&mut self) -> bool {
        self.job.running()
    }

    /// Waits for the end; asserts curl's exit 0 (no reset, no timeout) and the SHA-256.
    pub fn check(self, what: &str) {
        let (status, out, err) = self.job.finish(self.limit);
        eprintln!("{what}: {status:?}\n{out}{err}");
        let curl_exit = out
            .lines()
            .find_map(|l| l.strip_prefix("curl_exit="))
            .map(str::trim);
        assert_eq!(
            curl_exit,
            Some("0"),
            "{what}: curl failed (exit 56 is a reset or a cut connection, 28 a timeout): {err}"
        );
        let got = out.split_whitespace().next();
        assert_eq!(
            got,
            Some(bytes_sha256(self.bytes).as_str()),
            "{what}: SHA-256 of /bytes/{}",
            self.bytes
        );
    }
}

/// Totals of the UDP echo runs.
#[derive(Debug, Default)]
pub struct UdpTotals {
    pub runs: u64,
    pub sent: u64,
    pub echoed_ok: u64,
    pub lost: u64,
    pub mismatched: u64,
    pub late_or_duplicate: u64,
    pub unsent: u64,
    /// Runs that printed no summary.
    pub failed_runs: u64,
}

/// One `keepnet __udp-probe` run from namespace `ns` against keepnet's UDP echo (port 7):
/// `count` datagrams of 8..=1400 bytes (no fragments), [`UDP_OUTSTANDING`] in flight,
/// `retries` resends of one whose echo is a second late; its JSON summary (null if none).
pub fn udp_probe(
    ns: &str,
    keepnet: &Path,
    count: u64,
    retries: u32,
    seed: u64,
) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(keepnet)
        .args(["__udp-probe", "--target", &format!("{KEEPNET_IP}:7")])
        .args(["--count", &count.to_string()])
        .args(["--min-size", "8", "--max-size", "1400"])
        .args(["--outstanding", &UDP_OUTSTANDING.to_string()])
        .args(["--retries", &retries.to_string(), "--timeout-ms", "1000"])
        .args(["--seed", &seed.to_string(), "--max-seconds", "30", "--json"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run keepnet __udp-probe");
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    if v.is_null() {
        eprintln!(
            "udp probe printed no JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    v
}

/// Probe runs one after another (200 datagrams each, no resends, so `lost` counts every
/// datagram whose echo did not come back within a second) until stopped.
pub struct UdpLoad {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<UdpTotals>>,
}

impl UdpLoad {
    /// Starts the runs in a thread of their own.
    pub fn start(lab: &Lab) -> UdpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ns, keepnet) = (lab.ns.clone(), lab.keepnet.clone());
        let thread = std::thread::spawn(move || {
            let mut t = UdpTotals::default();
            // Bounded: each run by its 200 datagrams and 30 s, the loop by the owner's stop
            // and by this deadline.
            let end = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                let v = udp_probe(&ns, &keepnet, 200, 0, t.runs + 1);
                let n = |k: &str| v[k].as_u64().unwrap_or(0);
                t.runs += 1;
                t.failed_runs += u64::from(v.is_null());
                t.sent += n("sent");
                t.echoed_ok += n("echoed_ok");
                t.lost += n("lost");
                t.mismatched += n("mismatched");
                t.late_or_duplicate += n("late_or_duplicate");
                t.unsent += n("unsent");
                std::thread::sleep(Duration::from_millis(10));
            }
            t
        });
        UdpLoad {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops after the run under way and returns the totals.
    pub fn stop(mut self) -> UdpTotals {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .expect("the UDP load thread panicked")
    }
}

impl Drop for UdpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Downloads one after another: a kill always lands in one under way (a fast build may
/// finish a download before all the kills are done). Each download is checked when it ends.
pub struct Downloads<'a> {
    lab: &'a Lab,
    bytes: u64,
    current: Option<Download>,
    done: u32,
}

impl<'a> Downloads<'a> {
    /// Starts the first download and gives it a second to get going.
    pub fn start(lab: &'a Lab, bytes: u64) -> Downloads<'a> {
        let mut d = Downloads {
            lab,
            bytes,
            current: None,
            done: 0,
        };
        d.ensure_running();
        std::thread::sleep(Duration::from_millis(500));
        d
    }

    /// Makes sure a download is under way: checks one that has ended and starts the next.
    pub fn ensure_running(&mut self) {
        if let Some(d) = &mut self.current {
            if d.running() {
                return;
            }
        }
        if let Some(d) = self.current.take() {
            self.done += 1;
            d.check(&format!("download {}", self.done));
        }
        self.current = Some(Download::start(
            self.lab,
            self.bytes,
            Duration::from_secs(150),
        ));
        // Past the connection setup, into the transfer.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Whether a download is under way now.
    pub fn running(&mut self) -> bool {
        self.current.as_mut().is_some_and(Download::running)
    }

    /// Waits for the last download and checks it; returns how many there were.
    pub fn finish(mut self) -> u32 {
        if let Some(d) = self.current.take() {
            self.done += 1;
            d.check(&format!("download {} (the last)", self.done));
        }
        self.done
    }
}
