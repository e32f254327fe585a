//! A small stand-in for the tcp server, playing its side of an application region in a
//! thread, with a toy model of the network behind it:
//!
//! * LISTEN makes a listener (AddrInUse, AddrNotAvailable and configured failures too);
//! * CONNECT to keepnet's own address and a listening port makes a loopback pair: the client
//!   handle is the reply's, the server handle arrives as ACCEPTED on the listener, and what
//!   one side sends the other receives;
//! * CONNECT to any other address reaches a far end that behaves per port ([`Far`]): echo,
//!   sink, refuse or never answer;
//! * a test can also make a connection arrive from outside ([`Peer::incoming`]), send on it,
//!   end it with EOF or an error, and hold the TX buffers of a connection.
//!
//! Data goes to the application in RX buffers of at most 64 KiB, at most [`RCVBUF`] bytes per
//! connection delivered and not handed back: the flow control of the real server. Every wait
//! it offers is bounded (the thread and the waits: [`harness`]).

#![allow(dead_code)]

#[path = "../peer/harness.rs"]
pub mod harness;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use keepnet_ipc::{Descriptor, FreeList, Retakes};
use keepnet_server::app::{
    app_endpoint, event, op, shut, AppEvent, AppLink, AppRequest, AppServerEnds, Status, APP_BUF,
    APP_HEADROOM,
};
use keepnet_server::wiring::TCP;
use keepnet_sockets::TcpStack;

use harness::{Harness, Serve};
pub use harness::{APP, BOUND, KN};

/// The other side of the lab.
pub const LINUX: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Bytes per connection delivered to the app and not yet handed back, at most.
pub const RCVBUF: usize = 256 * 1024;
const CHUNK: usize = (APP_BUF - APP_HEADROOM) as usize;

/// How the far end of a connection to [`LINUX`] behaves (by port, [`State::far`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Far {
    /// Sends back what it receives; after the app's FIN, its own.
    Echo,
    /// Keeps what it receives (`Conn::got`).
    Sink,
    /// Answers the SYN with a reset: ERROR ConnectionRefused.
    Refuse,
    /// Never answers.
    Silent,
    /// The other end of a loopback pair (its handle).
    Loop(u32),
}

/// One connection as the peer sees it.
#[derive(Debug)]
pub struct Conn {
    pub far: Far,
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// What the app sent on it (Sink and loopback sides).
    pub got: Vec<u8>,
    /// Bytes the app sent on it.
    pub sent: usize,
    /// Bytes waiting to go to the app.
    pending: VecDeque<u8>,
    /// Delivered and not handed back.
    pub outstanding: usize,
    /// EOF to deliver once `pending` is empty.
    eof_due: bool,
    pub eof_sent: bool,
    /// An error to deliver once `pending` is empty.
    error_due: Option<Status>,
    /// The app shut its write side or closed: no more SENDs should come.
    pub app_fin: bool,
    /// The app closed (CLOSE) or aborted (ABORT) it.
    pub app_closed: bool,
    pub rd_shut: bool,
    /// Keep SEND buffers instead of handing them back.
    pub hold_tx: bool,
    held: Vec<u32>,
}

impl Conn {
    fn new(far: Far, local: SocketAddrV4, remote: SocketAddrV4) -> Conn {
        Conn {
            far,
            local,
            remote,
            got: Vec::new(),
            sent: 0,
            pending: VecDeque::new(),
            outstanding: 0,
            eof_due: false,
            eof_sent: false,
            error_due: None,
            app_fin: false,
            app_closed: false,
            rd_shut: false,
            hold_tx: false,
            held: Vec::new(),
        }
    }
}

