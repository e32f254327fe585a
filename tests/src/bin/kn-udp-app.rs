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

use std::io::{BufRead, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr};
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
        _ => {
            eprintln!("usage: kn-udp-app hold PORT [--no-close] | try-bind PORT | peek-other PID | checks KERNEL_ADDR");
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
