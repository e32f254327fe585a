//! The `keepnet-ip` binary as a process: this test plays the supervisor (it creates the
//! control blocks and the link region and starts the server per `keepnet_server::boot`) and
//! the driver (it drives the driver's ends of the link and follows the buffer rules). It then
//! kills the server with SIGKILL in the middle of traffic, starts a fresh one, and checks that
//! every buffer comes home.
//!
//! The transport tests also play the udp server on a `TransportLink` (region
//! `transport.udp`, with the udp server's control block as `peer.udp`).

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use keepnet_ip::wire::{ArpPacket, EthernetFrame};
use keepnet_ip::{Config, Datagram, Disposition, Event, IpStack, Mac, Transport};
use keepnet_ipc::{Descriptor, EndpointId, FreeList, Region, Retakes, SpinPolicy, WaitOutcome};
use keepnet_server::wiring::{
    DatagramSlot, DriverEnds, Link, TransportEnds, TransportLink, DATAGRAM_HEADROOM, DRIVER,
    HEADROOM, IP, RX_POOL, TX_POOL, UDP,
};
use keepnet_server::{boot, ControlBlock, RunOptions, ServerState};

const FRAMES: u32 = 128;
const CONFIG: &str =
    r#"{"mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24","gateway":null,"mtu":1500}"#;

/// Pids of live children, for the watchdog to kill before it aborts the test.
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn kill_pid(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
}

/// Kills and reaps the child on every exit path.
struct Proc(Child);
impl Proc {
    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
    /// SIGKILL and reap (a zombie would still hold its ring claims).
    fn kill9(mut self) {
        kill_pid(self.pid());
        let _ = self.0.wait();
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        kill_pid(pid);
        let _ = self.0.wait();
        if let Ok(mut c) = CHILDREN.lock() {
            c.retain(|p| *p != pid);
        }
    }
}

fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: test exceeded {limit:?}; killing children and aborting");
        if let Ok(c) = CHILDREN.lock() {
            c.iter().for_each(|p| kill_pid(*p));
        }
        std::process::abort();
    });
}

#[track_caller]
fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn spawn(control: &ControlBlock, link: &Link, peer: &ControlBlock) -> Proc {
    spawn_with(control, link, Some(peer))
}

fn spawn_with(control: &ControlBlock, link: &Link, peer: Option<&ControlBlock>) -> Proc {
    spawn_full(control, link, peer, &[])
}

