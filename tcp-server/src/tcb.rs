//! The connection control block: plain `#[repr(C)]` data (docs/tcp.md, DESIGN rules 1-3).
//!
//! A [`Tcb`] holds every piece of state of one connection that must survive a crash of the
//! tcp server: integers, fixed arrays and the plain-data estimators ([`Rtt`], [`Cc`],
//! [`RecvSack`], [`Scoreboard`]). It has no pointers, no `Vec`, no `Box`, so it can live in a
//! slot of the `tcp.state` region and a restarted server continues from it. Its byte rings
//! are not inside it: [`RingGeom`] says where they are in the region. Timers are absolute
//! deadlines in microseconds on the monotonic clock (0 = not armed).
//!
//! Every value read from a `Tcb` is treated as possibly corrupt (a slot in shared memory):
//! code that uses it clamps or checks, and never panics on it.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use crate::cc::{Cc, CcAlgo};
use crate::rtt::Rtt;
use crate::sack::{RecvSack, Scoreboard};
use crate::seq::Seq;

/// Connection states (RFC 9293 3.3.2), stored as a `u8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum State {
    /// No connection.
    Closed = 0,
    /// Waiting for a connection request.
    Listen = 1,
    /// Sent a SYN, waiting for a matching SYN.
    SynSent = 2,
    /// Received and sent a SYN, waiting for the ACK of ours.
    SynReceived = 3,
    /// Open: data flows both ways.
    Established = 4,
    /// We closed; waiting for the ACK of our FIN or the peer's FIN.
    FinWait1 = 5,
    /// Our FIN is acknowledged; waiting for the peer's FIN.
    FinWait2 = 6,
    /// The peer closed; waiting for the local user to close.
    CloseWait = 7,
    /// Both closed at once; waiting for the ACK of our FIN.
    Closing = 8,
    /// The peer closed first and we closed; waiting for the ACK of our FIN.
    LastAck = 9,
    /// Waiting 2 MSL so the peer surely received the ACK of its FIN.
    TimeWait = 10,
}

impl State {
    /// Decodes a stored byte; an out-of-range value (a corrupt slot) reads as `Closed`.
    pub fn from_u8(v: u8) -> State {
        match v {
            1 => State::Listen,
            2 => State::SynSent,
            3 => State::SynReceived,
            4 => State::Established,
            5 => State::FinWait1,
            6 => State::FinWait2,
            7 => State::CloseWait,
            8 => State::Closing,
            9 => State::LastAck,
            10 => State::TimeWait,
            _ => State::Closed,
        }
    }

    /// A synchronized state (RFC 9293 3.5.2): ESTABLISHED and every later state.
    pub fn is_synchronized(self) -> bool {
        !matches!(
            self,
            State::Closed | State::Listen | State::SynSent | State::SynReceived
        )
    }

    /// The RFC's name, as in the state diagram.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "CLOSED",
            State::Listen => "LISTEN",
            State::SynSent => "SYN-SENT",
            State::SynReceived => "SYN-RECEIVED",
            State::Established => "ESTABLISHED",
            State::FinWait1 => "FIN-WAIT-1",
            State::FinWait2 => "FIN-WAIT-2",
            State::CloseWait => "CLOSE-WAIT",
            State::Closing => "CLOSING",
            State::LastAck => "LAST-ACK",
            State::TimeWait => "TIME-WAIT",
        }
    }
}

/// The error a connection ended with, stored as a `u8` (0 = none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum TcpError {
    /// RST in SYN-SENT (RFC 9293 3.10.7.3: "connection reset" to the user, we call it
    /// refused as every socket API does).
    ConnectionRefused = 1,
    /// RST in a synchronized state or SYN-RECEIVED of an active open.
    ConnectionReset = 2,
    /// Retransmissions (or keepalive probes) exhausted (RFC 9293 3.8.3, R2).
    TimedOut = 3,
    /// The connection was aborted locally.
    Aborted = 4,
}

