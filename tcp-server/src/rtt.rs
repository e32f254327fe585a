//! Round-trip time estimation and the retransmission timer value (RFC 6298).
//!
//! [`Rtt`] is plain `#[repr(C)]` data (integers only, every bit pattern valid) so it can live
//! inside a `Tcb` in shared memory. Times are stored as `u32` microseconds (about 71 minutes at
//! most, far above any RTO we allow); inputs are saturated into that range.
//!
//! Karn's algorithm (RFC 6298 section 3) is the caller's job: "RTT samples MUST NOT be made
//! using segments that were retransmitted (and thus for which it is ambiguous whether the reply
//! was for the first instance of the packet or a later instance). The only case when TCP can
//! safely take RTT samples from retransmitted segments is when the TCP timestamp option is
//! employed". So call [`Rtt::sample`] only for a segment sent once, or for an RTT measured with
//! timestamps (RFC 7323 section 4).

use core::time::Duration;

/// Clock granularity G (RFC 6298 section 2): our clock is read in microseconds, but we take
/// G = 1 ms so that `max(G, K*RTTVAR)` keeps a floor under a near-zero variance.
const G_US: u32 = 1_000;
/// K = 4 (RFC 6298 section 2).
const K: u64 = 4;
/// Initial RTO, 1 second (RFC 6298 (2.1)).
const INITIAL_RTO_US: u32 = 1_000_000;
/// RFC 6298 (5.7): the RTO after a lost SYN, 3 seconds.
const SYN_LOST_RTO_US: u32 = 3_000_000;
/// Backoff doublings beyond this change nothing (the RTO is clamped long before), and keeping
/// the shift small keeps `base << backoff` inside a `u64`.
const MAX_BACKOFF: u32 = 31;

/// RFC 6298 estimator: SRTT, RTTVAR, the RTO and its exponential backoff.
///
/// Plain data: every field is an integer, every bit pattern is a valid (if odd) state, and no
/// method panics on any state, so a value read back from shared memory after a crash is safe
/// to use as is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rtt {
    /// SRTT in microseconds (meaningful once `has_sample != 0`).
    srtt_us: u32,
    /// RTTVAR in microseconds (meaningful once `has_sample != 0`).
    rttvar_us: u32,
    /// The RTO computed by (2.1)-(2.5), before the backoff of (5.5).
    base_rto_us: u32,
    /// Lower clamp of (2.4).
    min_rto_us: u32,
    /// Upper clamp of (2.5).
    max_rto_us: u32,
    /// Number of doublings of (5.5) since the last sample or reset.
    backoffs: u32,
    /// 0 until the first measurement (2.2), then 1. A `u32` so the struct has no padding.
    has_sample: u32,
}

impl Rtt {
    /// Default lower bound on the RTO: 200 ms.
    ///
    /// RFC 6298 (2.4) says the RTO "SHOULD be rounded up to 1 second"; Linux uses 200 ms
    /// (`TCP_RTO_MIN`), which recovers far faster on low-latency paths and is what peers
    /// expect in practice. Configurable through [`Rtt::new`].
    pub const DEFAULT_MIN_RTO: Duration = Duration::from_millis(200);

    /// Default upper bound on the RTO: 60 s. RFC 6298 (2.5): "A maximum value MAY be placed on
    /// RTO provided it is at least 60 seconds."
    pub const DEFAULT_MAX_RTO: Duration = Duration::from_secs(60);

    /// A fresh estimator with no sample: RTO = 1 s (RFC 6298 (2.1)), kept inside
    /// `[min_rto, max_rto]`. If `max_rto < min_rto`, `max_rto` is raised to `min_rto`.
    pub fn new(min_rto: Duration, max_rto: Duration) -> Rtt {
        let min_rto_us = dur_to_us(min_rto);
        let max_rto_us = dur_to_us(max_rto).max(min_rto_us);
        Rtt {
            srtt_us: 0,
            rttvar_us: 0,
            // (2.1) "Until a round-trip time (RTT) measurement has been made for a segment
            // sent between the sender and receiver, the sender SHOULD set RTO <- 1 second".
            base_rto_us: INITIAL_RTO_US.max(min_rto_us).min(max_rto_us),
            min_rto_us,
            max_rto_us,
            backoffs: 0,
            has_sample: 0,
        }
    }

