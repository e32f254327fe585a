//! Single-producer single-consumer rings in shared memory (DESIGN rule 4).
//!
//! Layout at the ring's offset (each part on its own 128-byte line pair):
//!
//! | offset | what | written by |
//! |---|---|---|
//! | 0   | [`RingMeta`]: magic, slot size/align, capacity, tag, claims, generations | init; claims |
//! | 128 | `tail`: next index the producer will write | producer only |
//! | 256 | `head`: next index the consumer will read | consumer only |
//! | 384 | `capacity` slots of `T` | producer writes, consumer reads |
//!
//! Indices are free-running `u64`s (they never wrap in practice); slot `i` lives at
//! `i & (capacity - 1)`. A producer writes slots, then publishes `tail` (Release); a consumer
//! loads `tail` (Acquire), reads slots, then publishes `head` (Release). A slot therefore is
//! either the producer's (in `[tail, head + capacity)`) or the consumer's (in `[head, tail)`),
//! never both, and a process killed at any instruction leaves indices that describe exactly
//! the slots that were fully written and not yet consumed.
//!
//! Each side caches the other's index and refreshes it only when the ring looks full (producer)
//! or empty (consumer). The peer's index is untrusted: a value that would put more than
//! `capacity` slots between head and tail, or move an index backwards, is reported as
//! [`RingError::Corrupt`] and never used to address a slot.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::doorbell::Doorbell;
use crate::pod::Pod;
use crate::region::{Region, RegionError};

const RING_MAGIC: u64 = u64::from_le_bytes(*b"KNRING01");
const META: usize = 0;
const TAIL: usize = 128;
const HEAD: usize = 256;
const SLOTS: usize = 384;
/// Largest capacity a ring may have (2^24 slots).
pub const MAX_CAPACITY: u64 = 1 << 24;
/// Largest index a ring may hold. Real indices never get near it (2^62 slots); refusing larger
/// ones when a handle adopts the shared indices keeps `index + capacity` free of overflow.
const MAX_INDEX: u64 = 1 << 62;

#[repr(C, align(128))]
struct RingMeta {
    magic: AtomicU64,
    capacity: AtomicU64,
    slot_size: AtomicU32,
    slot_align: AtomicU32,
    tag: AtomicU32,
    producer_pid: AtomicU32,
    consumer_pid: AtomicU32,
    producer_gen: AtomicU32,
    consumer_gen: AtomicU32,
    _pad: AtomicU32,
    /// Times a handle found the peer's index inconsistent.
    corrupt: AtomicU64,
}

/// Why a ring operation failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error(transparent)]
    Region(#[from] RegionErrorEq),
    #[error("no initialised ring at this offset (magic {found:#018x})")]
    BadMagic { found: u64 },
    #[error("ring slot layout mismatch: ring has {found_size}-byte slots aligned {found_align}, this handle expects {size}/{align}")]
    SlotMismatch {
        found_size: u32,
        found_align: u32,
        size: u32,
        align: u32,
    },
    #[error("ring tag is {found:#x}, expected {expected:#x}")]
    BadTag { found: u32, expected: u32 },
    #[error("invalid ring capacity {0} (must be a power of two, 1..={MAX_CAPACITY}, and fit the region)")]
    BadCapacity(u64),
    #[error("ring {side} is already claimed by live process {pid}")]
    AlreadyClaimed { side: &'static str, pid: u32 },
    #[error("ring indices are inconsistent (head {head}, tail {tail}, capacity {capacity}): the peer wrote garbage")]
    Corrupt { head: u64, tail: u64, capacity: u64 },
    #[error("commit of {n} slots but only {pending} were read")]
    OverCommit { n: usize, pending: usize },
}

/// [`RegionError`] wrapped so that [`RingError`] can be compared in tests.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RegionErrorEq(#[from] pub RegionError);

impl PartialEq for RegionErrorEq {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}
impl Eq for RegionErrorEq {}

impl From<RegionError> for RingError {
    fn from(e: RegionError) -> Self {
        RingError::Region(RegionErrorEq(e))
    }
}

/// Why a push failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// No free slot: the value is handed back.
    Full(T),
    /// The consumer's index is garbage.
    Corrupt(RingError),
}

