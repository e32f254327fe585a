//! The socket table: what a udp server must not lose when it crashes (DESIGN rules 2 and 3).
//!
//! It lives in the region `udp.state` ([`RegionKind::GENERIC`]), which the supervisor
//! creates with [`SocketTable::create`] and hands to the server, which opens it with
//! [`SocketTable::open`]. The server writes it; nobody else maps it. A restarted server reads
//! it back ([`Store::load`]) and rebuilds its private indexes (port map, per-application
//! lists) from it: bound sockets survive a crash.
//!
//! ## Layout
//!
//! After the region header, a table header of four `u64` words (magic `KNUDPST1`, layout
//! version, capacity, words per entry), then `capacity` entries of four `u64` words each. Every
//! word is an `AtomicU64` reached through [`Region::atomic_u64`], so this needs no `unsafe`.
//!
//! | word | bits | meaning |
//! |---|---|---|
//! | 0 `head` | 63 | in use |
//! | | 32..48 | generation of the slot (kept while the slot is free) |
//! | | 0..32 | application id |
//! | 1 `local` | 0..32, 32..48 | local IPv4 address (host order), local port |
//! | 2 `remote` | 0..32, 32..48, 48 | remote address, remote port, connected |
//! | 3 `error` | 0..32 | pending error ([`keepnet_server::app::Status`] code, 0: none) |
//! | | 32..64 | id of the application's BIND request that made the socket |
//!
//! ## Crash consistency
//!
//! Every change to a live entry is a single word store, and an entry is published by its
//! `head` word, written last with Release after the other three; closing a socket clears the
//! in-use bit of `head` first (and only), so the stale words after it mean nothing. A process
//! killed at any instruction therefore leaves every entry either as it was before the change
//! or as it is after it, which the property test at the end of this module checks by cutting
//! each change at every word.
//!
//! The BIND request id lets a restarted server answer a bind its predecessor carried out but
//! died before committing (`crate::server`: requests replayed after a restart).
//!
//! A socket's handle (the `socket` field apps see) is `generation << 16 | slot`: the
//! generation, bumped each time the slot is reused, keeps a stale handle from naming a new
//! socket, and since it lives in the table a restarted server hands out no handle twice.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};

use keepnet_ipc::region::HEADER_SIZE;
use keepnet_ipc::{Region, RegionError, RegionKind};

const TABLE_MAGIC: u64 = u64::from_le_bytes(*b"KNUDPST1");
/// Layout version of the table; bump when an entry changes shape.
pub const TABLE_VERSION: u64 = 1;
/// Most entries a table can have: slots are 16 bits of a handle.
pub const MAX_CAPACITY: u32 = 1 << 16;
const WORDS: usize = 4;
const ENTRY: usize = WORDS * 8;
const T_MAGIC: usize = HEADER_SIZE;
const T_VERSION: usize = HEADER_SIZE + 8;
const T_CAPACITY: usize = HEADER_SIZE + 16;
const T_WORDS: usize = HEADER_SIZE + 24;
const ENTRIES: usize = HEADER_SIZE + 64;

const IN_USE: u64 = 1 << 63;
const CONNECTED: u64 = 1 << 48;

/// The handle of the socket in `slot` at generation `gen`.
pub fn handle(slot: u32, gen: u16) -> u32 {
    (u32::from(gen) << 16) | (slot & 0xffff)
}

/// (slot, generation) of a handle.
pub fn split_handle(h: u32) -> (u32, u16) {
    (h & 0xffff, (h >> 16) as u16)
}

/// What the table records about one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Record {
    /// The application that owns it.
    pub app: u32,
    /// Local address (0.0.0.0: any of ours) and port (never 0 once bound).
    pub local: SocketAddrV4,
    /// The peer, if connected.
    pub remote: Option<SocketAddrV4>,
    /// Pending asynchronous error (a [`keepnet_server::app::Status`] code), 0 if none.
    pub error: u32,
    /// The id of the application's BIND request that made the socket.
    pub bind_id: u32,
}

/// One slot of a table: its generation, and the socket in it if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Generation of the slot's last (or current) socket; 0: never used.
    pub gen: u16,
    /// The socket, if the slot is in use.
    pub record: Option<Record>,
}

