//! The memory wire's fault injection: what the receiver sees matches the injected-fault
//! counters exactly, and rates land where the seed and the statistics say.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keepnet_driver::wire::{Clock, FaultConfig, Side, Wire, WireEnd, WireStats};

const N: u64 = 10_000;

/// Sends `N` numbered frames from A to B with `faults`, draining B as it goes and moving a
/// manual clock so delayed and held frames leave; returns what B received, in order.
fn run(name: &str, faults: FaultConfig) -> (Vec<Vec<u8>>, WireStats) {
    let wire = Wire::create(name, 256).unwrap();
    let t = Arc::new(AtomicU64::new(1_000_000_000));
    let mut a = wire
        .end(Side::A, faults)
        .unwrap()
        .with_clock(Clock::Manual(t.clone()));
    let mut b = wire.end(Side::B, FaultConfig::none()).unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let drain = |b: &mut WireEnd, got: &mut Vec<Vec<u8>>, buf: &mut Vec<u8>| {
        while let Some(n) = b.recv(buf).unwrap() {
            got.push(buf[..n].to_vec());
        }
    };
    for seq in 0..N {
        let f = test_frame(0xFA, seq, 60 + (seq as usize * 7) % 1400);
        let mut steps = 0;
        while !a.send(&f).unwrap() {
            drain(&mut b, &mut got, &mut buf);
            t.fetch_add(1_000, Ordering::Release);
            a.flush().unwrap();
            steps += 1;
            assert!(steps < 1_000_000, "wire stuck");
        }
        t.fetch_add(1_000, Ordering::Release);
        if seq % 64 == 0 {
            drain(&mut b, &mut got, &mut buf);
        }
    }
    // Let every delayed or held frame go.
    let mut steps = 0;
    while a.queued() > 0 {
        t.fetch_add(1_000_000, Ordering::Release);
        a.flush().unwrap();
        drain(&mut b, &mut got, &mut buf);
        steps += 1;
        assert!(steps < 100_000, "queued frames never left");
    }
    drain(&mut b, &mut got, &mut buf);
    let stats = wire.stats(Side::A);
    assert_eq!(stats.sent, N);
    assert_eq!(stats.received, got.len() as u64);
    (got, stats)
}

fn seqs(got: &[Vec<u8>]) -> Vec<u64> {
    got.iter()
        .map(|f| parse_test_frame(f).expect("test frame").1)
        .collect()
}

#[test]
fn loss_matches_the_counter_and_the_rate() {
    watchdog(Duration::from_secs(120));
    let (got, s) = run(
        "wf-loss",
        FaultConfig {
            seed: 42,
            loss: 0.10,
            ..FaultConfig::none()
        },
    );
    assert_eq!(
        s.lost,
        N - got.len() as u64,
        "lost counter vs frames missing"
    );
    // Binomial(10000, 0.1): mean 1000, sd 30; 5 sd either side.
    assert!((850..=1150).contains(&s.lost), "lost {} of {N}", s.lost);
    let seen = seqs(&got);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "loss alone reorders nothing"
    );
    assert!(got.iter().all(|f| frame_intact(f)));
    assert_eq!(
        (s.duplicated, s.reordered, s.corrupted, s.delayed),
        (0, 0, 0, 0)
    );
}

#[test]
fn duplication_matches_the_counter() {
    watchdog(Duration::from_secs(120));
    let (got, s) = run(
        "wf-dup",
        FaultConfig {
            seed: 7,
            duplicate: 0.05,
            ..FaultConfig::none()
        },
    );
    let mut count: HashMap<u64, u64> = HashMap::new();
    for q in seqs(&got) {
        *count.entry(q).or_default() += 1;
    }
    assert_eq!(count.len() as u64, N, "every frame arrived");
    let twice = count.values().filter(|&&c| c == 2).count() as u64;
    assert!(count.values().all(|&c| c <= 2));
    assert_eq!(twice, s.duplicated);
    assert_eq!(got.len() as u64, N + s.duplicated);
    assert!((300..=700).contains(&s.duplicated), "{}", s.duplicated);
}

#[test]
fn reordering_matches_the_counter() {
    watchdog(Duration::from_secs(120));
    let (got, s) = run(
        "wf-reorder",
        FaultConfig {
            seed: 9,
            reorder: 0.10,
            reorder_hold_us: 500,
            ..FaultConfig::none()
        },
    );
    let seen = seqs(&got);
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..N).collect::<Vec<_>>(),
        "each frame exactly once"
    );
    let mut max = None;
    let mut late = 0;
    for q in seen {
        if max.is_some_and(|m| q < m) {
            late += 1;
        }
        max = max.max(Some(q));
    }
    assert_eq!(late, s.reordered, "frames arriving after a later one");
    assert!(s.reordered > 500, "{}", s.reordered);
}

#[test]
fn corruption_matches_the_counter() {
    watchdog(Duration::from_secs(120));
    let (got, s) = run(
        "wf-corrupt",
        FaultConfig {
            seed: 11,
            corrupt: 0.10,
            ..FaultConfig::none()
        },
    );
    assert_eq!(got.len() as u64, N);
    let mut bad = 0;
    for (i, f) in got.iter().enumerate() {
        let want = test_frame(0xFA, i as u64, 60 + (i * 7) % 1400);
        assert_eq!(f.len(), want.len());
        let flipped: u32 = f.iter().zip(&want).map(|(x, y)| (x ^ y).count_ones()).sum();
        assert!(flipped <= 1, "frame {i}: {flipped} bits flipped");
        bad += u64::from(flipped);
    }
    assert_eq!(bad, s.corrupted);
    assert!((850..=1150).contains(&s.corrupted), "{}", s.corrupted);
}

#[test]
fn delay_keeps_order_and_counts() {
    watchdog(Duration::from_secs(120));
    let (got, s) = run(
        "wf-delay",
        FaultConfig {
            seed: 5,
            delay: 0.2,
            delay_us: 50,
            ..FaultConfig::none()
        },
    );
    assert_eq!(seqs(&got), (0..N).collect::<Vec<_>>());
    assert!((1800..=2200).contains(&s.delayed), "{}", s.delayed);
}

#[test]
fn the_same_seed_gives_the_same_faults() {
    watchdog(Duration::from_secs(120));
    let faults = |seed| FaultConfig {
        seed,
        loss: 0.03,
        duplicate: 0.03,
        reorder: 0.03,
        corrupt: 0.03,
        delay: 0.03,
        delay_us: 20,
        reorder_hold_us: 100,
    };
    let (g1, s1) = run("wf-seed-1", faults(1234));
    let (g2, s2) = run("wf-seed-2", faults(1234));
    let (g3, _) = run("wf-seed-3", faults(4321));
    assert_eq!(s1, s2);
    assert!(g1 == g2, "same seed, same frames");
    assert!(g1 != g3, "another seed, other faults");
    assert_eq!(g1.len() as u64, N - s1.lost + s1.duplicated);
}