/// The location of a ring in a region, and what is known about it without claiming a side:
/// used to initialise rings, to claim a side, and to inspect a ring (the supervisor's status,
/// or a restarted endpoint scanning what is still in flight).
pub struct Ring<T: Pod> {
    region: Region,
    offset: usize,
    /// `region`'s mapping at `offset`, checked (in bounds, aligned) when the value was built;
    /// kept so that no access re-checks it.
    base: *mut u8,
    capacity: u64,
    _t: PhantomData<T>,
}

// SAFETY: `base` points into the mapping that `region` (an Arc) keeps alive for as long as
// the value exists; everything reached through it is atomics or slots whose exclusive use the
// ring protocol arranges, so a Ring may move to and be shared with other threads as freely as
// the Region itself.
unsafe impl<T: Pod> Send for Ring<T> {}
// SAFETY: as above.
unsafe impl<T: Pod> Sync for Ring<T> {}

impl<T: Pod> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("offset", &self.offset)
            .field("capacity", &self.capacity)
            .finish()
    }
}

fn slot_align<T>() -> usize {
    std::mem::align_of::<T>().max(64)
}

/// A live process whose ring claims this process may take over as if it had died: a live-
/// update predecessor that has handed off and never touches a ring again (see
/// [`take_over_from`]). 0: none.
static PREDECESSOR: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Lets this process take over the ring sides `pid` holds although `pid` is alive: a live
/// update's successor, ordered to take over by a predecessor that has written its snapshot,
/// answered its last command and returned from its loop (it only exits after that; its
/// handles release their claims by compare-and-swap, which leaves a taken-over claim alone).
/// The successor claims at once instead of waiting for the predecessor's teardown.
pub fn take_over_from(pid: u32) {
    PREDECESSOR.store(pid, Ordering::SeqCst);
}

/// True if a process with this pid exists and has not exited. EPERM means it exists but
/// belongs to someone else. 0 and values that are not valid pids are never alive (a negative
/// pid would name a process group). A zombie (exited, not yet reaped) is not alive: it can
/// touch no shared memory any more. This matters for a process whose parent is gone (a
/// server re-adopted after its supervisor died): its reaper is init, which may reap it late
/// or, in a container, never.
pub fn process_alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => !is_zombie(pid),
        Err(nix::errno::Errno::EPERM) => !is_zombie(pid),
        Err(_) => false,
    }
}

/// True if /proc says process `pid` has exited and waits to be reaped (state Z or X). False
/// where /proc cannot say.
fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": the command name may hold anything, parentheses included.
    stat.rfind(')')
        .and_then(|i| stat.get(i + 1..))
        .and_then(|rest| rest.split_whitespace().next())
        .is_some_and(|state| matches!(state, "Z" | "X" | "x"))
}

/// How a side was claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nobody held it.
    Fresh,
    /// A process that no longer exists held it: this is a restart.
    Takeover { from: u32 },
}

impl<T: Pod> Ring<T> {
    /// Bytes a ring of `capacity` slots needs in a region.
    pub const fn size_in_region(capacity: usize) -> usize {
        SLOTS + capacity * std::mem::size_of::<T>()
    }
    /// Alignment a ring needs in a region.
    pub const ALIGN: usize = 128;

