//! A small stand-in for the udp server, playing its side of an application region in a
//! thread: it answers BIND (ports, AddrInUse, AddrNotAvailable, configured failures),
//! CONNECT and CLOSE, takes and records SENDs and hands their buffers back (or holds them on
//! request), and lets a test deliver datagrams and errors. Every wait it offers is bounded
//! (the thread and the waits: [`harness`]).

#![allow(dead_code)]

pub mod harness;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddrV4;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use keepnet_ipc::{FreeList, Retakes};
use keepnet_server::app::{
    app_endpoint, event, op, AppEvent, AppLink, AppRequest, AppServerEnds, Status,
};
use keepnet_server::wiring::UDP;
use keepnet_sockets::Stack;

use harness::{Harness, Serve, APP};
pub use harness::{BOUND, KN};

/// A datagram the app sent.
#[derive(Clone, Debug)]
pub struct Sent {
    pub req: AppRequest,
    pub payload: Vec<u8>,
}

/// What the peer saw and how it behaves.
pub struct State {
    ends: AppServerEnds,
    rx_free: FreeList,
    /// Ports whose BIND fails with a status.
    pub bind_fails: HashMap<u16, Status>,
    /// Ports whose BIND gets no answer (kept in `unanswered`).
    pub silent_ports: HashSet<u16>,
    pub unanswered: Vec<AppRequest>,
    /// Keep SEND buffers instead of handing them back.
    pub hold_tx: bool,
    held: Vec<u32>,
    /// Every request, in order.
    pub requests: Vec<AppRequest>,
    pub sends: Vec<Sent>,
    pub closes: Vec<u32>,
    /// RX buffers the app handed back.
    pub rx_returned: usize,
    /// Live sockets and their ports.
    bound: HashMap<u32, u16>,
    next_socket: u32,
    next_port: u16,
}

/// The stand-in udp server.
pub type Peer = Harness<State>;

/// A stack on a fresh region (`tx` and `rx` buffers) and the peer serving it.
pub fn rig(tx: u32, rx: u32) -> (Arc<Stack>, Peer) {
    let (link, efd, peer_efd) = harness::region(17, UDP, tx, rx);
    let stack = Stack::from_parts(link.clone(), efd, KN).unwrap();
    (stack, serve(link, peer_efd))
}

/// Like [`rig`], with a control connection: the returned end plays the supervisor's (write
/// `keepnet_server::app::AppNotice` lines on it, or drop it for an EOF).
pub fn rig_with_control(tx: u32, rx: u32) -> (Arc<Stack>, Peer, UnixStream) {
    let (link, efd, peer_efd) = harness::region(17, UDP, tx, rx);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stack = Stack::from_parts_with_control(link.clone(), efd, KN, ours).unwrap();
    (stack, serve(link, peer_efd), theirs)
}

/// The peer serving the server's side of `link`, parked on `peer_efd` (the server's eventfd).
fn serve(link: AppLink, peer_efd: OwnedFd) -> Peer {
    let ends = link.server_ends().unwrap();
    let mut rx_free = FreeList::new(&link.rx_pool, UDP);
    for i in 0..link.rx_pool.count() {
        rx_free.put(i);
    }
    let state = State {
        ends,
        rx_free,
        bind_fails: HashMap::new(),
        silent_ports: HashSet::new(),
        unanswered: Vec::new(),
        hold_tx: false,
        held: Vec::new(),
        requests: Vec::new(),
        sends: Vec::new(),
        closes: Vec::new(),
        rx_returned: 0,
        bound: HashMap::new(),
        next_socket: 100,
        next_port: 49152,
    };
    Harness::start(link, peer_efd, state)
}

impl Serve for State {
    fn serve(&mut self, link: &AppLink) -> bool {
        let pushed = self.serve_requests(link);
        self.collect_rx(link);
        pushed
    }

    fn refresh(&mut self, link: &AppLink) -> bool {
        self.collect_rx(link);
        false
    }
}

impl Harness<State> {
    /// Delivers a datagram to `socket` from `from`.
    pub fn deliver(&self, socket: u32, from: SocketAddrV4, payload: &[u8]) {
        let pool = &self.link.rx_pool;
        self.with(|st| {
            let i = st.rx_free.get().expect("the peer ran out of RX buffers");
            pool.write(i, pool.headroom(), payload).unwrap();
            st.ends
                .events
                .push(AppEvent {
                    kind: event::DATAGRAM,
                    socket,
                    addr: u32::from(*from.ip()),
                    port: from.port(),
                    desc: pool.descriptor(i, payload.len() as u32),
                    ..AppEvent::default()
                })
                .unwrap();
        });
    }

