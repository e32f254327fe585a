//! [`UdpSocket`]: the shape of `std::net::UdpSocket`, over keepnet's udp server.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use keepnet_server::app::{op, AppRequest, Status};

use crate::addr::{each_addr, ipv6, no_addresses, resolve, zero_timeout};
use crate::stack::{not_connected, too_long, Stack};

/// A UDP socket on keepnet, with the methods of [`std::net::UdpSocket`].
///
/// Differences from the standard library, all deliberate:
/// * addresses are IPv4 only: an IPv6 address is refused with `InvalidInput`;
/// * a receive that outlives its read timeout fails with [`io::ErrorKind::TimedOut`] (std on
///   Linux reports `WouldBlock` for both a timeout and an empty non-blocking socket; here
///   `WouldBlock` means only the latter);
/// * a send that finds every send buffer in flight blocks until one comes back (or fails with
///   `WouldBlock` when non-blocking, `TimedOut` after the write timeout);
/// * `bind` and `connect` wait at most 5 s for the udp server, then fail with `TimedOut`;
/// * when the udp server is down for good (its supervisor gave up restarting it), every
///   send and receive, blocked or not, fails within a few tens of milliseconds with
///   `ConnectionAborted` saying so.
///
/// A socket asks the server to close it when its last handle ([`UdpSocket::try_clone`]) is
/// dropped; its port is free again once the server has done so.
#[derive(Clone)]
pub struct UdpSocket {
    inner: Arc<Handle>,
}

/// The server's socket, closed when the last [`UdpSocket`] naming it is dropped.
struct Handle {
    stack: Arc<Stack>,
    socket: u32,
    local: SocketAddrV4,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stack.close(self.socket);
    }
}

impl std::fmt::Debug for UdpSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSocket")
            .field("addr", &self.inner.local)
            .field("socket", &self.inner.socket)
            .finish()
    }
}

/// The destination of a `send_to`: the first IPv4 address `addr` resolves to.
fn destination<A: ToSocketAddrs>(addr: A) -> io::Result<SocketAddrV4> {
    let mut first_v6 = None;
    for a in addr.to_socket_addrs()? {
        match a {
            SocketAddr::V4(a) => return Ok(a),
            SocketAddr::V6(_) => {
                first_v6.get_or_insert(a);
            }
        }
    }
    Err(first_v6.map_or_else(no_addresses, ipv6))
}

impl UdpSocket {
    /// Creates a socket bound to `addr` on the keepnet instance named by `KEEPNET_INSTANCE`
    /// (default `default`), attaching the process to it on first use ([`Stack`]).
    ///
    /// The address is `0.0.0.0` or keepnet's own address; port 0 picks an ephemeral port. As
    /// with std, each address `addr` resolves to is tried in turn.
    ///
    /// # Errors
    /// `AddrInUse`, `AddrNotAvailable` (not keepnet's address) and the like from the server;
    /// `InvalidInput` for an IPv6 address; `NotFound` when no keepnet instance runs;
    /// `TimedOut` when the udp server does not answer.
    pub fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<UdpSocket> {
        let addrs = resolve(addr)?;
        UdpSocket::bind_with(&Stack::default_instance()?, &addrs[..])
    }

    /// Like [`UdpSocket::bind`], on a given stack.
    pub fn bind_with<A: ToSocketAddrs>(stack: &Arc<Stack>, addr: A) -> io::Result<UdpSocket> {
        each_addr(addr, |a| {
            let reply = stack.request(
                AppRequest {
                    op: op::BIND,
                    addr: u32::from(*a.ip()),
                    port: a.port(),
                    ..AppRequest::default()
                },
                "bind",
            )?;
            if let Some(e) = Status::from_code(reply.status).to_io_error() {
                return Err(e);
            }
            Ok(UdpSocket {
                inner: Arc::new(Handle {
                    stack: Arc::clone(stack),
                    socket: reply.socket,
                    local: SocketAddrV4::new(Ipv4Addr::from(reply.addr), reply.port),
                }),
            })
        })
    }

    /// The stack this socket lives on.
    pub fn stack(&self) -> &Arc<Stack> {
        &self.inner.stack
    }

    /// Another handle to the same socket (sharing its queue, options and peer). The socket
    /// closes when the last handle is dropped.
    pub fn try_clone(&self) -> io::Result<UdpSocket> {
        Ok(self.clone())
    }

