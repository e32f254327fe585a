//! `keepnet bench udp`: UDP echo round trip and request rate between the Linux kernel and
//! keepnet's echo service (UDP port 7 in a private instance, over TAP), beside the same load
//! against a Linux UDP echo server across a veth pair of namespaces, in the same run.
//!
//! Both sides are driven by the same client, `keepnet __udp-probe`, run inside the client's
//! namespace; the Linux server is `keepnet __udp-echo-server`. Rounds alternate between the
//! two targets (and which goes first), and each figure is the median across rounds.

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::child::{run_bounded, tail, Reaped};
use super::interrupt;
use super::probe::ProbeSummary;
use super::udp_echo::READY;
use super::veth::{Veth, VETH_B};
use crate::ctl::instance::Instance;
use crate::error::{Context, Error, Result};

/// The port of keepnet's UDP echo service (the default config's `udp-echo --port 7`) and of
/// the Linux baseline server.
pub const ECHO_PORT: u16 = 7;
/// The outstanding-request levels measured.
pub const LEVELS: [usize; 2] = [1, 16];
/// The optional second payload size.
pub const LARGE_SIZE: usize = 1400;
/// Requests per measurement at 16 outstanding, as a multiple of `--count` (they go faster).
pub const LOAD_FACTOR: u64 = 4;
/// Wall-time limit of one measurement (one probe run).
const PROBE_LIMIT_S: f64 = 10.0;
/// Per-datagram timeout before a resend, and resends before a datagram counts as lost.
const PROBE_TIMEOUT_MS: u64 = 100;
const PROBE_RETRIES: u32 = 3;
/// Once the run has taken this long, the rounds not yet started are skipped.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long a target may take to answer its first echo.
const WARM_UP_LIMIT: Duration = Duration::from_secs(15);

/// Arguments of `keepnet bench udp`.
#[derive(Debug, clap::Args)]
pub struct UdpArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Echo requests per measurement at 1 outstanding (4 times as many at 16 outstanding);
    /// each round measures each target at both levels. A measurement stops after 10 s
    /// (what it did not send is reported as unsent), and no round starts after 120 s.
    #[arg(long, default_value_t = 5000)]
    pub count: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Also measure 1400-byte payloads (extra rows, suffixed `_1400B`).
    #[arg(long)]
    pub with_1400: bool,
    /// Rounds per target (keepnet and Linux alternate; figures are medians across rounds).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Measure only the Linux veth baseline; start no keepnet instance (the keepnet column
    /// and the ratios are then null).
    #[arg(long)]
    pub baseline_only: bool,
}

impl UdpArgs {
    /// Checks the arguments.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Unsupported(format!("bench udp: {m}")));
        if self.count == 0 || self.count > 1_000_000 {
            return bad("--count must be in 1..=1000000");
        }
        if self.size > super::probe::MAX_UDP_PAYLOAD {
            return bad("--size must be at most 65507");
        }
        if self.rounds == 0 || self.rounds > 20 {
            return bad("--rounds must be in 1..=20");
        }
        Ok(())
    }

    /// The payload sizes measured, the primary one first.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v = vec![self.size];
        if self.with_1400 && self.size != LARGE_SIZE {
            v.push(LARGE_SIZE);
        }
        v
    }
}

/// The two targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Keepnet,
    Linux,
}

impl Side {
    pub fn key(self) -> &'static str {
        match self {
            Side::Keepnet => "keepnet",
            Side::Linux => "linux_veth",
        }
    }
}

/// One probe run's result.
#[derive(Clone, Debug)]
pub struct Measurement {
    pub side: Side,
    pub size: usize,
    pub outstanding: usize,
    pub summary: ProbeSummary,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub test: String,
    pub unit: &'static str,
    pub size_bytes: usize,
    pub outstanding: usize,
    pub keepnet: Option<f64>,
    pub linux_veth: Option<f64>,
    /// keepnet / linux_veth.
    pub ratio: Option<f64>,
}

/// Delivery figures of one side, summed over its measurements.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Integrity {
    pub measurements: usize,
    pub sent: u64,
    pub echoed_ok: u64,
    pub mismatched: u64,
    pub lost: u64,
    pub unsent: u64,
    pub retries: u64,
    pub late_or_duplicate: u64,
}

