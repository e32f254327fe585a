//! `keepnet bench recovery`: how long a server killed with SIGKILL takes to serve again, and
//! what the crash costs a TCP download that runs through it.
//!
//! A private instance (namespace `kn-bench-rec-PID`, TAP `kn0`, keepnet's services at
//! 198.18.0.2) serves HTTP downloads of `/bytes/N` to the kernel-side probe
//! (`keepnet __tcp-probe bulk-recv --http --timeline-ms 10`), one after another, each body
//! checked byte for byte and counted per 10 ms bucket. Meanwhile each server in turn is
//! killed `--kills` times with `keepnet kill SERVER`; after each kill the bench waits until
//! status shows a new generation running and reads `last_recovery_us` (the supervisor's
//! figure: from the kill it sent to the new instance running), then lets the download run
//! `--gap-ms` before the next kill.
//!
//! Per server it reports recovery p50/p99/max beside the 10 ms target, connections lost
//! (downloads that failed: a reset, a cut, a wrong byte; 0 expected), and the throughput
//! dip around a kill: of the 10 buckets (100 ms) before the kill, the median; of the 10
//! from the kill on, the smallest, and how many were below half that median.
//!
//! The instance runs with the restart intensity limit lifted and no crash-loop backoff
//! (`[servers] max_restarts = 100000, min_runtime_ms = 0`): hundreds of deliberate kills are
//! not a crash loop, and a backoff would be measured instead of a recovery. Everything is
//! bounded by `--timeout-s`; the instance, its namespace and every child are removed on
//! every exit path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::child::{run_bounded, run_bounded_or_cancel, tail};
use super::interrupt;
use super::stats::{monotonic_ns, percentile};
use super::tcp_probe::TcpProbeSummary;
use super::udp::median;
use crate::ctl::client;
use crate::ctl::instance::Instance;
use crate::error::{Context, Error, Result};

/// The recovery time keepnet aims for.
pub const TARGET_US: u64 = 10_000;
/// Width of a timeline bucket, and buckets on each side of a kill.
pub const BUCKET_MS: u64 = 10;
pub const WINDOW_BUCKETS: usize = 10;
/// The servers, in the order they are killed.
pub const SERVERS: [&str; 4] = ["driver", "ip", "udp", "tcp"];
/// What the instance's config changes (see the module docs).
const OVERRIDES: &str = "[servers]\nmax_restarts = 100000\nmin_runtime_ms = 0\n";
/// keepnet's http service.
const HTTP_PORT: u16 = 80;
/// Bytes of the first download, which checks the service and measures the rate.
const WARM_UP_BYTES: u64 = 256 << 20;
/// Each later download is sized to last about this long undisturbed.
const DOWNLOAD_S: f64 = 10.0;
/// Bounds of a download's size.
const MIN_DOWNLOAD: u64 = 256 << 20;
const MAX_DOWNLOAD: u64 = 32 << 30;
/// Time limit of one download (kills slow it down; a stall past this counts as a failure).
const DOWNLOAD_LIMIT_S: f64 = 180.0;
/// How long a killed server may take to run again before the bench gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);

/// Arguments of `keepnet bench recovery`.
#[derive(Debug, clap::Args)]
pub struct RecoveryArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Kills per server (each server in turn: driver, ip, udp, tcp).
    #[arg(long, default_value_t = 100)]
    pub kills: u32,
    /// The servers to kill, in order.
    #[arg(long, value_delimiter = ',', default_value = "driver,ip,udp,tcp")]
    pub servers: Vec<String>,
    /// Milliseconds the download runs undisturbed after a recovery before the next kill (at
    /// least the 100 ms after a kill that the dip is measured over, and the 100 ms before the
    /// next one).
    #[arg(long, default_value_t = 250)]
    pub gap_ms: u64,
    /// Time limit of the whole run in seconds: no kill starts after it (the report then
    /// covers the kills made).
    #[arg(long, default_value_t = 900.0)]
    pub timeout_s: f64,
}