/// Spawns keepnet-ip with the link, the driver's control block if given, and `extra` regions.
fn spawn_full(
    control: &ControlBlock,
    link: &Link,
    peer: Option<&ControlBlock>,
    extra: &[(&str, &Region)],
) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepnet-ip"));
    cmd.stdin(Stdio::null())
        .env(
            "KEEPNET_LOG",
            std::env::var("KEEPNET_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("KEEPNET_IP_CONFIG", CONFIG);
    let opts = RunOptions {
        core: None,
        spin: SpinPolicy::PARK_AT_ONCE,
        park_timeout: Duration::from_millis(20),
        standby: false,
    };
    let mut regions = vec![("link", link.region())];
    if let Some(p) = peer {
        regions.push(("peer.driver", p.region()));
    }
    regions.extend_from_slice(extra);
    boot::prepare(&mut cmd, control, &regions, &opts);
    let child = cmd.spawn().expect("spawn keepnet-ip");
    CHILDREN.lock().unwrap().push(child.id() as i32);
    Proc(child)
}

/// The test's driver: the driver's ring ends and its RX_POOL free list.
struct Driver {
    link: Link,
    ends: DriverEnds,
    rx_free: FreeList,
    retakes: Retakes,
    /// Pool of each frame received on `tx`, in order.
    pools: Vec<u16>,
}

impl Driver {
    fn new(link: &Link, ip_control: &ControlBlock) -> Driver {
        let mut ends = link.driver_ends().unwrap();
        ends.rx.set_doorbell(ip_control.doorbell().clone());
        ends.tx_return.set_doorbell(ip_control.doorbell().clone());
        let rx_free = FreeList::recover(&link.rx_pool, DRIVER, &[], &[]);
        assert_eq!(rx_free.len(), link.rx_pool.count() as usize);
        Driver {
            link: link.clone(),
            ends,
            rx_free,
            retakes: Retakes::none(),
            pools: Vec::new(),
        }
    }

    /// Puts a frame in an RX buffer and pushes it on `rx`; false if no buffer is free.
    fn inject(&mut self, frame: &[u8]) -> bool {
        self.collect();
        let Some(i) = self.rx_free.get() else {
            return false;
        };
        self.link.rx_pool.write(i, HEADROOM, frame).unwrap();
        let d = self.link.rx_pool.descriptor(i, frame.len() as u32);
        self.ends
            .rx
            .push(d)
            .map_err(|_| ())
            .expect("rx ring has room");
        true
    }

    fn collect(&mut self) {
        self.rx_free
            .collect(&self.link.rx_pool, &mut self.ends.rx_return, IP, 1024)
            .unwrap();
    }

    /// "Sends" the frames on `tx`: takes each buffer, copies the frame out, gives RX_POOL
    /// buffers back to our free list and TX_POOL buffers back to ip on `tx_return`.
    fn pump(&mut self) -> Vec<Vec<u8>> {
        self.collect();
        let mut frames = Vec::new();
        let mut descs = [Descriptor::default(); 64];
        self.ends.tx.rewind();
        let n = self.ends.tx.read(&mut descs).unwrap();
        let mut back = Vec::new();
        for d in &descs[..n] {
            let pool = match d.pool {
                RX_POOL => &self.link.rx_pool,
                TX_POOL => &self.link.tx_pool,
                p => panic!("descriptor for pool {p}"),
            };
            let r = pool
                .take(d, IP, DRIVER, &mut self.retakes)
                .expect("ip hands over buffers it holds");
            let mut f = vec![0u8; r.len() as usize];
            pool.read(&r, &mut f);
            frames.push(f);
            self.pools.push(d.pool);
            if d.pool == RX_POOL {
                assert!(self.rx_free.put(r.index()));
            } else {
                back.push(self.link.tx_pool.descriptor(r.index(), 0));
            }
        }
        self.ends.tx.commit(n).unwrap();
        assert_eq!(self.ends.tx_return.push_slice(&back).unwrap(), back.len());
        frames
    }

    /// Pumps, answering ARP requests for the peer as the peer host would (a restarted server
    /// has an empty ARP cache); returns the echo replies that came out.
    fn pump_as_peer(&mut self) -> Vec<Vec<u8>> {
        self.pump_ip()
            .into_iter()
            .filter(|f| f.len() > 34 && f[23] == 1 && f[34] == 0)
            .collect()
    }

    /// Pumps, answering ARP requests for the peer; returns the IPv4 frames that came out.
    fn pump_ip(&mut self) -> Vec<Vec<u8>> {
        let mut ip = Vec::new();
        for f in self.pump() {
            let Ok(e) = EthernetFrame::new_checked(&f[..]) else {
                continue;
            };
            if e.ethertype() == 0x0806 {
                let a = ArpPacket::new_checked(e.payload()).unwrap();
                if a.op() == 1 && a.tpa() == PEER_IP {
                    let reply = arp_frame(OUR_MAC, 2, PEER_MAC, PEER_IP, OUR_MAC, OUR_IP);
                    while !self.inject(&reply) {
                        self.collect();
                    }
                }
            } else if e.ethertype() == 0x0800 {
                ip.push(f);
            }
        }
        ip
    }

    /// Pumps (answering ARP) until `want` IPv4 frames came out.
    fn expect_ip(&mut self, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        until(
            &format!("{want} IPv4 frames on tx"),
            Duration::from_secs(20),
            || {
                got.extend(self.pump_ip());
                got.len() >= want
            },
        );
        got
    }

    /// Pumps until `want` frames came out.
    fn expect(&mut self, want: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        until(
            &format!("{want} frames on tx"),
            Duration::from_secs(20),
            || {
                got.extend(self.pump());
                got.len() >= want
            },
        );
        got
    }
}

fn counter(control: &ControlBlock, name: &str) -> u64 {
    control
        .counters()
        .into_iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| v)
}

