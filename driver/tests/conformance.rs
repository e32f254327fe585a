//! One set of link tests, run against every backend: the memory wire always, the TAP device
//! (with an AF_PACKET socket as the kernel's end) when root.

mod common;

use std::time::{Duration, Instant};

use common::*;
use keepnet_driver::tap::{Tap, ETH_HEADER};
use keepnet_driver::wire::{FaultConfig, Side, Wire};
use keepnet_driver::LinkBackend;

const GUARD: Duration = Duration::from_secs(20);

/// Receives the next test frame with `tag` on `end`, skipping other traffic (a guard, not a
/// speed check, bounds the wait).
fn recv_tagged(end: &mut dyn LinkBackend, tag: u32, buf: &mut [u8]) -> Vec<u8> {
    let deadline = Instant::now() + GUARD;
    loop {
        match end.recv(buf).expect("recv") {
            Some(n) => {
                if parse_test_frame(&buf[..n]).is_some_and(|(t, _)| t == tag) {
                    return buf[..n].to_vec();
                }
            }
            None => {
                assert!(
                    Instant::now() < deadline,
                    "no frame with tag {tag:#x} arrived"
                );
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

fn send_all(end: &mut dyn LinkBackend, frame: &[u8]) {
    let deadline = Instant::now() + GUARD;
    while !end.send(frame).expect("send") {
        assert!(Instant::now() < deadline, "link stayed full");
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// `recv` on an idle link returns None at once (it never blocks).
fn recv_on_empty_is_none(near: &mut dyn LinkBackend, far: &mut dyn LinkBackend) {
    idle_end_is_none(near);
    idle_end_is_none(far);
}

fn idle_end_is_none(end: &mut dyn LinkBackend) {
    let mut buf = vec![0u8; 65536];
    // Drain whatever is there (a TAP may carry the kernel's own traffic), then check.
    let mut steps = 0;
    while end.recv(&mut buf).expect("recv").is_some() {
        steps += 1;
        assert!(steps < 10_000, "link never went idle");
    }
    assert_eq!(end.recv(&mut buf).expect("recv"), None);
}

/// Every size from 60 to MTU + 14 crosses intact, both ways.
fn sizes_round_trip(near: &mut dyn LinkBackend, far: &mut dyn LinkBackend, mtu: usize) {
    let mut buf = vec![0u8; 65536];
    for size in 60..=mtu + ETH_HEADER {
        let f = test_frame(0x5151, size as u64, size);
        send_all(near, &f);
        let got = recv_tagged(far, 0x5151, &mut buf);
        assert_eq!(got.len(), size, "near->far size {size}");
        assert!(got == f, "near->far frame of {size} bytes changed");
        let f = test_frame(0x5252, size as u64, size);
        send_all(far, &f);
        let got = recv_tagged(near, 0x5252, &mut buf);
        assert!(got == f, "far->near frame of {size} bytes changed");
    }
}

/// A burst of 500 frames arrives complete and in order, both ways. `drain_every`: how many
/// frames the sender may get ahead of the receiver (None: the whole burst at once).
fn burst_in_order(
    near: &mut dyn LinkBackend,
    far: &mut dyn LinkBackend,
    drain_every: Option<usize>,
) {
    burst_one_way(near, far, 0xB0B0, drain_every);
    burst_one_way(far, near, 0xB1B1, drain_every);
}

fn burst_one_way(
    tx: &mut dyn LinkBackend,
    rx: &mut dyn LinkBackend,
    tag: u32,
    drain_every: Option<usize>,
) {
    const N: u64 = 500;
    let mut buf = vec![0u8; 65536];
    let mut next = 0u64;
    let mut check = |rx: &mut dyn LinkBackend, upto: u64| {
        while next < upto {
            let f = recv_tagged(rx, tag, &mut buf);
            let (_, seq) = parse_test_frame(&f).unwrap();
            assert_eq!(seq, next, "burst frame out of order or lost");
            assert!(frame_intact(&f));
            next += 1;
        }
    };
    for seq in 0..N {
        send_all(tx, &test_frame(tag, seq, 64 + (seq as usize % 1000)));
        if drain_every.is_some_and(|k| (seq + 1) % k as u64 == 0) {
            check(rx, seq + 1);
        }
    }
    check(rx, N);
}

fn suite(near: &mut dyn LinkBackend, far: &mut dyn LinkBackend, mtu: usize, drain: Option<usize>) {
    recv_on_empty_is_none(near, far);
    sizes_round_trip(near, far, mtu);
    burst_in_order(near, far, drain);
    recv_on_empty_is_none(near, far);
}

#[test]
fn memory_wire_conforms() {
    watchdog(Duration::from_secs(120));
    let wire = Wire::create("conf-wire", 1024).unwrap();
    let mut a = wire.end(Side::A, FaultConfig::none()).unwrap();
    let mut b = wire.end(Side::B, FaultConfig::none()).unwrap();
    // The wire's slots carry up to 2048 bytes: an MTU of 2034 fills them.
    suite(&mut a, &mut b, 2048 - ETH_HEADER, None);
    let s = wire.stats(Side::A);
    assert_eq!(s.sent, s.received);
    assert_eq!(
        (s.lost, s.duplicated, s.reordered, s.corrupted),
        (0, 0, 0, 0)
    );
}

#[test]
fn tap_conforms() {
    if !need_root("tap_conforms") {
        return;
    }
    watchdog(Duration::from_secs(120));
    let ns = Netns::new();
    let mtu = 1500;
    let mut tap = Tap::create_in_netns(&ns.name, "kn0", mtu as u32, Some(KERNEL_MAC)).unwrap();
    assert_eq!(tap.name(), "kn0");
    let mut sock = ns
        .run(|| PacketSocket::open("kn0"))
        .expect("packet socket on kn0");
    // The kernel end drains its side while the burst runs: a TAP has no backpressure.
    suite(&mut tap, &mut sock, mtu, Some(32));
    drop(tap);
}