impl RecoveryArgs {
    /// Checks the arguments.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Unsupported(format!("bench recovery: {m}")));
        if self.kills == 0 || self.kills > 10_000 {
            return bad("--kills must be in 1..=10000");
        }
        if self.servers.is_empty() {
            return bad("--servers names none");
        }
        if let Some(s) = self.servers.iter().find(|s| !SERVERS.contains(&s.as_str())) {
            return bad(&format!(
                "--servers: {s:?} is not one of driver, ip, udp, tcp"
            ));
        }
        if !(200..=60_000).contains(&self.gap_ms) {
            return bad("--gap-ms must be in 200..=60000");
        }
        if !(self.timeout_s >= 10.0 && self.timeout_s <= 7200.0) {
            return bad("--timeout-s must be in 10..=7200");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Downloads, one after another, in a thread of their own.

/// One download as the probe reported it.
#[derive(Clone, Debug)]
pub struct Download {
    pub started_ns: u64,
    pub ended_ns: u64,
    /// The probe's summary (also of a failed download), if it printed one.
    pub summary: Option<TcpProbeSummary>,
    /// Why it failed; `None` if every byte came and was right.
    pub error: Option<String>,
}

impl Download {
    /// The bucket counts and the monotonic start of bucket 0, if the probe recorded them.
    fn timeline(&self) -> Option<(u64, &[u64])> {
        let s = self.summary.as_ref()?;
        Some((s.timeline_start_ns?, s.timeline.as_deref()?))
    }
}

pub(crate) fn probe_command(exe: &Path, ns: &str, from: &str, bytes: u64) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .args(["__tcp-probe", "bulk-recv", "--http", "--from", from])
        .args(["--bytes", &bytes.to_string()])
        .args(["--timeline-ms", &BUCKET_MS.to_string()])
        .args(["--timeout-s", &DOWNLOAD_LIMIT_S.to_string()])
        .env("RUST_LOG", "warn");
    cmd
}

/// Runs one download (killed if `cancel` is set).
pub(crate) fn download(
    exe: &Path,
    ns: &str,
    from: &str,
    bytes: u64,
    cancel: &AtomicBool,
) -> Download {
    let started_ns = monotonic_ns();
    let limit = Duration::from_secs_f64(DOWNLOAD_LIMIT_S + 15.0);
    let r = run_bounded_or_cancel(&mut probe_command(exe, ns, from, bytes), limit, cancel);
    let ended_ns = monotonic_ns();
    let (summary, error) = match r {
        Err(e) => (None, Some(format!("the probe did not run: {e}"))),
        Ok((status, out, err)) => {
            let summary = out
                .lines()
                .rev()
                .find(|l| l.trim_start().starts_with('{'))
                .and_then(|l| serde_json::from_str::<TcpProbeSummary>(l).ok());
            let error = match &summary {
                Some(s) if s.passed && s.pattern_errors == Some(0) => None,
                Some(s) => Some(s.error.clone().unwrap_or_else(|| "not ok".into())),
                None => Some(format!(
                    "the probe gave no summary ({}): {}",
                    status.map_or("killed at its time limit".to_string(), |s| s.to_string()),
                    tail(&err, 2)
                )),
            };
            (summary, error)
        }
    };
    Download {
        started_ns,
        ended_ns,
        summary,
        error,
    }
}

struct LoopShared {
    /// Start another download when one ends.
    more: AtomicBool,
    /// Kill the download under way now.
    abort: AtomicBool,
    /// CLOCK_MONOTONIC (ns) at which the download under way started; 0 between downloads.
    active_since_ns: AtomicU64,
    done: Mutex<Vec<Download>>,
}

/// Downloads one after another until [`DownloadLoop::finish`]; on drop the one under way is
/// killed and the thread joined.
pub(crate) struct DownloadLoop {
    shared: Arc<LoopShared>,
    thread: Option<JoinHandle<()>>,
}

impl DownloadLoop {
    pub(crate) fn start(exe: PathBuf, ns: String, from: String, bytes: u64) -> DownloadLoop {
        let shared = Arc::new(LoopShared {
            more: AtomicBool::new(true),
            abort: AtomicBool::new(false),
            active_since_ns: AtomicU64::new(0),
            done: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            while sh.more.load(Ordering::SeqCst)
                && !sh.abort.load(Ordering::SeqCst)
                && !interrupt::interrupted()
            {
                sh.active_since_ns.store(monotonic_ns(), Ordering::SeqCst);
                let d = download(&exe, &ns, &from, bytes, &sh.abort);
                sh.active_since_ns.store(0, Ordering::SeqCst);
                let failed = d.error.is_some();
                if let Some(e) = &d.error {
                    eprintln!("bench: a download failed: {e}");
                }
                sh.done.lock().unwrap_or_else(|p| p.into_inner()).push(d);
                if failed {
                    // Not a tight loop if the service is gone.
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        DownloadLoop {
            shared,
            thread: Some(thread),
        }
    }

    /// Since when the download under way has run, if one is.
    pub(crate) fn active_for(&self) -> Option<Duration> {
        match self.shared.active_since_ns.load(Ordering::SeqCst) {
            0 => None,
            t => Some(Duration::from_nanos(monotonic_ns().saturating_sub(t))),
        }
    }

    /// Lets the download under way finish (it is bounded by its own time limit) and returns
    /// every download.
    pub(crate) fn finish(mut self) -> Vec<Download> {
        self.shared.more.store(false, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.shared.done.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for DownloadLoop {
    fn drop(&mut self) {
        self.shared.more.store(false, Ordering::SeqCst);
        self.shared.abort.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Kills.

/// One kill and what followed.
#[derive(Clone, Debug, Serialize)]
pub struct Kill {
    pub server: String,
    /// CLOCK_MONOTONIC (ns) just before `keepnet kill` was started.
    #[serde(skip)]
    pub at_ns: u64,
    /// `last_recovery_us` from status once the new instance ran (null if status has none).
    pub recovery_us: Option<u64>,
    /// From just before `keepnet kill` to the bench seeing the new instance running in
    /// status (polled every 2 ms; includes starting `keepnet kill`).
    pub observed_us: u64,
    /// The dip (null when no download covered 100 ms each side of the kill).
    pub dip: Option<Dip>,
}

/// Throughput around one kill, in bytes per bucket.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Dip {
    /// Median of the 10 buckets before the kill.
    pub before_median: f64,
    /// Smallest of the 10 buckets from the kill's on.
    pub after_min: u64,
    /// Of those 10, how many were below half `before_median`.
    pub below_half: usize,
}

/// The dip around monotonic instant `at_ns` in a timeline starting at `start_ns`, if the
/// timeline covers [`WINDOW_BUCKETS`] buckets on each side.
pub fn dip(start_ns: u64, counts: &[u64], at_ns: u64) -> Option<Dip> {
    let i = usize::try_from(at_ns.checked_sub(start_ns)? / (BUCKET_MS * 1_000_000)).ok()?;
    let before = counts.get(i.checked_sub(WINDOW_BUCKETS)?..i)?;
    let after = counts.get(i..i + WINDOW_BUCKETS)?;
    let before_median = median(before.iter().map(|&b| b as f64))?;
    Some(Dip {
        before_median,
        after_min: after.iter().copied().min()?,
        below_half: after
            .iter()
            .filter(|&&b| (b as f64) < before_median / 2.0)
            .count(),
    })
}

/// The status of one server as JSON (fields this build may not know are simply absent).
fn server_json(config: &Path, name: &str) -> Result<serde_json::Value> {
    let report = client::status(Some(config)).map_err(|e| Error::Peer(e.to_string()))?;
    let v = serde_json::to_value(&report).context("encode the status")?;
    v["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .cloned()
        .ok_or_else(|| Error::Protocol(format!("status lists no server {name}")))
}

/// Kills `name` with `keepnet kill` and waits until its next generation runs.
fn kill_once(exe: &Path, config: &Path, name: &str) -> Result<Kill> {
    let before = server_json(config, name)?;
    let gen = before["generation"].as_u64().unwrap_or(0);
    let at_ns = monotonic_ns();
    let mut cmd = Command::new(exe);
    cmd.args(["kill", name, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn");
    let (status, out, err) = run_bounded(&mut cmd, Duration::from_secs(10))?;
    if !status.is_some_and(|s| s.success()) {
        return Err(Error::Peer(format!(
            "keepnet kill {name} failed: {}",
            tail(&format!("{out}\n{err}"), 3)
        )));
    }
    let end = Instant::now() + RECOVERY_LIMIT;
    loop {
        interrupt::check()?;
        let s = server_json(config, name)?;
        let running = s["state"] == "running" && s["pid"].as_u64().unwrap_or(0) != 0;
        if s["generation"].as_u64().unwrap_or(0) > gen && running {
            let observed_us = monotonic_ns().saturating_sub(at_ns) / 1000;
            return Ok(Kill {
                server: name.to_string(),
                at_ns,
                recovery_us: s["last_recovery_us"].as_u64(),
                observed_us,
                dip: None,
            });
        }
        if s["state"] == "failed" {
            return Err(Error::Peer(format!(
                "{name} failed instead of restarting: {}",
                s["detail"]
            )));
        }
        if Instant::now() >= end {
            return Err(Error::Timeout(format!(
                "{name} not running again {} s after the kill: {s}",
                RECOVERY_LIMIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------
// The report.

/// One server's figures (`--json` prints these fields).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerReport {
    pub server: String,
    pub kills: usize,
    /// From status (`last_recovery_us`), over the kills that reported one.
    pub recovery_p50_us: Option<u64>,
    pub recovery_p99_us: Option<u64>,
    pub recovery_max_us: Option<u64>,
    /// As the bench saw it (see [`Kill::observed_us`]).
    pub observed_p50_us: Option<u64>,
    pub observed_max_us: Option<u64>,
    /// Downloads that failed (reset, cut, wrong byte, stall) after a kill of this server.
    pub connections_lost: usize,
    /// Kills with a download around them.
    pub dips_measured: usize,
    /// Bytes per 10 ms: median over kills of the median of the 100 ms before.
    pub dip_before_median_bytes: Option<f64>,
    /// Bytes per 10 ms: median over kills of the smallest bucket of the 100 ms after.
    pub dip_after_min_bytes: Option<f64>,
    /// Buckets of the 100 ms after a kill below half the median before: median and largest
    /// over kills.
    pub dip_below_half_median: Option<f64>,
    pub dip_below_half_max: Option<usize>,
    /// Restarts beyond the kills (generations gained minus kills: a hang or crash the
    /// supervisor saw on its own during the run), and how the last instance ended.
    pub unrequested_restarts: Option<u64>,
    pub last_exit: Option<String>,
}

/// The downloads (`--json`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DownloadsReport {
    pub count: usize,
    pub ok: usize,
    pub bytes_each: u64,
    pub bytes_ok: u64,
    /// Why each failed one failed.
    pub failures: Vec<String>,
}

impl DownloadsReport {
    /// What `done`, downloads of `bytes_each` bytes, came to.
    pub(crate) fn of(done: &[Download], bytes_each: u64) -> DownloadsReport {
        let ok: Vec<&Download> = done.iter().filter(|d| d.error.is_none()).collect();
        DownloadsReport {
            count: done.len(),
            ok: ok.len(),
            bytes_each,
            bytes_ok: ok
                .iter()
                .filter_map(|d| d.summary.as_ref().and_then(|s| s.bytes))
                .sum(),
            failures: done.iter().filter_map(|d| d.error.clone()).collect(),
        }
    }
}

/// The `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    pub target_us: u64,
    pub bucket_ms: u64,
    pub window_ms: u64,
    pub kills_per_server: u32,
    pub servers: Vec<ServerReport>,
    pub downloads: DownloadsReport,
    pub kills: Vec<Kill>,
}

fn pct(v: &[u64], p: f64) -> Option<u64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    percentile(&s, p)
}

/// Fills each kill's dip from the download whose timeline covers it, and counts each failed
/// download against the last kill before it ended (a failure with no kill in the 10 s before
/// its end counts against no server). Returns the failures per server.
pub fn attribute(kills: &mut [Kill], downloads: &[Download]) -> BTreeMap<String, usize> {
    for k in kills.iter_mut() {
        k.dip = downloads
            .iter()
            .filter(|d| d.started_ns <= k.at_ns && k.at_ns <= d.ended_ns)
            .find_map(|d| d.timeline().and_then(|(s, c)| dip(s, c, k.at_ns)));
    }
    let mut lost = BTreeMap::new();
    for d in downloads.iter().filter(|d| d.error.is_some()) {
        let last = kills
            .iter()
            .filter(|k| k.at_ns <= d.ended_ns && d.ended_ns - k.at_ns <= 10_000_000_000)
            .max_by_key(|k| k.at_ns);
        if let Some(k) = last {
            *lost.entry(k.server.clone()).or_insert(0) += 1;
        }
    }
    lost
}

/// One server's figures from its kills.
pub fn server_report(name: &str, kills: &[Kill], lost: usize) -> ServerReport {
    let mine: Vec<&Kill> = kills.iter().filter(|k| k.server == name).collect();
    let rec: Vec<u64> = mine.iter().filter_map(|k| k.recovery_us).collect();
    let obs: Vec<u64> = mine.iter().map(|k| k.observed_us).collect();
    let dips: Vec<Dip> = mine.iter().filter_map(|k| k.dip).collect();
    ServerReport {
        server: name.to_string(),
        kills: mine.len(),
        recovery_p50_us: pct(&rec, 50.0),
        recovery_p99_us: pct(&rec, 99.0),
        recovery_max_us: pct(&rec, 100.0),
        observed_p50_us: pct(&obs, 50.0),
        observed_max_us: pct(&obs, 100.0),
        connections_lost: lost,
        dips_measured: dips.len(),
        dip_before_median_bytes: median(dips.iter().map(|d| d.before_median)),
        dip_after_min_bytes: median(dips.iter().map(|d| d.after_min as f64)),
        dip_below_half_median: median(dips.iter().map(|d| d.below_half as f64)),
        dip_below_half_max: dips.iter().map(|d| d.below_half).max(),
        unrequested_restarts: None,
        last_exit: None,
    }
}

/// Each server's generation and last exit now.
fn generations(config: &Path) -> Result<BTreeMap<String, (u64, Option<String>)>> {
    SERVERS
        .iter()
        .map(|n| {
            let s = server_json(config, n)?;
            Ok((
                n.to_string(),
                (
                    s["generation"].as_u64().unwrap_or(0),
                    s["last_exit"].as_str().map(String::from),
                ),
            ))
        })
        .collect()
}

fn ms(us: Option<u64>) -> String {
    us.map_or("n/a".into(), |u| format!("{:.2}", u as f64 / 1000.0))
}

fn mb(b: Option<f64>) -> String {
    b.map_or("n/a".into(), |b| format!("{:.2}", b / 1e6))
}

fn print_table(r: &RecoveryReport, run_s: f64) {
    println!(
        "Recovery after `keepnet kill` (SIGKILL) during HTTP downloads to the Linux kernel over \
         TAP: {} kills per server, {:.0} s",
        r.kills_per_server, run_s
    );
    println!(
        "recovery: status last_recovery_us (the kill sent -> the new instance running), target \
         {} ms; dip: bytes per {} ms bucket, {} ms before a kill (median) vs {} ms after \
         (smallest; buckets below half the median, of {})",
        r.target_us / 1000,
        r.bucket_ms,
        r.window_ms,
        r.window_ms,
        WINDOW_BUCKETS
    );
    println!(
        "{:<7} {:>5} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>10} {:>10} {:>11}",
        "server",
        "kills",
        "p50 ms",
        "p99 ms",
        "max ms",
        "target",
        "p99ok",
        "lost",
        "before MB",
        "after MB",
        "<half med"
    );
    for s in &r.servers {
        let ok = s
            .recovery_p99_us
            .map_or("n/a", |p| if p <= r.target_us { "yes" } else { "no" });
        println!(
            "{:<7} {:>5} {:>9} {:>9} {:>9} {:>7} {:>6} {:>6} {:>10} {:>10} {:>11}",
            s.server,
            s.kills,
            ms(s.recovery_p50_us),
            ms(s.recovery_p99_us),
            ms(s.recovery_max_us),
            format!("{} ms", r.target_us / 1000),
            ok,
            s.connections_lost,
            mb(s.dip_before_median_bytes),
            mb(s.dip_after_min_bytes),
            match (s.dip_below_half_median, s.dip_below_half_max) {
                (Some(m), Some(x)) => format!("{m:.0} (max {x})"),
                _ => "n/a".into(),
            }
        );
    }
    let d = &r.downloads;
    println!(
        "downloads: {} of {} complete and right ({} bytes each, {:.2} GB in all, every byte \
         checked against i % 251); connections lost: {}",
        d.ok,
        d.count,
        d.bytes_each,
        d.bytes_ok as f64 / 1e9,
        d.failures.len()
    );
    for f in &d.failures {
        println!("  failed download: {f}");
    }
    for s in &r.servers {
        if let Some(n) = s.unrequested_restarts.filter(|&n| n > 0) {
            println!(
                "{}: {n} restart(s) besides the kills (last exit: {})",
                s.server,
                s.last_exit.as_deref().unwrap_or("?")
            );
        }
        if s.kills > 0 && s.recovery_p50_us.is_none() {
            println!(
                "{}: status reported no last_recovery_us; as the bench saw it (polling): p50 {} \
                 ms, max {} ms",
                s.server,
                ms(s.observed_p50_us),
                ms(s.observed_max_us)
            );
        }
    }
}

/// Runs the benchmark.
pub fn run(args: RecoveryArgs) -> Result<()> {
    args.validate()?;
    interrupt::catch();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout_s);
    let exe = std::env::current_exe().context("find the keepnet binary")?;
    eprintln!("bench recovery: starting a private keepnet instance");
    let inst = Instance::up_with("bench-rec", OVERRIDES).map_err(|e| Error::Peer(e.to_string()))?;
    let config = inst.config_path().to_path_buf();
    let from = format!("{}:{HTTP_PORT}", inst.config.ip.addr.addr);

    // The first download checks the service and measures the rate the others are sized by.
    let warm_end = Instant::now() + Duration::from_secs(20);
    let warm = loop {
        interrupt::check()?;
        let d = download(
            &exe,
            &inst.netns,
            &from,
            WARM_UP_BYTES,
            &AtomicBool::new(false),
        );
        if d.error.is_none() || Instant::now() >= warm_end {
            break d;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if let Some(e) = &warm.error {
        return Err(Error::Peer(format!(
            "the first download from {from} failed: {e}"
        )));
    }
    let gbit = warm
        .summary
        .as_ref()
        .and_then(|s| s.gbit_per_s)
        .unwrap_or(1.0);
    let bytes =
        ((gbit * 1e9 / 8.0 * DOWNLOAD_S) as u64).clamp(MIN_DOWNLOAD, MAX_DOWNLOAD) >> 20 << 20;
    eprintln!(
        "bench recovery: {from} serves {gbit:.2} Gbit/s undisturbed; downloads of {} MiB, one \
         after another, while each server is killed {} times",
        bytes >> 20,
        args.kills
    );

    let gens_before = generations(&config)?;
    let downloads = DownloadLoop::start(exe.clone(), inst.netns.clone(), from.clone(), bytes);
    let mut kills: Vec<Kill> = Vec::new();
    let mut stopped_early = None;
    'servers: for name in &args.servers {
        for k in 0..args.kills {
            interrupt::check()?;
            if Instant::now() >= deadline {
                stopped_early = Some(format!(
                    "the time limit of {} s ended the run at {name} kill {}",
                    args.timeout_s,
                    k + 1
                ));
                break 'servers;
            }
            // A download under way, past its first half second.
            let wait_end = Instant::now() + Duration::from_secs(30);
            while downloads
                .active_for()
                .is_none_or(|t| t < Duration::from_millis(500))
            {
                interrupt::check()?;
                if Instant::now() >= wait_end {
                    return Err(Error::Timeout("no download under way for 30 s".into()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let kill = kill_once(&exe, &config, name)?;
            if k % 10 == 9 || k + 1 == args.kills {
                eprintln!(
                    "bench recovery: {name}: {}/{} kills, last recovery {} ms (status), {:.2} ms \
                     (seen)",
                    k + 1,
                    args.kills,
                    ms(kill.recovery_us),
                    kill.observed_us as f64 / 1000.0
                );
            }
            kills.push(kill);
            std::thread::sleep(Duration::from_millis(args.gap_ms));
        }
    }
    eprintln!("bench recovery: kills done; waiting for the download under way to end");
    let done = downloads.finish();
    let gens_after = generations(&config).ok();
    let lost = attribute(&mut kills, &done);
    let servers: Vec<ServerReport> = args
        .servers
        .iter()
        .map(|n| {
            let mut r = server_report(n, &kills, lost.get(n).copied().unwrap_or(0));
            if let (Some((g0, _)), Some((g1, exit))) = (
                gens_before.get(n),
                gens_after.as_ref().and_then(|g| g.get(n)),
            ) {
                r.unrequested_restarts = Some(g1.saturating_sub(*g0 + r.kills as u64));
                r.last_exit = exit.clone();
            }
            r
        })
        .collect();
    let report = RecoveryReport {
        target_us: TARGET_US,
        bucket_ms: BUCKET_MS,
        window_ms: BUCKET_MS * WINDOW_BUCKETS as u64,
        kills_per_server: args.kills,
        servers,
        downloads: DownloadsReport::of(&done, bytes),
        kills,
    };
    if let Err(e) = inst.down() {
        eprintln!("bench recovery: keepnet down: {e}");
    }
    if let Some(why) = &stopped_early {
        eprintln!("bench recovery: {why}");
    }
    let run_s = started.elapsed().as_secs_f64();
    eprintln!("bench recovery: done in {run_s:.1} s");
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encode the report")?
        );
    } else {
        print_table(&report, run_s);
        if let Some(why) = &stopped_early {
            println!("(fewer kills than asked: {why})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: RecoveryArgs,
    }

    fn parse(x: &[&str]) -> std::result::Result<RecoveryArgs, clap::Error> {
        let mut v = vec!["recovery"];
        v.extend_from_slice(x);
        P::try_parse_from(v).map(|p| p.a)
    }

    #[test]
    fn arguments_and_their_bounds() {
        let a = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_ok());
        assert_eq!((a.kills, a.gap_ms, a.json), (100, 250, false));
        assert_eq!(a.servers, SERVERS.map(String::from).to_vec());
        let a = parse(&["--kills", "5", "--servers", "tcp,ip", "--json"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (a.kills, a.servers.clone(), a.json),
            (5, vec!["tcp".into(), "ip".into()], true)
        );
        for bad in [
            &["--kills", "0"][..],
            &["--servers", "dns"],
            &["--gap-ms", "50"],
            &["--timeout-s", "1"],
        ] {
            assert!(parse(bad).is_ok_and(|a| a.validate().is_err()), "{bad:?}");
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn a_dip_is_measured_over_100_ms_each_side() {
        // 1000 bytes per bucket, a kill at bucket 20 zeroing buckets 20..23.
        let mut c = vec![1000u64; 40];
        for b in c.iter_mut().skip(20).take(3) {
            *b = 0;
        }
        c[25] = 400;
        let start = 5_000 * MS;
        let d = dip(start, &c, start + 20 * BUCKET_MS * MS + 3 * MS);
        assert_eq!(
            d,
            Some(Dip {
                before_median: 1000.0,
                after_min: 0,
                below_half: 4
            })
        );
        // Too close to either end: not measured.
        assert_eq!(dip(start, &c, start + 5 * BUCKET_MS * MS), None);
        assert_eq!(dip(start, &c, start + 35 * BUCKET_MS * MS), None);
        assert_eq!(dip(start, &c, start - MS), None);
    }

    fn download(started: u64, ended: u64, error: Option<&str>) -> Download {
        Download {
            started_ns: started,
            ended_ns: ended,
            summary: Some(TcpProbeSummary {
                timeline_start_ns: Some(started),
                timeline: Some(vec![100; ((ended - started) / (BUCKET_MS * MS)) as usize]),
                ..TcpProbeSummary::default()
            }),
            error: error.map(String::from),
        }
    }

    fn kill(server: &str, at: u64, rec: u64) -> Kill {
        Kill {
            server: server.into(),
            at_ns: at,
            recovery_us: Some(rec),
            observed_us: rec + 500,
            dip: None,
        }
    }

    #[test]
    fn kills_get_their_dips_and_failures_their_server() {
        let s = 1_000 * MS;
        let downloads = [
            download(s, s + 1_000 * MS, None),
            download(s + 1_000 * MS, s + 2_000 * MS, Some("reset")),
        ];
        let mut kills = vec![
            kill("ip", s + 500 * MS, 3000),
            kill("tcp", s + 1_500 * MS, 9000),
            kill("tcp", s + 1_995 * MS, 20000),
        ];
        let lost = attribute(&mut kills, &downloads);
        assert!(kills[0].dip.is_some() && kills[1].dip.is_some());
        assert_eq!(kills[2].dip, None, "too close to the end of its download");
        assert_eq!(lost.get("tcp"), Some(&1));
        assert_eq!(lost.get("ip"), None);
        let r = server_report("tcp", &kills, 1);
        assert_eq!(r.kills, 2);
        assert_eq!(r.recovery_p50_us, Some(9000));
        assert_eq!(r.recovery_max_us, Some(20000));
        assert_eq!(r.observed_max_us, Some(20500));
        assert_eq!(r.dips_measured, 1);
        assert_eq!(r.dip_before_median_bytes, Some(100.0));
        assert_eq!(r.connections_lost, 1);
        let json = serde_json::to_value(&r).unwrap_or_default();
        for key in [
            "server",
            "kills",
            "recovery_p50_us",
            "recovery_p99_us",
            "recovery_max_us",
            "connections_lost",
            "dip_before_median_bytes",
            "dip_after_min_bytes",
            "dip_below_half_median",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }
}