/// The whole result (`--json` prints it).
#[derive(Debug, Serialize)]
pub struct UdpReport {
    pub rows: Vec<Row>,
    /// Requests per measurement at 1 outstanding, and at 16.
    pub count: u64,
    pub count_16: u64,
    pub rounds_planned: usize,
    pub rounds_done: usize,
    pub sizes: Vec<usize>,
    pub keepnet: Option<Integrity>,
    pub linux_veth: Integrity,
    pub sockperf: serde_json::Value,
}

/// Median of the finite values; `None` if there are none.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let hi = v.get(mid).copied()?;
    if v.len() % 2 == 1 {
        Some(hi)
    } else {
        v.get(mid - 1).map(|lo| (lo + hi) / 2.0)
    }
}

/// `a / b` where both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
        _ => None,
    }
}

/// Report rows from all measurements: for each size and level, p50 and p99 round trip and
/// the request rate, each the median across rounds. Rows of sizes other than `primary` carry
/// the size in their name.
pub fn rows(ms: &[Measurement], sizes: &[usize], primary: usize) -> Vec<Row> {
    type Pick = fn(&ProbeSummary) -> Option<f64>;
    let metrics: [(&str, &'static str, Pick); 3] = [
        ("rtt_p50", "us", |s| s.rtt_p50_us),
        ("rtt_p99", "us", |s| s.rtt_p99_us),
        // A run with no correct echo has no rate.
        ("rate", "req/s", |s| (s.echoed_ok > 0).then_some(s.rate)),
    ];
    let mut out = Vec::new();
    for &size in sizes {
        for k in LEVELS {
            for (name, unit, pick) in metrics {
                let fig = |side: Side| {
                    median(
                        ms.iter()
                            .filter(|m| m.side == side && m.size == size && m.outstanding == k)
                            .filter_map(|m| pick(&m.summary)),
                    )
                };
                let (kn, lx) = (fig(Side::Keepnet), fig(Side::Linux));
                let suffix = if size == primary {
                    String::new()
                } else {
                    format!("_{size}B")
                };
                out.push(Row {
                    test: format!("udp_echo_{name}_{k}{suffix}"),
                    unit,
                    size_bytes: size,
                    outstanding: k,
                    keepnet: kn,
                    linux_veth: lx,
                    ratio: ratio(kn, lx),
                });
            }
        }
    }
    out
}

/// Sums one side's delivery figures.
pub fn integrity(ms: &[Measurement], side: Side) -> Integrity {
    let mut t = Integrity::default();
    for m in ms.iter().filter(|m| m.side == side) {
        let s = &m.summary;
        t.measurements += 1;
        t.sent += s.sent;
        t.echoed_ok += s.echoed_ok;
        t.mismatched += s.mismatched;
        t.lost += s.lost;
        t.unsent += s.unsent;
        t.retries += s.retries;
        t.late_or_duplicate += s.late_or_duplicate;
    }
    t
}

// ---------------------------------------------------------------------------------------
// Child processes, each bounded in time and killed (by its pid) on every exit path.

fn this_exe() -> Result<PathBuf> {
    std::env::current_exe().context("find the keepnet binary")
}

/// What one probe run does.
#[derive(Clone, Copy, Debug)]
struct ProbeSpec {
    count: u64,
    size: usize,
    outstanding: usize,
    seed: u64,
    max_seconds: f64,
}

/// Runs `keepnet __udp-probe` in namespace `ns` against `target`.
fn probe_in(exe: &Path, ns: &str, target: SocketAddr, p: ProbeSpec) -> Result<ProbeSummary> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .arg("__udp-probe")
        .args(["--target", &target.to_string()])
        .args(["--count", &p.count.to_string()])
        .args(["--min-size", &p.size.to_string()])
        .args(["--max-size", &p.size.to_string()])
        .args(["--seed", &p.seed.to_string()])
        .args(["--outstanding", &p.outstanding.to_string()])
        .args(["--timeout-ms", &PROBE_TIMEOUT_MS.to_string()])
        .args(["--retries", &PROBE_RETRIES.to_string()])
        .args(["--max-seconds", &p.max_seconds.to_string()])
        .arg("--json")
        .env("RUST_LOG", "warn");
    let limit = Duration::from_secs_f64(p.max_seconds) + Duration::from_secs(10);
    let (status, out, err) = run_bounded(&mut cmd, limit)?;
    let line = out.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match line.map(serde_json::from_str::<ProbeSummary>) {
        Some(Ok(s)) => Ok(s),
        _ => Err(Error::Peer(format!(
            "udp probe in {ns} against {target} gave no summary ({}): {}",
            status.map_or("killed at its time limit".to_string(), |s| s.to_string()),
            tail(&err, 3)
        ))),
    }
}

