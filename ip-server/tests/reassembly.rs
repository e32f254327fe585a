//! Fragment reassembly: order, duplicates, overlaps, limits, timeouts, and an 8000-byte echo
//! whose reply is fragmented at MTU 1500 and reassembles to the right bytes.

mod common;

use std::time::Duration;

use common::*;
use keepnet_ip::{Config, Ctr, Disposition, Event, IpStack};

fn big_echo(len: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
    let mut ip = Ip::new(PEER_IP, OUR_IP, 1);
    ip.ident = 0x5151;
    let frames = fragment(&ip, &icmp(8, 0, 0x77, 3, &data), 1480);
    (data, frames)
}

/// A second stack at the peer's address that knows us, to reassemble our output.
fn peer() -> IpStack {
    let mut cfg = Config::new(PEER_MAC, PEER_IP, 24);
    cfg.mtu = 1500;
    let mut p = IpStack::new(cfg).unwrap();
    p.poll(Duration::ZERO, |_| {});
    let req = arp_frame(PEER_MAC, 1, OUR_MAC, OUR_IP, keepnet_ip::Mac::ZERO, PEER_IP);
    assert_eq!(run(&mut p, Duration::ZERO, &req).0, Disposition::Handled);
    p
}

/// Feeds our reply frames to the peer; returns the echo replies it saw.
fn replies_at_peer(frames: &[Vec<u8>]) -> Vec<Event> {
    let mut p = peer();
    for f in frames {
        let (d, _) = run(&mut p, ms(5), f);
        assert_eq!(d, Disposition::Handled);
    }
    std::iter::from_fn(|| p.poll_event()).collect()
}

fn check_reply(out: &[Vec<u8>], data: &[u8]) {
    assert_eq!(out.len(), 6, "8008-byte ICMP message in 1480-byte pieces");
    for f in out {
        assert!(f.len() <= 1514, "fits the MTU");
        let p = parse_ip(f);
        assert_eq!((p.src(), p.dst()), (OUR_IP, PEER_IP));
        assert_eq!(p.frag_offset() % 8, 0);
    }
    let ev = replies_at_peer(out);
    assert_eq!(
        ev,
        vec![Event::EchoReply {
            from: OUR_IP,
            ident: 0x77,
            seq: 3,
            payload: data.to_vec()
        }]
    );
}

#[test]
fn big_echo_in_order_is_reassembled_and_the_reply_fragmented() {
    let mut s = stack_knowing_peer();
    let (data, frames) = big_echo(8000);
    assert_eq!(frames.len(), 6);
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let (d, o) = run(&mut s, ms(10 + i as u64), f);
        assert_eq!(d, Disposition::Handled);
        out.extend(o);
    }
    check_reply(&out, &data);
    assert_eq!(s.count(Ctr::IpFragsIn), 6);
    assert_eq!(s.count(Ctr::IpReassembled), 1);
    assert_eq!(s.count(Ctr::IpFragsOut), 6);
    assert_eq!(s.reassembly_usage(), (0, 0), "nothing left held");
}

#[test]
fn out_of_order_fragments() {
    let (data, frames) = big_echo(8000);
    for order in [[5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3], [1, 2, 3, 4, 5, 0]] {
        let mut s = stack_knowing_peer();
        let mut out = Vec::new();
        for i in order {
            out.extend(run(&mut s, ms(10), &frames[i]).1);
        }
        check_reply(&out, &data);
    }
}

#[test]
fn duplicate_fragments_are_dropped_alone() {
    let mut s = stack_knowing_peer();
    let (data, frames) = big_echo(8000);
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        if i < 5 {
            out.extend(run(&mut s, ms(10), f).1);
            assert_eq!(
                run(&mut s, ms(10), f).0,
                Disposition::Dropped(Ctr::DropFragDuplicate)
            );
        } else {
            out.extend(run(&mut s, ms(10), f).1);
        }
    }
    assert_eq!(s.count(Ctr::DropFragDuplicate), 5);
    check_reply(&out, &data);
    // A duplicate of the last fragment after completion starts a new datagram that times out.
    assert_eq!(run(&mut s, ms(20), &frames[5]).0, Disposition::Handled);
    assert!(
        poll(&mut s, ms(20) + Duration::from_secs(30)).is_empty(),
        "no fragment zero: silent"
    );
    assert_eq!(s.count(Ctr::DropFragTimeout), 1);
}

