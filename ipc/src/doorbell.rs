//! Spin-then-park notification across processes (DESIGN rule 6).
//!
//! The consumer spins a bounded time checking for work, then announces that it is going to
//! sleep (`sleeping = 1`), re-checks, and waits on a futex word in shared memory. A producer,
//! after publishing work, looks at `sleeping` and makes the wake-up syscall only when it is
//! set. The protocol loses no wake-up:
//!
//! * consumer: `e = epoch`; `sleeping = 1`; fence(SeqCst) [A]; check for work; futex_wait(e)
//! * producer: publish work (Release); fence(SeqCst) [B]; if swap(sleeping, 0) { epoch += 1; wake }
//!
//! Fences A and B are totally ordered: either the consumer's check sees the new work, or the
//! producer sees `sleeping == 1` and bumps `epoch`, in which case `futex_wait(e)` returns at
//! once (the kernel compares the word) or the wake reaches the waiter.
//!
//! A consumer that must also wait for other fds (the driver: its TAP device) cannot wait on a
//! futex. Its doorbell then carries an eventfd, shared by the supervisor with the consumer and
//! every producer ([`Doorbell::with_eventfd`]): a producer that sees `sleeping` writes the
//! eventfd, and the consumer `poll`s it together with its own fds ([`Doorbell::wait_fds`]).
//! The eventfd counter is level-triggered, so the protocol above stays free of lost wake-ups.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::region::{Region, RegionError};

const BELL_MAGIC: u32 = 0xBE11_0001;

#[repr(C, align(64))]
struct BellShm {
    /// Futex word: bumped by a producer that wakes a sleeper.
    epoch: AtomicU32,
    /// 1 while the consumer is (about to be) parked.
    sleeping: AtomicU32,
    magic: AtomicU32,
    _pad: u32,
    /// Wake-up syscalls made by producers.
    wakes: AtomicU64,
    /// Times the consumer parked.
    parks: AtomicU64,
}

/// How long a consumer spins before it parks. The right budget depends on placement: a
/// consumer sharing its core with its producer must park at once ([`SpinPolicy::PARK_AT_ONCE`]);
/// one on a dedicated core may spin for ever ([`SpinPolicy::never_park`]).
///
/// Between spinning and parking, a consumer may also poll with `sched_yield` for a bounded
/// time ([`SpinPolicy::yield_then_park`]). On a core shared with its producer that is the
/// cheapest wait there is: each yield hands the core straight to the producer, and no wake-up
/// syscall is needed, while an idle consumer still parks after the budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinPolicy {
    /// Time to spin before parking; `None` spins without end.
    pub spin: Option<Duration>,
    /// Time to poll with `sched_yield` after spinning, before parking.
    pub yield_for: Duration,
}

impl SpinPolicy {
    /// Park as soon as there is no work.
    pub const PARK_AT_ONCE: SpinPolicy = SpinPolicy {
        spin: Some(Duration::ZERO),
        yield_for: Duration::ZERO,
    };
    /// Spin `d`, then park.
    pub const fn spin_for(d: Duration) -> SpinPolicy {
        SpinPolicy {
            spin: Some(d),
            yield_for: Duration::ZERO,
        }
    }
    /// Never spin; poll with `sched_yield` for `d`, then park (a core shared with the
    /// producer).
    pub const fn yield_then_park(d: Duration) -> SpinPolicy {
        SpinPolicy {
            spin: Some(Duration::ZERO),
            yield_for: d,
        }
    }
    /// Never park (dedicated core).
    pub const fn never_park() -> SpinPolicy {
        SpinPolicy {
            spin: None,
            yield_for: Duration::ZERO,
        }
    }
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Work was found while spinning.
    Spun,
    /// Work was found after parking (or while announcing the park).
    Woken,
    /// The timeout passed with no work.
    TimedOut,
}

