//! Deterministic simulation: two engines joined by an in-memory wire that loses, duplicates
//! and reorders frames from a seed, driven by a fake clock with a step limit.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use common::{Rng, OUR_IP, OUR_MAC, PEER_IP};
use keepnet_ip::{Config, Ctr, Event, IpStack, Mac};

const B_MAC: Mac = Mac([0x02, 0x6b, 0x6e, 0, 0, 1]);

/// Frames in flight: (delivery tick, order, destination node, bytes).
struct Wire {
    rng: Rng,
    loss: f64,
    dup: f64,
    max_delay: u64,
    order: u64,
    in_flight: Vec<(u64, u64, usize, Vec<u8>)>,
    sent: u64,
    lost: u64,
}

impl Wire {
    fn send(&mut self, tick: u64, from: usize, frame: &[u8]) {
        self.sent += 1;
        if self.rng.chance(self.loss) {
            self.lost += 1;
            return;
        }
        let copies = if self.rng.chance(self.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let at = tick + self.rng.below(self.max_delay + 1);
            self.order += 1;
            self.in_flight
                .push((at, self.order, 1 - from, frame.to_vec()));
        }
    }

    /// Frames due at `tick`, in delivery order.
    fn due(&mut self, tick: u64) -> Vec<(usize, Vec<u8>)> {
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].0 <= tick {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(at, order, _, _)| (*at, *order));
        due.into_iter().map(|(_, _, to, f)| (to, f)).collect()
    }
}

struct Node {
    stack: IpStack,
    peer: Ipv4Addr,
    /// Payload sent per sequence number.
    sent: BTreeMap<u16, Vec<u8>>,
    /// Sequence numbers answered (duplicates collapse).
    answered: BTreeSet<u16>,
    replies: u64,
}

fn node(mac: Mac, ip: Ipv4Addr, peer: Ipv4Addr) -> Node {
    let mut stack = IpStack::new(Config::new(mac, ip, 24)).unwrap();
    stack.set_next_ident(u16::from(mac.0[5]) << 12);
    Node {
        stack,
        peer,
        sent: BTreeMap::new(),
        answered: BTreeSet::new(),
        replies: 0,
    }
}

struct Sim {
    wire: Wire,
    nodes: [Node; 2],
    tick: u64,
}

impl Sim {
    fn new(seed: u64, loss: f64, dup: f64, max_delay: u64) -> Sim {
        Sim {
            wire: Wire {
                rng: Rng(seed),
                loss,
                dup,
                max_delay,
                order: 0,
                in_flight: Vec::new(),
                sent: 0,
                lost: 0,
            },
            nodes: [node(OUR_MAC, OUR_IP, PEER_IP), node(B_MAC, PEER_IP, OUR_IP)],
            tick: 0,
        }
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.tick)
    }

    /// One millisecond: deliver what is due, run timers, collect events.
    fn step(&mut self) {
        let now = self.now();
        let tick = self.tick;
        for (to, frame) in self.wire.due(tick) {
            let mut out = Vec::new();
            self.nodes[to]
                .stack
                .handle_frame(now, &frame, |f| out.push(f.to_vec()));
            for f in out {
                self.wire.send(tick, to, &f);
            }
        }
        for i in 0..2 {
            let mut out = Vec::new();
            self.nodes[i].stack.poll(now, |f| out.push(f.to_vec()));
            for f in out {
                self.wire.send(tick, i, &f);
            }
            let n = &mut self.nodes[i];
            while let Some(Event::EchoReply {
                from,
                ident,
                seq,
                payload,
            }) = n.stack.poll_event()
            {
                assert_eq!(from, n.peer);
                assert_eq!(ident, 0xbeef);
                let want = n.sent.get(&seq).expect("a reply to a ping we sent");
                assert_eq!(&payload, want, "reply to seq {seq} is byte-correct");
                n.answered.insert(seq);
                n.replies += 1;
            }
        }
        self.tick += 1;
    }

    fn ping(&mut self, i: usize, seq: u16, payload: Vec<u8>) {
        let now = self.now();
        let tick = self.tick;
        let n = &mut self.nodes[i];
        let mut out = Vec::new();
        let _ = n
            .stack
            .ping(now, n.peer, 0xbeef, seq, &payload, |f| out.push(f.to_vec()));
        n.sent.insert(seq, payload);
        for f in out {
            self.wire.send(tick, i, &f);
        }
    }

    /// Runs until the wire is empty and no timer is due within `quiet`, or the step limit.
    fn drain(&mut self, limit: u64) {
        let end = self.tick + limit;
        while self.tick < end {
            self.step();
            if self.wire.in_flight.is_empty()
                && self.nodes.iter().all(|n| n.stack.next_deadline().is_none())
            {
                return;
            }
        }
        panic!("simulation did not settle within {limit} steps");
    }
}

