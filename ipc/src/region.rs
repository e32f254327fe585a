//! Shared regions: a memfd, sealed against resizing, mapped shared, with a checked header.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// "KEEPNETR" as a little-endian u64: the first bytes of every region.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"KEEPNETR");
/// Layout version of the region header and of everything this crate places in a region.
/// Bump it whenever a shared structure changes shape.
pub const LAYOUT_VERSION: u32 = 1;
/// Bytes reserved at the start of every region for [`RegionHeader`]; user data starts here.
pub const HEADER_SIZE: usize = 128;

/// What a region holds, recorded in its header so that a region handed over for one purpose
/// cannot be mapped for another by mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionKind(pub u32);

impl RegionKind {
    /// A region of rings and pools whose layout the opener knows from elsewhere.
    pub const GENERIC: RegionKind = RegionKind(1);
    /// A server's control block (heartbeat, generation, control rings).
    pub const CONTROL: RegionKind = RegionKind(2);
    /// Rings between two endpoints.
    pub const RINGS: RegionKind = RegionKind(3);
    /// A buffer pool.
    pub const POOL: RegionKind = RegionKind(4);
    /// Test and benchmark regions.
    pub const TEST: RegionKind = RegionKind(0x7e57);
}

/// The header at offset 0 of every region.
#[repr(C)]
struct RegionHeader {
    magic: u64,
    layout_version: u32,
    kind: u32,
    size: u64,
    /// Generation of the creator (the supervisor) when it made the region.
    creator_generation: AtomicU64,
    /// NUL-padded debug name.
    name: [u8; 32],
}

const _: () = assert!(std::mem::size_of::<RegionHeader>() <= HEADER_SIZE);

/// Why a region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("region is too small: {size} bytes, a region needs at least {min}")]
    TooSmall { size: usize, min: usize },
    #[error("wrong magic in region header: found {found:#018x}, expected {expected:#018x} (not a keepnet region)")]
    BadMagic { found: u64, expected: u64 },
    #[error("region layout version {found} is not the version this build reads ({expected})")]
    BadVersion { found: u32, expected: u32 },
    #[error("region size mismatch: header says {header} bytes, the mapping has {actual}")]
    BadSize { header: u64, actual: u64 },
    #[error("region holds kind {found}, expected kind {expected}")]
    BadKind { found: u32, expected: u32 },
    #[error("offset {offset} (+{len} bytes, align {align}) is outside or misaligned in a region of {size} bytes")]
    OutOfBounds {
        offset: usize,
        len: usize,
        align: usize,
        size: usize,
    },
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn sys(op: &'static str) -> impl FnOnce(nix::errno::Errno) -> RegionError {
    move |e| RegionError::Sys {
        op,
        source: std::io::Error::from(e),
    }
}

struct Inner {
    file: File,
    /// Unmapped in `Drop`, unless [`keep_mappings_until_exit`] was called.
    map: std::mem::ManuallyDrop<MmapRaw>,
    size: usize,
}

/// Regions mapped ahead by [`Region::premap`], by (device, inode) of their memfd.
static PREMAPPED: std::sync::Mutex<Vec<(u64, u64, Region)>> = std::sync::Mutex::new(Vec::new());

/// The premapped region of the memfd behind `file`, if any (one fstat when the cache is
/// empty: nothing else).
fn premapped(file: &File) -> Option<Region> {
    use std::os::unix::fs::MetadataExt;
    let cache = PREMAPPED.lock().ok()?;
    if cache.is_empty() {
        return None;
    }
    let m = file.metadata().ok()?;
    cache
        .iter()
        .find(|(dev, ino, _)| *dev == m.dev() && *ino == m.ino())
        .map(|(_, _, r)| r.clone())
}

