//! Buffer pools: fixed-size buffers with headroom in a region, and an ownership table.
//!
//! A buffer is named on a ring by a [`Descriptor`] (pool, index, offset, length). Every
//! consumer validates every descriptor ([`BufferPool::check`]); a bad one is counted in the
//! pool's shared drop counters and refused (DESIGN rule 5).
//!
//! ## Ownership and crash reclamation
//!
//! Each buffer's entry in the ownership table names the endpoint that holds it. The protocol:
//!
//! * a sender keeps itself as owner while the descriptor sits on a ring;
//! * a receiver sets itself as owner ([`BufferPool::take`]) *before* it commits the ring slot;
//! * a restarted endpoint first scans the rings it sends on and receives from for descriptors
//!   in flight, then collects the buffers the table says it owns that are not in flight
//!   ([`BufferPool::recover`]). Those are exactly the buffers it held privately.
//! * a receiver killed after taking a buffer but before committing its slot reads that slot
//!   again after restart and finds itself already the owner. That is legitimate only for
//!   buffers that sat in its incoming rings at recovery ([`Retakes`]); anywhere else a
//!   descriptor naming a buffer the receiver already holds is a peer's bug and is refused.
//!
//! Each table entry also holds a lease counter, bumped at every hand-over and copied into
//! the descriptors the holder makes: a descriptor pushed by a peer that did not hold the
//! buffer, or replayed after the buffer moved on, carries an old lease and is refused.
//!
//! Scanning the rings before reading the table matters: a receiver that takes a buffer after
//! our scan must have set its ownership before committing the slot, so our later table read
//! already sees the new owner.
//!
//! Buffers go from a pool's home endpoint to its clients and back over SPSC rings
//! ([`FreeList::grant`] and [`FreeList::collect`]), so every path stays single-producer.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::pod::Pod;
use crate::region::{Region, RegionError};
use crate::ring::{Consumer, Producer, RingError};

const POOL_MAGIC: u64 = u64::from_le_bytes(*b"KNPOOL01");

/// An endpoint (a server or an app) as named in an ownership table. 0 means nobody.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl EndpointId {
    /// No owner.
    pub const NONE: EndpointId = EndpointId(0);
}

/// Names a span of bytes in a pool buffer. Plain data, sent on rings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Which pool.
    pub pool: u16,
    /// The buffer's lease when the descriptor was made (low 16 bits of the lease counter in
    /// the ownership table, bumped at every hand-over): a stale or forged descriptor for a
    /// buffer that has changed hands since does not match and is refused.
    pub lease: u16,
    /// Buffer index in the pool.
    pub index: u32,
    /// Offset of the first byte in the buffer (headroom lies before the payload).
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

// SAFETY: repr(C), four integer fields with no padding, valid for any bit pattern, no pointers.
unsafe impl Pod for Descriptor {}

/// A descriptor that passed validation against a pool: its span lies inside one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufRef {
    index: u32,
    offset: u32,
    len: u32,
}

impl BufRef {
    /// Buffer index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// Offset within the buffer.
    pub fn offset(&self) -> u32 {
        self.offset
    }
    /// Length.
    pub fn len(&self) -> u32 {
        self.len
    }
    /// True when the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why a descriptor was refused. Each is counted in the pool's shared drop counters.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum DescError {
    #[error("descriptor names pool {found}, this is pool {expected}")]
    WrongPool { found: u16, expected: u16 },
    #[error("buffer index {index} out of range (pool has {count} buffers)")]
    BadIndex { index: u32, count: u32 },
    #[error("span offset {offset} + length {len} exceeds the {size}-byte buffer")]
    BadRange { offset: u32, len: u32, size: u32 },
    #[error("buffer {index} is not held by the endpoint that handed it over (owner {owner}, lease {lease}, descriptor lease {found})")]
    BadOwner {
        index: u32,
        owner: u32,
        lease: u16,
        found: u16,
    },
}

