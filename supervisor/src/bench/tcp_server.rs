//! `keepnet __tcp-server`: Linux-kernel TCP servers on std sockets, a thread per
//! connection, the baseline of `keepnet bench tcp` (run inside a namespace with
//! `ip netns exec`) and the peer of the probe's tests:
//!
//! * echo (RFC 862, port 7): sends back what it reads (TCP_NODELAY); once the client has
//!   shut down its sending side and everything is echoed, closes.
//! * discard (RFC 863, port 9): reads and drops until the client closes, then closes.
//! * chargen (port 19): writes the i % 251 byte pattern until the client goes away.
//! * http (port 80): `GET /bytes/N` answers N bytes of the i % 251 pattern (then closes);
//!   anything else gets a 404.
//!
//! Every connection and the servers themselves end by `--seconds`.

use std::io::Write as _;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::tcp_probe::{
    read_bounded, set_congestion, write_all_bounded, Bound, Pattern, CHUNK, IO_SLICE, MAX_BYTES,
    MAX_TIMEOUT_S,
};
use crate::error::{Context, Error, Result};

/// The line the server prints on stdout once every listener is bound.
pub const READY: &str = "tcp-server: listening on";
/// The largest request head the HTTP server reads.
const MAX_REQUEST: usize = 8 * 1024;

/// Arguments of the hidden `__tcp-server` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct TcpServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Echo port (0: none).
    #[arg(long, default_value_t = 7)]
    pub echo_port: u16,
    /// Discard port (0: none).
    #[arg(long, default_value_t = 9)]
    pub discard_port: u16,
    /// Chargen port (0: none).
    #[arg(long, default_value_t = 19)]
    pub chargen_port: u16,
    /// HTTP port serving `/bytes/N` (0: none).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// Exit after this many seconds (open connections are closed then).
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
    /// Connections open at once; more are closed at once.
    #[arg(long, default_value_t = 2048)]
    pub max_conns: usize,
    /// Congestion control of every connection (TCP_CONGESTION on the listeners, inherited
    /// by what they accept); default: the namespace's.
    #[arg(long, value_name = "NAME")]
    pub congestion: Option<String>,
}

/// The services.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Service {
    Echo,
    Discard,
    Chargen,
    Http,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Echo => "echo",
            Service::Discard => "discard",
            Service::Chargen => "chargen",
            Service::Http => "http",
        }
    }
}

