//! The supervisor daemon: owns the regions and the TAP device, starts and watches the servers,
//! answers the control socket.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keepnet_ipc::SpinPolicy;
use keepnet_server::app::AppLink;
use keepnet_server::app::Attached;
use keepnet_server::runtime::{supervisor_ends, RequestError};
use keepnet_server::wiring::{Link, TransportLink, TCP, UDP};
use keepnet_server::{
    boot, request, Command as Cmd, ControlBlock, ControlMsg, RunOptions, ServerState,
};
use keepnet_tcp::state::{Geometry, TcpState};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tracing::{error, info, warn};

use super::apps::Apps;
use super::lab::{self, LabError};
use super::procs::{self, pidfd_exited, pidfd_open, Proc};
use super::protocol::{Answer, AppRecord, Request, ServerRecord, ServiceRecord, StateFile};
use super::services::ServiceProc;
use super::status::{AppStatus, ServerStatus, ServiceStatus, StatusReport};
use crate::config::{Config, OnLimit, Placement, RestartPolicy, Supervision, SERVERS};

mod adopt;
mod update;

pub use update::UpdateRequest;

/// Sockets in the udp server's table.
const UDP_SOCKETS: u32 = 4096;
/// Transport buffers per pool between the ip and tcp servers (a window's worth of segments).
const TCP_TRANSPORT_BUFFERS: u32 = 2048;
/// Application buffers of a TCP application's region (TX, RX).
const TCP_APP_BUFFERS: (u32, u32) = (256, 512);
/// Index of the udp and tcp application sets in `Daemon::apps`.
const UDP_APPS: usize = 0;
const TCP_APPS: usize = 1;
/// Longest wait for the services to attach and bind before `up` gives up.
const SERVICES_READY: Duration = Duration::from_secs(20);
/// A restarted server that is not running this long after its start is killed (a failed
/// start).
const START_LIMIT: Duration = Duration::from_secs(15);
/// How often the daemon looks at the control block of a server it is starting.
const STARTING_POLL: Duration = Duration::from_micros(100);
/// Longest wait for a running transport server to answer a hotplug request.
const HOTPLUG_WAIT: Duration = Duration::from_secs(2);

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Lab(#[from] LabError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shared memory: {0}")]
    Shm(String),
    #[error("TAP device {tap}: {message}")]
    Tap { tap: String, message: String },
    #[error("server {name} did not become ready: {why} (log: {log})")]
    NotReady {
        name: String,
        why: String,
        log: PathBuf,
    },
    #[error("server binary for {name} not found at {path}: build it (cargo build --release) or set servers.{name}.binary in the config")]
    NoBinary { name: String, path: PathBuf },
    /// Re-adopting a constellation whose supervisor died failed; its servers were left as
    /// they were.
    #[error("cannot re-adopt instance {instance:?}: {why}; its running servers were left untouched (`keepnet down` ends them)")]
    Adopt { instance: String, why: String },
    #[error("instance {instance:?} is already running (supervisor pid {pid})")]
    Running { instance: String, pid: u32 },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// What `up` asked for.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: Config,
    pub netns: Option<String>,
}

/// Default path of a server binary: `keepnet-NAME` beside the running `keepnet`.
pub fn default_binary(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    dir.join(format!("keepnet-{name}"))
}

/// The binary `up` will start for server `name`, checked to exist.
pub fn binary_for(config: &Config, name: &str) -> Result<PathBuf, DaemonError> {
    let path = config
        .server(name)
        .binary
        .clone()
        .unwrap_or_else(|| default_binary(name));
    if !path.is_file() {
        return Err(DaemonError::NoBinary {
            name: name.into(),
            path,
        });
    }
    Ok(path)
}

/// Where a server is in its life, as the supervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Spawned; not yet seen running with its own pid.
    Starting,
    /// Seen running with its own pid; its heartbeat is watched.
    Up,
    /// Exited; starts again at `at` (a crash loop backs off).
    Backoff { at: Instant },
    /// Waiting for its turn in a restart of the whole constellation.
    Queued,
    /// Not restarted again: the reason, as status shows it.
    Failed(String),
    /// Exited cleanly under `restart = "transient"`: not restarted.
    Stopped(String),
}

struct ServerProc {
    name: &'static str,
    binary: PathBuf,
    control: ControlBlock,
    commands: keepnet_ipc::Producer<ControlMsg>,
    replies: keepnet_ipc::Consumer<ControlMsg>,
    /// The running instance: our child, or one re-adopted from a supervisor that died.
    child: Option<Proc>,
    /// The instance's pidfd: readable once it has exited (polled in `serve`).
    pidfd: Option<OwnedFd>,
    /// The instance's start time (field 22 of /proc/PID/stat), for the state file.
    start: u64,
    /// Its executable as /proc/PID/exe says once it runs, for the state file.
    exe: Option<PathBuf>,
    started: Instant,
    restarts: u64,
    opts: RunOptions,
    env: Vec<(String, String)>,
    seq: u32,
    sup: Supervision,
    phase: Phase,
    /// How the last instance ended ("killed by signal 9 (SIGKILL)", "hung: ...").
    last_exit: Option<String>,
    /// Microseconds from the last outage's start to the new instance running.
    last_recovery_us: Option<u64>,
    /// When the current outage started (exit seen, hang seen or `keepnet kill` sent).
    outage_since: Option<Instant>,
    /// Consecutive failed starts (runs shorter than `min_runtime`): the backoff exponent.
    failed_starts: u32,
    /// When each restart within the intensity window happened.
    history: VecDeque<Instant>,
    /// `keepnet kill` sent a signal to this pid at this instant.
    kill_sent: Option<(Instant, u32)>,
    /// The supervisor killed the running child itself: why (reported as its exit).
    doom: Option<String>,
    /// Last heartbeat value and when it was seen to change.
    beat: (u64, Instant),
    /// The child's run-queue wait (ns, /proc/PID/schedstat) when its heartbeat was first
    /// seen standing still: time it was starved of a CPU does not count as a hang.
    beat_wait: Option<u64>,
    /// Its last live update.
    last_update: Option<super::status::UpdateReport>,
}

impl ServerProc {
    /// A server not started yet, on `control`.
    fn new(
        name: &'static str,
        binary: PathBuf,
        control: ControlBlock,
        opts: RunOptions,
        config: &Config,
    ) -> Result<ServerProc, DaemonError> {
        let (commands, replies) =
            supervisor_ends(&control).map_err(|e| DaemonError::Shm(e.to_string()))?;
        Ok(ServerProc {
            name,
            binary,
            control,
            commands,
            replies,
            child: None,
            pidfd: None,
            start: 0,
            exe: None,
            started: Instant::now(),
            restarts: 0,
            opts,
            env: server_env(config, name),
            seq: 0,
            sup: config.supervision(name),
            phase: Phase::Starting,
            last_exit: None,
            last_recovery_us: None,
            outage_since: None,
            failed_starts: 0,
            history: VecDeque::new(),
            kill_sent: None,
            doom: None,
            beat: (0, Instant::now()),
            beat_wait: None,
            last_update: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Proc::id)
    }

    /// Sends `sig` to the running instance: through its pidfd where there is one (a
    /// re-adopted server is not our child: its pid could be reused once it is gone).
    fn signal(&self, sig: Signal) -> std::io::Result<()> {
        let pid = self.pid();
        if pid == 0 {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        match &self.pidfd {
            Some(fd) => procs::pidfd_send_signal(fd.as_fd(), sig),
            None => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
                .map_err(std::io::Error::from),
        }
    }

    /// The state word status shows.
    fn state(&self) -> String {
        match &self.phase {
            Phase::Starting => "starting".into(),
            Phase::Up => self
                .control
                .state()
                .map_or("invalid", |st| st.as_str())
                .to_string(),
            Phase::Backoff { .. } => "backoff".into(),
            Phase::Queued => "restarting".into(),
            Phase::Failed(_) => "failed".into(),
            Phase::Stopped(_) => "stopped".into(),
        }
    }
}

/// An exit status in words: "exited with code 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(sig) => format!(
            "killed by signal {sig} ({}){}",
            Signal::try_from(sig).map_or("unknown", |s| s.as_str()),
            if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        ),
        None => status.to_string(),
    }
}

