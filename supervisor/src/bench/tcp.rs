//! `keepnet bench tcp`: TCP bulk throughput both ways, request/response latency and
//! connection rate between the Linux kernel and keepnet's services (a private instance, over
//! TAP), beside the same load against Linux-kernel servers across a veth pair of namespaces,
//! and against smoltcp serving the same services over a TAP of its own, in one run.
//!
//! Every figure comes from the same client, `keepnet __tcp-probe`, run with `ip netns exec`
//! in the kernel-side namespace of each target:
//!
//! * keepnet: namespace `kn-bench-tcp-PID`, TAP `kn0` with the kernel at 198.18.0.1 and
//!   keepnet's services at 198.18.0.2;
//! * linux_veth: namespaces `kn-btca-PID` (veth0, 198.19.0.1, the probe) and `kn-btcb-PID`
//!   (veth1, 198.19.0.2, `keepnet __tcp-server`);
//! * smoltcp: namespace `kn-tsm-PID`, TAP `knsm0` with the kernel at 198.18.1.1 and
//!   `keepnet __smoltcp-server` at 198.18.1.2.
//!
//! Services: echo 7, discard 9, chargen 19, http 80 (`GET /bytes/N`). Rows: bulk_to (probe
//! writes to discard), bulk_from (probe reads from chargen), rr (echo, TCP_NODELAY), connect
//! (to discard). Each round runs every test against every target back to back (the target
//! that goes first rotates), and each figure is the median of the rounds that succeeded. A
//! target or service that does not answer gives null figures with a reason, never a hang:
//! every probe is bounded by `--timeout-s` and the whole run by [`RUN_LIMIT`].

use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::child::{run_bounded, tail, Reaped};
use super::interrupt;
use super::tcp_probe::{Pattern, TcpProbeSummary, CHUNK};
use super::tcp_server::Service;
use super::veth::{Veth, VETH_B};
use crate::ctl::instance::Instance;
use crate::ctl::lab;
use crate::error::{Context, Error, Result};

/// Service ports (keepnet's demo services, and the same on the other targets).
pub const ECHO_PORT: u16 = 7;
pub const DISCARD_PORT: u16 = 9;
pub const CHARGEN_PORT: u16 = 19;
pub const HTTP_PORT: u16 = 80;
/// Streams of the multi-stream bulk rows.
pub const MANY_STREAMS: usize = 8;
/// Round trips before the measured ones of an rr row.
const RR_WARMUP: u64 = 50;
/// The smoltcp lab: TAP name, kernel side, smoltcp's side.
const SMOL_TAP: &str = "knsm0";
const SMOL_KERNEL: &str = "198.18.1.1";
const SMOL_ADDR: &str = "198.18.1.2";
/// The congestion control asked for in every namespace.
const CONGESTION: &str = "cubic";
/// No round starts after the run has taken this long.
pub const RUN_LIMIT: Duration = Duration::from_secs(1200);
/// How long a target may take to pass its first check (services starting, ARP).
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);
/// Bytes of each service check (echo: per connection, 4 connections).
const CHECK_BYTES: u64 = 1 << 20;

/// The targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Side {
    #[value(name = "keepnet")]
    Keepnet,
    #[value(name = "linux_veth")]
    Linux,
    #[value(name = "smoltcp")]
    Smoltcp,
}

impl Side {
    pub fn key(self) -> &'static str {
        match self {
            Side::Keepnet => "keepnet",
            Side::Linux => "linux_veth",
            Side::Smoltcp => "smoltcp",
        }
    }
}

/// Arguments of `keepnet bench tcp`.
#[derive(Debug, clap::Args)]
pub struct TcpArgs {
    /// Print `{"rows": [{"test", "unit", "keepnet", "linux_veth", "smoltcp"}, ...]}` on
    /// stdout instead of the table (a figure that could not be measured is null).
    #[arg(long)]
    pub json: bool,
    /// Rounds; every round measures every test on every target, and each figure is the
    /// median across rounds. No round starts after 1200 s.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Bytes moved by one bulk measurement, whether by 1 stream or shared by 8.
    #[arg(long, default_value_t = 512 << 20)]
    pub bytes: u64,
    /// Round trips per rr measurement (after 50 unmeasured ones).
    #[arg(long, default_value_t = 2000)]
    pub rr_count: u64,
    /// Connections per connect measurement (one after another; at most 4000, the depth of
    /// the Linux server's accept queue).
    #[arg(long, default_value_t = 1000)]
    pub connects: u64,
    /// Time limit of one measurement (one probe run), in seconds; a measurement that hits
    /// it counts as failed.
    #[arg(long, default_value_t = 60.0)]
    pub timeout_s: f64,
    /// Targets to measure (the others' columns are null).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "keepnet,linux_veth,smoltcp"
    )]
    pub targets: Vec<Side>,
    /// smoltcp's send and receive buffer per connection, in bytes (keepnet's size).
    #[arg(long, default_value_t = 256 * 1024)]
    pub smoltcp_buffer: usize,
}

