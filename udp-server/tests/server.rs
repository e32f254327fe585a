//! The udp server in-process over real regions: the test plays the ip server on the
//! transport link and applications on their regions, and drives `poll` itself.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::*;
use keepnet_ipc::fdpass::send_fds;
use keepnet_ipc::{Descriptor, Region, RegionKind, Ring};
use keepnet_server::app::{event, op, AppLink, AppRequest, Hotplug, Status, APP_HEADROOM};
use keepnet_server::wiring::{DatagramSlot, TransportLink, UDP};
use keepnet_server::{ControlBlock, Server};
use keepnet_udp::engine::Config;
use keepnet_udp::{SocketTable, UdpServer};

struct Rig {
    control: ControlBlock,
    ip_control: ControlBlock,
    table: SocketTable,
    ip: IpSide,
    server: UdpServer,
    name: String,
}

fn rig(
    name: &str,
    rcvbuf: u32,
    buffers: u32,
    hotplug: Option<std::os::unix::net::UnixStream>,
) -> Rig {
    let control = ControlBlock::create(&format!("{name}-udp"), 4096).unwrap();
    let ip_control = ControlBlock::create(&format!("{name}-ip"), 4096).unwrap();
    let tlink = TransportLink::create(&format!("{name}-t"), 17, UDP, buffers).unwrap();
    let table = SocketTable::create(&format!("{name}-state"), 64).unwrap();
    let ip = IpSide::new(&tlink);
    let mut cfg = Config::new(OUR);
    cfg.rcvbuf = rcvbuf;
    let server = UdpServer::new(
        cfg,
        TransportLink::open(tlink.region().reopen(RegionKind::RINGS).unwrap()).unwrap(),
        SocketTable::open(table.region().reopen(RegionKind::GENERIC).unwrap()).unwrap(),
        Some(ip_control.doorbell().clone()),
        hotplug.map(|s| keepnet_server::app::HotplugSocket::new(s.into()).unwrap()),
        &control,
    )
    .unwrap();
    Rig {
        control,
        ip_control,
        table,
        ip,
        server,
        name: name.into(),
    }
}

impl Rig {
    fn app_link(&self, app: u32) -> AppLink {
        AppLink::create(&format!("{}-app{app}", self.name), app, 17, UDP, 8, 16).unwrap()
    }

    /// A new application, attached directly (as the hotplug path does).
    fn app(&mut self, app: u32) -> AppSide {
        let link = self.app_link(app);
        let region = link.region().reopen(RegionKind::RINGS).unwrap();
        assert!(self.server.attach(app, std::process::id(), region).unwrap());
        AppSide::new(&link, link.server_bell().unwrap())
    }

    /// Polls until the server has nothing left to do (bounded).
    fn run(&mut self) {
        for _ in 0..64 {
            let p = self.server.poll().expect("poll");
            if p.0 == 0 && !self.server.has_work() {
                return;
            }
        }
        panic!("the server did not settle in 64 polls");
    }

    fn counter(&self, name: &str) -> u64 {
        self.control
            .counters()
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| v)
    }

    #[track_caller]
    fn bind(&mut self, app: &mut AppSide, addr: Ipv4Addr, port: u16) -> Result<(u32, u16), Status> {
        let id = app.bind_req(addr, port);
        self.run();
        let r = app.reply(id).expect("a reply to bind");
        match Status::from_code(r.status) {
            Status::Ok => Ok((r.socket, r.port)),
            s => Err(s),
        }
    }
}

