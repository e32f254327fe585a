//! UdpSocket over an application region, against a stand-in udp server (tests/peer).

mod peer;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keepnet_ipc::Descriptor;
use keepnet_server::app::{event, op, AppEvent, Status, APP_RX_POOL, APP_TX_POOL};
use keepnet_sockets::{Stack, UdpSocket};
use peer::{rig, BOUND, KN};

const LINUX: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 5000);

#[test]
fn bind_maps_the_server_answers() {
    let (stack, peer) = rig(4, 8);
    let a = UdpSocket::bind_with(&stack, "0.0.0.0:0").unwrap();
    assert_eq!(
        a.local_addr().unwrap(),
        "0.0.0.0:49153".parse::<SocketAddr>().unwrap()
    );
    let b = UdpSocket::bind_with(&stack, (KN, 53)).unwrap();
    assert_eq!(b.local_addr().unwrap(), SocketAddr::from((KN, 53)));
    let e = UdpSocket::bind_with(&stack, "0.0.0.0:53").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrInUse, "{e}");
    let e = UdpSocket::bind_with(&stack, "10.0.0.1:7").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddrNotAvailable, "{e}");
    peer.with(|st| {
        st.bind_fails.insert(60, Status::NoSockets);
        st.bind_fails.insert(61, Status::InvalidInput);
    });
    let e = UdpSocket::bind_with(&stack, "0.0.0.0:60").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    assert!(e.to_string().contains("socket table"), "{e}");
    let e = UdpSocket::bind_with(&stack, "0.0.0.0:61").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    // IPv6 never reaches the server.
    let before = peer.with(|st| st.requests.len());
    let e = UdpSocket::bind_with(&stack, "[::1]:7").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("IPv4 only"), "{e}");
    // Every bind so far carried a fresh non-zero id and the address asked for.
    peer.wait_for(
        |st| st.requests.len() >= before,
        |st| {
            let binds: Vec<_> = st.requests.iter().filter(|r| r.op == op::BIND).collect();
            assert_eq!(binds.len(), 6);
            let mut ids: Vec<u32> = binds.iter().map(|r| r.id).collect();
            assert!(ids.iter().all(|&i| i != 0));
            ids.dedup();
            assert_eq!(ids.len(), 6);
            assert_eq!((binds[1].addr, binds[1].port), (u32::from(KN), 53));
        },
    );
    drop((a, b));
}

#[test]
fn an_unanswered_bind_times_out_and_a_late_answer_is_closed() {
    let (stack, peer) = rig(4, 8);
    stack.set_reply_timeout(Duration::from_millis(200));
    peer.with(|st| {
        st.silent_ports.insert(999);
    });
    let t0 = Instant::now();
    let e = UdpSocket::bind_with(&stack, "0.0.0.0:999").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // The server answers after all: the library closes the socket nobody holds.
    let late = peer.answer_unanswered();
    assert_eq!(late.len(), 1);
    let other = UdpSocket::bind_with(&stack, "0.0.0.0:0").unwrap();
    peer.wait_for(|st| st.closes.contains(&late[0]), |_| ());
    drop(other);
}

/// The server's handle of `s`, read off a SEND it makes.
fn server_handle(peer: &peer::Peer, s: &UdpSocket) -> u32 {
    let n = peer.with(|st| st.sends.len());
    s.send_to(b"?", LINUX).unwrap();
    peer.wait_for(|st| st.sends.len() > n, |st| st.sends[n].req.socket)
}

