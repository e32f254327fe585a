//! The TOML configuration. Every field has a default; unknown fields are errors that name the
//! line, so a typo never silently means "default".

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// An IPv4 address with a prefix length, written `198.18.0.2/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX (e.g. 198.18.0.2/24)"))?;
        let addr: Ipv4Addr = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
        let prefix: u8 = p.parse().map_err(|e| format!("prefix {p:?}: {e}"))?;
        if prefix > 32 {
            return Err(format!("prefix {prefix} is over 32"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A MAC address written `02:6b:6e:00:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

impl TryFrom<String> for Mac {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "{s:?} is not a MAC address (six hex bytes separated by ':')"
            ));
        }
        let mut m = [0u8; 6];
        for (d, p) in m.iter_mut().zip(parts) {
            *d =
                u8::from_str_radix(p, 16).map_err(|_| format!("{s:?}: {p:?} is not a hex byte"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("{s:?} is a multicast address"));
        }
        Ok(Mac(m))
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// How servers are placed on cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// One core per server and no parking if the machine has a core for every server and
    /// one to spare; otherwise shared.
    #[default]
    Auto,
    /// One core per server, spinning, never parking.
    Dedicated,
    /// Servers spread over the cores there are; a server that shares its core with another
    /// server parks at once, others spin briefly first.
    Shared,
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Instance name: names the runtime directory, so several instances can run at once.
    pub instance: String,
    pub link: LinkConfig,
    pub ip: IpConfig,
    pub placement: PlacementConfig,
    pub servers: ServersConfig,
    /// The tcp server's table and protocol settings.
    pub tcp: TcpSettings,
    /// Applications the supervisor starts once the servers are ready and restarts when they
    /// exit. Absent: the demo services (UDP echo on 7, UDP discard on 9). `services = []`:
    /// none.
    #[serde(default = "default_services")]
    pub services: Vec<ServiceConfig>,
}

/// One service: an application built on the sockets library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Name in `status` and in its log file (`service-NAME.log`).
    pub name: String,
    /// Binary; default: `keepnet-service` beside the `keepnet` executable.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Arguments (for `keepnet-service`: `udp-echo --port 7`, `udp-discard --port 9`).
    #[serde(default)]
    pub args: Vec<String>,
    /// Log filter (`info`, `debug`, ...).
    #[serde(default)]
    pub log: Option<String>,
}

/// The demo services.
pub fn default_services() -> Vec<ServiceConfig> {
    let svc = |name: &str, args: &[&str]| ServiceConfig {
        name: name.into(),
        binary: None,
        args: args.iter().map(|a| a.to_string()).collect(),
        log: None,
    };
    vec![
        svc("udp-echo", &["udp-echo", "--port", "7"]),
        svc("udp-discard", &["udp-discard", "--port", "9"]),
        svc("tcp-echo", &["tcp-echo", "--port", "7"]),
        svc("tcp-discard", &["tcp-discard", "--port", "9"]),
        svc("tcp-chargen", &["tcp-chargen", "--port", "19"]),
        svc("http", &["http", "--port", "80"]),
    ]
}

/// The TAP device and the kernel's side of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// TAP device name.
    pub tap: String,
    /// MTU of the link.
    pub mtu: u32,
    /// Address of the Linux kernel's side of the TAP.
    pub kernel_addr: Cidr,
    /// Frame buffers per pool.
    pub frames: u32,
    /// "tap" (a TAP device with the Linux kernel on the other side, the default) or "wire"
    /// (keepnet's memory wire to another keepnet instance, for tests: no TAP, no root).
    pub backend: LinkBackend,
    /// Wire only: side "a" makes the wire, side "b" joins the wire of `wire_peer`.
    pub wire_side: WireSide,
    /// Wire, side b: the instance whose wire to join (it must be up).
    pub wire_peer: Option<String>,
    /// Wire only: faults this side injects into what it sends, as the driver reads them:
    /// `{ seed = 7, loss = 0.02, duplicate = 0.0, reorder = 0.0, corrupt = 0.0, delay = 0.0,
    /// delay_us = 0, reorder_hold_us = 0 }` (unknown fields make the driver refuse to start).
    pub wire_faults: Option<toml::Table>,
}

/// The link backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LinkBackend {
    #[default]
    Tap,
    Wire,
}

/// Which end of the memory wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WireSide {
    #[default]
    A,
    B,
}

/// keepnet's own addresses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpConfig {
    /// keepnet's address on the link.
    pub addr: Cidr,
    /// keepnet's MAC address.
    pub mac: Mac,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// Core placement and parking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    pub mode: Placement,
    /// Spin budget (µs) before parking, for a server whose core no other server shares.
    pub spin_us: u64,
    /// Longest park (ms): bounds the heartbeat period of an idle server.
    pub park_timeout_ms: u64,
    /// Nice value the servers run at (-20 to 19; default -10). Like the kernel's own network
    /// stack, which runs before any process, the servers go before applications when both
    /// want a CPU: a packet is not left waiting behind a busy application for whole time
    /// slices, and neither is a server's restart after a crash. Needs root (CAP_SYS_NICE);
    /// without it the servers run at the supervisor's own priority.
    pub nice: i32,
}

