//! A test application on keepnet's sockets library, driven by the end-to-end UDP suite
//! (`tests/tests/udp_lab.rs`). It attaches to the instance named by KEEPNET_INSTANCE like
//! any application. Modes:
//!
//! * `hold PORT [--no-close]`: binds PORT, prints `bound PORT pid PID`, then waits for EOF on
//!   stdin; exits normally (closing the socket) or, with `--no-close`, by `process::exit`
//!   without closing anything.
//! * `try-bind PORT`: prints `ok` or `err KIND: MESSAGE`.
//! * `peek-other PID`: attaches (binds an ephemeral port), then tries to open every fd of
//!   process PID that is a keepnet region; prints `denied` if it could open none, else
//!   `opened N`.
//! * `checks KERNEL_ADDR`: the sockets library's error kinds against the real stack; prints
//!   one `ok NAME` or `FAIL NAME: why` line per check.
//! * `echo-client ADDR:PORT STOPFILE SEED`: sends numbered datagrams of seeded sizes
//!   (16..=1200 bytes, contents derived from the number) to a UDP echo service, at most
//!   [`ECHO_WINDOW`] awaiting their echo at a time, never resending, until STOPFILE exists
//!   (or [`ECHO_MAX_RUN`] passes); then waits for the echoes still due. A datagram whose
//!   echo is [`ECHO_OVERDUE`] late stops holding its window slot but is lost only if its echo
//!   never comes. Prints one line `sent N echoed N lost N late N duplicate N mismatched N
//!   unsent N max_rtt_ms X` and exits 0 if nothing was lost, unsent or mismatched, else 1.

use std::collections::BTreeMap;
use std::io::{BufRead, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use keepnet_sockets::UdpSocket;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = match a.as_slice() {
        ["hold", port, rest @ ..] => {
            hold(port.parse().expect("port"), rest.contains(&"--no-close"))
        }
        ["try-bind", port] => try_bind(port.parse().expect("port")),
        ["peek-other", pid] => peek_other(pid.parse().expect("pid")),
        ["checks", kernel] => checks(kernel.parse().expect("kernel address")),
        ["echo-client", to, stop, seed] => echo_client(
            to.parse().expect("ADDR:PORT"),
            Path::new(stop),
            seed.parse().expect("seed"),
        ),
        _ => {
            eprintln!("usage: kn-udp-app hold PORT [--no-close] | try-bind PORT | peek-other PID | checks KERNEL_ADDR | echo-client ADDR:PORT STOPFILE SEED");
            2
        }
    };
    std::process::exit(code);
}

fn hold(port: u16, no_close: bool) -> i32 {
    let sock = match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            println!("err {:?}: {e}", e.kind());
            return 1;
        }
    };
    println!("bound {port} pid {}", std::process::id());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line).unwrap_or(0) > 0 {
        line.clear();
    }
    if no_close {
        // Exit without dropping the socket: the supervisor must notice and free the port.
        std::process::exit(0);
    }
    drop(sock);
    0
}

fn try_bind(port: u16) -> i32 {
    match UdpSocket::bind(("0.0.0.0", port)) {
        Ok(_) => {
            println!("ok");
            0
        }
        Err(e) => {
            println!("err {:?}: {e}", e.kind());
            1
        }
    }
}

fn peek_other(pid: u32) -> i32 {
    let _mine = match UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => {
            println!("err {:?}: {e}", e.kind());
            return 1;
        }
    };
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{dir}: {e}");
            println!("denied");
            return 0;
        }
    };
    let mut opened = 0;
    for e in entries.flatten() {
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        if !target.to_string_lossy().contains("memfd:") {
            continue;
        }
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(e.path())
        {
            Ok(_) => {
                eprintln!("opened {}", target.display());
                opened += 1;
            }
            Err(err) => eprintln!("{}: {err}", target.display()),
        }
    }
    if opened == 0 {
        println!("denied");
    } else {
        println!("opened {opened}");
    }
    0
}

struct Checks {
    failed: bool,
}

