//! TEMPORARY stand-ins for `rtt`, `cc` and `sack` (written by another helper) with the
//! agreed API, so the engine compiles and its tests run before those modules land.
//! Deleted once the real modules are in.
#![allow(dead_code, missing_docs)]

use std::time::Duration;

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Rtt {
    srtt_us: u64,
    rttvar_us: u64,
    min_us: u64,
    max_us: u64,
    shift: u32,
    have: u32,
}

impl Rtt {
    pub fn new(min_rto: Duration, max_rto: Duration) -> Rtt {
        Rtt {
            srtt_us: 0,
            rttvar_us: 0,
            min_us: min_rto.as_micros() as u64,
            max_us: max_rto.as_micros() as u64,
            shift: 0,
            have: 0,
        }
    }
    pub fn sample(&mut self, rtt: Duration) {
        let r = rtt.as_micros() as u64;
        if self.have == 0 {
            self.srtt_us = r;
            self.rttvar_us = r / 2;
            self.have = 1;
        } else {
            let d = self.srtt_us.abs_diff(r);
            self.rttvar_us = (3 * self.rttvar_us + d) / 4;
            self.srtt_us = (7 * self.srtt_us + r) / 8;
        }
    }
    pub fn rto(&self) -> Duration {
        let base = if self.have == 0 {
            1_000_000
        } else {
            self.srtt_us + (4 * self.rttvar_us).max(1000)
        };
        let v = base
            .max(self.min_us)
            .saturating_mul(1u64 << self.shift.min(30))
            .min(self.max_us);
        Duration::from_micros(v)
    }
    pub fn backoff(&mut self) {
        self.shift = (self.shift + 1).min(30);
    }
    pub fn reset_backoff(&mut self) {
        self.shift = 0;
    }
    pub fn srtt(&self) -> Option<Duration> {
        (self.have != 0).then(|| Duration::from_micros(self.srtt_us))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CcAlgo {
    NewReno,
    Cubic,
}

#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Cc {
    cwnd: u32,
    ssthresh: u32,
    acc: u32,
    rec: u32,
}

impl Cc {
    pub fn new(_algo: CcAlgo, mss: u32, _now_us: u64) -> Cc {
        Cc {
            cwnd: 10 * mss,
            ssthresh: u32::MAX,
            acc: 0,
            rec: 0,
        }
    }
    pub fn cwnd(&self) -> u32 {
        self.cwnd
    }
    pub fn ssthresh(&self) -> u32 {
        self.ssthresh
    }
    pub fn on_ack(&mut self, acked: u32, mss: u32, _flight: u32, _now: u64, _srtt: u32) {
        if self.rec != 0 {
            return;
        }
        if self.cwnd < self.ssthresh {
            self.cwnd = self.cwnd.saturating_add(acked.min(mss));
        } else {
            self.acc += acked;
            if self.acc >= self.cwnd {
                self.acc -= self.cwnd;
                self.cwnd = self.cwnd.saturating_add(mss);
            }
        }
    }
    pub fn enter_recovery(&mut self, flight: u32, mss: u32, _now: u64) {
        self.ssthresh = (flight / 2).max(2 * mss);
        self.cwnd = self.ssthresh;
        self.rec = 1;
    }
    pub fn on_partial_ack(&mut self, acked: u32, mss: u32) {
        self.cwnd = self.cwnd.saturating_sub(acked).saturating_add(mss);
    }
    pub fn exit_recovery(&mut self, flight: u32, mss: u32) {
        self.cwnd = self.ssthresh.min(flight.max(mss) + mss);
        self.rec = 0;
    }
    pub fn on_rto(&mut self, flight: u32, mss: u32) {
        self.ssthresh = (flight / 2).max(2 * mss);
        self.cwnd = mss;
        self.rec = 0;
    }
    pub fn on_idle_restart(&mut self, mss: u32) {
        self.cwnd = self.cwnd.min(10 * mss);
    }
    pub fn in_recovery(&self) -> bool {
        self.rec != 0
    }
}

fn lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}
fn le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct RecvSack {
    r: [(u32, u32); 8],
    n: u32,
}

