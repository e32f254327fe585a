//! Applications <-> transport servers: the per-application region, its slot types, the codes
//! on it, and the attach and hotplug protocols (docs/udp-and-sockets.md).
//!
//! Every attached application gets one region of its own, [`AppLink`], made by the supervisor
//! and handed to the app and to the transport server (never to anyone else):
//!
//! | part | written by | carries |
//! |---|---|---|
//! | `requests` ring of [`AppRequest`] | app | bind, connect, send, close |
//! | `events` ring of [`AppEvent`] | server | replies, received datagrams, async errors |
//! | `tx_return` ring of descriptors | server | APP_TX_POOL buffers handed back after a send |
//! | `rx_return` ring of descriptors | app | APP_RX_POOL buffers handed back after a receive |
//! | APP_TX_POOL (home: the app) | app | payloads to send |
//! | APP_RX_POOL (home: the server) | server | payloads received |
//! | `app_bell` | server rings, app parks | |
//! | `server_bell` | app rings, server arms | carries the server's eventfd (see [`Doorbell::arm`]) |
//!
//! Buffers move as on every other link: the sender keeps ownership while a descriptor is on a
//! ring and the receiver `take`s it before committing the slot. The server trusts nothing in
//! the region: an app that corrupts its own rings or pools only loses its own traffic.
//!
//! Addresses in slots are IPv4 in host order (`u32::from(Ipv4Addr)`), ports in host order.
//!
//! The control connection an application attached over ([`Attached`]) stays open for its
//! life; the supervisor writes [`AppNotice`] lines on it when the application's transport
//! server fails for good (restart limit reached) and when it serves again.

use std::io;
use std::sync::atomic::Ordering;

use keepnet_ipc::{
    BufferPool, Consumer, Descriptor, Doorbell, EndpointId, FreeList, Pod, Producer, Region,
    RegionKind, RegionLayout, Retakes, Ring, RingError,
};
use serde::{Deserialize, Serialize};

use crate::wiring::WiringError;

/// Payloads an application sends (home: the application).
pub const APP_TX_POOL: u16 = 5;
/// Payloads delivered to an application (home: the transport server).
pub const APP_RX_POOL: u16 = 6;
/// Bytes per application buffer, headroom included: the largest UDP payload fits.
pub const APP_BUF: u32 = 65536 + APP_HEADROOM;
/// Headroom before a payload in an application buffer.
pub const APP_HEADROOM: u32 = 64;
/// Largest UDP payload (65535 - 20 - 8).
pub const MAX_UDP_PAYLOAD: usize = 65507;
/// Application ids start here; app `n`'s endpoint id in the pools is `APP_ENDPOINT_BASE + n`.
pub const APP_ENDPOINT_BASE: u32 = 0x1000;

/// The pool endpoint of application `app`.
pub fn app_endpoint(app: u32) -> EndpointId {
    EndpointId(APP_ENDPOINT_BASE.saturating_add(app))
}

/// Request ops (`AppRequest::op`).
pub mod op {
    /// Bind a new socket: `addr`/`port` local (0 = any / ephemeral). Reply: `socket`, the
    /// bound `addr`/`port`.
    pub const BIND: u32 = 1;
    /// Connect `socket` to `addr`/`port`; 0/0 dissolves the association. Reply: status.
    pub const CONNECT: u32 = 2;
    /// Send `desc` (APP_TX_POOL) from `socket` to `addr`/`port` (0/0: the connected peer).
    /// Replied only if `id != 0`; the buffer always comes back on `tx_return`.
    pub const SEND: u32 = 3;
    /// Close `socket`: its port is free again. Replied only if `id != 0`.
    /// TCP: a graceful close (RFC 9293 3.10.4): data already sent and a FIN still go out
    /// and the connection ends on its own; the handle is the application's no longer. A
    /// listener stops listening and its connections not yet accepted are reset.
    pub const CLOSE: u32 = 4;
    /// TCP: listen on `addr`/`port` (0 = any / ephemeral) with a backlog of `_reserved`
    /// connections (0: the server's default). Reply: `socket` is the listener, `addr`/`port`
    /// the bound address. Connections then arrive as `event::ACCEPTED`.
    pub const LISTEN: u32 = 5;
    /// TCP: shut down `socket` in the directions of `_reserved` ([`super::shut`]): WRITE sends
    /// a FIN once the data already sent is out (RFC 9293 3.10.4 half-close), READ drops data
    /// received from now on. Replied only if `id != 0`.
    pub const SHUTDOWN: u32 = 6;
    /// TCP: set option `_reserved` ([`super::sockopt`]) of `socket` to `addr` (0 off, 1 on).
    /// Replied only if `id != 0`.
    pub const SETOPT: u32 = 7;
    /// TCP: abortive close: a RST goes out, queued data is dropped (RFC 9293 3.10.5 ABORT);
    /// the handle is the application's no longer. Replied only if `id != 0`.
    pub const ABORT: u32 = 8;
}

