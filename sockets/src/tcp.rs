//! [`TcpListener`] and [`TcpStream`]: the shape of `std::net`'s, over keepnet's tcp server.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use keepnet_server::app::{op, shut, sockopt};

use crate::addr::{each_addr, resolve, v4, zero_timeout};
use crate::tcp_stack::TcpStack;

/// The server's socket, closed (gracefully) when the last handle naming it is dropped.
struct Handle {
    stack: Arc<TcpStack>,
    socket: u32,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stack.release(self.socket, op::CLOSE);
    }
}

impl Handle {
    fn new(stack: &Arc<TcpStack>, socket: u32) -> Arc<Handle> {
        Arc::new(Handle {
            stack: Arc::clone(stack),
            socket,
        })
    }

    fn local(&self) -> io::Result<SocketAddr> {
        self.stack
            .with_entry(self.socket, |s| SocketAddr::V4(s.local))
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.stack
            .with_entry(self.socket, |s| s.nonblocking = nonblocking)
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        Ok(self
            .stack
            .with_entry(self.socket, |s| s.error.take())?
            .and_then(|st| st.to_io_error()))
    }

    fn fmt(&self, f: &mut std::fmt::Formatter<'_>, name: &str) -> std::fmt::Result {
        let mut d = f.debug_struct(name);
        if let Ok((local, peer)) = self.stack.with_entry(self.socket, |s| (s.local, s.peer)) {
            d.field("addr", &local);
            if !peer.ip().is_unspecified() {
                d.field("peer", &peer);
            }
        }
        d.field("socket", &self.socket).finish()
    }
}

/// A TCP listening socket on keepnet, with the methods of [`std::net::TcpListener`].
///
/// Differences from the standard library, all deliberate: IPv4 only (an IPv6 address is
/// refused with `InvalidInput`); `bind` waits at most 5 s for the tcp server, then fails with
/// `TimedOut`. Dropping the last handle ([`TcpListener::try_clone`]) stops listening, and the
/// connections the server accepted that were never taken with [`TcpListener::accept`] are
/// reset.
#[derive(Clone)]
pub struct TcpListener {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for TcpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f, "TcpListener")
    }
}

impl TcpListener {
    /// Listens on `addr` on the keepnet instance named by `KEEPNET_INSTANCE` (default
    /// `default`), attaching the process to its tcp server on first use ([`TcpStack`]).
    ///
    /// The address is `0.0.0.0` or keepnet's own address; port 0 picks an ephemeral port. As
    /// with std, each address `addr` resolves to is tried in turn. The backlog is the
    /// server's default.
    ///
    /// # Errors
    /// `AddrInUse`, `AddrNotAvailable` (not keepnet's address) and the like from the server;
    /// `InvalidInput` for an IPv6 address; `NotFound` when no keepnet instance runs;
    /// `TimedOut` when the tcp server does not answer.
    pub fn bind<A: ToSocketAddrs>(addr: A) -> io::Result<TcpListener> {
        TcpListener::bind_with_backlog(addr, 0)
    }

    /// Like [`TcpListener::bind`], with a backlog of `backlog` connections the server
    /// completes before the application accepts them (0: the server's default).
    pub fn bind_with_backlog<A: ToSocketAddrs>(addr: A, backlog: u32) -> io::Result<TcpListener> {
        let addrs = resolve(addr)?;
        TcpListener::listen(&TcpStack::default_instance()?, &addrs[..], backlog)
    }

    /// Like [`TcpListener::bind`], on a given stack.
    pub fn bind_with<A: ToSocketAddrs>(stack: &Arc<TcpStack>, addr: A) -> io::Result<TcpListener> {
        TcpListener::listen(stack, addr, 0)
    }

    /// Like [`TcpListener::bind_with_backlog`], on a given stack.
    pub fn listen<A: ToSocketAddrs>(
        stack: &Arc<TcpStack>,
        addr: A,
        backlog: u32,
    ) -> io::Result<TcpListener> {
        each_addr(addr, |a| {
            let (socket, _) = stack.listen(a, backlog)?;
            Ok(TcpListener {
                inner: Handle::new(stack, socket),
            })
        })
    }

    /// The stack this listener lives on.
    pub fn stack(&self) -> &Arc<TcpStack> {
        &self.inner.stack
    }

    pub(crate) fn source(&self) -> (&Arc<TcpStack>, u32) {
        (&self.inner.stack, self.inner.socket)
    }

