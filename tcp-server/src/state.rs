//! The `tcp.state` region: every listening socket and connection of the tcp server, as
//! plain `#[repr(C)]` data at fixed offsets, so that it outlives the server process (DESIGN
//! rules 1-3, docs/tcp.md). The supervisor creates it ([`TcpState::create`]); the tcp server
//! maps it and is its only writer; `keepnet status` and the supervisor read slot headers.
//!
//! | offset | what |
//! |---|---|
//! | `HEADER_SIZE` | table header: magic, version, capacities, buffer sizes, section offsets |
//! | `listen_off` | `listeners` x [`ListenSlot`]: [`Meta`], [`Listener`], its [`SynQueue`] |
//! | `conns_off` | `conns` x [`ConnSlot`]: [`Meta`], [`Tcb`], two checkpoints (padded to [`CONN_SLOT`]) |
//! | `rings_off` | `conns` x (`sndbuf` + `rcvbuf`) bytes: each connection's send and receive rings |
//!
//! The ring memory is reserved, not touched: a memfd page costs memory only once written,
//! so an idle connection costs its slot page and the ring pages its data touched.
//!
//! # Checkpoints (restartable at any instruction, DESIGN rule 2)
//!
//! The server works on each slot's [`Meta`] and [`Tcb`] in place. A `kill -9` in the middle of
//! a batch could leave them torn, so at the end of every batch, before anything leaves the
//! server, [`TcpState::checkpoint`] copies every slot the batch touched into the older of the
//! slot's two [`Ckpt`] copies: its sequence number is zeroed first, the body copied, and the
//! number set last, so a copy cut short by a crash is invalid and the other one stands. A
//! fresh server restores each slot from its newest valid copy ([`TcpState::restore_conn`]).
//! The ring bytes are not copied: a restored receive ring only lacks bytes the peer will
//! retransmit (nothing was acknowledged after the checkpoint), and send-ring bytes that a
//! later batch overwrote were acknowledged by the peer already.

use std::mem::size_of;
use std::sync::atomic::Ordering;

use keepnet_ipc::{Region, RegionError, RegionKind};

use crate::listen::{Listener, SynQueue};
use crate::tcb::{RingGeom, Tcb};

const MAGIC: u64 = u64::from_le_bytes(*b"KNTCPST1");
/// Layout version (2: 48-byte [`Meta`], checkpoints, secrets in the header).
pub const VERSION: u32 = 2;
/// Slots of each listener's SYN queue table (half of them usable, see [`SynQueue`]).
pub const SYNQ_SLOTS: usize = 512;
/// The SYN queue type stored in a [`ListenSlot`].
pub type StateSynQueue = SynQueue<SYNQ_SLOTS>;
/// Bytes per connection slot.
pub const CONN_SLOT: usize = 2048;
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
/// The timestamp offset of connections made by listeners (kept across restarts).
const H_TS_OFFSET: usize = 36;
/// One past the highest connection slot ever used: a restart scans no further.
const H_HWM: usize = 40;
/// 1 once the secret and the timestamp offset are set.
const H_SEEDED: usize = 44;
/// The RFC 6528 ISN and SYN-cookie secret (16 bytes): kept across restarts, so sequence
/// spaces and outstanding cookies stay valid.
const H_SECRET: usize = 48;
const HEADER_LEN: usize = 64;

/// Slot header, the same for listeners and connections: 48 bytes.
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
    /// Stream offset of the next byte into the send ring: bytes of SEND buffers appended so
    /// far (a restarted server skips what its predecessor appended).
    pub snd_appended: u64,
    /// Stream offset of the next received byte to hand to the application (DATA).
    pub rcv_popped: u64,
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

/// A checkpoint of a connection slot: valid when `seq` is not 0.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ckpt {
    pub seq: u64,
    pub meta: Meta,
    pub tcb: Tcb,
}

/// One connection: the working copy and two checkpoints (module docs).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnSlot {
    pub meta: Meta,
    pub tcb: Tcb,
    pub ck: [Ckpt; 2],
}