/// `op::SHUTDOWN` directions (`AppRequest::_reserved`), as `std::net::Shutdown`.
pub mod shut {
    pub const READ: u32 = 1;
    pub const WRITE: u32 = 2;
    pub const BOTH: u32 = 3;
}

/// `op::SETOPT` options (`AppRequest::_reserved`); the value is in `addr`.
pub mod sockopt {
    /// TCP_NODELAY: Nagle's algorithm off (RFC 9293 3.7.4) when 1.
    pub const NODELAY: u32 = 1;
    /// SO_KEEPALIVE (RFC 9293 3.8.4) when 1.
    pub const KEEPALIVE: u32 = 2;
}

/// Event kinds (`AppEvent::kind`).
pub mod event {
    /// The answer to request `id`: `status`, and for a bind the socket and local address.
    pub const REPLY: u32 = 1;
    /// A datagram for `socket` from `addr`/`port` in `desc` (APP_RX_POOL): hand the buffer
    /// back on `rx_return` once read.
    pub const DATAGRAM: u32 = 2;
    /// An asynchronous error on `socket` (`status`): an ICMP port unreachable for a connected
    /// socket arrives as [`super::Status::ConnectionRefused`].
    /// TCP: the connection is dead (`ConnectionRefused`: a RST answered our SYN;
    /// `ConnectionReset`; `TimedOut`: retransmissions or keepalives gave up), after any DATA
    /// and EOF it delivered. The handle stays the application's until it closes it.
    pub const ERROR: u32 = 3;
    /// TCP: the next bytes of `socket`'s stream in `desc` (APP_RX_POOL), in order. Hand the
    /// buffer back on `rx_return` once every byte is read: a connection has at most the
    /// server's receive buffer size delivered and not yet handed back.
    pub const DATA: u32 = 4;
    /// TCP: the peer closed its side (a FIN, RFC 9293 3.10.7.4 eighth): no more DATA.
    pub const EOF: u32 = 5;
    /// TCP: the active open of `socket` completed (ESTABLISHED); `addr`/`port` is the local
    /// address.
    pub const CONNECTED: u32 = 6;
    /// TCP: listener `socket` has a new connection: its handle is in `id`, the peer in
    /// `addr`/`port`. It is the application's from now on (close it when done).
    pub const ACCEPTED: u32 = 7;
    /// TCP: `socket`'s send buffer went from full to having room again (optional hint: the
    /// library mostly tracks room by the TX buffers it gets back).
    pub const WRITABLE: u32 = 8;
}

/// Status codes carried in replies and error events (0 is success).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    AddrInUse = 1,
    AddrNotAvailable = 2,
    InvalidInput = 3,
    ConnectionRefused = 4,
    NotConnected = 5,
    /// The socket table is full.
    NoSockets = 6,
    /// The socket is not one of this application's.
    BadSocket = 7,
    MessageTooLong = 8,
    HostUnreachable = 9,
    NetworkUnreachable = 10,
    /// An unknown request op.
    Unsupported = 11,
    /// TCP: the peer reset the connection.
    ConnectionReset = 12,
    /// TCP: the peer stopped answering (retransmissions or keepalives gave up, or connect
    /// timed out).
    TimedOut = 13,
    /// TCP: the connection was aborted on this side (the server restarted without it, or an
    /// abortive close).
    ConnectionAborted = 14,
    /// TCP: writing after a shutdown of the write side or after the connection closed.
    BrokenPipe = 15,
    /// TCP: the socket is already connected (or listening).
    IsConnected = 16,
}

impl Status {
    /// Decodes a status word; unknown codes read as `InvalidInput`.
    pub fn from_code(code: u32) -> Status {
        use Status::*;
        match code {
            0 => Ok,
            1 => AddrInUse,
            2 => AddrNotAvailable,
            4 => ConnectionRefused,
            5 => NotConnected,
            6 => NoSockets,
            7 => BadSocket,
            8 => MessageTooLong,
            9 => HostUnreachable,
            10 => NetworkUnreachable,
            11 => Unsupported,
            12 => ConnectionReset,
            13 => TimedOut,
            14 => ConnectionAborted,
            15 => BrokenPipe,
            16 => IsConnected,
            _ => InvalidInput,
        }
    }

