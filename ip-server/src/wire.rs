//! Packet views and builders: Ethernet II, ARP, IPv4, ICMP, and the Internet checksum.
//!
//! In the style of smoltcp's `wire` module: a packet is a typed view over bytes
//! (`Packet<T: AsRef<[u8]>>`) whose `new_checked` validates lengths once; after that no
//! accessor can panic (and, belt and braces, every accessor reads through [`be16`] /
//! [`be32`], which return 0 instead of panicking on a short buffer). Outgoing packets are built
//! by `Repr::emit`, which computes checksums itself, so no caller can leave one wrong.

pub use keepnet_server::inet::{be16, be32};
use keepnet_server::inet::{byte, put16};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Why a view refused its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the fixed header.
    #[error("truncated")]
    Short,
    /// IPv4 version field is not 4.
    #[error("bad version")]
    Version,
    /// IPv4 header length below 5 words.
    #[error("bad header length")]
    Ihl,
    /// IPv4 total length beyond the buffer or below the header length.
    #[error("bad total length")]
    TotalLen,
    /// ARP with a hardware/protocol type or length we do not speak.
    #[error("malformed")]
    Malformed,
}

#[inline]
fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::from(be32(b, at))
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0u8; 6];
    if let Some(s) = b.get(at..at.saturating_add(6)) {
        m.copy_from_slice(s);
    }
    Mac(m)
}

/// The Internet checksum (RFC 1071), shared by the servers.
pub use keepnet_server::inet as checksum;

// ---------------------------------------------------------------------------------------------
// Ethernet II
// ---------------------------------------------------------------------------------------------

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: Mac = Mac([0xff; 6]);
    /// 00:00:00:00:00:00.
    pub const ZERO: Mac = Mac([0; 6]);

    /// Broadcast address.
    pub fn is_broadcast(&self) -> bool {
        *self == Mac::BROADCAST
    }
    /// Group address (broadcast included): the I/G bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }
    /// An individual address other than all zeros.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && *self != Mac::ZERO
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut m = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            let slot = m
                .get_mut(n)
                .ok_or_else(|| format!("{s:?} has more than 6 octets"))?;
            if part.len() != 2 {
                return Err(format!("{s:?}: octet {part:?} is not two hex digits"));
            }
            *slot = u8::from_str_radix(part, 16)
                .map_err(|_| format!("{s:?}: octet {part:?} is not hex"))?;
            n += 1;
        }
        if n != 6 {
            return Err(format!("{s:?} has {n} octets, a MAC has 6"));
        }
        Ok(Mac(m))
    }
}

/// EtherType values we speak.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
}

/// Length of an Ethernet II header.
pub const ETH_HEADER: usize = 14;

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// Checks that the header fits.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < ETH_HEADER {
            return Err(WireError::Short);
        }
        Ok(EthernetFrame { buf })
    }
    /// Destination address.
    pub fn dst(&self) -> Mac {
        mac_at(self.buf.as_ref(), 0)
    }
    /// Source address.
    pub fn src(&self) -> Mac {
        mac_at(self.buf.as_ref(), 6)
    }
    /// EtherType.
    pub fn ethertype(&self) -> u16 {
        be16(self.buf.as_ref(), 12)
    }
    /// Everything after the header (may include link padding).
    pub fn payload(&self) -> &[u8] {
        self.buf.as_ref().get(ETH_HEADER..).unwrap_or(&[])
    }
}

