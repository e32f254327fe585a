//! The ARP table (RFC 826): learnt entries with expiry, and next hops being resolved, each
//! with a small queue of datagrams waiting for the answer. Plain data; the engine sends.
//!
//! Ordered maps keep iteration (and so a simulation) deterministic.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wire::Mac;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    mac: Mac,
    expires: Duration,
}

/// A next hop being resolved.
#[derive(Debug, Default)]
pub struct Pending {
    /// Requests sent so far.
    pub tries: u8,
    /// When to send the next request (or give up, once `tries` is spent).
    pub next: Duration,
    /// Whole IP datagrams (unfragmented) waiting for the answer, oldest first.
    pub queue: VecDeque<Vec<u8>>,
}

/// A learnt entry as carried in a snapshot: time to live left, in ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedEntry {
    pub ip: [u8; 4],
    pub mac: [u8; 6],
    pub ttl_ms: u64,
}

/// The table.
#[derive(Debug, Default)]
pub struct ArpTable {
    entries: BTreeMap<Ipv4Addr, Entry>,
    pending: BTreeMap<Ipv4Addr, Pending>,
}

impl ArpTable {
    /// The MAC for `ip` if known and not expired.
    pub fn lookup(&self, ip: Ipv4Addr, now: Duration) -> Option<Mac> {
        self.entries
            .get(&ip)
            .filter(|e| e.expires > now)
            .map(|e| e.mac)
    }

    /// True if an entry (even an expired one not yet pruned) exists for `ip`.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.entries.contains_key(&ip)
    }

    /// Inserts or refreshes an entry. When full, the entry closest to expiry makes room.
    pub fn insert(&mut self, ip: Ipv4Addr, mac: Mac, expires: Duration, cap: usize) {
        if !self.entries.contains_key(&ip) && self.entries.len() >= cap {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.expires)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(ip, Entry { mac, expires });
    }

    /// Drops expired entries.
    pub fn prune(&mut self, now: Duration) {
        self.entries.retain(|_, e| e.expires > now);
    }

    /// Learnt entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is learnt.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The next hop being resolved, if any.
    pub fn pending_mut(&mut self, ip: Ipv4Addr) -> Option<&mut Pending> {
        self.pending.get_mut(&ip)
    }

    /// Starts resolving `ip` (the caller sends the first request). None if `max` next hops
    /// are being resolved already.
    pub fn start_pending(&mut self, ip: Ipv4Addr, max: usize) -> Option<&mut Pending> {
        if !self.pending.contains_key(&ip) && self.pending.len() >= max {
            return None;
        }
        Some(self.pending.entry(ip).or_default())
    }

    /// Stops resolving `ip`, handing back its queue.
    pub fn finish_pending(&mut self, ip: Ipv4Addr) -> Option<Pending> {
        self.pending.remove(&ip)
    }

    /// True if `ip` is being resolved.
    pub fn is_pending(&self, ip: Ipv4Addr) -> bool {
        self.pending.contains_key(&ip)
    }

    /// Next hops whose timer is due at `now`.
    pub fn due(&self, now: Duration) -> Vec<Ipv4Addr> {
        self.pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// The earliest retry timer.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.pending.values().map(|p| p.next).min()
    }

    /// Learnt entries, for a snapshot.
    pub fn save(&self, now: Duration) -> Vec<SavedEntry> {
        self.entries
            .iter()
            .filter(|(_, e)| e.expires > now)
            .map(|(ip, e)| SavedEntry {
                ip: ip.octets(),
                mac: e.mac.0,
                ttl_ms: (e.expires - now).as_millis() as u64,
            })
            .collect()
    }
}