/// Where the engine keeps the sockets that must outlive the process: the shared-memory
/// [`SocketTable`] in the server, a [`MemStore`] in tests and simulations. Each method is one
/// change to one slot, applied atomically as far as a later [`Store::load`] can tell.
pub trait Store {
    /// Number of slots.
    fn capacity(&self) -> u32;
    /// Every slot, in slot order.
    fn load(&self) -> Vec<SlotState>;
    /// Puts a new socket in the free slot `slot`, at generation `gen`.
    fn publish(&mut self, slot: u32, gen: u16, record: &Record);
    /// Frees `slot` (its generation is kept).
    fn retract(&mut self, slot: u32);
    /// Sets or clears the peer of the socket in `slot`.
    fn set_remote(&mut self, slot: u32, remote: Option<SocketAddrV4>);
    /// Sets (non-zero) or clears (0) the pending error of the socket in `slot`.
    fn set_error(&mut self, slot: u32, code: u32);
}

/// A [`Store`] in private memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemStore {
    slots: Vec<SlotState>,
}

impl MemStore {
    /// A store of `capacity` free slots (at most [`MAX_CAPACITY`]).
    pub fn new(capacity: u32) -> MemStore {
        MemStore {
            slots: vec![SlotState::default(); capacity.min(MAX_CAPACITY) as usize],
        }
    }
}

impl Store for MemStore {
    fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }
    fn load(&self) -> Vec<SlotState> {
        self.slots.clone()
    }
    fn publish(&mut self, slot: u32, gen: u16, record: &Record) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            *s = SlotState {
                gen,
                record: Some(*record),
            };
        }
    }
    fn retract(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.record = None;
        }
    }
    fn set_remote(&mut self, slot: u32, remote: Option<SocketAddrV4>) {
        if let Some(Some(r)) = self.slots.get_mut(slot as usize).map(|s| s.record.as_mut()) {
            r.remote = remote;
        }
    }
    fn set_error(&mut self, slot: u32, code: u32) {
        if let Some(Some(r)) = self.slots.get_mut(slot as usize).map(|s| s.record.as_mut()) {
            r.error = code;
        }
    }
}

/// Why a socket table could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("not a udp socket table (magic {0:#018x})")]
    BadMagic(u64),
    #[error("socket table layout version {found}, this build reads version {expected}")]
    BadVersion { found: u64, expected: u64 },
    #[error("socket table capacity {0} is not in 1..={MAX_CAPACITY}")]
    BadCapacity(u64),
    #[error("socket table entries have {0} words, this build expects {WORDS}")]
    BadEntry(u64),
    #[error("socket table of {capacity} entries needs {need} bytes, the region has {have}")]
    TooSmall {
        capacity: u32,
        need: usize,
        have: usize,
    },
}

/// One word store of a change, in the order the change makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Write {
    /// Offset of the word in the region.
    pub at: usize,
    pub value: u64,
    /// Whether this store publishes (Release); the others are Relaxed.
    pub release: bool,
}

/// The word stores of one change, in order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    writes: [Write; WORDS],
    len: usize,
}

impl Plan {
    fn new() -> Plan {
        Plan {
            writes: [Write {
                at: 0,
                value: 0,
                release: false,
            }; WORDS],
            len: 0,
        }
    }
    fn push(&mut self, at: usize, value: u64, release: bool) {
        if let Some(w) = self.writes.get_mut(self.len) {
            *w = Write { at, value, release };
            self.len += 1;
        }
    }
    /// The stores, in order.
    pub fn writes(&self) -> &[Write] {
        &self.writes[..self.len]
    }
}

fn encode_addr(a: SocketAddrV4) -> u64 {
    u64::from(u32::from(*a.ip())) | (u64::from(a.port()) << 32)
}

fn decode_addr(w: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(w as u32), (w >> 32) as u16)
}

fn encode_remote(r: Option<SocketAddrV4>) -> u64 {
    r.map_or(0, |a| encode_addr(a) | CONNECTED)
}

fn decode(w: [u64; WORDS]) -> SlotState {
    let gen = (w[0] >> 32) as u16;
    if w[0] & IN_USE == 0 {
        return SlotState { gen, record: None };
    }
    SlotState {
        gen,
        record: Some(Record {
            app: w[0] as u32,
            local: decode_addr(w[1]),
            remote: (w[2] & CONNECTED != 0).then(|| decode_addr(w[2])),
            error: w[3] as u32,
            bind_id: (w[3] >> 32) as u32,
        }),
    }
}

/// The socket table in its shared region (see the module docs).
#[derive(Clone, Debug)]
pub struct SocketTable {
    region: Region,
    capacity: u32,
}

/// A socket as [`SocketTable::entries`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The handle applications use.
    pub socket: u32,
    /// Slot in the table.
    pub slot: u32,
    /// What the table holds.
    pub record: Record,
}

