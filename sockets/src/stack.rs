//! [`Stack`]: the one attachment a process has to a keepnet instance's udp server, shared by
//! every [`crate::UdpSocket`]: the [`Engine`] (rings, pumping, parking) with UDP's socket
//! table of datagram queues.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use keepnet_ipc::BufRef;
use keepnet_server::app::{event, op, AppEvent, AppRequest, Status, MAX_UDP_PAYLOAD};
use tracing::debug;

pub use crate::engine::DEFAULT_INSTANCE;
use crate::engine::{
    attachment, bad_socket, plain_request, unfinished, Common, Engine, Inner, Protocol, Wait,
};

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

/// UDP on the engine: sockets with datagram queues.
pub(crate) struct Udp;

type Sockets = HashMap<u32, SocketEntry>;

impl Protocol for Udp {
    const NUMBER: u8 = crate::attach::PROTOCOL_UDP;
    const SERVER: &'static str = "udp";
    const RX_EVENT: u32 = event::DATAGRAM;
    type Table = Sockets;

    fn table() -> Sockets {
        HashMap::new()
    }

    fn on_event(e: &Engine<Udp>, c: &mut Common, t: &mut Sockets, ev: &AppEvent) -> bool {
        match ev.kind {
            event::DATAGRAM => {
                let Some(buf) = e.take_rx(c, ev) else {
                    return false;
                };
                match t.get_mut(&ev.socket) {
                    Some(s) => {
                        s.rx.push_back(Datagram {
                            from: SocketAddrV4::new(Ipv4Addr::from(ev.addr), ev.port),
                            buf,
                        });
                        true
                    }
                    None => {
                        // A socket closed meanwhile: the buffer goes straight back.
                        c.rx_backlog.push_back(buf.index());
                        false
                    }
                }
            }
            event::ERROR => match t.get_mut(&ev.socket) {
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

    fn on_created(_: &Engine<Udp>, c: &mut Common, t: &mut Sockets, op: u32, ev: &AppEvent) {
        if op == op::BIND {
            if let Some(old) = t.insert(ev.socket, SocketEntry::default()) {
                c.rx_backlog.extend(old.rx.iter().map(|d| d.buf.index()));
            }
        }
    }

    fn undo(op: u32, socket: u32) -> Option<AppRequest> {
        (op == op::BIND).then(|| plain_request(op::CLOSE, socket))
    }

    fn forget(c: &mut Common, t: &mut Sockets, socket: u32) {
        if let Some(s) = t.remove(&socket) {
            c.rx_backlog.extend(s.rx.iter().map(|d| d.buf.index()));
        }
    }
}

attachment!(
    /// One process's attachment to a keepnet instance's udp server, shared (through `Arc`) by
    /// all its UDP sockets.
    ///
    /// Sockets made with [`crate::UdpSocket::bind`] attach lazily to the instance named by
    /// `KEEPNET_INSTANCE` (default `default`) the first time any of them is made, and keep
    /// that one attachment for the life of the process. Use [`Stack::attach`] and
    /// [`crate::UdpSocket::bind_with`] to pick an instance explicitly.
    Stack,
    Udp
);

impl Stack {
    /// Sends `req` and waits for its reply (at most the reply timeout).
    pub(crate) fn request(&self, req: AppRequest, what: &str) -> io::Result<AppEvent> {
        self.engine.request(req, what, None)
    }

    /// Runs `f` on socket `socket`'s entry after a pump.
    pub(crate) fn with_socket<R>(
        &self,
        socket: u32,
        f: impl FnOnce(&mut SocketEntry) -> R,
    ) -> io::Result<R> {
        self.engine
            .with(|g| g.t.get_mut(&socket).map(f))?
            .ok_or_else(bad_socket)
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
        let wait = |g: &Inner<Udp>| {
            how = socket_wait(&g.t, socket, |s| s.write_timeout);
            Wait::new(how.0, how.1)
        };
        let got = self.engine.wait_until(wait, true, |g| {
            let s = match g.t.get_mut(&socket) {
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
            g.c.tx_free.get().map(|i| Ok((i, addr, port)))
        })?;
        let Some((index, addr, port)) = got else {
            return Err(unfinished(
                how,
                "every send buffer is in flight",
                "no send buffer came free within the write timeout",
            ));
        };
        // The buffer is ours alone until its descriptor is on the ring: fill it unlocked.
        let pool = &self.engine.link.tx_pool;
        let len = payload.len() as u32; // <= MAX_UDP_PAYLOAD
        if let Err(e) = pool.write(index, pool.headroom(), payload) {
            self.engine.lock().c.tx_free.put(index);
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
        self.engine.submit(&mut self.engine.lock().c, [req])?;
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
        let wait = |g: &Inner<Udp>| {
            how = socket_wait(&g.t, socket, |s| s.read_timeout);
            Wait::new(how.0, how.1)
        };
        let got = self.engine.wait_until(wait, false, |g| {
            let s = match g.t.get_mut(&socket) {
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
            let n = self.engine.link.rx_pool.read(&d.buf, out);
            if !peek {
                g.c.rx_backlog.push_back(d.buf.index());
                if let Err(e) = self.engine.flush_rx_return(&mut g.c) {
                    return Some(Err(e));
                }
            }
            Some(Ok((n, d.from)))
        })?;
        got.ok_or_else(|| {
            unfinished(
                how,
                "no datagram is waiting",
                "no datagram arrived within the read timeout",
            )
        })
    }

    /// Forgets `socket` and asks the server to close it (no reply awaited).
    pub(crate) fn close(&self, socket: u32) {
        self.engine
            .release(socket, plain_request(op::CLOSE, socket));
    }
}

/// (non-blocking, the timeout `which` picks) of `socket`.
fn socket_wait(
    t: &Sockets,
    socket: u32,
    which: impl FnOnce(&SocketEntry) -> Option<Duration>,
) -> (bool, Option<Duration>) {
    t.get(&socket)
        .map_or((true, None), |s| (s.nonblocking, which(s)))
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
