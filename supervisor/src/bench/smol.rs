//! `keepnet __smoltcp-server` (cargo feature `smoltcp-bench`): the smoltcp comparator of
//! `keepnet bench tcp`. It attaches to a TAP device (the bench creates it, with the kernel
//! side addressed, in a namespace of its own: the same layout as keepnet's lab), puts a
//! smoltcp `Interface` with one address on the other side, and serves the same services
//! as keepnet and the Linux baseline, so the same probe measures all three:
//!
//! * echo (7): sends back what it reads (Nagle off), closes once the client has closed and
//!   everything is echoed;
//! * discard (9): reads and drops, closes once the client has closed;
//! * chargen (19): writes the i % 251 byte pattern until the client goes away;
//! * http (80): `GET /bytes/N` answers N bytes of the i % 251 pattern, then closes.
//!
//! Each connection gets its own send and receive buffers of `--buffer` bytes (256 KiB, like
//! keepnet's). smoltcp's sockets accept one connection each, so the server keeps
//! `--spare-listeners` sockets listening on every port and replaces each one that took a
//! connection after every received packet. One thread, smoltcp's stock TAP device
//! (`phy::TunTapInterface`), `select` on the TAP when idle.

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use smoltcp::iface::{
    Config, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::{self, Medium, TunTapInterface};
use smoltcp::socket::tcp::{self, CongestionControl, State};
use smoltcp::wire::{EthernetAddress, IpCidr};

use super::tcp_probe::{Pattern, CHUNK, MAX_TIMEOUT_S};
use super::tcp_server::{parse_request, Service};
use crate::error::{Context, Error, Result};

/// The line the server prints on stdout once the TAP is open.
pub const READY: &str = "smoltcp-server: serving on";
/// The interface's MAC address (locally administered).
const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x18, 0x01, 0x02];
/// Packets taken in before the applications and the sending side get a turn.
const INGRESS_BATCH: usize = 64;
/// Transmit rounds (one segment per busy socket each) before packets are taken in again.
const EGRESS_BATCH: usize = 16;
/// The longest sleep on the TAP while idle.
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// The largest HTTP request head read.
const MAX_REQUEST: usize = 8 * 1024;

/// Arguments of the hidden `__smoltcp-server` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct SmolArgs {
    /// The TAP device to attach to (created if missing; the bench creates it beforehand).
    #[arg(long)]
    pub tap: String,
    /// smoltcp's address and prefix on the TAP.
    #[arg(long, default_value = "198.18.1.2/24")]
    pub addr: String,
    /// Send and receive buffer of each connection, in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    pub buffer: usize,
    /// Sockets kept listening on each port.
    #[arg(long, default_value_t = 4)]
    pub spare_listeners: usize,
    /// Connections open at once (listeners included); beyond that no new listener is made.
    #[arg(long, default_value_t = 512)]
    pub max_sockets: usize,
    /// Congestion control: cubic, reno or none.
    #[arg(long, default_value = "cubic")]
    pub congestion: String,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
}

const SERVICES: [(Service, u16); 4] = [
    (Service::Echo, 7),
    (Service::Discard, 9),
    (Service::Chargen, 19),
    (Service::Http, 80),
];

/// What an HTTP connection is doing.
#[derive(Debug, Default)]
struct Http {
    head: Vec<u8>,
    /// The response head not yet queued.
    reply: Vec<u8>,
    /// Body bytes queued so far, and in all.
    sent: u64,
    total: u64,
    answered: bool,
}

/// One socket and what it serves.
struct Conn {
    handle: SocketHandle,
    svc: Service,
    listening: bool,
    /// Chargen: pattern bytes queued so far.
    offset: u64,
    closed: bool,
    http: Http,
}

struct Server {
    args: SmolArgs,
    cc: CongestionControl,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    pattern: Pattern,
    scratch: Vec<u8>,
    served: u64,
}

impl Server {
    fn listen(&mut self, svc: Service, port: u16) -> Result<()> {
        let rx = tcp::SocketBuffer::new(vec![0u8; self.args.buffer]);
        let tx = tcp::SocketBuffer::new(vec![0u8; self.args.buffer]);
        let mut s = tcp::Socket::new(rx, tx);
        s.set_congestion_control(self.cc);
        if svc == Service::Echo {
            s.set_nagle_enabled(false);
        }
        s.listen(port)
            .map_err(|e| Error::Peer(format!("smoltcp: listen on {port}: {e:?}")))?;
        let handle = self.sockets.add(s);
        self.conns.push(Conn {
            handle,
            svc,
            listening: true,
            offset: 0,
            closed: false,
            http: Http::default(),
        });
        Ok(())
    }

