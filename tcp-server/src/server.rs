//! The `keepnet-tcp` server: the connection engine ([`crate::conn`]) and the listen backlog
//! ([`crate::listen`]) on the ip<->tcp transport link, the state table in shared memory
//! ([`crate::state`]), and one region per attached application (`keepnet_server::app`,
//! docs/tcp.md).
//!
//! ## Boot contract (`keepnet_server::boot`)
//!
//! | name | kind | what |
//! |---|---|---|
//! | region `transport.tcp` | RINGS | the [`TransportLink`] for protocol 6, transport endpoint [`TCP`] |
//! | region `tcp.state` | GENERIC | the [`TcpState`] table (supervisor: [`TcpState::create`]) |
//! | region `peer.ip` | CONTROL | the ip server's control block: its doorbell is rung after we publish to it (optional) |
//! | fd `bell.ip` | eventfd | the eventfd of the ip server's doorbell (optional) |
//! | fd `bell` | eventfd | this server's doorbell eventfd (taken by `Boot`); apps ring it |
//! | fd `hotplug` | SOCK_SEQPACKET | the supervisor's [`Hotplug`] messages (optional, with a warning) |
//! | env `KEEPNET_TCP_CONFIG` | JSON | [`ConfigJson`]: `{"addr":"198.18.0.2"}` and optional settings; unknown fields are refused |
//!
//! ## A poll, in one bounded batch
//!
//! 1. collect SEND_POOL buffers the ip server is done with;
//! 2. read up to [`BATCH`] segments from `deliver` (take each buffer before committing the
//!    slots), parse and check each ([`crate::wire`]: every malformation counted by its
//!    reason), and hand it to its connection (RFC 9293 3.10.7.4), its listener (SYN queue
//!    and cookies, [`crate::listen`]) or answer it with a RST (RFC 9293 3.10.7.1);
//! 3. per application: collect RX buffers handed back (each opens its connection's delivery
//!    allowance), then up to [`BATCH`] requests (LISTEN, CONNECT, SEND, CLOSE, SHUTDOWN,
//!    SETOPT, ABORT). A SEND's buffer is kept until all of it is in the send ring;
//! 4. fire due timers (a heap of absolute deadlines taken from each `Tcb`);
//! 5. service every connection touched: move queued application bytes into its send ring,
//!    hand received bytes to its application (DATA, at most the receive buffer size
//!    outstanding per connection), report ACCEPTED / CONNECTED / EOF / ERROR, transmit what
//!    the engine has due (no more segments than SEND_POOL buffers free), free it when done;
//! 6. publish to the ip server and to each application, ring their doorbells once.
//!
//! ## Where state lives
//!
//! Listeners, their SYN queues and every connection's `Tcb`, send ring and receive ring are
//! in `tcp.state` (shared memory, made by the supervisor): data is acknowledged only once it
//! is in the receive ring there. What this process keeps besides is an index (4-tuple ->
//! slot, port -> listener), the timer heap, and application SEND buffers not yet copied into
//! a send ring (still in the application's region). Making a tcp-server crash transparent
//! from this (re-indexing the slots, re-reading those buffers) is issue 6's.
//!
//! ## Trust
//!
//! Segments from the network and everything in an application's region are untrusted: a
//! malformed segment is counted and dropped, a bad request or descriptor is counted
//! (`drop.app_bad`) and answered with an error, a corrupt application ring detaches that
//! application. Only errors on the transport link's rings stop the server.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use keepnet_ipc::{
    BufRef, BufferPool, Descriptor, Doorbell, EndpointId, FreeList, Region, RegionKind, Retakes,
    RingError,
};
use keepnet_server::app::{
    event, op, shut, sockopt, AppEvent, AppLink, AppRequest, AppServerEnds, HotplugEvent,
    HotplugSocket, ServerBuffers, Status, APP_BUF, APP_HEADROOM,
};
use keepnet_server::control::{monotonic_ns, Counter};
use keepnet_server::wiring::{DatagramSlot, TransportEnds, TransportLink, DATAGRAM_BUF, IP, TCP};
use keepnet_server::{codec, Boot, ControlBlock, Progress, Scribbler, Server, ServerError};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cc::CcAlgo;
use crate::conn::Conn;
use crate::counters::Ctr;
use crate::isn::IsnGen;
use crate::listen::{
    self, AckAction, AckSeg, Expired, Listener, RstAction, Syn, SynAck, SynAction, SynRetry,
    Timestamps,
};
use crate::seq::Seq;
use crate::state::{meta, Meta, TcpState};
use crate::tcb::{flag, State, Tcb, TcpConfig, TcpError};
use crate::wire::{Flags, TcpRepr, TcpSegment, WireError};

/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// Version of the live-update snapshot format this build writes (and the newest it reads).
pub const SNAPSHOT_FORMAT: u32 = 1;

/// The live-update snapshot (format 1). Connection state lives in the shared table; the
/// snapshot carries the process's own bookkeeping and, per socket, what the successor checks
/// the table against before it takes over (a snapshot that does not match is refused whole).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
struct SnapshotV1 {
    ephemeral_cursor: u16,
    next_listen_tick: u64,
    /// (slot, generation, bytes appended to the send ring, bytes handed to the application).
    conns: Vec<(u32, u32, u64, u64)>,
    /// (slot, generation, port).
    listeners: Vec<(u32, u32, u16)>,
}

/// Environment variable holding the JSON configuration.
pub const CONFIG_ENV: &str = "KEEPNET_TCP_CONFIG";
/// Region of the ip<->tcp transport link.
pub const TRANSPORT_REGION: &str = "transport.tcp";
/// Region of the state table.
pub const STATE_REGION: &str = "tcp.state";
/// Region of the ip server's control block (for its doorbell).
pub const PEER_IP_REGION: &str = "peer.ip";
/// Fd: the eventfd of the ip server's doorbell.
pub const PEER_IP_BELL_FD: &str = "bell.ip";
/// Fd: this server's end of the hotplug socket pair.
pub const HOTPLUG_FD: &str = "hotplug";
/// Segments read from `deliver`, and requests read from each application, per poll at most.
pub const BATCH: usize = 64;
/// Buffers collected from a return ring per poll at most.
const COLLECT: usize = 512;
/// SEND_POOL buffers kept back from data bursts for control segments (ACKs, RSTs, SYN-ACKs).
const CONTROL_RESERVE: usize = 8;
/// Tag before the payload of an APP_RX_POOL buffer (24 bytes ending at the headroom): the
/// stream offset of its first byte (u64), the buffer's lease when it was filled, the length,
/// the magic, the connection's handle. A restarted server tells from it which of the buffers
/// it holds were filled and never published (lease unchanged), see [`TcpServer::attach`].
const TAG_MAGIC: u32 = u32::from_le_bytes(*b"TCPT");
const TAG_AT: u32 = APP_HEADROOM - 8;
const RX_TAG_LEN: usize = 24;
/// Tag at the start of an APP_TX_POOL buffer the server took (32 bytes, in the headroom the
/// payload never uses): magic, handle, lease after the take, payload offset and length, and
/// the stream offset of the payload's first byte. A restarted server rebuilds its queue of
/// SEND buffers from these, and recognises a SEND it meets again on the ring.
const TX_TAG_MAGIC: u32 = u32::from_le_bytes(*b"TCPS");
const TX_TAG_LEN: usize = 32;
/// Hotplug messages handled per `Command::Hotplug` at most.
const HOTPLUG_BATCH: usize = 4096;
/// Ephemeral ports (RFC 6335 8.1.2 dynamic range).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 49152..=65535;
/// How often the listeners' SYN queues are checked for SYN-ACK retransmissions.
const LISTEN_TICK_US: u64 = 50_000;
/// Largest payload of one DATA event.
const DATA_MAX: usize = (APP_BUF - APP_HEADROOM) as usize;
/// Handle bit of a listener.
const H_LISTENER: u32 = 1 << 31;
const H_GEN_SHIFT: u32 = 20;
const H_GEN_MASK: u32 = 0x7ff;
const H_SLOT_MASK: u32 = (1 << H_GEN_SHIFT) - 1;

fn now_us() -> u64 {
    monotonic_ns() / 1000
}

/// The JSON form of the configuration (`KEEPNET_TCP_CONFIG`).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct ConfigJson {
    /// keepnet's address (required).
    pub addr: Ipv4Addr,
    /// MSS we announce (default 1460: an MTU of 1500).
    #[serde(default)]
    pub mss: Option<u16>,
    /// Accept queue when a LISTEN names none (default 128).
    #[serde(default)]
    pub backlog: Option<u32>,
    /// TIME-WAIT in milliseconds (default 60000, RFC 9293 3.4.2: 2 MSL).
    #[serde(default)]
    pub time_wait_ms: Option<u64>,
    /// Delayed ACK timeout in milliseconds (default 40; RFC 9293 3.8.6.3: under 0.5 s).
    #[serde(default)]
    pub delack_ms: Option<u64>,
    /// Congestion control: "cubic" (default, RFC 9438) or "newreno" (RFC 5681/6582).
    #[serde(default)]
    pub cc: Option<String>,
    /// Minimum RTO in milliseconds (default 200).
    #[serde(default)]
    pub min_rto_ms: Option<u64>,
}

/// The server's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub addr: Ipv4Addr,
    pub tcp: TcpConfig,
    pub backlog: u32,
}

/// Parses `KEEPNET_TCP_CONFIG`.
pub fn parse_config(text: &str) -> Result<Config, String> {
    let j: ConfigJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let a = j.addr;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(format!("addr: {a} is not a unicast host address"));
    }
    let mut tcp = TcpConfig::default();
    if let Some(m) = j.mss {
        if !(536..=9000).contains(&m) {
            return Err(format!("mss: {m} is outside 536..=9000"));
        }
        tcp.mss = m;
    }
    if let Some(t) = j.time_wait_ms {
        if t > 240_000 {
            return Err(format!("time_wait_ms: {t} is above 240000 (4 minutes)"));
        }
        tcp.time_wait = Duration::from_millis(t);
    }
    if let Some(d) = j.delack_ms {
        if d >= 500 {
            return Err(format!(
                "delack_ms: {d} must be below 500 (RFC 9293 3.8.6.3)"
            ));
        }
        tcp.delack = Duration::from_millis(d);
    }
    if let Some(r) = j.min_rto_ms {
        if !(1..=1000).contains(&r) {
            return Err(format!("min_rto_ms: {r} is outside 1..=1000"));
        }
        tcp.min_rto = Duration::from_millis(r);
    }
    if let Some(cc) = j.cc.as_deref() {
        tcp.cc = match cc {
            "cubic" => CcAlgo::Cubic,
            "newreno" | "reno" => CcAlgo::NewReno,
            other => return Err(format!("cc: {other:?} is not \"cubic\" or \"newreno\"")),
        };
    }
    let backlog = j.backlog.unwrap_or(128);
    if !(1..=65535).contains(&backlog) {
        return Err(format!("backlog: {backlog} is outside 1..=65535"));
    }
    Ok(Config {
        addr: a,
        tcp,
        backlog,
    })
}

/// Why an application's region could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Wiring(#[from] keepnet_server::wiring::WiringError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("attach of app {app}: {why}")]
    Mismatch { app: u32, why: String },
}

/// One attached application.
struct AppConn {
    pid: u32,
    endpoint: EndpointId,
    link: AppLink,
    ends: AppServerEnds,
    rx_free: FreeList,
    tx_retakes: Retakes,
    server_bell: Doorbell,
    app_bell: Doorbell,
    events: Vec<AppEvent>,
    tx_returns: Vec<Descriptor>,
    broken: Option<RingError>,
    uncommitted: usize,
    /// Connections with news for this application that found no RX buffer or no room on
    /// its events ring: serviced again once it hands buffers back or reads events.
    starved: Vec<u32>,
    /// Requests that were on the ring when it attached: after a restart they may be ones a
    /// predecessor carried out without committing (LISTEN and CONNECT answer again).
    replay_left: usize,
}

/// What `recover_app_buffers` found.
#[derive(Default)]
struct Recovered {
    conns: usize,
    republished: usize,
    requeued: usize,
}