/// Appends an Ethernet II header to `out`.
pub fn emit_eth(out: &mut Vec<u8>, dst: Mac, src: Mac, ethertype: u16) {
    out.extend_from_slice(&dst.0);
    out.extend_from_slice(&src.0);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

// ---------------------------------------------------------------------------------------------
// ARP (RFC 826), Ethernet + IPv4 only
// ---------------------------------------------------------------------------------------------

/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_LEN: usize = 28;

/// ARP operation codes.
pub mod arp_op {
    /// Request.
    pub const REQUEST: u16 = 1;
    /// Reply.
    pub const REPLY: u16 = 2;
}

/// A view of an ARP packet for Ethernet hardware and IPv4 protocol addresses.
#[derive(Debug, Clone)]
pub struct ArpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Checks the length and that hardware/protocol types and lengths are Ethernet (1, 6)
    /// and IPv4 (0x0800, 4), and that the operation is a request or a reply.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < 8 {
            return Err(WireError::Short);
        }
        if be16(b, 0) != 1 || be16(b, 2) != ethertype::IPV4 || byte(b, 4) != 6 || byte(b, 5) != 4 {
            return Err(WireError::Malformed);
        }
        if b.len() < ARP_LEN {
            return Err(WireError::Short);
        }
        let op = be16(b, 6);
        if op != arp_op::REQUEST && op != arp_op::REPLY {
            return Err(WireError::Malformed);
        }
        Ok(ArpPacket { buf })
    }
    /// Operation.
    pub fn op(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    /// Sender hardware address.
    pub fn sha(&self) -> Mac {
        mac_at(self.buf.as_ref(), 8)
    }
    /// Sender protocol address.
    pub fn spa(&self) -> Ipv4Addr {
        ip_at(self.buf.as_ref(), 14)
    }
    /// Target hardware address.
    pub fn tha(&self) -> Mac {
        mac_at(self.buf.as_ref(), 18)
    }
    /// Target protocol address.
    pub fn tpa(&self) -> Ipv4Addr {
        ip_at(self.buf.as_ref(), 24)
    }
}

/// An ARP packet to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpRepr {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

impl ArpRepr {
    /// Appends the 28-byte packet to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&ethertype::IPV4.to_be_bytes());
        out.extend_from_slice(&[6, 4]);
        out.extend_from_slice(&self.op.to_be_bytes());
        out.extend_from_slice(&self.sha.0);
        out.extend_from_slice(&self.spa.octets());
        out.extend_from_slice(&self.tha.0);
        out.extend_from_slice(&self.tpa.octets());
    }
}

// ---------------------------------------------------------------------------------------------
// IPv4 (RFC 791)
// ---------------------------------------------------------------------------------------------

/// Length of an IPv4 header without options.
pub const IPV4_HEADER: usize = 20;
/// Largest IPv4 datagram.
pub const IPV4_MAX: usize = 65535;

/// IP protocol numbers.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1fff;

/// A view of an IPv4 datagram, trimmed to its total length (link padding removed).
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buf: T,
    header_len: usize,
    total_len: usize,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Checks, in order: the fixed header fits (`Short`), version 4 (`Version`), IHL >= 5
    /// (`Ihl`), the header with options fits (`Short`), header length <= total length <=
    /// buffer (`TotalLen`). The checksum is checked separately ([`Ipv4Packet::checksum_ok`]).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < IPV4_HEADER {
            return Err(WireError::Short);
        }
        let vihl = byte(b, 0);
        if vihl >> 4 != 4 {
            return Err(WireError::Version);
        }
        let header_len = usize::from(vihl & 0x0f) * 4;
        if header_len < IPV4_HEADER {
            return Err(WireError::Ihl);
        }
        if header_len > b.len() {
            return Err(WireError::Short);
        }
        let total_len = usize::from(be16(b, 2));
        if total_len < header_len || total_len > b.len() {
            return Err(WireError::TotalLen);
        }
        Ok(Ipv4Packet {
            buf,
            header_len,
            total_len,
        })
    }
    /// The header, options included.
    pub fn header(&self) -> &[u8] {
        self.buf.as_ref().get(..self.header_len).unwrap_or(&[])
    }
    /// The whole datagram (header and payload, without link padding).
    pub fn datagram(&self) -> &[u8] {
        self.buf.as_ref().get(..self.total_len).unwrap_or(&[])
    }
    /// Header checksum verifies.
    pub fn checksum_ok(&self) -> bool {
        checksum::verify(self.header())
    }
    /// Header length in bytes (20..=60).
    pub fn header_len(&self) -> usize {
        self.header_len
    }
    /// Total length in bytes.
    pub fn total_len(&self) -> usize {
        self.total_len
    }
    /// Identification.
    pub fn ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }
    /// Don't Fragment.
    pub fn dont_frag(&self) -> bool {
        be16(self.buf.as_ref(), 6) & FLAG_DF != 0
    }
    /// More Fragments.
    pub fn more_frags(&self) -> bool {
        be16(self.buf.as_ref(), 6) & FLAG_MF != 0
    }
    /// Fragment offset in bytes.
    pub fn frag_offset(&self) -> usize {
        usize::from(be16(self.buf.as_ref(), 6) & OFFSET_MASK) * 8
    }
    /// A fragment (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.more_frags() || self.frag_offset() != 0
    }
    /// Time to live.
    pub fn ttl(&self) -> u8 {
        byte(self.buf.as_ref(), 8)
    }
    /// Protocol.
    pub fn protocol(&self) -> u8 {
        byte(self.buf.as_ref(), 9)
    }
    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        ip_at(self.buf.as_ref(), 12)
    }
    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        ip_at(self.buf.as_ref(), 16)
    }
    /// The payload (options skipped, padding trimmed).
    pub fn payload(&self) -> &[u8] {
        self.buf
            .as_ref()
            .get(self.header_len..self.total_len)
            .unwrap_or(&[])
    }
}