fn to(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn bind_send_and_deliver_over_the_rings() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-basic", 64, 16, None);
    let mut a = r.app(1);
    let (s, port) = r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 7).unwrap();
    assert_eq!(port, 7);
    assert_eq!(
        r.table.entries().len(),
        1,
        "the socket is in the shared table"
    );
    assert_eq!(r.counter("sockets"), 1);

    // Send: a UDP datagram appears on `send`, with a checksum that verifies, and the ip
    // server (parked: its bell armed) is woken.
    r.ip_control.doorbell().arm();
    let wakes = r.ip_control.doorbell().wakes();
    let id = a.send(s, to(PEER, 53), b"question", true);
    r.run();
    assert_eq!(
        r.ip_control.doorbell().wakes(),
        wakes + 1,
        "the ip server was woken once"
    );
    assert_eq!(Status::from_code(a.reply(id).unwrap().status), Status::Ok);
    let sent = r.ip.take_sends();
    assert_eq!(sent.len(), 1);
    let (slot, bytes) = &sent[0];
    assert_eq!(slot.kind, DatagramSlot::KIND_DATAGRAM);
    assert_eq!(
        (slot.protocol, slot.dst, slot.src),
        (17, u32::from(PEER), u32::from(OUR))
    );
    assert_eq!(&bytes[0..2], &7u16.to_be_bytes());
    assert_eq!(&bytes[2..4], &53u16.to_be_bytes());
    assert_eq!(
        usize::from(u16::from_be_bytes([bytes[4], bytes[5]])),
        bytes.len()
    );
    assert_eq!(&bytes[8..], b"question");
    assert!(udp_checksum_ok(OUR, PEER, bytes), "checksum verifies");
    // The app's TX buffer came back.
    r.run();
    a.collect_tx();
    assert_eq!(a.tx_free.len(), 8);

    // Deliver: a DATAGRAM event with the payload and the source.
    assert!(r.ip.deliver(to(PEER, 5353), to(OUR, 7), b"answer", true));
    r.run();
    let got = a.datagrams();
    assert_eq!(got.len(), 1);
    let (ev, buf, payload) = &got[0];
    assert_eq!((ev.socket, ev.addr, ev.port), (s, u32::from(PEER), 5353));
    assert_eq!(payload, b"answer");
    assert_eq!(buf.offset(), APP_HEADROOM);
    a.give_back(buf);
    r.run();
    assert_eq!(r.ip.collect(), 1, "the DELIVER_POOL buffer went home");

    // A datagram without the IP header in the headroom is delivered just the same.
    assert!(r.ip.deliver(to(PEER, 5353), to(OUR, 7), b"bare", false));
    r.run();
    let got = a.datagrams();
    assert_eq!(got[0].2, b"bare");
    a.give_back(&got[0].1);
    r.run();

    // Every buffer is home: the link's pools, and the app's.
    r.ip.collect();
    r.ip.take_sends();
    r.run();
    assert_eq!(r.ip.link.deliver_pool.accounting().len(), 1);
    assert_eq!(r.ip.link.send_pool.accounting().get(&UDP), Some(&16));
    assert_eq!(a.link.rx_pool.accounting().get(&UDP), Some(&16));
    assert_eq!(r.counter("rx.delivered"), 2);
    assert_eq!(r.counter("tx.datagrams"), 1);
}

#[test]
fn closed_port_answers_with_an_unreachable_quoting_the_header() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-unreach", 64, 16, None);
    let _a = r.app(1);
    let d = datagram(to(PEER, 40000), to(OUR, 9), b"anyone?");
    let h = ip_header(PEER, OUR, d.len());
    assert!(r.ip.deliver(to(PEER, 40000), to(OUR, 9), b"anyone?", true));
    r.run();
    let sent = r.ip.take_sends();
    assert_eq!(sent.len(), 1);
    let (slot, quote) = &sent[0];
    assert_eq!(slot.kind, DatagramSlot::KIND_UNREACHABLE);
    assert_eq!((slot.icmp_code, slot.protocol), (3, 17));
    assert_eq!(slot.dst, u32::from(PEER));
    assert_eq!(&quote[..20], &h[..], "the original IP header");
    assert_eq!(&quote[20..], &d[..], "then the original datagram");
    assert_eq!(r.counter("icmp.unreach_sent"), 1);
    assert_eq!(r.counter("drop.no_socket"), 1);
    // Not for a broadcast.
    assert!(r
        .ip
        .deliver(to(PEER, 40000), to(Ipv4Addr::BROADCAST, 9), b"all?", true));
    r.run();
    assert!(r.ip.take_sends().is_empty());
    assert_eq!(r.counter("icmp.unreach_suppressed"), 1);
    assert_eq!(r.counter("drop.no_socket"), 2);
}

