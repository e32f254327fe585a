//! The `keepnet-udp` server: the [`Engine`] on the ip<->udp transport link, the socket table,
//! and one region per attached application (`keepnet_server::wiring::TransportLink`,
//! [`crate::state`], `keepnet_server::app::AppLink`; docs/udp-and-sockets.md).
//!
//! ## Boot contract (`keepnet_server::boot`)
//!
//! | name | kind | what |
//! |---|---|---|
//! | region `transport.udp` | RINGS | the [`TransportLink`] for protocol 17, transport endpoint [`UDP`] |
//! | region `udp.state` | GENERIC | the [`SocketTable`] (supervisor: [`SocketTable::create`]) |
//! | region `peer.ip` | CONTROL | the ip server's control block: its doorbell is rung after we publish to it (optional, with a warning) |
//! | fd `bell.ip` | eventfd | the eventfd of the ip server's doorbell, if it has one (optional) |
//! | fd `bell` | eventfd | this server's own doorbell eventfd (taken by `Boot`); apps ring it through their `server_bell` |
//! | fd `hotplug` | SOCK_SEQPACKET | one end of the supervisor's socket pair carrying [`Hotplug`] messages (optional, with a warning: no app can attach without it) |
//! | env `KEEPNET_UDP_CONFIG` | JSON | `{"addr":"198.18.0.2","rcvbuf":64}`: keepnet's address (required) and the receive queue per socket in datagrams (default 64, 1..=65536); unknown fields are refused |
//!
//! ## A poll, in one bounded batch
//!
//! 1. collect SEND_POOL buffers the ip server is done with (`send_return`);
//! 2. read up to [`BATCH`] slots from `deliver`, *take* each DELIVER_POOL buffer before
//!    committing the slots, copy the datagram (and the IP header the ip server put right
//!    before it) out, run it through the engine, and hand the buffer back on
//!    `deliver_return`. A datagram for a socket is copied into a buffer of its application's
//!    RX pool and announced with an `event::DATAGRAM`; a datagram for a closed port becomes a
//!    `KIND_UNREACHABLE` slot on `send` quoting it; an ICMP error becomes an `event::ERROR`;
//! 3. for each application: collect RX buffers it handed back (`rx_return`), then read up to
//!    [`BATCH`] requests (no more than there is room for answers on its `events` ring). A
//!    send *takes* the app's TX buffer, copies its payload behind a UDP header into a
//!    SEND_POOL buffer for `send`, and hands the app's buffer back on `tx_return`. With no
//!    SEND_POOL buffer free the request stays on the ring (backpressure: the app blocks);
//! 4. publish `send` and `deliver_return`, ring the ip server's doorbell once; publish each
//!    application's `events` and `tx_return`, then commit the requests just answered, and
//!    ring its `app_bell` once.
//!
//! ## Buffers, crashes and restarts
//!
//! Every buffer follows keepnet-ipc's ownership protocol (take before commit; recover by
//! scanning rings, then the ownership table): at start for the transport link, at each
//! `Attach` for an application's region. A restarted server maps `udp.state`, so the
//! sockets stay bound; the supervisor re-sends every live application's region and then
//! `Live`.
//!
//! ### Requests across a restart
//!
//! A request is committed only once its answer is published, so a server killed before
//! that leaves the request on the ring and its successor reads it again. Replaying is safe:
//! a BIND the predecessor carried out is answered with the socket it made (found by the
//! request id the table keeps with each socket) instead of failing with `AddrInUse`; a
//! CLOSE of a socket already closed is answered `Ok`; a SEND whose buffer the predecessor
//! already handed back went out, and is skipped; one whose buffer it had not is sent again
//! (UDP may duplicate). An answer the predecessor did publish then reaches the application
//! twice, and the library ignores a reply to no pending request. The requests in flight
//! when an application is attached are taken for replays if a predecessor may have read
//! them: when this server is not the first on its control block (its generation is not 0
//! when it is built; the supervisor frees a dead server's ring claims, so the claim alone
//! does not tell), or when its claim of the `requests` ring was a takeover. Taking a fresh
//! request for a replay costs little: a BIND finds no socket made by its id and binds (ids
//! are unique among an application's pending requests; only one reused after 2^32 requests
//! while the socket it made still exists could be mistaken), a CLOSE of a socket that does
//! not exist is answered `Ok`, and a SEND with a bad buffer is dropped without an answer.
//!
//! Each socket may have [`Config::rcvbuf`] datagrams delivered and not yet handed back. To
//! count them across a restart, the server writes the owning socket's handle in the 8 bytes
//! before the payload of every APP_RX_POOL buffer it fills (magic `UDPT`, then the handle,
//! little-endian); on `Attach` it counts the buffers the application still holds by that
//! tag, and each returned buffer's tag says which queue it leaves. The application can
//! scribble on its own tags: it can then only make its own sockets' queues wrong, since a
//! tag naming another application's socket is ignored.
//!
//! ## Trust
//!
//! Only errors on the transport link's rings stop the server (the supervisor restarts it). An
//! application's region is untrusted: a bad descriptor or an unknown request is counted
//! (`drop.app_bad`) and answered with an error; a corrupt ring detaches the application
//! (its sockets are closed) and is logged.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::Range;