/// What the peer saw and how it behaves.
pub struct State {
    ends: AppServerEnds,
    rx_free: FreeList,
    /// RX buffer index -> (connection, bytes) while the app holds it.
    rx_owner: HashMap<u32, (u32, usize)>,
    /// Events the ring had no room for yet.
    events: VecDeque<AppEvent>,
    /// Far-end behaviour by port (default Echo).
    pub far: HashMap<u16, Far>,
    /// CONNECT to these ports fails at once with a status.
    pub connect_fails: HashMap<u16, Status>,
    /// Request ops left unanswered (kept in `unanswered`).
    pub silent_ops: HashSet<u32>,
    pub unanswered: Vec<AppRequest>,
    /// Listening ports -> listener handle.
    pub listeners: HashMap<u16, u32>,
    pub conns: HashMap<u32, Conn>,
    /// Every request but SEND, in order.
    pub requests: Vec<AppRequest>,
    pub sends: usize,
    /// SENDs with a descriptor the TX pool refused, or for no connection.
    pub bad_sends: usize,
    pub rx_returned: usize,
    next_handle: u32,
    next_port: u16,
}

/// The stand-in tcp server.
pub type Peer = Harness<State>;

/// A stack on a fresh region (`tx` and `rx` buffers) and the peer serving it.
pub fn rig(tx: u32, rx: u32) -> (Arc<TcpStack>, Peer) {
    let (link, efd, peer_efd) = harness::region(6, TCP, tx, rx);
    let stack = TcpStack::from_parts(link.clone(), efd, KN).unwrap();
    (stack, serve(link, peer_efd))
}

/// Like [`rig`], with a control connection: the returned end plays the supervisor's (write
/// `keepnet_server::app::AppNotice` lines on it, or drop it for an EOF).
pub fn rig_with_control(tx: u32, rx: u32) -> (Arc<TcpStack>, Peer, UnixStream) {
    let (link, efd, peer_efd) = harness::region(6, TCP, tx, rx);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stack = TcpStack::from_parts_with_control(link.clone(), efd, KN, ours).unwrap();
    (stack, serve(link, peer_efd), theirs)
}

/// The peer serving the server's side of `link`, parked on `efd` (the server's eventfd).
pub fn serve(link: AppLink, efd: OwnedFd) -> Peer {
    let ends = link.server_ends().unwrap();
    let mut rx_free = FreeList::new(&link.rx_pool, TCP);
    for i in 0..link.rx_pool.count() {
        rx_free.put(i);
    }
    let state = State {
        ends,
        rx_free,
        rx_owner: HashMap::new(),
        events: VecDeque::new(),
        far: HashMap::new(),
        connect_fails: HashMap::new(),
        silent_ops: HashSet::new(),
        unanswered: Vec::new(),
        listeners: HashMap::new(),
        conns: HashMap::new(),
        requests: Vec::new(),
        sends: 0,
        bad_sends: 0,
        rx_returned: 0,
        next_handle: 1000,
        next_port: 50000,
    };
    Harness::start(link, efd, state)
}

impl Serve for State {
    fn serve(&mut self, link: &AppLink) -> bool {
        self.serve_requests(link);
        self.progress(link)
    }

    fn refresh(&mut self, link: &AppLink) -> bool {
        self.progress(link)
    }
}

impl Harness<State> {
    /// A connection from `from` arrives on the listener of `port`: its handle.
    pub fn incoming(&self, port: u16, from: SocketAddrV4, far: Far) -> u32 {
        self.with(|st| {
            let l = *st.listeners.get(&port).expect("no listener on that port");
            let h = st.handle();
            st.conns
                .insert(h, Conn::new(far, SocketAddrV4::new(KN, port), from));
            st.events.push_back(AppEvent {
                kind: event::ACCEPTED,
                id: h,
                socket: l,
                addr: u32::from(*from.ip()),
                port: from.port(),
                ..AppEvent::default()
            });
            h
        })
    }

    /// The far end of `conn` sends `data`.
    pub fn send(&self, conn: u32, data: &[u8]) {
        self.with(|st| st.conn(conn).pending.extend(data));
    }

    /// The far end of `conn` sends its FIN (after what it sent before).
    pub fn eof(&self, conn: u32) {
        self.with(|st| st.conn(conn).eof_due = true);
    }