    /// The code on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The `io::Error` an application sees (None for `Ok`).
    pub fn to_io_error(self) -> Option<io::Error> {
        use io::ErrorKind as K;
        let (kind, msg) = match self {
            Status::Ok => return None,
            Status::AddrInUse => (K::AddrInUse, "address in use"),
            Status::AddrNotAvailable => (
                K::AddrNotAvailable,
                "address not available: not keepnet's address",
            ),
            Status::InvalidInput => (K::InvalidInput, "invalid argument"),
            Status::ConnectionRefused => (K::ConnectionRefused, "connection refused"),
            Status::NotConnected => (K::NotConnected, "socket is not connected"),
            Status::NoSockets => (K::OutOfMemory, "the server's socket table is full"),
            Status::BadSocket => (K::InvalidInput, "not a socket of this application"),
            Status::MessageTooLong => (
                K::InvalidInput,
                "message too long (UDP carries at most 65507 bytes)",
            ),
            Status::HostUnreachable => (K::HostUnreachable, "host unreachable"),
            Status::NetworkUnreachable => (K::NetworkUnreachable, "network unreachable"),
            Status::Unsupported => (K::Unsupported, "operation not supported by the server"),
            Status::ConnectionReset => (K::ConnectionReset, "connection reset by peer"),
            Status::TimedOut => (K::TimedOut, "connection timed out"),
            Status::ConnectionAborted => (K::ConnectionAborted, "connection aborted"),
            Status::BrokenPipe => (K::BrokenPipe, "broken pipe: the write side is shut down"),
            Status::IsConnected => (K::AlreadyExists, "socket is already connected"),
        };
        Some(io::Error::new(kind, msg))
    }
}

/// A request from an application: 40 bytes, no holes.
///
/// | offset | field |
/// |---|---|
/// | 0 | `op` ([`op`]) |
/// | 4 | `id`: request id echoed in the reply (0: no reply wanted, for SEND and CLOSE) |
/// | 8 | `socket`: the server's socket handle (from the BIND reply) |
/// | 12 | `addr`: IPv4, host order |
/// | 16 | `port`, then `_pad` (u16) |
/// | 20 | `_reserved` |
/// | 24 | `desc` (SEND: APP_TX_POOL buffer holding the payload) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppRequest {
    pub op: u32,
    pub id: u32,
    pub socket: u32,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub _reserved: u32,
    pub desc: Descriptor,
}

/// An event for an application: 40 bytes, no holes.
///
/// | offset | field |
/// |---|---|
/// | 0 | `kind` ([`event`]) |
/// | 4 | `id`: the request answered (REPLY) |
/// | 8 | `socket` |
/// | 12 | `status` ([`Status`] code) |
/// | 16 | `addr`: REPLY to BIND: local address; DATAGRAM: source address (host order) |
/// | 20 | `port`, then `_pad` (u16) |
/// | 24 | `desc` (DATAGRAM: APP_RX_POOL buffer holding the payload) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppEvent {
    pub kind: u32,
    pub id: u32,
    pub socket: u32,
    pub status: u32,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub desc: Descriptor,
}

const _: () = assert!(std::mem::size_of::<AppRequest>() == 40);
const _: () = assert!(std::mem::size_of::<AppEvent>() == 40);

// SAFETY: repr(C): u32 x4, u16 x2, u32, then a Descriptor (Pod, 16 bytes, align 4): offsets
// 0..24 then 24..40, no implicit padding; integers only, valid for any bits, no pointers.
#[allow(unsafe_code)]
unsafe impl Pod for AppRequest {}
// SAFETY: repr(C): u32 x5, u16 x2, then a Descriptor (Pod, 16 bytes, align 4): offsets 0..24
// then 24..40, no implicit padding; integers only, valid for any bits, no pointers.
#[allow(unsafe_code)]
unsafe impl Pod for AppEvent {}

const APP_MAGIC: u64 = u64::from_le_bytes(*b"KNAPPLK1");
const TAG_REQ: u32 = 0x13_0001;
const TAG_EVT: u32 = 0x13_0002;
const TAG_TX_RET: u32 = 0x13_0003;
const TAG_RX_RET: u32 = 0x13_0004;
const HEADER: usize = 64;
const H_MAGIC: usize = 0;
const H_APP: usize = 8;
const H_TX: usize = 12;
const H_RX: usize = 16;
const H_PROTOCOL: usize = 20;
/// Most buffers per pool of an application region.
pub const MAX_APP_BUFFERS: u32 = 4096;