#[test]
fn receive_queue_overflow_is_counted_and_returns_make_room() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-rcvbuf", 2, 16, None);
    let mut a = r.app(1);
    let (s, _) = r.bind(&mut a, OUR, 700).unwrap();
    for i in 0..3u8 {
        assert!(r.ip.deliver(to(PEER, 1), to(OUR, 700), &[i], true));
    }
    r.run();
    let got = a.datagrams();
    assert_eq!(
        got.iter().map(|g| g.2.clone()).collect::<Vec<_>>(),
        vec![vec![0], vec![1]]
    );
    assert_eq!(r.counter("drop.rcvbuf_full"), 1);
    assert_eq!(r.server.engine().socket(s).unwrap().queued, 2);
    // One handed back: room for one more.
    a.give_back(&got[0].1);
    r.run();
    assert!(r.ip.deliver(to(PEER, 1), to(OUR, 700), &[3], true));
    assert!(r.ip.deliver(to(PEER, 1), to(OUR, 700), &[4], true));
    r.run();
    let more = a.datagrams();
    assert_eq!(more.len(), 1);
    assert_eq!(more[0].2, vec![3]);
    assert_eq!(r.counter("drop.rcvbuf_full"), 2);
}

#[test]
fn detach_frees_the_port_and_hotplug_attaches_idempotently() {
    watchdog(Duration::from_secs(60));
    let (sup, srv) = seqpacket_pair();
    let mut r = rig("t-udp-hotplug", 64, 16, Some(srv));
    let link1 = r.app_link(1);
    let link2 = r.app_link(2);
    let attach = |app: u32, link: &AppLink| {
        let m = serde_json::to_vec(&Hotplug::Attach { app, pid: 1 }).unwrap();
        send_fds(&sup, &m, &[link.region().fd()]).unwrap();
    };
    attach(1, &link1);
    attach(1, &link1); // idempotent
    attach(2, &link2);
    assert_eq!(r.server.hotplug().unwrap(), 3);
    assert_eq!(r.server.attached(), vec![1, 2]);
    let mut a1 = AppSide::new(&link1, link1.server_bell().unwrap());
    let mut a2 = AppSide::new(&link2, link2.server_bell().unwrap());
    r.bind(&mut a1, Ipv4Addr::UNSPECIFIED, 5000).unwrap();
    r.bind(&mut a1, Ipv4Addr::UNSPECIFIED, 5001).unwrap();
    assert_eq!(r.bind(&mut a2, OUR, 5000), Err(Status::AddrInUse));

    // Garbage, a region of the wrong app, an attach without its fd: refused and counted.
    sup_send(&sup, b"{\"op\":\"bogus\"}");
    let m = serde_json::to_vec(&Hotplug::Attach { app: 3, pid: 1 }).unwrap();
    send_fds(&sup, &m, &[link1.region().fd()]).unwrap();
    sup_send(&sup, &m);
    // Detach: ports are free at once, the region is dropped.
    sup_send(
        &sup,
        &serde_json::to_vec(&Hotplug::Detach { app: 1 }).unwrap(),
    );
    assert_eq!(r.server.hotplug().unwrap(), 4);
    assert_eq!(r.counter("hotplug.bad"), 3);
    assert_eq!(r.server.attached(), vec![2]);
    assert!(r.table.entries().iter().all(|e| e.record.app != 1));
    r.bind(&mut a2, OUR, 5000).unwrap();
    // Live: app 2 is not among the living.
    sup_send(
        &sup,
        &serde_json::to_vec(&Hotplug::Live { apps: vec![7] }).unwrap(),
    );
    assert_eq!(r.server.hotplug().unwrap(), 1);
    assert!(r.server.attached().is_empty());
    assert!(r.table.entries().is_empty());
    assert_eq!(r.counter("apps"), 0);
    assert_eq!(r.counter("sockets"), 0);
}

fn sup_send(sup: &std::os::unix::net::UnixStream, bytes: &[u8]) {
    send_fds(sup, bytes, &[]).unwrap();
}

