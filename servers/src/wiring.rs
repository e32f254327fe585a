//! How servers are wired together: endpoint ids, and the layout of the regions between them.
//! The supervisor creates every region here; servers open them (DESIGN rule 1).
//!
//! ## The link region (driver <-> ip)
//!
//! Two frame pools, each with a home that allocates from it:
//! * pool [`RX_POOL`], home [`DRIVER`]: frames the driver received;
//! * pool [`TX_POOL`], home [`IP`]: frames the ip server builds.
//!
//! Four rings of [`Descriptor`]s:
//! * `rx` (driver -> ip): received frames;
//! * `tx` (ip -> driver): frames to send, from either pool (an echo reply is often the
//!   request's own buffer, rewritten in place);
//! * `rx_return` (ip -> driver): RX_POOL buffers the ip server is done with;
//! * `tx_return` (driver -> ip): TX_POOL buffers the driver has sent.
//!
//! A buffer goes back to its pool's home when its holder is done with it: the driver frees
//! an RX_POOL buffer it sent straight onto its free list, and pushes a TX_POOL buffer it sent
//! onto `tx_return`; the ip server does the mirror image. The ownership protocol and crash
//! recovery are keepnet-ipc's (see `keepnet_ipc::pool`).
//!
//! A capture ring (driver -> supervisor) carries a copy of every frame while a capture runs.

use std::sync::atomic::Ordering;

use keepnet_ipc::{
    BufferPool, Consumer, Descriptor, EndpointId, Pod, PoolError, Producer, Region, RegionError,
    RegionKind, RegionLayout, Ring, RingError,
};

/// The driver.
pub const DRIVER: EndpointId = EndpointId(1);
/// The ip server.
pub const IP: EndpointId = EndpointId(2);
/// The udp server.
pub const UDP: EndpointId = EndpointId(3);
/// The tcp server.
pub const TCP: EndpointId = EndpointId(4);

/// Pool of frames received by the driver.
pub const RX_POOL: u16 = 1;
/// Pool of frames built by the ip server.
pub const TX_POOL: u16 = 2;
/// Bytes per frame buffer, headroom included.
pub const FRAME_BUF: u32 = 16384;
/// Headroom before a frame, for headers prepended in place.
pub const HEADROOM: u32 = 128;
/// Largest frame a buffer holds.
pub const MAX_FRAME: u32 = FRAME_BUF - HEADROOM;
/// Slots per descriptor ring.
pub const RING_SLOTS: usize = 1024;
/// Bytes of each frame kept in a capture record.
pub const CAPTURE_SNAPLEN: usize = 2048;
/// Records in the capture ring.
pub const CAPTURE_SLOTS: usize = 1024;

const TAG_RX: u32 = 0x11_0001;
const TAG_TX: u32 = 0x11_0002;
const TAG_RX_RET: u32 = 0x11_0003;
const TAG_TX_RET: u32 = 0x11_0004;
const TAG_CAPTURE: u32 = 0x11_0005;

/// A frame copied for `keepnet capture`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CaptureRecord {
    /// CLOCK_REALTIME ns when the driver saw the frame.
    pub ts_ns: u64,
    /// Length of the frame on the wire.
    pub orig_len: u32,
    /// 0 received, 1 sent.
    pub direction: u32,
    /// The first `min(orig_len, CAPTURE_SNAPLEN)` bytes.
    pub data: [u8; CAPTURE_SNAPLEN],
}

// SAFETY: repr(C), integers and a byte array, no padding (8 + 4 + 4 + 2048), valid for any
// bits, no pointers.
#[allow(unsafe_code)]
unsafe impl Pod for CaptureRecord {}

impl Default for CaptureRecord {
    fn default() -> Self {
        CaptureRecord {
            ts_ns: 0,
            orig_len: 0,
            direction: 0,
            data: [0; CAPTURE_SNAPLEN],
        }
    }
}

/// Why a region could not be wired.
#[derive(Debug, thiserror::Error)]
pub enum WiringError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