impl AppConn {
    fn event_room(&mut self) -> usize {
        match self.ends.events.free_slots() {
            Ok(n) => n.saturating_sub(self.events.len()),
            Err(e) => {
                self.broken = Some(e);
                0
            }
        }
    }

    fn publish(&mut self) -> Result<(), RingError> {
        let mut any = false;
        if !self.events.is_empty() {
            let pushed = self.ends.events.push_slice(&self.events)?;
            any |= pushed > 0;
            // Room was checked for every event; only a ring shrunk behind our back leaves
            // some: their buffers come back to us.
            for ev in self.events.drain(..).skip(pushed) {
                if ev.kind == event::DATA {
                    self.rx_free.put(ev.desc.index);
                }
            }
        }
        if !self.tx_returns.is_empty() {
            let pushed = self.ends.tx_return.push_slice(&self.tx_returns)?;
            any |= pushed > 0;
            self.tx_returns.drain(..pushed);
        }
        self.ends.requests.commit(self.uncommitted)?;
        self.uncommitted = 0;
        self.ends.requests.rewind();
        if any {
            self.app_bell.ring();
        }
        Ok(())
    }
}

/// The tag of an RX buffer (see [`TAG_MAGIC`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RxTag {
    handle: u32,
    len: u32,
    lease: u16,
    start: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads `N` bytes of buffer `index` of `pool` at `offset` (validated like any descriptor).
fn read_at<const N: usize>(pool: &BufferPool, index: u32, offset: u32) -> Option<[u8; N]> {
    let r = pool
        .check(&Descriptor {
            pool: pool.id(),
            lease: 0,
            index,
            offset,
            len: N as u32,
        })
        .ok()?;
    let mut b = [0u8; N];
    (pool.read(&r, &mut b) == N).then_some(b)
}

/// The tag before an RX buffer's payload, if it has one.
fn read_tag(link: &AppLink, index: u32) -> Option<RxTag> {
    let b: [u8; RX_TAG_LEN] = read_at(&link.rx_pool, index, TAG_AT + 8 - RX_TAG_LEN as u32)?;
    (le32(&b, 16) == TAG_MAGIC).then(|| RxTag {
        start: le64(&b, 0),
        lease: le32(&b, 8) as u16,
        len: le32(&b, 12),
        handle: le32(&b, 20),
    })
}

fn clear_tag(link: &AppLink, index: u32) {
    let _ = link.rx_pool.write(index, TAG_AT, &[0u8; 4]);
}

fn write_tag(link: &AppLink, index: u32, t: &RxTag) -> bool {
    let mut b = [0u8; RX_TAG_LEN];
    b[..8].copy_from_slice(&t.start.to_le_bytes());
    b[8..12].copy_from_slice(&u32::from(t.lease).to_le_bytes());
    b[12..16].copy_from_slice(&t.len.to_le_bytes());
    b[16..20].copy_from_slice(&TAG_MAGIC.to_le_bytes());
    b[20..24].copy_from_slice(&t.handle.to_le_bytes());
    link.rx_pool
        .write(index, TAG_AT + 8 - RX_TAG_LEN as u32, &b)
        .is_ok()
}

/// The tag of a TX buffer the server took (see [`TX_TAG_MAGIC`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TxTag {
    handle: u32,
    lease: u16,
    offset: u32,
    len: u32,
    start: u64,
}

fn read_tx_tag(link: &AppLink, index: u32) -> Option<TxTag> {
    let b: [u8; TX_TAG_LEN] = read_at(&link.tx_pool, index, 0)?;
    (le32(&b, 0) == TX_TAG_MAGIC).then(|| TxTag {
        handle: le32(&b, 4),
        lease: le32(&b, 8) as u16,
        offset: le32(&b, 12),
        len: le32(&b, 16),
        start: le64(&b, 24),
    })
}

fn write_tx_tag(link: &AppLink, index: u32, t: &TxTag) -> bool {
    let mut b = [0u8; TX_TAG_LEN];
    b[..4].copy_from_slice(&TX_TAG_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&t.handle.to_le_bytes());
    b[8..12].copy_from_slice(&u32::from(t.lease).to_le_bytes());
    b[12..16].copy_from_slice(&t.offset.to_le_bytes());
    b[16..20].copy_from_slice(&t.len.to_le_bytes());
    b[24..32].copy_from_slice(&t.start.to_le_bytes());
    link.tx_pool.write(index, 0, &b).is_ok()
}

/// Records news for `slot` told this batch (see `Local::told_set`).
fn tell(told: &mut Vec<u32>, l: &mut Local, slot: u32, set: u32, clear: u32) {
    if l.told_set | l.told_clear == 0 {
        told.push(slot);
    }
    l.told_set |= set;
    l.told_clear |= clear;
}

fn conn_handle(slot: u32, gen: u32) -> u32 {
    ((gen & H_GEN_MASK) << H_GEN_SHIFT) | (slot + 1)
}

fn listen_handle(slot: u32, gen: u32) -> u32 {
    H_LISTENER | conn_handle(slot, gen)
}

/// (is a listener, slot, generation bits) of a handle; None for 0 or a slot of 0.
fn split_handle(h: u32) -> Option<(bool, u32, u32)> {
    let slot = h & H_SLOT_MASK;
    if slot == 0 {
        return None;
    }
    Some((
        h & H_LISTENER != 0,
        slot - 1,
        (h >> H_GEN_SHIFT) & H_GEN_MASK,
    ))
}

fn reply(req: &AppRequest, status: Status) -> AppEvent {
    AppEvent {
        kind: event::REPLY,
        id: req.id,
        socket: req.socket,
        status: status.code(),
        ..AppEvent::default()
    }
}

fn error_status(e: Option<TcpError>) -> Status {
    match e {
        Some(TcpError::ConnectionRefused) => Status::ConnectionRefused,
        Some(TcpError::ConnectionReset) => Status::ConnectionReset,
        Some(TcpError::TimedOut) => Status::TimedOut,
        Some(_) => Status::ConnectionAborted,
        None => Status::ConnectionAborted,
    }
}

/// A connection's per-process bookkeeping (rebuilt from the table on a restart).
#[derive(Default)]
struct Local {
    /// Application SEND buffers not yet all in the send ring: descriptor, stream offset of
    /// its first byte (bytes before `Meta::snd_appended` are in the ring already).
    pending: VecDeque<(Descriptor, u64)>,
    /// Stream offset after the last byte queued in `pending`.
    queued_end: u64,
    /// RX buffers filled by a crashed predecessor and never published: (index, length),
    /// published before anything else.
    redeliver: Vec<(u32, u32)>,
    /// News told to the application this batch: `Meta::flags` bits to set and to clear once
    /// the events are published (so the checkpoint before the publish still says "not told",
    /// and a crash in between makes a successor tell again rather than never).
    told_set: u32,
    told_clear: u32,
    /// Restored from a predecessor's table and its application not attached again yet: its
    /// queued SEND buffers are not known, so a close or shutdown waiting for them waits.
    awaiting_app: bool,
    /// The application whose TX pool those buffers are in (it may have closed the
    /// connection since: its bytes still go out before the FIN).
    pending_app: u32,
    /// Deadline currently in the timer heap (0: none).
    scheduled: u64,
    /// Queued for servicing this poll.
    dirty: bool,
    /// The 4-tuple is in the index.
    indexed: bool,
}

/// The server (module docs).
pub struct TcpServer {
    /// Connections with news told this batch (see `Local::told_set`).
    told: Vec<u32>,
    cfg: Config,
    state: TcpState,
    link: TransportLink,
    ends: TransportEnds,
    send_free: FreeList,
    deliver_retakes: Retakes,
    deliver_returns: Vec<Descriptor>,
    send_batch: Vec<DatagramSlot>,
    ip_bell: Option<Doorbell>,
    own_bell: Doorbell,
    apps: BTreeMap<u32, AppConn>,
    hotplug: Option<HotplugSocket>,
    counters: Vec<Counter>,
    gauges: [(Counter, u64); 3],
    conn_index: HashMap<(u32, u16, u16), u32>,
    listen_index: HashMap<u16, u32>,
    free_conns: Vec<u32>,
    free_listeners: Vec<u32>,
    /// Per connection slot, grown to the highest slot recovered or allocated (not sized to
    /// the table up front: a successor taking over at a live update would otherwise spend a
    /// millisecond of the blackout building 16 K of these).
    local: Vec<Local>,
    timers: BinaryHeap<Reverse<(u64, u32)>>,
    dirty: Vec<u32>,
    /// Connections that found no SEND_POOL buffer: serviced again once some come back.
    blocked: Vec<u32>,
    next_listen_tick: u64,
    isn: IsnGen,
    ts_offset: u32,
    rcv_shift: u8,
    synack_window: u16,
    ephemeral_cursor: u16,
    scratch: Vec<u8>,
    seg_buf: Vec<u8>,
}

/// Builds the server from its boot environment (the `keepnet-tcp` binary's whole job).
pub fn build(boot: &mut Boot) -> Result<TcpServer, ServerError> {
    let text = std::env::var(CONFIG_ENV).map_err(|e| {
        ServerError::Fatal(format!(
            "{CONFIG_ENV}: {e} (expected JSON such as {{\"addr\":\"198.18.0.2\"}})"
        ))
    })?;
    let cfg = parse_config(&text).map_err(|e| ServerError::Fatal(format!("{CONFIG_ENV}: {e}")))?;
    let region = boot.region(TRANSPORT_REGION, RegionKind::RINGS)?;
    let link = TransportLink::open_for(region, PROTO_TCP, TCP)
        .map_err(|e| ServerError::Fatal(format!("{TRANSPORT_REGION} region: {e}")))?;
    let state = boot.region(STATE_REGION, RegionKind::GENERIC)?;
    let table = TcpState::open(state)
        .map_err(|e| ServerError::Fatal(format!("{STATE_REGION} region: {e}")))?;
    let ip_bell = boot.peer_doorbell(PEER_IP_REGION, PEER_IP_BELL_FD)?;
    let hotplug = boot.hotplug(HOTPLUG_FD)?;
    TcpServer::new(cfg, link, table, ip_bell, hotplug, boot.control())
}

impl TcpServer {
    /// Claims the transport ends of `link`, recovers its buffers, opens the table.
    pub fn new(
        cfg: Config,
        link: TransportLink,
        state: TcpState,
        ip_bell: Option<Doorbell>,
        hotplug: Option<HotplugSocket>,
        control: &ControlBlock,
    ) -> Result<TcpServer, ServerError> {
        if link.protocol() != PROTO_TCP || link.transport() != TCP {
            return Err(ServerError::Fatal(format!(
                "transport link is for protocol {} endpoint {}, not tcp",
                link.protocol(),
                link.transport().0
            )));
        }
        let ends = link.transport_ends()?;
        let (outgoing, incoming) = link.transport_in_flight()?;
        let send_free = FreeList::recover(&link.send_pool, TCP, &outgoing, &incoming);
        let (held, deliver_retakes) = link.deliver_pool.recover(TCP, &outgoing, &incoming);
        let deliver_returns: Vec<Descriptor> = held
            .iter()
            .map(|&i| link.deliver_pool.descriptor(i, 0))
            .collect();
        let geo = state.geometry();
        // The ISN / cookie secret and the timestamp offset outlive the process (isn.rs).
        let seed = monotonic_ns() ^ (u64::from(std::process::id()) << 17);
        let (isn, ts_offset) = match state.seeds() {
            Some((secret, ts)) => (IsnGen::new(secret), ts),
            None => {
                let isn = IsnGen::from_entropy()
                    .map_err(|e| ServerError::Fatal(format!("reading /dev/urandom: {e}")))?;
                let ts = (seed >> 7) as u32;
                state
                    .set_seeds(isn.secret(), ts)
                    .map_err(|e| ServerError::Fatal(format!("{STATE_REGION} region: {e}")))?;
                (isn, ts)
            }
        };
        let ctr = |name: &str| control.counter(name);
        let counters: Vec<Counter> = Ctr::ALL.iter().map(|c| ctr(c.name())).collect();
        let gauge = |name: &str| {
            let c = control.counter(name);
            let v = c.get();
            (c, v)
        };
        info!(
            addr = %cfg.addr,
            conns = geo.conns,
            listeners = geo.listeners,
            sndbuf = geo.sndbuf,
            rcvbuf = geo.rcvbuf,
            send_free = send_free.len(),
            "tcp server ready"
        );
        let mut server = TcpServer {
            told: Vec::new(),
            synack_window: geo.rcvbuf.min(0xffff) as u16,
            rcv_shift: if cfg.tcp.window_scaling {
                crate::tcb::window_shift(geo.rcvbuf)
            } else {
                0
            },
            cfg,
            send_free,
            deliver_retakes,
            deliver_returns,
            send_batch: Vec::with_capacity(1024),
            ends,
            link,
            ip_bell,
            own_bell: control.doorbell().clone(),
            apps: BTreeMap::new(),
            hotplug,
            counters,
            gauges: [gauge("apps"), gauge("conns"), gauge("listeners")],
            conn_index: HashMap::new(),
            listen_index: HashMap::new(),
            free_conns: (0..geo.conns).rev().collect(),
            free_listeners: (0..geo.listeners).rev().collect(),
            local: Vec::new(),
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            blocked: Vec::new(),
            next_listen_tick: 0,
            isn,
            ts_offset,
            ephemeral_cursor: (seed as u16) | 0xc000,
            state,
            scratch: vec![0u8; DATAGRAM_BUF.max(APP_BUF) as usize],
            seg_buf: vec![0u8; DATAGRAM_BUF as usize],
        };
        let (conns, listeners, bad) = server.recover();
        if conns + listeners + bad > 0 {
            info!(
                conns,
                listeners,
                dropped_corrupt = bad,
                "recovered the sockets of the previous tcp server"
            );
        }
        server.sync_gauges();
        Ok(server)
    }