#[test]
fn send_to_puts_the_payload_in_a_tx_buffer() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4000").unwrap();
    assert_eq!(s.send_to(b"hello", "198.18.0.1:9000").unwrap(), 5);
    let sent = peer.wait_for(|st| st.sends.len() == 1, |st| st.sends[0].clone());
    assert_eq!(sent.payload, b"hello");
    assert_eq!(sent.req.op, op::SEND);
    assert_eq!(sent.req.id, 0, "SEND wants no reply");
    assert_eq!(sent.req.addr, u32::from(Ipv4Addr::new(198, 18, 0, 1)));
    assert_eq!(sent.req.port, 9000);
    assert_eq!(sent.req.desc.pool, APP_TX_POOL);
    assert_eq!(sent.req.desc.len, 5);
    let bind = peer.with(|st| st.requests[0]);
    assert_eq!(bind.op, op::BIND);
    // Buffers come back and are used again: many more sends than the pool has buffers.
    for i in 0..40u32 {
        s.send_to(&i.to_be_bytes(), LINUX).unwrap();
    }
    peer.wait_for(
        |st| st.sends.len() == 41,
        |st| {
            for (i, x) in st.sends[1..].iter().enumerate() {
                assert_eq!(x.payload, (i as u32).to_be_bytes());
                assert_eq!(x.req.socket, sent.req.socket);
            }
        },
    );
    // IPv6 destinations are refused; a name resolving to IPv4 works.
    let e = s.send_to(b"x", "[::1]:7").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("IPv4 only"), "{e}");
}

#[test]
fn recv_from_returns_a_datagram_and_hands_the_buffer_back() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4001").unwrap();
    let h = server_handle(&peer, &s);
    peer.deliver(h, LINUX, b"from linux");
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from linux");
    assert_eq!(from, SocketAddr::V4(LINUX));
    peer.wait_for(|st| st.rx_returned == 1, |_| ());
    // Every RX buffer is the server's again.
    let acct = peer.link.rx_pool.accounting();
    assert_eq!(acct.len(), 1, "{acct:?}");
    // recv (no source) too.
    peer.deliver(h, LINUX, b"two");
    assert_eq!(s.recv(&mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], b"two");
    peer.wait_for(|st| st.rx_returned == 2, |_| ());
}

#[test]
fn a_long_datagram_is_truncated_and_its_rest_discarded() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4002").unwrap();
    let h = server_handle(&peer, &s);
    let long: Vec<u8> = (0..100u8).collect();
    peer.deliver(h, LINUX, &long);
    peer.deliver(h, LINUX, b"next");
    let mut small = [0u8; 10];
    let (n, _) = s.recv_from(&mut small).unwrap();
    assert_eq!(n, 10);
    assert_eq!(&small[..], &long[..10]);
    let n = s.recv(&mut small).unwrap();
    assert_eq!(&small[..n], b"next");
    peer.wait_for(|st| st.rx_returned == 2, |_| ());
}