/// An IPv4 header (without options) to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Repr {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub ident: u16,
    pub dont_frag: bool,
    pub more_frags: bool,
    /// Fragment offset in bytes (a multiple of 8).
    pub frag_offset: usize,
    /// Payload bytes that follow the header.
    pub payload_len: usize,
}

impl Ipv4Repr {
    /// Appends the 20-byte header, checksum computed, to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let total = (IPV4_HEADER + self.payload_len).min(IPV4_MAX) as u16;
        let mut flags = ((self.frag_offset / 8) as u16) & OFFSET_MASK;
        if self.dont_frag {
            flags |= FLAG_DF;
        }
        if self.more_frags {
            flags |= FLAG_MF;
        }
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&total.to_be_bytes());
        out.extend_from_slice(&self.ident.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        out.extend_from_slice(&self.src.octets());
        out.extend_from_slice(&self.dst.octets());
        let sum = checksum::compute(out.get(start..).unwrap_or(&[]));
        if let Some(h) = out.get_mut(start..) {
            put16(h, 10, sum);
        }
    }
}

/// Rewrites a received header (options kept) for a reassembled datagram: total length,
/// no MF, offset 0, checksum recomputed.
pub fn rewrite_reassembled_header(header: &mut [u8], total_len: usize) {
    put16(header, 2, total_len.min(IPV4_MAX) as u16);
    let df = be16(header, 6) & FLAG_DF;
    put16(header, 6, df);
    put16(header, 10, 0);
    let sum = checksum::compute(header);
    put16(header, 10, sum);
}

/// Rewrites a copy of a header (no options) for one fragment of it: total length, MF,
/// offset, checksum. The DF bit is kept.
pub fn rewrite_fragment_header(header: &mut [u8], total_len: usize, more: bool, offset: usize) {
    put16(header, 2, total_len.min(IPV4_MAX) as u16);
    let mut flags = (be16(header, 6) & FLAG_DF) | (((offset / 8) as u16) & OFFSET_MASK);
    if more {
        flags |= FLAG_MF;
    }
    put16(header, 6, flags);
    put16(header, 10, 0);
    let sum = checksum::compute(header);
    put16(header, 10, sum);
}

// ---------------------------------------------------------------------------------------------
// ICMP (RFC 792)
// ---------------------------------------------------------------------------------------------

/// Length of the fixed ICMP header (type, code, checksum, 4 bytes of rest-of-header).
pub const ICMP_HEADER: usize = 8;

/// ICMP types and codes we use.
pub mod icmp_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const SOURCE_QUENCH: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Destination unreachable code: protocol unreachable.
    pub const CODE_PROTO_UNREACHABLE: u8 = 2;
    /// Time exceeded code: fragment reassembly time exceeded.
    pub const CODE_REASSEMBLY: u8 = 1;

    /// An error message (one no ICMP error may answer, RFC 1122 3.2.2). Unknown types count
    /// as errors, to be safe.
    pub fn is_error(t: u8) -> bool {
        !matches!(t, ECHO_REPLY | ECHO_REQUEST | 9 | 10 | 13..=18)
    }
}