#[derive(Clone, Copy, Debug)]
struct AppOffsets {
    header: usize,
    app_bell: usize,
    server_bell: usize,
    requests: usize,
    events: usize,
    tx_return: usize,
    rx_return: usize,
    tx_pool: usize,
    rx_pool: usize,
    slots: usize,
    size: usize,
}

fn app_offsets(tx: u32, rx: u32) -> AppOffsets {
    let mut l = RegionLayout::new();
    // Every buffer of both pools fits on any ring at once, plus room for control requests.
    let slots = ((tx.max(rx) as usize) * 2).next_power_of_two().max(256);
    let header = l.place(HEADER, 64);
    let app_bell = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let server_bell = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let a = Ring::<Descriptor>::ALIGN;
    let requests = l.place(Ring::<AppRequest>::size_in_region(slots), a);
    let events = l.place(Ring::<AppEvent>::size_in_region(slots), a);
    let tx_return = l.place(Ring::<Descriptor>::size_in_region(slots), a);
    let rx_return = l.place(Ring::<Descriptor>::size_in_region(slots), a);
    let tx_pool = l.place(BufferPool::size_in_region(tx, APP_BUF), BufferPool::ALIGN);
    let rx_pool = l.place(BufferPool::size_in_region(rx, APP_BUF), BufferPool::ALIGN);
    AppOffsets {
        header,
        app_bell,
        server_bell,
        requests,
        events,
        tx_return,
        rx_return,
        tx_pool,
        rx_pool,
        slots,
        size: l.size(),
    }
}

/// One application's region (see the module docs).
#[derive(Clone, Debug)]
pub struct AppLink {
    region: Region,
    off: AppOffsets,
    app: u32,
    protocol: u8,
    server: EndpointId,
    /// Payloads the application sends (home: the app).
    pub tx_pool: BufferPool,
    /// Payloads delivered to the application (home: the server).
    pub rx_pool: BufferPool,
}

impl AppLink {
    /// Default buffers in the TX pool.
    pub const DEFAULT_TX: u32 = 64;
    /// Default buffers in the RX pool.
    pub const DEFAULT_RX: u32 = 128;

    /// Supervisor: creates the region of application `app` for the transport server
    /// `server` serving IP protocol `protocol` (17 for udp).
    pub fn create(
        name: &str,
        app: u32,
        protocol: u8,
        server: EndpointId,
        tx: u32,
        rx: u32,
    ) -> Result<AppLink, WiringError> {
        for (what, n) in [("tx buffer count", tx), ("rx buffer count", rx)] {
            if n == 0 || n > MAX_APP_BUFFERS {
                return Err(WiringError::TransportInvalid { what, value: n });
            }
        }
        let off = app_offsets(tx, rx);
        let region = Region::create(name, RegionKind::RINGS, off.size)?;
        let tx_pool = BufferPool::init(
            &region,
            off.tx_pool,
            APP_TX_POOL,
            tx,
            APP_BUF,
            APP_HEADROOM,
            app_endpoint(app),
        )?;
        let rx_pool = BufferPool::init(
            &region,
            off.rx_pool,
            APP_RX_POOL,
            rx,
            APP_BUF,
            APP_HEADROOM,
            server,
        )?;
        Doorbell::init(&region, off.app_bell)?;
        Doorbell::init(&region, off.server_bell)?;
        Ring::<AppRequest>::init(&region, off.requests, off.slots, TAG_REQ)?;
        Ring::<AppEvent>::init(&region, off.events, off.slots, TAG_EVT)?;
        Ring::<Descriptor>::init(&region, off.tx_return, off.slots, TAG_TX_RET)?;
        Ring::<Descriptor>::init(&region, off.rx_return, off.slots, TAG_RX_RET)?;
        region.write_bytes(off.header + H_APP, &app.to_le_bytes())?;
        region.write_bytes(off.header + H_TX, &tx.to_le_bytes())?;
        region.write_bytes(off.header + H_RX, &rx.to_le_bytes())?;
        let proto_server = u32::from(protocol) | (server.0 << 8);
        region.write_bytes(off.header + H_PROTOCOL, &proto_server.to_le_bytes())?;
        region
            .atomic_u64(off.header + H_MAGIC)?
            .store(APP_MAGIC, Ordering::Release);
        Ok(AppLink {
            region,
            off,
            app,
            protocol,
            server,
            tx_pool,
            rx_pool,
        })
    }