impl RecvSack {
    pub fn insert(&mut self, start: u32, end: u32) -> bool {
        if !lt(start, end) {
            return false;
        }
        let (mut s, mut e) = (start, end);
        let mut keep: [(u32, u32); 8] = [(0, 0); 8];
        let mut k = 0;
        for &(a, b) in self.r.iter().take(self.n as usize) {
            if le(a, e) && le(s, b) {
                if lt(a, s) {
                    s = a;
                }
                if lt(e, b) {
                    e = b;
                }
            } else {
                keep[k] = (a, b);
                k += 1;
            }
        }
        // Most recent first.
        let mut out = [(0, 0); 8];
        out[0] = (s, e);
        let mut m = 1;
        for &x in keep.iter().take(k) {
            if m < 8 {
                out[m] = x;
                m += 1;
            }
        }
        self.r = out;
        self.n = m as u32;
        true
    }
    pub fn advance(&mut self, rcv_nxt: u32) -> u32 {
        let mut nxt = rcv_nxt;
        loop {
            let mut changed = false;
            let mut i = 0;
            while i < self.n as usize {
                let (a, b) = self.r[i];
                if le(a, nxt) {
                    if lt(nxt, b) {
                        nxt = b;
                    }
                    self.r.copy_within(i + 1..self.n as usize, i);
                    self.n -= 1;
                    changed = true;
                } else {
                    i += 1;
                }
            }
            if !changed {
                return nxt;
            }
        }
    }
    pub fn blocks(&self, max: usize) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.r.iter().take((self.n as usize).min(max)).copied()
    }
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Scoreboard {
    r: [(u32, u32); 8],
    n: u32,
}

impl Scoreboard {
    pub fn update(&mut self, snd_una: u32, blocks: &[(u32, u32)]) {
        let mut rs = RecvSack {
            r: self.r,
            n: self.n,
        };
        for &(a, b) in blocks {
            if lt(snd_una, b) {
                rs.insert(if lt(a, snd_una) { snd_una } else { a }, b);
            }
        }
        // Drop ranges below una.
        let mut out = [(0, 0); 8];
        let mut m = 0;
        for &(a, b) in rs.r.iter().take(rs.n as usize) {
            if lt(snd_una, b) {
                out[m] = (if lt(a, snd_una) { snd_una } else { a }, b);
                m += 1;
            }
        }
        // Sort by start.
        out[..m].sort_by(|x, y| (x.0.wrapping_sub(snd_una)).cmp(&y.0.wrapping_sub(snd_una)));
        self.r = out;
        self.n = m as u32;
    }
    fn sacked(&self, seq: u32) -> bool {
        self.r
            .iter()
            .take(self.n as usize)
            .any(|&(a, b)| le(a, seq) && lt(seq, b))
    }
    fn sacked_above(&self, seq: u32) -> u32 {
        self.r
            .iter()
            .take(self.n as usize)
            .map(|&(a, b)| {
                if le(seq, a) {
                    b.wrapping_sub(a)
                } else if lt(seq, b) {
                    b.wrapping_sub(seq)
                } else {
                    0
                }
            })
            .sum()
    }
    pub fn is_lost(&self, seq: u32, mss: u32) -> bool {
        !self.sacked(seq) && self.sacked_above(seq) >= 3 * mss.max(1) - (mss.max(1) - 1)
    }
    pub fn pipe(&self, snd_una: u32, snd_nxt: u32, high_rxt: u32, mss: u32) -> u32 {
        let mut pipe = 0u32;
        let mut s = snd_una;
        let mss = mss.max(1);
        while lt(s, snd_nxt) {
            let e = {
                let e = s.wrapping_add(mss);
                if lt(snd_nxt, e) {
                    snd_nxt
                } else {
                    e
                }
            };
            if !self.sacked(s) {
                let len = e.wrapping_sub(s);
                if !self.is_lost(s, mss) {
                    pipe += len;
                }
                if lt(s, high_rxt) {
                    pipe += len;
                }
            }
            s = e;
        }
        pipe
    }
    pub fn next_seg(
        &self,
        snd_una: u32,
        _snd_nxt: u32,
        high_rxt: u32,
        mss: u32,
    ) -> Option<(u32, u32)> {
        let mss = mss.max(1);
        let mut s = if lt(high_rxt, snd_una) {
            snd_una
        } else {
            high_rxt
        };
        let hi = self
            .r
            .iter()
            .take(self.n as usize)
            .map(|x| x.1)
            .fold(snd_una, |m, b| if lt(m, b) { b } else { m });
        while lt(s, hi) {
            // Skip SACKed.
            if let Some(&(_, b)) = self
                .r
                .iter()
                .take(self.n as usize)
                .find(|&&(a, b)| le(a, s) && lt(s, b))
            {
                s = b;
                continue;
            }
            if self.is_lost(s, mss) {
                let next_sacked = self
                    .r
                    .iter()
                    .take(self.n as usize)
                    .map(|x| x.0)
                    .filter(|&a| lt(s, a))
                    .fold(s.wrapping_add(mss), |m, a| if lt(a, m) { a } else { m });
                return Some((s, next_sacked));
            }
            return None;
        }
        None
    }
    pub fn clear(&mut self) {
        self.n = 0;
    }
}
