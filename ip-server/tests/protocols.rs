//! Per-protocol tests of the engine with real packet bytes, and a bad-frame test for each kind
//! of malformation, each checked against its drop counter.

mod common;

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use common::*;
use keepnet_ip::wire::{ArpPacket, EthernetFrame};
use keepnet_ip::{
    Config, Ctr, Datagram, Disposition, Event, IcmpError, IpStack, Mac, SendError, Transport,
};

/// `who-has 198.18.0.2 tell 198.18.0.1` as Linux sends it on a TAP (no padding).
const LINUX_ARP_REQUEST: [u8; 42] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x06, //
    0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, //
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0xc6, 0x12, 0x00, 0x01, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc6, 0x12, 0x00, 0x02,
];

/// The reply we must send: `198.18.0.2 is-at 02:6b:6e:00:00:02`.
const ARP_REPLY: [u8; 42] = [
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x02, 0x6b, 0x6e, 0x00, 0x00, 0x02, 0x08, 0x06, //
    0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02, //
    0x02, 0x6b, 0x6e, 0x00, 0x00, 0x02, 0xc6, 0x12, 0x00, 0x02, //
    0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0xc6, 0x12, 0x00, 0x01,
];

/// `ping -c1 198.18.0.2` from Linux: DF set, id 0x0b1e seq 1, 16-byte timestamp then
/// 0x10..0x37. IP checksum 0x923b and ICMP checksum 0xb7e6 computed independently.
const LINUX_ECHO_REQUEST: [u8; 98] = [
    0x02, 0x6b, 0x6e, 0x00, 0x00, 0x02, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x08, 0x00, 0x45, 0x00,
    0x00, 0x54, 0x1c, 0x46, 0x40, 0x00, 0x40, 0x01, 0x92, 0x3b, 0xc6, 0x12, 0x00, 0x01, 0xc6, 0x12,
    0x00, 0x02, 0x08, 0x00, 0xb7, 0xe6, 0x0b, 0x1e, 0x00, 0x01, 0x6a, 0x1c, 0x0d, 0x66, 0x00, 0x00,
    0x00, 0x00, 0xf3, 0xa4, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15,
    0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25,
    0x26, 0x27, 0x28, 0x29, 0x2a, 0x2b, 0x2c, 0x2d, 0x2e, 0x2f, 0x30, 0x31, 0x32, 0x33, 0x34, 0x35,
    0x36, 0x37,
];

// ----------------------------------------------------------------------------------------------
// Ethernet
// ----------------------------------------------------------------------------------------------

#[test]
fn ethernet_filters_by_destination_and_type() {
    let mut s = stack();
    assert_dropped(&mut s, &[0u8; 13], Ctr::DropEthShort);
    assert_dropped(&mut s, &[], Ctr::DropEthShort);
    let other = Mac([0x02, 0, 0, 0, 0, 9]);
    assert_dropped(
        &mut s,
        &eth(other, PEER_MAC, 0x0800, &[0; 40]),
        Ctr::DropEthNotOurs,
    );
    let mcast = Mac([0x01, 0x00, 0x5e, 0, 0, 1]);
    assert_dropped(
        &mut s,
        &eth(mcast, PEER_MAC, 0x0800, &[0; 40]),
        Ctr::DropEthNotOurs,
    );
    assert_dropped(
        &mut s,
        &eth(OUR_MAC, PEER_MAC, 0x86dd, &[0; 40]),
        Ctr::DropEthType,
    );
    assert_dropped(
        &mut s,
        &eth(Mac::BROADCAST, PEER_MAC, 0x8100, &[0; 40]),
        Ctr::DropEthType,
    );
    assert_eq!(s.count(Ctr::RxFrames), 6);
}

// ----------------------------------------------------------------------------------------------
// ARP
// ----------------------------------------------------------------------------------------------

#[test]
fn arp_request_from_linux_gets_the_exact_reply_and_teaches_us() {
    let mut s = stack();
    let (d, out) = run(&mut s, Duration::ZERO, &LINUX_ARP_REQUEST);
    assert_eq!(d, Disposition::Handled);
    assert_eq!(out, vec![ARP_REPLY.to_vec()]);
    assert_eq!(s.arp_lookup(PEER_IP, Duration::ZERO), Some(PEER_MAC));
    assert_eq!(s.count(Ctr::ArpRequestsIn), 1);
    assert_eq!(s.count(Ctr::ArpReplies), 1);
    // The same request padded to 60 bytes (as a switch delivers it) works too.
    let mut padded = LINUX_ARP_REQUEST.to_vec();
    padded.resize(60, 0);
    let (_, out) = run(&mut s, Duration::ZERO, &padded);
    assert_eq!(out, vec![ARP_REPLY.to_vec()]);
}