impl TcpArgs {
    /// Checks the arguments.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Unsupported(format!("bench tcp: {m}")));
        if self.rounds == 0 || self.rounds > 20 {
            return bad("--rounds must be in 1..=20");
        }
        if self.bytes < (1 << 20) || self.bytes > (8 << 30) {
            return bad("--bytes must be in 1 MiB..=8 GiB");
        }
        if self.rr_count == 0 || self.rr_count > 1_000_000 {
            return bad("--rr-count must be in 1..=1000000");
        }
        if self.connects == 0 || self.connects > 4000 {
            return bad("--connects must be in 1..=4000");
        }
        if !(self.timeout_s >= 1.0 && self.timeout_s <= 600.0) {
            return bad("--timeout-s must be in 1..=600");
        }
        if self.targets.is_empty() {
            return bad("--targets names none");
        }
        if !(1024..=(64 << 20)).contains(&self.smoltcp_buffer) {
            return bad("--smoltcp-buffer must be in 1024..=67108864");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Tests and rows.

/// One kind of measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    /// The probe writes to discard with K streams.
    BulkTo(usize),
    /// The probe reads from chargen with K streams.
    BulkFrom(usize),
    /// Round trips of B bytes against echo.
    Rr(usize),
    /// Connections to discard, one after another.
    Connect,
}

pub const TESTS: [Test; 7] = [
    Test::BulkTo(1),
    Test::BulkTo(MANY_STREAMS),
    Test::BulkFrom(1),
    Test::BulkFrom(MANY_STREAMS),
    Test::Rr(1),
    Test::Rr(1024),
    Test::Connect,
];

type Pick = fn(&TcpProbeSummary) -> Option<f64>;

impl Test {
    pub fn service(self) -> Service {
        match self {
            Test::BulkTo(_) | Test::Connect => Service::Discard,
            Test::BulkFrom(_) => Service::Chargen,
            Test::Rr(_) => Service::Echo,
        }
    }

    fn port(self) -> u16 {
        port_of(self.service())
    }

    /// The probe's mode and arguments (without the time limit).
    pub fn probe_args(self, a: &TcpArgs, ip: IpAddr) -> Vec<String> {
        let to = SocketAddr::new(ip, self.port()).to_string();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match self {
            Test::BulkTo(k) => s(&[
                "bulk-send",
                "--to",
                &to,
                "--bytes",
                &a.bytes.to_string(),
                "--streams",
                &k.to_string(),
            ]),
            Test::BulkFrom(k) => s(&[
                "bulk-recv",
                "--from",
                &to,
                "--bytes",
                &a.bytes.to_string(),
                "--streams",
                &k.to_string(),
            ]),
            Test::Rr(b) => s(&[
                "rr",
                "--to",
                &to,
                "--size",
                &b.to_string(),
                "--count",
                &a.rr_count.to_string(),
                "--warmup",
                &RR_WARMUP.to_string(),
            ]),
            Test::Connect => s(&["connect", "--to", &to, "--count", &a.connects.to_string()]),
        }
    }

    /// The rows this test gives: name, unit, figure.
    pub fn rows(self) -> Vec<(String, &'static str, Pick)> {
        let size = |b: usize| {
            if b >= 1024 && b % 1024 == 0 {
                format!("{}k", b / 1024)
            } else {
                format!("{b}b")
            }
        };
        match self {
            Test::BulkTo(k) => vec![(format!("bulk_to_keepnet_{k}"), "Gbit/s", |s| s.gbit_per_s)],
            Test::BulkFrom(k) => {
                vec![(format!("bulk_from_keepnet_{k}"), "Gbit/s", |s| s.gbit_per_s)]
            }
            Test::Rr(b) => vec![
                (format!("rr_{}_p50", size(b)), "µs", |s| s.p50_us),
                (format!("rr_{}_p99", size(b)), "µs", |s| s.p99_us),
            ],
            Test::Connect => vec![("connect_per_s".into(), "conn/s", |s| s.conn_per_s)],
        }
    }

    /// A short description for progress lines.
    fn label(self) -> String {
        match self {
            Test::BulkTo(k) => format!("bulk to discard, {k} stream(s)"),
            Test::BulkFrom(k) => format!("bulk from chargen, {k} stream(s)"),
            Test::Rr(b) => format!("rr {b} B"),
            Test::Connect => "connect".into(),
        }
    }
}

fn port_of(s: Service) -> u16 {
    match s {
        Service::Echo => ECHO_PORT,
        Service::Discard => DISCARD_PORT,
        Service::Chargen => CHARGEN_PORT,
        Service::Http => HTTP_PORT,
    }
}

/// One line of the report (`--json` prints exactly these fields).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    pub test: String,
    pub unit: &'static str,
    pub keepnet: Option<f64>,
    pub linux_veth: Option<f64>,
    pub smoltcp: Option<f64>,
}