use keepnet_ipc::ring::Claim;
use keepnet_ipc::{
    BufRef, Descriptor, Doorbell, EndpointId, FreeList, Region, RegionKind, Retakes, RingError,
};
use keepnet_server::app::{
    event, op, AppEvent, AppLink, AppRequest, AppServerEnds, HotplugEvent, HotplugSocket,
    ServerBuffers, Status, APP_HEADROOM, APP_RX_POOL,
};
use keepnet_server::codec;
use keepnet_server::control::{monotonic_ns, Counter};
use keepnet_server::wiring::{
    DatagramSlot, TransportEnds, TransportLink, WiringError, DATAGRAM_BUF, DELIVER_POOL, IP, UDP,
};
use keepnet_server::{Boot, ControlBlock, Progress, Scribbler, Server, ServerError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::counters::Ctr;
use crate::engine::{AsyncError, Config, Engine, IcmpMeta, Rx, RxMeta, SocketId, DEFAULT_RCVBUF};
use crate::state::SocketTable;
use crate::wire::{IPV4_HEADER_MAX, PROTO_UDP, UDP_HEADER};

/// Environment variable holding the JSON configuration.
pub const CONFIG_ENV: &str = "KEEPNET_UDP_CONFIG";
/// Region of the ip<->udp transport link.
pub const TRANSPORT_REGION: &str = "transport.udp";
/// Region of the socket table.
pub const STATE_REGION: &str = "udp.state";
/// Region of the ip server's control block (for its doorbell).
pub const PEER_IP_REGION: &str = "peer.ip";
/// Fd: the eventfd of the ip server's doorbell, if it parks in poll.
pub const PEER_IP_BELL_FD: &str = "bell.ip";
/// Fd: this server's end of the hotplug socket pair.
pub const HOTPLUG_FD: &str = "hotplug";
/// Slots read from `deliver`, and requests read from each application, per poll at most.
pub const BATCH: usize = 32;
/// Buffers collected from a return ring per poll at most.
const COLLECT: usize = 256;
/// Tag before the payload of an APP_RX_POOL buffer (module docs).
const TAG_MAGIC: u32 = u32::from_le_bytes(*b"UDPT");
const TAG_AT: u32 = APP_HEADROOM - 8;
/// Hotplug messages handled per `Command::Hotplug` at most.
const HOTPLUG_BATCH: usize = 4096;
/// The snapshot format this build writes by default; `KEEPNET_UDP_STATE_FORMAT=2` selects
/// the format-2 variant ([`SnapshotV2`]).
const SNAPSHOT_FORMAT: u32 = 1;
/// Environment variable selecting the snapshot format the process writes (1 or 2).
pub const STATE_FORMAT_ENV: &str = "KEEPNET_UDP_STATE_FORMAT";

/// The snapshot format this process writes: 1, or 2 when [`STATE_FORMAT_ENV`] says so. A
/// format-1 process reads format 1 only; a format-2 one reads 1 and 2.
pub fn state_format() -> u32 {
    match std::env::var(STATE_FORMAT_ENV).as_deref().map(str::trim) {
        Ok("2") => 2,
        _ => SNAPSHOT_FORMAT,
    }
}

/// The counters the server registers besides the engine's [`Ctr`]s.
pub const SERVER_COUNTERS: &[&str] = &[
    "apps",
    "sockets",
    "drop.app_bad",
    "drop.rx_pool_empty",
    "drop.events_full",
    "drop.desc_bad",
    "drop.bad_slot",
    "drop.no_app",
    "drop.send_full",
    "hotplug.bad",
    "state.handoffs",
];

/// Counters of the server itself.
#[derive(Clone, Debug)]
struct ServerCounters {
    /// Garbage from an application: bad descriptors, unknown ops, corrupt rings.
    app_bad: Counter,
    /// A datagram for a socket whose application has no free RX buffer.
    rx_pool_empty: Counter,
    /// A datagram or error for an application whose `events` ring is full.
    events_full: Counter,
    /// A descriptor on `deliver` refused by the pool.
    desc_bad: Counter,
    /// A `deliver` slot of another protocol or an unknown kind.
    bad_slot: Counter,
    /// A datagram for a socket whose application is not attached (yet, after a restart).
    no_app: Counter,
    /// An ICMP unreachable (or datagram) with no SEND_POOL buffer or `send` slot for it.
    send_full: Counter,
    /// A hotplug message that could not be read or applied.
    hotplug_bad: Counter,
    /// Format-2 state only: live updates this state was handed through.
    handoffs: Counter,
}

impl ServerCounters {
    fn new(control: &ControlBlock) -> ServerCounters {
        ServerCounters {
            app_bad: control.counter("drop.app_bad"),
            handoffs: control.counter("state.handoffs"),
            rx_pool_empty: control.counter("drop.rx_pool_empty"),
            events_full: control.counter("drop.events_full"),
            desc_bad: control.counter("drop.desc_bad"),
            bad_slot: control.counter("drop.bad_slot"),
            no_app: control.counter("drop.no_app"),
            send_full: control.counter("drop.send_full"),
            hotplug_bad: control.counter("hotplug.bad"),
        }
    }
}

/// The engine's counters and two gauges mirrored into the control block. The block keeps
/// totals across restarts: each sync adds what changed since the last one. A gauge starts
/// from what the block holds, so that it ends up equal to the live value.
struct Mirror {
    handles: Vec<Counter>,
    last: Vec<u64>,
    apps: (Counter, u64),
    sockets: (Counter, u64),
}

impl Mirror {
    fn new(control: &ControlBlock) -> Mirror {
        let gauge = |name: &str| {
            let c = control.counter(name);
            let v = c.get();
            (c, v)
        };
        Mirror {
            handles: Ctr::ALL.iter().map(|c| control.counter(c.name())).collect(),
            last: vec![0; Ctr::ALL.len()],
            apps: gauge("apps"),
            sockets: gauge("sockets"),
        }
    }

    fn sync(&mut self, engine: &Engine<SocketTable>, apps: usize) {
        for ((c, h), last) in Ctr::ALL.iter().zip(&self.handles).zip(&mut self.last) {
            let v = engine.count(*c);
            if v != *last {
                h.add(v.wrapping_sub(*last));
                *last = v;
            }
        }
        for (g, v) in [
            (&mut self.apps, apps as u64),
            (&mut self.sockets, engine.socket_count() as u64),
        ] {
            if g.1 != v {
                g.0.add(v.wrapping_sub(g.1));
                g.1 = v;
            }
        }
    }
}

/// The JSON form of the configuration (module docs).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigJson {
    addr: Ipv4Addr,
    #[serde(default = "default_rcvbuf")]
    rcvbuf: u32,
}

