//! Small measurement helpers: percentiles, a monotonic clock shared by processes, and a
//! cheap "is it time yet" check for hot loops.

use std::time::{Duration, Instant};

use nix::time::{clock_gettime, ClockId};

/// Nearest-rank percentile (`p` in 0..=100) of sorted samples; `None` when empty.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    sorted.get(idx).copied()
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process on the machine, so a
/// start time taken in one process and an end time taken in another can be subtracted.
pub fn monotonic_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        // CLOCK_MONOTONIC cannot fail on Linux; 0 makes any rate computed from it obviously
        // wrong rather than plausible.
        Err(_) => 0,
    }
}

/// Decides when a loop has run past a deadline while reading the clock rarely: it looks at
/// the clock every `stride` calls, and adapts the stride so that a look happens about every
/// 50 µs whether one iteration takes 10 ns or 10 ms.
#[derive(Debug)]
pub struct DeadlineCheck {
    deadline: Instant,
    stride: u32,
    countdown: u32,
    last_look: Instant,
}

impl DeadlineCheck {
    const TARGET: Duration = Duration::from_micros(50);
    const MAX_STRIDE: u32 = 1024;

    pub fn new(deadline: Instant) -> Self {
        DeadlineCheck {
            deadline,
            stride: 1,
            countdown: 1,
            last_look: Instant::now(),
        }
    }

    /// True once the deadline has passed (as of the last look at the clock).
    #[inline]
    pub fn expired(&mut self) -> bool {
        self.countdown -= 1;
        if self.countdown > 0 {
            return false;
        }
        let now = Instant::now();
        let since = now.duration_since(self.last_look);
        if since < Self::TARGET {
            self.stride = (self.stride * 2).min(Self::MAX_STRIDE);
        } else if since > Self::TARGET * 4 {
            self.stride = (self.stride / 2).max(1);
        }
        self.countdown = self.stride;
        self.last_look = now;
        now >= self.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn deadline_check_fires_after_the_deadline() {
        let mut past = DeadlineCheck::new(Instant::now());
        assert!(past.expired());
        let mut future = DeadlineCheck::new(Instant::now() + Duration::from_secs(3600));
        assert!((0..10_000).all(|_| !future.expired()));
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
