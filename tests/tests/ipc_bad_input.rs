//! In-process bad-input tests of keepnet-ipc: region headers, ring and pool metadata and
//! doorbells that were scribbled on are refused with the matching typed error, never trusted.
//!
//! Bytes are corrupted by writing through a duplicate of the region's memfd (`pwrite`), which
//! lands in the same pages every mapping shows, the way another process would.
#![deny(unsafe_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;

use keepnet_ipc::region::{HEADER_SIZE, LAYOUT_VERSION, REGION_MAGIC};
use keepnet_ipc::{
    BufferPool, Doorbell, EndpointId, PoolError, Region, RegionError, RegionKind, RegionLayout,
    Ring, RingError,
};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// Writes `bytes` at byte `off` of the region's memfd.
fn poke(r: &Region, off: u64, bytes: &[u8]) {
    let f = File::from(r.fd().try_clone_to_owned().expect("dup"));
    f.write_all_at(bytes, off).expect("pwrite");
}

fn reopen(r: &Region, kind: RegionKind) -> Result<Region, RegionError> {
    Region::open(r.fd().try_clone_to_owned().expect("dup"), kind)
}

fn fresh(size: usize) -> Region {
    Region::create("bad-input", RegionKind::TEST, size).expect("create")
}

#[test]
fn region_header_checks() {
    // Sanity: an intact region opens, with the matching kind only.
    let r = fresh(8192);
    assert!(reopen(&r, RegionKind::TEST).is_ok());
    assert!(matches!(
        reopen(&r, RegionKind::POOL),
        Err(RegionError::BadKind { found, expected }) if found == RegionKind::TEST.0 && expected == RegionKind::POOL.0
    ));

    // Wrong magic (offset 0).
    let r = fresh(8192);
    poke(&r, 0, b"NOTKEEPN");
    match reopen(&r, RegionKind::TEST) {
        Err(RegionError::BadMagic { found, expected }) => {
            assert_eq!(found, u64::from_le_bytes(*b"NOTKEEPN"));
            assert_eq!(expected, REGION_MAGIC);
        }
        other => panic!("wrong magic: {other:?}"),
    }

    // Wrong layout version (offset 8).
    let r = fresh(8192);
    poke(&r, 8, &(LAYOUT_VERSION + 1).to_le_bytes());
    assert!(matches!(
        reopen(&r, RegionKind::TEST),
        Err(RegionError::BadVersion { found, expected }) if found == LAYOUT_VERSION + 1 && expected == LAYOUT_VERSION
    ));

    // Wrong kind field (offset 12).
    let r = fresh(8192);
    poke(&r, 12, &0xdead_u32.to_le_bytes());
    assert!(matches!(
        reopen(&r, RegionKind::TEST),
        Err(RegionError::BadKind { found: 0xdead, .. })
    ));

    // Header size field disagrees with the memfd's real size (offset 16), both ways.
    for claimed in [4096_u64, 8193, u64::MAX, 0] {
        let r = fresh(8192);
        poke(&r, 16, &claimed.to_le_bytes());
        assert!(
            matches!(reopen(&r, RegionKind::TEST), Err(RegionError::BadSize { header, actual: 8192 }) if header == claimed),
            "size field {claimed}"
        );
    }

    // Checks run in a fixed order: magic first.
    let r = fresh(8192);
    poke(&r, 0, &[0u8; 24]);
    assert!(matches!(
        reopen(&r, RegionKind::TEST),
        Err(RegionError::BadMagic { found: 0, .. })
    ));
}

#[test]
fn region_too_small_or_foreign() {
    assert!(matches!(
        Region::create("tiny", RegionKind::TEST, HEADER_SIZE - 1),
        Err(RegionError::TooSmall { .. })
    ));
    // A memfd that is not a keepnet region: too small, then big enough but all zeros.
    let fd = memfd_create(c"not-keepnet", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
    let f = File::from(fd);
    f.set_len(64).expect("truncate");
    assert!(matches!(
        Region::open(f.try_clone().expect("dup").into(), RegionKind::TEST),
        Err(RegionError::TooSmall {
            size: 64,
            min: HEADER_SIZE
        })
    ));
    f.set_len(4096).expect("truncate");
    assert!(matches!(
        Region::open(f.into(), RegionKind::TEST),
        Err(RegionError::BadMagic { found: 0, .. })
    ));
}

#[test]
fn region_offsets_are_checked() {
    let r = fresh(8192);
    // Inside the header, past the end, straddling the end, misaligned, overflowing.
    for (off, len, align) in [
        (0, 8, 8),
        (HEADER_SIZE - 8, 8, 8),
        (8192, 8, 8),
        (8188, 8, 4),
        (HEADER_SIZE + 4, 8, 8),
        (usize::MAX - 4, 8, 1),
    ] {
        assert!(
            matches!(
                r.ptr_at(off, len, align),
                Err(RegionError::OutOfBounds { .. })
            ),
            "ptr_at({off}, {len}, {align})"
        );
    }
    assert!(r.atomic_u64(8192 - 8).is_ok());
    assert!(r.atomic_u64(8192 - 4).is_err());
}

#[test]
fn ring_metadata_checks() {
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(16), Ring::<u64>::ALIGN);
    let r = fresh(l.size());
    // Nothing initialised there yet.
    assert!(matches!(
        Ring::<u64>::open(&r, off, 1),
        Err(RingError::BadMagic { found: 0 })
    ));
    Ring::<u64>::init(&r, off, 16, 1).expect("init");
    assert!(Ring::<u64>::open(&r, off, 1).is_ok());
    assert!(matches!(
        Ring::<u64>::open(&r, off, 2),
        Err(RingError::BadTag {
            found: 1,
            expected: 2
        })
    ));
    assert!(matches!(
        Ring::<[u64; 16]>::open(&r, off, 1),
        Err(RingError::SlotMismatch { .. })
    ));
    // Capacity rewritten by a peer (meta offset 8): not a power of two, too big, past the region.
    for cap in [3u64, 0, 1 << 40, 1 << 20] {
        poke(&r, (off + 8) as u64, &cap.to_le_bytes());
        assert!(
            matches!(Ring::<u64>::open(&r, off, 1), Err(RingError::BadCapacity(c)) if c == cap),
            "capacity {cap}"
        );
    }
    // Bad capacities and offsets at init.
    assert!(matches!(
        Ring::<u64>::init(&r, off, 12, 1),
        Err(RingError::BadCapacity(12))
    ));
    assert!(matches!(
        Ring::<u64>::init(&r, off, 1 << 20, 1),
        Err(RingError::Region(_))
    ));
    assert!(matches!(
        Ring::<u64>::init(&r, off + 8, 16, 1),
        Err(RingError::Region(_))
    ));
}