const _: () = assert!(size_of::<ConnSlot>() <= CONN_SLOT);
const _: () = assert!(size_of::<Meta>() == 48);

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
    /// Connection slots handed out by [`TcpState::conn_mut`] since the last checkpoint.
    touched: Vec<u32>,
    touched_bits: Vec<u64>,
    hwm: u32,
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
        Ok(TcpState::with(region, geo, 0))
    }

    fn with(region: Region, geo: Geometry, hwm: u32) -> TcpState {
        TcpState {
            region,
            touched: Vec::new(),
            touched_bits: vec![0; (geo.conns as usize).div_ceil(64)],
            hwm: hwm.min(geo.conns),
            geo,
        }
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
        let hwm = word(&region, H_HWM)?;
        Ok(TcpState::with(region, geo, hwm))
    }

    /// The secret and timestamp offset a previous server stored, if any.
    pub fn seeds(&self) -> Option<([u8; 16], u32)> {
        let h = keepnet_ipc::region::HEADER_SIZE;
        if word(&self.region, H_SEEDED).ok()? != 1 {
            return None;
        }
        let mut secret = [0u8; 16];
        self.region.read_bytes(h + H_SECRET, &mut secret).ok()?;
        Some((secret, word(&self.region, H_TS_OFFSET).ok()?))
    }

    /// Stores the secret and the timestamp offset for the servers after this one.
    pub fn set_seeds(&self, secret: &[u8; 16], ts_offset: u32) -> Result<(), RegionError> {
        let h = keepnet_ipc::region::HEADER_SIZE;
        self.region.write_bytes(h + H_SECRET, secret)?;
        self.region
            .write_bytes(h + H_TS_OFFSET, &ts_offset.to_le_bytes())?;
        self.region.write_bytes(h + H_SEEDED, &1u32.to_le_bytes())
    }

    /// One past the highest connection slot ever handed out.
    pub fn conn_hwm(&self) -> u32 {
        self.hwm
    }

    fn touch(&mut self, i: u32) {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        if let Some(bits) = self.touched_bits.get_mut(w) {
            if *bits & b == 0 {
                *bits |= b;
                self.touched.push(i);
            }
        }
        if i >= self.hwm {
            self.hwm = i + 1;
            let h = keepnet_ipc::region::HEADER_SIZE;
            let _ = self.region.write_bytes(h + H_HWM, &self.hwm.to_le_bytes());
        }
    }

    /// Checkpoints every connection slot touched since the last call (module docs); returns
    /// how many.
    pub fn checkpoint(&mut self) -> usize {
        let touched = std::mem::take(&mut self.touched);
        for &i in &touched {
            self.checkpoint_slot(i);
            if let Some(bits) = self.touched_bits.get_mut((i / 64) as usize) {
                *bits &= !(1u64 << (i % 64));
            }
        }
        let n = touched.len();
        self.touched = touched;
        self.touched.clear();
        n
    }

    fn ck_at(&self, i: u32, k: usize) -> usize {
        self.conn_at(i) + std::mem::offset_of!(ConnSlot, ck) + k * size_of::<Ckpt>()
    }

    /// The sequence numbers of slot `i`'s two checkpoints (0: invalid).
    fn ck_seqs(&self, i: u32) -> Option<[u64; 2]> {
        let a = self.region.atomic_u64(self.ck_at(i, 0)).ok()?;
        let b = self.region.atomic_u64(self.ck_at(i, 1)).ok()?;
        Some([a.load(Ordering::Acquire), b.load(Ordering::Acquire)])
    }

    /// Writes slot `i`'s working copy into its older checkpoint.
    pub fn checkpoint_slot(&mut self, i: u32) {
        let Some(seqs) = self.ck_seqs(i) else {
            return;
        };
        let k = usize::from(seqs[1] < seqs[0]);
        let next = seqs[0].max(seqs[1]).wrapping_add(1).max(1);
        let Ok(seq) = self.region.atomic_u64(self.ck_at(i, k)) else {
            return;
        };
        seq.store(0, Ordering::Release);
        let mut body = [0u8; size_of::<Meta>() + size_of::<Tcb>()];
        let at = self.conn_at(i);
        if self.region.read_bytes(at, &mut body).is_err() {
            return;
        }
        let body_at = self.ck_at(i, k) + std::mem::offset_of!(Ckpt, meta);
        const _: () = assert!(
            std::mem::offset_of!(Ckpt, tcb) - std::mem::offset_of!(Ckpt, meta) == size_of::<Meta>()
        );
        const _: () = assert!(std::mem::offset_of!(ConnSlot, tcb) == size_of::<Meta>());
        if self.region.write_bytes(body_at, &body).is_err() {
            return;
        }
        seq.store(next, Ordering::Release);
    }

    /// A restarting server: puts slot `i`'s newest valid checkpoint back into its working
    /// copy and returns its header; a slot never checkpointed is made free (its working copy
    /// may be a half-made connection of a crashed batch).
    pub fn restore_conn(&mut self, i: u32) -> Option<Meta> {
        let seqs = self.ck_seqs(i)?;
        let at = self.conn_at(i);
        if seqs == [0, 0] {
            let mut m = self.read_meta(at);
            if m.used != 0 {
                m.used = 0;
                m.gen = m.gen.wrapping_add(1);
                let _ = self.region.write_bytes(at, &meta_bytes(&m));
            }
            return Some(m);
        }
        let k = usize::from(seqs[1] > seqs[0]);
        let mut body = [0u8; size_of::<Meta>() + size_of::<Tcb>()];
        let body_at = self.ck_at(i, k) + std::mem::offset_of!(Ckpt, meta);
        self.region.read_bytes(body_at, &mut body).ok()?;
        self.region.write_bytes(at, &body).ok()?;
        Some(self.read_meta(at))
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
        let mut b = [0u8; 48];
        if self.region.read_bytes(at, &mut b).is_err() {
            return Meta::default();
        }
        let w = |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let q = |i: usize| u64::from(w(i)) | (u64::from(w(i + 1)) << 32);
        Meta {
            used: w(0),
            gen: w(1),
            app: w(2),
            flags: w(3),
            parent: w(4),
            delivered: w(5),
            req_id: w(6),
            backlog: w(7),
            snd_appended: q(8),
            rcv_popped: q(10),
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
        self.touch(i);
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

fn meta_bytes(m: &Meta) -> [u8; 48] {
    let mut b = [0u8; 48];
    for (k, v) in [
        m.used,
        m.gen,
        m.app,
        m.flags,
        m.parent,
        m.delivered,
        m.req_id,
        m.backlog,
    ]
    .into_iter()
    .enumerate()
    {
        b[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
    }
    b[32..40].copy_from_slice(&m.snd_appended.to_le_bytes());
    b[40..48].copy_from_slice(&m.rcv_popped.to_le_bytes());
    b
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
    fn restore_takes_the_newest_whole_checkpoint() {
        let t = TcpState::create("tcp-state-ck", geo()).unwrap();
        let mut u = TcpState::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        // Slot 3: three batches, each checkpointed.
        for batch in 1..=3u64 {
            let (m, tcb, _, _) = u.conn_mut(3).unwrap();
            m.used = 1;
            m.snd_appended = batch * 1000;
            tcb.snd_nxt = batch as u32;
            assert_eq!(u.checkpoint(), 1);
        }
        // A fourth batch is cut short by a crash before its checkpoint.
        let (m, tcb, _, _) = u.conn_mut(3).unwrap();
        m.snd_appended = 4000;
        tcb.snd_nxt = 4;
        // Slot 5 was made in that batch and never checkpointed.
        u.conn_mut(5).unwrap().0.used = 1;
        drop(u);
        let mut v = TcpState::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        assert_eq!(v.conn_hwm(), 6);
        let m = v.restore_conn(3).unwrap();
        assert_eq!((m.used, m.snd_appended), (1, 3000));
        assert_eq!(v.conn_mut(3).unwrap().1.snd_nxt, 3);
        let m5 = v.restore_conn(5).unwrap();
        assert_eq!(
            (m5.used, m5.gen),
            (0, 1),
            "a slot never checkpointed is free"
        );
        // A checkpoint torn by a crash (sequence number zeroed, body half written) is
        // passed over for the older whole one.
        let seqs = v.ck_seqs(3).unwrap();
        let newest = usize::from(seqs[1] > seqs[0]);
        v.region
            .atomic_u64(v.ck_at(3, newest))
            .unwrap()
            .store(0, Ordering::Release);
        let m = v.restore_conn(3).unwrap();
        assert_eq!(m.snd_appended, 2000);
        assert_eq!(v.conn_mut(3).unwrap().1.snd_nxt, 2);
    }

    #[test]
    fn seeds_are_kept_for_the_next_server() {
        let t = TcpState::create("tcp-state-seeds", geo()).unwrap();
        assert_eq!(t.seeds(), None);
        t.set_seeds(&[7u8; 16], 12345).unwrap();
        let u = TcpState::open(t.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        assert_eq!(u.seeds(), Some(([7u8; 16], 12345)));
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