    /// Takes the next connection, waiting for one unless non-blocking (`WouldBlock` then).
    /// Returns the connection and its peer's address.
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let stack = &self.inner.stack;
        let (socket, peer, _) = stack.accept(self.inner.socket)?;
        Ok((
            TcpStream {
                inner: Handle::new(stack, socket),
            },
            SocketAddr::V4(peer),
        ))
    }

    /// An iterator over the connections as they come ([`TcpListener::accept`] for ever).
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }

    /// The address the listener is bound to, as the server reported it.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local()
    }

    /// Another handle to the same listener (sharing its queue). It stops listening when the
    /// last handle is dropped.
    pub fn try_clone(&self) -> io::Result<TcpListener> {
        Ok(self.clone())
    }

    /// Makes [`TcpListener::accept`] fail with `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner.set_nonblocking(nonblocking)
    }

    /// Takes the pending error the server reported on the listener, clearing it.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.inner.take_error()
    }
}

/// The connections of a [`TcpListener`] as they come: [`TcpListener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a TcpListener,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<TcpStream>;
    fn next(&mut self) -> Option<io::Result<TcpStream>> {
        Some(self.listener.accept().map(|(s, _)| s))
    }
}

/// A TCP connection on keepnet, with the methods of [`std::net::TcpStream`].
///
/// Differences from the standard library, all deliberate:
/// * IPv4 only: an IPv6 address is refused with `InvalidInput`;
/// * a read or write that outlives its timeout fails with [`io::ErrorKind::TimedOut`] (std
///   on Linux reports `WouldBlock` for both a timeout and a non-blocking socket with nothing
///   to do; here `WouldBlock` means only the latter);
/// * a write copies into the process's TX buffers (64 KiB each) and returns the bytes it
///   took; it waits while the connection has [`TcpStack::send_cap`] bytes in flight
///   (submitted to the tcp server, buffers not yet back), so one connection cannot hold every
///   buffer. `flush` has nothing to do;
/// * when the connection dies (reset, timeout), reads return the data that arrived before,
///   then the error once (`ConnectionReset`, `TimedOut`, ...), then `Ok(0)`; a write returns
///   the error if no read took it first, then `BrokenPipe`, as on Linux. [`Event::error`]
///   and [`TcpStream::take_error`] see the pending error too;
/// * `shutdown(Read)` drops what was received and not read yet;
/// * `connect` without a timeout waits at most 135 s (the tcp server gives up sooner);
/// * when the tcp server is down for good (its supervisor gave up restarting it), every
///   read, write, accept and connect, blocked or not, fails within a few tens of
///   milliseconds with `ConnectionAborted` saying so (docs/udp-and-sockets.md).
///
/// [`Event::error`]: crate::Event::error
///
/// The connection is closed gracefully (a FIN after the data written) when its last handle
/// ([`TcpStream::try_clone`]) is dropped.
#[derive(Clone)]
pub struct TcpStream {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for TcpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f, "TcpStream")
    }
}

impl TcpStream {
    /// Opens a connection to `addr` from the keepnet instance named by `KEEPNET_INSTANCE`
    /// (default `default`), attaching the process to its tcp server on first use. Each
    /// address `addr` resolves to is tried in turn, as std does.
    ///
    /// # Errors
    /// `ConnectionRefused` (the peer answered with a reset), `TimedOut`, `HostUnreachable`,
    /// `NetworkUnreachable` and the like from the server; `InvalidInput` for an IPv6 address;
    /// `NotFound` when no keepnet instance runs.
    pub fn connect<A: ToSocketAddrs>(addr: A) -> io::Result<TcpStream> {
        let addrs = resolve(addr)?;
        TcpStream::connect_with(&TcpStack::default_instance()?, &addrs[..])
    }

    /// Like [`TcpStream::connect`], on a given stack.
    pub fn connect_with<A: ToSocketAddrs>(stack: &Arc<TcpStack>, addr: A) -> io::Result<TcpStream> {
        each_addr(addr, |a| TcpStream::open(stack, a, None))
    }

    /// Opens a connection to `addr`, giving up after `timeout`: the half-open connection is
    /// aborted and the call fails with `TimedOut`. A zero timeout is refused with
    /// `InvalidInput`, as in std.
    pub fn connect_timeout(addr: &SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        let a = v4(*addr)?;
        if timeout.is_zero() {
            return Err(zero_timeout());
        }
        TcpStream::open(&TcpStack::default_instance()?, a, Some(timeout))
    }

