//! [`Stack`]: the one attachment a process has to a keepnet instance, shared by every socket.
//!
//! A `Stack` owns the application's ends of its region (`servers::app`): the request ring it
//! produces, the event ring it consumes, the free list of its TX pool and the RX buffers it
//! holds. All of that sits behind one mutex. There is no background thread: whichever thread
//! calls into the library *pumps* the rings under the mutex, moving what the server sent into
//! per-socket receive queues, request replies and pending errors, collecting TX buffers the
//! server handed back and returning RX buffers the application is done with.
//!
//! A call that must wait pumps, checks its condition, and if it is not met drops the mutex and
//! parks on the application's doorbell (a short spin, then a futex) for at most
//! [`WAIT_SLICE`], then starts over. The doorbell has one `sleeping` flag and several threads
//! may wait on it at once, so a thread that leaves the wait while others still wait re-arms it,
//! a thread whose pump moved something wakes the others, and no park lasts longer than a
//! slice: every waiter makes progress even if a wake-up is lost between two of them.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use keepnet_ipc::{
    BufRef, Descriptor, Doorbell, EndpointId, FreeList, Pod, Retakes, Ring, RingError, SpinPolicy,
};
use keepnet_server::app::{
    control_socket, event, op, AppEnds, AppEvent, AppLink, AppRequest, Status, INSTANCE_ENV,
    MAX_UDP_PAYLOAD,
};
use tracing::debug;

use crate::attach;

/// Longest a blocked call parks before it pumps and re-checks on its own.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(20);
/// How long a blocked call spins on the doorbell before it parks.
const SPIN: Duration = Duration::from_micros(20);
/// How long bind and connect wait for the server's answer by default.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The instance attached to when [`INSTANCE_ENV`] is unset.
pub const DEFAULT_INSTANCE: &str = "default";
/// The MTU [`Stack::from_parts`] assumes.
const DEFAULT_MTU: u32 = 1500;

/// Attachments made so far in this process, one per instance. They live as long as the
/// process: the control connection in each must stay open (its EOF detaches the app).
static ATTACHED: Mutex<Vec<Arc<Stack>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the state is still a
    // consistent set of queues.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn corrupt(e: RingError) -> io::Error {
    io::Error::other(format!(
        "keepnet: this application's region is inconsistent ({e}); the stack cannot go on"
    ))
}

/// A datagram waiting in a socket's receive queue: its source and the RX buffer holding it.
#[derive(Clone, Copy, Debug)]
struct Datagram {
    from: SocketAddrV4,
    buf: BufRef,
}

/// What the library keeps per socket.
#[derive(Debug, Default)]
pub(crate) struct SocketEntry {
    rx: VecDeque<Datagram>,
    /// An asynchronous error (`event::ERROR`), returned once by the next send or receive.
    pub(crate) error: Option<Status>,
    pub(crate) peer: Option<SocketAddrV4>,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    pub(crate) nonblocking: bool,
}

/// A request waiting for its reply.
#[derive(Debug)]
struct Pending {
    op: u32,
    reply: Option<AppEvent>,
    /// Its caller gave up (timeout): a late successful BIND is closed at once.
    abandoned: bool,
}

