//! The `tcp.state` region: every listening socket and connection of the tcp server, as
//! plain `#[repr(C)]` data at fixed offsets, so that it outlives the server process (DESIGN
//! rules 1-3, docs/tcp.md). The supervisor creates it ([`TcpState::create`]); the tcp server
//! maps it and is its only writer; `keepnet status` and the supervisor read slot headers.
//!
//! | offset | what |
//! |---|---|
//! | `HEADER_SIZE` | table header: magic, version, capacities, buffer sizes, section offsets |
//! | `listen_off` | `listeners` x [`ListenSlot`]: [`Meta`], [`Listener`], its [`SynQueue`] |
//! | `conns_off` | `conns` x [`ConnSlot`]: [`Meta`], [`Tcb`] (padded to [`CONN_SLOT`]) |
//! | `rings_off` | `conns` x (`sndbuf` + `rcvbuf`) bytes: each connection's send and receive rings |
//!
//! The ring memory is reserved, not touched: a memfd page costs memory only once written,
//! so an idle connection costs its slot page and the ring pages its data touched.

use std::mem::size_of;
use std::sync::atomic::Ordering;

use keepnet_ipc::{Region, RegionError, RegionKind};

use crate::listen::{Listener, SynQueue};
use crate::tcb::{RingGeom, Tcb};

const MAGIC: u64 = u64::from_le_bytes(*b"KNTCPST1");
/// Layout version.
pub const VERSION: u32 = 1;
/// Slots of each listener's SYN queue table (half of them usable, see [`SynQueue`]).
pub const SYNQ_SLOTS: usize = 512;
/// The SYN queue type stored in a [`ListenSlot`].
pub type StateSynQueue = SynQueue<SYNQ_SLOTS>;
/// Bytes per connection slot.
pub const CONN_SLOT: usize = 1024;
/// Most connections a table may have.
pub const MAX_CONNS: u32 = 1 << 20;
/// Most listeners a table may have.
pub const MAX_LISTENERS: u32 = 4096;
/// Largest send or receive buffer per connection (RFC 7323 window scaling covers it).
pub const MAX_BUF: u32 = 64 << 20;

// Header words (byte offsets from `HEADER_SIZE`).
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_CONNS: usize = 12;
const H_LISTENERS: usize = 16;
const H_SNDBUF: usize = 20;
const H_RCVBUF: usize = 24;
const H_CONN_SLOT: usize = 28;
const H_LISTEN_SLOT: usize = 32;
const HEADER_LEN: usize = 64;

/// Slot header, the same for listeners and connections: 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// 1 while the slot holds a socket.
    pub used: u32,
    /// Bumped each time the slot is freed: a stale handle names an older generation.
    pub gen: u32,
    /// The application that owns it (0: none, e.g. an orphan finishing its close).
    pub app: u32,
    /// [`meta`] bits.
    pub flags: u32,
    /// A connection not yet handed to its application: its listener's handle.
    pub parent: u32,
    /// Bytes delivered to the application (DATA events) and not yet handed back.
    pub delivered: u32,
    /// The request id of the LISTEN or CONNECT that made it (replays after a restart).
    pub req_id: u32,
    /// Backlog (listeners).
    pub backlog: u32,
}

/// [`Meta::flags`] bits.
pub mod meta {
    /// The application closed it; the server finishes the close on its own.
    pub const ORPHAN: u32 = 1 << 0;
    /// Established from a listener, ACCEPTED not yet sent to the application.
    pub const ACCEPT_PENDING: u32 = 1 << 1;
    /// Active open: CONNECTED (or its ERROR) not yet sent.
    pub const CONNECT_PENDING: u32 = 1 << 2;
    /// EOF sent to the application.
    pub const EOF_SENT: u32 = 1 << 3;
    /// The connection's error was sent to the application.
    pub const ERROR_SENT: u32 = 1 << 4;
    /// The application shut down reading: data that arrives is dropped.
    pub const SHUT_RD: u32 = 1 << 5;
    /// A listener.
    pub const LISTENER: u32 = 1 << 6;
    /// The application closed it with SEND buffers still queued: close once they are in.
    pub const CLOSE_AFTER_DRAIN: u32 = 1 << 8;
    /// Shut down writing once the queued SEND buffers are in.
    pub const SHUTWR_AFTER_DRAIN: u32 = 1 << 9;
}