impl Row {
    pub fn get(&self, side: Side) -> Option<f64> {
        match side {
            Side::Keepnet => self.keepnet,
            Side::Linux => self.linux_veth,
            Side::Smoltcp => self.smoltcp,
        }
    }
}

/// The `--json` output.
#[derive(Debug, Serialize)]
pub struct TcpReport {
    pub rows: Vec<Row>,
}

/// Every measurement and why some are missing.
#[derive(Debug, Default)]
pub struct Results {
    pub ok: BTreeMap<(Side, Test), Vec<TcpProbeSummary>>,
    /// The last reason a (side, test) failed or was not measured.
    pub why: BTreeMap<(Side, Test), String>,
}

impl Results {
    pub fn record(
        &mut self,
        side: Side,
        test: Test,
        r: std::result::Result<TcpProbeSummary, String>,
    ) {
        match r {
            Ok(s) => self.ok.entry((side, test)).or_default().push(s),
            Err(e) => {
                self.why.insert((side, test), e);
            }
        }
    }

    /// The rows: each figure the median over the successful measurements.
    /// The congestion controls the probe's connections to a side reported.
    pub fn congestion(&self, side: Side) -> Vec<String> {
        let mut v: Vec<String> = self
            .ok
            .iter()
            .filter(|((s, _), _)| *s == side)
            .flat_map(|(_, ms)| ms.iter().filter_map(|m| m.congestion.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    pub fn rows(&self) -> Vec<Row> {
        let mut out = Vec::new();
        for t in TESTS {
            for (name, unit, pick) in t.rows() {
                let fig = |side: Side| {
                    super::udp::median(
                        self.ok
                            .get(&(side, t))
                            .into_iter()
                            .flatten()
                            .filter_map(pick),
                    )
                };
                out.push(Row {
                    test: name,
                    unit,
                    keepnet: fig(Side::Keepnet),
                    linux_veth: fig(Side::Linux),
                    smoltcp: fig(Side::Smoltcp),
                });
            }
        }
        out
    }

    /// Why a row's figure of a side is missing (or failed in some rounds).
    pub fn reason(&self, side: Side, row: &str) -> Option<&str> {
        TESTS
            .iter()
            .find(|t| t.rows().iter().any(|(n, _, _)| n == row))
            .and_then(|t| self.why.get(&(side, *t)))
            .map(String::as_str)
    }
}

// ---------------------------------------------------------------------------------------
// Child processes, each bounded in time and killed on every exit path.

/// Starts a server that prints one line starting with `ready` once it serves; waits for it
/// (10 s at most).
fn start_server(cmd: &mut Command, ready: &str, what: &str) -> Result<Reaped> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    let stdout = child.stdout.take();
    let child = Reaped(child);
    let (tx, rx) = mpsc::channel();
    if let Some(mut r) = stdout {
        std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while let Ok(1) = r.read(&mut byte) {
                if byte[0] == b'\n' {
                    break;
                }
                line.push(byte[0]);
            }
            let _ = tx.send(String::from_utf8_lossy(&line).into_owned());
            // Keep reading so the server never blocks on a full pipe.
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        });
    }
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        interrupt::check()?;
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) if line.starts_with(ready) => return Ok(child),
            Ok(line) => return Err(Error::Peer(format!("{what} did not start: {line:?}"))),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < end => {}
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "{what} did not report ready within 10 s"
                )))
            }
        }
    }
}

