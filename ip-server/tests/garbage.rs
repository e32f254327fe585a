//! Garbage in: arbitrary bytes and mutated valid frames never panic the engine, and every
//! frame lands in `rx.handled` or in exactly one per-frame drop reason.

mod common;

use std::time::Duration;

use common::*;
use keepnet_ip::wire::checksum;
use keepnet_ip::{Ctr, Disposition, IpStack};
use proptest::prelude::*;

/// Feeds a frame and checks the accounting invariants.
fn feed(s: &mut IpStack, now: Duration, frame: &[u8]) {
    let before = s.counters().clone();
    let d = s.handle_frame(now, frame, |f| {
        assert!(f.len() <= 14 + 1500, "output within MTU")
    });
    match d {
        Disposition::Dropped(c) => {
            assert!(c.is_frame_drop(), "{} is a per-frame reason", c.name());
            assert_eq!(s.count(c), before.get(c) + 1, "{}", c.name());
        }
        Disposition::Handled => {
            assert_eq!(s.count(Ctr::RxHandled), before.get(Ctr::RxHandled) + 1)
        }
    }
    let c = s.counters();
    assert_eq!(c.get(Ctr::RxFrames), before.get(Ctr::RxFrames) + 1);
    assert_eq!(
        c.get(Ctr::RxFrames),
        c.get(Ctr::RxHandled) + c.get(Ctr::RxDropped)
    );
    let drops: u64 = Ctr::ALL
        .iter()
        .filter(|c| c.is_frame_drop())
        .map(|x| c.get(*x))
        .sum();
    assert_eq!(drops, c.get(Ctr::RxDropped));
}

/// Valid frames of every kind the engine handles.
fn corpus() -> Vec<Vec<u8>> {
    let mut v = vec![
        arp_frame(OUR_MAC, 1, PEER_MAC, PEER_IP, keepnet_ip::Mac::ZERO, OUR_IP),
        arp_frame(OUR_MAC, 2, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP),
        echo_request(1, 2, b"hello, world"),
        eth(
            OUR_MAC,
            PEER_MAC,
            0x0800,
            &Ip::new(PEER_IP, OUR_IP, 17).build(&[0; 16]),
        ),
        eth(
            OUR_MAC,
            PEER_MAC,
            0x0800,
            &Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(3, 2, 0, 0, &[0x45; 28])),
        ),
        eth(
            OUR_MAC,
            PEER_MAC,
            0x0800,
            &Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(0, 0, 5, 6, b"r")),
        ),
    ];
    let ip = Ip::new(PEER_IP, OUR_IP, 1);
    v.extend(fragment(&ip, &icmp(8, 0, 3, 3, &[7; 3000]), 1480));
    let mut opt = Ip::new(PEER_IP, OUR_IP, 1);
    opt.options = vec![1, 1, 1, 0];
    v.push(eth(
        OUR_MAC,
        PEER_MAC,
        0x0800,
        &opt.build(&icmp(8, 0, 1, 1, b"opts")),
    ));
    v
}