#[test]
fn overlapping_fragments_drop_the_whole_datagram() {
    let mut s = stack_knowing_peer();
    let ip = Ip::new(PEER_IP, OUR_IP, 1);
    let msg = icmp(8, 0, 1, 1, &[0xab; 3000]);
    assert_eq!(
        run(&mut s, ms(0), &frag_frame(&ip, 0, true, &msg[..1480])).0,
        Disposition::Handled
    );
    // Overlaps [1000, 2480) with [0, 1480).
    let o = frag_frame(&ip, 1000, true, &msg[1000..2480]);
    assert_eq!(
        run(&mut s, ms(1), &o).0,
        Disposition::Dropped(Ctr::DropFragOverlap)
    );
    assert_eq!(s.reassembly_usage().1, 0, "bytes freed at once");
    // The rest, even consistent, never completes: the datagram is gone.
    for (off, more) in [(1480, true), (2960, false)] {
        let end = (off + 1480).min(msg.len());
        let f = frag_frame(&ip, off, more, &msg[off..end]);
        assert_eq!(
            run(&mut s, ms(2), &f).0,
            Disposition::Dropped(Ctr::DropFragOverlap)
        );
    }
    assert_eq!(s.count(Ctr::DropFragOverlap), 3);
    assert_eq!(s.count(Ctr::IcmpEchoReplied), 0);
    // The tombstone goes at the deadline, uncounted as a timeout and without ICMP.
    assert!(poll(&mut s, Duration::from_secs(31)).is_empty());
    assert_eq!(s.count(Ctr::DropFragTimeout), 0);
    assert_eq!(s.reassembly_usage(), (0, 0));

    // Other overlaps: a fragment reaching past a known end; two different ends.
    let mut t = stack_knowing_peer();
    let ip2 = Ip {
        ident: 9,
        ..ip.clone()
    };
    run(&mut t, ms(0), &frag_frame(&ip2, 16, false, &[1; 8])); // total = 24
    let past = frag_frame(&ip2, 24, true, &[1; 8]);
    assert_eq!(
        run(&mut t, ms(0), &past).0,
        Disposition::Dropped(Ctr::DropFragOverlap)
    );
    let ip3 = Ip {
        ident: 10,
        ..ip.clone()
    };
    run(&mut t, ms(0), &frag_frame(&ip3, 16, false, &[1; 8]));
    let other_end = frag_frame(&ip3, 32, false, &[1; 8]);
    assert_eq!(
        run(&mut t, ms(0), &other_end).0,
        Disposition::Dropped(Ctr::DropFragOverlap)
    );
    // A tail fragment that ends before data already held.
    let ip4 = Ip {
        ident: 11,
        ..ip.clone()
    };
    run(&mut t, ms(0), &frag_frame(&ip4, 40, true, &[1; 8]));
    let short_end = frag_frame(&ip4, 8, false, &[1; 8]);
    assert_eq!(
        run(&mut t, ms(0), &short_end).0,
        Disposition::Dropped(Ctr::DropFragOverlap)
    );
}

#[test]
fn bad_fragments() {
    let mut s = stack_knowing_peer();
    let ip = Ip::new(PEER_IP, OUR_IP, 1);
    // Not the last, and not a multiple of 8 bytes.
    let f = frag_frame(&ip, 0, true, &[0; 12]);
    assert_dropped(&mut s, &f, Ctr::DropFragBad);
    let f = frag_frame(&ip, 0, true, &[]);
    assert_dropped(&mut s, &f, Ctr::DropFragBad);
    // Reaching past 65535 bytes: offset 8191*8 = 65528 plus 16 bytes.
    let f = frag_frame(&ip, 65528, false, &[0; 16]);
    assert_dropped(&mut s, &f, Ctr::DropFragBad);
}

