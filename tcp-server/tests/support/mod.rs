//! Deterministic network simulation for the TCP engine (smoltcp `netsim`, netstack3
//! `FakeNetwork` style): two hosts joined by a link with a seeded RNG (loss, duplication,
//! reordering, delay), a fake clock in microseconds, and a step limit so no test can hang.
//!
//! Segments cross the link as bytes: each is emitted with `TcpRepr::emit` (checksum over the
//! pseudo-header) and parsed back with `TcpSegment::new_checked` + `TcpRepr::parse`, so the
//! wire code is exercised on every segment.
#![allow(dead_code)]

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddrV4};

use keepnet_tcp::conn::Conn;
use keepnet_tcp::seq::Seq;
use keepnet_tcp::tcb::{RingGeom, State, Tcb, TcpConfig};
use keepnet_tcp::wire::{TcpRepr, TcpSegment};

/// splitmix64: small, seeded, good enough for fault injection.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// One end: a control block and its ring memory.
pub struct Host {
    pub tcb: Tcb,
    pub snd: Vec<u8>,
    pub rcv: Vec<u8>,
    pub addr: SocketAddrV4,
}

impl Host {
    pub fn new(
        cfg: &TcpConfig,
        addr: SocketAddrV4,
        peer: SocketAddrV4,
        snd: u32,
        rcv: u32,
    ) -> Host {
        let tcb = Tcb::new(
            cfg,
            addr,
            peer,
            RingGeom {
                off: 0,
                cap: snd,
                head: 0,
                len: 0,
            },
            RingGeom {
                off: snd,
                cap: rcv,
                head: 0,
                len: 0,
            },
            START,
        );
        Host {
            tcb,
            snd: vec![0; snd as usize],
            rcv: vec![0; rcv as usize],
            addr,
        }
    }
    pub fn conn(&mut self) -> Conn<'_> {
        Conn::new(&mut self.tcb, &mut self.snd, &mut self.rcv)
    }
    pub fn state(&self) -> State {
        self.tcb.state()
    }
    /// Everything the host would send now.
    pub fn poll(&mut self, now: u64) -> Vec<(TcpRepr, Vec<u8>)> {
        let mut out = Vec::new();
        self.conn()
            .poll_transmit(now, |r, p| out.push((*r, p.to_vec())));
        out
    }
}

/// The fake clock starts here (µs), not at 0 (0 means "timer off" in a Tcb).
pub const START: u64 = 1_000_000;

/// Link behaviour.
#[derive(Clone, Copy, Debug)]
pub struct LinkCfg {
    /// One-way delay (µs).
    pub delay_us: u64,
    /// Probability a segment is lost.
    pub loss: f64,
    /// Probability a segment is duplicated.
    pub dup: f64,
    /// Probability a segment is delayed by up to `reorder_us` more (so later ones pass it).
    pub reorder: f64,
    /// Extra delay for reordered segments (µs).
    pub reorder_us: u64,
}

impl Default for LinkCfg {
    fn default() -> Self {
        LinkCfg {
            delay_us: 5_000,
            loss: 0.0,
            dup: 0.0,
            reorder: 0.0,
            reorder_us: 0,
        }
    }
}

/// A segment in flight.
struct InFlight {
    at: u64,
    id: u64,
    to_b: bool,
    bytes: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.id) == (o.at, o.id)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    // Min-heap on (at, id).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.id).cmp(&(self.at, self.id))
    }
}

/// A segment as seen on the wire, for assertions.
#[derive(Clone, Debug)]
pub struct Trace {
    pub at: u64,
    pub from_a: bool,
    pub repr: TcpRepr,
    pub len: usize,
}

/// What a filter decides for a segment about to enter the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

pub type Filter = Box<dyn FnMut(bool, &TcpRepr, &[u8]) -> Verdict>;

pub struct Sim {
    pub now: u64,
    pub a: Host,
    pub b: Host,
    pub link: LinkCfg,
    pub rng: Rng,
    heap: BinaryHeap<InFlight>,
    next_id: u64,
    pub steps: u64,
    /// Record every segment sent (off for bulk tests).
    pub tracing: bool,
    pub trace: Vec<Trace>,
    /// Drop everything (link down).
    pub down: bool,
    /// Deterministic per-segment decisions, before random faults.
    pub filter: Option<Filter>,
    /// Segments that failed to parse (must stay 0).
    pub parse_errors: u64,
    pub sent: u64,
    pub dropped: u64,
}

pub const A_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 40000);
pub const B_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80);

impl Sim {
    /// Host `a` (client) and `b` (server), both CLOSED.
    pub fn new(seed: u64, cfg_a: &TcpConfig, cfg_b: &TcpConfig, bufsz: u32) -> Sim {
        Sim {
            now: START,
            a: Host::new(cfg_a, A_ADDR, B_ADDR, bufsz, bufsz),
            b: Host::new(cfg_b, B_ADDR, A_ADDR, bufsz, bufsz),
            link: LinkCfg::default(),
            rng: Rng::new(seed),
            heap: BinaryHeap::new(),
            next_id: 0,
            steps: 0,
            tracing: true,
            trace: Vec::new(),
            down: false,
            filter: None,
            parse_errors: 0,
            sent: 0,
            dropped: 0,
        }
    }