/// Why a pool could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("no initialised pool at this offset (magic {0:#018x})")]
    BadMagic(u64),
    #[error("pool id is {found}, expected {expected}")]
    WrongId { found: u16, expected: u16 },
    #[error("invalid pool geometry: {count} buffers of {buf_size} bytes with {headroom} headroom")]
    BadGeometry {
        count: u32,
        buf_size: u32,
        headroom: u32,
    },
}

#[repr(C, align(128))]
struct PoolMeta {
    magic: AtomicU64,
    pool_id: AtomicU32,
    count: AtomicU32,
    buf_size: AtomicU32,
    headroom: AtomicU32,
    drop_wrong_pool: AtomicU64,
    drop_bad_index: AtomicU64,
    drop_bad_range: AtomicU64,
    drop_bad_owner: AtomicU64,
}

const META: usize = 128;

/// Drop counters of a pool, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolDrops {
    pub wrong_pool: u64,
    pub bad_index: u64,
    pub bad_range: u64,
    pub bad_owner: u64,
}

impl PoolDrops {
    /// All drops together.
    pub fn total(&self) -> u64 {
        self.wrong_pool + self.bad_index + self.bad_range + self.bad_owner
    }
}

/// A pool of `count` buffers of `buf_size` bytes in a region. The geometry is read once when
/// the handle is made and kept privately, so a peer rewriting the header cannot widen it.
#[derive(Clone, Debug)]
pub struct BufferPool {
    /// Keeps the mapping behind `base` alive.
    _mapping: Region,
    /// The pool's first byte in the mapping, checked (in bounds for the whole pool, 4096-
    /// aligned) when the handle was made.
    base: *mut u8,
    id: u16,
    count: u32,
    buf_size: u32,
    headroom: u32,
}

fn owners_off(base: usize) -> usize {
    base + META
}

fn data_off(base: usize, count: u32) -> usize {
    (owners_off(base) + 8 * count as usize + 4095) & !4095
}

impl BufferPool {
    /// Bytes a pool needs in a region when placed at a 4096-aligned offset.
    pub const fn size_in_region(count: u32, buf_size: u32) -> usize {
        let owners = (META + 8 * count as usize + 4095) & !4095;
        owners + count as usize * buf_size as usize
    }
    /// Alignment a pool needs in a region.
    pub const ALIGN: usize = 4096;

    fn geometry_ok(count: u32, buf_size: u32, headroom: u32) -> bool {
        count > 0 && buf_size > 0 && buf_size % 64 == 0 && headroom < buf_size
    }

    /// Initialises a pool at `offset`; every buffer starts owned by `home`.
    pub fn init(
        region: &Region,
        offset: usize,
        id: u16,
        count: u32,
        buf_size: u32,
        headroom: u32,
        home: EndpointId,
    ) -> Result<BufferPool, PoolError> {
        if !Self::geometry_ok(count, buf_size, headroom) {
            return Err(PoolError::BadGeometry {
                count,
                buf_size,
                headroom,
            });
        }
        let base = region.ptr_at(offset, Self::size_in_region(count, buf_size), Self::ALIGN)?;
        let pool = BufferPool {
            _mapping: region.clone(),
            base,
            id,
            count,
            buf_size,
            headroom,
        };
        let m = pool.meta();
        m.pool_id.store(u32::from(id), Ordering::Relaxed);
        m.count.store(count, Ordering::Relaxed);
        m.buf_size.store(buf_size, Ordering::Relaxed);
        m.headroom.store(headroom, Ordering::Relaxed);
        for i in 0..count {
            pool.owner_cell(i)
                .store(u64::from(home.0), Ordering::Relaxed);
        }
        m.magic.store(POOL_MAGIC, Ordering::Release);
        Ok(pool)
    }