/// One listening socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ListenSlot {
    pub meta: Meta,
    pub listener: Listener,
    pub synq: StateSynQueue,
}

/// One connection.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnSlot {
    pub meta: Meta,
    pub tcb: Tcb,
}

const _: () = assert!(size_of::<ConnSlot>() <= CONN_SLOT);
const _: () = assert!(size_of::<Meta>() == 32);

/// Why the table could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("not a tcp state table (magic {0:#x})")]
    Magic(u64),
    #[error("tcp state table version {found}, this server reads {VERSION}")]
    Version { found: u32 },
    #[error("{what} {value} is out of range")]
    Invalid { what: &'static str, value: u64 },
    #[error("the region ({len} bytes) is smaller than its table ({need} bytes)")]
    TooSmall { len: usize, need: usize },
}

/// Geometry of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub conns: u32,
    pub listeners: u32,
    pub sndbuf: u32,
    pub rcvbuf: u32,
}

impl Geometry {
    fn listen_slot() -> usize {
        size_of::<ListenSlot>().next_multiple_of(64)
    }
    fn listen_off(&self) -> usize {
        keepnet_ipc::region::HEADER_SIZE + HEADER_LEN
    }
    fn conns_off(&self) -> usize {
        (self.listen_off() + self.listeners as usize * Self::listen_slot()).next_multiple_of(4096)
    }
    fn rings_off(&self) -> usize {
        (self.conns_off() + self.conns as usize * CONN_SLOT).next_multiple_of(4096)
    }
    fn per_conn(&self) -> usize {
        self.sndbuf as usize + self.rcvbuf as usize
    }
    /// Bytes of region the table needs.
    pub fn size(&self) -> usize {
        self.rings_off() + self.conns as usize * self.per_conn()
    }
    fn check(&self) -> Result<(), StateError> {
        let bad = |what, value: u32| StateError::Invalid {
            what,
            value: u64::from(value),
        };
        if self.conns == 0 || self.conns > MAX_CONNS {
            return Err(bad("connections", self.conns));
        }
        if self.listeners == 0 || self.listeners > MAX_LISTENERS {
            return Err(bad("listeners", self.listeners));
        }
        for (what, v) in [("sndbuf", self.sndbuf), ("rcvbuf", self.rcvbuf)] {
            if !(4096..=MAX_BUF).contains(&v) || v % 8 != 0 {
                return Err(bad(what, v));
            }
        }
        Ok(())
    }
}

/// The table (module docs).
#[derive(Debug)]
pub struct TcpState {
    region: Region,
    geo: Geometry,
}

