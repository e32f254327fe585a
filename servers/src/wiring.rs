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
//!
//! ## The transport link region (ip <-> udp, ip <-> tcp)
//!
//! [`TransportLink`] is the same pattern one layer up, carrying IP payloads (the transport
//! header and its data) instead of frames. A small header placed first records the IP protocol
//! number and the transport's endpoint id; both are checked on open. Two datagram pools:
//! * pool [`DELIVER_POOL`], home [`IP`]: datagrams the ip server delivers;
//! * pool [`SEND_POOL`], home the transport ([`UDP`] or [`TCP`]): datagrams it sends.
//!
//! Four rings:
//! * `deliver` (ip -> transport, [`DatagramSlot`]): received datagrams, and ICMP errors about
//!   datagrams the transport sent ([`DatagramSlot::KIND_ICMP_ERROR`]);
//! * `deliver_return` (transport -> ip, [`Descriptor`]): DELIVER_POOL buffers back home;
//! * `send` (transport -> ip, [`DatagramSlot`]): datagrams to send;
//! * `send_return` (ip -> transport, [`Descriptor`]): SEND_POOL buffers back home.
//!
//! Each buffer makes one round trip: the home fills it, pushes it on its outgoing ring, the
//! peer takes it (before committing the slot), reads it and pushes it back on the return
//! ring. Neither side keeps the other's buffers. Crash recovery is the Link's:
//! [`TransportLink::ip_in_flight`] and [`TransportLink::transport_in_flight`] give the
//! descriptors to pass to `BufferPool::recover` / `FreeList::recover`.

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
    #[error("not a transport link region (magic {0:#018x})")]
    NotTransportLink(u64),
    #[error("transport link: {what} is {found}, expected {expected}")]
    TransportMismatch {
        what: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("transport link: invalid {what} {value}")]
    TransportInvalid { what: &'static str, value: u32 },
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

// ---------------------------------------------------------------------------------------------
// ip <-> transport
// ---------------------------------------------------------------------------------------------

/// Pool of datagrams the ip server delivers to a transport (home: ip).
pub const DELIVER_POOL: u16 = 3;
/// Pool of datagrams a transport sends (home: the transport).
pub const SEND_POOL: u16 = 4;
/// Bytes per datagram buffer, headroom included: the largest IPv4 payload (65515 bytes)
/// fits after the headroom.
pub const DATAGRAM_BUF: u32 = 65536 + DATAGRAM_HEADROOM;
/// Headroom before a datagram's payload.
pub const DATAGRAM_HEADROOM: u32 = 128;
/// Largest IP payload a datagram buffer holds.
pub const MAX_DATAGRAM: u32 = DATAGRAM_BUF - DATAGRAM_HEADROOM;
/// Most buffers a transport link's pools may have.
pub const MAX_TRANSPORT_BUFFERS: u32 = 1 << 16;

const TLINK_MAGIC: u64 = u64::from_le_bytes(*b"KNTLINK1");
const TAG_DELIVER: u32 = 0x12_0001;
const TAG_DELIVER_RET: u32 = 0x12_0002;
const TAG_SEND: u32 = 0x12_0003;
const TAG_SEND_RET: u32 = 0x12_0004;

/// A datagram on the `deliver` or `send` ring of a [`TransportLink`]: 40 bytes, no holes.
///
/// | offset | field | |
/// |---|---|---|
/// | 0 | `desc` | the buffer: the IP payload (transport header and data) |
/// | 16 | `src` | IPv4 source, **host order** (`u32::from(Ipv4Addr)`) |
/// | 20 | `dst` | IPv4 destination, host order |
/// | 24 | `protocol` | IP protocol number |
/// | 25 | `ttl` | TTL as received (deliver); 0 on send (the ip server uses its own) |
/// | 26 | `kind` | [`DatagramSlot::KIND_DATAGRAM`] or [`DatagramSlot::KIND_ICMP_ERROR`] |
/// | 27 | `icmp_type` | kind 1: the ICMP type (3, 11, 12) |
/// | 28 | `icmp_code` | kind 1: the ICMP code (3 = port unreachable...) |
/// | 29 | `broadcast` | deliver: 1 if sent to a broadcast address (IP or link layer) |
/// | 30 | `_pad` | zero |
/// | 32 | `icmp_rest` | kind 1: bytes 4..8 of the ICMP header, big-endian as a u32 (the next-hop MTU of "fragmentation needed" is its low 16 bits) |
/// | 36 | `header_len` | deliver, kind 0: bytes of the received IP header (options included) that the ip server copied into the headroom right before the payload; else 0 |
///
/// On `deliver`, kind 0 is a datagram addressed to us (src: the sender, dst: our address or a
/// broadcast address). Kind 1 is an ICMP error about a datagram this transport sent: `src` is
/// the host or router that sent the error, `dst` our address, `protocol` the quoted
/// datagram's protocol, and the payload is the quoted original IP header (options included)
/// followed by at least 8 bytes of the original payload (the transport header's ports).
///
/// On `send`, the transport sets `desc`, `dst`, `protocol` (its own) and `src`: 0 lets the ip
/// server use our address, anything else must be our address. With `kind` 0 the ICMP and
/// `broadcast` fields are ignored and the ip server fragments as needed. With `kind` 2
/// ([`DatagramSlot::KIND_UNREACHABLE`]) the transport asks the ip server to answer a datagram
/// it was delivered with an ICMP destination unreachable (`icmp_code`, e.g. 3 = port
/// unreachable; RFC 792, RFC 1122 3.2.2.1): the payload is the quote, the original IP header
/// (as delivered in the headroom) followed by at least 8 bytes of its payload, and `dst` the
/// original sender. The ip server checks that the quote is of a datagram from `dst` to us.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatagramSlot {
    /// The buffer holding the IP payload.
    pub desc: Descriptor,
    /// IPv4 source address, host order.
    pub src: u32,
    /// IPv4 destination address, host order.
    pub dst: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// Time to live (as received).
    pub ttl: u8,
    /// 0: a datagram; 1: an ICMP error about a datagram we sent.
    pub kind: u8,
    /// Kind 1: ICMP type.
    pub icmp_type: u8,
    /// Kind 1: ICMP code.
    pub icmp_code: u8,
    /// 1 if received on a broadcast address.
    pub broadcast: u8,
    /// Zero.
    pub _pad: [u8; 2],
    /// Kind 1: bytes 4..8 of the ICMP header as a big-endian u32.
    pub icmp_rest: u32,
    /// Deliver, kind 0: length of the IP header copied right before the payload.
    pub header_len: u32,
}