fn default_rcvbuf() -> u32 {
    DEFAULT_RCVBUF
}

/// Parses `KEEPNET_UDP_CONFIG`, e.g. `{"addr":"198.18.0.2","rcvbuf":64}`.
pub fn parse_config(text: &str) -> Result<Config, String> {
    let j: ConfigJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let a = j.addr;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
        return Err(format!("addr: {a} is not a unicast host address"));
    }
    if !(1..=65536).contains(&j.rcvbuf) {
        return Err(format!(
            "rcvbuf: {} is outside 1..=65536 datagrams",
            j.rcvbuf
        ));
    }
    let mut cfg = Config::new(a);
    cfg.rcvbuf = j.rcvbuf;
    Ok(cfg)
}

/// Why an application's region could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Wiring(#[from] WiringError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("region: {0}")]
    Region(#[from] keepnet_ipc::RegionError),
    #[error("attach of app {app}: {why}")]
    Mismatch { app: u32, why: String },
}

/// One attached application.
struct AppConn {
    app: u32,
    pid: u32,
    endpoint: EndpointId,
    link: AppLink,
    ends: AppServerEnds,
    rx_free: FreeList,
    tx_retakes: Retakes,
    server_bell: Doorbell,
    app_bell: Doorbell,
    /// Events to publish at the end of the poll.
    events: Vec<AppEvent>,
    /// APP_TX_POOL buffers to hand back at the end of the poll.
    tx_returns: Vec<Descriptor>,
    /// Errors pending on its sockets may not all have been queued as events.
    errors_due: bool,
    /// Its requests stopped at a send for lack of SEND_POOL buffers.
    blocked_on_send: bool,
    /// A ring of its region was found corrupt: detach at the end of the poll.
    broken: Option<RingError>,
    /// Requests read and carried out this poll, committed once their answers are published.
    uncommitted: usize,
    /// Requests at the head of the ring that a predecessor may have carried out already
    /// (module docs: replayed requests).
    replay: usize,
}

