//! The engine's configuration, and its JSON form (`KEEPNET_IP_CONFIG`).
//!
//! ```json
//! {"mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24","gateway":null,"mtu":1500}
//! ```
//!
//! Every field but `mac` and `addr` has a default. Unknown fields are refused, and every error
//! names the field it is about.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::wire::Mac;

/// What the IP engine needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Our MAC address.
    pub mac: Mac,
    /// Our IPv4 address.
    pub addr: Ipv4Addr,
    /// Length of our on-link prefix.
    pub prefix_len: u8,
    /// Default gateway (must be on-link); None: only the prefix is reachable.
    pub gateway: Option<Ipv4Addr>,
    /// Largest IP datagram on the link (Ethernet payload), 68..=9000.
    pub mtu: u16,
    /// TTL of datagrams we originate.
    pub ttl: u8,
    /// How long a learnt ARP entry lives.
    pub arp_timeout: Duration,
    /// Time between ARP requests for an unresolved next hop.
    pub arp_retry: Duration,
    /// ARP requests sent before giving up on a next hop.
    pub arp_tries: u8,
    /// Datagrams queued per unresolved next hop.
    pub arp_queue: usize,
    /// ARP cache entries at most.
    pub arp_cache_size: usize,
    /// Next hops being resolved at once, at most.
    pub arp_pending_max: usize,
    /// How long a datagram may stay in reassembly (RFC 791 suggests 15 s; Linux uses 30 s).
    pub reassembly_timeout: Duration,
    /// Datagrams in reassembly per source, at most.
    pub frag_max_datagrams_per_src: usize,
    /// Bytes held in reassembly per source, at most.
    pub frag_max_bytes_per_src: usize,
    /// Sources with datagrams in reassembly, at most.
    pub frag_max_sources: usize,
}

impl Config {
    /// A configuration with defaults for everything but the addresses.
    pub fn new(mac: Mac, addr: Ipv4Addr, prefix_len: u8) -> Config {
        Config {
            mac,
            addr,
            prefix_len,
            gateway: None,
            mtu: 1500,
            ttl: 64,
            arp_timeout: Duration::from_secs(60),
            arp_retry: Duration::from_secs(1),
            arp_tries: 3,
            arp_queue: 8,
            arp_cache_size: 256,
            arp_pending_max: 64,
            reassembly_timeout: Duration::from_secs(30),
            frag_max_datagrams_per_src: 16,
            frag_max_bytes_per_src: 256 * 1024,
            frag_max_sources: 64,
        }
    }

    /// The network mask.
    pub fn netmask(&self) -> u32 {
        match self.prefix_len {
            0 => 0,
            n => u32::MAX << (32 - u32::from(n.min(32))),
        }
    }