    /// `conn` dies with `status` (after what was sent before).
    pub fn fail(&self, conn: u32, status: Status) {
        self.with(|st| st.conn(conn).error_due = Some(status));
    }

    /// Pushes any event (a forged one too) and rings the app.
    pub fn event(&self, ev: AppEvent) {
        self.with(|st| st.events.push_back(ev));
    }

    /// Hands back the SEND buffers held for `conn` and stops holding them.
    pub fn release_held(&self, conn: u32) {
        self.with(|st| {
            let c = st.conn(conn);
            c.hold_tx = false;
            let held = std::mem::take(&mut c.held);
            for i in held {
                let d = self.link.tx_pool.descriptor(i, 0);
                st.ends.tx_return.push(d).unwrap();
            }
        });
    }

    /// Answers the requests it kept silent on, successfully (CONNECT: the far end never
    /// answers the handshake): the handles it made.
    pub fn answer_unanswered(&self) -> Vec<u32> {
        self.with(|st| {
            st.silent_ops.clear();
            let reqs = std::mem::take(&mut st.unanswered);
            reqs.iter().map(|r| st.answer(r)).collect()
        })
    }

    /// The connection the app's most recent request of `op` named.
    pub fn last(&self, op: u32) -> AppRequest {
        self.with(|st| *st.requests.iter().rfind(|r| r.op == op).unwrap())
    }
}

impl State {
    fn handle(&mut self) -> u32 {
        self.next_handle += 1;
        self.next_handle
    }

    /// `conn`'s entry (it must exist).
    pub fn conn(&mut self, conn: u32) -> &mut Conn {
        self.conns.get_mut(&conn).expect("no such connection")
    }

    /// The far ends' sockets of loopback pairs and incoming connections, by remote address.
    pub fn by_remote(&self, remote: SocketAddrV4) -> Option<u32> {
        self.conns
            .iter()
            .find(|(_, c)| c.remote == remote)
            .map(|(&h, _)| h)
    }

    fn reply(&mut self, r: &AppRequest, status: Status, socket: u32, addr: SocketAddrV4) {
        if r.id != 0 {
            self.events.push_back(AppEvent {
                kind: event::REPLY,
                id: r.id,
                socket,
                status: status.code(),
                addr: u32::from(*addr.ip()),
                port: addr.port(),
                ..AppEvent::default()
            });
        }
    }

    fn ev(&mut self, kind: u32, socket: u32, status: Status) {
        self.events.push_back(AppEvent {
            kind,
            socket,
            status: status.code(),
            ..AppEvent::default()
        });
    }

    /// Answers LISTEN or CONNECT `r`; the handle it made (0 if none).
    fn answer(&mut self, r: &AppRequest) -> u32 {
        let zero = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
        let to = SocketAddrV4::new(Ipv4Addr::from(r.addr), r.port);
        match r.op {
            op::LISTEN => {
                if r.addr != 0 && r.addr != u32::from(KN) {
                    self.reply(r, Status::AddrNotAvailable, 0, zero);
                    return 0;
                }
                if r.port != 0 && self.listeners.contains_key(&r.port) {
                    self.reply(r, Status::AddrInUse, 0, zero);
                    return 0;
                }
                let port = if r.port == 0 {
                    self.next_port += 1;
                    self.next_port
                } else {
                    r.port
                };
                let h = self.handle();
                self.listeners.insert(port, h);
                self.reply(
                    r,
                    Status::Ok,
                    h,
                    SocketAddrV4::new(Ipv4Addr::from(r.addr), port),
                );
                h
            }
            op::CONNECT => {
                if let Some(&st) = self.connect_fails.get(&r.port) {
                    self.reply(r, st, 0, zero);
                    return 0;
                }
                self.next_port += 1;
                let local = SocketAddrV4::new(KN, self.next_port);
                let h = self.handle();
                let lo = to.ip() == &KN || to.ip().is_unspecified();
                if lo {
                    let Some(&l) = self.listeners.get(&to.port()) else {
                        self.conns.insert(h, Conn::new(Far::Refuse, local, to));
                        self.reply(r, Status::Ok, h, local);
                        self.ev(event::ERROR, h, Status::ConnectionRefused);
                        return h;
                    };
                    let s = self.handle();
                    self.conns.insert(h, Conn::new(Far::Loop(s), local, to));
                    self.conns.insert(
                        s,
                        Conn::new(Far::Loop(h), SocketAddrV4::new(KN, to.port()), local),
                    );
                    self.reply(r, Status::Ok, h, local);
                    self.events.push_back(AppEvent {
                        kind: event::ACCEPTED,
                        id: s,
                        socket: l,
                        addr: u32::from(*local.ip()),
                        port: local.port(),
                        ..AppEvent::default()
                    });
                    self.ev(event::CONNECTED, h, Status::Ok);
                    return h;
                }
                let far = self.far.get(&r.port).copied().unwrap_or(Far::Echo);
                self.conns.insert(h, Conn::new(far, local, to));
                self.reply(r, Status::Ok, h, local);
                match far {
                    Far::Refuse => self.ev(event::ERROR, h, Status::ConnectionRefused),
                    Far::Silent => {}
                    _ => self.ev(event::CONNECTED, h, Status::Ok),
                }
                h
            }
            _ => 0,
        }
    }