    /// The app or the server: opens a region handed over, checking its header and pools.
    /// The values in it were written by the supervisor, but the app can scribble on its own
    /// mapping, so a server checks the app id against the one the supervisor told it.
    pub fn open(region: Region) -> Result<AppLink, WiringError> {
        let header = app_offsets(1, 1).header;
        let magic = region.atomic_u64(header + H_MAGIC)?.load(Ordering::Acquire);
        if magic != APP_MAGIC {
            return Err(WiringError::NotTransportLink(magic));
        }
        let word = |at: usize| -> Result<u32, WiringError> {
            let mut b = [0u8; 4];
            region.read_bytes(header + at, &mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let (app, tx, rx, ps) = (word(H_APP)?, word(H_TX)?, word(H_RX)?, word(H_PROTOCOL)?);
        for (what, n) in [("tx buffer count", tx), ("rx buffer count", rx)] {
            if n == 0 || n > MAX_APP_BUFFERS {
                return Err(WiringError::TransportInvalid { what, value: n });
            }
        }
        let off = app_offsets(tx, rx);
        if region.len() < off.size {
            return Err(WiringError::TransportInvalid {
                what: "region size",
                value: u32::try_from(region.len()).unwrap_or(u32::MAX),
            });
        }
        let tx_pool = BufferPool::open(&region, off.tx_pool, APP_TX_POOL)?;
        let rx_pool = BufferPool::open(&region, off.rx_pool, APP_RX_POOL)?;
        for (what, pool, n) in [("tx pool", &tx_pool, tx), ("rx pool", &rx_pool, rx)] {
            if pool.count() != n || pool.buf_size() != APP_BUF || pool.headroom() != APP_HEADROOM {
                return Err(WiringError::TransportMismatch {
                    what,
                    found: pool.count(),
                    expected: n,
                });
            }
        }
        Ok(AppLink {
            region,
            off,
            app,
            protocol: (ps & 0xff) as u8,
            server: EndpointId(ps >> 8),
            tx_pool,
            rx_pool,
        })
    }

    /// The region (to hand over).
    pub fn region(&self) -> &Region {
        &self.region
    }
    /// The application id.
    pub fn app(&self) -> u32 {
        self.app
    }
    /// The application's pool endpoint.
    pub fn endpoint(&self) -> EndpointId {
        app_endpoint(self.app)
    }
    /// The IP protocol of the server this region talks to.
    pub fn protocol(&self) -> u8 {
        self.protocol
    }
    /// The server's pool endpoint.
    pub fn server(&self) -> EndpointId {
        self.server
    }

    /// The doorbell the application parks on (the server rings it).
    pub fn app_bell(&self) -> Result<Doorbell, WiringError> {
        Ok(Doorbell::attach(&self.region, self.off.app_bell)?)
    }
    /// The doorbell the application rings; attach the server's eventfd to it
    /// ([`Doorbell::with_eventfd`]) on both sides.
    pub fn server_bell(&self) -> Result<Doorbell, WiringError> {
        Ok(Doorbell::attach(&self.region, self.off.server_bell)?)
    }

    /// app -> server requests.
    pub fn requests(&self) -> Result<Ring<AppRequest>, RingError> {
        Ring::open(&self.region, self.off.requests, TAG_REQ)
    }
    /// server -> app events.
    pub fn events(&self) -> Result<Ring<AppEvent>, RingError> {
        Ring::open(&self.region, self.off.events, TAG_EVT)
    }
    /// server -> app: APP_TX_POOL buffers handed back.
    pub fn tx_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.tx_return, TAG_TX_RET)
    }
    /// app -> server: APP_RX_POOL buffers handed back.
    pub fn rx_return(&self) -> Result<Ring<Descriptor>, RingError> {
        Ring::open(&self.region, self.off.rx_return, TAG_RX_RET)
    }

    /// The application's ends.
    pub fn app_ends(&self) -> Result<AppEnds, RingError> {
        Ok(AppEnds {
            requests: self.requests()?.producer()?,
            events: self.events()?.consumer()?,
            tx_return: self.tx_return()?.consumer()?,
            rx_return: self.rx_return()?.producer()?,
        })
    }

    /// The server's ends.
    pub fn server_ends(&self) -> Result<AppServerEnds, RingError> {
        Ok(AppServerEnds {
            requests: self.requests()?.consumer()?,
            events: self.events()?.producer()?,
            tx_return: self.tx_return()?.producer()?,
            rx_return: self.rx_return()?.consumer()?,
        })
    }