/// Waits until `target` echoes (a service may still be starting; ARP must resolve).
fn warm_up(exe: &Path, ns: &str, target: SocketAddr, name: &str) -> Result<()> {
    let start = Instant::now();
    let spec = ProbeSpec {
        count: 20,
        size: 64,
        outstanding: 1,
        seed: 0,
        max_seconds: 3.0,
    };
    loop {
        let last = match probe_in(exe, ns, target, spec) {
            Ok(s) if s.echoed_ok > 0 => return Ok(()),
            Ok(s) => s.render(),
            Err(e) => e.to_string(),
        };
        interrupt::check()?;
        if start.elapsed() >= WARM_UP_LIMIT {
            return Err(Error::Timeout(format!(
                "{name}: no UDP echo from {target} within {} s: {last}",
                WARM_UP_LIMIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The Linux echo server, in namespace `ns`, killed on drop.
struct LinuxServer {
    _child: Reaped,
}

impl LinuxServer {
    fn start(exe: &Path, ns: &str, bind: SocketAddr, seconds: f64) -> Result<LinuxServer> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .arg("__udp-echo-server")
            .args(["--bind", &bind.to_string()])
            .args(["--seconds", &seconds.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the Linux UDP echo server")?;
        let stdout = child.stdout.take();
        let child = Reaped(child);
        let (tx, rx) = mpsc::channel();
        if let Some(mut r) = stdout {
            std::thread::spawn(move || {
                // One short line, then the pipe stays open until the server exits.
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while let Ok(1) = r.read(&mut byte) {
                    if byte[0] == b'\n' {
                        break;
                    }
                    line.push(byte[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            interrupt::check()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with(READY) => return Ok(LinuxServer { _child: child }),
                Ok(line) => {
                    return Err(Error::Peer(format!(
                        "the Linux UDP echo server did not start: {line:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    return Err(Error::Timeout(
                        "the Linux UDP echo server did not report ready within 10 s".into(),
                    ))
                }
            }
        }
    }
}

/// Finds a program on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// sockperf's p50 and p99 (µs) from its report.
fn sockperf_percentiles(text: &str) -> (Option<f64>, Option<f64>) {
    let pick = |q: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {q} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    (pick("50.000"), pick("99.000"))
}

/// `sockperf ping-pong` as a cross-check, where sockperf is installed: against a sockperf
/// server across the veth pair, and against keepnet's echo service.
fn sockperf(
    veth: &Veth,
    keepnet: Option<(&str, SocketAddr)>,
    size: usize,
) -> Result<serde_json::Value> {
    let Some(bin) = which("sockperf") else {
        eprintln!(
            "bench udp: sockperf is not installed; skipping the sockperf ping-pong cross-check"
        );
        return Ok(serde_json::Value::Null);
    };
    eprintln!("bench udp: sockperf ping-pong cross-check ({size}-byte messages, 2 s each)");
    let port = "11111";
    let server = Command::new("ip")
        .args(["netns", "exec", &veth.b])
        .arg(&bin)
        .args(["server", "-i", VETH_B, "-p", port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start sockperf server")?;
    let server = Reaped(server);
    std::thread::sleep(Duration::from_millis(500));
    let ping = |ns: &str, addr: &str, port: &str| -> serde_json::Value {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(&bin).args([
            "ping-pong",
            "-i",
            addr,
            "-p",
            port,
            "-m",
            &size.max(16).to_string(),
            "-t",
            "2",
            "--full-rtt",
        ]);
        match run_bounded(&mut cmd, Duration::from_secs(15)) {
            Ok((_, out, err)) => {
                let text = format!("{out}\n{err}");
                match sockperf_percentiles(&text) {
                    (Some(p50), p99) => serde_json::json!({"rtt_p50_us": p50, "rtt_p99_us": p99}),
                    _ => serde_json::json!({"error": tail(&text, 3)}),
                }
            }
            Err(e) => serde_json::json!({"error": e.to_string()}),
        }
    };
    let linux = ping(&veth.a, VETH_B, port);
    drop(server);
    let kn = keepnet.map(|(ns, t)| ping(ns, &t.ip().to_string(), &t.port().to_string()));
    Ok(serde_json::json!({"message_bytes": size.max(16), "linux_veth": linux, "keepnet": kn}))
}

// ---------------------------------------------------------------------------------------

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.prec$}"))
}

fn print_table(r: &UdpReport) {
    println!(
        "UDP echo between the Linux kernel and keepnet (TAP) and between two Linux namespaces \
         (veth)"
    );
    println!(
        "{} requests per measurement at 1 outstanding, {} at 16; medians over {} of {} rounds \
         per target, alternating",
        r.count, r.count_16, r.rounds_done, r.rounds_planned
    );
    println!(
        "{:<26} {:>6} {:>12} {:>12} {:>15}",
        "test", "unit", "keepnet", "linux_veth", "keepnet/linux"
    );
    for row in &r.rows {
        let prec = if row.unit == "us" { 1 } else { 0 };
        println!(
            "{:<26} {:>6} {:>12} {:>12} {:>15}",
            row.test,
            row.unit,
            fmt_opt(row.keepnet, prec),
            fmt_opt(row.linux_veth, prec),
            row.ratio.map_or("-".to_string(), |x| format!("{x:.2}x")),
        );
    }
    let line = |name: &str, t: &Integrity| {
        println!(
            "{name}: {} sent, {} echoed ok, {} mismatched, {} lost, {} unsent, {} resends",
            t.sent, t.echoed_ok, t.mismatched, t.lost, t.unsent, t.retries
        )
    };
    if let Some(k) = &r.keepnet {
        line("keepnet", k);
    }
    line("linux_veth", &r.linux_veth);
    if !r.sockperf.is_null() {
        println!("sockperf ping-pong: {}", r.sockperf);
    }
}

/// Runs the benchmark.
pub fn run(args: UdpArgs) -> Result<()> {
    args.validate()?;
    interrupt::catch();
    let started = Instant::now();
    let exe = this_exe()?;
    let sizes = args.sizes();
    let linux_target = SocketAddr::new(
        VETH_B
            .parse()
            .map_err(|_| Error::Protocol(format!("bad address {VETH_B}")))?,
        ECHO_PORT,
    );

    eprintln!("bench udp: veth pair and Linux echo server at {linux_target}");
    let veth = Veth::new("bu")?;
    let server = LinuxServer::start(&exe, &veth.b, linux_target, RUN_LIMIT.as_secs_f64() + 120.0)?;
    let inst = if args.baseline_only {
        eprintln!("bench udp: --baseline-only: no keepnet instance");
        None
    } else {
        eprintln!("bench udp: starting a private keepnet instance");
        Some(Instance::up("bench-udp").map_err(|e| Error::Peer(e.to_string()))?)
    };
    interrupt::check()?;
    let keepnet_target = match &inst {
        Some(i) => Some(
            format!("{}:{ECHO_PORT}", i.config.ip.addr.addr)
                .parse::<SocketAddr>()
                .map_err(|e| Error::Protocol(format!("keepnet's address: {e}")))?,
        ),
        None => None,
    };
    let mut targets = Vec::new();
    if let (Some(i), Some(t)) = (&inst, keepnet_target) {
        targets.push((Side::Keepnet, i.netns.clone(), t));
    }
    targets.push((Side::Linux, veth.a.clone(), linux_target));

    for (side, ns, t) in &targets {
        eprintln!("bench udp: warming up {} ({t})", side.key());
        warm_up(&exe, ns, *t, side.key())?;
    }

    let mut ms: Vec<Measurement> = Vec::new();
    let mut rounds_done = 0;
    for round in 0..args.rounds {
        interrupt::check()?;
        if started.elapsed() >= RUN_LIMIT {
            eprintln!(
                "bench udp: run limit of {} s reached; skipping rounds {}..{}",
                RUN_LIMIT.as_secs(),
                round + 1,
                args.rounds
            );
            break;
        }
        // Alternate which side goes first.
        let mut order: Vec<&(Side, String, SocketAddr)> = targets.iter().collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (side, ns, t) in order {
            for &size in &sizes {
                for k in LEVELS {
                    let spec = ProbeSpec {
                        count: if k == 1 {
                            args.count
                        } else {
                            args.count * LOAD_FACTOR
                        },
                        size,
                        outstanding: k,
                        seed: 1 + round as u64,
                        max_seconds: PROBE_LIMIT_S,
                    };
                    let s = probe_in(&exe, ns, *t, spec)?;
                    eprintln!(
                        "bench udp: round {}/{}: {:<10} {size:>5} B x{k:<2}: p50 {} µs, p99 {} \
                         µs, {:.0} req/s{}",
                        round + 1,
                        args.rounds,
                        side.key(),
                        fmt_opt(s.rtt_p50_us, 1),
                        fmt_opt(s.rtt_p99_us, 1),
                        s.rate,
                        if s.ok() {
                            String::new()
                        } else {
                            format!(
                                " ({} lost, {} mismatched, {} unsent, {} resends)",
                                s.lost, s.mismatched, s.unsent, s.retries
                            )
                        }
                    );
                    ms.push(Measurement {
                        side: *side,
                        size,
                        outstanding: k,
                        summary: s,
                    });
                }
            }
        }
        rounds_done += 1;
    }

    let sockperf = sockperf(
        &veth,
        inst.as_ref()
            .zip(keepnet_target)
            .map(|(i, t)| (i.netns.as_str(), t)),
        args.size,
    )?;
    drop(server);
    drop(veth);
    if let Some(i) = inst {
        i.down().map_err(|e| Error::Peer(e.to_string()))?;
    }

    let report = UdpReport {
        rows: rows(&ms, &sizes, args.size),
        count: args.count,
        count_16: args.count * LOAD_FACTOR,
        rounds_planned: args.rounds,
        rounds_done,
        sizes,
        keepnet: keepnet_target.map(|_| integrity(&ms, Side::Keepnet)),
        linux_veth: integrity(&ms, Side::Linux),
        sockperf,
    };
    eprintln!(
        "bench udp: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encode the report")?
        );
    } else {
        print_table(&report);
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
        a: UdpArgs,
    }

    fn summary(p50: f64, p99: f64, rate: f64) -> ProbeSummary {
        ProbeSummary {
            echoed_ok: 10,
            count: 10,
            sent: 10,
            rtt_p50_us: Some(p50),
            rtt_p99_us: Some(p99),
            rate,
            ..ProbeSummary::default()
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([f64::NAN, 5.0]), Some(5.0));
        assert_eq!(median([]), None);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
    }

    #[test]
    fn rows_are_medians_per_side_size_and_level() {
        let mut ms = Vec::new();
        for (i, side) in [Side::Keepnet, Side::Linux].into_iter().enumerate() {
            for k in LEVELS {
                for r in 0..3 {
                    let base = (i as f64 + 1.0) * 10.0 * k as f64;
                    ms.push(Measurement {
                        side,
                        size: 64,
                        outstanding: k,
                        summary: summary(base + r as f64, 2.0 * base + r as f64, 1000.0 / base),
                    });
                }
            }
        }
        let all = rows(&ms, &[64, 1400], 64);
        assert_eq!(all.len(), 12);
        let names: Vec<&str> = all.iter().map(|r| r.test.as_str()).collect();
        assert_eq!(
            names[..6],
            [
                "udp_echo_rtt_p50_1",
                "udp_echo_rtt_p99_1",
                "udp_echo_rate_1",
                "udp_echo_rtt_p50_16",
                "udp_echo_rtt_p99_16",
                "udp_echo_rate_16"
            ]
        );
        assert_eq!(names[6], "udp_echo_rtt_p50_1_1400B");
        let p50_1 = &all[0];
        assert_eq!((p50_1.keepnet, p50_1.linux_veth), (Some(11.0), Some(21.0)));
        assert_eq!(p50_1.ratio, Some(11.0 / 21.0));
        assert_eq!(all[2].unit, "req/s");
        assert_eq!(all[2].keepnet, Some(100.0));
        // No 1400-byte measurements: null figures, null ratio.
        assert_eq!((all[6].keepnet, all[6].ratio), (None, None));
        // Baseline only: keepnet and ratio null, the JSON says so.
        let lx: Vec<Measurement> = ms.into_iter().filter(|m| m.side == Side::Linux).collect();
        let r = rows(&lx, &[64], 64);
        let json = serde_json::to_value(&r[0]).unwrap_or_default();
        assert_eq!(json["keepnet"], serde_json::Value::Null);
        assert_eq!(json["ratio"], serde_json::Value::Null);
        assert_eq!(json["linux_veth"], serde_json::json!(21.0));
        assert_eq!(json["test"], "udp_echo_rtt_p50_1");
    }

    #[test]
    fn integrity_sums_one_side() {
        let mut bad = summary(1.0, 2.0, 3.0);
        bad.lost = 2;
        bad.retries = 5;
        let ms = vec![
            Measurement {
                side: Side::Keepnet,
                size: 64,
                outstanding: 1,
                summary: bad.clone(),
            },
            Measurement {
                side: Side::Keepnet,
                size: 64,
                outstanding: 16,
                summary: bad,
            },
            Measurement {
                side: Side::Linux,
                size: 64,
                outstanding: 1,
                summary: summary(1.0, 2.0, 3.0),
            },
        ];
        let k = integrity(&ms, Side::Keepnet);
        assert_eq!(
            (k.measurements, k.lost, k.retries, k.echoed_ok),
            (2, 4, 10, 20)
        );
        assert_eq!(integrity(&ms, Side::Linux).lost, 0);
    }

    #[test]
    fn arguments() {
        let parse = |x: &[&str]| {
            let mut v = vec!["udp"];
            v.extend_from_slice(x);
            P::try_parse_from(v).map(|p| p.a)
        };
        let a = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_ok());
        assert_eq!((a.count, a.size, a.rounds), (5000, 64, 3));
        assert_eq!(a.sizes(), vec![64]);
        let a = parse(&["--with-1400"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.sizes(), vec![64, 1400]);
        let a = parse(&["--with-1400", "--size", "1400"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.sizes(), vec![1400]);
        for bad in [
            &["--count", "0"][..],
            &["--size", "70000"],
            &["--rounds", "0"],
        ] {
            assert!(parse(bad).is_ok_and(|a| a.validate().is_err()), "{bad:?}");
        }
    }

    #[test]
    fn help_tells_the_truth() {
        use clap::CommandFactory;
        let help = P::command().render_long_help().to_string();
        for needle in [
            "--json",
            "--count",
            "[default: 5000]",
            "4 times as many at 16",
            "10 s",
            "120 s",
            "--size",
            "[default: 64]",
            "--with-1400",
            "--rounds",
            "[default: 3]",
            "--baseline-only",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
        assert_eq!(LOAD_FACTOR, 4);
        assert_eq!((PROBE_LIMIT_S, RUN_LIMIT.as_secs()), (10.0, 120));
        assert_eq!(LARGE_SIZE, 1400);
        assert_eq!(LEVELS, [1, 16]);
    }

    #[test]
    fn sockperf_report_parsing() {
        let text = "sockperf: ---> <MAX> observation =   40.123\n\
                    sockperf: ---> percentile 99.000 =   25.500\n\
                    sockperf: ---> percentile 50.000 =   12.250\n";
        assert_eq!(sockperf_percentiles(text), (Some(12.25), Some(25.5)));
        assert_eq!(sockperf_percentiles("nothing"), (None, None));
    }
}