fn word(region: &Region, at: usize) -> Result<u32, RegionError> {
    let mut b = [0u8; 4];
    region.read_bytes(keepnet_ipc::region::HEADER_SIZE + at, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

impl TcpState {
    /// Supervisor: creates the region `name` with an empty table of this geometry.
    pub fn create(name: &str, geo: Geometry) -> Result<TcpState, StateError> {
        geo.check()?;
        let region = Region::create(name, RegionKind::GENERIC, geo.size())?;
        let h = keepnet_ipc::region::HEADER_SIZE;
        region.write_bytes(h + H_VERSION, &VERSION.to_le_bytes())?;
        for (at, v) in [
            (H_CONNS, geo.conns),
            (H_LISTENERS, geo.listeners),
            (H_SNDBUF, geo.sndbuf),
            (H_RCVBUF, geo.rcvbuf),
            (H_CONN_SLOT, CONN_SLOT as u32),
            (H_LISTEN_SLOT, Geometry::listen_slot() as u32),
        ] {
            region.write_bytes(h + at, &v.to_le_bytes())?;
        }
        // A fresh memfd reads as zeroes: every slot is free (used = 0).
        region
            .atomic_u64(h + H_MAGIC)?
            .store(MAGIC, Ordering::Release);
        Ok(TcpState { region, geo })
    }

    /// Opens a table made by [`TcpState::create`], checking its header against the region.
    pub fn open(region: Region) -> Result<TcpState, StateError> {
        let h = keepnet_ipc::region::HEADER_SIZE;
        let magic = region.atomic_u64(h + H_MAGIC)?.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(StateError::Magic(magic));
        }
        let version = word(&region, H_VERSION)?;
        if version != VERSION {
            return Err(StateError::Version { found: version });
        }
        let geo = Geometry {
            conns: word(&region, H_CONNS)?,
            listeners: word(&region, H_LISTENERS)?,
            sndbuf: word(&region, H_SNDBUF)?,
            rcvbuf: word(&region, H_RCVBUF)?,
        };
        geo.check()?;
        for (at, v) in [
            (H_CONN_SLOT, CONN_SLOT),
            (H_LISTEN_SLOT, Geometry::listen_slot()),
        ] {
            let found = word(&region, at)?;
            if found as usize != v {
                return Err(StateError::Invalid {
                    what: "slot size (another build's layout)",
                    value: u64::from(found),
                });
            }
        }
        if region.len() < geo.size() {
            return Err(StateError::TooSmall {
                len: region.len(),
                need: geo.size(),
            });
        }
        Ok(TcpState { region, geo })
    }

    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    fn conn_at(&self, i: u32) -> usize {
        self.geo.conns_off() + i as usize * CONN_SLOT
    }

    fn listen_at(&self, i: u32) -> usize {
        self.geo.listen_off() + i as usize * Geometry::listen_slot()
    }

    /// The ring geometry of connection slot `i` (offsets are region offsets).
    pub fn rings(&self, i: u32) -> (RingGeom, RingGeom) {
        let base = self.geo.rings_off() + i as usize * self.geo.per_conn();
        (
            RingGeom {
                off: base as u32,
                cap: self.geo.sndbuf,
                head: 0,
                len: 0,
            },
            RingGeom {
                off: (base + self.geo.sndbuf as usize) as u32,
                cap: self.geo.rcvbuf,
                head: 0,
                len: 0,
            },
        )
    }

    fn read_meta(&self, at: usize) -> Meta {
        let mut b = [0u8; 32];
        if self.region.read_bytes(at, &mut b).is_err() {
            return Meta::default();
        }
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        Meta {
            used: w(0),
            gen: w(1),
            app: w(2),
            flags: w(3),
            parent: w(4),
            delivered: w(5),
            req_id: w(6),
            backlog: w(7),
        }
    }

    /// A copy of connection slot `i`'s header (readers other than the server).
    pub fn conn_meta(&self, i: u32) -> Meta {
        if i >= self.geo.conns {
            return Meta::default();
        }
        self.read_meta(self.conn_at(i))
    }

    /// A copy of listener slot `i`'s header (readers other than the server).
    pub fn listen_meta(&self, i: u32) -> Meta {
        if i >= self.geo.listeners {
            return Meta::default();
        }
        self.read_meta(self.listen_at(i))
    }

    /// Whether application `app` has a listening socket (services' readiness).
    pub fn app_has_listener(&self, app: u32) -> bool {
        (0..self.geo.listeners).any(|i| {
            let m = self.listen_meta(i);
            m.used == 1 && m.app == app
        })
    }

    /// Connections in use.
    pub fn conns_in_use(&self) -> usize {
        (0..self.geo.conns)
            .filter(|&i| self.conn_meta(i).used == 1)
            .count()
    }

    /// The server's view of connection slot `i`: its header, control block and ring memory.
    /// `&mut self` makes the borrow exclusive in this process; the tcp server is the only
    /// process that writes the table.
    #[allow(unsafe_code)]
    pub fn conn_mut(&mut self, i: u32) -> Option<(&mut Meta, &mut Tcb, &mut [u8], &mut [u8])> {
        if i >= self.geo.conns {
            return None;
        }
        let slot = self
            .region
            .ptr_at(self.conn_at(i), CONN_SLOT, std::mem::align_of::<ConnSlot>())
            .ok()?;
        let (snd, rcv) = self.rings(i);
        let sp = self
            .region
            .ptr_at(snd.off as usize, snd.cap as usize, 1)
            .ok()?;
        let rp = self
            .region
            .ptr_at(rcv.off as usize, rcv.cap as usize, 1)
            .ok()?;
        // SAFETY: `ptr_at` checked each span lies inside the mapping and is aligned for its
        // type; the slot (CONN_SLOT bytes at conns_off + i * CONN_SLOT) and the two rings
        // (disjoint spans of rings_off + i * per_conn) do not overlap each other or any
        // other slot. ConnSlot is repr(C) plain data (integers, f64, fixed arrays: every
        // bit pattern is a valid value), so reading what a predecessor or garbage left is
        // sound. `&mut self` keeps any other borrow of this table in this process out for
        // the returned lifetime; other processes only read headers by copying bytes.
        unsafe {
            let s = &mut *(slot as *mut ConnSlot);
            Some((
                &mut s.meta,
                &mut s.tcb,
                std::slice::from_raw_parts_mut(sp, snd.cap as usize),
                std::slice::from_raw_parts_mut(rp, rcv.cap as usize),
            ))
        }
    }

    /// The server's view of listener slot `i` (see [`TcpState::conn_mut`]).
    #[allow(unsafe_code)]
    pub fn listen_mut(&mut self, i: u32) -> Option<&mut ListenSlot> {
        if i >= self.geo.listeners {
            return None;
        }
        let p = self
            .region
            .ptr_at(
                self.listen_at(i),
                size_of::<ListenSlot>(),
                std::mem::align_of::<ListenSlot>(),
            )
            .ok()?;
        // SAFETY: as in `conn_mut`: an in-bounds, aligned span of one slot, plain repr(C)
        // data valid for any bits, borrowed exclusively through `&mut self`.
        unsafe { Some(&mut *(p as *mut ListenSlot)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            conns: 8,
            listeners: 2,
            sndbuf: 8192,
            rcvbuf: 16384,
        }
    }

    #[test]
    fn create_open_and_slots_are_disjoint() {
        let t = TcpState::create("tcp-state-test", geo()).unwrap();
        let mut u = TcpState::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        assert_eq!(u.geometry(), geo());
        for i in 0..8 {
            let (m, tcb, s, r) = u.conn_mut(i).unwrap();
            assert_eq!(m.used, 0);
            m.used = 1;
            m.app = 100 + i;
            tcb.local_port = i as u16;
            s.fill(i as u8);
            r.fill(!(i as u8));
            assert_eq!((s.len(), r.len()), (8192, 16384));
        }
        for i in 0..8 {
            let (m, tcb, s, r) = u.conn_mut(i).unwrap();
            assert_eq!((m.app, tcb.local_port), (100 + i, i as u16));
            assert!(s.iter().all(|&b| b == i as u8));
            assert!(r.iter().all(|&b| b == !(i as u8)));
            assert_eq!(t.conn_meta(i).app, 100 + i);
        }
        assert!(u.conn_mut(8).is_none());
        u.listen_mut(1).unwrap().meta = Meta {
            used: 1,
            app: 7,
            ..Meta::default()
        };
        assert!(t.app_has_listener(7));
        assert!(!t.app_has_listener(8));
        assert_eq!(t.conns_in_use(), 8);
    }

    #[test]
    fn bad_geometry_and_foreign_regions_are_refused() {
        let mut g = geo();
        g.sndbuf = 100;
        assert!(matches!(
            TcpState::create("tcp-state-bad", g),
            Err(StateError::Invalid { what: "sndbuf", .. })
        ));
        let r = Region::create("tcp-state-foreign", RegionKind::GENERIC, 1 << 16).unwrap();
        assert!(matches!(TcpState::open(r), Err(StateError::Magic(0))));
    }
}