    /// Notices listeners that took a connection and tops every port up to its spares.
    fn refill(&mut self) -> Result<()> {
        let mut spare = [0usize; SERVICES.len()];
        for c in &mut self.conns {
            if !c.listening {
                continue;
            }
            if self.sockets.get::<tcp::Socket>(c.handle).state() == State::Listen {
                if let Some(i) = SERVICES.iter().position(|(s, _)| *s == c.svc) {
                    spare[i] += 1;
                }
            } else {
                c.listening = false;
                self.served += 1;
            }
        }
        for (i, (svc, port)) in SERVICES.iter().enumerate() {
            for _ in spare[i]..self.args.spare_listeners {
                if self.conns.len() >= self.args.max_sockets {
                    return Ok(());
                }
                self.listen(*svc, *port)?;
            }
        }
        Ok(())
    }

    /// Lets every connection make progress; returns whether any did.
    fn apps(&mut self) -> bool {
        let mut busy = false;
        for c in &mut self.conns {
            if c.listening || c.closed {
                continue;
            }
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            busy |= match c.svc {
                Service::Echo => echo(s, &mut self.scratch),
                Service::Discard => discard(s),
                Service::Chargen => chargen(s, &self.pattern, &mut c.offset),
                Service::Http => http(s, &self.pattern, &mut c.http),
            };
            if matches!(s.state(), State::Closed | State::TimeWait) {
                c.closed = true;
            }
        }
        // Free what has closed.
        let before = self.conns.len();
        let sockets = &mut self.sockets;
        self.conns.retain(|c| {
            if c.closed {
                sockets.remove(c.handle);
            }
            !c.closed
        });
        busy || self.conns.len() != before
    }
}

fn echo(s: &mut tcp::Socket, scratch: &mut Vec<u8>) -> bool {
    let mut busy = false;
    while s.can_recv() && s.can_send() {
        let n = s
            .recv_queue()
            .min(s.send_capacity() - s.send_queue())
            .min(CHUNK);
        if n == 0 {
            break;
        }
        scratch.resize(n, 0);
        let Ok(got) = s.recv_slice(scratch) else {
            break;
        };
        let _ = s.send_slice(scratch.get(..got).unwrap_or(&[]));
        busy = true;
    }
    // The client has closed and everything it sent is queued back: close too.
    if !s.may_recv() && s.recv_queue() == 0 && s.state() == State::CloseWait {
        s.close();
        busy = true;
    }
    busy
}

fn discard(s: &mut tcp::Socket) -> bool {
    let mut busy = false;
    while s.can_recv() {
        match s.recv(|b| (b.len(), b.len())) {
            Ok(n) if n > 0 => busy = true,
            _ => break,
        }
    }
    if s.state() == State::CloseWait {
        s.close();
        busy = true;
    }
    busy
}

fn chargen(s: &mut tcp::Socket, p: &Pattern, off: &mut u64) -> bool {
    let mut busy = false;
    // Whatever the client sends is dropped.
    while s.can_recv() {
        if !matches!(s.recv(|b| (b.len(), b.len())), Ok(n) if n > 0) {
            break;
        }
    }
    while s.can_send() {
        let r = s.send(|b| {
            let n = b.len().min(CHUNK);
            if let Some(dst) = b.get_mut(..n) {
                dst.copy_from_slice(p.at(*off, n));
            }
            (n, n)
        });
        match r {
            Ok(n) if n > 0 => {
                *off += n as u64;
                busy = true;
            }
            _ => break,
        }
    }
    if s.state() == State::CloseWait {
        s.close();
        busy = true;
    }
    busy
}

