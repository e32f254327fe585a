//! Cross-process tests of keepnet-ipc: every test runs real peer processes (`ipc-peer`) that
//! map the same regions, received by fd inheritance or over SCM_RIGHTS.
//!
//! Every peer is killed and reaped by pid when its `Peer` guard drops (also on panic) and dies
//! with the test process (PR_SET_PDEATHSIG); every wait is bounded, and a watchdog aborts a test
//! that overruns its budget, so a failure never turns into a hang. Heavy tests take a lock so
//! that they run one at a time on this 2-core machine. None asserts a speed.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keepnet_ipc::fdpass::send_fds;
use keepnet_ipc::pool::PoolDrops;
use keepnet_ipc::region::HEADER_SIZE;
use keepnet_ipc::ring::Claim;
use keepnet_ipc::{
    BufferPool, DescError, Descriptor, Doorbell, PushError, Region, RegionKind, Retakes, Ring,
    RingError,
};
use keepnet_tests::harness::{
    describe, heavy_lock, seed, wait_all_ok_progress, Peer, Rng, Watchdog,
};
use keepnet_tests::shm::*;
use nix::sys::signal::Signal;

const PEER: &str = env!("CARGO_BIN_EXE_ipc-peer");

/// A stream that has not moved for this long is stuck (it normally moves millions of slots a
/// second).
const STALL: Duration = Duration::from_secs(20);

fn region(name: &str, size: usize) -> Region {
    Region::create(name, RegionKind::TEST, size)
        .unwrap_or_else(|e| panic!("creating region {name}: {e}"))
}