    /// Pushes any event (a forged one too) and rings the app.
    pub fn event(&self, ev: AppEvent) {
        self.with(|st| st.ends.events.push(ev).unwrap());
    }

    /// An asynchronous error on `socket`.
    pub fn error(&self, socket: u32, status: Status) {
        self.event(AppEvent {
            kind: event::ERROR,
            socket,
            status: status.code(),
            ..AppEvent::default()
        });
    }

    /// Answers the BINDs it kept silent on, successfully.
    pub fn answer_unanswered(&self) -> Vec<u32> {
        self.with(|st| {
            let reqs = std::mem::take(&mut st.unanswered);
            let mut sockets = Vec::new();
            for r in reqs {
                let ev = st.bind(&r);
                sockets.push(ev.socket);
                st.ends.events.push(ev).unwrap();
            }
            sockets
        })
    }

    /// Hands back the SEND buffers it held.
    pub fn release_held(&self) {
        self.with(|st| {
            st.hold_tx = false;
            let held = std::mem::take(&mut st.held);
            for i in held {
                let d = self.link.tx_pool.descriptor(i, 0);
                st.ends.tx_return.push(d).unwrap();
            }
        });
    }
}

impl State {
    fn collect_rx(&mut self, link: &AppLink) {
        let n = self
            .rx_free
            .collect(
                &link.rx_pool,
                &mut self.ends.rx_return,
                app_endpoint(APP),
                usize::MAX,
            )
            .unwrap();
        self.rx_returned += n;
    }

    fn bind(&mut self, r: &AppRequest) -> AppEvent {
        let reply = |status: Status, socket: u32, addr: u32, port: u16| AppEvent {
            kind: event::REPLY,
            id: r.id,
            socket,
            status: status.code(),
            addr,
            port,
            ..AppEvent::default()
        };
        if let Some(&s) = self.bind_fails.get(&r.port) {
            return reply(s, 0, 0, 0);
        }
        if r.addr != 0 && r.addr != u32::from(KN) {
            return reply(Status::AddrNotAvailable, 0, 0, 0);
        }
        if r.port != 0 && self.bound.values().any(|&p| p == r.port) {
            return reply(Status::AddrInUse, 0, 0, 0);
        }
        let port = if r.port == 0 {
            self.next_port += 1;
            self.next_port
        } else {
            r.port
        };
        self.next_socket += 1;
        self.bound.insert(self.next_socket, port);
        reply(Status::Ok, self.next_socket, r.addr, port)
    }

    /// Serves every waiting request; true if it pushed anything for the app.
    fn serve_requests(&mut self, link: &AppLink) -> bool {
        let mut buf = [AppRequest::default(); 16];
        let mut pushed = false;
        loop {
            self.ends.requests.rewind();
            let n = self.ends.requests.read(&mut buf).unwrap();
            if n == 0 {
                return pushed;
            }
            for r in &buf[..n] {
                self.requests.push(*r);
                match r.op {
                    op::BIND if self.silent_ports.contains(&r.port) => {
                        self.unanswered.push(*r);
                    }
                    op::BIND => {
                        let ev = self.bind(r);
                        self.ends.events.push(ev).unwrap();
                        pushed = true;
                    }
                    op::CONNECT => {
                        let ev = AppEvent {
                            kind: event::REPLY,
                            id: r.id,
                            socket: r.socket,
                            ..AppEvent::default()
                        };
                        self.ends.events.push(ev).unwrap();
                        pushed = true;
                    }
                    op::SEND => {
                        // Take the buffer before committing the slot that carried it.
                        let b = link
                            .tx_pool
                            .take(&r.desc, app_endpoint(APP), UDP, &mut Retakes::none())
                            .expect("a SEND with a bad descriptor");
                        let mut payload = vec![0u8; b.len() as usize];
                        link.tx_pool.read(&b, &mut payload);
                        self.sends.push(Sent { req: *r, payload });
                        if self.hold_tx {
                            self.held.push(b.index());
                        } else {
                            let d = link.tx_pool.descriptor(b.index(), 0);
                            self.ends.tx_return.push(d).unwrap();
                            pushed = true;
                        }
                    }
                    op::CLOSE => {
                        self.bound.remove(&r.socket);
                        self.closes.push(r.socket);
                    }
                    _ => {}
                }
            }
            self.ends.requests.commit(n).unwrap();
        }
    }
}
