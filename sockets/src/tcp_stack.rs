//! [`TcpStack`]: the one attachment a process has to a keepnet instance's tcp server, shared
//! by every [`crate::TcpListener`] and [`crate::TcpStream`]: the [`Engine`] (rings, pumping,
//! parking) with TCP's socket table.
//!
//! Per connection the library keeps:
//! * the receive queue: the RX buffers of the DATA events not yet read, in order, the first
//!   one maybe partly read. A buffer goes back to the server once every byte of it is read,
//!   and the server delivers at most its receive buffer's worth that has not come back: the
//!   queue *is* the flow control, nothing is copied onto the heap;
//! * the bytes in flight: submitted in SEND requests whose TX buffers have not come back. A
//!   write waits while they reach the cap (256 KiB unless [`TcpStack::set_send_cap`]), so one
//!   connection cannot hold every TX buffer of the process. Which connection a returning
//!   buffer belongs to is looked up by its index;
//! * EOF, the pending error (reported once) and whether the connection is dead.
//!
//! A listener keeps the connections the server accepted (`event::ACCEPTED`) until
//! [`crate::TcpListener::accept`] takes them; their entries exist from the event on, so data
//! that arrives before the accept is queued.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use keepnet_ipc::BufferPool;
use keepnet_server::app::{event, op, shut, AppEvent, AppRequest, Status, APP_BUF, APP_HEADROOM};
use tracing::debug;

use crate::engine::{
    attachment, bad_socket, plain_request, unfinished, Common, Engine, Inner, Protocol, Wait,
};

/// Bytes one TX buffer carries.
pub(crate) const CHUNK: usize = (APP_BUF - APP_HEADROOM) as usize;
/// Bytes in flight per connection unless changed ([`TcpStack::set_send_cap`]).
pub const DEFAULT_SEND_CAP: usize = 256 * 1024;
/// Longest a `connect` without a timeout waits for the handshake (the tcp server gives up
/// sooner on its own; this bounds the wait if it never answers).
const CONNECT_LIMIT: Duration = Duration::from_secs(135);

/// A stretch of the stream waiting in an RX buffer.
#[derive(Clone, Copy, Debug)]
struct Stretch {
    index: u32,
    offset: u32,
    len: u32,
}

/// What the library keeps per TCP socket (a listener or a connection).
#[derive(Debug)]
pub(crate) struct Entry {
    /// Unique in this process: tells a socket from a later one the server gave the same handle.
    pub(crate) key: u64,
    pub(crate) listener: bool,
    /// Listener: connections the server accepted and the application did not yet.
    accept_q: VecDeque<(u32, SocketAddrV4)>,
    /// The handshake completed (always, for an accepted connection).
    connected: bool,
    rx: VecDeque<Stretch>,
    /// The peer sent a FIN (after the queued data).
    eof: bool,
    rd_shut: bool,
    wr_shut: bool,
    /// An error the server reported, returned once by the next call that can fail.
    pub(crate) error: Option<Status>,
    /// The connection is gone (an ERROR came): no more data either way.
    dead: bool,
    /// Bytes submitted whose TX buffers have not come back.
    in_flight: usize,
    pub(crate) local: SocketAddrV4,
    pub(crate) peer: SocketAddrV4,
    pub(crate) read_timeout: Option<Duration>,
    pub(crate) write_timeout: Option<Duration>,
    pub(crate) nonblocking: bool,
    pub(crate) nodelay: bool,
    pub(crate) keepalive: bool,
}

impl Entry {
    fn new(key: u64, listener: bool, local: SocketAddrV4, peer: SocketAddrV4) -> Entry {
        Entry {
            key,
            listener,
            accept_q: VecDeque::new(),
            connected: false,
            rx: VecDeque::new(),
            eof: false,
            rd_shut: false,
            wr_shut: false,
            error: None,
            dead: false,
            in_flight: 0,
            local,
            peer,
            read_timeout: None,
            write_timeout: None,
            nonblocking: false,
            nodelay: false,
            keepalive: false,
        }
    }
}

