use keepnet_ipc::*;

#[test]
fn ring_push_pop_and_wrap() {
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(8), Ring::<u64>::ALIGN);
    let r = Region::create("smoke", RegionKind::TEST, l.size()).unwrap();
    let ring = Ring::<u64>::init(&r, off, 8, 7).unwrap();
    let mut p = ring.producer().unwrap();
    let mut c = Ring::<u64>::open(&r.reopen(RegionKind::TEST).unwrap(), off, 7)
        .unwrap()
        .consumer()
        .unwrap();
    assert!(matches!(
        ring.producer(),
        Err(RingError::AlreadyClaimed { .. })
    ));
    let mut next = 0u64;
    let mut got = 0u64;
    for round in 0..100 {
        let batch: Vec<u64> = (next..next + (round % 9)).collect();
        let n = p.push_slice(&batch).unwrap();
        next += n as u64;
        let mut out = [0u64; 5];
        let k = c.pop_batch(&mut out).unwrap();
        for v in &out[..k] {
            assert_eq!(*v, got);
            got += 1;
        }
    }
    while let Some(v) = c.pop().unwrap() {
        assert_eq!(v, got);
        got += 1;
    }
    assert_eq!(got, next);
}

#[test]
fn eventfd_doorbell_wakes_on_bell_and_on_fd() {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let mut l = RegionLayout::new();
    let off = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let r = Region::create("efd", RegionKind::TEST, l.size()).unwrap();
    let efd = new_eventfd().unwrap();
    let efd2 = efd.try_clone().unwrap();
    let bell = Doorbell::init(&r, off).unwrap().with_eventfd(efd);
    let producer_bell = Doorbell::attach(&r, off).unwrap().with_eventfd(efd2);
    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    let flag = Arc::new(AtomicBool::new(false));

    // 1. Woken by the bell (the flag is the "work").
    let f = flag.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        f.store(true, Ordering::Release);
        producer_bell.ring();
        producer_bell
    });
    let (o, fd_ready) = bell.wait_fds(
        SpinPolicy::PARK_AT_ONCE,
        Some(Duration::from_secs(10)),
        || flag.load(Ordering::Acquire),
        &[pipe_r.as_raw_fd()],
    );
    assert_eq!((o, fd_ready), (WaitOutcome::Woken, false));
    let producer_bell = t.join().unwrap();
    assert!(producer_bell.wakes() >= 1 || bell.parks() == 0);

    // 2. Woken by the other fd.
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        nix::unistd::write(&pipe_w, b"x").unwrap();
        pipe_w
    });
    let (o, fd_ready) = bell.wait_fds(
        SpinPolicy::PARK_AT_ONCE,
        Some(Duration::from_secs(10)),
        || false,
        &[pipe_r.as_raw_fd()],
    );
    assert_eq!((o, fd_ready), (WaitOutcome::Woken, true));
    let _w = t.join().unwrap();

    // 3. Times out when nothing happens.
    let mut buf = [0u8; 1];
    nix::unistd::read(pipe_r.as_raw_fd(), &mut buf).unwrap();
    let (o, _) = bell.wait_fds(
        SpinPolicy::PARK_AT_ONCE,
        Some(Duration::from_millis(30)),
        || false,
        &[pipe_r.as_raw_fd()],
    );
    assert_eq!(o, WaitOutcome::TimedOut);
}

#[test]
fn yield_policy_yields_then_parks() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    let mut l = RegionLayout::new();
    let off = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let r = Region::create("yield", RegionKind::TEST, l.size()).unwrap();
    let bell = Doorbell::init(&r, off).unwrap();
    let policy = SpinPolicy::yield_then_park(Duration::from_millis(2));
    for (delay_ms, expect_park) in [(0u64, false), (50, true)] {
        let flag = Arc::new(AtomicBool::new(false));
        let (f, b) = (flag.clone(), Doorbell::attach(&r, off).unwrap());
        let parks_before = bell.parks();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay_ms));
            f.store(true, Ordering::Release);
            b.ring();
        });
        let o = bell.wait(policy, Some(Duration::from_secs(10)), || {
            flag.load(Ordering::Acquire)
        });
        t.join().unwrap();
        assert_ne!(o, WaitOutcome::TimedOut);
        if expect_park {
            assert!(
                bell.parks() > parks_before,
                "a late producer must find the consumer parked"
            );
            assert_eq!(o, WaitOutcome::Woken);
        }
    }
}

/// A third party reading (head, tail) while both sides run never sees a torn pair as
/// corruption (a restarting endpoint scans rings its running peer keeps moving).
#[test]
fn indices_read_while_both_sides_run_are_never_torn() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(8), Ring::<u64>::ALIGN);
    let r = Region::create("torn", RegionKind::TEST, l.size()).unwrap();
    let ring = Ring::<u64>::init(&r, off, 8, 9).unwrap();
    let mut p = ring.producer().unwrap();
    let mut c = ring.consumer().unwrap();
    const N: u64 = 20_000_000;
    let done = Arc::new(AtomicBool::new(false));
    let prod = std::thread::spawn(move || {
        let mut next = 0;
        while next < N {
            if p.push(next).is_ok() {
                next += 1;
            }
        }
    });
    let d = done.clone();
    let cons = std::thread::spawn(move || {
        let mut got = 0;
        let mut out = [0u64; 4];
        while got < N {
            got += c.pop_batch(&mut out).unwrap() as u64;
        }
        d.store(true, Ordering::Release);
    });
    let mut reads = 0u64;
    while !done.load(Ordering::Acquire) && reads < 50_000_000 {
        let (h, t) = ring.indices().expect("a consistent pair");
        assert!(t >= h && t - h <= 8);
        reads += 1;
    }
    prod.join().unwrap();
    cons.join().unwrap();
    assert_eq!(ring.corrupt_count(), 0);
}
