//! The command line. Subcommands appear here as they are implemented; `--help` lists only
//! what works.

use clap::{Args, Parser, Subcommand};

use crate::bench::ipc::peer::PeerArgs;
use crate::bench::probe::ProbeArgs;
use crate::bench::recovery::RecoveryArgs;
use crate::bench::tcp::TcpArgs;
use crate::bench::tcp_probe::TcpProbeArgs;
use crate::bench::tcp_server::TcpServerArgs;
use crate::bench::udp::UdpArgs;
use crate::bench::udp_echo::EchoServerArgs;
use crate::bench::update::UpdateBenchArgs;

/// keepnet: a user-space TCP/IP stack of cooperating processes.
#[derive(Debug, Parser)]
#[command(name = "keepnet", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a constellation (driver, ip, udp and tcp servers, then the services); exits 0
    /// once every server and service is ready.
    ///
    /// The supervisor then watches each server: an exit is seen at once (pidfd), a hang when
    /// its heartbeat stops for two periods (`heartbeat_ms`, default 250); either way the
    /// server is restarted on the same shared memory, at once after a healthy run, with
    /// exponential backoff in a crash loop, and at most `max_restarts` times in `window_s`
    /// (then `on_limit`: "stop" leaves it failed, "restart-all" restarts every server). See
    /// the README for the `[servers]` fields. Needs root for a TAP link, not for the memory
    /// wire (`link.backend = "wire"`).
    ///
    /// If the instance's supervisor died and its servers still run, `up` re-adopts them from
    /// the state file instead (no server restarted, no connection lost): "keepnet up:
    /// re-adopted instance X: driver 123, ip 124, udp 125, tcp 126 (no server restarted)".
    Up(UpArgs),
    /// Show each server: pid, core, state (starting, running, backoff, failed, ...),
    /// generation, restarts, last exit, last recovery time, version, uptime, packets, drops
    /// by reason.
    Status(StatusArgs),
    /// Fault injection: signal one server (default KILL) through the supervisor, which
    /// records the instant and restarts the server per its policy.
    ///
    /// Prints e.g. "killed tcp (pid 1234) with SIGKILL"; `keepnet status` then shows the
    /// restart, the last exit and the recovery time (from this kill to the new instance
    /// running). Needs root or the supervisor's user.
    Kill(KillArgs),
    /// Live update: swap one server (or, with --all, every server in order: driver, ip, udp,
    /// tcp) for a new binary while connections stay up.
    ///
    /// The supervisor checks the binary (its --version must name the server and read the
    /// state format the running one writes), starts it in standby beside the running
    /// build kept ready for a rollback, has the running instance snapshot its state at a
    /// batch boundary and hand its rings over, and watches the new one for the grace
    /// period. A new build that refuses the state, is not running in time or dies within the
    /// grace period is rolled back to the old build. Prints e.g. "tcp updated: pid 12 -> 34,
    /// build 0.1.0 -> 0.2.0, state format 1 (96 bytes), generation 5, blackout 0.412 ms";
    /// exits non-zero unless every update was done. Needs root or the supervisor's user.
    Update(UpdateArgs),
    /// Stop everything; release shared memory, the TAP device and a namespace `up` made.
    /// With the supervisor dead, ends its servers and services by pid.
    Down(ConfigArg),
    /// Mirror every frame at the driver into a pcap file (tcpdump -r reads it).
    Capture(CaptureArgs),
    /// The main job with no setup (needs root): a private network namespace, keepnet up in
    /// it, pings from the Linux kernel on the other side of the TAP, status, teardown.
    Demo,
    /// Internal: the supervisor daemon (started by `keepnet up`).
    #[command(name = "__daemon", hide = true)]
    Daemon(DaemonArgs),
    /// Run a benchmark beside its baselines, in the same run.
    Bench(BenchArgs),
    /// Internal: the peer process of `keepnet bench ipc` (started by keepnet itself).
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer(PeerArgs),
    /// Internal: the kernel-side UDP test client (run with `ip netns exec` by tests and by
    /// `keepnet bench udp`).
    #[command(name = "__udp-probe", hide = true)]
    UdpProbe(ProbeArgs),
    /// Internal: the Linux UDP echo server of `keepnet bench udp`'s baseline.
    #[command(name = "__udp-echo-server", hide = true)]
    UdpEchoServer(EchoServerArgs),
    /// Internal: the kernel-side TCP test client (run with `ip netns exec` by tests and by
    /// `keepnet bench tcp`).
    #[command(name = "__tcp-probe", hide = true)]
    TcpProbe(TcpProbeArgs),
    /// Internal: the Linux TCP servers (echo, discard, chargen, http) of `keepnet bench tcp`'s
    /// baseline.
    #[command(name = "__tcp-server", hide = true)]
    TcpServer(TcpServerArgs),
    /// Internal: the smoltcp comparator of `keepnet bench tcp` (feature `smoltcp-bench`).
    #[cfg(feature = "smoltcp-bench")]
    #[command(name = "__smoltcp-server", hide = true)]
    SmoltcpServer(crate::bench::smol::SmolArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub target: BenchTarget,
}