    /// The app is done with `h` (CLOSE / ABORT / SHUTDOWN WRITE): tell its other end.
    fn app_fin(&mut self, h: u32, reset: bool) {
        let Some(c) = self.conns.get_mut(&h) else {
            return;
        };
        c.app_fin = true;
        match c.far {
            Far::Loop(o) => {
                if let Some(other) = self.conns.get_mut(&o) {
                    if reset {
                        other.error_due = Some(Status::ConnectionReset);
                    } else {
                        other.eof_due = true;
                    }
                }
            }
            Far::Echo if !reset => c.eof_due = true,
            _ => {}
        }
    }

    /// Serves every waiting request.
    fn serve_requests(&mut self, link: &AppLink) {
        let mut buf = [AppRequest::default(); 32];
        loop {
            self.ends.requests.rewind();
            let n = self.ends.requests.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            for r in &buf[..n] {
                if r.op == op::SEND {
                    self.on_send(r, link);
                    continue;
                }
                self.requests.push(*r);
                if self.silent_ops.contains(&r.op) {
                    self.unanswered.push(*r);
                    continue;
                }
                let known = self.conns.contains_key(&r.socket)
                    || self.listeners.values().any(|&l| l == r.socket);
                let zero = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
                match r.op {
                    op::LISTEN | op::CONNECT => {
                        self.answer(r);
                    }
                    op::CLOSE | op::ABORT => {
                        self.listeners.retain(|_, l| *l != r.socket);
                        self.app_fin(r.socket, r.op == op::ABORT);
                        if let Some(c) = self.conns.get_mut(&r.socket) {
                            c.app_closed = true;
                        }
                        let st = if known { Status::Ok } else { Status::BadSocket };
                        self.reply(r, st, r.socket, zero);
                    }
                    op::SHUTDOWN => {
                        if r._reserved & shut::WRITE != 0 {
                            self.app_fin(r.socket, false);
                        }
                        if let Some(c) = self.conns.get_mut(&r.socket) {
                            c.rd_shut |= r._reserved & shut::READ != 0;
                        }
                        let st = if known { Status::Ok } else { Status::BadSocket };
                        self.reply(r, st, r.socket, zero);
                    }
                    op::SETOPT => {
                        let st = if known { Status::Ok } else { Status::BadSocket };
                        self.reply(r, st, r.socket, zero);
                    }
                    _ => self.reply(r, Status::Unsupported, 0, zero),
                }
            }
            self.ends.requests.commit(n).unwrap();
        }
    }