/// Per-server settings. The watching and restart fields set here (`[servers]`) are the
/// defaults of every server; the same field in `[servers.NAME]` overrides it for one server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServersConfig {
    /// "permanent" (default: restart after every exit) or "transient" (restart only after an
    /// abnormal exit: a signal or a non-zero exit code).
    pub restart: Option<RestartPolicy>,
    /// Heartbeat period P in ms (default 250, at least `placement.park_timeout_ms`): a server
    /// whose heartbeat has not moved for 2P is hung; it is killed and restarted.
    pub heartbeat_ms: Option<u64>,
    /// A run shorter than this (ms, default 1000) counts as a failed start: consecutive
    /// failed starts back off.
    pub min_runtime_ms: Option<u64>,
    /// Wait before the second consecutive failed start (ms, default 50); doubled per further
    /// failed start. The first restart after a healthy run is immediate.
    pub backoff_initial_ms: Option<u64>,
    /// Longest wait between restarts (ms, default 5000).
    pub backoff_max_ms: Option<u64>,
    /// Restart intensity: at most this many restarts (default 10) ...
    pub max_restarts: Option<u32>,
    /// ... within this many seconds (default 60).
    pub window_s: Option<u64>,
    /// What happens past the limit: "stop" (default: the server stays down, state "failed")
    /// or "restart-all" (every server is restarted in order driver, ip, udp, tcp, on the same
    /// shared regions; once per window, after that "stop").
    pub on_limit: Option<OnLimit>,
    pub driver: ServerConfig,
    pub ip: ServerConfig,
    pub udp: ServerConfig,
    pub tcp: ServerConfig,
}

/// When a server that exited is started again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestartPolicy {
    /// After every exit.
    #[default]
    Permanent,
    /// Only after an abnormal exit (killed by a signal, or an exit code other than 0).
    Transient,
}

/// What the supervisor does when a server restarts more often than its intensity allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnLimit {
    /// Leave that server down (state "failed"); the others carry on.
    #[default]
    Stop,
    /// Restart every server, in order, on the same regions.
    RestartAll,
}

/// The watching and restart settings of one server, defaults applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Supervision {
    pub restart: RestartPolicy,
    pub heartbeat: Duration,
    pub min_runtime: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_restarts: u32,
    pub window: Duration,
    pub on_limit: OnLimit,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            restart: RestartPolicy::Permanent,
            heartbeat: Duration::from_millis(250),
            min_runtime: Duration::from_millis(1000),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(5000),
            max_restarts: 10,
            window: Duration::from_secs(60),
            on_limit: OnLimit::Stop,
        }
    }
}