#[test]
fn gratuitous_arp_is_sent_once_at_start() {
    let mut s = IpStack::new(config()).unwrap();
    assert_eq!(s.next_deadline(), Some(Duration::ZERO));
    let out = poll(&mut s, Duration::ZERO);
    assert_eq!(out.len(), 1);
    let e = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert!(e.dst().is_broadcast());
    let a = ArpPacket::new_checked(e.payload()).unwrap();
    assert_eq!(
        (a.op(), a.spa(), a.tpa(), a.sha()),
        (1, OUR_IP, OUR_IP, OUR_MAC)
    );
    assert!(poll(&mut s, ms(5000)).is_empty());
    assert_eq!(s.next_deadline(), None);
    assert_eq!(s.count(Ctr::ArpAnnounces), 1);
}

#[test]
fn arp_for_another_host_is_not_learnt() {
    let mut s = stack();
    let f = arp_frame(
        Mac::BROADCAST,
        1,
        PEER_MAC,
        PEER_IP,
        Mac::ZERO,
        Ipv4Addr::new(198, 18, 0, 99),
    );
    assert!(assert_dropped(&mut s, &f, Ctr::DropArpNotOurs).is_empty());
    assert_eq!(s.arp_lookup(PEER_IP, Duration::ZERO), None);
}

#[test]
fn arp_malformed_packets_are_counted() {
    let mut s = stack();
    let good = arp_frame(Mac::BROADCAST, 1, PEER_MAC, PEER_IP, Mac::ZERO, OUR_IP);
    let at = |i: usize, v: u8| {
        let mut f = good.clone();
        f[14 + i] = v;
        f
    };
    assert_dropped(&mut s, &at(4, 8), Ctr::DropArpMalformed); // hlen 8
    assert_dropped(&mut s, &at(5, 16), Ctr::DropArpMalformed); // plen 16
    assert_dropped(&mut s, &at(1, 6), Ctr::DropArpMalformed); // htype 6
    assert_dropped(&mut s, &at(2, 0x86), Ctr::DropArpMalformed); // ptype 0x86..
    assert_dropped(&mut s, &at(7, 3), Ctr::DropArpMalformed); // op 3
    assert_dropped(&mut s, &at(7, 0), Ctr::DropArpMalformed); // op 0
    assert_dropped(&mut s, &good[..14 + 27], Ctr::DropArpMalformed); // truncated
    assert_dropped(&mut s, &good[..14 + 5], Ctr::DropArpMalformed);
    assert_dropped(&mut s, &at(8, 0xff), Ctr::DropArpMalformed); // multicast sender MAC
                                                                 // Someone claiming our address.
    let claim = arp_frame(Mac::BROADCAST, 1, PEER_MAC, OUR_IP, Mac::ZERO, OUR_IP);
    assert_dropped(&mut s, &claim, Ctr::DropArpConflict);
    assert_eq!(s.arp_lookup(PEER_IP, Duration::ZERO), None);
    assert_eq!(
        s.count(Ctr::TxFrames),
        1,
        "only the announcement was ever sent"
    );
}

