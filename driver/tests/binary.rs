//! The `keepnet-driver` binary under a test that plays the supervisor (creates the regions,
//! spawns and kills the driver), the ip server (the other end of the link region) and the
//! far end of the wire or the kernel behind a TAP.

mod common;

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use keepnet_driver::pcap::{drain_capture, PcapWriter};
use keepnet_driver::tap::Tap;
use keepnet_driver::wire::{FaultConfig, Side, Wire, WireEnd};
use keepnet_ipc::{new_eventfd, Descriptor, FreeList, Retakes, SpinPolicy};
use keepnet_server::control::ServerState;
use keepnet_server::runtime::supervisor_ends;
use keepnet_server::wiring::{IpEnds, Link, DRIVER, HEADROOM, IP, RX_POOL};
use keepnet_server::{boot, request, Command as Cmd, ControlBlock, RunOptions};

const FRAMES: u32 = 128;

/// What a supervisor holds for one driver.
struct Rig {
    control: ControlBlock,
    ip_control: ControlBlock,
    link: Link,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let control = ControlBlock::create(&format!("{tag}-driver"), 4096)
            .unwrap()
            .with_bell_eventfd(new_eventfd().unwrap());
        let ip_control = ControlBlock::create(&format!("{tag}-ip"), 0).unwrap();
        let link = Link::create(&format!("{tag}-link"), FRAMES).unwrap();
        Rig {
            control,
            ip_control,
            link,
        }
    }

    /// Spawns the driver with `config`, the link, the ip's control block, and `extra` regions
    /// and fds.
    fn spawn(
        &self,
        config: &str,
        regions: &[(&str, &keepnet_ipc::Region)],
        fds: &[(&str, BorrowedFd<'_>)],
    ) -> Proc {
        let mut cmd = self.command(config, regions, fds);
        Proc(cmd.spawn().expect("spawn keepnet-driver"))
    }

    fn command(
        &self,
        config: &str,
        regions: &[(&str, &keepnet_ipc::Region)],
        fds: &[(&str, BorrowedFd<'_>)],
    ) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keepnet-driver"));
        cmd.stdin(Stdio::null())
            .env("KEEPNET_LOG", "warn")
            .env("KEEPNET_DRIVER_CONFIG", config);
        let mut all = vec![
            ("link", self.link.region()),
            ("peer.ip", self.ip_control.region()),
        ];
        all.extend_from_slice(regions);
        let mut all_fds = vec![("bell", self.control.doorbell().eventfd().unwrap())];
        all_fds.extend_from_slice(fds);
        let opts = RunOptions {
            core: None,
            spin: SpinPolicy::PARK_AT_ONCE,
            park_timeout: Duration::from_millis(20),
            standby: false,
        };
        boot::prepare_with_fds(&mut cmd, &self.control, &all, &all_fds, &opts);
        cmd
    }

    fn wait_generation(&self, g: u64) {
        until("driver running", Duration::from_secs(20), || {
            self.control.generation().get() == g
                && self.control.state() == Some(ServerState::Running)
        });
    }

    /// An idle driver parks (on its doorbell and its backend's fd) instead of spinning: its
    /// loop runs about once per park timeout. A busy loop would beat orders of magnitude
    /// more often; a slow machine only beats less, so this cannot fail for slowness.
    fn assert_parks_when_idle(&self) {
        std::thread::sleep(Duration::from_millis(50));
        let h0 = self.control.heartbeat();
        std::thread::sleep(Duration::from_millis(300));
        let beats = self.control.heartbeat() - h0;
        assert!(
            beats < 2000,
            "idle driver looped {beats} times in 300 ms: it is not parking"
        );
    }

    fn counter(&self, name: &str) -> u64 {
        self.control
            .counters()
            .into_iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| v)
    }
}

/// The test's ip server: the other end of the link, with its own TX_POOL free list.
struct FakeIp {
    link: Link,
    ends: IpEnds,
    tx_free: FreeList,
    buf: Vec<u8>,
}

impl FakeIp {
    fn new(rig: &Rig) -> FakeIp {
        let link = rig.link.clone();
        let mut ends = link.ip_ends().unwrap();
        ends.tx.set_doorbell(rig.control.doorbell().clone());
        ends.rx_return.set_doorbell(rig.control.doorbell().clone());
        let (out, inc) = link.ip_in_flight().unwrap();
        let tx_free = FreeList::recover(&link.tx_pool, IP, &out, &inc);
        assert_eq!(tx_free.len(), FRAMES as usize);
        FakeIp {
            link,
            ends,
            tx_free,
            buf: vec![0; 16384],
        }
    }

    /// Queues a frame for the driver in a TX_POOL buffer; false if none is free or tx is full.
    fn send(&mut self, frame: &[u8]) -> bool {
        let Some(i) = self.tx_free.get() else {
            return false;
        };
        self.link.tx_pool.write(i, HEADROOM, frame).unwrap();
        let d = self.link.tx_pool.descriptor(i, frame.len() as u32);
        if self.ends.tx.push(d).is_err() {
            self.tx_free.put(i);
            return false;
        }
        true
    }

    /// Takes TX_POOL buffers the driver sent back.
    fn collect(&mut self) {
        self.tx_free
            .collect(&self.link.tx_pool, &mut self.ends.tx_return, DRIVER, 1024)
            .unwrap();
    }

    /// Receives every frame on `rx`, returning each buffer, or sending it back out on `tx`
    /// when `echo` says so (an echo in the request's own buffer).
    fn recv(&mut self, mut echo: impl FnMut(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut batch = [Descriptor::default(); 64];
        loop {
            self.ends.rx.rewind();
            let n = self.ends.rx.read(&mut batch).unwrap();
            if n == 0 {
                return got;
            }
            let mut returns = Vec::new();
            for d in &batch[..n] {
                let r = self
                    .link
                    .rx_pool
                    .take(d, DRIVER, IP, &mut Retakes::none())
                    .expect("the driver hands over valid descriptors");
                let len = self.link.rx_pool.read(&r, &mut self.buf);
                let frame = self.buf[..len].to_vec();
                let span = self.link.rx_pool.span(r.index(), r.offset(), r.len());
                if echo(&frame) && self.ends.tx.push(span).is_ok() {
                    // The driver frees it after sending.
                } else {
                    returns.push(self.link.rx_pool.descriptor(r.index(), 0));
                }
                got.push(frame);
            }
            self.ends.rx.commit(n).unwrap();
            let pushed = self.ends.rx_return.push_slice(&returns).unwrap();
            assert_eq!(pushed, returns.len(), "rx_return has room for every buffer");
        }
    }

    fn balanced(&self) -> bool {
        let rx = self.link.rx_pool.accounting();
        let tx = self.link.tx_pool.accounting();
        rx.len() == 1
            && rx.get(&DRIVER) == Some(&FRAMES)
            && tx.len() == 1
            && tx.get(&IP) == Some(&FRAMES)
    }
}

const IN_TAG: u32 = 0x1111;
const OUT_TAG: u32 = 0x2222;

/// Traffic state for the wire test.
#[derive(Default)]
struct Traffic {
    next_in: u64,
    next_out: u64,
    /// Inbound seqs the ip side saw (strictly increasing).
    last_in: Option<u64>,
    in_seen: u64,
    echoes_sent: u64,
    echoes_seen: u64,
    out_seen: HashSet<u64>,
    out_dups: u64,
}

impl Traffic {
    /// One round: offer frames both ways, then receive on both sides.
    fn round(&mut self, ip: &mut FakeIp, far: &mut WireEnd, in_limit: u64, out_limit: u64) {
        self.offer(ip, far, in_limit, out_limit);
        self.receive(ip, far);
    }

    /// Offers up to 16 frames each way.
    fn offer(&mut self, ip: &mut FakeIp, far: &mut WireEnd, in_limit: u64, out_limit: u64) {
        for _ in 0..16 {
            if self.next_in >= in_limit {
                break;
            }
            let f = test_frame(
                IN_TAG,
                self.next_in,
                60 + (self.next_in as usize * 13) % 1454,
            );
            if !far.send(&f).unwrap() {
                break;
            }
            self.next_in += 1;
        }
        ip.collect();
        for _ in 0..16 {
            if self.next_out >= out_limit {
                break;
            }
            let f = test_frame(
                OUT_TAG,
                self.next_out,
                60 + (self.next_out as usize * 7) % 1454,
            );
            if !ip.send(&f) {
                break;
            }
            self.next_out += 1;
        }
    }

    /// Receives everything waiting at the ip side (echoing every tenth inbound frame) and at
    /// the far end of the wire, checking each frame.
    fn receive(&mut self, ip: &mut FakeIp, far: &mut WireEnd) {
        let mut echoes = 0;
        for f in ip.recv(|f| parse_test_frame(f).is_some_and(|(_, s)| s % 10 == 0)) {
            assert!(frame_intact(&f), "inbound frame damaged");
            let (tag, seq) = parse_test_frame(&f).unwrap();
            assert_eq!(tag, IN_TAG);
            assert!(
                self.last_in.is_none_or(|l| seq > l),
                "inbound frame {seq} after {:?}: duplicated or reordered",
                self.last_in
            );
            self.last_in = Some(seq);
            self.in_seen += 1;
            if seq % 10 == 0 {
                echoes += 1;
            }
        }
        self.echoes_sent += echoes;
        let mut buf = vec![0u8; 4096];
        while let Some(n) = far.recv(&mut buf).unwrap() {
            let f = &buf[..n];
            assert!(frame_intact(f), "outbound frame damaged");
            match parse_test_frame(f).unwrap() {
                (IN_TAG, _) => self.echoes_seen += 1,
                (OUT_TAG, seq) => {
                    if !self.out_seen.insert(seq) {
                        self.out_dups += 1;
                    }
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

#[test]
fn wire_driver_survives_kill_9_without_leaking_buffers() {
    watchdog(Duration::from_secs(180));
    let rig = Rig::new("bin-wire");
    let wire = Wire::create("bin-wire-cable", 256).unwrap();
    let wire_bell = new_eventfd().unwrap();
    let mut far = wire
        .end(Side::B, FaultConfig::none())
        .unwrap()
        .with_peer_eventfd(wire_bell.try_clone().unwrap());
    let mut ip = FakeIp::new(&rig);
    let config = r#"{"backend":"wire","side":"a"}"#;
    let spawn = || {
        rig.spawn(
            config,
            &[("wire", wire.region())],
            &[("wire.rx", wire_bell.as_fd())],
        )
    };
    let mut driver = spawn();
    rig.wait_generation(1);

    let mut t = Traffic::default();
    const PHASE: u64 = 3000;
    let guard = || Instant::now() + Duration::from_secs(60);

    // Phase 1, with a capture window in the middle.
    let end = guard();
    while t.in_seen < PHASE / 2 || t.out_seen.len() < (PHASE / 2) as usize {
        assert!(Instant::now() < end, "phase 1 stalled");
        t.round(&mut ip, &mut far, PHASE, PHASE);
    }
    rig.link.set_capture(true);
    let mark = (t.in_seen, t.out_seen.len());
    let end = guard();
    while t.in_seen < mark.0 + 100 || t.out_seen.len() < mark.1 + 100 {
        assert!(Instant::now() < end, "capture window stalled");
        t.round(&mut ip, &mut far, PHASE, PHASE);
    }
    rig.link.set_capture(false);
    let mut pcap = PcapWriter::new(Vec::new()).unwrap();
    let mut drained = 0;
    until("capture drained", Duration::from_secs(20), || {
        drained += drain_capture(&rig.link, &mut pcap).unwrap();
        drained as u64 == rig.counter("capture.frames")
    });
    assert!(drained >= 200, "captured {drained} frames");
    assert!(pcap.into_inner().len() > 24 + drained * 16);

    // Kill -9 mid-traffic, again and again; a fresh driver takes over each time.
    const KILLS: u64 = 12;
    let mut kills = 0;
    let mut generation = 1;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    while kills < KILLS {
        let limit = PHASE * (kills / 4 + 2) + kills * 200;
        let end = guard();
        let target = t.in_seen + 200;
        while t.in_seen < target {
            assert!(Instant::now() < end, "traffic stalled before kill {kills}");
            t.round(&mut ip, &mut far, limit + PHASE, limit + PHASE);
        }
        // Hand the driver work both ways and kill it while it is busy with it.
        t.offer(&mut ip, &mut far, limit + PHASE, limit + PHASE);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 400));
        let pid = driver.pid();
        driver.kill();
        kills += 1;
        // Traffic keeps coming while nobody serves the link.
        for _ in 0..4 {
            t.round(&mut ip, &mut far, limit + PHASE, limit + PHASE);
        }
        driver = spawn();
        generation += 1;
        rig.wait_generation(generation);
        assert_ne!(rig.control.pid(), pid);
    }
    assert!(rig.counter("recover.rx_buffers") > 0);

    // Bad descriptors from ip are counted and dropped; the driver stays up.
    let bad_before = rig.counter("drop.tx_bad_descriptor");
    let pid = driver.pid();
    let good = ip.link.tx_pool.descriptor(0, 60);
    let bad = [
        Descriptor { pool: 9, ..good },
        Descriptor {
            index: 1 << 30,
            ..good
        },
        Descriptor {
            offset: u32::MAX,
            len: 10,
            ..good
        },
        // An RX_POOL buffer the ip server does not hold (the driver does).
        Descriptor {
            pool: RX_POOL,
            ..ip.link.rx_pool.descriptor(FRAMES - 1, 60)
        },
    ];
    assert_eq!(ip.ends.tx.push_slice(&bad).unwrap(), bad.len());
    until("bad descriptors counted", Duration::from_secs(20), || {
        rig.counter("drop.tx_bad_descriptor") == bad_before + bad.len() as u64
    });
    assert_eq!(rig.control.pid(), pid);
    assert_eq!(rig.control.generation().get(), generation);

    // Final phase: everything sent from here on arrives, exactly once.
    let final_in = t.next_in;
    let final_out = t.next_out;
    let total = final_in.max(final_out) + PHASE;
    let end = guard();
    loop {
        assert!(Instant::now() < end, "final phase stalled");
        t.round(&mut ip, &mut far, total, total);
        let outs_done = (final_out..total).all(|s| t.out_seen.contains(&s));
        if t.last_in == Some(total - 1) && outs_done {
            break;
        }
    }
    eprintln!("driver counters: {:?}", rig.control.counters());
    // A dead driver loses at most the frames it had read off the wire and not yet published.
    let missing_in = t.next_in - t.in_seen;
    assert!(
        missing_in <= 32 * kills,
        "{missing_in} inbound frames lost across {kills} kills"
    );
    let missing_out = t.next_out - t.out_seen.len() as u64;
    assert!(
        missing_out <= 32 * kills,
        "{missing_out} outbound frames lost"
    );
    assert!(
        t.out_dups <= 32 * kills,
        "{} outbound duplicates",
        t.out_dups
    );

    // Drain: every buffer goes home.
    until("buffers home", Duration::from_secs(20), || {
        t.round(&mut ip, &mut far, total, total);
        ip.balanced()
    });
    assert_eq!(ip.tx_free.len(), FRAMES as usize);
    assert!(t.echoes_seen + 32 * kills >= t.echoes_sent && t.echoes_seen > 0);
    assert!(rig.counter("rx.frames") >= t.in_seen);
    assert!(rig.counter("tx.frames") >= t.out_seen.len() as u64 + t.echoes_seen);
    assert_eq!(
        rig.counter("wire.sent"),
        wire.stats(Side::A).sent,
        "backend counters mirrored"
    );

    rig.assert_parks_when_idle();

    // A clean stop on request.
    let (mut cmds, mut replies) = supervisor_ends(&rig.control).unwrap();
    request(
        &mut cmds,
        &mut replies,
        1,
        Cmd::Stop,
        Duration::from_secs(10),
    )
    .expect("stop answered")
    .expect("stop ok");
    let status = driver.0.wait().unwrap();
    assert!(status.success(), "stop must exit 0, got {status}");
}

#[test]
fn bad_config_names_the_field() {
    watchdog(Duration::from_secs(60));
    let rig = Rig::new("bin-badcfg");
    let wire = Wire::create("bin-badcfg-cable", 16).unwrap();
    let run = |config: &str| {
        let mut cmd = rig.command(config, &[("wire", wire.region())], &[]);
        cmd.stderr(Stdio::piped());
        let child = Proc(cmd.spawn().expect("spawn keepnet-driver"));
        let pid = child.pid();
        // Wait through a guard: the process exits on its own; Proc reaps it either way.
        let mut child = child;
        let end = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "driver {pid} did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    };
    let (status, err) = run(r#"{"backend":"wire","side":"a","faults":{"loss":"lots"}}"#);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("faults.loss"),
        "error must name the field: {err}"
    );
    let (status, err) = run(r#"{"backend":"wire","side":"a","faults":{"loss":0.5,"jitter":1}}"#);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("jitter"), "error must name the field: {err}");
    let (status, err) = run(r#"{"backend":"tap"}"#);
    assert_eq!(
        status.code(),
        Some(1),
        "tap without fd `tap` must fail: {err}"
    );
    assert!(err.contains("fd `tap`"), "{err}");
}

#[test]
fn tap_driver_delivers_the_kernels_arp_request() {
    if !need_root("tap_driver_delivers_the_kernels_arp_request") {
        return;
    }
    watchdog(Duration::from_secs(120));
    let ns = Netns::new();
    let tap = Tap::create_in_netns(&ns.name, "kn0", 1500, Some(KERNEL_MAC)).unwrap();
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "kn0"]);
    let rig = Rig::new("bin-tap");
    let mut ip = FakeIp::new(&rig);
    let _driver = rig.spawn(r#"{"backend":"tap"}"#, &[], &[("tap", tap.fd())]);
    rig.wait_generation(1);

    // The kernel's ARP request reaches the ip server through the driver.
    let end = Instant::now() + Duration::from_secs(20);
    let mut last_poke = Instant::now() - Duration::from_secs(1);
    'arp: loop {
        assert!(Instant::now() < end, "no ARP request reached the link");
        if last_poke.elapsed() > Duration::from_millis(500) {
            poke_udp(&ns);
            last_poke = Instant::now();
        }
        for f in ip.recv(|_| false) {
            if is_arp_request(&f, KERNEL_MAC, KERNEL_IP, KEEPNET_IP) {
                break 'arp;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    // Our ARP reply goes out through the driver and the kernel learns our address.
    let before = ns.rx_packets("kn0");
    assert!(ip.send(&arp_frame(
        2,
        KEEPNET_MAC,
        KEEPNET_IP,
        KERNEL_MAC,
        KERNEL_IP
    )));
    until("kernel counted our frame", Duration::from_secs(20), || {
        ns.rx_packets("kn0") > before
    });
    until("kernel learned our MAC", Duration::from_secs(20), || {
        ns.ip(&["neigh", "show", "198.18.0.2", "dev", "kn0"])
            .contains("02:4b:4e:00:00:02")
    });
    until("tx buffer returned", Duration::from_secs(20), || {
        ip.collect();
        ip.recv(|_| false);
        ip.balanced()
    });
    assert!(rig.counter("tx.frames") >= 1);
    assert!(rig.counter("rx.frames") >= 1);
    rig.assert_parks_when_idle();
}