/// Runs the probe in namespace `ns` with mode arguments `mode`; the summary if it was ok,
/// else why not.
fn probe(
    exe: &Path,
    ns: &str,
    mode: &[String],
    limit_s: f64,
) -> std::result::Result<TcpProbeSummary, String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(exe)
        .arg("__tcp-probe")
        .args(mode)
        .args(["--timeout-s", &limit_s.to_string()])
        .args(["--congestion", CONGESTION])
        .env("RUST_LOG", "warn");
    let limit = Duration::from_secs_f64(limit_s) + Duration::from_secs(15);
    let (status, out, err) = run_bounded(&mut cmd, limit).map_err(|e| e.to_string())?;
    let line = out.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match line.map(serde_json::from_str::<TcpProbeSummary>) {
        Some(Ok(s)) if s.passed => Ok(s),
        Some(Ok(s)) => Err(s.error.unwrap_or_else(|| "not ok".into())),
        _ => Err(format!(
            "the probe gave no summary ({}): {}",
            status.map_or("killed at its time limit".to_string(), |s| s.to_string()),
            tail(&err, 2)
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Namespaces.

/// Asks for [`CONGESTION`] as a namespace's default; returns what the default is afterwards.
/// (Outside the initial namespace the kernel refuses a default that is not in
/// net.ipv4.tcp_allowed_congestion_control; the probe and the Linux server then still set it
/// on each connection with TCP_CONGESTION.)
fn set_congestion(ns: &str) -> String {
    let key = "net.ipv4.tcp_congestion_control";
    let set = lab::netns_exec(ns, &["sysctl", "-q", "-w", &format!("{key}={CONGESTION}")]);
    let now = lab::netns_exec(ns, &["sysctl", "-n", key])
        .ok()
        .filter(|(ok, _, _)| *ok)
        .map(|(_, out, _)| out.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    match set {
        Ok((true, _, _)) => now,
        Ok((false, _, err)) if err.contains("not permitted") => format!(
            "{now} (the kernel refuses {CONGESTION} as a namespace's default unless \
             net.ipv4.tcp_allowed_congestion_control lists it)"
        ),
        Ok((false, _, err)) => format!(
            "{now} (setting {CONGESTION} as the default failed: {})",
            tail(&err, 2)
        ),
        Err(e) => format!("{now} (sysctl: {e})"),
    }
}

/// Turns TSO, GSO and GRO off on a device (keepnet's TAP has no offloads) and reports what
/// the device has afterwards.
fn offloads_off(ns: &str, dev: &str) -> String {
    let installed = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("ethtool").is_file()));
    if !installed {
        return format!(
            "{dev}: left as they are (ethtool is not installed; a veth keeps TSO and GSO on)"
        );
    }
    let set = lab::netns_exec(
        ns,
        &[
            "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
        ],
    );
    if let Err(e) = &set {
        return format!("{dev}: offloads unchanged (ethtool: {e})");
    }
    let shown = lab::netns_exec(ns, &["ethtool", "-k", dev])
        .map(|(_, out, _)| out)
        .unwrap_or_default();
    let want = [
        ("tcp-segmentation-offload", "tso"),
        ("generic-segmentation-offload", "gso"),
        ("generic-receive-offload", "gro"),
        ("tx-checksumming", "tx-csum"),
    ];
    let parts: Vec<String> = want
        .iter()
        .filter_map(|(long, short)| {
            shown
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{long}:")))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| format!("{short} {}", v.split_whitespace().next().unwrap_or("?")))
        })
        .collect();
    let failed = match set {
        Ok((false, _, err)) => format!(" (ethtool -K: {})", tail(&err, 2)),
        _ => String::new(),
    };
    format!("{dev}: {}{failed}", parts.join(", "))
}

/// The smoltcp lab: a namespace with a TAP whose kernel side is addressed, and the smoltcp
/// server on the other side. Server killed, then namespace removed, on drop.
struct SmolLab {
    ns: String,
    server: Option<Reaped>,
}

impl SmolLab {
    fn new(exe: &Path, buffer: usize, seconds: f64) -> Result<SmolLab> {
        let ns = format!("kn-tsm-{}", std::process::id());
        let ip = |args: &[&str]| lab::ip(args).map_err(|e| Error::Peer(e.to_string()));
        ip(&["netns", "add", &ns])?;
        let mut lab = SmolLab { ns, server: None };
        let ns = lab.ns.clone();
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "tuntap", "add", "dev", SMOL_TAP, "mode", "tap"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{SMOL_KERNEL}/24"),
            "dev",
            SMOL_TAP,
        ])?;
        ip(&["-n", &ns, "link", "set", SMOL_TAP, "mtu", "1500", "up"])?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns])
            .arg(exe)
            .arg("__smoltcp-server")
            .args(["--tap", SMOL_TAP])
            .args(["--addr", &format!("{SMOL_ADDR}/24")])
            .args(["--buffer", &buffer.to_string()])
            .args(["--congestion", CONGESTION])
            .args(["--seconds", &seconds.to_string()])
            .env("RUST_LOG", "warn");
        lab.server = Some(start_server(
            &mut cmd,
            "smoltcp-server:",
            "the smoltcp server",
        )?);
        Ok(lab)
    }
}

impl Drop for SmolLab {
    fn drop(&mut self) {
        self.server.take();
        let _ = lab::netns_delete(&self.ns);
    }
}

/// The Linux baseline: a veth pair and `__tcp-server` in its `b` side; the server is killed
/// before the namespaces go.
struct LinuxLab {
    server: Option<Reaped>,
    veth: Veth,
}

impl Drop for LinuxLab {
    fn drop(&mut self) {
        self.server.take();
    }
}