    /// Initialises an empty ring at `offset` (creator side, before anyone attaches).
    pub fn init(
        region: &Region,
        offset: usize,
        capacity: usize,
        tag: u32,
    ) -> Result<Ring<T>, RingError> {
        let cap = capacity as u64;
        if !capacity.is_power_of_two() || cap > MAX_CAPACITY {
            return Err(RingError::BadCapacity(cap));
        }
        let base = region.ptr_at(offset, Self::size_in_region(capacity), Self::ALIGN)?;
        let ring = Ring {
            region: region.clone(),
            offset,
            base,
            capacity: cap,
            _t: PhantomData,
        };
        let m = ring.meta();
        m.capacity.store(cap, Ordering::Relaxed);
        m.slot_size
            .store(std::mem::size_of::<T>() as u32, Ordering::Relaxed);
        m.slot_align
            .store(slot_align::<T>() as u32, Ordering::Relaxed);
        m.tag.store(tag, Ordering::Relaxed);
        m.producer_pid.store(0, Ordering::Relaxed);
        m.consumer_pid.store(0, Ordering::Relaxed);
        ring.idx(TAIL).store(0, Ordering::Relaxed);
        ring.idx(HEAD).store(0, Ordering::Relaxed);
        m.magic.store(RING_MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Opens a ring initialised elsewhere, checking magic, slot layout, tag and capacity.
    pub fn open(region: &Region, offset: usize, tag: u32) -> Result<Ring<T>, RingError> {
        let base = region.ptr_at(offset, SLOTS, Self::ALIGN)?;
        let probe: Ring<T> = Ring {
            region: region.clone(),
            offset,
            base,
            capacity: 0,
            _t: PhantomData,
        };
        let m = probe.meta();
        let magic = m.magic.load(Ordering::Acquire);
        if magic != RING_MAGIC {
            return Err(RingError::BadMagic { found: magic });
        }
        let (found_size, found_align) = (
            m.slot_size.load(Ordering::Relaxed),
            m.slot_align.load(Ordering::Relaxed),
        );
        let (size, align) = (std::mem::size_of::<T>() as u32, slot_align::<T>() as u32);
        if (found_size, found_align) != (size, align) {
            return Err(RingError::SlotMismatch {
                found_size,
                found_align,
                size,
                align,
            });
        }
        let found_tag = m.tag.load(Ordering::Relaxed);
        if found_tag != tag {
            return Err(RingError::BadTag {
                found: found_tag,
                expected: tag,
            });
        }
        // The capacity is read once here and kept privately: a peer rewriting it later
        // cannot make us address slots outside the ring.
        let cap = m.capacity.load(Ordering::Relaxed);
        if !cap.is_power_of_two() || cap > MAX_CAPACITY {
            return Err(RingError::BadCapacity(cap));
        }
        region
            .ptr_at(offset, Self::size_in_region(cap as usize), Self::ALIGN)
            .map_err(|_| RingError::BadCapacity(cap))?;
        Ok(Ring {
            capacity: cap,
            ..probe
        })
    }

    fn meta(&self) -> &RingMeta {
        // SAFETY: `offset..offset+SLOTS` was checked to be inside the region and 128-aligned
        // when this value was built; the mapping lives as long as `self.region`; RingMeta is
        // all atomics, valid for any bit pattern.
        unsafe { &*self.base().add(META).cast::<RingMeta>() }
    }

    fn idx(&self, at: usize) -> &AtomicU64 {
        // SAFETY: as for `meta`: TAIL and HEAD lie inside the checked header area, 128-aligned.
        unsafe { &*self.base().add(at).cast::<AtomicU64>() }
    }

    #[inline]
    fn base(&self) -> *mut u8 {
        self.base
    }

    fn slots(&self) -> *mut T {
        // SAFETY: SLOTS is inside the checked range; the slot array that follows was checked
        // against the capacity when this value was built.
        unsafe { self.base().add(SLOTS).cast::<T>() }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Current (head, tail) as published, validated.
    ///
    /// Either side may be running while a third party (a restarting endpoint scanning its
    /// rings, the supervisor, a test) reads the pair, and may move its index between the two
    /// loads: a head read before the consumer advanced and a tail read after the producer
    /// refilled would look like more than `capacity` in flight. So the head is read again
    /// after the tail, and the pair is taken only if the head did not move meanwhile; then it
    /// is a pair the ring really had (the producer never gets more than `capacity` ahead of
    /// the head at any instant), and a bad one is corruption, not a race.
    pub fn indices(&self) -> Result<(u64, u64), RingError> {
        let mut head = self.idx(HEAD).load(Ordering::Acquire);
        let mut tail = self.idx(TAIL).load(Ordering::Acquire);
        for _ in 0..4096 {
            let again = self.idx(HEAD).load(Ordering::Acquire);
            if again == head {
                break;
            }
            std::hint::spin_loop();
            head = again;
            tail = self.idx(TAIL).load(Ordering::Acquire);
        }
        if tail.wrapping_sub(head) > self.capacity || tail > MAX_INDEX {
            return Err(self.corrupt(head, tail));
        }
        Ok((head, tail))
    }

    /// Copies of the slots published but not yet consumed, oldest first. Stable only while
    /// one side is not running (a restarting endpoint scanning its rings).
    pub fn in_flight(&self) -> Result<Vec<T>, RingError> {
        let (head, tail) = self.indices()?;
        Ok((head..tail).map(|i| self.read_slot(i)).collect())
    }

    /// Times any handle on this ring found its indices inconsistent.
    pub fn corrupt_count(&self) -> u64 {
        self.meta().corrupt.load(Ordering::Relaxed)
    }

    /// (producer, consumer) generations: bumped each time a side is taken over after a crash.
    pub fn generations(&self) -> (u32, u32) {
        let m = self.meta();
        (
            m.producer_gen.load(Ordering::Acquire),
            m.consumer_gen.load(Ordering::Acquire),
        )
    }

    /// (producer pid, consumer pid) currently holding the sides (0 when free).
    pub fn claims(&self) -> (u32, u32) {
        let m = self.meta();
        (
            m.producer_pid.load(Ordering::Acquire),
            m.consumer_pid.load(Ordering::Acquire),
        )
    }

    /// Frees any side held by `pid` (the supervisor, once it has reaped that process).
    pub fn release_claims_of(&self, pid: u32) {
        let m = self.meta();
        let _ = m
            .producer_pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
        let _ = m
            .consumer_pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    fn corrupt(&self, head: u64, tail: u64) -> RingError {
        self.meta().corrupt.fetch_add(1, Ordering::Relaxed);
        RingError::Corrupt {
            head,
            tail,
            capacity: self.capacity,
        }
    }

    #[inline]
    fn read_slot(&self, i: u64) -> T {
        let at = (i & (self.capacity - 1)) as usize;
        // SAFETY: `at < capacity` and the slot array holds `capacity` slots (checked at
        // build), aligned for T. The copy forms no reference into shared memory. The ring
        // protocol makes this slot ours alone (published before our Acquire of the index);
        // a peer that breaks the protocol can at worst make us read a torn value, and T: Pod
        // is valid for any bit pattern. (A plain copy, not a volatile one: volatile moves a
        // byte array one byte at a time.)
        unsafe { std::ptr::read(self.slots().add(at)) }
    }

    #[inline]
    fn write_slot(&self, i: u64, v: T) {
        let at = (i & (self.capacity - 1)) as usize;
        // SAFETY: as in read_slot; the ring protocol makes this slot the producer's alone
        // until the Release store of the tail publishes it.
        unsafe { std::ptr::write(self.slots().add(at), v) }
    }

    fn claim(&self, producer: bool) -> Result<Claim, RingError> {
        let m = self.meta();
        let (cell, gen, side) = if producer {
            (&m.producer_pid, &m.producer_gen, "producer")
        } else {
            (&m.consumer_pid, &m.consumer_gen, "consumer")
        };
        let me = std::process::id();
        loop {
            let cur = cell.load(Ordering::Acquire);
            if cur == 0 {
                if cell
                    .compare_exchange(0, me, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(Claim::Fresh);
                }
            } else if cur == me || (cur != PREDECESSOR.load(Ordering::SeqCst) && process_alive(cur))
            {
                return Err(RingError::AlreadyClaimed { side, pid: cur });
            } else if cell
                .compare_exchange(cur, me, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                gen.fetch_add(1, Ordering::AcqRel);
                return Ok(Claim::Takeover { from: cur });
            }
        }
    }

    /// Claims the producer side. Fails if a live process holds it; takes it over (a restart)
    /// if the holder no longer exists. The claim is released when the handle drops.
    pub fn producer(&self) -> Result<Producer<T>, RingError> {
        let claim = self.claim(true)?;
        let ring = Ring {
            region: self.region.clone(),
            ..*self
        };
        let release = |r: &Ring<T>| r.meta().producer_pid.store(0, Ordering::Release);
        // Our own index comes back from shared memory: check it against the consumer's.
        let (head, tail) = match ring.indices() {
            Ok(v) => v,
            Err(e) => {
                release(&ring);
                return Err(e);
            }
        };
        Ok(Producer {
            ring,
            tail,
            cached_head: head,
            bell: None,
            claim,
        })
    }

    /// Claims the consumer side (see [`Ring::producer`]).
    pub fn consumer(&self) -> Result<Consumer<T>, RingError> {
        let claim = self.claim(false)?;
        let ring = Ring {
            region: self.region.clone(),
            ..*self
        };
        let (head, tail) = match ring.indices() {
            Ok(v) => v,
            Err(e) => {
                ring.meta().consumer_pid.store(0, Ordering::Release);
                return Err(e);
            }
        };
        Ok(Consumer {
            ring,
            head,
            read_pos: head,
            cached_tail: tail,
            claim,
        })
    }
}

impl<T: Pod> Clone for Ring<T> {
    fn clone(&self) -> Self {
        Ring {
            region: self.region.clone(),
            ..*self
        }
    }
}

// `..*self` above needs the non-region fields to be Copy; PhantomData<T> is Copy for Pod T.

/// The producer side of a ring. At most one exists per ring at a time, across all processes.
pub struct Producer<T: Pod> {
    ring: Ring<T>,
    /// Our tail: the authoritative copy lives in shared memory, this is what we last published.
    tail: u64,
    cached_head: u64,
    bell: Option<Doorbell>,
    claim: Claim,
}

impl<T: Pod> Producer<T> {
    /// Rings `bell` after every publish that made items visible (the consumer's doorbell).
    pub fn set_doorbell(&mut self, bell: Doorbell) {
        self.bell = Some(bell);
    }

    /// Whether this handle is a fresh claim or a takeover after the previous holder died.
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// The ring this handle produces into.
    pub fn ring(&self) -> &Ring<T> {
        &self.ring
    }

    /// Index the next pushed slot will get (free-running).
    pub fn tail(&self) -> u64 {
        self.tail
    }

    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.ring.idx(HEAD).load(Ordering::Acquire);
        // The consumer's head must lie in [cached_head, tail]: it never moves back and never
        // passes what we published.
        let moved = head.wrapping_sub(self.cached_head);
        if moved > self.tail.wrapping_sub(self.cached_head) {
            return Err(self.ring.corrupt(head, self.tail));
        }
        self.cached_head = head;
        Ok(())
    }

    /// Free slots, refreshing the consumer's index.
    pub fn free_slots(&mut self) -> Result<usize, RingError> {
        self.refresh_head()?;
        Ok((self.ring.capacity - (self.tail - self.cached_head)) as usize)
    }

    /// Pushes one value and publishes it.
    pub fn push(&mut self, v: T) -> Result<(), PushError<T>> {
        if self.tail - self.cached_head == self.ring.capacity {
            if let Err(e) = self.refresh_head() {
                return Err(PushError::Corrupt(e));
            }
            if self.tail - self.cached_head == self.ring.capacity {
                return Err(PushError::Full(v));
            }
        }
        self.ring.write_slot(self.tail, v);
        self.tail += 1;
        self.publish();
        Ok(())
    }

    /// Pushes as many of `items` as fit, publishing once; returns how many were pushed.
    pub fn push_slice(&mut self, items: &[T]) -> Result<usize, RingError> {
        let mut free = self.ring.capacity - (self.tail - self.cached_head);
        if free < items.len() as u64 {
            self.refresh_head()?;
            free = self.ring.capacity - (self.tail - self.cached_head);
        }
        let n = free.min(items.len() as u64);
        for (i, v) in items[..n as usize].iter().enumerate() {
            self.ring.write_slot(self.tail + i as u64, *v);
        }
        if n > 0 {
            self.tail += n;
            self.publish();
        }
        Ok(n as usize)
    }

    #[inline]
    fn publish(&mut self) {
        // Sync point: Release makes the slot writes above visible to a consumer that
        // Acquire-loads this tail.
        self.ring.idx(TAIL).store(self.tail, Ordering::Release);
        if let Some(b) = &self.bell {
            b.ring();
        }
    }
}

impl<T: Pod> Drop for Producer<T> {
    fn drop(&mut self) {
        let me = std::process::id();
        let _ = self.ring.meta().producer_pid.compare_exchange(
            me,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// The consumer side of a ring. Reads are two-phase: [`Consumer::read`] copies slots out
/// without releasing them, [`Consumer::commit`] hands them back to the producer. A consumer
/// killed between the two sees the same slots again after restart, so it can finish its work
/// on them before committing (at-least-once up to the commit point, exactly-once beyond).
pub struct Consumer<T: Pod> {
    ring: Ring<T>,
    /// Committed head (what the producer sees).
    head: u64,
    /// Next slot `read` returns (>= head).
    read_pos: u64,
    cached_tail: u64,
    claim: Claim,
}

impl<T: Pod> Consumer<T> {
    /// Whether this handle is a fresh claim or a takeover after the previous holder died.
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// The ring this handle consumes from.
    pub fn ring(&self) -> &Ring<T> {
        &self.ring
    }

    /// Committed head index (free-running).
    pub fn head(&self) -> u64 {
        self.head
    }

    fn refresh_tail(&mut self) -> Result<(), RingError> {
        let tail = self.ring.idx(TAIL).load(Ordering::Acquire);
        // The producer's tail must lie in [cached_tail, head + capacity]: it never moves back
        // and never laps us.
        let grew = tail.wrapping_sub(self.cached_tail);
        let room = self.head + self.ring.capacity - self.cached_tail;
        if grew > room {
            return Err(self.ring.corrupt(self.head, tail));
        }
        self.cached_tail = tail;
        Ok(())
    }

    /// Slots available to read (refreshing the producer's index only if none are cached).
    pub fn available(&mut self) -> Result<usize, RingError> {
        if self.cached_tail == self.read_pos {
            self.refresh_tail()?;
        }
        Ok((self.cached_tail - self.read_pos) as usize)
    }

    /// True if a slot is ready, refreshing the producer's index (for doorbell checks).
    pub fn has_data(&mut self) -> bool {
        matches!(self.available(), Ok(n) if n > 0)
    }

    /// Copies up to `out.len()` slots without releasing them; returns how many.
    pub fn read(&mut self, out: &mut [T]) -> Result<usize, RingError> {
        if ((self.cached_tail - self.read_pos) as usize) < out.len() {
            self.refresh_tail()?;
        }
        let n = ((self.cached_tail - self.read_pos) as usize).min(out.len());
        for (i, o) in out[..n].iter_mut().enumerate() {
            *o = self.ring.read_slot(self.read_pos + i as u64);
        }
        self.read_pos += n as u64;
        Ok(n)
    }

    /// Slots read but not yet committed.
    pub fn pending(&self) -> usize {
        (self.read_pos - self.head) as usize
    }

    /// Releases the `n` oldest read slots to the producer.
    pub fn commit(&mut self, n: usize) -> Result<(), RingError> {
        if n > self.pending() {
            return Err(RingError::OverCommit {
                n,
                pending: self.pending(),
            });
        }
        if n > 0 {
            self.head += n as u64;
            // Sync point: Release orders our reads of the slots before the producer may
            // overwrite them (it Acquire-loads head).
            self.ring.idx(HEAD).store(self.head, Ordering::Release);
        }
        Ok(())
    }

    /// Forgets uncommitted reads: the next `read` returns them again.
    pub fn rewind(&mut self) {
        self.read_pos = self.head;
    }

    /// Pops up to `out.len()` slots and commits them at once.
    pub fn pop_batch(&mut self, out: &mut [T]) -> Result<usize, RingError> {
        self.rewind();
        let n = self.read(out)?;
        self.commit(n)?;
        Ok(n)
    }

    /// Pops one slot.
    pub fn pop(&mut self) -> Result<Option<T>, RingError> {
        self.rewind();
        if self.available()? == 0 {
            return Ok(None);
        }
        let v = self.ring.read_slot(self.read_pos);
        self.read_pos += 1;
        self.commit(1)?;
        Ok(Some(v))
    }
}

impl<T: Pod> Drop for Consumer<T> {
    fn drop(&mut self) {
        let me = std::process::id();
        let _ = self.ring.meta().consumer_pid.compare_exchange(
            me,
            0,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::process_alive;

    #[test]
    fn a_zombie_holds_nothing() {
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        // Exited but not reaped: a zombie until the wait below.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(child.id()) {
            assert!(
                std::time::Instant::now() < end,
                "an exited child still counts as alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(child.wait().expect("wait").success());
    }
}
