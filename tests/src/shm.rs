//! What the ipc suites and the `ipc-peer` binary agree on: slot types, payload patterns,
//! region layouts and the control block of shared counters every test region starts with.
//!
//! Both sides compute every offset from the same [`RegionLayout`] sequence, so a test only has
//! to hand the peer the region fd and the few numbers (stream length) the layout depends on.

use std::sync::atomic::{AtomicU64, Ordering};

use keepnet_ipc::{
    BufferPool, Descriptor, Doorbell, EndpointId, Pod, PoolError, Region, RegionError,
    RegionLayout, Ring, RingError,
};

/// Environment variable carrying the inherited region fds (comma-separated numbers).
pub const ENV_FDS: &str = "KEEPNET_TEST_REGION_FDS";
/// Environment variable carrying the test process's pid (a peer exits if its parent is gone).
pub const ENV_PARENT: &str = "KEEPNET_TEST_PARENT_PID";
/// Environment variable carrying the peer's own deadline in seconds (SIGALRM ends it).
pub const ENV_TIMEOUT: &str = "KEEPNET_TEST_PEER_TIMEOUT_S";

/// Peer exit code: a check failed (order, payload, accounting, unexpected error).
pub const EXIT_FAIL: i32 = 2;
/// Peer exit code: a doorbell wait timed out (a lost wake-up).
pub const EXIT_LOST_WAKEUP: i32 = 3;
/// Peer exit code: bad command line.
pub const EXIT_USAGE: i32 = 64;

/// The endpoint that owns the pool (home) and produces the stream in the pool tests.
pub const PRODUCER_EP: EndpointId = EndpointId(1);
/// The endpoint that consumes the stream and returns buffers in the pool tests.
pub const CONSUMER_EP: EndpointId = EndpointId(2);

/// A 64-bit mixer (splitmix64's finaliser): cheap, and every input bit affects every output bit.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-byte sequence-numbered slot for the plain stream test.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamSlot {
    pub seq: u64,
    pub payload: [u64; 6],
    pub check: u64,
}

const _: () = assert!(std::mem::size_of::<StreamSlot>() == 64);

#[allow(unsafe_code)]
// SAFETY: repr(C), eight u64 words with no padding, valid for any bit pattern, no pointers,
// Copy and without interior mutability.
unsafe impl Pod for StreamSlot {}

impl StreamSlot {
    /// The slot the producer sends as number `seq`.
    pub fn new(seq: u64) -> StreamSlot {
        let mut payload = [0u64; 6];
        for (k, w) in payload.iter_mut().enumerate() {
            *w = mix(seq.wrapping_mul(8).wrapping_add(k as u64));
        }
        let check = payload.iter().fold(mix(seq ^ 0x5eed), |a, w| mix(a ^ w));
        StreamSlot {
            seq,
            payload,
            check,
        }
    }

    /// Checks that this is exactly slot `expected`.
    pub fn verify(&self, expected: u64) -> Result<(), String> {
        if self.seq != expected {
            return Err(format!(
                "slot out of order: got seq {}, expected {expected}",
                self.seq
            ));
        }
        if *self != StreamSlot::new(expected) {
            return Err(format!("slot {expected} corrupted: {self:?}"));
        }
        Ok(())
    }
}

/// A ring slot naming a pool buffer that carries stream element `seq`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufSlot {
    pub seq: u64,
    pub desc: Descriptor,
    pub check: u64,
}

const _: () = assert!(std::mem::size_of::<BufSlot>() == 32);

#[allow(unsafe_code)]
// SAFETY: repr(C): a u64, a Descriptor (itself Pod: 16 bytes of integers), a u64 — 32 bytes
// with no padding, valid for any bit pattern, no pointers, Copy, no interior mutability.
unsafe impl Pod for BufSlot {}

fn desc_bits(d: &Descriptor) -> u64 {
    (u64::from(d.pool) << 48)
        ^ (u64::from(d.lease) << 32)
        ^ u64::from(d.index)
        ^ (u64::from(d.offset) << 20)
        ^ (u64::from(d.len) << 40)
}

