//! The driver server: moves frames between a [`LinkBackend`] and the link region it shares
//! with the ip server (see `keepnet_server::wiring` for the region and its buffer rules).
//!
//! * RX: a free RX_POOL buffer comes off the driver's free list, the backend reads the frame
//!   straight into it after the headroom (zero copy), and its descriptor goes on `rx`, up to
//!   [`RX_BATCH`] frames per publish. With no free buffer or no room on `rx`, a TAP frame is
//!   still read (so the device never stays readable) and dropped, and counted; the wire's
//!   frames wait on the wire instead (backpressure, see [`LinkBackend::holds_frames`]).
//! * TX: each `tx` descriptor is validated and taken from the ip server before its slot is
//!   committed, the frame is written to the backend, then an RX_POOL buffer (an echo built in
//!   the request's buffer) goes back on the free list and a TX_POOL buffer onto `tx_return`.
//!   A descriptor that fails validation is counted and dropped; it never panics the driver.
//! * `rx_return`: RX_POOL buffers the ip server is done with, back onto the free list.
//! * Capture: while the supervisor has capture on, a copy of each frame in and out goes on
//!   the capture ring; a full ring drops the copy (counted), never the frame.
//!
//! Restart: [`Driver::new`] claims the ring ends (which fails while the predecessor lives),
//! scans the descriptors in flight, and recovers every buffer the predecessor held
//! privately: RX_POOL buffers return to the free list, TX_POOL buffers go to `tx_return`, and
//! buffers it had taken from an uncommitted slot may be taken once more.
//!
//! ## What the supervisor hands the `keepnet-driver` binary
//!
//! | kind | name | |
//! |---|---|---|
//! | env | `KEEPNET_DRIVER_CONFIG` | JSON, see [`crate::config`]; unset means `{"backend":"tap"}` |
//! | region | `link` (RINGS) | the link region ([`Link`]) |
//! | fd | `tap` | backend tap: the TAP fd ([`Tap::create`]); the supervisor keeps its own copy |
//! | region | `wire` (RINGS) | backend wire: the wire region ([`Wire::create`]) |
//! | fd | `wire.rx` (optional) | backend wire: an eventfd this driver parks on for wire frames |
//! | fd | `wire.peer` (optional) | backend wire: the other side's `wire.rx` eventfd |
//! | region | `peer.ip` (CONTROL, optional) | the ip server's control block: its doorbell is rung after publishing on `rx` and `tx_return` |
//! | fd | `bell.ip` (optional) | the eventfd of the ip server's doorbell, if it has one |
//! | fd | `bell` | this driver's doorbell eventfd (the runtime attaches it); the ip server's producers into `tx` and `rx_return` must ring this doorbell with the same eventfd, so the parked driver wakes on them or on its TAP |
//!
//! Without `wire.rx`/`wire.peer` a parked wire driver sees new frames when its park times
//! out (`KEEPNET_PARK_TIMEOUT_MS`); delayed frames likewise leave at the latest one park
//! timeout late when the driver is otherwise idle.
//!
//! Counters (in the control block, so they survive restarts): `rx.frames`, `rx.bytes`,
//! `tx.frames`, `tx.bytes`, `drop.rx_no_buffer`, `drop.rx_ring_full`, `drop.rx_error`,
//! `drop.tx_bad_descriptor`, `drop.tx_error`, `drop.capture_full`,
//! `capture.frames`, `tx.stalls`, `recover.rx_buffers`, `recover.tx_buffers`,
//! `recover.retakes`, and the backend's own (`wire.*` for the wire).

use std::os::fd::RawFd;

use keepnet_ipc::{
    BufRef, BufferPool, Descriptor, Doorbell, FreeList, Producer, RegionKind, Retakes,
};
use keepnet_server::control::Counter;
use keepnet_server::wiring::{
    CaptureRecord, DriverEnds, Link, CAPTURE_SNAPLEN, DRIVER, IP, MAX_FRAME, RX_POOL, TX_POOL,
};
use keepnet_server::{Boot, BootError, ControlBlock, Progress, Scribbler, Server, ServerError};
use tracing::{info, warn};

use crate::config::DriverConfig;
use crate::tap::Tap;
use crate::wire::Wire;
use crate::LinkBackend;

