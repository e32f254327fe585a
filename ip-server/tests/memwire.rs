//! Two ip engines joined by the driver's real in-memory wire (`keepnet_driver::wire`) with
//! seeded loss, duplication and reordering, driven in one thread by a fake clock with a step
//! limit. Each pings the other 1000 times; every reply must be byte-correct and answer a
//! request that was sent, and what got through must match the wire's own fault counters
//! exactly (frame by frame) and the injected rates statistically.
//!
//! `KEEPNET_MEMWIRE_SEED` overrides the seed (the run is deterministic for a given seed).

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Rng;
use keepnet_driver::wire::WIRE_FRAME_MAX;
use keepnet_driver::{Clock, FaultConfig, LinkBackend, Side, Wire, WireEnd, WireStats};
use keepnet_ip::{Config, Ctr, Event, IpStack, Mac};

const LOSS: f64 = 0.10;
const DUPLICATE: f64 = 0.02;
const REORDER: f64 = 0.10;
const PINGS: u16 = 1000;
/// Fake-clock milliseconds between rounds of pings.
const PACE_MS: u64 = 5;

const SIDES: [Side; 2] = [Side::A, Side::B];
const IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(198, 18, 0, 20)];
const MACS: [Mac; 2] = [
    Mac([0x02, 0x6b, 0x6e, 0x77, 0, 0x0a]),
    Mac([0x02, 0x6b, 0x6e, 0x77, 0, 0x14]),
];
/// Echo idents of the measured pings, per node.
const IDENTS: [u16; 2] = [0xa000, 0xb000];
/// Echo idents of the warm-up pings that get ARP resolved, per node.
const WARM_IDENTS: [u16; 2] = [0xa0ff, 0xb0ff];

/// What a frame on the wire is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Arp,
    EchoRequest(u16, u16),
    EchoReply(u16, u16),
    Other,
}

fn classify(f: &[u8]) -> Kind {
    if f.len() < 14 {
        return Kind::Other;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0806 => Kind::Arp,
        0x0800 => {
            let ip = &f[14..];
            if ip.len() < 20 {
                return Kind::Other;
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ip[9] != 1 || frag != 0 || ip.len() < ihl + 8 {
                return Kind::Other;
            }
            let icmp = &ip[ihl..];
            let ident = u16::from_be_bytes([icmp[4], icmp[5]]);
            let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            match icmp[0] {
                8 => Kind::EchoRequest(ident, seq),
                0 => Kind::EchoReply(ident, seq),
                _ => Kind::Other,
            }
        }
        _ => Kind::Other,
    }
}

/// The fates of the frames of one kind (or one ping's requests or replies), as the wire's
/// counters recorded them at each send, and what the receiver took off the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Fates {
    sent: u64,
    lost: u64,
    duplicated: u64,
    received: u64,
}

impl Fates {
    /// Copies the wire should have delivered.
    fn expected(&self) -> u64 {
        self.sent - self.lost + self.duplicated
    }
    fn add(&mut self, o: &Fates) {
        self.sent += o.sent;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.received += o.received;
    }
}

/// One ping (ident, seq): its payload, its requests and replies on the wire, and the echo
/// reply events the pinger saw.
#[derive(Debug, Default)]
struct Ping {
    payload: Vec<u8>,
    requests: Fates,
    replies: Fates,
    events: u64,
}

struct Harness {
    wire: Wire,
    clock: Arc<AtomicU64>,
    ends: [WireEnd; 2],
    stacks: [IpStack; 2],
    tick: u64,
    pings: BTreeMap<(u16, u16), Ping>,
    /// Per sending side and kind (echo frames folded into one key each).
    by_kind: [BTreeMap<Kind, Fates>; 2],
}

