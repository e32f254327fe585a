//! The runtime under a test acting as supervisor, with a real server process (kn-relay).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keepnet_ipc::{Region, RegionKind, RegionLayout, Ring, SpinPolicy};
use keepnet_server::control::ServerState;
use keepnet_server::runtime::supervisor_ends;
use keepnet_server::{boot, codec, request, Command as Cmd, ControlBlock, RunOptions};
use serde::Deserialize;

const CAP: usize = 1024;
const IN_OFF: usize = 128;

/// Kills and reaps the child on every exit path.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Proc {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }
}

fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: test exceeded {limit:?}; aborting");
        std::process::abort();
    });
}

fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn spawn(control: &ControlBlock, rings: &Region) -> Proc {
    spawn_as(control, rings, false)
}

fn spawn_as(control: &ControlBlock, rings: &Region, standby: bool) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kn-relay"));
    cmd.stdin(Stdio::null()).env("KEEPNET_LOG", "warn");
    let opts = RunOptions {
        core: None,
        spin: SpinPolicy::spin_for(Duration::from_micros(20)),
        park_timeout: Duration::from_millis(20),
        standby,
    };
    boot::prepare(&mut cmd, control, &[("rings", rings)], &opts);
    Proc(cmd.spawn().expect("spawn kn-relay"))
}

/// Sequence numbers sent into and received out of the relay.
#[derive(Default)]
struct Flow {
    next_in: u64,
    next_out: u64,
}

impl Flow {
    /// Sends `count` more slots and waits until everything sent came out, in order.
    fn pump(
        &mut self,
        input: &mut keepnet_ipc::Producer<u64>,
        output: &mut keepnet_ipc::Consumer<u64>,
        count: u64,
    ) {
        let target = self.next_in + count;
        let end = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u64; 128];
        while self.next_out < target {
            assert!(
                Instant::now() < end,
                "relay stalled at {}/{target}",
                self.next_out
            );
            if self.next_in < target {
                let batch: Vec<u64> = (self.next_in..target.min(self.next_in + 64)).collect();
                self.next_in += input.push_slice(&batch).unwrap() as u64;
            }
            let n = output.pop_batch(&mut buf).unwrap();
            for v in &buf[..n] {
                assert_eq!(
                    *v, self.next_out,
                    "relay reordered, lost or duplicated a slot"
                );
                self.next_out += 1;
            }
            if n == 0 {
                std::thread::yield_now();
            }
        }
    }
}

#[derive(Deserialize, Debug)]
struct State {
    relayed: u64,
    sum: u64,
}

/// The relay's rings (input with the server's doorbell, output), laid out as kn-relay expects.
fn relay_rig(
    control: &ControlBlock,
    name: &str,
) -> (
    Region,
    keepnet_ipc::Producer<u64>,
    keepnet_ipc::Consumer<u64>,
) {
    let mut l = RegionLayout::new();
    let in_off = l.place(Ring::<u64>::size_in_region(CAP), Ring::<u64>::ALIGN);
    let out_off = l.place(Ring::<u64>::size_in_region(CAP), Ring::<u64>::ALIGN);
    assert_eq!(in_off, IN_OFF);
    let rings = Region::create(name, RegionKind::RINGS, l.size()).unwrap();
    let mut input = Ring::<u64>::init(&rings, in_off, CAP, 1)
        .unwrap()
        .producer()
        .unwrap();
    input.set_doorbell(control.doorbell().clone());
    let output = Ring::<u64>::init(&rings, out_off, CAP, 2)
        .unwrap()
        .consumer()
        .unwrap();
    (rings, input, output)
}