    /// A fresh server over a table a predecessor left: every checkpointed connection and
    /// every listener comes back, with its index entries and timers (state.rs docs). The
    /// applications' buffers are recovered as each application is attached again.
    fn recover(&mut self) -> (usize, usize, usize) {
        let geo = self.state.geometry();
        let hwm = self.state.conn_hwm();
        let mut used = vec![false; geo.conns as usize];
        let (mut conns, mut bad) = (0, 0);
        self.local.resize_with(hwm as usize, Local::default);
        for i in 0..hwm {
            let Some(m) = self.state.restore_conn(i) else {
                continue;
            };
            if m.used != 1 {
                continue;
            }
            let (sg, rg) = self.state.rings(i);
            let Some((m, tcb, s, r)) = self.state.conn_mut(i) else {
                continue;
            };
            let geom_ok = (tcb.snd_ring.off, tcb.snd_ring.cap) == (sg.off, sg.cap)
                && (tcb.rcv_ring.off, tcb.rcv_ring.cap) == (rg.off, rg.cap);
            let key = (tcb.remote_ip, tcb.remote_port, tcb.local_port);
            if !geom_ok || (tcb.state() != State::Closed && self.conn_index.contains_key(&key)) {
                // Not this slot's rings, or a second connection on one 4-tuple: corrupt.
                m.used = 0;
                m.gen = m.gen.wrapping_add(1);
                bad += 1;
                continue;
            }
            let snd_appended = m.snd_appended;
            let conn = Conn::new(tcb, s, r);
            let deadline = conn.next_deadline();
            let l = &mut self.local[i as usize];
            *l = Local::default();
            l.queued_end = snd_appended;
            l.awaiting_app = true;
            if conn.state() != State::Closed {
                self.conn_index.insert(key, i);
                l.indexed = true;
            }
            if let Some(d) = deadline {
                l.scheduled = d;
                self.timers.push(Reverse((d, i)));
            }
            used[i as usize] = true;
            conns += 1;
            self.mark(i);
        }
        self.free_conns = (0..geo.conns)
            .rev()
            .filter(|&i| !used[i as usize])
            .collect();
        let mut listeners = 0;
        let mut free = Vec::new();
        for i in (0..geo.listeners).rev() {
            let Some(l) = self.state.listen_mut(i) else {
                continue;
            };
            if l.meta.used == 1 {
                let port = l.listener.local_port;
                if port != 0 && !self.listen_index.contains_key(&port) {
                    self.listen_index.insert(port, i);
                    listeners += 1;
                    continue;
                }
                l.meta.used = 0;
                l.meta.gen = l.meta.gen.wrapping_add(1);
                bad += 1;
            }
            free.push(i);
        }
        self.free_listeners = free;
        self.state.checkpoint();
        (conns, listeners, bad)
    }

    fn count(&self, c: Ctr) {
        self.counters[c as usize].inc();
    }

    fn count_n(&self, c: Ctr, n: u64) {
        if n > 0 {
            self.counters[c as usize].add(n);
        }
    }

    fn sync_gauges(&mut self) {
        let values = [
            self.apps.len() as u64,
            (self.state.geometry().conns as usize - self.free_conns.len()) as u64,
            (self.state.geometry().listeners as usize - self.free_listeners.len()) as u64,
        ];
        for (g, v) in self.gauges.iter_mut().zip(values) {
            if g.1 != v {
                g.0.add(v.wrapping_sub(g.1));
                g.1 = v;
            }
        }
    }

    /// The applications attached.
    pub fn attached(&self) -> Vec<u32> {
        self.apps.keys().copied().collect()
    }

    fn ts_now(&self, now: u64) -> u32 {
        ((now / 1000) as u32).wrapping_add(self.ts_offset)
    }

    // -----------------------------------------------------------------------------------
    // Applications
    // -----------------------------------------------------------------------------------

    /// Attaches application `app` (process `pid`) with its region. False if attached already.
    pub fn attach(&mut self, app: u32, pid: u32, region: Region) -> Result<bool, AttachError> {
        if self.apps.contains_key(&app) {
            return Ok(false);
        }
        let link = AppLink::open(region)?;
        link.check_owner(app, PROTO_TCP, TCP)
            .map_err(|why| AttachError::Mismatch { app, why })?;
        let ends = link.server_ends()?;
        let server_bell = link.server_bell()?;
        let app_bell = link.app_bell()?;
        let ServerBuffers {
            mut rx_free,
            held_rx,
            tx_returns,
            tx_retakes,
        } = link.server_buffers(TCP)?;
        let replay_left = link.requests()?.in_flight()?.len();
        let (tx_returns, recovered) =
            self.recover_app_buffers(app, &link, &mut rx_free, &held_rx, tx_returns);
        info!(app, pid, rx_free = rx_free.len(), "application attached");
        if recovered.conns > 0 {
            info!(
                app,
                conns = recovered.conns,
                republished = recovered.republished,
                requeued_sends = recovered.requeued,
                "recovered the application's connections"
            );
        }
        self.apps.insert(
            app,
            AppConn {
                pid,
                endpoint: link.endpoint(),
                link,
                ends,
                rx_free,
                tx_retakes,
                server_bell,
                app_bell,
                events: Vec::new(),
                tx_returns,
                broken: None,
                uncommitted: 0,
                starved: Vec::new(),
                replay_left,
            },
        );
        Ok(true)
    }

    /// The live connection slot `h` names, whoever owns it.
    fn slot_of(&self, h: u32) -> Option<u32> {
        let (listener, slot, gen) = split_handle(h)?;
        let m = self.state.conn_meta(slot);
        (!listener && m.used == 1 && m.gen & H_GEN_MASK == gen).then_some(slot)
    }

    /// A restarted server meets an application again (state.rs docs, tags above): RX buffers
    /// its predecessor filled and never published are published after all; each
    /// connection's count of bytes out with the application is counted afresh from the
    /// buffers; TX buffers whose bytes are not all in the send ring are queued again, in
    /// stream order. Returns the TX buffers to hand back.
    fn recover_app_buffers(
        &mut self,
        app: u32,
        link: &AppLink,
        rx_free: &mut FreeList,
        held_rx: &[u32],
        tx_held: Vec<Descriptor>,
    ) -> (Vec<Descriptor>, Recovered) {
        let mut out = Recovered::default();
        let slots: Vec<u32> = (0..self.state.conn_hwm())
            .filter(|&i| {
                let m = self.state.conn_meta(i);
                m.used == 1 && (m.app == app || m.app == 0)
            })
            .collect();
        if slots.is_empty() {
            return (tx_held, out);
        }
        let rx = &link.rx_pool;
        // 1. Filled, never published: the lease has not moved since the fill.
        let mut again: HashSet<u32> = HashSet::new();
        let mut redeliver: BTreeMap<u32, Vec<(u64, u32, u32)>> = BTreeMap::new();
        for &i in held_rx {
            let Some(t) = read_tag(link, i) else { continue };
            let m = self
                .slot_of(t.handle)
                .map(|slot| (slot, self.state.conn_meta(slot)));
            let unpublished = m.filter(|(_, m)| {
                m.app == app
                    && t.lease == rx.span(i, 0, 0).lease
                    && t.start + u64::from(t.len) <= m.rcv_popped
            });
            let Some((slot, _)) = unpublished else {
                // Free: its tag must never pass for an unpublished fill later (a fill whose
                // batch never reached its checkpoint keeps the lease it was filled at).
                clear_tag(link, i);
                continue;
            };
            {
                again.insert(i);
                redeliver.entry(slot).or_default().push((t.start, i, t.len));
            }
        }
        if !again.is_empty() {
            let mut keep = Vec::new();
            while let Some(i) = rx_free.get() {
                if !again.contains(&i) {
                    keep.push(i);
                }
            }
            for i in keep {
                rx_free.put(i);
            }
        }
        for (slot, mut v) in redeliver {
            v.sort_unstable();
            out.republished += v.len();
            self.local[slot as usize].redeliver = v.into_iter().map(|(_, i, n)| (i, n)).collect();
        }
        // 2. Bytes out with the application: every tagged buffer not free in our hands.
        let mut delivered: HashMap<u32, u64> = HashMap::new();
        let free: HashSet<u32> = held_rx
            .iter()
            .copied()
            .filter(|i| !again.contains(i))
            .collect();
        for i in 0..rx.count() {
            if free.contains(&i) {
                continue;
            }
            if let Some(t) = read_tag(link, i) {
                if let Some(slot) = self.slot_of(t.handle) {
                    *delivered.entry(slot).or_default() += u64::from(t.len);
                }
            }
        }
        for &slot in &slots {
            if let Some((m, _, _, _)) = self.state.conn_mut(slot) {
                if m.app == app {
                    m.delivered = delivered
                        .get(&slot)
                        .copied()
                        .unwrap_or(0)
                        .min(u64::from(u32::MAX)) as u32;
                }
            }
        }
        // 3. SEND buffers taken and not all appended: queue them again.
        let mut returns = Vec::new();
        let mut queued: BTreeMap<u32, Vec<(u64, Descriptor)>> = BTreeMap::new();
        let tx = &link.tx_pool;
        for d in tx_held {
            let lease = tx.span(d.index, 0, 0).lease;
            let found = read_tx_tag(link, d.index).and_then(|t| {
                let slot = self.slot_of(t.handle)?;
                let m = self.state.conn_meta(slot);
                let span = Descriptor {
                    pool: tx.id(),
                    lease,
                    index: d.index,
                    offset: t.offset,
                    len: t.len,
                };
                let fits = t.offset >= TX_TAG_LEN as u32 && tx.check(&span).is_ok();
                (t.lease == lease && fits && t.start + u64::from(t.len) > m.snd_appended)
                    .then_some((slot, t.start, span))
            });
            match found {
                Some((slot, start, span)) => queued.entry(slot).or_default().push((start, span)),
                None => returns.push(d),
            }
        }
        for (slot, mut v) in queued {
            v.sort_unstable_by_key(|&(start, _)| start);
            out.requeued += v.len();
            let appended = self.state.conn_meta(slot).snd_appended;
            let mut at = v.first().map_or(appended, |&(s, _)| s.min(appended));
            for &(s, d) in &v {
                if s != at {
                    warn!(
                        slot,
                        appended,
                        start = s,
                        expected = at,
                        index = d.index,
                        "re-queued SEND buffers leave a gap"
                    );
                }
                at = s + u64::from(d.len);
            }
            let l = &mut self.local[slot as usize];
            l.pending_app = app;
            for (start, d) in v {
                l.queued_end = l.queued_end.max(start + u64::from(d.len));
                l.pending.push_back((d, start));
            }
            l.queued_end = l.queued_end.max(appended);
        }
        for &slot in &slots {
            if self.state.conn_meta(slot).app == app {
                out.conns += 1;
                self.local[slot as usize].awaiting_app = false;
            }
            self.mark(slot);
        }
        (returns, out)
    }