impl DatagramSlot {
    /// `kind`: a datagram.
    pub const KIND_DATAGRAM: u8 = 0;
    /// `kind`: an ICMP error about a datagram the transport sent.
    pub const KIND_ICMP_ERROR: u8 = 1;
    /// `kind` on `send`: answer a delivered datagram with ICMP destination unreachable.
    pub const KIND_UNREACHABLE: u8 = 2;
}

const _: () = assert!(std::mem::size_of::<DatagramSlot>() == 40);
const _: () = assert!(std::mem::size_of::<DatagramSlot>() % 8 == 0);

// SAFETY: repr(C); a Descriptor (Pod, 16 bytes) then u32, u32, six u8, [u8; 2], u32, u32:
// offsets 16, 20, 24..30, 30, 32, 36, size 40 with alignment 4, so no implicit padding;
// every field is an integer valid for any bits; no pointers.
#[allow(unsafe_code)]
unsafe impl Pod for DatagramSlot {}

/// The header placed first in a transport link region (read once, privately, on open).
const TLINK_HEADER: usize = 64;
const TH_MAGIC: usize = 0;
const TH_PROTOCOL: usize = 8;
const TH_TRANSPORT: usize = 12;
const TH_BUFFERS: usize = 16;

#[derive(Clone, Copy, Debug)]
struct TransportOffsets {
    header: usize,
    deliver_pool: usize,
    send_pool: usize,
    deliver: usize,
    deliver_ret: usize,
    send: usize,
    send_ret: usize,
    slots: usize,
    size: usize,
}

/// Ring capacity for `buffers` buffers per pool: every buffer of a pool fits on any ring at
/// once, so a ring is never what holds a datagram or a returned buffer back.
fn transport_ring_slots(buffers: u32) -> usize {
    (buffers as usize).next_power_of_two().max(64)
}

fn transport_offsets(buffers: u32) -> TransportOffsets {
    let mut l = RegionLayout::new();
    let slots = transport_ring_slots(buffers);
    let header = l.place(TLINK_HEADER, 64);
    let a = Ring::<Descriptor>::ALIGN;
    let deliver = l.place(Ring::<DatagramSlot>::size_in_region(slots), a);
    let deliver_ret = l.place(Ring::<Descriptor>::size_in_region(slots), a);
    let send = l.place(Ring::<DatagramSlot>::size_in_region(slots), a);
    let send_ret = l.place(Ring::<Descriptor>::size_in_region(slots), a);
    let deliver_pool = l.place(
        BufferPool::size_in_region(buffers, DATAGRAM_BUF),
        BufferPool::ALIGN,
    );
    let send_pool = l.place(
        BufferPool::size_in_region(buffers, DATAGRAM_BUF),
        BufferPool::ALIGN,
    );
    TransportOffsets {
        header,
        deliver_pool,
        send_pool,
        deliver,
        deliver_ret,
        send,
        send_ret,
        slots,
        size: l.size(),
    }
}

