//! IPv4 fragment reassembly (RFC 791 section 3.2, RFC 815), with the overlap rule of
//! RFC 5722 applied to IPv4 as Linux does: an exact duplicate of a fragment already held is
//! dropped on its own; any other overlap discards the whole datagram, and later fragments of
//! it are discarded too until its timer runs out.
//!
//! Limits per source (datagrams in progress, bytes held) and on the number of sources bound
//! the memory an attacker can pin; every datagram has a deadline (set by its first fragment).
//! A source over its budget loses its oldest datagrams first (`drop.frag_evicted`), so its own
//! dead datagrams cannot block its live ones; a fragment that still does not fit, or one from
//! a new source when the table of sources is full, is dropped (`drop.frag_limit`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::counters::Ctr;
use crate::wire::{rewrite_reassembled_header, Ipv4Packet, IPV4_MAX};

/// Bytes charged per fragment on top of its payload (bookkeeping), so that floods of tiny
/// fragments hit the byte limit too.
const FRAG_OVERHEAD: usize = 64;

/// Limits and timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragLimits {
    pub timeout: Duration,
    pub max_datagrams_per_src: usize,
    pub max_bytes_per_src: usize,
    pub max_sources: usize,
}

/// Identifies a datagram being reassembled (RFC 791: source, destination, protocol, id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ident: u16,
}

#[derive(Debug)]
struct Partial {
    deadline: Duration,
    /// (offset, payload) of each fragment held, in arrival order.
    frags: Vec<(usize, Vec<u8>)>,
    /// Payload length, once the last fragment (MF clear) arrived.
    total: Option<usize>,
    /// Header of the first fragment (offset 0), options included.
    header: Option<Vec<u8>>,
    /// Bytes charged to the source.
    charged: usize,
    /// Overlap seen: everything dropped; a tombstone until the deadline.
    poisoned: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct SrcUse {
    datagrams: usize,
    bytes: usize,
}

/// What became of a fragment.
#[derive(Debug, PartialEq, Eq)]
pub enum FragOutcome {
    /// Held; the datagram is not complete yet.
    Held,
    /// The datagram is complete: its header (options kept, rewritten) and payload.
    Complete(Vec<u8>),
    /// Dropped, for the reason given.
    Dropped(Ctr),
}

/// A datagram whose timer ran out.
#[derive(Debug)]
pub struct Expired {
    /// Whether it counted as a timeout (false for a tombstone of an overlap already counted).
    pub counted: bool,
    /// Header and first 8 payload bytes of fragment zero, if it was received (for ICMP time
    /// exceeded, RFC 792 / RFC 1122 3.3.2).
    pub first: Option<Vec<u8>>,
}

/// The reassembly buffer.
#[derive(Debug)]
pub struct Reassembler {
    limits: FragLimits,
    map: BTreeMap<Key, Partial>,
    per_src: BTreeMap<Ipv4Addr, SrcUse>,
    evicted: u64,
}

impl Reassembler {
    /// An empty buffer.
    pub fn new(limits: FragLimits) -> Reassembler {
        Reassembler {
            limits,
            map: BTreeMap::new(),
            per_src: BTreeMap::new(),
            evicted: 0,
        }
    }

    /// Datagrams in progress (tombstones included).
    pub fn in_progress(&self) -> usize {
        self.map.len()
    }

    /// Bytes held for all sources.
    pub fn bytes_held(&self) -> usize {
        self.per_src.values().map(|u| u.bytes).sum()
    }

    /// Datagrams evicted to make room for newer ones of the same source since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.map.values().map(|p| p.deadline).min()
    }

    fn release(&mut self, src: Ipv4Addr, bytes: usize, datagram: bool) {
        if let Some(u) = self.per_src.get_mut(&src) {
            u.bytes = u.bytes.saturating_sub(bytes);
            if datagram {
                u.datagrams = u.datagrams.saturating_sub(1);
            }
            if u.datagrams == 0 {
                self.per_src.remove(&src);
            }
        }
    }

    fn remove(&mut self, key: &Key) -> Option<Partial> {
        let p = self.map.remove(key)?;
        self.release(key.src, p.charged, true);
        Some(p)
    }

    fn poison(&mut self, key: &Key) {
        let mut freed = 0;
        if let Some(p) = self.map.get_mut(key) {
            p.poisoned = true;
            p.frags = Vec::new();
            p.header = None;
            freed = std::mem::take(&mut p.charged);
        }
        self.release(key.src, freed, false);
    }

