//! Selective acknowledgment: the receiver's SACK blocks (RFC 2018) and the sender's
//! scoreboard with the RFC 6675 loss recovery routines (IsLost, SetPipe, NextSeg).
//!
//! Both structures are plain `#[repr(C)]` data (fixed arrays and a length; every bit pattern
//! is a valid state and no method panics on any state) so they can live in a `Tcb` in shared
//! memory. Ranges are half-open `[start, end)` in sequence space, like the SACK option's
//! "Left Edge" and "Right Edge" (RFC 2018 section 3: the right edge is "the sequence number
//! immediately following the last sequence number of this block"). Sequence numbers compare
//! modulo 2^32 (RFC 9293 section 3.4); every range lies within 2^31 of the others.

/// How many out-of-order ranges the receiver tracks above RCV.NXT.
pub const RECV_SACK_RANGES: usize = 8;
/// How many SACKed ranges the sender tracks above SND.UNA.
pub const SCOREBOARD_RANGES: usize = 16;
/// RFC 6675 section 2 DupThresh, "the number of duplicate acknowledgments required to trigger
/// a retransmission ... defined to be 3" (per RFC 5681); used by [`Scoreboard::pipe`] and
/// [`Scoreboard::next_seg`].
pub const DUP_THRESH: u32 = 3;