impl BufSlot {
    /// The slot for element `seq` carried in the buffer `desc` names.
    pub fn new(seq: u64, desc: Descriptor) -> BufSlot {
        BufSlot {
            seq,
            desc,
            check: mix(seq ^ mix(desc_bits(&desc))),
        }
    }

    /// Checks the slot's sequence number and integrity.
    pub fn verify(&self, expected: u64) -> Result<(), String> {
        if self.seq != expected {
            return Err(format!(
                "slot out of order: got seq {}, expected {expected}",
                self.seq
            ));
        }
        if self.check != mix(self.seq ^ mix(desc_bits(&self.desc))) {
            return Err(format!("slot {expected} corrupted: {self:?}"));
        }
        Ok(())
    }
}

/// Payload length of element `seq` in a pool buffer (16..=415 bytes).
pub fn payload_len(seq: u64) -> usize {
    16 + (mix(seq) % 400) as usize
}

/// Writes element `seq`'s payload (its number, then a pattern derived from it) into `out`;
/// returns its length.
pub fn fill_payload(seq: u64, out: &mut [u8]) -> usize {
    let len = payload_len(seq);
    out[..8].copy_from_slice(&seq.to_le_bytes());
    let salt = mix(seq);
    for (k, b) in out[8..len].iter_mut().enumerate() {
        *b = (salt.rotate_left(k as u32 % 64) as u8) ^ (k as u8);
    }
    len
}

/// Checks that `bytes` is exactly element `seq`'s payload.
pub fn check_payload(seq: u64, bytes: &[u8]) -> Result<(), String> {
    let mut want = [0u8; 512];
    let len = fill_payload(seq, &mut want);
    if bytes.len() != len {
        return Err(format!(
            "payload of {seq}: length {} instead of {len}",
            bytes.len()
        ));
    }
    if bytes != &want[..len] {
        let found = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
        return Err(format!(
            "payload of {seq} corrupted (its first word says {found})"
        ));
    }
    Ok(())
}

/// Number of counters in a control block.
pub const CTL_WORDS: usize = 32;
/// Bytes a control block takes.
pub const CTL_SIZE: usize = CTL_WORDS * 8;

/// Indices of the counters in a [`Ctl`] block.
pub mod ctl {
    /// Checks that failed, in any peer.
    pub const ERRORS: usize = 0;
    /// 1 + the first sequence number a check failed on (0: none).
    pub const FIRST_BAD: usize = 1;
    /// Elements the consumer accepted.
    pub const CONSUMED: usize = 2;
    /// Doorbell waits that ended by timeout (informational in the stream tests).
    pub const TIMEOUTS: usize = 3;
    /// Producer instances started (reached `main`'s role code).
    pub const STARTS_P: usize = 4;
    /// Consumer instances started.
    pub const STARTS_C: usize = 5;
    /// Producer instances that claimed their rings by takeover.
    pub const TAKEOVERS_P: usize = 6;
    /// Consumer instances that claimed their rings by takeover.
    pub const TAKEOVERS_C: usize = 7;
    /// The producer may not send elements at or beyond this number (the test raises it).
    pub const GATE: usize = 8;
    /// The finished producer's free-list length.
    pub const FINAL_FREE: usize = 9;
    /// Buffers restarted consumers found they held privately and returned.
    pub const RECLAIMED_C: usize = 10;
    /// Buffers restarted producers recovered onto their free list (not counting a fresh start).
    pub const RECOVERED_P: usize = 11;
    /// Slots a restarted consumer read again because its predecessor had not committed them.
    pub const REPLAYED_C: usize = 12;
    /// Ping counter (doorbell test).
    pub const PING: usize = 13;
    /// Pong counter (doorbell test).
    pub const PONG: usize = 14;
    /// Generic status word a peer sets when it has finished a step.
    pub const STEP: usize = 15;
    /// The pool producer's free-list length whenever it waits (diagnostics).
    pub const FREE_NOW: usize = 16;
}

/// The control block of counters at a fixed offset of a test region.
#[derive(Clone, Debug)]
pub struct Ctl {
    region: Region,
    off: usize,
}

impl Ctl {
    /// Attaches to the block at `off`.
    pub fn at(region: &Region, off: usize) -> Result<Ctl, RegionError> {
        region.ptr_at(off, CTL_SIZE, 64)?;
        Ok(Ctl {
            region: region.clone(),
            off,
        })
    }