/// Running servers; stopped (every thread joined) on drop.
pub struct Servers {
    pub addrs: Vec<(Service, SocketAddr)>,
    stop: Arc<AtomicBool>,
    acceptors: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Servers {
    /// Binds every service with a non-zero port and starts accepting, until `deadline`.
    pub fn start(args: &TcpServerArgs, deadline: Instant) -> Result<Servers> {
        let list: Vec<(Service, SocketAddr)> = [
            (Service::Echo, args.echo_port),
            (Service::Discard, args.discard_port),
            (Service::Chargen, args.chargen_port),
            (Service::Http, args.http_port),
        ]
        .into_iter()
        .filter(|(_, port)| *port != 0)
        .map(|(svc, port)| (svc, SocketAddr::new(args.bind, port)))
        .collect();
        Servers::start_on(&list, args.congestion.as_deref(), args.max_conns, deadline)
    }

    /// Binds each service to its address (port 0: an ephemeral one, see [`Servers::addrs`])
    /// and starts accepting, until `deadline`.
    pub fn start_on(
        list: &[(Service, SocketAddr)],
        congestion: Option<&str>,
        max_conns: usize,
        deadline: Instant,
    ) -> Result<Servers> {
        let live = Arc::new(AtomicUsize::new(0));
        let mut s = Servers {
            addrs: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            acceptors: Vec::new(),
            conns: Arc::new(Mutex::new(Vec::new())),
        };
        for &(svc, addr) in list {
            let l = listen_on(addr)
                .with_context(|| format!("bind the {} server to {addr}", svc.name()))?;
            l.set_nonblocking(true)
                .context("make the listener non-blocking")?;
            if let Some(cc) = congestion {
                set_congestion(&l, cc).with_context(|| format!("{} server", svc.name()))?;
            }
            s.addrs
                .push((svc, l.local_addr().context("read the bound address")?));
            let (stop, conns, live) = (s.stop.clone(), s.conns.clone(), live.clone());
            let h = std::thread::Builder::new()
                .name(format!("{}-accept", svc.name()))
                .spawn(move || accept_loop(l, svc, deadline, &stop, &conns, &live, max_conns))
                .context("start an accepting thread")?;
            s.acceptors.push(h);
        }
        Ok(s)
    }

    /// The address of a service.
    #[cfg(test)]
    pub fn addr(&self, svc: Service) -> Option<SocketAddr> {
        self.addrs.iter().find(|(s, _)| *s == svc).map(|(_, a)| *a)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.acceptors.drain(..) {
            let _ = h.join();
        }
        let hs: Vec<JoinHandle<()>> = match self.conns.lock() {
            Ok(mut v) => v.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for h in hs {
            let _ = h.join();
        }
    }
}

/// The listen backlog is SOMAXCONN (4096; the kernel caps it at net.core.somaxconn): deep
/// enough that a burst of connections (the bench's connect test runs 1000 back to back) does
/// not overflow the accept queue while the accepting thread starts threads, which would turn
/// into SYN drops and 1 s retransmissions.
/// A listening socket on `addr` with a backlog of SOMAXCONN (std's `TcpListener::bind` asks
/// for 128).
fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn, SockaddrIn6,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    listen(&fd, Backlog::MAXCONN)?;
    Ok(TcpListener::from(fd))
}

fn accept_loop(
    l: TcpListener,
    svc: Service,
    deadline: Instant,
    stop: &Arc<AtomicBool>,
    conns: &Mutex<Vec<JoinHandle<()>>>,
    live: &Arc<AtomicUsize>,
    max: usize,
) {
    let b = Bound {
        deadline,
        stop: Some(stop),
    };
    while !b.over() {
        match l.accept() {
            Ok((st, _)) => {
                if live.load(Ordering::SeqCst) >= max {
                    continue;
                }
                live.fetch_add(1, Ordering::SeqCst);
                let (stop, live2) = (stop.clone(), live.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name(svc.name().into())
                        .spawn(move || {
                            let b = Bound {
                                deadline,
                                stop: Some(&stop),
                            };
                            serve(st, svc, b);
                            live2.fetch_sub(1, Ordering::SeqCst);
                        });
                match spawned {
                    Ok(h) => {
                        if let Ok(mut v) = conns.lock() {
                            v.retain(|h| !h.is_finished());
                            v.push(h);
                        }
                    }
                    Err(_) => {
                        live.fetch_sub(1, Ordering::SeqCst);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut fds, PollTimeout::from(50u16));
            }
            // ECONNABORTED, EMFILE and the like: try again shortly.
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(mut st: TcpStream, svc: Service, b: Bound) {
    if st.set_read_timeout(Some(IO_SLICE)).is_err() || st.set_write_timeout(Some(IO_SLICE)).is_err()
    {
        return;
    }
    let _ = match svc {
        Service::Echo => echo(&mut st, b),
        Service::Discard => discard(&mut st, b),
        Service::Chargen => chargen(&mut st, b),
        Service::Http => http(&mut st, b),
    };
}

fn echo(st: &mut TcpStream, b: Bound) -> std::io::Result<()> {
    st.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_bounded(st, &mut buf, b)? {
            0 => break,
            n => write_all_bounded(st, buf.get(..n).unwrap_or(&[]), b)?,
        }
    }
    st.shutdown(Shutdown::Write)
}

fn discard(st: &mut TcpStream, b: Bound) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    while read_bounded(st, &mut buf, b)? > 0 {}
    st.shutdown(Shutdown::Write)
}

fn chargen(st: &mut TcpStream, b: Bound) -> std::io::Result<()> {
    let p = Pattern::default();
    let mut off = 0u64;
    loop {
        write_all_bounded(st, p.at(off, CHUNK), b)?;
        off += CHUNK as u64;
    }
}

/// The byte count asked for by a request head, or why it cannot be served.
pub fn parse_request(head: &[u8]) -> std::result::Result<u64, String> {
    let text = std::str::from_utf8(head).map_err(|_| "not UTF-8".to_string())?;
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {line:?}"));
    };
    if method != "GET" {
        return Err(format!("method {method} not served"));
    }
    let n = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| format!("no such page {path:?}"))?;
    if n > MAX_BYTES {
        return Err(format!("at most {MAX_BYTES} bytes are served"));
    }
    Ok(n)
}

fn http(st: &mut TcpStream, b: Bound) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST {
            return Ok(());
        }
        match read_bounded(st, &mut buf, b)? {
            0 => return Ok(()),
            n => head.extend_from_slice(buf.get(..n).unwrap_or(&[])),
        }
    }
    let n = match parse_request(&head) {
        Ok(n) => n,
        Err(why) => {
            let body = format!("{why}\n");
            let resp = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            write_all_bounded(st, resp.as_bytes(), b)?;
            return st.shutdown(Shutdown::Write);
        }
    };
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\
         Connection: close\r\n\r\n"
    );
    write_all_bounded(st, resp.as_bytes(), b)?;
    let p = Pattern::default();
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(CHUNK as u64) as usize;
        write_all_bounded(st, p.at(off, len), b)?;
        off += len as u64;
    }
    st.shutdown(Shutdown::Write)?;
    // Let the client read to the end before the socket goes (closing with unread request
    // bytes would reset the connection).
    while read_bounded(st, &mut buf, b)? > 0 {}
    Ok(())
}

/// Serves until the time is up; prints [`READY`] and the addresses on stdout first.
pub fn run(args: TcpServerArgs) -> Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= MAX_TIMEOUT_S) {
        return Err(Error::Unsupported(format!(
            "tcp server: --seconds must be in (0, {MAX_TIMEOUT_S}]"
        )));
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let servers = Servers::start(&args, deadline)?;
    {
        let list: Vec<String> = servers
            .addrs
            .iter()
            .map(|(s, a)| format!("{}={a}", s.name()))
            .collect();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY} {}", list.join(" "));
        let _ = out.flush();
    }
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(servers);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(
            parse_request(b"GET /bytes/123 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(123)
        );
        assert!(parse_request(b"POST /bytes/1 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request(b"GET /status HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request(b"GET /bytes/99999999999999 HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_request(b"\r\n\r\n").is_err());
    }
}