/// Set by [`keep_mappings_until_exit`].
static KEEP_MAPPINGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, a region whose last handle goes keeps its mapping until the process exits.
/// For a server that hands over at a live update: dropping its server releases every ring
/// claim at once, without the munmap of every region on the way (page-table teardown of
/// large pools, milliseconds that would count in the blackout); the process exits next.
pub fn keep_mappings_until_exit() {
    KEEP_MAPPINGS.store(true, std::sync::atomic::Ordering::SeqCst);
}

impl Drop for Inner {
    fn drop(&mut self) {
        if KEEP_MAPPINGS.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: `map` is dropped exactly once, here, and `self` is never used again (this
        // is its destructor).
        #[allow(unsafe_code)]
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.map)
        }
    }
}

/// A shared mapping of a memfd. Cloning is cheap and shares the mapping; the mapping lives
/// until the last clone (and every handle built on it) is gone.
#[derive(Clone)]
pub struct Region {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("fd", &self.inner.file.as_raw_fd())
            .field("size", &self.inner.size)
            .field("name", &self.name())
            .finish()
    }
}

impl Region {
    /// Creates a new region of `size` bytes (header included), zero-filled, sealed so that no
    /// process can grow or shrink it (a shrink would SIGBUS every other mapper).
    pub fn create(name: &str, kind: RegionKind, size: usize) -> Result<Region, RegionError> {
        if size < HEADER_SIZE {
            return Err(RegionError::TooSmall {
                size,
                min: HEADER_SIZE,
            });
        }
        let cname =
            std::ffi::CString::new(format!("keepnet-{name}").replace('\0', "?")).map_err(|_| {
                RegionError::Sys {
                    op: "memfd name",
                    source: std::io::ErrorKind::InvalidInput.into(),
                }
            })?;
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(sys("memfd_create"))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(|e| RegionError::Sys {
            op: "ftruncate",
            source: e,
        })?;
        fcntl(
            file.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(sys("seal memfd"))?;
        let map = MmapOptions::new()
            .len(size)
            .map_raw(&file)
            .map_err(|e| RegionError::Sys {
                op: "mmap",
                source: e,
            })?;
        let region = Region {
            inner: Arc::new(Inner {
                file,
                map: std::mem::ManuallyDrop::new(map),
                size,
            }),
        };
        let hdr = region.header_ptr();
        let mut name_bytes = [0u8; 32];
        for (d, s) in name_bytes.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned (so aligned for the
        // header), freshly created and not yet shared with anyone, so these plain writes race
        // with nothing.
        unsafe {
            std::ptr::write(
                hdr,
                RegionHeader {
                    magic: REGION_MAGIC,
                    layout_version: LAYOUT_VERSION,
                    kind: kind.0,
                    size: size as u64,
                    creator_generation: AtomicU64::new(0),
                    name: name_bytes,
                },
            );
        }
        Ok(region)
    }

    /// Maps a region received from elsewhere (inherited or over SCM_RIGHTS) and checks its
    /// header: magic, layout version, that the recorded size is the real size, and the kind.
    pub fn open(fd: OwnedFd, expected: RegionKind) -> Result<Region, RegionError> {
        Region::open_with(fd, Some(expected), false)
    }

    /// Maps a region of any kind ahead of its use, for a live-update successor that maps
    /// what it will need while it waits in standby: with `populate`, every page is faulted in
    /// now (MAP_POPULATE). The mapping is remembered for the life of the process: a later
    /// [`Region::open`] of the same memfd (another fd for it, say from a hotplug message)
    /// returns it, so neither the mmap nor the page faults fall in the blackout.
    pub fn premap(fd: OwnedFd, populate: bool) -> Result<Region, RegionError> {
        let r = Region::open_with(fd, None, populate)?;
        if let Ok(m) = r.inner.file.metadata() {
            use std::os::unix::fs::MetadataExt;
            if let Ok(mut cache) = PREMAPPED.lock() {
                cache.push((m.dev(), m.ino(), r.clone()));
            }
        }
        Ok(r)
    }

    /// Refuses a region that is not of kind `expected`.
    pub fn check_kind(&self, expected: RegionKind) -> Result<(), RegionError> {
        let hdr = self.header_ptr();
        // SAFETY: as in `open_with`: the header lies in the mapping; a volatile copy of a
        // plain integer, valid for any bits.
        let kind = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*hdr).kind)) };
        if kind != expected.0 {
            return Err(RegionError::BadKind {
                found: kind,
                expected: expected.0,
            });
        }
        Ok(())
    }

    fn open_with(
        fd: OwnedFd,
        expected: Option<RegionKind>,
        populate: bool,
    ) -> Result<Region, RegionError> {
        let file = File::from(fd);
        if let Some(r) = premapped(&file) {
            if let Some(e) = expected {
                r.check_kind(e)?;
            }
            return Ok(r);
        }
        let actual = file
            .metadata()
            .map_err(|e| RegionError::Sys {
                op: "fstat",
                source: e,
            })?
            .len();
        if (actual as usize) < HEADER_SIZE {
            return Err(RegionError::TooSmall {
                size: actual as usize,
                min: HEADER_SIZE,
            });
        }
        let mut opts = MmapOptions::new();
        opts.len(actual as usize);
        if populate {
            opts.populate();
        }
        let map = opts.map_raw(&file).map_err(|e| RegionError::Sys {
            op: "mmap",
            source: e,
        })?;
        let region = Region {
            inner: Arc::new(Inner {
                file,
                map: std::mem::ManuallyDrop::new(map),
                size: actual as usize,
            }),
        };
        let hdr = region.header_ptr();
        // SAFETY: the mapping is at least HEADER_SIZE bytes and page-aligned. The header's
        // plain fields are written once at creation, before the fd is handed to anyone; a
        // peer scribbling on them can only make the checks below fail. Reads are volatile
        // copies of plain integers, valid for any bit pattern.
        let (magic, version, size, kind) = unsafe {
            (
                std::ptr::read_volatile(std::ptr::addr_of!((*hdr).magic)),
                std::ptr::read_volatile(std::ptr::addr_of!((*hdr).layout_version)),
                std::ptr::read_volatile(std::ptr::addr_of!((*hdr).size)),
                std::ptr::read_volatile(std::ptr::addr_of!((*hdr).kind)),
            )
        };
        if magic != REGION_MAGIC {
            return Err(RegionError::BadMagic {
                found: magic,
                expected: REGION_MAGIC,
            });
        }
        if version != LAYOUT_VERSION {
            return Err(RegionError::BadVersion {
                found: version,
                expected: LAYOUT_VERSION,
            });
        }
        if size != actual {
            return Err(RegionError::BadSize {
                header: size,
                actual,
            });
        }
        match expected {
            Some(e) if kind != e.0 => Err(RegionError::BadKind {
                found: kind,
                expected: e.0,
            }),
            _ => Ok(region),
        }
    }

    /// Duplicates the region's fd (close-on-exec) and maps it again, as a receiving process
    /// would. Mostly for tests.
    pub fn reopen(&self, expected: RegionKind) -> Result<Region, RegionError> {
        let fd = self
            .inner
            .file
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| RegionError::Sys {
                op: "dup",
                source: e,
            })?;
        Region::open(fd, expected)
    }

    /// Takes ownership of an inherited fd number and maps it.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process owns or will close.
    pub unsafe fn open_raw(fd: RawFd, expected: RegionKind) -> Result<Region, RegionError> {
        // SAFETY: the caller guarantees `fd` is open and exclusively ours.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Region::open(owned, expected)
    }

    fn header_ptr(&self) -> *mut RegionHeader {
        self.inner.map.as_mut_ptr().cast()
    }

    /// The memfd behind the region, to hand to a child or over a Unix socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }

    /// Total size in bytes, header included.
    pub fn len(&self) -> usize {
        self.inner.size
    }

    /// Never true: a region always holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The debug name recorded at creation.
    pub fn name(&self) -> String {
        // SAFETY: header bytes are in bounds; a volatile copy of a byte array is valid for
        // any contents.
        let raw = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.header_ptr()).name)) };
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// The creator's generation recorded in the header.
    pub fn creator_generation(&self) -> u64 {
        self.header_atomic().load(Ordering::Acquire)
    }

    /// Records the creator's generation (the supervisor does this when it re-adopts regions).
    pub fn set_creator_generation(&self, generation: u64) {
        self.header_atomic().store(generation, Ordering::Release)
    }

    fn header_atomic(&self) -> &AtomicU64 {
        // SAFETY: the field is in bounds, 8-aligned (header at a page boundary, repr(C)
        // offset 16), lives as long as `self`'s mapping, and AtomicU64 is valid for any bits.
        unsafe { &*std::ptr::addr_of!((*self.header_ptr()).creator_generation) }
    }

    /// A raw pointer to `len` bytes at `offset`, checked to lie inside the region and after
    /// the header, and to be aligned to `align`. Dereferencing it is the caller's business.
    pub fn ptr_at(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8, RegionError> {
        let in_bounds = offset >= HEADER_SIZE
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.inner.size);
        let base = self.inner.map.as_mut_ptr();
        let aligned = align.is_power_of_two() && (base as usize).wrapping_add(offset) % align == 0;
        if !in_bounds || !aligned {
            return Err(RegionError::OutOfBounds {
                offset,
                len,
                align,
                size: self.inner.size,
            });
        }
        // SAFETY: offset + len <= size, so the result stays inside the mapping.
        Ok(unsafe { base.add(offset) })
    }

    /// A reference to an atomic placed at `offset` (for counters and flags in shared memory).
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, RegionError> {
        let p = self.ptr_at(offset, 8, 8)?;
        // SAFETY: in bounds and 8-aligned (checked), valid as long as `self` (the returned
        // borrow is tied to it), and an AtomicU64 is valid for any bit pattern; concurrent
        // access from other processes is atomic access like any other thread's.
        Ok(unsafe { &*p.cast::<AtomicU64>() })
    }

    /// Copies `data` into the region at `offset` (bounds-checked, after the header).
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), RegionError> {
        let p = self.ptr_at(offset, data.len(), 1)?;
        // SAFETY: `p..p+len` is inside the mapping (checked); a byte copy from a private slice
        // forms no reference to shared memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the region (bounds-checked).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> Result<(), RegionError> {
        let p = self.ptr_at(offset, out.len(), 1)?;
        // SAFETY: in bounds (checked); copying into a private slice.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

/// One `u64` in a region (a counter, a generation), reached without re-checking its offset
/// on every access: the offset is checked once, when the handle is made.
#[derive(Clone, Debug)]
pub struct SharedU64 {
    /// Keeps the mapping behind `cell` alive.
    _mapping: Region,
    cell: *const AtomicU64,
}

// SAFETY: `cell` points into the mapping that `_mapping` (an Arc) keeps alive as long as the
// handle, and is only ever used as an atomic, so the handle may move to and be shared with
// any thread.
unsafe impl Send for SharedU64 {}
// SAFETY: as above.
unsafe impl Sync for SharedU64 {}

impl SharedU64 {
    /// The `u64` at `offset` (checked: in bounds, after the header, 8-aligned).
    pub fn at(region: &Region, offset: usize) -> Result<SharedU64, RegionError> {
        let p = region.ptr_at(offset, 8, 8)?;
        Ok(SharedU64 {
            _mapping: region.clone(),
            cell: p.cast::<AtomicU64>(),
        })
    }

    /// The atomic itself.
    #[inline]
    pub fn atomic(&self) -> &AtomicU64 {
        // SAFETY: checked in bounds and 8-aligned when the handle was made; mapped as long as
        // `self._mapping`; an AtomicU64 is valid for any bit pattern.
        unsafe { &*self.cell }
    }
}
