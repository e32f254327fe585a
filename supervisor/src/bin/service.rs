//! `keepnet-service`: the demo services, applications on the sockets library like any
//! user's program. The supervisor runs them from the config (`[[services]]`) and restarts
//! them when they exit.
//!
//! * `udp-echo [--port 7]`: RFC 862 echo: every datagram goes back to its sender unchanged.
//! * `udp-discard [--port 9]`: RFC 863 discard: datagrams are counted and thrown away.
//! * `tcp-echo [--port 7]`: RFC 862 echo over TCP: each connection gets back what it sends,
//!   then a FIN after the client's. One thread serves every connection through a
//!   [`Poller`].
//! * `tcp-discard [--port 9]`: RFC 863 discard over TCP: reads and drops, and logs per
//!   connection `discard: connection from PEER closed after N bytes` with a running total.
//! * `tcp-chargen [--port 19]`: RFC 864 character generator: the rotating 72-character lines
//!   until the client goes away.
//! * `http [--port 80]`: a small HTTP/1.1 server with keep-alive: `/bytes/N`, a status page
//!   (module `http`).
//!
//! Each binds its socket first thing: the supervisor counts a service ready once it has.

#[path = "service/http.rs"]
mod http;

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keepnet_sockets::{Interest, Poller, TcpListener, TcpStream, UdpSocket};
use tracing::{debug, error, info, warn};

#[derive(Parser)]
#[command(
    name = "keepnet-service",
    version,
    about = "keepnet's demo services (run by `keepnet up` from [[services]] in the config)",
    long_about = "keepnet's demo services. Each attaches to the keepnet instance named by \
                  KEEPNET_INSTANCE (default \"default\") through its control socket, like any \
                  application on the sockets library."
)]
struct Cli {
    #[command(subcommand)]
    service: Service,
}

#[derive(Subcommand)]
enum Service {
    /// RFC 862 echo over UDP: sends every datagram back to its sender.
    UdpEcho {
        /// Port to bind.
        #[arg(long, default_value_t = 7)]
        port: u16,
    },
    /// RFC 863 discard over UDP: counts datagrams and drops them.
    UdpDiscard {
        /// Port to bind.
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// RFC 862 echo over TCP: sends every connection back what it sends.
    TcpEcho {
        /// Port to listen on.
        #[arg(long, default_value_t = 7)]
        port: u16,
    },
    /// RFC 863 discard over TCP: reads and drops, logging the bytes per connection.
    TcpDiscard {
        /// Port to listen on.
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
    /// RFC 864 character generator over TCP: rotating lines until the client closes.
    TcpChargen {
        /// Port to listen on.
        #[arg(long, default_value_t = 19)]
        port: u16,
    },
    /// HTTP/1.1 with keep-alive: GET /bytes/N (byte i = i % 251), GET / or /status.
    Http {
        /// Port to listen on.
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEPNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.service {
        Service::UdpEcho { port } => udp_echo(port),
        Service::UdpDiscard { port } => udp_discard(port),
        Service::TcpEcho { port } => tcp_echo(port),
        Service::TcpDiscard { port } => tcp_discard(port),
        Service::TcpChargen { port } => tcp_chargen(port),
        Service::Http { port } => http_service(port),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(%e, "service failed");
            eprintln!("keepnet-service: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs a progress line at most every 10 s.
struct Progress {
    what: &'static str,
    last: Instant,
    datagrams: u64,
    bytes: u64,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress {
            what,
            last: Instant::now(),
            datagrams: 0,
            bytes: 0,
        }
    }
    fn add(&mut self, n: usize) {
        self.datagrams += 1;
        self.bytes += n as u64;
        if self.last.elapsed() >= Duration::from_secs(10) {
            self.last = Instant::now();
            info!(
                datagrams = self.datagrams,
                bytes = self.bytes,
                "{}: totals so far",
                self.what
            );
        }
    }
}

fn udp_echo(port: u16) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    info!(addr = %sock.local_addr()?, "udp echo serving");
    let mut buf = vec![0u8; 65536];
    let mut p = Progress::new("udp echo");
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            // A pending error from an ICMP message is not ours to stop on.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        p.add(n);
        if let Err(e) = sock.send_to(&buf[..n], from) {
            // One peer's trouble must not stop the service.
            tracing::warn!(%from, %e, "echo reply not sent");
        }
    }
}

fn udp_discard(port: u16) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    info!(addr = %sock.local_addr()?, "udp discard serving");
    let mut buf = vec![0u8; 65536];
    let mut p = Progress::new("udp discard");
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => p.add(n),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Listens on `port` of keepnet's address and logs it.
fn listen(port: u16, what: &str) -> io::Result<TcpListener> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    info!(addr = %l.local_addr()?, "{what} serving");
    Ok(l)
}

/// Accepts connections for ever, each served by `serve` on a thread of its own. An accept
/// that fails for one connection's sake is logged and skipped; anything else ends the
/// service (the supervisor restarts it).
fn thread_per_connection(
    listener: TcpListener,
    what: &'static str,
    serve: impl Fn(TcpStream, SocketAddr) + Send + Sync + Clone + 'static,
) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted
                        | ErrorKind::ConnectionReset
                        | ErrorKind::TimedOut
                        | ErrorKind::ConnectionRefused
                ) =>
            {
                warn!(%e, "{what}: accept failed");
                continue;
            }
            Err(e) => return Err(e),
        };
        let serve = serve.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("{what} {peer}"))
            .spawn(move || serve(stream, peer));
        if let Err(e) = spawned {
            // Out of threads: this connection is dropped (closed), the service goes on.
            warn!(%e, %peer, "{what}: no thread for the connection");
        }
    }
}