#[test]
fn ring_huge_consistent_indices_are_corrupt_not_a_panic() {
    // Regression: head/tail near u64::MAX that agree with each other used to be adopted at
    // claim, and the next operation overflowed `head + capacity` (a panic in debug builds).
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(8), Ring::<u64>::ALIGN);
    let r = fresh(l.size());
    let ring = Ring::<u64>::init(&r, off, 8, 7).expect("init");
    for (h, t) in [
        (u64::MAX - 1, u64::MAX),
        (u64::MAX - 8, u64::MAX),
        ((1 << 62) + 1, (1 << 62) + 2),
    ] {
        r.atomic_u64(off + 256)
            .expect("head")
            .store(h, std::sync::atomic::Ordering::SeqCst);
        r.atomic_u64(off + 128)
            .expect("tail")
            .store(t, std::sync::atomic::Ordering::SeqCst);
        assert!(
            matches!(ring.consumer(), Err(RingError::Corrupt { .. })),
            "({h}, {t})"
        );
        assert!(
            matches!(ring.producer(), Err(RingError::Corrupt { .. })),
            "({h}, {t})"
        );
        assert!(
            matches!(ring.in_flight(), Err(RingError::Corrupt { .. })),
            "({h}, {t})"
        );
    }
    assert_eq!(ring.claims(), (0, 0));
    // Large but sane indices still work.
    r.atomic_u64(off + 256)
        .expect("head")
        .store(1 << 40, std::sync::atomic::Ordering::SeqCst);
    r.atomic_u64(off + 128)
        .expect("tail")
        .store(1 << 40, std::sync::atomic::Ordering::SeqCst);
    let mut p = ring.producer().expect("producer");
    let mut c = ring.consumer().expect("consumer");
    for v in 0..20u64 {
        p.push(v).expect("push");
        assert_eq!(c.pop(), Ok(Some(v)));
    }
}

#[test]
fn pool_metadata_checks() {
    let mut l = RegionLayout::new();
    let off = l.place(BufferPool::size_in_region(4, 256), BufferPool::ALIGN);
    let r = fresh(l.size());
    assert!(matches!(
        BufferPool::open(&r, off, 1),
        Err(PoolError::BadMagic(0))
    ));
    assert!(matches!(
        BufferPool::init(&r, off, 1, 4, 100, 0, EndpointId(1)),
        Err(PoolError::BadGeometry { .. })
    ));
    assert!(matches!(
        BufferPool::init(&r, off, 1, 4, 256, 256, EndpointId(1)),
        Err(PoolError::BadGeometry { .. })
    ));
    assert!(matches!(
        BufferPool::init(&r, off, 1, 1 << 20, 256, 0, EndpointId(1)),
        Err(PoolError::Region(_))
    ));
    BufferPool::init(&r, off, 1, 4, 256, 32, EndpointId(1)).expect("init");
    assert!(matches!(
        BufferPool::open(&r, off, 2),
        Err(PoolError::WrongId {
            found: 1,
            expected: 2
        })
    ));
    // Count rewritten by a peer (PoolMeta: magic u64, pool_id u32, count u32 at 12).
    poke(&r, (off + 12) as u64, &0u32.to_le_bytes());
    assert!(matches!(
        BufferPool::open(&r, off, 1),
        Err(PoolError::BadGeometry { count: 0, .. })
    ));
    poke(&r, (off + 12) as u64, &1_000_000u32.to_le_bytes());
    assert!(matches!(
        BufferPool::open(&r, off, 1),
        Err(PoolError::Region(_))
    ));
}

#[test]
fn doorbell_attach_checks() {
    let mut l = RegionLayout::new();
    let off = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let r = fresh(l.size());
    assert!(matches!(
        Doorbell::attach(&r, off),
        Err(RegionError::BadMagic { found: 0, .. })
    ));
    assert!(matches!(
        Doorbell::attach(&r, off + 8),
        Err(RegionError::OutOfBounds { .. })
    ));
    Doorbell::init(&r, off).expect("init");
    assert!(Doorbell::attach(&r, off).is_ok());
}