fn pool_owners(link: &Link) -> (BTreeMap<EndpointId, u32>, BTreeMap<EndpointId, u32>) {
    (link.rx_pool.accounting(), link.tx_pool.accounting())
}

#[test]
fn serves_arp_and_echo_then_recovers_from_kill_9_without_leaking_buffers() {
    watchdog(Duration::from_secs(120));
    let control = ControlBlock::create("ip", 64 * 1024).unwrap();
    let peer = ControlBlock::create("driver", 4096).unwrap();
    let link = Link::create("t-ip-link", FRAMES).unwrap();
    let mut drv = Driver::new(&link, &control);

    let ip = spawn(&control, &link, &peer);
    until("ip running", Duration::from_secs(20), || {
        control.state() == Some(ServerState::Running)
    });
    let gen1 = control.generation().get();

    // The gratuitous ARP at start.
    let f = drv.expect(1);
    let a = EthernetFrame::new_checked(&f[0][..]).unwrap();
    assert!(a.dst().is_broadcast());
    assert_eq!(ArpPacket::new_checked(a.payload()).unwrap().tpa(), OUR_IP);

    // ARP request -> reply, built in the request's own RX buffer.
    assert!(drv.inject(&arp_frame(OUR_MAC, 1, PEER_MAC, PEER_IP, Mac::ZERO, OUR_IP)));
    let f = drv.expect(1);
    let e = EthernetFrame::new_checked(&f[0][..]).unwrap();
    assert_eq!(e.dst(), PEER_MAC);
    let r = ArpPacket::new_checked(e.payload()).unwrap();
    assert_eq!(
        (r.op(), r.sha(), r.spa(), r.tpa()),
        (2, OUR_MAC, OUR_IP, PEER_IP)
    );
    assert_eq!(
        drv.pools.last(),
        Some(&RX_POOL),
        "reply rewritten in the request's buffer"
    );

    // Echo request -> reply, payload byte-exact. We park on the driver's doorbell: the
    // server rings it when it publishes the reply.
    assert!(drv.inject(&echo_request(0x0b1e, 1, b"keepnet process test payload")));
    let tx = &mut drv.ends.tx;
    let woke = peer.doorbell().wait(
        SpinPolicy::PARK_AT_ONCE,
        Some(Duration::from_secs(20)),
        || tx.has_data(),
    );
    assert_ne!(
        woke,
        WaitOutcome::TimedOut,
        "the driver's doorbell was rung"
    );
    let f = drv.expect(1);
    let (p, m) = parse_icmp(&f[0]);
    assert_eq!(
        (p.src(), p.dst(), m.msg_type(), m.echo_ident(), m.echo_seq()),
        (OUR_IP, PEER_IP, 0, 0x0b1e, 1)
    );
    assert_eq!(m.data(), b"keepnet process test payload");
    assert_eq!(drv.pools.last(), Some(&RX_POOL));

    // An 8000-byte echo in fragments: the reply comes back in 6 fragments (TX_POOL buffers
    // beyond the first) and reassembles to the right bytes.
    let data: Vec<u8> = (0..8000u32).map(|i| (i * 13) as u8).collect();
    let mut big = Ip::new(PEER_IP, OUR_IP, 1);
    big.ident = 0x7777;
    for f in fragment(&big, &icmp(8, 0, 5, 6, &data), 1480) {
        assert!(drv.inject(&f));
    }
    let frames = drv.expect(6);
    assert!(drv.pools.iter().rev().take(6).any(|p| *p == TX_POOL));
    let mut peer_stack = IpStack::new(Config::new(PEER_MAC, PEER_IP, 24)).unwrap();
    for f in &frames {
        assert_eq!(
            peer_stack.handle_frame(Duration::ZERO, f, |_| {}),
            Disposition::Handled
        );
    }
    assert_eq!(
        peer_stack.poll_event(),
        Some(Event::EchoReply {
            from: OUR_IP,
            ident: 5,
            seq: 6,
            payload: data
        })
    );

    // Counters reach the control block.
    until("counters mirrored", Duration::from_secs(20), || {
        counter(&control, "icmp.echo_replied") == 2
            && counter(&control, "arp.replies") == 1
            && counter(&control, "rx.frames") == 8
            && counter(&control, "ip.reassembled") == 1
            && counter(&control, "ip.frags_out") == 6
            && counter(&control, "arp.announces") == 1
    });
    let names: Vec<String> = control.counters().into_iter().map(|(n, _)| n).collect();
    for n in [
        "drop.ipv4_checksum",
        "drop.frag_overlap",
        "drop.desc_bad",
        "tx.bytes",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} registered");
    }

    // A bad descriptor is counted and refused, the server lives on.
    drv.ends
        .rx
        .push(Descriptor {
            pool: RX_POOL,
            lease: 0,
            index: FRAMES + 5,
            offset: 0,
            len: 10,
        })
        .map_err(|_| ())
        .unwrap();
    until("bad descriptor counted", Duration::from_secs(20), || {
        counter(&control, "drop.desc_bad") == 1
    });

    // Traffic, then SIGKILL at an arbitrary point, several times over.
    let mut ip = Some(ip);
    let mut seq = 100u16;
    let mut answered = 0usize;
    for round in 0..12 {
        let mut sent = 0;
        let mut replies = 0;
        let start = Instant::now();
        // Keep requests flowing; kill once some replies came back (mid-traffic).
        while replies < 20 + round * 5 {
            assert!(start.elapsed() < Duration::from_secs(30), "traffic stalled");
            for _ in 0..8 {
                if drv.inject(&echo_request(1, seq, &[seq as u8; 100])) {
                    seq = seq.wrapping_add(1);
                    sent += 1;
                }
            }
            replies += drv.pump_as_peer().len();
        }
        // One more burst, then the kill after a varying delay: it lands at different
        // points of the server's batch (taken but uncommitted, held privately, published).
        for _ in 0..FRAMES {
            if drv.inject(&echo_request(1, seq, &[seq as u8; 1000])) {
                seq = seq.wrapping_add(1);
                sent += 1;
            }
        }
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros((round as u64 * 97) % 500) {
            std::hint::spin_loop();
        }
        ip.take().unwrap().kill9();
        answered += replies;
        eprintln!("round {round}: {sent} requests in, {replies} replies out, then SIGKILL");
        // Frames published before the kill can still be sent; nothing else moves.
        drv.pump();
        ip = Some(spawn(&control, &link, &peer));
        until("restart", Duration::from_secs(20), || {
            control.generation().get() > gen1 + round as u64
        });
    }
    assert!(answered > 0);

    // The fresh instance answers, and once traffic drains, every buffer is home: RX_POOL
    // all with the driver, TX_POOL all with ip.
    // (Sent again now and then, as ping does: while ARP resolves, the server queues only a
    // few datagrams per next hop, and requests left over from the storm may fill the queue.)
    let mut seen = false;
    let mut tries = 0u16;
    until("answer after restarts", Duration::from_secs(20), || {
        if tries % 100 == 0 {
            assert!(drv.inject(&echo_request(2, tries, b"after the storm")));
        }
        tries = tries.wrapping_add(1);
        for f in drv.pump_as_peer() {
            seen |= f.ends_with(b"after the storm");
        }
        seen
    });
    until("all buffers home", Duration::from_secs(30), || {
        drv.pump_as_peer();
        let (rx, tx) = pool_owners(&link);
        rx == BTreeMap::from([(DRIVER, FRAMES)]) && tx == BTreeMap::from([(IP, FRAMES)])
    });
    assert_eq!(
        drv.rx_free.len(),
        FRAMES as usize,
        "the driver's free list holds every RX buffer"
    );
    assert_eq!(link.rx_pool.drops().bad_owner, 0);
    assert_eq!(link.tx_pool.drops().total(), 0);
    assert!(counter(&control, "icmp.echo_replied") as usize >= answered);
    drop(ip);
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    watchdog(Duration::from_secs(60));
    let control = ControlBlock::create("ip-bad", 4096).unwrap();
    let link = Link::create("t-ip-bad", 8).unwrap();
    for (cfg, field) in [
        (
            r#"{"mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24","mtu":"big"}"#,
            "mtu",
        ),
        (r#"{"mac":"nope","addr":"198.18.0.2/24"}"#, "mac"),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepnet-ip"));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("KEEPNET_IP_CONFIG", cfg);
        boot::prepare(
            &mut cmd,
            &control,
            &[("link", link.region())],
            &RunOptions::default(),
        );
        let child = cmd.spawn().unwrap();
        CHILDREN.lock().unwrap().push(child.id() as i32);
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
}

#[test]
fn runs_without_a_driver_doorbell() {
    watchdog(Duration::from_secs(60));
    let control = ControlBlock::create("ip-nobell", 4096).unwrap();
    let link = Link::create("t-ip-nobell", 16).unwrap();
    let mut drv = Driver::new(&link, &control);
    let _ip = spawn_with(&control, &link, None);
    drv.expect(1); // the announcement
    assert!(drv.inject(&arp_frame(OUR_MAC, 1, PEER_MAC, PEER_IP, Mac::ZERO, OUR_IP)));
    assert!(drv.inject(&echo_request(1, 1, b"no bell")));
    let f = drv.expect(2);
    assert!(f[1].ends_with(b"no bell"));
}

// -------------------------------------------------------------------------------------------
// The transport link (ip <-> udp)
// -------------------------------------------------------------------------------------------

/// Buffers per pool of the test's transport link.
const TBUFS: u32 = 64;

/// The test's udp server: its ring ends on the transport link and its SEND_POOL free list.
struct UdpSide {
    tl: TransportLink,
    ends: TransportEnds,
    send_free: FreeList,
    retakes: Retakes,
}

impl UdpSide {
    fn new(tl: &TransportLink, ip_control: &ControlBlock) -> UdpSide {
        let mut ends = tl.transport_ends().unwrap();
        ends.send.set_doorbell(ip_control.doorbell().clone());
        ends.deliver_return
            .set_doorbell(ip_control.doorbell().clone());
        let send_free = FreeList::recover(&tl.send_pool, UDP, &[], &[]);
        assert_eq!(send_free.len(), TBUFS as usize);
        UdpSide {
            tl: tl.clone(),
            ends,
            send_free,
            retakes: Retakes::none(),
        }
    }

    /// Collects SEND_POOL buffers the ip server has sent.
    fn collect(&mut self) {
        self.send_free
            .collect(&self.tl.send_pool, &mut self.ends.send_return, IP, 1024)
            .unwrap();
    }

    /// Receives what is on `deliver`, taking each buffer before committing and handing it
    /// straight back on `deliver_return`.
    fn recv(&mut self) -> Vec<(DatagramSlot, Vec<u8>)> {
        self.collect();
        let mut slots = [DatagramSlot::default(); 64];
        self.ends.deliver.rewind();
        let n = self.ends.deliver.read(&mut slots).unwrap();
        let (mut out, mut back) = (Vec::new(), Vec::new());
        for s in &slots[..n] {
            let r = self
                .tl
                .deliver_pool
                .take(&s.desc, IP, UDP, &mut self.retakes)
                .expect("ip hands over buffers it holds");
            let mut b = vec![0u8; r.len() as usize];
            self.tl.deliver_pool.read(&r, &mut b);
            out.push((*s, b));
            back.push(self.tl.deliver_pool.descriptor(r.index(), 0));
        }
        self.ends.deliver.commit(n).unwrap();
        assert_eq!(
            self.ends.deliver_return.push_slice(&back).unwrap(),
            back.len()
        );
        out
    }

    /// Puts `payload` (a UDP header and data) on `send`; false if no buffer is free.
    fn send(&mut self, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> bool {
        self.collect();
        let Some(i) = self.send_free.get() else {
            return false;
        };
        self.tl
            .send_pool
            .write(i, DATAGRAM_HEADROOM, payload)
            .unwrap();
        let slot = DatagramSlot {
            desc: self.tl.send_pool.descriptor(i, payload.len() as u32),
            src: u32::from(src),
            dst: u32::from(dst),
            protocol: 17,
            ..DatagramSlot::default()
        };
        self.ends
            .send
            .push(slot)
            .map_err(|_| ())
            .expect("send ring has room");
        true
    }

    /// Receives until `want` slots came.
    fn expect(&mut self, want: usize) -> Vec<(DatagramSlot, Vec<u8>)> {
        let mut got = Vec::new();
        until(
            &format!("{want} slots on deliver"),
            Duration::from_secs(20),
            || {
                got.extend(self.recv());
                got.len() >= want
            },
        );
        got
    }
}

/// A UDP header (checksum 0: none, as IPv4 allows) and data.
fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// A UDP datagram from the peer to us, as a frame.
fn udp_frame(ident: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = Ip::new(PEER_IP, OUR_IP, 17);
    ip.ident = ident;
    eth(OUR_MAC, PEER_MAC, 0x0800, &ip.build(payload))
}

/// (source, payload) of each datagram the peer's engine delivers.
type Received = Rc<RefCell<Vec<(Ipv4Addr, Vec<u8>)>>>;

/// The peer host's UDP: records each datagram its engine reassembles.
#[derive(Default)]
struct PeerUdp(Received);
impl Transport for PeerUdp {
    fn deliver(&mut self, _now: Duration, d: &Datagram<'_>) {
        self.0.borrow_mut().push((d.src, d.payload.to_vec()));
    }
}

fn all_home(link: &Link, tl: &TransportLink) -> bool {
    let (rx, tx) = pool_owners(link);
    rx == BTreeMap::from([(DRIVER, FRAMES)])
        && tx == BTreeMap::from([(IP, FRAMES)])
        && tl.deliver_pool.accounting() == BTreeMap::from([(IP, TBUFS)])
        && tl.send_pool.accounting() == BTreeMap::from([(UDP, TBUFS)])
}

#[test]
fn transport_link_delivers_sends_relays_icmp_errors_and_survives_kill_9() {
    watchdog(Duration::from_secs(120));
    let control = ControlBlock::create("ip-t", 64 * 1024).unwrap();
    let peer = ControlBlock::create("driver-t", 4096).unwrap();
    let udp_peer = ControlBlock::create("udp-t", 4096).unwrap();
    let link = Link::create("t-ip-t-link", FRAMES).unwrap();
    let tl = TransportLink::create("t-ip-t-udp", 17, UDP, TBUFS).unwrap();
    let mut drv = Driver::new(&link, &control);
    let mut udp_side = UdpSide::new(&tl, &control);
    let extra = [
        ("transport.udp", tl.region()),
        ("peer.udp", udp_peer.region()),
    ];
    let ip = spawn_full(&control, &link, Some(&peer), &extra);
    until("ip running", Duration::from_secs(20), || {
        control.state() == Some(ServerState::Running)
    });
    let gen1 = control.generation().get();
    drv.expect(1); // the gratuitous ARP

    // (a) A UDP datagram to us arrives on `deliver`, whole, and rings the udp doorbell.
    let dgram = udp(5000, 7, b"to the udp server");
    assert!(drv.inject(&udp_frame(0x1001, &dgram)));
    let deliver = &mut udp_side.ends.deliver;
    let woke = udp_peer.doorbell().wait(
        SpinPolicy::PARK_AT_ONCE,
        Some(Duration::from_secs(20)),
        || deliver.has_data(),
    );
    assert_ne!(woke, WaitOutcome::TimedOut, "the udp doorbell was rung");
    let got = udp_side.expect(1);
    let (slot, payload) = &got[0];
    assert_eq!(
        (
            Ipv4Addr::from(slot.src),
            Ipv4Addr::from(slot.dst),
            slot.protocol,
            slot.ttl,
            slot.kind,
            slot.broadcast
        ),
        (PEER_IP, OUR_IP, 17, 64, DatagramSlot::KIND_DATAGRAM, 0)
    );
    assert_eq!(payload, &dgram);
    // A TCP segment still gets "protocol unreachable" (no transport.tcp).
    let tcp = Ip::new(PEER_IP, OUR_IP, 6).build(&[0; 20]);
    assert!(drv.inject(&eth(OUR_MAC, PEER_MAC, 0x0800, &tcp)));
    let f = drv.expect_ip(1);
    let (_, m) = parse_icmp(&f[0]);
    assert_eq!((m.msg_type(), m.code()), (3, 2));
    assert_eq!(m.data(), &tcp[..28]);
    until("counters", Duration::from_secs(20), || {
        counter(&control, "transport.delivered") == 1
            && counter(&control, "drop.proto_unreachable") == 1
    });
    assert!(
        udp_side.recv().is_empty(),
        "only the UDP datagram was delivered"
    );

    // (b) 20000 bytes of UDP data sent on `send` go out as 14 IPv4 fragments that
    // reassemble to the same bytes (the ARP for the peer is answered on the way).
    let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let big = udp(5000, 9, &data);
    assert!(udp_side.send(Ipv4Addr::UNSPECIFIED, PEER_IP, &big));
    let frames = drv.expect_ip(14);
    assert_eq!(frames.len(), 14);
    let seen = Rc::new(RefCell::new(Vec::new()));
    let mut peer_stack = IpStack::new(Config::new(PEER_MAC, PEER_IP, 24)).unwrap();
    peer_stack.attach(17, Box::new(PeerUdp(seen.clone())));
    for f in &frames {
        assert!(f.len() <= 1514);
        let p = parse_ip(f);
        assert_eq!((p.src(), p.dst(), p.protocol()), (OUR_IP, PEER_IP, 17));
        assert_eq!(
            peer_stack.handle_frame(Duration::ZERO, f, |_| {}),
            Disposition::Handled
        );
    }
    assert_eq!(*seen.borrow(), vec![(OUR_IP, big.clone())]);
    // The SEND_POOL buffer came back; bad sends are counted, not sent.
    until("send buffer back", Duration::from_secs(20), || {
        udp_side.collect();
        udp_side.send_free.len() == TBUFS as usize
    });
    let off_link = Ipv4Addr::new(10, 1, 2, 3);
    assert!(udp_side.send(OUR_IP, off_link, &udp(1, 2, b"nowhere")));
    assert!(udp_side.send(PEER_IP, PEER_IP, &udp(1, 2, b"spoofed")));
    until("send drops counted", Duration::from_secs(20), || {
        counter(&control, "drop.transport_send_no_route") == 1
            && counter(&control, "drop.transport_send_bad") == 1
            && counter(&control, "transport.sent") == 1
    });

    // (c) A port unreachable about a datagram we sent comes up as an ICMP error slot.
    assert!(udp_side.send(OUR_IP, PEER_IP, &udp(5001, 7777, b"hello")));
    let sent = drv.expect_ip(1);
    let sent = parse_ip(&sent[0]).datagram().to_vec();
    let unreach = Ip::new(PEER_IP, OUR_IP, 1).build(&icmp(3, 3, 0, 0, &sent));
    assert!(drv.inject(&eth(OUR_MAC, PEER_MAC, 0x0800, &unreach)));
    let got = udp_side.expect(1);
    let (slot, quote) = &got[0];
    assert_eq!(
        (
            slot.kind,
            slot.icmp_type,
            slot.icmp_code,
            slot.protocol,
            Ipv4Addr::from(slot.src),
            Ipv4Addr::from(slot.dst)
        ),
        (DatagramSlot::KIND_ICMP_ERROR, 3, 3, 17, PEER_IP, OUR_IP)
    );
    assert_eq!(quote, &sent, "the quoted datagram, whole");
    until("icmp counters", Duration::from_secs(20), || {
        counter(&control, "icmp.errors_to_transport") == 1
    });

    // (d) Traffic both ways, then SIGKILL at an arbitrary point, several times over.
    let mut ip = Some(ip);
    let mut ident = 0x2000u16;
    let (mut up, mut down) = (0usize, 0usize);
    for round in 0..8u64 {
        let start = Instant::now();
        let (mut got_up, mut got_down) = (0, 0);
        while got_up < 20 || got_down < 20 {
            assert!(start.elapsed() < Duration::from_secs(30), "traffic stalled");
            for _ in 0..8 {
                ident = ident.wrapping_add(1);
                drv.inject(&udp_frame(ident, &udp(4000, 7, &[ident as u8; 300])));
            }
            for k in 0..4 {
                let n = if k == 0 { 3000 } else { 200 };
                udp_side.send(OUR_IP, PEER_IP, &udp(7, 4000, &vec![round as u8; n]));
            }
            got_up += udp_side.recv().len();
            got_down += drv.pump_ip().len();
        }
        // A burst, then the kill after a varying delay.
        for _ in 0..FRAMES {
            ident = ident.wrapping_add(1);
            drv.inject(&udp_frame(ident, &udp(4000, 7, &[1; 1000])));
        }
        while udp_side.send(OUR_IP, PEER_IP, &udp(7, 4000, &[2; 1400])) {}
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros((round * 131) % 700) {
            std::hint::spin_loop();
        }
        ip.take().unwrap().kill9();
        up += got_up;
        down += got_down;
        eprintln!("round {round}: {got_up} delivered, {got_down} frames sent, then SIGKILL");
        drv.pump();
        udp_side.recv();
        ip = Some(spawn_full(&control, &link, Some(&peer), &extra));
        until("restart", Duration::from_secs(20), || {
            control.generation().get() > gen1 + round
        });
    }
    assert!(up > 0 && down > 0);

    // The fresh instance still works both ways, and once traffic drains every buffer of all
    // four pools is with its home.
    let mut seen_up = false;
    let mut seen_down = false;
    let mut tries = 0u32;
    until("traffic after restarts", Duration::from_secs(20), || {
        if tries % 100 == 0 {
            ident = ident.wrapping_add(1);
            drv.inject(&udp_frame(ident, &udp(4000, 7, b"up after the storm")));
            udp_side.send(OUR_IP, PEER_IP, &udp(7, 4000, b"down after the storm"));
        }
        tries += 1;
        seen_up |= udp_side
            .recv()
            .iter()
            .any(|(_, p)| p.ends_with(b"up after the storm"));
        seen_down |= drv
            .pump_ip()
            .iter()
            .any(|f| f.ends_with(b"down after the storm"));
        seen_up && seen_down
    });
    until("all buffers home", Duration::from_secs(30), || {
        drv.pump_ip();
        udp_side.recv();
        all_home(&link, &tl)
    });
    assert_eq!(drv.rx_free.len(), FRAMES as usize);
    assert_eq!(udp_side.send_free.len(), TBUFS as usize);
    assert_eq!(link.rx_pool.drops().bad_owner, 0);
    assert_eq!(link.tx_pool.drops().total(), 0);
    assert_eq!(tl.deliver_pool.drops().total(), 0);
    assert_eq!(tl.send_pool.drops().total(), 0);
    assert_eq!(counter(&control, "drop.desc_bad"), 0);
    assert!(counter(&control, "transport.delivered") as usize >= up);
    drop(ip);
}

#[test]
fn without_a_transport_link_udp_is_protocol_unreachable() {
    watchdog(Duration::from_secs(60));
    let control = ControlBlock::create("ip-not", 4096).unwrap();
    let link = Link::create("t-ip-not", 16).unwrap();
    let mut drv = Driver::new(&link, &control);
    let _ip = spawn_with(&control, &link, None);
    drv.expect(1); // the announcement
    let dgram = Ip::new(PEER_IP, OUR_IP, 17).build(&udp(5000, 7, b"nobody home"));
    assert!(drv.inject(&eth(OUR_MAC, PEER_MAC, 0x0800, &dgram)));
    let f = drv.expect_ip(1);
    let (p, m) = parse_icmp(&f[0]);
    assert_eq!(p.dst(), PEER_IP);
    assert_eq!((m.msg_type(), m.code()), (3, 2));
    assert_eq!(m.data(), &dgram[..28]);
    until("counted", Duration::from_secs(20), || {
        counter(&control, "drop.proto_unreachable") == 1
    });
    assert_eq!(counter(&control, "transport.delivered"), 0);
}
