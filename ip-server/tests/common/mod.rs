//! Helpers shared by the engine tests: addresses, frame builders, a run-and-collect wrapper.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::Duration;

use keepnet_ip::wire::{checksum, ArpRepr, EthernetFrame, IcmpPacket, Ipv4Packet};
use keepnet_ip::{Config, Ctr, Disposition, IpStack, Mac};

pub const OUR_MAC: Mac = Mac([0x02, 0x6b, 0x6e, 0, 0, 2]);
pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const PEER_MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub fn config() -> Config {
    Config::new(OUR_MAC, OUR_IP, 24)
}

/// A stack that has made its announcement (so outputs are only answers).
pub fn stack_with(cfg: Config) -> IpStack {
    let mut s = IpStack::new(cfg).unwrap();
    s.set_next_ident(0x1234);
    let mut n = 0;
    s.poll(Duration::ZERO, |_| n += 1);
    assert_eq!(n, 1, "one gratuitous ARP at start");
    s
}

pub fn stack() -> IpStack {
    stack_with(config())
}

/// A stack that already knows the peer's MAC (learnt from an ARP request).
pub fn stack_knowing_peer() -> IpStack {
    let mut s = stack();
    let (d, out) = run(
        &mut s,
        Duration::ZERO,
        &arp_frame(OUR_MAC, 1, PEER_MAC, PEER_IP, Mac::ZERO, OUR_IP),
    );
    assert_eq!(d, Disposition::Handled);
    assert_eq!(out.len(), 1);
    s
}

/// Feeds one frame; returns its disposition and the frames sent in answer.
pub fn run(s: &mut IpStack, now: Duration, frame: &[u8]) -> (Disposition, Vec<Vec<u8>>) {
    let mut out = Vec::new();
    let d = s.handle_frame(now, frame, |f| out.push(f.to_vec()));
    (d, out)
}

/// Runs timers; returns the frames sent.
pub fn poll(s: &mut IpStack, now: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    s.poll(now, |f| out.push(f.to_vec()));
    out
}

/// Feeds a frame that must be dropped for `reason`, and checks the counters moved by one.
#[track_caller]
pub fn assert_dropped(s: &mut IpStack, frame: &[u8], reason: Ctr) -> Vec<Vec<u8>> {
    let before = s.counters().clone();
    let (d, out) = run(s, Duration::from_secs(1), frame);
    assert_eq!(d, Disposition::Dropped(reason), "disposition");
    assert_eq!(
        s.count(reason),
        before.get(reason) + 1,
        "{} moved by one",
        reason.name()
    );
    assert_eq!(s.count(Ctr::RxDropped), before.get(Ctr::RxDropped) + 1);
    assert_eq!(s.count(Ctr::RxHandled), before.get(Ctr::RxHandled));
    out
}

pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn arp_frame(dst: Mac, op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut p = Vec::new();
    ArpRepr {
        op,
        sha,
        spa,
        tha,
        tpa,
    }
    .emit(&mut p);
    let d = if op == 1 { Mac::BROADCAST } else { dst };
    eth(d, sha, 0x0806, &p)
}

/// An IPv4 header + payload with every field given (checksum computed unless `bad_sum`).
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ident: u16,
    pub flags_frag: u16,
    pub ttl: u8,
    pub options: Vec<u8>,
}

impl Ip {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Ip {
        Ip {
            src,
            dst,
            proto,
            ident: 0x4242,
            flags_frag: 0,
            ttl: 64,
            options: Vec::new(),
        }
    }
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let hlen = 20 + self.options.len();
        let mut h = vec![0x40 | (hlen / 4) as u8, 0];
        h.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&self.ident.to_be_bytes());
        h.extend_from_slice(&self.flags_frag.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        h.extend_from_slice(&self.src.octets());
        h.extend_from_slice(&self.dst.octets());
        h.extend_from_slice(&self.options);
        let c = checksum::compute(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }
}

pub fn icmp(msg_type: u8, code: u8, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![msg_type, code, 0, 0];
    m.extend_from_slice(&ident.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum::compute(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An echo request from the peer to us, as a frame.
pub fn echo_request(ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let ip = Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(8, 0, ident, seq, data));
    eth(OUR_MAC, PEER_MAC, 0x0800, &ip)
}

/// Splits an IP datagram (20-byte header, no options) into fragment frames of at most
/// `chunk` payload bytes (a multiple of 8).
pub fn fragment(ip: &Ip, payload: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + chunk).min(payload.len());
        let mf = if end < payload.len() { 0x2000 } else { 0 };
        let h = Ip {
            flags_frag: mf | (off / 8) as u16,
            ..ip.clone()
        };
        out.push(eth(OUR_MAC, PEER_MAC, 0x0800, &h.build(&payload[off..end])));
        off = end;
    }
    out
}

/// One fragment frame with an explicit offset (bytes) and MF flag.
pub fn frag_frame(ip: &Ip, offset: usize, more: bool, data: &[u8]) -> Vec<u8> {
    let h = Ip {
        flags_frag: if more { 0x2000 } else { 0 } | (offset / 8) as u16,
        ..ip.clone()
    };
    eth(OUR_MAC, PEER_MAC, 0x0800, &h.build(data))
}

/// Parses an output frame as Ethernet + IPv4 (checksum checked), returning the IP view.
#[track_caller]
pub fn parse_ip(frame: &[u8]) -> Ipv4Packet<Vec<u8>> {
    let e = EthernetFrame::new_checked(frame).unwrap();
    assert_eq!(e.ethertype(), 0x0800);
    let p = Ipv4Packet::new_checked(e.payload().to_vec()).unwrap();
    assert!(p.checksum_ok(), "IP header checksum");
    p
}

/// Parses an output frame as an ICMP message (both checksums checked).
#[track_caller]
pub fn parse_icmp(frame: &[u8]) -> (Ipv4Packet<Vec<u8>>, IcmpPacket<Vec<u8>>) {
    let p = parse_ip(frame);
    assert_eq!(p.protocol(), 1);
    let m = IcmpPacket::new_checked(p.payload().to_vec()).unwrap();
    assert!(m.checksum_ok(), "ICMP checksum");
    (p, m)
}

/// Deterministic pseudo-random bytes (splitmix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    /// True with probability p.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}