impl Checks {
    fn check(&mut self, name: &str, r: Result<(), String>) {
        match r {
            Ok(()) => println!("ok {name}"),
            Err(why) => {
                self.failed = true;
                println!("FAIL {name}: {why}");
            }
        }
    }
}

fn want_kind<T: std::fmt::Debug>(r: std::io::Result<T>, kind: ErrorKind) -> Result<(), String> {
    match r {
        Err(e) if e.kind() == kind => Ok(()),
        Err(e) => Err(format!("expected {kind:?}, got {:?}: {e}", e.kind())),
        Ok(v) => Err(format!("expected {kind:?}, got Ok({v:?})")),
    }
}

fn checks(kernel: Ipv4Addr) -> i32 {
    let mut c = Checks { failed: false };
    let mut buf = [0u8; 2048];

    let s = UdpSocket::bind(("0.0.0.0", 0)).expect("bind an ephemeral port");
    let local = s.local_addr().expect("local_addr");
    c.check(
        "ephemeral_port",
        if local.port() >= 1024 {
            Ok(())
        } else {
            Err(format!("port {}", local.port()))
        },
    );

    // Read timeout: TimedOut, after at least the timeout.
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set timeout");
    let t = Instant::now();
    let r = s.recv_from(&mut buf);
    let waited = t.elapsed();
    c.check(
        "read_timeout",
        want_kind(r, ErrorKind::TimedOut).and_then(|()| {
            if waited >= Duration::from_millis(200) && waited < Duration::from_secs(5) {
                Ok(())
            } else {
                Err(format!("waited {waited:?}"))
            }
        }),
    );

    // Non-blocking: WouldBlock at once.
    s.set_nonblocking(true).expect("nonblocking");
    let t = Instant::now();
    let r = s.recv_from(&mut buf);
    c.check(
        "nonblocking",
        want_kind(r, ErrorKind::WouldBlock).and_then(|()| {
            if t.elapsed() < Duration::from_millis(100) {
                Ok(())
            } else {
                Err(format!("took {:?}", t.elapsed()))
            }
        }),
    );
    s.set_nonblocking(false).expect("blocking");

    // A port taken by this very process.
    c.check(
        "addr_in_use",
        want_kind(UdpSocket::bind(local), ErrorKind::AddrInUse),
    );

    // An address that is not keepnet's.
    c.check(
        "addr_not_available",
        want_kind(
            UdpSocket::bind(("203.0.113.9", 0)),
            ErrorKind::AddrNotAvailable,
        ),
    );

    // peer_addr before connect.
    c.check(
        "not_connected",
        want_kind(s.peer_addr(), ErrorKind::NotConnected),
    );

    // Too long for UDP.
    let big = vec![0u8; 65508];
    let to = SocketAddr::from((kernel, 9));
    c.check(
        "too_long",
        want_kind(s.send_to(&big, to), ErrorKind::InvalidInput),
    );

    // Connected to a closed port on the kernel side: the kernel's ICMP port unreachable
    // makes the next call fail with ConnectionRefused.
    let r = (|| -> Result<(), String> {
        let u = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
        u.connect((kernel, 4)).map_err(|e| e.to_string())?;
        u.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        u.send(b"anyone?").map_err(|e| e.to_string())?;
        want_kind(u.recv(&mut buf), ErrorKind::ConnectionRefused)?;
        // Reported once, then cleared.
        u.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        want_kind(u.recv(&mut buf), ErrorKind::TimedOut)
    })();
    c.check("connection_refused", r);

    if c.failed {
        1
    } else {
        0
    }
}

/// Datagrams awaiting their echo at a time (`echo-client`).
const ECHO_WINDOW: usize = 4;
/// An echo this late frees its window slot (`echo-client`); the datagram counts as lost
/// only if its echo never comes before the end.
const ECHO_OVERDUE: Duration = Duration::from_secs(2);
/// How long `echo-client` waits for the echoes still due once told to stop.
const ECHO_DRAIN: Duration = Duration::from_secs(3);
/// The longest `echo-client` run (a bound, should the stop file never come).
const ECHO_MAX_RUN: Duration = Duration::from_secs(600);

