//! The `keepnet-ip` binary as a process: this test plays the supervisor (it creates the
//! control blocks and the link region and starts the server per `keepnet_server::boot`) and
//! the driver (it drives the driver's ends of the link and follows the buffer rules). It then
//! kills the server with SIGKILL in the middle of traffic, starts a fresh one, and checks that
//! every buffer comes home.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use keepnet_ip::wire::{ArpPacket, EthernetFrame};
use keepnet_ip::{Config, Disposition, Event, IpStack, Mac};
use keepnet_ipc::{Descriptor, EndpointId, FreeList, Retakes, SpinPolicy, WaitOutcome};
use keepnet_server::wiring::{DriverEnds, Link, DRIVER, HEADROOM, IP, RX_POOL, TX_POOL};
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
        let mut echo = Vec::new();
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
            } else if f.len() > 34 && f[34] == 0 {
                echo.push(f);
            }
        }
        echo
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
