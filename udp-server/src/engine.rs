//! The UDP protocol engine: plain code with no I/O and no rings, driven by calls that return
//! what to do (DESIGN: protocol logic is unit-testable and simulation-ready).
//!
//! * Sockets: [`Engine::bind`], [`Engine::connect`], [`Engine::close`], and
//!   [`Engine::close_app`] / [`Engine::retain_apps`] for applications that went away. Every
//!   change is written through to a [`Store`] (the shared socket table in the server) before
//!   the call returns, so the answer an application gets is never ahead of what a restarted
//!   server will find.
//! * Sending: [`Engine::send`] checks a request and returns the UDP header to put in front of
//!   the payload, checksum included.
//! * Receiving: [`Engine::receive`] validates a datagram and says where it goes
//!   ([`Rx::Deliver`]), that the sender should be told the port is closed
//!   ([`Rx::Unreachable`]), or why it was dropped ([`Rx::Dropped`]); [`Engine::icmp_error`]
//!   turns an ICMP error about a datagram we sent into a pending error on a connected socket.
//! * Receive queues: each socket may have at most [`Config::rcvbuf`] datagrams that were
//!   delivered and not yet handed back by the application; [`Engine::release`] hands one back.
//!
//! The rules are Linux's for a UDP socket without `SO_REUSEADDR`, `SO_BROADCAST` or
//! `IP_RECVERR`, on a host with one address; each is noted beside the branch that implements
//! it, with the RFC text that asks for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::{Range, RangeInclusive};

use keepnet_server::app::{Status, MAX_UDP_PAYLOAD};

use crate::counters::{Counters, Ctr};
use crate::state::{handle, split_handle, Record, Store};
use crate::wire::{ipv4_header_ok, udp_header, Quote, UdpPacket, WireError, PROTO_UDP, UDP_HEADER};

/// A socket handle, as applications see it (see [`crate::state`]: generation and slot).
pub type SocketId = u32;

/// Datagrams per socket delivered and not yet handed back, by default.
pub const DEFAULT_RCVBUF: u32 = 64;
/// The dynamic (ephemeral) port range of RFC 6335 section 6, where port 0 binds.
pub const EPHEMERAL: RangeInclusive<u16> = 49152..=65535;
/// Largest ICMP error we ask for: RFC 1812 4.3.2.3 (and Linux) quote as much of the datagram
/// as fits in 576 bytes with the IP (20) and ICMP (8) headers.
pub const MAX_QUOTE: usize = 576 - 20 - 8;

/// What the engine needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// keepnet's address: the only one a socket may bind besides 0.0.0.0.
    pub addr: Ipv4Addr,
    /// Datagrams per socket delivered and not yet handed back, at most.
    pub rcvbuf: u32,
    /// Where port 0 binds.
    pub ephemeral: RangeInclusive<u16>,
}

impl Config {
    /// Defaults for everything but the address.
    pub fn new(addr: Ipv4Addr) -> Config {
        Config {
            addr,
            rcvbuf: DEFAULT_RCVBUF,
            ephemeral: EPHEMERAL,
        }
    }
}

/// A datagram's addressing, as the ip server delivered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMeta {
    /// IP source.
    pub src: Ipv4Addr,
    /// IP destination (ours, or a broadcast or multicast address).
    pub dst: Ipv4Addr,
    /// Received on a broadcast address (IP or link layer).
    pub broadcast: bool,
}

/// An ICMP error about a datagram we sent, as the ip server delivered it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpMeta {
    /// The host or router that sent the error.
    pub from: Ipv4Addr,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
}

/// What to do with a received datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rx {
    /// Hand `payload` (a range of the packet given to [`Engine::receive`]) to `socket` of
    /// `app`, from `from`. The socket's receive queue already counts it: if it cannot be
    /// delivered after all, call [`Engine::release`].
    Deliver {
        socket: SocketId,
        app: u32,
        from: SocketAddrV4,
        payload: Range<usize>,
    },
    /// No socket takes it: ask the ip server for an ICMP port unreachable (code 3) to the
    /// sender, quoting `quote` (a range of the packet: the IP header and what follows).
    Unreachable { quote: Range<usize> },
    /// Dropped, counted under this reason.
    Dropped(Ctr),
}