/// Sends `cmd` with `value` and waits for its reply (Ok(value) or Err(code)).
fn request_value(
    cmds: &mut keepnet_ipc::Producer<keepnet_server::ControlMsg>,
    replies: &mut keepnet_ipc::Consumer<keepnet_server::ControlMsg>,
    seq: u32,
    cmd: Cmd,
    value: u32,
) -> Result<u64, u64> {
    let msg = keepnet_server::ControlMsg {
        value: u64::from(value),
        ..keepnet_server::ControlMsg::command(cmd, seq)
    };
    cmds.push(msg).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = replies.pop().unwrap() {
            if r.seq == seq {
                return if r.kind == keepnet_server::ControlMsg::OK {
                    Ok(r.value)
                } else {
                    Err(r.value)
                };
            }
        }
        assert!(Instant::now() < end, "no reply to {cmd:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn relay_server_lifecycle() {
    watchdog(Duration::from_secs(120));
    let control = ControlBlock::create("relay", 4096).unwrap();
    let (rings, mut input, mut output) = relay_rig(&control, "relay-rings");
    let (mut cmds, mut replies) = supervisor_ends(&control).unwrap();

    let mut flow = Flow::default();

    // 1. Start: ready, generation 1, heartbeat moving while idle.
    let mut first = spawn(&control, &rings);
    until("first instance running", Duration::from_secs(20), || {
        control.state() == Some(ServerState::Running)
    });
    assert_eq!(control.generation().get(), 1);
    assert_eq!(control.pid(), first.0.id());
    flow.pump(&mut input, &mut output, 100_000);
    assert!(control.work() >= 100_000);
    assert!(
        control.heartbeat_moves(Duration::from_millis(100)),
        "idle server must still beat"
    );

    // 2. A hung (stopped) server's heartbeat stalls; it moves again when continued.
    nix::sys::signal::kill(first.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !control.heartbeat_moves(Duration::from_millis(200)),
        "a stopped server must not beat"
    );
    nix::sys::signal::kill(first.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(control.heartbeat_moves(Duration::from_millis(200)));

    // 3. Live update: a successor waits in standby (loaded, regions mapped, no ring claimed)
    //    while the old one still serves.
    control.clear_handover();
    let second = spawn_as(&control, &rings, true);
    until("successor in standby", Duration::from_secs(20), || {
        control.is_standby(second.0.id())
    });
    flow.pump(&mut input, &mut output, 1000);
    assert_eq!(
        control.pid(),
        first.0.id(),
        "the old instance serves until the handover"
    );

    // 4. Quiesce: traffic waits in the ring; snapshot; resume.
    let ok = |r: Result<Result<u64, u64>, keepnet_server::RequestError>| {
        r.expect("request answered").expect("request succeeded")
    };
    ok(request(
        &mut cmds,
        &mut replies,
        1,
        Cmd::Quiesce,
        Duration::from_secs(5),
    ));
    assert_eq!(control.state(), Some(ServerState::Quiesced));
    let held: Vec<u64> = (flow.next_in..flow.next_in + 500).collect();
    assert_eq!(input.push_slice(&held).unwrap(), 500);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        output.pop().unwrap(),
        None,
        "a quiesced server must not move traffic"
    );
    let len = ok(request(
        &mut cmds,
        &mut replies,
        2,
        Cmd::Snapshot,
        Duration::from_secs(5),
    ));
    let bytes = control.read_snapshot().unwrap();
    assert_eq!(bytes.len() as u64, len);
    let st: State = codec::decode(&bytes, "relay", 1..=1)
        .unwrap()
        .state()
        .unwrap();
    assert_eq!(st.relayed, 101_000);
    assert_eq!(st.sum, (0..101_000u64).sum::<u64>());
    ok(request(
        &mut cmds,
        &mut replies,
        3,
        Cmd::Resume,
        Duration::from_secs(5),
    ));

    // 5. A handoff to a pid that is not in standby is refused; the old one serves on.
    let refused = request_value(&mut cmds, &mut replies, 4, Cmd::Handoff, 1);
    assert_eq!(
        refused,
        Err(keepnet_server::runtime::handoff_error::NO_SUCCESSOR)
    );
    assert_eq!(control.pid(), first.0.id());

    // 6. Handoff: the old one snapshots, releases its rings and hands over; the successor
    //    restores and carries on. The held slots come out in order, and the blackout is
    //    measurable from the servers' own timestamps.
    let len = request_value(&mut cmds, &mut replies, 5, Cmd::Handoff, second.0.id()).unwrap();
    assert!(len > 0);
    let status = first.0.wait().unwrap();
    assert!(status.success(), "a handoff must exit 0, got {status}");
    until("successor took over", Duration::from_secs(20), || {
        control.handover_result().is_some()
    });
    assert_eq!(control.handover_result(), Some(true));
    until("successor serving", Duration::from_secs(20), || {
        control.generation().get() == 2 && control.first_poll_ns() != 0
    });
    assert_eq!(control.pid(), second.0.id());
    assert!(
        !control.is_standby(second.0.id()),
        "its standby slot is free again"
    );
    flow.next_in += 500;
    flow.pump(&mut input, &mut output, 0);
    let (off, on) = (control.handoff_ns(), control.first_poll_ns());
    assert!(
        off > 0 && on > off,
        "blackout must be positive: {off} -> {on}"
    );
    assert_eq!(control.state_formats(), Some((1, 1)));
    let len = ok(request(
        &mut cmds,
        &mut replies,
        7,
        Cmd::Snapshot,
        Duration::from_secs(5),
    ));
    assert!(len > 0);
    let st: State = codec::decode(&control.read_snapshot().unwrap(), "relay", 1..=1)
        .unwrap()
        .state()
        .unwrap();
    assert_eq!(
        st.relayed, 101_500,
        "restored count plus what the successor relayed"
    );

    // 6. A bogus control message is counted and ignored.
    cmds.push(keepnet_server::ControlMsg {
        kind: 9999,
        seq: 9,
        value: 0,
    })
    .unwrap();
    until("bad command counted", Duration::from_secs(5), || {
        control.bad_commands() == 1
    });
}

#[test]
fn killed_server_is_replaced_without_loss() {
    watchdog(Duration::from_secs(120));
    let control = ControlBlock::create("relay-kill", 4096).unwrap();
    let (rings, mut input, mut output) = relay_rig(&control, "relay-kill-rings");

    let total = 300_000u64;
    let (mut next_in, mut next_out) = (0u64, 0u64);
    let mut server = spawn(&control, &rings);
    let mut generation = 1;
    let mut kills = 0;
    let mut buf = [0u64; 256];
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let end = Instant::now() + Duration::from_secs(90);
    while next_out < total {
        assert!(
            Instant::now() < end,
            "stalled at {next_out}/{total} after {kills} kills"
        );
        if next_in < total {
            let batch: Vec<u64> = (next_in..total.min(next_in + 64)).collect();
            next_in += input.push_slice(&batch).unwrap() as u64;
        }
        let n = output.pop_batch(&mut buf).unwrap();
        for v in &buf[..n] {
            assert_eq!(
                *v, next_out,
                "slot lost, duplicated or reordered across a kill"
            );
            next_out += 1;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if kills < 10 && next_out > (kills + 1) * total / 12 && rng % 4 == 0 {
            let _ = server.0.kill();
            let _ = server.0.wait();
            kills += 1;
            server = spawn(&control, &rings);
            generation += 1;
            until("replacement up", Duration::from_secs(20), || {
                control.generation().get() == generation
            });
        }
        if n == 0 {
            std::thread::yield_now();
        }
    }
    assert_eq!(kills, 10);
    drop(server);
}

#[test]
fn version_names_the_build_and_the_state_formats_it_reads() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kn-relay"))
        .arg("--version")
        .output()
        .expect("run kn-relay --version");
    assert!(out.status.success());
    let line = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        line.trim(),
        keepnet_server::runtime::version_line("relay", (1, 1)),
        "{line}"
    );
    assert!(line.contains("state-format 1 reads 1-1"), "{line}");
}