#[test]
fn garbage_from_an_app_is_counted_and_a_corrupt_ring_detaches_it() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-garbage", 64, 16, None);
    let mut a = r.app(1);
    let mut b = r.app(2);
    let (s, _) = r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 6000).unwrap();
    r.bind(&mut b, Ipv4Addr::UNSPECIFIED, 6001).unwrap();
    // A send naming a buffer out of range, and one with a forged lease (a buffer the app
    // does not hold, or one it sent already).
    let bad = Descriptor {
        pool: 5,
        index: 999,
        ..Descriptor::default()
    };
    let req = |desc| AppRequest {
        op: op::SEND,
        socket: s,
        addr: u32::from(PEER),
        port: 9,
        desc,
        ..AppRequest::default()
    };
    let id1 = a.push(req(bad), true);
    let forged = Descriptor {
        lease: 9,
        ..a.link.tx_pool.descriptor(0, 4)
    };
    let id2 = a.push(req(forged), true);
    // An unknown op; a send on another app's socket.
    let id3 = a.push(
        AppRequest {
            op: 77,
            ..AppRequest::default()
        },
        true,
    );
    r.run();
    assert_eq!(
        Status::from_code(a.reply(id1).unwrap().status),
        Status::InvalidInput
    );
    assert_eq!(
        Status::from_code(a.reply(id2).unwrap().status),
        Status::InvalidInput
    );
    assert_eq!(
        Status::from_code(a.reply(id3).unwrap().status),
        Status::Unsupported
    );
    assert_eq!(r.counter("drop.app_bad"), 3);
    assert!(r.ip.take_sends().is_empty());

    // Corrupt app 1's request ring: its tail jumps far past its head.
    let req_off = find_ring(a.link.region(), 0x13_0001);
    a.link
        .region()
        .write_bytes(req_off + 128, &(1u64 << 40).to_le_bytes())
        .unwrap();
    r.run();
    assert_eq!(r.server.attached(), vec![2], "app 1 is detached");
    assert_eq!(r.counter("drop.app_bad"), 4);
    // Its sockets are closed; app 2 is served as before.
    assert!(r.table.entries().iter().all(|e| e.record.app == 2));
    let (t, _) = r.bind(&mut b, Ipv4Addr::UNSPECIFIED, 6000).unwrap();
    let id = b.send(t, to(PEER, 9), b"still here", true);
    r.run();
    assert_eq!(Status::from_code(b.reply(id).unwrap().status), Status::Ok);
    assert_eq!(r.ip.take_sends().len(), 1);
}

/// The offset of the ring tagged `tag` in an app region (the layout is private to AppLink;
/// rings sit at 128-byte boundaries and check their tag on open).
fn find_ring(region: &Region, tag: u32) -> usize {
    (1..4096)
        .map(|k| k * 128)
        .find(|&off| Ring::<AppRequest>::open(region, off, tag).is_ok())
        .expect("the ring")
}

#[test]
fn icmp_unreachable_reaches_a_connected_socket_as_an_error_event() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-icmp", 64, 16, None);
    let mut a = r.app(1);
    let (c, port) = r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 0).unwrap();
    let (u, uport) = r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 0).unwrap();
    let id = a.push(
        AppRequest {
            op: op::CONNECT,
            socket: c,
            addr: u32::from(PEER),
            port: 53,
            ..AppRequest::default()
        },
        true,
    );
    r.run();
    assert_eq!(Status::from_code(a.reply(id).unwrap().status), Status::Ok);
    assert!(r.ip.deliver_icmp(to(OUR, port), to(PEER, 53), 3));
    assert!(r.ip.deliver_icmp(to(OUR, uport), to(PEER, 53), 3));
    r.run();
    a.pump();
    let errors: Vec<_> = a.events.iter().filter(|e| e.kind == event::ERROR).collect();
    assert_eq!(errors.len(), 1, "only the connected socket hears of it");
    assert_eq!(errors[0].socket, c);
    assert_eq!(
        Status::from_code(errors[0].status),
        Status::ConnectionRefused
    );
    assert_ne!(c, u);
    // Reported, so no longer pending in the table.
    assert!(r.table.entries().iter().all(|e| e.record.error == 0));
    assert_eq!(r.counter("icmp.errors_reported"), 1);
    assert_eq!(r.counter("icmp.errors_ignored"), 1);
}

#[test]
fn sends_wait_on_the_ring_for_send_buffers() {
    watchdog(Duration::from_secs(60));
    // Four SEND_POOL buffers; eight sends.
    let mut r = rig("t-udp-backpressure", 64, 4, None);
    let mut a = r.app(1);
    let (s, _) = r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 0).unwrap();
    for i in 0..8u8 {
        a.send(s, to(PEER, 9), &[i], false);
    }
    r.run();
    let first = r.ip.take_sends();
    assert_eq!(first.len(), 4);
    assert_eq!(
        a.link.requests().unwrap().in_flight().unwrap().len(),
        4,
        "the rest wait on the ring, not dropped"
    );
    r.run();
    let second = r.ip.take_sends();
    assert_eq!(second.len(), 4);
    let payloads: Vec<u8> = first.iter().chain(&second).map(|(_, b)| b[8]).collect();
    assert_eq!(payloads, (0..8).collect::<Vec<u8>>(), "in order");
    assert_eq!(r.counter("drop.send_full"), 0);
}