/// A datagram ready to go: the header to put before the payload, and the addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// IP source (always ours: the checksum covers it).
    pub src: Ipv4Addr,
    /// IP destination and port.
    pub dst: SocketAddrV4,
    /// The UDP header, checksum included.
    pub header: [u8; UDP_HEADER],
}

/// An asynchronous error for an application (an `event::ERROR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncError {
    pub app: u32,
    pub socket: SocketId,
    pub status: Status,
}

/// What one socket looks like from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// What the store holds.
    pub record: Record,
    /// Datagrams delivered and not yet handed back.
    pub queued: u32,
}

/// The engine's indexes, for comparing a live engine with one rebuilt from its store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Indexes {
    /// Every socket.
    pub sockets: BTreeMap<SocketId, Record>,
    /// Sockets by local port.
    pub ports: BTreeMap<u16, BTreeSet<SocketId>>,
    /// Sockets by application.
    pub apps: BTreeMap<u32, BTreeSet<SocketId>>,
}

#[derive(Clone, Copy, Debug)]
struct Sock {
    record: Record,
    queued: u32,
}

/// The engine over a [`Store`] (see the module docs).
#[derive(Debug)]
pub struct Engine<S: Store> {
    cfg: Config,
    store: S,
    socks: Vec<Option<Sock>>,
    gens: Vec<u16>,
    free: BTreeSet<u32>,
    ports: BTreeMap<u16, Vec<u32>>,
    apps: BTreeMap<u32, BTreeSet<u32>>,
    next_ephemeral: u16,
    counters: Counters,
}

/// The pending errors a socket may hold (anything else in a store is garbage).
fn async_status(code: u32) -> Option<Status> {
    match Status::from_code(code) {
        s @ (Status::ConnectionRefused | Status::HostUnreachable | Status::NetworkUnreachable)
            if s.code() == code =>
        {
            Some(s)
        }
        _ => None,
    }
}

/// True if `a` names one host, as RFC 1122 3.2.2 requires of the source of a datagram that
/// an ICMP error may answer: not 0.0.0.0, loopback, broadcast, multicast or Class E.
fn names_one_host(a: Ipv4Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_broadcast()
        || a.is_multicast()
        || a.octets()[0] >= 240)
}

/// The error a hard ICMP error reports on a connected socket, as Linux's `icmp_err_convert`
/// and `__udp4_lib_err` decide; None for soft errors, which a UDP socket does not report.
fn icmp_status(icmp_type: u8, code: u8) -> Option<Status> {
    match (icmp_type, code) {
        // Destination unreachable (RFC 792; codes of RFC 1122 3.2.2.1 and RFC 1812 5.2.7.1).
        // 0 net, 6 net unknown, 9 net prohibited: ENETUNREACH.
        (3, 0 | 6 | 9) => Some(Status::NetworkUnreachable),
        // 1 host, 5 source route failed, 7 host unknown, 8 isolated, 10 host prohibited,
        // 13 filtered, 14 precedence violation, 15 precedence cutoff: EHOSTUNREACH (Linux
        // says EOPNOTSUPP, EHOSTDOWN and ENONET for 5, 7 and 8: the nearest status here).
        (3, 1 | 5 | 7 | 8 | 10 | 13 | 14 | 15) => Some(Status::HostUnreachable),
        // 3 port unreachable: ECONNREFUSED; 2 protocol unreachable (Linux: ENOPROTOOPT)
        // is the same refusal one layer down.
        (3, 2 | 3) => Some(Status::ConnectionRefused),
        // 4 fragmentation needed and 11/12 (unreachable for TOS) are soft; time exceeded
        // (11) is soft; parameter problem (12) has no status here. Linux reports none of
        // these on a socket without IP_RECVERR.
        _ => None,
    }
}