    /// Application `app` went away: its listeners close, its connections are aborted.
    pub fn detach(&mut self, app: u32) -> usize {
        let mut closed = 0;
        for i in 0..self.state.geometry().listeners {
            let owned = self
                .state
                .listen_mut(i)
                .is_some_and(|l| l.meta.used == 1 && l.meta.app == app);
            if owned {
                self.close_listener(i);
                closed += 1;
            }
        }
        for i in 0..self.state.geometry().conns {
            let owned = self
                .state
                .conn_mut(i)
                .is_some_and(|(m, _, _, _)| m.used == 1 && m.app == app);
            if owned {
                self.local[i as usize].pending.clear();
                if let Some((m, tcb, s, r)) = self.state.conn_mut(i) {
                    m.app = 0;
                    m.flags |= meta::ORPHAN;
                    Conn::new(tcb, s, r).abort();
                }
                self.mark(i);
                closed += 1;
            }
        }
        if let Some(c) = self.apps.remove(&app) {
            info!(app, pid = c.pid, closed, "application detached");
        }
        closed
    }

    /// The supervisor's list of live applications (after re-sending them to a restarted
    /// server): any other application's sockets, attached or only in the table a
    /// predecessor left, are closed.
    fn live(&mut self, apps: &[u32]) {
        let keep: HashSet<u32> = apps.iter().copied().collect();
        let mut owners: HashSet<u32> = self.apps.keys().copied().collect();
        for i in 0..self.state.conn_hwm() {
            let m = self.state.conn_meta(i);
            if m.used == 1 && m.app != 0 {
                owners.insert(m.app);
            }
        }
        for i in 0..self.state.geometry().listeners {
            let m = self.state.listen_meta(i);
            if m.used == 1 {
                owners.insert(m.app);
            }
        }
        let gone: Vec<u32> = owners.into_iter().filter(|a| !keep.contains(a)).collect();
        // Every live application is attached again: orphans finishing a close stop waiting.
        for i in 0..self.state.conn_hwm() {
            if let Some(l) = self.local.get_mut(i as usize) {
                if l.awaiting_app {
                    l.awaiting_app = false;
                    self.mark(i);
                }
            }
        }
        for a in gone {
            self.detach(a);
        }
    }

    fn apply_hotplug(&mut self, ev: HotplugEvent) -> Result<(), String> {
        match ev {
            HotplugEvent::Attach { app, pid, region } => self
                .attach(app, pid, region)
                .map(|_| ())
                .map_err(|e| format!("attach of app {app}: {e}")),
            HotplugEvent::Detach { app } => {
                self.detach(app);
                Ok(())
            }
            HotplugEvent::Live { apps } => {
                self.live(&apps);
                Ok(())
            }
        }
    }

    /// The connection slot a handle of `app` names, if it is live.
    fn conn_of(&mut self, app: u32, h: u32) -> Option<u32> {
        let (listener, slot, gen) = split_handle(h)?;
        if listener {
            return None;
        }
        let m = self.state.conn_meta(slot);
        (m.used == 1 && m.app == app && m.gen & H_GEN_MASK == gen && m.flags & meta::ORPHAN == 0)
            .then_some(slot)
    }

    fn listener_of(&mut self, app: u32, h: u32) -> Option<u32> {
        let (listener, slot, gen) = split_handle(h)?;
        if !listener {
            return None;
        }
        let l = self.state.listen_mut(slot)?;
        (l.meta.used == 1 && l.meta.app == app && l.meta.gen & H_GEN_MASK == gen).then_some(slot)
    }

    /// Takes back RX buffers `app` handed back; each re-opens its connection's allowance.
    fn collect_rx(&mut self, app: u32) -> Result<usize, RingError> {
        let Some(c) = self.apps.get_mut(&app) else {
            return Ok(0);
        };
        let mut descs = [Descriptor::default(); 64];
        let mut done = 0;
        let mut released: Vec<(u32, u32)> = Vec::new();
        let mut bad = 0;
        while done < COLLECT {
            c.ends.rx_return.rewind();
            let n = c.ends.rx_return.read(&mut descs)?;
            if n == 0 {
                break;
            }
            let mut took = Vec::with_capacity(n);
            for d in &descs[..n] {
                match c
                    .link
                    .rx_pool
                    .take(d, c.endpoint, TCP, c.rx_free.retakes_mut())
                {
                    Ok(r) => took.push(r.index()),
                    Err(_) => bad += 1,
                }
            }
            c.ends.rx_return.commit(n)?;
            for i in took {
                if let Some(tag) = read_tag(&c.link, i) {
                    released.push((tag.handle, tag.len));
                }
                c.rx_free.put(i);
            }
            done += n;
        }
        self.count_n(Ctr::DropAppBad, bad);
        for (h, len) in released {
            if let Some(slot) = self.conn_of(app, h) {
                if let Some((m, _, _, _)) = self.state.conn_mut(slot) {
                    m.delivered = m.delivered.saturating_sub(len);
                }
                self.mark(slot);
            }
        }
        Ok(done)
    }

    fn serve_app(&mut self, app: u32, now: u64) -> Result<u64, RingError> {
        let mut work = self.collect_rx(app)? as u64;
        let Some(c) = self.apps.get_mut(&app) else {
            return Ok(work);
        };
        if !c.starved.is_empty() && !c.rx_free.is_empty() && c.event_room() > 0 {
            for slot in std::mem::take(&mut c.starved) {
                if let Some(l) = self.local.get_mut(slot as usize) {
                    if !l.dirty {
                        l.dirty = true;
                        self.dirty.push(slot);
                    }
                }
            }
            work += 1;
        }
        let Some(c) = self.apps.get_mut(&app) else {
            return Ok(work);
        };
        let room = c.event_room().min(BATCH);
        let mut reqs = [AppRequest::default(); BATCH];
        c.ends.requests.rewind();
        let n = c.ends.requests.read(&mut reqs[..room])?;
        for req in &reqs[..n] {
            if let Some(ev) = self.request(app, req, now) {
                if let Some(c) = self.apps.get_mut(&app) {
                    c.events.push(ev);
                }
            }
        }
        if let Some(c) = self.apps.get_mut(&app) {
            c.uncommitted = n;
        }
        work += n as u64;
        Ok(work)
    }

    /// Carries out one request; returns the answer to queue, if any.
    fn request(&mut self, app: u32, req: &AppRequest, now: u64) -> Option<AppEvent> {
        let wants = req.id != 0;
        let replay = self.apps.get_mut(&app).is_some_and(|c| {
            let r = c.replay_left > 0;
            c.replay_left = c.replay_left.saturating_sub(1);
            r
        });
        if replay && req.id != 0 && matches!(req.op, op::LISTEN | op::CONNECT) {
            if let Some(ev) = self.replayed(app, req) {
                return Some(ev);
            }
        }
        match req.op {
            op::LISTEN => Some(match self.listen(app, req) {
                Ok(ev) => ev,
                Err(st) => reply(req, st),
            }),
            op::CONNECT => Some(match self.connect(app, req, now) {
                Ok(ev) => ev,
                Err(st) => reply(req, st),
            }),
            op::SEND => {
                self.send(app, req);
                None
            }
            op::CLOSE => {
                let st = self.close(app, req.socket, false);
                wants.then(|| reply(req, st))
            }
            op::ABORT => {
                let st = self.close(app, req.socket, true);
                wants.then(|| reply(req, st))
            }
            op::SHUTDOWN => {
                let st = match self.conn_of(app, req.socket) {
                    None => Status::BadSocket,
                    Some(slot) => {
                        if let Some((m, _, _, _)) = self.state.conn_mut(slot) {
                            if req._reserved & shut::READ != 0 {
                                m.flags |= meta::SHUT_RD;
                            }
                            if req._reserved & shut::WRITE != 0 {
                                m.flags |= meta::SHUTWR_AFTER_DRAIN;
                            }
                        }
                        self.mark(slot);
                        Status::Ok
                    }
                };
                wants.then(|| reply(req, st))
            }
            op::SETOPT => {
                let st = match self.conn_of(app, req.socket) {
                    None => Status::BadSocket,
                    Some(slot) => match self.state.conn_mut(slot) {
                        Some((_, tcb, s, r)) => {
                            let mut conn = Conn::new(tcb, s, r);
                            match req._reserved {
                                sockopt::NODELAY => {
                                    conn.set_nodelay(req.addr != 0);
                                    Status::Ok
                                }
                                sockopt::KEEPALIVE => {
                                    conn.set_keepalive(req.addr != 0);
                                    Status::Ok
                                }
                                _ => Status::InvalidInput,
                            }
                        }
                        None => Status::BadSocket,
                    },
                };
                if st == Status::Ok {
                    if let Some(slot) = self.conn_of(app, req.socket) {
                        self.mark(slot);
                    }
                }
                wants.then(|| reply(req, st))
            }
            _ => {
                self.count(Ctr::DropAppBad);
                wants.then(|| reply(req, Status::Unsupported))
            }
        }
    }

    /// The answer to a LISTEN or CONNECT a predecessor carried out (its socket carries the
    /// request id) but did not commit: the same socket again.
    fn replayed(&mut self, app: u32, req: &AppRequest) -> Option<AppEvent> {
        if req.op == op::LISTEN {
            for i in 0..self.state.geometry().listeners {
                let m = self.state.listen_meta(i);
                if m.used == 1 && m.app == app && m.req_id == req.id {
                    let port = self.state.listen_mut(i)?.listener.local_port;
                    return Some(AppEvent {
                        socket: listen_handle(i, m.gen),
                        addr: u32::from(self.cfg.addr),
                        port,
                        ..reply(req, Status::Ok)
                    });
                }
            }
            return None;
        }
        for i in 0..self.state.conn_hwm() {
            let m = self.state.conn_meta(i);
            if m.used == 1 && m.app == app && m.req_id == req.id && m.parent == 0 {
                let (_, tcb, _, _) = self.state.conn_mut(i)?;
                return Some(AppEvent {
                    socket: conn_handle(i, m.gen),
                    addr: tcb.local_ip,
                    port: tcb.local_port,
                    ..reply(req, Status::Ok)
                });
            }
        }
        None
    }

    fn local_addr_ok(&self, addr: u32) -> bool {
        addr == 0 || Ipv4Addr::from(addr) == self.cfg.addr
    }

    fn listen(&mut self, app: u32, req: &AppRequest) -> Result<AppEvent, Status> {
        if !self.local_addr_ok(req.addr) {
            return Err(Status::AddrNotAvailable);
        }
        let port = if req.port == 0 {
            self.pick_port(None).ok_or(Status::AddrInUse)?
        } else {
            req.port
        };
        if self.listen_index.contains_key(&port) {
            return Err(Status::AddrInUse);
        }
        let slot = self.free_listeners.pop().ok_or(Status::NoSockets)?;
        let backlog = if req._reserved == 0 {
            self.cfg.backlog
        } else {
            req._reserved.min(65535)
        };
        let local = SocketAddrV4::new(self.cfg.addr, port);
        let mut listener = Listener::new(local, backlog, self.cfg.tcp.mss, self.synack_window);
        listener.set(Listener::WSCALE, self.cfg.tcp.window_scaling);
        listener.set(Listener::SACK, self.cfg.tcp.sack);
        listener.set(Listener::TIMESTAMPS, self.cfg.tcp.timestamps);
        let synq = listen::SynQueue::new(
            *self.isn.secret(),
            (backlog as usize).max(128),
            SynRetry::default(),
        );
        let Some(l) = self.state.listen_mut(slot) else {
            return Err(Status::NoSockets);
        };
        let gen = l.meta.gen;
        l.listener = listener;
        l.synq = synq;
        l.meta = Meta {
            used: 1,
            gen,
            app,
            flags: meta::LISTENER,
            parent: 0,
            delivered: 0,
            req_id: req.id,
            backlog,
            ..Meta::default()
        };
        self.listen_index.insert(port, slot);
        debug!(app, port, backlog, "listening");
        Ok(AppEvent {
            socket: listen_handle(slot, gen),
            addr: u32::from(self.cfg.addr),
            port,
            ..reply(req, Status::Ok)
        })
    }