#[test]
fn thousand_pings_each_way_over_a_lossy_reordering_duplicating_wire() {
    let (loss, dup) = (0.10, 0.05);
    let mut sim = Sim::new(0x5eed_0001, loss, dup, 5);
    let mut payload_rng = Rng(42);
    const PINGS: u16 = 1000;
    for seq in 0..PINGS {
        for i in 0..2 {
            let len = payload_rng.below(1400) as usize;
            let p = payload_rng.bytes(len);
            sim.ping(i, seq, p);
        }
        for _ in 0..10 {
            sim.step();
        }
    }
    sim.drain(60_000);
    // A ping is answered if its request and its reply both cross (duplicates aside).
    let p_fail = 1.0 - (1.0 - loss) * (1.0 - loss);
    let n = f64::from(PINGS);
    let sigma = (n * p_fail * (1.0 - p_fail)).sqrt();
    for (i, node) in sim.nodes.iter().enumerate() {
        let lost = n - node.answered.len() as f64;
        eprintln!(
            "node {i}: {} of {PINGS} answered ({} replies), {lost} lost, expected {:.0} +- {:.0}",
            node.answered.len(),
            node.replies,
            n * p_fail,
            3.0 * sigma
        );
        assert!(
            (lost - n * p_fail).abs() <= 3.0 * sigma,
            "loss {lost} outside {:.1} +- {:.1}",
            n * p_fail,
            3.0 * sigma
        );
        assert!(node.replies >= node.answered.len() as u64);
        let s = &node.stack;
        assert!(s.count(Ctr::ArpRequests) >= 1);
        assert_eq!(
            s.count(Ctr::DropIcmpChecksum),
            0,
            "no corruption on this wire"
        );
        assert_eq!(s.count(Ctr::DropIpv4Checksum), 0);
    }
    assert!(sim.wire.lost > 0);
    eprintln!(
        "wire: {} frames sent, {} lost",
        sim.wire.sent, sim.wire.lost
    );
}

#[test]
fn fragmented_pings_over_a_lossy_wire_are_byte_correct_and_leave_nothing_held() {
    let mut sim = Sim::new(0x5eed_0002, 0.05, 0.05, 8);
    let mut payload_rng = Rng(7);
    for seq in 0..200u16 {
        let len = 1400 + payload_rng.below(7000) as usize;
        let p = payload_rng.bytes(len);
        sim.ping(0, seq, p);
        for _ in 0..20 {
            sim.step();
        }
    }
    sim.drain(120_000);
    let a = &sim.nodes[0];
    let b = &sim.nodes[1];
    eprintln!("{} of 200 fragmented pings answered", a.answered.len());
    assert!(
        a.answered.len() > 100,
        "most get through: {}",
        a.answered.len()
    );
    assert!(b.stack.count(Ctr::IpReassembled) >= a.answered.len() as u64);
    assert!(a.stack.count(Ctr::IpFragsOut) > 400);
    // Incomplete datagrams timed out; nothing is held on either side.
    assert!(b.stack.count(Ctr::DropFragTimeout) > 0);
    for n in &sim.nodes {
        assert_eq!(n.stack.reassembly_usage(), (0, 0));
    }
}

#[test]
fn arp_retries_and_timeouts_on_the_fake_clock() {
    // Everything lost: A asks three times, 1 s apart, then gives up on its queued pings.
    let mut sim = Sim::new(3, 1.0, 0.0, 0);
    for seq in 0..3 {
        sim.ping(0, seq, vec![seq as u8; 10]);
    }
    let mut requests_at = Vec::new();
    let mut last = sim.nodes[0].stack.count(Ctr::ArpRequests);
    requests_at.push(0); // the first goes out with the first ping
    for _ in 0..5000 {
        sim.step();
        let now = sim.nodes[0].stack.count(Ctr::ArpRequests);
        if now != last {
            requests_at.push(sim.tick - 1);
            last = now;
        }
    }
    assert_eq!(requests_at, vec![0, 1000, 2000]);
    assert_eq!(sim.nodes[0].stack.count(Ctr::DropArpUnresolved), 3);
    assert_eq!(sim.nodes[0].stack.next_deadline(), None);

    // A clean wire: resolved at once; entries expire after 60 s and are asked for again.
    let mut sim = Sim::new(4, 0.0, 0.0, 1);
    sim.ping(0, 1, b"one".to_vec());
    sim.drain(10_000);
    assert!(sim.nodes[0].answered.contains(&1));
    let asked = sim.nodes[0].stack.count(Ctr::ArpRequests);
    while sim.tick < 61_000 {
        sim.step();
    }
    sim.ping(0, 2, b"two".to_vec());
    sim.drain(10_000);
    assert!(sim.nodes[0].answered.contains(&2));
    assert_eq!(sim.nodes[0].stack.count(Ctr::ArpRequests), asked + 1);
}
