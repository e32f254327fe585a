//! The protocol engine: Ethernet, ARP, IPv4 (reassembly, fragmentation), ICMP, routing and
//! demux, as plain code with no I/O. A caller feeds it frames and the time
//! ([`IpStack::handle_frame`], [`IpStack::poll`]) and gets frames to send back through a
//! callback; the same code runs in the server and in deterministic simulations.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::arp::{ArpTable, SavedEntry};
use crate::config::{Config, ConfigError};
use crate::counters::{Counters, Ctr};
use crate::frag::{FragLimits, FragOutcome, Reassembler};
use crate::wire::{
    arp_op, be32, echo_rest, emit_eth, emit_icmp, ethertype, icmp_type, proto,
    rewrite_fragment_header, ArpPacket, ArpRepr, EthernetFrame, IcmpPacket, Ipv4Packet, Ipv4Repr,
    Mac, WireError, ETH_HEADER, IPV4_HEADER, IPV4_MAX,
};

/// Echo-reply events kept for [`IpStack::poll_event`] at most; more are counted as lost.
pub const EVENT_QUEUE: usize = 4096;
/// How often expired ARP entries are swept.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// What became of a received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Consumed (answered, delivered, held for reassembly, learnt from).
    Handled,
    /// Dropped, counted under this reason (a per-frame drop, see [`Ctr::is_frame_drop`]).
    Dropped(Ctr),
}

/// Something a caller of the engine may want to know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// An ICMP echo reply arrived (an answer to [`IpStack::ping`], or unsolicited).
    EchoReply {
        from: Ipv4Addr,
        ident: u16,
        seq: u16,
        payload: Vec<u8>,
    },
}

/// Why the engine could not take a datagram to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no route to the destination")]
    NoRoute,
    #[error("datagram larger than 65535 bytes")]
    TooBig,
    #[error("next hop unresolved and its queue (or the table of pending next hops) is full")]
    QueueFull,
}

/// A datagram addressed to us, as handed to a transport.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    /// The IP header as received (options included; rewritten if reassembled).
    pub header: &'a [u8],
    /// The payload (reassembled if it came in fragments).
    pub payload: &'a [u8],
    /// Sent to a broadcast address (IP or link layer): never answered with an ICMP error.
    pub broadcast: bool,
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) about a
/// datagram we sent, as handed to the transport of the quoted datagram's protocol.
#[derive(Clone, Copy, Debug)]
pub struct IcmpError<'a> {
    /// The host or router that sent the error.
    pub from: Ipv4Addr,
    /// Where the error was sent (our address).
    pub to: Ipv4Addr,
    /// TTL of the datagram that carried the error.
    pub ttl: u8,
    /// ICMP type.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// Bytes 4..8 of the ICMP header (unused, a pointer, or a next-hop MTU).
    pub rest: [u8; 4],
    /// Protocol of the quoted datagram.
    pub protocol: u8,
    /// Source of the quoted datagram (always our address).
    pub src: Ipv4Addr,
    /// Destination of the quoted datagram.
    pub dst: Ipv4Addr,
    /// The quoted IP header (options included) and the bytes of the original payload that
    /// follow (at least 8: the transport header's ports).
    pub quote: &'a [u8],
    /// Length of the quoted IP header within `quote`.
    pub quote_header_len: usize,
}

/// A transport protocol attached to the engine (the UDP and TCP servers, over rings).
pub trait Transport {
    /// Takes a datagram for this transport's protocol number.
    fn deliver(&mut self, now: Duration, datagram: &Datagram<'_>);

    /// Takes an ICMP error about a datagram of this transport's protocol that we sent.
    /// The default ignores it.
    fn icmp_error(&mut self, now: Duration, error: &IcmpError<'_>) {
        let _ = (now, error);
    }
}

/// Private state worth handing to a successor at live update (the rest is rebuilt).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// Next IP identification.
    pub next_ident: u16,
    /// Learnt ARP entries.
    pub arp: Vec<SavedEntry>,
}

enum Hop {
    Broadcast,
    Via(Ipv4Addr),
}