    /// Opens a pool initialised elsewhere.
    pub fn open(region: &Region, offset: usize, id: u16) -> Result<BufferPool, PoolError> {
        let base = region.ptr_at(offset, 2 * META, Self::ALIGN)?;
        let probe = BufferPool {
            _mapping: region.clone(),
            base,
            id,
            count: 0,
            buf_size: 0,
            headroom: 0,
        };
        let m = probe.meta();
        let magic = m.magic.load(Ordering::Acquire);
        if magic != POOL_MAGIC {
            return Err(PoolError::BadMagic(magic));
        }
        let found = m.pool_id.load(Ordering::Relaxed);
        if found != u32::from(id) {
            return Err(PoolError::WrongId {
                found: found as u16,
                expected: id,
            });
        }
        let (count, buf_size, headroom) = (
            m.count.load(Ordering::Relaxed),
            m.buf_size.load(Ordering::Relaxed),
            m.headroom.load(Ordering::Relaxed),
        );
        if !Self::geometry_ok(count, buf_size, headroom) {
            return Err(PoolError::BadGeometry {
                count,
                buf_size,
                headroom,
            });
        }
        region.ptr_at(offset, Self::size_in_region(count, buf_size), Self::ALIGN)?;
        Ok(BufferPool {
            count,
            buf_size,
            headroom,
            ..probe
        })
    }

    #[inline]
    fn base(&self) -> *mut u8 {
        self.base
    }

    fn meta(&self) -> &PoolMeta {
        // SAFETY: the pool's first 256 bytes were checked to be in the region and 4096-aligned
        // when the handle was made; PoolMeta is all atomics, valid for any bits, and lives as
        // long as self._mapping.
        unsafe { &*self.base().cast::<PoolMeta>() }
    }

    /// The ownership entry of a buffer: owner in the low 32 bits, lease counter in the high.
    fn owner_cell(&self, index: u32) -> &AtomicU64 {
        debug_assert!(index < self.count);
        // SAFETY: index < count (callers check), so the cell lies in the owner table, which
        // was bounds-checked with the whole pool; 8-aligned (table at base+128); an atomic is
        // valid for any bits.
        unsafe {
            &*self
                .base()
                .add(owners_off(0) + 8 * index as usize)
                .cast::<AtomicU64>()
        }
    }

    fn entry(&self, index: u32) -> (u32, u32) {
        let e = self.owner_cell(index).load(Ordering::Acquire);
        (e as u32, (e >> 32) as u32)
    }

    fn buf_ptr(&self, index: u32) -> *mut u8 {
        debug_assert!(index < self.count);
        // SAFETY: index < count, so the buffer lies inside the pool's checked range.
        unsafe {
            self.base()
                .add(data_off(0, self.count) + index as usize * self.buf_size as usize)
        }
    }

    /// This pool's id.
    pub fn id(&self) -> u16 {
        self.id
    }
    /// Number of buffers.
    pub fn count(&self) -> u32 {
        self.count
    }
    /// Bytes per buffer, headroom included.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }
    /// Bytes reserved at the front of each buffer for headers written in place.
    pub fn headroom(&self) -> u32 {
        self.headroom
    }

    /// Validates a descriptor received from a peer; a bad one is counted and refused.
    pub fn check(&self, d: &Descriptor) -> Result<BufRef, DescError> {
        let m = self.meta();
        if d.pool != self.id {
            m.drop_wrong_pool.fetch_add(1, Ordering::Relaxed);
            return Err(DescError::WrongPool {
                found: d.pool,
                expected: self.id,
            });
        }
        if d.index >= self.count {
            m.drop_bad_index.fetch_add(1, Ordering::Relaxed);
            return Err(DescError::BadIndex {
                index: d.index,
                count: self.count,
            });
        }
        let fits = d
            .offset
            .checked_add(d.len)
            .is_some_and(|end| end <= self.buf_size);
        if !fits {
            m.drop_bad_range.fetch_add(1, Ordering::Relaxed);
            return Err(DescError::BadRange {
                offset: d.offset,
                len: d.len,
                size: self.buf_size,
            });
        }
        Ok(BufRef {
            index: d.index,
            offset: d.offset,
            len: d.len,
        })
    }