impl TcpError {
    /// Decodes a stored byte (0 or unknown = none).
    pub fn from_u8(v: u8) -> Option<TcpError> {
        match v {
            1 => Some(TcpError::ConnectionRefused),
            2 => Some(TcpError::ConnectionReset),
            3 => Some(TcpError::TimedOut),
            4 => Some(TcpError::Aborted),
            _ => None,
        }
    }
}

impl std::fmt::Display for TcpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcpError::ConnectionRefused => "connection refused",
            TcpError::ConnectionReset => "connection reset",
            TcpError::TimedOut => "connection timed out",
            TcpError::Aborted => "connection aborted",
        })
    }
}

impl std::error::Error for TcpError {}

/// Where a byte ring lies and what it holds. `off`/`cap` place it in the connection's
/// region (the server slices its storage with them); `head`/`len` index inside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RingGeom {
    /// Offset of the ring in the state region (informational for the engine).
    pub off: u32,
    /// Capacity in bytes.
    pub cap: u32,
    /// Index of the first byte held.
    pub head: u32,
    /// Bytes held (for the receive ring: in-order bytes not yet read by the user).
    pub len: u32,
}

/// Bits of [`Tcb::flags`].
pub mod flag {
    /// Nagle off (`TCP_NODELAY`).
    pub const NODELAY: u32 = 1 << 0;
    /// The user shut down writing: a FIN follows the queued data.
    pub const FIN_QUEUED: u32 = 1 << 1;
    /// Our FIN has been sent (at least once).
    pub const FIN_SENT: u32 = 1 << 2;
    /// Our FIN has been acknowledged.
    pub const FIN_ACKED: u32 = 1 << 3;
    /// The peer's FIN has been received and processed (RCV.NXT is past it).
    pub const FIN_RCVD: u32 = 1 << 4;
    /// The user shut down reading.
    pub const SHUT_RD: u32 = 1 << 5;
    /// The user shut down writing.
    pub const SHUT_WR: u32 = 1 << 6;
    /// Timestamps negotiated (RFC 7323 3.2).
    pub const TS_OK: u32 = 1 << 7;
    /// SACK negotiated (RFC 2018 2).
    pub const SACK_OK: u32 = 1 << 8;
    /// Window scaling negotiated (RFC 7323 2.2).
    pub const WS_OK: u32 = 1 << 9;
    /// An ACK must go out at the next `poll_transmit`.
    pub const ACK_NOW: u32 = 1 << 10;
    /// Keepalive on (RFC 9293 3.8.4: off by default).
    pub const KEEPALIVE: u32 = 1 << 11;
    /// A RST is waiting to be sent (`rst_seq`, `rst_ack`, `rst_flags`).
    pub const RST_PENDING: u32 = 1 << 12;
    /// Our SYN has been acknowledged.
    pub const SYN_ACKED: u32 = 1 << 13;
    /// Passive open (SYN-RECEIVED came from LISTEN).
    pub const PASSIVE: u32 = 1 << 14;
    /// A FIN from the peer arrived out of order; `rcv_fin` holds its sequence number.
    pub const FIN_PENDING: u32 = 1 << 15;
    /// A round-trip time measurement is running (`rtt_seq`, `rtt_at`).
    pub const RTT_TIMING: u32 = 1 << 16;
    /// A zero-window probe is due at the next `poll_transmit`.
    pub const PROBE_NOW: u32 = 1 << 17;
    /// A keepalive probe is due at the next `poll_transmit`.
    pub const KA_NOW: u32 = 1 << 18;
    /// In loss recovery (fast retransmit / RFC 6675 / RFC 6582).
    pub const RECOVERY: u32 = 1 << 19;
    /// NewReno: the first unacknowledged segment must be retransmitted now.
    pub const REXMIT_UNA: u32 = 1 << 20;
    /// The user closed the connection (no more reads either).
    pub const CLOSED_BY_USER: u32 = 1 << 21;
    /// The peer offered SACK on its SYN.
    pub const PEER_SACK: u32 = 1 << 22;
    /// The peer offered timestamps on its SYN.
    pub const PEER_TS: u32 = 1 << 23;
}