    /// Feed one RTT measurement. Also resets the backoff: RFC 6298 section 5 note, "once a
    /// new RTT measurement is obtained ... the computations outlined in Section 2 are
    /// performed, including the computation of RTO, which may result in 'collapsing' RTO back
    /// down after it has been subject to exponential back off (rule 5.5)".
    ///
    /// The caller applies Karn's algorithm (section 3): see the module documentation.
    pub fn sample(&mut self, rtt: Duration) {
        let r = u64::from(dur_to_us(rtt));
        if self.has_sample == 0 {
            // (2.2) "When the first RTT measurement R is made, the host MUST set
            //   SRTT <- R
            //   RTTVAR <- R/2"
            self.srtt_us = sat_u32(r);
            self.rttvar_us = sat_u32(r / 2);
            self.has_sample = 1;
        } else {
            // (2.3) "RTTVAR <- (1 - beta) * RTTVAR + beta * |SRTT - R'|
            //        SRTT <- (1 - alpha) * SRTT + alpha * R'
            // The value of SRTT used in the update to RTTVAR is its value before updating
            // SRTT itself", with alpha = 1/8 and beta = 1/4.
            let srtt = u64::from(self.srtt_us);
            let rttvar = u64::from(self.rttvar_us);
            let delta = srtt.abs_diff(r);
            self.rttvar_us = sat_u32((3 * rttvar + delta) / 4);
            self.srtt_us = sat_u32((7 * srtt + r) / 8);
        }
        // (2.2)/(2.3) "RTO <- SRTT + max (G, K*RTTVAR)".
        let rto = u64::from(self.srtt_us) + u64::from(G_US).max(K * u64::from(self.rttvar_us));
        // (2.4) lower clamp (configurable, see DEFAULT_MIN_RTO), (2.5) upper clamp.
        self.base_rto_us = sat_u32(rto).max(self.min_rto_us).min(self.max_rto_us);
        self.backoffs = 0;
    }

    /// The current RTO, with the backoff applied: RFC 6298 (5.5) "The host MUST set
    /// RTO <- RTO * 2 ('back off the timer'). The maximum value discussed in (2.5) above may be
    /// used to provide an upper bound to this doubling operation."
    pub fn rto(&self) -> Duration {
        Duration::from_micros(u64::from(self.rto_us()))
    }

    /// [`Rtt::rto`] in microseconds.
    pub fn rto_us(&self) -> u32 {
        let shift = self.backoffs.min(MAX_BACKOFF);
        let rto = u64::from(self.base_rto_us) << shift;
        // (2.5) the maximum bounds the doubling of (5.5).
        sat_u32(rto.min(u64::from(self.max_rto_us)))
    }

    /// Double the RTO (RFC 6298 (5.5)); call when the retransmission timer expires.
    pub fn backoff(&mut self) {
        if self.backoffs < MAX_BACKOFF {
            self.backoffs += 1;
        }
    }

    /// Undo the backoff of (5.5) without a new sample, keeping SRTT and RTTVAR.
    pub fn reset_backoff(&mut self) {
        self.backoffs = 0;
    }

    /// How many times the RTO has been doubled since the last sample or reset.
    pub fn backoff_count(&self) -> u32 {
        self.backoffs
    }

    /// RFC 6298 (5.7): "If the timer expires awaiting the ACK of a SYN segment and the TCP
    /// implementation is using an RTO less than 3 seconds, the RTO MUST be re-initialized to 3
    /// seconds when data transmission begins (i.e., after the three-way handshake
    /// completes)." Call once when the handshake completes after a SYN (or SYN-ACK) was
    /// retransmitted. The next sample recomputes the RTO as usual.
    pub fn on_syn_lost(&mut self) {
        if self.base_rto_us < SYN_LOST_RTO_US {
            self.base_rto_us = SYN_LOST_RTO_US.min(self.max_rto_us);
        }
        self.backoffs = 0;
    }

    /// SRTT, or `None` before the first sample.
    pub fn srtt(&self) -> Option<Duration> {
        (self.has_sample != 0).then(|| Duration::from_micros(u64::from(self.srtt_us)))
    }

    /// SRTT in microseconds, 0 before the first sample (the form [`crate::cc::Cc::on_ack`]
    /// takes).
    pub fn srtt_us(&self) -> u32 {
        if self.has_sample != 0 {
            self.srtt_us
        } else {
            0
        }
    }

    /// RTTVAR, zero before the first sample.
    pub fn rttvar(&self) -> Duration {
        if self.has_sample != 0 {
            Duration::from_micros(u64::from(self.rttvar_us))
        } else {
            Duration::ZERO
        }
    }
}

impl Default for Rtt {
    /// `Rtt::new(DEFAULT_MIN_RTO, DEFAULT_MAX_RTO)`.
    fn default() -> Rtt {
        Rtt::new(Rtt::DEFAULT_MIN_RTO, Rtt::DEFAULT_MAX_RTO)
    }
}