fn read_tag(link: &AppLink, index: u32) -> Option<SocketId> {
    let r = link
        .rx_pool
        .check(&Descriptor {
            pool: APP_RX_POOL,
            lease: 0,
            index,
            offset: TAG_AT,
            len: 8,
        })
        .ok()?;
    let mut b = [0u8; 8];
    if link.rx_pool.read(&r, &mut b) != 8 {
        return None;
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    (magic == TAG_MAGIC).then(|| u32::from_le_bytes([b[4], b[5], b[6], b[7]]))
}

impl AppConn {
    /// Free slots on `events` beyond what is queued for it.
    fn event_room(&mut self) -> Result<usize, RingError> {
        Ok(self
            .ends
            .events
            .free_slots()?
            .saturating_sub(self.events.len()))
    }

    fn room_or_break(&mut self) -> usize {
        match self.event_room() {
            Ok(n) => n,
            Err(e) => {
                self.broken = Some(e);
                0
            }
        }
    }

    /// Takes back RX buffers the application is done with; each leaves its socket's queue.
    fn collect_rx(
        &mut self,
        engine: &mut Engine<SocketTable>,
        counters: &ServerCounters,
    ) -> Result<usize, RingError> {
        let mut descs = [Descriptor::default(); 64];
        let mut done = 0;
        while done < COLLECT {
            self.ends.rx_return.rewind();
            let n = self.ends.rx_return.read(&mut descs)?;
            if n == 0 {
                break;
            }
            let mut took: Vec<u32> = Vec::with_capacity(n);
            for d in &descs[..n] {
                match self
                    .link
                    .rx_pool
                    .take(d, self.endpoint, UDP, self.rx_free.retakes_mut())
                {
                    Ok(r) => took.push(r.index()),
                    Err(e) => {
                        counters.app_bad.inc();
                        warn!(app = self.app, %e, "bad rx_return descriptor dropped");
                    }
                }
            }
            self.ends.rx_return.commit(n)?;
            for i in took {
                if let Some(id) = read_tag(&self.link, i) {
                    engine.release(self.app, id);
                }
                if !self.rx_free.put(i) {
                    counters.app_bad.inc();
                }
            }
            done += n;
        }
        Ok(done)
    }

    /// Queues an ERROR event for each pending error not queued yet, room permitting.
    fn queue_errors(&mut self, engine: &Engine<SocketTable>) {
        if !self.errors_due {
            return;
        }
        let mut room = self.room_or_break();
        let mut all = true;
        for e in engine.pending_errors(self.app) {
            let queued = self
                .events
                .iter()
                .any(|q| q.kind == event::ERROR && q.socket == e.socket);
            if queued {
                continue;
            }
            if room == 0 {
                all = false;
                break;
            }
            room -= 1;
            self.events.push(error_event(&e));
        }
        self.errors_due = !all;
    }

    /// Publishes queued events and returned TX buffers; rings the app's bell once.
    fn publish(
        &mut self,
        engine: &mut Engine<SocketTable>,
        counters: &ServerCounters,
    ) -> Result<(), RingError> {
        let mut any = false;
        if !self.events.is_empty() {
            let pushed = self.ends.events.push_slice(&self.events)?;
            any |= pushed > 0;
            for ev in &self.events[..pushed] {
                if ev.kind == event::ERROR {
                    engine.error_reported(ev.socket, Status::from_code(ev.status));
                }
            }
            // Room was reserved for every event, so only a ring the app shrank behind our
            // back gets here.
            for ev in self.events.drain(..).skip(pushed) {
                counters.events_full.inc();
                match ev.kind {
                    event::DATAGRAM => {
                        self.rx_free.put(ev.desc.index);
                        engine.release(self.app, ev.socket);
                    }
                    event::ERROR => self.errors_due = true,
                    _ => {}
                }
            }
        }
        if !self.tx_returns.is_empty() {
            let pushed = self.ends.tx_return.push_slice(&self.tx_returns)?;
            any |= pushed > 0;
            self.tx_returns.drain(..pushed);
        }
        // Only now are the requests done with: their answers are out (module docs).
        self.ends.requests.commit(self.uncommitted)?;
        self.uncommitted = 0;
        self.ends.requests.rewind();
        if any {
            self.app_bell.ring();
        }
        Ok(())
    }

    fn has_work(&mut self, send_free: bool) -> bool {
        if self.ends.rx_return.has_data() || !self.tx_returns.is_empty() {
            return true;
        }
        let room = self.event_room().unwrap_or(0) > 0;
        room && (self.errors_due
            || ((send_free || !self.blocked_on_send) && self.ends.requests.has_data()))
    }
}

fn error_event(e: &AsyncError) -> AppEvent {
    AppEvent {
        kind: event::ERROR,
        socket: e.socket,
        status: e.status.code(),
        ..AppEvent::default()
    }
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

/// The server (module docs).
pub struct UdpServer {
    engine: Engine<SocketTable>,
    link: TransportLink,
    ends: TransportEnds,
    send_free: FreeList,
    deliver_retakes: Retakes,
    /// DELIVER_POOL buffers to hand back at the end of the poll.
    deliver_returns: Vec<Descriptor>,
    /// Slots for `send`, published at the end of the poll.
    send_batch: Vec<DatagramSlot>,
    ip_bell: Option<Doorbell>,
    own_bell: Doorbell,
    apps: BTreeMap<u32, AppConn>,
    hotplug: Option<HotplugSocket>,
    counters: ServerCounters,
    mirror: Mirror,
    /// A datagram or payload copied out of shared memory.
    scratch: Vec<u8>,
    /// Another server ran on this control block before: requests in flight at an attach
    /// may have been carried out (module docs).
    restarted: bool,
    /// Format-2 state: live updates this state was handed through.
    handoffs: u64,
}

/// Private state handed to a live-update successor (format 1).
#[derive(Serialize, Deserialize, Debug)]
struct Snapshot {
    ephemeral_cursor: u16,
}

/// Format 2 (the variant selected by [`STATE_FORMAT_ENV`]): format 1 plus the number of live
/// updates this state has been handed through, which a format-1 snapshot lacks (read as 0).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct SnapshotV2 {
    ephemeral_cursor: u16,
    handoffs: u64,
}

impl From<Snapshot> for SnapshotV2 {
    fn from(v1: Snapshot) -> SnapshotV2 {
        SnapshotV2 {
            ephemeral_cursor: v1.ephemeral_cursor,
            handoffs: 0,
        }
    }
}

/// Decodes a snapshot in any format a process writing `format` reads.
fn decode_snapshot(bytes: &[u8], format: u32) -> Result<SnapshotV2, ServerError> {
    let snap =
        codec::decode(bytes, "udp", 1..=format).map_err(|e| ServerError::Restore(e.to_string()))?;
    let state = match snap.header.format_version {
        1 => snap.state::<Snapshot>().map(SnapshotV2::from),
        _ => snap.state::<SnapshotV2>(),
    };
    state.map_err(|e| ServerError::Restore(e.to_string()))
}

/// Builds the server from its boot environment (the `keepnet-udp` binary's whole job).
pub fn build(boot: &mut Boot) -> Result<UdpServer, ServerError> {
    let text = std::env::var(CONFIG_ENV).map_err(|e| {
        ServerError::Fatal(format!(
            "{CONFIG_ENV}: {e} (expected JSON such as {{\"addr\":\"198.18.0.2\",\"rcvbuf\":64}})"
        ))
    })?;
    let cfg = parse_config(&text).map_err(|e| ServerError::Fatal(format!("{CONFIG_ENV}: {e}")))?;
    let region = boot.region(TRANSPORT_REGION, RegionKind::RINGS)?;
    let link = TransportLink::open_for(region, PROTO_UDP, UDP)
        .map_err(|e| ServerError::Fatal(format!("{TRANSPORT_REGION} region: {e}")))?;
    let state = boot.region(STATE_REGION, RegionKind::GENERIC)?;
    let table = SocketTable::open(state)
        .map_err(|e| ServerError::Fatal(format!("{STATE_REGION} region: {e}")))?;
    let ip_bell = boot.peer_doorbell(PEER_IP_REGION, PEER_IP_BELL_FD)?;
    let hotplug = boot.hotplug(HOTPLUG_FD)?;
    UdpServer::new(cfg, link, table, ip_bell, hotplug, boot.control())
}

impl UdpServer {
    /// Claims the transport ends of `link`, recovers its buffers from a predecessor,
    /// rebuilds the sockets from `table`, registers counters in `control` (whose doorbell
    /// is this server's). `ip_bell` is rung after we publish to the ip server; `hotplug`
    /// carries [`Hotplug`] messages.
    pub fn new(
        cfg: Config,
        link: TransportLink,
        table: SocketTable,
        ip_bell: Option<Doorbell>,
        hotplug: Option<HotplugSocket>,
        control: &ControlBlock,
    ) -> Result<UdpServer, ServerError> {
        if link.protocol() != PROTO_UDP || link.transport() != UDP {
            return Err(ServerError::Fatal(format!(
                "transport link is for protocol {} endpoint {}, not udp",
                link.protocol(),
                link.transport().0
            )));
        }
        let ends = link.transport_ends()?;
        // Scan the rings, then the ownership tables (keepnet_ipc::pool, crash reclamation).
        let (outgoing, incoming) = link.transport_in_flight()?;
        let send_free = FreeList::recover(&link.send_pool, UDP, &outgoing, &incoming);
        let (held, deliver_retakes) = link.deliver_pool.recover(UDP, &outgoing, &incoming);
        let deliver_returns: Vec<Descriptor> = held
            .iter()
            .map(|&i| link.deliver_pool.descriptor(i, 0))
            .collect();
        let mut engine = Engine::open(cfg, table);
        // RFC 6056: do not make ephemeral ports predictable from one start to the next.
        engine.set_ephemeral_cursor((monotonic_ns() ^ (u64::from(std::process::id()) << 7)) as u16);
        info!(
            addr = %engine.config().addr,
            rcvbuf = engine.config().rcvbuf,
            sockets = engine.socket_count(),
            send_free = send_free.len(),
            deliver_returned = deliver_returns.len(),
            deliver_retakes = deliver_retakes.len(),
            "udp engine ready"
        );
        let scratch = vec![0u8; DATAGRAM_BUF.max(keepnet_server::app::APP_BUF) as usize];
        Ok(UdpServer {
            engine,
            send_free,
            deliver_retakes,
            deliver_returns,
            send_batch: Vec::with_capacity(2 * BATCH),
            ends,
            link,
            ip_bell,
            own_bell: control.doorbell().clone(),
            apps: BTreeMap::new(),
            hotplug,
            counters: ServerCounters::new(control),
            mirror: Mirror::new(control),
            scratch,
            // The runtime bumps the generation when it starts running us, after this.
            restarted: control.generation().get() > 0,
            handoffs: 0,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine<SocketTable> {
        &self.engine
    }

    /// The applications attached.
    pub fn attached(&self) -> Vec<u32> {
        self.apps.keys().copied().collect()
    }

    /// Attaches application `app` (process `pid`) whose region is `region`: checks it is
    /// that app's udp region, claims the server's ring ends (taking them over from a
    /// predecessor that died), recovers buffers, and counts the datagrams it still holds.
    /// Returns false if `app` was attached already (nothing is done).
    pub fn attach(&mut self, app: u32, pid: u32, region: Region) -> Result<bool, AttachError> {
        if self.apps.contains_key(&app) {
            return Ok(false);
        }
        let link = AppLink::open(region)?;
        link.check_owner(app, PROTO_UDP, UDP)
            .map_err(|why| AttachError::Mismatch { app, why })?;
        let ends = link.server_ends()?;
        // A predecessor that died may have carried out requests it did not commit.
        let takeover = matches!(ends.requests.claim(), Claim::Takeover { .. });
        let replay = if takeover || self.restarted {
            link.requests()?.in_flight()?.len()
        } else {
            0
        };
        let server_bell = link.server_bell()?;
        let app_bell = link.app_bell()?;
        let ServerBuffers {
            rx_free,
            held_rx,
            tx_returns,
            tx_retakes,
        } = link.server_buffers(UDP)?;
        // Datagrams the app still holds (or that wait on its rings) count against their
        // sockets' receive queues (module docs).
        let held: HashSet<u32> = held_rx.into_iter().collect();
        let mut outstanding = 0;
        for i in (0..link.rx_pool.count()).filter(|i| !held.contains(i)) {
            if let Some(id) = read_tag(&link, i) {
                outstanding += usize::from(self.engine.note_outstanding(app, id));
            }
        }
        let errors_due = !self.engine.pending_errors(app).is_empty();
        info!(
            app,
            pid,
            sockets = self.engine.sockets_of(app).len(),
            rx_free = rx_free.len(),
            tx_returned = tx_returns.len(),
            outstanding,
            replay,
            "application attached"
        );
        self.apps.insert(
            app,
            AppConn {
                app,
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
                errors_due,
                blocked_on_send: false,
                broken: None,
                uncommitted: 0,
                replay,
            },
        );
        Ok(true)
    }

    /// Application `app` went away: closes its sockets (their ports are free at once) and
    /// drops its region. Returns the sockets closed.
    pub fn detach(&mut self, app: u32) -> usize {
        let closed = self.engine.close_app(app);
        if let Some(c) = self.apps.remove(&app) {
            info!(app, pid = c.pid, closed, "application detached");
        }
        closed
    }

    /// After a restart: `apps` are all the applications there are; closes the sockets of
    /// any other and detaches it. Returns the sockets closed.
    pub fn live(&mut self, apps: &[u32]) -> usize {
        let keep: HashSet<u32> = apps.iter().copied().collect();
        let gone: Vec<u32> = self
            .apps
            .keys()
            .copied()
            .filter(|a| !keep.contains(a))
            .collect();
        let mut closed = 0;
        for a in gone {
            closed += self.detach(a);
        }
        closed += self.engine.retain_apps(|a| keep.contains(&a));
        info!(live = apps.len(), closed, "live applications confirmed");
        closed
    }

    fn drop_app(&mut self, app: u32, why: &RingError) {
        self.counters.app_bad.inc();
        warn!(app, %why, "an application's ring is corrupt; detaching it");
        self.detach(app);
    }

    /// Handles one hotplug message.
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

    fn deliver(&mut self) -> Result<u64, ServerError> {
        let mut slots = [DatagramSlot::default(); BATCH];
        self.ends.deliver.rewind();
        let n = self.ends.deliver.read(&mut slots)?;
        if n == 0 {
            return Ok(0);
        }
        // Take before commit (keepnet_ipc::pool): a crash leaves each buffer on the ring or
        // recorded as ours.
        let mut taken: [Option<BufRef>; BATCH] = [None; BATCH];
        for (t, s) in taken.iter_mut().zip(&slots[..n]) {
            match self
                .link
                .deliver_pool
                .take(&s.desc, IP, UDP, &mut self.deliver_retakes)
            {
                Ok(r) => *t = Some(r),
                Err(e) => {
                    self.counters.desc_bad.inc();
                    warn!(%e, "bad deliver descriptor dropped");
                }
            }
        }
        self.ends.deliver.commit(n)?;
        for (s, r) in slots[..n].iter().zip(taken) {
            let Some(r) = r else { continue };
            self.handle_slot(s, &r);
            self.deliver_returns
                .push(self.link.deliver_pool.descriptor(r.index(), 0));
        }
        Ok(n as u64)
    }

    fn handle_slot(&mut self, s: &DatagramSlot, r: &BufRef) {
        if s.protocol != PROTO_UDP {
            self.counters.bad_slot.inc();
            return;
        }
        match s.kind {
            DatagramSlot::KIND_DATAGRAM => self.handle_datagram(s, r),
            DatagramSlot::KIND_ICMP_ERROR => {
                let len = self.link.deliver_pool.read(r, &mut self.scratch);
                let meta = IcmpMeta {
                    from: Ipv4Addr::from(s.src),
                    icmp_type: s.icmp_type,
                    icmp_code: s.icmp_code,
                };
                let quote = self.scratch.get(..len).unwrap_or(&[]);
                if let Some(e) = self.engine.icmp_error(&meta, quote) {
                    if let Some(c) = self.apps.get_mut(&e.app) {
                        c.errors_due = true;
                        c.queue_errors(&self.engine);
                    }
                }
            }
            _ => self.counters.bad_slot.inc(),
        }
    }

    fn handle_datagram(&mut self, s: &DatagramSlot, r: &BufRef) {
        let pool = &self.link.deliver_pool;
        // The ip server copied the IP header right before the payload (wiring: DatagramSlot
        // `header_len`); read both at once. Without a plausible one we read the payload
        // alone, and cannot quote it in an ICMP error.
        let hlen = s.header_len;
        let with_header = if hlen > 0 && hlen as usize <= IPV4_HEADER_MAX && hlen <= r.offset() {
            pool.check(&Descriptor {
                pool: DELIVER_POOL,
                lease: 0,
                index: r.index(),
                offset: r.offset() - hlen,
                len: r.len() + hlen,
            })
            .ok()
        } else {
            None
        };
        let (span, hlen) = match with_header {
            Some(w) => (w, hlen as usize),
            None => (*r, 0),
        };
        let len = pool.read(&span, &mut self.scratch);
        let meta = RxMeta {
            src: Ipv4Addr::from(s.src),
            dst: Ipv4Addr::from(s.dst),
            broadcast: s.broadcast != 0,
        };
        let packet = self.scratch.get(..len).unwrap_or(&[]);
        match self.engine.receive(&meta, packet, hlen) {
            Rx::Deliver {
                socket,
                app,
                from,
                payload,
            } => self.hand_to_app(app, socket, from, payload),
            Rx::Unreachable { quote } => self.queue_unreachable(meta.src, quote),
            Rx::Dropped(_) => {}
        }
    }

    /// Copies `scratch[payload]` into a buffer of `app`'s RX pool and queues the event.
    fn hand_to_app(
        &mut self,
        app: u32,
        socket: SocketId,
        from: SocketAddrV4,
        payload: Range<usize>,
    ) {
        let UdpServer {
            apps,
            engine,
            counters,
            scratch,
            ..
        } = self;
        let Some(conn) = apps.get_mut(&app) else {
            engine.release(app, socket);
            counters.no_app.inc();
            return;
        };
        if conn.room_or_break() == 0 {
            engine.release(app, socket);
            counters.events_full.inc();
            return;
        }
        if conn.rx_free.is_empty() {
            if let Err(e) = conn.collect_rx(engine, counters) {
                conn.broken = Some(e);
            }
        }
        let Some(i) = conn.rx_free.get() else {
            engine.release(app, socket);
            counters.rx_pool_empty.inc();
            return;
        };
        let data = scratch.get(payload).unwrap_or(&[]);
        let pool = &conn.link.rx_pool;
        let mut tag = [0u8; 8];
        tag[..4].copy_from_slice(&TAG_MAGIC.to_le_bytes());
        tag[4..].copy_from_slice(&socket.to_le_bytes());
        if pool.write(i, TAG_AT, &tag).is_err() || pool.write(i, APP_HEADROOM, data).is_err() {
            // Cannot happen: a UDP payload fits an application buffer.
            conn.rx_free.put(i);
            engine.release(app, socket);
            counters.rx_pool_empty.inc();
            return;
        }
        conn.events.push(AppEvent {
            kind: event::DATAGRAM,
            socket,
            addr: u32::from(*from.ip()),
            port: from.port(),
            desc: pool.span(i, APP_HEADROOM, data.len() as u32),
            ..AppEvent::default()
        });
    }

    /// Asks the ip server for an ICMP port unreachable to `to`, quoting `scratch[quote]`.
    fn queue_unreachable(&mut self, to: Ipv4Addr, quote: Range<usize>) {
        let Some(i) = self.send_free.get() else {
            self.counters.send_full.inc();
            return;
        };
        let q = self.scratch.get(quote).unwrap_or(&[]);
        let pool = &self.link.send_pool;
        let h = pool.headroom();
        if pool.write(i, h, q).is_err() {
            self.send_free.put(i);
            self.counters.send_full.inc();
            return;
        }
        self.send_batch.push(DatagramSlot {
            desc: pool.span(i, h, q.len() as u32),
            dst: u32::from(to),
            protocol: PROTO_UDP,
            kind: DatagramSlot::KIND_UNREACHABLE,
            // RFC 792 / RFC 1122 3.2.2.1: code 3, port unreachable.
            icmp_code: 3,
            ..DatagramSlot::default()
        });
    }

    /// Serves one application: returned RX buffers, then requests. Ring errors are the
    /// application's fault and are returned for the caller to detach it.
    fn serve_app(&mut self, app: u32) -> Result<u64, RingError> {
        let UdpServer {
            apps,
            engine,
            counters,
            scratch,
            link,
            send_free,
            send_batch,
            ..
        } = self;
        let Some(conn) = apps.get_mut(&app) else {
            return Ok(0);
        };
        let mut work = conn.collect_rx(engine, counters)? as u64;
        conn.queue_errors(engine);
        let room = conn.event_room()?.min(BATCH);
        let mut reqs = [AppRequest::default(); BATCH];
        conn.ends.requests.rewind();
        let n = conn.ends.requests.read(&mut reqs[..room])?;
        let mut used = 0;
        conn.blocked_on_send = false;
        for req in &reqs[..n] {
            if req.op == op::SEND && send_free.is_empty() {
                // Backpressure: the request waits on the ring until the ip server hands
                // SEND_POOL buffers back (and rings our bell).
                conn.blocked_on_send = true;
                break;
            }
            used += 1;
            let replayed = conn.replay > 0;
            conn.replay = conn.replay.saturating_sub(1);
            let answer = match req.op {
                op::BIND => {
                    let local = SocketAddrV4::new(Ipv4Addr::from(req.addr), req.port);
                    // Replayed: the predecessor may have bound it already; answer with that
                    // socket rather than bind twice (and fail with AddrInUse).
                    let done = engine.find_bind(app, req.id).filter(|_| replayed);
                    Some(
                        match done.map_or_else(|| engine.bind(app, local, req.id), Ok) {
                            Ok((id, bound)) => AppEvent {
                                socket: id,
                                addr: u32::from(*bound.ip()),
                                port: bound.port(),
                                ..reply(req, Status::Ok)
                            },
                            Err(st) => reply(req, st),
                        },
                    )
                }
                op::CONNECT => {
                    let remote = SocketAddrV4::new(Ipv4Addr::from(req.addr), req.port);
                    let st = engine.connect(app, req.socket, remote).err();
                    Some(reply(req, st.unwrap_or(Status::Ok)))
                }
                op::SEND => {
                    let st = send_one(
                        conn, engine, link, send_free, send_batch, scratch, counters, req, replayed,
                    );
                    st.filter(|_| req.id != 0).map(|st| reply(req, st))
                }
                op::CLOSE => {
                    let st = match engine.close(app, req.socket) {
                        Ok(()) => Status::Ok,
                        // Replayed: the predecessor closed it already.
                        Err(Status::BadSocket) if replayed => Status::Ok,
                        Err(st) => st,
                    };
                    (req.id != 0).then(|| reply(req, st))
                }
                _ => {
                    counters.app_bad.inc();
                    (req.id != 0).then(|| reply(req, Status::Unsupported))
                }
            };
            if let Some(ev) = answer {
                conn.events.push(ev);
            }
        }
        // Committed once the answers are published (`AppConn::publish`).
        conn.uncommitted = used;
        work += used as u64;
        Ok(work)
    }

    fn publish(&mut self) -> Result<(), ServerError> {
        let mut to_ip = false;
        if !self.send_batch.is_empty() {
            let pushed = self.ends.send.push_slice(&self.send_batch)?;
            to_ip |= pushed > 0;
            // `send` holds every SEND_POOL buffer at once; only a ring the ip server
            // corrupted behind our back gets here.
            for s in self.send_batch.drain(..).skip(pushed) {
                self.send_free.put(s.desc.index);
                self.counters.send_full.inc();
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
        let UdpServer {
            apps,
            engine,
            counters,
            ..
        } = self;
        for (&app, conn) in apps.iter_mut() {
            if let Some(e) = conn.broken.take() {
                broken.push((app, e));
                continue;
            }
            if let Err(e) = conn.publish(engine, counters) {
                broken.push((app, e));
            }
        }
        for (app, e) in broken {
            self.drop_app(app, &e);
        }
        Ok(())
    }
}

/// Sends one request's payload (module docs, step 3); returns the status to answer with,
/// or None for a replayed send whose buffer the predecessor already handed back (it was
/// sent, and answered).
#[allow(clippy::too_many_arguments)]
fn send_one(
    conn: &mut AppConn,
    engine: &mut Engine<SocketTable>,
    link: &TransportLink,
    send_free: &mut FreeList,
    send_batch: &mut Vec<DatagramSlot>,
    scratch: &mut [u8],
    counters: &ServerCounters,
    req: &AppRequest,
    replayed: bool,
) -> Option<Status> {
    let r = match conn
        .link
        .tx_pool
        .take(&req.desc, conn.endpoint, UDP, &mut conn.tx_retakes)
    {
        Ok(r) => r,
        Err(_) if replayed => return None,
        Err(e) => {
            counters.app_bad.inc();
            warn!(app = conn.app, %e, "bad send descriptor refused");
            return Some(Status::InvalidInput);
        }
    };
    let len = conn.link.tx_pool.read(&r, scratch);
    // The app's buffer goes back whatever becomes of the send.
    conn.tx_returns
        .push(conn.link.tx_pool.descriptor(r.index(), 0));
    let payload = scratch.get(..len).unwrap_or(&[]);
    let dst = SocketAddrV4::new(Ipv4Addr::from(req.addr), req.port);
    let out = match engine.send(conn.app, req.socket, dst, payload) {
        Ok(o) => o,
        Err(st) => return Some(st),
    };
    let Some(i) = send_free.get() else {
        // Checked by the caller before taking the request.
        counters.send_full.inc();
        return Some(Status::Ok);
    };
    let pool = &link.send_pool;
    let h = pool.headroom();
    if pool.write(i, h, &out.header).is_err()
        || pool.write(i, h + UDP_HEADER as u32, payload).is_err()
    {
        send_free.put(i);
        counters.send_full.inc();
        return Some(Status::MessageTooLong);
    }
    send_batch.push(DatagramSlot {
        desc: pool.span(i, h, (UDP_HEADER + payload.len()) as u32),
        src: u32::from(out.src),
        dst: u32::from(*out.dst.ip()),
        protocol: PROTO_UDP,
        kind: DatagramSlot::KIND_DATAGRAM,
        ..DatagramSlot::default()
    });
    Some(Status::Ok)
}

impl Server for UdpServer {
    const STATE_FORMATS: (u32, u32) = (1, SNAPSHOT_FORMAT);
    const HOTPLUG: bool = true;

    fn state_formats() -> (u32, u32) {
        (1, state_format())
    }

    fn poll(&mut self) -> Result<Progress, ServerError> {
        let mut work = self.send_free.collect(
            &self.link.send_pool,
            &mut self.ends.send_return,
            IP,
            COLLECT,
        )? as u64;
        work += self.deliver()?;
        let apps: Vec<u32> = self.apps.keys().copied().collect();
        for app in apps {
            match self.serve_app(app) {
                Ok(n) => work += n,
                Err(e) => {
                    if let Some(c) = self.apps.get_mut(&app) {
                        c.broken = Some(e);
                    }
                }
            }
        }
        self.publish()?;
        self.mirror.sync(&self.engine, self.apps.len());
        Ok(Progress(work))
    }

    fn has_work(&mut self) -> bool {
        // The runtime is in its park re-check: arm every app's bell before looking at its
        // rings, so that an app that pushes after our look makes the wake-up call
        // (keepnet_ipc::Doorbell::arm).
        if self.own_bell.is_armed() {
            for c in self.apps.values() {
                c.server_bell.arm();
            }
        }
        let send_free = !self.send_free.is_empty();
        self.ends.deliver.has_data()
            || (!send_free && self.ends.send_return.has_data())
            || !self.deliver_returns.is_empty()
            || !self.send_batch.is_empty()
            || self.apps.values_mut().any(|c| c.has_work(send_free))
    }

    fn scribble(&mut self, garbage: &mut Scribbler) -> usize {
        garbage.fill(&mut self.ends.send, Scribbler::datagram)
            + garbage.fill(&mut self.ends.deliver_return, Scribbler::descriptor)
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
            self.counters.hotplug_bad.inc();
        }
        self.mirror.sync(&self.engine, self.apps.len());
        Ok(handled)
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        let ephemeral_cursor = self.engine.ephemeral_cursor();
        match state_format() {
            1 => codec::save("udp", 1, &Snapshot { ephemeral_cursor }),
            f => codec::save(
                "udp",
                f,
                &SnapshotV2 {
                    ephemeral_cursor,
                    handoffs: self.handoffs,
                },
            ),
        }
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ServerError> {
        let s = decode_snapshot(snapshot, state_format())?;
        self.engine.set_ephemeral_cursor(s.ephemeral_cursor);
        if state_format() >= 2 {
            self.handoffs = s.handoffs + 1;
            self.counters.handoffs.set(self.handoffs);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_2_reads_format_1_with_the_default_and_format_1_refuses_format_2() {
        let v1 = codec::save(
            "udp",
            1,
            &Snapshot {
                ephemeral_cursor: 4242,
            },
        )
        .unwrap();
        let v2 = codec::save(
            "udp",
            2,
            &SnapshotV2 {
                ephemeral_cursor: 7,
                handoffs: 3,
            },
        )
        .unwrap();
        assert_eq!(
            decode_snapshot(&v1, 2).unwrap(),
            SnapshotV2 {
                ephemeral_cursor: 4242,
                handoffs: 0
            }
        );
        assert_eq!(decode_snapshot(&v2, 2).unwrap().handoffs, 3);
        assert_eq!(decode_snapshot(&v1, 1).unwrap().ephemeral_cursor, 4242);
        let e = decode_snapshot(&v2, 1).unwrap_err().to_string();
        assert!(e.contains("format 2") || e.contains("newer"), "{e}");
    }

    #[test]
    fn config_json() {
        let c = parse_config(r#"{"addr":"198.18.0.2","rcvbuf":8}"#).unwrap();
        assert_eq!((c.addr, c.rcvbuf), (Ipv4Addr::new(198, 18, 0, 2), 8));
        let c = parse_config(r#"{"addr":"198.18.0.2"}"#).unwrap();
        assert_eq!(c.rcvbuf, DEFAULT_RCVBUF);
        let e = parse_config(r#"{"addr":"198.18.0.2","rcvbuff":8}"#).unwrap_err();
        assert!(e.contains("unknown field `rcvbuff`"), "{e}");
        assert!(parse_config(r#"{"rcvbuf":8}"#)
            .unwrap_err()
            .contains("addr"));
        assert!(parse_config(r#"{"addr":"0.0.0.0"}"#)
            .unwrap_err()
            .contains("addr"));
        assert!(parse_config(r#"{"addr":"198.18.0.2","rcvbuf":0}"#)
            .unwrap_err()
            .contains("rcvbuf"));
        assert!(parse_config(r#"{"addr":"nope"}"#).is_err());
    }
}