    /// The directed broadcast address of our prefix.
    pub fn subnet_broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.netmask())
    }

    /// True if `ip` is in our prefix.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) ^ u32::from(self.addr)) & self.netmask() == 0
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &'static str, why: String| Err(ConfigError { field, why });
        if !self.mac.is_unicast() {
            return bad("mac", format!("{} is not a unicast address", self.mac));
        }
        if self.prefix_len > 32 {
            return bad(
                "addr",
                format!("prefix length {} exceeds 32", self.prefix_len),
            );
        }
        let a = self.addr;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return bad("addr", format!("{a} is not a unicast host address"));
        }
        if self.prefix_len < 31
            && (a == self.subnet_broadcast() || u32::from(a) & !self.netmask() == 0)
        {
            return bad(
                "addr",
                format!(
                    "{a} is the network or broadcast address of /{}",
                    self.prefix_len
                ),
            );
        }
        if let Some(g) = self.gateway {
            if !self.on_link(g) || g == a {
                return bad(
                    "gateway",
                    format!("{g} is not another address in {a}/{}", self.prefix_len),
                );
            }
        }
        if !(68..=9000).contains(&self.mtu) {
            return bad("mtu", format!("{} is outside 68..=9000", self.mtu));
        }
        if self.ttl == 0 {
            return bad("ttl", "must be at least 1 (RFC 1122 3.2.1.7)".into());
        }
        let day = Duration::from_secs(86_400);
        for (field, d) in [
            ("arp_timeout_ms", self.arp_timeout),
            ("arp_retry_ms", self.arp_retry),
            ("reassembly_timeout_ms", self.reassembly_timeout),
        ] {
            if d < Duration::from_millis(1) || d > day {
                return bad(field, format!("{d:?} is outside 1 ms..=1 day"));
            }
        }
        if self.arp_tries == 0 {
            return bad("arp_tries", "must be at least 1".into());
        }
        for (field, v) in [
            ("arp_queue", self.arp_queue),
            ("arp_cache_size", self.arp_cache_size),
            ("arp_pending_max", self.arp_pending_max),
            (
                "frag_max_datagrams_per_src",
                self.frag_max_datagrams_per_src,
            ),
            ("frag_max_bytes_per_src", self.frag_max_bytes_per_src),
            ("frag_max_sources", self.frag_max_sources),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Parses the JSON form (see the module doc) and validates it.
    pub fn from_json(text: &str) -> Result<Config, ConfigError> {
        let v: Value = serde_json::from_str(text).map_err(|e| ConfigError {
            field: "(json)",
            why: e.to_string(),
        })?;
        let Value::Object(map) = v else {
            return Err(ConfigError {
                field: "(json)",
                why: "expected a JSON object".into(),
            });
        };
        const KNOWN: &[&str] = &[
            "mac",
            "addr",
            "gateway",
            "mtu",
            "ttl",
            "arp_timeout_ms",
            "arp_retry_ms",
            "arp_tries",
            "arp_queue",
            "arp_cache_size",
            "arp_pending_max",
            "reassembly_timeout_ms",
            "frag_max_datagrams_per_src",
            "frag_max_bytes_per_src",
            "frag_max_sources",
        ];
        if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(ConfigError {
                field: "(json)",
                why: format!("unknown field {k:?}; known fields: {}", KNOWN.join(", ")),
            });
        }
        let mac: Mac = parse_str(&map, "mac")?
            .ok_or_else(|| missing("mac"))?
            .parse()
            .map_err(|why| ConfigError { field: "mac", why })?;
        let addr = parse_str(&map, "addr")?.ok_or_else(|| missing("addr"))?;
        let (ip, len) = addr.split_once('/').ok_or_else(|| ConfigError {
            field: "addr",
            why: format!("{addr:?} is not address/prefix-length (e.g. 198.18.0.2/24)"),
        })?;
        let ip: Ipv4Addr = ip.parse().map_err(|e| ConfigError {
            field: "addr",
            why: format!("{ip:?}: {e}"),
        })?;
        let len: u8 = len.parse().map_err(|e| ConfigError {
            field: "addr",
            why: format!("prefix length {len:?}: {e}"),
        })?;
        let mut c = Config::new(mac, ip, len);
        if let Some(g) = parse_str(&map, "gateway")? {
            c.gateway = Some(g.parse().map_err(|e| ConfigError {
                field: "gateway",
                why: format!("{g:?}: {e}"),
            })?);
        }
        let ms = Duration::from_millis;
        if let Some(v) = parse_uint(&map, "mtu", 65535)? {
            c.mtu = v as u16;
        }
        if let Some(v) = parse_uint(&map, "ttl", 255)? {
            c.ttl = v as u8;
        }
        if let Some(v) = parse_uint(&map, "arp_timeout_ms", u64::MAX)? {
            c.arp_timeout = ms(v);
        }
        if let Some(v) = parse_uint(&map, "arp_retry_ms", u64::MAX)? {
            c.arp_retry = ms(v);
        }
        if let Some(v) = parse_uint(&map, "arp_tries", 255)? {
            c.arp_tries = v as u8;
        }
        if let Some(v) = parse_uint(&map, "reassembly_timeout_ms", u64::MAX)? {
            c.reassembly_timeout = ms(v);
        }
        let cap = 1 << 30;
        for (field, slot) in [
            ("arp_queue", &mut c.arp_queue),
            ("arp_cache_size", &mut c.arp_cache_size),
            ("arp_pending_max", &mut c.arp_pending_max),
            (
                "frag_max_datagrams_per_src",
                &mut c.frag_max_datagrams_per_src,
            ),
            ("frag_max_bytes_per_src", &mut c.frag_max_bytes_per_src),
            ("frag_max_sources", &mut c.frag_max_sources),
        ] {
            if let Some(v) = parse_uint(&map, field, cap)? {
                *slot = v as usize;
            }
        }
        c.validate()?;
        Ok(c)
    }
}