/// The region between the ip server and one transport server (see the module doc).
#[derive(Clone, Debug)]
pub struct TransportLink {
    region: Region,
    off: TransportOffsets,
    protocol: u8,
    transport: EndpointId,
    /// Datagrams the ip server delivers (home: ip).
    pub deliver_pool: BufferPool,
    /// Datagrams the transport sends (home: the transport).
    pub send_pool: BufferPool,
}

impl TransportLink {
    /// Buffers per pool by default.
    pub const DEFAULT_BUFFERS: u32 = 256;

    /// Supervisor: creates the region for IP protocol `protocol` served by endpoint
    /// `transport`, with `buffers` buffers per pool. DELIVER_POOL buffers start owned by the
    /// ip server, SEND_POOL buffers by the transport.
    pub fn create(
        name: &str,
        protocol: u8,
        transport: EndpointId,
        buffers: u32,
    ) -> Result<TransportLink, WiringError> {
        check_transport_ids(protocol, transport)?;
        if buffers == 0 || buffers > MAX_TRANSPORT_BUFFERS {
            return Err(WiringError::TransportInvalid {
                what: "buffer count",
                value: buffers,
            });
        }
        let off = transport_offsets(buffers);
        let region = Region::create(name, RegionKind::RINGS, off.size)?;
        let deliver_pool = BufferPool::init(
            &region,
            off.deliver_pool,
            DELIVER_POOL,
            buffers,
            DATAGRAM_BUF,
            DATAGRAM_HEADROOM,
            IP,
        )?;
        let send_pool = BufferPool::init(
            &region,
            off.send_pool,
            SEND_POOL,
            buffers,
            DATAGRAM_BUF,
            DATAGRAM_HEADROOM,
            transport,
        )?;
        Ring::<DatagramSlot>::init(&region, off.deliver, off.slots, TAG_DELIVER)?;
        Ring::<Descriptor>::init(&region, off.deliver_ret, off.slots, TAG_DELIVER_RET)?;
        Ring::<DatagramSlot>::init(&region, off.send, off.slots, TAG_SEND)?;
        Ring::<Descriptor>::init(&region, off.send_ret, off.slots, TAG_SEND_RET)?;
        region.write_bytes(off.header + TH_PROTOCOL, &u32::from(protocol).to_le_bytes())?;
        region.write_bytes(off.header + TH_TRANSPORT, &transport.0.to_le_bytes())?;
        region.write_bytes(off.header + TH_BUFFERS, &buffers.to_le_bytes())?;
        region
            .atomic_u64(off.header + TH_MAGIC)?
            .store(TLINK_MAGIC, Ordering::Release);
        Ok(TransportLink {
            region,
            off,
            protocol,
            transport,
            deliver_pool,
            send_pool,
        })
    }