/// Per-connection settings, copied into the [`Tcb`] at creation.
#[derive(Clone, Copy, Debug)]
pub struct TcpConfig {
    /// The MSS we announce (largest segment we receive): interface MTU - 40.
    pub mss: u16,
    /// Smallest RTO (RFC 6298 2.4 says 1 s; 200 ms is common practice).
    pub min_rto: Duration,
    /// Largest RTO (RFC 6298 2.5: at least 60 s).
    pub max_rto: Duration,
    /// Retransmissions of a data segment before the connection times out (R2,
    /// RFC 9293 3.8.3: at least 100 s worth).
    pub max_retries: u8,
    /// Retransmissions of a SYN before connect times out (R2 for SYN: at least 3 minutes
    /// in the RFC; smaller is common).
    pub max_syn_retries: u8,
    /// Delayed ACK timeout (RFC 9293 3.8.6.3: < 0.5 s; RFC 1122 4.2.3.2: 200 ms usual).
    pub delack: Duration,
    /// Twice the maximum segment lifetime: time spent in TIME-WAIT (RFC 9293 3.4.2).
    pub time_wait: Duration,
    /// Keepalive on (RFC 9293 3.8.4: "MUST default to off").
    pub keepalive: bool,
    /// Idle time before the first keepalive probe (RFC 9293 3.8.4: at least 2 hours).
    pub keepalive_idle: Duration,
    /// Time between keepalive probes.
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection times out.
    pub keepalive_count: u8,
    /// Offer window scaling (RFC 7323).
    pub window_scaling: bool,
    /// Offer timestamps (RFC 7323).
    pub timestamps: bool,
    /// Offer SACK (RFC 2018).
    pub sack: bool,
    /// Nagle off.
    pub nodelay: bool,
    /// Congestion control.
    pub cc: CcAlgo,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            mss: 1460,
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(60),
            max_retries: 15,
            max_syn_retries: 6,
            delack: Duration::from_millis(40),
            time_wait: Duration::from_secs(60),
            keepalive: false,
            keepalive_idle: Duration::from_secs(7200),
            keepalive_interval: Duration::from_secs(75),
            keepalive_count: 9,
            window_scaling: true,
            timestamps: true,
            sack: true,
            nodelay: false,
            cc: CcAlgo::Cubic,
        }
    }
}

