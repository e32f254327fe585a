//! A transport server down for good (DESIGN rule 7, issue 6): the supervisor writes
//! `{"event":"server_failed",...}` on each application's control connection, and every call on
//! that server's sockets, the blocked ones included, fails soon with a clear error instead of
//! waiting for ever; `server_back` lifts it; EOF on the control connection fails nothing.
//! Against the stand-in servers (tests/peer, tests/tcp_peer), the test playing the supervisor
//! on the other end of the control connection.
// Both stand-ins include the same harness file; each gets its own copy, as intended.
#![allow(clippy::duplicate_mod)]

mod peer;
mod tcp_peer;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keepnet_server::app::{op, AppNotice};
use keepnet_sockets::{Interest, Poller, TcpListener, TcpStream, UdpSocket};
use tcp_peer::{BOUND, LINUX};

/// How soon a blocked call must fail once the notification is written: a parked call wakes
/// at least every 20 ms and the control connection is read at most every 10 ms; the rest is
/// slack for a loaded two-core machine.
const SOON: Duration = Duration::from_millis(250);

const DETAIL: &str = "restart limit reached: 2 restarts in 60 s; not restarting";

fn failed(server: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&AppNotice::ServerFailed {
        server: server.into(),
        detail: DETAIL.into(),
    })
    .unwrap();
    line.push(b'\n');
    line
}

fn back(server: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&AppNotice::ServerBack {
        server: server.into(),
    })
    .unwrap();
    line.push(b'\n');
    line
}

fn tell(control: &UnixStream, line: &[u8]) {
    (&*control).write_all(line).unwrap();
}

/// The error is the clear one: `ConnectionAborted`, naming the server and the reason.
#[track_caller]
fn is_down(e: &std::io::Error, server: &str) {
    assert_eq!(e.kind(), ErrorKind::ConnectionAborted, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "keepnet: the {server} server is down (restart limit reached"
        )),
        "{msg}"
    );
}

/// Runs `f` in a thread; the receiver gets its result and how long it took from the moment
/// the returned instant is reset by the caller (`started` is sent before `f` runs).
fn blocked<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> mpsc::Receiver<(std::io::Result<T>, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = f();
        let _ = tx.send((r, Instant::now()));
    });
    rx
}

/// Waits for a blocked call's outcome; returns it and how long after `since` it came.
#[track_caller]
fn outcome<T>(
    rx: &mpsc::Receiver<(std::io::Result<T>, Instant)>,
    since: Instant,
) -> (std::io::Result<T>, Duration) {
    let (r, at) = rx
        .recv_timeout(BOUND)
        .expect("a blocked call did not return after server_failed");
    (r, at.saturating_duration_since(since))
}