    /// `b` listens (ISS `iss_b`), `a` connects (ISS `iss_a`).
    pub fn open(&mut self, iss_a: u32, iss_b: u32) {
        self.b.conn().listen(Seq(iss_b));
        self.a
            .conn()
            .connect(Seq(iss_a), self.now)
            .expect("connect");
    }

    /// Opens and runs until both ends are ESTABLISHED.
    pub fn establish(&mut self, iss_a: u32, iss_b: u32) {
        self.open(iss_a, iss_b);
        let ok = self.run(10_000, |s| {
            s.a.state() == State::Established && s.b.state() == State::Established
        });
        assert!(
            ok,
            "handshake did not complete: a={:?} b={:?}",
            self.a.state(),
            self.b.state()
        );
    }

    fn enqueue(&mut self, from_a: bool, r: &TcpRepr, payload: &[u8]) {
        self.sent += 1;
        if self.tracing {
            self.trace.push(Trace {
                at: self.now,
                from_a,
                repr: *r,
                len: payload.len(),
            });
        }
        if self.down {
            self.dropped += 1;
            return;
        }
        if let Some(f) = self.filter.as_mut() {
            if f(from_a, r, payload) == Verdict::Drop {
                self.dropped += 1;
                return;
            }
        }
        if self.rng.chance(self.link.loss) {
            self.dropped += 1;
            return;
        }
        let (src, dst) = if from_a {
            (*A_ADDR.ip(), *B_ADDR.ip())
        } else {
            (*B_ADDR.ip(), *A_ADDR.ip())
        };
        let mut bytes = vec![0u8; r.buffer_len(payload.len())];
        let n = r.emit(&mut bytes, payload, src, dst).expect("emit");
        bytes.truncate(n);
        let copies = if self.rng.chance(self.link.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let mut at = self.now + self.link.delay_us.max(1);
            if self.rng.chance(self.link.reorder) {
                at += self.rng.below(self.link.reorder_us.max(1));
            }
            self.next_id += 1;
            self.heap.push(InFlight {
                at,
                id: self.next_id,
                to_b: from_a,
                bytes: bytes.clone(),
            });
        }
    }

    /// Delivers a segment (as bytes) to one host.
    fn deliver(&mut self, to_b: bool, bytes: &[u8]) {
        let (src, dst) = if to_b {
            (*A_ADDR.ip(), *B_ADDR.ip())
        } else {
            (*B_ADDR.ip(), *A_ADDR.ip())
        };
        let seg = match TcpSegment::new_checked(bytes) {
            Ok(s) => s,
            Err(_) => {
                self.parse_errors += 1;
                return;
            }
        };
        let repr = match TcpRepr::parse(&seg, src, dst) {
            Ok(r) => r,
            Err(_) => {
                self.parse_errors += 1;
                return;
            }
        };
        let now = self.now;
        let host = if to_b { &mut self.b } else { &mut self.a };
        host.conn().on_segment(now, &repr, seg.payload());
    }

    /// Hands a crafted segment straight to a host (no link).
    pub fn inject(&mut self, to_b: bool, r: &TcpRepr, payload: &[u8]) {
        let (src, dst) = if to_b {
            (*A_ADDR.ip(), *B_ADDR.ip())
        } else {
            (*B_ADDR.ip(), *A_ADDR.ip())
        };
        let mut bytes = vec![0u8; r.buffer_len(payload.len())];
        let n = r.emit(&mut bytes, payload, src, dst).expect("emit");
        bytes.truncate(n);
        self.deliver(to_b, &bytes);
    }

    /// One step: deliver what is due, run timers, transmit, advance the clock to the next
    /// event. Returns false if nothing at all is scheduled (the simulation is idle).
    pub fn step(&mut self) -> bool {
        self.steps += 1;
        while self.heap.peek().is_some_and(|p| p.at <= self.now) {
            if let Some(p) = self.heap.pop() {
                self.deliver(p.to_b, &p.bytes);
            }
        }
        let now = self.now;
        self.a.conn().on_tick(now);
        self.b.conn().on_tick(now);
        for from_a in [true, false] {
            let mut out: Vec<(TcpRepr, Vec<u8>)> = Vec::new();
            let host = if from_a { &mut self.a } else { &mut self.b };
            host.conn()
                .poll_transmit(now, |r, p| out.push((*r, p.to_vec())));
            for (r, p) in out {
                self.enqueue(from_a, &r, &p);
            }
        }
        let next = [
            self.heap.peek().map(|p| p.at),
            self.a.conn().next_deadline(),
            self.b.conn().next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            Some(t) => {
                if t > self.now {
                    self.now = t;
                }
                true
            }
            None => false,
        }
    }

    /// Runs `f` then a step, until `f` returns true (→ true), the sim goes idle with `f`
    /// still false, or `max_steps` steps pass (→ false).
    pub fn run(&mut self, max_steps: u64, mut f: impl FnMut(&mut Sim) -> bool) -> bool {
        for _ in 0..max_steps {
            if f(self) {
                return true;
            }
            if !self.step() {
                return f(self);
            }
        }
        false
    }

    /// Runs until the clock passes `t` (or idle / step limit).
    pub fn run_until_time(&mut self, t: u64, max_steps: u64) {
        self.run(max_steps, |s| s.now >= t);
    }

    /// Segments in the trace sent by `a` (true) or `b` (false).
    pub fn sent_by(&self, from_a: bool) -> impl Iterator<Item = &Trace> {
        self.trace.iter().filter(move |t| t.from_a == from_a)
    }
}