    fn on_send(&mut self, r: &AppRequest, link: &AppLink) {
        // Take the buffer before committing the slot that carried it.
        let Ok(b) = link
            .tx_pool
            .take(&r.desc, app_endpoint(APP), TCP, &mut Retakes::none())
        else {
            self.bad_sends += 1;
            return;
        };
        self.sends += 1;
        let mut payload = vec![0u8; b.len() as usize];
        link.tx_pool.read(&b, &mut payload);
        let back = link.tx_pool.descriptor(b.index(), 0);
        let Some(c) = self.conns.get_mut(&r.socket) else {
            self.bad_sends += 1;
            self.ends.tx_return.push(back).unwrap();
            return;
        };
        c.sent += payload.len();
        let far = c.far;
        if c.hold_tx {
            c.held.push(b.index());
        } else {
            self.ends.tx_return.push(back).unwrap();
        }
        match far {
            Far::Echo => self.conn(r.socket).pending.extend(&payload),
            Far::Loop(o) => {
                self.conn(r.socket).got.extend_from_slice(&payload);
                if let Some(other) = self.conns.get_mut(&o) {
                    if !other.rd_shut && !other.app_closed {
                        other.pending.extend(&payload);
                    }
                }
            }
            _ => self.conn(r.socket).got.extend_from_slice(&payload),
        }
    }

    /// Collects returned RX buffers, delivers what waits and pushes queued events; true if
    /// it pushed anything for the app.
    fn progress(&mut self, link: &AppLink) -> bool {
        self.collect_rx(link);
        let mut handles: Vec<u32> = self.conns.keys().copied().collect();
        handles.sort_unstable();
        for h in handles {
            self.deliver(h, link);
        }
        let mut pushed = false;
        while let Some(&ev) = self.events.front() {
            if self.ends.events.push(ev).is_err() {
                break;
            }
            self.events.pop_front();
            pushed = true;
        }
        pushed
    }

    fn collect_rx(&mut self, link: &AppLink) {
        let mut buf = [Descriptor::default(); 64];
        loop {
            self.ends.rx_return.rewind();
            let n = self.ends.rx_return.read(&mut buf).unwrap();
            if n == 0 {
                return;
            }
            for d in &buf[..n] {
                let r = link
                    .rx_pool
                    .take(d, app_endpoint(APP), TCP, &mut Retakes::none())
                    .expect("the app handed back a bad RX descriptor");
                if let Some((h, len)) = self.rx_owner.remove(&r.index()) {
                    if let Some(c) = self.conns.get_mut(&h) {
                        c.outstanding -= len;
                    }
                }
                assert!(self.rx_free.put(r.index()), "RX buffer returned twice");
                self.rx_returned += 1;
            }
            self.ends.rx_return.commit(n).unwrap();
        }
    }

    /// Moves what waits for the app on `h` into RX buffers, then EOF or the error.
    fn deliver(&mut self, h: u32, link: &AppLink) {
        let Some(c) = self.conns.get_mut(&h) else {
            return;
        };
        if c.app_closed {
            c.pending.clear();
            return;
        }
        while !c.pending.is_empty() && c.outstanding < RCVBUF {
            let Some(i) = self.rx_free.get() else {
                return;
            };
            let n = c.pending.len().min(CHUNK).min(RCVBUF - c.outstanding);
            let bytes: Vec<u8> = c.pending.drain(..n).collect();
            link.rx_pool.write(i, APP_HEADROOM, &bytes).unwrap();
            c.outstanding += n;
            self.rx_owner.insert(i, (h, n));
            self.events.push_back(AppEvent {
                kind: event::DATA,
                socket: h,
                desc: link.rx_pool.descriptor(i, n as u32),
                ..AppEvent::default()
            });
        }
        if !c.pending.is_empty() {
            return;
        }
        if c.eof_due && !c.eof_sent {
            c.eof_sent = true;
            self.events.push_back(AppEvent {
                kind: event::EOF,
                socket: h,
                ..AppEvent::default()
            });
        }
        if let Some(st) = c.error_due.take() {
            self.ev(event::ERROR, h, st);
        }
    }
}