#[test]
fn parking_arms_the_app_bells() {
    watchdog(Duration::from_secs(60));
    let mut r = rig("t-udp-arm", 64, 16, None);
    let mut a = r.app(1);
    r.run();
    let server_bell = a.link.server_bell().unwrap();
    assert!(!r.server.has_work());
    assert!(!server_bell.is_armed(), "not armed while the server runs");
    // The runtime announces a park: the server arms every app's bell before its re-check.
    r.control.doorbell().arm();
    assert!(!r.server.has_work());
    assert!(server_bell.is_armed());
    // The app's next ring is the wake-up call.
    let wakes = server_bell.wakes();
    a.bind_req(Ipv4Addr::UNSPECIFIED, 0);
    assert_eq!(server_bell.wakes(), wakes + 1);
    assert!(r.server.has_work());
}

#[test]
fn requests_a_dead_predecessor_left_uncommitted_are_replayed_safely() {
    watchdog(Duration::from_secs(60));
    // Known as a restart by the ring claim (a dead pid held it)...
    replay_case("t-udp-replay-claim", true);
    // ... or by the control block's generation (the supervisor freed the dead one's claims).
    replay_case("t-udp-replay-gen", false);
}

fn replay_case(name: &str, by_claim: bool) {
    use keepnet_udp::state::{handle, Record, Store};
    let mut r = rig(name, 64, 16, None);
    let link = r.app_link(1);
    let mut a = AppSide::new(&link, link.server_bell().unwrap());
    // The app asked for a bind and a close; a predecessor carried out both (the socket is in
    // the table, made by that BIND; the closed one is gone) and died before committing.
    let bind_id = a.bind_req(Ipv4Addr::UNSPECIFIED, 8000);
    let stale = handle(1, 1);
    let close_id = a.push(
        AppRequest {
            op: op::CLOSE,
            socket: stale,
            ..AppRequest::default()
        },
        true,
    );
    let mut table = r.table.clone();
    let record = Record {
        app: 1,
        local: to(Ipv4Addr::UNSPECIFIED, 8000),
        remote: None,
        error: 0,
        bind_id,
    };
    table.publish(0, 1, &record);
    // ... and rebuild the server over that table, as a restarted one would.
    let tlink = r.ip.link.clone();
    drop(r.server);
    if !by_claim {
        r.control.generation().bump();
    }
    r.server = UdpServer::new(
        Config::new(OUR),
        TransportLink::open(tlink.region().reopen(RegionKind::RINGS).unwrap()).unwrap(),
        SocketTable::open(r.table.region().reopen(RegionKind::GENERIC).unwrap()).unwrap(),
        None,
        None,
        &r.control,
    )
    .unwrap();
    if by_claim {
        // The predecessor's claim on `requests`: a process that no longer exists.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let off = find_ring(link.region(), 0x13_0001);
        link.region()
            .write_bytes(off + 32, &dead.to_le_bytes())
            .unwrap();
        assert_eq!(link.requests().unwrap().claims().1, dead);
    }
    let region = link.region().reopen(RegionKind::RINGS).unwrap();
    assert!(r.server.attach(1, 1, region).unwrap());
    r.run();
    // The bind is answered with the predecessor's socket, not AddrInUse; the close is Ok.
    let b = a.reply(bind_id).expect("bind answered");
    assert_eq!(Status::from_code(b.status), Status::Ok);
    assert_eq!((b.socket, b.port), (handle(0, 1), 8000));
    let c = a.reply(close_id).expect("close answered");
    assert_eq!(Status::from_code(c.status), Status::Ok);
    assert_eq!(r.table.entries().len(), 1, "nothing bound twice");
    // Past the replayed requests, the same requests are carried out as usual.
    assert_eq!(
        r.bind(&mut a, Ipv4Addr::UNSPECIFIED, 8000),
        Err(Status::AddrInUse)
    );
    let c2 = a.push(
        AppRequest {
            op: op::CLOSE,
            socket: stale,
            ..AppRequest::default()
        },
        true,
    );
    r.run();
    assert_eq!(
        Status::from_code(a.reply(c2).unwrap().status),
        Status::BadSocket
    );
}