/// The transmission control block of one connection (RFC 9293 3.3.1), as plain data.
///
/// Field names follow the RFC's variables (`snd_una` = SND.UNA, ...); sequence numbers are
/// stored as raw `u32` and read through [`Seq`] helpers.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Tcb {
    // --- identity -----------------------------------------------------------------------
    /// [`State`] as a byte.
    pub state: u8,
    /// [`TcpError`] as a byte (0 = none).
    pub error: u8,
    /// Our window shift (Rcv.Wind.Shift, RFC 7323 2.2).
    pub rcv_shift: u8,
    /// The peer's window shift (Snd.Wind.Shift).
    pub snd_shift: u8,
    /// [`flag`] bits.
    pub flags: u32,
    /// Local IPv4 address (host order).
    pub local_ip: u32,
    /// Remote IPv4 address (host order).
    pub remote_ip: u32,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,

    // --- send sequence space (RFC 9293 3.3.1) -------------------------------------------
    /// Initial send sequence number.
    pub iss: u32,
    /// Oldest unacknowledged sequence number.
    pub snd_una: u32,
    /// Next sequence number to send.
    pub snd_nxt: u32,
    /// Highest sequence number sent + 1 (SND.NXT can fall back after an RTO).
    pub snd_max: u32,
    /// Send window (scaled, in bytes).
    pub snd_wnd: u32,
    /// Largest send window the peer has offered (RFC 9293 3.8.6.2.1 Max(SND.WND);
    /// RFC 5961 5.2 MAX.SND.WND).
    pub max_snd_wnd: u32,
    /// Segment sequence number of the last window update.
    pub snd_wl1: u32,
    /// Segment acknowledgment number of the last window update.
    pub snd_wl2: u32,
    /// Effective send MSS (payload bytes per segment, options accounted for).
    pub snd_mss: u16,
    /// The MSS we announced.
    pub rcv_mss: u16,

    // --- receive sequence space ---------------------------------------------------------
    /// Initial receive sequence number.
    pub irs: u32,
    /// Next sequence number expected.
    pub rcv_nxt: u32,
    /// Right edge of the window we last advertised (RCV.NXT + RCV.WND at that time); it
    /// never moves left (RFC 9293 3.8.6.2.2).
    pub rcv_adv: u32,
    /// Sequence number of a FIN received out of order (with [`flag::FIN_PENDING`]).
    pub rcv_fin: u32,

    // --- timestamps (RFC 7323) ----------------------------------------------------------
    /// TS.Recent.
    pub ts_recent: u32,
    /// Last.ACK.sent.
    pub last_ack_sent: u32,
    /// Added to our millisecond clock for TSval (RFC 7323 5.4 random offset).
    pub ts_offset: u32,
    /// When TS.Recent was recorded (µs), for the 24-day validity rule (RFC 7323 5.5).
    pub ts_recent_at: u64,

    // --- timers: absolute deadlines in µs, 0 = off -------------------------------------
    /// Retransmission timer (RFC 6298).
    pub rto_at: u64,
    /// Delayed ACK timer (RFC 9293 3.8.6.3).
    pub delack_at: u64,
    /// Persist timer / zero-window probe (RFC 9293 3.8.6.1).
    pub persist_at: u64,
    /// Keepalive timer (RFC 9293 3.8.4).
    pub keepalive_at: u64,
    /// TIME-WAIT expiry (RFC 9293 3.4.2).
    pub timewait_at: u64,
    /// When the RTT sample in progress started (µs).
    pub rtt_at: u64,
    /// When the last segment was received (µs; for keepalive).
    pub last_rcv_at: u64,
    /// When the last data segment was sent (µs; for the RFC 5681 4.1 idle restart).
    pub last_snd_at: u64,

    // --- settings (from [`TcpConfig`]) ---------------------------------------------------
    /// Delayed ACK timeout (µs).
    pub delack_us: u32,
    /// TIME-WAIT duration (µs / 1000 = ms, to fit long values).
    pub time_wait_ms: u32,
    /// Keepalive idle time (s).
    pub ka_idle_s: u32,
    /// Keepalive interval (s).
    pub ka_intvl_s: u32,
    /// Keepalive probes before timing out.
    pub ka_count: u8,
    /// Keepalive probes sent without an answer.
    pub ka_sent: u8,
    /// Data retransmissions allowed.
    pub max_retries: u8,
    /// SYN retransmissions allowed.
    pub max_syn_retries: u8,

    // --- retransmission and recovery ----------------------------------------------------
    /// Consecutive RTO expirations (also counts SYN retries).
    pub retries: u8,
    /// Persist backoff exponent.
    pub persist_shift: u8,
    /// Duplicate ACKs in a row (RFC 5681 2).
    pub dupacks: u8,
    /// Full-sized segments received since our last ACK (RFC 9293 3.8.6.3).
    pub unacked_segs: u8,
    /// Sequence number whose ACK ends the running RTT sample.
    pub rtt_seq: u32,
    /// "recover" (RFC 6582 3.2 / RFC 6675 RecoveryPoint).
    pub recover: u32,
    /// HighRxt (RFC 6675 2).
    pub high_rxt: u32,
    /// Pending RST: sequence number.
    pub rst_seq: u32,
    /// Pending RST: acknowledgment number.
    pub rst_ack: u32,
    /// Pending RST: control bits (RST or RST|ACK).
    pub rst_flags: u8,
    /// Congestion control algorithm (0 = NewReno, 1 = CUBIC).
    pub cc_algo: u8,
    /// Padding kept explicit for a stable layout.
    pub _pad: [u8; 2],

    // --- counters (per connection, summed into `keepnet status`) ------------------------
    /// Segments retransmitted (RTO, fast retransmit, SACK recovery).
    pub retransmits: u32,
    /// RTO expirations.
    pub rto_count: u32,
    /// Challenge ACKs sent (RFC 5961).
    pub challenge_acks: u32,
    /// Challenge ACKs not sent because of the rate limit (RFC 5961 7).
    pub challenge_throttled: u32,
    /// Challenge ACKs sent in the current one-second window.
    pub challenge_in_window: u32,
    /// Start of the current challenge ACK window (µs).
    pub challenge_window_at: u64,
    /// Segments dropped by the acceptability test or PAWS.
    pub dropped: u32,
    /// Window we advertised last (the field value, unscaled): for tests and status.
    pub last_wnd_field: u16,
    /// Immediate ACKs owed: one per out-of-order or duplicate segment received since the
    /// last `poll_transmit` (RFC 5681 4.2: each is answered by its own duplicate ACK, so a
    /// batch of arrivals still produces the sender's duplicate ACK count).
    pub acks_owed: u16,

    // --- buffers (outside the Tcb) ------------------------------------------------------
    /// Send ring: bytes from SND.UNA (or ISS+1 before our SYN is acknowledged) onward.
    pub snd_ring: RingGeom,
    /// Receive ring: in-order bytes not yet read, then out-of-order bytes at their offset.
    pub rcv_ring: RingGeom,

    // --- embedded plain-data estimators -------------------------------------------------
    /// RTT estimator and RTO (RFC 6298).
    pub rtt: Rtt,
    /// Congestion control state.
    pub cc: Cc,
    /// Out-of-order ranges held above RCV.NXT (and our SACK blocks).
    pub rsack: RecvSack,
    /// The peer's SACK blocks about our data (RFC 6675 scoreboard).
    pub sb: Scoreboard,
}

