//! [`Engine`]: what every attachment does, whatever its server speaks.
//!
//! An attachment owns the application's ends of its region (`servers::app`): the request ring
//! it produces, the event ring it consumes, the free list of its TX pool and the RX buffers it
//! holds. All of that sits behind one mutex. There is no background thread: whichever thread
//! calls into the library *pumps* the rings under the mutex, moving what the server sent into
//! the protocol's socket table ([`Protocol`]), request replies and pending errors, collecting
//! TX buffers the server handed back and returning RX buffers the application is done with.
//!
//! A call that must wait pumps, checks its condition, and if it is not met drops the mutex and
//! parks on the application's doorbell (a short spin, then a futex) for at most
//! [`WAIT_SLICE`], then starts over. The doorbell has one `sleeping` flag and several threads
//! may wait on it at once, so a thread that leaves the wait while others still wait re-arms it,
//! a thread whose pump moved something wakes the others, and no park lasts longer than a
//! slice: every waiter makes progress even if a wake-up is lost between two of them.
//!
//! The supervisor's control connection (kept open so that its EOF tells the supervisor the
//! application is gone) also carries notifications ([`AppNotice`]): `server_failed` when the
//! server is down for good, `server_back` when it serves again. Nothing reads it on the fast
//! path: a call looks at it (a non-blocking read, at most every [`CONTROL_EVERY`] for the
//! whole attachment) only when it found nothing to do and is about to park or to return
//! `WouldBlock`. A parked call wakes at least every [`WAIT_SLICE`], so a blocked call learns
//! of a failure within about 30 ms. While the server is down every call that would move data
//! or ask the server something fails at once ([`Engine::down_error`], one atomic load per
//! call); EOF on the connection (the supervisor died; a new one re-adopts the servers)
//! changes nothing.
//!
//! The udp attachment ([`crate::Stack`]) and the tcp one ([`crate::TcpStack`]) are this
//! engine with a [`Protocol`] each; [`attachment!`] gives both the same public surface.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use keepnet_ipc::{
    BufRef, Descriptor, Doorbell, EndpointId, FreeList, Pod, Retakes, Ring, RingError, SpinPolicy,
};
use keepnet_server::app::{event, op, AppEnds, AppEvent, AppLink, AppNotice, AppRequest, Status};
use tracing::{debug, warn};

/// Longest a blocked call parks before it pumps and re-checks on its own.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(20);
/// How long a blocked call spins on the doorbell before it parks.
const SPIN: Duration = Duration::from_micros(20);
/// How long requests wait for the server's answer by default.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The instance attached to when `KEEPNET_INSTANCE` is unset.
pub const DEFAULT_INSTANCE: &str = "default";
/// The MTU `from_parts` assumes.
pub(crate) const DEFAULT_MTU: u32 = 1500;
/// How often at most the attachment looks at its control connection for notifications.
pub(crate) const CONTROL_EVERY: Duration = Duration::from_millis(10);
/// Longest notification line kept; a longer one is dropped.
const MAX_NOTICE: usize = 64 * 1024;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the state is still a
    // consistent set of queues.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn corrupt(e: RingError) -> io::Error {
    io::Error::other(format!(
        "keepnet: this application's region is inconsistent ({e}); the stack cannot go on"
    ))
}

pub(crate) fn bad_socket() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "keepnet: this socket is not open on its stack",
    )
}

/// The error of a blocking call whose wait ended without an answer, given (non-blocking, its
/// timeout): `WouldBlock` saying `busy` for a non-blocking socket, else `TimedOut` saying
/// `late` and the timeout.
pub(crate) fn unfinished(how: (bool, Option<Duration>), busy: &str, late: &str) -> io::Error {
    match how {
        (true, _) => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{busy} (non-blocking socket)"),
        ),
        (false, t) => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{late} ({:?})", t.unwrap_or_default()),
        ),
    }
}

/// The error of every call on `server`'s sockets while it is down for good (`detail`: why,
/// as the supervisor said).
pub(crate) fn server_down(server: &str, detail: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!(
            "keepnet: the {server} server is down ({detail}); calls on its sockets fail until \
             it serves again (see `keepnet status`)"
        ),
    )
}