    /// Descriptors in flight on the rings the server sends on and receives from, for
    /// `BufferPool::recover` after a server restart: (outgoing, incoming).
    pub fn server_in_flight(&self) -> Result<(Vec<Descriptor>, Vec<Descriptor>), RingError> {
        let mut out: Vec<Descriptor> = self
            .events()?
            .in_flight()?
            .iter()
            .filter(|e| e.kind == event::DATAGRAM || e.kind == event::DATA)
            .map(|e| e.desc)
            .collect();
        out.extend(self.tx_return()?.in_flight()?);
        let mut inc: Vec<Descriptor> = self
            .requests()?
            .in_flight()?
            .iter()
            .filter(|r| r.op == op::SEND)
            .map(|r| r.desc)
            .collect();
        inc.extend(self.rx_return()?.in_flight()?);
        Ok((out, inc))
    }

    /// Frees ring sides held by a dead process (`pid`), so a successor claims them at once.
    pub fn release_claims_of(&self, pid: u32) {
        if let Ok(r) = self.requests() {
            r.release_claims_of(pid);
        }
        if let Ok(r) = self.events() {
            r.release_claims_of(pid);
        }
        if let Ok(r) = self.tx_return() {
            r.release_claims_of(pid);
        }
        if let Ok(r) = self.rx_return() {
            r.release_claims_of(pid);
        }
    }
}

/// The application's ring ends.
pub struct AppEnds {
    pub requests: Producer<AppRequest>,
    pub events: Consumer<AppEvent>,
    pub tx_return: Consumer<Descriptor>,
    pub rx_return: Producer<Descriptor>,
}

/// The server's ring ends on one application's region.
pub struct AppServerEnds {
    pub requests: Consumer<AppRequest>,
    pub events: Producer<AppEvent>,
    pub tx_return: Producer<Descriptor>,
    pub rx_return: Consumer<Descriptor>,
}

// ---------------------------------------------------------------------------------------------
// Attach (application <-> supervisor control socket) and hotplug (supervisor -> server)
// ---------------------------------------------------------------------------------------------

/// Environment variable naming the instance an application attaches to (default `default`).
pub const INSTANCE_ENV: &str = "KEEPNET_INSTANCE";
/// Environment variable naming the run directory (default `/run/keepnet`).
pub const RUN_DIR_ENV: &str = "KEEPNET_RUN_DIR";

/// The control socket of `instance`: `$KEEPNET_RUN_DIR/<instance>/ctl.sock`.
pub fn control_socket(instance: &str) -> std::path::PathBuf {
    let dir = std::env::var_os(RUN_DIR_ENV)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/run/keepnet"));
    dir.join(instance).join("ctl.sock")
}

/// What the supervisor answers an `{"op":"attach","protocol":17}` request with, as the JSON
/// line `{"result":"attached", ...these fields}`. Two fds come with the line (SCM_RIGHTS):
/// the application's region, then the eventfd of the server's doorbell. The connection stays
/// open: closing it (or exiting) detaches the application. From then on the supervisor may
/// write [`AppNotice`] lines on it; the application writes nothing more.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attached {
    /// The application id.
    pub app: u32,
    /// keepnet's IPv4 address.
    pub addr: String,
    /// The link MTU.
    pub mtu: u32,
}

/// A notification the supervisor writes, as one JSON line, on the control connection of
/// every application attached to a transport server, after the attach answer. The data path
/// never goes through the supervisor; these tell an application what it cannot see on its
/// rings: that its server is gone for good, and that it is back.
///
/// * `{"event":"server_failed","server":"tcp","detail":"restart limit reached: ..."}`: the
///   server is down and will not be restarted (its restart intensity limit was reached, or
///   it stopped under `restart = "transient"`). The library fails every call on that
///   server's sockets at once, the blocked ones included, with `ConnectionAborted` saying
///   "keepnet: the tcp server is down (DETAIL)".
/// * `{"event":"server_back","server":"tcp"}`: a new instance of a server that had failed
///   serves again (after a restart of every server): calls go through again. Sockets made
///   before may be gone (the server answers `BadSocket`).
///
/// Lines are written without blocking: a connection whose buffer is full misses them. An
/// event the application does not know is ignored; EOF on the connection (the supervisor
/// exited, and a restarted one re-adopts the servers) changes nothing on the data path.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AppNotice {
    /// Server `server` ("udp", "tcp") is down for good: `detail` says why.
    ServerFailed { server: String, detail: String },
    /// Server `server` serves again after having failed.
    ServerBack { server: String },
}