/// TCP's state behind the engine's mutex.
pub(crate) struct Table {
    socks: HashMap<u32, Entry>,
    /// TX buffer index -> (socket, its key, bytes) while in flight.
    tx_owner: HashMap<u32, (u32, u64, usize)>,
    next_key: u64,
    cap: usize,
}

impl Table {
    /// Makes the entry of `socket`, forgetting whatever had its handle.
    fn insert(
        &mut self,
        c: &mut Common,
        socket: u32,
        listener: bool,
        local: SocketAddrV4,
        peer: SocketAddrV4,
    ) -> &mut Entry {
        Tcp::forget(c, self, socket);
        self.next_key += 1;
        let e = Entry::new(self.next_key, listener, local, peer);
        self.socks.entry(socket).or_insert(e)
    }
}

const UNSPECIFIED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

fn addr_of(ev: &AppEvent) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ev.addr), ev.port)
}

/// TCP on the engine.
pub(crate) struct Tcp;

impl Protocol for Tcp {
    const NUMBER: u8 = crate::attach::PROTOCOL_TCP;
    const SERVER: &'static str = "tcp";
    const RX_EVENT: u32 = event::DATA;
    type Table = Table;

    fn table() -> Table {
        Table {
            socks: HashMap::new(),
            tx_owner: HashMap::new(),
            next_key: 0,
            cap: DEFAULT_SEND_CAP,
        }
    }

    fn on_event(e: &Engine<Tcp>, c: &mut Common, t: &mut Table, ev: &AppEvent) -> bool {
        match ev.kind {
            event::DATA => {
                let Some(buf) = e.take_rx(c, ev) else {
                    return false;
                };
                match t.socks.get_mut(&ev.socket) {
                    Some(s) if !s.listener && !s.rd_shut && !buf.is_empty() => {
                        s.rx.push_back(Stretch {
                            index: buf.index(),
                            offset: buf.offset(),
                            len: buf.len(),
                        });
                        true
                    }
                    _ => {
                        // Closed meanwhile, shut for reading, or empty: straight back.
                        c.rx_backlog.push_back(buf.index());
                        false
                    }
                }
            }
            event::EOF | event::CONNECTED | event::ERROR => {
                let Some(s) = t.socks.get_mut(&ev.socket) else {
                    return false;
                };
                match ev.kind {
                    event::EOF => s.eof = true,
                    event::CONNECTED => {
                        s.connected = true;
                        if ev.addr != 0 || ev.port != 0 {
                            s.local = addr_of(ev);
                        }
                    }
                    _ => {
                        let st = Status::from_code(ev.status);
                        if st != Status::Ok {
                            s.error = Some(st);
                            s.dead = !s.listener;
                        }
                    }
                }
                true
            }
            event::ACCEPTED => {
                if t.socks.contains_key(&ev.id) {
                    // Told again by a restarted server that could not know we heard it.
                    return false;
                }
                let local = match t.socks.get(&ev.socket) {
                    Some(l) if l.listener => l.local,
                    _ => {
                        // No listener to take it (closed meanwhile): the connection is ours
                        // and nobody's, so reset it.
                        debug!(
                            listener = ev.socket,
                            conn = ev.id,
                            "accepted on no listener"
                        );
                        c.outbox.push_back(plain_request(op::ABORT, ev.id));
                        return false;
                    }
                };
                let local = if local.ip().is_unspecified() {
                    SocketAddrV4::new(e.addr, local.port())
                } else {
                    local
                };
                let peer = addr_of(ev);
                t.insert(c, ev.id, false, local, peer).connected = true;
                if let Some(l) = t.socks.get_mut(&ev.socket) {
                    l.accept_q.push_back((ev.id, peer));
                }
                true
            }
            event::WRITABLE => true,
            kind => {
                debug!(kind, "unknown event kind ignored");
                false
            }
        }
    }