/// The application's end of the control connection, read for notifications.
struct Control {
    stream: UnixStream,
    /// Bytes of a line not yet complete.
    partial: Vec<u8>,
}

/// What one transport protocol adds to the engine: its socket table and how the events of
/// its server change it. Every hook runs under the engine's mutex.
pub(crate) trait Protocol: Sized + Send + 'static {
    /// IP protocol number of the server (17, 6).
    const NUMBER: u8;
    /// The server's name in messages ("udp", "tcp").
    const SERVER: &'static str;
    /// The event kind whose descriptor carries an RX buffer.
    const RX_EVENT: u32;
    /// The socket table and whatever else the protocol keeps behind the mutex.
    type Table: Send;

    /// A fresh table.
    fn table() -> Self::Table;
    /// An event other than a REPLY; true if it changed something a waiter may wait for.
    fn on_event(e: &Engine<Self>, c: &mut Common, t: &mut Self::Table, ev: &AppEvent) -> bool;
    /// A successful REPLY to a request of `op` whose caller still waits: make the socket it
    /// names, if it names one (before any event for that socket is pumped).
    fn on_created(e: &Engine<Self>, c: &mut Common, t: &mut Self::Table, op: u32, ev: &AppEvent);
    /// The request that undoes a successful REPLY to `op` nobody waits for any more (the
    /// socket it made is closed at once); None if `op` makes nothing.
    fn undo(op: u32, socket: u32) -> Option<AppRequest>;
    /// Drops `socket` from the table, its RX buffers onto `c.rx_backlog`.
    fn forget(c: &mut Common, t: &mut Self::Table, socket: u32);
    /// TX buffer `index` came back from the server.
    fn on_tx_back(_t: &mut Self::Table, _index: u32) {}
}

/// A request waiting for its reply.
#[derive(Debug)]
struct Pending {
    op: u32,
    reply: Option<AppEvent>,
    /// Its caller gave up (timeout): a late successful reply is undone at once.
    abandoned: bool,
}

/// What every protocol keeps behind the mutex.
pub(crate) struct Common {
    ends: AppEnds,
    /// TX pool buffers the application holds and may fill.
    pub(crate) tx_free: FreeList,
    /// RX buffers the server may hand over again after a crash of ours (none for a fresh
    /// attachment).
    rx_retakes: Retakes,
    /// RX buffers to hand back on `rx_return` (indices).
    pub(crate) rx_backlog: VecDeque<u32>,
    /// Requests not yet on the ring (it was full).
    pub(crate) outbox: VecDeque<AppRequest>,
    pending: HashMap<u32, Pending>,
    next_id: u32,
    /// Threads between dropping the mutex to park and taking it back.
    parked: usize,
    pub(crate) reply_timeout: Duration,
    /// Events with a descriptor the RX pool refused (also counted in the pool's drops).
    pub(crate) bad_events: u64,
}

/// Everything behind the engine's mutex.
pub(crate) struct Inner<P: Protocol> {
    pub(crate) c: Common,
    pub(crate) t: P::Table,
}

/// How long a call may wait.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// Not at all (non-blocking).
    Now,
    Until(Instant),
    Forever,
}

impl Wait {
    /// The wait of a call on a socket that is `nonblocking` or has `timeout`.
    pub(crate) fn new(nonblocking: bool, timeout: Option<Duration>) -> Wait {
        match (nonblocking, timeout) {
            (true, _) => Wait::Now,
            (false, Some(t)) => Instant::now()
                .checked_add(t)
                .map_or(Wait::Forever, Wait::Until),
            (false, None) => Wait::Forever,
        }
    }
}