impl<S: Store> Engine<S> {
    /// An engine over `store`, rebuilding its indexes from what the store holds (a fresh
    /// store holds nothing; a restarted server's holds its predecessor's sockets). Entries
    /// that cannot be right (port 0, a conflict with an earlier entry, generation 0, a
    /// pending error that is not an asynchronous one) are repaired and counted
    /// (`state.repaired`): the table is ours alone, so this only happens after a bug.
    pub fn open(cfg: Config, store: S) -> Engine<S> {
        let slots = store.load();
        let n = slots.len();
        let start = *cfg.ephemeral.start();
        let mut e = Engine {
            cfg,
            store,
            socks: vec![None; n],
            gens: vec![0; n],
            free: BTreeSet::new(),
            ports: BTreeMap::new(),
            apps: BTreeMap::new(),
            next_ephemeral: start,
            counters: Counters::default(),
        };
        for (i, s) in slots.into_iter().enumerate() {
            let slot = i as u32;
            e.gens[i] = s.gen;
            let Some(mut r) = s.record else {
                e.free.insert(slot);
                continue;
            };
            if r.local.port() == 0 || s.gen == 0 || e.conflicts(*r.local.ip(), r.local.port()) {
                e.store.retract(slot);
                e.counters.inc(Ctr::StateRepaired);
                e.free.insert(slot);
                continue;
            }
            if r.remote.is_some_and(|a| a.port() == 0 || a.ip().is_unspecified()) {
                r.remote = None;
                e.store.set_remote(slot, None);
                e.counters.inc(Ctr::StateRepaired);
            }
            if r.error != 0 && async_status(r.error).is_none() {
                r.error = 0;
                e.store.set_error(slot, 0);
                e.counters.inc(Ctr::StateRepaired);
            }
            e.index(
                slot,
                Sock {
                    record: r,
                    queued: 0,
                },
            );
        }
        e
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// One counter.
    pub fn count(&self, c: Ctr) -> u64 {
        self.counters.get(c)
    }

    /// Sockets open.
    pub fn socket_count(&self) -> usize {
        self.socks.len() - self.free.len()
    }

    /// Where the next ephemeral port search starts.
    pub fn ephemeral_cursor(&self) -> u16 {
        self.next_ephemeral
    }

    /// Moves the ephemeral port search (the server seeds it at random, RFC 6056 section 3.1:
    /// "ephemeral port selection ... obfuscated"; a value outside the range is folded in).
    pub fn set_ephemeral_cursor(&mut self, port: u16) {
        let (lo, hi) = (*self.cfg.ephemeral.start(), *self.cfg.ephemeral.end());
        let span = u32::from(hi.saturating_sub(lo)) + 1;
        self.next_ephemeral = lo + ((u32::from(port.wrapping_sub(lo)) % span) as u16);
    }

    /// A socket of any application, by handle.
    pub fn socket(&self, id: SocketId) -> Option<SocketInfo> {
        let slot = self.slot_of(id)?;
        let s = self.socks.get(slot as usize)?.as_ref()?;
        Some(SocketInfo {
            record: s.record,
            queued: s.queued,
        })
    }

    /// The sockets of `app`.
    pub fn sockets_of(&self, app: u32) -> Vec<SocketId> {
        self.apps
            .get(&app)
            .map(|set| set.iter().map(|&s| self.id(s)).collect())
            .unwrap_or_default()
    }

    /// The applications that own sockets.
    pub fn apps(&self) -> Vec<u32> {
        self.apps.keys().copied().collect()
    }

    /// The indexes, by handle (see [`Indexes`]).
    pub fn indexes(&self) -> Indexes {
        let mut x = Indexes::default();
        for (slot, s) in self.socks.iter().enumerate() {
            if let Some(s) = s {
                x.sockets.insert(self.id(slot as u32), s.record);
            }
        }
        for (port, slots) in &self.ports {
            x.ports
                .insert(*port, slots.iter().map(|&s| self.id(s)).collect());
        }
        for (app, slots) in &self.apps {
            x.apps
                .insert(*app, slots.iter().map(|&s| self.id(s)).collect());
        }
        x
    }

    fn id(&self, slot: u32) -> SocketId {
        handle(slot, self.gens.get(slot as usize).copied().unwrap_or(0))
    }

    /// The slot of a live handle (right generation).
    fn slot_of(&self, id: SocketId) -> Option<u32> {
        let (slot, gen) = split_handle(id);
        let live = self.socks.get(slot as usize)?.is_some();
        (live && self.gens.get(slot as usize) == Some(&gen)).then_some(slot)
    }

    /// The slot of `app`'s socket `id`: an application may name only its own sockets.
    fn own(&self, app: u32, id: SocketId) -> Result<u32, Status> {
        let slot = self.slot_of(id).ok_or(Status::BadSocket)?;
        match &self.socks[slot as usize] {
            Some(s) if s.record.app == app => Ok(slot),
            _ => Err(Status::BadSocket),
        }
    }

    fn sock(&self, slot: u32) -> Option<&Sock> {
        self.socks.get(slot as usize)?.as_ref()
    }

    fn sock_mut(&mut self, slot: u32) -> Option<&mut Sock> {
        self.socks.get_mut(slot as usize)?.as_mut()
    }

    fn index(&mut self, slot: u32, s: Sock) {
        self.free.remove(&slot);
        self.ports.entry(s.record.local.port()).or_default().push(slot);
        self.apps.entry(s.record.app).or_default().insert(slot);
        if let Some(cell) = self.socks.get_mut(slot as usize) {
            *cell = Some(s);
        }
    }

    fn unindex(&mut self, slot: u32) -> Option<Sock> {
        let s = self.socks.get_mut(slot as usize)?.take()?;
        let port = s.record.local.port();
        if let Some(v) = self.ports.get_mut(&port) {
            v.retain(|&x| x != slot);
            if v.is_empty() {
                self.ports.remove(&port);
            }
        }
        if let Some(set) = self.apps.get_mut(&s.record.app) {
            set.remove(&slot);
            if set.is_empty() {
                self.apps.remove(&s.record.app);
            }
        }
        self.free.insert(slot);
        Some(s)
    }

    /// Whether binding `ip:port` would clash with a socket already bound. Linux without
    /// SO_REUSEADDR (`inet_rcv_saddr_equal`): two sockets on one port clash when their
    /// addresses overlap, and 0.0.0.0 overlaps every address.
    fn conflicts(&self, ip: Ipv4Addr, port: u16) -> bool {
        self.ports.get(&port).is_some_and(|slots| {
            slots.iter().any(|&s| {
                self.sock(s).is_some_and(|o| {
                    let other = *o.record.local.ip();
                    other.is_unspecified() || ip.is_unspecified() || other == ip
                })
            })
        })
    }

    /// A free ephemeral port for `ip`, searched from the cursor, which then moves past it
    /// (so consecutive binds rotate through the range).
    fn ephemeral(&mut self, ip: Ipv4Addr) -> Option<u16> {
        let (lo, hi) = (*self.cfg.ephemeral.start(), *self.cfg.ephemeral.end());
        if lo == 0 || hi < lo {
            return None;
        }
        let span = u32::from(hi - lo) + 1;
        let from = u32::from(self.next_ephemeral.saturating_sub(lo)) % span;
        for k in 0..span {
            let port = lo + ((from + k) % span) as u16;
            if !self.conflicts(ip, port) {
                self.next_ephemeral = if port == hi { lo } else { port + 1 };
                return Some(port);
            }
        }
        None
    }

    /// Binds a new socket of `app` to `local` (0.0.0.0: any of our addresses; port 0: an
    /// ephemeral port). Returns its handle and the address it got.
    pub fn bind(
        &mut self,
        app: u32,
        local: SocketAddrV4,
    ) -> Result<(SocketId, SocketAddrV4), Status> {
        let ip = *local.ip();
        // Only an address of ours may be bound (Linux: EADDRNOTAVAIL for any other).
        if !(ip.is_unspecified() || ip == self.cfg.addr) {
            return Err(Status::AddrNotAvailable);
        }
        let slot = *self.free.first().ok_or(Status::NoSockets)?;
        let port = match local.port() {
            // Port 0: the stack picks one (RFC 768 leaves it to the host; Linux searches its
            // ip_local_port_range, EADDRINUSE when none is free).
            0 => self.ephemeral(ip).ok_or(Status::AddrInUse)?,
            p if self.conflicts(ip, p) => return Err(Status::AddrInUse),
            p => p,
        };
        let gen = match self.gens[slot as usize].wrapping_add(1) {
            0 => 1,
            g => g,
        };
        let record = Record {
            app,
            local: SocketAddrV4::new(ip, port),
            remote: None,
            error: 0,
        };
        // Persist before the answer leaves (module docs).
        self.store.publish(slot, gen, &record);
        self.gens[slot as usize] = gen;
        self.index(slot, Sock { record, queued: 0 });
        Ok((handle(slot, gen), record.local))
    }

    /// Connects `app`'s socket `id` to `remote`; 0.0.0.0:0 dissolves the association.
    pub fn connect(&mut self, app: u32, id: SocketId, remote: SocketAddrV4) -> Result<(), Status> {
        let slot = self.own(app, id)?;
        let target = if remote.ip().is_unspecified() && remote.port() == 0 {
            // connect(2) on a datagram socket with AF_UNSPEC: "the socket's peer address is
            // reset" -- it takes datagrams from anyone again.
            None
        } else if remote.port() == 0 || remote.ip().is_unspecified() {
            // No datagram can be sent to port 0, and 0.0.0.0 would mean this host, which
            // keepnet does not loop back to.
            return Err(Status::InvalidInput);
        } else {
            Some(remote)
        };
        self.store.set_remote(slot, target);
        if let Some(s) = self.sock_mut(slot) {
            s.record.remote = target;
        }
        Ok(())
    }

    /// Closes `app`'s socket `id`: its port is free at once.
    pub fn close(&mut self, app: u32, id: SocketId) -> Result<(), Status> {
        let slot = self.own(app, id)?;
        self.close_slot(slot);
        Ok(())
    }

    fn close_slot(&mut self, slot: u32) {
        // Retract first (module docs of `state`): a crash from here on finds it closed.
        self.store.retract(slot);
        self.unindex(slot);
    }

    /// Closes every socket of `app` (it went away). Returns how many.
    pub fn close_app(&mut self, app: u32) -> usize {
        let slots: Vec<u32> = self
            .apps
            .get(&app)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for &slot in &slots {
            self.close_slot(slot);
        }
        slots.len()
    }

    /// Closes the sockets of every application `keep` refuses (after a restart, the
    /// supervisor's list of the living). Returns how many sockets were closed.
    pub fn retain_apps(&mut self, keep: impl Fn(u32) -> bool) -> usize {
        let gone: Vec<u32> = self.apps.keys().copied().filter(|&a| !keep(a)).collect();
        gone.into_iter().map(|a| self.close_app(a)).sum()
    }

    /// Checks a send of `payload` from `app`'s socket `id` to `dst` (0.0.0.0:0: the connected
    /// peer) and returns the header to put in front of it.
    pub fn send(
        &mut self,
        app: u32,
        id: SocketId,
        dst: SocketAddrV4,
        payload: &[u8],
    ) -> Result<Outgoing, Status> {
        let r = self.check_send(app, id, dst, payload.len());
        let (local, dst) = match r {
            Ok(v) => v,
            Err(e) => {
                self.counters.inc(Ctr::TxRefused);
                return Err(e);
            }
        };
        // The source is always named: the checksum covers it (RFC 768 pseudo-header), so it
        // cannot be left for the ip server to choose.
        let src = if local.ip().is_unspecified() {
            self.cfg.addr
        } else {
            *local.ip()
        };
        let header = udp_header(src, local.port(), *dst.ip(), dst.port(), payload);
        self.counters.inc(Ctr::TxDatagrams);
        self.counters.add(Ctr::TxBytes, payload.len() as u64);
        Ok(Outgoing { src, dst, header })
    }

    fn check_send(
        &self,
        app: u32,
        id: SocketId,
        dst: SocketAddrV4,
        len: usize,
    ) -> Result<(SocketAddrV4, SocketAddrV4), Status> {
        let slot = self.own(app, id)?;
        let s = self.sock(slot).ok_or(Status::BadSocket)?;
        // 65535 - 20 (IP header) - 8 (UDP header): Linux's EMSGSIZE.
        if len > MAX_UDP_PAYLOAD {
            return Err(Status::MessageTooLong);
        }
        let dst = if dst.ip().is_unspecified() && dst.port() == 0 {
            // No destination: the connected peer, else ENOTCONN (send(2) on an unconnected
            // datagram socket) -- Linux says EDESTADDRREQ, std maps both to NotConnected.
            s.record.remote.ok_or(Status::NotConnected)?
        } else if dst.port() == 0 || dst.ip().is_unspecified() {
            // Linux: EINVAL for port 0.
            return Err(Status::InvalidInput);
        } else {
            // A connected socket may still name a destination (Linux allows sendto on a
            // connected UDP socket).
            dst
        };
        Ok((s.record.local, dst))
    }

    /// Takes a received datagram. `packet` is the IP header the ip server copied
    /// (`header_len` bytes, 0 if it copied none) followed by the IP payload, the UDP datagram.
    pub fn receive(&mut self, meta: &RxMeta, packet: &[u8], header_len: usize) -> Rx {
        self.counters.inc(Ctr::RxDatagrams);
        let header_len = if header_len <= packet.len() { header_len } else { 0 };
        let datagram = packet.get(header_len..).unwrap_or(&[]);
        let pkt = match UdpPacket::new_checked(datagram) {
            Ok(p) => p,
            Err(WireError::Short(_)) => return self.drop(Ctr::DropShort),
            Err(WireError::BadLength { .. }) => return self.drop(Ctr::DropLength),
        };
        // RFC 1122 4.1.3.6: "A UDP datagram received with an invalid IP source address
        // (e.g., a broadcast or multicast address) must be discarded by UDP or by the IP
        // layer."
        if meta.src.is_broadcast() || meta.src.is_multicast() {
            return self.drop(Ctr::DropBadSrc);
        }
        // RFC 1122 4.1.3.4: "If a UDP datagram is received with a checksum that is non-zero
        // and invalid, UDP MUST silently discard the datagram." Zero means none was sent.
        if !pkt.checksum_ok(meta.src, meta.dst) {
            return self.drop(Ctr::DropChecksum);
        }
        let to_group = meta.broadcast || meta.dst.is_broadcast() || meta.dst.is_multicast();
        let from = SocketAddrV4::new(meta.src, pkt.src_port());
        match self.demux(meta.dst, pkt.dst_port(), from, to_group) {
            Some(slot) => {
                let limit = self.cfg.rcvbuf;
                let id = self.id(slot);
                let Some(s) = self.sock_mut(slot) else {
                    return self.drop(Ctr::DropNoSocket);
                };
                // The socket's receive queue is full: drop (UDP promises nothing; Linux
                // drops on a full SO_RCVBUF the same way and counts RcvbufErrors).
                if s.queued >= limit {
                    return self.drop(Ctr::DropRcvbufFull);
                }
                s.queued += 1;
                let app = s.record.app;
                self.counters.inc(Ctr::RxDelivered);
                self.counters.add(Ctr::RxBytes, pkt.payload().len() as u64);
                let start = header_len + pkt.payload_offset();
                Rx::Deliver {
                    socket: id,
                    app,
                    from,
                    payload: start..header_len + usize::from(pkt.len()),
                }
            }
            None => {
                self.counters.inc(Ctr::DropNoSocket);
                // RFC 1122 4.1.3.1: "If a datagram arrives addressed to a UDP port for which
                // there is no pending LISTEN call, UDP SHOULD send an ICMP Port Unreachable
                // message." RFC 1122 3.2.2: "An ICMP error message MUST NOT be sent as the
                // result of receiving: ... a datagram destined to an IP broadcast or IP
                // multicast address, ... sent as a link-layer broadcast, ... whose source
                // address does not define a single host". The quote needs the IP header.
                let header = packet.get(..header_len).unwrap_or(&[]);
                if to_group || !names_one_host(meta.src) || !ipv4_header_ok(header) {
                    self.counters.inc(Ctr::IcmpUnreachSuppressed);
                    return Rx::Dropped(Ctr::DropNoSocket);
                }
                self.counters.inc(Ctr::IcmpUnreachSent);
                // RFC 1122 3.2.2: the quote is "the Internet header and at least the first 8
                // data octets of the datagram that triggered the error message"; RFC 1812
                // 4.3.2.3 asks for as much as fits in 576 bytes.
                Rx::Unreachable {
                    quote: 0..packet.len().min(MAX_QUOTE),
                }
            }
        }
    }

    fn drop(&mut self, why: Ctr) -> Rx {
        self.counters.inc(why);
        Rx::Dropped(why)
    }

    /// The socket a datagram to `dst:port` from `from` belongs to. Linux's `compute_score`:
    /// a socket bound to a specific address takes only datagrams to that address; a
    /// connected socket takes only datagrams from its peer (RFC 1122 4.1.3.5 leaves the
    /// filtering of a "connected" UDP socket to the implementation; BSD and Linux filter),
    /// and since connecting binds it to our unicast address, no broadcasts; among the
    /// rest, the most specific match wins: connected, then bound to an address, then
    /// bound to 0.0.0.0.
    fn demux(&self, dst: Ipv4Addr, port: u16, from: SocketAddrV4, to_group: bool) -> Option<u32> {
        let mut best: Option<(u32, u32)> = None;
        for &slot in self.ports.get(&port)? {
            let Some(s) = self.sock(slot) else { continue };
            let mut score = 1;
            let local = *s.record.local.ip();
            if !local.is_unspecified() {
                if local != dst {
                    continue;
                }
                score += 4;
            }
            if let Some(peer) = s.record.remote {
                if to_group || peer != from {
                    continue;
                }
                score += 8;
            }
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((slot, score));
            }
        }
        best.map(|(slot, _)| slot)
    }