    /// A server: opens a transport link region handed over by the supervisor, checking its
    /// header and that both pools have the geometry it records.
    pub fn open(region: Region) -> Result<TransportLink, WiringError> {
        let header = transport_offsets(1).header;
        let magic = region
            .atomic_u64(header + TH_MAGIC)?
            .load(Ordering::Acquire);
        if magic != TLINK_MAGIC {
            return Err(WiringError::NotTransportLink(magic));
        }
        let word = |at: usize| -> Result<u32, WiringError> {
            let mut b = [0u8; 4];
            region.read_bytes(header + at, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let (protocol, transport, buffers) =
            (word(TH_PROTOCOL)?, word(TH_TRANSPORT)?, word(TH_BUFFERS)?);
        let protocol = u8::try_from(protocol).map_err(|_| WiringError::TransportInvalid {
            what: "protocol",
            value: protocol,
        })?;
        let transport = EndpointId(transport);
        check_transport_ids(protocol, transport)?;
        if buffers == 0 || buffers > MAX_TRANSPORT_BUFFERS {
            return Err(WiringError::TransportInvalid {
                what: "buffer count",
                value: buffers,
            });
        }
        let off = transport_offsets(buffers);
        let deliver_pool = BufferPool::open(&region, off.deliver_pool, DELIVER_POOL)?;
        let send_pool = BufferPool::open(&region, off.send_pool, SEND_POOL)?;
        for (what, pool) in [("deliver pool", &deliver_pool), ("send pool", &send_pool)] {
            if pool.count() != buffers {
                return Err(WiringError::TransportMismatch {
                    what,
                    found: pool.count(),
                    expected: buffers,
                });
            }
            if pool.buf_size() != DATAGRAM_BUF || pool.headroom() != DATAGRAM_HEADROOM {
                return Err(WiringError::TransportMismatch {
                    what,
                    found: pool.buf_size(),
                    expected: DATAGRAM_BUF,
                });
            }
        }
        Ok(TransportLink {
            region,
            off,
            protocol,
            transport,
            deliver_pool,
            send_pool,
        })
    }

    /// [`TransportLink::open`], also checking the protocol and the transport endpoint.
    pub fn open_for(
        region: Region,
        protocol: u8,
        transport: EndpointId,
    ) -> Result<TransportLink, WiringError> {
        let t = TransportLink::open(region)?;
        if t.protocol != protocol {
            return Err(WiringError::TransportMismatch {
                what: "protocol",
                found: u32::from(t.protocol),
                expected: u32::from(protocol),
            });
        }
        if t.transport != transport {
            return Err(WiringError::TransportMismatch {
                what: "transport endpoint",
                found: t.transport.0,
                expected: transport.0,
            });
        }
        Ok(t)
    }

    /// The region, to hand to servers.
    pub fn region(&self) -> &Region {
        &self.region
    }
    /// The IP protocol number this link carries.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }
    /// The transport endpoint (home of SEND_POOL).
    pub fn transport(&self) -> EndpointId {
        self.transport
    }

    /// ip -> transport: delivered datagrams and ICMP errors.
    pub fn deliver(&self) -> Result<Ring<DatagramSlot>, RingError> {
        Ring::open(&self.region, self.off.deliver, TAG_DELIVER)
    }
    /// transport -> ip: DELIVER_POOL buffers returned.
    pub fn deliver_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.deliver_ret, TAG_DELIVER_RET)
    }
    /// transport -> ip: datagrams to send.
    pub fn send(&self) -> Result<Ring<DatagramSlot>, RingError> {
        Ring::open(&self.region, self.off.send, TAG_SEND)
    }
    /// ip -> transport: SEND_POOL buffers returned.
    pub fn send_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.send_ret, TAG_SEND_RET)
    }

    /// The ip server's ends: produce `deliver` and `send_return`, consume `send` and
    /// `deliver_return`.
    pub fn ip_ends(&self) -> Result<IpTransportEnds, RingError> {
        Ok(IpTransportEnds {
            deliver: self.deliver()?.producer()?,
            deliver_return: self.deliver_return()?.consumer()?,
            send: self.send()?.consumer()?,
            send_return: self.send_return()?.producer()?,
        })
    }

    /// The transport's ends: produce `send` and `deliver_return`, consume `deliver` and
    /// `send_return`.
    pub fn transport_ends(&self) -> Result<TransportEnds, RingError> {
        Ok(TransportEnds {
            deliver: self.deliver()?.consumer()?,
            deliver_return: self.deliver_return()?.producer()?,
            send: self.send()?.producer()?,
            send_return: self.send_return()?.consumer()?,
        })
    }

    /// Descriptors in flight on the rings the transport sends on and receives from, for
    /// `BufferPool::recover` after a restart: (outgoing, incoming).
    pub fn transport_in_flight(&self) -> Result<(Vec<Descriptor>, Vec<Descriptor>), RingError> {
        let mut out: Vec<Descriptor> = self.send()?.in_flight()?.iter().map(|s| s.desc).collect();
        out.extend(self.deliver_return()?.in_flight()?);
        let mut inc: Vec<Descriptor> = self
            .deliver()?
            .in_flight()?
            .iter()
            .map(|s| s.desc)
            .collect();
        inc.extend(self.send_return()?.in_flight()?);
        Ok((out, inc))
    }

    /// The same for the ip server: (outgoing, incoming).
    pub fn ip_in_flight(&self) -> Result<(Vec<Descriptor>, Vec<Descriptor>), RingError> {
        let (t_out, t_in) = self.transport_in_flight()?;
        Ok((t_in, t_out))
    }
}