    /// An ephemeral port free for `remote` (any remote: free of every connection) and not
    /// listened on (RFC 6056 3.3.1-like: a moving cursor from a random start).
    fn pick_port(&mut self, remote: Option<SocketAddrV4>) -> Option<u16> {
        let span = u32::from(EPHEMERAL.end() - EPHEMERAL.start()) + 1;
        for _ in 0..span {
            self.ephemeral_cursor = self.ephemeral_cursor.wrapping_add(1);
            let p = EPHEMERAL.start() + (u32::from(self.ephemeral_cursor) % span) as u16;
            if self.listen_index.contains_key(&p) {
                continue;
            }
            let used = match remote {
                Some(r) => self
                    .conn_index
                    .contains_key(&(u32::from(*r.ip()), r.port(), p)),
                None => self.conn_index.keys().any(|k| k.2 == p),
            };
            if !used {
                return Some(p);
            }
        }
        None
    }

    fn alloc_conn(
        &mut self,
        app: u32,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        now: u64,
    ) -> Option<(u32, u32)> {
        let slot = self.free_conns.pop()?;
        let (sg, rg) = self.state.rings(slot);
        let tcfg = self.cfg.tcp;
        let (m, tcb, _, _) = self.state.conn_mut(slot)?;
        let gen = m.gen;
        *tcb = Tcb::new(&tcfg, local, remote, sg, rg, now);
        *m = Meta {
            used: 1,
            gen,
            app,
            ..Meta::default()
        };
        if self.local.len() <= slot as usize {
            self.local.resize_with(slot as usize + 1, Local::default);
        }
        self.local[slot as usize] = Local::default();
        self.conn_index
            .insert((u32::from(*remote.ip()), remote.port(), local.port()), slot);
        self.local[slot as usize].indexed = true;
        Some((slot, gen))
    }