#[derive(Clone, Copy, Debug)]
struct LinkOffsets {
    rx_pool: usize,
    tx_pool: usize,
    rx: usize,
    tx: usize,
    rx_ret: usize,
    tx_ret: usize,
    capture: usize,
    capture_on: usize,
    size: usize,
}

fn link_offsets(frames: u32) -> LinkOffsets {
    let mut l = RegionLayout::new();
    let ring = Ring::<Descriptor>::size_in_region(RING_SLOTS);
    let a = Ring::<Descriptor>::ALIGN;
    let capture_on = l.place(64, 64);
    let rx = l.place(ring, a);
    let tx = l.place(ring, a);
    let rx_ret = l.place(ring, a);
    let tx_ret = l.place(ring, a);
    let capture = l.place(Ring::<CaptureRecord>::size_in_region(CAPTURE_SLOTS), a);
    let rx_pool = l.place(
        BufferPool::size_in_region(frames, FRAME_BUF),
        BufferPool::ALIGN,
    );
    let tx_pool = l.place(
        BufferPool::size_in_region(frames, FRAME_BUF),
        BufferPool::ALIGN,
    );
    LinkOffsets {
        rx_pool,
        tx_pool,
        rx,
        tx,
        rx_ret,
        tx_ret,
        capture,
        capture_on,
        size: l.size(),
    }
}

/// The region between the driver and the ip server.
#[derive(Clone, Debug)]
pub struct Link {
    region: Region,
    off: LinkOffsets,
    /// Frames the driver received (home: driver).
    pub rx_pool: BufferPool,
    /// Frames the ip server builds (home: ip).
    pub tx_pool: BufferPool,
}

impl Link {
    /// Frames per pool by default.
    pub const DEFAULT_FRAMES: u32 = 1024;

    /// Supervisor: creates the region with `frames` buffers per pool. RX_POOL buffers start
    /// owned by the driver, TX_POOL buffers by the ip server.
    pub fn create(name: &str, frames: u32) -> Result<Link, WiringError> {
        let off = link_offsets(frames);
        let region = Region::create(name, RegionKind::RINGS, off.size)?;
        let rx_pool = BufferPool::init(
            &region,
            off.rx_pool,
            RX_POOL,
            frames,
            FRAME_BUF,
            HEADROOM,
            DRIVER,
        )?;
        let tx_pool = BufferPool::init(
            &region,
            off.tx_pool,
            TX_POOL,
            frames,
            FRAME_BUF,
            HEADROOM,
            IP,
        )?;
        Ring::<Descriptor>::init(&region, off.rx, RING_SLOTS, TAG_RX)?;
        Ring::<Descriptor>::init(&region, off.tx, RING_SLOTS, TAG_TX)?;
        Ring::<Descriptor>::init(&region, off.rx_ret, RING_SLOTS, TAG_RX_RET)?;
        Ring::<Descriptor>::init(&region, off.tx_ret, RING_SLOTS, TAG_TX_RET)?;
        Ring::<CaptureRecord>::init(&region, off.capture, CAPTURE_SLOTS, TAG_CAPTURE)?;
        Ok(Link {
            region,
            off,
            rx_pool,
            tx_pool,
        })
    }

    /// A server: opens a link region handed over by the supervisor.
    pub fn open(region: Region) -> Result<Link, WiringError> {
        // The pools carry their own geometry; find the frame count from the RX pool's header
        // by opening it at the offset the smallest layout would use, then re-derive.
        let probe = link_offsets(1);
        let rx_probe = BufferPool::open(&region, probe.rx_pool, RX_POOL)?;
        let off = link_offsets(rx_probe.count());
        let rx_pool = BufferPool::open(&region, off.rx_pool, RX_POOL)?;
        let tx_pool = BufferPool::open(&region, off.tx_pool, TX_POOL)?;
        Ok(Link {
            region,
            off,
            rx_pool,
            tx_pool,
        })
    }