/// One attachment: the region, its doorbells and the state behind the mutex.
pub(crate) struct Engine<P: Protocol> {
    pub(crate) link: AppLink,
    me: EndpointId,
    server: EndpointId,
    app_bell: Doorbell,
    server_bell: Doorbell,
    /// Read-only views of the rings the server produces, checked without the mutex while
    /// parked.
    events_view: Ring<AppEvent>,
    tx_return_view: Ring<Descriptor>,
    pub(crate) addr: Ipv4Addr,
    pub(crate) mtu: u32,
    pub(crate) instance: String,
    /// Bumped by every pump that moved something: a parked thread's wake-up condition.
    progress: AtomicU64,
    inner: Mutex<Inner<P>>,
    /// The control connection to the supervisor (none for `from_parts`), non-blocking; read
    /// by one thread at a time for notifications.
    control: Option<Mutex<Control>>,
    /// False once the control connection reached EOF or failed: nothing more to read.
    control_open: AtomicBool,
    /// Nanoseconds since `born` before which nobody looks at the control connection again.
    control_due: AtomicU64,
    born: Instant,
    /// The supervisor said the server is down for good (`server_failed`): every call fails.
    down: AtomicBool,
    /// Why (`detail` of the notification).
    down_detail: Mutex<String>,
}

fn in_flight<T: Pod>(ring: Result<Ring<T>, RingError>) -> io::Result<Vec<T>> {
    ring.and_then(|r| r.in_flight()).map_err(corrupt)
}

