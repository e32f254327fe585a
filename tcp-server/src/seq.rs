//! TCP sequence numbers (RFC 9293 3.4).
//!
//! "It is essential to remember that the actual sequence number space is finite, though
//! very large. This space ranges from 0 to 2^32 - 1. Since the space is finite, all
//! arithmetic dealing with sequence numbers must be performed modulo 2^32." Comparisons are
//! done on the signed distance between two numbers, which is correct as long as the two lie
//! less than 2^31 apart (a window is at most 2^30, RFC 7323 2.3).

use std::cmp::Ordering;
use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A sequence number, compared modulo 2^32.
///
/// `Seq` deliberately implements neither `Ord` nor `PartialOrd`: sequence space is circular,
/// so every comparison goes through [`Seq::lt`], [`Seq::le`], [`Seq::gt`], [`Seq::ge`].
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct Seq(pub u32);

impl Seq {
    /// Signed distance `self - other` (positive when `self` is "after" `other`).
    #[inline]
    pub fn dist(self, other: Seq) -> i32 {
        self.0.wrapping_sub(other.0) as i32
    }
    /// `self < other` modulo 2^32.
    #[inline]
    pub fn lt(self, other: Seq) -> bool {
        self.dist(other) < 0
    }
    /// `self <= other` modulo 2^32.
    #[inline]
    pub fn le(self, other: Seq) -> bool {
        self.dist(other) <= 0
    }
    /// `self > other` modulo 2^32.
    #[inline]
    pub fn gt(self, other: Seq) -> bool {
        self.dist(other) > 0
    }
    /// `self >= other` modulo 2^32.
    #[inline]
    pub fn ge(self, other: Seq) -> bool {
        self.dist(other) >= 0
    }
    /// Circular ordering (valid for numbers less than 2^31 apart).
    #[inline]
    pub fn cmp_seq(self, other: Seq) -> Ordering {
        self.dist(other).cmp(&0)
    }
    /// The later of two numbers.
    #[inline]
    pub fn max(self, other: Seq) -> Seq {
        if self.ge(other) {
            self
        } else {
            other
        }
    }
    /// The earlier of two numbers.
    #[inline]
    pub fn min(self, other: Seq) -> Seq {
        if self.le(other) {
            self
        } else {
            other
        }
    }
    /// `start <= self < start + len` modulo 2^32 (false when `len` is 0).
    #[inline]
    pub fn in_window(self, start: Seq, len: u32) -> bool {
        self.0.wrapping_sub(start.0) < len
    }
    /// Number of octets from `earlier` up to `self`, or 0 if `self` is not after `earlier`.
    #[inline]
    pub fn since(self, earlier: Seq) -> u32 {
        let d = self.dist(earlier);
        if d > 0 {
            d as u32
        } else {
            0
        }
    }
}

impl Add<u32> for Seq {
    type Output = Seq;
    #[inline]
    fn add(self, rhs: u32) -> Seq {
        Seq(self.0.wrapping_add(rhs))
    }
}

impl AddAssign<u32> for Seq {
    #[inline]
    fn add_assign(&mut self, rhs: u32) {
        self.0 = self.0.wrapping_add(rhs);
    }
}

impl Sub<u32> for Seq {
    type Output = Seq;
    #[inline]
    fn sub(self, rhs: u32) -> Seq {
        Seq(self.0.wrapping_sub(rhs))
    }
}

impl Sub<Seq> for Seq {
    type Output = i32;
    /// Signed distance, as [`Seq::dist`].
    #[inline]
    fn sub(self, rhs: Seq) -> i32 {
        self.dist(rhs)
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seq({})", self.0)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u32> for Seq {
    fn from(v: u32) -> Seq {
        Seq(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_comparisons() {
        let a = Seq(100);
        let b = Seq(200);
        assert!(a.lt(b) && a.le(b) && b.gt(a) && b.ge(a));
        assert!(a.le(a) && a.ge(a) && !a.lt(a) && !a.gt(a));
        assert_eq!(b - a, 100);
        assert_eq!(a - b, -100);
        assert_eq!(a + 100, b);
        assert_eq!(b - 100u32, a);
    }

    #[test]
    fn wrap_around() {
        let hi = Seq(u32::MAX - 10);
        let lo = Seq(5);
        assert!(hi.lt(lo), "2^32-11 is before 5 after wrapping");
        assert!(lo.gt(hi));
        assert_eq!(lo - hi, 16);
        assert_eq!(hi - lo, -16);
        assert_eq!(hi + 16, lo);
        assert_eq!(lo - 16u32, hi);
        assert_eq!(hi.max(lo), lo);
        assert_eq!(hi.min(lo), hi);
        assert!(Seq(2).in_window(hi, 20));
        assert!(!Seq(10).in_window(hi, 20));
        assert!(hi.in_window(hi, 1));
        assert!(!hi.in_window(hi, 0));
        assert_eq!(lo.since(hi), 16);
        assert_eq!(hi.since(lo), 0);
        let mut s = Seq(u32::MAX);
        s += 1;
        assert_eq!(s, Seq(0));
    }

    #[test]
    fn half_space_boundary() {
        // Exactly 2^31 apart is ambiguous; one below is still ordered.
        let a = Seq(0);
        assert!(a.lt(Seq(0x7fff_ffff)));
        assert!(a.gt(Seq(0x8000_0001)));
    }
}