    fn connect(&mut self, app: u32, req: &AppRequest, now: u64) -> Result<AppEvent, Status> {
        let ip = Ipv4Addr::from(req.addr);
        if req.port == 0 || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return Err(Status::InvalidInput);
        }
        let remote = SocketAddrV4::new(ip, req.port);
        let port = self
            .pick_port(Some(remote))
            .ok_or(Status::AddrNotAvailable)?;
        let local = SocketAddrV4::new(self.cfg.addr, port);
        let (slot, gen) = self
            .alloc_conn(app, local, remote, now)
            .ok_or(Status::NoSockets)?;
        let iss = Seq(self.isn.isn(local, remote, now));
        if let Some((m, tcb, s, r)) = self.state.conn_mut(slot) {
            m.flags |= meta::CONNECT_PENDING;
            m.req_id = req.id;
            // A fresh CLOSED block: connect cannot fail.
            let _ = Conn::new(tcb, s, r).connect(iss, now);
        }
        self.mark(slot);
        Ok(AppEvent {
            socket: conn_handle(slot, gen),
            addr: u32::from(self.cfg.addr),
            port,
            ..reply(req, Status::Ok)
        })
    }

    fn send(&mut self, app: u32, req: &AppRequest) {
        let slot = self.conn_of(app, req.socket);
        let Some(c) = self.apps.get_mut(&app) else {
            return;
        };
        // A SEND met again after a restart: the predecessor took it (and tagged it) but did
        // not commit the ring slot.
        let retake = c.tx_retakes.contains(req.desc.index);
        let r = match c
            .link
            .tx_pool
            .take(&req.desc, c.endpoint, TCP, &mut c.tx_retakes)
        {
            Ok(r) => r,
            Err(e) => {
                warn!(app, %e, "bad send descriptor dropped");
                self.count(Ctr::DropAppBad);
                return;
            }
        };
        let lease = c.link.tx_pool.span(r.index(), 0, 0).lease;
        let d = Descriptor {
            pool: req.desc.pool,
            lease,
            index: r.index(),
            offset: r.offset(),
            len: r.len(),
        };
        // The payload must leave the tag's room at the start of the buffer alone.
        let slot = slot.filter(|_| d.offset >= TX_TAG_LEN as u32);
        let Some(slot) = slot else {
            // A dead or foreign handle: the bytes go nowhere, the buffer goes back.
            c.tx_returns.push(c.link.tx_pool.descriptor(r.index(), 0));
            self.count(Ctr::DropAppBad);
            return;
        };
        let l = &mut self.local[slot as usize];
        let earlier = read_tx_tag(&c.link, d.index).filter(|t| {
            retake
                && t.lease == lease
                && t.handle == req.socket
                && (t.offset, t.len) == (d.offset, d.len)
        });
        if earlier.is_some_and(|t| t.start != l.queued_end) || (retake && earlier.is_none()) {
            warn!(slot, index = d.index, retake, tag = ?earlier, queued_end = l.queued_end, "SEND met again off the queue's end");
        }
        let start = match earlier {
            Some(t) => t.start,
            None => {
                let t = TxTag {
                    handle: req.socket,
                    lease,
                    offset: d.offset,
                    len: d.len,
                    start: l.queued_end,
                };
                if !write_tx_tag(&c.link, d.index, &t) {
                    c.tx_returns.push(c.link.tx_pool.descriptor(r.index(), 0));
                    self.count(Ctr::DropAppBad);
                    return;
                }
                t.start
            }
        };
        l.queued_end = l.queued_end.max(start + u64::from(d.len));
        l.pending.push_back((d, start));
        l.pending_app = app;
        self.mark(slot);
    }

    fn close(&mut self, app: u32, h: u32, abort: bool) -> Status {
        if let Some(slot) = self.listener_of(app, h) {
            self.close_listener(slot);
            return Status::Ok;
        }
        let Some(slot) = self.conn_of(app, h) else {
            return Status::BadSocket;
        };
        let unread = self
            .state
            .conn_mut(slot)
            .is_some_and(|(_, tcb, _, _)| tcb.rcv_ring.len > 0);
        if let Some((m, tcb, s, r)) = self.state.conn_mut(slot) {
            m.flags |= meta::ORPHAN;
            m.app = 0;
            let mut conn = Conn::new(tcb, s, r);
            // RFC 9293 3.10.4 / RFC 1122 4.2.2.13: closing with data unread resets.
            if abort || unread || conn.state() == State::SynSent {
                conn.abort();
            } else {
                m.flags |= meta::CLOSE_AFTER_DRAIN;
            }
        }
        if abort {
            // The buffers go back now; their bytes will not be sent.
            self.return_pending(slot);
        }
        self.mark(slot);
        Status::Ok
    }

    fn close_listener(&mut self, slot: u32) {
        let Some(l) = self.state.listen_mut(slot) else {
            return;
        };
        let port = l.listener.local_port;
        let h = listen_handle(slot, l.meta.gen);
        l.meta.used = 0;
        l.meta.gen = l.meta.gen.wrapping_add(1);
        self.listen_index.remove(&port);
        self.free_listeners.push(slot);
        // Connections it made that the application has not been told of are reset.
        for i in 0..self.state.geometry().conns {
            let child = self.state.conn_meta(i);
            if child.used == 1 && child.flags & meta::ACCEPT_PENDING != 0 && child.parent == h {
                if let Some((m, tcb, s, r)) = self.state.conn_mut(i) {
                    m.flags |= meta::ORPHAN;
                    m.flags &= !meta::ACCEPT_PENDING;
                    m.app = 0;
                    Conn::new(tcb, s, r).abort();
                }
                self.mark(i);
            }
        }
        debug!(port, "listener closed");
    }

    /// Hands every queued SEND buffer of `slot` back to its application unsent (the
    /// connection is dead or aborted).
    fn return_pending(&mut self, slot: u32) {
        let l = &mut self.local[slot as usize];
        let pending: Vec<_> = l.pending.drain(..).collect();
        if let Some(c) = self.apps.get_mut(&l.pending_app) {
            for (d, _) in pending {
                c.tx_returns.push(c.link.tx_pool.descriptor(d.index, 0));
            }
        }
    }

    fn mark(&mut self, slot: u32) {
        if let Some(l) = self.local.get_mut(slot as usize) {
            if !l.dirty {
                l.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Segments in
    // -----------------------------------------------------------------------------------

    fn deliver(&mut self, now: u64) -> Result<u64, ServerError> {
        let mut slots = [DatagramSlot::default(); BATCH];
        self.ends.deliver.rewind();
        let n = self.ends.deliver.read(&mut slots)?;
        if n == 0 {
            return Ok(0);
        }
        let mut taken: [Option<BufRef>; BATCH] = [None; BATCH];
        for (t, s) in taken.iter_mut().zip(&slots[..n]) {
            match self
                .link
                .deliver_pool
                .take(&s.desc, IP, TCP, &mut self.deliver_retakes)
            {
                Ok(r) => *t = Some(r),
                Err(e) => {
                    self.count(Ctr::DropDescBad);
                    warn!(%e, "bad deliver descriptor dropped");
                }
            }
        }
        self.ends.deliver.commit(n)?;
        for (s, r) in slots[..n].iter().zip(taken) {
            let Some(r) = r else { continue };
            if s.protocol != PROTO_TCP {
                self.count(Ctr::DropBadSlot);
            } else if s.kind == DatagramSlot::KIND_DATAGRAM {
                let len = self.link.deliver_pool.read(&r, &mut self.scratch);
                let mut seg = std::mem::take(&mut self.scratch);
                self.segment(
                    now,
                    Ipv4Addr::from(s.src),
                    Ipv4Addr::from(s.dst),
                    &seg[..len],
                );
                std::mem::swap(&mut self.scratch, &mut seg);
            } else if s.kind == DatagramSlot::KIND_ICMP_ERROR {
                // RFC 5461 / RFC 1122 4.2.3.9: ICMP errors are soft errors for TCP; the
                // retransmission timers decide.
                self.count(Ctr::IcmpIn);
            } else {
                self.count(Ctr::DropBadSlot);
            }
            self.deliver_returns
                .push(self.link.deliver_pool.descriptor(r.index(), 0));
        }
        Ok(n as u64)
    }

    fn wire_drop(&self, e: WireError) {
        self.count(match e {
            WireError::Short => Ctr::DropShort,
            WireError::DataOffset | WireError::HeaderOverrun => Ctr::DropDataOffset,
            WireError::Checksum => Ctr::DropChecksum,
            WireError::IllegalFlags => Ctr::DropIllegalFlags,
            WireError::OptionTruncated
            | WireError::OptionLenTooSmall
            | WireError::OptionOverrun
            | WireError::OptionSize => Ctr::DropBadOption,
            WireError::BufferTooSmall => Ctr::DropShort,
        });
    }

    /// One TCP segment from `src` to `dst` (RFC 9293 3.10.7).
    fn segment(&mut self, now: u64, src: Ipv4Addr, dst: Ipv4Addr, bytes: &[u8]) {
        self.count(Ctr::RxSegments);
        let seg = match TcpSegment::new_checked(bytes) {
            Ok(s) => s,
            Err(e) => return self.wire_drop(e),
        };
        let repr = match TcpRepr::parse(&seg, src, dst) {
            Ok(r) => r,
            Err(e) => return self.wire_drop(e),
        };
        let payload = seg.payload();
        self.count_n(Ctr::RxBytes, payload.len() as u64);
        if repr.flags.rst() {
            self.count(Ctr::RxRst);
        }
        if dst != self.cfg.addr {
            return self.count(Ctr::DropNoSocket);
        }
        if let Some(&slot) = self
            .conn_index
            .get(&(u32::from(src), repr.src_port, repr.dst_port))
        {
            return self.conn_segment(slot, now, &repr, payload);
        }
        if let Some(&slot) = self.listen_index.get(&repr.dst_port) {
            return self.listener_segment(slot, now, src, dst, &repr, payload);
        }
        // RFC 9293 3.10.7.1, CLOSED: "An incoming segment not containing a RST causes a RST
        // to be sent in response."
        self.count(Ctr::DropNoSocket);
        if let Some(rst) = TcpRepr::rst_reply(&repr, payload.len()) {
            self.emit(dst, src, &rst, &[]);
        }
    }

    fn conn_segment(&mut self, slot: u32, now: u64, repr: &TcpRepr, payload: &[u8]) {
        let Some((m, tcb, s, r)) = self.state.conn_mut(slot) else {
            return;
        };
        let (dropped, challenges) = (tcb.dropped, tcb.challenge_acks);
        let shut_rd = m.flags & meta::SHUT_RD != 0;
        let mut conn = Conn::new(tcb, s, r);
        conn.on_segment(now, repr, payload);
        if shut_rd {
            // Reading is shut down: what arrives is acknowledged and thrown away.
            let mut sink = [0u8; 4096];
            while conn.recv(&mut sink).unwrap_or(0) > 0 {}
        }
        let (d2, c2) = (conn.tcb.dropped, conn.tcb.challenge_acks);
        // An ACK owed at once (out-of-order data, a hole filled, every second full segment:
        // RFC 5681 4.2, RFC 9293 3.10.7.4) goes out now, not after the rest of the batch:
        // coalescing them would hide duplicate ACKs from the sender's fast retransmit.
        let ack_now = conn.tcb.has(flag::ACK_NOW);
        self.count_n(Ctr::DropUnacceptable, u64::from(d2.wrapping_sub(dropped)));
        self.count_n(Ctr::ChallengeAcks, u64::from(c2.wrapping_sub(challenges)));
        if ack_now {
            self.transmit(slot, now);
        }
        self.mark(slot);
    }

    fn listener_segment(
        &mut self,
        lslot: u32,
        now: u64,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        repr: &TcpRepr,
        payload: &[u8],
    ) {
        let local = SocketAddrV4::new(dst, repr.dst_port);
        let remote = SocketAddrV4::new(src, repr.src_port);
        let ts_now = self.ts_now(now);
        let f = repr.flags;
        if f.rst() {
            let Some(l) = self.state.listen_mut(lslot) else {
                return;
            };
            match listen::on_rst_for_listener(&l.listener, &mut l.synq, remote, local, repr.seq.0) {
                RstAction::ChallengeAck { seq, ack, .. } => {
                    self.count(Ctr::ChallengeAcks);
                    let a = TcpRepr {
                        src_port: local.port(),
                        dst_port: remote.port(),
                        seq: Seq(seq),
                        ack: Seq(ack),
                        flags: Flags::ACK,
                        window: self.synack_window,
                        ..TcpRepr::default()
                    };
                    self.emit(dst, src, &a, &[]);
                }
                RstAction::Removed(_) | RstAction::Ignore => {}
            }
            return;
        }
        if f.syn() && !f.ack() {
            let syn = Syn {
                local,
                remote,
                seq: repr.seq.0,
                mss: repr.mss,
                wscale: repr.window_scale,
                sack_permitted: repr.sack_permitted,
                tsval: repr.timestamps.map(|t| t.0),
            };
            let Some(l) = self.state.listen_mut(lslot) else {
                return;
            };
            let action = listen::on_syn(&mut l.listener, &mut l.synq, &self.isn, &syn, now, ts_now);
            match action {
                SynAction::Queued(a) | SynAction::Retransmit(a) => {
                    self.count(Ctr::SynAcks);
                    self.emit_synack(&a, ts_now);
                }
                SynAction::Cookie(a) => {
                    self.count(Ctr::Cookies);
                    self.emit_synack(&a, ts_now);
                }
                SynAction::Drop(listen::SynDrop::AcceptQueueFull) => {
                    self.count(Ctr::DropAcceptQueue)
                }
                SynAction::Drop(_) => self.count(Ctr::DropSynQueue),
            }
            return;
        }
        if f.ack() && !f.syn() {
            let seg = AckSeg {
                local,
                remote,
                seq: repr.seq.0,
                ack: repr.ack.0,
                ts: repr
                    .timestamps
                    .map(|(tsval, tsecr)| Timestamps { tsval, tsecr }),
            };
            let secret = *self.isn.secret();
            let Some(l) = self.state.listen_mut(lslot) else {
                return;
            };
            let lmeta = l.meta;
            match listen::on_ack_for_listener(&mut l.listener, &mut l.synq, &secret, &seg, now) {
                AckAction::Established(e) => {
                    if e.from_cookie {
                        self.count(Ctr::CookiesOk);
                    }
                    let Some((slot, _)) = self.alloc_conn(lmeta.app, local, remote, now) else {
                        self.count(Ctr::DropNoConns);
                        if let Some(l) = self.state.listen_mut(lslot) {
                            l.listener.accepted();
                        }
                        if let Some(rst) = TcpRepr::rst_reply(repr, payload.len()) {
                            self.emit(dst, src, &rst, &[]);
                        }
                        return;
                    };
                    let (ts_offset, window) = (self.ts_offset, self.synack_window);
                    if let Some((m, tcb, s, r)) = self.state.conn_mut(slot) {
                        m.flags |= meta::ACCEPT_PENDING;
                        m.parent = listen_handle(lslot, lmeta.gen);
                        let mut conn = Conn::new(tcb, s, r);
                        conn.establish(&e, ts_offset, window, now);
                        conn.on_segment(now, repr, payload);
                    }
                    // The SYN queue entry is gone already: make the connection durable now
                    // rather than at the end of the batch.
                    self.state.checkpoint_slot(slot);
                    self.count(Ctr::Accepted);
                    self.mark(slot);
                }
                AckAction::Drop(listen::AckDrop::AcceptQueueFull) => {
                    self.count(Ctr::DropAcceptQueue)
                }
                AckAction::Drop(_) => self.count(Ctr::DropUnacceptable),
                AckAction::Reset => {
                    if let Some(rst) = TcpRepr::rst_reply(repr, payload.len()) {
                        self.emit(dst, src, &rst, &[]);
                    }
                }
            }
            return;
        }
        // SYN,ACK (or anything else) to a listener: RFC 9293 3.10.7.2 "second, check for an
        // ACK ... <SEQ=SEG.ACK><CTL=RST>".
        self.count(Ctr::DropNoSocket);
        if let Some(rst) = TcpRepr::rst_reply(repr, payload.len()) {
            self.emit(dst, src, &rst, &[]);
        }
    }

    fn emit_synack(&mut self, a: &SynAck, ts_now: u32) {
        let r = TcpRepr {
            src_port: a.local.port(),
            dst_port: a.remote.port(),
            seq: Seq(a.seq),
            ack: Seq(a.ack),
            flags: Flags::SYN | Flags::ACK,
            // RFC 7323 2.2: the window of a SYN segment is never scaled.
            window: self.synack_window,
            mss: Some(self.cfg.tcp.mss),
            window_scale: a.window_scale.then_some(self.rcv_shift),
            sack_permitted: a.sack_permitted,
            timestamps: a.ts_echo.map(|echo| (a.tsval.unwrap_or(ts_now), echo)),
            ..TcpRepr::default()
        };
        self.emit(*a.local.ip(), *a.remote.ip(), &r, &[]);
    }

    /// Queues one segment for the ip server. False if no SEND_POOL buffer was free.
    fn emit(&mut self, src: Ipv4Addr, dst: Ipv4Addr, r: &TcpRepr, payload: &[u8]) -> bool {
        emit_to(
            &self.link,
            &mut self.send_free,
            &mut self.send_batch,
            &mut self.seg_buf,
            &self.counters,
            src,
            dst,
            r,
            payload,
        )
    }

    // -----------------------------------------------------------------------------------
    // Timers and connection service
    // -----------------------------------------------------------------------------------

    fn fire_timers(&mut self, now: u64) -> u64 {
        let mut fired = 0;
        while let Some(&Reverse((t, slot))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let l = &mut self.local[slot as usize];
            if l.scheduled != t {
                continue;
            }
            l.scheduled = 0;
            if let Some((m, tcb, s, r)) = self.state.conn_mut(slot) {
                if m.used == 1 {
                    let retransmits = tcb.retransmits;
                    Conn::new(tcb, s, r).on_tick(now);
                    let d = tcb.retransmits.wrapping_sub(retransmits);
                    self.count_n(Ctr::Retransmits, u64::from(d));
                }
            }
            self.mark(slot);
            fired += 1;
        }
        if now >= self.next_listen_tick {
            self.next_listen_tick = now + LISTEN_TICK_US;
            self.tick_listeners(now);
        }
        fired
    }

    fn tick_listeners(&mut self, now: u64) {
        let slots: Vec<u32> = self.listen_index.values().copied().collect();
        let ts_now = self.ts_now(now);
        for slot in slots {
            let mut resend = Vec::new();
            if let Some(l) = self.state.listen_mut(slot) {
                listen::on_tick(&mut l.listener, &mut l.synq, now, |e| {
                    if let Expired::Retransmit(entry) = e {
                        resend.push(entry.syn_ack());
                    }
                });
            }
            for a in resend {
                self.emit_synack(&a, ts_now);
            }
        }
    }

    /// Everything a touched connection has due (module docs, step 5).
    fn service(&mut self, slot: u32, now: u64) {
        self.local[slot as usize].dirty = false;
        let m = self.state.conn_meta(slot);
        if m.used != 1 {
            return;
        }
        let app = m.app;
        let handle = conn_handle(slot, m.gen);
        // 1. Application bytes into the send ring, in order.
        let owner = self.local[slot as usize].pending_app;
        self.fill_send_ring(slot, owner);
        // 2. Deferred close / shutdown once every queued byte is in the ring.
        let l = &self.local[slot as usize];
        if l.pending.is_empty() && !l.awaiting_app {
            if let Some((m, tcb, s, r)) = self.state.conn_mut(slot) {
                let mut conn = Conn::new(tcb, s, r);
                if m.flags & meta::CLOSE_AFTER_DRAIN != 0 {
                    m.flags &= !(meta::CLOSE_AFTER_DRAIN | meta::SHUTWR_AFTER_DRAIN);
                    let _ = conn.close();
                } else if m.flags & meta::SHUTWR_AFTER_DRAIN != 0 {
                    m.flags &= !meta::SHUTWR_AFTER_DRAIN;
                    let _ = conn.shutdown_write();
                }
            }
        }
        // 3. Received bytes and news to the application.
        if app != 0 {
            self.tell_app(slot, app, handle);
        }
        let dead = self
            .state
            .conn_mut(slot)
            .is_some_and(|(_, tcb, _, _)| tcb.error().is_some() || tcb.state() == State::Closed);
        if dead && !self.local[slot as usize].pending.is_empty() {
            self.return_pending(slot);
        }
        // 4. Segments out.
        self.transmit(slot, now);
        // 5. Free a finished orphan; schedule the next timer.
        let Some((m, tcb, s, r)) = self.state.conn_mut(slot) else {
            return;
        };
        let conn = Conn::new(tcb, s, r);
        let st = conn.state();
        let deadline = conn.next_deadline();
        let key = (
            conn.tcb.remote_ip,
            conn.tcb.remote_port,
            conn.tcb.local_port,
        );
        if st == State::Closed {
            if m.flags & meta::ORPHAN != 0 {
                m.used = 0;
                m.gen = m.gen.wrapping_add(1);
                self.free_conns.push(slot);
                self.count(Ctr::Closed);
                let l = &mut self.local[slot as usize];
                l.pending.clear();
            }
            if self.local[slot as usize].indexed {
                self.local[slot as usize].indexed = false;
                if self.conn_index.get(&key) == Some(&slot) {
                    self.conn_index.remove(&key);
                }
            }
            return;
        }
        if let Some(d) = deadline {
            let l = &mut self.local[slot as usize];
            if l.scheduled == 0 || d < l.scheduled {
                l.scheduled = d;
                self.timers.push(Reverse((d, slot)));
            }
        }
    }

    fn fill_send_ring(&mut self, slot: u32, app: u32) {
        if self.local[slot as usize].pending.is_empty() {
            return;
        }
        let Some(c) = self.apps.get_mut(&app) else {
            self.local[slot as usize].pending.clear();
            return;
        };
        let Some((m, tcb, s, r)) = self.state.conn_mut(slot) else {
            return;
        };
        let mut conn = Conn::new(tcb, s, r);
        let pending = &mut self.local[slot as usize].pending;
        let mut accepted = 0u64;
        let mut dead = false;
        while let Some(&(d, start)) = pending.front() {
            let end = start + u64::from(d.len);
            if end <= m.snd_appended || dead {
                // All in the ring (some perhaps by a predecessor), or never to be sent.
                c.tx_returns.push(c.link.tx_pool.descriptor(d.index, 0));
                pending.pop_front();
                continue;
            }
            if start > m.snd_appended {
                // A gap in the stream cannot be filled: nothing after it may go out.
                warn!(
                    slot,
                    start,
                    appended = m.snd_appended,
                    "send queue out of order"
                );
                dead = true;
                continue;
            }
            let room = conn.send_capacity() as usize;
            if room == 0 {
                break;
            }
            let from = (m.snd_appended - start) as u32;
            let n = ((d.len - from) as usize).min(room).min(self.scratch.len());
            let span = Descriptor {
                offset: d.offset + from,
                len: n as u32,
                ..d
            };
            let got = match c.link.tx_pool.check(&span) {
                Ok(br) => c.link.tx_pool.read(&br, &mut self.scratch[..n]),
                Err(_) => 0,
            };
            if got < n {
                dead = true;
                continue;
            }
            match conn.send(&self.scratch[..got]) {
                Ok(k) => {
                    m.snd_appended += k as u64;
                    accepted += k as u64;
                    if k < got {
                        break;
                    }
                }
                // The connection cannot take data any more: what is queued goes back (the
                // application hears of the error as an ERROR event).
                Err(_) => dead = true,
            }
        }
        self.counters[Ctr::AcceptedBytes as usize].add(accepted);
    }

    /// `Meta::flags` of `slot` with this batch's news applied (see `Local::told_set`).
    fn flags_of(&self, slot: u32) -> u32 {
        let l = &self.local[slot as usize];
        (self.state.conn_meta(slot).flags | l.told_set) & !l.told_clear
    }

    /// Hands ACCEPTED for an established child of a listener to the application.
    /// False if it cannot be told yet (no room on its events ring).
    fn announce_accept(&mut self, slot: u32, app: u32, handle: u32) -> bool {
        let m = self.state.conn_meta(slot);
        let Some((is_listener, lslot, lgen)) = split_handle(m.parent) else {
            return true;
        };
        let lm = self.state.listen_meta(lslot);
        if !is_listener || lm.used != 1 || lm.gen & H_GEN_MASK != lgen {
            return true;
        }
        let Some(c) = self.apps.get_mut(&app) else {
            return false;
        };
        if c.event_room() == 0 {
            if !c.starved.contains(&slot) {
                c.starved.push(slot);
            }
            return false;
        }
        let Some((m, tcb, _, _)) = self.state.conn_mut(slot) else {
            return false;
        };
        c.events.push(AppEvent {
            kind: event::ACCEPTED,
            socket: m.parent,
            id: handle,
            addr: tcb.remote_ip,
            port: tcb.remote_port,
            ..AppEvent::default()
        });
        tell(
            &mut self.told,
            &mut self.local[slot as usize],
            slot,
            0,
            meta::ACCEPT_PENDING,
        );
        true
    }

    fn tell_app(&mut self, slot: u32, app: u32, handle: u32) {
        if self.flags_of(slot) & meta::ACCEPT_PENDING != 0
            && !self.announce_accept(slot, app, handle)
        {
            return;
        }
        let cap = self.state.geometry().rcvbuf;
        let TcpServer {
            apps,
            state,
            local,
            told,
            counters,
            scratch,
            ..
        } = self;
        let Some(c) = apps.get_mut(&app) else {
            return;
        };
        let Some((m, tcb, s, r)) = state.conn_mut(slot) else {
            return;
        };
        let l = &mut local[slot as usize];
        let flags = |m: &Meta, l: &Local| (m.flags | l.told_set) & !l.told_clear;
        if flags(m, l) & meta::ACCEPT_PENDING != 0 {
            return;
        }
        let mut conn = Conn::new(tcb, s, r);
        let st = conn.state();
        if flags(m, l) & meta::CONNECT_PENDING != 0 {
            if st.is_synchronized() {
                if c.event_room() == 0 {
                    if !c.starved.contains(&slot) {
                        c.starved.push(slot);
                    }
                    return;
                }
                c.events.push(AppEvent {
                    kind: event::CONNECTED,
                    socket: handle,
                    addr: conn.tcb.local_ip,
                    port: conn.tcb.local_port,
                    ..AppEvent::default()
                });
                tell(told, l, slot, 0, meta::CONNECT_PENDING);
                counters[Ctr::Connected as usize].inc();
            } else if st != State::Closed {
                return;
            }
        }
        // Buffers a crashed predecessor filled and never published go first.
        while let Some(&(i, n)) = l.redeliver.first() {
            if c.event_room() == 0 {
                break;
            }
            c.events.push(AppEvent {
                kind: event::DATA,
                socket: handle,
                desc: c.link.rx_pool.span(i, APP_HEADROOM, n),
                ..AppEvent::default()
            });
            l.redeliver.remove(0);
        }
        // DATA, as long as the allowance, the RX pool and the events ring permit.
        let mut delivered = 0u64;
        while l.redeliver.is_empty() && conn.recv_queue() > 0 && m.delivered < cap {
            if c.event_room() == 0 {
                break;
            }
            let Some(i) = c.rx_free.get() else { break };
            let want = (conn.recv_queue() as usize)
                .min(DATA_MAX)
                .min((cap - m.delivered) as usize);
            let tag = RxTag {
                handle,
                len: want as u32,
                lease: c.link.rx_pool.span(i, 0, 0).lease,
                start: m.rcv_popped,
            };
            // Copy before taking the bytes out of the ring, so a failed write loses nothing.
            let n = conn.peek(&mut scratch[..want]);
            if n == 0
                || !write_tag(
                    &c.link,
                    i,
                    &RxTag {
                        len: n as u32,
                        ..tag
                    },
                )
                || c.link
                    .rx_pool
                    .write(i, APP_HEADROOM, &scratch[..n])
                    .is_err()
            {
                c.rx_free.put(i);
                break;
            }
            conn.consume(n);
            m.rcv_popped += n as u64;
            m.delivered += n as u32;
            delivered += n as u64;
            c.events.push(AppEvent {
                kind: event::DATA,
                socket: handle,
                desc: c.link.rx_pool.span(i, APP_HEADROOM, n as u32),
                ..AppEvent::default()
            });
        }
        counters[Ctr::DeliveredBytes as usize].add(delivered);
        let backlog = !l.redeliver.is_empty() || conn.recv_queue() > 0;
        if backlog && m.delivered < cap && !c.starved.contains(&slot) {
            c.starved.push(slot);
        }
        // EOF once every byte before the FIN is out.
        if conn.tcb.has(flag::FIN_RCVD)
            && !backlog
            && flags(m, l) & meta::EOF_SENT == 0
            && c.event_room() > 0
        {
            tell(told, l, slot, meta::EOF_SENT, 0);
            c.events.push(AppEvent {
                kind: event::EOF,
                socket: handle,
                ..AppEvent::default()
            });
        }
        let news = (conn.tcb.has(flag::FIN_RCVD) && flags(m, l) & meta::EOF_SENT == 0)
            || (conn.error().is_some() && flags(m, l) & meta::ERROR_SENT == 0);
        if news && c.event_room() == 0 && !c.starved.contains(&slot) {
            c.starved.push(slot);
        }
        if let Some(e) = conn.error() {
            if flags(m, l) & meta::ERROR_SENT == 0 && !backlog && c.event_room() > 0 {
                tell(told, l, slot, meta::ERROR_SENT, meta::CONNECT_PENDING);
                let st = error_status(Some(e));
                counters[match st {
                    Status::TimedOut => Ctr::TimedOut,
                    _ => Ctr::Resets,
                } as usize]
                    .inc();
                c.events.push(AppEvent {
                    kind: event::ERROR,
                    socket: handle,
                    status: st.code(),
                    ..AppEvent::default()
                });
                // Queued SEND buffers go back (below): their bytes will not be sent.
            }
        }
    }

    /// After the publish: this batch's news is in the applications' hands, so the flags
    /// that say so go into the next checkpoint.
    fn settle_told(&mut self) {
        for slot in std::mem::take(&mut self.told) {
            let Some(l) = self.local.get_mut(slot as usize) else {
                continue;
            };
            let (set, clear) = (l.told_set, l.told_clear);
            l.told_set = 0;
            l.told_clear = 0;
            let mut parent = None;
            if let Some((m, _, _, _)) = self.state.conn_mut(slot) {
                if m.used == 1 {
                    if clear & m.flags & meta::ACCEPT_PENDING != 0 {
                        parent = Some(m.parent);
                    }
                    m.flags = (m.flags | set) & !clear;
                }
            }
            if let Some((true, lslot, lgen)) = parent.and_then(split_handle) {
                if let Some(ls) = self.state.listen_mut(lslot) {
                    if ls.meta.used == 1 && ls.meta.gen & H_GEN_MASK == lgen {
                        ls.listener.accepted();
                    }
                }
            }
            self.mark(slot);
        }
    }

    fn transmit(&mut self, slot: u32, now: u64) {
        let free = self.send_free.len();
        if free <= CONTROL_RESERVE {
            // Try again when the ip server hands buffers back.
            self.mark_later(slot);
            return;
        }
        let TcpServer {
            state,
            link,
            send_free,
            send_batch,
            seg_buf,
            counters,
            ..
        } = self;
        let Some((_, tcb, s, r)) = state.conn_mut(slot) else {
            return;
        };
        let src = Ipv4Addr::from(tcb.local_ip);
        let dst = Ipv4Addr::from(tcb.remote_ip);
        let before = tcb.retransmits;
        let mut conn = Conn::new(tcb, s, r).with_burst(free - CONTROL_RESERVE);
        let mut short = false;
        conn.poll_transmit(now, |repr, payload| {
            if !emit_to(
                link, send_free, send_batch, seg_buf, counters, src, dst, repr, payload,
            ) {
                short = true;
            }
        });
        let d = conn.tcb.retransmits.wrapping_sub(before);
        counters[Ctr::Retransmits as usize].add(u64::from(d));
        if short || self.send_free.len() <= CONTROL_RESERVE {
            self.mark_later(slot);
        }
    }

    /// Services `slot` again in a later poll (out of transmit buffers now).
    fn mark_later(&mut self, slot: u32) {
        self.blocked.push(slot);
    }

    fn publish(&mut self) -> Result<(), ServerError> {
        let mut to_ip = false;
        if !self.send_batch.is_empty() {
            let pushed = self.ends.send.push_slice(&self.send_batch)?;
            to_ip |= pushed > 0;
            for s in self.send_batch.drain(..).skip(pushed) {
                self.send_free.put(s.desc.index);
                self.counters[Ctr::DropSendFull as usize].inc();
            }
        }
        if !self.deliver_returns.is_empty() {
            let pushed = self.ends.deliver_return.push_slice(&self.deliver_returns)?;
            to_ip |= pushed > 0;
            self.deliver_returns.drain(..pushed);
        }
        if to_ip {
            if let Some(b) = &self.ip_bell {
                b.ring();
            }
        }
        let mut broken = Vec::new();
        for (&app, c) in self.apps.iter_mut() {
            if let Some(e) = c.broken.take() {
                broken.push((app, e));
                continue;
            }
            if let Err(e) = c.publish() {
                broken.push((app, e));
            }
        }
        for (app, e) in broken {
            self.count(Ctr::DropAppBad);
            warn!(app, %e, "an application's ring is corrupt; detaching it");
            self.detach(app);
        }
        Ok(())
    }
}

/// Writes one segment into a SEND_POOL buffer and queues its slot. False if none was free.
#[allow(clippy::too_many_arguments)]
fn emit_to(
    link: &TransportLink,
    send_free: &mut FreeList,
    send_batch: &mut Vec<DatagramSlot>,
    seg_buf: &mut [u8],
    counters: &[Counter],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    r: &TcpRepr,
    payload: &[u8],
) -> bool {
    let Some(i) = send_free.get() else {
        counters[Ctr::DropSendFull as usize].inc();
        return false;
    };
    let n = match r.emit(seg_buf, payload, src, dst) {
        Ok(n) => n,
        Err(_) => {
            send_free.put(i);
            counters[Ctr::DropSendFull as usize].inc();
            return false;
        }
    };
    let pool = &link.send_pool;
    let h = pool.headroom();
    if pool.write(i, h, &seg_buf[..n]).is_err() {
        send_free.put(i);
        counters[Ctr::DropSendFull as usize].inc();
        return false;
    }
    counters[Ctr::TxSegments as usize].inc();
    if !payload.is_empty() {
        counters[Ctr::TxBytes as usize].add(payload.len() as u64);
    }
    if r.flags.rst() {
        counters[Ctr::TxRst as usize].inc();
    }
    send_batch.push(DatagramSlot {
        desc: pool.span(i, h, n as u32),
        src: u32::from(src),
        dst: u32::from(dst),
        protocol: PROTO_TCP,
        kind: DatagramSlot::KIND_DATAGRAM,
        ..DatagramSlot::default()
    });
    true
}

impl Server for TcpServer {
    const STATE_FORMATS: (u32, u32) = (1, SNAPSHOT_FORMAT);
    const HOTPLUG: bool = true;

    fn poll(&mut self) -> Result<Progress, ServerError> {
        let now = now_us();
        let mut work = self.send_free.collect(
            &self.link.send_pool,
            &mut self.ends.send_return,
            IP,
            COLLECT,
        )? as u64;
        // Connections that ran out of transmit buffers last time try again.
        if !self.blocked.is_empty() && self.send_free.len() > CONTROL_RESERVE {
            for slot in std::mem::take(&mut self.blocked) {
                self.mark(slot);
            }
        }
        work += self.deliver(now)?;
        let apps: Vec<u32> = self.apps.keys().copied().collect();
        for app in apps {
            match self.serve_app(app, now) {
                Ok(n) => work += n,
                Err(e) => {
                    if let Some(c) = self.apps.get_mut(&app) {
                        c.broken = Some(e);
                    }
                }
            }
        }
        work += self.fire_timers(now);
        let mut rounds = 0;
        while !self.dirty.is_empty() && rounds < 4 {
            rounds += 1;
            for slot in std::mem::take(&mut self.dirty) {
                self.service(slot, now);
                work += 1;
            }
        }
        // Nothing leaves before the state it reflects is checkpointed (state.rs docs): a
        // crash after this line loses only output, which TCP and the replays cover.
        self.state.checkpoint();
        self.publish()?;
        self.settle_told();
        self.sync_gauges();
        Ok(Progress(work))
    }

    fn has_work(&mut self) -> bool {
        if self.own_bell.is_armed() {
            for c in self.apps.values() {
                c.server_bell.arm();
            }
        }
        let now = now_us();
        let due = self.timers.peek().is_some_and(|Reverse((t, _))| *t <= now);
        self.ends.deliver.has_data()
            || self.ends.send_return.has_data()
            || !self.deliver_returns.is_empty()
            || !self.send_batch.is_empty()
            || !self.dirty.is_empty()
            || due
            || self.apps.values_mut().any(|c| {
                c.ends.rx_return.has_data()
                    || !c.tx_returns.is_empty()
                    || c.ends.requests.has_data()
            })
    }

    fn park_limit(&mut self) -> Option<Duration> {
        let now = now_us();
        let mut next = self.timers.peek().map(|Reverse((t, _))| *t);
        if !self.listen_index.is_empty() {
            next = Some(next.map_or(self.next_listen_tick, |t| t.min(self.next_listen_tick)));
        }
        next.map(|t| Duration::from_micros(t.saturating_sub(now)))
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        let mut conns = Vec::new();
        for i in 0..self.state.conn_hwm() {
            let m = self.state.conn_meta(i);
            if m.used == 1 {
                conns.push((i, m.gen, m.snd_appended, m.rcv_popped));
            }
        }
        let mut listeners = Vec::new();
        for (&port, &i) in &self.listen_index {
            listeners.push((i, self.state.listen_meta(i).gen, port));
        }
        listeners.sort_unstable();
        let snap = SnapshotV1 {
            ephemeral_cursor: self.ephemeral_cursor,
            next_listen_tick: self.next_listen_tick,
            conns,
            listeners,
        };
        codec::save("tcp", SNAPSHOT_FORMAT, &snap)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ServerError> {
        let s: SnapshotV1 = codec::load(snapshot, "tcp", 1..=SNAPSHOT_FORMAT)?;
        // Everything is checked before anything is applied.
        let refuse = |why: String| Err(ServerError::Restore(why));
        let live = (0..self.state.conn_hwm())
            .filter(|&i| self.state.conn_meta(i).used == 1)
            .count();
        if live != s.conns.len() {
            return refuse(format!(
                "the snapshot has {} connections, the shared table {live}",
                s.conns.len()
            ));
        }
        for &(slot, gen, appended, popped) in &s.conns {
            let m = self.state.conn_meta(slot);
            if m.used != 1 || m.gen != gen || m.snd_appended != appended || m.rcv_popped != popped {
                return refuse(format!(
                    "connection slot {slot} of the snapshot does not match the shared table"
                ));
            }
        }
        if s.listeners.len() != self.listen_index.len() {
            return refuse(format!(
                "the snapshot has {} listeners, the shared table {}",
                s.listeners.len(),
                self.listen_index.len()
            ));
        }
        for &(slot, gen, port) in &s.listeners {
            if self.listen_index.get(&port) != Some(&slot)
                || self.state.listen_meta(slot).gen != gen
            {
                return refuse(format!(
                    "listener on port {port} does not match the shared table"
                ));
            }
        }
        self.ephemeral_cursor = s.ephemeral_cursor;
        self.next_listen_tick = s.next_listen_tick;
        Ok(())
    }

    fn scribble(&mut self, garbage: &mut Scribbler) -> usize {
        let mut n = garbage.fill(&mut self.ends.send, Scribbler::datagram);
        n += garbage.fill(&mut self.ends.deliver_return, Scribbler::descriptor);
        for c in self.apps.values_mut() {
            n += garbage.fill(&mut c.ends.events, |g| AppEvent {
                kind: (g.next_u64() % 10) as u32,
                id: g.next_u64() as u32,
                socket: g.next_u64() as u32,
                status: (g.next_u64() % 20) as u32,
                addr: g.next_u64() as u32,
                port: g.next_u64() as u16,
                _pad: 0,
                desc: g.descriptor(),
            });
            n += garbage.fill(&mut c.ends.tx_return, Scribbler::descriptor);
        }
        n
    }

    fn hotplug(&mut self) -> Result<u64, ServerError> {
        let Some(mut sock) = self.hotplug.take() else {
            return Err(ServerError::Fatal(format!(
                "hotplug requested but no {HOTPLUG_FD} fd was handed over"
            )));
        };
        let (handled, bad) = sock.read(HOTPLUG_BATCH, |ev| self.apply_hotplug(ev));
        self.hotplug = Some(sock);
        for _ in 0..bad {
            self.count(Ctr::HotplugBad);
        }
        self.sync_gauges();
        Ok(handled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_and_refuses_typos() {
        let c = parse_config(r#"{"addr":"198.18.0.2"}"#).unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(c.tcp.cc, CcAlgo::Cubic);
        let c =
            parse_config(r#"{"addr":"198.18.0.2","cc":"newreno","time_wait_ms":1000}"#).unwrap();
        assert_eq!(c.tcp.cc, CcAlgo::NewReno);
        assert_eq!(c.tcp.time_wait, Duration::from_secs(1));
        assert!(parse_config(r#"{"addr":"198.18.0.2","mms":1400}"#)
            .unwrap_err()
            .contains("mms"));
        assert!(parse_config(r#"{"addr":"0.0.0.0"}"#).is_err());
        assert!(parse_config(r#"{"addr":"198.18.0.2","cc":"bbr"}"#).is_err());
        assert!(parse_config(r#"{"addr":"198.18.0.2","delack_ms":600}"#).is_err());
    }

    fn server_on(link: &TransportLink, table: &TcpState, control: &ControlBlock) -> TcpServer {
        let cfg = parse_config(r#"{"addr":"198.18.0.2"}"#).unwrap();
        let link = TransportLink::open_for(
            link.region().reopen(RegionKind::RINGS).unwrap(),
            PROTO_TCP,
            TCP,
        )
        .unwrap();
        let table = TcpState::open(table.region().reopen(RegionKind::GENERIC).unwrap()).unwrap();
        TcpServer::new(cfg, link, table, None, None, control).unwrap()
    }

    #[test]
    fn a_snapshot_restores_on_the_same_table_and_anything_else_is_refused() {
        let link = TransportLink::create("tcp-snap-link", PROTO_TCP, TCP, 64).unwrap();
        let geo = crate::state::Geometry {
            conns: 8,
            listeners: 2,
            sndbuf: 8192,
            rcvbuf: 8192,
        };
        let mut table = TcpState::create("tcp-snap-table", geo).unwrap();
        let control = ControlBlock::create("tcp-snap", 1 << 16).unwrap();
        // A connection in the table (made and checkpointed by "a predecessor").
        {
            let (sg, rg) = table.rings(2);
            let (m, tcb, _, _) = table.conn_mut(2).unwrap();
            m.used = 1;
            m.gen = 5;
            m.snd_appended = 1000;
            (tcb.snd_ring, tcb.rcv_ring) = (sg, rg);
        }
        table.checkpoint();
        let mut a = server_on(&link, &table, &control);
        assert_eq!(a.state.conn_meta(2).used, 1, "the connection was recovered");
        a.ephemeral_cursor = 0xc123;
        let snap = a.snapshot().unwrap();
        drop(a);
        let mut b = server_on(&link, &table, &control);
        b.restore(&snap).unwrap();
        assert_eq!(b.ephemeral_cursor, 0xc123);
        // Tampered bytes: the checksum catches them.
        let mut bad = snap.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(b.restore(&bad).is_err());
        // Another server's snapshot, a truncated one.
        let udp = codec::encode("udp", 1, "0", &7u32).unwrap();
        assert!(b.restore(&udp).unwrap_err().to_string().contains("udp"));
        assert!(b.restore(&snap[..10]).is_err());
        // A format newer than this build reads.
        let newer = codec::encode("tcp", SNAPSHOT_FORMAT + 1, "9", &7u32).unwrap();
        assert!(b.restore(&newer).unwrap_err().to_string().contains("newer"));
        drop(b);
        // The table moved on since the snapshot: refused, nothing applied.
        {
            let (m, _, _, _) = table.conn_mut(2).unwrap();
            m.snd_appended = 2000;
        }
        table.checkpoint();
        let mut c = server_on(&link, &table, &control);
        let cursor = c.ephemeral_cursor;
        let e = c.restore(&snap).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        assert_eq!(c.ephemeral_cursor, cursor);
    }

    #[test]
    fn handles_round_trip_and_reject_zero() {
        for (slot, gen) in [
            (0u32, 0u32),
            (5, 3),
            ((1 << 20) - 2, 0x7ff),
            (17, 0x800 + 4),
        ] {
            let h = conn_handle(slot, gen);
            assert_eq!(split_handle(h), Some((false, slot, gen & H_GEN_MASK)));
            let l = listen_handle(slot, gen);
            assert_eq!(split_handle(l), Some((true, slot, gen & H_GEN_MASK)));
            assert_ne!(h, 0);
        }
        assert_eq!(split_handle(0), None);
        assert_eq!(split_handle(H_LISTENER), None);
    }
}