/// Milliseconds since the Unix epoch now.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Nanoseconds process `pid` has spent runnable but waiting for a CPU (the second field of
/// /proc/PID/schedstat); None where the kernel does not say.
fn run_queue_wait_ns(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Everything the daemon owns. Dropping it stops the servers and removes what `up` made.
pub struct Daemon {
    opts: Options,
    started: Instant,
    /// When the constellation first came up (ms since the Unix epoch; kept by re-adoption).
    started_unix_ms: u64,
    /// Set when this supervisor re-adopted a running constellation: the line `up` prints.
    adopted: Option<String>,
    link: Link,
    udp_link: TransportLink,
    udp_state: keepnet_udp::state::SocketTable,
    tap: Option<OwnedFd>,
    /// The memory wire (`link.backend = "wire"`): made here (side a) or joined (side b).
    wire: Option<keepnet_driver::wire::Wire>,
    /// The wire's eventfds: side a's driver parks on the first, side b's on the second; each
    /// driver rings the other's after sending.
    wire_bells: Option<(OwnedFd, OwnedFd)>,
    driver_bell: OwnedFd,
    udp_bell: OwnedFd,
    tcp_link: TransportLink,
    tcp_state: TcpState,
    tcp_bell: OwnedFd,
    /// Attached applications, per transport server: [UDP_APPS] and [TCP_APPS].
    apps: Vec<Apps>,
    services: Vec<ServiceProc>,
    servers: Vec<ServerProc>,
    created_netns: bool,
    listener: Option<UnixListener>,
    run_dir: PathBuf,
    /// When the constellation was last restarted whole (`on_limit = "restart-all"`).
    last_restart_all: Option<Instant>,
    /// When `watch_servers` last looked (a daemon that was itself kept off the CPU gives the
    /// servers the benefit of the doubt).
    last_watch: Instant,
    /// True while a re-adoption is under way: dropping the daemon then (the re-adoption
    /// failed) stops nothing and removes nothing.
    disowned: bool,
    /// The instance's supervisor lock (see `ctl::lock_path`), held for the daemon's life.
    lock: Option<nix::fcntl::Flock<std::fs::File>>,
    /// The live update under way (one at a time).
    update: Option<update::Update>,
    /// Processes a live update left to reap (dismissed standbys, old instances).
    leftovers: Vec<(std::process::Child, Instant)>,
}

fn placement(config: &Config) -> Vec<RunOptions> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let n = SERVERS.len();
    let dedicated = match config.placement.mode {
        Placement::Dedicated => true,
        Placement::Shared => false,
        Placement::Auto => cores > n,
    };
    let park = Duration::from_millis(config.placement.park_timeout_ms.max(1));
    let chosen: Vec<usize> = SERVERS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            config.server(name).core.unwrap_or(if dedicated {
                (i + 1) % cores
            } else {
                i % cores
            })
        })
        .collect();
    chosen
        .iter()
        .map(|&core| {
            let shared = chosen.iter().filter(|&&c| c == core).count() > 1;
            let spin = if dedicated {
                SpinPolicy::never_park()
            } else if shared {
                // Sharing a core with another server: never spin, yield briefly, then park.
                SpinPolicy::yield_then_park(Duration::from_micros(config.placement.spin_us))
            } else {
                SpinPolicy::spin_for(Duration::from_micros(config.placement.spin_us))
            };
            RunOptions {
                core: Some(core),
                spin,
                park_timeout: park,
                standby: false,
            }
        })
        .collect()
}

fn server_env(config: &Config, name: &str) -> Vec<(String, String)> {
    let mut env = vec![(
        "KEEPNET_LOG".to_string(),
        config
            .server(name)
            .log
            .clone()
            .unwrap_or_else(|| "info".into()),
    )];
    match name {
        "driver" => env.push((
            "KEEPNET_DRIVER_CONFIG".into(),
            match config.link.backend {
                crate::config::LinkBackend::Tap => serde_json::json!({"backend": "tap"}),
                crate::config::LinkBackend::Wire => {
                    let mut j = serde_json::json!({
                        "backend": "wire",
                        "side": match config.link.wire_side {
                            crate::config::WireSide::A => "a",
                            crate::config::WireSide::B => "b",
                        },
                    });
                    if let Some(f) = &config.link.wire_faults {
                        j["faults"] = serde_json::to_value(f).unwrap_or_default();
                    }
                    j
                }
            }
            .to_string(),
        )),
        "udp" => env.push((
            "KEEPNET_UDP_CONFIG".into(),
            serde_json::json!({"addr": config.ip.addr.addr.to_string()}).to_string(),
        )),
        "tcp" => env.push((
            "KEEPNET_TCP_CONFIG".into(),
            serde_json::json!({
                "addr": config.ip.addr.addr.to_string(),
                "mss": config.link.mtu.saturating_sub(40).clamp(536, 9000),
                "time_wait_ms": config.tcp.time_wait_ms,
                "cc": config.tcp.cc,
                "backlog": config.tcp.backlog,
            })
            .to_string(),
        )),
        _ => env.push((
            "KEEPNET_IP_CONFIG".into(),
            serde_json::json!({
                "mac": config.ip.mac.to_string(),
                "addr": config.ip.addr.to_string(),
                "gateway": config.ip.gateway.map(|g| g.to_string()),
                "mtu": config.link.mtu,
            })
            .to_string(),
        )),
    }
    env
}

impl Daemon {
    /// Creates the lab, the regions and the TAP, and starts every server. On error, whatever
    /// was made is removed again (by Drop).
    pub fn start(opts: Options) -> Result<Daemon, DaemonError> {
        let config = opts.config.clone();
        let run_dir = super::run_dir(&config.instance);
        std::fs::create_dir_all(&run_dir).map_err(io(format!("create {}", run_dir.display())))?;
        let binaries: Vec<PathBuf> = SERVERS
            .iter()
            .map(|n| binary_for(&config, n))
            .collect::<Result<_, _>>()?;

        let mut created_netns = false;
        if let Some(ns) = &opts.netns {
            created_netns = lab::netns_ensure(ns)?;
            lab::enter_netns(ns)?;
        }
        let link = Link::create(&format!("{}-link", config.instance), config.link.frames)
            .map_err(|e| DaemonError::Shm(e.to_string()))?;
        let driver_bell = keepnet_ipc::new_eventfd().map_err(io("eventfd"))?;
        let udp_bell = keepnet_ipc::new_eventfd().map_err(io("eventfd"))?;
        let udp_link = TransportLink::create(
            &format!("{}-transport.udp", config.instance),
            17,
            UDP,
            TransportLink::DEFAULT_BUFFERS,
        )
        .map_err(|e| DaemonError::Shm(e.to_string()))?;
        let udp_state = keepnet_udp::state::SocketTable::create(
            &format!("{}-udp.state", config.instance),
            UDP_SOCKETS,
        )
        .map_err(|e| DaemonError::Shm(e.to_string()))?;
        let tcp_bell = keepnet_ipc::new_eventfd().map_err(io("eventfd"))?;
        let tcp_link = TransportLink::create(
            &format!("{}-transport.tcp", config.instance),
            6,
            TCP,
            TCP_TRANSPORT_BUFFERS,
        )
        .map_err(|e| DaemonError::Shm(e.to_string()))?;
        let tcp_state = TcpState::create(
            &format!("{}-tcp.state", config.instance),
            Geometry {
                conns: config.tcp.max_connections,
                listeners: config.tcp.max_listeners,
                sndbuf: config.tcp.sndbuf,
                rcvbuf: config.tcp.rcvbuf,
            },
        )
        .map_err(|e| DaemonError::Shm(format!("tcp state table: {e}")))?;
        let apps = vec![
            Apps::new(17, UDP, "udp", AppLink::DEFAULT_TX, AppLink::DEFAULT_RX)
                .map_err(io("hotplug socket pair"))?,
            Apps::new(6, TCP, "tcp", TCP_APP_BUFFERS.0, TCP_APP_BUFFERS.1)
                .map_err(io("hotplug socket pair"))?,
        ];
        let services = config
            .services
            .iter()
            .cloned()
            .map(ServiceProc::new)
            .collect();
        let mut d = Daemon {
            opts,
            started: Instant::now(),
            started_unix_ms: unix_ms(),
            adopted: None,
            link,
            udp_link,
            udp_state,
            tap: None,
            wire: None,
            wire_bells: None,
            driver_bell,
            udp_bell,
            tcp_link,
            tcp_state,
            tcp_bell,
            apps,
            services,
            servers: Vec::new(),
            created_netns,
            listener: None,
            run_dir,
            last_restart_all: None,
            last_watch: Instant::now(),
            disowned: false,
            lock: None,
            update: None,
            leftovers: Vec::new(),
        };

        if config.link.backend == crate::config::LinkBackend::Wire {
            let (wire, bells) = join_wire(&config)?;
            d.wire = Some(wire);
            d.wire_bells = Some(bells);
        } else {
            d.make_tap(&config)?;
        }

        let opts_per_server = placement(&config);
        for ((name, binary), run) in SERVERS.iter().zip(binaries).zip(opts_per_server) {
            let mut control =
                ControlBlock::create(name, 1 << 20).map_err(|e| DaemonError::Shm(e.to_string()))?;
            let bell = match *name {
                "driver" => Some(&d.driver_bell),
                "udp" => Some(&d.udp_bell),
                "tcp" => Some(&d.tcp_bell),
                _ => None,
            };
            if let Some(bell) = bell {
                let efd = bell.try_clone().map_err(io("dup eventfd"))?;
                control = control.with_bell_eventfd(efd);
            }
            d.servers
                .push(ServerProc::new(name, binary, control, run, &config)?);
        }
        for i in 0..d.servers.len() {
            d.spawn(i)?;
            d.wait_ready(i, Duration::from_secs(15))?;
            let s = &mut d.servers[i];
            s.phase = Phase::Up;
            s.beat = (s.control.heartbeat(), Instant::now());
        }

        d.bind_control_socket()?;
        d.write_state()?;
        info!(instance = %config.instance, netns = ?d.opts.netns, "constellation up");
        Ok(d)
    }

