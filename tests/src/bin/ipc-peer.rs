//! The peer process of the cross-process ipc suites (`tests/tests/ipc_cross_process.rs`).
//!
//! `ipc-peer ROLE ARGS...`. Regions arrive by fd inheritance: their numbers are listed in
//! `KEEPNET_TEST_REGION_FDS` (or, for `scm-recv`, over a Unix socket). Every peer dies with
//! SIGKILL when the test that spawned it dies (PR_SET_PDEATHSIG) and ends itself with SIGALRM
//! at its own deadline, so no peer outlives its test.
//!
//! Exit codes: 0 done, 2 a check failed (details on stderr and in the control block),
//! 3 a doorbell wait timed out or only ended when its futex wait ran out (a lost wake-up),
//! 64 bad command line.
#![deny(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keepnet_ipc::fdpass::{recv_fds, take_inherited};
use keepnet_ipc::pool::FreeList;
use keepnet_ipc::ring::Claim;
use keepnet_ipc::{
    BufferPool, Descriptor, Doorbell, Producer, Region, RegionKind, Ring, RingError, SpinPolicy,
    WaitOutcome,
};
use keepnet_tests::shm::*;

/// Why a peer gave up.
enum Fail {
    Check(String),
    LostWakeup(String),
    Usage(String),
}

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail::Check(e.to_string())
    }
}

type Res = Result<(), Fail>;

fn check(msg: String) -> Fail {
    Fail::Check(msg)
}

/// Spin budget of the stream peers: short, since the two cores are shared with everything else.
const SPIN: SpinPolicy = SpinPolicy::spin_for(Duration::from_micros(5));
/// A stream peer's wait gives up after this and looks again (counted in `ctl::TIMEOUTS`).
const WAIT: Duration = Duration::from_millis(200);
/// Elements per batch.
const BATCH: usize = 32;
/// Buffers the pool consumer keeps after committing their slots, before returning them.
const HOLD: usize = 48;