    /// Receives a buffer: validates the descriptor and checks it came from `from` (the
    /// sender keeps ownership while the descriptor is on the ring), then records `me` as owner.
    /// Call it before committing the ring slot that carried the descriptor. A buffer `me`
    /// already owns is accepted only once per entry in `retakes` (see [`BufferPool::recover`]).
    pub fn take(
        &self,
        d: &Descriptor,
        from: EndpointId,
        me: EndpointId,
        retakes: &mut Retakes,
    ) -> Result<BufRef, DescError> {
        let r = self.check(d)?;
        let (owner, lease) = self.entry(r.index);
        let handed_over = owner == from.0 && d.lease == lease as u16;
        // A re-take: our predecessor took it (bumping the lease) but never committed the slot.
        let retaken =
            owner == me.0 && d.lease == lease.wrapping_sub(1) as u16 && retakes.0.remove(&r.index);
        if handed_over {
            let next = (u64::from(lease.wrapping_add(1)) << 32) | u64::from(me.0);
            self.owner_cell(r.index).store(next, Ordering::Release);
        } else if !retaken {
            self.meta().drop_bad_owner.fetch_add(1, Ordering::Relaxed);
            return Err(DescError::BadOwner {
                index: r.index,
                owner,
                lease: lease as u16,
                found: d.lease,
            });
        }
        Ok(r)
    }

    /// Who holds buffer `index` (None if out of range).
    pub fn owner(&self, index: u32) -> Option<EndpointId> {
        (index < self.count).then(|| EndpointId(self.entry(index).0))
    }

    /// A descriptor for `len` bytes of buffer `index` starting after the headroom, carrying
    /// the buffer's current lease. Only the buffer's holder should make one.
    pub fn descriptor(&self, index: u32, len: u32) -> Descriptor {
        self.span(index, self.headroom, len.min(self.buf_size - self.headroom))
    }

    /// A descriptor for `len` bytes at `offset` of buffer `index` (not validated: consumers
    /// validate), carrying the buffer's current lease.
    pub fn span(&self, index: u32, offset: u32, len: u32) -> Descriptor {
        let lease = if index < self.count {
            self.entry(index).1 as u16
        } else {
            0
        };
        Descriptor {
            pool: self.id,
            lease,
            index,
            offset,
            len,
        }
    }