    /// Adds a fragment (a datagram with MF set or a non-zero offset, header checksum already
    /// verified).
    pub fn add<T: AsRef<[u8]>>(&mut self, now: Duration, p: &Ipv4Packet<T>) -> FragOutcome {
        let off = p.frag_offset();
        let data = p.payload();
        let end = off + data.len();
        let mf = p.more_frags();
        // Every fragment but the last carries a multiple of 8 bytes (RFC 791); nothing may
        // reach past the largest datagram.
        if (mf && (data.is_empty() || data.len() % 8 != 0)) || end + p.header_len() > IPV4_MAX {
            return FragOutcome::Dropped(Ctr::DropFragBad);
        }
        let key = Key {
            src: p.src(),
            dst: p.dst(),
            protocol: p.protocol(),
            ident: p.ident(),
        };
        let charge = data.len() + FRAG_OVERHEAD;
        let is_new = match self.map.get(&key) {
            Some(e) if e.poisoned => return FragOutcome::Dropped(Ctr::DropFragOverlap),
            Some(_) => false,
            None => {
                if !self.per_src.contains_key(&key.src)
                    && self.per_src.len() >= self.limits.max_sources
                {
                    return FragOutcome::Dropped(Ctr::DropFragLimit);
                }
                true
            }
        };
        // Over the source's budget: its oldest other datagrams make room (most likely dead:
        // a fragment of theirs was lost); if that is not enough, this fragment goes.
        loop {
            let u = self.per_src.get(&key.src).copied().unwrap_or_default();
            let need_slot = is_new && u.datagrams >= self.limits.max_datagrams_per_src;
            if !need_slot && u.bytes + charge <= self.limits.max_bytes_per_src {
                break;
            }
            let victim = self
                .map
                .iter()
                .filter(|(k, _)| k.src == key.src && **k != key)
                .min_by_key(|(_, p)| p.deadline)
                .map(|(k, _)| *k);
            let Some(v) = victim else {
                return FragOutcome::Dropped(Ctr::DropFragLimit);
            };
            if self.remove(&v).is_some_and(|p| !p.poisoned) {
                self.evicted += 1;
            }
        }
        if is_new {
            self.map.insert(
                key,
                Partial {
                    deadline: now + self.limits.timeout,
                    frags: Vec::new(),
                    total: None,
                    header: None,
                    charged: 0,
                    poisoned: false,
                },
            );
            self.per_src.entry(key.src).or_default().datagrams += 1;
        }
        let Some(entry) = self.map.get_mut(&key) else {
            return FragOutcome::Dropped(Ctr::DropFragLimit);
        };
        // Exact duplicate: dropped alone. Any other overlap: the whole datagram goes.
        let mut overlap = false;
        for (s, d) in &entry.frags {
            let e = s + d.len();
            if *s == off && e == end {
                return FragOutcome::Dropped(Ctr::DropFragDuplicate);
            }
            if off < e && *s < end {
                overlap = true;
            }
        }
        let beyond =
            |t: usize| end > t || (!mf && entry.frags.iter().any(|(s, d)| s + d.len() > end));
        match entry.total {
            Some(t) if !mf && t != end => overlap = true,
            Some(t) if beyond(t) => overlap = true,
            None if !mf && beyond(end) => overlap = true,
            _ => {}
        }
        if overlap {
            self.poison(&key);
            return FragOutcome::Dropped(Ctr::DropFragOverlap);
        }
        if !mf {
            entry.total = Some(end);
        }
        if off == 0 {
            entry.header = Some(p.header().to_vec());
        }
        entry.frags.push((off, data.to_vec()));
        entry.charged += charge;
        if let Some(u) = self.per_src.get_mut(&key.src) {
            u.bytes += charge;
        }
        let held: usize = entry.frags.iter().map(|(_, d)| d.len()).sum();
        let done = entry.header.is_some() && entry.total == Some(held);
        if !done {
            return FragOutcome::Held;
        }
        // No overlaps and every fragment within [0, total): the lengths adding up to the
        // total means the holes are filled.
        let Some(p) = self.remove(&key) else {
            return FragOutcome::Held;
        };
        let mut out = p.header.unwrap_or_default();
        let hlen = out.len();
        out.resize(hlen + held, 0);
        for (s, d) in &p.frags {
            if let Some(dst) = out.get_mut(hlen + s..hlen + s + d.len()) {
                dst.copy_from_slice(d);
            }
        }
        if let Some(h) = out.get_mut(..hlen) {
            rewrite_reassembled_header(h, hlen + held);
        }
        FragOutcome::Complete(out)
    }

    /// Removes every datagram whose deadline has passed.
    pub fn expire(&mut self, now: Duration) -> Vec<Expired> {
        let due: Vec<Key> = self
            .map
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(due.len());
        for k in due {
            if let Some(p) = self.remove(&k) {
                let first = p.header.as_ref().map(|h| {
                    let mut q = h.clone();
                    if let Some((_, d)) = p.frags.iter().find(|(s, _)| *s == 0) {
                        q.extend_from_slice(d.get(..8).unwrap_or(d));
                    }
                    q
                });
                out.push(Expired {
                    counted: !p.poisoned,
                    first,
                });
            }
        }
        out
    }
}