    /// Takes an ICMP error about a datagram we sent; `quote` is the quoted IP header and
    /// what followed. RFC 1122 4.1.3.3 asks UDP to pass ICMP errors to the application;
    /// like Linux without IP_RECVERR, only a connected socket whose peer is the quoted
    /// destination gets one (an unconnected socket cannot tell which of its destinations
    /// it is about), and only a hard error. Returns the error to report, now pending on the
    /// socket (and in the store) until [`Engine::error_reported`].
    pub fn icmp_error(&mut self, meta: &IcmpMeta, quote: &[u8]) -> Option<AsyncError> {
        self.counters.inc(Ctr::IcmpErrorsIn);
        let q = match Quote::parse(quote) {
            Some(q) if q.protocol == PROTO_UDP => q,
            _ => {
                self.counters.inc(Ctr::DropIcmpMalformed);
                return None;
            }
        };
        let Some(status) = icmp_status(meta.icmp_type, meta.icmp_code) else {
            self.counters.inc(Ctr::IcmpErrorsIgnored);
            return None;
        };
        let peer = SocketAddrV4::new(q.dst, q.dst_port);
        let slot = self.ports.get(&q.src_port).and_then(|slots| {
            slots.iter().copied().find(|&s| {
                self.sock(s).is_some_and(|s| {
                    let local = *s.record.local.ip();
                    s.record.remote == Some(peer) && (local.is_unspecified() || local == q.src)
                })
            })
        });
        let Some(slot) = slot else {
            self.counters.inc(Ctr::IcmpErrorsIgnored);
            return None;
        };
        let id = self.id(slot);
        self.store.set_error(slot, status.code());
        let s = self.sock_mut(slot)?;
        s.record.error = status.code();
        let app = s.record.app;
        self.counters.inc(Ctr::IcmpErrorsReported);
        Some(AsyncError {
            app,
            socket: id,
            status,
        })
    }