fn check_transport_ids(protocol: u8, transport: EndpointId) -> Result<(), WiringError> {
    // ICMP (1) is the ip server's own; 0 and 255 are reserved.
    if matches!(protocol, 0 | 1 | 255) {
        return Err(WiringError::TransportInvalid {
            what: "protocol",
            value: u32::from(protocol),
        });
    }
    if matches!(transport, EndpointId::NONE | DRIVER | IP) {
        return Err(WiringError::TransportInvalid {
            what: "transport endpoint",
            value: transport.0,
        });
    }
    Ok(())
}

/// The ip server's ring ends on a transport link.
pub struct IpTransportEnds {
    pub deliver: Producer<DatagramSlot>,
    pub deliver_return: Consumer<Descriptor>,
    pub send: Consumer<DatagramSlot>,
    pub send_return: Producer<Descriptor>,
}

/// The transport's ring ends on a transport link.
pub struct TransportEnds {
    pub deliver: Consumer<DatagramSlot>,
    pub deliver_return: Producer<Descriptor>,
    pub send: Producer<DatagramSlot>,
    pub send_return: Consumer<Descriptor>,
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

    #[test]
    fn transport_link_opens_with_same_layout() {
        let t = TransportLink::create("t-tlink", 17, UDP, 8).unwrap();
        let again = TransportLink::open(t.region().reopen(RegionKind::RINGS).unwrap()).unwrap();
        assert_eq!((again.protocol(), again.transport()), (17, UDP));
        for p in [&again.deliver_pool, &again.send_pool] {
            assert_eq!(p.count(), 8);
            assert_eq!(p.buf_size(), DATAGRAM_BUF);
            assert!(p.buf_size() - p.headroom() >= 65515);
        }
        assert_eq!(
            again.deliver_pool.accounting(),
            std::collections::BTreeMap::from([(IP, 8)])
        );
        assert_eq!(
            again.send_pool.accounting(),
            std::collections::BTreeMap::from([(UDP, 8)])
        );
        let mut ip = t.ip_ends().unwrap();
        let mut tr = again.transport_ends().unwrap();
        // A slot crosses intact, and shows up as in flight for recovery.
        let slot = DatagramSlot {
            desc: t.deliver_pool.descriptor(3, 100),
            src: 0xc612_0001,
            dst: 0xc612_0002,
            protocol: 17,
            ttl: 64,
            broadcast: 1,
            ..DatagramSlot::default()
        };
        ip.deliver.push(slot).unwrap();
        ip.send_return.push(t.send_pool.descriptor(5, 0)).unwrap();
        let (out, inc) = t.ip_in_flight().unwrap();
        assert_eq!(out, vec![slot.desc, t.send_pool.descriptor(5, 0)]);
        assert!(inc.is_empty());
        let (tout, tinc) = again.transport_in_flight().unwrap();
        assert_eq!((tout, tinc), (inc, out));
        assert_eq!(tr.deliver.pop().unwrap(), Some(slot));
        // Ends are claimed once.
        assert!(t.transport_ends().is_err());
        drop(tr);
        assert!(t.transport_ends().is_ok());
        // Checked on open.
        let r = || t.region().reopen(RegionKind::RINGS).unwrap();
        assert!(TransportLink::open_for(r(), 17, UDP).is_ok());
        assert!(matches!(
            TransportLink::open_for(r(), 6, UDP),
            Err(WiringError::TransportMismatch {
                what: "protocol",
                ..
            })
        ));
        assert!(matches!(
            TransportLink::open_for(r(), 17, TCP),
            Err(WiringError::TransportMismatch { .. })
        ));
        let link = Link::create("t-not-tlink", 4).unwrap();
        assert!(matches!(
            TransportLink::open(link.region().reopen(RegionKind::RINGS).unwrap()),
            Err(WiringError::NotTransportLink(_))
        ));
        assert!(TransportLink::create("t-bad", 1, UDP, 8).is_err());
        assert!(TransportLink::create("t-bad", 17, IP, 8).is_err());
        assert!(TransportLink::create("t-bad", 17, UDP, 0).is_err());
    }

    #[test]
    fn datagram_slot_layout() {
        use std::mem::{align_of, offset_of, size_of};
        assert_eq!(size_of::<DatagramSlot>(), 40);
        assert_eq!(align_of::<DatagramSlot>(), 4);
        assert_eq!(offset_of!(DatagramSlot, src), 16);
        assert_eq!(offset_of!(DatagramSlot, dst), 20);
        assert_eq!(offset_of!(DatagramSlot, protocol), 24);
        assert_eq!(offset_of!(DatagramSlot, broadcast), 29);
        assert_eq!(offset_of!(DatagramSlot, icmp_rest), 32);
    }
}