    /// Copies `data` into buffer `index` at `offset`. The caller must hold the buffer.
    pub fn write(&self, index: u32, offset: u32, data: &[u8]) -> Result<(), DescError> {
        let r = self.check(&Descriptor {
            pool: self.id,
            lease: 0,
            index,
            offset,
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
        })?;
        // SAFETY: the span was validated to lie inside buffer `index`; a volatile-free byte
        // copy from a private slice into shared memory forms no reference to the shared bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.buf_ptr(r.index).add(r.offset as usize),
                data.len(),
            );
        }
        Ok(())
    }

    /// Copies the bytes a validated span names into `out` (up to `out.len()`); returns how many.
    pub fn read(&self, r: &BufRef, out: &mut [u8]) -> usize {
        let n = (r.len as usize).min(out.len());
        // SAFETY: `r` came from `check` on this pool, so the span is inside the buffer; we copy
        // out into a private slice without forming a reference to shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buf_ptr(r.index).add(r.offset as usize),
                out.as_mut_ptr(),
                n,
            );
        }
        n
    }

    /// Borrows the bytes of a validated span in place (zero copy).
    ///
    /// # Safety
    /// The caller must hold the buffer per the ownership table, and no other process may write
    /// it while the borrow lives (the ownership protocol guarantees this for correct peers).
    pub unsafe fn bytes(&self, r: &BufRef) -> &[u8] {
        // SAFETY: span validated by `check`; exclusivity is the caller's contract.
        unsafe {
            std::slice::from_raw_parts(self.buf_ptr(r.index).add(r.offset as usize), r.len as usize)
        }
    }

    /// Mutably borrows the bytes of a validated span in place (zero copy).
    ///
    /// # Safety
    /// As for [`BufferPool::bytes`], and no other borrow of the same buffer may exist.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, r: &BufRef) -> &mut [u8] {
        // SAFETY: span validated by `check`; exclusivity is the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buf_ptr(r.index).add(r.offset as usize),
                r.len as usize,
            )
        }
    }

    /// Buffers the table says `me` holds that are not in `in_flight` (descriptors scanned from
    /// every ring `me` sends on or receives from, scanned *before* this call).
    pub fn reclaim(&self, me: EndpointId, in_flight: &[Descriptor]) -> Vec<u32> {
        let busy: HashSet<u32> = in_flight
            .iter()
            .filter(|d| d.pool == self.id)
            .map(|d| d.index)
            .collect();
        (0..self.count)
            .filter(|&i| self.entry(i).0 == me.0 && !busy.contains(&i))
            .collect()
    }

    /// What a fresh instance of `me` recovers after a crash, given the descriptors in flight on
    /// the rings it sends on (`outgoing`) and receives from (`incoming`), both scanned with
    /// [`crate::Ring::in_flight`] *before* this call:
    /// * the buffers its predecessor held privately (owned by `me`, on no ring);
    /// * the buffers its predecessor had taken from an incoming slot it never committed: the
    ///   fresh instance will read those slots again, and may take each such buffer once more.
    pub fn recover(
        &self,
        me: EndpointId,
        outgoing: &[Descriptor],
        incoming: &[Descriptor],
    ) -> (Vec<u32>, Retakes) {
        // Leases tell the cases apart exactly: a descriptor we sent that is still in flight
        // carries the current lease; one we had taken carries the lease before our take.
        let mine = |d: &Descriptor, lag: u32| {
            d.pool == self.id && d.index < self.count && {
                let (owner, lease) = self.entry(d.index);
                owner == me.0 && d.lease == lease.wrapping_sub(lag) as u16
            }
        };
        let sent: HashSet<u32> = outgoing
            .iter()
            .filter(|d| mine(d, 0))
            .map(|d| d.index)
            .collect();
        let retakes: HashSet<u32> = incoming
            .iter()
            .filter(|d| mine(d, 1) && !sent.contains(&d.index))
            .map(|d| d.index)
            .collect();
        let held = (0..self.count)
            .filter(|i| self.entry(*i).0 == me.0 && !sent.contains(i) && !retakes.contains(i))
            .collect();
        (held, Retakes(retakes))
    }

    /// How many buffers each endpoint holds.
    pub fn accounting(&self) -> BTreeMap<EndpointId, u32> {
        let mut m = BTreeMap::new();
        for i in 0..self.count {
            *m.entry(EndpointId(self.entry(i).0)).or_insert(0) += 1;
        }
        m
    }

    /// Drop counters by reason.
    pub fn drops(&self) -> PoolDrops {
        let m = self.meta();
        PoolDrops {
            wrong_pool: m.drop_wrong_pool.load(Ordering::Relaxed),
            bad_index: m.drop_bad_index.load(Ordering::Relaxed),
            bad_range: m.drop_bad_range.load(Ordering::Relaxed),
            bad_owner: m.drop_bad_owner.load(Ordering::Relaxed),
        }
    }
}

// SAFETY: `base` points into the mapping that `_mapping` (an Arc) keeps alive as long as the
// handle; shared state reached through it is atomics, and buffer bytes are touched only
// through copies or the `unsafe` borrows whose contracts rest on the ownership table. The
// handle may therefore move to and be shared with any thread, as the Region itself can.
unsafe impl Send for BufferPool {}
// SAFETY: as above.
unsafe impl Sync for BufferPool {}

/// Buffers a restarted receiver may take although it already owns them: those it had taken
/// from an incoming slot that its predecessor never committed. Each may be re-taken once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Retakes(HashSet<u32>);

impl Retakes {
    /// No re-takes: a receiver that has not crashed.
    pub fn none() -> Retakes {
        Retakes::default()
    }
    /// Re-takes still allowed.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when none is left.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// True if buffer `index` may still be re-taken.
    pub fn contains(&self, index: u32) -> bool {
        self.0.contains(&index)
    }
}