    /// Counter `i` (one of [`ctl`]'s indices).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < CTL_WORDS, "control word {i} out of range");
        match self.region.atomic_u64(self.off + 8 * i) {
            Ok(a) => a,
            Err(e) => unreachable!("control block validated at attach: {e}"),
        }
    }

    /// Loads counter `i`.
    pub fn get(&self, i: usize) -> u64 {
        self.word(i).load(Ordering::Acquire)
    }

    /// Records a failed check on element `seq`.
    pub fn fail(&self, seq: u64) {
        self.word(ctl::ERRORS).fetch_add(1, Ordering::AcqRel);
        let _ = self.word(ctl::FIRST_BAD).compare_exchange(
            0,
            seq.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

/// Ring tag of the plain stream ring.
pub const STREAM_TAG: u32 = 0x5712_0001;
/// Slots in the plain stream ring.
pub const STREAM_CAP: usize = 1024;

/// Region layout of the plain stream test: a ring of [`StreamSlot`] and a doorbell per side.
#[derive(Clone, Copy, Debug)]
pub struct StreamLayout {
    pub ctl: usize,
    pub ring: usize,
    /// The consumer waits here; the producer rings it.
    pub cons_bell: usize,
    /// The producer waits here (ring full); the consumer rings it.
    pub prod_bell: usize,
    pub size: usize,
}

impl StreamLayout {
    pub fn new() -> StreamLayout {
        let mut l = RegionLayout::new();
        let ctl = l.place(CTL_SIZE, 128);
        let ring = l.place(
            Ring::<StreamSlot>::size_in_region(STREAM_CAP),
            Ring::<StreamSlot>::ALIGN,
        );
        let cons_bell = l.place(Doorbell::SIZE, 128);
        let prod_bell = l.place(Doorbell::SIZE, 128);
        StreamLayout {
            ctl,
            ring,
            cons_bell,
            prod_bell,
            size: l.size(),
        }
    }

    /// Creator side: initialises the ring and the doorbells.
    pub fn init(&self, region: &Region) -> Result<(), RingError> {
        Ring::<StreamSlot>::init(region, self.ring, STREAM_CAP, STREAM_TAG)?;
        Doorbell::init(region, self.cons_bell)?;
        Doorbell::init(region, self.prod_bell)?;
        Ok(())
    }
}

impl Default for StreamLayout {
    fn default() -> Self {
        Self::new()
    }
}

/// Ring tag of the data ring (producer → consumer) in the pool tests.
pub const DATA_TAG: u32 = 0xDA7A_0001;
/// Ring tag of the return ring (consumer → producer) in the pool tests.
pub const RET_TAG: u32 = 0x4E7E_0001;
/// Slots in the data ring.
pub const DATA_CAP: usize = 128;
/// Slots in the return ring: at least the pool's count, so returns never find it full.
pub const RET_CAP: usize = 256;
/// Pool id in the pool tests.
pub const POOL_ID: u16 = 7;
/// Buffers in the pool.
pub const POOL_COUNT: u32 = 192;
/// Bytes per buffer.
pub const BUF_SIZE: u32 = 512;
/// Headroom per buffer.
pub const HEADROOM: u32 = 64;

const _: () = assert!(RET_CAP as u32 >= POOL_COUNT);
const _: () = assert!(BUF_SIZE - HEADROOM >= 416);

/// Region layout of the crash tests: data ring of [`BufSlot`], return ring of descriptors,
/// a doorbell per side, the pool, and the sink the consumer writes results to.
#[derive(Clone, Copy, Debug)]
pub struct PoolStreamLayout {
    pub ctl: usize,
    pub data: usize,
    pub ret: usize,
    /// The consumer waits here; the producer rings it after each push.
    pub cons_bell: usize,
    /// The producer waits here; the consumer rings it after each return (and the test, when it
    /// raises the gate).
    pub prod_bell: usize,
    pub pool: usize,
    /// `n` u64s: `sink[i]` = the sequence number the consumer accepted as element `i`.
    pub sink: usize,
    /// Length of the stream.
    pub n: u64,
    pub size: usize,
}

impl PoolStreamLayout {
    pub fn new(n: u64) -> PoolStreamLayout {
        let mut l = RegionLayout::new();
        let ctl = l.place(CTL_SIZE, 128);
        let data = l.place(
            Ring::<BufSlot>::size_in_region(DATA_CAP),
            Ring::<BufSlot>::ALIGN,
        );
        let ret = l.place(
            Ring::<Descriptor>::size_in_region(RET_CAP),
            Ring::<Descriptor>::ALIGN,
        );
        let cons_bell = l.place(Doorbell::SIZE, 128);
        let prod_bell = l.place(Doorbell::SIZE, 128);
        let pool = l.place(
            BufferPool::size_in_region(POOL_COUNT, BUF_SIZE),
            BufferPool::ALIGN,
        );
        let sink = l.place(8 * n as usize, 4096);
        PoolStreamLayout {
            ctl,
            data,
            ret,
            cons_bell,
            prod_bell,
            pool,
            sink,
            n,
            size: l.size(),
        }
    }

    /// Creator side: rings, doorbells, the pool (all buffers home at the producer), the sink
    /// filled with `u64::MAX` (nothing accepted yet).
    pub fn init(&self, region: &Region) -> Result<(), String> {
        Ring::<BufSlot>::init(region, self.data, DATA_CAP, DATA_TAG).map_err(|e| e.to_string())?;
        Ring::<Descriptor>::init(region, self.ret, RET_CAP, RET_TAG).map_err(|e| e.to_string())?;
        Doorbell::init(region, self.cons_bell).map_err(|e| e.to_string())?;
        Doorbell::init(region, self.prod_bell).map_err(|e| e.to_string())?;
        BufferPool::init(
            region,
            self.pool,
            POOL_ID,
            POOL_COUNT,
            BUF_SIZE,
            HEADROOM,
            PRODUCER_EP,
        )
        .map_err(|e: PoolError| e.to_string())?;
        for i in 0..self.n {
            self.sink(region, i)
                .map_err(|e| e.to_string())?
                .store(u64::MAX, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Sink cell `i`.
    pub fn sink<'r>(&self, region: &'r Region, i: u64) -> Result<&'r AtomicU64, RegionError> {
        if i >= self.n {
            return Err(RegionError::OutOfBounds {
                offset: self.sink,
                len: 8 * i as usize,
                align: 8,
                size: region.len(),
            });
        }
        region.atomic_u64(self.sink + 8 * i as usize)
    }
}

/// Region layout of the doorbell ping-pong: counters in the control block and two doorbells.
#[derive(Clone, Copy, Debug)]
pub struct PingLayout {
    pub ctl: usize,
    /// The pinger waits here for pongs.
    pub bell_a: usize,
    /// The ponger waits here for pings.
    pub bell_b: usize,
    pub size: usize,
}

impl PingLayout {
    pub fn new() -> PingLayout {
        let mut l = RegionLayout::new();
        let ctl = l.place(CTL_SIZE, 128);
        let bell_a = l.place(Doorbell::SIZE, 128);
        let bell_b = l.place(Doorbell::SIZE, 128);
        PingLayout {
            ctl,
            bell_a,
            bell_b,
            size: l.size(),
        }
    }
}

impl Default for PingLayout {
    fn default() -> Self {
        Self::new()
    }
}

/// Ring tag of the small rings in the bad-input tests.
pub const BAD_TAG: u32 = 0xBAD0_0001;
/// Slots in the bad-input rings.
pub const BAD_CAP: usize = 16;
/// Canary word written around the bad-input ring.
pub const CANARY: u64 = 0xC5C5_5C5C_C5C5_5C5C;

/// Region layout of the bad-input tests: a guarded ring of u64, a descriptor ring and a pool.
#[derive(Clone, Copy, Debug)]
pub struct BadLayout {
    pub ctl: usize,
    /// 4096 canary bytes before the ring.
    pub guard_lo: usize,
    pub ring: usize,
    /// 4096 canary bytes after the ring.
    pub guard_hi: usize,
    pub desc_ring: usize,
    pub pool: usize,
    pub size: usize,
}

/// Bytes of each canary guard.
pub const GUARD: usize = 4096;

impl BadLayout {
    pub fn new() -> BadLayout {
        let mut l = RegionLayout::new();
        let ctl = l.place(CTL_SIZE, 128);
        let guard_lo = l.place(GUARD, 128);
        let ring = l.place(Ring::<u64>::size_in_region(BAD_CAP), Ring::<u64>::ALIGN);
        let guard_hi = l.place(GUARD, 128);
        let desc_ring = l.place(
            Ring::<Descriptor>::size_in_region(BAD_CAP),
            Ring::<Descriptor>::ALIGN,
        );
        let pool = l.place(
            BufferPool::size_in_region(BAD_POOL_COUNT, BAD_BUF_SIZE),
            BufferPool::ALIGN,
        );
        BadLayout {
            ctl,
            guard_lo,
            ring,
            guard_hi,
            desc_ring,
            pool,
            size: l.size(),
        }
    }
}

impl Default for BadLayout {
    fn default() -> Self {
        Self::new()
    }
}

/// Pool id in the descriptor bad-input test.
pub const BAD_POOL_ID: u16 = 9;
/// Buffers in that pool.
pub const BAD_POOL_COUNT: u32 = 8;
/// Bytes per buffer in that pool.
pub const BAD_BUF_SIZE: u32 = 256;
/// Headroom in that pool.
pub const BAD_HEADROOM: u32 = 32;
/// The endpoint sending descriptors in the bad-input test (the pool's home).
pub const BAD_SENDER: EndpointId = EndpointId(3);
/// The endpoint receiving them.
pub const BAD_RECEIVER: EndpointId = EndpointId(4);
/// A third endpoint the test hands one buffer to, so that the sender no longer holds it.
pub const BAD_THIRD: EndpointId = EndpointId(5);
/// The buffer the test hands to [`BAD_THIRD`] before the sender names it.
pub const BAD_STOLEN_INDEX: u32 = 5;

/// What the receiver must make of a descriptor in the bad-input test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    Accept,
    WrongPool,
    BadIndex,
    BadRange,
    BadOwner,
}

/// The descriptors the bad-input peer sends, in order, with the verdict each must get from
/// [`keepnet_ipc::BufferPool::take`] (every buffer starts at lease 0, held by [`BAD_SENDER`]).
pub fn bad_descriptor_cases() -> Vec<(Descriptor, Expect)> {
    let d = |pool: u16, lease: u16, index: u32, offset: u32, len: u32| Descriptor {
        pool,
        lease,
        index,
        offset,
        len,
    };
    let p = BAD_POOL_ID;
    let h = BAD_HEADROOM;
    vec![
        (d(p, 0, BAD_POOL_COUNT, h, 10), Expect::BadIndex),
        (d(p, 0, u32::MAX, 0, 0), Expect::BadIndex),
        (d(p, 0, 1, BAD_BUF_SIZE, 1), Expect::BadRange),
        (d(p, 0, 1, 200, BAD_BUF_SIZE - 200 + 1), Expect::BadRange),
        (d(p, 0, 2, u32::MAX, 2), Expect::BadRange),
        (d(p, 0, 2, 0, u32::MAX), Expect::BadRange),
        (d(p + 1, 0, 0, h, 10), Expect::WrongPool),
        (
            d(u16::MAX, 0, u32::MAX, u32::MAX, u32::MAX),
            Expect::WrongPool,
        ),
        // The sender no longer holds this buffer.
        (d(p, 0, BAD_STOLEN_INDEX, h, 10), Expect::BadOwner),
        // A forged lease: the sender holds buffer 1, but not under lease 7.
        (d(p, 7, 1, h, 10), Expect::BadOwner),
        (d(p, 0, 3, h, BAD_BUF_SIZE - h), Expect::Accept),
        (d(p, 0, 0, 0, BAD_BUF_SIZE), Expect::Accept),
        // A replay of an accepted descriptor: the receiver holds it already.
        (d(p, 0, 3, h, BAD_BUF_SIZE - h), Expect::BadOwner),
        (d(p, 0, 4, h, 0), Expect::Accept),
    ]
}
