//! What every transport provides to the benchmark loops: a sending half and a receiving half
//! of 64-byte messages, with an end-of-phase marker.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Bytes in one message (one cache line, one ring slot).
pub const MSG_SIZE: usize = 64;
/// Messages per batch in the batched one-way phase (one push_slice, one write syscall).
pub const BATCH: usize = 32;
/// One message. Bytes 0..8 carry a little-endian sequence number, the rest a fixed pattern.
pub type Msg = [u8; MSG_SIZE];
/// The sequence number that marks the end of a phase.
pub const END_SEQ: u64 = u64::MAX;

/// A message carrying `seq`.
pub fn msg(seq: u64) -> Msg {
    let mut m = [0xa5u8; MSG_SIZE];
    set_seq(&mut m, seq);
    m
}

#[inline]
pub fn set_seq(m: &mut Msg, seq: u64) {
    m[..8].copy_from_slice(&seq.to_le_bytes());
}

#[inline]
pub fn seq_of(m: &Msg) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&m[..8]);
    u64::from_le_bytes(b)
}

/// The measurement a phase makes. Both processes run the same phases in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Ping-pong: the parent sends one message, the peer echoes it.
    Rtt,
    /// Parent to peer, one message per operation.
    Unbatched,
    /// Parent to peer, [`BATCH`] messages per operation.
    Batched,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Rtt, Phase::Unbatched, Phase::Batched];
}

/// What one receive returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Messages that arrived before any end marker. For a transport that carries no payload
    /// this may exceed the buffer's length (the buffer is then not filled).
    pub n: usize,
    /// The end-of-phase marker arrived (after those `n`).
    pub end: bool,
}

impl Received {
    /// Cuts a batch of received messages at the first end marker.
    pub fn scan(msgs: &[Msg]) -> Received {
        match msgs.iter().position(|m| seq_of(m) == END_SEQ) {
            Some(i) => Received { n: i, end: true },
            None => Received {
                n: msgs.len(),
                end: false,
            },
        }
    }
}

/// The sending half of a transport. `abort` bounds any wait for room.
pub trait Tx {
    /// Called by both sides before each phase.
    fn set_phase(&mut self, _phase: Phase) {}
    /// Sends one message in one operation.
    fn send_one(&mut self, m: &Msg, abort: Instant) -> Result<()>;
    /// Sends all of `batch` (at most [`BATCH`]) in one operation where the transport allows.
    fn send_batch(&mut self, batch: &[Msg], abort: Instant) -> Result<()>;
    /// Sends the end-of-phase marker.
    fn send_end(&mut self, abort: Instant) -> Result<()> {
        self.send_one(&msg(END_SEQ), abort)
    }
}

/// The receiving half of a transport.
pub trait Rx {
    /// Whether messages carry their bytes (false for eventfd, which carries only a count).
    const CARRIES_PAYLOAD: bool = true;
    /// Called by both sides before each phase.
    fn set_phase(&mut self, _phase: Phase) {}
    /// Waits (until `abort` at most, where the transport can bound it) for at least one
    /// message or the end marker, and returns up to `out.len()` of them.
    fn recv(&mut self, out: &mut [Msg], abort: Instant) -> Result<Received>;
}

/// Spins until `ready()` holds, looking at the clock every 1024 tries; fails at `abort`.
#[inline]
pub fn spin_until(abort: Instant, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let mut i: u32 = 0;
    loop {
        if ready() {
            return Ok(());
        }
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if i % 1024 == 0 && Instant::now() >= abort {
            return Err(Error::Timeout(format!("{what}: the peer made no progress")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_round_trips() {
        let mut m = msg(7);
        assert_eq!(seq_of(&m), 7);
        set_seq(&mut m, END_SEQ);
        assert_eq!(seq_of(&m), END_SEQ);
        assert_eq!(m[8..], [0xa5; 56]);
    }

    #[test]
    fn scan_stops_at_the_end_marker() {
        let v = [msg(1), msg(2), msg(END_SEQ)];
        assert_eq!(Received::scan(&v), Received { n: 2, end: true });
        assert_eq!(Received::scan(&v[..2]), Received { n: 2, end: false });
    }
}