impl SocketTable {
    /// Bytes a region needs for a table of `capacity` entries.
    pub fn size_for(capacity: u32) -> usize {
        (ENTRIES + capacity as usize * ENTRY + 4095) & !4095
    }

    /// Supervisor: creates the region `name` holding an empty table of `capacity` sockets
    /// (1..=[`MAX_CAPACITY`]).
    pub fn create(name: &str, capacity: u32) -> Result<SocketTable, StateError> {
        if capacity == 0 || capacity > MAX_CAPACITY {
            return Err(StateError::BadCapacity(u64::from(capacity)));
        }
        let region = Region::create(name, RegionKind::GENERIC, Self::size_for(capacity))?;
        region
            .atomic_u64(T_VERSION)?
            .store(TABLE_VERSION, Ordering::Relaxed);
        region
            .atomic_u64(T_CAPACITY)?
            .store(u64::from(capacity), Ordering::Relaxed);
        region
            .atomic_u64(T_WORDS)?
            .store(WORDS as u64, Ordering::Relaxed);
        // Sync point: the magic, stored last with Release, publishes the header (a fresh
        // memfd is zero-filled, so every entry starts free at generation 0).
        region
            .atomic_u64(T_MAGIC)?
            .store(TABLE_MAGIC, Ordering::Release);
        Ok(SocketTable { region, capacity })
    }

    /// Server: opens the table in a region handed over (checked: magic, version, capacity,
    /// entry shape, size). The capacity is read once and kept privately.
    pub fn open(region: Region) -> Result<SocketTable, StateError> {
        let magic = region.atomic_u64(T_MAGIC)?.load(Ordering::Acquire);
        if magic != TABLE_MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let version = region.atomic_u64(T_VERSION)?.load(Ordering::Relaxed);
        if version != TABLE_VERSION {
            return Err(StateError::BadVersion {
                found: version,
                expected: TABLE_VERSION,
            });
        }
        let words = region.atomic_u64(T_WORDS)?.load(Ordering::Relaxed);
        if words != WORDS as u64 {
            return Err(StateError::BadEntry(words));
        }
        let cap = region.atomic_u64(T_CAPACITY)?.load(Ordering::Relaxed);
        let capacity = match u32::try_from(cap) {
            Ok(c) if (1..=MAX_CAPACITY).contains(&c) => c,
            _ => return Err(StateError::BadCapacity(cap)),
        };
        let need = ENTRIES + capacity as usize * ENTRY;
        if region
            .ptr_at(ENTRIES, capacity as usize * ENTRY, 8)
            .is_err()
        {
            return Err(StateError::TooSmall {
                capacity,
                need,
                have: region.len(),
            });
        }
        Ok(SocketTable { region, capacity })
    }

    /// The region (to hand over).
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Number of entries.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn at(slot: u32, word: usize) -> usize {
        ENTRIES + slot as usize * ENTRY + word * 8
    }

    /// The word at `at`. Offsets come from [`SocketTable::at`] with a slot below the
    /// capacity, which `open`/`create` checked against the region, so this never fails;
    /// were it to, a load reads 0 (a free slot) and a store does nothing.
    fn word(&self, at: usize) -> Option<&AtomicU64> {
        self.region.atomic_u64(at).ok()
    }

    fn load_word(&self, at: usize, order: Ordering) -> u64 {
        self.word(at).map_or(0, |w| w.load(order))
    }

    fn read(&self, slot: u32) -> [u64; WORDS] {
        let mut w = [0u64; WORDS];
        if slot < self.capacity {
            // Sync point: Acquire on `head` pairs with the Release that published the entry.
            w[0] = self.load_word(Self::at(slot, 0), Ordering::Acquire);
            for (i, v) in w.iter_mut().enumerate().skip(1) {
                *v = self.load_word(Self::at(slot, i), Ordering::Acquire);
            }
        }
        w
    }