    /// The errors pending on `app`'s sockets (to report again after a restart).
    pub fn pending_errors(&self, app: u32) -> Vec<AsyncError> {
        let Some(slots) = self.apps.get(&app) else {
            return Vec::new();
        };
        slots
            .iter()
            .filter_map(|&slot| {
                let s = self.sock(slot)?;
                let status = async_status(s.record.error)?;
                Some(AsyncError {
                    app,
                    socket: self.id(slot),
                    status,
                })
            })
            .collect()
    }

    /// The application was told of `status` on `id`: clears it unless another error came
    /// since.
    pub fn error_reported(&mut self, id: SocketId, status: Status) {
        let Some(slot) = self.slot_of(id) else { return };
        if self.sock(slot).is_some_and(|s| s.record.error == status.code()) {
            self.store.set_error(slot, 0);
            if let Some(s) = self.sock_mut(slot) {
                s.record.error = 0;
            }
        }
    }

    /// A datagram of `app`'s socket `id` left its receive queue: handed back by the
    /// application, or never delivered after all. Returns false (and changes nothing) if
    /// `id` is not a socket of `app` (closed since, or a stale or forged tag).
    pub fn release(&mut self, app: u32, id: SocketId) -> bool {
        let Ok(slot) = self.own(app, id) else {
            return false;
        };
        match self.sock_mut(slot) {
            Some(s) => {
                s.queued = s.queued.saturating_sub(1);
                true
            }
            None => false,
        }
    }

    /// After a restart: a datagram of `app`'s socket `id` is still with the application
    /// (found from the buffers it holds). Returns false if `id` is not a socket of `app`.
    pub fn note_outstanding(&mut self, app: u32, id: SocketId) -> bool {
        let Ok(slot) = self.own(app, id) else {
            return false;
        };
        match self.sock_mut(slot) {
            Some(s) => {
                s.queued = s.queued.saturating_add(1);
                true
            }
            None => false,
        }
    }
}