/// Recomputes the IP header checksum (and the ICMP one) after a mutation, when the header
/// is sane enough to find them, so that mutations reach the deeper layers.
fn fix_checksums(f: &mut [u8]) {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let hlen = usize::from(f[14] & 0x0f) * 4;
    if hlen < 20 || 14 + hlen > f.len() {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let c = checksum::compute(&f[14..14 + hlen]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    if f[23] == 1 && total >= hlen + 8 && 14 + total <= f.len() && f[20..22] == [0, 0] {
        let m = &mut f[14 + hlen..14 + total];
        m[2] = 0;
        m[3] = 0;
        let c = checksum::compute(m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }
}

fn mutate(base: &[u8], edits: &[(usize, u8)], cut: Option<usize>, fix: bool) -> Vec<u8> {
    let mut f = base.to_vec();
    for &(i, v) in edits {
        if !f.is_empty() {
            let n = f.len();
            f[i % n] = v;
        }
    }
    if let Some(c) = cut {
        f.truncate(c % (f.len() + 1));
    }
    if fix {
        fix_checksums(&mut f);
    }
    f
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
        let mut s = stack_knowing_peer();
        feed(&mut s, ms(1), &bytes);
    }

    #[test]
    fn arbitrary_payload_behind_a_valid_ethernet_header(
        ty in prop_oneof![Just(0x0800u16), Just(0x0806u16)],
        bcast in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..1600),
    ) {
        let mut s = stack_knowing_peer();
        let dst = if bcast { keepnet_ip::Mac::BROADCAST } else { OUR_MAC };
        feed(&mut s, ms(1), &eth(dst, PEER_MAC, ty, &payload));
    }

    #[test]
    fn mutated_valid_frames(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((14usize..200, any::<u8>()), 1..8),
        cut in proptest::option::of(any::<usize>()),
        fix in any::<bool>(),
    ) {
        let c = corpus();
        let base = pick.get::<Vec<u8>>(&c);
        let mut s = stack_knowing_peer();
        feed(&mut s, ms(1), &mutate(base, &edits, cut, fix));
        // The stack still works afterwards.
        feed(&mut s, ms(2), &echo_request(9, 9, b"still alive"));
    }

    #[test]
    fn sequences_of_mutated_frames_with_timers(
        steps in proptest::collection::vec(
            (any::<prop::sample::Index>(), proptest::collection::vec((14usize..1600, any::<u8>()), 0..4), any::<bool>(), 0u64..5000),
            1..40,
        ),
    ) {
        let c = corpus();
        let mut s = stack_knowing_peer();
        let mut now = ms(1);
        for (pick, edits, fix, dt) in steps {
            now += ms(dt);
            feed(&mut s, now, &mutate(pick.get::<Vec<u8>>(&c), &edits, None, fix));
            s.poll(now, |_| {});
        }
        s.poll(now + Duration::from_secs(120), |_| {});
        prop_assert_eq!(s.reassembly_usage(), (0, 0));
    }
}

/// A long seeded run on one stack: state (reassembly, ARP) accumulates across frames.
#[test]
fn seeded_random_long_run() {
    let c = corpus();
    let mut rng = Rng(0x6b65_6570_6e65_7421);
    let mut s = stack_knowing_peer();
    let mut now = ms(1);
    for i in 0..50_000u32 {
        let f = match rng.below(4) {
            0 => {
                let n = rng.below(1600) as usize;
                rng.bytes(n)
            }
            1 => {
                let ty = if rng.chance(0.5) { 0x0800 } else { 0x0806 };
                let n = rng.below(200) as usize;
                eth(OUR_MAC, PEER_MAC, ty, &rng.bytes(n))
            }
            _ => {
                let base = &c[rng.below(c.len() as u64) as usize];
                let edits: Vec<(usize, u8)> = (0..rng.below(4))
                    .map(|_| {
                        (
                            14 + rng.below(base.len() as u64) as usize,
                            rng.next_u64() as u8,
                        )
                    })
                    .collect();
                let cut = rng
                    .chance(0.2)
                    .then(|| rng.below(base.len() as u64 + 1) as usize);
                mutate(base, &edits, cut, rng.chance(0.7))
            }
        };
        feed(&mut s, now, &f);
        if i % 64 == 0 {
            now += ms(rng.below(3000));
            s.poll(now, |_| {});
        }
    }
    let (n, bytes) = s.reassembly_usage();
    let cfg = s.config().clone();
    assert!(n <= cfg.frag_max_sources * cfg.frag_max_datagrams_per_src);
    assert!(bytes <= cfg.frag_max_sources * cfg.frag_max_bytes_per_src);
    assert!(
        s.count(Ctr::RxHandled) > 1000,
        "the corpus reaches deep: {}",
        s.count(Ctr::RxHandled)
    );
    let reasons = Ctr::ALL
        .iter()
        .filter(|c| c.is_frame_drop() && s.count(**c) > 0)
        .count();
    assert!(reasons >= 15, "many reasons exercised: {reasons}");
}