/// The engine.
pub struct IpStack {
    cfg: Config,
    counters: Counters,
    arp: ArpTable,
    frags: Reassembler,
    transports: BTreeMap<u8, Box<dyn Transport>>,
    events: VecDeque<Event>,
    next_ident: u16,
    announced: bool,
    next_prune: Duration,
}

impl std::fmt::Debug for IpStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpStack")
            .field("addr", &self.cfg.addr)
            .field("mac", &self.cfg.mac)
            .field("arp_entries", &self.arp.len())
            .field("reassembling", &self.frags.in_progress())
            .finish()
    }
}

type Out<'a> = dyn FnMut(&[u8]) + 'a;

impl IpStack {
    /// A stack with a validated configuration. Nothing is sent until the first
    /// [`IpStack::poll`], which announces our address (gratuitous ARP).
    pub fn new(cfg: Config) -> Result<IpStack, ConfigError> {
        cfg.validate()?;
        let frags = Reassembler::new(FragLimits {
            timeout: cfg.reassembly_timeout,
            max_datagrams_per_src: cfg.frag_max_datagrams_per_src,
            max_bytes_per_src: cfg.frag_max_bytes_per_src,
            max_sources: cfg.frag_max_sources,
        });
        Ok(IpStack {
            cfg,
            counters: Counters::default(),
            arp: ArpTable::default(),
            frags,
            transports: BTreeMap::new(),
            events: VecDeque::new(),
            next_ident: 0,
            announced: false,
            next_prune: Duration::ZERO,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Shorthand for `counters().get(c)`.
    pub fn count(&self, c: Ctr) -> u64 {
        self.counters.get(c)
    }

    /// Sets the next IP identification (a restarted server seeds it so that it does not
    /// reuse its predecessor's recent ones).
    pub fn set_next_ident(&mut self, ident: u16) {
        self.next_ident = ident;
    }

    /// The MAC learnt for `ip`, if any.
    pub fn arp_lookup(&self, ip: Ipv4Addr, now: Duration) -> Option<Mac> {
        self.arp.lookup(ip, now)
    }

    /// Datagrams in reassembly and the bytes they hold.
    pub fn reassembly_usage(&self) -> (usize, usize) {
        (self.frags.in_progress(), self.frags.bytes_held())
    }

    /// Attaches a transport for IP protocol `protocol`, returning the one it replaces.
    pub fn attach(
        &mut self,
        protocol: u8,
        transport: Box<dyn Transport>,
    ) -> Option<Box<dyn Transport>> {
        self.transports.insert(protocol, transport)
    }

    /// Detaches the transport for `protocol`.
    pub fn detach(&mut self, protocol: u8) -> Option<Box<dyn Transport>> {
        self.transports.remove(&protocol)
    }

    /// The next event (echo replies received), oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`IpStack::poll`] next has something to do (ARP retry, reassembly timeout, the
    /// initial announcement), if anything.
    pub fn next_deadline(&self) -> Option<Duration> {
        if !self.announced {
            return Some(Duration::ZERO);
        }
        match (self.arp.next_deadline(), self.frags.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Private state for a live-update successor.
    pub fn save(&self, now: Duration) -> SavedState {
        SavedState {
            next_ident: self.next_ident,
            arp: self.arp.save(now),
        }
    }

    /// Restores what [`IpStack::save`] wrote (untrusted: all of it is checked before any of
    /// it is applied).
    pub fn restore(&mut self, now: Duration, s: &SavedState) -> Result<(), String> {
        if s.arp.len() > self.cfg.arp_cache_size {
            return Err(format!("{} ARP entries exceed the cache size", s.arp.len()));
        }
        for e in &s.arp {
            let (ip, mac) = (Ipv4Addr::from(e.ip), Mac(e.mac));
            if !mac.is_unicast() || !self.cfg.on_link(ip) || ip == self.cfg.addr {
                return Err(format!("bad ARP entry {ip} -> {mac}"));
            }
        }
        self.next_ident = s.next_ident;
        let max = self.cfg.arp_timeout.as_millis() as u64;
        for e in &s.arp {
            let ttl = Duration::from_millis(e.ttl_ms.min(max));
            self.arp.insert(
                Ipv4Addr::from(e.ip),
                Mac(e.mac),
                now + ttl,
                self.cfg.arp_cache_size,
            );
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Receive
    // -----------------------------------------------------------------------------------------

    /// Handles one received Ethernet frame; frames to send go to `out`. Never panics; every
    /// frame ends in `rx.handled` or in one drop reason.
    pub fn handle_frame(
        &mut self,
        now: Duration,
        frame: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Disposition {
        self.counters.inc(Ctr::RxFrames);
        self.counters.add(Ctr::RxBytes, frame.len() as u64);
        let d = self.rx_frame(now, frame, &mut out);
        match d {
            Disposition::Handled => self.counters.inc(Ctr::RxHandled),
            Disposition::Dropped(c) => {
                self.counters.inc(c);
                self.counters.inc(Ctr::RxDropped);
            }
        }
        d
    }

    fn rx_frame(&mut self, now: Duration, frame: &[u8], out: &mut Out<'_>) -> Disposition {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return Disposition::Dropped(Ctr::DropEthShort);
        };
        let dst = eth.dst();
        let link_bcast = dst.is_broadcast();
        if dst != self.cfg.mac && !link_bcast {
            return Disposition::Dropped(Ctr::DropEthNotOurs);
        }
        match eth.ethertype() {
            ethertype::ARP => self.rx_arp(now, eth.payload(), out),
            ethertype::IPV4 => self.rx_ipv4(now, eth.payload(), link_bcast, out),
            _ => Disposition::Dropped(Ctr::DropEthType),
        }
    }

    /// A sender protocol address we may learn: a unicast address in our prefix, not ours.
    fn learnable(&self, ip: Ipv4Addr) -> bool {
        self.cfg.on_link(ip)
            && ip != self.cfg.addr
            && !ip.is_unspecified()
            && !self.is_broadcast(ip)
            && !ip.is_multicast()
    }

    fn is_broadcast(&self, ip: Ipv4Addr) -> bool {
        ip.is_broadcast() || (self.cfg.prefix_len < 31 && ip == self.cfg.subnet_broadcast())
    }

    /// RFC 826, "Packet Reception", with the merge flag: an entry we hold (or are resolving)
    /// is updated from any ARP packet; a new one is made only from a packet aimed at us.
    fn rx_arp(&mut self, now: Duration, payload: &[u8], out: &mut Out<'_>) -> Disposition {
        let a = match ArpPacket::new_checked(payload) {
            Ok(a) => a,
            Err(_) => return Disposition::Dropped(Ctr::DropArpMalformed),
        };
        let (op, sha, spa, tpa) = (a.op(), a.sha(), a.spa(), a.tpa());
        self.counters.inc(if op == arp_op::REQUEST {
            Ctr::ArpRequestsIn
        } else {
            Ctr::ArpRepliesIn
        });
        if !sha.is_unicast() {
            return Disposition::Dropped(Ctr::DropArpMalformed);
        }
        if spa == self.cfg.addr {
            // Someone else claims our address (or our own announcement came back).
            return Disposition::Dropped(Ctr::DropArpConflict);
        }
        let for_us = tpa == self.cfg.addr;
        let learnable = self.learnable(spa);
        let merge = learnable && (self.arp.contains(spa) || self.arp.is_pending(spa));
        if learnable && (merge || for_us) {
            self.arp.insert(
                spa,
                sha,
                now + self.cfg.arp_timeout,
                self.cfg.arp_cache_size,
            );
            if let Some(p) = self.arp.finish_pending(spa) {
                for d in p.queue {
                    self.emit_ip(sha, &d, out);
                }
            }
        }
        if for_us && op == arp_op::REQUEST {
            let reply = ArpRepr {
                op: arp_op::REPLY,
                sha: self.cfg.mac,
                spa: self.cfg.addr,
                tha: sha,
                tpa: spa,
            };
            self.emit_arp(sha, &reply, out);
            self.counters.inc(Ctr::ArpReplies);
        }
        if for_us || merge {
            Disposition::Handled
        } else {
            Disposition::Dropped(Ctr::DropArpNotOurs)
        }
    }

    fn rx_ipv4(
        &mut self,
        now: Duration,
        payload: &[u8],
        link_bcast: bool,
        out: &mut Out<'_>,
    ) -> Disposition {
        let p = match Ipv4Packet::new_checked(payload) {
            Ok(p) => p,
            Err(WireError::Version) => return Disposition::Dropped(Ctr::DropIpv4Version),
            Err(WireError::Ihl) => return Disposition::Dropped(Ctr::DropIpv4Ihl),
            Err(WireError::TotalLen) => return Disposition::Dropped(Ctr::DropIpv4TotalLen),
            Err(_) => return Disposition::Dropped(Ctr::DropIpv4Short),
        };
        if !p.checksum_ok() {
            return Disposition::Dropped(Ctr::DropIpv4Checksum);
        }
        let (src, dst) = (p.src(), p.dst());
        let bcast = self.is_broadcast(dst);
        if dst != self.cfg.addr && !bcast {
            return Disposition::Dropped(Ctr::DropIpv4NotOurs);
        }
        // Martian sources (RFC 1122 3.2.1.3): a datagram "from" a broadcast or multicast
        // address, loopback, or ourselves.
        if self.is_broadcast(src) || src.is_multicast() || src.is_loopback() || src == self.cfg.addr
        {
            return Disposition::Dropped(Ctr::DropIpv4Src);
        }
        if p.is_fragment() {
            self.counters.inc(Ctr::IpFragsIn);
            let outcome = self.frags.add(now, &p);
            self.counters
                .add(Ctr::DropFragEvicted, self.frags.take_evicted());
            return match outcome {
                FragOutcome::Held => Disposition::Handled,
                FragOutcome::Dropped(c) => Disposition::Dropped(c),
                FragOutcome::Complete(whole) => {
                    self.counters.inc(Ctr::IpReassembled);
                    match Ipv4Packet::new_checked(&whole[..]) {
                        Ok(q) => {
                            let d = Datagram {
                                src,
                                dst,
                                protocol: q.protocol(),
                                ttl: q.ttl(),
                                header: q.header(),
                                payload: q.payload(),
                                broadcast: bcast || link_bcast,
                            };
                            self.deliver(now, &d, out)
                        }
                        Err(_) => Disposition::Dropped(Ctr::DropFragBad),
                    }
                }
            };
        }
        let d = Datagram {
            src,
            dst,
            protocol: p.protocol(),
            ttl: p.ttl(),
            header: p.header(),
            payload: p.payload(),
            broadcast: bcast || link_bcast,
        };
        self.deliver(now, &d, out)
    }

    fn deliver(&mut self, now: Duration, d: &Datagram<'_>, out: &mut Out<'_>) -> Disposition {
        if d.protocol == proto::ICMP {
            return self.rx_icmp(now, d, out);
        }
        if let Some(t) = self.transports.get_mut(&d.protocol) {
            t.deliver(now, d);
            self.counters.inc(Ctr::IpDelivered);
            return Disposition::Handled;
        }
        self.icmp_error(
            now,
            d,
            icmp_type::DEST_UNREACHABLE,
            icmp_type::CODE_PROTO_UNREACHABLE,
            out,
        );
        Disposition::Dropped(Ctr::DropProtoUnreachable)
    }

    fn rx_icmp(&mut self, now: Duration, d: &Datagram<'_>, out: &mut Out<'_>) -> Disposition {
        let Ok(m) = IcmpPacket::new_checked(d.payload) else {
            return Disposition::Dropped(Ctr::DropIcmpShort);
        };
        if !m.checksum_ok() {
            return Disposition::Dropped(Ctr::DropIcmpChecksum);
        }
        match m.msg_type() {
            icmp_type::ECHO_REQUEST => {
                self.counters.inc(Ctr::IcmpEchoRequestsIn);
                // RFC 1122 3.2.2.6: echo requests to a broadcast address MAY be discarded.
                if d.broadcast {
                    return Disposition::Dropped(Ctr::DropIcmpBroadcast);
                }
                if d.src.is_unspecified() {
                    return Disposition::Dropped(Ctr::DropIpv4Src);
                }
                // RFC 792: the data received in the echo message must be returned in the
                // echo reply; identifier and sequence number are returned too.
                let mut icmp = Vec::with_capacity(d.payload.len());
                emit_icmp(
                    &mut icmp,
                    icmp_type::ECHO_REPLY,
                    0,
                    echo_rest(m.echo_ident(), m.echo_seq()),
                    m.data(),
                );
                self.counters.inc(Ctr::IcmpEchoReplied);
                let _ = self.send_ip_inner(now, d.src, proto::ICMP, &icmp, out);
                Disposition::Handled
            }
            icmp_type::ECHO_REPLY => {
                self.counters.inc(Ctr::IcmpEchoRepliesIn);
                if self.events.len() >= EVENT_QUEUE {
                    self.counters.inc(Ctr::IcmpEventsLost);
                } else {
                    self.events.push_back(Event::EchoReply {
                        from: d.src,
                        ident: m.echo_ident(),
                        seq: m.echo_seq(),
                        payload: m.data().to_vec(),
                    });
                }
                Disposition::Handled
            }
            icmp_type::DEST_UNREACHABLE
            | icmp_type::TIME_EXCEEDED
            | icmp_type::PARAMETER_PROBLEM => {
                self.counters.inc(Ctr::IcmpErrorsIn);
                self.icmp_error_to_transport(now, d, &m);
                Disposition::Handled
            }
            // Source quench is deprecated (RFC 6633) and redirects are for routers we do not
            // follow: counted only.
            icmp_type::SOURCE_QUENCH | icmp_type::REDIRECT => {
                self.counters.inc(Ctr::IcmpErrorsIn);
                Disposition::Handled
            }
            _ => Disposition::Dropped(Ctr::DropIcmpType),
        }
    }

    /// Hands an ICMP error to the transport of the quoted datagram's protocol (RFC 1122
    /// 3.2.2.1, 4.1.3.3, 4.2.3.9), if one is attached and the quote is about a datagram we
    /// sent: a well-formed IPv4 header from our address, an initial fragment (else the
    /// quoted bytes are no transport header), and at least 8 bytes of payload after it. When
    /// a transport is attached for the quoted protocol byte but the quote fails these checks,
    /// the error is counted in `icmp.errors_unmatched`; with no transport attached it is only
    /// counted (`icmp.errors_in`).
    fn icmp_error_to_transport<T: AsRef<[u8]>>(
        &mut self,
        now: Duration,
        d: &Datagram<'_>,
        m: &IcmpPacket<T>,
    ) {
        let quote = m.data();
        let vihl = quote.first().copied().unwrap_or(0);
        let hlen = usize::from(vihl & 0x0f) * 4;
        let protocol = quote.get(9).copied().unwrap_or(0);
        let Some(t) = self.transports.get_mut(&protocol) else {
            return;
        };
        let src = Ipv4Addr::from(be32(quote, 12));
        let frag_off = crate::wire::be16(quote, 6) & 0x1fff;
        // A quote may carry more than the original datagram (padding, RFC 4884 extensions):
        // keep at most its total length, but never less than header + 8.
        let total = usize::from(crate::wire::be16(quote, 2));
        let ok = vihl >> 4 == 4
            && hlen >= IPV4_HEADER
            && quote.len() >= hlen + 8
            && total >= hlen + 8
            && frag_off == 0
            && src == self.cfg.addr
            && !d.broadcast;
        if !ok {
            self.counters.inc(Ctr::IcmpErrorsUnmatched);
            return;
        }
        let quote = quote.get(..total.min(quote.len())).unwrap_or(quote);
        let rest = [m.echo_ident().to_be_bytes(), m.echo_seq().to_be_bytes()];
        let e = IcmpError {
            from: d.src,
            to: d.dst,
            ttl: d.ttl,
            icmp_type: m.msg_type(),
            icmp_code: m.code(),
            rest: [rest[0][0], rest[0][1], rest[1][0], rest[1][1]],
            protocol,
            src,
            dst: Ipv4Addr::from(be32(quote, 16)),
            quote,
            quote_header_len: hlen,
        };
        t.icmp_error(now, &e);
        self.counters.inc(Ctr::IcmpErrorsToTransport);
    }

    /// Sends an ICMP error about `d` (RFC 792; RFC 1122 3.2.2: never about an ICMP error, a
    /// broadcast, a non-initial fragment, or a source that is not a unicast host). Quotes
    /// the IP header and the first 8 bytes of payload.
    fn icmp_error(
        &mut self,
        now: Duration,
        d: &Datagram<'_>,
        msg_type: u8,
        code: u8,
        out: &mut Out<'_>,
    ) {
        let about_error =
            d.protocol == proto::ICMP && d.payload.first().is_none_or(|t| icmp_type::is_error(*t));
        let src_ok = !(d.src.is_unspecified()
            || self.is_broadcast(d.src)
            || d.src.is_multicast()
            || d.src.is_loopback());
        if d.broadcast || about_error || !src_ok {
            return;
        }
        let mut quote = Vec::with_capacity(d.header.len() + 8);
        quote.extend_from_slice(d.header);
        quote.extend_from_slice(d.payload.get(..8).unwrap_or(d.payload));
        let mut icmp = Vec::with_capacity(8 + quote.len());
        emit_icmp(&mut icmp, msg_type, code, [0; 4], &quote);
        self.counters.inc(Ctr::IcmpErrorsSent);
        let _ = self.send_ip_inner(now, d.src, proto::ICMP, &icmp, out);
    }

    // -----------------------------------------------------------------------------------------
    // Timers
    // -----------------------------------------------------------------------------------------

    /// Runs timers due at `now`: the first call announces our address (gratuitous ARP);
    /// then ARP retries and give-ups, ARP expiry, reassembly timeouts. Returns how many
    /// things it did.
    pub fn poll(&mut self, now: Duration, mut out: impl FnMut(&[u8])) -> usize {
        let out: &mut Out<'_> = &mut out;
        let mut work = 0;
        if !self.announced {
            self.announced = true;
            let a = ArpRepr {
                op: arp_op::REQUEST,
                sha: self.cfg.mac,
                spa: self.cfg.addr,
                tha: Mac::ZERO,
                tpa: self.cfg.addr,
            };
            self.emit_arp(Mac::BROADCAST, &a, out);
            self.counters.inc(Ctr::ArpAnnounces);
            work += 1;
        }
        for ip in self.arp.due(now) {
            let (tries, retry) = (self.cfg.arp_tries, self.cfg.arp_retry);
            let Some(p) = self.arp.pending_mut(ip) else {
                continue;
            };
            if p.tries < tries {
                p.tries += 1;
                p.next = now + retry;
                self.send_arp_request(ip, out);
            } else if let Some(p) = self.arp.finish_pending(ip) {
                self.counters
                    .add(Ctr::DropArpUnresolved, p.queue.len() as u64);
            }
            work += 1;
        }
        if now >= self.next_prune {
            self.arp.prune(now);
            self.next_prune = now + PRUNE_EVERY;
        }
        for e in self.frags.expire(now) {
            work += 1;
            if !e.counted {
                continue;
            }
            self.counters.inc(Ctr::DropFragTimeout);
            // RFC 792 / RFC 1122 3.3.2: time exceeded (reassembly) if fragment zero came.
            if let Some(first) = e.first {
                self.time_exceeded(now, &first, out);
            }
        }
        work
    }

    fn time_exceeded(&mut self, now: Duration, first: &[u8], out: &mut Out<'_>) {
        let hlen = usize::from(first.first().map_or(0, |b| b & 0x0f)) * 4;
        let (header, payload) = first.split_at(hlen.min(first.len()));
        let dst = Ipv4Addr::from(be32(header, 16));
        let d = Datagram {
            src: Ipv4Addr::from(be32(header, 12)),
            dst,
            protocol: header.get(9).copied().unwrap_or(0),
            ttl: header.get(8).copied().unwrap_or(0),
            header,
            payload,
            broadcast: self.is_broadcast(dst),
        };
        self.icmp_error(
            now,
            &d,
            icmp_type::TIME_EXCEEDED,
            icmp_type::CODE_REASSEMBLY,
            out,
        );
    }

    // -----------------------------------------------------------------------------------------
    // Send
    // -----------------------------------------------------------------------------------------

    /// Sends `payload` to `dst` as IP protocol `protocol` from our address: routed,
    /// resolved (or queued while ARP resolves the next hop), fragmented above the MTU.
    pub fn send_ip(
        &mut self,
        now: Duration,
        dst: Ipv4Addr,
        protocol: u8,
        payload: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<(), SendError> {
        self.send_ip_inner(now, dst, protocol, payload, &mut out)
    }

    /// A transport's answer to a datagram it was delivered (UDP to a closed port): an ICMP
    /// destination unreachable with `code` to `dst`, quoting `quote` (the original IP header
    /// and at least 8 bytes of its payload; cut to 8 bytes past the header, RFC 792). The
    /// quote must be of a datagram from `dst` to us, so a transport cannot forge errors
    /// about traffic it never saw; and RFC 1122 3.2.2's rules hold (never to a broadcast,
    /// multicast or unspecified source). Refused as [`SendError::TooBig`] otherwise.
    pub fn send_unreachable(
        &mut self,
        now: Duration,
        dst: Ipv4Addr,
        code: u8,
        quote: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<(), SendError> {
        let Ok(h) = Ipv4Packet::new_checked(quote) else {
            return Err(SendError::TooBig);
        };
        let hlen = h.header_len();
        let ok = h.src() == dst
            && h.dst() == self.cfg.addr
            && quote.len() >= hlen + 8
            && code <= 15
            && !(dst.is_unspecified()
                || self.is_broadcast(dst)
                || dst.is_multicast()
                || dst.is_loopback());
        if !ok {
            return Err(SendError::TooBig);
        }
        let quote = &quote[..hlen + 8];
        let mut icmp = Vec::with_capacity(8 + quote.len());
        emit_icmp(&mut icmp, icmp_type::DEST_UNREACHABLE, code, [0; 4], quote);
        self.counters.inc(Ctr::IcmpErrorsSent);
        self.send_ip_inner(now, dst, proto::ICMP, &icmp, &mut out)
    }

    /// Sends an ICMP echo request; replies come back as [`Event::EchoReply`].
    pub fn ping(
        &mut self,
        now: Duration,
        dst: Ipv4Addr,
        ident: u16,
        seq: u16,
        payload: &[u8],
        mut out: impl FnMut(&[u8]),
    ) -> Result<(), SendError> {
        let mut icmp = Vec::with_capacity(8 + payload.len());
        emit_icmp(
            &mut icmp,
            icmp_type::ECHO_REQUEST,
            0,
            echo_rest(ident, seq),
            payload,
        );
        self.counters.inc(Ctr::IcmpEchoRequestsSent);
        self.send_ip_inner(now, dst, proto::ICMP, &icmp, &mut out)
    }

    fn send_ip_inner(
        &mut self,
        now: Duration,
        dst: Ipv4Addr,
        protocol: u8,
        payload: &[u8],
        out: &mut Out<'_>,
    ) -> Result<(), SendError> {
        if payload.len() > IPV4_MAX - IPV4_HEADER {
            self.counters.inc(Ctr::DropTxTooBig);
            return Err(SendError::TooBig);
        }
        let Some(hop) = self.route(dst) else {
            self.counters.inc(Ctr::DropNoRoute);
            return Err(SendError::NoRoute);
        };
        let ident = self.next_ident;
        self.next_ident = self.next_ident.wrapping_add(1);
        let mut datagram = Vec::with_capacity(IPV4_HEADER + payload.len());
        Ipv4Repr {
            src: self.cfg.addr,
            dst,
            protocol,
            ttl: self.cfg.ttl,
            ident,
            dont_frag: false,
            more_frags: false,
            frag_offset: 0,
            payload_len: payload.len(),
        }
        .emit(&mut datagram);
        datagram.extend_from_slice(payload);
        self.counters.inc(Ctr::IpSent);
        match hop {
            Hop::Broadcast => {
                self.emit_ip(Mac::BROADCAST, &datagram, out);
                Ok(())
            }
            Hop::Via(next) => self.resolve_and_send(now, next, datagram, out),
        }
    }

    /// Routing: limited or directed broadcast; our prefix on-link; else the gateway.
    fn route(&self, dst: Ipv4Addr) -> Option<Hop> {
        if self.is_broadcast(dst) {
            return Some(Hop::Broadcast);
        }
        if dst == self.cfg.addr || dst.is_unspecified() || dst.is_multicast() || dst.is_loopback() {
            return None;
        }
        if self.cfg.on_link(dst) {
            return Some(Hop::Via(dst));
        }
        self.cfg.gateway.map(Hop::Via)
    }

    fn resolve_and_send(
        &mut self,
        now: Duration,
        next: Ipv4Addr,
        datagram: Vec<u8>,
        out: &mut Out<'_>,
    ) -> Result<(), SendError> {
        if let Some(mac) = self.arp.lookup(next, now) {
            self.emit_ip(mac, &datagram, out);
            return Ok(());
        }
        let (qmax, pmax, retry) = (
            self.cfg.arp_queue,
            self.cfg.arp_pending_max,
            self.cfg.arp_retry,
        );
        if let Some(p) = self.arp.pending_mut(next) {
            if p.queue.len() >= qmax {
                self.counters.inc(Ctr::DropArpQueueFull);
                return Err(SendError::QueueFull);
            }
            p.queue.push_back(datagram);
            return Ok(());
        }
        let Some(p) = self.arp.start_pending(next, pmax) else {
            self.counters.inc(Ctr::DropArpQueueFull);
            return Err(SendError::QueueFull);
        };
        p.tries = 1;
        p.next = now + retry;
        p.queue.push_back(datagram);
        self.send_arp_request(next, out);
        Ok(())
    }

    fn send_arp_request(&mut self, ip: Ipv4Addr, out: &mut Out<'_>) {
        let a = ArpRepr {
            op: arp_op::REQUEST,
            sha: self.cfg.mac,
            spa: self.cfg.addr,
            tha: Mac::ZERO,
            tpa: ip,
        };
        self.emit_arp(Mac::BROADCAST, &a, out);
        self.counters.inc(Ctr::ArpRequests);
    }

    fn emit_arp(&mut self, dst: Mac, a: &ArpRepr, out: &mut Out<'_>) {
        let mut f = Vec::with_capacity(ETH_HEADER + 28);
        emit_eth(&mut f, dst, self.cfg.mac, ethertype::ARP);
        a.emit(&mut f);
        self.emit_frame(&f, out);
    }

    /// Sends a whole datagram we built to `dst_mac`, in fragments if it exceeds the MTU.
    fn emit_ip(&mut self, dst_mac: Mac, datagram: &[u8], out: &mut Out<'_>) {
        let mtu = usize::from(self.cfg.mtu);
        let mut f = Vec::with_capacity(ETH_HEADER + datagram.len().min(mtu));
        if datagram.len() <= mtu {
            emit_eth(&mut f, dst_mac, self.cfg.mac, ethertype::IPV4);
            f.extend_from_slice(datagram);
            self.emit_frame(&f, out);
            return;
        }
        let Ok(p) = Ipv4Packet::new_checked(datagram) else {
            self.counters.inc(Ctr::DropTxTooBig);
            return;
        };
        if p.dont_frag() {
            self.counters.inc(Ctr::DropTxTooBig);
            return;
        }
        let header = p.header();
        let hlen = header.len();
        // mtu >= 68 and hlen <= 60 leave at least 8 bytes per fragment.
        let chunk = (mtu.saturating_sub(hlen) / 8 * 8).max(8);
        let payload = p.payload();
        let base = p.frag_offset();
        let mut off = 0;
        while off < payload.len() {
            let end = (off + chunk).min(payload.len());
            let piece = payload.get(off..end).unwrap_or(&[]);
            f.clear();
            emit_eth(&mut f, dst_mac, self.cfg.mac, ethertype::IPV4);
            let h0 = f.len();
            f.extend_from_slice(header);
            if let Some(h) = f.get_mut(h0..) {
                rewrite_fragment_header(
                    h,
                    hlen + piece.len(),
                    end < payload.len() || p.more_frags(),
                    base + off,
                );
            }
            f.extend_from_slice(piece);
            self.counters.inc(Ctr::IpFragsOut);
            self.emit_frame(&f, out);
            off = end;
        }
    }

    fn emit_frame(&mut self, frame: &[u8], out: &mut Out<'_>) {
        self.counters.inc(Ctr::TxFrames);
        self.counters.add(Ctr::TxBytes, frame.len() as u64);
        out(frame);
    }
}