    /// What `up` starts: re-adopts the constellation of the instance if its supervisor died
    /// and its servers live (see [`adopt`]), else a fresh one. Never a second constellation
    /// on top of a live one.
    pub fn start_or_adopt(opts: Options) -> Result<Daemon, DaemonError> {
        let instance = opts.config.instance.clone();
        let lock = super::try_lock(&instance)
            .map_err(io(format!(
                "lock {}",
                super::lock_path(&instance).display()
            )))?
            .ok_or_else(|| DaemonError::Running {
                pid: std::fs::read_to_string(super::state_path(&instance))
                    .ok()
                    .and_then(|t| serde_json::from_str::<StateFile>(&t).ok())
                    .map_or(0, |st| st.supervisor_pid),
                instance: instance.clone(),
            })?;
        let mut d = match adopt::survey(&opts.config)? {
            adopt::Survey::Adopt(st) => Daemon::adopt(opts, *st)?,
            adopt::Survey::Fresh => Daemon::start(opts)?,
        };
        d.lock = Some(lock);
        Ok(d)
    }

    /// Set when this daemon re-adopted a running constellation: which servers (pids), for
    /// the line `keepnet up` prints.
    pub fn adopted(&self) -> Option<&str> {
        self.adopted.as_deref()
    }

    /// Binds the control socket (any stale one of a dead supervisor is replaced).
    fn bind_control_socket(&mut self) -> Result<(), DaemonError> {
        let sock = super::socket_path(&self.opts.config.instance);
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io(format!("bind {}", sock.display())))?;
        listener.set_nonblocking(true).map_err(io("socket"))?;
        // Any local user may attach an application; everything else is checked per request
        // against the caller's credentials (see `handle`).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))
                .map_err(io(format!("chmod {}", sock.display())))?;
        }
        self.listener = Some(listener);
        Ok(())
    }

    /// The TAP device: the daemon holds it, so a driver crash never takes it away.
    fn make_tap(&mut self, config: &Config) -> Result<(), DaemonError> {
        let tap = &config.link.tap;
        if lab::link_exists(tap) {
            return Err(DaemonError::Tap {
                tap: tap.clone(),
                message: "a network device of that name already exists here (another keepnet instance? `keepnet down`, or set link.tap)".into(),
            });
        }
        let t = keepnet_driver::tap::Tap::create(tap, config.link.mtu, None).map_err(|e| {
            DaemonError::Tap {
                tap: tap.clone(),
                message: e.to_string(),
            }
        })?;
        // Keep a duplicate (same open file description): the device lives as long as it does.
        self.tap = Some(t.fd().try_clone_to_owned().map_err(io("dup the TAP fd"))?);
        drop(t);
        lab::ip(&[
            "addr",
            "add",
            &config.link.kernel_addr.to_string(),
            "dev",
            tap,
        ])?;
        Ok(())
    }

    fn log_file(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.log"))
    }

    fn control_region(&self, name: &str) -> Option<keepnet_ipc::Region> {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.control.region().clone())
    }

    fn spawn(&mut self, i: usize) -> Result<(), DaemonError> {
        let binary = self.servers[i].binary.clone();
        let mut cmd = self.command(i, &binary, false)?;
        let s = &self.servers[i];
        let child = cmd
            .spawn()
            .map_err(io(format!("start {}", s.binary.display())))?;
        info!(server = s.name, pid = child.id(), "started");
        let s = &mut self.servers[i];
        s.pidfd = match pidfd_open(child.id()) {
            Ok(fd) => Some(fd),
            Err(e) => {
                // SIGCHLD still wakes the loop; only the pidfd's directness is lost.
                warn!(server = s.name, %e, "pidfd_open failed; watching through SIGCHLD only");
                None
            }
        };
        s.start = procs::start_time(child.id()).unwrap_or(0);
        s.exe = None;
        s.child = Some(Proc::Child(child));
        s.started = Instant::now();
        s.phase = Phase::Starting;
        // On disk at once: a supervisor that dies now leaves its successor this pid.
        if let Err(e) = self.write_state() {
            warn!(%e, "could not write the state file");
        }
        Ok(())
    }

    /// The command that starts server `i` from `binary`, with its regions, fds, environment,
    /// log and priority; in standby (a live update) when `standby` is set.
    fn command(&self, i: usize, binary: &Path, standby: bool) -> Result<Command, DaemonError> {
        let ip_region = self.control_region("ip");
        let driver_region = self.control_region("driver");
        let udp_region = self.control_region("udp");
        let tcp_region = self.control_region("tcp");
        let log = self.log_file(self.servers[i].name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("open {}", log.display())))?;
        let err = out.try_clone().map_err(io("dup log"))?;
        let s = &self.servers[i];
        let opts = RunOptions {
            standby,
            ..s.opts.clone()
        };
        // A standby transport server maps the live applications' regions ahead (`app.ID`):
        // it takes them over from the hotplug socket after the handover, and finds them
        // mapped then.
        let app_regions: Vec<(String, keepnet_ipc::Region)> = if standby {
            self.apps
                .iter()
                .filter(|set| set.label == s.name)
                .flat_map(|set| set.conns.values())
                .map(|c| (format!("app.{}", c.app), c.link.region().clone()))
                .collect()
        } else {
            Vec::new()
        };
        let mut cmd = Command::new(binary);
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .envs(s.env.iter().map(|(k, v)| (k, v)));
        let link = self.link.region().clone();
        match s.name {
            "driver" => {
                let mut regions = vec![("link", &link)];
                if let Some(r) = &ip_region {
                    regions.push(("peer.ip", r));
                }
                if let Some(w) = &self.wire {
                    regions.push(("wire", w.region()));
                }
                let tap = self.tap.as_ref().map(|t| t.as_fd());
                let mut fds = vec![("bell", self.driver_bell.as_fd())];
                if let Some(t) = tap {
                    fds.push(("tap", t));
                }
                if let Some((a, b)) = &self.wire_bells {
                    let (mine, peer) = match self.opts.config.link.wire_side {
                        crate::config::WireSide::A => (a, b),
                        crate::config::WireSide::B => (b, a),
                    };
                    fds.push(("wire.rx", mine.as_fd()));
                    fds.push(("wire.peer", peer.as_fd()));
                }
                boot::prepare_with_fds(&mut cmd, &s.control, &regions, &fds, &opts);
            }
            "udp" => {
                let mut regions = vec![
                    ("transport.udp", self.udp_link.region()),
                    ("udp.state", self.udp_state.region()),
                ];
                if let Some(r) = &ip_region {
                    regions.push(("peer.ip", r));
                }
                for (n, r) in &app_regions {
                    regions.push((n.as_str(), r));
                }
                let fds = [
                    ("bell", self.udp_bell.as_fd()),
                    ("hotplug", self.apps[UDP_APPS].server_end()),
                    ("hotplug.supervisor", self.apps[UDP_APPS].supervisor_end()),
                ];
                boot::prepare_with_fds(&mut cmd, &s.control, &regions, &fds, &opts);
            }
            "tcp" => {
                let mut regions = vec![
                    ("transport.tcp", self.tcp_link.region()),
                    ("tcp.state", self.tcp_state.region()),
                ];
                if let Some(r) = &ip_region {
                    regions.push(("peer.ip", r));
                }
                for (n, r) in &app_regions {
                    regions.push((n.as_str(), r));
                }
                let fds = [
                    ("bell", self.tcp_bell.as_fd()),
                    ("hotplug", self.apps[TCP_APPS].server_end()),
                    ("hotplug.supervisor", self.apps[TCP_APPS].supervisor_end()),
                ];
                boot::prepare_with_fds(&mut cmd, &s.control, &regions, &fds, &opts);
            }
            _ => {
                let mut regions = vec![
                    ("link", &link),
                    ("transport.udp", self.udp_link.region()),
                    ("transport.tcp", self.tcp_link.region()),
                ];
                if let Some(r) = &driver_region {
                    regions.push(("peer.driver", r));
                }
                if let Some(r) = &udp_region {
                    regions.push(("peer.udp", r));
                }
                if let Some(r) = &tcp_region {
                    regions.push(("peer.tcp", r));
                }
                let fds = [
                    ("bell.driver", self.driver_bell.as_fd()),
                    ("bell.udp", self.udp_bell.as_fd()),
                    ("bell.tcp", self.tcp_bell.as_fd()),
                ];
                boot::prepare_with_fds(&mut cmd, &s.control, &regions, &fds, &opts);
            }
        }
        // Servers run at `placement.nice` (config docs): on a busy, oversubscribed machine a
        // server's work, its death and its successor's start would otherwise queue behind
        // applications for whole time slices, and recovery time is blackout time.
        {
            let nice: libc::c_int = self.opts.config.placement.nice;
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setpriority(2), which is async-signal-safe; its failure (no CAP_SYS_NICE) is
            // ignored: the server then starts at normal priority.
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    fn wait_ready(&mut self, i: usize, limit: Duration) -> Result<(), DaemonError> {
        let end = Instant::now() + limit;
        let log = self.log_file(self.servers[i].name);
        let s = &mut self.servers[i];
        let pid = s.pid();
        loop {
            if s.control.state() == Some(ServerState::Running) && s.control.pid() == pid {
                s.exe = procs::exe(pid);
                return Ok(());
            }
            if let Some(Proc::Child(child)) = s.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let tail = std::fs::read_to_string(&log).unwrap_or_default();
                    let last: Vec<&str> = tail.lines().rev().take(3).collect();
                    return Err(DaemonError::NotReady {
                        name: s.name.into(),
                        why: format!(
                            "exited with {status}: {}",
                            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
                        ),
                        log,
                    });
                }
            }
            if Instant::now() >= end {
                return Err(DaemonError::NotReady {
                    name: s.name.into(),
                    why: format!("not running after {limit:?}"),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the state file says now (see [`StateFile`]).
    fn state_file(&self) -> StateFile {
        let now_ms = unix_ms();
        let now = Instant::now();
        let ago_ms = |t: Instant| now.saturating_duration_since(t).as_millis() as u64;
        StateFile {
            instance: self.opts.config.instance.clone(),
            supervisor_pid: std::process::id(),
            netns: self.opts.netns.clone(),
            created_netns: self.created_netns,
            tap: self.opts.config.link.tap.clone(),
            servers: self
                .servers
                .iter()
                .map(|s| (s.name.to_string(), s.pid()))
                .collect(),
            supervisor_start: procs::start_time(std::process::id()).unwrap_or(0),
            started_unix_ms: self.started_unix_ms,
            procs: self
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| ServerRecord {
                    name: s.name.to_string(),
                    pid: s.pid(),
                    start: if s.pid() == 0 { 0 } else { s.start },
                    binary: s.binary.to_string_lossy().into_owned(),
                    exe: s
                        .exe
                        .as_ref()
                        .map(|e| e.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                    last_recovery_us: s.last_recovery_us,
                    phase: match &s.phase {
                        Phase::Starting => "starting",
                        Phase::Up => "up",
                        Phase::Backoff { .. } => "backoff",
                        Phase::Queued => "restarting",
                        Phase::Failed(_) => "failed",
                        Phase::Stopped(_) => "stopped",
                    }
                    .to_string(),
                    detail: match &s.phase {
                        Phase::Failed(why) | Phase::Stopped(why) => Some(why.clone()),
                        _ => None,
                    },
                    failed_starts: s.failed_starts,
                    restart_times_unix_ms: s
                        .history
                        .iter()
                        .map(|&t| now_ms.saturating_sub(ago_ms(t)))
                        .collect(),
                    last_update: s.last_update.clone(),
                    update_pids: self
                        .update
                        .as_ref()
                        .map(|u| u.pids())
                        .filter(|p| p.0 == i)
                        .map(|(_, old, new, fallback)| vec![old, new, fallback])
                        .unwrap_or_default(),
                    update_binary: self
                        .update
                        .as_ref()
                        .filter(|u| u.pids().0 == i)
                        .map(|u| u.binary().display().to_string()),
                })
                .collect(),
            apps: self
                .apps
                .iter()
                .flat_map(|set| {
                    set.conns.values().map(|c| AppRecord {
                        app: c.app,
                        pid: c.pid,
                        start: c.start,
                        uid: c.uid,
                        protocol: set.protocol,
                        region: super::apps::memfd_of(&super::apps::region_name(
                            &self.opts.config.instance,
                            set.label,
                            c.app,
                        )),
                    })
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|s| ServiceRecord {
                    name: s.cfg.name.clone(),
                    pid: s.pid().unwrap_or(0),
                    start: if s.pid().is_some() { s.start } else { 0 },
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                })
                .collect(),
            next_app: self
                .apps
                .iter()
                .map(|set| (set.label.to_string(), set.next_id()))
                .collect(),
        }
    }

    /// Writes the state file: a temporary file renamed over the old one, so a supervisor
    /// killed in the middle leaves a whole file, old or new.
    fn write_state(&self) -> Result<(), DaemonError> {
        let st = self.state_file();
        let path = super::state_path(&self.opts.config.instance);
        let tmp = path.with_extension("json.tmp");
        let text =
            serde_json::to_string_pretty(&st).map_err(|e| DaemonError::Shm(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io(format!("write {}", path.display())))
    }

    /// The status report.
    pub fn status(&self) -> StatusReport {
        StatusReport {
            instance: self.opts.config.instance.clone(),
            supervisor_pid: std::process::id(),
            netns: self.opts.netns.clone(),
            tap: self.opts.config.link.tap.clone(),
            keepnet_addr: self.opts.config.ip.addr.to_string(),
            kernel_addr: self.opts.config.link.kernel_addr.to_string(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            servers: self
                .servers
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let updating = self
                        .update
                        .as_ref()
                        .filter(|u| u.pids().0 == i)
                        .map(|u| u.describe());
                    server_status(s, updating)
                })
                .collect(),
            services: self
                .services
                .iter()
                .map(|s| ServiceStatus {
                    name: s.cfg.name.clone(),
                    pid: s.pid().unwrap_or(0),
                    state: match (&s.child, s.ready) {
                        (Some(_), true) => "running",
                        (Some(_), false) => "starting",
                        (None, _) => "restarting",
                    }
                    .into(),
                    restarts: s.restarts,
                    last_exit: s.last_exit.clone(),
                    uptime_s: s.started.elapsed().as_secs_f64(),
                })
                .collect(),
            apps: self
                .apps
                .iter()
                .flat_map(|set| {
                    set.conns.values().map(move |c| AppStatus {
                        app: c.app,
                        pid: c.pid,
                        uid: c.uid,
                        server: set.label.to_string(),
                        sockets: if set.protocol == 17 {
                            self.udp_state.app_socket_count(c.app)
                        } else {
                            self.tcp_sockets_of(c.app)
                        },
                    })
                })
                .collect(),
        }
    }

    /// Serves the control socket and watches the servers until `down` or a signal. Starts
    /// the services first; `ready` is called once, when every service has attached and bound
    /// a socket (Ok) or could not (Err, and `serve` returns).
    pub fn serve(&mut self, ready: impl FnOnce(Result<(), String>)) -> Result<(), DaemonError> {
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
        ] {
            mask.add(s);
        }
        mask.thread_block()
            .map_err(|e| io("block signals")(e.into()))?;
        let sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| io("signalfd")(e.into()))?;
        let instance = self.opts.config.instance.clone();
        for i in 0..self.services.len() {
            // A re-adopted service runs already; one that died while no supervisor watched
            // it starts through its restart.
            if self.services[i].child.is_some() || self.services[i].next_start.is_some() {
                continue;
            }
            let log = self.service_log(i);
            if let Err(e) = self.services[i].spawn(&instance, &log) {
                let msg = format!(
                    "service {} could not start ({}): {e}",
                    self.services[i].cfg.name,
                    self.services[i].binary.display()
                );
                ready(Err(msg.clone()));
                return Err(DaemonError::Shm(msg));
            }
        }
        if let Err(e) = self.write_state() {
            warn!(%e, "could not write the state file");
        }
        let mut ready = Some(ready);
        let services_deadline = Instant::now() + SERVICES_READY;
        loop {
            self.update_service_readiness();
            if ready.is_some() {
                if self.services.iter().all(|s| s.ready) {
                    info!("services ready");
                    if let Some(r) = ready.take() {
                        r(Ok(()));
                    }
                } else if Instant::now() >= services_deadline {
                    let late: Vec<String> = self
                        .services
                        .iter()
                        .filter(|s| !s.ready)
                        .map(|s| {
                            format!(
                                "{} (log: {})",
                                s.cfg.name,
                                self.run_dir
                                    .join(format!("service-{}.log", s.cfg.name))
                                    .display()
                            )
                        })
                        .collect();
                    let msg = format!(
                        "services not ready after {SERVICES_READY:?}: {}",
                        late.join(", ")
                    );
                    if let Some(r) = ready.take() {
                        r(Err(msg.clone()));
                    }
                    return Err(DaemonError::Shm(msg));
                }
            }
            let busy = ready.is_some()
                || self
                    .services
                    .iter()
                    .any(|s| s.next_start.is_some() || !s.ready);
            // Per application, its control connection (EOF detaches it) or, for one re-adopted
            // from a supervisor that died, its pidfd (its exit detaches it).
            let app_fds: Vec<std::os::fd::RawFd> = self
                .apps
                .iter()
                .flat_map(|set| set.conns.values())
                .filter_map(|c| c.watch_fd())
                .map(|fd| std::os::fd::AsRawFd::as_raw_fd(&fd))
                .collect();
            let (signalled, connected, hung_up) = {
                use nix::poll::{PollFd, PollFlags};
                let mut pfds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
                let listener = self.listener.as_ref();
                if let Some(l) = listener {
                    pfds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                }
                // A server's exit wakes the loop at once through its pidfd (and SIGCHLD).
                for fd in self.servers.iter().filter_map(|s| s.pidfd.as_ref()) {
                    pfds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                }
                // So does a service's (a re-adopted one is not our child: no SIGCHLD).
                for fd in self.services.iter().filter_map(|s| s.pidfd.as_ref()) {
                    pfds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                }
                let base = pfds.len();
                let conns: Vec<std::os::fd::BorrowedFd<'_>> = self
                    .apps
                    .iter()
                    .flat_map(|set| set.conns.values())
                    .filter_map(|c| c.watch_fd())
                    .collect();
                for c in &conns {
                    pfds.push(PollFd::new(*c, PollFlags::POLLIN));
                }
                let mut wait = Duration::from_millis(if busy { 20 } else { 1000 });
                if let Some(w) = self.watch_timeout() {
                    wait = wait.min(w);
                }
                let ts = nix::sys::time::TimeSpec::from_duration(wait);
                let _ = nix::poll::ppoll(&mut pfds, Some(ts), None);
                let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
                let hung: Vec<std::os::fd::RawFd> = pfds[base..]
                    .iter()
                    .zip(&app_fds)
                    .filter(|(p, _)| ready(p))
                    .map(|(_, fd)| *fd)
                    .collect();
                (ready(&pfds[0]), listener.is_some() && ready(&pfds[1]), hung)
            };
            if signalled {
                while let Ok(Some(info)) = sfd.read_signal() {
                    let sig = info.ssi_signo as i32;
                    if sig == Signal::SIGCHLD as i32 {
                        continue;
                    }
                    info!(signal = sig, "stopping on signal");
                    return Ok(());
                }
            }
            self.watch_servers();
            let mut changed = false;
            for i in 0..self.services.len() {
                changed |= self.services[i].reap();
                let log = self.service_log(i);
                changed |= self.services[i].restart_if_due(&instance, &log);
            }
            if changed {
                if let Err(e) = self.write_state() {
                    warn!(%e, "could not write the state file");
                }
            }
            for fd in hung_up {
                self.app_readable(fd);
            }
            if connected {
                let mut streams = Vec::new();
                if let Some(l) = &self.listener {
                    while let Ok((stream, _)) = l.accept() {
                        streams.push(stream);
                    }
                }
                for stream in streams {
                    if self.handle(stream) {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn service_log(&self, i: usize) -> PathBuf {
        self.run_dir
            .join(format!("service-{}.log", self.services[i].cfg.name))
    }

    /// A service is ready once an application with its pid attached and bound a socket.
    fn update_service_readiness(&mut self) {
        for svc in &mut self.services {
            if svc.ready {
                continue;
            }
            let Some(pid) = svc.pid() else { continue };
            let bound = self.apps.iter().any(|set| {
                set.conns.values().any(|c| {
                    c.pid == pid
                        && if set.protocol == 17 {
                            self.udp_state.app_has_socket(c.app)
                        } else {
                            self.tcp_state.app_has_listener(c.app)
                        }
                })
            });
            svc.ready = bound;
        }
    }

    /// Sockets (listeners and connections) application `app` holds on the tcp server.
    fn tcp_sockets_of(&self, app: u32) -> usize {
        let g = self.tcp_state.geometry();
        let listeners = (0..g.listeners)
            .filter(|&i| {
                let m = self.tcp_state.listen_meta(i);
                m.used == 1 && m.app == app
            })
            .count();
        let conns = (0..g.conns)
            .filter(|&i| {
                let m = self.tcp_state.conn_meta(i);
                m.used == 1 && m.app == app
            })
            .count();
        listeners + conns
    }

    /// Watches the servers: reaps those that exited (a pidfd or SIGCHLD woke the loop),
    /// kills those whose heartbeat stopped, starts those whose backoff ran out or whose turn
    /// in a restart-all came, and notices restarted ones running. Never waits on a child.
    fn watch_servers(&mut self) {
        self.poll_update();
        for i in 0..self.servers.len() {
            if self.updating(i) {
                continue;
            }
            let s = &mut self.servers[i];
            let exited = match s.child.as_mut() {
                Some(c) => c.try_exit(s.pidfd.as_ref()),
                None => None,
            };
            if let Some(status) = exited {
                self.on_exit(i, status);
            }
        }
        let now = Instant::now();
        let gap = now.duration_since(self.last_watch);
        self.last_watch = now;
        for s in &mut self.servers {
            // The daemon did not look for longer than a heartbeat period (it was starved
            // itself, or busy): what it did not watch does not count against the servers.
            if gap > s.sup.heartbeat {
                if let Some(t) = now.checked_sub(s.sup.heartbeat) {
                    s.beat.1 = s.beat.1.max(t);
                }
                s.beat_wait = None;
            }
        }
        for i in 0..self.servers.len() {
            if self.updating(i) {
                continue;
            }
            match self.servers[i].phase.clone() {
                Phase::Starting => self.check_starting(i, now),
                Phase::Up => self.check_heartbeat(i, now),
                Phase::Backoff { at } if at <= now => self.start_again(i),
                _ => {}
            }
        }
        // A restart-all starts the servers one at a time, in order, once the killed ones
        // are all reaped.
        let busy = self
            .servers
            .iter()
            .any(|s| s.phase == Phase::Starting || (s.doom.is_some() && s.child.is_some()));
        if !busy {
            if let Some(i) = self.servers.iter().position(|s| s.phase == Phase::Queued) {
                self.start_again(i);
            }
        }
    }

    /// How long the loop may sleep before the next look at the servers.
    fn watch_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut t: Option<Duration> = None;
        let mut at_most = |d: Duration| t = Some(t.map_or(d, |t: Duration| t.min(d)));
        if self.update.is_some() {
            // An update's steps are a few hundred microseconds each.
            at_most(STARTING_POLL);
        }
        if !self.leftovers.is_empty() {
            at_most(Duration::from_millis(20));
        }
        for s in &self.servers {
            match &s.phase {
                Phase::Starting | Phase::Queued => at_most(STARTING_POLL),
                // Four looks per period: a hang is seen within 2.25 periods.
                Phase::Up => at_most((s.sup.heartbeat / 4).max(Duration::from_millis(1))),
                Phase::Backoff { at } => at_most(at.saturating_duration_since(now)),
                Phase::Failed(_) | Phase::Stopped(_) => {}
            }
        }
        t
    }

    /// Server `i` exited with `status` (None: a re-adopted server, not our child, whose
    /// status nobody can know): record it, free what it held, and restart it per its policy.
    fn on_exit(&mut self, i: usize, status: Option<ExitStatus>) {
        let now = Instant::now();
        let s = &mut self.servers[i];
        let pid = s.pid();
        s.child = None;
        s.pidfd = None;
        let doomed = s.doom.is_some();
        let how = status.map_or_else(|| procs::STATUS_UNKNOWN.to_string(), describe_exit);
        let reason = s.doom.take().unwrap_or_else(|| how.clone());
        // The outage began when it was seen, or when `keepnet kill` signalled it if that
        // came first (a stale kill, one that did not end the process, does not count).
        let mut since = s.outage_since.unwrap_or(now);
        let mut injected = false;
        if let Some((t, p)) = s.kill_sent.take() {
            if p == pid && now.duration_since(t) <= kill_memory(&s.sup) {
                since = since.min(t);
                injected = true;
            }
        }
        let ran = now.duration_since(s.started);
        if doomed {
            // Already reported as detected when the supervisor killed it.
            info!(server = s.name, pid, status = %how, "killed instance reaped");
        } else {
            warn!(
                server = s.name,
                pid,
                reason = %reason,
                ran_ms = ran.as_millis() as u64,
                "detected"
            );
        }
        s.last_exit = Some(reason);
        release_rings(&self.link, pid);
        release_transport(&self.udp_link, pid);
        release_transport(&self.tcp_link, pid);
        for c in self.apps.iter().flat_map(|set| set.conns.values()) {
            c.link.release_claims_of(pid);
        }
        let s = &mut self.servers[i];
        if s.phase == Phase::Queued {
            // Killed for a restart-all: it starts in its turn.
            s.outage_since = Some(since);
            return;
        }
        if s.sup.restart == RestartPolicy::Transient && status.and_then(|st| st.code()) == Some(0) {
            let why = "exited with code 0; restart = \"transient\": not restarted".to_string();
            info!(server = s.name, pid, "{why}");
            s.phase = Phase::Stopped(why.clone());
            s.outage_since = None;
            let name = s.name;
            if let Some(set) = self.apps.iter_mut().find(|set| set.label == name) {
                set.server_failed(&format!("stopped: {why}"));
            }
            let _ = self.write_state();
            return;
        }
        s.outage_since = Some(since);
        // A short run is a failed start, unless `keepnet kill` ended it: injected faults
        // are not a crash loop.
        if ran < s.sup.min_runtime && !injected {
            s.failed_starts = s.failed_starts.saturating_add(1);
        } else {
            s.failed_starts = 0;
        }
        self.schedule_restart(i, now);
    }

    /// Counts a restart of server `i` against its intensity and starts it now, after a
    /// backoff, or not at all (the limit).
    fn schedule_restart(&mut self, i: usize, now: Instant) {
        let s = &mut self.servers[i];
        let window = s.sup.window;
        while s
            .history
            .front()
            .is_some_and(|&t| now.duration_since(t) >= window)
        {
            s.history.pop_front();
        }
        if s.history.len() >= s.sup.max_restarts as usize {
            self.on_limit(i, now);
            return;
        }
        s.history.push_back(now);
        s.restarts += 1;
        let backoff = backoff(&s.sup, s.failed_starts);
        info!(
            server = s.name,
            attempt = s.failed_starts + 1,
            backoff_ms = backoff.as_millis() as u64,
            restarts = s.restarts,
            "restarting"
        );
        if backoff.is_zero() {
            self.start_again(i);
        } else {
            s.phase = Phase::Backoff { at: now + backoff };
        }
    }

    /// Server `i` restarted more often than its intensity allows.
    fn on_limit(&mut self, i: usize, now: Instant) {
        let s = &self.servers[i];
        let limit = format!(
            "{} restarts in {} s, limit reached",
            s.history.len(),
            s.sup.window.as_secs()
        );
        let again = self
            .last_restart_all
            .is_some_and(|t| now.duration_since(t) < s.sup.window);
        if s.sup.on_limit == OnLimit::RestartAll && !again {
            self.restart_all(i, &limit, now);
            return;
        }
        let why = if s.sup.on_limit == OnLimit::RestartAll {
            format!(
                "failed: {limit} again within {} s of a restart of every server; not restarting",
                s.sup.window.as_secs()
            )
        } else {
            format!("failed: {limit}; not restarting")
        };
        error!(server = s.name, reason = %why, "server failed");
        let (name, n, window) = (s.name, s.history.len(), s.sup.window.as_secs());
        self.servers[i].phase = Phase::Failed(why);
        // Its applications would wait for ever: their library fails their calls instead.
        if let Some(set) = self.apps.iter_mut().find(|set| set.label == name) {
            set.server_failed(&format!(
                "restart limit reached: {n} restarts in {window} s; not restarting"
            ));
        }
        let _ = self.write_state();
    }

    /// `on_limit = "restart-all"`: kills every live server and starts them all again in
    /// order (driver, ip, udp, tcp) on the same regions, each once the one before runs.
    fn restart_all(&mut self, trigger: usize, limit: &str, now: Instant) {
        let name = self.servers[trigger].name;
        error!(server = name, reason = %limit, "restart limit reached; restarting every server (on_limit = restart-all)");
        self.last_restart_all = Some(now);
        for s in &mut self.servers {
            s.history.clear();
            s.failed_starts = 0;
            s.restarts += 1;
            s.outage_since = Some(s.outage_since.unwrap_or(now));
            if s.child.is_some() {
                s.doom = Some(format!(
                    "killed by the supervisor: restart-all after {name} hit its restart limit"
                ));
                let _ = s.signal(Signal::SIGKILL);
            }
            s.phase = Phase::Queued;
        }
    }

    /// Starts server `i` again (after an exit, a backoff or in a restart-all). A failed spawn
    /// counts as a failed start.
    fn start_again(&mut self, i: usize) {
        if let Err(e) = self.spawn(i) {
            let s = &mut self.servers[i];
            error!(server = s.name, %e, "restart failed");
            s.last_exit = Some(format!("could not start: {e}"));
            s.failed_starts = s.failed_starts.saturating_add(1);
            self.schedule_restart(i, Instant::now());
        }
    }

    /// A server being started: running yet? (then it serves again); too slow? (killed).
    fn check_starting(&mut self, i: usize, now: Instant) {
        let s = &mut self.servers[i];
        let pid = s.pid();
        if pid == 0 || s.doom.is_some() {
            return;
        }
        if s.control.state() == Some(ServerState::Running) && s.control.pid() == pid {
            self.on_running(i, now);
            return;
        }
        if now.duration_since(s.started) >= START_LIMIT {
            let why = format!("not running {} s after its start", START_LIMIT.as_secs());
            warn!(server = s.name, pid, reason = %why, "detected");
            s.outage_since = Some(s.outage_since.unwrap_or(now));
            s.doom = Some(why);
            let _ = s.signal(Signal::SIGKILL);
        }
    }

    /// Server `i` runs again: record the recovery time, hand a transport server the live
    /// applications again, and say so.
    fn on_running(&mut self, i: usize, now: Instant) {
        let s = &mut self.servers[i];
        s.phase = Phase::Up;
        s.exe = procs::exe(s.pid());
        s.beat = (s.control.heartbeat(), now);
        s.beat_wait = None;
        let outage = s.outage_since.take();
        let recovery_us = outage.map(|t| now.duration_since(t).as_micros() as u64);
        // Where the time went: outage start to the spawn's return, then to running.
        let spawned_us = outage.map(|t| s.started.saturating_duration_since(t).as_micros() as u64);
        let boot_us = now.duration_since(s.started).as_micros() as u64;
        if recovery_us.is_some() {
            s.last_recovery_us = recovery_us;
        }
        let (name, pid, generation) = (s.name, s.pid(), s.control.generation().get());
        if let Some(set) = self.apps.iter_mut().find(|set| set.label == name) {
            // The fresh transport server maps every live application's region again.
            let servers = &mut self.servers;
            let mut drain = || hotplug_drain(&mut servers[i]);
            set.resend_all(&mut drain);
            // Applications told it had failed may use it again.
            set.server_back();
        }
        info!(
            server = name,
            pid,
            generation,
            recovery_us = recovery_us.unwrap_or(0),
            spawned_us = spawned_us.unwrap_or(0),
            boot_us,
            "serving again"
        );
        let _ = self.write_state();
    }

    /// A running server: has its heartbeat moved within 2 periods? If not, it is hung:
    /// killed, and restarted as after a crash.
    fn check_heartbeat(&mut self, i: usize, now: Instant) {
        let s = &mut self.servers[i];
        if s.doom.is_some() {
            return;
        }
        let Some(pid) = s.child.as_ref().map(Proc::id) else {
            return;
        };
        let beat = s.control.heartbeat();
        if beat != s.beat.0 {
            s.beat = (beat, now);
            s.beat_wait = None;
            return;
        }
        // Standing still. Time it spent runnable but waiting for a CPU (an oversubscribed
        // machine) is not silence of its own.
        let wait = run_queue_wait_ns(pid);
        if s.beat_wait.is_none() {
            s.beat_wait = wait;
        }
        let starved = match (s.beat_wait, wait) {
            (Some(a), Some(b)) => Duration::from_nanos(b.saturating_sub(a)),
            _ => Duration::ZERO,
        };
        let still = now.duration_since(s.beat.1);
        if still.saturating_sub(starved) < 2 * s.sup.heartbeat {
            return;
        }
        let why = if starved < Duration::from_millis(1) {
            format!("hung: no heartbeat for {} ms", still.as_millis())
        } else {
            format!(
                "hung: no heartbeat for {} ms ({} ms of it waiting for a CPU)",
                still.as_millis(),
                starved.as_millis()
            )
        };
        warn!(server = s.name, pid, reason = %why, stuck_in = %stuck_in(pid), "detected");
        let mut since = now;
        if let Some((t, p)) = s.kill_sent {
            if p == pid && now.duration_since(t) <= kill_memory(&s.sup) {
                since = since.min(t);
            }
        }
        s.outage_since = Some(since);
        s.doom = Some(why);
        let _ = s.signal(Signal::SIGKILL);
    }

    /// `keepnet kill SERVER [--signal SIG | --scribble]`.
    fn kill(&mut self, server: &str, signal: i32, scribble: bool) -> Result<String, String> {
        let Some(i) = self.servers.iter().position(|s| s.name == server) else {
            return Err(format!(
                "no server named {server:?}: use {}",
                SERVERS.join(", ")
            ));
        };
        let s = &mut self.servers[i];
        let pid = s.pid();
        if pid == 0 || s.doom.is_some() {
            return Err(format!(
                "{server} is not running (state {}); nothing to kill",
                s.state()
            ));
        }
        if scribble {
            if s.phase != Phase::Up {
                return Err(format!(
                    "{server} (pid {pid}) is {}, not running: it cannot take a scribble order now",
                    s.state()
                ));
            }
            s.seq = s.seq.wrapping_add(1);
            let msg = ControlMsg {
                value: u64::from(pid),
                ..ControlMsg::command(Cmd::Scribble, s.seq)
            };
            s.kill_sent = Some((Instant::now(), pid));
            if s.commands.push(msg).is_err() {
                s.kill_sent = None;
                return Err(format!("{server}'s command ring is full; try again"));
            }
            info!(
                server,
                pid, "fault injection: told it to scribble on its rings and abort"
            );
            return Ok(format!(
                "told {server} (pid {pid}) to scribble garbage on the rings it produces on and abort"
            ));
        }
        let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal"))?;
        s.kill_sent = Some((Instant::now(), pid));
        if let Err(e) = s.signal(sig) {
            s.kill_sent = None;
            return Err(format!(
                "kill {server} (pid {pid}) with {}: {e}",
                sig.as_str()
            ));
        }
        info!(
            server,
            pid,
            signal = sig.as_str(),
            "fault injection: signal sent"
        );
        Ok(format!("killed {server} (pid {pid}) with {}", sig.as_str()))
    }

    /// An application's control connection is readable: EOF (or an error) detaches it; any
    /// other bytes are ignored.
    fn app_readable(&mut self, fd: std::os::fd::RawFd) {
        let Some((k, app)) = self
            .apps
            .iter()
            .enumerate()
            .find_map(|(k, set)| set.by_fd(fd).map(|a| (k, a)))
        else {
            return;
        };
        let gone = {
            let Some(c) = self.apps[k].conns.get(&app) else {
                return;
            };
            match &c.stream {
                Some(stream) => {
                    let _ = stream.set_nonblocking(true);
                    let mut buf = [0u8; 256];
                    match (&*stream).read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => false,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    }
                }
                // Re-adopted: its pidfd turned readable, it exited.
                None => c.pidfd.as_ref().is_none_or(pidfd_exited),
            }
        };
        if gone {
            let label = self.apps[k].label;
            let server = self.servers.iter().position(|s| s.name == label);
            let (apps, servers) = (&mut self.apps, &mut self.servers);
            let mut drain = || server.is_some_and(|i| hotplug_drain(&mut servers[i]));
            apps[k].detach(app, &mut drain);
            if let Err(e) = self.write_state() {
                warn!(%e, "could not write the state file");
            }
        }
    }

    /// Handles one connection; returns true if the daemon must stop.
    fn handle(&mut self, stream: UnixStream) -> bool {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            return false;
        }
        let req: Request = match serde_json::from_str(line.trim()) {
            Ok(r) => r,
            Err(e) => {
                send(
                    &stream,
                    &Answer::Error {
                        message: format!("bad request: {e}"),
                    },
                    &[],
                );
                return false;
            }
        };
        // Attaching and reading the status are open to every local user; stopping the
        // constellation and mirroring its traffic are for root and the supervisor's own user.
        let privileged = matches!(
            req,
            Request::Down
                | Request::Link
                | Request::Wire
                | Request::Kill { .. }
                | Request::Update { .. }
        );
        if privileged {
            let uid =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|c| c.uid())
                    .unwrap_or(u32::MAX);
            if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
                send(
                    &stream,
                    &Answer::Error {
                        message: format!("permission denied: uid {uid} may attach applications and read the status, nothing more"),
                    },
                    &[],
                );
                return false;
            }
        }
        match req {
            Request::Status => {
                send(&stream, &Answer::Status(self.status()), &[]);
                false
            }
            Request::Link => {
                send(
                    &stream,
                    &Answer::Ok {
                        message: "link region".into(),
                    },
                    &[self.link.region().fd()],
                );
                false
            }
            Request::Attach { protocol } => {
                self.attach(stream, protocol);
                false
            }
            Request::Wire => {
                match (&self.wire, &self.wire_bells) {
                    (Some(w), Some((a, b))) => send(
                        &stream,
                        &Answer::Ok {
                            message: "wire region".into(),
                        },
                        &[w.region().fd(), a.as_fd(), b.as_fd()],
                    ),
                    _ => send(
                        &stream,
                        &Answer::Error {
                            message: "this instance has no memory wire (link.backend is tap)"
                                .into(),
                        },
                        &[],
                    ),
                }
                false
            }
            Request::Kill {
                server,
                signal,
                scribble,
            } => {
                let answer = match self.kill(&server, signal, scribble) {
                    Ok(message) => Answer::Ok { message },
                    Err(message) => Answer::Error { message },
                };
                send(&stream, &answer, &[]);
                false
            }
            Request::Update {
                server,
                binary,
                grace_ms,
                skip_check,
            } => {
                let req = UpdateRequest {
                    server,
                    binary: binary.map(PathBuf::from),
                    grace: grace_ms.map(Duration::from_millis),
                    skip_check,
                };
                self.begin_update(stream, req);
                false
            }
            Request::Down => {
                self.shutdown();
                send(
                    &stream,
                    &Answer::Ok {
                        message: "down".into(),
                    },
                    &[],
                );
                true
            }
        }
    }

    /// An application asks to attach: give it a region of its own (see `apps`).
    fn attach(&mut self, stream: UnixStream, protocol: u8) {
        let Some(k) = self.apps.iter().position(|set| set.protocol == protocol) else {
            let message = format!("protocol {protocol} is not served here (udp is 17, tcp is 6)");
            send(&stream, &Answer::Error { message }, &[]);
            return;
        };
        let label = self.apps[k].label;
        let Some(server) = self.servers.iter().position(|s| s.name == label) else {
            send(
                &stream,
                &Answer::Error {
                    message: format!("no {label} server in this constellation"),
                },
                &[],
            );
            return;
        };
        let answer_to = match stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                warn!(%e, "attach: cannot dup the connection");
                return;
            }
        };
        let instance = self.opts.config.instance.clone();
        let (apps, servers) = (&mut self.apps, &mut self.servers);
        let mut drain = || hotplug_drain(&mut servers[server]);
        match apps[k].attach(&instance, stream, &mut drain) {
            Ok(app) => {
                // On disk before the application hears of it: an application that got its
                // region is always in the state file (a supervisor that dies now leaves its
                // successor the application to watch).
                if let Err(e) = self.write_state() {
                    warn!(%e, "could not write the state file");
                }
                let Some(conn) = self.apps[k].conns.get(&app) else {
                    return;
                };
                let bell = if protocol == 17 {
                    self.udp_bell.as_fd()
                } else {
                    self.tcp_bell.as_fd()
                };
                let info = Attached {
                    app,
                    addr: self.opts.config.ip.addr.addr.to_string(),
                    mtu: self.opts.config.link.mtu,
                };
                send(
                    &answer_to,
                    &Answer::Attached(info),
                    &[conn.link.region().fd(), bell],
                );
            }
            Err(message) => {
                warn!(%message, "attach refused");
                send(&answer_to, &Answer::Error { message }, &[]);
            }
        }
    }

    /// Stops every server (politely, then by force) and removes what `up` made.
    pub fn shutdown(&mut self) {
        self.abandon_update();
        for svc in &mut self.services {
            svc.stop(Duration::from_secs(2));
        }
        for set in &mut self.apps {
            set.conns.clear();
        }
        for s in self.servers.iter_mut().rev() {
            let pidfd = s.pidfd.take();
            s.phase = Phase::Stopped("stopped by keepnet down".into());
            let Some(child) = s.child.take() else {
                continue;
            };
            s.seq = s.seq.wrapping_add(1);
            let polite = request(
                &mut s.commands,
                &mut s.replies,
                s.seq,
                Cmd::Stop,
                Duration::from_secs(2),
            );
            if let Err(RequestError::Timeout(_)) | Err(RequestError::Full) = polite {
                warn!(server = s.name, "no answer to stop; killing");
            }
            match child {
                Proc::Child(mut child) => procs::reap_within(&mut child, Duration::from_secs(2)),
                // Re-adopted: not our child, seen gone through its pidfd and killed through
                // it (never a reused pid).
                Proc::Adopted { pid } => {
                    if let Some(fd) = &pidfd {
                        if !procs::pidfd_wait(fd, Duration::from_secs(2)) {
                            let _ = procs::pidfd_send_signal(fd.as_fd(), Signal::SIGKILL);
                            procs::pidfd_wait(fd, Duration::from_secs(2));
                        }
                    }
                    // Its reaper is init: a moment for it, so `down` leaves nothing behind.
                    let end = Instant::now() + Duration::from_secs(1);
                    while procs::exists_as(pid, s.start) && Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
            info!(server = s.name, "stopped");
        }
        // Closing the TAP fd removes the (non-persistent) device and its address.
        self.tap = None;
        if self.created_netns {
            if let Some(ns) = &self.opts.netns {
                if let Err(e) = lab::netns_delete(ns) {
                    warn!(%e, "could not delete namespace");
                }
            }
            self.created_netns = false;
        }
        let _ = std::fs::remove_file(super::socket_path(&self.opts.config.instance));
        let _ = std::fs::remove_file(super::state_path(&self.opts.config.instance));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A re-adoption that failed half-way leaves the servers it found as they were.
        if self.disowned {
            return;
        }
        self.shutdown();
    }
}

/// Asks a transport server to read its hotplug socket and waits for the answer: at most
/// [`HOTPLUG_WAIT`], and not at all for a server that is not there or not starting or
/// running, nor past its death (its pidfd).
fn hotplug_drain(s: &mut ServerProc) -> bool {
    if s.child.is_none() || s.doom.is_some() || !matches!(s.phase, Phase::Up | Phase::Starting) {
        return false;
    }
    s.seq = s.seq.wrapping_add(1);
    let seq = s.seq;
    if s.commands
        .push(ControlMsg::command(Cmd::Hotplug, seq))
        .is_err()
    {
        return false;
    }
    let deadline = Instant::now() + HOTPLUG_WAIT;
    loop {
        loop {
            match s.replies.pop() {
                Ok(Some(r)) if r.seq == seq => return r.kind == ControlMsg::OK,
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return false,
            }
        }
        if Instant::now() >= deadline || s.pidfd.as_ref().is_some_and(pidfd_exited) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// The wait before restarting after `failed_starts` consecutive failed starts: none after a
/// healthy run, then `backoff_initial`, doubling, at most `backoff_max`.
fn backoff(sup: &Supervision, failed_starts: u32) -> Duration {
    if failed_starts == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failed_starts - 1).min(20);
    sup.backoff_initial
        .saturating_mul(factor)
        .min(sup.backoff_max)
}

/// How long a `keepnet kill` counts as the start of the outage it caused (a signal that did
/// not end the process is forgotten after this).
fn kill_memory(sup: &Supervision) -> Duration {
    (4 * sup.heartbeat).max(Duration::from_secs(5))
}

/// Frees transport ring sides a dead server held.
fn release_transport(t: &TransportLink, pid: u32) {
    for ring in [t.deliver(), t.send()].into_iter().flatten() {
        ring.release_claims_of(pid);
    }
    for ring in [t.deliver_return(), t.send_return()].into_iter().flatten() {
        ring.release_claims_of(pid);
    }
}

/// Frees ring sides a dead server held, so its successor can claim them at once.
fn release_rings(link: &Link, pid: u32) {
    for ring in [link.rx(), link.tx(), link.rx_return(), link.tx_return()]
        .into_iter()
        .flatten()
    {
        ring.release_claims_of(pid);
    }
    if let Ok(r) = link.capture() {
        r.release_claims_of(pid);
    }
}

fn server_status(s: &ServerProc, updating: Option<String>) -> ServerStatus {
    let c = &s.control;
    let mut drops = std::collections::BTreeMap::new();
    let mut counters = std::collections::BTreeMap::new();
    for (k, v) in c.counters() {
        match k.strip_prefix("drop.") {
            Some(reason) => {
                drops.insert(reason.to_string(), v);
            }
            None => {
                counters.insert(k, v);
            }
        }
    }
    let now = Instant::now();
    ServerStatus {
        name: s.name.into(),
        pid: s.pid(),
        core: c.core(),
        state: s.state(),
        generation: c.generation().get(),
        restarts: s.restarts,
        version: c.version(),
        uptime_s: s.started.elapsed().as_secs_f64(),
        heartbeat: c.heartbeat(),
        packets_in: counters
            .get("rx.frames")
            .or_else(|| counters.get("rx.datagrams"))
            .or_else(|| counters.get("rx.segments"))
            .copied()
            .unwrap_or(0),
        packets_out: counters
            .get("tx.frames")
            .or_else(|| counters.get("tx.datagrams"))
            .or_else(|| counters.get("tx.segments"))
            .copied()
            .unwrap_or(0),
        drops,
        counters,
        last_exit: s.last_exit.clone(),
        last_recovery_us: s.last_recovery_us,
        next_start_ms: match s.phase {
            Phase::Backoff { at } => Some(at.saturating_duration_since(now).as_millis() as u64),
            _ => None,
        },
        detail: match &s.phase {
            Phase::Backoff { at } => Some(format!(
                "backoff: {} failed start{} in a row (runs under {} ms); next start in {} ms",
                s.failed_starts,
                if s.failed_starts == 1 { "" } else { "s" },
                s.sup.min_runtime.as_millis(),
                at.saturating_duration_since(now).as_millis()
            )),
            Phase::Failed(why) | Phase::Stopped(why) => Some(why.clone()),
            Phase::Queued => Some("restarting with every other server (restart-all)".into()),
            Phase::Starting | Phase::Up => None,
        },
        heartbeat_ms: s.sup.heartbeat.as_millis() as u64,
        state_format: c.state_formats().map(|f| f.1),
        state_formats_read: c.state_formats().map(|(a, b)| format!("{a}-{b}")),
        last_update: s.last_update.clone(),
        updating,
    }
}

fn send(stream: &UnixStream, answer: &Answer, fds: &[std::os::fd::BorrowedFd<'_>]) {
    let mut text = serde_json::to_string(answer)
        .unwrap_or_else(|e| format!("{{\"result\":\"error\",\"message\":\"{e}\"}}"));
    text.push('\n');
    let r = if fds.is_empty() {
        (&*stream).write_all(text.as_bytes())
    } else {
        keepnet_ipc::fdpass::send_fds(stream, text.as_bytes(), fds)
    };
    if let Err(e) = r {
        warn!(%e, "could not answer a control request");
    }
}

/// Side a makes the memory wire; side b asks the instance named by `link.wire_peer` for its
/// wire over that instance's control socket.
fn join_wire(
    config: &Config,
) -> Result<(keepnet_driver::wire::Wire, (OwnedFd, OwnedFd)), DaemonError> {
    use keepnet_driver::wire::Wire;
    let shm = |e: keepnet_driver::wire::WireError| DaemonError::Shm(format!("memory wire: {e}"));
    match config.link.wire_side {
        crate::config::WireSide::A => {
            let wire = Wire::create(&format!("{}-wire", config.instance), 1024).map_err(shm)?;
            let a = keepnet_ipc::new_eventfd().map_err(io("eventfd"))?;
            let b = keepnet_ipc::new_eventfd().map_err(io("eventfd"))?;
            Ok((wire, (a, b)))
        }
        crate::config::WireSide::B => {
            let peer = config.link.wire_peer.clone().unwrap_or_default();
            let (ans, mut fds) = super::client::call(&peer, &Request::Wire).map_err(|e| {
                DaemonError::Shm(format!("joining the wire of instance {peer:?}: {e}"))
            })?;
            if let Answer::Error { message } = ans {
                return Err(DaemonError::Shm(format!(
                    "instance {peer:?} gave no wire: {message}"
                )));
            }
            if fds.len() != 3 {
                return Err(DaemonError::Shm(format!(
                    "instance {peer:?} sent {} fds for its wire, not 3",
                    fds.len()
                )));
            }
            let b = fds
                .pop()
                .ok_or_else(|| DaemonError::Shm("no wire eventfd".into()))?;
            let a = fds
                .pop()
                .ok_or_else(|| DaemonError::Shm("no wire eventfd".into()))?;
            let fd = fds
                .pop()
                .ok_or_else(|| DaemonError::Shm("no wire region".into()))?;
            let region = keepnet_ipc::Region::open(fd, keepnet_ipc::RegionKind::RINGS)
                .map_err(|e| DaemonError::Shm(format!("wire region: {e}")))?;
            Ok((Wire::open(region).map_err(shm)?, (a, b)))
        }
    }
}

/// Where a hung process is, for the log: its scheduler state, the kernel function it sleeps
/// in, and (for root) the top of its kernel stack.
fn stuck_in(pid: u32) -> String {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1.to_string();
            rest.split_whitespace().next().map(str::to_string)
        })
        .unwrap_or_else(|| "?".into());
    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    let stack: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/stack"))
        .unwrap_or_default()
        .lines()
        .take(4)
        .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
        .collect();
    format!(
        "state {state}, wchan {wchan:?}, stack [{}]",
        stack.join(" < ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_after_a_healthy_run_then_doubles_to_the_cap() {
        let sup = Supervision::default();
        let ms: Vec<u64> = (0..10)
            .map(|n| backoff(&sup, n).as_millis() as u64)
            .collect();
        assert_eq!(ms, [0, 50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(&sup, u32::MAX), Duration::from_millis(5000));
    }

    #[test]
    fn exits_are_described_plainly() {
        // Wait statuses as waitpid gives them: code << 8, or the signal number (| 0x80 for
        // a core dump).
        assert_eq!(
            describe_exit(ExitStatus::from_raw(1 << 8)),
            "exited with code 1"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(0)), "exited with code 0");
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(6 | 0x80)),
            "killed by signal 6 (SIGABRT), core dumped"
        );
    }

    #[test]
    fn a_pidfd_turns_readable_when_its_child_exits() {
        let mut child = Command::new("sleep")
            .arg("0.05")
            .spawn()
            .expect("spawn sleep");
        let fd = pidfd_open(child.id()).expect("pidfd_open");
        assert!(!pidfd_exited(&fd));
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let n = nix::poll::poll(&mut p, PollTimeout::from(5000u16)).expect("poll");
        assert_eq!(n, 1);
        assert!(pidfd_exited(&fd));
        assert!(child.wait().expect("wait").success());
        assert!(run_queue_wait_ns(std::process::id()).is_some());
    }
}