fn fold(k: Kind) -> Kind {
    match k {
        Kind::EchoRequest(..) => Kind::EchoRequest(0, 0),
        Kind::EchoReply(..) => Kind::EchoReply(0, 0),
        k => k,
    }
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let wire = Wire::create("ip-memwire-test", 256).unwrap();
        let clock = Arc::new(AtomicU64::new(0));
        let end = |i: usize| {
            let faults = FaultConfig {
                seed: seed ^ (0x9e37_79b9 * (i as u64 + 1)),
                loss: LOSS,
                duplicate: DUPLICATE,
                reorder: REORDER,
                // Long enough for the next frame (pings go out every PACE_MS) to overtake.
                reorder_hold_us: 20_000,
                ..FaultConfig::none()
            };
            wire.end(SIDES[i], faults)
                .unwrap()
                .with_clock(Clock::Manual(clock.clone()))
        };
        let ends = [end(0), end(1)];
        let stack = |i: usize| {
            let mut s = IpStack::new(Config::new(MACS[i], IPS[i], 24)).unwrap();
            s.set_next_ident(0x1000 * (i as u16 + 1));
            s
        };
        Harness {
            stacks: [stack(0), stack(1)],
            wire,
            clock,
            ends,
            tick: 0,
            pings: BTreeMap::new(),
            by_kind: [BTreeMap::new(), BTreeMap::new()],
        }
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.tick)
    }

    /// Sends `frames` from node `i`, recording each frame's fate from the wire's counters.
    fn send(&mut self, i: usize, frames: Vec<Vec<u8>>) {
        for f in frames {
            let before = self.wire.stats(SIDES[i]);
            assert!(
                LinkBackend::send(&mut self.ends[i], &f).unwrap(),
                "wire full at tick {}",
                self.tick
            );
            let after = self.wire.stats(SIDES[i]);
            assert_eq!(after.sent, before.sent + 1);
            assert_eq!(after.corrupted, before.corrupted, "no corruption injected");
            let fate = Fates {
                sent: 1,
                lost: after.lost - before.lost,
                duplicated: after.duplicated - before.duplicated,
                received: 0,
            };
            assert!(fate.lost + fate.duplicated <= 1);
            let kind = classify(&f);
            self.by_kind[i].entry(fold(kind)).or_default().add(&fate);
            match kind {
                Kind::EchoRequest(ident, seq) => {
                    let p = self
                        .pings
                        .get_mut(&(ident, seq))
                        .expect("an echo request the test asked for");
                    assert!(ident == IDENTS[i] || ident == WARM_IDENTS[i]);
                    p.requests.add(&fate);
                }
                Kind::EchoReply(ident, seq) => {
                    let p = self
                        .pings
                        .get_mut(&(ident, seq))
                        .unwrap_or_else(|| panic!("node {i} replied to {ident:#x}/{seq} unasked"));
                    p.replies.add(&fate);
                }
                Kind::Arp => {}
                Kind::Other => panic!("node {i} sent an unexpected frame {f:02x?}"),
            }
        }
    }

    /// One fake millisecond: each node takes its frames off the wire, runs its timers and
    /// reports its echo replies; then both ends move their held-back frames along.
    fn step(&mut self) {
        let now = self.now();
        self.clock.store(now.as_nanos() as u64, Ordering::Release);
        let mut buf = vec![0u8; WIRE_FRAME_MAX];
        for i in 0..2 {
            let mut out = Vec::new();
            while let Some(n) = LinkBackend::recv(&mut self.ends[i], &mut buf).unwrap() {
                let frame = &buf[..n];
                let kind = classify(frame);
                self.by_kind[1 - i].entry(fold(kind)).or_default().received += 1;
                match kind {
                    Kind::EchoRequest(ident, seq) => {
                        self.pings.get_mut(&(ident, seq)).unwrap().requests.received += 1;
                    }
                    Kind::EchoReply(ident, seq) => {
                        self.pings.get_mut(&(ident, seq)).unwrap().replies.received += 1;
                    }
                    _ => {}
                }
                self.stacks[i].handle_frame(now, frame, |f| out.push(f.to_vec()));
            }
            self.stacks[i].poll(now, |f| out.push(f.to_vec()));
            self.send(i, out);
            while let Some(ev) = self.stacks[i].poll_event() {
                let Event::EchoReply {
                    from,
                    ident,
                    seq,
                    payload,
                } = ev;
                assert_eq!(from, IPS[1 - i], "reply from the peer");
                assert!(
                    ident == IDENTS[i] || ident == WARM_IDENTS[i],
                    "node {i} got a reply with someone else's ident {ident:#x}"
                );
                let p = self
                    .pings
                    .get_mut(&(ident, seq))
                    .unwrap_or_else(|| panic!("reply {ident:#x}/{seq} without a request"));
                assert_eq!(payload, p.payload, "reply {ident:#x}/{seq} is byte-correct");
                p.events += 1;
            }
        }
        for e in &mut self.ends {
            LinkBackend::flush(e).unwrap();
        }
        self.tick += 1;
    }

    fn ping(&mut self, i: usize, ident: u16, seq: u16, payload: Vec<u8>) {
        let now = self.now();
        let old = self.pings.insert(
            (ident, seq),
            Ping {
                payload: payload.clone(),
                ..Ping::default()
            },
        );
        assert!(old.is_none());
        let mut out = Vec::new();
        self.stacks[i]
            .ping(now, IPS[1 - i], ident, seq, &payload, |f| {
                out.push(f.to_vec())
            })
            .unwrap();
        self.send(i, out);
    }

    fn resolved(&self, i: usize) -> bool {
        self.stacks[i].arp_lookup(IPS[1 - i], self.now()).is_some()
    }

    /// True when every frame accepted by the wire has been delivered.
    fn wire_quiet(&self) -> bool {
        SIDES.iter().zip(&self.ends).all(|(&s, e)| {
            let st = self.wire.stats(s);
            e.queued() == 0 && st.received == st.sent - st.lost + st.duplicated
        })
    }
}