/// Most frames read from the backend per poll.
pub const RX_BATCH: usize = 32;
/// Most `tx` descriptors handled per poll.
pub const TX_BATCH: usize = 32;
/// Most returned buffers collected per poll.
const RETURN_BATCH: usize = 256;

/// Direction values in a [`CaptureRecord`].
pub const CAPTURE_RX: u32 = 0;
/// Sent frames.
pub const CAPTURE_TX: u32 = 1;

struct Counters {
    rx_frames: Counter,
    rx_bytes: Counter,
    tx_frames: Counter,
    tx_bytes: Counter,
    rx_no_buffer: Counter,
    rx_ring_full: Counter,
    rx_error: Counter,
    tx_bad_descriptor: Counter,
    tx_error: Counter,
    capture_full: Counter,
    capture_frames: Counter,
    tx_stalls: Counter,
    /// The backend's counters, by name, in the order `LinkBackend::counters` gives them.
    backend: Vec<(&'static str, Counter)>,
}

impl Counters {
    fn new(c: &ControlBlock, backend: &dyn LinkBackend) -> Counters {
        Counters {
            rx_frames: c.counter("rx.frames"),
            rx_bytes: c.counter("rx.bytes"),
            tx_frames: c.counter("tx.frames"),
            tx_bytes: c.counter("tx.bytes"),
            rx_no_buffer: c.counter("drop.rx_no_buffer"),
            rx_ring_full: c.counter("drop.rx_ring_full"),
            rx_error: c.counter("drop.rx_error"),
            tx_bad_descriptor: c.counter("drop.tx_bad_descriptor"),
            tx_error: c.counter("drop.tx_error"),
            capture_full: c.counter("drop.capture_full"),
            capture_frames: c.counter("capture.frames"),
            tx_stalls: c.counter("tx.stalls"),
            backend: backend
                .counters()
                .into_iter()
                .map(|(name, _)| (name, c.counter(name)))
                .collect(),
        }
    }
}

/// Why a driver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("boot: {0}")]
    Boot(#[from] BootError),
    #[error("link region: {0}")]
    Link(#[from] keepnet_server::wiring::WiringError),
    #[error("link rings: {0}")]
    Ring(#[from] keepnet_ipc::RingError),
    #[error("TAP: {0}")]
    Tap(#[from] crate::tap::TapError),
    #[error("wire: {0}")]
    Wire(#[from] crate::wire::WireError),
    #[error("peer ip control block: {0}")]
    PeerControl(#[from] keepnet_server::control::ControlError),
    #[error("backend \"tap\" needs the TAP fd handed over as fd `tap` (KEEPNET_FDS)")]
    NoTapFd,
}

impl From<DriverError> for ServerError {
    fn from(e: DriverError) -> ServerError {
        ServerError::Fatal(e.to_string())
    }
}

/// The driver server.
pub struct Driver {
    backend: Box<dyn LinkBackend>,
    link: Link,
    ends: DriverEnds,
    /// Free RX_POOL buffers (this driver is their home), and the re-takes allowed after a
    /// restart for RX_POOL buffers.
    free: FreeList,
    /// Re-takes allowed after a restart for TX_POOL buffers.
    tx_retakes: Retakes,
    /// TX_POOL buffers to hand back on `tx_return` (owned by us until pushed).
    tx_return_backlog: Vec<Descriptor>,
    /// A frame taken from `tx` that the backend could not take yet (EAGAIN).
    stalled: Option<(u16, BufRef)>,
    capture: Producer<CaptureRecord>,
    counters: Counters,
    scratch: Vec<u8>,
    rx_batch: Vec<Descriptor>,
    tx_batch: Vec<Descriptor>,
}

impl Driver {
    /// A driver for `link` over `backend`, counting in `control`; `ip_bell` is the ip
    /// server's doorbell, rung after publishing on `rx` and `tx_return`.
    pub fn new(
        link: Link,
        backend: Box<dyn LinkBackend>,
        control: &ControlBlock,
        ip_bell: Option<Doorbell>,
    ) -> Result<Driver, DriverError> {
        // Claim first: this fails while a predecessor still lives, so the scan below sees
        // rings that only the ip server moves.
        let mut ends = link.driver_ends()?;
        let capture = link.capture()?.producer()?;
        if let Some(bell) = ip_bell {
            ends.rx.set_doorbell(bell.clone());
            ends.tx_return.set_doorbell(bell);
        }
        // Scan the rings before reading the ownership tables (see keepnet_ipc::pool).
        let (out, inc) = link.driver_in_flight()?;
        let mut free = FreeList::recover(&link.rx_pool, DRIVER, &out, &inc);
        let (tx_held, tx_retakes) = link.tx_pool.recover(DRIVER, &out, &inc);
        let tx_return_backlog: Vec<Descriptor> = tx_held
            .iter()
            .map(|&i| link.tx_pool.descriptor(i, 0))
            .collect();
        let counters = Counters::new(control, backend.as_ref());
        let rx_retakes = free.retakes_mut().len();
        let retakes = (rx_retakes + tx_retakes.len()) as u64;
        control.counter("recover.rx_buffers").add(free.len() as u64);
        control
            .counter("recover.tx_buffers")
            .add(tx_return_backlog.len() as u64);
        control.counter("recover.retakes").add(retakes);
        info!(
            rx_free = free.len(),
            tx_to_return = tx_return_backlog.len(),
            retakes,
            "link recovered"
        );
        Ok(Driver {
            backend,
            link,
            ends,
            free,
            tx_retakes,
            tx_return_backlog,
            stalled: None,
            capture,
            counters,
            scratch: vec![0; MAX_FRAME as usize],
            rx_batch: Vec::with_capacity(RX_BATCH),
            tx_batch: vec![Descriptor::default(); TX_BATCH],
        })
    }

    /// Builds the driver from what the supervisor handed over (see the crate's binary):
    /// region `link`; per [`DriverConfig::from_env`], fd `tap` or region `wire` (with the
    /// optional eventfds `wire.rx` and `wire.peer`); optionally region `peer.ip` (the ip
    /// server's control block) and fd `bell.ip` (its doorbell's eventfd).
    pub fn from_boot(boot: &mut Boot) -> Result<Driver, DriverError> {
        let config = DriverConfig::from_env()?;
        let link = Link::open(boot.region("link", RegionKind::RINGS)?)?;
        let backend: Box<dyn LinkBackend> = match config {
            DriverConfig::Tap => {
                let fd = boot.fd("tap").ok_or(DriverError::NoTapFd)?;
                let tap = Tap::from_fd(fd)?;
                info!(device = tap.name(), "backend: TAP");
                Box::new(tap)
            }
            DriverConfig::Wire { side, faults } => {
                let wire = Wire::open(boot.region("wire", RegionKind::RINGS)?)?;
                let mut end = wire.end(side, faults)?;
                if let Some(fd) = boot.fd("wire.rx") {
                    end = end.with_rx_eventfd(fd);
                }
                if let Some(fd) = boot.fd("wire.peer") {
                    end = end.with_peer_eventfd(fd);
                }
                info!(?side, "backend: memory wire");
                Box::new(end)
            }
        };
        let ip_bell = match boot.region("peer.ip", RegionKind::CONTROL) {
            Ok(r) => {
                let cb = ControlBlock::open(r)?;
                let cb = match boot.fd("bell.ip") {
                    Some(fd) => cb.with_bell_eventfd(fd),
                    None => cb,
                };
                Some(cb.doorbell().clone())
            }
            Err(BootError::NoRegion(_)) => {
                warn!("no region peer.ip: the ip server is not woken, it must poll");
                None
            }
            Err(e) => return Err(e.into()),
        };
        Driver::new(link, backend, boot.control(), ip_bell)
    }

    /// The link region.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Writes one taken buffer to the backend. Returns false if the backend would block.
    fn send_buffer(&mut self, pool_id: u16, r: &BufRef) -> bool {
        let pool = pool_of(&self.link, pool_id);
        // SAFETY: `r` was validated and taken by this driver (`BufferPool::take` recorded us as
        // owner before the ring slot was committed), so under the ownership protocol no other
        // process writes the buffer until we hand it back, which happens after this borrow.
        let frame = unsafe { pool.bytes(r) };
        let result = self.backend.send(frame);
        match result {
            Ok(true) => {
                self.counters.tx_frames.inc();
                self.counters.tx_bytes.add(frame.len() as u64);
                if self.link.capture_enabled() {
                    capture(&mut self.capture, &self.counters, CAPTURE_TX, frame);
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.counters.tx_error.inc();
                warn!(%e, len = r.len(), "backend refused a frame");
                true
            }
        }
    }

    /// Hands a buffer we hold back to its home.
    fn release(&mut self, pool_id: u16, r: &BufRef) {
        if pool_id == RX_POOL {
            self.free.put(r.index());
        } else {
            self.tx_return_backlog
                .push(self.link.tx_pool.descriptor(r.index(), 0));
        }
    }

    fn transmit(&mut self) -> Result<u64, ServerError> {
        if let Some((pool, r)) = self.stalled.take() {
            if !self.send_buffer(pool, &r) {
                self.stalled = Some((pool, r));
                return Ok(0);
            }
            self.release(pool, &r);
        }
        self.ends.tx.rewind();
        let n = self.ends.tx.read(&mut self.tx_batch)?;
        let mut handled = 0;
        let mut work = 0;
        while handled < n {
            let d = self.tx_batch[handled];
            handled += 1;
            let taken = match d.pool {
                RX_POOL => self
                    .link
                    .rx_pool
                    .take(&d, IP, DRIVER, self.free.retakes_mut()),
                TX_POOL => self.link.tx_pool.take(&d, IP, DRIVER, &mut self.tx_retakes),
                _ => {
                    // Let the pool count it under its own reason, too.
                    let _ = self.link.tx_pool.check(&d);
                    self.counters.tx_bad_descriptor.inc();
                    continue;
                }
            };
            let r = match taken {
                Ok(r) => r,
                Err(e) => {
                    self.counters.tx_bad_descriptor.inc();
                    warn!(%e, "bad tx descriptor dropped");
                    continue;
                }
            };
            work += 1;
            if !self.send_buffer(d.pool, &r) {
                // Keep the frame (we own it now) and stop; the rest stays on the ring.
                self.counters.tx_stalls.inc();
                self.stalled = Some((d.pool, r));
                break;
            }
            self.release(d.pool, &r);
        }
        self.ends.tx.commit(handled)?;
        Ok(work)
    }

    fn return_tx_buffers(&mut self) -> Result<(), ServerError> {
        if !self.tx_return_backlog.is_empty() {
            let pushed = self.ends.tx_return.push_slice(&self.tx_return_backlog)?;
            self.tx_return_backlog.drain(..pushed);
        }
        Ok(())
    }

    fn receive(&mut self) -> Result<u64, ServerError> {
        let room = self.ends.rx.free_slots()?.min(RX_BATCH);
        self.rx_batch.clear();
        let mut frames = 0;
        while frames < RX_BATCH {
            let slot = if self.rx_batch.len() < room {
                self.free.get()
            } else {
                None
            };
            let Some(index) = slot else {
                if self.backend.holds_frames() {
                    // Backpressure: the frames wait on the wire until buffers come back.
                    break;
                }
                // No buffer or no room: read the frame anyway and drop it.
                match self.backend.recv(&mut self.scratch) {
                    Ok(Some(n)) => {
                        frames += 1;
                        if self.rx_batch.len() < room {
                            self.counters.rx_no_buffer.inc();
                        } else {
                            self.counters.rx_ring_full.inc();
                        }
                        if self.link.capture_enabled() {
                            capture(
                                &mut self.capture,
                                &self.counters,
                                CAPTURE_RX,
                                &self.scratch[..n],
                            );
                        }
                        continue;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.counters.rx_error.inc();
                        warn!(%e, "backend read failed");
                        break;
                    }
                }
            };
            let pool = &self.link.rx_pool;
            let r = match pool.check(&pool.descriptor(index, MAX_FRAME)) {
                Ok(r) => r,
                Err(_) => {
                    // Cannot happen (free-list indices are in range and `descriptor` clamps
                    // the length), but a refusal must not become a panic.
                    self.free.put(index);
                    break;
                }
            };
            // SAFETY: buffer `index` came off this driver's free list: the ownership table
            // names the driver and no descriptor for it is on any ring, so no other process
            // reads or writes it until we publish its descriptor below, after this borrow.
            let buf = unsafe { pool.bytes_mut(&r) };
            match self.backend.recv(buf) {
                Ok(Some(n)) => {
                    frames += 1;
                    self.counters.rx_frames.inc();
                    self.counters.rx_bytes.add(n as u64);
                    if self.link.capture_enabled() {
                        capture(&mut self.capture, &self.counters, CAPTURE_RX, &buf[..n]);
                    }
                    let d = self.link.rx_pool.descriptor(index, n as u32);
                    self.rx_batch.push(d);
                }
                Ok(None) => {
                    self.free.put(index);
                    break;
                }
                Err(e) => {
                    self.free.put(index);
                    self.counters.rx_error.inc();
                    warn!(%e, "backend read failed");
                    break;
                }
            }
        }
        if !self.rx_batch.is_empty() {
            let pushed = self.ends.rx.push_slice(&self.rx_batch)?;
            // `room` was free a moment ago and only the ip server frees more, so this is
            // belt and braces.
            for d in &self.rx_batch[pushed..] {
                self.free.put(d.index);
                self.counters.rx_ring_full.inc();
            }
        }
        Ok(frames as u64)
    }

    /// Mirrors the backend's own counters (cumulative, like ours) into the control block.
    fn sync_backend_counters(&mut self) {
        for ((_, value), (_, c)) in self
            .backend
            .counters()
            .into_iter()
            .zip(&self.counters.backend)
        {
            let have = c.get();
            if value > have {
                c.add(value - have);
            }
        }
    }
}

/// Copies a frame onto the capture ring; a full ring drops the copy and counts it.
fn capture(ring: &mut Producer<CaptureRecord>, counters: &Counters, direction: u32, frame: &[u8]) {
    let mut rec = CaptureRecord {
        ts_ns: realtime_ns(),
        orig_len: frame.len() as u32,
        direction,
        ..CaptureRecord::default()
    };
    let n = frame.len().min(CAPTURE_SNAPLEN);
    rec.data[..n].copy_from_slice(&frame[..n]);
    match ring.push(rec) {
        Ok(()) => counters.capture_frames.inc(),
        Err(_) => counters.capture_full.inc(),
    }
}

fn pool_of(link: &Link, id: u16) -> &BufferPool {
    if id == RX_POOL {
        &link.rx_pool
    } else {
        &link.tx_pool
    }
}

/// CLOCK_REALTIME in ns (capture timestamps).
fn realtime_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

impl Server for Driver {
    fn poll(&mut self) -> Result<Progress, ServerError> {
        let mut work = self.free.collect(
            &self.link.rx_pool,
            &mut self.ends.rx_return,
            IP,
            RETURN_BATCH,
        )? as u64;
        work += self.transmit()?;
        self.return_tx_buffers()?;
        if let Err(e) = self.backend.flush() {
            self.counters.tx_error.inc();
            warn!(%e, "backend flush failed");
        }
        work += self.receive()?;
        if work > 0 {
            self.sync_backend_counters();
        }
        Ok(Progress(work))
    }

    fn has_work(&mut self) -> bool {
        // Received frames count as work only when there is somewhere to put them (or, for a
        // TAP, when they must be read and dropped); returned buffers ring our doorbell.
        let can_receive = !self.backend.holds_frames() || !self.free.is_empty();
        self.ends.tx.has_data()
            || self.ends.rx_return.has_data()
            || self.backend.deferred_due()
            || (can_receive && self.backend.ready())
    }

    fn wait_fd(&self) -> Option<RawFd> {
        self.backend.wait_fd()
    }

    fn scribble(&mut self, garbage: &mut Scribbler) -> usize {
        garbage.fill(&mut self.ends.rx, Scribbler::descriptor)
            + garbage.fill(&mut self.ends.tx_return, Scribbler::descriptor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FaultConfig, Side, Wire, WireEnd};
    use keepnet_server::wiring::HEADROOM;

    struct Bench {
        control: ControlBlock,
        link: Link,
        wire: Wire,
        ip: keepnet_server::wiring::IpEnds,
        ip_tx_free: FreeList,
    }

    fn bench(tag: &str, frames: u32, wire_slots: usize) -> Bench {
        let control = ControlBlock::create(&format!("{tag}-ctl"), 0).unwrap();
        let link = Link::create(&format!("{tag}-link"), frames).unwrap();
        let wire = Wire::create(&format!("{tag}-wire"), wire_slots).unwrap();
        let ip = link.ip_ends().unwrap();
        let (out, inc) = link.ip_in_flight().unwrap();
        let ip_tx_free = FreeList::recover(&link.tx_pool, IP, &out, &inc);
        Bench {
            control,
            link,
            wire,
            ip,
            ip_tx_free,
        }
    }

    impl Bench {
        fn driver(&self) -> Driver {
            let end = self.wire.end(Side::A, FaultConfig::none()).unwrap();
            Driver::new(self.link.clone(), Box::new(end), &self.control, None).unwrap()
        }
        fn far(&self) -> WireEnd {
            self.wire.end(Side::B, FaultConfig::none()).unwrap()
        }
        /// ip queues a frame whose first byte is `tag` in a TX_POOL buffer.
        fn ip_send(&mut self, tag: u8) -> Descriptor {
            let i = self.ip_tx_free.get().unwrap();
            self.link.tx_pool.write(i, HEADROOM, &[tag; 60]).unwrap();
            let d = self.link.tx_pool.descriptor(i, 60);
            self.ip.tx.push(d).unwrap();
            d
        }
        fn counter(&self, name: &str) -> u64 {
            self.control.counter(name).get()
        }
        fn far_frames(far: &mut WireEnd) -> Vec<u8> {
            let mut buf = [0u8; 2048];
            let mut tags = Vec::new();
            while let Some(n) = far.recv(&mut buf).unwrap() {
                assert_eq!(n, 60);
                tags.push(buf[0]);
            }
            tags
        }
    }

    #[test]
    fn a_fresh_driver_recovers_what_its_predecessor_held() {
        let mut b = bench("t-recover", 8, 16);
        let d0 = b.ip_send(10);
        let d1 = b.ip_send(11);
        let _d2 = b.ip_send(12);
        // The predecessor: takes d0 and d1 from tx but commits only d0's slot, publishes RX
        // buffer 5 on rx, and dies with everything else in hand.
        {
            let mut dead = b.link.driver_ends().unwrap();
            let mut got = [Descriptor::default(); 3];
            assert_eq!(dead.tx.read(&mut got).unwrap(), 3);
            let mut none = Retakes::none();
            b.link.tx_pool.take(&d0, IP, DRIVER, &mut none).unwrap();
            b.link.tx_pool.take(&d1, IP, DRIVER, &mut none).unwrap();
            dead.tx.commit(1).unwrap();
            dead.rx.push(b.link.rx_pool.descriptor(5, 60)).unwrap();
        }
        let mut driver = b.driver();
        assert_eq!(
            b.counter("recover.rx_buffers"),
            7,
            "all RX buffers but the one on rx"
        );
        assert_eq!(
            b.counter("recover.tx_buffers"),
            1,
            "d0: taken and committed"
        );
        assert_eq!(
            b.counter("recover.retakes"),
            1,
            "d1: taken, slot not committed"
        );
        let mut far = b.far();
        driver.poll().unwrap();
        // d0's frame is lost with its sender; d1 (re-taken) and d2 go out.
        assert_eq!(Bench::far_frames(&mut far), vec![11, 12]);
        assert_eq!(b.counter("drop.tx_bad_descriptor"), 0);
        // The ip side takes the RX frame and returns it; it collects its TX buffers.
        let rx = b.ip.rx.pop().unwrap().unwrap();
        let r = b
            .link
            .rx_pool
            .take(&rx, DRIVER, IP, &mut Retakes::none())
            .unwrap();
        b.ip.rx_return
            .push(b.link.rx_pool.descriptor(r.index(), 0))
            .unwrap();
        let got = b
            .ip_tx_free
            .collect(&b.link.tx_pool, &mut b.ip.tx_return, DRIVER, 64)
            .unwrap();
        assert_eq!(got, 3);
        driver.poll().unwrap();
        assert_eq!(b.link.rx_pool.accounting().get(&DRIVER), Some(&8));
        assert_eq!(b.link.tx_pool.accounting().get(&IP), Some(&8));
        // The retake was used up: replaying d1 now is refused.
        let i = b.ip_tx_free.get().unwrap();
        b.ip_tx_free.put(i);
        b.ip.tx.push(d1).unwrap();
        driver.poll().unwrap();
        assert_eq!(b.counter("drop.tx_bad_descriptor"), 1);
        assert!(Bench::far_frames(&mut far).is_empty());
    }

    #[test]
    fn rx_buffers_taken_but_not_committed_are_taken_again() {
        let mut b = bench("t-retake-rx", 4, 16);
        let mut far = b.far();
        {
            let mut first = b.driver();
            far.send(&[21; 60]).unwrap();
            far.send(&[22; 60]).unwrap();
            first.poll().unwrap();
        }
        // ip echoes the first frame in its own buffer and returns the second.
        let mut none = Retakes::none();
        let e = b.ip.rx.pop().unwrap().unwrap();
        let re = b.link.rx_pool.take(&e, DRIVER, IP, &mut none).unwrap();
        let echo = b.link.rx_pool.span(re.index(), re.offset(), re.len());
        b.ip.tx.push(echo).unwrap();
        let r = b.ip.rx.pop().unwrap().unwrap();
        let rr = b.link.rx_pool.take(&r, DRIVER, IP, &mut none).unwrap();
        let ret = b.link.rx_pool.descriptor(rr.index(), 0);
        b.ip.rx_return.push(ret).unwrap();
        // A driver takes both and dies before committing either slot.
        {
            let mut dead = b.link.driver_ends().unwrap();
            let mut one = [Descriptor::default(); 1];
            assert_eq!(dead.tx.read(&mut one).unwrap(), 1);
            assert_eq!(dead.rx_return.read(&mut one).unwrap(), 1);
            b.link.rx_pool.take(&echo, IP, DRIVER, &mut none).unwrap();
            b.link.rx_pool.take(&ret, IP, DRIVER, &mut none).unwrap();
        }
        let mut driver = b.driver();
        assert_eq!(b.counter("recover.retakes"), 2);
        driver.poll().unwrap();
        assert_eq!(
            Bench::far_frames(&mut far),
            vec![21],
            "the echo goes out once"
        );
        assert_eq!(b.counter("drop.tx_bad_descriptor"), 0);
        assert_eq!(b.link.rx_pool.drops().total(), 0);
        assert_eq!(b.link.rx_pool.accounting().get(&DRIVER), Some(&4));
        // All four buffers are usable again.
        for tag in 30..34u8 {
            far.send(&[tag; 60]).unwrap();
        }
        driver.poll().unwrap();
        assert_eq!(b.counter("rx.frames"), 2 + 4);
    }

    #[test]
    fn a_full_wire_stalls_tx_without_losing_or_reordering() {
        let mut b = bench("t-stall", 8, 1);
        let mut driver = b.driver();
        let mut far = b.far();
        for tag in 1..=3 {
            b.ip_send(tag);
        }
        let mut seen = Vec::new();
        for _ in 0..10 {
            driver.poll().unwrap();
            seen.extend(Bench::far_frames(&mut far));
        }
        assert_eq!(seen, vec![1, 2, 3]);
        assert!(b.counter("tx.stalls") >= 1);
        assert_eq!(b.counter("tx.frames"), 3);
        let n = b
            .ip_tx_free
            .collect(&b.link.tx_pool, &mut b.ip.tx_return, DRIVER, 64)
            .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn wire_frames_wait_for_buffers_instead_of_dropping() {
        let mut b = bench("t-backpressure", 2, 16);
        let mut driver = b.driver();
        let mut far = b.far();
        for tag in 1..=5u8 {
            assert!(far.send(&[tag; 60]).unwrap());
        }
        driver.poll().unwrap();
        assert_eq!(b.counter("rx.frames"), 2, "two buffers, two frames");
        assert!(!driver.has_work(), "no buffer: waiting frames are not work");
        let ip = &mut b.ip;
        let mut seen = Vec::new();
        for _ in 0..10 {
            while let Some(d) = ip.rx.pop().unwrap() {
                let r = b
                    .link
                    .rx_pool
                    .take(&d, DRIVER, IP, &mut Retakes::none())
                    .unwrap();
                let mut buf = [0u8; 60];
                b.link.rx_pool.read(&r, &mut buf);
                seen.push(buf[0]);
                ip.rx_return
                    .push(b.link.rx_pool.descriptor(r.index(), 0))
                    .unwrap();
            }
            assert!(driver.has_work() || seen.len() == 5);
            driver.poll().unwrap();
        }
        assert_eq!(seen, vec![1, 2, 3, 4, 5]);
        assert_eq!(b.counter("drop.rx_no_buffer"), 0);
    }
}
