//! `keepnet bench update`: what a live update costs. The blackout of each `keepnet update`
//! of a server to the binary it runs, and what the updates cost a TCP download that runs
//! through them.
//!
//! A private instance (namespace `kn-bench-upd-PID`, TAP `kn0`, keepnet's services at
//! 198.18.0.2) serves HTTP downloads of `/bytes/N` to the kernel-side probe
//! (`keepnet __tcp-probe bulk-recv --http --timeline-ms 10`), one after another, each body
//! checked byte for byte and counted per 10 ms bucket, as in `keepnet bench recovery`.
//! Meanwhile each server in turn is live-updated `--updates` times to the binary it was
//! started from (the supervisor's own update: check, standby, handoff, takeover, a grace
//! period of `--grace` ms), through the control socket as `keepnet update` does; the update's
//! answer gives the blackout (`blackout_us`: from the old instance's last batch to the new
//! one's first poll, both timestamps written by the servers) and its result.
//!
//! Per server it reports blackout p50/p99/max beside the target (p50 < 1 ms, p99 < 10 ms)
//! and the published anchors (Google Snap aims at <= 200 ms blackout; Andromeda measured a
//! 270 ms median), updates done and rolled back, connections lost (downloads that failed:
//! a reset, a cut, a wrong byte; 0 expected), and the throughput dip: of the 10 buckets
//! (100 ms) before the update was asked for, the median; of the 10 from the handoff on, the
//! smallest, and how many were below half that median. The handoff instant is not in the
//! answer; it is placed at the answer's arrival less the grace period and the blackout, and
//! 5 ms earlier still (the supervisor's look at the takeover, the answer's way back), but
//! never before the update was asked for.
//!
//! Everything is bounded by `--timeout-s`; the instance, its namespace and every child are
//! removed on every exit path.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::interrupt;
use super::recovery::{
    download, Dip, Download, DownloadLoop, DownloadsReport, BUCKET_MS, SERVERS, WINDOW_BUCKETS,
};
use super::stats::{monotonic_ns, percentile};
use super::udp::median;
use crate::ctl::client;
use crate::ctl::instance::Instance;
use crate::error::{Context, Error, Result};

/// The blackout keepnet aims for: p50 below 1 ms, p99 below 10 ms.
pub const TARGET_P50_US: u64 = 1_000;
pub const TARGET_P99_US: u64 = 10_000;
/// Published figures to compare with.
pub const ANCHORS: &str = "Google Snap aims at <= 200 ms blackout per upgrade; Andromeda \
                           measured a 270 ms median";
/// What the instance's config changes: a crash during the run (a rollback as after a crash,
/// say) is restarted, not a reason to stop.
const OVERRIDES: &str = "[servers]\nmax_restarts = 100000\nmin_runtime_ms = 0\n";
/// keepnet's http service.
const HTTP_PORT: u16 = 80;
/// Bytes of the first download, which checks the service and measures the rate.
const WARM_UP_BYTES: u64 = 256 << 20;
/// Each later download is sized to last about this long undisturbed.
const DOWNLOAD_S: f64 = 10.0;
const MIN_DOWNLOAD: u64 = 256 << 20;
const MAX_DOWNLOAD: u64 = 32 << 30;

/// How long a server may take to be running again before the next update of it.
const RUNNING_LIMIT: Duration = Duration::from_secs(20);
/// Updates in a row that end with an error (no answer from the supervisor, refused before
/// they began) before the bench gives up.
const MAX_ERRORS_IN_A_ROW: u32 = 5;
/// How much earlier than answer - grace - blackout the after-window starts.
const HANDOFF_MARGIN_NS: u64 = 5_000_000;