/// A predecessor killed half-way through a poll, played step by step on the rings: buffers
/// it held privately come home, and slots it took without committing are taken again (not
/// refused as bad descriptors).
#[test]
fn a_predecessor_killed_mid_poll_leaves_nothing_behind() {
    use keepnet_ipc::Retakes;
    use keepnet_server::app::app_endpoint;
    use keepnet_server::wiring::IP;
    use keepnet_udp::state::{handle, Record, Store};
    watchdog(Duration::from_secs(60));
    let r = rig("t-udp-midpoll", 64, 16, None);
    let Rig {
        control,
        ip_control: _ip_control,
        table,
        mut ip,
        server,
        name,
    } = r;
    drop(server);
    let mut t = table.clone();
    let record = Record {
        app: 1,
        local: to(Ipv4Addr::UNSPECIFIED, 9000),
        remote: None,
        error: 0,
        bind_id: 1,
    };
    t.publish(0, 1, &record);
    let socket = handle(0, 1);
    let link = AppLink::create(&format!("{name}-app1"), 1, 17, UDP, 8, 16).unwrap();
    let mut a = AppSide::new(&link, link.server_bell().unwrap());

    // The predecessor's ends.
    let tlink = ip.link.clone();
    let mut pt = tlink.transport_ends().unwrap();
    let mut pa = link.server_ends().unwrap();
    for i in 0..3u8 {
        assert!(ip.deliver(to(PEER, 1), to(OUR, 9000), &[i], true));
    }
    let mut slots = [DatagramSlot::default(); 3];
    assert_eq!(pt.deliver.read(&mut slots).unwrap(), 3);
    for s in &slots[..2] {
        tlink
            .deliver_pool
            .take(&s.desc, IP, UDP, &mut Retakes::none())
            .unwrap();
    }
    pt.deliver.commit(1).unwrap(); // #0 held privately; #1 taken, not committed
    a.send(socket, to(PEER, 9), b"committed", false);
    a.send(socket, to(PEER, 9), b"not committed", false);
    let mut reqs = [AppRequest::default(); 2];
    assert_eq!(pa.requests.read(&mut reqs).unwrap(), 2);
    for q in &reqs {
        link.tx_pool
            .take(&q.desc, app_endpoint(1), UDP, &mut Retakes::none())
            .unwrap();
    }
    pa.requests.commit(1).unwrap();
    // Dead.
    drop((pt, pa));

    let mut server = UdpServer::new(
        Config::new(OUR),
        TransportLink::open(tlink.region().reopen(RegionKind::RINGS).unwrap()).unwrap(),
        SocketTable::open(table.region().reopen(RegionKind::GENERIC).unwrap()).unwrap(),
        None,
        None,
        &control,
    )
    .unwrap();
    assert!(server
        .attach(1, 1, link.region().reopen(RegionKind::RINGS).unwrap())
        .unwrap());
    for _ in 0..8 {
        server.poll().unwrap();
    }
    // #1 (retaken) and #2 reach the app; #0 died with the predecessor, its buffer did not.
    let got = a.datagrams();
    let payloads: Vec<Vec<u8>> = got.iter().map(|(_, _, p)| p.clone()).collect();
    assert_eq!(payloads, vec![vec![1], vec![2]]);
    for (_, b, _) in &got {
        a.give_back(b);
    }
    // The uncommitted send goes out; the committed one's buffer came back unsent.
    let sent = ip.take_sends();
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0].1[8..], b"not committed");
    for _ in 0..8 {
        server.poll().unwrap();
    }
    ip.collect();
    a.collect_tx();
    assert_eq!(tlink.deliver_pool.accounting().get(&IP), Some(&16));
    assert_eq!(tlink.send_pool.accounting().get(&UDP), Some(&16));
    assert_eq!(a.tx_free.len(), 8);
    assert_eq!(link.rx_pool.accounting().get(&UDP), Some(&16));
    let bad: u64 = control
        .counters()
        .iter()
        .filter(|(n, _)| n == "drop.desc_bad" || n == "drop.app_bad")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(bad, 0);
}