#[test]
fn peek_does_not_consume() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4003").unwrap();
    let h = server_handle(&peer, &s);
    peer.deliver(h, LINUX, b"abc");
    let mut buf = [0u8; 8];
    assert_eq!(s.peek_from(&mut buf).unwrap(), (3, SocketAddr::V4(LINUX)));
    assert_eq!(s.peek_from(&mut buf).unwrap().0, 3);
    let mut two = [0u8; 2];
    assert_eq!(s.peek(&mut two).unwrap(), 2);
    assert_eq!(&two, b"ab");
    assert_eq!(peer.with(|st| st.rx_returned), 0);
    assert_eq!(s.recv_from(&mut buf).unwrap(), (3, SocketAddr::V4(LINUX)));
    assert_eq!(&buf[..3], b"abc");
    s.set_nonblocking(true).unwrap();
    assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    assert_eq!(s.peek(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    peer.wait_for(|st| st.rx_returned == 1, |_| ());
}

#[test]
fn read_timeout_is_timed_out_and_nonblocking_would_block() {
    let (stack, _peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4004").unwrap();
    assert_eq!(s.read_timeout().unwrap(), None);
    let t = Duration::from_millis(150);
    s.set_read_timeout(Some(t)).unwrap();
    assert_eq!(s.read_timeout().unwrap(), Some(t));
    let mut buf = [0u8; 8];
    let t0 = Instant::now();
    let e = s.recv_from(&mut buf).unwrap_err();
    let took = t0.elapsed();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(
        took >= t,
        "returned after {took:?}, before the {t:?} timeout"
    );
    assert!(took < BOUND, "took {took:?}");
    // Zero timeouts are refused, as in std.
    let e = s.set_read_timeout(Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let e = s.set_write_timeout(Some(Duration::ZERO)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    s.set_write_timeout(Some(t)).unwrap();
    assert_eq!(s.write_timeout().unwrap(), Some(t));
    // Non-blocking wins over the timeout.
    s.set_nonblocking(true).unwrap();
    let e = s.recv_from(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    assert_eq!(
        s.peek_from(&mut buf).unwrap_err().kind(),
        ErrorKind::WouldBlock
    );
}

#[test]
fn connection_refused_is_reported_once() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4005").unwrap();
    assert_eq!(s.peer_addr().unwrap_err().kind(), ErrorKind::NotConnected);
    assert_eq!(s.send(b"x").unwrap_err().kind(), ErrorKind::NotConnected);
    let h = server_handle(&peer, &s);
    s.connect(LINUX).unwrap();
    assert_eq!(s.peer_addr().unwrap(), SocketAddr::V4(LINUX));
    let connect = peer.with(|st| *st.requests.iter().rfind(|r| r.op == op::CONNECT).unwrap());
    assert_eq!((connect.socket, connect.port), (h, LINUX.port()));
    assert_ne!(connect.id, 0);
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 8];

    // On receive.
    peer.error(h, Status::ConnectionRefused);
    let e = s.recv(&mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);

    // On send; the send after it goes out, to the connected peer (0/0 on the ring).
    peer.error(h, Status::ConnectionRefused);
    let e = s.send(b"lost").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(s.send(b"sent").unwrap(), 4);
    let sent = peer.wait_for(
        |st| st.sends.last().is_some_and(|x| x.payload == b"sent"),
        |st| st.sends.last().unwrap().clone(),
    );
    assert_eq!((sent.req.addr, sent.req.port), (0, 0));
    assert!(peer.with(|st| st.sends.iter().all(|x| x.payload != b"lost")));

    // take_error takes it.
    peer.error(h, Status::ConnectionRefused);
    let e = s.take_error().unwrap().unwrap();
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    assert!(s.take_error().unwrap().is_none());

    // 0.0.0.0:0 dissolves the association.
    s.connect("0.0.0.0:0").unwrap();
    assert_eq!(s.peer_addr().unwrap_err().kind(), ErrorKind::NotConnected);
    let e = s.connect("[::1]:9").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}

#[test]
fn send_blocks_until_tx_buffers_come_back() {
    let (stack, peer) = rig(2, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4006").unwrap();
    peer.with(|st| st.hold_tx = true);
    s.send_to(b"one", LINUX).unwrap();
    s.send_to(b"two", LINUX).unwrap();
    peer.wait_for(|st| st.sends.len() == 2, |_| ());
    // Pool exhausted: non-blocking says so, a write timeout times out.
    s.set_nonblocking(true).unwrap();
    let e = s.send_to(b"three", LINUX).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}");
    s.set_nonblocking(false).unwrap();
    let t = Duration::from_millis(100);
    s.set_write_timeout(Some(t)).unwrap();
    let t0 = Instant::now();
    let e = s.send_to(b"three", LINUX).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
    assert!(t0.elapsed() >= t);
    s.set_write_timeout(None).unwrap();

    // A blocking send parks and completes once the peer hands buffers back.
    let parks = peer.app_parks();
    let (tx, rx) = mpsc::channel();
    let s2 = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || tx.send(s2.send_to(b"three", LINUX)).unwrap());
    let deadline = Instant::now() + BOUND;
    while peer.app_parks() == parks {
        assert!(Instant::now() < deadline, "the sender never parked");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        rx.try_recv().is_err(),
        "the send completed with no buffer free"
    );
    assert_eq!(peer.with(|st| st.sends.len()), 2);
    peer.release_held();
    assert_eq!(rx.recv_timeout(BOUND).unwrap().unwrap(), 5);
    sender.join().unwrap();
    peer.wait_for(
        |st| st.sends.len() == 3,
        |st| assert_eq!(st.sends[2].payload, b"three"),
    );
}

#[test]
fn a_payload_too_long_is_invalid_input() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4007").unwrap();
    let big = vec![7u8; 65508];
    let e = s.send_to(&big, LINUX).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("65507"), "{e}");
    s.connect(LINUX).unwrap();
    assert_eq!(s.send(&big).unwrap_err().kind(), ErrorKind::InvalidInput);
    // The largest one goes out whole, and nothing before it did.
    assert_eq!(s.send_to(&big[..65507], LINUX).unwrap(), 65507);
    peer.wait_for(
        |st| !st.sends.is_empty(),
        |st| {
            assert_eq!(st.sends.len(), 1);
            assert_eq!(st.sends[0].payload.len(), 65507);
            assert!(st.sends[0].payload.iter().all(|&b| b == 7));
        },
    );
}