#[test]
fn arp_resolution_retries_then_gives_up() {
    let mut s = stack();
    let far = Ipv4Addr::new(198, 18, 0, 7);
    let mut out = Vec::new();
    for i in 0..3u8 {
        s.send_ip(ms(0), far, 17, &[i; 10], |f| out.push(f.to_vec()))
            .unwrap();
    }
    assert_eq!(out.len(), 1, "one request, datagrams queued");
    let a = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(ArpPacket::new_checked(a.payload()).unwrap().tpa(), far);
    assert_eq!(s.next_deadline(), Some(ms(1000)));
    assert!(poll(&mut s, ms(999)).is_empty());
    assert_eq!(poll(&mut s, ms(1000)).len(), 1, "second try");
    assert_eq!(poll(&mut s, ms(2000)).len(), 1, "third try");
    assert_eq!(s.count(Ctr::ArpRequests), 3);
    assert_eq!(s.count(Ctr::DropArpUnresolved), 0);
    assert!(poll(&mut s, ms(3000)).is_empty(), "gave up");
    assert_eq!(s.count(Ctr::DropArpUnresolved), 3);
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn arp_reply_flushes_the_queue_in_order() {
    let mut s = stack();
    let mut out = Vec::new();
    for i in 0..3u8 {
        s.send_ip(ms(0), PEER_IP, 17, &[i; 10], |f| out.push(f.to_vec()))
            .unwrap();
    }
    assert_eq!(out.len(), 1);
    let reply = arp_frame(OUR_MAC, 2, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP);
    let (d, out) = run(&mut s, ms(10), &reply);
    assert_eq!(d, Disposition::Handled);
    assert_eq!(out.len(), 3);
    for (i, f) in out.iter().enumerate() {
        let e = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(e.dst(), PEER_MAC);
        assert_eq!(parse_ip(f).payload(), &[i as u8; 10]);
    }
    assert_eq!(s.next_deadline(), None, "no retry left");
}

#[test]
fn arp_queue_is_bounded() {
    let mut s = stack();
    let n = config().arp_queue;
    let mut errs = 0;
    for _ in 0..n + 2 {
        if s.send_ip(ms(0), PEER_IP, 17, &[0; 4], |_| {}) == Err(SendError::QueueFull) {
            errs += 1;
        }
    }
    assert_eq!(errs, 2);
    assert_eq!(s.count(Ctr::DropArpQueueFull), 2);
}

#[test]
fn arp_entries_expire() {
    let mut s = stack_knowing_peer();
    assert_eq!(s.arp_lookup(PEER_IP, ms(59_999)), Some(PEER_MAC));
    assert_eq!(s.arp_lookup(PEER_IP, ms(60_000)), None);
    let mut out = Vec::new();
    s.send_ip(ms(60_000), PEER_IP, 17, &[1], |f| out.push(f.to_vec()))
        .unwrap();
    let e = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(e.ethertype(), 0x0806, "asks again");
    // A reply from an entry we hold refreshes it even if not aimed at us (merge flag).
    let mut t = stack_knowing_peer();
    let newmac = Mac([0x02, 0, 0, 0, 0, 0x77]);
    let f = arp_frame(
        Mac::BROADCAST,
        1,
        newmac,
        PEER_IP,
        Mac::ZERO,
        Ipv4Addr::new(198, 18, 0, 50),
    );
    assert_eq!(run(&mut t, ms(1), &f).0, Disposition::Handled);
    assert_eq!(t.arp_lookup(PEER_IP, ms(1)), Some(newmac));
}

// ----------------------------------------------------------------------------------------------
// IPv4
// ----------------------------------------------------------------------------------------------

fn ip_frame(ip: &[u8]) -> Vec<u8> {
    eth(OUR_MAC, PEER_MAC, 0x0800, ip)
}

#[test]
fn ipv4_bad_headers_are_counted_by_reason() {
    let mut s = stack_knowing_peer();
    let good = Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(8, 0, 1, 1, b"abcdefgh"));
    let mut_at = |i: usize, v: u8| {
        let mut d = good.clone();
        d[i] = v;
        d
    };
    assert_dropped(&mut s, &ip_frame(&good[..19]), Ctr::DropIpv4Short);
    assert_dropped(&mut s, &ip_frame(&[]), Ctr::DropIpv4Short);
    assert_dropped(&mut s, &ip_frame(&mut_at(0, 0x65)), Ctr::DropIpv4Version);
    assert_dropped(&mut s, &ip_frame(&mut_at(0, 0x44)), Ctr::DropIpv4Ihl);
    assert_dropped(&mut s, &ip_frame(&mut_at(0, 0x40)), Ctr::DropIpv4Ihl);
    // IHL 15 (60 bytes) in a 36-byte datagram: the header is truncated.
    assert_dropped(&mut s, &ip_frame(&mut_at(0, 0x4f)), Ctr::DropIpv4Short);
    // Total length beyond the frame, and below the header length.
    assert_dropped(&mut s, &ip_frame(&mut_at(3, 200)), Ctr::DropIpv4TotalLen);
    assert_dropped(&mut s, &ip_frame(&mut_at(3, 19)), Ctr::DropIpv4TotalLen);
    let mut big = good.clone();
    big[2] = 0xff;
    assert_dropped(&mut s, &ip_frame(&big), Ctr::DropIpv4TotalLen);
    // A wrong checksum (one bit of the source flipped).
    assert_dropped(&mut s, &ip_frame(&mut_at(12, 199)), Ctr::DropIpv4Checksum);
    let mut bad_sum = good.clone();
    bad_sum[10] ^= 0x01;
    assert_dropped(&mut s, &ip_frame(&bad_sum), Ctr::DropIpv4Checksum);
    // Not for us; martian sources.
    let other = Ip::new(PEER_IP, Ipv4Addr::new(198, 18, 0, 3), 1).build(&icmp(8, 0, 1, 1, b""));
    assert_dropped(&mut s, &ip_frame(&other), Ctr::DropIpv4NotOurs);
    for src in [
        Ipv4Addr::BROADCAST,
        Ipv4Addr::new(198, 18, 0, 255),
        Ipv4Addr::new(224, 0, 0, 1),
        Ipv4Addr::new(127, 0, 0, 1),
        OUR_IP,
    ] {
        let m = Ip::new(src, OUR_IP, 1).build(&icmp(8, 0, 1, 1, b""));
        assert_dropped(&mut s, &ip_frame(&m), Ctr::DropIpv4Src);
    }
    assert_eq!(s.count(Ctr::TxFrames), 2, "nothing answered");
    // The good one is answered.
    let (d, out) = run(&mut s, ms(1), &ip_frame(&good));
    assert_eq!((d, out.len()), (Disposition::Handled, 1));
}