/// A view of an ICMP message.
#[derive(Debug, Clone)]
pub struct IcmpPacket<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Checks that the 8-byte header fits.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < ICMP_HEADER {
            return Err(WireError::Short);
        }
        Ok(IcmpPacket { buf })
    }
    /// Checksum over the whole message verifies.
    pub fn checksum_ok(&self) -> bool {
        checksum::verify(self.buf.as_ref())
    }
    /// Type.
    pub fn msg_type(&self) -> u8 {
        byte(self.buf.as_ref(), 0)
    }
    /// Code.
    pub fn code(&self) -> u8 {
        byte(self.buf.as_ref(), 1)
    }
    /// Echo identifier.
    pub fn echo_ident(&self) -> u16 {
        be16(self.buf.as_ref(), 4)
    }
    /// Echo sequence number.
    pub fn echo_seq(&self) -> u16 {
        be16(self.buf.as_ref(), 6)
    }
    /// Data after the 8-byte header.
    pub fn data(&self) -> &[u8] {
        self.buf.as_ref().get(ICMP_HEADER..).unwrap_or(&[])
    }
}

/// Appends an ICMP message (type, code, 4 bytes of rest-of-header, data) with its checksum.
pub fn emit_icmp(out: &mut Vec<u8>, msg_type: u8, code: u8, rest: [u8; 4], data: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[msg_type, code, 0, 0]);
    out.extend_from_slice(&rest);
    out.extend_from_slice(data);
    let sum = checksum::compute(out.get(start..).unwrap_or(&[]));
    if let Some(m) = out.get_mut(start..) {
        put16(m, 2, sum);
    }
}

/// Rest-of-header of an echo message.
pub fn echo_rest(ident: u16, seq: u16) -> [u8; 4] {
    let [a, b] = ident.to_be_bytes();
    let [c, d] = seq.to_be_bytes();
    [a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_known_answers() {
        // RFC 1071 section 3 example: sum of these words is 0xddf2, checksum 0x220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum::fold(checksum::add(0, &data)), 0xddf2);
        assert_eq!(checksum::compute(&data), 0x220d);
        // A classic IPv4 header (Wikipedia "IPv4 header checksum"): checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum::compute(&h), 0xb861);
        h[10] = 0xb8;
        h[11] = 0x61;
        assert!(checksum::verify(&h));
        h[15] ^= 1;
        assert!(!checksum::verify(&h));
        // Odd length pads with a zero byte.
        assert_eq!(checksum::compute(&[0xff]), !0xff00);
        assert_eq!(checksum::compute(&[]), 0xffff);
    }

    #[test]
    fn mac_parse_and_print() {
        let m: Mac = "02:6b:6e:00:00:02".parse().unwrap();
        assert_eq!(m.0, [0x02, 0x6b, 0x6e, 0, 0, 2]);
        assert_eq!(m.to_string(), "02:6b:6e:00:00:02");
        assert!(m.is_unicast());
        assert!(Mac::BROADCAST.is_multicast());
        for bad in [
            "",
            "02:6b:6e:00:00",
            "02:6b:6e:00:00:02:03",
            "zz:6b:6e:00:00:02",
            "2:6b:6e:00:00:02",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ipv4_view_checks_in_order() {
        let mut d = Vec::new();
        Ipv4Repr {
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            protocol: proto::UDP,
            ttl: 64,
            ident: 7,
            dont_frag: true,
            more_frags: false,
            frag_offset: 0,
            payload_len: 4,
        }
        .emit(&mut d);
        d.extend_from_slice(&[1, 2, 3, 4, 0, 0]); // 2 bytes of link padding
        let p = Ipv4Packet::new_checked(&d[..]).unwrap();
        assert!(p.checksum_ok());
        assert_eq!(p.payload(), &[1, 2, 3, 4]);
        assert!(p.dont_frag() && !p.is_fragment());
        assert_eq!(
            Ipv4Packet::new_checked(&d[..19]).err(),
            Some(WireError::Short)
        );
        let mut v = d.clone();
        v[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v[..]).err(),
            Some(WireError::Version)
        );
        v[0] = 0x44;
        assert_eq!(Ipv4Packet::new_checked(&v[..]).err(), Some(WireError::Ihl));
        v[0] = 0x4f;
        assert_eq!(
            Ipv4Packet::new_checked(&v[..]).err(),
            Some(WireError::Short)
        );
        let mut t = d.clone();
        t[3] = 200;
        assert_eq!(
            Ipv4Packet::new_checked(&t[..]).err(),
            Some(WireError::TotalLen)
        );
        t[2] = 0;
        t[3] = 19;
        assert_eq!(
            Ipv4Packet::new_checked(&t[..]).err(),
            Some(WireError::TotalLen)
        );
    }
}