impl LinuxLab {
    fn new(exe: &Path, seconds: f64, notes: &mut Vec<String>) -> Result<LinuxLab> {
        let veth = Veth::new("btc")?;
        let mut lab = LinuxLab { server: None, veth };
        let ip = |args: &[&str]| lab::ip(args).map_err(|e| Error::Peer(e.to_string()));
        let (a, b) = (lab.veth.a.clone(), lab.veth.b.clone());
        ip(&["-n", &a, "link", "set", "veth0", "mtu", "1500"])?;
        ip(&["-n", &b, "link", "set", "veth1", "mtu", "1500"])?;
        notes.push(format!(
            "linux_veth: namespace default congestion control {} (client), {} (server); \
             the servers set {CONGESTION} on every connection; offloads {}; {}; MTU 1500",
            set_congestion(&a),
            set_congestion(&b),
            offloads_off(&a, "veth0"),
            offloads_off(&b, "veth1"),
        ));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &b])
            .arg(exe)
            .arg("__tcp-server")
            .args(["--bind", VETH_B])
            .args(["--congestion", CONGESTION])
            .args(["--seconds", &seconds.to_string()])
            .env("RUST_LOG", "warn");
        lab.server = Some(start_server(
            &mut cmd,
            super::tcp_server::READY,
            "the Linux TCP server",
        )?);
        Ok(lab)
    }
}

// ---------------------------------------------------------------------------------------

/// A target as the run sees it.
struct Target {
    side: Side,
    ns: String,
    ip: IpAddr,
    /// Services that failed their check, and why.
    broken: BTreeMap<Service, String>,
}