impl<P: Protocol> Engine<P> {
    /// The engine over `link` (the application's ends are claimed), pumped once.
    pub(crate) fn build(
        link: AppLink,
        server_eventfd: OwnedFd,
        addr: Ipv4Addr,
        mtu: u32,
        instance: String,
        control: Option<UnixStream>,
    ) -> io::Result<Engine<P>> {
        let region_err = |e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("keepnet: cannot use this application's region: {e}"),
            )
        };
        if link.protocol() != P::NUMBER {
            return Err(region_err(&format_args!(
                "it talks IP protocol {}, not {} ({})",
                link.protocol(),
                P::SERVER,
                P::NUMBER
            )));
        }
        let me = link.endpoint();
        let server = link.server();
        // What is in flight on the rings decides which buffers are ours (all of the TX pool
        // and none of the RX pool for a fresh region; see keepnet_ipc::pool).
        let sends: Vec<Descriptor> = in_flight(link.requests())?
            .iter()
            .filter(|r| r.op == op::SEND)
            .map(|r| r.desc)
            .collect();
        let tx_back = in_flight(link.tx_return())?;
        let delivered: Vec<Descriptor> = in_flight(link.events())?
            .iter()
            .filter(|e| e.kind == P::RX_EVENT)
            .map(|e| e.desc)
            .collect();
        let rx_back = in_flight(link.rx_return())?;
        let tx_free = FreeList::recover(&link.tx_pool, me, &sends, &tx_back);
        let (rx_held, rx_retakes) = link.rx_pool.recover(me, &rx_back, &delivered);
        let ends = link.app_ends().map_err(|e| region_err(&e))?;
        let app_bell = link.app_bell().map_err(|e| region_err(&e))?;
        let server_bell = link
            .server_bell()
            .map_err(|e| region_err(&e))?
            .with_eventfd(server_eventfd);
        let events_view = link.events().map_err(corrupt)?;
        let tx_return_view = link.tx_return().map_err(corrupt)?;
        // A connection that cannot be made non-blocking is kept open all the same (its EOF
        // detaches the app), but not read.
        let watched = control
            .as_ref()
            .is_some_and(|c| match c.set_nonblocking(true) {
                Ok(()) => true,
                Err(e) => {
                    debug!(%e, "control connection cannot be made non-blocking: not watched");
                    false
                }
            });
        let control = control.map(|stream| {
            Mutex::new(Control {
                stream,
                partial: Vec::new(),
            })
        });
        let engine = Engine {
            me,
            server,
            app_bell,
            server_bell,
            events_view,
            tx_return_view,
            addr,
            mtu,
            instance,
            progress: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                c: Common {
                    ends,
                    tx_free,
                    rx_retakes,
                    rx_backlog: rx_held.into_iter().collect(),
                    outbox: VecDeque::new(),
                    pending: HashMap::new(),
                    next_id: 0,
                    parked: 0,
                    reply_timeout: REPLY_TIMEOUT,
                    bad_events: 0,
                },
                t: P::table(),
            }),
            control_open: AtomicBool::new(watched),
            control,
            control_due: AtomicU64::new(0),
            born: Instant::now(),
            down: AtomicBool::new(false),
            down_detail: Mutex::new(String::new()),
            link,
        };
        {
            let mut g = engine.lock();
            engine.pump(&mut g)?;
        }
        Ok(engine)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner<P>> {
        lock(&self.inner)
    }

    // -----------------------------------------------------------------------------------------
    // Pumping
    // -----------------------------------------------------------------------------------------

    /// Moves everything the server sent into the in-process state, hands back what the
    /// application is done with, and pushes queued requests.
    pub(crate) fn pump(&self, g: &mut Inner<P>) -> io::Result<()> {
        self.flush_outbox(&mut g.c)?;
        let mut moved = self.collect_tx(g)?;
        let mut evs = [AppEvent::default(); 32];
        loop {
            g.c.ends.events.rewind();
            let n = g.c.ends.events.read(&mut evs).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            // Take each RX buffer before committing the slot that carried it (ownership
            // protocol, keepnet_ipc::pool).
            for ev in &evs[..n] {
                moved |= match ev.kind {
                    event::REPLY => self.on_reply(g, ev),
                    _ => P::on_event(self, &mut g.c, &mut g.t, ev),
                };
            }
            g.c.ends.events.commit(n).map_err(corrupt)?;
        }
        self.flush_rx_return(&mut g.c)?;
        self.flush_outbox(&mut g.c)?;
        if moved {
            self.progress.fetch_add(1, Ordering::SeqCst);
            if g.c.parked > 0 {
                // Others may be waiting for what we just moved.
                self.app_bell.ring();
            }
        }
        Ok(())
    }

    /// Takes the TX buffers the server handed back onto the free list, telling the protocol
    /// which; true if any came.
    fn collect_tx(&self, g: &mut Inner<P>) -> io::Result<bool> {
        let pool = &self.link.tx_pool;
        let mut buf = [Descriptor::default(); 64];
        let mut took = Vec::new();
        loop {
            let ring = &mut g.c.ends.tx_return;
            ring.rewind();
            let n = ring.read(&mut buf).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            for d in &buf[..n] {
                if let Ok(r) = pool.take(d, self.server, self.me, g.c.tx_free.retakes_mut()) {
                    took.push(r.index());
                }
            }
            g.c.ends.tx_return.commit(n).map_err(corrupt)?;
        }
        for &i in &took {
            // A double return is not put twice (nor counted against a socket twice).
            if g.c.tx_free.put(i) {
                P::on_tx_back(&mut g.t, i);
            }
        }
        Ok(!took.is_empty())
    }

    /// Takes the RX buffer an event names; None (counted) if its descriptor is bad.
    pub(crate) fn take_rx(&self, c: &mut Common, ev: &AppEvent) -> Option<BufRef> {
        match self
            .link
            .rx_pool
            .take(&ev.desc, self.server, self.me, &mut c.rx_retakes)
        {
            Ok(b) => Some(b),
            Err(e) => {
                c.bad_events += 1;
                debug!(%e, socket = ev.socket, kind = ev.kind, "event with a bad descriptor dropped");
                None
            }
        }
    }

    fn on_reply(&self, g: &mut Inner<P>, ev: &AppEvent) -> bool {
        let ok = ev.status == Status::Ok.code();
        let Some(p) = g.c.pending.get_mut(&ev.id) else {
            debug!(id = ev.id, "reply to no request ignored");
            return false;
        };
        if p.abandoned {
            let op = p.op;
            g.c.pending.remove(&ev.id);
            if ok {
                // Nobody will use this socket: free it at once.
                g.c.outbox.extend(P::undo(op, ev.socket));
            }
            return false;
        }
        let op = p.op;
        p.reply = Some(*ev);
        if ok {
            // The socket exists before any event for it can be pumped.
            P::on_created(self, &mut g.c, &mut g.t, op, ev);
        }
        true
    }

    fn flush_outbox(&self, c: &mut Common) -> io::Result<()> {
        if c.outbox.is_empty() {
            return Ok(());
        }
        let (a, b) = c.outbox.as_slices();
        let mut pushed = c.ends.requests.push_slice(a).map_err(corrupt)?;
        if pushed == a.len() && !b.is_empty() {
            pushed += c.ends.requests.push_slice(b).map_err(corrupt)?;
        }
        c.outbox.drain(..pushed);
        if pushed > 0 {
            self.server_bell.ring();
        }
        Ok(())
    }

    /// Hands back the RX buffers on the backlog; rings the server when it did, since a server
    /// may hold data back until the application has room (TCP's receive limit).
    pub(crate) fn flush_rx_return(&self, c: &mut Common) -> io::Result<()> {
        if c.rx_backlog.is_empty() {
            return Ok(());
        }
        let descs: Vec<Descriptor> = c
            .rx_backlog
            .iter()
            .map(|&i| self.link.rx_pool.descriptor(i, 0))
            .collect();
        let pushed = c.ends.rx_return.push_slice(&descs).map_err(corrupt)?;
        c.rx_backlog.drain(..pushed);
        if pushed > 0 {
            self.server_bell.ring();
        }
        Ok(())
    }

    /// Queues `reqs` in order and pushes what the ring takes.
    pub(crate) fn submit(
        &self,
        c: &mut Common,
        reqs: impl IntoIterator<Item = AppRequest>,
    ) -> io::Result<()> {
        c.outbox.extend(reqs);
        self.flush_outbox(c)
    }

    // -----------------------------------------------------------------------------------------
    // Waiting
    // -----------------------------------------------------------------------------------------

    /// Pumps and runs `check` until it gives an answer, parking between tries; `Ok(None)`
    /// once the wait has passed without one. `wait` says how long, asked when `check` first
    /// finds nothing (the fast path does not need it). `want_tx`: also wake when TX buffers
    /// come back.
    pub(crate) fn wait_until<T>(
        &self,
        wait: impl FnOnce(&Inner<P>) -> Wait,
        want_tx: bool,
        mut check: impl FnMut(&mut Inner<P>) -> Option<io::Result<T>>,
    ) -> io::Result<Option<T>> {
        let mut g = self.lock();
        let mut wait = Some(wait);
        let mut until = Wait::Now;
        loop {
            if let Some(e) = self.down_error() {
                return Err(e);
            }
            self.pump(&mut g)?;
            if let Some(r) = check(&mut g) {
                return r.map(Some);
            }
            if let Some(w) = wait.take() {
                until = w(&g);
            }
            let slice = match until {
                Wait::Now => {
                    // Nothing to do for a non-blocking call: a look for a notification
                    // (rate-limited) before it says `WouldBlock`.
                    drop(g);
                    self.watch_control();
                    return self.down_error().map_or(Ok(None), Err);
                }
                Wait::Until(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(WAIT_SLICE),
                    _ => return Ok(None),
                },
                Wait::Forever => WAIT_SLICE,
            };
            g.c.parked += 1;
            let seen = self.progress.load(Ordering::SeqCst);
            drop(g);
            // About to park: a look for a notification (rate-limited). One that changes the
            // server's state bumps `progress`, so the wait below returns at once.
            self.watch_control();
            let has = |r: Result<(u64, u64), RingError>| r.map_or(true, |(h, t)| h != t);
            self.app_bell
                .wait(SpinPolicy::spin_for(SPIN), Some(slice), || {
                    self.progress.load(Ordering::SeqCst) != seen
                        || has(self.events_view.indices())
                        || (want_tx && has(self.tx_return_view.indices()))
                });
            g = self.lock();
            g.c.parked -= 1;
            if g.c.parked > 0 {
                // Leaving the wait cleared the bell's one `sleeping` flag; the others still
                // wait, so the server's next ring must wake them.
                self.app_bell.arm();
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Notifications (the control connection)
    // -----------------------------------------------------------------------------------------

    /// The error every call fails with while the supervisor says the server is down for good;
    /// None while it serves (one atomic load).
    pub(crate) fn down_error(&self) -> Option<io::Error> {
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        Some(server_down(P::SERVER, &lock(&self.down_detail)))
    }

    /// Why the server is down, if the supervisor said it failed for good.
    pub(crate) fn down_reason(&self) -> Option<String> {
        self.down
            .load(Ordering::Acquire)
            .then(|| lock(&self.down_detail).clone())
    }

    /// Reads what the supervisor wrote on the control connection and acts on it, unless
    /// someone looked less than [`CONTROL_EVERY`] ago or is looking now. Never blocks. A
    /// change of the server's state wakes every parked call. Returns true on a change.
    pub(crate) fn watch_control(&self) -> bool {
        let Some(control) = &self.control else {
            return false;
        };
        if !self.control_open.load(Ordering::Relaxed) {
            return false;
        }
        let now = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let due = self.control_due.load(Ordering::Relaxed);
        let next = now.saturating_add(CONTROL_EVERY.as_nanos() as u64);
        if now < due
            || self
                .control_due
                .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let mut c = match control.try_lock() {
            Ok(c) => c,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let mut changed = false;
        let mut chunk = [0u8; 1024];
        loop {
            match (&c.stream).read(&mut chunk) {
                Ok(0) => {
                    // The supervisor exited; a new one re-adopts the servers, which go on
                    // serving: nothing fails.
                    debug!(
                        server = P::SERVER,
                        "the supervisor closed the control connection; the data path goes on"
                    );
                    self.control_open.store(false, Ordering::Relaxed);
                    break;
                }
                Ok(n) => {
                    c.partial.extend_from_slice(&chunk[..n]);
                    while let Some(end) = c.partial.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = c.partial.drain(..=end).collect();
                        changed |= self.on_notice(&line[..end]);
                    }
                    if c.partial.len() > MAX_NOTICE {
                        debug!(len = c.partial.len(), "overlong control line dropped");
                        c.partial.clear();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(%e, server = P::SERVER, "control connection unreadable; not watched");
                    self.control_open.store(false, Ordering::Relaxed);
                    break;
                }
            }
        }
        drop(c);
        if changed {
            // Wake the parked calls: they see `progress` move and look at the state again.
            self.progress.fetch_add(1, Ordering::SeqCst);
            self.app_bell.ring();
        }
        changed
    }

    /// Acts on one notification line; true if the server's state changed.
    fn on_notice(&self, line: &[u8]) -> bool {
        if line.iter().all(u8::is_ascii_whitespace) {
            return false;
        }
        match serde_json::from_slice::<AppNotice>(line) {
            Ok(AppNotice::ServerFailed { server, detail }) if server == P::SERVER => {
                warn!(server, %detail, "keepnet: the server is down; calls on its sockets fail");
                *lock(&self.down_detail) = detail;
                self.down.store(true, Ordering::Release);
                true
            }
            Ok(AppNotice::ServerBack { server }) if server == P::SERVER => {
                let was = self.down.swap(false, Ordering::AcqRel);
                if was {
                    warn!(server, "keepnet: the server serves again");
                }
                was
            }
            Ok(other) => {
                debug!(?other, "notification for another server ignored");
                false
            }
            Err(e) => {
                debug!(%e, "unknown line on the control connection ignored");
                false
            }
        }
    }

    /// Runs `f` on the state after a pump.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner<P>) -> R) -> io::Result<R> {
        let mut g = self.lock();
        self.pump(&mut g)?;
        Ok(f(&mut g))
    }

    // -----------------------------------------------------------------------------------------
    // Requests
    // -----------------------------------------------------------------------------------------

    /// Sends `req` (its id is filled in) and waits for its reply, at most `timeout` (None: the
    /// reply timeout). `what` names the request in the timeout's message.
    pub(crate) fn request(
        &self,
        mut req: AppRequest,
        what: &str,
        timeout: Option<Duration>,
    ) -> io::Result<AppEvent> {
        if let Some(e) = self.down_error() {
            return Err(e);
        }
        let (id, timeout) = {
            let mut g = self.lock();
            let c = &mut g.c;
            let id = loop {
                c.next_id = c.next_id.wrapping_add(1);
                if c.next_id != 0 && !c.pending.contains_key(&c.next_id) {
                    break c.next_id;
                }
            };
            req.id = id;
            c.pending.insert(
                id,
                Pending {
                    op: req.op,
                    reply: None,
                    abandoned: false,
                },
            );
            c.outbox.push_back(req);
            (id, timeout.unwrap_or(c.reply_timeout))
        };
        let r = self.wait_until(
            |_| Wait::new(false, Some(timeout)),
            false,
            |g| {
                if g.c.pending.get(&id).is_some_and(|p| p.reply.is_some()) {
                    return g.c.pending.remove(&id).and_then(|p| p.reply).map(Ok);
                }
                None
            },
        );
        match r {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => {
                self.abandon(id);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the {} server did not answer the {what} request within {timeout:?} \
                         (keepnet instance {:?}); is it running? see `keepnet status`",
                        P::SERVER,
                        self.instance
                    ),
                ))
            }
            Err(e) => {
                self.abandon(id);
                Err(e)
            }
        }
    }

    /// Gives up waiting for request `id`: a reply that comes later is undone, and so is one
    /// that came just too late.
    fn abandon(&self, id: u32) {
        let mut g = self.lock();
        let g = &mut *g;
        let Some(p) = g.c.pending.get_mut(&id) else {
            return;
        };
        match p.reply {
            None => p.abandoned = true,
            Some(ev) => {
                let op = p.op;
                g.c.pending.remove(&id);
                if ev.status == Status::Ok.code() {
                    if let Some(undo) = P::undo(op, ev.socket) {
                        P::forget(&mut g.c, &mut g.t, ev.socket);
                        g.c.outbox.push_back(undo);
                    }
                }
            }
        }
        let _ = self.pump(g);
    }

    /// Forgets `socket` and sends `req` for it (CLOSE or ABORT, no reply awaited).
    pub(crate) fn release(&self, socket: u32, req: AppRequest) {
        let mut g = self.lock();
        let g = &mut *g;
        P::forget(&mut g.c, &mut g.t, socket);
        g.c.outbox.push_back(req);
        if let Err(e) = self.pump(g) {
            debug!(%e, socket, "release: pump failed");
        }
    }
}

