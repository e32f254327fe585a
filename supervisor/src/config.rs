//! The TOML configuration. Every field has a default; unknown fields are errors that name the
//! line, so a typo never silently means "default".

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

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
        field: &'static str,
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
}

/// Per-server settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServersConfig {
    pub driver: ServerConfig,
    pub ip: ServerConfig,
    pub udp: ServerConfig,
    pub tcp: ServerConfig,
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
        let bad = |field, message: String| ConfigError::Invalid {
            path: path.into(),
            field,
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
}