/// A doorbell placed in a region. Any number of producers may ring it; one consumer waits.
#[derive(Clone, Debug)]
pub struct Doorbell {
    /// Keeps the mapping behind `base` alive.
    _mapping: Region,
    /// The BellShm at its offset in `region`, checked when the handle was made.
    base: *mut u8,
    efd: Option<Arc<OwnedFd>>,
}

// SAFETY: `base` points into the mapping that `_mapping` (an Arc) keeps alive as long as the
// handle; BellShm is all atomics, so the handle may move to and be shared with any thread.
unsafe impl Send for Doorbell {}
// SAFETY: as above.
unsafe impl Sync for Doorbell {}

/// Creates an eventfd for [`Doorbell::with_eventfd`] (close-on-exec, non-blocking).
pub fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative return is a fresh fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Doorbell {
    /// Bytes a doorbell takes in a region.
    pub const SIZE: usize = std::mem::size_of::<BellShm>();
    /// Alignment it needs.
    pub const ALIGN: usize = 64;

    /// Initialises a doorbell at `offset` (creator side).
    pub fn init(region: &Region, offset: usize) -> Result<Doorbell, RegionError> {
        let base = region.ptr_at(offset, Self::SIZE, Self::ALIGN)?;
        let bell = Doorbell {
            _mapping: region.clone(),
            base,
            efd: None,
        };
        let s = bell.shm();
        s.epoch.store(0, Ordering::Relaxed);
        s.sleeping.store(0, Ordering::Relaxed);
        s.magic.store(BELL_MAGIC, Ordering::Release);
        Ok(bell)
    }

    /// Attaches to a doorbell initialised elsewhere.
    pub fn attach(region: &Region, offset: usize) -> Result<Doorbell, RegionError> {
        let base = region.ptr_at(offset, Self::SIZE, Self::ALIGN)?;
        let bell = Doorbell {
            _mapping: region.clone(),
            base,
            efd: None,
        };
        if bell.shm().magic.load(Ordering::Acquire) != BELL_MAGIC {
            return Err(RegionError::BadMagic {
                found: u64::from(bell.shm().magic.load(Ordering::Relaxed)),
                expected: u64::from(BELL_MAGIC),
            });
        }
        Ok(bell)
    }

    #[inline]
    fn shm(&self) -> &BellShm {
        // SAFETY: `base` was checked in bounds and 64-aligned for a BellShm when the handle
        // was made, and stays mapped as long as `self._mapping`; BellShm is all atomics (plus
        // padding), valid for any bit pattern.
        unsafe { &*self.base.cast::<BellShm>() }
    }

    /// Attaches the eventfd that the consumer polls (see the module docs). Every holder of
    /// this doorbell, consumer and producers, must attach the same eventfd.
    pub fn with_eventfd(mut self, fd: OwnedFd) -> Doorbell {
        self.efd = Some(Arc::new(fd));
        self
    }

    /// The attached eventfd, if any (to hand to a producer process).
    pub fn eventfd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.efd.as_ref().map(|f| f.as_fd())
    }

    /// Producer side: call after publishing work. Makes a syscall only if the consumer sleeps.
    #[inline]
    pub fn ring(&self) {
        let s = self.shm();
        // Sync point B: orders our publish before the `sleeping` load (pairs with fence A).
        fence(Ordering::SeqCst);
        // Clearing the flag as we wake means the pushes that follow, before the woken consumer
        // runs, make no syscall. Still no lost wake-up: the consumer re-arms `sleeping` and
        // re-checks on every park, and its futex_wait compares `epoch`, bumped here.
        if s.sleeping.load(Ordering::Relaxed) != 0 && s.sleeping.swap(0, Ordering::SeqCst) != 0 {
            self.wake();
        }
    }

    /// Bumps `epoch` and wakes the waiter(s): through the eventfd, or the futex.
    fn wake(&self) {
        let s = self.shm();
        s.epoch.fetch_add(1, Ordering::SeqCst);
        s.wakes.fetch_add(1, Ordering::Relaxed);
        match &self.efd {
            Some(fd) => {
                let one = 1u64.to_ne_bytes();
                // EAGAIN (counter saturated) still leaves the fd readable: nothing to do.
                let _ = nix::unistd::write(fd, &one);
            }
            None => futex_wake(&s.epoch),
        }
    }

    /// Producer side, for a doorbell several processes may park on at once (the standby
    /// doorbell of a live update: one parked waiter clearing `sleeping` must not make the
    /// ring skip another): bumps `epoch` and wakes every waiter, whatever `sleeping` says.
    /// Costs a syscall every time; not for the data path.
    pub fn ring_all(&self) {
        fence(Ordering::SeqCst);
        self.shm().sleeping.store(0, Ordering::Relaxed);
        self.wake();
    }

    /// Consumer side: waits until `ready()` is true, spinning per `policy` then parking, or
    /// until `timeout` passes. `ready` must be cheap and must load the producer's published
    /// state with Acquire (or stronger).
    pub fn wait(
        &self,
        policy: SpinPolicy,
        timeout: Option<Duration>,
        mut ready: impl FnMut() -> bool,
    ) -> WaitOutcome {
        if ready() {
            return WaitOutcome::Spun;
        }
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        // Spin phase.
        let spin_end = policy.spin.map(|s| start + s.min(timeout.unwrap_or(s)));
        if spin_end.is_none_or(|e| e > start) {
            let mut i: u32 = 0;
            loop {
                if ready() {
                    return WaitOutcome::Spun;
                }
                std::hint::spin_loop();
                i = i.wrapping_add(1);
                if i % 64 == 0 {
                    let now = Instant::now();
                    if spin_end.is_some_and(|e| now >= e) {
                        break;
                    }
                    if deadline.is_some_and(|d| now >= d) {
                        return WaitOutcome::TimedOut;
                    }
                }
            }
        }
        // Yield phase.
        if !policy.yield_for.is_zero() {
            let yield_end = start + policy.yield_for;
            loop {
                if ready() {
                    return WaitOutcome::Spun;
                }
                let _ = nix::sched::sched_yield();
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return WaitOutcome::TimedOut;
                }
                if now >= yield_end {
                    break;
                }
            }
        }
        // Park phase.
        let s = self.shm();
        loop {
            let epoch = s.epoch.load(Ordering::SeqCst);
            s.sleeping.store(1, Ordering::SeqCst);
            // Sync point A: orders `sleeping = 1` before the re-check (pairs with fence B).
            fence(Ordering::SeqCst);
            if ready() {
                s.sleeping.store(0, Ordering::Relaxed);
                return WaitOutcome::Woken;
            }
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) if !r.is_zero() => Some(r),
                    _ => {
                        s.sleeping.store(0, Ordering::Relaxed);
                        return WaitOutcome::TimedOut;
                    }
                },
                None => None,
            };
            s.parks.fetch_add(1, Ordering::Relaxed);
            futex_wait(&s.epoch, epoch, remaining);
            s.sleeping.store(0, Ordering::Relaxed);
            if ready() {
                return WaitOutcome::Woken;
            }
        }
    }

    /// Like [`Doorbell::wait`], but the park also ends when one of `fds` becomes readable.
    /// Needs an attached eventfd; without one the park is a `poll` of `fds` in 1 ms slices.
    /// Returns the outcome and whether one of `fds` (not the doorbell) was readable.
    pub fn wait_fds(
        &self,
        policy: SpinPolicy,
        timeout: Option<Duration>,
        mut ready: impl FnMut() -> bool,
        fds: &[RawFd],
    ) -> (WaitOutcome, bool) {
        let start = Instant::now();
        let deadline = timeout.map(|t| start + t);
        if let Some(spin) = policy.spin {
            if !spin.is_zero() {
                let o = self.wait(policy, Some(spin.min(timeout.unwrap_or(spin))), &mut ready);
                if o != WaitOutcome::TimedOut {
                    return (o, false);
                }
            } else if !policy.yield_for.is_zero() {
                let o = self.wait(
                    policy,
                    Some(policy.yield_for.min(timeout.unwrap_or(policy.yield_for))),
                    &mut ready,
                );
                if o != WaitOutcome::TimedOut {
                    return (o, false);
                }
            } else if ready() {
                return (WaitOutcome::Spun, false);
            }
        } else {
            // Never park: spin until work or the timeout.
            return (self.wait(policy, timeout, &mut ready), false);
        }
        let s = self.shm();
        let efd = self.efd.as_ref().map(|f| f.as_raw_fd());
        let mut pfds: Vec<libc::pollfd> = efd
            .iter()
            .chain(fds.iter())
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        loop {
            s.sleeping.store(1, Ordering::SeqCst);
            // Sync point A (see the module docs).
            fence(Ordering::SeqCst);
            if ready() {
                s.sleeping.store(0, Ordering::Relaxed);
                return (WaitOutcome::Woken, false);
            }
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if remaining.is_some_and(|r| r.is_zero()) {
                s.sleeping.store(0, Ordering::Relaxed);
                return (WaitOutcome::TimedOut, false);
            }
            let ms = match (remaining, efd) {
                (Some(r), Some(_)) => r.as_millis().clamp(1, i32::MAX as u128) as i32,
                (None, Some(_)) => -1,
                (_, None) => 1,
            };
            s.parks.fetch_add(1, Ordering::Relaxed);
            for p in pfds.iter_mut() {
                p.revents = 0;
            }
            // SAFETY: `pfds` is a live, correctly sized array of pollfd for the call; poll
            // only writes `revents`. A closed fd yields POLLNVAL, not undefined behaviour.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
            s.sleeping.store(0, Ordering::Relaxed);
            if let Some(fd) = efd {
                if pfds.first().is_some_and(|p| p.revents & libc::POLLIN != 0) {
                    let mut buf = [0u8; 8];
                    // SAFETY: reading 8 bytes into a live 8-byte buffer from our eventfd.
                    let _ = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
                }
            }
            let skip = usize::from(efd.is_some());
            let fd_ready = n > 0 && pfds[skip..].iter().any(|p| p.revents != 0);
            if fd_ready {
                return (WaitOutcome::Woken, true);
            }
            if ready() {
                return (WaitOutcome::Woken, false);
            }
        }
    }

    /// True while the consumer is parked or about to park (its `sleeping` flag is set).
    ///
    /// A consumer that also serves doorbells it does not park on (the udp server: one per
    /// application, rung by the app, each carrying the server's eventfd) checks this in its
    /// park re-check and, when set, [`Doorbell::arm`]s those doorbells before it looks at
    /// their rings: the same protocol as the module docs, with the flag in the other bell.
    pub fn is_armed(&self) -> bool {
        self.shm().sleeping.load(Ordering::SeqCst) != 0
    }

    /// Consumer side, for a doorbell the consumer does not park on itself (see
    /// [`Doorbell::is_armed`]): sets `sleeping`, so that the next producer to ring makes the
    /// wake-up call (its eventfd write), and fences before the caller re-checks for work.
    pub fn arm(&self) {
        self.shm().sleeping.store(1, Ordering::SeqCst);
        // Sync point A (see the module docs).
        fence(Ordering::SeqCst);
    }

    /// Wake-up syscalls producers made so far.
    pub fn wakes(&self) -> u64 {
        self.shm().wakes.load(Ordering::Relaxed)
    }

    /// Times the consumer parked so far.
    pub fn parks(&self) -> u64 {
        self.shm().parks.load(Ordering::Relaxed)
    }
}

/// Waits while `*word == expected`, at most `timeout`. Spurious returns are fine: callers loop.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 in a MAP_SHARED mapping that outlives the call;
    // FUTEX_WAIT (not _PRIVATE) keys on the physical page, so it works across processes. The
    // timespec pointer is null or points at a live local. The return value (0, EAGAIN,
    // ETIMEDOUT, EINTR) needs no handling: the caller re-checks its condition.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: as for futex_wait; FUTEX_WAKE only reads the address to find waiters.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}