#[test]
fn options_are_skipped_and_padding_trimmed() {
    let mut s = stack_knowing_peer();
    // IHL 7: a record-route option (type 7, len 7, ptr 4, one empty slot) + EOL padding.
    let mut ip = Ip::new(PEER_IP, OUR_IP, 1);
    ip.options = vec![7, 7, 4, 0, 0, 0, 0, 0];
    let mut f = ip_frame(&ip.build(&icmp(8, 0, 9, 9, b"hi")));
    f.resize(60, 0xee); // Ethernet minimum-frame padding
    let (d, out) = run(&mut s, ms(1), &f);
    assert_eq!(d, Disposition::Handled);
    let (p, m) = parse_icmp(&out[0]);
    assert_eq!(p.header_len(), 20, "reply carries no options");
    assert_eq!((m.msg_type(), m.echo_ident(), m.echo_seq()), (0, 9, 9));
    assert_eq!(m.data(), b"hi", "padding is not echoed");
    // TTL 1 and even 0 are accepted by a host (RFC 1122 3.2.1.7).
    let mut t = Ip::new(PEER_IP, OUR_IP, 1);
    t.ttl = 0;
    let (d, out) = run(&mut s, ms(1), &ip_frame(&t.build(&icmp(8, 0, 1, 2, b"x"))));
    assert_eq!((d, out.len()), (Disposition::Handled, 1));
    assert_eq!(parse_ip(&out[0]).ttl(), 64);
}

// ----------------------------------------------------------------------------------------------
// ICMP
// ----------------------------------------------------------------------------------------------

#[test]
fn echo_request_from_linux_is_answered_byte_exact() {
    let mut s = stack_knowing_peer();
    let (d, out) = run(&mut s, ms(1), &LINUX_ECHO_REQUEST);
    assert_eq!(d, Disposition::Handled);
    assert_eq!(out.len(), 1);
    let f = &out[0];
    assert_eq!(&f[0..6], &PEER_MAC.0);
    assert_eq!(&f[6..12], &OUR_MAC.0);
    let (p, _) = parse_icmp(f);
    assert_eq!(
        (p.src(), p.dst(), p.ttl(), p.ident()),
        (OUR_IP, PEER_IP, 64, 0x1234)
    );
    assert!(!p.is_fragment());
    // The ICMP message: the request's, with type 0 and the independently computed checksum.
    let mut expect = LINUX_ECHO_REQUEST[34..].to_vec();
    expect[0] = 0;
    expect[2..4].copy_from_slice(&[0xbf, 0xe6]);
    assert_eq!(p.payload(), &expect[..]);
    assert_eq!(s.count(Ctr::IcmpEchoRequestsIn), 1);
    assert_eq!(s.count(Ctr::IcmpEchoReplied), 1);
}