/// A request on `socket` with no reply wanted (CLOSE, ABORT).
pub(crate) fn plain_request(op: u32, socket: u32) -> AppRequest {
    AppRequest {
        op,
        id: 0,
        socket,
        ..AppRequest::default()
    }
}

/// The public face of an attachment: a struct wrapping an [`Engine`] and its constructors and
/// accessors, the same for every protocol.
macro_rules! attachment {
    ($(#[$doc:meta])* $name:ident, $proto:ty) => {
        $(#[$doc])*
        pub struct $name {
            pub(crate) engine: $crate::engine::Engine<$proto>,
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("instance", &self.engine.instance)
                    .field("app", &self.engine.link.app())
                    .field("addr", &self.engine.addr)
                    .finish_non_exhaustive()
            }
        }

        impl $name {
            /// The attachment to the instance named by `KEEPNET_INSTANCE` (default
            /// `default`), made on first use and shared afterwards.
            ///
            /// # Errors
            /// `NotFound` when no such instance runs; whatever the handshake with its
            /// supervisor failed with otherwise (see `attach`).
            pub fn default_instance() -> std::io::Result<std::sync::Arc<$name>> {
                let name = std::env::var(keepnet_server::app::INSTANCE_ENV)
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| $crate::engine::DEFAULT_INSTANCE.to_string());
                $name::attach(&name)
            }

            /// The attachment to `instance`, made on first use and shared afterwards: the
            /// process connects to the instance's control socket
            /// (`$KEEPNET_RUN_DIR/<instance>/ctl.sock`), receives its region and keeps the
            /// connection open until it exits.
            ///
            /// # Errors
            /// `InvalidInput` for a name that is not a plain directory name; `NotFound` when
            /// no such instance runs ("... start one with `keepnet up`"); `TimedOut` when its
            /// supervisor does not answer; `Other` carrying the supervisor's message when it
            /// refuses; `InvalidData` when its answer or region is unusable. A failed attach
            /// is not remembered: the next call tries again.
            pub fn attach(instance: &str) -> std::io::Result<std::sync::Arc<$name>> {
                use $crate::engine::Protocol;
                /// Attachments made so far, one per instance. They live as long as the
                /// process: the control connection in each must stay open (its EOF detaches
                /// the app).
                static ATTACHED: std::sync::Mutex<Vec<std::sync::Arc<$name>>> =
                    std::sync::Mutex::new(Vec::new());
                $crate::attach::check_instance_name(instance)?;
                let mut list = $crate::engine::lock(&ATTACHED);
                if let Some(s) = list.iter().find(|s| s.engine.instance == instance) {
                    return Ok(std::sync::Arc::clone(s));
                }
                let a = $crate::attach::attach_at(
                    instance,
                    &keepnet_server::app::control_socket(instance),
                    <$proto>::NUMBER,
                )?;
                let engine = $crate::engine::Engine::build(
                    a.link,
                    a.server_eventfd,
                    a.addr,
                    a.mtu,
                    instance.to_string(),
                    Some(a.control),
                )?;
                let stack = std::sync::Arc::new($name { engine });
                tracing::debug!(
                    instance,
                    server = <$proto>::SERVER,
                    app = stack.engine.link.app(),
                    addr = %stack.engine.addr,
                    "attached"
                );
                list.push(std::sync::Arc::clone(&stack));
                Ok(stack)
            }

            /// An attachment over a region obtained some other way (tests, or a process that
            /// made the handshake itself): `link` is the application's region,
            /// `server_bell_eventfd` the eventfd attached to the server's doorbell, `addr`
            /// keepnet's address. The MTU is taken to be 1500. Claims the application's ring
            /// ends in `link`.
            #[doc(hidden)]
            pub fn from_parts(
                link: keepnet_server::app::AppLink,
                server_bell_eventfd: std::os::fd::OwnedFd,
                addr: std::net::Ipv4Addr,
            ) -> std::io::Result<std::sync::Arc<$name>> {
                let engine = $crate::engine::Engine::build(
                    link,
                    server_bell_eventfd,
                    addr,
                    $crate::engine::DEFAULT_MTU,
                    "(in-process)".to_string(),
                    None,
                )?;
                Ok(std::sync::Arc::new($name { engine }))
            }

            /// Like `from_parts`, with `control` playing the supervisor's control
            /// connection: the notifications written on its other end
            /// (`keepnet_server::app::AppNotice`) are read as on an attachment's.
            #[doc(hidden)]
            pub fn from_parts_with_control(
                link: keepnet_server::app::AppLink,
                server_bell_eventfd: std::os::fd::OwnedFd,
                addr: std::net::Ipv4Addr,
                control: std::os::unix::net::UnixStream,
            ) -> std::io::Result<std::sync::Arc<$name>> {
                let engine = $crate::engine::Engine::build(
                    link,
                    server_bell_eventfd,
                    addr,
                    $crate::engine::DEFAULT_MTU,
                    "(in-process)".to_string(),
                    Some(control),
                )?;
                Ok(std::sync::Arc::new($name { engine }))
            }

            /// Why the server is down, if its supervisor said it failed for good (its restart
            /// limit was reached): every call on its sockets then fails with
            /// `ConnectionAborted` until it serves again. None while it serves.
            pub fn server_down(&self) -> Option<String> {
                self.engine.watch_control();
                self.engine.down_reason()
            }

            /// keepnet's IPv4 address (what a socket bound to `0.0.0.0` is reached at).
            pub fn local_ip(&self) -> std::net::Ipv4Addr {
                self.engine.addr
            }

            /// The link MTU the supervisor reported.
            pub fn mtu(&self) -> u32 {
                self.engine.mtu
            }

            /// The application id the supervisor gave this attachment.
            pub fn app_id(&self) -> u32 {
                self.engine.link.app()
            }

            /// The instance this stack is attached to.
            pub fn instance(&self) -> &str {
                &self.engine.instance
            }

            /// How long requests wait for the server's answer (5 s unless changed).
            #[doc(hidden)]
            pub fn set_reply_timeout(&self, timeout: std::time::Duration) {
                self.engine.lock().c.reply_timeout = timeout;
            }

            /// Events refused so far because their descriptor was bad.
            #[doc(hidden)]
            pub fn bad_events(&self) -> u64 {
                self.engine.lock().c.bad_events
            }
        }
    };
}
pub(crate) use attachment;
