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
            gens: slots.iter().map(|s| s.gen).collect(),
            free: BTreeSet::new(),
            ports: BTreeMap::new(),
            apps: BTreeMap::new(),
            next_ephemeral: start,
            counters: Counters::default(),
        };
        // Free slots are collected first and the set built in one go (4096 single inserts
        // took a few hundred microseconds of a live update's blackout).
        let mut free = Vec::new();
        for (i, s) in slots.into_iter().enumerate() {
            let slot = i as u32;
            let Some(mut r) = s.record else {
                free.push(slot);
                continue;
            };
            if r.local.port() == 0 || s.gen == 0 || e.conflicts(*r.local.ip(), r.local.port()) {
                e.store.retract(slot);
                e.counters.inc(Ctr::StateRepaired);
                free.push(slot);
                continue;
            }
            if r.remote
                .is_some_and(|a| a.port() == 0 || a.ip().is_unspecified())
            {
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
        e.free = free.into_iter().collect();
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
        match self.sock(slot) {
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
        self.ports
            .entry(s.record.local.port())
            .or_default()
            .push(slot);
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
    /// `request` is the id of the application's BIND request, kept with the socket so
    /// that a replay of the same request finds it ([`Engine::find_bind`]).
    pub fn bind(
        &mut self,
        app: u32,
        local: SocketAddrV4,
        request: u32,
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
        let last = self.gens.get(slot as usize).copied().unwrap_or(0);
        let gen = match last.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        let record = Record {
            app,
            local: SocketAddrV4::new(ip, port),
            remote: None,
            error: 0,
            bind_id: request,
        };
        // Persist before the answer leaves (module docs).
        self.store.publish(slot, gen, &record);
        if let Some(g) = self.gens.get_mut(slot as usize) {
            *g = gen;
        }
        self.index(slot, Sock { record, queued: 0 });
        Ok((handle(slot, gen), record.local))
    }

    /// The socket `app` bound with its BIND request `request`, if it is still open: after a
    /// restart, a BIND the predecessor carried out but did not commit is answered with it
    /// rather than carried out twice (`crate::server`).
    pub fn find_bind(&self, app: u32, request: u32) -> Option<(SocketId, SocketAddrV4)> {
        self.apps.get(&app)?.iter().find_map(|&slot| {
            let s = self.sock(slot)?;
            (s.record.bind_id == request).then(|| (self.id(slot), s.record.local))
        })
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
        let header_len = if header_len <= packet.len() {
            header_len
        } else {
            0
        };
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
        if self
            .sock(slot)
            .is_some_and(|s| s.record.error == status.code())
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{MemStore, SlotState};

    const OUR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);

    fn engine() -> Engine<MemStore> {
        Engine::open(Config::new(OUR), MemStore::new(64))
    }

    fn wild(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)
    }

    fn ours(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(OUR, port)
    }

    /// A checksum computed the slow, obvious way (RFC 1071, 16 bits at a time), independent
    /// of `wire`'s.
    fn reference_sum(parts: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = parts.concat();
        let mut s: u32 = 0;
        for c in bytes.chunks(2) {
            s += (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0));
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
        }
        s as u16
    }

    fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0, 17]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p
    }

    /// A datagram built by hand, checksum by the reference.
    fn datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let len = 8 + payload.len();
        let mut d = Vec::new();
        d.extend_from_slice(&src.port().to_be_bytes());
        d.extend_from_slice(&dst.port().to_be_bytes());
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        let c = !reference_sum(&[&pseudo(*src.ip(), *dst.ip(), len), &d]);
        let c = if c == 0 { 0xffff } else { c };
        d[6..8].copy_from_slice(&c.to_be_bytes());
        d
    }

    fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x45, 0, 0, 0, 0, 1, 0, 0, 64, 17, 0, 0];
        h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
        h.extend_from_slice(&src.octets());
        h.extend_from_slice(&dst.octets());
        h
    }

    /// The packet the server hands the engine: the IP header, then the datagram.
    fn packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
        let d = datagram(src, dst, payload);
        let mut p = ip_header(*src.ip(), *dst.ip(), d.len());
        p.extend_from_slice(&d);
        p
    }

    fn meta(src: Ipv4Addr, dst: Ipv4Addr) -> RxMeta {
        RxMeta {
            src,
            dst,
            broadcast: false,
        }
    }

    #[track_caller]
    fn rx(e: &mut Engine<MemStore>, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Rx {
        let p = packet(src, dst, payload);
        e.receive(&meta(*src.ip(), *dst.ip()), &p, 20)
    }

    #[track_caller]
    fn delivered_to(r: &Rx) -> SocketId {
        match r {
            Rx::Deliver { socket, .. } => *socket,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    // ---- bind --------------------------------------------------------------------------

    #[test]
    fn bind_conflicts_follow_linux_without_reuseaddr() {
        let mut e = engine();
        let (a, got) = e.bind(1, wild(53), 0).unwrap();
        assert_eq!(got, wild(53));
        // 0.0.0.0 overlaps every address: any second bind on the port clashes.
        assert_eq!(e.bind(2, ours(53), 0), Err(Status::AddrInUse));
        assert_eq!(e.bind(1, wild(53), 0), Err(Status::AddrInUse));
        // A specific address clashes with itself and with the wildcard.
        e.bind(2, ours(54), 0).unwrap();
        assert_eq!(e.bind(3, wild(54), 0), Err(Status::AddrInUse));
        assert_eq!(e.bind(3, ours(54), 0), Err(Status::AddrInUse));
        // Only our address or the wildcard.
        assert_eq!(
            e.bind(1, SocketAddrV4::new(OTHER, 55), 0),
            Err(Status::AddrNotAvailable)
        );
        assert_eq!(
            e.bind(1, SocketAddrV4::new(Ipv4Addr::BROADCAST, 55), 0),
            Err(Status::AddrNotAvailable)
        );
        // Closing frees the port at once.
        e.close(1, a).unwrap();
        e.bind(3, ours(53), 0).unwrap();
        assert_eq!(e.socket_count(), 2);
    }

    #[test]
    fn ephemeral_ports_rotate_skip_used_and_run_out() {
        let mut cfg = Config::new(OUR);
        cfg.ephemeral = 50000..=50003;
        let mut e = Engine::open(cfg, MemStore::new(64));
        e.bind(9, wild(50001), 0).unwrap();
        let ports: Vec<u16> = (0..3)
            .map(|_| e.bind(1, wild(0), 0).unwrap().1.port())
            .collect();
        assert_eq!(ports, vec![50000, 50002, 50003]);
        assert_eq!(
            e.bind(1, wild(0), 0),
            Err(Status::AddrInUse),
            "range exhausted"
        );
        assert_eq!(e.bind(1, ours(0), 0), Err(Status::AddrInUse));
        // A port freed is found again, from where the search left off.
        let s = e.sockets_of(1)[0];
        e.close(1, s).unwrap();
        assert_eq!(e.bind(2, ours(0), 0).unwrap().1, ours(50000));
        // The cursor folds into the range and rotates.
        e.set_ephemeral_cursor(7);
        assert!((50000..=50003).contains(&e.ephemeral_cursor()));
        // Default range.
        let mut d = engine();
        d.set_ephemeral_cursor(65535);
        let p1 = d.bind(1, wild(0), 0).unwrap().1.port();
        let p2 = d.bind(1, wild(0), 0).unwrap().1.port();
        assert_eq!((p1, p2), (65535, 49152), "wraps round the range");
    }

    #[test]
    fn a_full_table_refuses_and_handles_are_checked() {
        let mut e = Engine::open(Config::new(OUR), MemStore::new(2));
        let (a, _) = e.bind(1, wild(1000), 0).unwrap();
        let (b, _) = e.bind(1, wild(1001), 0).unwrap();
        assert_eq!(e.bind(1, wild(1002), 0), Err(Status::NoSockets));
        // Another app's socket, an unknown one, a stale one.
        assert_eq!(e.close(2, a), Err(Status::BadSocket));
        assert_eq!(
            e.connect(2, a, SocketAddrV4::new(PEER, 1)),
            Err(Status::BadSocket)
        );
        assert_eq!(e.close(1, 0xdead_0001), Err(Status::BadSocket));
        e.close(1, b).unwrap();
        let (c, _) = e.bind(1, wild(1003), 0).unwrap();
        assert_ne!(b, c, "the slot is reused at a new generation");
        assert_eq!(split_handle(b).0, split_handle(c).0);
        assert_eq!(e.close(1, b), Err(Status::BadSocket), "stale handle");
        assert!(e.send(1, b, SocketAddrV4::new(PEER, 7), b"x").is_err());
    }

    // ---- connect and demux -------------------------------------------------------------

    #[test]
    fn connected_socket_takes_only_its_peer() {
        let mut e = engine();
        let (s, _) = e.bind(1, wild(4000), 0).unwrap();
        let peer = SocketAddrV4::new(PEER, 53);
        assert_eq!(
            e.connect(1, s, SocketAddrV4::new(PEER, 0)),
            Err(Status::InvalidInput)
        );
        assert_eq!(e.connect(1, s, wild(53)), Err(Status::InvalidInput));
        e.connect(1, s, peer).unwrap();
        assert_eq!(e.store().load()[0].record.unwrap().remote, Some(peer));
        assert_eq!(delivered_to(&rx(&mut e, peer, ours(4000), b"hi")), s);
        // Another host, or another port of the peer: no socket, so port unreachable.
        let stranger = rx(&mut e, SocketAddrV4::new(OTHER, 53), ours(4000), b"x");
        assert!(matches!(stranger, Rx::Unreachable { .. }), "{stranger:?}");
        let other_port = rx(&mut e, SocketAddrV4::new(PEER, 54), ours(4000), b"x");
        assert!(matches!(other_port, Rx::Unreachable { .. }));
        // 0.0.0.0:0 dissolves the association.
        e.connect(1, s, wild(0)).unwrap();
        assert_eq!(e.store().load()[0].record.unwrap().remote, None);
        assert_eq!(
            delivered_to(&rx(&mut e, SocketAddrV4::new(OTHER, 9), ours(4000), b"x")),
            s
        );
    }

    #[test]
    fn demux_by_local_address_and_broadcast() {
        let mut e = engine();
        let (specific, _) = e.bind(1, ours(67), 0).unwrap();
        let (wild, _) = e.bind(1, wild(68), 0).unwrap();
        let from = SocketAddrV4::new(PEER, 68);
        let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
        assert_eq!(delivered_to(&rx(&mut e, from, ours(67), b"u")), specific);
        // A socket bound to our address does not see broadcasts (Linux: rcv_saddr != daddr).
        let r = rx(&mut e, from, bcast, b"b");
        assert_eq!(r, Rx::Dropped(Ctr::DropNoSocket));
        // The wildcard socket does, on the IP broadcast address or a link-layer broadcast.
        let bcast68 = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
        assert_eq!(delivered_to(&rx(&mut e, from, bcast68, b"b")), wild);
        let p = packet(from, ours(68), b"l2");
        let m = RxMeta {
            broadcast: true,
            ..meta(PEER, OUR)
        };
        assert_eq!(delivered_to(&e.receive(&m, &p, 20)), wild);
        // Once connected, it no longer does, even from its peer.
        e.connect(1, wild, from).unwrap();
        assert_eq!(
            rx(&mut e, from, bcast68, b"b"),
            Rx::Dropped(Ctr::DropNoSocket)
        );
        assert_eq!(delivered_to(&rx(&mut e, from, ours(68), b"u")), wild);
    }

    // ---- send --------------------------------------------------------------------------

    #[test]
    fn send_builds_a_header_whose_checksum_verifies_independently() {
        let mut e = engine();
        let (s, _) = e.bind(1, wild(5000), 0).unwrap();
        let dst = SocketAddrV4::new(PEER, 53);
        for payload in [&b""[..], b"a", b"hello, world", &[0xffu8; 1001][..]] {
            let out = e.send(1, s, dst, payload).unwrap();
            assert_eq!(out.src, OUR, "the source is named for the checksum");
            assert_eq!(out.dst, dst);
            let h = out.header;
            assert_eq!(u16::from_be_bytes([h[0], h[1]]), 5000);
            assert_eq!(u16::from_be_bytes([h[2], h[3]]), 53);
            assert_eq!(
                usize::from(u16::from_be_bytes([h[4], h[5]])),
                8 + payload.len()
            );
            assert_ne!(
                u16::from_be_bytes([h[6], h[7]]),
                0,
                "checksums are always sent"
            );
            let total = reference_sum(&[&pseudo(OUR, PEER, 8 + payload.len()), &h, payload]);
            assert_eq!(
                total,
                0xffff,
                "checksum verifies (payload {} bytes)",
                payload.len()
            );
            // And the receiving side of a peer engine agrees.
            let mut d = h.to_vec();
            d.extend_from_slice(payload);
            let mut peer = Engine::open(Config::new(PEER), MemStore::new(4));
            peer.bind(1, wild(53), 0).unwrap();
            assert!(matches!(
                peer.receive(&meta(OUR, PEER), &d, 0),
                Rx::Deliver { .. }
            ));
        }
        assert_eq!(e.count(Ctr::TxDatagrams), 4);
    }

    #[test]
    fn a_computed_checksum_of_zero_is_sent_as_all_ones() {
        let mut e = engine();
        let (s, _) = e.bind(1, wild(5000), 0).unwrap();
        let dst = SocketAddrV4::new(PEER, 53);
        // Pick the last payload word so that the sum of everything else plus it is 0xffff:
        // the complement, the checksum, is then 0 (RFC 768: send 0xffff instead).
        let mut payload = [0x12u8, 0x34, 0, 0];
        let mut head = [0u8; 8];
        head[0..2].copy_from_slice(&5000u16.to_be_bytes());
        head[2..4].copy_from_slice(&53u16.to_be_bytes());
        head[4..6].copy_from_slice(&12u16.to_be_bytes());
        let rest = reference_sum(&[&pseudo(OUR, PEER, 12), &head, &payload]);
        payload[2..4].copy_from_slice(&(0xffff - rest).to_be_bytes());
        let out = e.send(1, s, dst, &payload).unwrap();
        assert_eq!(&out.header[6..8], &[0xff, 0xff]);
        let total = reference_sum(&[&pseudo(OUR, PEER, 12), &out.header, &payload]);
        assert_eq!(total, 0xffff);
    }

    #[test]
    fn send_errors() {
        let mut e = engine();
        let (s, _) = e.bind(1, ours(5000), 0).unwrap();
        assert_eq!(e.send(1, s, wild(0), b"x"), Err(Status::NotConnected));
        assert_eq!(
            e.send(1, s, SocketAddrV4::new(PEER, 0), b"x"),
            Err(Status::InvalidInput)
        );
        assert_eq!(e.send(1, s, wild(7), b"x"), Err(Status::InvalidInput));
        let big = vec![0u8; MAX_UDP_PAYLOAD + 1];
        let dst = SocketAddrV4::new(PEER, 7);
        assert_eq!(e.send(1, s, dst, &big), Err(Status::MessageTooLong));
        assert!(e.send(1, s, dst, &big[..MAX_UDP_PAYLOAD]).is_ok());
        assert_eq!(e.send(2, s, dst, b"x"), Err(Status::BadSocket));
        assert_eq!(e.count(Ctr::TxRefused), 5);
        // Connected: no destination means the peer; a named one still goes there.
        e.connect(1, s, SocketAddrV4::new(PEER, 9)).unwrap();
        assert_eq!(
            e.send(1, s, wild(0), b"x").unwrap().dst,
            SocketAddrV4::new(PEER, 9)
        );
        assert_eq!(e.send(1, s, dst, b"x").unwrap().dst, dst);
    }

    // ---- receive -----------------------------------------------------------------------

    #[test]
    fn checksum_good_bad_and_absent() {
        let mut e = engine();
        let (s, _) = e.bind(1, wild(7), 0).unwrap();
        let from = SocketAddrV4::new(PEER, 1234);
        let p = packet(from, ours(7), b"payload");
        match e.receive(&meta(PEER, OUR), &p, 20) {
            Rx::Deliver {
                socket,
                app,
                from: f,
                payload,
            } => {
                assert_eq!((socket, app, f), (s, 1, from));
                assert_eq!(&p[payload], b"payload");
            }
            other => panic!("{other:?}"),
        }
        // One bit flipped in the payload.
        let mut bad = p.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            e.receive(&meta(PEER, OUR), &bad, 20),
            Rx::Dropped(Ctr::DropChecksum)
        );
        // The pseudo-header counts: the same bytes "from" another host fail.
        assert_eq!(
            e.receive(&meta(OTHER, OUR), &p, 20),
            Rx::Dropped(Ctr::DropChecksum)
        );
        // Zero: no checksum was computed; accepted even with the payload changed.
        bad[20 + 6] = 0;
        bad[20 + 7] = 0;
        assert!(matches!(
            e.receive(&meta(PEER, OUR), &bad, 20),
            Rx::Deliver { .. }
        ));
        assert_eq!(e.count(Ctr::DropChecksum), 2);
        assert_eq!(e.count(Ctr::RxDelivered), 2);
    }

    #[test]
    fn length_field_against_the_datagram() {
        let mut e = engine();
        e.bind(1, wild(7), 0).unwrap();
        let from = SocketAddrV4::new(PEER, 1);
        let m = meta(PEER, OUR);
        // Shorter than a header.
        assert_eq!(
            e.receive(&m, &[0, 1, 0, 7, 0, 7, 0], 0),
            Rx::Dropped(Ctr::DropShort)
        );
        // Length field beyond the bytes received (a truncated datagram).
        let mut d = datagram(from, ours(7), b"abcd");
        d[5] = 13;
        assert_eq!(e.receive(&m, &d, 0), Rx::Dropped(Ctr::DropLength));
        // Length field below 8.
        d[5] = 7;
        assert_eq!(e.receive(&m, &d, 0), Rx::Dropped(Ctr::DropLength));
        // Bytes after the length field (padding) are not data.
        let mut padded = datagram(from, ours(7), b"abcd");
        padded.extend_from_slice(&[0xee; 6]);
        match e.receive(&m, &padded, 0) {
            Rx::Deliver { payload, .. } => assert_eq!(&padded[payload], b"abcd"),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.count(Ctr::DropLength), 2);
        assert_eq!(e.count(Ctr::DropShort), 1);
    }

    #[test]
    fn closed_port_asks_for_port_unreachable_but_not_for_groups_or_odd_sources() {
        let mut e = engine();
        let from = SocketAddrV4::new(PEER, 999);
        let p = packet(from, ours(9), b"knock");
        match e.receive(&meta(PEER, OUR), &p, 20) {
            Rx::Unreachable { quote } => {
                assert_eq!(
                    quote,
                    0..p.len(),
                    "the header and the whole (short) datagram"
                );
                assert_eq!(&p[..20], &ip_header(PEER, OUR, 13)[..]);
            }
            other => panic!("{other:?}"),
        }
        // A long datagram is quoted up to 576 bytes of ICMP datagram.
        let long = packet(from, ours(9), &[7u8; 2000]);
        assert_eq!(
            e.receive(&meta(PEER, OUR), &long, 20),
            Rx::Unreachable {
                quote: 0..MAX_QUOTE
            }
        );
        assert_eq!(e.count(Ctr::IcmpUnreachSent), 2);
        let suppressed =
            |e: &mut Engine<MemStore>, m: RxMeta, src: SocketAddrV4, dst: SocketAddrV4| {
                let p = packet(src, dst, b"x");
                assert_eq!(
                    e.receive(&m, &p, 20),
                    Rx::Dropped(Ctr::DropNoSocket),
                    "{m:?}"
                );
            };
        // RFC 1122 3.2.2: not for a link-layer broadcast, an IP broadcast or multicast...
        let l2 = RxMeta {
            broadcast: true,
            ..meta(PEER, OUR)
        };
        suppressed(&mut e, l2, from, ours(9));
        let b = SocketAddrV4::new(Ipv4Addr::BROADCAST, 9);
        suppressed(&mut e, meta(PEER, Ipv4Addr::BROADCAST), from, b);
        let g = SocketAddrV4::new(Ipv4Addr::new(224, 0, 0, 251), 5353);
        suppressed(&mut e, meta(PEER, *g.ip()), from, g);
        // ... nor to a source that is not one host.
        for src in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::new(240, 0, 0, 1),
        ] {
            suppressed(&mut e, meta(src, OUR), SocketAddrV4::new(src, 1), ours(9));
        }
        // Without the IP header there is nothing to quote.
        let d = datagram(from, ours(9), b"x");
        assert_eq!(
            e.receive(&meta(PEER, OUR), &d, 0),
            Rx::Dropped(Ctr::DropNoSocket)
        );
        assert_eq!(e.count(Ctr::IcmpUnreachSent), 2);
        assert_eq!(e.count(Ctr::IcmpUnreachSuppressed), 7);
        assert_eq!(e.count(Ctr::DropNoSocket), 9);
    }

    #[test]
    fn broadcast_or_multicast_sources_are_dropped() {
        let mut e = engine();
        e.bind(1, wild(7), 0).unwrap();
        for src in [Ipv4Addr::BROADCAST, Ipv4Addr::new(239, 1, 1, 1)] {
            let p = packet(SocketAddrV4::new(src, 1), ours(7), b"x");
            assert_eq!(
                e.receive(&meta(src, OUR), &p, 20),
                Rx::Dropped(Ctr::DropBadSrc)
            );
        }
    }

    #[test]
    fn receive_queue_is_bounded_per_socket() {
        let mut cfg = Config::new(OUR);
        cfg.rcvbuf = 2;
        let mut e = Engine::open(cfg, MemStore::new(8));
        let (s, _) = e.bind(1, wild(7), 0).unwrap();
        let (t, _) = e.bind(1, wild(8), 0).unwrap();
        let from = SocketAddrV4::new(PEER, 1);
        assert_eq!(delivered_to(&rx(&mut e, from, ours(7), b"1")), s);
        assert_eq!(delivered_to(&rx(&mut e, from, ours(7), b"2")), s);
        assert_eq!(
            rx(&mut e, from, ours(7), b"3"),
            Rx::Dropped(Ctr::DropRcvbufFull)
        );
        // Other sockets have their own queue.
        assert_eq!(delivered_to(&rx(&mut e, from, ours(8), b"x")), t);
        // A datagram handed back makes room; another app's release is refused.
        assert!(!e.release(2, s));
        assert!(e.release(1, s));
        assert_eq!(delivered_to(&rx(&mut e, from, ours(7), b"4")), s);
        assert_eq!(e.socket(s).unwrap().queued, 2);
        assert_eq!(e.count(Ctr::DropRcvbufFull), 1);
        // After a restart the server re-counts what the app holds.
        let mut f = Engine::open(e.config().clone(), e.store().clone());
        assert_eq!(f.socket(s).unwrap().queued, 0);
        assert!(f.note_outstanding(1, s) && f.note_outstanding(1, s));
        assert!(!f.note_outstanding(2, s));
        assert_eq!(rx_f(&mut f, from), Rx::Dropped(Ctr::DropRcvbufFull));
        fn rx_f(f: &mut Engine<MemStore>, from: SocketAddrV4) -> Rx {
            rx(f, from, ours(7), b"5")
        }
    }

    // ---- ICMP errors -------------------------------------------------------------------

    /// The quote of an ICMP error about a datagram we sent from `local` to `peer`.
    fn quote(local: SocketAddrV4, peer: SocketAddrV4) -> Vec<u8> {
        packet(local, peer, b"q")[..28].to_vec()
    }

    fn icmp(t: u8, c: u8) -> IcmpMeta {
        IcmpMeta {
            from: PEER,
            icmp_type: t,
            icmp_code: c,
        }
    }

    #[test]
    fn icmp_errors_reach_connected_sockets_only() {
        let mut e = engine();
        let peer = SocketAddrV4::new(PEER, 53);
        let (c, _) = e.bind(1, wild(6000), 0).unwrap();
        e.connect(1, c, peer).unwrap();
        let (u, _) = e.bind(1, wild(6001), 0).unwrap();
        // Port unreachable for the connected socket: ConnectionRefused, pending in the store.
        let got = e.icmp_error(&icmp(3, 3), &quote(ours(6000), peer));
        assert_eq!(
            got,
            Some(AsyncError {
                app: 1,
                socket: c,
                status: Status::ConnectionRefused
            })
        );
        assert_eq!(
            e.store().load()[0].record.unwrap().error,
            Status::ConnectionRefused.code()
        );
        assert_eq!(e.pending_errors(1), vec![got.unwrap()]);
        e.error_reported(c, Status::ConnectionRefused);
        assert!(e.pending_errors(1).is_empty());
        assert_eq!(e.store().load()[0].record.unwrap().error, 0);
        // The unconnected socket ignores them (Linux without IP_RECVERR).
        assert_eq!(e.icmp_error(&icmp(3, 3), &quote(ours(6001), peer)), None);
        assert!(e.pending_errors(1).is_empty());
        let _ = u;
        // About another peer of the connected socket's port: not its business.
        let elsewhere = SocketAddrV4::new(OTHER, 53);
        assert_eq!(
            e.icmp_error(&icmp(3, 3), &quote(ours(6000), elsewhere)),
            None
        );
        // The other codes.
        let q = quote(ours(6000), peer);
        let status =
            |e: &mut Engine<MemStore>, t, code| e.icmp_error(&icmp(t, code), &q).map(|x| x.status);
        assert_eq!(status(&mut e, 3, 1), Some(Status::HostUnreachable));
        assert_eq!(status(&mut e, 3, 0), Some(Status::NetworkUnreachable));
        assert_eq!(status(&mut e, 3, 13), Some(Status::HostUnreachable));
        assert_eq!(status(&mut e, 3, 4), None, "fragmentation needed is soft");
        assert_eq!(status(&mut e, 11, 0), None, "time exceeded is soft");
        assert_eq!(
            e.pending_errors(1)[0].status,
            Status::HostUnreachable,
            "the last hard one"
        );
        // Reporting an older error does not clear a newer one.
        e.error_reported(c, Status::ConnectionRefused);
        assert_eq!(e.pending_errors(1).len(), 1);
        // Malformed quotes.
        assert_eq!(e.icmp_error(&icmp(3, 3), &q[..27]), None);
        let mut tcp = q.clone();
        tcp[9] = 6;
        assert_eq!(e.icmp_error(&icmp(3, 3), &tcp), None);
        assert_eq!(e.count(Ctr::DropIcmpMalformed), 2);
        assert_eq!(e.count(Ctr::IcmpErrorsIn), 10);
        assert_eq!(e.count(Ctr::IcmpErrorsReported), 4);
    }

    // ---- apps, restart -----------------------------------------------------------------

    #[test]
    fn closing_an_app_frees_its_ports() {
        let mut e = engine();
        e.bind(1, wild(10), 0).unwrap();
        e.bind(1, wild(11), 0).unwrap();
        e.bind(2, wild(12), 0).unwrap();
        e.bind(3, wild(13), 0).unwrap();
        assert_eq!(e.close_app(1), 2);
        e.bind(4, wild(10), 0).unwrap();
        assert_eq!(e.retain_apps(|a| a == 4 || a == 3), 1);
        assert_eq!(e.apps(), vec![3, 4]);
        e.bind(4, wild(12), 0).unwrap();
        assert_eq!(e.close_app(99), 0);
    }

    #[test]
    fn a_rebuilt_engine_has_the_same_indexes_and_repairs_garbage() {
        let mut e = engine();
        let (a, _) = e.bind(1, wild(10), 0).unwrap();
        let (b, _) = e.bind(2, ours(0), 0).unwrap();
        e.connect(2, b, SocketAddrV4::new(PEER, 7)).unwrap();
        e.bind(2, wild(11), 0).unwrap();
        e.close(1, a).unwrap();
        e.icmp_error(
            &icmp(3, 3),
            &quote(
                ours(e.socket(b).unwrap().record.local.port()),
                SocketAddrV4::new(PEER, 7),
            ),
        );
        let f = Engine::open(e.config().clone(), e.store().clone());
        assert_eq!(f.indexes(), e.indexes());
        assert_eq!(f.pending_errors(2), e.pending_errors(2));
        // A store holding what this engine never writes is repaired, and counted.
        let mut s = MemStore::new(8);
        let r = |port, remote, error| Record {
            app: 1,
            local: wild(port),
            remote,
            error,
            bind_id: 0,
        };
        s.publish(0, 1, &r(20, None, 0));
        s.publish(1, 1, &r(20, None, 0)); // conflicts with slot 0
        s.publish(2, 1, &r(0, None, 0)); // port 0
        s.publish(3, 0, &r(21, None, 0)); // generation 0
        s.publish(4, 1, &r(22, Some(SocketAddrV4::new(PEER, 0)), 77)); // bad peer, bad error
        let g = Engine::open(Config::new(OUR), s);
        assert_eq!(g.count(Ctr::StateRepaired), 5);
        assert_eq!(g.socket_count(), 2);
        let slots = g.store().load();
        assert_eq!(
            slots[1],
            SlotState {
                gen: 1,
                record: None
            }
        );
        assert_eq!(slots[4].record.unwrap(), r(22, None, 0));
    }

    // ---- kill at any point -------------------------------------------------------------

    mod cut {
        use std::cell::RefCell;
        use std::rc::Rc;

        use keepnet_ipc::RegionKind;
        use proptest::prelude::*;

        use super::*;
        use crate::state::SocketTable;

        /// A store call, as the engine made it.
        #[derive(Clone, Debug)]
        enum Call {
            Publish(u32, u16, Record),
            Retract(u32),
            Remote(u32, Option<SocketAddrV4>),
            Error(u32, u32),
        }

        impl Call {
            fn replay(&self, s: &mut impl Store) {
                match self {
                    Call::Publish(slot, g, r) => s.publish(*slot, *g, r),
                    Call::Retract(slot) => s.retract(*slot),
                    Call::Remote(slot, a) => s.set_remote(*slot, *a),
                    Call::Error(slot, c) => s.set_error(*slot, *c),
                }
            }
        }

        /// What the dying process managed to write.
        #[derive(Default)]
        struct Log {
            /// Word stores left before the process "dies".
            budget: usize,
            calls: Vec<Call>,
            /// The first call that did not make all its stores, if any.
            cut: Option<usize>,
        }

        /// The real table, whose process dies after `budget` word stores: later stores are
        /// lost, while the engine (the dead process) goes on in memory.
        struct Dying {
            table: SocketTable,
            log: Rc<RefCell<Log>>,
        }

        impl Dying {
            fn run(&mut self, call: Call) {
                let t = &self.table;
                let plan = match &call {
                    Call::Publish(s, g, r) => t.plan_publish(*s, *g, r),
                    Call::Retract(s) => t.plan_retract(*s),
                    Call::Remote(s, a) => t.plan_remote(*s, *a),
                    Call::Error(s, c) => t.plan_error(*s, *c),
                };
                let mut log = self.log.borrow_mut();
                let n = plan.writes().len();
                let allowed = log.budget.min(n);
                t.apply(&plan, allowed);
                log.budget -= allowed;
                if allowed < n && log.cut.is_none() {
                    log.cut = Some(log.calls.len());
                }
                log.calls.push(call);
            }
        }

        impl Store for Dying {
            fn capacity(&self) -> u32 {
                self.table.capacity()
            }
            fn load(&self) -> Vec<SlotState> {
                self.table.load()
            }
            fn publish(&mut self, slot: u32, gen: u16, r: &Record) {
                self.run(Call::Publish(slot, gen, *r))
            }
            fn retract(&mut self, slot: u32) {
                self.run(Call::Retract(slot))
            }
            fn set_remote(&mut self, slot: u32, a: Option<SocketAddrV4>) {
                self.run(Call::Remote(slot, a))
            }
            fn set_error(&mut self, slot: u32, c: u32) {
                self.run(Call::Error(slot, c))
            }
        }

        #[derive(Clone, Debug)]
        enum Op {
            Bind {
                app: u32,
                specific: bool,
                port: u16,
            },
            Connect {
                app: u32,
                pick: prop::sample::Index,
                peer: Option<(u8, u16)>,
            },
            Close {
                app: u32,
                pick: prop::sample::Index,
            },
            CloseApp {
                app: u32,
            },
            Retain {
                mask: u8,
            },
            Icmp {
                pick: prop::sample::Index,
                code: u8,
            },
            Reported {
                pick: prop::sample::Index,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            let app = 1u32..4;
            let pick = any::<prop::sample::Index>();
            prop_oneof![
                4 => (app.clone(), any::<bool>(), prop_oneof![Just(0u16), 1000u16..1006])
                    .prop_map(|(app, specific, port)| Op::Bind { app, specific, port }),
                2 => (app.clone(), pick.clone(), proptest::option::of((1u8..3, 0u16..3)))
                    .prop_map(|(app, pick, peer)| Op::Connect { app, pick, peer }),
                2 => (app.clone(), pick.clone()).prop_map(|(app, pick)| Op::Close { app, pick }),
                1 => app.prop_map(|app| Op::CloseApp { app }),
                1 => any::<u8>().prop_map(|mask| Op::Retain { mask }),
                2 => (pick.clone(), prop_oneof![Just(3u8), Just(1), Just(4)])
                    .prop_map(|(pick, code)| Op::Icmp { pick, code }),
                1 => pick.prop_map(|pick| Op::Reported { pick }),
            ]
        }

        fn apply<S: Store>(e: &mut Engine<S>, op: &Op) {
            let all: Vec<SocketId> = e.indexes().sockets.keys().copied().collect();
            match op {
                Op::Bind {
                    app,
                    specific,
                    port,
                } => {
                    let ip = if *specific {
                        OUR
                    } else {
                        Ipv4Addr::UNSPECIFIED
                    };
                    let request = e.socket_count() as u32 * 7 + u32::from(*port);
                    let _ = e.bind(*app, SocketAddrV4::new(ip, *port), request);
                }
                Op::Connect { app, pick, peer } => {
                    let mine = e.sockets_of(*app);
                    if !mine.is_empty() {
                        let to = match peer {
                            Some((host, port)) => {
                                SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 10 + host), *port)
                            }
                            None => wild(0),
                        };
                        let _ = e.connect(*app, mine[pick.index(mine.len())], to);
                    }
                }
                Op::Close { app, pick } => {
                    let mine = e.sockets_of(*app);
                    if !mine.is_empty() {
                        let _ = e.close(*app, mine[pick.index(mine.len())]);
                    }
                }
                Op::CloseApp { app } => {
                    e.close_app(*app);
                }
                Op::Retain { mask } => {
                    e.retain_apps(|a| mask & (1 << a) != 0);
                }
                Op::Icmp { pick, code } => {
                    if !all.is_empty() {
                        let r = e.socket(all[pick.index(all.len())]).map(|s| s.record);
                        if let Some(r) = r {
                            let peer = r.remote.unwrap_or(SocketAddrV4::new(PEER, 1));
                            let _ =
                                e.icmp_error(&icmp(3, *code), &quote(ours(r.local.port()), peer));
                        }
                    }
                }
                Op::Reported { pick } => {
                    if !all.is_empty() {
                        let id = all[pick.index(all.len())];
                        if let Some(s) = e.socket(id) {
                            e.error_reported(id, Status::from_code(s.record.error));
                        }
                    }
                }
            }
        }

        fn rebuilt(calls: &[Call]) -> Indexes {
            let mut m = MemStore::new(CAP);
            for c in calls {
                c.replay(&mut m);
            }
            Engine::open(Config::new(OUR), m).indexes()
        }

        const CAP: u32 = 8;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 4 } else { 256 }))]

            /// Kill -9 after any word store of any op sequence: a fresh engine over the same
            /// region rebuilds exactly the indexes the live engine had after the last store
            /// call that completed, or after the one cut short; with no cut, exactly the live
            /// engine's.
            #[test]
            fn rebuilt_from_a_table_cut_anywhere_equals_the_live_engine(
                ops in proptest::collection::vec(op(), 1..40),
                budget in 0usize..160,
            ) {
                let table = SocketTable::create("t-udp-kill", CAP).unwrap();
                let log = Rc::new(RefCell::new(Log { budget, ..Log::default() }));
                let store = Dying { table: table.clone(), log: log.clone() };
                let mut live = Engine::open(Config::new(OUR), store);
                // The live indexes after each op, and the call count at each op's end.
                let mut after = vec![(0usize, live.indexes())];
                for op in &ops {
                    apply(&mut live, op);
                    after.push((log.borrow().calls.len(), live.indexes()));
                }
                let fresh = SocketTable::open(
                    table.region().reopen(RegionKind::GENERIC).unwrap()
                ).unwrap();
                let seen = Engine::open(Config::new(OUR), fresh).indexes();
                let log = log.borrow();
                match log.cut {
                    None => prop_assert_eq!(&seen, &live.indexes()),
                    Some(c) => {
                        let before = rebuilt(&log.calls[..c]);
                        let done = rebuilt(&log.calls[..=c]);
                        prop_assert!(
                            seen == before || seen == done,
                            "cut in call {} ({:?}): rebuilt {:?}", c, log.calls[c], seen
                        );
                        // The model is the live engine: at op boundaries they agree.
                        for (calls, idx) in &after {
                            if *calls == c {
                                prop_assert_eq!(&before, idx);
                            }
                            if *calls == c + 1 {
                                prop_assert_eq!(&done, idx);
                            }
                        }
                    }
                }
            }
        }
    }
}