#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// Cross-process messaging: keepnet's ring against pipe, Unix socket, eventfd and bare
    /// shared memory.
    ///
    /// Measures, between this process and a peer process, the round-trip latency (p50, p99)
    /// of a 64-byte message and the one-way throughput of 64-byte messages sent one per
    /// operation and 32 per operation, for each transport, with the two processes on two
    /// CPUs (pinned) and on one CPU (shared_core). Takes about half a minute; progress goes
    /// to stderr.
    Ipc(IpcArgs),
    /// ICMP echo round trip (p50, p99) from the Linux kernel to keepnet over TAP, beside the
    /// round trip between two Linux namespaces over a veth pair, in the same run; needs root.
    Ping(PingArgs),
    /// UDP echo round trip (p50, p99) and request rate at 1 and 16 outstanding requests,
    /// from the Linux kernel to keepnet's echo service (UDP port 7) over TAP, beside the
    /// same load against a Linux UDP echo server across a veth pair, in the same run; needs
    /// root.
    ///
    /// Rounds alternate between keepnet and Linux; each figure is the median across rounds,
    /// and ratios are keepnet / Linux. Every echo is checked byte for byte; losses, resends
    /// and mismatches are reported. Progress goes to stderr; the Linux side takes a few
    /// seconds, and the whole run is bounded (see --count). Runs `sockperf ping-pong` as a
    /// cross-check where sockperf is installed.
    Udp(UdpArgs),
    /// TCP bulk throughput both ways (1 and 8 streams), request/response latency (1 and 1024
    /// bytes, p50 and p99) and connections per second, from the Linux kernel to keepnet's
    /// services (echo 7, discard 9, chargen 19, http 80) over TAP, beside Linux-kernel servers
    /// across a veth pair and smoltcp over a TAP of its own, in the same run; needs root.
    ///
    /// The same kernel-side client measures every target. Rounds interleave the targets (the
    /// one that goes first rotates); each figure is the median across rounds; ratios in the
    /// table are keepnet / Linux and keepnet / smoltcp. Every kernel connection (the probe's,
    /// the Linux servers') uses congestion control cubic, set per connection, and so does
    /// smoltcp; the veth pair and the smoltcp TAP get TSO, GSO and GRO turned off with ethtool
    /// where it is installed (keepnet's TAP has no offloads), and MTU 1500; what each got is
    /// printed after the table (on stderr with --json). Each service is checked first (echo
    /// compared byte for byte, an HTTP /bytes/N body by SHA-256); a target or service that
    /// fails gives "n/a" with the reason (null in JSON) instead of figures. The smoltcp column
    /// needs a keepnet built with the cargo feature smoltcp-bench. Progress goes to stderr;
    /// every measurement is bounded by --timeout-s.
    Tcp(TcpArgs),
    /// Recovery time of each server after `keepnet kill` (SIGKILL; p50, p99, max beside the
    /// 10 ms target, from status), connections lost, and the throughput dip of a TCP download
    /// from the Linux kernel around each kill (bytes per 10 ms, 100 ms before vs after);
    /// needs root.
    ///
    /// Each server in turn (driver, ip, udp, tcp) is killed --kills times during HTTP
    /// downloads whose every byte is checked; progress goes to stderr; the run is bounded by
    /// --timeout-s.
    Recovery(RecoveryArgs),
    /// Live update of each server to the binary it runs (`keepnet update`, a short grace
    /// period): blackout p50, p99, max beside the target (p50 < 1 ms, p99 < 10 ms) and the
    /// published anchors (Google Snap, Andromeda), updates done and rolled back, connections
    /// lost, and the throughput dip of a TCP download from the Linux kernel around each
    /// update (bytes per 10 ms, 100 ms before vs after the handoff); needs root.
    ///
    /// Each server in turn (driver, ip, udp, tcp) is updated --updates times during HTTP
    /// downloads whose every byte is checked; progress goes to stderr; the run is bounded by
    /// --timeout-s.
    Update(UpdateBenchArgs),
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Pings to each target (1 ms apart).
    #[arg(long, default_value_t = 1000)]
    pub count: usize,
}

#[derive(Debug, Args)]
pub struct IpcArgs {
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Cut message counts and time limits about 20x (a smoke test: a few seconds, rough
    /// figures).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// TOML config (every field has a default; see README).
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Network namespace for the TAP device and every server (created if missing, and then
    /// removed again by `down`).
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
    /// Stay in the foreground, logging to stderr, until Ctrl-C or `keepnet down`.
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The server: driver, ip, udp or tcp.
    #[arg(value_name = "SERVER")]
    pub server: String,
    /// Signal to send: a name (KILL, SIGKILL, TERM, STOP, SEGV, ABRT, ...) or a number.
    /// STOP makes a hang, which the heartbeat catches.
    #[arg(long, value_name = "SIG")]
    pub signal: Option<String>,
    /// Instead of a signal: the server writes garbage into the slots of every ring it
    /// produces on, publishes them, and aborts (its neighbours must drop the garbage and
    /// carry on). Implemented by the driver, ip and udp servers; others just abort.
    #[arg(long, conflicts_with = "signal")]
    pub scribble: bool,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The server: driver, ip, udp or tcp.
    #[arg(
        value_name = "SERVER",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub server: Option<String>,
    /// Update every server, one at a time in dependency order (driver, ip, udp, tcp), each
    /// to the binary it was started from; stops at the first that is not updated.
    #[arg(long)]
    pub all: bool,
    /// The new binary (default: the one the server was started from, e.g. after installing
    /// a new build over it).
    #[arg(long, value_name = "PATH", conflicts_with = "all")]
    pub binary: Option<std::path::PathBuf>,
    /// How long the new build is watched before the update counts as done (a crash within
    /// it rolls back).
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub grace: u64,
    /// Do not ask the new binary's --version first (drills: the new build's own refusal of
    /// a state it cannot read then rolls the update back).
    #[arg(long)]
    pub skip_check: bool,
}

#[derive(Debug, Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The pcap file to write.
    #[arg(long, value_name = "FILE.pcap")]
    pub out: std::path::PathBuf,
    /// How long to capture.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub seconds: f64,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[arg(long)]
    pub netns: Option<String>,
}