/// A configuration value that is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {why}")]
pub struct ConfigError {
    /// The field (`(json)` for the document as a whole).
    pub field: &'static str,
    /// What is wrong with it.
    pub why: String,
}

fn missing(field: &'static str) -> ConfigError {
    ConfigError {
        field,
        why: "is required".into(),
    }
}

fn parse_str<'a>(
    map: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(ConfigError {
            field,
            why: format!("expected a string, got {other}"),
        }),
    }
}

fn parse_uint(
    map: &Map<String, Value>,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(ConfigError {
                field,
                why: format!("expected an integer from 0 to {max}, got {v}"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::from_json(
            r#"{"mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24","gateway":null,"mtu":1500}"#,
        )
        .unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(c.prefix_len, 24);
        assert_eq!(c.gateway, None);
        assert_eq!(c.subnet_broadcast(), Ipv4Addr::new(198, 18, 0, 255));
        assert!(c.on_link(Ipv4Addr::new(198, 18, 0, 1)));
        assert!(!c.on_link(Ipv4Addr::new(198, 19, 0, 1)));
        let g = Config::from_json(
            r#"{"mac":"02:00:00:00:00:01","addr":"10.1.2.3/8","gateway":"10.0.0.1","reassembly_timeout_ms":5000}"#,
        )
        .unwrap();
        assert_eq!(g.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(g.reassembly_timeout, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_field() {
        let base = r#""mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24""#;
        for (json, field) in [
            (format!("{{{base},\"mtu\":\"big\"}}"), "mtu"),
            (format!("{{{base},\"mtu\":40}}"), "mtu"),
            (format!("{{{base},\"gateway\":\"10.0.0.1\"}}"), "gateway"),
            (format!("{{{base},\"gateway\":\"nope\"}}"), "gateway"),
            (format!("{{{base},\"colour\":1}}"), "(json)"),
            (format!("{{{base},\"arp_retry_ms\":0}}"), "arp_retry_ms"),
            (
                format!("{{{base},\"reassembly_timeout_ms\":18446744073709551615}}"),
                "reassembly_timeout_ms",
            ),
            ("{\"addr\":\"198.18.0.2/24\"}".to_string(), "mac"),
            (
                "{\"mac\":\"ff:ff:ff:ff:ff:ff\",\"addr\":\"198.18.0.2/24\"}".into(),
                "mac",
            ),
            (
                "{\"mac\":\"02:6b:6e:00:00:02\",\"addr\":\"198.18.0.2\"}".into(),
                "addr",
            ),
            (
                "{\"mac\":\"02:6b:6e:00:00:02\",\"addr\":\"198.18.0.2/33\"}".into(),
                "addr",
            ),
            (
                "{\"mac\":\"02:6b:6e:00:00:02\",\"addr\":\"198.18.0.255/24\"}".into(),
                "addr",
            ),
            ("[1]".into(), "(json)"),
            ("{".into(), "(json)"),
        ] {
            let e = Config::from_json(&json).unwrap_err();
            assert_eq!(e.field, field, "{json}: {e}");
            assert!(e.to_string().contains(field), "{e}");
        }
    }
}