/// `a < b` modulo 2^32 (RFC 9293 section 3.4).
fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a <= b` modulo 2^32.
fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

fn seq_min(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        a
    } else {
        b
    }
}

fn seq_max(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        b
    } else {
        a
    }
}

/// Bytes in `[a, b)`, 0 if `b` is not after `a`.
fn span(a: u32, b: u32) -> u32 {
    if seq_lt(a, b) {
        b.wrapping_sub(a)
    } else {
        0
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver
// ---------------------------------------------------------------------------------------------

/// The out-of-order data a receiver holds above RCV.NXT, as up to [`RECV_SACK_RANGES`]
/// disjoint, non-adjacent ranges, and the order in which to report them.
///
/// The ranges are kept in recency order: `ranges[0]` holds the most recently received segment,
/// then the others by the time they last changed. That order is the one RFC 2018 section 4
/// asks for, so the array needs no separate order table.
///
/// The data itself lives in the receive ring; this only names the ranges. When
/// [`RecvSack::insert`] returns `false` (all slots taken and the new data touches none of
/// them) the caller must drop that segment's data: it was never acknowledged nor SACKed, so
/// the sender will retransmit it, and dropping it is not reneging (RFC 2018 section 8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvSack {
    /// `[start, end)`; `ranges[..len]` are live, most recent first.
    ranges: [[u32; 2]; RECV_SACK_RANGES],
    /// Number of live ranges (values above `RECV_SACK_RANGES` read as `RECV_SACK_RANGES`).
    len: u32,
}

impl Default for RecvSack {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvSack {
    /// No out-of-order data.
    pub const fn new() -> RecvSack {
        RecvSack {
            ranges: [[0; 2]; RECV_SACK_RANGES],
            len: 0,
        }
    }

    fn n(&self) -> usize {
        (self.len as usize).min(RECV_SACK_RANGES)
    }

    /// Whether no out-of-order data is held.
    pub fn is_empty(&self) -> bool {
        self.n() == 0
    }

    /// Number of ranges held.
    pub fn len(&self) -> usize {
        self.n()
    }

    /// Forget everything (for instance when the connection is reset).
    pub fn clear(&mut self) {
        *self = RecvSack::new();
    }

    /// Record that `[start, end)` arrived out of order (the caller has trimmed it to lie above
    /// RCV.NXT and inside the window). Merges it with every range it overlaps or touches, and
    /// makes the result the most recent range: RFC 2018 section 4, "The first SACK block ...
    /// MUST specify the contiguous block of data containing the segment which triggered this
    /// ACK" (also for a duplicate of data already held).
    ///
    /// Returns `false`, changing nothing, when all [`RECV_SACK_RANGES`] slots are taken and
    /// the new range touches none of them: the caller then drops the data. An empty range is
    /// accepted and changes nothing; a range whose end precedes its start is refused.
    pub fn insert(&mut self, start: u32, end: u32) -> bool {
        if start == end {
            return true;
        }
        if !seq_lt(start, end) {
            return false;
        }
        let (mut s, mut e) = (start, end);
        let mut out = [[0u32; 2]; RECV_SACK_RANGES];
        let mut k = 1; // out[0] is kept for the merged range.
        for &[a, b] in &self.ranges[..self.n()] {
            // Ranges held are pairwise disjoint and not adjacent, so one pass that compares
            // each with the growing union finds every range to merge.
            if seq_le(a, e) && seq_le(s, b) {
                s = seq_min(s, a);
                e = seq_max(e, b);
            } else {
                if k == RECV_SACK_RANGES {
                    return false;
                }
                out[k] = [a, b];
                k += 1;
            }
        }
        out[0] = [s, e];
        self.ranges = out;
        self.len = k as u32;
        true
    }

    /// RCV.NXT moved to `rcv_nxt` (in-order data arrived). If a range now starts at or below
    /// it, that range joins the in-order data: it is removed and `rcv_nxt` moves to its end
    /// (repeatedly, though merged ranges never touch). Ranges wholly at or below the new
    /// RCV.NXT are dropped. Returns the new RCV.NXT (`rcv_nxt` itself when nothing was
    /// consumed).
    pub fn advance(&mut self, rcv_nxt: u32) -> u32 {
        let mut nxt = rcv_nxt;
        // Each pass can only move `nxt` forward; a pass that moves nothing ends the loop.
        for _ in 0..=RECV_SACK_RANGES {
            let mut moved = false;
            let mut out = [[0u32; 2]; RECV_SACK_RANGES];
            let mut k = 0;
            for &[a, b] in &self.ranges[..self.n()] {
                if seq_le(b, nxt) {
                    // Wholly below: already delivered.
                } else if seq_le(a, nxt) {
                    // Starts at or below RCV.NXT: contiguous now.
                    nxt = b;
                    moved = true;
                } else {
                    out[k] = [a, b];
                    k += 1;
                }
            }
            self.ranges = out;
            self.len = k as u32;
            if !moved {
                break;
            }
        }
        nxt
    }

    /// Up to `max` SACK blocks to send, in RFC 2018 section 4 order: the block containing the
    /// most recently received segment first, then "repeating the most recently reported SACK
    /// blocks ... that are not subsets of a SACK block already included" (ours are disjoint,
    /// so none is a subset). `max` is 4 without timestamps and 3 with them (40 bytes of
    /// option space, RFC 2018 section 3). The iterator works on a copy, so `self` may change
    /// while it is used.
    pub fn blocks(&self, max: usize) -> impl Iterator<Item = (u32, u32)> {
        let copy = *self;
        let n = copy.n().min(max);
        (0..n).map(move |i| (copy.ranges[i][0], copy.ranges[i][1]))
    }
}

// ---------------------------------------------------------------------------------------------
// Sender
// ---------------------------------------------------------------------------------------------

/// The sender's record of what the peer has SACKed above SND.UNA (RFC 6675 section 3, "the
/// scoreboard"), with the routines of RFC 6675 section 4.
///
/// Up to [`SCOREBOARD_RANGES`] disjoint, non-adjacent ranges in ascending sequence order. SACK
/// information is advisory: "SACKed data MUST NOT be removed from the TCP's retransmission
/// buffer until the data is cumulatively acknowledged" (RFC 6675 section 4, Update()), so
/// forgetting a range (when the table is full) only makes the sender more conservative.
///
/// Conventions: `snd_una` is RFC 6675's HighACK + 1 and `snd_nxt` its HighData + 1, the
/// highest sequence number ever sent plus one (SND.MAX, even if the engine rewound SND.NXT
/// after a timeout); `high_rxt` is one past the highest octet retransmitted in this recovery
/// (HighRxt + 1), equal to `snd_una` when recovery starts and nothing has been retransmitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scoreboard {
    /// `[start, end)`, ascending; `ranges[..len]` are live.
    ranges: [[u32; 2]; SCOREBOARD_RANGES],
    /// Number of live ranges (values above `SCOREBOARD_RANGES` read as `SCOREBOARD_RANGES`).
    len: u32,
}

impl Default for Scoreboard {
    fn default() -> Self {
        Self::new()
    }
}

/// A gap between SACKed ranges (or between the last one and SND.NXT), with what lies above it.
#[derive(Clone, Copy, Debug)]
struct Hole {
    start: u32,
    end: u32,
    /// SACKed ranges above the hole (each is "discontiguous" from the others).
    ranges_above: u32,
    /// SACKed bytes above the hole.
    bytes_above: u64,
}

impl Hole {
    /// RFC 6675 section 4, IsLost(SeqNum) for every octet of the hole (each sees the same
    /// SACKed data above it): "The routine returns true when either DupThresh discontiguous
    /// SACKed sequences have arrived above 'SeqNum' or more than (DupThresh - 1) * SMSS bytes
    /// with sequence numbers greater than 'SeqNum' have been SACKed."
    fn is_lost(&self, mss: u32, dupthresh: u32) -> bool {
        self.ranges_above >= dupthresh
            || self.bytes_above > u64::from(dupthresh.saturating_sub(1)) * u64::from(mss)
    }
}

impl Scoreboard {
    /// Nothing SACKed.
    pub const fn new() -> Scoreboard {
        Scoreboard {
            ranges: [[0; 2]; SCOREBOARD_RANGES],
            len: 0,
        }
    }

    fn n(&self) -> usize {
        (self.len as usize).min(SCOREBOARD_RANGES)
    }

    fn live(&self) -> &[[u32; 2]] {
        &self.ranges[..self.n()]
    }

    /// Forget all SACK information. RFC 6675 section 5.1 (quoting RFC 2018 section 8): after
    /// a retransmission timeout "a TCP sender SHOULD expunge the SACK information gathered
    /// from a receiver ... since the timeout might indicate that the data receiver has
    /// reneged", and "ignore prior SACK information in determining which data to retransmit".
    pub fn clear(&mut self) {
        *self = Scoreboard::new();
    }

    /// Whether nothing is SACKed.
    pub fn is_empty(&self) -> bool {
        self.n() == 0
    }

    /// The SACKed ranges, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = (u32, u32)> {
        let copy = *self;
        (0..copy.n()).map(move |i| (copy.ranges[i][0], copy.ranges[i][1]))
    }

    /// Total bytes SACKed above SND.UNA.
    pub fn sacked_bytes(&self) -> u32 {
        self.live()
            .iter()
            .fold(0u32, |acc, &[a, b]| acc.saturating_add(span(a, b)))
    }

    /// One past the highest SACKed octet (the right edge of the highest block), if any.
    pub fn highest_sacked(&self) -> Option<u32> {
        self.live().last().map(|r| r[1])
    }

    /// Whether `seq` lies in a SACKed range.
    pub fn is_sacked(&self, seq: u32) -> bool {
        self.live()
            .iter()
            .any(|&[a, b]| seq_le(a, seq) && seq_lt(seq, b))
    }

    /// Drop what `snd_una` now acknowledges cumulatively; trim a range it cuts.
    fn trim(&mut self, snd_una: u32) {
        let mut out = [[0u32; 2]; SCOREBOARD_RANGES];
        let mut k = 0;
        for &[a, b] in self.live() {
            if seq_le(b, snd_una) || !seq_lt(a, b) {
                continue;
            }
            out[k] = [seq_max(a, snd_una), b];
            k += 1;
        }
        self.ranges = out;
        self.len = k as u32;
    }

    /// Add `[s, e)`, merging; returns how many of its bytes were not SACKed before. When the
    /// table is full, the highest range is forgotten (the ranges nearest SND.UNA matter most
    /// for retransmission, and forgetting a SACK is always safe).
    fn add(&mut self, s: u32, e: u32) -> u32 {
        let mut out = [[0u32; 2]; SCOREBOARD_RANGES + 1];
        let mut k = 0;
        let (mut ms, mut me) = (s, e);
        let mut covered = 0u32;
        let mut placed = false;
        for &[a, b] in self.live() {
            if seq_lt(b, ms) {
                // Wholly below the new range, not adjacent.
                out[k] = [a, b];
                k += 1;
            } else if seq_lt(me, a) {
                // Wholly above, not adjacent: the merged range goes first.
                if !placed {
                    out[k] = [ms, me];
                    k += 1;
                    placed = true;
                }
                out[k] = [a, b];
                k += 1;
            } else {
                // Overlapping or adjacent: merge.
                covered = covered.saturating_add(span(seq_max(a, s), seq_min(b, e)));
                ms = seq_min(ms, a);
                me = seq_max(me, b);
            }
        }
        // At most SCOREBOARD_RANGES live ranges plus the merged one were written: k <= 17.
        if !placed && k <= SCOREBOARD_RANGES {
            out[k] = [ms, me];
            k += 1;
        }
        let mut new_bytes = span(s, e).saturating_sub(covered);
        if k > SCOREBOARD_RANGES {
            // Full: forget the highest range. If that is the new one, nothing was recorded.
            k = SCOREBOARD_RANGES;
            if out[k] == [ms, me] {
                new_bytes = 0;
            }
        }
        self.ranges.copy_from_slice(&out[..SCOREBOARD_RANGES]);
        self.len = k as u32;
        new_bytes
    }

    /// RFC 6675 section 4, Update(): take in an ACK whose cumulative acknowledgment is
    /// `snd_una` and whose SACK option carries `blocks` (left edge, right edge). Drops what is
    /// now cumulatively acknowledged, then marks each valid block. A block is ignored when it
    /// is empty, starts below `snd_una` (a D-SACK, RFC 2883, or stale information) or ends
    /// beyond `snd_nxt` (it names data never sent: RFC 2018 section 5 lets the sender
    /// disregard bogus blocks).
    ///
    /// Returns whether anything new was SACKed and how many bytes.
    pub fn update(&mut self, snd_una: u32, snd_nxt: u32, blocks: &[(u32, u32)]) -> (bool, u32) {
        self.trim(snd_una);
        let mut new_bytes = 0u32;
        for &(s, e) in blocks {
            if !seq_lt(s, e) || seq_lt(s, snd_una) || seq_lt(snd_nxt, e) {
                continue;
            }
            new_bytes = new_bytes.saturating_add(self.add(s, e));
        }
        (new_bytes > 0, new_bytes)
    }

    /// The holes from `snd_una` to `snd_nxt`, ascending, in a fixed array; returns the count.
    fn holes(&self, snd_una: u32, snd_nxt: u32) -> ([Hole; SCOREBOARD_RANGES + 1], usize) {
        let mut sb = *self;
        sb.trim(snd_una);
        let live = sb.live();
        let empty = Hole {
            start: snd_una,
            end: snd_una,
            ranges_above: 0,
            bytes_above: 0,
        };
        let mut holes = [empty; SCOREBOARD_RANGES + 1];
        let mut bytes_above: u64 = live.iter().map(|&[a, b]| u64::from(span(a, b))).sum();
        let mut start = snd_una;
        for (i, &[a, b]) in live.iter().enumerate() {
            holes[i] = Hole {
                start,
                end: seq_max(start, seq_min(a, snd_nxt)),
                ranges_above: (live.len() - i) as u32,
                bytes_above,
            };
            bytes_above -= u64::from(span(a, b));
            start = seq_max(start, b);
        }
        // The tail hole has nothing SACKed above it.
        holes[live.len()] = Hole {
            start,
            end: seq_max(start, snd_nxt),
            ranges_above: 0,
            bytes_above: 0,
        };
        (holes, live.len() + 1)
    }

    /// RFC 6675 section 4, IsLost(SeqNum) for `seq` at or above SND.UNA: whether DupThresh
    /// discontiguous SACKed ranges lie above `seq`, or more than (DupThresh - 1) * SMSS bytes
    /// above it are SACKed. An octet that is itself SACKed is not lost.
    ///
    /// "Discontiguous SACKed sequences" are counted as SACKed ranges: the scoreboard keeps
    /// byte ranges, not segment boundaries. Several contiguous full-sized segments still count
    /// through the byte rule.
    pub fn is_lost(&self, seq: u32, mss: u32, dupthresh: u32) -> bool {
        let mut hole = Hole {
            start: seq,
            end: seq,
            ranges_above: 0,
            bytes_above: 0,
        };
        for &[a, b] in self.live() {
            if seq_le(a, seq) && seq_lt(seq, b) {
                return false;
            }
            if seq_lt(seq, a) {
                hole.ranges_above += 1;
                hole.bytes_above += u64::from(span(a, b));
            }
        }
        hole.is_lost(mss, dupthresh)
    }

    /// RFC 6675 section 4, SetPipe(): the sender's estimate of the octets in the network. For
    /// each octet S1 from HighACK+1 to HighData that has not been SACKed: "(a) If IsLost (S1)
    /// returns false: Pipe is incremented by 1 octet. (b) If S1 <= HighRxt: Pipe is
    /// incremented by 1 octet." (An octet both in flight and retransmitted counts twice.)
    /// IsLost uses [`DUP_THRESH`].
    pub fn pipe(&self, snd_una: u32, snd_nxt: u32, high_rxt: u32, mss: u32) -> u32 {
        let high_rxt = clamp_seq(high_rxt, snd_una, snd_nxt);
        let (holes, n) = self.holes(snd_una, snd_nxt);
        let mut pipe: u64 = 0;
        for h in &holes[..n] {
            if !h.is_lost(mss, DUP_THRESH) {
                // (a)
                pipe += u64::from(span(h.start, h.end));
            }
            // (b): the part of the hole below HighRxt + 1.
            pipe += u64::from(span(h.start, seq_min(h.end, high_rxt)));
        }
        u32::try_from(pipe).unwrap_or(u32::MAX)
    }

    /// RFC 6675 section 4, NextSeg() rule (1): "If there exists a smallest unSACKed sequence
    /// number 'S2' that meets the following three criteria for determining loss, the sequence
    /// range of one segment of up to SMSS octets starting with S2 MUST be returned.
    /// (1.a) S2 is greater than HighRxt. (1.b) S2 is less than the highest octet covered by
    /// any received SACK. (1.c) IsLost (S2) returns true." The range stops at the next
    /// SACKed range. Uses [`DUP_THRESH`].
    pub fn next_lost_seg(
        &self,
        snd_una: u32,
        snd_nxt: u32,
        high_rxt: u32,
        mss: u32,
    ) -> Option<(u32, u32)> {
        self.next_rule(snd_una, snd_nxt, high_rxt, mss, true)
    }

    /// RFC 6675 section 4, NextSeg() rule (3): "If the conditions for rules (1) and (2) fail,
    /// but there exists an unSACKed sequence number 'S3' that meets the criteria for
    /// detecting loss given in steps (1.a) and (1.b) above (specifically excluding step
    /// (1.c)), then one segment of up to SMSS octets starting with S3 SHOULD be returned."
    /// The caller tries rule (2), new data, before this one.
    pub fn next_maybe_lost_seg(
        &self,
        snd_una: u32,
        snd_nxt: u32,
        high_rxt: u32,
        mss: u32,
    ) -> Option<(u32, u32)> {
        self.next_rule(snd_una, snd_nxt, high_rxt, mss, false)
    }

    /// RFC 6675 section 4, NextSeg() rules (1) and (3), as `[start, end)` of at most `mss`
    /// bytes: [`Scoreboard::next_lost_seg`], else [`Scoreboard::next_maybe_lost_seg`].
    ///
    /// Rule (2), "previously unsent data starting with sequence number HighData+1" when the
    /// windows allow it, is the caller's, and comes *before* rule (3): a caller with new data
    /// to send should call `next_lost_seg`, then send new data, then `next_maybe_lost_seg`.
    /// Rule (4), the rescue retransmission, is the caller's too. After sending the returned
    /// range the caller sets `high_rxt` to its end (RFC 6675 section 5, step (C.1)).
    pub fn next_seg(
        &self,
        snd_una: u32,
        snd_nxt: u32,
        high_rxt: u32,
        mss: u32,
    ) -> Option<(u32, u32)> {
        self.next_lost_seg(snd_una, snd_nxt, high_rxt, mss)
            .or_else(|| self.next_maybe_lost_seg(snd_una, snd_nxt, high_rxt, mss))
    }

    fn next_rule(
        &self,
        snd_una: u32,
        snd_nxt: u32,
        high_rxt: u32,
        mss: u32,
        lost: bool,
    ) -> Option<(u32, u32)> {
        let mss = mss.max(1);
        let high_rxt = clamp_seq(high_rxt, snd_una, snd_nxt);
        let (holes, n) = self.holes(snd_una, snd_nxt);
        // (1.b): only holes below the highest SACKed octet, that is, all but the tail hole.
        for h in &holes[..n.saturating_sub(1)] {
            // (1.a): S2 > HighRxt, i.e. at or above `high_rxt` in our convention.
            let s2 = seq_max(h.start, high_rxt);
            if !seq_lt(s2, h.end) {
                continue;
            }
            // (1.c) for rule (1); rule (3) takes the first hole left, lost or not. IsLost is
            // monotone (a lower hole has more SACKed above it), so when rule (1) finds nothing
            // the first candidate of rule (3) is a hole that is not lost.
            if lost && !h.is_lost(mss, DUP_THRESH) {
                continue;
            }
            let end = s2.wrapping_add(span(s2, h.end).min(mss));
            return Some((s2, end));
        }
        None
    }
}

/// `x` limited to `[lo, hi]` in sequence space (`lo` wins if the bounds are reversed).
fn clamp_seq(x: u32, lo: u32, hi: u32) -> u32 {
    seq_max(seq_min(x, hi), lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(r: &RecvSack, max: usize) -> Vec<(u32, u32)> {
        r.blocks(max).collect()
    }

    // --- sequence helpers ---

    #[test]
    fn seq_compare_wraps() {
        assert!(seq_lt(u32::MAX, 0));
        assert!(seq_lt(u32::MAX - 10, 5));
        assert!(!seq_lt(5, u32::MAX - 10));
        assert!(seq_le(7, 7));
        assert_eq!(span(u32::MAX - 1, 3), 5);
        assert_eq!(span(3, u32::MAX - 1), 0);
        assert_eq!(seq_max(u32::MAX, 2), 2);
        assert_eq!(seq_min(u32::MAX, 2), u32::MAX);
    }

    // --- receiver: RFC 2018 section 7 examples ---
    // "Assume the left window edge is 5000 and that the data transmitter sends a burst of 8
    // segments, each containing 500 data bytes."

    /// The receiver's handling of one segment: in order (advance) or out of order (insert).
    fn receive(r: &mut RecvSack, rcv_nxt: &mut u32, seg: u32) {
        let (s, e) = (seg, seg + 500);
        if s == *rcv_nxt {
            *rcv_nxt = r.advance(e);
        } else {
            assert!(r.insert(s, e));
        }
    }

    #[test]
    fn rfc2018_case1_first_four_received() {
        // "The first 4 segments are received but the last 4 are dropped. The data receiver
        // will return a normal TCP ACK segment acknowledging sequence number 7000, with no
        // SACK option."
        let mut r = RecvSack::new();
        let mut nxt = 5000;
        for seg in [5000, 5500, 6000, 6500] {
            receive(&mut r, &mut nxt, seg);
        }
        assert_eq!(nxt, 7000);
        assert!(r.is_empty());
        assert_eq!(blocks(&r, 4), vec![]);
    }

    #[test]
    fn rfc2018_case2_first_dropped() {
        // "The first segment is dropped but the remaining 7 are received. Upon receiving each
        // of the last seven packets, the data receiver will return a TCP ACK segment that
        // acknowledges sequence number 5000 and contains a SACK option specifying one block
        // of queued data": 5500-6000, 5500-6500, ..., 5500-9000.
        let mut r = RecvSack::new();
        let mut nxt = 5000;
        for (i, seg) in (5500..9000).step_by(500).enumerate() {
            receive(&mut r, &mut nxt, seg);
            assert_eq!(nxt, 5000);
            assert_eq!(blocks(&r, 4), vec![(5500, 6000 + 500 * i as u32)]);
        }
        // The first segment arrives: everything is in order.
        receive(&mut r, &mut nxt, 5000);
        assert_eq!(nxt, 9000);
        assert!(r.is_empty());
    }

    #[test]
    fn rfc2018_case3_alternate_drops() {
        // "The 2nd, 4th, 6th, and 8th (last) segments are dropped."
        let mut r = RecvSack::new();
        let mut nxt = 5000;
        receive(&mut r, &mut nxt, 5000);
        assert_eq!(nxt, 5500);
        assert!(r.is_empty());
        receive(&mut r, &mut nxt, 6000);
        assert_eq!(blocks(&r, 4), vec![(6000, 6500)]);
        receive(&mut r, &mut nxt, 7000);
        assert_eq!(blocks(&r, 4), vec![(7000, 7500), (6000, 6500)]);
        receive(&mut r, &mut nxt, 8000);
        assert_eq!(
            blocks(&r, 4),
            vec![(8000, 8500), (7000, 7500), (6000, 6500)]
        );
        assert_eq!(nxt, 5500);
        // "Suppose at this point, the 4th packet is received out of order. ... At this point
        // the data receiver has only two holes": ACK 5500, SACK 6000-7500, 8000-8500.
        receive(&mut r, &mut nxt, 6500);
        assert_eq!(blocks(&r, 4), vec![(6000, 7500), (8000, 8500)]);
        // "Suppose at this point, the 2nd segment is received. The data receiver ACKs the
        // first four segments": ACK 7500, SACK 8000-8500.
        receive(&mut r, &mut nxt, 5500);
        assert_eq!(nxt, 7500);
        assert_eq!(blocks(&r, 4), vec![(8000, 8500)]);
    }

    #[test]
    fn recv_blocks_respects_max() {
        let mut r = RecvSack::new();
        for i in 0..6u32 {
            assert!(r.insert(1000 * i + 100, 1000 * i + 200));
        }
        let b = blocks(&r, 3);
        assert_eq!(b, vec![(5100, 5200), (4100, 4200), (3100, 3200)]);
        assert_eq!(r.len(), 6);
    }

    #[test]
    fn recv_duplicate_moves_block_first() {
        let mut r = RecvSack::new();
        r.insert(100, 200);
        r.insert(300, 400);
        assert_eq!(blocks(&r, 4), vec![(300, 400), (100, 200)]);
        // A duplicate of data already held still names its block first (RFC 2018 section 4).
        assert!(r.insert(120, 150));
        assert_eq!(blocks(&r, 4), vec![(100, 200), (300, 400)]);
    }

    #[test]
    fn recv_merge_overlapping_and_adjacent() {
        let mut r = RecvSack::new();
        r.insert(100, 200);
        r.insert(300, 400);
        r.insert(500, 600);
        // Overlaps the first, touches the second: both merge.
        assert!(r.insert(150, 300));
        assert_eq!(blocks(&r, 4), vec![(100, 400), (500, 600)]);
        // Covers everything.
        assert!(r.insert(50, 700));
        assert_eq!(blocks(&r, 4), vec![(50, 700)]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn recv_full_array() {
        let mut r = RecvSack::new();
        for i in 0..RECV_SACK_RANGES as u32 {
            assert!(r.insert(1000 * i + 100, 1000 * i + 200));
        }
        let before = r;
        // No room, touches nothing: refused, nothing changes.
        assert!(!r.insert(20_000, 20_100));
        assert!(!r.insert(150 + 300, 160 + 300));
        assert_eq!(r, before);
        // Adjacent to a range: merged, accepted.
        assert!(r.insert(200, 300));
        assert_eq!(r.len(), RECV_SACK_RANGES);
        assert_eq!(blocks(&r, 1), vec![(100, 300)]);
        // Bridging two ranges frees a slot.
        assert!(r.insert(1200, 2100));
        assert_eq!(r.len(), RECV_SACK_RANGES - 1);
        assert_eq!(blocks(&r, 1), vec![(1100, 2200)]);
        assert!(r.insert(20_000, 20_100));
        assert_eq!(r.len(), RECV_SACK_RANGES);
    }

    #[test]
    fn recv_empty_and_inverted() {
        let mut r = RecvSack::new();
        assert!(r.insert(100, 100));
        assert!(r.is_empty());
        assert!(!r.insert(200, 100));
        assert!(r.is_empty());
    }

    #[test]
    fn recv_advance_drops_and_trims() {
        let mut r = RecvSack::new();
        r.insert(200, 300);
        r.insert(400, 500);
        r.insert(600, 700);
        // In-order data [100, 450) arrived: [200,300) is below, [400,500) straddles, so
        // RCV.NXT goes to 500.
        assert_eq!(r.advance(450), 500);
        assert_eq!(blocks(&r, 4), vec![(600, 700)]);
        // Nothing reaches RCV.NXT: unchanged.
        assert_eq!(r.advance(550), 550);
        assert_eq!(r.len(), 1);
        // Exactly at the start.
        assert_eq!(r.advance(600), 700);
        assert!(r.is_empty());
    }

    #[test]
    fn recv_wraps() {
        let base = u32::MAX - 1199;
        let mut r = RecvSack::new();
        let mut nxt = base;
        // Segments of 500 bytes: 2nd and 4th lost; the 3rd crosses zero.
        assert!(base.wrapping_add(1000) > base.wrapping_add(1500));
        for seg in [base, base.wrapping_add(1000), base.wrapping_add(2000)] {
            let (s, e) = (seg, seg.wrapping_add(500));
            if s == nxt {
                nxt = r.advance(e);
            } else {
                assert!(r.insert(s, e));
            }
        }
        assert_eq!(nxt, base.wrapping_add(500));
        assert_eq!(
            blocks(&r, 4),
            vec![
                (base.wrapping_add(2000), base.wrapping_add(2500)),
                (base.wrapping_add(1000), base.wrapping_add(1500)),
            ]
        );
        // The range that crosses zero merges with its neighbour across the wrap.
        assert!(r.insert(base.wrapping_add(1500), base.wrapping_add(2000)));
        assert_eq!(
            blocks(&r, 4),
            vec![(base.wrapping_add(1000), base.wrapping_add(2500))]
        );
        assert_eq!(r.advance(base.wrapping_add(1000)), base.wrapping_add(2500));
        assert!(r.is_empty());
    }

    #[test]
    fn recv_bogus_len_is_safe() {
        let mut r = RecvSack::new();
        r.len = u32::MAX;
        assert_eq!(r.len(), RECV_SACK_RANGES);
        let _ = blocks(&r, 100);
        let _ = r.insert(5, 6);
        let _ = r.advance(1000);
        r.clear();
        assert!(r.is_empty());
    }

    // --- sender scoreboard ---

    const MSS: u32 = 500;

    /// The sender's view of RFC 2018 case 3 after the ACK for the 7th segment: SND.UNA =
    /// 5500, segments 5500, 6500, 7500, 8500 lost, 6000, 7000, 8000 SACKed; SND.NXT = 9000.
    fn case3(base: u32) -> Scoreboard {
        let mut sb = Scoreboard::new();
        let at = |x: u32| base.wrapping_add(x);
        let (newly, bytes) = sb.update(
            at(5500),
            at(9000),
            &[
                (at(8000), at(8500)),
                (at(7000), at(7500)),
                (at(6000), at(6500)),
            ],
        );
        assert!(newly);
        assert_eq!(bytes, 1500);
        sb
    }

    #[test]
    fn update_records_and_reports_new_bytes() {
        let mut sb = Scoreboard::new();
        assert_eq!(sb.update(5500, 9000, &[(6000, 6500)]), (true, 500));
        // The same block again: nothing new.
        assert_eq!(sb.update(5500, 9000, &[(6000, 6500)]), (false, 0));
        // Growing the block: 500 new bytes.
        assert_eq!(sb.update(5500, 9000, &[(6000, 7000)]), (true, 500));
        assert_eq!(sb.ranges().collect::<Vec<_>>(), vec![(6000, 7000)]);
        assert_eq!(sb.sacked_bytes(), 1000);
        assert_eq!(sb.highest_sacked(), Some(7000));
        assert!(sb.is_sacked(6000) && sb.is_sacked(6999) && !sb.is_sacked(7000));
    }

    #[test]
    fn update_ignores_invalid_blocks() {
        let mut sb = Scoreboard::new();
        let bad = [
            (5000, 5400), // below SND.UNA (D-SACK or stale)
            (5400, 5600), // starts below SND.UNA
            (8800, 9200), // beyond SND.NXT
            (7000, 7000), // empty
            (7000, 6000), // inverted
        ];
        assert_eq!(sb.update(5500, 9000, &bad), (false, 0));
        assert!(sb.is_empty());
        assert_eq!(sb.highest_sacked(), None);
    }

    #[test]
    fn update_cumulative_ack_trims() {
        let mut sb = case3(0);
        // The retransmission of 5500 arrives: ACK 6500 (5500-6500 cumulative).
        assert_eq!(sb.update(6500, 9000, &[]), (false, 0));
        assert_eq!(
            sb.ranges().collect::<Vec<_>>(),
            vec![(7000, 7500), (8000, 8500)]
        );
        // An ACK that cuts a range in the middle (possible if the receiver reneged and
        // re-received part of it).
        sb.update(7200, 9000, &[]);
        assert_eq!(
            sb.ranges().collect::<Vec<_>>(),
            vec![(7200, 7500), (8000, 8500)]
        );
        sb.update(9000, 9000, &[]);
        assert!(sb.is_empty());
    }

    #[test]
    fn update_merges() {
        let mut sb = case3(0);
        // 6500-7000 and 7500-8000 arrive: everything from 6000 to 8500 is SACKed.
        assert_eq!(sb.update(5500, 9000, &[(6500, 7000)]), (true, 500));
        assert_eq!(sb.update(5500, 9000, &[(7200, 8100)]), (true, 500));
        assert_eq!(sb.ranges().collect::<Vec<_>>(), vec![(6000, 8500)]);
        assert_eq!(sb.sacked_bytes(), 2500);
    }

    #[test]
    fn is_lost_rfc6675() {
        let sb = case3(0);
        // 5500: three discontiguous SACKed ranges above (DupThresh = 3).
        assert!(sb.is_lost(5500, MSS, 3));
        // 6500: two ranges, 1000 bytes = (DupThresh - 1) * SMSS, not more: not lost.
        assert!(!sb.is_lost(6500, MSS, 3));
        // With a smaller SMSS the byte rule fires: 1000 > 2 * 400.
        assert!(sb.is_lost(6500, 400, 3));
        assert!(!sb.is_lost(7500, MSS, 3));
        assert!(!sb.is_lost(8500, MSS, 3));
        // SACKed octets are not lost.
        assert!(!sb.is_lost(6000, MSS, 3));
        // DupThresh 2: 6500 has two ranges above.
        assert!(sb.is_lost(6500, MSS, 2));
        // Contiguous SACKed data: 3 full segments in one range, more than 2 * SMSS.
        let mut c = Scoreboard::new();
        c.update(1000, 5000, &[(1500, 3000)]);
        assert!(c.is_lost(1000, MSS, 3));
        c.clear();
        c.update(1000, 5000, &[(1500, 2500)]);
        assert!(!c.is_lost(1000, MSS, 3));
    }

    #[test]
    fn pipe_rfc6675_setpipe() {
        let sb = case3(0);
        // Nothing retransmitted (HighRxt + 1 = SND.UNA). UnSACKed octets: 5500-6000 (lost,
        // not counted), 6500-7000, 7500-8000, 8500-9000 (not lost: 1500).
        assert_eq!(sb.pipe(5500, 9000, 5500, MSS), 1500);
        // 5500-6000 retransmitted: (b) counts it.
        assert_eq!(sb.pipe(5500, 9000, 6000, MSS), 2000);
        // 6500-7000 retransmitted too: that octet range is not lost, so (a) and (b) both
        // count it.
        assert_eq!(sb.pipe(5500, 9000, 7000, MSS), 2500);
        // No SACK information: pipe = FlightSize.
        assert_eq!(Scoreboard::new().pipe(5500, 9000, 5500, MSS), 3500);
        // high_rxt outside [snd_una, snd_nxt] is clamped.
        assert_eq!(sb.pipe(5500, 9000, 1, MSS), 1500);
    }

    #[test]
    fn next_seg_rules() {
        let sb = case3(0);
        // Rule 1: 5500 is lost and above HighRxt.
        assert_eq!(sb.next_seg(5500, 9000, 5500, MSS), Some((5500, 6000)));
        assert_eq!(sb.next_lost_seg(5500, 9000, 5500, MSS), Some((5500, 6000)));
        // A larger SMSS stops at the SACKed range.
        assert_eq!(sb.next_seg(5500, 9000, 5500, 1460), Some((5500, 6000)));
        // Smaller SMSS: one segment at a time, from HighRxt.
        assert_eq!(sb.next_seg(5500, 9000, 5500, 200), Some((5500, 5700)));
        assert_eq!(sb.next_lost_seg(5500, 9000, 5700, 200), Some((5700, 5900)));
        // After retransmitting 5500: no lost octet above HighRxt (rule 1 fails) ...
        assert_eq!(sb.next_lost_seg(5500, 9000, 6000, MSS), None);
        // ... rule 3: the first unSACKed octet above HighRxt below the highest SACK.
        assert_eq!(
            sb.next_maybe_lost_seg(5500, 9000, 6000, MSS),
            Some((6500, 7000))
        );
        assert_eq!(sb.next_seg(5500, 9000, 6000, MSS), Some((6500, 7000)));
        assert_eq!(sb.next_seg(5500, 9000, 7000, MSS), Some((7500, 8000)));
        // (1.b): nothing above the highest SACKed octet (8500-9000 is rule 2/4 territory).
        assert_eq!(sb.next_seg(5500, 9000, 8000, MSS), None);
        // Empty scoreboard: nothing.
        assert_eq!(Scoreboard::new().next_seg(5500, 9000, 5500, MSS), None);
    }

    #[test]
    fn next_seg_rule1_skips_non_lost_holes_below_lost_ones() {
        // HighRxt is inside the first hole: rule 1 continues from HighRxt.
        let sb = case3(0);
        assert_eq!(sb.next_seg(5500, 9000, 5800, MSS), Some((5800, 6000)));
        // With DupThresh SACKed ranges above two holes, both are lost.
        let mut sb = Scoreboard::new();
        sb.update(
            1000,
            10_000,
            &[(2000, 2500), (3000, 3500), (4000, 4500), (5000, 5500)],
        );
        assert_eq!(
            sb.next_lost_seg(1000, 10_000, 2000, MSS),
            Some((2500, 3000))
        );
        assert_eq!(sb.next_lost_seg(1000, 10_000, 3000, MSS), None);
        assert_eq!(sb.next_seg(1000, 10_000, 3000, MSS), Some((3500, 4000)));
    }

    #[test]
    fn scoreboard_wraps() {
        // The range 6000-6500 crosses zero.
        let base = u32::MAX - 6199;
        assert!(base.wrapping_add(6000) > base.wrapping_add(6500));
        let sb = case3(base);
        let at = |x: u32| base.wrapping_add(x);
        assert_eq!(sb.highest_sacked(), Some(at(8500)));
        assert_eq!(sb.sacked_bytes(), 1500);
        assert!(sb.is_lost(at(5500), MSS, 3));
        assert!(!sb.is_lost(at(6500), MSS, 3));
        assert_eq!(sb.pipe(at(5500), at(9000), at(5500), MSS), 1500);
        assert_eq!(sb.pipe(at(5500), at(9000), at(6000), MSS), 2000);
        assert_eq!(
            sb.next_seg(at(5500), at(9000), at(5500), MSS),
            Some((at(5500), at(6000)))
        );
        assert_eq!(
            sb.next_seg(at(5500), at(9000), at(6000), MSS),
            Some((at(6500), at(7000)))
        );
        let mut sb = sb;
        assert_eq!(sb.update(at(7000), at(9000), &[]), (false, 0));
        assert_eq!(
            sb.ranges().collect::<Vec<_>>(),
            vec![(at(7000), at(7500)), (at(8000), at(8500))]
        );
    }

    #[test]
    fn scoreboard_full_array() {
        let mut sb = Scoreboard::new();
        let blk = |i: u32| (1000 + 200 * i, 1100 + 200 * i);
        for i in 0..SCOREBOARD_RANGES as u32 {
            assert_eq!(sb.update(1000, 100_000, &[blk(i)]), (true, 100));
        }
        assert_eq!(sb.ranges().count(), SCOREBOARD_RANGES);
        let highest = sb.highest_sacked();
        // A new disjoint block above everything: no room, not recorded.
        assert_eq!(sb.update(1000, 100_000, &[(50_000, 50_100)]), (false, 0));
        assert_eq!(sb.highest_sacked(), highest);
        // A new block below the highest: recorded, the highest range is forgotten.
        assert_eq!(sb.update(1000, 100_000, &[(1120, 1150)]), (true, 30));
        assert_eq!(sb.ranges().count(), SCOREBOARD_RANGES);
        assert_eq!(sb.highest_sacked(), Some(blk(14).1));
        assert_eq!(
            sb.ranges().take(3).collect::<Vec<_>>(),
            vec![blk(0), (1120, 1150), blk(1)]
        );
        // Merging into an existing range always works when full.
        assert_eq!(sb.update(1000, 100_000, &[(1100, 1120)]), (true, 20));
        assert_eq!(sb.ranges().count(), SCOREBOARD_RANGES - 1);
        assert_eq!(sb.ranges().next(), Some((1000, 1150)));
        // The pipe and NextSeg still work on a full table.
        assert!(sb.pipe(1000, 100_000, 1000, 100) > 0);
        assert!(sb.next_seg(1000, 100_000, 1000, 100).is_some());
    }

    #[test]
    fn scoreboard_bogus_state_is_safe() {
        let mut sb = Scoreboard::new();
        sb.len = 1000;
        sb.ranges[3] = [500, 100];
        sb.ranges[7] = [u32::MAX, 3];
        let _ = sb.pipe(0, 1000, 9999, 0);
        let _ = sb.next_seg(0, 1000, 0, 0);
        let _ = sb.is_lost(5, 0, 0);
        let _ = (sb.sacked_bytes(), sb.highest_sacked());
        let _ = sb.update(0, 1000, &[(10, 20), (30, 40)]);
        sb.clear();
        assert!(sb.is_empty());
    }
}