/// `[tcp]`: the tcp server's state table (shared memory made by the supervisor) and
/// protocol settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpSettings {
    /// Connections the table holds at once (each: a 1 KiB slot plus its buffers).
    pub max_connections: u32,
    /// Listening sockets the table holds at once.
    pub max_listeners: u32,
    /// Send buffer per connection, bytes.
    pub sndbuf: u32,
    /// Receive buffer per connection, bytes (the largest window we offer).
    pub rcvbuf: u32,
    /// TIME-WAIT, milliseconds (RFC 9293 3.4.2: 2 MSL; 60 s as Linux).
    pub time_wait_ms: u64,
    /// Congestion control: "cubic" (RFC 9438) or "newreno" (RFC 5681, RFC 6582).
    pub cc: String,
    /// Accept queue of a listener that names none.
    pub backlog: u32,
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            max_connections: 16384,
            max_listeners: 64,
            sndbuf: 256 * 1024,
            rcvbuf: 256 * 1024,
            time_wait_ms: 60_000,
            cc: "cubic".into(),
            backlog: 128,
        }
    }
}

/// One server's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Binary to run; default: `keepnet-NAME` beside the `keepnet` executable.
    pub binary: Option<PathBuf>,
    /// Core to pin to; default: chosen by the placement.
    pub core: Option<usize>,
    /// Log filter for this server (`info`, `debug`, ...).
    pub log: Option<String>,
    /// Overrides of the `[servers]` watching and restart defaults (see [`ServersConfig`]).
    pub restart: Option<RestartPolicy>,
    pub heartbeat_ms: Option<u64>,
    pub min_runtime_ms: Option<u64>,
    pub backoff_initial_ms: Option<u64>,
    pub backoff_max_ms: Option<u64>,
    pub max_restarts: Option<u32>,
    pub window_s: Option<u64>,
    pub on_limit: Option<OnLimit>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            instance: "default".into(),
            link: LinkConfig::default(),
            ip: IpConfig::default(),
            placement: PlacementConfig::default(),
            servers: ServersConfig::default(),
            tcp: TcpSettings::default(),
            services: default_services(),
        }
    }
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            tap: "kn0".into(),
            mtu: 1500,
            kernel_addr: Cidr {
                addr: Ipv4Addr::new(198, 18, 0, 1),
                prefix: 24,
            },
            frames: 1024,
            backend: LinkBackend::Tap,
            wire_side: WireSide::A,
            wire_peer: None,
            wire_faults: None,
        }
    }
}

impl Default for IpConfig {
    fn default() -> Self {
        IpConfig {
            addr: Cidr {
                addr: Ipv4Addr::new(198, 18, 0, 2),
                prefix: 24,
            },
            mac: Mac([0x02, 0x6b, 0x6e, 0x00, 0x00, 0x02]),
            gateway: None,
        }
    }
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            mode: Placement::Auto,
            spin_us: 50,
            park_timeout_ms: 50,
            nice: -10,
        }
    }
}