/// Arguments of `keepnet bench update`.
#[derive(Debug, clap::Args)]
pub struct UpdateBenchArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Live updates per server (each server in turn: driver, ip, udp, tcp).
    #[arg(long, default_value_t = 100)]
    pub updates: u32,
    /// Grace period of each update in ms (the new build is watched that long before the
    /// update counts as done).
    #[arg(long, value_name = "MS", default_value_t = 20)]
    pub grace: u64,
    /// The servers to update, in order.
    #[arg(long, value_delimiter = ',', default_value = "driver,ip,udp,tcp")]
    pub servers: Vec<String>,
    /// Milliseconds the download runs undisturbed after an update before the next one (at
    /// least the 100 ms after the handoff that the dip is measured over, and the 100 ms
    /// before the next update).
    #[arg(long, default_value_t = 250)]
    pub gap_ms: u64,
    /// Time limit of the whole run in seconds: no update starts after it (the report then
    /// covers the updates made).
    #[arg(long, default_value_t = 900.0)]
    pub timeout_s: f64,
}

impl UpdateBenchArgs {
    /// Checks the arguments.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Unsupported(format!("bench update: {m}")));
        if self.updates == 0 || self.updates > 10_000 {
            return bad("--updates must be in 1..=10000");
        }
        if self.grace > 10_000 {
            return bad("--grace must be in 0..=10000 (ms)");
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

// Downloads, one after another, in a thread of their own: `bench recovery`'s.

// ---------------------------------------------------------------------------------------
// Updates.

/// One live update and what followed.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateRun {
    pub server: String,
    /// `updated`, `rolled back`, `refused` (the supervisor's results), or `error` (no
    /// answer: the request failed; see `reason`).
    pub result: String,
    pub reason: Option<String>,
    /// From the update's answer (null when it had none).
    pub blackout_us: Option<u64>,
    pub took_ms: Option<u64>,
    pub from_pid: u32,
    pub pid: u32,
    pub generation: Option<u64>,
    /// CLOCK_MONOTONIC (ns) just before the update was asked for, and when it was answered.
    #[serde(skip)]
    pub requested_ns: u64,
    #[serde(skip)]
    pub answered_ns: u64,
    /// The dip (null when no download covered 100 ms each side of the update).
    pub dip: Option<Dip>,
    /// The smallest bucket of the 100 ms before the update (what the download does on its
    /// own in 100 ms: the noise to read `dip.after_min` against).
    pub before_min: Option<u64>,
}

impl UpdateRun {
    /// Where the handoff most likely fell (see the module docs).
    pub fn handoff_ns(&self, grace_ms: u64) -> u64 {
        let back = grace_ms * 1_000_000 + self.blackout_us.unwrap_or(0) * 1_000 + HANDOFF_MARGIN_NS;
        self.answered_ns.saturating_sub(back).max(self.requested_ns)
    }
}

/// The dip in a timeline starting at `start_ns`: the median of the [`WINDOW_BUCKETS`]
/// buckets before `before_ns` against the buckets from `after_ns` on, if the timeline covers
/// both windows whole; and the smallest bucket before.
pub fn dip_between(
    start_ns: u64,
    counts: &[u64],
    before_ns: u64,
    after_ns: u64,
) -> Option<(Dip, u64)> {
    let bucket = BUCKET_MS * 1_000_000;
    let b = usize::try_from(before_ns.checked_sub(start_ns)? / bucket).ok()?;
    let a = usize::try_from(after_ns.checked_sub(start_ns)? / bucket).ok()?;
    let before = counts.get(b.checked_sub(WINDOW_BUCKETS)?..b)?;
    let after = counts.get(a..a + WINDOW_BUCKETS)?;
    let before_median = median(before.iter().map(|&x| x as f64))?;
    let dip = Dip {
        before_median,
        after_min: after.iter().copied().min()?,
        below_half: after
            .iter()
            .filter(|&&x| (x as f64) < before_median / 2.0)
            .count(),
    };
    Some((dip, before.iter().copied().min()?))
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

/// Waits (bounded) until `name` runs with no update under way.
fn wait_running(config: &Path, name: &str) -> Result<()> {
    let end = Instant::now() + RUNNING_LIMIT;
    loop {
        interrupt::check()?;
        let s = server_json(config, name)?;
        if s["state"] == "running" && s["pid"].as_u64().unwrap_or(0) != 0 && s["updating"].is_null()
        {
            return Ok(());
        }
        if s["state"] == "failed" {
            return Err(Error::Peer(format!(
                "{name} failed: {}",
                s["detail"].as_str().unwrap_or("?")
            )));
        }
        if Instant::now() >= end {
            return Err(Error::Timeout(format!(
                "{name} not running {} s after its last update: {s}",
                RUNNING_LIMIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One live update of `name` to the binary it runs.
fn update_once(config: &Path, name: &str, grace_ms: u64) -> UpdateRun {
    let requested_ns = monotonic_ns();
    let r = client::update(Some(config), name, None, grace_ms, false);
    let answered_ns = monotonic_ns();
    match r {
        Ok(u) => UpdateRun {
            server: name.to_string(),
            result: u.result,
            reason: u.reason,
            blackout_us: u.blackout_us,
            took_ms: Some(u.took_ms),
            from_pid: u.from_pid,
            pid: u.pid,
            generation: Some(u.generation),
            requested_ns,
            answered_ns,
            dip: None,
            before_min: None,
        },
        Err(e) => UpdateRun {
            server: name.to_string(),
            result: "error".into(),
            reason: Some(e.to_string()),
            blackout_us: None,
            took_ms: None,
            from_pid: 0,
            pid: 0,
            generation: None,
            requested_ns,
            answered_ns,
            dip: None,
            before_min: None,
        },
    }
}

// ---------------------------------------------------------------------------------------
// The report.

/// One server's figures (`--json` prints these fields).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ServerReport {
    pub server: String,
    /// Updates asked for, and how they ended.
    pub updates: usize,
    pub updated: usize,
    pub rolled_back: usize,
    /// Refused by the supervisor, or no answer at all.
    pub refused: usize,
    /// The answers' `blackout_us`, over the updates done.
    pub blackout_p50_us: Option<u64>,
    pub blackout_p99_us: Option<u64>,
    pub blackout_max_us: Option<u64>,
    /// p50 < 1 ms and p99 < 10 ms (null with no blackout measured).
    pub target_met: Option<bool>,
    /// The whole update (standby, handoff, takeover, grace), from the answers.
    pub took_p50_ms: Option<u64>,
    pub took_max_ms: Option<u64>,
    /// Downloads that failed (reset, cut, wrong byte, stall) after an update of this server.
    pub connections_lost: usize,
    /// Updates with a download around them.
    pub dips_measured: usize,
    /// Bytes per 10 ms: median over updates of the median of the 100 ms before.
    pub dip_before_median_bytes: Option<f64>,
    /// Bytes per 10 ms: median over updates of the smallest bucket of the 100 ms before
    /// (the download's own ups and downs, to read the smallest bucket after against).
    pub dip_before_min_bytes: Option<f64>,
    /// Bytes per 10 ms: median over updates of the smallest bucket of the 100 ms after the
    /// handoff.
    pub dip_after_min_bytes: Option<f64>,
    /// Buckets of the 100 ms after below half the median before: median and largest over
    /// updates.
    pub dip_below_half_median: Option<f64>,
    pub dip_below_half_max: Option<usize>,
    /// Crash restarts during the run (status `restarts` gained; updates are not restarts),
    /// and how the last instance ended.
    pub restarts: Option<u64>,
    pub last_exit: Option<String>,
}

/// The `--json` output.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateBenchReport {
    pub target_p50_us: u64,
    pub target_p99_us: u64,
    pub anchors: String,
    pub bucket_ms: u64,
    pub window_ms: u64,
    pub updates_per_server: u32,
    pub grace_ms: u64,
    pub servers: Vec<ServerReport>,
    pub downloads: DownloadsReport,
    pub updates: Vec<UpdateRun>,
}

fn pct(v: &[u64], p: f64) -> Option<u64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    percentile(&s, p)
}

fn timeline(d: &Download) -> Option<(u64, &[u64])> {
    let s = d.summary.as_ref()?;
    Some((s.timeline_start_ns?, s.timeline.as_deref()?))
}

/// Fills each update's dip from the download whose timeline covers it, and counts each
/// failed download against the last update before it ended (a failure with no update in
/// the 10 s before its end counts against no server). Returns the failures per server.
pub fn attribute(
    updates: &mut [UpdateRun],
    downloads: &[Download],
    grace_ms: u64,
) -> BTreeMap<String, usize> {
    for u in updates.iter_mut() {
        let at = u.handoff_ns(grace_ms);
        let found = downloads
            .iter()
            .filter(|d| d.started_ns <= u.requested_ns && at <= d.ended_ns)
            .find_map(|d| timeline(d).and_then(|(s, c)| dip_between(s, c, u.requested_ns, at)));
        u.dip = found.map(|(d, _)| d);
        u.before_min = found.map(|(_, m)| m);
    }
    let mut lost = BTreeMap::new();
    for d in downloads.iter().filter(|d| d.error.is_some()) {
        let last = updates
            .iter()
            .filter(|u| {
                u.requested_ns <= d.ended_ns && d.ended_ns - u.requested_ns <= 10_000_000_000
            })
            .max_by_key(|u| u.requested_ns);
        if let Some(u) = last {
            *lost.entry(u.server.clone()).or_insert(0) += 1;
        }
    }
    lost
}

/// One server's figures from its updates.
pub fn server_report(name: &str, updates: &[UpdateRun], lost: usize) -> ServerReport {
    let mine: Vec<&UpdateRun> = updates.iter().filter(|u| u.server == name).collect();
    let done: Vec<&&UpdateRun> = mine.iter().filter(|u| u.result == "updated").collect();
    let blackout: Vec<u64> = done.iter().filter_map(|u| u.blackout_us).collect();
    let took: Vec<u64> = mine.iter().filter_map(|u| u.took_ms).collect();
    let dips: Vec<Dip> = mine.iter().filter_map(|u| u.dip).collect();
    let (p50, p99) = (pct(&blackout, 50.0), pct(&blackout, 99.0));
    ServerReport {
        server: name.to_string(),
        updates: mine.len(),
        updated: done.len(),
        rolled_back: mine.iter().filter(|u| u.result == "rolled back").count(),
        refused: mine
            .iter()
            .filter(|u| u.result == "refused" || u.result == "error")
            .count(),
        blackout_p50_us: p50,
        blackout_p99_us: p99,
        blackout_max_us: pct(&blackout, 100.0),
        target_met: p50
            .zip(p99)
            .map(|(a, b)| a < TARGET_P50_US && b < TARGET_P99_US),
        took_p50_ms: pct(&took, 50.0),
        took_max_ms: pct(&took, 100.0),
        connections_lost: lost,
        dips_measured: dips.len(),
        dip_before_median_bytes: median(dips.iter().map(|d| d.before_median)),
        dip_before_min_bytes: median(mine.iter().filter_map(|u| u.before_min.map(|m| m as f64))),
        dip_after_min_bytes: median(dips.iter().map(|d| d.after_min as f64)),
        dip_below_half_median: median(dips.iter().map(|d| d.below_half as f64)),
        dip_below_half_max: dips.iter().map(|d| d.below_half).max(),
        restarts: None,
        last_exit: None,
    }
}

/// Each server's crash restarts and last exit now.
fn restarts(config: &Path) -> Result<BTreeMap<String, (u64, Option<String>)>> {
    SERVERS
        .iter()
        .map(|n| {
            let s = server_json(config, n)?;
            Ok((
                n.to_string(),
                (
                    s["restarts"].as_u64().unwrap_or(0),
                    s["last_exit"].as_str().map(String::from),
                ),
            ))
        })
        .collect()
}

fn ms(us: Option<u64>) -> String {
    us.map_or("n/a".into(), |u| format!("{:.3}", u as f64 / 1000.0))
}

fn mb(b: Option<f64>) -> String {
    b.map_or("n/a".into(), |b| format!("{:.2}", b / 1e6))
}

fn print_table(r: &UpdateBenchReport, run_s: f64) {
    println!(
        "Live update (`keepnet update SERVER` to the binary it runs, grace {} ms) during HTTP \
         downloads to the Linux kernel over TAP: {} updates per server, {:.0} s",
        r.grace_ms, r.updates_per_server, run_s
    );
    println!(
        "blackout: the update's blackout_us (the old instance's last batch -> the new one's \
         first poll, stamped by the servers), target p50 < {} ms, p99 < {} ms; anchors: {}",
        r.target_p50_us / 1000,
        r.target_p99_us / 1000,
        r.anchors
    );
    println!(
        "dip: bytes per {} ms bucket, {} ms before the update (median, and smallest: the \
         download's own ups and downs) vs {} ms from the handoff on (smallest; buckets below \
         half the median, of {}); medians over the updates",
        r.bucket_ms, r.window_ms, r.window_ms, WINDOW_BUCKETS
    );
    println!(
        "{:<7} {:>7} {:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>6} {:>8} {:>5} {:>10} {:>8} {:>9} {:>11}",
        "server",
        "updates",
        "updated",
        "rolled",
        "refused",
        "p50 ms",
        "p99 ms",
        "max ms",
        "target",
        "took ms",
        "lost",
        "before MB",
        "min MB",
        "after MB",
        "<half med"
    );
    for s in &r.servers {
        println!(
            "{:<7} {:>7} {:>7} {:>6} {:>7} {:>8} {:>8} {:>8} {:>6} {:>8} {:>5} {:>10} {:>8} {:>9} {:>11}",
            s.server,
            s.updates,
            s.updated,
            s.rolled_back,
            s.refused,
            ms(s.blackout_p50_us),
            ms(s.blackout_p99_us),
            ms(s.blackout_max_us),
            s.target_met
                .map_or("n/a", |ok| if ok { "met" } else { "MISSED" }),
            s.took_p50_ms.map_or("n/a".into(), |t| t.to_string()),
            s.connections_lost,
            mb(s.dip_before_median_bytes),
            mb(s.dip_before_min_bytes),
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
    for u in r.updates.iter().filter(|u| u.result != "updated") {
        println!(
            "  {} {}: {}",
            u.server,
            u.result,
            u.reason.as_deref().unwrap_or("(no reason given)")
        );
    }
    for s in &r.servers {
        if let Some(n) = s.restarts.filter(|&n| n > 0) {
            println!(
                "{}: {n} crash restart(s) during the run (last exit: {})",
                s.server,
                s.last_exit.as_deref().unwrap_or("?")
            );
        }
    }
}

/// Runs the benchmark.
pub fn run(args: UpdateBenchArgs) -> Result<()> {
    args.validate()?;
    interrupt::catch();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout_s);
    let exe = std::env::current_exe().context("find the keepnet binary")?;
    eprintln!("bench update: starting a private keepnet instance");
    let inst = Instance::up_with("bench-upd", OVERRIDES).map_err(|e| Error::Peer(e.to_string()))?;
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
        "bench update: {from} serves {gbit:.2} Gbit/s undisturbed; downloads of {} MiB, one \
         after another, while each server is live-updated {} times (grace {} ms)",
        bytes >> 20,
        args.updates,
        args.grace
    );

    let before = restarts(&config)?;
    let downloads = DownloadLoop::start(exe.clone(), inst.netns.clone(), from.clone(), bytes);
    let mut updates: Vec<UpdateRun> = Vec::new();
    let mut stopped_early = None;
    let mut errors_in_a_row = 0;
    'servers: for name in &args.servers {
        let mut done = 0;
        for k in 0..args.updates {
            interrupt::check()?;
            if Instant::now() >= deadline {
                stopped_early = Some(format!(
                    "the time limit of {} s ended the run at {name} update {}",
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
            wait_running(&config, name)?;
            let u = update_once(&config, name, args.grace);
            if u.result == "updated" {
                done += 1;
                errors_in_a_row = 0;
            } else {
                eprintln!(
                    "bench update: {name} update {}: {}: {}",
                    k + 1,
                    u.result,
                    u.reason.as_deref().unwrap_or("(no reason given)")
                );
                if u.result == "error" || u.result == "refused" {
                    errors_in_a_row += 1;
                }
            }
            if k % 10 == 9 || k + 1 == args.updates {
                eprintln!(
                    "bench update: {name}: {}/{} updates ({done} updated), last blackout {} ms, \
                     took {} ms",
                    k + 1,
                    args.updates,
                    ms(u.blackout_us),
                    u.took_ms.map_or("?".into(), |t| t.to_string())
                );
            }
            updates.push(u);
            if errors_in_a_row >= MAX_ERRORS_IN_A_ROW {
                stopped_early = Some(format!(
                    "{MAX_ERRORS_IN_A_ROW} updates in a row were refused or not answered (at \
                     {name} update {})",
                    k + 1
                ));
                break 'servers;
            }
            std::thread::sleep(Duration::from_millis(args.gap_ms));
        }
    }
    eprintln!("bench update: updates done; waiting for the download under way to end");
    let done = downloads.finish();
    let after = restarts(&config).ok();
    let lost = attribute(&mut updates, &done, args.grace);
    let servers: Vec<ServerReport> = args
        .servers
        .iter()
        .map(|n| {
            let mut r = server_report(n, &updates, lost.get(n).copied().unwrap_or(0));
            if let (Some((r0, _)), Some((r1, exit))) =
                (before.get(n), after.as_ref().and_then(|a| a.get(n)))
            {
                r.restarts = Some(r1.saturating_sub(*r0));
                r.last_exit = exit.clone();
            }
            r
        })
        .collect();
    let report = UpdateBenchReport {
        target_p50_us: TARGET_P50_US,
        target_p99_us: TARGET_P99_US,
        anchors: ANCHORS.to_string(),
        bucket_ms: BUCKET_MS,
        window_ms: BUCKET_MS * WINDOW_BUCKETS as u64,
        updates_per_server: args.updates,
        grace_ms: args.grace,
        servers,
        downloads: DownloadsReport::of(&done, bytes),
        updates,
    };
    if let Err(e) = inst.down() {
        eprintln!("bench update: keepnet down: {e}");
    }
    if let Some(why) = &stopped_early {
        eprintln!("bench update: {why}");
    }
    let run_s = started.elapsed().as_secs_f64();
    eprintln!("bench update: done in {run_s:.1} s");
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encode the report")?
        );
    } else {
        print_table(&report, run_s);
        if let Some(why) = &stopped_early {
            println!("(fewer updates than asked: {why})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::tcp_probe::TcpProbeSummary;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: UpdateBenchArgs,
    }

    fn parse(x: &[&str]) -> std::result::Result<UpdateBenchArgs, clap::Error> {
        let mut v = vec!["update"];
        v.extend_from_slice(x);
        P::try_parse_from(v).map(|p| p.a)
    }

    #[test]
    fn arguments_and_their_bounds() {
        let a = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_ok());
        assert_eq!(
            (a.updates, a.grace, a.gap_ms, a.json),
            (100, 20, 250, false)
        );
        assert_eq!(a.servers, SERVERS.map(String::from).to_vec());
        let a = parse(&[
            "--updates",
            "5",
            "--grace",
            "0",
            "--servers",
            "tcp",
            "--json",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_ok());
        assert_eq!(
            (a.updates, a.grace, a.servers.clone(), a.json),
            (5, 0, vec!["tcp".into()], true)
        );
        for bad in [
            &["--updates", "0"][..],
            &["--grace", "10001"],
            &["--servers", "dns"],
            &["--gap-ms", "50"],
            &["--timeout-s", "1"],
        ] {
            assert!(parse(bad).is_ok_and(|a| a.validate().is_err()), "{bad:?}");
        }
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn the_dip_compares_before_the_request_with_after_the_handoff() {
        // 1000 bytes per bucket; the update asked for at bucket 20, the handoff in bucket 25
        // zeroing it and halving the next.
        let mut c = vec![1000u64; 50];
        c[25] = 0;
        c[26] = 400;
        // The download's own low in the 100 ms before.
        c[12] = 700;
        let start = 7_000 * MS;
        let d = dip_between(start, &c, start + 20 * BUCKET_MS * MS, start + 253 * MS);
        assert_eq!(
            d,
            Some((
                Dip {
                    before_median: 1000.0,
                    after_min: 0,
                    below_half: 2
                },
                700
            ))
        );
        // Windows that leave the timeline: not measured.
        assert_eq!(
            dip_between(start, &c, start + 50 * MS, start + 250 * MS),
            None
        );
        assert_eq!(
            dip_between(start, &c, start + 200 * MS, start + 450 * MS),
            None
        );
        assert_eq!(dip_between(start, &c, start - MS, start + 250 * MS), None);
    }

    fn run_of(server: &str, requested: u64, answered: u64, blackout: u64) -> UpdateRun {
        UpdateRun {
            server: server.into(),
            result: "updated".into(),
            reason: None,
            blackout_us: Some(blackout),
            took_ms: Some((answered - requested) / MS),
            from_pid: 10,
            pid: 11,
            generation: Some(2),
            requested_ns: requested,
            answered_ns: answered,
            dip: None,
            before_min: None,
        }
    }

    #[test]
    fn the_handoff_is_placed_before_the_grace_period_but_not_before_the_request() {
        let u = run_of("tcp", 1_000 * MS, 1_060 * MS, 2_000);
        // 60 ms after the request, less 20 ms grace, 2 ms blackout, 5 ms margin.
        assert_eq!(u.handoff_ns(20), 1_033 * MS);
        assert_eq!(u.handoff_ns(500), 1_000 * MS);
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

    #[test]
    fn updates_get_their_dips_and_failures_their_server() {
        let s = 1_000 * MS;
        let downloads = [
            download(s, s + 1_000 * MS, None),
            download(s + 1_000 * MS, s + 2_000 * MS, Some("reset")),
        ];
        let mut updates = vec![
            run_of("ip", s + 500 * MS, s + 540 * MS, 300),
            run_of("tcp", s + 1_500 * MS, s + 1_540 * MS, 900),
            run_of("tcp", s + 1_950 * MS, s + 1_990 * MS, 20_000),
        ];
        updates.push(UpdateRun {
            result: "rolled back".into(),
            reason: Some("the new build refused the state".into()),
            ..run_of("tcp", s + 1_970 * MS, s + 1_980 * MS, 50_000)
        });
        let lost = attribute(&mut updates, &downloads, 20);
        assert!(updates[0].dip.is_some() && updates[1].dip.is_some());
        assert_eq!(updates[2].dip, None, "too close to the end of its download");
        assert_eq!(lost.get("tcp"), Some(&1));
        assert_eq!(lost.get("ip"), None);
        let r = server_report("tcp", &updates, 1);
        assert_eq!(
            (r.updates, r.updated, r.rolled_back, r.refused),
            (3, 2, 1, 0)
        );
        assert_eq!(
            r.blackout_p50_us,
            Some(900),
            "rollbacks are not in the blackouts"
        );
        assert_eq!(r.blackout_max_us, Some(20_000));
        assert_eq!(r.target_met, Some(false), "p99 of 20 ms misses 10 ms");
        assert_eq!(r.dips_measured, 1);
        assert_eq!(r.dip_before_median_bytes, Some(100.0));
        assert_eq!(r.dip_before_min_bytes, Some(100.0));
        assert_eq!(r.connections_lost, 1);
        let ip = server_report("ip", &updates, 0);
        assert_eq!(ip.target_met, Some(true));
        let json = serde_json::to_value(&r).unwrap_or_default();
        for key in [
            "server",
            "updates",
            "updated",
            "rolled_back",
            "blackout_p50_us",
            "blackout_p99_us",
            "blackout_max_us",
            "connections_lost",
            "dip_before_median_bytes",
            "dip_after_min_bytes",
            "dip_below_half_median",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }
}
