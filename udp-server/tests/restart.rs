//! The real `keepnet-udp` binary under a test acting as supervisor, ip server and
//! application: sockets survive `kill -9`, and no buffer leaks across the restart.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use keepnet_ipc::fdpass::send_fds;
use keepnet_ipc::{BufRef, Consumer, Producer, SpinPolicy};
use keepnet_server::app::{app_endpoint, AppEvent, AppLink, Hotplug, Status};
use keepnet_server::control::ServerState;
use keepnet_server::runtime::supervisor_ends;
use keepnet_server::wiring::{TransportLink, IP, UDP};
use keepnet_server::{boot, request, Command as Cmd, ControlBlock, ControlMsg, RunOptions};
use keepnet_udp::SocketTable;

/// Kills and reaps the child on every exit path.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct World {
    control: ControlBlock,
    ip_control: ControlBlock,
    tlink: TransportLink,
    table: SocketTable,
    bell: std::os::fd::OwnedFd,
    hotplug_srv: UnixStream,
}

impl World {
    fn spawn(&self) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepnet-udp"));
        cmd.stdin(Stdio::null())
            .env("KEEPNET_LOG", "warn")
            .env("KEEPNET_UDP_CONFIG", r#"{"addr":"198.18.0.2","rcvbuf":4}"#);
        let opts = RunOptions {
            core: None,
            spin: SpinPolicy::PARK_AT_ONCE,
            park_timeout: Duration::from_millis(20),
            standby: false,
        };
        boot::prepare_with_fds(
            &mut cmd,
            &self.control,
            &[
                ("transport.udp", self.tlink.region()),
                ("udp.state", self.table.region()),
                ("peer.ip", self.ip_control.region()),
            ],
            &[
                ("bell", self.bell.as_fd()),
                ("hotplug", self.hotplug_srv.as_fd()),
            ],
            &opts,
        );
        Proc(cmd.spawn().expect("spawn keepnet-udp"))
    }

    fn counter(&self, name: &str) -> u64 {
        self.control
            .counters()
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| v)
    }
}

/// The supervisor's side: the hotplug socket and the command ring.
struct Sup {
    sock: UnixStream,
    cmds: Producer<ControlMsg>,
    replies: Consumer<ControlMsg>,
    seq: u32,
}