/// Maps the `i`-th inherited region.
fn inherited_region(i: usize, kind: RegionKind) -> Result<Region, Fail> {
    let list = std::env::var(ENV_FDS).map_err(|_| Fail::Usage(format!("{ENV_FDS} not set")))?;
    let fd: RawFd = list
        .split(',')
        .nth(i)
        .and_then(|s| s.trim().parse().ok())
        .filter(|&fd| fd > 2)
        .ok_or_else(|| Fail::Usage(format!("{ENV_FDS}={list:?} has no fd #{i}")))?;
    // take_inherited refuses a closed fd and a second taking of the same number, so the
    // region is the fd's only owner.
    Ok(Region::open(take_inherited(fd)?, kind)?)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, Fail> {
    args.get(i).and_then(|s| s.parse().ok()).ok_or_else(|| {
        Fail::Usage(format!(
            "argument {i} ({what}) missing or malformed: {args:?}"
        ))
    })
}

/// Dies with the test; bounds its own life.
fn guard_life() -> Res {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
    // The parent may have died before the line above: then nobody will signal us.
    if let Some(parent) = std::env::var(ENV_PARENT)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        if nix::unistd::getppid().as_raw() != parent {
            return Err(check(format!("parent {parent} is gone")));
        }
    }
    let secs = std::env::var(ENV_TIMEOUT)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(300);
    nix::unistd::alarm::set(secs.max(1));
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().cloned().unwrap_or_default();
    let res = guard_life().and_then(|()| match role.as_str() {
        "stream-producer" => stream_producer(arg(&args, 1, "n")?),
        "stream-consumer" => stream_consumer(arg(&args, 1, "n")?),
        "pool-producer" => pool_producer(arg(&args, 1, "n")?),
        "pool-consumer" => pool_consumer(arg(&args, 1, "n")?),
        "ping" => ping(arg(&args, 1, "cycles")?, arg(&args, 2, "cpu")?),
        "pong" => pong(arg(&args, 1, "cycles")?, arg(&args, 2, "cpu")?),
        "push-u64" => push_u64(arg(&args, 1, "count")?),
        "claim-refused" => claim_refused(),
        "scribble" => scribble(&args[1..]),
        "hold-producer" => hold_producer(),
        "bad-desc" => bad_desc(),
        "scm-recv" => scm_recv(args.get(1).map(String::as_str).unwrap_or("")),
        other => Err(Fail::Usage(format!("unknown role {other:?}"))),
    });
    let code = match res {
        Ok(()) => 0,
        Err(Fail::Check(m)) => {
            eprintln!("ipc-peer {role} (pid {}): FAILED: {m}", std::process::id());
            EXIT_FAIL
        }
        Err(Fail::LostWakeup(m)) => {
            eprintln!(
                "ipc-peer {role} (pid {}): LOST WAKE-UP: {m}",
                std::process::id()
            );
            EXIT_LOST_WAKEUP
        }
        Err(Fail::Usage(m)) => {
            eprintln!("ipc-peer: usage: {m}");
            EXIT_USAGE
        }
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Plain stream of StreamSlots (test 1).

fn stream_producer(n: u64) -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = StreamLayout::new();
    let ctl = Ctl::at(&region, l.ctl)?;
    let ring = Ring::<StreamSlot>::open(&region, l.ring, STREAM_TAG)?;
    let prod_bell = Doorbell::attach(&region, l.prod_bell)?;
    let mut p = ring.producer()?;
    p.set_doorbell(Doorbell::attach(&region, l.cons_bell)?);
    let mut next = p.tail();
    let mut batch = Vec::with_capacity(BATCH);
    while next < n {
        let k = (BATCH as u64).min(n - next);
        batch.clear();
        batch.extend((next..next + k).map(StreamSlot::new));
        let mut off = 0;
        while off < batch.len() {
            let pushed = p.push_slice(&batch[off..])?;
            off += pushed;
            if pushed == 0 {
                // Full: park until the consumer frees slots (it rings us after each batch).
                let out = prod_bell.wait(
                    SPIN,
                    Some(WAIT),
                    || matches!(p.free_slots(), Ok(f) if f > 0),
                );
                if out == WaitOutcome::TimedOut {
                    ctl.word(ctl::TIMEOUTS).fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        next += k;
    }
    Ok(())
}

fn stream_consumer(n: u64) -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = StreamLayout::new();
    let ctl = Ctl::at(&region, l.ctl)?;
    let ring = Ring::<StreamSlot>::open(&region, l.ring, STREAM_TAG)?;
    let cons_bell = Doorbell::attach(&region, l.cons_bell)?;
    let prod_bell = Doorbell::attach(&region, l.prod_bell)?;
    let mut c = ring.consumer()?;
    let mut expected = c.head();
    let mut buf = [StreamSlot::default(); BATCH];
    while expected < n {
        let k = c.pop_batch(&mut buf)?;
        if k == 0 {
            let out = cons_bell.wait(SPIN, Some(WAIT), || c.has_data());
            if out == WaitOutcome::TimedOut {
                ctl.word(ctl::TIMEOUTS).fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        prod_bell.ring();
        for s in &buf[..k] {
            if let Err(e) = s.verify(expected) {
                ctl.fail(expected);
                return Err(check(e));
            }
            expected += 1;
        }
        ctl.word(ctl::CONSUMED).store(expected, Ordering::Release);
    }
    // Nothing may follow the last element.
    let (head, tail) = ring.indices()?;
    if (head, tail) != (n, n) {
        return Err(check(format!(
            "after {n} elements the ring holds head {head}, tail {tail}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stream of pool buffers with crash recovery (tests 2 and 3).

struct PoolStream {
    region: Region,
    l: PoolStreamLayout,
    ctl: Ctl,
    data: Ring<BufSlot>,
    ret: Ring<Descriptor>,
    pool: BufferPool,
    cons_bell: Doorbell,
    prod_bell: Doorbell,
}

fn open_pool_stream(n: u64) -> Result<PoolStream, Fail> {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = PoolStreamLayout::new(n);
    if region.len() < l.size {
        return Err(check(format!(
            "region of {} bytes, layout needs {}",
            region.len(),
            l.size
        )));
    }
    Ok(PoolStream {
        ctl: Ctl::at(&region, l.ctl)?,
        data: Ring::open(&region, l.data, DATA_TAG)?,
        ret: Ring::open(&region, l.ret, RET_TAG)?,
        pool: BufferPool::open(&region, l.pool, POOL_ID)?,
        cons_bell: Doorbell::attach(&region, l.cons_bell)?,
        prod_bell: Doorbell::attach(&region, l.prod_bell)?,
        region,
        l,
    })
}

/// Descriptors in flight on the data ring and on the return ring, scanned before the ownership
/// table is read (the order the pool protocol requires).
fn scan_in_flight(s: &PoolStream) -> Result<(Vec<Descriptor>, Vec<Descriptor>), Fail> {
    let data: Vec<Descriptor> = s.data.in_flight()?.iter().map(|b| b.desc).collect();
    Ok((data, s.ret.in_flight()?))
}

/// The home: sends elements in buffers from its free list, collects the returned buffers.
/// Element `seq` travels in data-ring slot `seq`, so a restarted producer continues at the
/// ring's tail.
fn pool_producer(n: u64) -> Res {
    let s = open_pool_stream(n)?;
    let ctl = &s.ctl;
    ctl.word(ctl::STARTS_P).fetch_add(1, Ordering::AcqRel);
    let mut dp = s.data.producer()?;
    let mut rc = s.ret.consumer()?;
    let takeover = matches!(dp.claim(), Claim::Takeover { .. })
        || matches!(rc.claim(), Claim::Takeover { .. });
    dp.set_doorbell(s.cons_bell.clone());
    // Outgoing: the data ring; incoming: the return ring.
    let (data_in_flight, ret_in_flight) = scan_in_flight(&s)?;
    let mut free = FreeList::recover(&s.pool, PRODUCER_EP, &data_in_flight, &ret_in_flight);
    if takeover {
        ctl.word(ctl::TAKEOVERS_P).fetch_add(1, Ordering::AcqRel);
        ctl.word(ctl::RECOVERED_P)
            .fetch_add(free.len() as u64, Ordering::AcqRel);
    }
    let mut next = dp.tail();
    let mut payload = [0u8; 512];
    let mut batch: Vec<BufSlot> = Vec::with_capacity(BATCH);
    loop {
        let got = free.collect(&s.pool, &mut rc, CONSUMER_EP, usize::MAX)?;
        if next >= n && free.len() == POOL_COUNT as usize {
            break;
        }
        let limit = ctl.get(ctl::GATE).min(n);
        batch.clear();
        while batch.len() < BATCH && next + (batch.len() as u64) < limit {
            let Some(i) = free.get() else { break };
            let seq = next + batch.len() as u64;
            let len = fill_payload(seq, &mut payload);
            s.pool.write(i, HEADROOM, &payload[..len])?;
            batch.push(BufSlot::new(seq, s.pool.descriptor(i, len as u32)));
        }
        let pushed = if batch.is_empty() {
            0
        } else {
            dp.push_slice(&batch)?
        };
        for b in &batch[pushed..] {
            free.put(b.desc.index);
        }
        next += pushed as u64;
        if pushed == 0 && got == 0 {
            ctl.word(ctl::FREE_NOW)
                .store(free.len() as u64, Ordering::Relaxed);
            // Nothing moved: wait for returns, ring space, or a higher gate.
            let out = s.prod_bell.wait(SPIN, Some(Duration::from_millis(20)), || {
                rc.has_data()
                    || (next < n
                        && next < ctl.get(ctl::GATE)
                        && !free.is_empty()
                        && matches!(dp.free_slots(), Ok(f) if f > 0))
            });
            if out == WaitOutcome::TimedOut {
                ctl.word(ctl::TIMEOUTS).fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    ctl.word(ctl::FINAL_FREE)
        .store(free.len() as u64, Ordering::Release);
    Ok(())
}

/// Pushes all of `descs` onto the return ring, which has room for the whole pool: finding it
/// full means a buffer is being returned twice.
fn return_all(rp: &mut Producer<Descriptor>, descs: &[Descriptor]) -> Res {
    let mut off = 0;
    while off < descs.len() {
        let k = rp.push_slice(&descs[off..])?;
        if k == 0 {
            return Err(check(format!(
                "return ring full with {} buffers to return: a buffer is listed twice",
                descs.len() - off
            )));
        }
        off += k;
    }
    Ok(())
}

/// The client: validates each element, records it in the sink at the index of its ring slot,
/// commits, and only then returns the buffers. A restarted consumer first returns the buffers
/// its predecessor held privately, then re-reads what it had read but not committed.
fn pool_consumer(n: u64) -> Res {
    let s = open_pool_stream(n)?;
    let ctl = &s.ctl;
    ctl.word(ctl::STARTS_C).fetch_add(1, Ordering::AcqRel);
    let mut dc = s.data.consumer()?;
    let mut rp = s.ret.producer()?;
    let takeover = matches!(dc.claim(), Claim::Takeover { .. })
        || matches!(rp.claim(), Claim::Takeover { .. });
    rp.set_doorbell(s.prod_bell.clone());
    // Outgoing: the return ring; incoming: the data ring.
    let (data_in_flight, ret_in_flight) = scan_in_flight(&s)?;
    let (held, mut retakes) = s.pool.recover(CONSUMER_EP, &ret_in_flight, &data_in_flight);
    if takeover {
        ctl.word(ctl::TAKEOVERS_C).fetch_add(1, Ordering::AcqRel);
        ctl.word(ctl::RECLAIMED_C)
            .fetch_add(held.len() as u64, Ordering::AcqRel);
        ctl.word(ctl::REPLAYED_C)
            .fetch_add(retakes.len() as u64, Ordering::AcqRel);
    }
    // We hold these: descriptors made now carry their current lease.
    let back: Vec<Descriptor> = held.iter().map(|&i| s.pool.descriptor(i, 0)).collect();
    return_all(&mut rp, &back)?;

    let mut buf = [BufSlot::default(); BATCH];
    // Buffers held privately after their slot was committed (as a server holds data until its
    // app reads it), returned oldest first: a kill usually finds some here.
    let mut held_q: std::collections::VecDeque<Descriptor> = std::collections::VecDeque::new();
    let mut rets: Vec<Descriptor> = Vec::with_capacity(BATCH);
    let mut bytes = [0u8; 512];
    loop {
        let head = dc.head();
        if head >= n {
            let rest: Vec<Descriptor> = held_q.drain(..).collect();
            return_all(&mut rp, &rest)?;
            break;
        }
        dc.rewind();
        let k = dc.read(&mut buf)?;
        if k == 0 {
            let out = s.cons_bell.wait(SPIN, Some(WAIT), || dc.has_data());
            if out == WaitOutcome::TimedOut {
                ctl.word(ctl::TIMEOUTS).fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        rets.clear();
        for (j, b) in buf[..k].iter().enumerate() {
            let seq = head + j as u64;
            let verdict = b.verify(seq).and_then(|()| {
                let r = s
                    .pool
                    .take(&b.desc, PRODUCER_EP, CONSUMER_EP, &mut retakes)
                    .map_err(|e| format!("take of element {seq}: {e}"))?;
                if r.offset() != HEADROOM {
                    return Err(format!(
                        "element {seq}: offset {} instead of the headroom",
                        r.offset()
                    ));
                }
                let m = s.pool.read(&r, &mut bytes);
                check_payload(seq, &bytes[..m]).map(|()| r.index())
            });
            let index = match verdict {
                Ok(i) => i,
                Err(e) => {
                    ctl.fail(seq);
                    return Err(check(e));
                }
            };
            s.l.sink(&s.region, seq)?.store(b.seq, Ordering::Relaxed);
            // Returned under the lease our take gave it.
            rets.push(s.pool.descriptor(index, 0));
        }
        // The sink writes above are ordered before this Release of the head.
        dc.commit(k)?;
        ctl.word(ctl::CONSUMED).store(dc.head(), Ordering::Release);
        held_q.extend(rets.drain(..));
        if held_q.len() > HOLD {
            let back: Vec<Descriptor> = held_q.drain(..held_q.len() - HOLD).collect();
            return_all(&mut rp, &back)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Doorbell ping-pong (test 4).

fn pin(cpu: usize) -> Res {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}

const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// One ping-pong wait on `bell` for `ready`. A wait that times out, or that only found the
/// work once its futex wait had run out the whole timeout (the wake-up never came, the
/// work was there all along), is a lost wake-up.
fn bell_wait(bell: &Doorbell, what: &str, i: u64, counter: &AtomicU64) -> Res {
    let t0 = Instant::now();
    let out = bell.wait(SpinPolicy::PARK_AT_ONCE, Some(PING_TIMEOUT), || {
        counter.load(Ordering::Acquire) >= i
    });
    let took = t0.elapsed();
    if out == WaitOutcome::TimedOut || took >= PING_TIMEOUT {
        return Err(Fail::LostWakeup(format!(
            "waiting for {what} {i}: {out:?} after {took:?} ({what} is {})",
            counter.load(Ordering::Acquire)
        )));
    }
    Ok(())
}

fn ping(cycles: u64, cpu: usize) -> Res {
    pin(cpu)?;
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = PingLayout::new();
    let ctl = Ctl::at(&region, l.ctl)?;
    let mine = Doorbell::attach(&region, l.bell_a)?;
    let theirs = Doorbell::attach(&region, l.bell_b)?;
    let (ping, pong) = (ctl.word(ctl::PING), ctl.word(ctl::PONG));
    for i in 1..=cycles {
        ping.store(i, Ordering::Release);
        theirs.ring();
        bell_wait(&mine, "pong", i, pong)?;
    }
    Ok(())
}

fn pong(cycles: u64, cpu: usize) -> Res {
    pin(cpu)?;
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = PingLayout::new();
    let ctl = Ctl::at(&region, l.ctl)?;
    let mine = Doorbell::attach(&region, l.bell_b)?;
    let theirs = Doorbell::attach(&region, l.bell_a)?;
    let (ping, pong) = (ctl.word(ctl::PING), ctl.word(ctl::PONG));
    for i in 1..=cycles {
        bell_wait(&mine, "ping", i, ping)?;
        pong.store(i, Ordering::Release);
        theirs.ring();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bad input (test 5) and claims.

fn push_u64(count: u64) -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = BadLayout::new();
    let ring = Ring::<u64>::open(&region, l.ring, BAD_TAG)?;
    let mut p = ring.producer()?;
    for v in 0..count {
        if p.push(v).is_err() {
            return Err(check(format!("push of {v} refused")));
        }
    }
    Ok(())
}

/// Both sides of the bad-input ring must refuse a claim as corrupt (and not panic).
fn claim_refused() -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = BadLayout::new();
    let ring = Ring::<u64>::open(&region, l.ring, BAD_TAG)?;
    let p = ring.producer().map(|_| ());
    let c = ring.consumer().map(|_| ());
    match (p, c) {
        (Err(RingError::Corrupt { .. }), Err(RingError::Corrupt { .. })) => Ok(()),
        other => Err(check(format!("claims on garbage indices gave {other:?}"))),
    }
}

/// `scribble OFFSET VALUE...`: stores each VALUE (u64) at byte OFFSET of the region, the way a
/// buggy or hostile peer would.
fn scribble(pairs: &[String]) -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    if pairs.is_empty() || pairs.len() % 2 != 0 {
        return Err(Fail::Usage(format!(
            "scribble wants OFFSET VALUE pairs, got {pairs:?}"
        )));
    }
    for pair in pairs.chunks(2) {
        let off: usize = arg(pair, 0, "offset")?;
        let val: u64 = arg(pair, 1, "value")?;
        region.atomic_u64(off)?.store(val, Ordering::SeqCst);
    }
    Ok(())
}

/// Claims the producer side of the bad-input ring, says so, and holds it until killed.
fn hold_producer() -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = BadLayout::new();
    let ctl = Ctl::at(&region, l.ctl)?;
    let ring = Ring::<u64>::open(&region, l.ring, BAD_TAG)?;
    let _p = ring.producer()?;
    ctl.word(ctl::STEP)
        .store(u64::from(std::process::id()), Ordering::Release);
    loop {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends the descriptors of [`bad_descriptor_cases`] on the descriptor ring.
fn bad_desc() -> Res {
    let region = inherited_region(0, RegionKind::TEST)?;
    let l = BadLayout::new();
    let ring = Ring::<Descriptor>::open(&region, l.desc_ring, BAD_TAG)?;
    let mut p = ring.producer()?;
    let cases: Vec<Descriptor> = bad_descriptor_cases().iter().map(|c| c.0).collect();
    let k = p.push_slice(&cases)?;
    if k != cases.len() {
        return Err(check(format!("pushed {k} of {} descriptors", cases.len())));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// SCM_RIGHTS (test 6).

/// Connects to the test's socket, receives two regions, checks what the test wrote in each,
/// answers in shared memory, and acknowledges over the socket.
fn scm_recv(path: &str) -> Res {
    let sock = UnixStream::connect(path)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = [0u8; 64];
    let (len, fds) = recv_fds(&sock, &mut buf)?;
    if &buf[..len] != b"regions" {
        return Err(check(format!("unexpected payload {:?}", &buf[..len])));
    }
    if fds.len() != 2 {
        return Err(check(format!("got {} fds, expected 2", fds.len())));
    }
    let mut answer = Vec::new();
    for (k, fd) in fds.into_iter().enumerate() {
        let region = Region::open(fd, RegionKind::TEST)?;
        let ctl = Ctl::at(&region, keepnet_ipc::region::HEADER_SIZE)?;
        let tag = ctl.get(ctl::STEP);
        for w in 16..CTL_WORDS {
            let want = mix(tag ^ w as u64);
            if ctl.get(w) != want {
                return Err(check(format!(
                    "region {k}: word {w} is {:#x}, expected {want:#x}",
                    ctl.get(w)
                )));
            }
        }
        // Answer through the mapping: the test must see this in its own mapping.
        ctl.word(ctl::PONG).store(mix(tag), Ordering::Release);
        answer.push(region.name());
    }
    let mut sock = sock;
    sock.write_all(answer.join(",").as_bytes())?;
    sock.write_all(b"\n")?;
    // Wait for the test to close its end, so our mappings outlive its checks.
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    Ok(())
}