/// The server names, in start order.
pub const SERVERS: [&str; 4] = ["driver", "ip", "udp", "tcp"];

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', "\n  "),
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.into(),
            field: field.to_string(),
            message,
        };
        if self.instance.is_empty()
            || !self
                .instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(bad(
                "instance",
                format!("{:?}: use letters, digits, '-' and '_'", self.instance),
            ));
        }
        if self.link.tap.is_empty() || self.link.tap.len() > 15 || self.link.tap.contains('/') {
            return Err(bad(
                "link.tap",
                format!("{:?}: a device name has 1 to 15 characters", self.link.tap),
            ));
        }
        if self.link.backend == LinkBackend::Wire
            && self.link.wire_side == WireSide::B
            && self.link.wire_peer.is_none()
        {
            return Err(bad(
                "link.wire_peer",
                "side b of a wire needs the instance whose wire it joins".into(),
            ));
        }
        let t = &self.tcp;
        if !(1..=keepnet_tcp::state::MAX_CONNS).contains(&t.max_connections) {
            return Err(bad(
                "tcp.max_connections",
                format!(
                    "{}: use 1 to {}",
                    t.max_connections,
                    keepnet_tcp::state::MAX_CONNS
                ),
            ));
        }
        if !(1..=keepnet_tcp::state::MAX_LISTENERS).contains(&t.max_listeners) {
            return Err(bad(
                "tcp.max_listeners",
                format!(
                    "{}: use 1 to {}",
                    t.max_listeners,
                    keepnet_tcp::state::MAX_LISTENERS
                ),
            ));
        }
        for (field, v) in [("tcp.sndbuf", t.sndbuf), ("tcp.rcvbuf", t.rcvbuf)] {
            if !(4096..=keepnet_tcp::state::MAX_BUF).contains(&v) || v % 8 != 0 {
                return Err(bad(
                    field,
                    format!(
                        "{v}: use a multiple of 8 from 4096 to {}",
                        keepnet_tcp::state::MAX_BUF
                    ),
                ));
            }
        }
        if t.time_wait_ms > 240_000 {
            return Err(bad(
                "tcp.time_wait_ms",
                format!("{}: at most 240000", t.time_wait_ms),
            ));
        }
        if t.cc != "cubic" && t.cc != "newreno" {
            return Err(bad(
                "tcp.cc",
                format!("{:?}: use \"cubic\" or \"newreno\"", t.cc),
            ));
        }
        if !(1..=65535).contains(&t.backlog) {
            return Err(bad("tcp.backlog", format!("{}: use 1 to 65535", t.backlog)));
        }
        let table = (t.max_connections as u64) * (u64::from(t.sndbuf) + u64::from(t.rcvbuf) + 1024);
        if table > 64 << 30 {
            return Err(bad(
                "tcp.max_connections",
                format!(
                    "{} connections x ({} + {}) bytes of buffers is over 64 GiB of shared memory",
                    t.max_connections, t.sndbuf, t.rcvbuf
                ),
            ));
        }
        if !(576..=9000).contains(&self.link.mtu) {
            return Err(bad(
                "link.mtu",
                format!("{} is outside 576..=9000", self.link.mtu),
            ));
        }
        if !(16..=65536).contains(&self.link.frames) {
            return Err(bad(
                "link.frames",
                format!("{} is outside 16..=65536", self.link.frames),
            ));
        }
        if self.ip.addr.addr == self.link.kernel_addr.addr {
            return Err(bad(
                "ip.addr",
                format!("{} is also the kernel side's address", self.ip.addr.addr),
            ));
        }
        let mask = |p: u8| if p == 0 { 0 } else { u32::MAX << (32 - p) };
        let m = mask(self.ip.addr.prefix);
        if self.link.backend == LinkBackend::Tap
            && u32::from(self.ip.addr.addr) & m != u32::from(self.link.kernel_addr.addr) & m
        {
            return Err(bad(
                "link.kernel_addr",
                format!(
                    "{} is not on keepnet's subnet {}",
                    self.link.kernel_addr.addr, self.ip.addr
                ),
            ));
        }
        self.check_supervision(path)?;
        let mut names = std::collections::BTreeSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let ok = !svc.name.is_empty()
                && svc.name.len() <= 32
                && svc
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(bad(
                    "services.name",
                    format!(
                        "service {}: {:?}: use 1 to 32 letters, digits, '-' and '_'",
                        i + 1,
                        svc.name
                    ),
                ));
            }
            if !names.insert(svc.name.as_str()) {
                return Err(bad(
                    "services.name",
                    format!("two services are named {:?}", svc.name),
                ));
            }
        }
        Ok(())
    }

    /// The watching and restart settings of server `name`: its own, else the `[servers]`
    /// defaults, else the built-in ones.
    pub fn supervision(&self, name: &str) -> Supervision {
        let d = Supervision::default();
        let all = &self.servers;
        let one = self.server(name);
        let ms = Duration::from_millis;
        Supervision {
            restart: one.restart.or(all.restart).unwrap_or(d.restart),
            heartbeat: one
                .heartbeat_ms
                .or(all.heartbeat_ms)
                .map_or(d.heartbeat, ms),
            min_runtime: one
                .min_runtime_ms
                .or(all.min_runtime_ms)
                .map_or(d.min_runtime, ms),
            backoff_initial: one
                .backoff_initial_ms
                .or(all.backoff_initial_ms)
                .map_or(d.backoff_initial, ms),
            backoff_max: one
                .backoff_max_ms
                .or(all.backoff_max_ms)
                .map_or(d.backoff_max, ms),
            max_restarts: one
                .max_restarts
                .or(all.max_restarts)
                .unwrap_or(d.max_restarts),
            window: one
                .window_s
                .or(all.window_s)
                .map_or(d.window, Duration::from_secs),
            on_limit: one.on_limit.or(all.on_limit).unwrap_or(d.on_limit),
        }
    }

    /// Checks the watching and restart fields, naming the table each value came from.
    fn check_supervision(&self, path: &Path) -> Result<(), ConfigError> {
        if !(-20..=19).contains(&self.placement.nice) {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "placement.nice".into(),
                message: format!("{}: use -20 to 19", self.placement.nice),
            });
        }
        let park = self.placement.park_timeout_ms;
        if !(1..=10_000).contains(&park) {
            return Err(ConfigError::Invalid {
                path: path.into(),
                field: "placement.park_timeout_ms".into(),
                message: format!("{park}: use 1 to 10000"),
            });
        }
        for name in SERVERS {
            let one = self.server(name);
            // Where a value came from: `servers.NAME.FIELD` or `servers.FIELD`.
            let at = |own: bool, field: &str| {
                if own {
                    format!("servers.{name}.{field}")
                } else {
                    format!("servers.{field}")
                }
            };
            let bad = |own: bool, field: &str, message: String| ConfigError::Invalid {
                path: path.into(),
                field: at(own, field),
                message,
            };
            let s = self.supervision(name);
            let hb = s.heartbeat.as_millis() as u64;
            let hb_own = one.heartbeat_ms.is_some();
            if hb < park {
                return Err(bad(
                    hb_own,
                    "heartbeat_ms",
                    format!(
                        "{hb} is below placement.park_timeout_ms ({park}): an idle server beats \
                         only once per park, so it would look hung; use at least {park}"
                    ),
                ));
            }
            if hb > 60_000 {
                return Err(bad(
                    hb_own,
                    "heartbeat_ms",
                    format!("{hb}: use {park} to 60000"),
                ));
            }
            let min_run = s.min_runtime.as_millis() as u64;
            if min_run > 3_600_000 {
                return Err(bad(
                    one.min_runtime_ms.is_some(),
                    "min_runtime_ms",
                    format!("{min_run}: use 0 to 3600000"),
                ));
            }
            let b0 = s.backoff_initial.as_millis() as u64;
            if !(1..=600_000).contains(&b0) {
                return Err(bad(
                    one.backoff_initial_ms.is_some(),
                    "backoff_initial_ms",
                    format!("{b0}: use 1 to 600000"),
                ));
            }
            let bmax = s.backoff_max.as_millis() as u64;
            if !(b0..=600_000).contains(&bmax) {
                return Err(bad(
                    one.backoff_max_ms.is_some(),
                    "backoff_max_ms",
                    format!("{bmax}: use backoff_initial_ms ({b0}) to 600000"),
                ));
            }
            if s.max_restarts > 100_000 {
                return Err(bad(
                    one.max_restarts.is_some(),
                    "max_restarts",
                    format!("{}: use 0 to 100000", s.max_restarts),
                ));
            }
            let w = s.window.as_secs();
            if !(1..=86_400).contains(&w) {
                return Err(bad(
                    one.window_s.is_some(),
                    "window_s",
                    format!("{w}: use 1 to 86400"),
                ));
            }
        }
        Ok(())
    }

    /// Settings of server `name`.
    pub fn server(&self, name: &str) -> &ServerConfig {
        match name {
            "driver" => &self.servers.driver,
            "udp" => &self.servers.udp,
            "tcp" => &self.servers.tcp,
            _ => &self.servers.ip,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_design() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c.instance, "default");
        assert_eq!(c.link.tap, "kn0");
        assert_eq!(c.ip.addr.to_string(), "198.18.0.2/24");
        assert_eq!(c.link.kernel_addr.to_string(), "198.18.0.1/24");
    }

    #[test]
    fn a_typo_names_its_line() {
        let e = Config::parse(
            "instance = \"a\"\n[link]\nmtuu = 1500\n",
            Path::new("k.toml"),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("mtuu"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (text, field) in [
            ("[link]\nmtu = 100\n", "link.mtu"),
            ("[ip]\naddr = \"198.18.0.1/24\"\n", "ip.addr"),
            (
                "[link]\nkernel_addr = \"198.19.0.1/24\"\n",
                "link.kernel_addr",
            ),
            ("instance = \"a b\"\n", "instance"),
        ] {
            let e = Config::parse(text, Path::new("k.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{text:?}: {e}");
        }
        assert!(Config::parse("[ip]\nmac = \"zz\"\n", Path::new("k.toml")).is_err());
        assert!(Config::parse("[ip]\naddr = \"198.18.0.2\"\n", Path::new("k.toml")).is_err());
    }

    #[test]
    fn services_default_and_checked() {
        let c = Config::parse("", Path::new("k.toml")).unwrap();
        let names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "udp-echo",
                "udp-discard",
                "tcp-echo",
                "tcp-discard",
                "tcp-chargen",
                "http"
            ]
        );
        assert!(Config::parse("services = []\n", Path::new("k.toml"))
            .unwrap()
            .services
            .is_empty());
        let two = "[[services]]\nname = \"a\"\n[[services]]\nname = \"a\"\n";
        assert!(Config::parse(two, Path::new("k.toml"))
            .unwrap_err()
            .to_string()
            .contains("two services"));
        let typo = "[[services]]\nname = \"a\"\nargz = []\n";
        let e = Config::parse(typo, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("argz"), "{e}");
    }

    #[test]
    fn tcp_settings_default_and_checked() {
        let c = Config::parse("", Path::new("k.toml")).unwrap();
        assert_eq!(c.tcp.cc, "cubic");
        assert_eq!((c.tcp.sndbuf, c.tcp.rcvbuf), (262144, 262144));
        for (bad, field) in [
            ("[tcp]\ncc = \"bbr\"\n", "tcp.cc"),
            ("[tcp]\nsndbuf = 100\n", "tcp.sndbuf"),
            ("[tcp]\nmax_connections = 0\n", "tcp.max_connections"),
            (
                "[tcp]\nmax_connections = 1000000\nrcvbuf = 67108864\n",
                "tcp.max_connections",
            ),
            ("[tcp]\ntime_wait_ms = 999999\n", "tcp.time_wait_ms"),
        ] {
            let e = Config::parse(bad, Path::new("k.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
        let e = Config::parse("[tcp]\nsndbuff = 4096\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sndbuff"), "{e}");
    }

    #[test]
    fn supervision_defaults() {
        let c = Config::parse("", Path::new("k.toml")).unwrap();
        for name in SERVERS {
            let s = c.supervision(name);
            assert_eq!(s, Supervision::default());
            assert_eq!(s.restart, RestartPolicy::Permanent);
            assert_eq!(s.heartbeat, Duration::from_millis(250));
            assert_eq!(s.min_runtime, Duration::from_millis(1000));
            assert_eq!(s.backoff_initial, Duration::from_millis(50));
            assert_eq!(s.backoff_max, Duration::from_millis(5000));
            assert_eq!(s.max_restarts, 10);
            assert_eq!(s.window, Duration::from_secs(60));
            assert_eq!(s.on_limit, OnLimit::Stop);
        }
    }

    #[test]
    fn supervision_defaults_table_and_per_server_overrides() {
        let text = "[servers]\nmax_restarts = 3\nwindow_s = 10\non_limit = \"restart-all\"\n\
                    heartbeat_ms = 200\n\
                    [servers.udp]\nrestart = \"transient\"\nmax_restarts = 5\nheartbeat_ms = 50\n\
                    min_runtime_ms = 0\nbackoff_initial_ms = 10\nbackoff_max_ms = 20\n\
                    on_limit = \"stop\"\n";
        let c = Config::parse(text, Path::new("k.toml")).unwrap();
        let ip = c.supervision("ip");
        assert_eq!(ip.max_restarts, 3);
        assert_eq!(ip.window, Duration::from_secs(10));
        assert_eq!(ip.on_limit, OnLimit::RestartAll);
        assert_eq!(ip.heartbeat, Duration::from_millis(200));
        assert_eq!(ip.restart, RestartPolicy::Permanent);
        let udp = c.supervision("udp");
        assert_eq!(udp.restart, RestartPolicy::Transient);
        assert_eq!(udp.max_restarts, 5);
        assert_eq!(udp.window, Duration::from_secs(10));
        assert_eq!(udp.on_limit, OnLimit::Stop);
        assert_eq!(udp.heartbeat, Duration::from_millis(50));
        assert_eq!(udp.min_runtime, Duration::ZERO);
        assert_eq!(
            (udp.backoff_initial, udp.backoff_max),
            (Duration::from_millis(10), Duration::from_millis(20))
        );
        // A config written back out (as `keepnet demo` does) reads the same.
        let again = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&again, Path::new("k.toml")).unwrap(), c);
    }

    #[test]
    fn supervision_values_checked_and_named() {
        for (text, field) in [
            (
                "[servers.ip]\nheartbeat_ms = 10\n",
                "servers.ip.heartbeat_ms",
            ),
            ("[servers]\nheartbeat_ms = 10\n", "servers.heartbeat_ms"),
            (
                "[placement]\npark_timeout_ms = 500\n",
                "servers.heartbeat_ms",
            ),
            (
                "[servers.tcp]\nheartbeat_ms = 70000\n",
                "servers.tcp.heartbeat_ms",
            ),
            ("[servers]\nwindow_s = 0\n", "servers.window_s"),
            ("[servers.udp]\nwindow_s = 100000\n", "servers.udp.window_s"),
            (
                "[servers]\nbackoff_initial_ms = 0\n",
                "servers.backoff_initial_ms",
            ),
            (
                "[servers.driver]\nbackoff_initial_ms = 100\nbackoff_max_ms = 50\n",
                "servers.driver.backoff_max_ms",
            ),
            (
                "[servers]\nmax_restarts = 1000000\n",
                "servers.max_restarts",
            ),
            (
                "[servers]\nmin_runtime_ms = 99999999\n",
                "servers.min_runtime_ms",
            ),
            (
                "[placement]\npark_timeout_ms = 0\n",
                "placement.park_timeout_ms",
            ),
        ] {
            let e = Config::parse(text, Path::new("k.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(field), "{text:?}: {e}");
        }
        // The heartbeat may not undercut the park timeout; it says why.
        let e = Config::parse("[servers.ip]\nheartbeat_ms = 10\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("park_timeout_ms (50)"), "{e}");
        // Wrong words and typos are refused, naming the word.
        for (text, word) in [
            ("[servers]\nrestart = \"always\"\n", "always"),
            ("[servers.tcp]\non_limit = \"restart_all\"\n", "restart_all"),
            ("[servers.tcp]\nmax_restart = 3\n", "max_restart"),
            ("[servers]\nheartbeat = 100\n", "heartbeat"),
            ("[servers.udp]\nbackof_max_ms = 100\n", "backof_max_ms"),
            ("[servers]\nmax_restarts = -1\n", "max_restarts"),
        ] {
            let e = Config::parse(text, Path::new("k.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(word), "{text:?}: {e}");
        }
    }
}