/// The SHA-256 of the first `n` bytes of the i % 251 pattern.
pub fn pattern_sha256(n: u64) -> String {
    let p = Pattern::default();
    let mut h = Sha256::new();
    let mut off = 0;
    while off < n {
        let len = (n - off).min(CHUNK as u64) as usize;
        h.update(p.at(off, len));
        off += len as u64;
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The probe arguments of a service's check.
fn check_args(svc: Service, ip: IpAddr) -> Vec<String> {
    let to = SocketAddr::new(ip, port_of(svc)).to_string();
    let n = CHECK_BYTES.to_string();
    let v: Vec<&str> = match svc {
        Service::Echo => vec![
            "echo", "--to", &to, "--conns", "4", "--bytes", &n, "--seed", "7",
        ],
        Service::Discard => vec!["bulk-send", "--to", &to, "--bytes", &n],
        Service::Chargen => vec!["bulk-recv", "--from", &to, "--bytes", &n],
        Service::Http => vec!["bulk-recv", "--from", &to, "--bytes", &n, "--http"],
    };
    v.into_iter().map(String::from).collect()
}

/// Checks each service of a target once (the first one retried until it answers or
/// [`WARM_UP_LIMIT`] passes); a service that fails is not measured. Returns a note.
fn check(exe: &Path, t: &mut Target) -> Result<String> {
    let want_sha = pattern_sha256(CHECK_BYTES);
    let mut notes = Vec::new();
    let start = Instant::now();
    for (i, svc) in [
        Service::Echo,
        Service::Discard,
        Service::Chargen,
        Service::Http,
    ]
    .into_iter()
    .enumerate()
    {
        let args = check_args(svc, t.ip);
        let r = loop {
            interrupt::check()?;
            let r = probe(exe, &t.ns, &args, 10.0);
            if r.is_ok() || i > 0 || start.elapsed() >= WARM_UP_LIMIT {
                break r;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let r = r.and_then(|s| match (&s.sha256, svc) {
            (Some(h), Service::Http) if *h != want_sha => {
                Err(format!("the body's SHA-256 is {h}, not {want_sha}"))
            }
            _ => Ok(s),
        });
        match r {
            Ok(_) => notes.push(format!("{} ok", svc.name())),
            Err(e) => {
                eprintln!(
                    "bench tcp: {} {} (port {}) failed its check: {e}",
                    t.side.key(),
                    svc.name(),
                    port_of(svc)
                );
                notes.push(format!("{} FAILED", svc.name()));
                t.broken
                    .insert(svc, format!("{} check failed: {e}", svc.name()));
            }
        }
    }
    Ok(format!(
        "{}: service checks (echo 4 x 1 MiB, discard, chargen 1 MiB, http /bytes/1048576 with \
         SHA-256): {}",
        t.side.key(),
        notes.join(", ")
    ))
}

fn this_exe() -> Result<PathBuf> {
    std::env::current_exe().context("find the keepnet binary")
}

/// Runs the benchmark.
pub fn run(args: TcpArgs) -> Result<()> {
    args.validate()?;
    interrupt::catch();
    let started = Instant::now();
    let exe = this_exe()?;
    // Why a whole side is missing.
    let mut absent: BTreeMap<Side, String> = BTreeMap::new();
    let wants = |s: Side| args.targets.contains(&s);
    for side in [Side::Keepnet, Side::Linux, Side::Smoltcp] {
        if !wants(side) {
            absent.insert(side, "not measured (not in --targets)".into());
        }
    }
    let life = RUN_LIMIT.as_secs_f64() + 600.0;
    let mut notes: Vec<String> = Vec::new();
    let mut results = Results::default();
    let mut targets: Vec<Target> = Vec::new();

    let linux = if wants(Side::Linux) {
        eprintln!("bench tcp: veth pair and the Linux TCP servers at {VETH_B}");
        let l = LinuxLab::new(&exe, life, &mut notes)?;
        targets.push(Target {
            side: Side::Linux,
            ns: l.veth.a.clone(),
            ip: VETH_B
                .parse()
                .map_err(|_| Error::Protocol(format!("bad address {VETH_B}")))?,
            broken: BTreeMap::new(),
        });
        Some(l)
    } else {
        None
    };

    let smol = if !wants(Side::Smoltcp) {
        None
    } else if !cfg!(feature = "smoltcp-bench") {
        absent.insert(
            Side::Smoltcp,
            "this keepnet was built without the smoltcp-bench feature (cargo build --release \
             -p keepnet-supervisor --features smoltcp-bench)"
                .into(),
        );
        None
    } else {
        eprintln!("bench tcp: smoltcp on TAP {SMOL_TAP} at {SMOL_ADDR}");
        match SmolLab::new(&exe, args.smoltcp_buffer, life) {
            Ok(l) => {
                notes.push(format!(
                    "smoltcp: smoltcp 0.12 ({CONGESTION}, {} byte buffers per connection, Nagle \
                     off on echo); kernel side: namespace default congestion control {}, \
                     offloads {}, MTU 1500",
                    args.smoltcp_buffer,
                    set_congestion(&l.ns),
                    offloads_off(&l.ns, SMOL_TAP)
                ));
                targets.push(Target {
                    side: Side::Smoltcp,
                    ns: l.ns.clone(),
                    ip: SMOL_ADDR
                        .parse()
                        .map_err(|_| Error::Protocol(format!("bad address {SMOL_ADDR}")))?,
                    broken: BTreeMap::new(),
                });
                Some(l)
            }
            Err(e) => {
                eprintln!("bench tcp: smoltcp did not start: {e}");
                absent.insert(Side::Smoltcp, format!("smoltcp did not start: {e}"));
                None
            }
        }
    };

    let inst = if wants(Side::Keepnet) {
        eprintln!("bench tcp: starting a private keepnet instance");
        match Instance::up("bench-tcp") {
            Ok(i) => {
                let ip: IpAddr = i.config.ip.addr.addr.into();
                notes.push(format!(
                    "keepnet: tcp congestion control {}, buffers {} bytes send, {} receive per \
                     connection; kernel side of TAP {}: namespace default congestion control {}, \
                     offloads {}, MTU {}",
                    i.config.tcp.cc,
                    i.config.tcp.sndbuf,
                    i.config.tcp.rcvbuf,
                    i.config.link.tap,
                    set_congestion(&i.netns),
                    offloads_off(&i.netns, &i.config.link.tap),
                    i.config.link.mtu
                ));
                targets.push(Target {
                    side: Side::Keepnet,
                    ns: i.netns.clone(),
                    ip,
                    broken: BTreeMap::new(),
                });
                Some(i)
            }
            Err(e) => {
                eprintln!("bench tcp: keepnet did not start: {e}");
                absent.insert(Side::Keepnet, format!("keepnet did not start: {e}"));
                None
            }
        }
    } else {
        None
    };
    targets.sort_by_key(|t| t.side);
    interrupt::check()?;

    for t in &mut targets {
        eprintln!("bench tcp: checking {} ({})", t.side.key(), t.ip);
        let note = check(&exe, t)?;
        notes.push(note);
    }

    let mut rounds_done = 0;
    'rounds: for round in 0..args.rounds {
        if started.elapsed() >= RUN_LIMIT {
            eprintln!(
                "bench tcp: run limit of {} s reached; skipping rounds {}..{}",
                RUN_LIMIT.as_secs(),
                round + 1,
                args.rounds
            );
            break;
        }
        for test in TESTS {
            // The target that goes first rotates with the round.
            let n = targets.len().max(1);
            for j in 0..targets.len() {
                interrupt::check()?;
                let Some(t) = targets.get((j + round) % n) else {
                    continue;
                };
                if let Some(why) = t.broken.get(&test.service()) {
                    results.record(t.side, test, Err(why.clone()));
                    continue;
                }
                let r = probe(&exe, &t.ns, &test.probe_args(&args, t.ip), args.timeout_s);
                match &r {
                    Ok(s) => eprintln!(
                        "bench tcp: round {}/{}: {:<10} {:<32} {}",
                        round + 1,
                        args.rounds,
                        t.side.key(),
                        test.label(),
                        brief(s)
                    ),
                    Err(e) => eprintln!(
                        "bench tcp: round {}/{}: {:<10} {:<32} FAILED: {e}",
                        round + 1,
                        args.rounds,
                        t.side.key(),
                        test.label()
                    ),
                }
                results.record(t.side, test, r);
            }
            if started.elapsed() >= RUN_LIMIT + Duration::from_secs(300) {
                eprintln!(
                    "bench tcp: run limit passed by 300 s; stopping in round {}",
                    round + 1
                );
                break 'rounds;
            }
        }
        rounds_done += 1;
    }

    drop(smol);
    drop(linux);
    if let Some(i) = inst {
        if let Err(e) = i.down() {
            eprintln!("bench tcp: keepnet down: {e}");
        }
    }
    for (side, why) in &absent {
        for t in TESTS {
            results.record(*side, t, Err(why.clone()));
        }
    }
    let report = TcpReport {
        rows: results.rows(),
    };
    eprintln!(
        "bench tcp: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if args.json {
        for n in notes_of(&results, &notes) {
            eprintln!("bench tcp: {n}");
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encode the report")?
        );
    } else {
        print_table(&report, &results, &args, &notes, rounds_done);
    }
    Ok(())
}

fn brief(s: &TcpProbeSummary) -> String {
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    match s.mode.as_str() {
        "bulk-send" | "bulk-recv" => format!(
            "{} Gbit/s ({} MiB in {:.2} s)",
            f(s.gbit_per_s, 3),
            s.bytes.unwrap_or(0) >> 20,
            s.seconds
        ),
        "rr" => format!(
            "p50 {} µs, p99 {} µs, mean {} µs",
            f(s.p50_us, 1),
            f(s.p99_us, 1),
            f(s.mean_us, 1)
        ),
        _ => format!("{} conn/s", f(s.conn_per_s, 0)),
    }
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if unit == "Gbit/s" => format!("{v:.3}"),
        Some(v) if unit == "µs" => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    super::udp::ratio(a, b).map_or("-".into(), |x| format!("{x:.2}x"))
}

/// The setup notes, and the congestion control the probe's connections reported.
fn notes_of(res: &Results, notes: &[String]) -> Vec<String> {
    let mut v = notes.to_vec();
    for side in [Side::Keepnet, Side::Linux, Side::Smoltcp] {
        let cc = res.congestion(side);
        if !cc.is_empty() {
            v.push(format!(
                "{}: the probe's connections used congestion control {} (TCP_CONGESTION)",
                side.key(),
                cc.join(", ")
            ));
        }
    }
    v
}

fn print_table(r: &TcpReport, res: &Results, a: &TcpArgs, notes: &[String], rounds: usize) {
    println!(
        "TCP between the Linux kernel (probe) and keepnet (TAP), Linux (veth pair) and smoltcp \
         (TAP)"
    );
    println!(
        "bulk: {} MiB per measurement (1 stream, or shared by {MANY_STREAMS}); rr: {} round \
         trips; connect: {} connections; medians over {rounds} of {} rounds",
        a.bytes >> 20,
        a.rr_count,
        a.connects,
        a.rounds
    );
    println!(
        "{:<22} {:>7} {:>10} {:>11} {:>10} {:>10} {:>10}",
        "test", "unit", "keepnet", "linux_veth", "smoltcp", "kn/linux", "kn/smol"
    );
    for row in &r.rows {
        println!(
            "{:<22} {:>7} {:>10} {:>11} {:>10} {:>10} {:>10}",
            row.test,
            row.unit,
            fmt(row.keepnet, row.unit),
            fmt(row.linux_veth, row.unit),
            fmt(row.smoltcp, row.unit),
            fmt_ratio(row.keepnet, row.linux_veth),
            fmt_ratio(row.keepnet, row.smoltcp),
        );
    }
    // Reasons, once each per side.
    for side in [Side::Keepnet, Side::Linux, Side::Smoltcp] {
        let mut seen: Vec<&str> = Vec::new();
        for row in &r.rows {
            if let Some(why) = res.reason(side, &row.test) {
                let missing = row.get(side).is_none();
                if !seen.contains(&why) {
                    seen.push(why);
                    println!(
                        "{}: {} {}: {why}",
                        side.key(),
                        if missing {
                            "n/a from"
                        } else {
                            "some rounds failed from"
                        },
                        row.test
                    );
                }
            }
        }
    }
    for n in notes_of(res, notes) {
        println!("{n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: TcpArgs,
    }

    fn parse(x: &[&str]) -> std::result::Result<TcpArgs, clap::Error> {
        let mut v = vec!["tcp"];
        v.extend_from_slice(x);
        P::try_parse_from(v).map(|p| p.a)
    }

    #[test]
    fn row_names_and_units_are_the_contract() {
        let names: Vec<(String, &str)> = TESTS
            .iter()
            .flat_map(|t| t.rows())
            .map(|(n, u, _)| (n, u))
            .collect();
        let want = [
            ("bulk_to_keepnet_1", "Gbit/s"),
            ("bulk_to_keepnet_8", "Gbit/s"),
            ("bulk_from_keepnet_1", "Gbit/s"),
            ("bulk_from_keepnet_8", "Gbit/s"),
            ("rr_1b_p50", "µs"),
            ("rr_1b_p99", "µs"),
            ("rr_1k_p50", "µs"),
            ("rr_1k_p99", "µs"),
            ("connect_per_s", "conn/s"),
        ];
        assert_eq!(names.len(), want.len());
        for ((n, u), (wn, wu)) in names.iter().zip(want) {
            assert_eq!((n.as_str(), *u), (wn, wu));
        }
    }

    fn summary(g: f64) -> TcpProbeSummary {
        TcpProbeSummary {
            passed: true,
            gbit_per_s: Some(g),
            p50_us: Some(g * 10.0),
            ..TcpProbeSummary::default()
        }
    }

    #[test]
    fn rows_are_medians_and_failures_are_null_with_a_reason() {
        let mut r = Results::default();
        for g in [3.0, 1.0, 2.0] {
            r.record(Side::Linux, Test::BulkTo(1), Ok(summary(g)));
        }
        r.record(Side::Smoltcp, Test::BulkTo(1), Ok(summary(0.5)));
        r.record(Side::Smoltcp, Test::BulkTo(1), Err("reset".into()));
        r.record(Side::Keepnet, Test::BulkTo(1), Err("refused".into()));
        let rows = r.rows();
        assert_eq!(rows.len(), 9);
        let first = &rows[0];
        assert_eq!(first.test, "bulk_to_keepnet_1");
        assert_eq!(
            (first.keepnet, first.linux_veth, first.smoltcp),
            (None, Some(2.0), Some(0.5))
        );
        assert_eq!(
            r.reason(Side::Keepnet, "bulk_to_keepnet_1"),
            Some("refused")
        );
        assert_eq!(r.reason(Side::Linux, "bulk_to_keepnet_1"), None);
        let json = serde_json::to_value(TcpReport { rows }).unwrap_or_default();
        let row = &json["rows"][0];
        let keys: Vec<&String> = row
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        assert_eq!(keys.len(), 5, "{row}");
        assert_eq!(row["keepnet"], serde_json::Value::Null);
        assert_eq!(row["linux_veth"], serde_json::json!(2.0));
        assert_eq!(row["unit"], "Gbit/s");
        assert_eq!(json.as_object().map(|o| o.len()), Some(1));
    }

    #[test]
    fn probe_arguments_parse_as_the_probe_expects() {
        use super::super::tcp_probe::TcpProbeArgs;
        #[derive(Parser)]
        struct Q {
            #[command(flatten)]
            a: TcpProbeArgs,
        }
        let a = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        let ip: IpAddr = [198, 18, 0, 2].into();
        for t in TESTS {
            let mut v = vec!["__tcp-probe".to_string()];
            v.extend(t.probe_args(&a, ip));
            v.extend(["--timeout-s".to_string(), "5".into()]);
            let q = Q::try_parse_from(&v).unwrap_or_else(|e| panic!("{v:?}: {e}"));
            assert!(q.a.mode.validate().is_ok(), "{v:?}");
        }
        for svc in [
            Service::Echo,
            Service::Discard,
            Service::Chargen,
            Service::Http,
        ] {
            let mut v = vec!["__tcp-probe".to_string()];
            v.extend(check_args(svc, ip));
            assert!(Q::try_parse_from(&v).is_ok(), "{v:?}");
        }
    }

    #[test]
    fn arguments_and_help() {
        use clap::CommandFactory;
        let a = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(a.validate().is_ok());
        assert_eq!(
            (a.rounds, a.bytes, a.rr_count, a.connects),
            (3, 512 << 20, 2000, 1000)
        );
        assert_eq!(a.targets, vec![Side::Keepnet, Side::Linux, Side::Smoltcp]);
        assert_eq!(a.smoltcp_buffer, 262_144);
        let a = parse(&["--targets", "linux_veth,smoltcp"]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.targets, vec![Side::Linux, Side::Smoltcp]);
        for bad in [
            &["--rounds", "0"][..],
            &["--bytes", "1000"],
            &["--timeout-s", "0"],
            &["--connects", "4001"],
        ] {
            assert!(parse(bad).is_ok_and(|a| a.validate().is_err()), "{bad:?}");
        }
        let help = P::command().render_long_help().to_string();
        for needle in [
            "--json",
            "--rounds",
            "[default: 3]",
            "1200 s",
            "--bytes",
            "[default: 536870912]",
            "shared by 8",
            "--rr-count",
            "after 50",
            "--connects",
            "--timeout-s",
            "--targets",
            "--smoltcp-buffer",
            "[default: 262144]",
        ] {
            assert!(help.contains(needle), "{needle:?} missing from:\n{help}");
        }
        assert_eq!(
            (RR_WARMUP, MANY_STREAMS, RUN_LIMIT.as_secs()),
            (50, 8, 1200)
        );
    }

    #[test]
    fn the_pattern_hash_is_of_i_mod_251() {
        let body: Vec<u8> = (0..300_000u64).map(|i| (i % 251) as u8).collect();
        let want: String = Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(pattern_sha256(300_000), want);
    }
}