/// The private free list of a pool's home endpoint (or a client's cache of granted buffers).
/// Rebuilt after a restart from [`BufferPool::reclaim`].
#[derive(Debug, Clone)]
pub struct FreeList {
    me: EndpointId,
    list: Vec<u32>,
    member: Vec<bool>,
    retakes: Retakes,
}

impl FreeList {
    /// An empty list for endpoint `me` of a pool of `pool.count()` buffers.
    pub fn new(pool: &BufferPool, me: EndpointId) -> FreeList {
        FreeList {
            me,
            list: Vec::with_capacity(pool.count() as usize),
            member: vec![false; pool.count() as usize],
            retakes: Retakes::none(),
        }
    }

    /// The list a restarted endpoint starts with: every buffer it holds that is on no ring,
    /// and the right to re-take what it had taken from `incoming` without committing
    /// (see [`BufferPool::recover`]).
    pub fn recover(
        pool: &BufferPool,
        me: EndpointId,
        outgoing: &[Descriptor],
        incoming: &[Descriptor],
    ) -> FreeList {
        let mut f = FreeList::new(pool, me);
        let (held, retakes) = pool.recover(me, outgoing, incoming);
        for i in held {
            f.put(i);
        }
        f.retakes = retakes;
        f
    }

    /// Adds a buffer this endpoint holds. Returns false (and adds nothing) if it is already
    /// listed or out of range: a double return.
    pub fn put(&mut self, index: u32) -> bool {
        match self.member.get_mut(index as usize) {
            Some(m) if !*m => {
                *m = true;
                self.list.push(index);
                true
            }
            _ => false,
        }
    }

    /// Takes a buffer off the list.
    pub fn get(&mut self) -> Option<u32> {
        let i = self.list.pop()?;
        self.member[i as usize] = false;
        Some(i)
    }

    /// Buffers on the list.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when no buffer is listed.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The owner this list belongs to.
    pub fn endpoint(&self) -> EndpointId {
        self.me
    }

    /// The re-takes this list still allows (see [`FreeList::recover`]), for an endpoint that
    /// also receives this pool's buffers on rings other than the one it collects from (the
    /// driver takes RX_POOL buffers from `tx` as well as from `rx_return`): pass it to
    /// [`BufferPool::take`] there, so each re-take is honoured once, whichever ring it is on.
    pub fn retakes_mut(&mut self) -> &mut Retakes {
        &mut self.retakes
    }

    /// Home side: sends up to `n` free buffers to a client over its grant ring. They stay
    /// ours in the table until the client takes them.
    pub fn grant(
        &mut self,
        pool: &BufferPool,
        ring: &mut Producer<Descriptor>,
        n: usize,
    ) -> Result<usize, RingError> {
        let mut batch = Vec::with_capacity(n.min(self.len()));
        while batch.len() < n {
            match self.get() {
                Some(i) => batch.push(pool.descriptor(i, 0)),
                None => break,
            }
        }
        let pushed = ring.push_slice(&batch)?;
        for d in &batch[pushed..] {
            self.put(d.index);
        }
        Ok(pushed)
    }

    /// Receives up to `max` buffers from `from` over `ring` (a grant ring on a client, a return
    /// ring on the home), taking ownership of each before committing. Bad descriptors and
    /// double returns are counted and dropped. Returns how many buffers were added.
    pub fn collect(
        &mut self,
        pool: &BufferPool,
        ring: &mut Consumer<Descriptor>,
        from: EndpointId,
        max: usize,
    ) -> Result<usize, RingError> {
        let mut buf = [Descriptor::default(); 64];
        let mut added = 0;
        while added < max {
            ring.rewind();
            let want = (max - added).min(buf.len());
            let n = ring.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            let mut took = Vec::with_capacity(n);
            for d in &buf[..n] {
                if let Ok(r) = pool.take(d, from, self.me, &mut self.retakes) {
                    took.push(r.index());
                }
            }
            ring.commit(n)?;
            for i in took {
                if self.put(i) {
                    added += 1;
                } else {
                    pool.meta().drop_bad_owner.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(added)
    }
}