    fn on_created(_: &Engine<Tcp>, c: &mut Common, t: &mut Table, op: u32, ev: &AppEvent) {
        match op {
            op::LISTEN => {
                t.insert(c, ev.socket, true, addr_of(ev), UNSPECIFIED);
            }
            op::CONNECT => {
                // The peer is filled in by the caller, who knows it.
                t.insert(c, ev.socket, false, addr_of(ev), UNSPECIFIED);
            }
            _ => {}
        }
    }

    fn undo(op: u32, socket: u32) -> Option<AppRequest> {
        match op {
            op::LISTEN => Some(plain_request(op::CLOSE, socket)),
            op::CONNECT => Some(plain_request(op::ABORT, socket)),
            _ => None,
        }
    }

    fn forget(c: &mut Common, t: &mut Table, socket: u32) {
        let Some(s) = t.socks.remove(&socket) else {
            return;
        };
        c.rx_backlog.extend(s.rx.iter().map(|r| r.index));
        // Connections accepted by the server but never by the application are reset, as a
        // closing listener's are.
        for (conn, _) in s.accept_q {
            if let Some(x) = t.socks.remove(&conn) {
                c.rx_backlog.extend(x.rx.iter().map(|r| r.index));
            }
            c.outbox.push_back(plain_request(op::ABORT, conn));
        }
    }

    fn on_tx_back(t: &mut Table, index: u32) {
        if let Some((socket, key, n)) = t.tx_owner.remove(&index) {
            if let Some(s) = t.socks.get_mut(&socket).filter(|s| s.key == key) {
                s.in_flight = s.in_flight.saturating_sub(n);
            }
        }
    }
}

/// What a socket is ready for ([`crate::Poller`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    pub(crate) error: bool,
    /// EOF seen or the connection dead.
    pub(crate) hup: bool,
    /// The connection is dead (reported whatever the interest, as epoll's EPOLLHUP).
    pub(crate) dead: bool,
}

/// (non-blocking, the timeout `which` picks) of `socket`.
fn socket_wait(
    t: &Table,
    socket: u32,
    which: impl FnOnce(&Entry) -> Option<Duration>,
) -> (bool, Option<Duration>) {
    t.socks
        .get(&socket)
        .map_or((true, None), |s| (s.nonblocking, which(s)))
}

/// `status` as an error, its message prefixed with `what` (the kind kept).
fn status_error(status: Status, what: impl std::fmt::Display) -> io::Error {
    match status.to_io_error() {
        Some(e) => io::Error::new(e.kind(), format!("{what}: {e}")),
        None => io::Error::other(format!("{what}: no error")),
    }
}

/// `e` with its message prefixed with `what` (the kind kept).
fn context(e: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn broken_pipe(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("broken pipe: {why}"))
}

pub(crate) fn not_connected() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "a listening socket is not connected",
    )
}

/// Copies the front of `rx` into `out` (up to its length); unless `peek`, the bytes are
/// consumed and the buffers read to the end go onto `backlog`. Returns the bytes copied.
fn copy_out(
    pool: &BufferPool,
    rx: &mut VecDeque<Stretch>,
    out: &mut [u8],
    peek: bool,
    backlog: &mut VecDeque<u32>,
) -> usize {
    let mut n = 0;
    let mut i = 0;
    while n < out.len() {
        let Some(st) = rx.get_mut(i) else {
            break;
        };
        // The stretch lies inside a buffer validated when it was taken.
        let k = match pool.check(&pool.span(st.index, st.offset, st.len)) {
            Ok(r) => pool.read(&r, &mut out[n..]),
            Err(_) => st.len as usize,
        } as u32;
        n += k as usize;
        if peek {
            i += 1;
        } else if k == st.len {
            backlog.push_back(st.index);
            rx.pop_front();
        } else {
            st.offset += k;
            st.len -= k;
        }
    }
    n
}

attachment!(
    /// One process's attachment to a keepnet instance's tcp server, shared (through `Arc`) by
    /// all its TCP sockets.
    ///
    /// [`crate::TcpListener::bind`] and [`crate::TcpStream::connect`] attach lazily to the
    /// instance named by `KEEPNET_INSTANCE` (default `default`) the first time any TCP socket
    /// is made, and keep that one attachment for the life of the process (it is a second
    /// attachment beside the UDP one, [`crate::Stack`], if the process uses both). Use
    /// [`TcpStack::attach`] and the `*_with` constructors to pick an instance explicitly.
    TcpStack,
    Tcp
);