    /// Every socket in the table. Safe to call while the server runs (status, tests): an
    /// entry that changes while it is read is read again.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for slot in 0..self.capacity {
            for _ in 0..16 {
                let w = self.read(slot);
                let again = self.load_word(Self::at(slot, 0), Ordering::Acquire);
                if again != w[0] {
                    continue;
                }
                if let SlotState {
                    gen,
                    record: Some(record),
                } = decode(w)
                {
                    out.push(Entry {
                        socket: handle(slot, gen),
                        slot,
                        record,
                    });
                }
                break;
            }
        }
        out
    }

    /// How many sockets application `app` has (for status).
    pub fn app_socket_count(&self, app: u32) -> usize {
        self.entries()
            .iter()
            .filter(|e| e.record.app == app)
            .count()
    }

    /// Whether application `app` has at least one socket (a service is ready once it has
    /// bound).
    pub fn app_has_socket(&self, app: u32) -> bool {
        self.entries().iter().any(|e| e.record.app == app)
    }

    pub(crate) fn plan_publish(&self, slot: u32, gen: u16, r: &Record) -> Plan {
        let mut p = Plan::new();
        if slot < self.capacity {
            p.push(Self::at(slot, 1), encode_addr(r.local), false);
            p.push(Self::at(slot, 2), encode_remote(r.remote), false);
            let w3 = u64::from(r.error) | (u64::from(r.bind_id) << 32);
            p.push(Self::at(slot, 3), w3, false);
            // Last, with Release: publishes the three words above.
            let head = IN_USE | (u64::from(gen) << 32) | u64::from(r.app);
            p.push(Self::at(slot, 0), head, true);
        }
        p
    }

    pub(crate) fn plan_retract(&self, slot: u32) -> Plan {
        let mut p = Plan::new();
        if slot < self.capacity {
            // First and only: the in-use bit goes, the generation stays.
            let head = self.load_word(Self::at(slot, 0), Ordering::Relaxed);
            p.push(Self::at(slot, 0), head & !IN_USE & (0xffff << 32), true);
        }
        p
    }

    pub(crate) fn plan_remote(&self, slot: u32, remote: Option<SocketAddrV4>) -> Plan {
        let mut p = Plan::new();
        if slot < self.capacity {
            p.push(Self::at(slot, 2), encode_remote(remote), true);
        }
        p
    }

    pub(crate) fn plan_error(&self, slot: u32, code: u32) -> Plan {
        let mut p = Plan::new();
        if slot < self.capacity {
            // One store; the bind id in the high half stays (we are the only writer).
            let w3 = self.load_word(Self::at(slot, 3), Ordering::Relaxed);
            p.push(
                Self::at(slot, 3),
                (w3 & !0xffff_ffff) | u64::from(code),
                true,
            );
        }
        p
    }

    /// Makes the first `n` stores of `plan` (all of them in the server; fewer in the tests
    /// that kill a change half-way).
    pub(crate) fn apply(&self, plan: &Plan, n: usize) {
        for w in plan.writes().iter().take(n) {
            let order = if w.release {
                Ordering::Release
            } else {
                Ordering::Relaxed
            };
            if let Some(word) = self.word(w.at) {
                word.store(w.value, order);
            }
        }
    }
}