/// splitmix64 step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Datagram number `seq` of an `echo-client` run with `seed`: the number, then bytes
/// derived from both; 16..=1200 bytes long.
fn datagram(seed: u64, seq: u64) -> Vec<u8> {
    let h = mix(seed ^ seq.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let len = 16 + (h % 1185) as usize;
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&seq.to_le_bytes());
    let mut x = h;
    while d.len() < len {
        x = mix(x);
        let k = (len - d.len()).min(8);
        d.extend_from_slice(&x.to_le_bytes()[..k]);
    }
    d
}

fn echo_client(to: SocketAddr, stop: &Path, seed: u64) -> i32 {
    let sock = match UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => {
            println!("err bind {:?}: {e}", e.kind());
            return 1;
        }
    };
    if let Err(e) = sock.set_read_timeout(Some(Duration::from_millis(20))) {
        println!("err set_read_timeout: {e}");
        return 1;
    }
    let start = Instant::now();
    // Awaiting their echo: number -> when sent. Overdue: past ECHO_OVERDUE, not yet echoed.
    let mut due: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut overdue: BTreeMap<u64, Instant> = BTreeMap::new();
    let (mut sent, mut echoed, mut late, mut duplicate, mut mismatched, mut unsent) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut max_rtt = Duration::ZERO;
    let mut next = 0u64;
    let mut buf = vec![0u8; 2048];
    let mut stopping: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if stopping.is_none() && (stop.exists() || now.duration_since(start) > ECHO_MAX_RUN) {
            stopping = Some(now);
        }
        if let Some(t) = stopping {
            if (due.is_empty() && overdue.is_empty()) || now.duration_since(t) > ECHO_DRAIN {
                break;
            }
        }
        // Overdue ones free their slots.
        while let Some((&seq, &at)) = due.first_key_value() {
            if now.duration_since(at) < ECHO_OVERDUE {
                break;
            }
            due.remove(&seq);
            overdue.insert(seq, at);
            eprintln!("datagram {seq} overdue ({ECHO_OVERDUE:?} without its echo)");
        }
        while stopping.is_none() && due.len() < ECHO_WINDOW {
            let d = datagram(seed, next);
            match sock.send_to(&d, to) {
                Ok(n) if n == d.len() => {
                    sent += 1;
                    due.insert(next, Instant::now());
                }
                Ok(n) => {
                    eprintln!("datagram {next}: sent {n} of {} bytes", d.len());
                    unsent += 1;
                }
                Err(e) => {
                    eprintln!("datagram {next}: send failed: {:?}: {e}", e.kind());
                    unsent += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            next += 1;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let got = &buf[..n];
                let seq = got
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes);
                let valid = seq.filter(|&q| q < next && datagram(seed, q) == got);
                match valid {
                    None => {
                        mismatched += 1;
                        eprintln!("an echo of {n} bytes that matches no datagram sent");
                    }
                    Some(q) => {
                        if let Some(at) = due.remove(&q) {
                            echoed += 1;
                            max_rtt = max_rtt.max(at.elapsed());
                        } else if let Some(at) = overdue.remove(&q) {
                            late += 1;
                            max_rtt = max_rtt.max(at.elapsed());
                            eprintln!("datagram {q} echoed late, after {:?}", at.elapsed());
                        } else {
                            duplicate += 1;
                            eprintln!("datagram {q} echoed twice");
                        }
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("recv failed: {:?}: {e}", e.kind());
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let lost = (due.len() + overdue.len()) as u64;
    for seq in due.keys().chain(overdue.keys()) {
        eprintln!("datagram {seq} lost: its echo never came");
    }
    println!(
        "sent {sent} echoed {echoed} lost {lost} late {late} duplicate {duplicate} mismatched \
         {mismatched} unsent {unsent} max_rtt_ms {:.3}",
        max_rtt.as_secs_f64() * 1000.0
    );
    if lost == 0 && unsent == 0 && mismatched == 0 {
        0
    } else {
        1
    }
}