/// A message on a server's hotplug socket (a SOCK_SEQPACKET pair inherited as fd `hotplug`),
/// one JSON object per packet. `Attach` carries the app's region as an fd.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Hotplug {
    /// Application `app` attached (or is re-sent after a server restart): map its region.
    /// Idempotent.
    Attach { app: u32, pid: u32 },
    /// Application `app` went away: close its sockets, unmap its region.
    Detach { app: u32 },
    /// After a restart, once every live app was re-sent: these are all the apps there are;
    /// close any socket of another.
    Live { apps: Vec<u32> },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiring::UDP;

    #[test]
    fn app_link_opens_and_crosses() {
        let a = AppLink::create("t-app", 7, 17, UDP, 8, 16).unwrap();
        let b = AppLink::open(a.region().reopen(RegionKind::RINGS).unwrap()).unwrap();
        assert_eq!((b.app(), b.protocol(), b.server()), (7, 17, UDP));
        assert_eq!(b.endpoint(), app_endpoint(7));
        assert_eq!(b.tx_pool.count(), 8);
        assert_eq!(b.rx_pool.count(), 16);
        assert!(b.tx_pool.buf_size() - b.tx_pool.headroom() >= MAX_UDP_PAYLOAD as u32);
        let mut app = a.app_ends().unwrap();
        let mut srv = b.server_ends().unwrap();
        let req = AppRequest {
            op: op::SEND,
            socket: 3,
            addr: 0xc612_0001,
            port: 7,
            desc: a.tx_pool.descriptor(2, 10),
            ..AppRequest::default()
        };
        app.requests.push(req).unwrap();
        let (_, inc) = b.server_in_flight().unwrap();
        assert_eq!(inc, vec![req.desc]);
        assert_eq!(srv.requests.pop().unwrap(), Some(req));
        let ev = AppEvent {
            kind: event::REPLY,
            id: 9,
            status: Status::AddrInUse.code(),
            ..AppEvent::default()
        };
        srv.events.push(ev).unwrap();
        assert_eq!(app.events.pop().unwrap(), Some(ev));
        assert_eq!(
            Status::from_code(ev.status).to_io_error().unwrap().kind(),
            io::ErrorKind::AddrInUse
        );
        let _ = (a.app_bell().unwrap(), b.server_bell().unwrap());
        // Not an app region.
        let t = crate::wiring::TransportLink::create("t-app-not", 17, UDP, 4).unwrap();
        assert!(AppLink::open(t.region().reopen(RegionKind::RINGS).unwrap()).is_err());
        assert!(AppLink::create("t-app-bad", 1, 17, UDP, 0, 4).is_err());
    }

    #[test]
    fn app_notices_are_json_lines() {
        let m = AppNotice::ServerFailed {
            server: "tcp".into(),
            detail: "restart limit reached".into(),
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"event":"server_failed","server":"tcp","detail":"restart limit reached"}"#
        );
        assert_eq!(serde_json::from_str::<AppNotice>(&s).unwrap(), m);
        let b = AppNotice::ServerBack {
            server: "udp".into(),
        };
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, r#"{"event":"server_back","server":"udp"}"#);
        assert!(serde_json::from_str::<AppNotice>(r#"{"event":"other"}"#).is_err());
    }

    #[test]
    fn hotplug_messages_are_json() {
        let m = Hotplug::Attach { app: 3, pid: 10 };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"op":"attach","app":3,"pid":10}"#);
        assert_eq!(serde_json::from_str::<Hotplug>(&s).unwrap(), m);
    }
}

/// A hotplug message as a transport server acts on it: `Attach` comes with the application's
/// region already mapped.
#[derive(Debug)]
pub enum HotplugEvent {
    /// Map application `app` (process `pid`) with its region.
    Attach { app: u32, pid: u32, region: Region },
    /// Application `app` went away.
    Detach { app: u32 },
    /// After a restart: these are all the applications there are.
    Live { apps: Vec<u32> },
}

/// A transport server's end of the supervisor's hotplug socket (fd `hotplug`, see
/// [`Hotplug`]): reads messages in bounded batches, checks their shape and maps regions.
#[derive(Debug)]
pub struct HotplugSocket {
    sock: std::os::unix::net::UnixStream,
    buf: Vec<u8>,
}

/// Largest hotplug message.
const HOTPLUG_MAX: usize = 64 * 1024;

impl HotplugSocket {
    /// Wraps the inherited fd (made non-blocking).
    pub fn new(fd: std::os::fd::OwnedFd) -> io::Result<HotplugSocket> {
        let sock = std::os::unix::net::UnixStream::from(fd);
        sock.set_nonblocking(true)?;
        Ok(HotplugSocket {
            sock,
            buf: vec![0u8; HOTPLUG_MAX],
        })
    }