#[test]
fn icmp_bad_messages_are_counted() {
    let mut s = stack_knowing_peer();
    let ipf = |m: &[u8]| ip_frame(&Ip::new(PEER_IP, OUR_IP, 1).build(m));
    assert_dropped(&mut s, &ipf(&[8, 0, 0xf7, 0xff]), Ctr::DropIcmpShort);
    assert_dropped(&mut s, &ipf(&[]), Ctr::DropIcmpShort);
    let mut m = icmp(8, 0, 1, 1, b"data");
    m[9] ^= 0x40;
    assert_dropped(&mut s, &ipf(&m), Ctr::DropIcmpChecksum);
    assert_dropped(&mut s, &ipf(&icmp(42, 0, 0, 0, b"")), Ctr::DropIcmpType);
    // Echo to a broadcast address (IP or link): ignored.
    let b = Ip::new(PEER_IP, Ipv4Addr::new(198, 18, 0, 255), 1).build(&icmp(8, 0, 1, 1, b""));
    assert_dropped(
        &mut s,
        &eth(OUR_MAC, PEER_MAC, 0x0800, &b),
        Ctr::DropIcmpBroadcast,
    );
    let u = Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(8, 0, 1, 1, b""));
    assert_dropped(
        &mut s,
        &eth(Mac::BROADCAST, PEER_MAC, 0x0800, &u),
        Ctr::DropIcmpBroadcast,
    );
    // Errors received are taken (for transports, later) and never answered.
    let (d, out) = run(&mut s, ms(1), &ipf(&icmp(3, 3, 0, 0, &[0; 28])));
    assert_eq!((d, out.len()), (Disposition::Handled, 0));
    assert_eq!(s.count(Ctr::IcmpErrorsIn), 1);
    assert_eq!(s.count(Ctr::TxFrames), 2, "nothing answered");
}

#[test]
fn protocol_unreachable_quotes_header_and_8_bytes() {
    let mut s = stack_knowing_peer();
    let udp = [
        0x30, 0x39, 0x00, 0x07, 0x00, 0x0c, 0x00, 0x00, b'a', b'b', b'c', b'd',
    ];
    for proto in [17u8, 6, 132] {
        let dgram = Ip::new(PEER_IP, OUR_IP, proto).build(&udp);
        let out = assert_dropped(&mut s, &ip_frame(&dgram), Ctr::DropProtoUnreachable);
        assert_eq!(out.len(), 1);
        let (p, m) = parse_icmp(&out[0]);
        assert_eq!(p.dst(), PEER_IP);
        assert_eq!((m.msg_type(), m.code()), (3, 2));
        assert_eq!(&m.buf_rest(), &[0, 0, 0, 0]);
        assert_eq!(m.data(), &dgram[..28]);
    }
    assert_eq!(s.count(Ctr::IcmpErrorsSent), 3);
    // Never for a broadcast.
    let b = Ip::new(PEER_IP, Ipv4Addr::BROADCAST, 17).build(&udp);
    let out = assert_dropped(
        &mut s,
        &eth(Mac::BROADCAST, PEER_MAC, 0x0800, &b),
        Ctr::DropProtoUnreachable,
    );
    assert!(out.is_empty());
    // Never from an unspecified source.
    let z = Ip::new(Ipv4Addr::UNSPECIFIED, OUR_IP, 17).build(&udp);
    assert!(assert_dropped(&mut s, &ip_frame(&z), Ctr::DropProtoUnreachable).is_empty());
    // Never for a non-initial fragment (fragments are held, and time out silently unless
    // fragment zero came).
    let mut ip = Ip::new(PEER_IP, OUR_IP, 17);
    ip.flags_frag = 2; // offset 16, last
    let (d, out) = run(&mut s, ms(1), &ip_frame(&ip.build(&udp)));
    assert_eq!((d, out.len()), (Disposition::Handled, 0));
    assert!(poll(&mut s, Duration::from_secs(31)).is_empty());
    assert_eq!(s.count(Ctr::DropFragTimeout), 1);
    // A short payload is quoted whole.
    let tiny = Ip::new(PEER_IP, OUR_IP, 17).build(&[1, 2, 3]);
    let out = assert_dropped(&mut s, &ip_frame(&tiny), Ctr::DropProtoUnreachable);
    assert_eq!(parse_icmp(&out[0]).1.data(), &tiny[..]);
}