#[test]
fn endless_fragments_hit_the_limits_and_time_out() {
    let mut cfg = config();
    cfg.frag_max_datagrams_per_src = 4;
    cfg.frag_max_bytes_per_src = 64 * 1024;
    cfg.frag_max_sources = 2;
    cfg.reassembly_timeout = Duration::from_secs(30);
    let mut s = stack_with(cfg);
    run(
        &mut s,
        ms(0),
        &arp_frame(OUR_MAC, 1, PEER_MAC, PEER_IP, keepnet_ip::Mac::ZERO, OUR_IP),
    );
    let ip = |id: u16| Ip {
        ident: id,
        ..Ip::new(PEER_IP, OUR_IP, 1)
    };
    // First fragments of six datagrams that never complete: all taken, the source's two
    // oldest evicted to stay within 4 datagrams.
    for id in 0..6u16 {
        let f = frag_frame(&ip(id), 0, true, &icmp(8, 0, id, 0, &[id as u8; 1472]));
        assert_eq!(
            run(&mut s, ms(u64::from(id)), &f).0,
            Disposition::Handled,
            "datagram {id}"
        );
    }
    assert_eq!(s.count(Ctr::DropFragEvicted), 2);
    assert_eq!(s.reassembly_usage().0, 4);
    // Datagram 5 keeps growing: the others make room first, then its own bytes hit the
    // per-source limit.
    let mut limited = 0;
    for k in 1..43 {
        let f = frag_frame(&ip(5), k * 1480, true, &[0; 1480]);
        match run(&mut s, ms(10), &f).0 {
            Disposition::Handled => {}
            Disposition::Dropped(Ctr::DropFragLimit) => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(limited > 0);
    assert_eq!(s.count(Ctr::DropFragEvicted), 5);
    let (n, bytes) = s.reassembly_usage();
    assert_eq!(n, 1);
    assert!(bytes <= 64 * 1024, "{bytes}");
    // A second source has its own budget; a third is refused (2 sources at most).
    let from = |a: u8| Ip {
        ident: 1,
        ..Ip::new(std::net::Ipv4Addr::new(198, 18, 0, a), OUR_IP, 1)
    };
    assert_eq!(
        run(&mut s, ms(10), &frag_frame(&from(9), 0, true, &[0; 8])).0,
        Disposition::Handled
    );
    let third = frag_frame(&from(10), 0, true, &[0; 8]);
    assert_eq!(
        run(&mut s, ms(10), &third).0,
        Disposition::Dropped(Ctr::DropFragLimit)
    );
    assert_eq!(s.count(Ctr::DropFragLimit), limited + 1);

    // The deadline is 30 s after each datagram's first fragment.
    assert_eq!(s.next_deadline(), Some(ms(30_005)));
    assert!(poll(&mut s, ms(30_004)).is_empty());
    // Datagram 5 times out; fragment zero came, so a time exceeded goes back.
    let out = poll(&mut s, ms(30_005));
    assert_eq!(s.count(Ctr::DropFragTimeout), 1);
    assert_eq!(out.len(), 1);
    let (_, m) = parse_icmp(&out[0]);
    assert_eq!((m.msg_type(), m.code()), (11, 1));
    assert_eq!(
        m.data().len(),
        20 + 8,
        "header and 8 bytes of fragment zero"
    );
    // The other source's: its time exceeded waits for ARP (an ARP request goes out).
    let out = poll(&mut s, ms(30_010));
    assert_eq!(s.count(Ctr::DropFragTimeout), 2);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0][12..14], [0x08, 0x06]);
    assert_eq!(s.reassembly_usage(), (0, 0));
    // Fragments of an ICMP error never draw a time exceeded.
    run(
        &mut s,
        ms(50_000),
        &frag_frame(&ip(99), 0, true, &icmp(3, 1, 0, 0, &[0; 40])),
    );
    let out = poll(&mut s, ms(80_000));
    assert!(
        out.iter().all(|f| f[12..14] == [0x08, 0x06]),
        "only ARP retries for .9"
    );
    assert_eq!(s.count(Ctr::DropFragTimeout), 3);
}

#[test]
fn reassembled_udp_gets_protocol_unreachable() {
    let mut s = stack_knowing_peer();
    let ip = Ip::new(PEER_IP, OUR_IP, 17);
    let payload = vec![5u8; 3000];
    let frames = fragment(&ip, &payload, 1480);
    let mut out = Vec::new();
    let mut last = Disposition::Handled;
    for f in &frames {
        let (d, o) = run(&mut s, ms(1), f);
        last = d;
        out.extend(o);
    }
    assert_eq!(last, Disposition::Dropped(Ctr::DropProtoUnreachable));
    assert_eq!(out.len(), 1);
    let (_, m) = parse_icmp(&out[0]);
    assert_eq!((m.msg_type(), m.code()), (3, 2));
    let quoted = keepnet_ip::wire::Ipv4Packet::new_checked(&m.data()[..20]);
    assert!(
        quoted.is_err(),
        "quoted header has the whole datagram's length, beyond the quote"
    );
    assert_eq!(&m.data()[20..], &[5u8; 8]);
}