impl Sup {
    fn hotplug(&mut self, msgs: &[(Hotplug, Option<BorrowedFd<'_>>)]) -> u64 {
        for (m, fd) in msgs {
            let bytes = serde_json::to_vec(m).unwrap();
            let fds: Vec<BorrowedFd<'_>> = fd.iter().copied().collect();
            send_fds(&self.sock, &bytes, &fds).unwrap();
        }
        self.seq += 1;
        request(
            &mut self.cmds,
            &mut self.replies,
            self.seq,
            Cmd::Hotplug,
            Duration::from_secs(10),
        )
        .expect("the server answers")
        .expect("hotplug succeeded")
    }
}

#[track_caller]
fn wait_reply(app: &mut AppSide, id: u32) -> AppEvent {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = app.reply(id) {
            return r;
        }
        assert!(Instant::now() < end, "no reply to request {id}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[track_caller]
fn bind(app: &mut AppSide, port: u16) -> Result<(u32, u16), Status> {
    let id = app.bind_req(Ipv4Addr::UNSPECIFIED, port);
    let r = wait_reply(app, id);
    match Status::from_code(r.status) {
        Status::Ok => Ok((r.socket, r.port)),
        s => Err(s),
    }
}

/// Waits until `n` datagrams came (more may come with them).
#[track_caller]
fn datagrams(app: &mut AppSide, ip: &mut IpSide, n: usize) -> Vec<(AppEvent, BufRef, Vec<u8>)> {
    let mut got = Vec::new();
    until("datagrams", Duration::from_secs(10), || {
        ip.collect();
        got.extend(app.datagrams());
        got.len() >= n
    });
    got
}

fn to(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

#[test]
fn bound_sockets_and_buffers_survive_kill_9() {
    watchdog(Duration::from_secs(180));
    let bell = keepnet_ipc::new_eventfd().unwrap();
    let control = ControlBlock::create("t-udp-x", 4096)
        .unwrap()
        .with_bell_eventfd(bell.try_clone().unwrap());
    let (sup_sock, hotplug_srv) = seqpacket_pair();
    let w = World {
        control,
        ip_control: ControlBlock::create("t-udp-x-ip", 4096).unwrap(),
        tlink: TransportLink::create("t-udp-x-t", 17, UDP, 16).unwrap(),
        table: SocketTable::create("t-udp-x-state", 64).unwrap(),
        bell,
        hotplug_srv,
    };
    let mut ip = IpSide::new(&w.tlink);
    let link = AppLink::create("t-udp-x-app1", 1, 17, UDP, 8, 16).unwrap();
    let app_bell = link
        .server_bell()
        .unwrap()
        .with_eventfd(w.bell.try_clone().unwrap());
    let mut app = AppSide::new(&link, app_bell);

    let first = w.spawn();
    until("first server running", Duration::from_secs(20), || {
        w.control.state() == Some(ServerState::Running) && w.control.pid() == first.0.id()
    });
    let (cmds, replies) = supervisor_ends(&w.control).unwrap();
    let mut sup = Sup {
        sock: sup_sock,
        cmds,
        replies,
        seq: 0,
    };
    let attach = |app: u32| {
        (
            Hotplug::Attach {
                app,
                pid: std::process::id(),
            },
            Some(link.region().fd()),
        )
    };
    assert_eq!(sup.hotplug(&[attach(1)]), 1);

    // Three sockets, each receiving.
    let (s1, p1) = bind(&mut app, 7000).unwrap();
    let (s2, p2) = bind(&mut app, 7001).unwrap();
    let (s3, p3) = bind(&mut app, 0).unwrap();
    assert!((49152..=65535).contains(&p3));
    for p in [p1, p2, p3] {
        assert!(ip.deliver(to(PEER, 1000), to(OUR, p), &p.to_be_bytes(), true));
    }
    // Two more for s1: it then holds three of its four (rcvbuf 4) and keeps them.
    assert!(ip.deliver(to(PEER, 1000), to(OUR, p1), b"held", true));
    assert!(ip.deliver(to(PEER, 1000), to(OUR, p1), b"held", true));
    let got = datagrams(&mut app, &mut ip, 5);
    assert_eq!(got.len(), 5);
    let mut held = Vec::new();
    for (ev, buf, _) in &got {
        assert!([s1, s2, s3].contains(&ev.socket));
        if ev.socket == s1 {
            held.push(*buf);
        } else {
            app.give_back(buf);
        }
    }
    assert_eq!(held.len(), 3);

    // Traffic in flight at the kill: a send the ip side has not taken, a burst of
    // deliveries the server may be half-way through.
    app.send(s2, to(PEER, 9), b"in flight", false);
    until("the send is on the ring", Duration::from_secs(10), || {
        w.tlink.send().unwrap().in_flight().unwrap().len() == 1
    });
    for i in 0..6u8 {
        assert!(ip.deliver(to(PEER, 1001), to(OUR, p3), &[i], true));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.0.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(first); // reaps it: a zombie would still hold its ring claims

    // A fresh instance: the supervisor re-sends the live apps.
    let second = w.spawn();
    until("second server running", Duration::from_secs(20), || {
        w.control.state() == Some(ServerState::Running) && w.control.pid() == second.0.id()
    });
    assert_eq!(w.control.generation().get(), 2);
    assert_eq!(
        sup.hotplug(&[attach(1), (Hotplug::Live { apps: vec![1] }, None)]),
        2
    );

    // The three sockets are still bound: their ports are taken...
    for p in [p1, p2, p3] {
        assert_eq!(bind(&mut app, p), Err(Status::AddrInUse), "port {p}");
    }
    let entries = w.table.entries();
    let mut handles: Vec<u32> = entries.iter().map(|e| e.socket).collect();
    handles.sort_unstable();
    let mut want = vec![s1, s2, s3];
    want.sort_unstable();
    assert_eq!(handles, want);
    assert_eq!(w.counter("sockets"), 3);
    // ... and datagrams still reach them, under the same handles. Whatever of the burst the
    // first instance had not delivered is delivered now (or counted); drain it first.
    let mut burst = Vec::new();
    until("the burst is handled", Duration::from_secs(10), || {
        ip.collect();
        burst.extend(app.datagrams());
        w.tlink.deliver().unwrap().in_flight().unwrap().is_empty()
    });
    for (ev, buf, _) in burst.drain(..) {
        assert_eq!(ev.socket, s3);
        app.give_back(&buf);
    }
    assert!(ip.deliver(to(PEER, 2000), to(OUR, p2), b"after 2", true));
    assert!(ip.deliver(to(PEER, 2000), to(OUR, p3), b"after 3", true));
    let got = datagrams(&mut app, &mut ip, 2);
    let mut seen: Vec<(u32, Vec<u8>)> = got.iter().map(|(e, _, p)| (e.socket, p.clone())).collect();
    seen.sort();
    let mut expect = vec![(s2, b"after 2".to_vec()), (s3, b"after 3".to_vec())];
    expect.sort();
    assert_eq!(seen, expect);
    for (_, buf, _) in &got {
        app.give_back(buf);
    }
    // s1 still holds three datagrams from before the crash: room for one more only.
    let drops = w.counter("drop.rcvbuf_full");
    assert!(ip.deliver(to(PEER, 2000), to(OUR, p1), b"fits", true));
    assert!(ip.deliver(to(PEER, 2000), to(OUR, p1), b"overflows", true));
    let got = datagrams(&mut app, &mut ip, 1);
    until("the overflow is counted", Duration::from_secs(10), || {
        w.counter("drop.rcvbuf_full") == drops + 1
    });
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0.socket, got[0].2.as_slice()), (s1, &b"fits"[..]));
    held.push(got[0].1);
    for b in &held {
        app.give_back(b);
    }

    // The send from before the crash goes out intact.
    let sent = ip.take_sends();
    assert_eq!(sent.len(), 1);
    assert_eq!(&sent[0].1[8..], b"in flight");
    assert!(udp_checksum_ok(OUR, PEER, &sent[0].1));

    // No buffer leaked: every pool settles with each buffer at its home.
    let n = 16;
    until("pools settle", Duration::from_secs(20), || {
        ip.collect();
        ip.take_sends();
        app.collect_tx();
        for (_, b, _) in app.datagrams() {
            app.give_back(&b);
        }
        let deliver = w.tlink.deliver_pool.accounting();
        let send = w.tlink.send_pool.accounting();
        let tx = link.tx_pool.accounting();
        let rx = link.rx_pool.accounting();
        deliver.get(&IP) == Some(&n)
            && send.get(&UDP) == Some(&n)
            && tx.get(&app_endpoint(1)) == Some(&8)
            && rx.get(&UDP) == Some(&16)
    });
    assert_eq!(ip.deliver_free.len(), n as usize);
    assert_eq!(app.tx_free.len(), 8);
    assert_eq!(w.counter("drop.app_bad"), 0);
    assert_eq!(w.counter("drop.desc_bad"), 0);

    // A clean stop.
    sup.seq += 1;
    let r = request(
        &mut sup.cmds,
        &mut sup.replies,
        sup.seq,
        Cmd::Stop,
        Duration::from_secs(10),
    );
    assert!(matches!(r, Ok(Ok(_))), "{r:?}");
    let mut second = second;
    let status = {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = second.0.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < end, "server did not exit after Stop");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert!(status.success());
}

/// Kills the server at whatever point it has reached in a burst of traffic, eight times
/// over: every buffer still comes home, and the socket stays bound throughout.
#[test]
fn repeated_kills_under_traffic_leak_no_buffer() {
    watchdog(Duration::from_secs(240));
    let bell = keepnet_ipc::new_eventfd().unwrap();
    let control = ControlBlock::create("t-udp-k", 4096)
        .unwrap()
        .with_bell_eventfd(bell.try_clone().unwrap());
    let (sup_sock, hotplug_srv) = seqpacket_pair();
    let w = World {
        control,
        ip_control: ControlBlock::create("t-udp-k-ip", 4096).unwrap(),
        tlink: TransportLink::create("t-udp-k-t", 17, UDP, 8).unwrap(),
        table: SocketTable::create("t-udp-k-state", 16).unwrap(),
        bell,
        hotplug_srv,
    };
    let mut ip = IpSide::new(&w.tlink);
    let link = AppLink::create("t-udp-k-app1", 1, 17, UDP, 8, 16).unwrap();
    let app_bell = link
        .server_bell()
        .unwrap()
        .with_eventfd(w.bell.try_clone().unwrap());
    let mut app = AppSide::new(&link, app_bell);
    let mut server = w.spawn();
    until("server running", Duration::from_secs(20), || {
        w.control.state() == Some(ServerState::Running) && w.control.pid() == server.0.id()
    });
    let (cmds, replies) = supervisor_ends(&w.control).unwrap();
    let mut sup = Sup {
        sock: sup_sock,
        cmds,
        replies,
        seq: 0,
    };
    let attach = || {
        (
            Hotplug::Attach {
                app: 1,
                pid: std::process::id(),
            },
            Some(link.region().fd()),
        )
    };
    assert_eq!(sup.hotplug(&[attach()]), 1);
    let (s, port) = bind(&mut app, 0).unwrap();

    for round in 0..8u8 {
        // A burst: sends from the app, deliveries from the ip side, nobody waiting.
        app.collect_tx();
        for i in 0..app.tx_free.len().min(4) {
            app.send(s, to(PEER, 9), &[round, i as u8], false);
        }
        ip.collect();
        for i in 0..6u8 {
            if !ip.deliver(to(PEER, 1000), to(OUR, port), &[round, i], true) {
                break;
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.0.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        drop(server);
        server = w.spawn();
        let pid = server.0.id();
        until("restarted", Duration::from_secs(20), || {
            w.control.state() == Some(ServerState::Running) && w.control.pid() == pid
        });
        assert_eq!(
            sup.hotplug(&[attach(), (Hotplug::Live { apps: vec![1] }, None)]),
            2
        );
        // Whatever arrived is handed back; what the ip side got is sent back home.
        for (ev, b, _) in app.datagrams() {
            assert_eq!(ev.socket, s);
            app.give_back(&b);
        }
        for (slot, bytes) in ip.take_sends() {
            assert!(
                udp_checksum_ok(OUR, PEER, &bytes),
                "round {round}: {slot:?}"
            );
        }
    }
    assert_eq!(w.control.generation().get(), 9);
    assert_eq!(bind(&mut app, port), Err(Status::AddrInUse), "still bound");
    let n = 8;
    until("pools settle", Duration::from_secs(20), || {
        ip.collect();
        ip.take_sends();
        app.collect_tx();
        for (_, b, _) in app.datagrams() {
            app.give_back(&b);
        }
        w.tlink.deliver_pool.accounting().get(&IP) == Some(&n)
            && w.tlink.send_pool.accounting().get(&UDP) == Some(&n)
            && link.tx_pool.accounting().get(&app_endpoint(1)) == Some(&8)
            && link.rx_pool.accounting().get(&UDP) == Some(&16)
    });
    assert_eq!(w.counter("drop.app_bad"), 0);
    assert_eq!(w.counter("drop.desc_bad"), 0);
    assert_eq!(w.table.entries().len(), 1);
}