    /// The address the socket is bound to, as the server reported it.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(SocketAddr::V4(self.inner.local))
    }

    /// The connected peer. `NotConnected` if [`UdpSocket::connect`] has not succeeded.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.peer)?
            .map(SocketAddr::V4)
            .ok_or_else(not_connected)
    }

    /// Connects the socket to `addr`: [`UdpSocket::send`] goes there, and the server delivers
    /// datagrams from there only. Each address `addr` resolves to is tried in turn.
    /// `0.0.0.0:0` dissolves the association.
    pub fn connect<A: ToSocketAddrs>(&self, addr: A) -> io::Result<()> {
        let h = &self.inner;
        each_addr(addr, |a| {
            let reply = h.stack.request(
                AppRequest {
                    op: op::CONNECT,
                    socket: h.socket,
                    addr: u32::from(*a.ip()),
                    port: a.port(),
                    ..AppRequest::default()
                },
                "connect",
            )?;
            if let Some(e) = Status::from_code(reply.status).to_io_error() {
                return Err(e);
            }
            let peer = (!a.ip().is_unspecified() || a.port() != 0).then_some(a);
            h.stack.with_socket(h.socket, |s| s.peer = peer)
        })
    }

    /// Sends `buf` as one datagram to `addr` (its first IPv4 address); returns its length.
    ///
    /// # Errors
    /// `InvalidInput` for more than 65507 bytes or an IPv6 address; a pending asynchronous
    /// error (`ConnectionRefused`) once; `WouldBlock` / `TimedOut` when no send buffer is
    /// free (non-blocking / after the write timeout).
    pub fn send_to<A: ToSocketAddrs>(&self, buf: &[u8], addr: A) -> io::Result<usize> {
        if buf.len() > keepnet_server::app::MAX_UDP_PAYLOAD {
            return Err(too_long(buf.len()));
        }
        let dst = destination(addr)?;
        self.inner.stack.send(self.inner.socket, buf, Some(dst))
    }

    /// Sends `buf` to the connected peer (`NotConnected` if there is none). Errors as
    /// [`UdpSocket::send_to`].
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.inner.stack.send(self.inner.socket, buf, None)
    }

    /// Receives one datagram into `buf` and returns its length and source. A datagram longer
    /// than `buf` is truncated to it; the rest is discarded (as std does).
    ///
    /// # Errors
    /// A pending asynchronous error (`ConnectionRefused`) once; `WouldBlock` when
    /// non-blocking and nothing is waiting; `TimedOut` when the read timeout passes.
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.inner.stack.recv(self.inner.socket, buf, false)?;
        Ok((n, SocketAddr::V4(from)))
    }

    /// Receives one datagram into `buf` (see [`UdpSocket::recv_from`]), without its source.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .stack
            .recv(self.inner.socket, buf, false)
            .map(|(n, _)| n)
    }

    /// Like [`UdpSocket::recv_from`], but leaves the datagram in the queue.
    pub fn peek_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        let (n, from) = self.inner.stack.recv(self.inner.socket, buf, true)?;
        Ok((n, SocketAddr::V4(from)))
    }

    /// Like [`UdpSocket::recv`], but leaves the datagram in the queue.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner
            .stack
            .recv(self.inner.socket, buf, true)
            .map(|(n, _)| n)
    }

    /// Sets how long a receive blocks (None: for ever). A receive that times out fails with
    /// `TimedOut`. `Some(Duration::ZERO)` is refused with `InvalidInput`, as in std.
    pub fn set_read_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        if dur == Some(Duration::ZERO) {
            return Err(zero_timeout());
        }
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.read_timeout = dur)
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.read_timeout)
    }

    /// Sets how long a send blocks waiting for a free send buffer (None: for ever).
    /// `Some(Duration::ZERO)` is refused with `InvalidInput`, as in std.
    pub fn set_write_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        if dur == Some(Duration::ZERO) {
            return Err(zero_timeout());
        }
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.write_timeout = dur)
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.write_timeout)
    }

    /// Makes receives and sends fail with `WouldBlock` instead of blocking. `bind` and
    /// `connect` always wait for the server's answer.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner
            .stack
            .with_socket(self.inner.socket, |s| s.nonblocking = nonblocking)
    }

    /// Takes the pending asynchronous error (an ICMP port unreachable on a connected socket
    /// arrives as `ConnectionRefused`), clearing it.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        Ok(self
            .inner
            .stack
            .with_socket(self.inner.socket, |s| s.error.take())?
            .and_then(Status::to_io_error))
    }
}
