//! TcpListener, TcpStream and Poller over an application region, against a stand-in tcp
//! server (tests/tcp_peer).

mod tcp_peer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keepnet_server::app::{app_endpoint, op, shut, sockopt, Status};
use keepnet_server::wiring::TCP;
use keepnet_sockets::{
    Event, Interest, Poller, TcpListener, TcpStack, TcpStream, DEFAULT_SEND_CAP,
};
use tcp_peer::{rig, Far, Peer, APP, BOUND, KN, LINUX};

fn linux(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(LINUX, port)
}

/// `n` bytes that do not repeat with any period a buffer size would hide.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i % 251) as u8 ^ ((i / 65536) as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// The peer's handle of a connection the app made to a far end.
fn far_handle(peer: &Peer, s: &TcpStream) -> u32 {
    let SocketAddr::V4(local) = s.local_addr().unwrap() else {
        unreachable!()
    };
    peer.with(|st| {
        st.conns
            .iter()
            .find(|(_, c)| c.local == local)
            .map(|(&h, _)| h)
            .unwrap()
    })
}

/// Every buffer of both pools is home again: the TX pool the app's, the RX pool the server's.
fn all_buffers_home(peer: &Peer, tx: u32, rx: u32) {
    let want_tx = BTreeMap::from([(app_endpoint(APP), tx)]);
    let want_rx = BTreeMap::from([(TCP, rx)]);
    let deadline = Instant::now() + BOUND;
    loop {
        let (t, r) = (
            peer.link.tx_pool.accounting(),
            peer.link.rx_pool.accounting(),
        );
        // The app picks returned TX buffers up when it next pumps.
        if t == want_tx && r == want_rx {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "buffers not home: tx {t:?} rx {r:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn listen_maps_the_server_answers() {
    let (stack, peer) = rig(4, 8);
    let a = TcpListener::bind_with(&stack, "0.0.0.0:0").unwrap();
    assert_eq!(
        a.local_addr().unwrap(),
        "0.0.0.0:50001".parse::<SocketAddr>().unwrap()
    );
    let b = TcpListener::listen(&stack, (KN, 80), 16).unwrap();
    assert_eq!(b.local_addr().unwrap(), SocketAddr::from((KN, 80)));
    let listen = peer.last(op::LISTEN);
    assert_eq!((listen.port, listen._reserved), (80, 16));
    assert_ne!(listen.id, 0);
    let e = TcpListener::bind_with(&stack, "0.0.0.0:80").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    assert!(e.to_string().contains("listen on 0.0.0.0:80"), "{e}");
    let e = TcpListener::bind_with(&stack, "10.0.0.1:7").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrNotAvailable, "{e}");
    let before = peer.with(|st| st.requests.len());
    let e = TcpListener::bind_with(&stack, "[::1]:7").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("IPv4 only"), "{e}");
    assert_eq!(peer.with(|st| st.requests.len()), before);
    assert!(format!("{b:?}").contains("198.18.0.2:80"), "{b:?}");
    // Dropping a listener closes it: its port is free again.
    drop(b);
    let close = peer.wait_for(
        |st| st.requests.iter().any(|r| r.op == op::CLOSE),
        |st| *st.requests.iter().rfind(|r| r.op == op::CLOSE).unwrap(),
    );
    assert_eq!(close.id, 0);
    TcpListener::bind_with(&stack, "0.0.0.0:80").unwrap();
    drop(a);
}

#[test]
fn connect_succeeds_is_refused_or_unreachable() {
    let (stack, peer) = rig(4, 8);
    let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
    assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(linux(7)));
    assert_eq!(s.local_addr().unwrap(), "198.18.0.2:50001".parse().unwrap());
    let c = peer.last(op::CONNECT);
    assert_eq!((c.socket, c.addr, c.port), (0, u32::from(LINUX), 7));
    assert_ne!(c.id, 0);

    peer.with(|st| {
        st.far.insert(8, Far::Refuse);
        st.connect_fails.insert(9, Status::NetworkUnreachable);
    });
    let e = TcpStream::connect_with(&stack, linux(8)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(e.to_string().contains("connect to 198.18.0.1:8"), "{e}");
    // The refused handle is handed back to the server.
    let h = peer.with(|st| st.by_remote(linux(8)).unwrap());
    peer.wait_for(|st| st.conns[&h].app_closed, |_| ());
    assert_eq!(peer.last(op::CLOSE).socket, h);

    let e = TcpStream::connect_with(&stack, linux(9)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NetworkUnreachable, "{e}");
    let e = TcpStream::connect_with(&stack, "[::1]:80").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // Each address in turn: the first refuses, the second answers.
    let two = [SocketAddr::V4(linux(8)), SocketAddr::V4(linux(10))];
    let s2 = TcpStream::connect_with(&stack, &two[..]).unwrap();
    assert_eq!(s2.peer_addr().unwrap(), SocketAddr::V4(linux(10)));
    drop(s);
}