/// Everything behind the stack's mutex.
struct Inner {
    ends: AppEnds,
    /// TX pool buffers the application holds and may fill.
    tx_free: FreeList,
    /// RX buffers the server may hand over again after a crash of ours (none for a fresh
    /// attachment).
    rx_retakes: Retakes,
    /// RX buffers to hand back on `rx_return` (indices).
    rx_backlog: VecDeque<u32>,
    /// Requests not yet on the ring (it was full).
    outbox: VecDeque<AppRequest>,
    sockets: HashMap<u32, SocketEntry>,
    pending: HashMap<u32, Pending>,
    next_id: u32,
    /// Threads between dropping the mutex to park and taking it back.
    parked: usize,
    reply_timeout: Duration,
    /// Events with a descriptor the RX pool refused (also counted in the pool's drops).
    bad_events: u64,
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

/// One process's attachment to a keepnet instance, shared (through `Arc`) by all its sockets.
///
/// Sockets made with [`crate::UdpSocket::bind`] attach lazily to the instance named by
/// `KEEPNET_INSTANCE` (default `default`) the first time any of them is made, and keep that one
/// attachment for the life of the process. Use [`Stack::attach`] and
/// [`crate::UdpSocket::bind_with`] to pick an instance explicitly.
pub struct Stack {
    link: AppLink,
    me: EndpointId,
    server: EndpointId,
    app_bell: Doorbell,
    server_bell: Doorbell,
    /// Read-only views of the rings the server produces, checked without the mutex while
    /// parked.
    events_view: Ring<AppEvent>,
    tx_return_view: Ring<Descriptor>,
    addr: Ipv4Addr,
    mtu: u32,
    instance: String,
    /// Bumped by every pump that moved something: a parked thread's wake-up condition.
    progress: AtomicU64,
    inner: Mutex<Inner>,
    /// The control connection to the supervisor (none for [`Stack::from_parts`]).
    _control: Option<UnixStream>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("instance", &self.instance)
            .field("app", &self.link.app())
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn in_flight<T: Pod>(ring: Result<Ring<T>, RingError>) -> io::Result<Vec<T>> {
    ring.and_then(|r| r.in_flight()).map_err(corrupt)
}

impl Stack {
    /// The attachment to the instance named by `KEEPNET_INSTANCE` (default `default`), made on
    /// first use and shared afterwards.
    ///
    /// # Errors
    /// `NotFound` when no such instance runs; whatever the handshake with its supervisor
    /// failed with otherwise (see [`Stack::attach`]).
    pub fn default_instance() -> io::Result<Arc<Stack>> {
        let name = std::env::var(INSTANCE_ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_INSTANCE.to_string());
        Stack::attach(&name)
    }