/// A `Tcb` must fit a fixed slot of the state region.
pub const TCB_MAX_SIZE: usize = 1024;

/// The window shift we offer for a receive buffer of `cap` bytes (RFC 7323 2.3: the smallest
/// shift that lets the 16-bit window field cover the buffer, at most 14).
pub fn window_shift(cap: u32) -> u8 {
    let mut shift = 0u8;
    while shift < 14 && (cap >> shift) > 0xffff {
        shift += 1;
    }
    shift
}
const _: () = assert!(std::mem::size_of::<Tcb>() <= TCB_MAX_SIZE);

impl Tcb {
    /// A CLOSED control block for `local` ↔ `remote` with rings of the given geometry
    /// (`off` is where each ring lies in the region; capacities must be non-zero).
    pub fn new(
        cfg: &TcpConfig,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        snd_ring: RingGeom,
        rcv_ring: RingGeom,
        now_us: u64,
    ) -> Tcb {
        let mss = cfg.mss.max(64);
        let mut flags = 0;
        if cfg.nodelay {
            flags |= flag::NODELAY;
        }
        if cfg.keepalive {
            flags |= flag::KEEPALIVE;
        }
        let rcv_shift = if cfg.window_scaling {
            window_shift(rcv_ring.cap)
        } else {
            0
        };
        Tcb {
            state: State::Closed as u8,
            error: 0,
            rcv_shift,
            snd_shift: 0,
            flags,
            local_ip: u32::from(*local.ip()),
            remote_ip: u32::from(*remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
            iss: 0,
            snd_una: 0,
            snd_nxt: 0,
            snd_max: 0,
            snd_wnd: 0,
            max_snd_wnd: 0,
            snd_wl1: 0,
            snd_wl2: 0,
            snd_mss: 536,
            rcv_mss: mss,
            irs: 0,
            rcv_nxt: 0,
            rcv_adv: 0,
            rcv_fin: 0,
            ts_recent: 0,
            last_ack_sent: 0,
            ts_offset: 0,
            ts_recent_at: 0,
            rto_at: 0,
            delack_at: 0,
            persist_at: 0,
            keepalive_at: 0,
            timewait_at: 0,
            rtt_at: 0,
            last_rcv_at: now_us,
            last_snd_at: now_us,
            delack_us: cfg.delack.as_micros().min(500_000) as u32,
            time_wait_ms: cfg.time_wait.as_millis().min(u128::from(u32::MAX)) as u32,
            ka_idle_s: cfg.keepalive_idle.as_secs().min(u64::from(u32::MAX)) as u32,
            ka_intvl_s: cfg.keepalive_interval.as_secs().min(u64::from(u32::MAX)) as u32,
            ka_count: cfg.keepalive_count,
            ka_sent: 0,
            max_retries: cfg.max_retries,
            max_syn_retries: cfg.max_syn_retries,
            retries: 0,
            persist_shift: 0,
            dupacks: 0,
            unacked_segs: 0,
            rtt_seq: 0,
            recover: 0,
            high_rxt: 0,
            rst_seq: 0,
            rst_ack: 0,
            rst_flags: 0,
            cc_algo: cfg.cc as u8,
            _pad: [0; 2],
            retransmits: 0,
            rto_count: 0,
            challenge_acks: 0,
            challenge_throttled: 0,
            challenge_in_window: 0,
            challenge_window_at: 0,
            dropped: 0,
            last_wnd_field: 0,
            acks_owed: 0,
            snd_ring: RingGeom {
                head: 0,
                len: 0,
                ..snd_ring
            },
            rcv_ring: RingGeom {
                head: 0,
                len: 0,
                ..rcv_ring
            },
            rtt: Rtt::new(cfg.min_rto, cfg.max_rto),
            cc: Cc::new(cfg.cc, u32::from(mss), now_us),
            rsack: RecvSack::default(),
            sb: Scoreboard::default(),
        }
        .with_offer_bits(cfg)
    }

    /// Remembers which options we offer (reusing the negotiated bits until the handshake
    /// settles them).
    fn with_offer_bits(mut self, cfg: &TcpConfig) -> Tcb {
        if cfg.window_scaling {
            self.flags |= flag::WS_OK;
        }
        if cfg.timestamps {
            self.flags |= flag::TS_OK;
        }
        if cfg.sack {
            self.flags |= flag::SACK_OK;
        }
        self
    }

    /// The state.
    pub fn state(&self) -> State {
        State::from_u8(self.state)
    }
    /// Sets the state.
    pub fn set_state(&mut self, s: State) {
        self.state = s as u8;
    }
    /// The pending error, if any.
    pub fn error(&self) -> Option<TcpError> {
        TcpError::from_u8(self.error)
    }
    /// Flag test.
    #[inline]
    pub fn has(&self, f: u32) -> bool {
        self.flags & f != 0
    }
    /// Flag set/clear.
    #[inline]
    pub fn set(&mut self, f: u32, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }
    /// Local endpoint.
    pub fn local(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.local_ip), self.local_port)
    }
    /// Remote endpoint.
    pub fn remote(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.remote_ip), self.remote_port)
    }
    /// SND.UNA.
    pub fn snd_una(&self) -> Seq {
        Seq(self.snd_una)
    }
    /// SND.NXT.
    pub fn snd_nxt(&self) -> Seq {
        Seq(self.snd_nxt)
    }
    /// Highest sequence number sent + 1.
    pub fn snd_max(&self) -> Seq {
        Seq(self.snd_max)
    }
    /// RCV.NXT.
    pub fn rcv_nxt(&self) -> Seq {
        Seq(self.rcv_nxt)
    }
    /// ISS.
    pub fn iss(&self) -> Seq {
        Seq(self.iss)
    }
    /// IRS.
    pub fn irs(&self) -> Seq {
        Seq(self.irs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcb_is_small_plain_data() {
        let size = std::mem::size_of::<Tcb>();
        assert!(size <= TCB_MAX_SIZE, "{size}");
        fn is_copy<T: Copy>() {}
        is_copy::<Tcb>();
    }

    #[test]
    fn state_round_trip() {
        for v in 0..=11u8 {
            let s = State::from_u8(v);
            if v <= 10 {
                assert_eq!(s as u8, v);
            } else {
                assert_eq!(s, State::Closed);
            }
        }
        assert!(State::Established.is_synchronized());
        assert!(!State::SynReceived.is_synchronized());
    }
}