#[test]
fn connect_timeout_aborts_the_half_open_connection() {
    let (stack, peer) = rig(4, 8);
    peer.with(|st| {
        st.far.insert(81, Far::Silent);
    });
    let t = Duration::from_millis(200);
    let to = SocketAddr::V4(linux(81));
    let t0 = Instant::now();
    let e = TcpStream::connect_timeout_with(&stack, &to, t).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= t && took < BOUND, "{took:?}");
    let h = peer.with(|st| st.by_remote(linux(81)).unwrap());
    peer.wait_for(|st| st.conns[&h].app_closed, |_| ());
    let abort = peer.last(op::ABORT);
    assert_eq!((abort.socket, abort.id), (h, 0));
    let e = TcpStream::connect_timeout_with(&stack, &to, Duration::ZERO).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    // A far end that answers in time connects.
    let ok = SocketAddr::V4(linux(82));
    let s = TcpStream::connect_timeout_with(&stack, &ok, Duration::from_secs(5)).unwrap();
    assert_eq!(s.peer_addr().unwrap(), ok);
}

#[test]
fn an_unanswered_connect_times_out_and_a_late_answer_is_aborted() {
    let (stack, peer) = rig(4, 8);
    stack.set_reply_timeout(Duration::from_millis(200));
    peer.with(|st| {
        st.silent_ops.insert(op::CONNECT);
    });
    let e = TcpStream::connect_with(&stack, linux(7)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("did not answer"), "{e}");
    let late = peer.answer_unanswered();
    assert_eq!(late.len(), 1);
    // The next call pumps the late reply: nobody wants that connection, so it is aborted.
    let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
    peer.wait_for(
        |st| {
            st.requests
                .iter()
                .any(|r| r.op == op::ABORT && r.socket == late[0])
        },
        |_| (),
    );
    drop(s);
}

#[test]
fn accept_and_incoming_take_connections_in_order() {
    let (stack, peer) = rig(8, 16);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:8080").unwrap();
    let froms: Vec<SocketAddrV4> = (0..4).map(|i| linux(40000 + i)).collect();
    let handles: Vec<u32> = froms
        .iter()
        .map(|&f| peer.incoming(8080, f, Far::Sink))
        .collect();
    // Data sent before the accept waits for it.
    peer.send(handles[0], b"early");
    let (mut a, from) = l.accept().unwrap();
    assert_eq!(from, SocketAddr::V4(froms[0]));
    assert_eq!(a.peer_addr().unwrap(), from);
    assert_eq!(a.local_addr().unwrap(), SocketAddr::from((KN, 8080)));
    let mut buf = [0u8; 16];
    let n = a.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"early");
    let rest: Vec<TcpStream> = l.incoming().take(3).map(Result::unwrap).collect();
    for (s, f) in rest.iter().zip(&froms[1..]) {
        assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(*f));
    }
    // What the app writes reaches the far end of that connection.
    a.write_all(b"to the first").unwrap();
    (&rest[2]).write_all(b"to the last").unwrap();
    peer.wait_for(
        |st| st.conns[&handles[3]].got == b"to the last",
        |st| assert_eq!(st.conns[&handles[0]].got, b"to the first"),
    );

    // A loopback connection to our own listener: both ends are ours.
    let c = TcpStream::connect_with(&stack, (KN, 8080)).unwrap();
    let (s, from) = l.accept().unwrap();
    assert_eq!(from, c.local_addr().unwrap());
    assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
    (&c).write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    (&s).read_exact(&mut four).unwrap();
    assert_eq!(&four, b"ping");
    (&s).write_all(b"pong").unwrap();
    (&c).read_exact(&mut four).unwrap();
    assert_eq!(&four, b"pong");
    // The client closes: the server side reads EOF.
    drop(c);
    assert_eq!((&s).read(&mut four).unwrap(), 0);
}