fn seed() -> u64 {
    std::env::var("KEEPNET_MEMWIRE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_6d77_6972_6501)
}

#[test]
fn thousand_pings_each_way_over_the_driver_memory_wire_with_faults() {
    let started = Instant::now();
    let seed = seed();
    let mut h = Harness::new(seed);
    let mut rng = Rng(seed.rotate_left(17));

    // Warm-up: ping (with a separate ident) every 500 ms until both nodes know each other,
    // so the measured pings never wait on ARP.
    let mut warm_seq = [0u16; 2];
    while !(h.resolved(0) && h.resolved(1)) {
        assert!(h.tick < 30_000, "ARP did not resolve in 30 s of fake time");
        if h.tick % 500 == 0 {
            for i in 0..2 {
                if !h.resolved(i) {
                    h.ping(i, WARM_IDENTS[i], warm_seq[i], rng.bytes(32));
                    warm_seq[i] += 1;
                }
            }
        }
        h.step();
    }
    let resolved_at = h.tick;
    for _ in 0..50 {
        h.step();
    }
    let unresolved_before = [0, 1].map(|i| h.stacks[i].count(Ctr::DropArpUnresolved));

    // Measurement: one ping each way every PACE_MS, payloads of 0..1400 random bytes (no
    // fragmentation).
    for seq in 0..PINGS {
        for (i, &ident) in IDENTS.iter().enumerate() {
            let len = rng.below(1400) as usize;
            h.ping(i, ident, seq, rng.bytes(len));
        }
        for _ in 0..PACE_MS {
            h.step();
        }
    }
    // Drain: until the wire holds nothing for a while (held-back frames wait 20 ms).
    let limit = h.tick + 10_000;
    let mut quiet = 0;
    while quiet < 100 {
        assert!(
            h.tick < limit,
            "wire did not drain within 10 s of fake time"
        );
        h.step();
        quiet = if h.wire_quiet() { quiet + 1 } else { 0 };
    }

    // 1. The wire's counters against what the receivers took off it, per direction and per
    //    kind of frame: every frame not lost arrives, duplicates twice.
    let stats: [WireStats; 2] = SIDES.map(|s| h.wire.stats(s));
    for (i, st) in stats.iter().enumerate() {
        let mut total = Fates::default();
        for (kind, f) in &h.by_kind[i] {
            assert_eq!(f.received, f.expected(), "side {i}, {kind:?}: {f:?}");
            total.add(f);
        }
        assert_eq!(
            (total.sent, total.lost, total.duplicated, total.received),
            (st.sent, st.lost, st.duplicated, st.received),
            "side {i}: per-frame fates add up to the wire's counters"
        );
        assert_eq!((st.corrupted, st.bad_frames, st.delayed), (0, 0, 0));
        assert!(
            st.reordered > 0 && st.duplicated > 0 && st.lost > 0,
            "{st:?}"
        );
    }

    // 2. Per ping: one request frame each; the responder answers every copy it got; the
    //    pinger sees exactly the reply copies the wire delivered.
    for ((ident, seq), p) in &h.pings {
        let what = format!("ping {ident:#x}/{seq}: {p:?}");
        assert_eq!(p.requests.sent, 1, "{what}");
        assert_eq!(p.requests.received, p.requests.expected(), "{what}");
        assert_eq!(p.replies.sent, p.requests.received, "{what}");
        assert_eq!(p.replies.received, p.replies.expected(), "{what}");
        assert_eq!(p.events, p.replies.received, "{what}");
    }

    // 3. Per direction of pinging: the round trips against the injected rates.
    let q = 1.0 - LOSS;
    // A request arrives (q); one reply, or two if the request was duplicated, must cross.
    let p_ok = q * ((1.0 - DUPLICATE) * q + DUPLICATE * (1.0 - LOSS * LOSS));
    let n = f64::from(PINGS);
    for i in 0..2 {
        let mine: Vec<&Ping> = h
            .pings
            .iter()
            .filter(|((ident, _), _)| *ident == IDENTS[i])
            .map(|(_, p)| p)
            .collect();
        assert_eq!(mine.len(), usize::from(PINGS));
        let mut req = Fates::default();
        let mut rep = Fates::default();
        let mut events = 0;
        for p in &mine {
            req.add(&p.requests);
            rep.add(&p.replies);
            events += p.events;
        }
        let answered = mine.iter().filter(|p| p.events > 0).count() as f64;
        let failed = n - answered;
        // The identity the brief asks for, over the wire's counters.
        assert_eq!(
            events,
            req.sent - req.lost + req.duplicated - rep.lost + rep.duplicated,
            "node {i}: replies = requests - requests lost + dup - replies lost + dup"
        );
        let (mean, sigma) = (n * (1.0 - p_ok), (n * p_ok * (1.0 - p_ok)).sqrt());
        let (mean81, sigma81) = (n * 0.19, (n * 0.81 * 0.19).sqrt());
        eprintln!(
            "node {i} pings: requests {} sent, {} lost, {} dup; replies {} sent, {} lost, {} dup; \
             {events} echo replies, {answered} of {PINGS} answered, {failed} round trips lost \
             (expected {mean:.1} +- {:.1}; at p=0.81: {mean81:.0} +- {:.1})",
            req.sent,
            req.lost,
            req.duplicated,
            rep.sent,
            rep.lost,
            rep.duplicated,
            3.0 * sigma,
            3.0 * sigma81,
        );
        assert!(
            (failed - mean).abs() <= 3.0 * sigma,
            "node {i}: {failed} round trips lost, outside {mean:.1} +- {:.1}",
            3.0 * sigma
        );
        assert!((failed - mean81).abs() <= 3.0 * sigma81);
        let s = &h.stacks[i];
        assert_eq!(s.count(Ctr::DropArpUnresolved), unresolved_before[i]);
        assert_eq!(s.count(Ctr::DropArpQueueFull), 0);
        assert_eq!(s.count(Ctr::IcmpEventsLost), 0);
        assert_eq!(s.count(Ctr::DropIpv4Checksum), 0);
        assert_eq!(s.count(Ctr::DropIcmpChecksum), 0);
    }
    // Per-frame loss in each direction within 3 sigma of the injected rate.
    for (i, st) in stats.iter().enumerate() {
        let sent = st.sent as f64;
        let (mean, sigma) = (sent * LOSS, (sent * LOSS * (1.0 - LOSS)).sqrt());
        eprintln!(
            "wire {:?}->{:?}: {st:?}; loss expected {mean:.1} +- {:.1}",
            SIDES[i],
            SIDES[1 - i],
            3.0 * sigma
        );
        assert!(
            (st.lost as f64 - mean).abs() <= 3.0 * sigma,
            "side {i}: {} of {} frames lost, outside {mean:.1} +- {:.1}",
            st.lost,
            st.sent,
            3.0 * sigma
        );
    }
    eprintln!(
        "seed {seed:#x}: ARP resolved at {resolved_at} ms, {} fake ms in all, {:?} wall",
        h.tick,
        started.elapsed()
    );
}