/// `buf_rest`: the 4 bytes after the checksum, for the assertions above.
trait Rest {
    fn buf_rest(&self) -> [u8; 4];
}
impl Rest for keepnet_ip::wire::IcmpPacket<Vec<u8>> {
    fn buf_rest(&self) -> [u8; 4] {
        let v = self.echo_ident().to_be_bytes();
        let w = self.echo_seq().to_be_bytes();
        [v[0], v[1], w[0], w[1]]
    }
}

/// (source, protocol, payload, broadcast) of each datagram delivered.
type Seen = Rc<RefCell<Vec<(Ipv4Addr, u8, Vec<u8>, bool)>>>;

#[derive(Default)]
struct Recorder(Seen);
impl Transport for Recorder {
    fn deliver(&mut self, _now: Duration, d: &Datagram<'_>) {
        self.0
            .borrow_mut()
            .push((d.src, d.protocol, d.payload.to_vec(), d.broadcast));
    }
}

#[test]
fn attached_transport_gets_its_datagrams() {
    let mut s = stack_knowing_peer();
    let seen = Rc::new(RefCell::new(Vec::new()));
    assert!(s.attach(17, Box::new(Recorder(seen.clone()))).is_none());
    let dgram = Ip::new(PEER_IP, OUR_IP, 17).build(b"udp-ish payload");
    let (d, out) = run(&mut s, ms(1), &ip_frame(&dgram));
    assert_eq!((d, out.len()), (Disposition::Handled, 0));
    // A broadcast one too, marked as such.
    let b = Ip::new(PEER_IP, Ipv4Addr::new(198, 18, 0, 255), 17).build(b"b");
    run(&mut s, ms(1), &eth(Mac::BROADCAST, PEER_MAC, 0x0800, &b));
    assert_eq!(
        *seen.borrow(),
        vec![
            (PEER_IP, 17, b"udp-ish payload".to_vec(), false),
            (PEER_IP, 17, b"b".to_vec(), true)
        ]
    );
    assert_eq!(s.count(Ctr::IpDelivered), 2);
    // TCP is still unattached.
    let t = Ip::new(PEER_IP, OUR_IP, 6).build(&[0; 20]);
    assert_dropped(&mut s, &ip_frame(&t), Ctr::DropProtoUnreachable);
    assert!(s.detach(17).is_some());
    assert_dropped(&mut s, &ip_frame(&dgram), Ctr::DropProtoUnreachable);
}

/// (from, type, code, rest, protocol, quoted src, quoted dst, quote) of each ICMP error.
type Errors = Rc<RefCell<Vec<(Ipv4Addr, u8, u8, [u8; 4], u8, Ipv4Addr, Ipv4Addr, Vec<u8>)>>>;