#[test]
fn megabytes_echo_byte_identical_and_every_buffer_comes_home() {
    const TX: u32 = 16;
    const RX: u32 = 32;
    let (stack, peer) = rig(TX, RX);
    let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    s.set_write_timeout(Some(BOUND)).unwrap();
    let data = pattern(8 << 20, 0x5a);
    let writer = {
        let (s, data) = (s.try_clone().unwrap(), data.clone());
        std::thread::spawn(move || {
            (&s).write_all(&data).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::with_capacity(data.len());
    // Odd-sized reads cut buffers at every offset.
    let mut buf = vec![0u8; 40_000];
    loop {
        let n = (&s).read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
    }
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
    let h = far_handle(&peer, &s);
    peer.with(|st| {
        assert_eq!(st.conns[&h].sent, data.len());
        assert!(st.sends >= data.len() / 65536, "{} sends", st.sends);
        assert_eq!(st.bad_sends, 0);
        assert!(st.rx_returned >= data.len() / 65536);
    });
    assert_eq!(stack.bad_events(), 0);
    // A read at EOF stays at EOF.
    assert_eq!((&s).read(&mut buf).unwrap(), 0);
    drop(s);
    all_buffers_home(&peer, TX, RX);
}

#[test]
fn bytes_in_flight_are_capped_per_connection() {
    let (stack, peer) = rig(16, 8);
    assert_eq!(stack.send_cap(), DEFAULT_SEND_CAP);
    peer.with(|st| {
        st.far.insert(9, Far::Sink);
    });
    let a = TcpStream::connect_with(&stack, linux(9)).unwrap();
    let b = TcpStream::connect_with(&stack, linux(9)).unwrap();
    let ha = far_handle(&peer, &a);
    peer.with(|st| st.conn(ha).hold_tx = true);
    a.set_nonblocking(true).unwrap();
    let chunk = vec![1u8; 65536];
    let mut written = 0;
    loop {
        match (&a).write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(written <= 16 * 65536, "never capped");
    }
    assert_eq!(written, DEFAULT_SEND_CAP);
    // One big write takes what fits under the cap at once, in several buffers.
    let big = pattern(1 << 20, 3);
    assert_eq!((&b).write(&big).unwrap(), DEFAULT_SEND_CAP);
    // The other connection still has room: a's cap did not take every buffer.
    let hb = far_handle(&peer, &b);
    peer.wait_for(|st| st.conns[&hb].got.len() == DEFAULT_SEND_CAP, |_| ());
    assert!((&b).write(&chunk).is_ok());

    // Blocking: a write timeout times out; then a blocking write parks until the peer
    // hands a's buffers back.
    a.set_nonblocking(false).unwrap();
    let t = Duration::from_millis(100);
    a.set_write_timeout(Some(t)).unwrap();
    let t0 = Instant::now();
    let e = (&a).write(&chunk).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t0.elapsed() >= t);
    a.set_write_timeout(None).unwrap();
    let parks = peer.app_parks();
    let (tx, rx) = mpsc::channel();
    let a2 = a.try_clone().unwrap();
    let writer = std::thread::spawn(move || tx.send((&a2).write(&[7u8; 10])).unwrap());
    let deadline = Instant::now() + BOUND;
    while peer.app_parks() == parks {
        assert!(Instant::now() < deadline, "the writer never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(rx.try_recv().is_err(), "wrote past the cap");
    peer.release_held(ha);
    assert_eq!(rx.recv_timeout(BOUND).unwrap().unwrap(), 10);
    writer.join().unwrap();
    peer.wait_for(
        |st| st.conns[&ha].got.len() == DEFAULT_SEND_CAP + 10,
        |_| (),
    );
    // A smaller cap applies at once.
    stack.set_send_cap(1000);
    assert_eq!(stack.send_cap(), 1000);
}

#[test]
fn read_timeout_is_timed_out_and_nonblocking_would_block() {
    let (stack, peer) = rig(4, 8);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:81").unwrap();
    let h = peer.incoming(81, linux(5000), Far::Sink);
    let (s, _) = l.accept().unwrap();
    assert_eq!(s.read_timeout().unwrap(), None);
    let t = Duration::from_millis(150);
    s.set_read_timeout(Some(t)).unwrap();
    assert_eq!(s.read_timeout().unwrap(), Some(t));
    let mut buf = [0u8; 8];
    let t0 = Instant::now();
    let e = (&s).read(&mut buf).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(took >= t && took < BOUND, "{took:?}");
    let e = s.set_read_timeout(Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = s.set_write_timeout(Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    s.set_write_timeout(Some(t)).unwrap();
    assert_eq!(s.write_timeout().unwrap(), Some(t));
    // Non-blocking wins over the timeout.
    s.set_nonblocking(true).unwrap();
    assert_eq!(
        (&s).read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
    assert_eq!(s.peek(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    l.set_nonblocking(true).unwrap();
    assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
    // Data makes it readable; peek leaves it.
    peer.send(h, b"abc");
    let deadline = Instant::now() + BOUND;
    let n = loop {
        match s.peek(&mut buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(&buf[..n], b"abc");
    assert_eq!((&s).read(&mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(
        (&s).read(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
}

#[test]
fn eof_reads_zero_after_the_data() {
    let (stack, peer) = rig(4, 8);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:82").unwrap();
    let h = peer.incoming(82, linux(5001), Far::Sink);
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    peer.send(h, b"last words");
    peer.eof(h);
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "last words");
    let mut buf = [0u8; 4];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(s.peek(&mut buf).unwrap(), 0);
    // Half-closed: the app may still write.
    s.write_all(b"bye").unwrap();
    peer.wait_for(|st| st.conns[&h].got == b"bye", |_| ());
    peer.wait_for(|st| st.rx_returned == 1, |_| ());
}

#[test]
fn a_reset_is_reported_once_then_writes_see_a_broken_pipe() {
    let (stack, peer) = rig(4, 8);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:83").unwrap();
    let h1 = peer.incoming(83, linux(5002), Far::Sink);
    let h2 = peer.incoming(83, linux(5003), Far::Sink);
    let h3 = peer.incoming(83, linux(5004), Far::Sink);
    let (s1, _) = l.accept().unwrap();
    let (s2, _) = l.accept().unwrap();
    let (s3, _) = l.accept().unwrap();
    for s in [&s1, &s2, &s3] {
        s.set_read_timeout(Some(BOUND)).unwrap();
    }
    let mut buf = [0u8; 16];

    // Reader first: the data before the reset, the reset once, then EOF; writes: EPIPE.
    peer.send(h1, b"partial");
    peer.fail(h1, Status::ConnectionReset);
    let n = (&s1).read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"partial");
    let e = (&s1).read(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert_eq!((&s1).read(&mut buf).unwrap(), 0);
    let e = (&s1).write(b"x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");

    // Writer first: the reset, then a broken pipe; the reader then sees EOF.
    peer.fail(h2, Status::ConnectionReset);
    let deadline = Instant::now() + BOUND;
    let e = loop {
        match (&s2).write(b"y") {
            Ok(n) => {
                assert_eq!(n, 1);
                assert!(Instant::now() < deadline, "the reset never showed");
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    let e = (&s2).write(b"z").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
    assert_eq!((&s2).read(&mut buf).unwrap(), 0);

    // take_error takes it; a timeout reads as TimedOut.
    peer.fail(h3, Status::TimedOut);
    let deadline = Instant::now() + BOUND;
    let e = loop {
        if let Some(e) = s3.take_error().unwrap() {
            break e;
        }
        assert!(Instant::now() < deadline, "the error never showed");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(s3.take_error().unwrap().is_none());
    assert_eq!((&s3).read(&mut buf).unwrap(), 0);
}

#[test]
fn shutdown_sends_shutdown_and_ends_each_direction() {
    let (stack, peer) = rig(4, 8);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:84").unwrap();
    let h = peer.incoming(84, linux(5005), Far::Sink);
    let (s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(BOUND)).unwrap();
    (&s).write_all(b"before").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let r = peer.last(op::SHUTDOWN);
    assert_eq!((r.socket, r._reserved), (h, shut::WRITE));
    assert_ne!(r.id, 0);
    peer.wait_for(
        |st| st.conns[&h].app_fin,
        |st| assert_eq!(st.conns[&h].got, b"before"),
    );
    let e = (&s).write(b"after").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
    // Reading still works after a half-close.
    peer.send(h, b"reply");
    let mut buf = [0u8; 16];
    let n = (&s).read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"reply");
    // Shutting the read side drops what waits (its buffers go back) and reads end.
    peer.send(h, b"unread");
    peer.wait_for(|st| st.conns[&h].outstanding > 0, |_| ());
    s.shutdown(Shutdown::Read).unwrap();
    assert_eq!(peer.last(op::SHUTDOWN)._reserved, shut::READ);
    assert_eq!((&s).read(&mut buf).unwrap(), 0);
    peer.wait_for(|st| st.conns[&h].outstanding == 0, |_| ());
    s.shutdown(Shutdown::Both).unwrap();
    assert_eq!(peer.last(op::SHUTDOWN)._reserved, shut::BOTH);
}

#[test]
fn drop_sends_close_once_the_last_handle_goes() {
    let (stack, peer) = rig(4, 8);
    let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
    let h = far_handle(&peer, &s);
    let clone = s.try_clone().unwrap();
    drop(s);
    (&clone).write_all(b"still here").unwrap();
    peer.wait_for(
        |st| st.conns[&h].sent == 10,
        |st| assert!(!st.conns[&h].app_closed),
    );
    // Unread data does not keep buffers once the stream is gone.
    peer.wait_for(|st| st.conns[&h].outstanding == 10, |_| ());
    drop(clone);
    peer.wait_for(|st| st.conns[&h].app_closed, |_| ());
    let close = peer.last(op::CLOSE);
    assert_eq!((close.socket, close.id), (h, 0));
    peer.wait_for(|st| st.conns[&h].outstanding == 0, |_| ());

    // A listener dropped with connections it never accepted resets them.
    let l = TcpListener::bind_with(&stack, "0.0.0.0:85").unwrap();
    let lh = peer.with(|st| st.listeners[&85]);
    let pending = peer.incoming(85, linux(5006), Far::Sink);
    peer.send(pending, b"never read");
    // Let the library see the ACCEPTED event and the data before the drop.
    peer.wait_for(|st| st.conns[&pending].outstanding == 10, |_| ());
    assert!(l.take_error().unwrap().is_none());
    drop(l);
    peer.wait_for(
        |st| st.conns[&pending].app_closed,
        |st| {
            let closed: Vec<(u32, u32)> = st
                .requests
                .iter()
                .filter(|r| r.op == op::CLOSE || r.op == op::ABORT)
                .map(|r| (r.op, r.socket))
                .collect();
            assert!(closed.contains(&(op::CLOSE, lh)), "{closed:?}");
            assert!(closed.contains(&(op::ABORT, pending)), "{closed:?}");
        },
    );
    // Its data went back with it.
    peer.wait_for(|st| st.conns[&pending].outstanding == 0, |_| ());
}

#[test]
fn set_nodelay_and_keepalive_send_setopt() {
    let (stack, peer) = rig(4, 8);
    let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
    let h = far_handle(&peer, &s);
    assert!(!s.nodelay().unwrap());
    s.set_nodelay(true).unwrap();
    assert!(s.nodelay().unwrap());
    let r = peer.last(op::SETOPT);
    assert_eq!((r.socket, r._reserved, r.addr), (h, sockopt::NODELAY, 1));
    assert_ne!(r.id, 0);
    s.set_keepalive(true).unwrap();
    assert!(s.keepalive().unwrap());
    let r = peer.last(op::SETOPT);
    assert_eq!((r._reserved, r.addr), (sockopt::KEEPALIVE, 1));
    s.set_nodelay(false).unwrap();
    assert_eq!(peer.last(op::SETOPT).addr, 0);
    assert!(!s.nodelay().unwrap());
}

/// Polls until `want(events)` holds (bounded).
fn poll_until(poller: &Poller, mut want: impl FnMut(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + BOUND;
    let mut events = Vec::new();
    loop {
        poller
            .poll(&mut events, Some(Duration::from_millis(50)))
            .unwrap();
        if want(&events) {
            return events;
        }
        assert!(Instant::now() < deadline, "never ready: {events:?}");
    }
}

#[test]
fn poller_tracks_the_readiness_of_200_connections() {
    const N: usize = 200;
    let (stack, peer) = rig(32, 64);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:86").unwrap();
    l.set_nonblocking(true).unwrap();
    let poller = Poller::new();
    let mut events = Vec::new();
    assert!(poller.is_empty());
    poller.register(&l, usize::MAX, Interest::READABLE).unwrap();
    let e = poller.register(&l, 1, Interest::READABLE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    // Nothing ready: the poll waits its timeout, parked.
    let parks = peer.app_parks();
    let t0 = Instant::now();
    assert_eq!(
        poller
            .poll(&mut events, Some(Duration::from_millis(60)))
            .unwrap(),
        0
    );
    assert!(t0.elapsed() >= Duration::from_millis(60));
    assert!(peer.app_parks() > parks, "the poll never parked");

    let far: Vec<u32> = (0..N)
        .map(|i| peer.incoming(86, linux(20000 + i as u16), Far::Sink))
        .collect();
    let ev = poll_until(&poller, |e| !e.is_empty());
    assert_eq!(
        ev,
        vec![Event {
            token: usize::MAX,
            readable: true,
            writable: false,
            error: false,
            hup: false
        }]
    );
    let mut conns: HashMap<usize, TcpStream> = HashMap::new();
    while conns.len() < N {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true).unwrap();
                poller
                    .register(&s, conns.len(), Interest::READABLE)
                    .unwrap();
                conns.insert(conns.len(), s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                poll_until(&poller, |e| !e.is_empty());
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(poller.len(), N + 1);
    assert_eq!(poller.poll(&mut events, Some(Duration::ZERO)).unwrap(), 0);
    // Token i is connection i, accepted in the order they came.
    let token_of = |h: u32| far.iter().position(|&f| f == h).unwrap();

    // Data on every 7th: exactly those are readable.
    let chosen: HashSet<usize> = (0..N).step_by(7).collect();
    for &i in &chosen {
        peer.send(far[i], format!("message {i}").as_bytes());
    }
    let ev = poll_until(&poller, |e| e.len() == chosen.len());
    let ready: HashSet<usize> = ev.iter().map(|e| e.token).collect();
    assert_eq!(ready, chosen);
    assert!(ev.iter().all(|e| e.readable && !e.writable && !e.hup));
    // Level-triggered: still ready until read.
    assert_eq!(
        poller.poll(&mut events, Some(Duration::ZERO)).unwrap(),
        chosen.len()
    );
    for &i in &chosen {
        let mut buf = [0u8; 32];
        let n = (&conns[&i]).read(&mut buf).unwrap();
        assert_eq!(&buf[..n], format!("message {i}").as_bytes());
    }
    assert_eq!(poller.poll(&mut events, Some(Duration::ZERO)).unwrap(), 0);

    // Writable: every connection has room, but one held at its cap.
    for (&i, s) in &conns {
        poller
            .reregister(s, i, Interest::READABLE | Interest::WRITABLE)
            .unwrap();
    }
    let ev = poll_until(&poller, |e| e.len() == N);
    assert!(ev.iter().all(|e| e.writable && !e.readable));
    peer.with(|st| st.conn(far[3]).hold_tx = true);
    let big = vec![0u8; DEFAULT_SEND_CAP];
    assert_eq!((&conns[&3]).write(&big).unwrap(), DEFAULT_SEND_CAP);
    let ev = poll_until(&poller, |e| e.len() == N - 1);
    assert!(!ev.iter().any(|e| e.token == 3));
    peer.release_held(far[3]);
    poll_until(&poller, |e| e.len() == N);

    // EOF and errors show, whatever the interest; dropped sockets are forgotten.
    for (&i, s) in &conns {
        poller.reregister(s, i, Interest::READABLE).unwrap();
    }
    peer.eof(far[10]);
    peer.fail(far[11], Status::ConnectionReset);
    let ev = poll_until(&poller, |e| e.len() == 2);
    let by: HashMap<usize, Event> = ev.iter().map(|e| (e.token, *e)).collect();
    assert!(by[&10].readable && by[&10].hup && !by[&10].error);
    assert!(by[&11].readable && by[&11].hup && by[&11].error);
    assert_eq!(token_of(far[10]), 10);
    poller.deregister(&conns[&10]).unwrap();
    assert_eq!(
        poller.deregister(&conns[&10]).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    drop(conns.remove(&11));
    assert_eq!(poller.poll(&mut events, Some(Duration::ZERO)).unwrap(), 0);
    assert_eq!(poller.len(), N - 1);
}

#[test]
fn a_parked_poll_wakes_when_data_arrives() {
    let (stack, peer) = rig(4, 8);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:87").unwrap();
    let h = peer.incoming(87, linux(5007), Far::Sink);
    let (s, _) = l.accept().unwrap();
    let poller = std::sync::Arc::new(Poller::new());
    poller.register(&s, 42, Interest::READABLE).unwrap();
    let (tx, rx) = mpsc::channel();
    let p = std::sync::Arc::clone(&poller);
    let t = std::thread::spawn(move || {
        let mut events = Vec::new();
        let n = p.poll(&mut events, None).unwrap();
        tx.send((n, events)).unwrap();
    });
    let parks = peer.app_parks();
    let deadline = Instant::now() + BOUND;
    while peer.app_parks() == parks {
        assert!(Instant::now() < deadline, "the poll never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(rx.try_recv().is_err());
    peer.send(h, b"wake");
    let (n, events) = rx.recv_timeout(BOUND).unwrap();
    assert_eq!(n, 1);
    assert_eq!(events[0].token, 42);
    assert!(events[0].readable);
    t.join().unwrap();
    // A poller takes the sockets of one attachment only.
    let (other, _peer2) = rig(4, 8);
    let l2 = TcpListener::bind_with(&other, "0.0.0.0:88").unwrap();
    let e = poller.register(&l2, 1, Interest::READABLE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn a_poll_driven_echo_serves_many_connections_from_one_thread() {
    const N: usize = 120;
    let (stack, peer) = rig(32, 64);
    let l = TcpListener::bind_with(&stack, "0.0.0.0:7").unwrap();
    l.set_nonblocking(true).unwrap();
    let poller = Poller::new();
    poller.register(&l, 0, Interest::READABLE).unwrap();
    let far: Vec<u32> = (0..N)
        .map(|i| peer.incoming(7, linux(30000 + i as u16), Far::Sink))
        .collect();
    let msgs: Vec<Vec<u8>> = (0..N).map(|i| pattern(1000 + 997 * i, i as u8)).collect();
    for (h, m) in far.iter().zip(&msgs) {
        peer.send(*h, m);
        peer.eof(*h);
    }
    let mut conns: HashMap<usize, TcpStream> = HashMap::new();
    let mut next = 1;
    let mut finished = 0;
    let mut events = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + BOUND;
    while finished < N {
        assert!(Instant::now() < deadline, "{finished} of {N} finished");
        poller
            .poll(&mut events, Some(Duration::from_millis(100)))
            .unwrap();
        for ev in &events {
            if ev.token == 0 {
                while let Ok((s, _)) = l.accept() {
                    poller.register(&s, next, Interest::READABLE).unwrap();
                    conns.insert(next, s);
                    next += 1;
                }
                continue;
            }
            let s = &conns[&ev.token];
            let n = s.try_clone().unwrap().read(&mut buf).unwrap();
            if n == 0 {
                poller.deregister(s).unwrap();
                conns.remove(&ev.token);
                finished += 1;
            } else {
                (&*s).write_all(&buf[..n]).unwrap();
            }
        }
    }
    peer.wait_for(
        |st| far.iter().all(|h| st.conns[h].app_closed),
        |st| {
            for (h, m) in far.iter().zip(&msgs) {
                assert!(st.conns[h].got == *m, "connection {h} got other bytes");
            }
        },
    );
}

#[test]
fn threads_each_with_their_connection_all_get_their_bytes() {
    let (stack, peer) = rig(16, 32);
    let threads: Vec<_> = (0..6u8)
        .map(|i| {
            let stack = std::sync::Arc::clone(&stack);
            std::thread::spawn(move || {
                let s = TcpStream::connect_with(&stack, linux(7)).unwrap();
                s.set_read_timeout(Some(BOUND)).unwrap();
                let data = pattern(300_000 + usize::from(i) * 1000, i);
                let w = s.try_clone().unwrap();
                let d2 = data.clone();
                let writer = std::thread::spawn(move || (&w).write_all(&d2).unwrap());
                let mut back = vec![0u8; data.len()];
                (&s).read_exact(&mut back).unwrap();
                writer.join().unwrap();
                assert!(back == data, "thread {i} got other bytes");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(peer.with(|st| st.bad_sends), 0);
}

#[test]
fn attaching_tcp_to_an_instance_that_is_not_running_is_not_found() {
    let name = format!("kn-test-absent-tcp-{}", std::process::id());
    let e = TcpStack::attach(&name).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&name), "{e}");
}