#[test]
fn drop_sends_close_once_the_last_handle_goes() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:7").unwrap();
    let h = server_handle(&peer, &s);
    let clone = s.try_clone().unwrap();
    drop(s);
    // Still open: a send after the drop reaches the server with no CLOSE before it.
    clone.send_to(b"still here", LINUX).unwrap();
    peer.wait_for(
        |st| st.sends.iter().any(|x| x.payload == b"still here"),
        |st| assert!(st.closes.is_empty()),
    );
    drop(clone);
    let close = peer.wait_for(
        |st| !st.closes.is_empty(),
        |st| *st.requests.iter().rfind(|r| r.op == op::CLOSE).unwrap(),
    );
    assert_eq!((close.socket, close.id), (h, 0));
    // The port is free again.
    let again = UdpSocket::bind_with(&stack, "0.0.0.0:7").unwrap();
    assert_eq!(again.local_addr().unwrap().port(), 7);
}

#[test]
fn datagrams_for_closed_sockets_and_forged_descriptors_are_handled() {
    let (stack, peer) = rig(4, 8);
    let s = UdpSocket::bind_with(&stack, "0.0.0.0:4008").unwrap();
    s.set_nonblocking(true).unwrap();
    // A socket this app does not have: the buffer goes straight back.
    peer.deliver(4242, LINUX, b"stray");
    let mut buf = [0u8; 8];
    assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    peer.wait_for(|st| st.rx_returned == 1, |_| ());
    // A descriptor out of range is refused, counted, and nothing breaks.
    let h = server_handle(&peer, &s);
    peer.event(AppEvent {
        kind: event::DATAGRAM,
        socket: h,
        desc: Descriptor {
            pool: APP_RX_POOL,
            index: 1 << 20,
            len: 4,
            ..Descriptor::default()
        },
        ..AppEvent::default()
    });
    assert_eq!(s.recv(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    assert_eq!(stack.bad_events(), 1);
    peer.deliver(h, LINUX, b"fine");
    assert_eq!(s.recv(&mut buf).unwrap(), 4);
}

#[test]
fn threads_waiting_on_different_sockets_all_get_theirs() {
    let (stack, peer) = rig(4, 16);
    let socks: Vec<UdpSocket> = (0..3)
        .map(|i| UdpSocket::bind_with(&stack, ("0.0.0.0", 5000 + i)).unwrap())
        .collect();
    let handles: Vec<u32> = socks.iter().map(|s| server_handle(&peer, s)).collect();
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = socks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (s, tx) = (s.try_clone().unwrap(), tx.clone());
            s.set_read_timeout(Some(BOUND)).unwrap();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..5 {
                    let mut buf = [0u8; 16];
                    let n = s.recv(&mut buf).unwrap();
                    got.push(buf[..n].to_vec());
                }
                tx.send((i, got)).unwrap();
            })
        })
        .collect();
    // Interleave deliveries to all three, in reverse order of the threads.
    for k in 0..5u8 {
        for (i, &h) in handles.iter().enumerate().rev() {
            peer.deliver(h, LINUX, &[i as u8, k]);
        }
    }
    for _ in 0..3 {
        let (i, got) = rx.recv_timeout(BOUND).unwrap();
        let want: Vec<Vec<u8>> = (0..5u8).map(|k| vec![i as u8, k]).collect();
        assert_eq!(got, want);
    }
    for t in threads {
        t.join().unwrap();
    }
    peer.wait_for(|st| st.rx_returned == 15, |_| ());
}

#[test]
fn attaching_to_an_instance_that_is_not_running_is_not_found() {
    let name = format!("kn-test-absent-{}", std::process::id());
    let e = Stack::attach(&name).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains(&name), "{e}");
    assert_eq!(
        Stack::attach("../etc").unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}