    /// The region, to hand to servers.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// driver -> ip: received frames.
    pub fn rx(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.rx, TAG_RX)
    }
    /// ip -> driver: frames to send.
    pub fn tx(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.tx, TAG_TX)
    }
    /// ip -> driver: RX_POOL buffers returned.
    pub fn rx_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.rx_ret, TAG_RX_RET)
    }
    /// driver -> ip: TX_POOL buffers returned.
    pub fn tx_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.tx_ret, TAG_TX_RET)
    }
    /// driver -> supervisor: captured frames.
    pub fn capture(&self) -> Result<Ring<CaptureRecord>, RingError> {
        Ring::open(&self.region, self.off.capture, TAG_CAPTURE)
    }

    /// Whether a capture is running (set by the supervisor, read by the driver).
    pub fn capture_enabled(&self) -> bool {
        self.region
            .atomic_u64(self.off.capture_on)
            .is_ok_and(|a| a.load(Ordering::Relaxed) != 0)
    }

    /// Turns the capture mirror on or off.
    pub fn set_capture(&self, on: bool) {
        if let Ok(a) = self.region.atomic_u64(self.off.capture_on) {
            a.store(u64::from(on), Ordering::Release);
        }
    }

    /// The driver's ends: produce `rx` and `tx_return`, consume `tx` and `rx_return`.
    pub fn driver_ends(&self) -> Result<DriverEnds, RingError> {
        Ok(DriverEnds {
            rx: self.rx()?.producer()?,
            tx: self.tx()?.consumer()?,
            rx_return: self.rx_return()?.consumer()?,
            tx_return: self.tx_return()?.producer()?,
        })
    }

    /// The ip server's ends: produce `tx` and `rx_return`, consume `rx` and `tx_return`.
    pub fn ip_ends(&self) -> Result<IpEnds, RingError> {
        Ok(IpEnds {
            rx: self.rx()?.consumer()?,
            tx: self.tx()?.producer()?,
            rx_return: self.rx_return()?.producer()?,
            tx_return: self.tx_return()?.consumer()?,
        })
    }

    /// Descriptors in flight on the rings the driver sends on and receives from, for
    /// `BufferPool::recover` after a restart: (outgoing, incoming).
    pub fn driver_in_flight(&self) -> Result<(Vec<Descriptor>, Vec<Descriptor>), RingError> {
        let mut out = self.rx()?.in_flight()?;
        out.extend(self.tx_return()?.in_flight()?);
        let mut inc = self.tx()?.in_flight()?;
        inc.extend(self.rx_return()?.in_flight()?);
        Ok((out, inc))
    }

    /// The same for the ip server: (outgoing, incoming).
    pub fn ip_in_flight(&self) -> Result<(Vec<Descriptor>, Vec<Descriptor>), RingError> {
        let (d_out, d_in) = self.driver_in_flight()?;
        Ok((d_in, d_out))
    }
}

/// The driver's ring ends on a link.
pub struct DriverEnds {
    pub rx: Producer<Descriptor>,
    pub tx: Consumer<Descriptor>,
    pub rx_return: Consumer<Descriptor>,
    pub tx_return: Producer<Descriptor>,
}

/// The ip server's ring ends on a link.
pub struct IpEnds {
    pub rx: Consumer<Descriptor>,
    pub tx: Producer<Descriptor>,
    pub rx_return: Producer<Descriptor>,
    pub tx_return: Consumer<Descriptor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_opens_with_same_layout() {
        let link = Link::create("t-link", 64).unwrap();
        let again = Link::open(link.region().reopen(RegionKind::RINGS).unwrap()).unwrap();
        assert_eq!(again.rx_pool.count(), 64);
        assert_eq!(again.tx_pool.count(), 64);
        let _d = again.driver_ends().unwrap();
        let _i = link.ip_ends().unwrap();
        assert!(!again.capture_enabled());
        link.set_capture(true);
        assert!(again.capture_enabled());
    }
}