struct ErrorRecorder(Errors);
impl Transport for ErrorRecorder {
    fn deliver(&mut self, _now: Duration, _d: &Datagram<'_>) {}
    fn icmp_error(&mut self, _now: Duration, e: &IcmpError<'_>) {
        assert_eq!(e.to, OUR_IP);
        assert_eq!(e.quote_header_len, 20);
        self.0.borrow_mut().push((
            e.from,
            e.icmp_type,
            e.icmp_code,
            e.rest,
            e.protocol,
            e.src,
            e.dst,
            e.quote.to_vec(),
        ));
    }
}

#[test]
fn icmp_errors_about_our_datagrams_reach_the_transport() {
    let mut s = stack_knowing_peer();
    let seen: Errors = Rc::new(RefCell::new(Vec::new()));
    s.attach(17, Box::new(ErrorRecorder(seen.clone())));
    // A UDP datagram we sent (5000 -> 7), as the peer quotes it back.
    let udp = [
        0x13, 0x88, 0x00, 0x07, 0x00, 0x0d, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o',
    ];
    let sent = Ip::new(OUR_IP, PEER_IP, 17).build(&udp);
    let err = |t: u8, c: u8, quote: &[u8]| {
        let mut m = vec![t, c, 0, 0, 0, 0, 0x05, 0xdc];
        m.extend_from_slice(quote);
        let sum = keepnet_ip::wire::checksum::compute(&m);
        m[2..4].copy_from_slice(&sum.to_be_bytes());
        ip_frame(&Ip::new(PEER_IP, OUR_IP, 1).build(&m))
    };
    // Port unreachable, quoting the whole datagram: handed over whole, nothing answered.
    let (d, out) = run(&mut s, ms(1), &err(3, 3, &sent));
    assert_eq!((d, out.len()), (Disposition::Handled, 0));
    // Time exceeded with only header + 8 bytes, and link padding after the quote trimmed.
    let mut padded = sent[..28].to_vec();
    padded[2..4].copy_from_slice(&28u16.to_be_bytes());
    padded.extend_from_slice(&[0; 6]);
    run(&mut s, ms(1), &err(11, 0, &padded));
    assert_eq!(
        *seen.borrow(),
        vec![
            (
                PEER_IP,
                3,
                3,
                [0, 0, 5, 0xdc],
                17,
                OUR_IP,
                PEER_IP,
                sent.clone()
            ),
            (
                PEER_IP,
                11,
                0,
                [0, 0, 5, 0xdc],
                17,
                OUR_IP,
                PEER_IP,
                padded[..28].to_vec()
            ),
        ]
    );
    assert_eq!(s.count(Ctr::IcmpErrorsToTransport), 2);
    // Not handed over: about a datagram someone else sent; a non-initial fragment; a quote
    // shorter than header + 8; source quench (RFC 6633).
    let mut foreign = Ip::new(Ipv4Addr::new(198, 18, 0, 9), PEER_IP, 17);
    let foreign_dgram = foreign.build(&udp);
    foreign.src = OUR_IP;
    foreign.flags_frag = 3;
    let frag = foreign.build(&udp);
    for m in [
        err(3, 3, &foreign_dgram),
        err(3, 3, &frag),
        err(3, 3, &sent[..27]),
    ] {
        let (d, out) = run(&mut s, ms(1), &m);
        assert_eq!((d, out.len()), (Disposition::Handled, 0));
    }
    assert_eq!(s.count(Ctr::IcmpErrorsUnmatched), 3);
    run(&mut s, ms(1), &err(4, 0, &sent));
    // About a protocol with no transport (TCP): only counted.
    let tcp = Ip::new(OUR_IP, PEER_IP, 6).build(&[0; 20]);
    run(&mut s, ms(1), &err(3, 1, &tcp));
    assert_eq!(seen.borrow().len(), 2);
    assert_eq!(s.count(Ctr::IcmpErrorsToTransport), 2);
    assert_eq!(s.count(Ctr::IcmpErrorsUnmatched), 3);
    assert_eq!(s.count(Ctr::IcmpErrorsIn), 7);
    // A transport that ignores errors (the trait's default) is fine too.
    s.attach(17, Box::new(Recorder::default()));
    run(&mut s, ms(1), &err(3, 3, &sent));
    assert_eq!(s.count(Ctr::IcmpErrorsToTransport), 3);
}

#[test]
fn ping_and_echo_reply_events() {
    let mut s = stack_knowing_peer();
    let mut out = Vec::new();
    s.ping(ms(1), PEER_IP, 77, 5, b"payload!", |f| out.push(f.to_vec()))
        .unwrap();
    let (p, m) = parse_icmp(&out[0]);
    assert_eq!(
        (p.dst(), m.msg_type(), m.echo_ident(), m.echo_seq()),
        (PEER_IP, 8, 77, 5)
    );
    assert_eq!(m.data(), b"payload!");
    let reply = ip_frame(&Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(0, 0, 77, 5, b"payload!")));
    assert_eq!(run(&mut s, ms(2), &reply).0, Disposition::Handled);
    assert_eq!(
        s.poll_event(),
        Some(Event::EchoReply {
            from: PEER_IP,
            ident: 77,
            seq: 5,
            payload: b"payload!".to_vec()
        })
    );
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.count(Ctr::IcmpEchoRequestsSent), 1);
    assert_eq!(s.count(Ctr::IcmpEchoRepliesIn), 1);
}

// ----------------------------------------------------------------------------------------------
// Routing
// ----------------------------------------------------------------------------------------------