impl TcpStack {
    /// The bytes a connection may have in flight (submitted, TX buffers not back) before a
    /// write waits: [`DEFAULT_SEND_CAP`] unless changed. Applies to every connection of
    /// this stack.
    pub fn set_send_cap(&self, bytes: usize) {
        self.engine.lock().t.cap = bytes.max(1);
    }

    /// The per-connection cap on bytes in flight.
    pub fn send_cap(&self) -> usize {
        self.engine.lock().t.cap
    }

    /// Runs `f` on socket `socket`'s entry after a pump.
    pub(crate) fn with_entry<R>(
        &self,
        socket: u32,
        f: impl FnOnce(&mut Entry) -> R,
    ) -> io::Result<R> {
        self.engine
            .with(|g| g.t.socks.get_mut(&socket).map(f))?
            .ok_or_else(bad_socket)
    }

    /// Listens on `addr` with `backlog` (0: the server's default): (handle, bound address).
    pub(crate) fn listen(
        &self,
        addr: SocketAddrV4,
        backlog: u32,
    ) -> io::Result<(u32, SocketAddrV4)> {
        let reply = self.engine.request(
            AppRequest {
                op: op::LISTEN,
                addr: u32::from(*addr.ip()),
                port: addr.port(),
                _reserved: backlog,
                ..AppRequest::default()
            },
            "listen",
            None,
        )?;
        match Status::from_code(reply.status) {
            Status::Ok => Ok((reply.socket, addr_of(&reply))),
            st => Err(status_error(st, format_args!("listen on {addr}"))),
        }
    }