/// Runs a short-lived peer to completion and asserts it succeeded.
fn run_peer(args: &[&str], r: &Region) {
    let mut p = Peer::spawn(PEER, args, &[r], Duration::from_secs(60));
    match p.wait_until(Instant::now() + Duration::from_secs(30)) {
        Ok(st) if st.success() => {}
        Ok(st) => panic!("peer {args:?} failed: {}", describe(&st)),
        Err(e) => panic!("{e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Stream 10,000,000 slots between two processes.

#[test]
fn stream_ten_million_slots_between_processes() {
    const N: u64 = 10_000_000;
    let _lock = heavy_lock(Duration::from_secs(900));
    let _wd = Watchdog::arm(
        "stream_ten_million_slots_between_processes",
        Duration::from_secs(300),
    );
    let l = StreamLayout::new();
    let r = region("stream", l.size);
    l.init(&r).expect("init stream region");
    let n = N.to_string();
    let t0 = Instant::now();
    let mut cons = Peer::spawn(
        PEER,
        &["stream-consumer", &n],
        &[&r],
        Duration::from_secs(270),
    );
    let mut prod = Peer::spawn(
        PEER,
        &["stream-producer", &n],
        &[&r],
        Duration::from_secs(270),
    );
    let ctl = Ctl::at(&r, l.ctl).expect("ctl");
    let res = wait_all_ok_progress(
        &mut [&mut cons, &mut prod],
        t0 + Duration::from_secs(240),
        STALL,
        || ctl.get(ctl::CONSUMED),
    );
    let elapsed = t0.elapsed();
    res.unwrap_or_else(|e| {
        panic!(
            "{e}; consumer accepted {} elements, {} errors, first bad {}",
            ctl.get(ctl::CONSUMED),
            ctl.get(ctl::ERRORS),
            ctl.get(ctl::FIRST_BAD).wrapping_sub(1)
        )
    });
    assert_eq!(ctl.get(ctl::ERRORS), 0, "consumer found bad slots");
    assert_eq!(
        ctl.get(ctl::CONSUMED),
        N,
        "consumer did not accept every element"
    );
    let ring = Ring::<StreamSlot>::open(&r, l.ring, STREAM_TAG).expect("open ring");
    assert_eq!(ring.indices(), Ok((N, N)));
    assert_eq!(ring.corrupt_count(), 0);
    assert_eq!(
        ring.claims(),
        (0, 0),
        "both sides released their claims on exit"
    );
    let cb = Doorbell::attach(&r, l.cons_bell).expect("bell");
    let pb = Doorbell::attach(&r, l.prod_bell).expect("bell");
    println!(
        "stream: {N} slots in {elapsed:.2?} ({:.1} M slots/s); consumer parked {} times, producer {} times; \
         wake syscalls {}+{}; wait timeouts {}",
        N as f64 / elapsed.as_secs_f64() / 1e6,
        cb.parks(),
        pb.parks(),
        cb.wakes(),
        pb.wakes(),
        ctl.get(ctl::TIMEOUTS)
    );
}

// ---------------------------------------------------------------------------------------------
// 2 and 3. Crash safety: a stream of pool buffers survives SIGKILL of either side, many times.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Victim {
    Producer,
    Consumer,
}

fn crash_drill(name: &str, victim: Victim, kills: usize, n: u64) {
    let _lock = heavy_lock(Duration::from_secs(900));
    let _wd = Watchdog::arm(name, Duration::from_secs(360));
    let mut rng = Rng::new(seed(name));
    let l = PoolStreamLayout::new(n);
    let r = region(name, l.size);
    l.init(&r).expect("init pool-stream region");
    let ctl = Ctl::at(&r, l.ctl).expect("ctl");
    let data = Ring::<BufSlot>::open(&r, l.data, DATA_TAG).expect("data ring");
    let ret = Ring::<Descriptor>::open(&r, l.ret, RET_TAG).expect("return ring");
    let pool = BufferPool::open(&r, l.pool, POOL_ID).expect("pool");
    let prod_bell = Doorbell::attach(&r, l.prod_bell).expect("bell");
    // The producer may not run past the gate, which the test raises after each kill: the stream
    // cannot finish before the last kill, however fast the machine, and the kills are spread
    // over the whole stream.
    let gate = |k: usize| n * (k as u64 + 1) / (kills as u64 + 1);
    ctl.word(ctl::GATE).store(gate(0), Ordering::Release);

    let nstr = n.to_string();
    let spawn = |role: &str| Peer::spawn(PEER, &[role, &nstr], &[&r], Duration::from_secs(330));
    let victim_role = match victim {
        Victim::Producer => "pool-producer",
        Victim::Consumer => "pool-consumer",
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300);
    let mut prod = spawn("pool-producer");
    let mut cons = spawn("pool-consumer");
    let mut heads_at_kill = Vec::with_capacity(kills);
    let mut frozen = 0;
    for k in 0..kills {
        std::thread::sleep(Duration::from_micros(rng.below(20_001)));
        for p in [&mut prod, &mut cons] {
            if let Some(st) = p.try_status() {
                panic!("{} ended before kill {k}: {}", p.name(), describe(&st));
            }
        }
        let (target, other) = match victim {
            Victim::Producer => (&mut prod, &mut cons),
            Victim::Consumer => (&mut cons, &mut prod),
        };
        // Every other time, the surviving side is frozen across the kill and the restart, so
        // the restarted side finds its rings full of work in flight (a running peer would
        // usually have drained them before the new instance scans).
        let freeze = rng.below(2) == 0;
        if freeze {
            other.signal(Signal::SIGSTOP);
        }
        let (head, tail) = data.indices().expect("data ring indices");
        heads_at_kill.push((head, tail));
        let st = target.kill_and_reap();
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{} ended on its own before kill {k}: {}",
            target.name(),
            describe(&st)
        );
        ctl.word(ctl::GATE).store(gate(k + 1), Ordering::Release);
        prod_bell.ring();
        *target = spawn(victim_role);
        if freeze {
            std::thread::sleep(Duration::from_micros(1000 + rng.below(7001)));
            other.signal(Signal::SIGCONT);
            frozen += 1;
        }
        assert!(Instant::now() < deadline, "kill loop overran its deadline");
    }
    let kill_phase = t0.elapsed();
    // Whatever moves on either ring counts as progress: a leak or a lost wake-up that stalls
    // the stream fails the test in seconds instead of at the deadline.
    let res = wait_all_ok_progress(&mut [&mut cons, &mut prod], deadline, STALL, || {
        let (dh, dt) = data.indices().unwrap_or((0, 0));
        let (rh, rt) = ret.indices().unwrap_or((0, 0));
        dh + dt + rh + rt
    });
    let elapsed = t0.elapsed();
    let stats = format!(
        "consumed {}/{n}, errors {}, first bad {}, producer starts {} takeovers {} recovered {}, \
         consumer starts {} takeovers {} reclaimed {} replayed {}, data ring {:?}, return ring {:?}, \
         accounting {:?}, final free {} (last seen {}), drops {:?}, wait timeouts {}",
        ctl.get(ctl::CONSUMED),
        ctl.get(ctl::ERRORS),
        ctl.get(ctl::FIRST_BAD).wrapping_sub(1) as i64,
        ctl.get(ctl::STARTS_P),
        ctl.get(ctl::TAKEOVERS_P),
        ctl.get(ctl::RECOVERED_P),
        ctl.get(ctl::STARTS_C),
        ctl.get(ctl::TAKEOVERS_C),
        ctl.get(ctl::RECLAIMED_C),
        ctl.get(ctl::REPLAYED_C),
        data.indices(),
        ret.indices(),
        pool.accounting(),
        ctl.get(ctl::FINAL_FREE),
        ctl.get(ctl::FREE_NOW),
        pool.drops(),
        ctl.get(ctl::TIMEOUTS),
    );
    println!(
        "{name}: {kills} kills of the {victim:?} ({frozen} with the peer frozen) in {kill_phase:.2?}, whole run {elapsed:.2?}; {stats}; \
         (head, tail) at the first kills: {:?}",
        &heads_at_kill[..heads_at_kill.len().min(8)]
    );
    if let Err(e) = res {
        panic!("{e}; {stats}");
    }

    // Every element arrived exactly once, in order, intact (the consumer checked each one
    // against its slot index and payload; the sink holds what it accepted where).
    assert_eq!(ctl.get(ctl::ERRORS), 0, "{stats}");
    assert_eq!(ctl.get(ctl::CONSUMED), n, "{stats}");
    let mut bad = Vec::new();
    for i in 0..n {
        let v = l.sink(&r, i).expect("sink").load(Ordering::Acquire);
        if v != i {
            bad.push((i, v));
        }
    }
    assert!(
        bad.is_empty(),
        "sink has {} wrong entries (gap = u64::MAX), first: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert_eq!(data.indices(), Ok((n, n)), "data ring drained exactly to n");
    let (rh, rt) = ret.indices().expect("return ring");
    assert_eq!(rh, rt, "return ring drained");
    // Every buffer is accounted for: all home, all on the free list once, nothing refused.
    let all_home: BTreeMap<_, _> = [(PRODUCER_EP, POOL_COUNT)].into_iter().collect();
    assert_eq!(pool.accounting(), all_home, "{stats}");
    assert_eq!(
        ctl.get(ctl::FINAL_FREE),
        u64::from(POOL_COUNT),
        "free list size at the end"
    );
    assert_eq!(
        pool.drops(),
        PoolDrops::default(),
        "no descriptor refused, no double return"
    );
    assert_eq!(data.corrupt_count() + ret.corrupt_count(), 0);
    // The restarts really were restarts mid-stream.
    let takeovers = match victim {
        Victim::Producer => ctl.get(ctl::TAKEOVERS_P),
        Victim::Consumer => ctl.get(ctl::TAKEOVERS_C),
    };
    assert!(
        takeovers as usize >= kills / 2,
        "only {takeovers} of {kills} restarts took a ring over; {stats}"
    );
    assert!(
        heads_at_kill.iter().all(|&(_, t)| t < n),
        "every kill landed mid-stream"
    );
}

#[test]
fn crash_producer_killed_fifty_times() {
    crash_drill(
        "crash_producer_killed_fifty_times",
        Victim::Producer,
        50,
        4_000_000,
    );
}

#[test]
fn crash_consumer_killed_fifty_times() {
    crash_drill(
        "crash_consumer_killed_fifty_times",
        Victim::Consumer,
        50,
        4_000_000,
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Doorbell: a million park/wake cycles between two processes, no lost wake-up.

/// CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect()
}

/// Runs `cycles` ping-pong cycles between two processes pinned to `cpus`, each side waiting on
/// its own doorbell with PARK_AT_ONCE and a 5 s timeout; returns the parks counted.
fn ping_pong(name: &str, cycles: u64, cpus: (usize, usize)) -> u64 {
    let _lock = heavy_lock(Duration::from_secs(900));
    let _wd = Watchdog::arm(name, Duration::from_secs(300));
    let l = PingLayout::new();
    let r = region("pingpong", l.size);
    let bell_a = Doorbell::init(&r, l.bell_a).expect("bell a");
    let bell_b = Doorbell::init(&r, l.bell_b).expect("bell b");
    let n = cycles.to_string();
    let (cpu_a, cpu_b) = (cpus.0.to_string(), cpus.1.to_string());
    let t0 = Instant::now();
    let timeout = Duration::from_secs(270);
    let mut pong = Peer::spawn(PEER, &["pong", &n, &cpu_b], &[&r], timeout);
    let mut ping = Peer::spawn(PEER, &["ping", &n, &cpu_a], &[&r], timeout);
    let ctl = Ctl::at(&r, l.ctl).expect("ctl");
    let res = wait_all_ok_progress(
        &mut [&mut ping, &mut pong],
        t0 + Duration::from_secs(240),
        STALL,
        || ctl.get(ctl::PING) + ctl.get(ctl::PONG),
    );
    let elapsed = t0.elapsed();
    let done = ctl.get(ctl::PONG);
    let parks = bell_a.parks() + bell_b.parks();
    let wakes = bell_a.wakes() + bell_b.wakes();
    println!(
        "{name}: {done} of {cycles} ping-pong cycles on cpus {cpus:?} in {elapsed:.2?} \
         ({:.2} us/cycle); parks {parks} ({} + {}), wake syscalls {wakes}",
        elapsed.as_secs_f64() * 1e6 / done.max(1) as f64,
        bell_a.parks(),
        bell_b.parks()
    );
    res.unwrap_or_else(|e| {
        panic!(
            "{e} (exit code {EXIT_LOST_WAKEUP}: a wait timed out or ran out its timeout, a lost \
             wake-up); ping {} pong {done}",
            ctl.get(ctl::PING)
        )
    });
    assert_eq!((ctl.get(ctl::PING), done), (cycles, cycles));
    assert!(
        wakes >= parks / 2,
        "{wakes} wake syscalls for {parks} parks"
    );
    parks
}

#[test]
fn doorbell_million_cycles_no_lost_wakeup() {
    // Both sides on one core: each wait finds no work and parks (the other side cannot run
    // meanwhile), and nearly every ring must wake a sleeper.
    const CYCLES: u64 = 1_000_000;
    let cpu = *allowed_cpus().last().expect("some cpu");
    let parks = ping_pong("doorbell_million_cycles_no_lost_wakeup", CYCLES, (cpu, cpu));
    assert!(
        parks >= CYCLES / 2,
        "only {parks} parks in {CYCLES} cycles: the park path was not exercised"
    );
}

#[test]
fn doorbell_cross_core_no_lost_wakeup() {
    // One side per core: the wake-up now races with the sleeper announcing itself on another
    // core, which is where a missing fence or re-check loses wake-ups.
    const CYCLES: u64 = 100_000;
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        println!("doorbell_cross_core_no_lost_wakeup: one cpu only, skipped");
        return;
    }
    let parks = ping_pong(
        "doorbell_cross_core_no_lost_wakeup",
        CYCLES,
        (cpus[0], cpus[cpus.len() - 1]),
    );
    assert!(
        parks >= CYCLES / 2,
        "only {parks} parks in {CYCLES} cycles: the park path was not exercised"
    );
}

// ---------------------------------------------------------------------------------------------
// 5a. Garbage over ring indices written by another process.

fn fill_guards(r: &Region, l: &BadLayout) {
    for off in [l.guard_lo, l.guard_hi] {
        for w in 0..GUARD / 8 {
            r.atomic_u64(off + 8 * w)
                .expect("guard")
                .store(CANARY, Ordering::Relaxed);
        }
    }
}

fn assert_guards(r: &Region, l: &BadLayout) {
    for off in [l.guard_lo, l.guard_hi] {
        for w in 0..GUARD / 8 {
            let v = r
                .atomic_u64(off + 8 * w)
                .expect("guard")
                .load(Ordering::Relaxed);
            assert_eq!(v, CANARY, "guard word at {} overwritten", off + 8 * w);
        }
    }
}

fn is_corrupt<T>(r: &Result<T, RingError>) -> bool {
    matches!(r, Err(RingError::Corrupt { .. }))
}

#[test]
fn garbage_tail_from_peer_is_corrupt_for_the_consumer() {
    let l = BadLayout::new();
    let r = region("garbage-tail", l.size);
    fill_guards(&r, &l);
    let tail_at = (l.ring + 128).to_string();
    let cap = BAD_CAP as u64;
    // After the setup below the consumer has committed 2, read up to 4, seen a tail of 5.
    for garbage in [u64::MAX, 2 + cap + 1, 1 << 63, 4, 0] {
        let ring = Ring::<u64>::init(&r, l.ring, BAD_CAP, BAD_TAG).expect("ring");
        let mut c = ring.consumer().expect("consumer");
        run_peer(&["push-u64", "5"], &r);
        let mut out = [0u64; 4];
        assert_eq!(c.read(&mut out), Ok(4));
        assert_eq!(out, [0, 1, 2, 3]);
        c.commit(2).expect("commit");
        let before = ring.corrupt_count();
        run_peer(&["scribble", &tail_at, &garbage.to_string()], &r);
        let mut big = [0u64; BAD_CAP];
        let res = c.read(&mut big);
        assert!(
            is_corrupt(&res),
            "tail {garbage}: consumer read gave {res:?}"
        );
        assert!(
            ring.corrupt_count() > before,
            "tail {garbage}: corrupt_count did not go up"
        );
        assert!(
            is_corrupt(&c.read(&mut big)),
            "tail {garbage}: stays corrupt"
        );
        assert_eq!(
            c.available().ok().filter(|&a| a > 1),
            None,
            "tail {garbage}: no phantom slots"
        );
        drop(c);
        if garbage > 2 + cap || garbage < 2 {
            // Inconsistent even at rest: a fresh claim and a scan refuse it too.
            assert!(is_corrupt(&ring.in_flight()), "tail {garbage}: in_flight");
            assert!(
                is_corrupt(&ring.consumer()),
                "tail {garbage}: fresh consumer"
            );
            assert!(
                is_corrupt(&ring.producer()),
                "tail {garbage}: fresh producer"
            );
            assert_eq!(ring.claims(), (0, 0), "a refused claim is released");
        }
        assert_guards(&r, &l);
    }
}

#[test]
fn garbage_head_from_peer_is_corrupt_for_the_producer() {
    let l = BadLayout::new();
    let r = region("garbage-head", l.size);
    fill_guards(&r, &l);
    let head_at = (l.ring + 256).to_string();
    let cap = BAD_CAP as u64;
    for garbage in [u64::MAX, cap + 1, 1 << 62, 1 << 63] {
        let ring = Ring::<u64>::init(&r, l.ring, BAD_CAP, BAD_TAG).expect("ring");
        let mut p = ring.producer().expect("producer");
        for v in 0..cap {
            p.push(v).expect("push into an empty ring");
        }
        assert_eq!(p.push(99), Err(PushError::Full(99)));
        let before = ring.corrupt_count();
        run_peer(&["scribble", &head_at, &garbage.to_string()], &r);
        let res = p.push(100);
        assert!(
            matches!(res, Err(PushError::Corrupt(RingError::Corrupt { .. }))),
            "head {garbage}: push gave {res:?}"
        );
        assert!(
            ring.corrupt_count() > before,
            "head {garbage}: corrupt_count did not go up"
        );
        assert!(is_corrupt(&p.free_slots()), "head {garbage}: free_slots");
        assert!(
            is_corrupt(&p.push_slice(&[1, 2, 3])),
            "head {garbage}: push_slice"
        );
        drop(p);
        assert!(is_corrupt(&ring.in_flight()), "head {garbage}: in_flight");
        assert!(
            is_corrupt(&ring.consumer()),
            "head {garbage}: fresh consumer"
        );
        assert_guards(&r, &l);
    }

    // Backwards: a consumer really took 4 slots (another process), then its head goes back.
    let ring = Ring::<u64>::init(&r, l.ring, BAD_CAP, BAD_TAG).expect("ring");
    let mut p = ring.producer().expect("producer");
    for v in 0..cap {
        p.push(v).expect("push");
    }
    run_peer(&["scribble", &head_at, "4"], &r); // a legitimate head: 4 consumed
    for v in cap..cap + 4 {
        p.push(v).expect("push after the consumer freed 4");
    }
    run_peer(&["scribble", &head_at, "3"], &r);
    assert!(
        matches!(p.push(7), Err(PushError::Corrupt(_))),
        "head moved backwards"
    );
    assert_guards(&r, &l);
}

#[test]
fn consistent_but_huge_indices_are_refused_without_panic() {
    // A peer writes indices that are consistent with each other but near u64::MAX: they must be
    // refused as corrupt, and a process claiming that ring must fail cleanly, not panic on
    // overflow (regression: they used to pass and overflow `head + capacity`).
    let l = BadLayout::new();
    let r = region("huge-indices", l.size);
    let ring = Ring::<u64>::init(&r, l.ring, BAD_CAP, BAD_TAG).expect("ring");
    let head_at = (l.ring + 256).to_string();
    let tail_at = (l.ring + 128).to_string();
    for (h, t) in [
        (u64::MAX - 1, u64::MAX),
        (1 << 63, (1 << 63) + 3),
        (u64::MAX - 16, u64::MAX),
    ] {
        run_peer(
            &[
                "scribble",
                &head_at,
                &h.to_string(),
                &tail_at,
                &t.to_string(),
            ],
            &r,
        );
        assert!(is_corrupt(&ring.indices()), "({h}, {t})");
        assert!(is_corrupt(&ring.consumer()), "({h}, {t}): consumer");
        assert!(is_corrupt(&ring.producer()), "({h}, {t}): producer");
        // Another process claiming either side gets the same answer (and does not panic).
        run_peer(&["claim-refused"], &r);
    }
}

// ---------------------------------------------------------------------------------------------
// 5b. Bad descriptors sent by another process.

#[test]
fn bad_descriptors_from_peer_are_refused_and_counted() {
    let l = BadLayout::new();
    let r = region("bad-desc", l.size);
    let ring = Ring::<Descriptor>::init(&r, l.desc_ring, BAD_CAP, BAD_TAG).expect("ring");
    let pool = BufferPool::init(
        &r,
        l.pool,
        BAD_POOL_ID,
        BAD_POOL_COUNT,
        BAD_BUF_SIZE,
        BAD_HEADROOM,
        BAD_SENDER,
    )
    .expect("pool");
    // Buffer BAD_STOLEN_INDEX is handed on to a third endpoint: the sender no longer holds it.
    pool.take(
        &pool.descriptor(BAD_STOLEN_INDEX, 10),
        BAD_SENDER,
        BAD_THIRD,
        &mut Retakes::none(),
    )
    .expect("handover");
    run_peer(&["bad-desc"], &r);

    let cases = bad_descriptor_cases();
    let mut c = ring.consumer().expect("consumer");
    let mut got = vec![Descriptor::default(); BAD_CAP];
    let k = c.pop_batch(&mut got).expect("pop");
    assert_eq!(
        &got[..k],
        &cases.iter().map(|c| c.0).collect::<Vec<_>>()[..]
    );

    let verdict = |e: &Result<keepnet_ipc::pool::BufRef, DescError>| match e {
        Ok(_) => Expect::Accept,
        Err(DescError::WrongPool { .. }) => Expect::WrongPool,
        Err(DescError::BadIndex { .. }) => Expect::BadIndex,
        Err(DescError::BadRange { .. }) => Expect::BadRange,
        Err(DescError::BadOwner { .. }) => Expect::BadOwner,
    };
    // check: validation without ownership.
    for (d, want) in &cases {
        let want_check = if *want == Expect::BadOwner {
            Expect::Accept
        } else {
            *want
        };
        assert_eq!(verdict(&pool.check(d)), want_check, "check({d:?})");
    }
    let count = |e: Expect| cases.iter().filter(|c| c.1 == e).count() as u64;
    let after_check = PoolDrops {
        wrong_pool: count(Expect::WrongPool),
        bad_index: count(Expect::BadIndex),
        bad_range: count(Expect::BadRange),
        bad_owner: 0,
    };
    assert_eq!(pool.drops(), after_check);
    // take: validation and ownership, as a receiver does it.
    for (d, want) in &cases {
        let got = pool.take(d, BAD_SENDER, BAD_RECEIVER, &mut Retakes::none());
        assert_eq!(verdict(&got), *want, "take({d:?})");
    }
    let after_take = PoolDrops {
        wrong_pool: 2 * after_check.wrong_pool,
        bad_index: 2 * after_check.bad_index,
        bad_range: 2 * after_check.bad_range,
        bad_owner: count(Expect::BadOwner),
    };
    assert_eq!(pool.drops(), after_take);
    // The counters live in shared memory: another mapping sees them.
    let other = BufferPool::open(
        &r.reopen(RegionKind::TEST).expect("reopen"),
        l.pool,
        BAD_POOL_ID,
    )
    .expect("pool");
    assert_eq!(other.drops(), after_take);
    // Ownership moved only for the accepted descriptors.
    for i in 0..BAD_POOL_COUNT {
        let accepted = cases
            .iter()
            .any(|(d, e)| *e == Expect::Accept && d.index == i);
        let want = if accepted {
            BAD_RECEIVER
        } else if i == BAD_STOLEN_INDEX {
            BAD_THIRD
        } else {
            BAD_SENDER
        };
        assert_eq!(pool.owner(i), Some(want), "owner of buffer {i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Claims: a live holder is refused, a dead one is taken over.

#[test]
fn claim_of_live_peer_is_refused_and_dead_peer_taken_over() {
    let l = BadLayout::new();
    let r = region("claims", l.size);
    let ring = Ring::<u64>::init(&r, l.ring, BAD_CAP, BAD_TAG).expect("ring");
    let ctl = Ctl::at(&r, l.ctl).expect("ctl");
    let mut holder = Peer::spawn(PEER, &["hold-producer"], &[&r], Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl.get(ctl::STEP) == 0 {
        if let Some(st) = holder.try_status() {
            panic!("holder ended: {}", describe(&st));
        }
        assert!(Instant::now() < deadline, "holder never claimed the ring");
        std::thread::sleep(Duration::from_millis(2));
    }
    let pid = holder.pid();
    assert_eq!(ctl.get(ctl::STEP), u64::from(pid));
    assert_eq!(ring.claims(), (pid, 0));
    assert_eq!(
        ring.producer().err(),
        Some(RingError::AlreadyClaimed {
            side: "producer",
            pid
        })
    );
    let st = holder.kill_and_reap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    let p = ring.producer().expect("takeover after the holder died");
    assert_eq!(p.claim(), Claim::Takeover { from: pid });
    assert_eq!(ring.generations(), (1, 0));
    assert_eq!(ring.claims(), (std::process::id(), 0));
    drop(p);
    assert_eq!(ring.claims(), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// 6. SCM_RIGHTS: regions handed to another process over a Unix socket.

#[test]
fn regions_passed_over_unix_socket_share_memory() {
    let _wd = Watchdog::arm(
        "regions_passed_over_unix_socket_share_memory",
        Duration::from_secs(120),
    );
    let dir = std::env::temp_dir().join(format!(
        "keepnet-scm-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let path = dir.join("regions.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");

    let tags = [0xA11CE_u64, 0xB0B_u64];
    let regions: Vec<Region> = ["scm-a", "scm-b"]
        .iter()
        .zip(tags)
        .map(|(name, tag)| {
            let r = region(name, 2 * 4096);
            let ctl = Ctl::at(&r, HEADER_SIZE).expect("ctl");
            for w in 16..CTL_WORDS {
                ctl.word(w).store(mix(tag ^ w as u64), Ordering::Relaxed);
            }
            ctl.word(ctl::STEP).store(tag, Ordering::Release);
            r
        })
        .collect();

    // The peer inherits no region: it only gets the socket path.
    let mut peer = Peer::spawn_plain(
        PEER,
        &["scm-recv", path.to_str().expect("utf-8 path")],
        Duration::from_secs(60),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let sock = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(st) = peer.try_status() {
                    panic!("peer ended before connecting: {}", describe(&st));
                }
                assert!(Instant::now() < deadline, "peer never connected");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    sock.set_nonblocking(false).expect("blocking");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let fds: Vec<_> = regions.iter().map(|r| r.fd()).collect();
    send_fds(&sock, b"regions", &fds).expect("send_fds");
    let mut line = String::new();
    BufReader::new(&sock)
        .read_line(&mut line)
        .expect("peer's answer");
    assert_eq!(
        line.trim_end(),
        "scm-a,scm-b",
        "names the peer read from the headers"
    );
    for (r, tag) in regions.iter().zip(tags) {
        let ctl = Ctl::at(r, HEADER_SIZE).expect("ctl");
        assert_eq!(
            ctl.get(ctl::PONG),
            mix(tag),
            "the peer's write is visible in our mapping"
        );
    }
    drop(sock);
    match peer.wait_until(Instant::now() + Duration::from_secs(30)) {
        Ok(st) => assert!(st.success(), "peer: {}", describe(&st)),
        Err(e) => panic!("{e}"),
    }
}