impl Store for SocketTable {
    fn capacity(&self) -> u32 {
        self.capacity
    }
    fn load(&self) -> Vec<SlotState> {
        // A free slot is known from its head word: the other words are read only for
        // sockets (most of a 4096-slot table is free, and a successor's start is blackout).
        (0..self.capacity)
            .map(|s| {
                let head = self.load_word(Self::at(s, 0), Ordering::Acquire);
                if head & IN_USE == 0 {
                    SlotState {
                        gen: (head >> 32) as u16,
                        record: None,
                    }
                } else {
                    decode(self.read(s))
                }
            })
            .collect()
    }
    fn publish(&mut self, slot: u32, gen: u16, record: &Record) {
        self.apply(&self.plan_publish(slot, gen, record), WORDS);
    }
    fn retract(&mut self, slot: u32) {
        self.apply(&self.plan_retract(slot), WORDS);
    }
    fn set_remote(&mut self, slot: u32, remote: Option<SocketAddrV4>) {
        self.apply(&self.plan_remote(slot, remote), WORDS);
    }
    fn set_error(&mut self, slot: u32, code: u32) {
        self.apply(&self.plan_error(slot, code), WORDS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(app: u32, port: u16) -> Record {
        Record {
            app,
            local: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
            remote: None,
            error: 0,
            bind_id: 9,
        }
    }

    #[test]
    fn create_open_round_trip_and_checks() {
        let mut t = SocketTable::create("t-udp-state", 8).unwrap();
        assert_eq!(t.region().len(), SocketTable::size_for(8));
        t.publish(3, 1, &rec(7, 5353));
        let peer = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 53);
        t.set_remote(3, Some(peer));
        t.set_error(3, 4);
        let again = SocketTable::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        assert_eq!(again.capacity(), 8);
        let e = again.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].socket, handle(3, 1));
        assert_eq!(e[0].record.remote, Some(peer));
        assert_eq!(e[0].record.error, 4);
        assert_eq!(
            (again.app_socket_count(7), again.app_socket_count(8)),
            (1, 0)
        );
        assert!(again.app_has_socket(7) && !again.app_has_socket(8));
        t.retract(3);
        assert!(again.entries().is_empty());
        assert_eq!(again.load()[3].gen, 1, "generation survives a close");
        // Checked on open.
        assert!(matches!(
            SocketTable::create("t-bad", 0),
            Err(StateError::BadCapacity(0))
        ));
        assert!(SocketTable::create("t-bad", MAX_CAPACITY + 1).is_err());
        let other = Region::create("t-not-table", RegionKind::GENERIC, 8192).unwrap();
        assert!(matches!(
            SocketTable::open(other),
            Err(StateError::BadMagic(0))
        ));
        let wrong_kind = t.region().reopen(RegionKind::RINGS);
        assert!(wrong_kind.is_err());
        // A capacity bigger than the region is refused.
        t.region()
            .atomic_u64(T_CAPACITY)
            .unwrap()
            .store(60_000, Ordering::Relaxed);
        assert!(matches!(
            SocketTable::open(t.region().reopen(RegionKind::GENERIC).unwrap()),
            Err(StateError::TooSmall { .. })
        ));
    }

    #[test]
    fn handles_round_trip() {
        assert_eq!(split_handle(handle(65535, 7)), (65535, 7));
        assert_ne!(handle(0, 1), 0);
    }

    /// One change to one slot, as the engine makes them.
    #[derive(Clone, Debug)]
    enum Change {
        Publish(u32, u16, Record),
        Retract(u32),
        Remote(u32, Option<SocketAddrV4>),
        Error(u32, u32),
    }

    fn change() -> impl Strategy<Value = Change> {
        let slot = 0u32..6;
        let addr = prop_oneof![
            Just(None),
            (any::<u32>(), 1u16..).prop_map(|(a, p)| Some(SocketAddrV4::new(a.into(), p)))
        ];
        prop_oneof![
            (
                slot.clone(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                any::<u16>(),
                addr.clone(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(s, g, app, a, p, remote, error, bind_id)| Change::Publish(
                    s,
                    g,
                    Record {
                        app,
                        local: SocketAddrV4::new(a.into(), p),
                        remote,
                        error,
                        bind_id,
                    }
                )),
            slot.clone().prop_map(Change::Retract),
            (slot.clone(), addr).prop_map(|(s, a)| Change::Remote(s, a)),
            (slot, any::<u32>()).prop_map(|(s, e)| Change::Error(s, e)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(if cfg!(miri) { 4 } else { 128 }))]

        /// Kill at any store: a table cut after any word of any change reads back as the
        /// model before that change or after it, never as anything else.
        #[test]
        fn a_change_cut_at_any_word_reads_as_before_or_after(
            changes in proptest::collection::vec(change(), 1..40),
            cut_at in any::<prop::sample::Index>(),
            words in 0usize..WORDS,
        ) {
            let t = SocketTable::create("t-udp-cut", 6).unwrap();
            let mut model = MemStore::new(6);
            let cut = cut_at.index(changes.len());
            for (i, c) in changes.iter().enumerate() {
                let (plan, mut next) = (match c {
                    Change::Publish(s, g, r) => t.plan_publish(*s, *g, r),
                    Change::Retract(s) => t.plan_retract(*s),
                    Change::Remote(s, a) => t.plan_remote(*s, *a),
                    Change::Error(s, e) => t.plan_error(*s, *e),
                }, model.clone());
                // The model applies changes as the engine would: only to slots in the state
                // each change expects.
                let applies = match c {
                    Change::Publish(s, ..) => next.slots[*s as usize].record.is_none(),
                    _ => next.slots[*c_slot(c) as usize].record.is_some(),
                };
                if !applies {
                    continue;
                }
                match c {
                    Change::Publish(s, g, r) => next.publish(*s, *g, r),
                    Change::Retract(s) => next.retract(*s),
                    Change::Remote(s, a) => next.set_remote(*s, *a),
                    Change::Error(s, e) => next.set_error(*s, *e),
                }
                if i >= cut {
                    t.apply(&plan, words);
                    let fresh =
                        SocketTable::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
                    let seen = fresh.load();
                    prop_assert!(
                        seen == model.load() || seen == next.load(),
                        "cut after {words} words of {c:?}: {seen:?}"
                    );
                    return Ok(());
                }
                t.apply(&plan, WORDS);
                model = next;
                prop_assert_eq!(t.load(), model.load());
            }
        }
    }

    fn c_slot(c: &Change) -> &u32 {
        match c {
            Change::Publish(s, ..)
            | Change::Retract(s)
            | Change::Remote(s, _)
            | Change::Error(s, _) => s,
        }
    }
}