fn http(s: &mut tcp::Socket, p: &Pattern, h: &mut Http) -> bool {
    let mut busy = false;
    // Read the request head (anything after it is dropped).
    while s.can_recv() {
        let r = s.recv(|b| (b.len(), b.to_vec()));
        match r {
            Ok(v) if !v.is_empty() => {
                busy = true;
                if !h.answered && h.head.len() < MAX_REQUEST {
                    h.head.extend_from_slice(&v);
                }
            }
            _ => break,
        }
    }
    if !h.answered && h.head.windows(4).any(|w| w == b"\r\n\r\n") {
        h.answered = true;
        match parse_request(&h.head) {
            Ok(n) => {
                h.total = n;
                h.reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {n}\r\nConnection: close\r\n\r\n"
                )
                .into_bytes();
            }
            Err(why) => {
                let body = format!("{why}\n");
                h.reply = format!(
                    "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: \
                     {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes();
            }
        }
    } else if !h.answered && (h.head.len() >= MAX_REQUEST || s.state() == State::CloseWait) {
        // No whole request, and none coming.
        s.close();
        return true;
    }
    if !h.answered {
        return busy;
    }
    if !h.reply.is_empty() && s.can_send() {
        if let Ok(n) = s.send_slice(&h.reply) {
            h.reply.drain(..n);
            busy |= n > 0;
        }
    }
    while h.reply.is_empty() && h.sent < h.total && s.can_send() {
        let left = h.total - h.sent;
        let r = s.send(|b| {
            let n = (b.len() as u64).min(left).min(CHUNK as u64) as usize;
            if let Some(dst) = b.get_mut(..n) {
                dst.copy_from_slice(p.at(h.sent, n));
            }
            (n, n)
        });
        match r {
            Ok(n) if n > 0 => {
                h.sent += n as u64;
                busy = true;
            }
            _ => break,
        }
    }
    if h.reply.is_empty() && h.sent >= h.total && s.may_send() {
        // A FIN after the last queued byte.
        s.close();
        busy = true;
    }
    busy
}

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::now()
}

/// Serves until the time is up.
pub fn run(args: SmolArgs) -> Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= MAX_TIMEOUT_S) {
        return Err(Error::Unsupported(format!(
            "smoltcp server: --seconds must be in (0, {MAX_TIMEOUT_S}]"
        )));
    }
    if !(1024..=(64 << 20)).contains(&args.buffer) {
        return Err(Error::Unsupported(
            "smoltcp server: --buffer must be in 1024..=67108864".into(),
        ));
    }
    if args.spare_listeners == 0 || args.spare_listeners > 64 {
        return Err(Error::Unsupported(
            "smoltcp server: --spare-listeners must be in 1..=64".into(),
        ));
    }
    let cc = match args.congestion.as_str() {
        "cubic" => CongestionControl::Cubic,
        "reno" => CongestionControl::Reno,
        "none" => CongestionControl::None,
        other => {
            return Err(Error::Unsupported(format!(
                "smoltcp server: unknown congestion control {other:?} (cubic, reno, none)"
            )))
        }
    };
    let cidr: IpCidr = args
        .addr
        .parse()
        .map_err(|_| Error::Unsupported(format!("smoltcp server: bad --addr {:?}", args.addr)))?;
    let mut dev = TunTapInterface::new(&args.tap, Medium::Ethernet)
        .with_context(|| format!("open TAP device {}", args.tap))?;
    let mut config = Config::new(EthernetAddress(MAC).into());
    config.random_seed =
        super::probe::mix64(u64::from(std::process::id()) ^ super::stats::monotonic_ns());
    let mut iface = Interface::new(config, &mut dev, now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(cidr);
    });
    let mut srv = Server {
        cc,
        sockets: SocketSet::new(vec![]),
        conns: Vec::new(),
        pattern: Pattern::default(),
        scratch: Vec::new(),
        served: 0,
        args,
    };
    srv.refill()?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{READY} {} {} (buffers {} bytes, congestion {})",
            srv.args.tap, srv.args.addr, srv.args.buffer, srv.args.congestion
        );
        let _ = out.flush();
    }
    let deadline = Instant::now() + Duration::from_secs_f64(srv.args.seconds);
    let fd = dev.as_raw_fd();
    while Instant::now() < deadline {
        let mut busy = false;
        for _ in 0..INGRESS_BATCH {
            match iface.poll_ingress_single(now(), &mut dev, &mut srv.sockets) {
                PollIngressSingleResult::None => break,
                _ => {
                    busy = true;
                    // A SYN just taken by a listener must not leave its port without one.
                    srv.refill()?;
                }
            }
        }
        busy |= srv.apps();
        srv.refill()?;
        for _ in 0..EGRESS_BATCH {
            match iface.poll_egress(now(), &mut dev, &mut srv.sockets) {
                PollResult::SocketStateChanged => busy = true,
                PollResult::None => break,
            }
        }
        if !busy {
            let wait = iface
                .poll_delay(now(), &srv.sockets)
                .map_or(IDLE_WAIT, |d| Duration::from_micros(d.total_micros()))
                .min(IDLE_WAIT);
            let _ = phy::wait(
                fd,
                Some(smoltcp::time::Duration::from_micros(wait.as_micros() as u64)),
            );
        }
    }
    eprintln!(
        "smoltcp-server {}: {} connections served",
        srv.args.tap, srv.served
    );
    Ok(())
}