    /// Opens a connection to `to`, waiting at most `timeout` (None: until the server gives
    /// up): (handle, local address).
    pub(crate) fn connect(
        &self,
        to: SocketAddrV4,
        timeout: Option<Duration>,
    ) -> io::Result<(u32, SocketAddrV4)> {
        let start = Instant::now();
        let limit = timeout.unwrap_or(CONNECT_LIMIT);
        let reply_timeout = self.engine.lock().c.reply_timeout.min(limit);
        let what = format!("connect to {to}");
        let reply = self
            .engine
            .request(
                AppRequest {
                    op: op::CONNECT,
                    addr: u32::from(*to.ip()),
                    port: to.port(),
                    ..AppRequest::default()
                },
                "connect",
                Some(reply_timeout),
            )
            .map_err(|e| context(e, &what))?;
        match Status::from_code(reply.status) {
            Status::Ok => {}
            st => return Err(status_error(st, &what)),
        }
        let h = reply.socket;
        if let Err(e) = self.with_entry(h, |s| s.peer = to) {
            self.release(h, op::ABORT);
            return Err(e);
        }
        let deadline = start.checked_add(limit);
        let r = self.engine.wait_until(
            |_| deadline.map_or(Wait::Forever, Wait::Until),
            false,
            |g| {
                let Some(s) = g.t.socks.get_mut(&h) else {
                    return Some(Err(bad_socket()));
                };
                if s.connected {
                    return Some(Ok(s.local));
                }
                s.error.take().map(|st| Err(status_error(st, &what)))
            },
        );
        match r {
            Ok(Some(local)) => Ok((h, local)),
            Ok(None) => {
                self.release(h, op::ABORT);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what}: no answer within {limit:?}"),
                ))
            }
            Err(e) => {
                // The handle stays ours after an error: give it back.
                self.release(h, op::CLOSE);
                Err(e)
            }
        }
    }

    /// Takes the next connection of `listener`: (handle, peer, local address).
    pub(crate) fn accept(&self, listener: u32) -> io::Result<(u32, SocketAddrV4, SocketAddrV4)> {
        let wait = |g: &Inner<Tcp>| Wait::new(socket_wait(&g.t, listener, |_| None).0, None);
        let got = self.engine.wait_until(wait, false, |g| {
            let Some(l) = g.t.socks.get_mut(&listener) else {
                return Some(Err(bad_socket()));
            };
            if let Some(st) = l.error.take() {
                return Some(Err(status_error(st, "accept")));
            }
            let (conn, peer) = l.accept_q.pop_front()?;
            let local = g.t.socks.get(&conn).map_or(UNSPECIFIED, |c| c.local);
            Some(Ok((conn, peer, local)))
        })?;
        got.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "no connection is waiting (non-blocking listener)",
            )
        })
    }

    /// Reads (or with `peek`, copies without consuming) the next bytes of `socket` into
    /// `out`. Ok(0) at the end of the stream.
    pub(crate) fn read(&self, socket: u32, out: &mut [u8], peek: bool) -> io::Result<usize> {
        let mut how = (true, None);
        let wait = |g: &Inner<Tcp>| {
            how = socket_wait(&g.t, socket, |s| s.read_timeout);
            Wait::new(how.0, how.1)
        };
        let pool = &self.engine.link.rx_pool;
        let got = self.engine.wait_until(wait, false, |g| {
            let Some(s) = g.t.socks.get_mut(&socket) else {
                return Some(Err(bad_socket()));
            };
            if s.listener {
                return Some(Err(not_connected()));
            }
            if !s.rx.is_empty() {
                let n = copy_out(pool, &mut s.rx, out, peek, &mut g.c.rx_backlog);
                return Some(self.engine.flush_rx_return(&mut g.c).map(|()| n));
            }
            let err = if peek { s.error } else { s.error.take() };
            if let Some(st) = err {
                return Some(Err(status_error(st, "read")));
            }
            (s.eof || s.dead || s.rd_shut || out.is_empty()).then_some(Ok(0))
        })?;
        got.ok_or_else(|| {
            unfinished(
                how,
                "no data is waiting",
                "no data arrived within the read timeout",
            )
        })
    }

    /// Writes what of `data` fits without waiting once there is room (at least one TX
    /// buffer's worth, more while the cap and the free buffers allow); waits for room first.
    pub(crate) fn write(&self, socket: u32, data: &[u8]) -> io::Result<usize> {
        let mut how = (true, None);
        let wait = |g: &Inner<Tcp>| {
            how = socket_wait(&g.t, socket, |s| s.write_timeout);
            Wait::new(how.0, how.1)
        };
        let got = self.engine.wait_until(wait, true, |g| {
            let Table {
                socks,
                tx_owner,
                cap,
                ..
            } = &mut g.t;
            let Some(s) = socks.get_mut(&socket) else {
                return Some(Err(bad_socket()));
            };
            if s.listener {
                return Some(Err(not_connected()));
            }
            if let Some(st) = s.error.take() {
                return Some(Err(status_error(st, "write")));
            }
            if s.wr_shut {
                return Some(Err(broken_pipe("the write side is shut down")));
            }
            if s.dead {
                return Some(Err(broken_pipe("the connection is closed")));
            }
            if data.is_empty() {
                return Some(Ok(Vec::new()));
            }
            if !s.connected || s.in_flight >= *cap || g.c.tx_free.is_empty() {
                return None;
            }
            let mut plan = Vec::new();
            let mut at = 0;
            while at < data.len() && s.in_flight < *cap {
                let Some(i) = g.c.tx_free.get() else {
                    break;
                };
                let n = (data.len() - at).min(CHUNK);
                s.in_flight += n;
                tx_owner.insert(i, (socket, s.key, n));
                plan.push((i, at, n));
                at += n;
            }
            Some(Ok(plan))
        })?;
        let Some(plan) = got else {
            return Err(unfinished(
                how,
                "the connection's send buffers are full",
                "no room to send within the write timeout",
            ));
        };
        // The buffers are ours alone until their descriptors are on the ring: fill them
        // unlocked.
        let pool = &self.engine.link.tx_pool;
        let filled = plan
            .iter()
            .try_for_each(|&(i, at, n)| pool.write(i, APP_HEADROOM, &data[at..at + n]));
        let mut g = self.engine.lock();
        if let Err(e) = filled {
            for &(i, _, _) in &plan {
                Tcp::on_tx_back(&mut g.t, i);
                g.c.tx_free.put(i);
            }
            return Err(io::Error::other(format!(
                "keepnet: send buffer unusable: {e}"
            )));
        }
        let reqs = plan.iter().map(|&(i, _, n)| AppRequest {
            op: op::SEND,
            id: 0,
            socket,
            desc: pool.descriptor(i, n as u32),
            ..AppRequest::default()
        });
        self.engine.submit(&mut g.c, reqs)?;
        Ok(plan.iter().map(|&(_, _, n)| n).sum())
    }

    /// Shuts `socket` down in the directions `how` ([`shut`]).
    pub(crate) fn shutdown(&self, socket: u32, how: u32) -> io::Result<()> {
        self.with_entry(socket, |_| ())?;
        let reply = self.engine.request(
            AppRequest {
                op: op::SHUTDOWN,
                socket,
                _reserved: how,
                ..AppRequest::default()
            },
            "shutdown",
            None,
        )?;
        if let Some(e) = Status::from_code(reply.status).to_io_error() {
            return Err(context(e, "shutdown"));
        }
        self.engine.with(|g| {
            if let Some(s) = g.t.socks.get_mut(&socket) {
                s.wr_shut |= how & shut::WRITE != 0;
                if how & shut::READ != 0 {
                    // What was received and not read is dropped, as what comes later is.
                    s.rd_shut = true;
                    g.c.rx_backlog.extend(s.rx.drain(..).map(|r| r.index));
                }
            }
            self.engine.flush_rx_return(&mut g.c)
        })?
    }

    /// Sets option `opt` ([`keepnet_server::app::sockopt`]) of `socket`.
    pub(crate) fn setopt(&self, socket: u32, opt: u32, on: bool) -> io::Result<()> {
        self.with_entry(socket, |_| ())?;
        let reply = self.engine.request(
            AppRequest {
                op: op::SETOPT,
                socket,
                addr: u32::from(on),
                _reserved: opt,
                ..AppRequest::default()
            },
            "setopt",
            None,
        )?;
        match Status::from_code(reply.status).to_io_error() {
            Some(e) => Err(context(e, "setting a socket option")),
            None => Ok(()),
        }
    }

    /// Forgets `socket` and sends `op` (CLOSE or ABORT) for it, no reply awaited.
    pub(crate) fn release(&self, socket: u32, op: u32) {
        self.engine.release(socket, plain_request(op, socket));
    }

    /// The key of `socket`'s entry (for a registration), after a pump.
    pub(crate) fn key(&self, socket: u32) -> io::Result<u64> {
        self.with_entry(socket, |s| s.key)
    }

    /// What `socket` is ready for, if it is still the socket of `key`.
    pub(crate) fn ready(g: &Inner<Tcp>, socket: u32, key: u64) -> Option<Ready> {
        let s = g.t.socks.get(&socket).filter(|s| s.key == key)?;
        let error = s.error.is_some();
        Some(if s.listener {
            Ready {
                readable: !s.accept_q.is_empty() || error,
                writable: false,
                error,
                hup: false,
                dead: false,
            }
        } else {
            let room = s.in_flight < g.t.cap && !g.c.tx_free.is_empty();
            Ready {
                readable: !s.rx.is_empty() || s.eof || s.dead || s.rd_shut || error,
                writable: error || (s.connected && !s.dead && !s.wr_shut && room),
                error,
                hup: s.eof || s.dead,
                dead: s.dead,
            }
        })
    }

    /// Runs `check` under the engine's lock until it answers or `wait` passes (for the
    /// poller).
    pub(crate) fn wait_ready<T>(
        &self,
        wait: Wait,
        check: impl FnMut(&mut Inner<Tcp>) -> Option<io::Result<T>>,
    ) -> io::Result<Option<T>> {
        self.engine.wait_until(|_| wait, true, check)
    }
}