#[test]
fn blocked_tcp_read_accept_connect_and_poll_fail_soon_after_server_failed() {
    let (stack, peer, control) = tcp_peer::rig_with_control(8, 16);
    let stream = TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap();
    let listener = TcpListener::bind_with(&stack, "0.0.0.0:8080").unwrap();
    let poller = Poller::new();
    poller
        .register(&listener, 1, Interest::READABLE)
        .expect("register");
    // A connect whose reply never comes: it waits in the reply wait (5 s by default).
    peer.with(|st| {
        st.silent_ops.insert(op::CONNECT);
    });

    let s = stream.clone();
    let read = blocked(move || {
        let mut buf = [0u8; 64];
        (&s).read(&mut buf)
    });
    let l = listener.clone();
    let accept = blocked(move || l.accept().map(|(_, a)| a));
    let st = stack.clone();
    let connect = blocked(move || {
        TcpStream::connect_with(&st, SocketAddrV4::new(LINUX, 9)).map(|s| s.peer_addr())
    });
    let poll = blocked(move || poller.poll(&mut Vec::new(), None));
    // Everyone parked (the connect's request reached the peer).
    peer.wait_for(|st| !st.unanswered.is_empty(), |_| ());
    std::thread::sleep(Duration::from_millis(100));
    assert!(read.try_recv().is_err() && accept.try_recv().is_err());
    assert_eq!(stack.server_down(), None);

    let t0 = Instant::now();
    tell(&control, &failed("tcp"));
    let (r, took) = outcome(&read, t0);
    eprintln!("read failed after {took:?}");
    is_down(&r.unwrap_err(), "tcp");
    assert!(took < SOON, "read took {took:?}");
    let (r, took) = outcome(&accept, t0);
    eprintln!("accept failed after {took:?}");
    is_down(&r.unwrap_err(), "tcp");
    assert!(took < SOON, "accept took {took:?}");
    let (r, took) = outcome(&connect, t0);
    eprintln!("connect failed after {took:?}");
    let e = r.unwrap_err();
    is_down(&e, "tcp");
    assert!(e.to_string().contains("connect to 198.18.0.1:9"), "{e}");
    assert!(took < SOON, "connect took {took:?}");
    let (r, took) = outcome(&poll, t0);
    eprintln!("poll failed after {took:?}");
    is_down(&r.unwrap_err(), "tcp");
    assert!(took < SOON, "poll took {took:?}");
    assert_eq!(stack.server_down().as_deref(), Some(DETAIL));

    // From now on every call fails at once, non-blocking ones and new sockets too.
    let t1 = Instant::now();
    is_down(&(&stream).write(b"lost").unwrap_err(), "tcp");
    stream.set_nonblocking(true).unwrap();
    is_down(&(&stream).read(&mut [0u8; 8]).unwrap_err(), "tcp");
    is_down(
        &TcpListener::bind_with(&stack, "0.0.0.0:81").unwrap_err(),
        "tcp",
    );
    is_down(
        &TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap_err(),
        "tcp",
    );
    is_down(&stream.set_nodelay(true).unwrap_err(), "tcp");
    is_down(
        &stream.shutdown(std::net::Shutdown::Write).unwrap_err(),
        "tcp",
    );
    assert!(t1.elapsed() < SOON, "{:?}", t1.elapsed());
    // Nothing of it reached the server.
    assert_eq!(peer.with(|st| st.sends), 0);

    // The server serves again: calls go through again.
    tell(&control, &back("tcp"));
    let deadline = Instant::now() + BOUND;
    while stack.server_down().is_some() {
        assert!(Instant::now() < deadline, "server_back not seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    stream.set_nonblocking(false).unwrap();
    assert_eq!((&stream).write(b"again").unwrap(), 5);
    let mut buf = [0u8; 5];
    (&stream).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
    peer.answer_unanswered();
    let s2 = TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap();
    assert_eq!(s2.peer_addr().unwrap(), SocketAddr::from((LINUX, 7)));
}

#[test]
fn a_non_blocking_tcp_read_sees_the_failure_without_any_blocked_call() {
    let (stack, _peer, control) = tcp_peer::rig_with_control(4, 8);
    let stream = TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap();
    stream.set_nonblocking(true).unwrap();
    let e = (&stream).read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    // Half a line, then the rest: the library waits for the newline.
    let line = failed("tcp");
    let (a, b) = line.split_at(20);
    tell(&control, a);
    std::thread::sleep(Duration::from_millis(30));
    let e = (&stream).read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    tell(&control, b);
    let deadline = Instant::now() + SOON;
    let e = loop {
        let e = (&stream).read(&mut [0u8; 8]).unwrap_err();
        if e.kind() != ErrorKind::WouldBlock || Instant::now() > deadline {
            break e;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    is_down(&e, "tcp");
}

#[test]
fn eof_on_the_control_connection_fails_nothing_and_parks_as_before() {
    let (stack, peer, control) = tcp_peer::rig_with_control(4, 8);
    let stream = TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap();
    let s = stream.clone();
    let read = blocked(move || {
        let mut buf = [0u8; 64];
        (&s).read(&mut buf).map(|n| buf[..n].to_vec())
    });
    std::thread::sleep(Duration::from_millis(50));
    // The supervisor goes away (a restarted one re-adopts the servers): the reader waits on.
    drop(control);
    let parks = peer.app_parks();
    std::thread::sleep(Duration::from_millis(300));
    assert!(read.try_recv().is_err(), "the read returned on EOF");
    // Still parked in 20 ms slices, not spinning on the closed connection.
    let more = peer.app_parks() - parks;
    assert!(more < 60, "{more} parks in 300 ms");
    assert_eq!(stack.server_down(), None);
    // The data path goes on.
    let h = peer.with(|st| st.by_remote(SocketAddrV4::new(LINUX, 7)).unwrap());
    peer.send(h, b"still here");
    let (r, _) = outcome(&read, Instant::now());
    assert_eq!(r.unwrap(), b"still here");
    assert_eq!((&stream).write(b"x").unwrap(), 1);
    TcpListener::bind_with(&stack, "0.0.0.0:0").unwrap();
}

#[test]
fn lines_for_another_server_or_unknown_are_ignored() {
    let (stack, _peer, control) = tcp_peer::rig_with_control(4, 8);
    tell(
        &control,
        b"\n{\"event\":\"something_new\",\"server\":\"tcp\"}\nnot json\n",
    );
    tell(&control, &failed("udp"));
    tell(&control, &back("tcp"));
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(stack.server_down(), None);
    let s = TcpStream::connect_with(&stack, SocketAddrV4::new(LINUX, 7)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let e = (&s).read(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
}

#[test]
fn a_blocked_udp_recv_fails_soon_after_server_failed_and_server_back_clears_it() {
    let (stack, peer, control) = peer::rig_with_control(4, 8);
    let sock = UdpSocket::bind_with(&stack, "0.0.0.0:5353").unwrap();
    let s = sock.clone();
    let recv = blocked(move || {
        let mut buf = [0u8; 64];
        s.recv_from(&mut buf)
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(recv.try_recv().is_err());
    // A tcp notification is not the udp server's business.
    tell(&control, &failed("tcp"));
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        recv.try_recv().is_err(),
        "failed by the tcp server's notice"
    );
    assert_eq!(stack.server_down(), None);

    let t0 = Instant::now();
    tell(&control, &failed("udp"));
    let (r, took) = outcome(&recv, t0);
    eprintln!("recv_from failed after {took:?}");
    is_down(&r.unwrap_err(), "udp");
    assert!(took < SOON, "recv_from took {took:?}");
    is_down(
        &sock.send_to(b"x", SocketAddrV4::new(LINUX, 7)).unwrap_err(),
        "udp",
    );
    sock.set_nonblocking(true).unwrap();
    is_down(&sock.recv_from(&mut [0u8; 8]).unwrap_err(), "udp");
    is_down(
        &UdpSocket::bind_with(&stack, "0.0.0.0:0").unwrap_err(),
        "udp",
    );
    is_down(
        &sock.connect(SocketAddrV4::new(LINUX, 7)).unwrap_err(),
        "udp",
    );

    tell(&control, &back("udp"));
    let deadline = Instant::now() + peer::BOUND;
    while stack.server_down().is_some() {
        assert!(Instant::now() < deadline, "server_back not seen");
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = sock.recv_from(&mut [0u8; 8]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    sock.send_to(b"hello", SocketAddrV4::new(LINUX, 7)).unwrap();
    peer.wait_for(|st| st.sends.len() == 1, |_| ());
    UdpSocket::bind_with(&stack, "0.0.0.0:0").unwrap();
}