    /// Like [`TcpStream::connect_timeout`], on a given stack.
    pub fn connect_timeout_with(
        stack: &Arc<TcpStack>,
        addr: &SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let a = v4(*addr)?;
        if timeout.is_zero() {
            return Err(zero_timeout());
        }
        TcpStream::open(stack, a, Some(timeout))
    }

    fn open(
        stack: &Arc<TcpStack>,
        to: SocketAddrV4,
        timeout: Option<Duration>,
    ) -> io::Result<TcpStream> {
        let (socket, _) = stack.connect(to, timeout)?;
        Ok(TcpStream {
            inner: Handle::new(stack, socket),
        })
    }

    /// The stack this connection lives on.
    pub fn stack(&self) -> &Arc<TcpStack> {
        &self.inner.stack
    }

    pub(crate) fn source(&self) -> (&Arc<TcpStack>, u32) {
        (&self.inner.stack, self.inner.socket)
    }

    fn with<R>(&self, f: impl FnOnce(&mut crate::tcp_stack::Entry) -> R) -> io::Result<R> {
        self.inner.stack.with_entry(self.inner.socket, f)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.with(|s| SocketAddr::V4(s.peer))
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local()
    }

    /// Shuts the connection down: `Write` sends a FIN once the data written is out (the
    /// peer reads EOF; writes fail with `BrokenPipe` from now on), `Read` drops what arrives
    /// (and what was not read yet; reads return `Ok(0)`), `Both` does both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => shut::READ,
            Shutdown::Write => shut::WRITE,
            Shutdown::Both => shut::BOTH,
        };
        self.inner.stack.shutdown(self.inner.socket, how)
    }

    /// Another handle to the same connection (sharing its data, options and state). The
    /// connection closes when the last handle is dropped.
    pub fn try_clone(&self) -> io::Result<TcpStream> {
        Ok(self.clone())
    }

    /// Sets how long a read waits (None: for ever). A read that times out fails with
    /// `TimedOut`. `Some(Duration::ZERO)` is refused with `InvalidInput`, as in std.
    pub fn set_read_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        if dur == Some(Duration::ZERO) {
            return Err(zero_timeout());
        }
        self.with(|s| s.read_timeout = dur)
    }

    /// The read timeout.
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        self.with(|s| s.read_timeout)
    }

    /// Sets how long a write waits for room (None: for ever). A write that times out fails
    /// with `TimedOut`. `Some(Duration::ZERO)` is refused with `InvalidInput`, as in std.
    pub fn set_write_timeout(&self, dur: Option<Duration>) -> io::Result<()> {
        if dur == Some(Duration::ZERO) {
            return Err(zero_timeout());
        }
        self.with(|s| s.write_timeout = dur)
    }

    /// The write timeout.
    pub fn write_timeout(&self) -> io::Result<Option<Duration>> {
        self.with(|s| s.write_timeout)
    }

    /// Makes reads and writes fail with `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.inner.set_nonblocking(nonblocking)
    }

    /// Turns Nagle's algorithm off (`true`) or on: TCP_NODELAY.
    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.inner
            .stack
            .setopt(self.inner.socket, sockopt::NODELAY, nodelay)?;
        self.with(|s| s.nodelay = nodelay)
    }

    /// Whether Nagle's algorithm is off (TCP_NODELAY), as last set with
    /// [`TcpStream::set_nodelay`]; `false` until then.
    pub fn nodelay(&self) -> io::Result<bool> {
        self.with(|s| s.nodelay)
    }

    /// Turns keepalive probes on or off: SO_KEEPALIVE.
    pub fn set_keepalive(&self, keepalive: bool) -> io::Result<()> {
        self.inner
            .stack
            .setopt(self.inner.socket, sockopt::KEEPALIVE, keepalive)?;
        self.with(|s| s.keepalive = keepalive)
    }

    /// Whether keepalive probes are on (as last set here).
    pub fn keepalive(&self) -> io::Result<bool> {
        self.with(|s| s.keepalive)
    }

    /// Takes the pending error (a reset, a timeout), clearing it: the next read then returns
    /// `Ok(0)` and the next write `BrokenPipe`.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        self.inner.take_error()
    }

    /// Copies the next bytes into `buf` without consuming them (waits as a read does).
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.stack.read(self.inner.socket, buf, true)
    }
}

impl Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.stack.read(self.inner.socket, buf, false)
    }
}

impl Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.stack.write(self.inner.socket, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