#[test]
fn routing_on_link_gateway_and_none() {
    let mut s = stack();
    let far = Ipv4Addr::new(8, 8, 8, 8);
    assert_eq!(
        s.send_ip(ms(0), far, 17, b"x", |_| {}),
        Err(SendError::NoRoute)
    );
    assert_eq!(
        s.send_ip(ms(0), OUR_IP, 17, b"x", |_| {}),
        Err(SendError::NoRoute)
    );
    assert_eq!(s.count(Ctr::DropNoRoute), 2);
    assert_eq!(
        s.send_ip(ms(0), far, 17, &vec![0; 65516], |_| {}),
        Err(SendError::TooBig)
    );
    // Echo request from an off-link host with no gateway: handled, reply has no route.
    let req = ip_frame(&Ip::new(far, OUR_IP, 1).build(&icmp(8, 0, 1, 1, b"")));
    let (d, out) = run(&mut s, ms(1), &req);
    assert_eq!((d, out.len()), (Disposition::Handled, 0));
    assert_eq!(s.count(Ctr::DropNoRoute), 3);

    let mut cfg = config();
    cfg.gateway = Some(PEER_IP);
    let mut g = stack_with(cfg);
    let mut out = Vec::new();
    g.send_ip(ms(0), far, 17, b"x", |f| out.push(f.to_vec()))
        .unwrap();
    let e = EthernetFrame::new_checked(&out[0][..]).unwrap();
    assert_eq!(
        ArpPacket::new_checked(e.payload()).unwrap().tpa(),
        PEER_IP,
        "ARP for the gateway"
    );
    let (_, out) = run(
        &mut g,
        ms(1),
        &arp_frame(OUR_MAC, 2, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP),
    );
    let p = parse_ip(&out[0]);
    assert_eq!((p.dst(), &out[0][0..6]), (far, &PEER_MAC.0[..]));
    // Broadcasts go out without ARP.
    let mut out = Vec::new();
    g.send_ip(ms(2), Ipv4Addr::new(198, 18, 0, 255), 17, b"b", |f| {
        out.push(f.to_vec())
    })
    .unwrap();
    assert_eq!(&out[0][0..6], &[0xff; 6]);
}

#[test]
fn fragmentation_on_send_above_the_mtu() {
    let mut cfg = config();
    cfg.mtu = 576;
    let mut s = stack_with(cfg);
    run(
        &mut s,
        ms(0),
        &arp_frame(OUR_MAC, 2, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP),
    );
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 7) as u8).collect();
    let mut out = Vec::new();
    s.send_ip(ms(1), PEER_IP, 17, &payload, |f| out.push(f.to_vec()))
        .unwrap();
    assert_eq!(out.len(), 4); // 552 * 3 + 344
    let mut got = vec![0u8; payload.len()];
    let ident = parse_ip(&out[0]).ident();
    for (i, f) in out.iter().enumerate() {
        assert!(f.len() <= 14 + 576);
        let p = parse_ip(f);
        assert_eq!(p.ident(), ident);
        assert_eq!(p.more_frags(), i < 3);
        assert_eq!(p.frag_offset() % 8, 0);
        got[p.frag_offset()..p.frag_offset() + p.payload().len()].copy_from_slice(p.payload());
    }
    assert_eq!(got, payload);
    assert_eq!(s.count(Ctr::IpFragsOut), 4);
    // The identification counter moves per datagram.
    let mut out2 = Vec::new();
    s.send_ip(ms(1), PEER_IP, 17, b"x", |f| out2.push(f.to_vec()))
        .unwrap();
    assert_eq!(parse_ip(&out2[0]).ident(), ident.wrapping_add(1));
}

#[test]
fn snapshot_state_round_trips_and_is_validated() {
    let s = stack_knowing_peer();
    let saved = s.save(ms(1000));
    assert_eq!(saved.arp.len(), 1);
    let mut t = IpStack::new(config()).unwrap();
    t.restore(ms(5000), &saved).unwrap();
    assert_eq!(t.arp_lookup(PEER_IP, ms(5000)), Some(PEER_MAC));
    assert_eq!(
        t.arp_lookup(PEER_IP, ms(64_000)),
        None,
        "time to live carried over"
    );
    let mut bad = saved.clone();
    bad.arp[0].mac = [0xff; 6];
    let mut u = IpStack::new(config()).unwrap();
    assert!(u.restore(ms(0), &bad).is_err());
    assert_eq!(u.arp_lookup(PEER_IP, ms(0)), None, "nothing applied");
    let _ = Config::new(OUR_MAC, OUR_IP, 24);
}