    /// The attachment to `instance`, made on first use and shared afterwards: the process
    /// connects to the instance's control socket (`$KEEPNET_RUN_DIR/<instance>/ctl.sock`),
    /// receives its region and keeps the connection open until it exits.
    ///
    /// # Errors
    /// `InvalidInput` for a name that is not a plain directory name; `NotFound` when no such
    /// instance runs ("... start one with `keepnet up`"); `TimedOut` when its supervisor does
    /// not answer; `Other` carrying the supervisor's message when it refuses; `InvalidData`
    /// when its answer or region is unusable. A failed attach is not remembered: the next
    /// call tries again.
    pub fn attach(instance: &str) -> io::Result<Arc<Stack>> {
        if instance.is_empty() || instance.contains('/') || instance == "." || instance == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{instance:?} is not a keepnet instance name"),
            ));
        }
        let mut list = lock(&ATTACHED);
        if let Some(s) = list.iter().find(|s| s.instance == instance) {
            return Ok(Arc::clone(s));
        }
        let a = attach::attach_at(instance, &control_socket(instance))?;
        let stack = Stack::build(
            a.link,
            a.server_eventfd,
            a.addr,
            a.mtu,
            instance.to_string(),
            Some(a.control),
        )?;
        debug!(instance, app = stack.link.app(), addr = %stack.addr, "attached");
        list.push(Arc::clone(&stack));
        Ok(stack)
    }

    /// A stack over a region obtained some other way (tests, or a process that made the
    /// handshake itself): `link` is the application's region, `server_bell_eventfd` the
    /// eventfd attached to the server's doorbell, `addr` keepnet's address. The MTU is
    /// taken to be 1500. Claims the application's ring ends in `link`.
    #[doc(hidden)]
    pub fn from_parts(
        link: AppLink,
        server_bell_eventfd: OwnedFd,
        addr: Ipv4Addr,
    ) -> io::Result<Arc<Stack>> {
        Stack::build(
            link,
            server_bell_eventfd,
            addr,
            DEFAULT_MTU,
            "(in-process)".to_string(),
            None,
        )
    }

    fn build(
        link: AppLink,
        server_eventfd: OwnedFd,
        addr: Ipv4Addr,
        mtu: u32,
        instance: String,
        control: Option<UnixStream>,
    ) -> io::Result<Arc<Stack>> {
        let region_err = |e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("keepnet: cannot use this application's region: {e}"),
            )
        };
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
        let datagrams: Vec<Descriptor> = in_flight(link.events())?
            .iter()
            .filter(|e| e.kind == event::DATAGRAM)
            .map(|e| e.desc)
            .collect();
        let rx_back = in_flight(link.rx_return())?;
        let tx_free = FreeList::recover(&link.tx_pool, me, &sends, &tx_back);
        let (rx_held, rx_retakes) = link.rx_pool.recover(me, &rx_back, &datagrams);
        let ends = link.app_ends().map_err(|e| region_err(&e))?;
        let app_bell = link.app_bell().map_err(|e| region_err(&e))?;
        let server_bell = link
            .server_bell()
            .map_err(|e| region_err(&e))?
            .with_eventfd(server_eventfd);
        let events_view = link.events().map_err(corrupt)?;
        let tx_return_view = link.tx_return().map_err(corrupt)?;
        let stack = Arc::new(Stack {
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
                ends,
                tx_free,
                rx_retakes,
                rx_backlog: rx_held.into_iter().collect(),
                outbox: VecDeque::new(),
                sockets: HashMap::new(),
                pending: HashMap::new(),
                next_id: 0,
                parked: 0,
                reply_timeout: REPLY_TIMEOUT,
                bad_events: 0,
            }),
            _control: control,
            link,
        });
        {
            let mut g = stack.lock();
            stack.pump(&mut g)?;
        }
        Ok(stack)
    }

    /// keepnet's IPv4 address (what a socket bound to `0.0.0.0` receives on).
    pub fn local_ip(&self) -> Ipv4Addr {
        self.addr
    }

    /// The link MTU the supervisor reported.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The application id the supervisor gave this process.
    pub fn app_id(&self) -> u32 {
        self.link.app()
    }

    /// The instance this stack is attached to.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How long bind and connect wait for the server's answer (5 s unless changed).
    #[doc(hidden)]
    pub fn set_reply_timeout(&self, timeout: Duration) {
        lock(&self.inner).reply_timeout = timeout;
    }

    /// Events refused so far because their descriptor was bad.
    #[doc(hidden)]
    pub fn bad_events(&self) -> u64 {
        lock(&self.inner).bad_events
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    // -----------------------------------------------------------------------------------------
    // Pumping
    // -----------------------------------------------------------------------------------------

    /// Moves everything the server sent into the in-process queues, hands back what the
    /// application is done with, and pushes queued requests.
    fn pump(&self, g: &mut Inner) -> io::Result<()> {
        let mut moved = false;
        self.flush_outbox(g)?;
        let back = g
            .tx_free
            .collect(
                &self.link.tx_pool,
                &mut g.ends.tx_return,
                self.server,
                usize::MAX,
            )
            .map_err(corrupt)?;
        moved |= back > 0;
        let mut evs = [AppEvent::default(); 32];
        loop {
            g.ends.events.rewind();
            let n = g.ends.events.read(&mut evs).map_err(corrupt)?;
            if n == 0 {
                break;
            }
            // Take each RX buffer before committing the slot that carried it (ownership
            // protocol, keepnet_ipc::pool).
            for ev in &evs[..n] {
                moved |= self.on_event(g, ev);
            }
            g.ends.events.commit(n).map_err(corrupt)?;
        }
        self.flush_rx_return(g)?;
        self.flush_outbox(g)?;
        if moved {
            self.progress.fetch_add(1, Ordering::SeqCst);
            if g.parked > 0 {
                // Others may be waiting for what we just moved.
                self.app_bell.ring();
            }
        }
        Ok(())
    }

    /// Handles one event; true if it changed something a waiter may be waiting for.
    fn on_event(&self, g: &mut Inner, ev: &AppEvent) -> bool {
        match ev.kind {
            event::DATAGRAM => {
                let buf = match self.link.rx_pool.take(
                    &ev.desc,
                    self.server,
                    self.me,
                    &mut g.rx_retakes,
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        g.bad_events += 1;
                        debug!(%e, socket = ev.socket, "datagram with a bad descriptor dropped");
                        return false;
                    }
                };
                match g.sockets.get_mut(&ev.socket) {
                    Some(s) => {
                        s.rx.push_back(Datagram {
                            from: SocketAddrV4::new(Ipv4Addr::from(ev.addr), ev.port),
                            buf,
                        });
                        true
                    }
                    None => {
                        // A socket closed meanwhile: the buffer goes straight back.
                        g.rx_backlog.push_back(buf.index());
                        false
                    }
                }
            }
            event::REPLY => {
                let ok = ev.status == Status::Ok.code();
                let Some(p) = g.pending.get_mut(&ev.id) else {
                    debug!(id = ev.id, "reply to no request ignored");
                    return false;
                };
                if p.abandoned {
                    let op = p.op;
                    g.pending.remove(&ev.id);
                    if op == op::BIND && ok {
                        // Nobody will use this socket: free its port at once.
                        g.outbox.push_back(close_request(ev.socket));
                    }
                    return false;
                }
                if p.op == op::BIND && ok {
                    // The entry exists before any datagram for the socket can be pumped.
                    if let Some(old) = g.sockets.insert(ev.socket, SocketEntry::default()) {
                        g.rx_backlog.extend(old.rx.iter().map(|d| d.buf.index()));
                    }
                }
                p.reply = Some(*ev);
                true
            }
            event::ERROR => match g.sockets.get_mut(&ev.socket) {
                Some(s) if ev.status != Status::Ok.code() => {
                    s.error = Some(Status::from_code(ev.status));
                    true
                }
                _ => false,
            },
            kind => {
                debug!(kind, "unknown event kind ignored");
                false
            }
        }
    }

    fn flush_outbox(&self, g: &mut Inner) -> io::Result<()> {
        if g.outbox.is_empty() {
            return Ok(());
        }
        let (a, b) = g.outbox.as_slices();
        let mut pushed = g.ends.requests.push_slice(a).map_err(corrupt)?;
        if pushed == a.len() && !b.is_empty() {
            pushed += g.ends.requests.push_slice(b).map_err(corrupt)?;
        }
        g.outbox.drain(..pushed);
        if pushed > 0 {
            self.server_bell.ring();
        }
        Ok(())
    }

    fn flush_rx_return(&self, g: &mut Inner) -> io::Result<()> {
        if g.rx_backlog.is_empty() {
            return Ok(());
        }
        let descs: Vec<Descriptor> = g
            .rx_backlog
            .iter()
            .map(|&i| self.link.rx_pool.descriptor(i, 0))
            .collect();
        let pushed = g.ends.rx_return.push_slice(&descs).map_err(corrupt)?;
        g.rx_backlog.drain(..pushed);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Waiting
    // -----------------------------------------------------------------------------------------

    /// Pumps and runs `check` until it gives an answer, parking between tries; `Ok(None)`
    /// once the wait has passed without one. `wait` says how long, asked when `check` first
    /// finds nothing (the fast path does not need it). `want_tx`: also wake when TX buffers
    /// come back.
    fn wait_until<T>(
        &self,
        wait: impl FnOnce(&Inner) -> Wait,
        want_tx: bool,
        mut check: impl FnMut(&mut Inner) -> Option<io::Result<T>>,
    ) -> io::Result<Option<T>> {
        let mut g = self.lock();
        let mut wait = Some(wait);
        let mut until = Wait::Now;
        loop {
            self.pump(&mut g)?;
            if let Some(r) = check(&mut g) {
                return r.map(Some);
            }
            if let Some(w) = wait.take() {
                until = w(&g);
            }
            let slice = match until {
                Wait::Now => return Ok(None),
                Wait::Until(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left.min(WAIT_SLICE),
                    _ => return Ok(None),
                },
                Wait::Forever => WAIT_SLICE,
            };
            g.parked += 1;
            let seen = self.progress.load(Ordering::SeqCst);
            drop(g);
            let has = |r: Result<(u64, u64), RingError>| r.map_or(true, |(h, t)| h != t);
            self.app_bell
                .wait(SpinPolicy::spin_for(SPIN), Some(slice), || {
                    self.progress.load(Ordering::SeqCst) != seen
                        || has(self.events_view.indices())
                        || (want_tx && has(self.tx_return_view.indices()))
                });
            g = self.lock();
            g.parked -= 1;
            if g.parked > 0 {
                // Leaving the wait cleared the bell's one `sleeping` flag; the others still
                // wait, so the server's next ring must wake them.
                self.app_bell.arm();
            }
        }
    }

    /// Runs `f` on socket `socket`'s entry after a pump.
    pub(crate) fn with_socket<R>(
        &self,
        socket: u32,
        f: impl FnOnce(&mut SocketEntry) -> R,
    ) -> io::Result<R> {
        let mut g = self.lock();
        self.pump(&mut g)?;
        let s = g.sockets.get_mut(&socket).ok_or_else(bad_socket)?;
        Ok(f(s))
    }

    // -----------------------------------------------------------------------------------------
    // Operations
    // -----------------------------------------------------------------------------------------

    /// Sends `req` (its id is filled in) and waits for its reply, at most the reply timeout.
    /// `what` names the request in the timeout's message.
    pub(crate) fn request(&self, mut req: AppRequest, what: &str) -> io::Result<AppEvent> {
        let (id, timeout) = {
            let mut g = self.lock();
            let id = loop {
                g.next_id = g.next_id.wrapping_add(1);
                if g.next_id != 0 && !g.pending.contains_key(&g.next_id) {
                    break g.next_id;
                }
            };
            req.id = id;
            g.pending.insert(
                id,
                Pending {
                    op: req.op,
                    reply: None,
                    abandoned: false,
                },
            );
            g.outbox.push_back(req);
            (id, g.reply_timeout)
        };
        let r = self.wait_until(
            |_| Wait::new(false, Some(timeout)),
            false,
            |g| {
                if g.pending.get(&id).is_some_and(|p| p.reply.is_some()) {
                    return g.pending.remove(&id).and_then(|p| p.reply).map(Ok);
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
                        "the udp server did not answer the {what} request within {timeout:?} \
                         (keepnet instance {:?}); is it running? see `keepnet status`",
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

    /// Gives up waiting for request `id`: a reply that comes later is dropped, and a socket it
    /// made is closed.
    fn abandon(&self, id: u32) {
        let mut g = self.lock();
        let Some(p) = g.pending.get_mut(&id) else {
            return;
        };
        match p.reply {
            None => p.abandoned = true,
            Some(ev) => {
                // Answered just too late: undo what the answer did.
                let op = p.op;
                g.pending.remove(&id);
                if op == op::BIND && ev.status == Status::Ok.code() {
                    self.forget_socket(&mut g, ev.socket);
                    g.outbox.push_back(close_request(ev.socket));
                }
            }
        }
        let _ = self.pump(&mut g);
    }

    fn forget_socket(&self, g: &mut Inner, socket: u32) {
        if let Some(s) = g.sockets.remove(&socket) {
            g.rx_backlog.extend(s.rx.iter().map(|d| d.buf.index()));
        }
    }

    /// Sends `payload` from `socket` to `dst` (None: the connected peer).
    pub(crate) fn send(
        &self,
        socket: u32,
        payload: &[u8],
        dst: Option<SocketAddrV4>,
    ) -> io::Result<usize> {
        if payload.len() > MAX_UDP_PAYLOAD {
            return Err(too_long(payload.len()));
        }
        let mut how = (false, None);
        let wait = |g: &Inner| {
            how = socket_wait(g, socket, |s| s.write_timeout);
            Wait::new(how.0, how.1)
        };
        let got = self.wait_until(wait, true, |g| {
            let s = match g.sockets.get_mut(&socket) {
                Some(s) => s,
                None => return Some(Err(bad_socket())),
            };
            if let Some(e) = s.error.take().and_then(Status::to_io_error) {
                return Some(Err(e));
            }
            let (addr, port) = match (dst, s.peer) {
                (Some(d), _) => (u32::from(*d.ip()), d.port()),
                // 0/0 asks the server for the connected peer.
                (None, Some(_)) => (0, 0),
                (None, None) => return Some(Err(not_connected())),
            };
            g.tx_free.get().map(|i| Ok((i, addr, port)))
        })?;
        let Some((index, addr, port)) = got else {
            return Err(match how {
                (true, _) => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "every send buffer is in flight (non-blocking socket)",
                ),
                (false, t) => io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no send buffer came free within the write timeout ({:?})",
                        t.unwrap_or_default()
                    ),
                ),
            });
        };
        // The buffer is ours alone until its descriptor is on the ring: fill it unlocked.
        let pool = &self.link.tx_pool;
        let len = payload.len() as u32; // <= MAX_UDP_PAYLOAD
        if let Err(e) = pool.write(index, pool.headroom(), payload) {
            self.lock().tx_free.put(index);
            return Err(io::Error::other(format!(
                "keepnet: send buffer unusable: {e}"
            )));
        }
        let req = AppRequest {
            op: op::SEND,
            id: 0,
            socket,
            addr,
            port,
            desc: pool.descriptor(index, len),
            ..AppRequest::default()
        };
        let mut g = self.lock();
        g.outbox.push_back(req);
        self.flush_outbox(&mut g)?;
        Ok(payload.len())
    }

    /// Receives (or with `peek`, copies without consuming) the next datagram of `socket`
    /// into `out`, truncating it to `out.len()`.
    pub(crate) fn recv(
        &self,
        socket: u32,
        out: &mut [u8],
        peek: bool,
    ) -> io::Result<(usize, SocketAddrV4)> {
        let mut how = (false, None);
        let wait = |g: &Inner| {
            how = socket_wait(g, socket, |s| s.read_timeout);
            Wait::new(how.0, how.1)
        };
        let got = self.wait_until(wait, false, |g| {
            let s = match g.sockets.get_mut(&socket) {
                Some(s) => s,
                None => return Some(Err(bad_socket())),
            };
            if let Some(e) = s.error.take().and_then(Status::to_io_error) {
                return Some(Err(e));
            }
            let d = if peek {
                *s.rx.front()?
            } else {
                s.rx.pop_front()?
            };
            let n = self.link.rx_pool.read(&d.buf, out);
            if !peek {
                g.rx_backlog.push_back(d.buf.index());
                if let Err(e) = self.flush_rx_return(g) {
                    return Some(Err(e));
                }
            }
            Some(Ok((n, d.from)))
        })?;
        got.ok_or_else(|| match how {
            (true, _) => io::Error::new(
                io::ErrorKind::WouldBlock,
                "no datagram is waiting (non-blocking socket)",
            ),
            (false, t) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no datagram arrived within the read timeout ({:?})",
                    t.unwrap_or_default()
                ),
            ),
        })
    }

    /// Forgets `socket` and asks the server to close it (no reply awaited).
    pub(crate) fn close(&self, socket: u32) {
        let mut g = self.lock();
        self.forget_socket(&mut g, socket);
        g.outbox.push_back(close_request(socket));
        if let Err(e) = self.pump(&mut g) {
            debug!(%e, socket, "close: pump failed");
        }
    }
}

/// (non-blocking, the timeout `which` picks) of `socket`.
fn socket_wait(
    g: &Inner,
    socket: u32,
    which: impl FnOnce(&SocketEntry) -> Option<Duration>,
) -> (bool, Option<Duration>) {
    g.sockets
        .get(&socket)
        .map_or((true, None), |s| (s.nonblocking, which(s)))
}

fn close_request(socket: u32) -> AppRequest {
    AppRequest {
        op: op::CLOSE,
        id: 0,
        socket,
        ..AppRequest::default()
    }
}

pub(crate) fn too_long(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("message too long: {len} bytes; a UDP datagram carries at most {MAX_UDP_PAYLOAD}"),
    )
}

pub(crate) fn not_connected() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "socket is not connected")
}

fn bad_socket() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "keepnet: this socket is not open on its stack",
    )
}