/// A duration in microseconds, saturated to `u32`.
fn dur_to_us(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

fn sat_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn rfc_rtt() -> Rtt {
        // The RFC's own 1 s minimum, to check the arithmetic without Linux's 200 ms.
        Rtt::new(ms(1000), ms(60_000))
    }

    #[test]
    fn initial_rto_is_one_second() {
        let r = Rtt::default();
        assert_eq!(r.rto(), ms(1000));
        assert_eq!(r.srtt(), None);
        assert_eq!(r.srtt_us(), 0);
        assert_eq!(r.rttvar(), Duration::ZERO);
    }

    #[test]
    fn initial_rto_respects_clamps() {
        assert_eq!(Rtt::new(ms(2000), ms(60_000)).rto(), ms(2000));
        assert_eq!(Rtt::new(ms(100), ms(500)).rto(), ms(500));
        // max < min: max is raised to min.
        let r = Rtt::new(ms(3000), ms(1000));
        assert_eq!(r.rto(), ms(3000));
    }

    #[test]
    fn first_sample_rule_2_2() {
        let mut r = Rtt::default();
        r.sample(ms(100));
        assert_eq!(r.srtt(), Some(ms(100)));
        assert_eq!(r.rttvar(), ms(50));
        // RTO = 100 + max(1, 4*50) = 300 ms.
        assert_eq!(r.rto(), ms(300));
    }

    #[test]
    fn later_samples_rule_2_3() {
        let mut r = Rtt::default();
        r.sample(ms(100));
        r.sample(ms(200));
        // RTTVAR = 3/4*50 + 1/4*|100-200| = 37.5 + 25 = 62.5 ms (old SRTT used).
        assert_eq!(r.rttvar(), Duration::from_micros(62_500));
        // SRTT = 7/8*100 + 1/8*200 = 112.5 ms.
        assert_eq!(r.srtt(), Some(Duration::from_micros(112_500)));
        // RTO = 112.5 + 4*62.5 = 362.5 ms.
        assert_eq!(r.rto(), Duration::from_micros(362_500));
    }

    #[test]
    fn steady_samples_converge_and_g_floors_the_variance() {
        let mut r = Rtt::new(Duration::ZERO, ms(60_000));
        for _ in 0..200 {
            r.sample(ms(10));
        }
        assert_eq!(r.srtt(), Some(ms(10)));
        // RTTVAR decays to 0; RTO = SRTT + max(G, 0) = 11 ms.
        assert_eq!(r.rttvar(), Duration::ZERO);
        assert_eq!(r.rto(), ms(11));
    }

    #[test]
    fn min_clamp_rule_2_4() {
        let mut r = rfc_rtt();
        r.sample(ms(10));
        assert_eq!(r.rto(), ms(1000));
        let mut l = Rtt::default();
        l.sample(ms(10));
        // 10 + 4*5 = 30 ms, raised to the 200 ms default.
        assert_eq!(l.rto(), ms(200));
    }

    #[test]
    fn max_clamp_rule_2_5() {
        let mut r = Rtt::default();
        r.sample(ms(50_000));
        // 50 s + 4*25 s = 150 s, clamped to 60 s.
        assert_eq!(r.rto(), ms(60_000));
    }

    #[test]
    fn backoff_doubles_and_is_clamped_rule_5_5() {
        let mut r = Rtt::default();
        r.sample(ms(100)); // 300 ms
        r.backoff();
        assert_eq!(r.rto(), ms(600));
        r.backoff();
        assert_eq!(r.rto(), ms(1200));
        for _ in 0..100 {
            r.backoff();
        }
        assert_eq!(r.rto(), ms(60_000));
        assert_eq!(r.backoff_count(), MAX_BACKOFF);
        r.reset_backoff();
        assert_eq!(r.rto(), ms(300));
    }

    #[test]
    fn backoff_before_any_sample() {
        let mut r = Rtt::default();
        r.backoff();
        r.backoff();
        assert_eq!(r.rto(), ms(4000));
    }

    #[test]
    fn sample_collapses_backoff() {
        let mut r = Rtt::default();
        r.sample(ms(100));
        r.backoff();
        r.backoff();
        r.sample(ms(100));
        assert_eq!(r.backoff_count(), 0);
        assert!(r.rto() < ms(600));
    }

    #[test]
    fn syn_lost_rule_5_7() {
        let mut r = Rtt::default();
        r.backoff();
        r.on_syn_lost();
        assert_eq!(r.rto(), ms(3000));
        // The next sample computes the RTO from scratch again.
        r.sample(ms(100));
        assert_eq!(r.rto(), ms(300));
        // Already >= 3 s: unchanged.
        let mut big = Rtt::new(ms(4000), ms(60_000));
        big.on_syn_lost();
        assert_eq!(big.rto(), ms(4000));
    }

    #[test]
    fn huge_inputs_saturate_without_panicking() {
        let mut r = Rtt::new(Duration::MAX, Duration::MAX);
        r.sample(Duration::MAX);
        r.sample(Duration::ZERO);
        for _ in 0..40 {
            r.backoff();
        }
        assert_eq!(r.rto_us(), u32::MAX);
    }

    #[test]
    fn any_bit_pattern_is_safe() {
        // State read back from shared memory: nothing may panic.
        let r = Rtt {
            srtt_us: u32::MAX,
            rttvar_us: u32::MAX,
            base_rto_us: u32::MAX,
            min_rto_us: u32::MAX,
            max_rto_us: 0,
            backoffs: u32::MAX,
            has_sample: 7,
        };
        let mut r2 = r;
        let _ = r.rto();
        r2.sample(ms(1));
        r2.backoff();
        let _ = (r2.srtt(), r2.rttvar(), r2.rto());
    }
}