/// Whether an error means only that the peer went away.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset
            | ErrorKind::BrokenPipe
            | ErrorKind::ConnectionAborted
            | ErrorKind::TimedOut
            | ErrorKind::UnexpectedEof
    )
}

/// One echo connection in the poll loop: what it read and could not write back yet.
struct EchoConn {
    stream: TcpStream,
    peer: SocketAddr,
    out: Vec<u8>,
    sent: usize,
    eof: bool,
    bytes: u64,
    interest: Interest,
}

/// Rounds of read-then-write one connection gets per readiness event (fairness).
const ECHO_ROUNDS: usize = 8;

impl EchoConn {
    /// Moves what it can without blocking; Ok(true) once the connection is finished (the
    /// client's EOF came and everything went back).
    fn step(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        for _ in 0..ECHO_ROUNDS {
            while self.sent < self.out.len() {
                match (&self.stream).write(&self.out[self.sent..]) {
                    Ok(n) => self.sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            self.out.clear();
            self.sent = 0;
            if self.eof {
                return Ok(true);
            }
            let n = match (&self.stream).read(buf) {
                Ok(0) => {
                    self.eof = true;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            self.bytes += n as u64;
            // Straight back; what does not fit now waits in `out` (and reading pauses).
            let mut at = 0;
            while at < n {
                match (&self.stream).write(&buf[at..n]) {
                    Ok(k) => at += k,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            self.out.extend_from_slice(&buf[at..n]);
        }
        Ok(false)
    }

    /// What to wait for next: room while something waits to go back, data otherwise.
    fn wanted(&self) -> Interest {
        if self.sent < self.out.len() {
            Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}

/// RFC 862 over TCP, every connection on one thread through a poller.
fn tcp_echo(port: u16) -> io::Result<()> {
    const LISTENER: usize = 0;
    let listener = listen(port, "tcp echo")?;
    listener.set_nonblocking(true)?;
    let poller = Poller::new();
    poller.register(&listener, LISTENER, Interest::READABLE)?;
    let mut conns: HashMap<usize, EchoConn> = HashMap::new();
    let mut next = LISTENER + 1;
    let mut events = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut served, mut total) = (0u64, 0u64);
    let mut last_log = Instant::now();
    loop {
        poller.poll(&mut events, Some(Duration::from_secs(10)))?;
        for ev in &events {
            if ev.token == LISTENER {
                loop {
                    let (stream, peer) = match listener.accept() {
                        Ok(x) => x,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if peer_gone(&e) => {
                            warn!(%e, "tcp echo: accept failed");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    stream.set_nonblocking(true)?;
                    poller.register(&stream, next, Interest::READABLE)?;
                    debug!(%peer, "tcp echo: connection");
                    conns.insert(
                        next,
                        EchoConn {
                            stream,
                            peer,
                            out: Vec::new(),
                            sent: 0,
                            eof: false,
                            bytes: 0,
                            interest: Interest::READABLE,
                        },
                    );
                    next = next.wrapping_add(1).max(LISTENER + 1);
                }
                continue;
            }
            let Some(c) = conns.get_mut(&ev.token) else {
                continue;
            };
            let finished = match c.step(&mut buf) {
                Ok(done) => done,
                Err(e) => {
                    debug!(peer = %c.peer, %e, "tcp echo: connection failed");
                    true
                }
            };
            if finished {
                if let Some(c) = conns.remove(&ev.token) {
                    let _ = poller.deregister(&c.stream);
                    served += 1;
                    total += c.bytes;
                    debug!(peer = %c.peer, bytes = c.bytes, "tcp echo: connection closed");
                    // Dropping the stream closes it: a FIN after what was echoed.
                }
            } else if c.wanted() != c.interest {
                c.interest = c.wanted();
                poller.reregister(&c.stream, ev.token, c.interest)?;
            }
        }
        if last_log.elapsed() >= Duration::from_secs(10) {
            last_log = Instant::now();
            info!(
                open = conns.len(),
                closed = served,
                bytes = total,
                "tcp echo: totals so far"
            );
        }
    }
}

/// RFC 863 over TCP: a thread per connection reads and drops.
fn tcp_discard(port: u16) -> io::Result<()> {
    let listener = listen(port, "tcp discard")?;
    let total = Arc::new(AtomicU64::new(0));
    thread_per_connection(listener, "discard", move |stream, peer| {
        let mut buf = vec![0u8; 256 * 1024];
        let mut n: u64 = 0;
        let end = loop {
            match (&stream).read(&mut buf) {
                Ok(0) => break None,
                Ok(k) => n += k as u64,
                Err(e) => break Some(e),
            }
        };
        let total = total.fetch_add(n, Ordering::Relaxed) + n;
        match end {
            None => info!(
                total,
                "discard: connection from {peer} closed after {n} bytes"
            ),
            Some(e) => info!(
                total,
                %e,
                "discard: connection from {peer} closed after {n} bytes"
            ),
        }
    })
}

/// Characters of an RFC 864 line.
const CHARGEN_LINE: usize = 72;
/// The printable ASCII characters RFC 864 rotates through (space to tilde).
const CHARGEN_SET: u8 = 95;

/// `lines` lines of the RFC 864 pattern starting at line `first`: line k holds the 72
/// characters from printable character `k mod 95` on, then CR LF.
fn chargen_lines(first: usize, lines: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(lines * (CHARGEN_LINE + 2));
    for k in first..first + lines {
        for j in 0..CHARGEN_LINE {
            v.push(b' ' + ((k + j) % usize::from(CHARGEN_SET)) as u8);
        }
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// RFC 864 over TCP: a thread per connection writes lines until the client goes away.
fn tcp_chargen(port: u16) -> io::Result<()> {
    let listener = listen(port, "tcp chargen")?;
    // Whole cycles of 95 lines (7030 bytes) filling most of one 64 KiB send buffer.
    let cycle = Arc::new(chargen_lines(0, usize::from(CHARGEN_SET) * 9));
    thread_per_connection(listener, "chargen", move |stream, peer| {
        // What the client sends is read and dropped on the side; the client's EOF is not the
        // end (it may still read), its going away is.
        if let Ok(reader) = stream.try_clone() {
            let _ = std::thread::Builder::new()
                .name(format!("chargen-in {peer}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    while matches!((&reader).read(&mut buf), Ok(n) if n > 0) {}
                });
        }
        let mut sent: u64 = 0;
        let end = loop {
            match (&stream).write_all(&cycle) {
                Ok(()) => sent += cycle.len() as u64,
                Err(e) => break e,
            }
        };
        if peer_gone(&end) {
            debug!(%peer, sent, "chargen: the client went away");
        } else {
            warn!(%peer, sent, e = %end, "chargen: connection failed");
        }
        let _ = stream.shutdown(Shutdown::Both);
    })
}

/// The HTTP service: a thread per connection (module `http`).
fn http_service(port: u16) -> io::Result<()> {
    let listener = listen(port, "http")?;
    let stats = Arc::new(http::Stats::default());
    let pattern = Arc::new(http::Pattern::new());
    thread_per_connection(listener, "http", move |stream, peer| {
        if let Err(e) = http::serve(stream, &stats, &pattern) {
            debug!(%peer, %e, "http: connection ended");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chargen_lines_rotate_through_the_printable_characters() {
        let v = chargen_lines(0, 96);
        let lines: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
        assert_eq!(lines.len(), 97); // 96 lines and the empty rest.
                                     // RFC 864's first two lines.
        let first =
            br##" !"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefg"##;
        let second =
            br##"!"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\]^_`abcdefgh"##;
        assert_eq!(first.len(), 72);
        assert_eq!(&lines[0][..72], &first[..]);
        assert_eq!(&lines[1][..72], &second[..]);
        for (k, l) in lines[..96].iter().enumerate() {
            assert_eq!(l.len(), 73, "line {k}");
            assert_eq!(l[72], b'\r');
            assert_eq!(l[0], b' ' + (k % 95) as u8);
            assert!(l[..72].iter().all(|&b| (b' '..=b'~').contains(&b)));
        }
        // After 95 lines the pattern starts over.
        assert_eq!(lines[95], lines[0]);
        assert_eq!(chargen_lines(95, 3), chargen_lines(0, 3));
    }
}