    /// Reads up to `max` messages and hands each to `apply`. A message that cannot be read
    /// or decoded, or that `apply` refuses, is logged and counted. Returns (handled, bad).
    pub fn read(
        &mut self,
        max: usize,
        mut apply: impl FnMut(HotplugEvent) -> Result<(), String>,
    ) -> (u64, u64) {
        let (mut handled, mut bad) = (0, 0);
        for _ in 0..max {
            match keepnet_ipc::fdpass::recv_fds(&self.sock, &mut self.buf) {
                // End of file (the supervisor closed its end) or an empty packet.
                Ok((0, _)) => break,
                Ok((n, fds)) => {
                    handled += 1;
                    let r =
                        decode_hotplug(self.buf.get(..n).unwrap_or(&[]), fds).and_then(&mut apply);
                    if let Err(e) = r {
                        bad += 1;
                        tracing::warn!(%e, "hotplug message refused");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A message with too many fds was consumed (and its fds closed): go on.
                    bad += 1;
                    tracing::warn!(%e, "hotplug message unreadable");
                    if e.kind() != io::ErrorKind::InvalidData {
                        break;
                    }
                }
            }
        }
        (handled, bad)
    }
}

fn decode_hotplug(
    payload: &[u8],
    mut fds: Vec<std::os::fd::OwnedFd>,
) -> Result<HotplugEvent, String> {
    let msg: Hotplug =
        serde_json::from_slice(payload).map_err(|e| format!("not a hotplug message: {e}"))?;
    Ok(match msg {
        Hotplug::Attach { app, pid } => {
            if fds.len() != 1 {
                return Err(format!(
                    "attach of app {app} came with {} fds, not 1",
                    fds.len()
                ));
            }
            let Some(fd) = fds.pop() else {
                return Err(format!("attach of app {app} came with no fd"));
            };
            let region = Region::open(fd, RegionKind::RINGS)
                .map_err(|e| format!("attach of app {app}: {e}"))?;
            HotplugEvent::Attach { app, pid, region }
        }
        Hotplug::Detach { app } => HotplugEvent::Detach { app },
        Hotplug::Live { apps } => HotplugEvent::Live { apps },
    })
}

/// What a transport server takes over when it maps an application's region: the RX
/// buffers it holds (free to fill), the TX buffers it must hand back, and the retakes of
/// both pools (keepnet_ipc::pool, crash reclamation).
#[derive(Debug)]
pub struct ServerBuffers {
    /// APP_RX_POOL buffers the server holds, free to fill.
    pub rx_free: FreeList,
    /// Indices in `rx_free` at attach (buffers not on any ring and not the app's).
    pub held_rx: Vec<u32>,
    /// APP_TX_POOL buffers a predecessor took and did not hand back: hand them back.
    pub tx_returns: Vec<Descriptor>,
    /// TX buffers the server may meet again on `requests`.
    pub tx_retakes: Retakes,
}

impl AppLink {
    /// Checks that the region is application `app`'s for protocol `protocol` served by
    /// `server`.
    pub fn check_owner(&self, app: u32, protocol: u8, server: EndpointId) -> Result<(), String> {
        if self.app != app {
            return Err(format!("the region is app {}'s", self.app));
        }
        if self.protocol != protocol || self.server != server {
            return Err(format!(
                "the region is for protocol {} server {}",
                self.protocol, self.server.0
            ));
        }
        Ok(())
    }

    /// The transport server `me` recovers its buffers from the rings and the ownership
    /// tables (after a predecessor's crash as at a first attach).
    pub fn server_buffers(&self, me: EndpointId) -> Result<ServerBuffers, RingError> {
        let (outgoing, incoming) = self.server_in_flight()?;
        let (held_rx, rx_retakes) = self.rx_pool.recover(me, &outgoing, &incoming);
        let mut rx_free = FreeList::new(&self.rx_pool, me);
        for &i in &held_rx {
            rx_free.put(i);
        }
        *rx_free.retakes_mut() = rx_retakes;
        let (held_tx, tx_retakes) = self.tx_pool.recover(me, &outgoing, &incoming);
        let tx_returns = held_tx
            .iter()
            .map(|&i| self.tx_pool.descriptor(i, 0))
            .collect();
        Ok(ServerBuffers {
            rx_free,
            held_rx,
            tx_returns,
            tx_retakes,
        })
    }
}
