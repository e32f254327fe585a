//! The connection state machine (RFC 9293 3.10 "Event Processing").
//!
//! [`Conn`] is a borrowed view over one connection: its [`Tcb`] and the memory of its send
//! and receive rings. It is sans-I/O: segments come in through [`Conn::on_segment`], time
//! through [`Conn::on_tick`], and segments go out through [`Conn::poll_transmit`], which hands
//! each header and a payload span of the send ring to a closure. All state lives in the `Tcb`
//! and the rings, so the same code runs on a slot of shared memory in the server and on a
//! local value in a test, and a restarted server continues where the last one stopped.
//!
//! Each branch quotes the RFC text that justifies it.

use std::time::Duration;

use crate::buf::{send_peek, RecvRing, SendRing};
use crate::cc::{Cc, CcAlgo};
use crate::listen::Established;
use crate::sack::DUP_THRESH;
use crate::seq::Seq;
use crate::tcb::{flag, State, Tcb, TcpError};
use crate::wire::{Flags, SackBlocks, TcpRepr};

/// Errors returned to the user of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserError {
    /// RST in answer to our SYN (RFC 9293 3.10.7.3).
    ConnectionRefused,
    /// The peer reset the connection.
    ConnectionReset,
    /// Retransmissions or keepalive probes exhausted.
    TimedOut,
    /// The connection was aborted locally.
    Aborted,
    /// Not connected (CLOSED, LISTEN).
    NotConnected,
    /// Writing was shut down ("connection closing", RFC 9293 3.10.2).
    ShutDown,
    /// Nothing to read yet (the connection is open).
    WouldBlock,
}

impl From<TcpError> for UserError {
    fn from(e: TcpError) -> Self {
        match e {
            TcpError::ConnectionRefused => UserError::ConnectionRefused,
            TcpError::ConnectionReset => UserError::ConnectionReset,
            TcpError::TimedOut => UserError::TimedOut,
            TcpError::Aborted => UserError::Aborted,
        }
    }
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UserError::ConnectionRefused => "connection refused",
            UserError::ConnectionReset => "connection reset",
            UserError::TimedOut => "connection timed out",
            UserError::Aborted => "connection aborted",
            UserError::NotConnected => "not connected",
            UserError::ShutDown => "connection closing",
            UserError::WouldBlock => "would block",
        })
    }
}

impl std::error::Error for UserError {}

/// RFC 7323 5.5: TS.Recent older than 24 days is invalid for PAWS.
const PAWS_IDLE_US: u64 = 24 * 24 * 3600 * 1_000_000;
/// Challenge ACKs per second per connection (RFC 5961 7; Linux's default is 1000 per
/// second for the host, we limit each connection).
pub const CHALLENGE_ACK_LIMIT: u32 = 10;
/// Most segments one `poll_transmit` call emits (keeps a call bounded).
const MAX_BURST: usize = 4096;
/// Persist timer bounds (RFC 9293 3.8.6.1 leaves them open; BSD uses 5 s .. 60 s; we start
/// at the RTO so tests on a fake clock run fast).
const PERSIST_MAX_US: u64 = 60_000_000;

/// A connection: its control block and ring memory, borrowed for one operation.
pub struct Conn<'a> {
    /// The control block.
    pub tcb: &'a mut Tcb,
    snd: &'a mut [u8],
    rcv: &'a mut [u8],
    burst: usize,
}

impl<'a> Conn<'a> {
    /// A view over `tcb` with send ring memory `snd` and receive ring memory `rcv` (the
    /// slices the `Tcb`'s ring geometry describes).
    pub fn new(tcb: &'a mut Tcb, snd: &'a mut [u8], rcv: &'a mut [u8]) -> Self {
        Conn {
            tcb,
            snd,
            rcv,
            burst: MAX_BURST,
        }
    }

    /// Caps the data segments one [`Conn::poll_transmit`] emits at `n` (at least 1), so a
    /// caller with `n` transmit buffers free never gets more segments than it can send.
    pub fn with_burst(mut self, n: usize) -> Self {
        self.burst = n.clamp(1, MAX_BURST);
        self
    }

    /// A connection whose handshake a listener completed ([`crate::listen`], RFC 9293
    /// 3.10.7.4 SYN-RECEIVED: "If SND.UNA < SEG.ACK =< SND.NXT, then enter ESTABLISHED state
    /// and continue processing"). `ts_offset` is the offset the listener's timestamp clock
    /// used in the SYN-ACK; `synack_window` the (unscaled) window it advertised. The ACK that
    /// completed the handshake should be handed to [`Conn::on_segment`] next: it carries the
    /// peer's window (and maybe data).
    pub fn establish(&mut self, e: &Established, ts_offset: u32, synack_window: u16, now: u64) {
        let iss = Seq(e.iss);
        self.init_send(iss, now);
        let t = &mut *self.tcb;
        let una = (iss + 1).0;
        t.local_ip = u32::from(*e.local.ip());
        t.remote_ip = u32::from(*e.remote.ip());
        t.local_port = e.local.port();
        t.remote_port = e.remote.port();
        t.snd_una = una;
        t.snd_nxt = una;
        t.snd_max = una;
        t.recover = una;
        t.high_rxt = una;
        t.ts_offset = ts_offset;
        t.irs = e.irs;
        t.rcv_nxt = e.irs.wrapping_add(1);
        t.rcv_adv = t.rcv_nxt.wrapping_add(u32::from(synack_window));
        t.last_ack_sent = t.rcv_nxt;
        // The window of the completing ACK updates SND.WND (RFC 9293 3.10.7.4, fifth:
        // "SND.WL1 < SEG.SEQ"): start just below it.
        t.snd_wl1 = e.irs;
        t.snd_wl2 = una;
        // RFC 7323 2.2: scaling only if both sides sent the option.
        match e.snd_wscale {
            Some(s) if t.has(flag::WS_OK) => t.snd_shift = s.min(14),
            _ => {
                t.set(flag::WS_OK, false);
                t.snd_shift = 0;
                t.rcv_shift = 0;
            }
        }
        t.set(flag::PEER_SACK, e.sack_permitted);
        if !e.sack_permitted {
            t.set(flag::SACK_OK, false);
        }
        match e.ts_recent {
            Some(r) if t.has(flag::TS_OK) => {
                t.set(flag::PEER_TS, true);
                t.ts_recent = r;
                t.ts_recent_at = now;
            }
            _ => {
                t.set(flag::PEER_TS, false);
                t.set(flag::TS_OK, false);
            }
        }
        // RFC 6691: the MSS excludes options; subtract the timestamps we carry.
        let mut mss = u32::from(e.mss).min(u32::from(t.rcv_mss)).max(64);
        if t.has(flag::TS_OK) {
            mss -= 12;
        }
        t.snd_mss = mss as u16;
        t.cc = Cc::new(CcAlgo::from_u8(t.cc_algo), mss, now);
        t.set(flag::PASSIVE | flag::SYN_ACKED, true);
        self.become_established();
    }

    // ---------------------------------------------------------------------------------
    // Small helpers
    // ---------------------------------------------------------------------------------

    /// The state.
    pub fn state(&self) -> State {
        self.tcb.state()
    }

    /// The error the connection ended with, if any.
    pub fn error(&self) -> Option<TcpError> {
        self.tcb.error()
    }

    fn sndring(&mut self) -> SendRing<'_> {
        SendRing::new(&mut self.tcb.snd_ring, self.snd)
    }

    fn rcvring(&mut self) -> RecvRing<'_> {
        RecvRing::new(&mut self.tcb.rcv_ring, self.rcv)
    }

    fn snd_len(&self) -> u32 {
        let cap = self.tcb.snd_ring.cap.min(self.snd.len() as u32);
        self.tcb.snd_ring.len.min(cap)
    }

    fn rcv_free(&self) -> u32 {
        let cap = self.tcb.rcv_ring.cap.min(self.rcv.len() as u32);
        cap.saturating_sub(self.tcb.rcv_ring.len)
    }

    fn rcv_cap(&self) -> u32 {
        self.tcb.rcv_ring.cap.min(self.rcv.len() as u32)
    }

    /// Sequence number of the first byte in the send ring: SND.UNA once our SYN is
    /// acknowledged, ISS+1 before.
    fn data_start(&self) -> Seq {
        if self.tcb.has(flag::SYN_ACKED) {
            self.tcb.snd_una()
        } else {
            self.tcb.iss() + 1
        }
    }

    /// Sequence number just past the last byte queued (where our FIN goes).
    fn data_end(&self) -> Seq {
        self.data_start() + self.snd_len()
    }

    fn mss(&self) -> u32 {
        u32::from(self.tcb.snd_mss.max(1))
    }

    fn ts_now(&self, now: u64) -> u32 {
        ((now / 1000) as u32).wrapping_add(self.tcb.ts_offset)
    }

    fn close_with(&mut self, err: Option<TcpError>) {
        self.tcb.set_state(State::Closed);
        if let Some(e) = err {
            self.tcb.error = e as u8;
        }
        self.tcb.rto_at = 0;
        self.tcb.delack_at = 0;
        self.tcb.persist_at = 0;
        self.tcb.keepalive_at = 0;
        self.tcb.timewait_at = 0;
        self.tcb
            .set(flag::ACK_NOW | flag::PROBE_NOW | flag::KA_NOW, false);
    }

    fn enter_time_wait(&mut self, now: u64) {
        self.tcb.set_state(State::TimeWait);
        self.tcb.rto_at = 0;
        self.tcb.persist_at = 0;
        self.tcb.keepalive_at = 0;
        self.restart_time_wait(now);
    }

    fn restart_time_wait(&mut self, now: u64) {
        self.tcb.timewait_at = now + u64::from(self.tcb.time_wait_ms) * 1000 + 1;
    }

    fn queue_rst(&mut self, seq: Seq, ack: Option<Seq>) {
        self.tcb.rst_seq = seq.0;
        self.tcb.rst_ack = ack.map_or(0, |a| a.0);
        self.tcb.rst_flags = if ack.is_some() {
            (Flags::RST | Flags::ACK).0
        } else {
            Flags::RST.0
        };
        self.tcb.set(flag::RST_PENDING, true);
    }

    /// RFC 5961 3.2 / 4.2 / 5.2: a "challenge ACK" (<SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK>),
    /// rate-limited per RFC 5961 7: "An implementation SHOULD include a ACK throttling
    /// mechanism" — at most [`CHALLENGE_ACK_LIMIT`] per second per connection.
    fn challenge_ack(&mut self, now: u64) {
        let t = &mut *self.tcb;
        if now.saturating_sub(t.challenge_window_at) >= 1_000_000 {
            t.challenge_window_at = now;
            t.challenge_in_window = 0;
        }
        if t.challenge_in_window >= CHALLENGE_ACK_LIMIT {
            t.challenge_throttled = t.challenge_throttled.wrapping_add(1);
            return;
        }
        t.challenge_in_window += 1;
        t.challenge_acks = t.challenge_acks.wrapping_add(1);
        t.set(flag::ACK_NOW, true);
    }

    /// Owes one immediate (duplicate) ACK.
    fn owe_ack(&mut self) {
        self.tcb.set(flag::ACK_NOW, true);
        self.tcb.acks_owed = self.tcb.acks_owed.saturating_add(1);
    }

    fn arm_rto(&mut self, now: u64) {
        self.tcb.rto_at = now + self.tcb.rtt.rto().as_micros() as u64;
    }

    // ---------------------------------------------------------------------------------
    // Opening
    // ---------------------------------------------------------------------------------

    /// Active OPEN (RFC 9293 3.10.1, CLOSED): "Select an initial send sequence number.
    /// Send a SYN segment of the form <SEQ=ISS><CTL=SYN>. Set SND.UNA to ISS, SND.NXT to
    /// ISS+1, enter SYN-SENT state". The SYN itself goes out at the next `poll_transmit`.
    pub fn connect(&mut self, iss: Seq, now: u64) -> Result<(), UserError> {
        if self.state() != State::Closed {
            return Err(UserError::NotConnected);
        }
        self.init_send(iss, now);
        self.tcb.set_state(State::SynSent);
        Ok(())
    }

    fn init_send(&mut self, iss: Seq, now: u64) {
        let t = &mut *self.tcb;
        t.iss = iss.0;
        t.snd_una = iss.0;
        t.snd_nxt = iss.0;
        t.snd_max = iss.0;
        t.recover = iss.0;
        t.high_rxt = iss.0;
        t.ts_offset = iss.0.rotate_left(13);
        t.error = 0;
        t.retries = 0;
        t.last_rcv_at = now;
        t.last_snd_at = now;
        t.set(
            flag::SYN_ACKED | flag::FIN_SENT | flag::FIN_ACKED | flag::FIN_RCVD,
            false,
        );
    }

    /// Marks a LISTEN control block (RFC 9293 3.10.1 passive OPEN). `iss` is the ISS the
    /// listener will use for the next SYN handed to [`Conn::on_segment`].
    pub fn listen(&mut self, iss: Seq) {
        self.tcb.iss = iss.0;
        self.tcb.set_state(State::Listen);
    }

    /// Passive open from a SYN the listener accepted (RFC 9293 3.10.7.2, LISTEN, third:
    /// "Set RCV.NXT to SEG.SEQ+1, IRS is set to SEG.SEQ ... ISS should be selected and a SYN
    /// segment sent of the form <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK>. SND.NXT is set to
    /// ISS+1 and SND.UNA to ISS. The connection state should be changed to SYN-RECEIVED.")
    pub fn accept_syn(&mut self, iss: Seq, now: u64, syn: &TcpRepr) -> Result<(), UserError> {
        if !matches!(self.state(), State::Closed | State::Listen) || !syn.flags.syn() {
            return Err(UserError::NotConnected);
        }
        self.init_send(iss, now);
        self.tcb.remote_port = syn.src_port;
        self.tcb.local_port = syn.dst_port;
        self.tcb.irs = syn.seq.0;
        self.tcb.rcv_nxt = (syn.seq + 1).0;
        self.negotiate(syn, now);
        // RFC 7323 2.2: "The window field in a segment where the SYN bit is set ... MUST
        // NOT be scaled."
        self.tcb.snd_wnd = u32::from(syn.window);
        self.tcb.max_snd_wnd = self.tcb.snd_wnd;
        self.tcb.snd_wl1 = syn.seq.0;
        self.tcb.snd_wl2 = iss.0;
        self.tcb.set(flag::PASSIVE, true);
        self.tcb.set_state(State::SynReceived);
        Ok(())
    }

    /// Settles the options from the peer's SYN against what we offer.
    fn negotiate(&mut self, syn: &TcpRepr, now: u64) {
        let t = &mut *self.tcb;
        // RFC 7323 2.2: window scaling is on only if both sides sent the option.
        match syn.window_scale {
            Some(s) if t.has(flag::WS_OK) => t.snd_shift = s.min(14),
            _ => {
                t.set(flag::WS_OK, false);
                t.snd_shift = 0;
                t.rcv_shift = 0;
            }
        }
        // RFC 2018 2: SACK only if the SYN carried SACK-permitted.
        t.set(flag::PEER_SACK, syn.sack_permitted);
        if !syn.sack_permitted {
            t.set(flag::SACK_OK, false);
        }
        // RFC 7323 3.2: timestamps only if the SYN carried them.
        match syn.timestamps {
            Some((val, _)) => {
                t.set(flag::PEER_TS, true);
                if t.has(flag::TS_OK) {
                    t.ts_recent = val;
                    t.ts_recent_at = now;
                }
            }
            None => {
                t.set(flag::PEER_TS, false);
                t.set(flag::TS_OK, false);
            }
        }
        // RFC 9293 3.7.1: without an MSS option assume 536 (RFC 9293 3.7.1 / RFC 1122).
        // RFC 6691: the MSS excludes options, so subtract the timestamps we will carry.
        let peer = u32::from(syn.mss.unwrap_or(536));
        let mut mss = peer.min(u32::from(t.rcv_mss)).max(64);
        if t.has(flag::TS_OK) {
            mss -= 12;
        }
        t.snd_mss = mss as u16;
        t.cc = Cc::new(CcAlgo::from_u8(t.cc_algo), mss, now);
    }

    // ---------------------------------------------------------------------------------
    // User calls
    // ---------------------------------------------------------------------------------

    /// SEND (RFC 9293 3.10.2): copies as much of `data` as fits into the send ring. Data
    /// queued in SYN-SENT / SYN-RECEIVED goes out once ESTABLISHED.
    pub fn send(&mut self, data: &[u8]) -> Result<usize, UserError> {
        if let Some(e) = self.tcb.error() {
            return Err(e.into());
        }
        match self.state() {
            State::SynSent | State::SynReceived | State::Established | State::CloseWait => {}
            // "error: connection closing"
            State::FinWait1
            | State::FinWait2
            | State::Closing
            | State::LastAck
            | State::TimeWait => return Err(UserError::ShutDown),
            State::Closed | State::Listen => return Err(UserError::NotConnected),
        }
        if self.tcb.has(flag::FIN_QUEUED) {
            return Err(UserError::ShutDown);
        }
        Ok(self.sndring().write(data))
    }

    /// RECEIVE (RFC 9293 3.10.3): copies in-order bytes out. `Ok(0)` is end of stream (the
    /// peer's FIN was received and everything before it read); `Err(WouldBlock)` means
    /// nothing yet. When reading opens the window meaningfully a window update is queued.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<usize, UserError> {
        let n = self.rcvring().read(buf);
        if n > 0 {
            self.maybe_window_update();
            return Ok(n);
        }
        if self.tcb.has(flag::FIN_RCVD) {
            return Ok(0);
        }
        if let Some(e) = self.tcb.error() {
            return Err(e.into());
        }
        match self.state() {
            State::Closed | State::Listen => Err(UserError::NotConnected),
            _ => Err(UserError::WouldBlock),
        }
    }

    /// Copies in-order bytes out without consuming them (see [`Conn::consume`]).
    pub fn peek(&mut self, buf: &mut [u8]) -> usize {
        self.rcvring().peek(buf)
    }

    /// Consumes `n` bytes [`Conn::peek`] copied out, as [`Conn::recv`] would have.
    pub fn consume(&mut self, n: usize) -> usize {
        let n = self.rcvring().discard(n);
        if n > 0 {
            self.maybe_window_update();
        }
        n
    }

    /// Bytes waiting to be read.
    pub fn recv_queue(&self) -> u32 {
        self.tcb.rcv_ring.len
    }

    /// Bytes in the send ring (unacknowledged or unsent).
    pub fn send_queue(&self) -> u32 {
        self.snd_len()
    }

    /// Free space in the send ring.
    pub fn send_capacity(&self) -> u32 {
        let cap = self.tcb.snd_ring.cap.min(self.snd.len() as u32);
        cap.saturating_sub(self.snd_len())
    }

    /// RFC 9293 3.8.6.2.2 receiver SWS avoidance, applied after the user reads: if the right
    /// edge could move by at least min(RCV.BUFF/2, Eff.snd.MSS) while the advertised window
    /// has shrunk below half the buffer, send the update now rather than with the next ACK.
    fn maybe_window_update(&mut self) {
        let nxt = self.tcb.rcv_nxt();
        let adv = Seq(self.tcb.rcv_adv).since(nxt);
        let free = self.rcv_free();
        let cap = self.rcv_cap();
        let step = (cap / 2).min(u32::from(self.tcb.rcv_mss));
        if self.state().is_synchronized() && adv < cap / 2 && free >= adv + step {
            self.tcb.set(flag::ACK_NOW, true);
        }
    }

    /// Shut down writing (half close): a FIN follows the queued data (RFC 9293 3.10.4
    /// CLOSE: "Queue this until all preceding SENDs have been segmentized, then form a FIN
    /// segment and send it. In any case, enter FIN-WAIT-1 state." / CLOSE-WAIT: "... enter
    /// LAST-ACK state").
    pub fn shutdown_write(&mut self) -> Result<(), UserError> {
        self.tcb.set(flag::SHUT_WR, true);
        match self.state() {
            State::Closed | State::Listen => return Err(UserError::NotConnected),
            // "Delete the TCB and return 'error: closing' responses to any queued SENDs".
            State::SynSent => {
                self.close_with(None);
                return Ok(());
            }
            // "If no SENDs have been issued ... enter FIN-WAIT-1; otherwise, queue for
            // processing after entering ESTABLISHED state."
            State::SynReceived => self.tcb.set(flag::FIN_QUEUED, true),
            State::Established => {
                self.tcb.set(flag::FIN_QUEUED, true);
                self.tcb.set_state(State::FinWait1);
            }
            State::CloseWait => {
                self.tcb.set(flag::FIN_QUEUED, true);
                self.tcb.set_state(State::LastAck);
            }
            // Already closing: "error: connection closing" is not an error for a repeat.
            _ => {}
        }
        Ok(())
    }

    /// CLOSE (RFC 9293 3.10.4): shut down both directions; the connection lingers through
    /// the closing states until our FIN is acknowledged.
    ///
    /// RFC 1122 4.2.2.13: "If such a host issues a CLOSE call while received data is still
    /// pending in TCP, or if new data is received after CLOSE is called, its TCP SHOULD send
    /// a RST to show that data was lost": closing with unread data aborts.
    pub fn close(&mut self) -> Result<(), UserError> {
        self.tcb.set(flag::CLOSED_BY_USER | flag::SHUT_RD, true);
        if self.tcb.rcv_ring.len > 0 && self.state().is_synchronized() {
            self.abort();
            return Ok(());
        }
        match self.state() {
            State::Listen => {
                self.close_with(None);
                Ok(())
            }
            State::Closed => Ok(()),
            _ => self.shutdown_write(),
        }
    }

    /// ABORT (RFC 9293 3.10.5): "Send a reset segment: <SEQ=SND.NXT><CTL=RST>", flush
    /// everything, enter CLOSED. The RST goes out at the next `poll_transmit`.
    pub fn abort(&mut self) {
        match self.state() {
            State::SynReceived
            | State::Established
            | State::FinWait1
            | State::FinWait2
            | State::CloseWait => {
                let nxt = self.tcb.snd_nxt();
                self.queue_rst(nxt, None);
            }
            _ => {}
        }
        self.close_with(Some(TcpError::Aborted));
    }

    /// Nagle off (`true`) or on.
    pub fn set_nodelay(&mut self, on: bool) {
        self.tcb.set(flag::NODELAY, on);
    }

    /// Keepalive on or off (RFC 9293 3.8.4).
    pub fn set_keepalive(&mut self, on: bool) {
        self.tcb.set(flag::KEEPALIVE, on);
    }

    // ---------------------------------------------------------------------------------
    // SEGMENT ARRIVES (RFC 9293 3.10.7)
    // ---------------------------------------------------------------------------------

    /// Processes one segment addressed to this connection (already demultiplexed by the
    /// 4-tuple, checksum verified, flags and options validated by [`TcpRepr::parse`]).
    pub fn on_segment(&mut self, now: u64, seg: &TcpRepr, payload: &[u8]) {
        match self.state() {
            // 3.10.7.1 CLOSED: "An incoming segment not containing a RST causes a RST to be
            // sent in response."
            State::Closed => {
                if let Some(r) = TcpRepr::rst_reply(seg, payload.len()) {
                    let ack = r.flags.ack().then_some(r.ack);
                    self.queue_rst(r.seq, ack);
                }
            }
            State::Listen => self.on_listen(now, seg, payload),
            State::SynSent => self.on_syn_sent(now, seg, payload),
            _ => self.on_other(now, seg, payload),
        }
    }

    /// 3.10.7.2 LISTEN.
    fn on_listen(&mut self, now: u64, seg: &TcpRepr, payload: &[u8]) {
        // "First, check for a RST: An incoming RST segment could not be valid since it could
        // not have been sent in response to anything sent by this incarnation of the
        // connection. An incoming RST should be ignored."
        if seg.flags.rst() {
            return;
        }
        // "Second, check for an ACK: Any acknowledgment is bad if it arrives on a connection
        // still in the LISTEN state. An acceptable reset segment should be formed for any
        // arriving ACK-bearing segment. The RST should be formatted as <SEQ=SEG.ACK><CTL=RST>."
        if seg.flags.ack() {
            self.queue_rst(seg.ack, None);
            return;
        }
        // "Third, check for a SYN" -> SYN-RECEIVED (data on a SYN is not accepted here: it
        // is not acknowledged, so the peer sends it again).
        if seg.flags.syn() {
            let iss = self.tcb.iss();
            let _ = self.accept_syn(iss, now, seg);
            return;
        }
        // "Fourth, other data or control: ... drop the segment and return."
        let _ = payload;
    }

    /// 3.10.7.3 SYN-SENT.
    fn on_syn_sent(&mut self, now: u64, seg: &TcpRepr, _payload: &[u8]) {
        let iss = self.tcb.iss();
        let mut ack_ok = false;
        // "First, check the ACK bit: If the ACK bit is set, If SEG.ACK =< ISS or SEG.ACK >
        // SND.NXT, send a reset (unless the RST bit is set, if so drop the segment and return)
        // <SEQ=SEG.ACK><CTL=RST> and discard the segment. Return."
        if seg.flags.ack() {
            if seg.ack.le(iss) || seg.ack.gt(self.tcb.snd_max()) {
                if !seg.flags.rst() {
                    self.queue_rst(seg.ack, None);
                }
                return;
            }
            // "If SND.UNA < SEG.ACK =< SND.NXT, then the ACK is acceptable."
            ack_ok = true;
        }
        // "Second, check the RST bit: ... If the ACK was acceptable, then signal to the user
        // 'error: connection reset', drop the segment, enter CLOSED state, delete TCB, and
        // return. Otherwise (no ACK), drop the segment and return." RFC 5961 3.2 for SYN-SENT:
        // the RST is acceptable only if its ACK acknowledges our SYN.
        if seg.flags.rst() {
            if ack_ok {
                self.close_with(Some(TcpError::ConnectionRefused));
            }
            return;
        }
        // "Fourth, check the SYN bit: ... If the SYN bit is on and the security/compartment is
        // acceptable, then RCV.NXT is set to SEG.SEQ+1, IRS is set to SEG.SEQ."
        if !seg.flags.syn() {
            // "Fifth, if neither of the SYN or RST bits is set, then drop the segment".
            return;
        }
        self.tcb.irs = seg.seq.0;
        self.tcb.rcv_nxt = (seg.seq + 1).0;
        self.negotiate(seg, now);
        self.tcb.last_rcv_at = now;
        // SYN windows are never scaled (RFC 7323 2.2).
        self.tcb.snd_wnd = u32::from(seg.window);
        self.tcb.max_snd_wnd = self.tcb.snd_wnd;
        self.tcb.snd_wl1 = seg.seq.0;
        self.tcb.snd_wl2 = seg.ack.0;
        let free = self.rcv_free().min(0xffff);
        self.tcb.rcv_adv = (self.tcb.rcv_nxt() + free).0;
        if ack_ok {
            // "SND.UNA should be advanced to equal SEG.ACK ... If SND.UNA > ISS (our SYN has
            // been ACKed), change the connection state to ESTABLISHED, form an ACK segment
            // <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK> and send it."
            self.tcb.snd_una = seg.ack.0;
            self.tcb.snd_nxt = self.tcb.snd_nxt().max(seg.ack).0;
            self.tcb.set(flag::SYN_ACKED, true);
            self.sample_syn_rtt(now);
            self.tcb.rto_at = 0;
            self.tcb.retries = 0;
            self.tcb.rtt.reset_backoff();
            self.tcb.set(flag::ACK_NOW, true);
            self.become_established();
        } else {
            // "Otherwise, enter SYN-RECEIVED, form a SYN,ACK segment
            // <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK> and send it." (simultaneous open)
            self.tcb.snd_nxt = iss.0;
            self.tcb.set_state(State::SynReceived);
        }
    }

    fn sample_syn_rtt(&mut self, now: u64) {
        // Karn (RFC 6298 3): no sample from a retransmitted SYN.
        if self.tcb.retries == 0 && self.tcb.has(flag::RTT_TIMING) {
            let d = now.saturating_sub(self.tcb.rtt_at);
            self.tcb.rtt.sample(Duration::from_micros(d));
        }
        self.tcb.set(flag::RTT_TIMING, false);
    }

    fn become_established(&mut self) {
        // RFC 6298 5.7: after a retransmitted SYN, "the RTO MUST be re-initialized to 3
        // seconds when data transmission begins".
        if self.tcb.retries > 0 || self.tcb.rto_count > 0 {
            self.tcb.rtt.on_syn_lost();
        }
        self.tcb.retries = 0;
        self.tcb.set_state(State::Established);
        // A CLOSE issued before the handshake finished (RFC 9293 3.10.4 SYN-RECEIVED:
        // "queue for processing after entering ESTABLISHED state").
        if self.tcb.has(flag::FIN_QUEUED) {
            self.tcb.set_state(State::FinWait1);
        }
    }

    /// RFC 9293 3.10.7.4 "Otherwise" (SYN-RECEIVED and every synchronized state).
    fn on_other(&mut self, now: u64, seg: &TcpRepr, payload: &[u8]) {
        let t = &mut *self.tcb;
        t.last_rcv_at = now;
        t.ka_sent = 0;
        let rcv_nxt = t.rcv_nxt();
        let rcv_wnd = Seq(t.rcv_adv).since(rcv_nxt);
        let seg_len = seg.seg_len(payload.len());
        let state = t.state();

        // RFC 7323 5.3 (PAWS), before the sequence number test: "R1) If there is a Timestamps
        // option in the arriving segment, SEG.TSval < TS.Recent, TS.Recent is valid, ... then
        // treat the arriving segment as not acceptable: Send an acknowledgment in reply as
        // specified in RFC 793 page 69 and drop the segment." (RSTs are exempt, RFC 7323 5.2.)
        if t.has(flag::TS_OK) && !seg.flags.rst() {
            if let Some((val, _)) = seg.timestamps {
                let recent_valid = now.saturating_sub(t.ts_recent_at) < PAWS_IDLE_US;
                if recent_valid && Seq(val).lt(Seq(t.ts_recent)) {
                    t.dropped = t.dropped.wrapping_add(1);
                    t.set(flag::ACK_NOW, true);
                    return;
                }
            }
        }

        // "First, check sequence number": the four cases of the acceptability test.
        //   Segment Length  Receive Window  Test
        //   0               0               SEG.SEQ = RCV.NXT
        //   0               >0              RCV.NXT =< SEG.SEQ < RCV.NXT+RCV.WND
        //   >0              0               not acceptable
        //   >0              >0              RCV.NXT =< SEG.SEQ < RCV.NXT+RCV.WND
        //                                or RCV.NXT =< SEG.SEQ+SEG.LEN-1 < RCV.NXT+RCV.WND
        let mut acceptable = match (seg_len, rcv_wnd) {
            (0, 0) => seg.seq == rcv_nxt,
            (0, w) => seg.seq.in_window(rcv_nxt, w),
            (_, 0) => false,
            (l, w) => seg.seq.in_window(rcv_nxt, w) || (seg.seq + (l - 1)).in_window(rcv_nxt, w),
        };
        // "If the RCV.WND is zero, no segments will be acceptable, but special allowance
        // should be made to accept valid ACKs, URGs, and RSTs." A zero-window probe at
        // RCV.NXT is processed for its ACK; its data is trimmed away below.
        let zero_window_probe = !acceptable && rcv_wnd == 0 && seg.seq == rcv_nxt;
        if zero_window_probe {
            acceptable = true;
        }
        if !acceptable {
            // A retransmitted SYN in SYN-RECEIVED: our SYN,ACK was lost; send it again.
            if state == State::SynReceived
                && seg.flags.syn()
                && !seg.flags.ack()
                && seg.seq == t.irs()
            {
                t.snd_nxt = t.iss;
                return;
            }
            // TIME-WAIT: "The only thing that can arrive in this state is a retransmission of
            // the remote FIN. Acknowledge it, and restart the 2 MSL timeout."
            if state == State::TimeWait && seg.flags.fin() && !seg.flags.rst() {
                t.timewait_at = now + u64::from(t.time_wait_ms) * 1000 + 1;
            }
            // "If an incoming segment is not acceptable, an acknowledgment should be sent in
            // reply (unless the RST bit is set, if so drop the segment and return)".
            // RFC 5961 3.2: an out-of-window RST is silently dropped.
            t.dropped = t.dropped.wrapping_add(1);
            if !seg.flags.rst() {
                t.set(flag::ACK_NOW, true);
            }
            return;
        }

        // RFC 7323 4.3 (R3): "If SEG.TSval >= TS.Recent and SEG.SEQ =< Last.ACK.sent, then
        // SEG.TSval is copied to TS.Recent; otherwise, it is ignored."
        if t.has(flag::TS_OK) {
            if let Some((val, _)) = seg.timestamps {
                if Seq(val).ge(Seq(t.ts_recent)) && seg.seq.le(Seq(t.last_ack_sent)) {
                    t.ts_recent = val;
                    t.ts_recent_at = now;
                }
            }
        }

        // "Second, check the RST bit" — hardened by RFC 5961 3.2: "1) If the RST bit is set
        // and the sequence number is outside the current receive window, silently drop the
        // segment [done above]. 2) If the RST bit is set and the sequence number exactly
        // matches the next expected sequence number (RCV.NXT), then TCP MUST reset the
        // connection. 3) If the RST bit is set and the sequence number does not exactly match
        // the next expected sequence value, yet is within the current receive window, TCP
        // MUST send an acknowledgment (challenge ACK)".
        if seg.flags.rst() {
            if seg.seq != rcv_nxt {
                self.challenge_ack(now);
                return;
            }
            match state {
                // SYN-RECEIVED: "If this connection was initiated with a passive OPEN, then
                // return this connection to the LISTEN state and return [the listener keeps
                // listening; this block is released]. ... If this connection was initiated
                // with an active OPEN (i.e., came from SYN-SENT state), then the connection was
                // refused; signal the user 'connection refused'."
                State::SynReceived => {
                    if self.tcb.has(flag::PASSIVE) {
                        self.close_with(Some(TcpError::ConnectionReset));
                    } else {
                        self.close_with(Some(TcpError::ConnectionRefused));
                    }
                }
                // ESTABLISHED, FIN-WAIT-1, FIN-WAIT-2, CLOSE-WAIT: "any outstanding RECEIVEs
                // and SEND should receive 'reset' responses. All segment queues should be
                // flushed. Users should also receive an unsolicited general 'connection reset'
                // signal. Enter the CLOSED state".
                State::Established | State::FinWait1 | State::FinWait2 | State::CloseWait => {
                    self.close_with(Some(TcpError::ConnectionReset));
                }
                // CLOSING, LAST-ACK, TIME-WAIT: "enter the CLOSED state, delete the TCB".
                _ => self.close_with(None),
            }
            return;
        }

        // "Third, check security" — not implemented (no IP security compartments).

        // "Fourth, check the SYN bit": RFC 5961 4.2: "If the SYN bit is set, irrespective of
        // the sequence number, TCP MUST send an ACK (also referred to as challenge ACK) to the
        // remote peer ... After sending the acknowledgment, TCP MUST drop the unacceptable
        // segment and stop processing further." (RFC 9293 3.10.7.4 adopts this.)
        if seg.flags.syn() {
            self.challenge_ack(now);
            return;
        }

        // "Fifth, check the ACK field: if the ACK bit is off, drop the segment and return".
        if !seg.flags.ack() {
            return;
        }

        if state == State::SynReceived {
            // "SYN-RECEIVED STATE: If SND.UNA < SEG.ACK =< SND.NXT, then enter ESTABLISHED
            // state and continue processing with the variables below set to: SND.WND <-
            // SEG.WND, SND.WL1 <- SEG.SEQ, SND.WL2 <- SEG.ACK. If the segment acknowledgment is
            // not acceptable, form a reset segment <SEQ=SEG.ACK><CTL=RST> and send it."
            let una = self.tcb.snd_una();
            if seg.ack.gt(una) && seg.ack.le(self.tcb.snd_max()) {
                self.tcb.snd_wnd = u32::from(seg.window) << self.tcb.snd_shift.min(14);
                self.tcb.max_snd_wnd = self.tcb.max_snd_wnd.max(self.tcb.snd_wnd);
                self.tcb.snd_wl1 = seg.seq.0;
                self.tcb.snd_wl2 = seg.ack.0;
                if self.tcb.retries == 0 && self.tcb.has(flag::RTT_TIMING) {
                    let d = now.saturating_sub(self.tcb.rtt_at);
                    self.tcb.rtt.sample(Duration::from_micros(d));
                }
                self.tcb.set(flag::RTT_TIMING, false);
                self.become_established();
            } else {
                self.queue_rst(seg.ack, None);
                return;
            }
        }

        // ESTABLISHED and later: RFC 5961 5.2: "The ACK value is considered acceptable only
        // if it is in the range of ((SND.UNA - MAX.SND.WND) =< SEG.ACK =< SND.NXT). All
        // incoming segments whose ACK value doesn't satisfy the above condition MUST be
        // discarded and an ACK sent back." (SND.NXT here is the highest sent, `snd_max`,
        // since SND.NXT falls back after a retransmission timeout.)
        let una = self.tcb.snd_una();
        let lowest = una - self.tcb.max_snd_wnd.max(1);
        if seg.ack.lt(lowest) || seg.ack.gt(self.tcb.snd_max()) {
            self.challenge_ack(now);
            return;
        }
        let fin_was_acked = self.tcb.has(flag::FIN_ACKED);
        self.process_ack(now, seg, payload.len());
        let fin_acked_now = !fin_was_acked && self.tcb.has(flag::FIN_ACKED);

        match self.state() {
            // "FIN-WAIT-1 STATE: In addition to the processing for the ESTABLISHED state, if
            // the FIN segment is now acknowledged, then enter FIN-WAIT-2 and continue
            // processing in that state."
            State::FinWait1 if self.tcb.has(flag::FIN_ACKED) => {
                self.tcb.set_state(State::FinWait2);
            }
            // "CLOSING STATE: ... if the ACK acknowledges our FIN, then enter the TIME-WAIT
            // state; otherwise, ignore the segment."
            State::Closing => {
                if fin_acked_now || self.tcb.has(flag::FIN_ACKED) {
                    self.enter_time_wait(now);
                }
                return;
            }
            // "LAST-ACK STATE: The only thing that can arrive in this state is an
            // acknowledgment of our FIN. If our FIN is now acknowledged, delete the TCB, enter
            // the CLOSED state, and return."
            State::LastAck => {
                if self.tcb.has(flag::FIN_ACKED) {
                    self.close_with(None);
                }
                return;
            }
            // "TIME-WAIT STATE: The only thing that can arrive in this state is a
            // retransmission of the remote FIN. Acknowledge it, and restart the 2 MSL
            // timeout."
            State::TimeWait => {
                if seg.flags.fin() {
                    self.tcb.set(flag::ACK_NOW, true);
                    self.restart_time_wait(now);
                }
                return;
            }
            _ => {}
        }

        // "Sixth, check the URG bit" — urgent data is not supported; the pointer is ignored
        // and the data delivered in line (RFC 6093 recommends against its use).

        // "Seventh, process the segment text: ESTABLISHED, FIN-WAIT-1, FIN-WAIT-2 STATE:
        // ... Once the TCP endpoint takes responsibility for the data, it advances RCV.NXT
        // over the data accepted, and adjusts RCV.WND as appropriate to the current buffer
        // availability." CLOSE-WAIT, CLOSING, LAST-ACK, TIME-WAIT: "This should not occur
        // since a FIN has been received from the remote side. Ignore the segment text."
        let mut fin_in_order = false;
        match self.state() {
            State::Established | State::FinWait1 | State::FinWait2 => {
                fin_in_order = self.process_text(now, seg, payload);
                if self.state() == State::Closed {
                    return;
                }
            }
            _ => {
                if !payload.is_empty() {
                    self.tcb.set(flag::ACK_NOW, true);
                }
            }
        }
        if zero_window_probe {
            self.tcb.set(flag::ACK_NOW, true);
        }

        // "Eighth, check the FIN bit: Do not process the FIN if the state is CLOSED, LISTEN,
        // or SYN-SENT ... If the FIN bit is set, signal the user 'connection closing' and
        // return any pending RECEIVEs with same message, advance RCV.NXT over the FIN, and
        // send an acknowledgment for the FIN."
        let pending_fin_due = self.tcb.has(flag::FIN_PENDING)
            && self.tcb.rcv_nxt() == Seq(self.tcb.rcv_fin)
            && !self.tcb.has(flag::FIN_RCVD);
        if fin_in_order || pending_fin_due {
            self.process_fin(now);
        }
    }

    /// The ACK processing of "fifth, check the ACK field", ESTABLISHED STATE, together with
    /// RFC 6298 (timer), RFC 5681 / RFC 6582 / RFC 6675 (congestion control and loss
    /// recovery).
    fn process_ack(&mut self, now: u64, seg: &TcpRepr, paylen: usize) {
        let mss = self.mss();
        let una = self.tcb.snd_una();
        let ack = seg.ack;
        let seg_wnd = u32::from(seg.window) << self.tcb.snd_shift.min(14);

        if ack.gt(una) {
            // "If SND.UNA < SEG.ACK =< SND.NXT, then set SND.UNA <- SEG.ACK. Any segments on
            // the retransmission queue that are thereby entirely acknowledged are removed."
            let mut n = ack.since(una);
            let flight_before = self.tcb.snd_max().since(una);
            if !self.tcb.has(flag::SYN_ACKED) {
                self.tcb.set(flag::SYN_ACKED, true);
                n = n.saturating_sub(1);
            }
            let freed = self.sndring().consume(n);
            if n > freed && self.tcb.has(flag::FIN_SENT) {
                self.tcb.set(flag::FIN_ACKED, true);
            }
            let acked = ack.since(una);
            self.tcb.snd_una = ack.0;
            if self.tcb.snd_nxt().lt(ack) {
                self.tcb.snd_nxt = ack.0;
            }
            // RTT (RFC 7323 4 with timestamps; RFC 6298 3 / Karn otherwise).
            if self.tcb.has(flag::TS_OK) {
                if let Some((_, ecr)) = seg.timestamps {
                    let ms = self.ts_now(now).wrapping_sub(ecr);
                    if ecr != 0 && ms < 60_000 && self.tcb.retries == 0 {
                        self.tcb.rtt.sample(Duration::from_millis(u64::from(ms)));
                    }
                }
            } else if self.tcb.has(flag::RTT_TIMING) && ack.ge(Seq(self.tcb.rtt_seq)) {
                let d = now.saturating_sub(self.tcb.rtt_at);
                self.tcb.rtt.sample(Duration::from_micros(d));
                self.tcb.set(flag::RTT_TIMING, false);
            }
            self.tcb.retries = 0;
            self.tcb.rtt.reset_backoff();
            // RFC 6298 5.2: "When all outstanding data has been acknowledged, turn off the
            // retransmission timer." 5.3: "When an ACK is received that acknowledges new
            // data, restart the retransmission timer".
            if self.tcb.snd_una() == self.tcb.snd_max() {
                self.tcb.rto_at = 0;
            } else {
                self.arm_rto(now);
            }
            if self.tcb.has(flag::SACK_OK) {
                let max = self.tcb.snd_max;
                self.tcb.sb.update(ack.0, max, &[]);
            }
            if self.tcb.has(flag::RECOVERY) {
                if ack.ge(Seq(self.tcb.recover)) {
                    // RFC 6582 3.2 step 3 / RFC 6675 5: full acknowledgment ends recovery.
                    let flight = self.tcb.snd_max().since(ack);
                    self.tcb.cc.exit_recovery(flight, mss);
                    self.tcb.set(flag::RECOVERY | flag::REXMIT_UNA, false);
                } else if !self.tcb.has(flag::SACK_OK) {
                    // RFC 6582 3.2 step 3 (partial acknowledgment): "retransmit the first
                    // unacknowledged segment ... deflate the congestion window by the amount of
                    // new data acknowledged ... add back SMSS bytes".
                    self.tcb.cc.on_partial_ack(acked, mss);
                    self.tcb.set(flag::REXMIT_UNA, true);
                }
            } else {
                let srtt = self.tcb.rtt.srtt().map_or(0, |d| d.as_micros() as u32);
                self.tcb.cc.on_ack(acked, mss, flight_before, now, srtt);
            }
            self.tcb.dupacks = 0;
        } else if ack == una {
            // RFC 5681 2 "DUPLICATE ACKNOWLEDGMENT": "(a) the receiver of the ACK has
            // outstanding data, (b) the incoming acknowledgment carries no data, (c) the SYN
            // and FIN bits are both off, (d) the acknowledgment number is equal to the
            // greatest acknowledgment received on the given connection (TCP.UNA from RFC
            // 793) and (e) the advertised window in the incoming acknowledgment equals the
            // advertised window in the last incoming acknowledgment."
            // (A zero window is not a loss signal: ACKs of zero-window probes repeat.)
            let dup = self.tcb.snd_max().gt(una)
                && self.tcb.snd_wnd > 0
                && paylen == 0
                && !seg.flags.syn()
                && !seg.flags.fin()
                && seg_wnd == self.tcb.snd_wnd;
            if dup {
                self.tcb.dupacks = self.tcb.dupacks.saturating_add(1);
                // RFC 5681 3.2 step 4: "For each additional duplicate ACK received (after
                // the third), increment cwnd by SMSS" (NewReno; `Cc` ignores it otherwise).
                if self.tcb.has(flag::RECOVERY) && u32::from(self.tcb.dupacks) > DUP_THRESH {
                    self.tcb.cc.on_dup_ack(mss);
                }
            }
        }
        // "If the ACK is a duplicate (SEG.ACK =< SND.UNA), it can be ignored."

        // RFC 2018 / RFC 6675: record the peer's SACK blocks.
        if self.tcb.has(flag::SACK_OK) && !seg.sack.is_empty() {
            let mut blocks = [(0u32, 0u32); 4];
            let mut k = 0;
            for &(l, r) in seg.sack.as_slice() {
                // Ignore blocks that do not lie within [SND.UNA, SND.MAX] (RFC 2883 D-SACKs
                // and garbage).
                if l.lt(r) && l.ge(self.tcb.snd_una()) && r.le(self.tcb.snd_max()) {
                    if let Some(b) = blocks.get_mut(k) {
                        *b = (l.0, r.0);
                        k += 1;
                    }
                }
            }
            let (una_now, max) = (self.tcb.snd_una, self.tcb.snd_max);
            self.tcb
                .sb
                .update(una_now, max, blocks.get(..k).unwrap_or(&[]));
        }

        // Fast retransmit (RFC 5681 3.2 steps 2-3; RFC 6582 3.2 step 2; RFC 6675 5 step 4):
        // three duplicate ACKs, or (with SACK) IsLost(SND.UNA).
        let una = self.tcb.snd_una();
        if !self.tcb.has(flag::RECOVERY) && self.tcb.snd_max().gt(una) {
            let sack = self.tcb.has(flag::SACK_OK);
            let lost = u32::from(self.tcb.dupacks) >= DUP_THRESH
                || (sack && self.tcb.sb.is_lost(una.0, mss, DUP_THRESH));
            // RFC 6582 3.2 step 2 / RFC 6675 5: not while the cumulative ACK is still below
            // "recover" (duplicates caused by the retransmissions of an earlier recovery or
            // of an RTO must not start another one).
            if lost && (sack || una.ge(Seq(self.tcb.recover))) {
                let flight = self.tcb.snd_max().since(una);
                self.tcb.recover = self.tcb.snd_max;
                self.tcb.high_rxt = una.0;
                self.tcb.cc.enter_recovery(flight, mss, now);
                self.tcb.set(flag::RECOVERY | flag::REXMIT_UNA, true);
                self.tcb.set(flag::RTT_TIMING, false);
            }
        }

        // Window update: "If SND.UNA =< SEG.ACK =< SND.NXT, the send window should be updated.
        // If (SND.WL1 < SEG.SEQ or (SND.WL1 = SEG.SEQ and SND.WL2 =< SEG.ACK)), set SND.WND <-
        // SEG.WND, set SND.WL1 <- SEG.SEQ, and set SND.WL2 <- SEG.ACK."
        let t = &mut *self.tcb;
        if ack.ge(una) && ack.le(t.snd_max()) {
            let wl1 = Seq(t.snd_wl1);
            if wl1.lt(seg.seq) || (wl1 == seg.seq && Seq(t.snd_wl2).le(ack)) {
                t.snd_wnd = seg_wnd;
                t.max_snd_wnd = t.max_snd_wnd.max(seg_wnd);
                t.snd_wl1 = seg.seq.0;
                t.snd_wl2 = ack.0;
                if seg_wnd > 0 {
                    t.persist_at = 0;
                    t.persist_shift = 0;
                }
            }
        }
    }

    /// "Seventh, process the segment text". Returns whether the segment carries a FIN that
    /// is now in order (every byte before it received); a FIN beyond a gap is remembered
    /// (`FIN_PENDING`) and processed once the gap is filled.
    fn process_text(&mut self, now: u64, seg: &TcpRepr, payload: &[u8]) -> bool {
        let rcv_nxt = self.tcb.rcv_nxt();
        let fin_seq = seg.seq + payload.len() as u32;
        let mut seq = seg.seq;
        let mut data = payload;
        // Trim what we already have (a segment overlapping RCV.NXT).
        if seq.lt(rcv_nxt) {
            let skip = rcv_nxt.since(seq) as usize;
            data = data.get(skip..).unwrap_or(&[]);
            seq = rcv_nxt;
        }
        // Trim to the window we advertised (RFC 9293 3.10.7.4: "Segments with higher
        // beginning sequence numbers SHOULD be held for later processing"; what lies beyond
        // the window is dropped, and with it a FIN).
        let off = seq.since(rcv_nxt);
        let wnd = Seq(self.tcb.rcv_adv).since(rcv_nxt).min(self.rcv_free());
        let room = wnd.saturating_sub(off) as usize;
        let mut complete = data.len() <= room;
        data = data.get(..room.min(data.len())).unwrap_or(&[]);

        if !data.is_empty() && self.tcb.has(flag::CLOSED_BY_USER) {
            // RFC 1122 4.2.2.13: new data after CLOSE: RST, the data is lost.
            self.abort();
            return false;
        }
        if data.is_empty() {
            if !payload.is_empty() {
                // Duplicate or out-of-window data: "send an acknowledgment".
                self.owe_ack();
            }
        } else if off == 0 {
            let n = self.rcvring().write_at(0, data) as u32;
            complete &= n as usize == data.len();
            let held_before = self.tcb.rsack.blocks(1).next().is_some();
            let nxt = rcv_nxt + n;
            let after = Seq(self.tcb.rsack.advance(nxt.0)).max(nxt);
            let extra = after.since(nxt);
            self.tcb.rcv_nxt = after.0;
            self.rcvring().commit(n + extra);
            if held_before {
                // RFC 5681 4.2: "an immediate ACK SHOULD be generated when a segment arrives
                // that fills in all or part of a gap in the sequence space."
                self.tcb.set(flag::ACK_NOW, true);
            } else {
                // RFC 9293 3.8.6.3 / RFC 1122 4.2.3.2: delay the ACK, but "an ACK should be
                // generated for at least every second full-sized segment", and within 0.5 s
                // (our delay is configurable, 40 ms by default).
                self.tcb.unacked_segs = self.tcb.unacked_segs.saturating_add(1);
                if self.tcb.unacked_segs >= 2 {
                    self.tcb.set(flag::ACK_NOW, true);
                } else if self.tcb.delack_at == 0 {
                    self.tcb.delack_at = now + u64::from(self.tcb.delack_us).max(1);
                }
            }
        } else {
            // Out of order: hold it in the ring at its offset, remember the range (our SACK
            // blocks), and "an immediate duplicate ACK SHOULD be sent" (RFC 5681 4.2).
            let n = self.rcvring().write_at(off, data) as u32;
            complete &= n as usize == data.len();
            if n > 0 {
                self.tcb.rsack.insert(seq.0, (seq + n).0);
            }
            self.owe_ack();
        }
        if seg.flags.fin() && complete {
            let nxt = self.tcb.rcv_nxt();
            if fin_seq == nxt {
                return true;
            }
            if fin_seq.gt(nxt) {
                self.tcb.set(flag::FIN_PENDING, true);
                self.tcb.rcv_fin = fin_seq.0;
            }
        }
        false
    }

    /// "Eighth, check the FIN bit".
    fn process_fin(&mut self, now: u64) {
        self.tcb.rcv_nxt = (self.tcb.rcv_nxt() + 1).0;
        self.tcb.set(flag::FIN_RCVD | flag::ACK_NOW, true);
        self.tcb.set(flag::FIN_PENDING, false);
        match self.state() {
            // "SYN-RECEIVED STATE, ESTABLISHED STATE: Enter the CLOSE-WAIT state."
            State::SynReceived | State::Established => self.tcb.set_state(State::CloseWait),
            // "FIN-WAIT-1 STATE: If our FIN has been ACKed (perhaps in this segment), then
            // enter TIME-WAIT, start the time-wait timer, turn off the other timers;
            // otherwise, enter the CLOSING state."
            State::FinWait1 => {
                if self.tcb.has(flag::FIN_ACKED) {
                    self.enter_time_wait(now);
                } else {
                    self.tcb.set_state(State::Closing);
                }
            }
            // "FIN-WAIT-2 STATE: Enter the TIME-WAIT state. Start the time-wait timer, turn
            // off the other timers."
            State::FinWait2 => self.enter_time_wait(now),
            // "TIME-WAIT STATE: Remain in the TIME-WAIT state. Restart the 2 MSL time-wait
            // timeout." CLOSE-WAIT, CLOSING, LAST-ACK: "Remain in the ... state."
            State::TimeWait => self.restart_time_wait(now),
            _ => {}
        }
    }

    // ---------------------------------------------------------------------------------
    // Timers
    // ---------------------------------------------------------------------------------

    /// The earliest deadline (µs) at which [`Conn::on_tick`] has work, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        let t = &*self.tcb;
        let mut d = [t.rto_at, t.delack_at, t.persist_at, t.timewait_at, 0];
        if let Some(ka) = self.keepalive_deadline() {
            d[4] = ka;
        }
        d.into_iter().filter(|&x| x != 0).min()
    }

    fn keepalive_deadline(&self) -> Option<u64> {
        let t = &*self.tcb;
        if !t.has(flag::KEEPALIVE) || !matches!(t.state(), State::Established | State::CloseWait) {
            return None;
        }
        let first = u64::from(t.ka_idle_s) * 1_000_000;
        let intvl = u64::from(t.ka_intvl_s) * 1_000_000;
        Some(t.last_rcv_at + first + intvl * u64::from(t.ka_sent))
    }

    /// Runs the timers that are due at `now` (RFC 9293 3.8: retransmission, persist,
    /// delayed ACK, keepalive, TIME-WAIT).
    pub fn on_tick(&mut self, now: u64) {
        let state = self.state();
        match state {
            State::Closed | State::Listen => return,
            // "Timeout: If the time-wait timeout expires on a connection, delete the TCB,
            // enter the CLOSED state, and return." (RFC 9293 3.10.8)
            State::TimeWait => {
                if self.tcb.timewait_at != 0 && now >= self.tcb.timewait_at {
                    self.close_with(None);
                }
                if self.tcb.delack_at != 0 && now >= self.tcb.delack_at {
                    self.tcb.delack_at = 0;
                    self.tcb.set(flag::ACK_NOW, true);
                }
                return;
            }
            _ => {}
        }
        if self.tcb.delack_at != 0 && now >= self.tcb.delack_at {
            self.tcb.delack_at = 0;
            self.tcb.set(flag::ACK_NOW, true);
        }
        if self.tcb.rto_at != 0 && now >= self.tcb.rto_at {
            self.on_rto(now);
            if self.state() == State::Closed {
                return;
            }
        }
        if self.tcb.persist_at != 0 && now >= self.tcb.persist_at {
            // RFC 9293 3.8.6.1: "The sending TCP must regularly transmit at least one octet of
            // new data (if available), or retransmit to the receiving TCP even if the send
            // window is zero, in order to 'probe' the window." The interval backs off
            // exponentially (RFC 1122 4.2.2.17) and the connection never times out for it.
            self.tcb.set(flag::PROBE_NOW, true);
            self.tcb.persist_shift = self.tcb.persist_shift.saturating_add(1).min(16);
            let base = self.tcb.rtt.rto().as_micros() as u64;
            let iv = (base << self.tcb.persist_shift.min(16)).min(PERSIST_MAX_US);
            self.tcb.persist_at = now + iv;
        }
        if let Some(ka) = self.keepalive_deadline() {
            if now >= ka {
                // RFC 9293 3.8.4: a keepalive is "a segment with SEG.SEQ = SND.NXT-1"; the
                // connection is dropped after `ka_count` unanswered probes.
                if self.tcb.ka_sent >= self.tcb.ka_count {
                    self.close_with(Some(TcpError::TimedOut));
                    return;
                }
                self.tcb.ka_sent += 1;
                self.tcb.set(flag::KA_NOW, true);
            }
            self.tcb.keepalive_at = self.keepalive_deadline().unwrap_or(0);
        }
    }

    /// Retransmission timeout (RFC 6298 5.4-5.7, RFC 9293 3.8.3).
    fn on_rto(&mut self, now: u64) {
        self.tcb.rto_at = 0;
        let syn_phase = matches!(self.state(), State::SynSent | State::SynReceived);
        let limit = if syn_phase {
            self.tcb.max_syn_retries
        } else {
            self.tcb.max_retries
        };
        // RFC 9293 3.8.3: "When the number of transmissions of the same segment reaches a
        // threshold R2 greater than R1, close the connection."
        if self.tcb.retries >= limit {
            self.close_with(Some(TcpError::TimedOut));
            return;
        }
        self.tcb.retries += 1;
        self.tcb.rto_count = self.tcb.rto_count.wrapping_add(1);
        // "5.5 The host MUST set RTO <- RTO * 2 ("back off the timer")."
        self.tcb.rtt.backoff();
        // Karn: no RTT sample from a retransmitted segment.
        self.tcb.set(flag::RTT_TIMING, false);
        if syn_phase {
            // Retransmit the SYN (SYN-SENT) or SYN,ACK (SYN-RECEIVED).
            self.tcb.snd_nxt = self.tcb.iss;
        } else if self.tcb.snd_wnd == 0 {
            // The peer closed its window while data was in flight: this is the persist
            // timer's business (RFC 9293 3.8.6.1), not a loss; it never times out a
            // connection whose peer keeps answering.
            self.tcb.retries -= 1;
            self.tcb.rtt.reset_backoff();
            self.tcb.snd_nxt = self.tcb.snd_una;
            return;
        } else {
            // RFC 5681 3.1 eq. (4): ssthresh = max(FlightSize / 2, 2*SMSS); cwnd = 1 SMSS.
            let una = self.tcb.snd_una();
            let flight = self.tcb.snd_max().since(una);
            let mss = self.mss();
            self.tcb.cc.on_rto(flight, mss);
            // "5.4 Retransmit the earliest segment that has not been acknowledged": go back
            // to SND.UNA. RFC 2018 8: "After a retransmit timeout the data sender SHOULD turn
            // off all of the SACKed bits".
            self.tcb.snd_nxt = una.0;
            self.tcb.sb.clear();
            self.tcb.recover = self.tcb.snd_max;
            self.tcb.high_rxt = una.0;
            self.tcb.dupacks = 0;
            self.tcb.set(flag::RECOVERY | flag::REXMIT_UNA, false);
        }
        // "5.6 Start the retransmission timer, such that it expires after RTO seconds".
        self.arm_rto(now);
    }

    // ---------------------------------------------------------------------------------
    // Output
    // ---------------------------------------------------------------------------------

    /// Our advertised window field, updating the right edge (RFC 9293 3.8.6.2.2, receiver
    /// SWS avoidance: the right edge moves only when it can move by at least
    /// min(RCV.BUFF/2, Eff.snd.MSS), and never moves left).
    fn advertise(&mut self) -> u16 {
        let shift = u32::from(self.tcb.rcv_shift.min(14));
        let nxt = self.tcb.rcv_nxt();
        let free = self.rcv_free().min(0xffff << shift);
        let cap = self.rcv_cap();
        if Seq(self.tcb.rcv_adv).lt(nxt) {
            self.tcb.rcv_adv = nxt.0;
        }
        let cur = Seq(self.tcb.rcv_adv);
        let want = nxt + ((free >> shift) << shift);
        let step = (cap / 2).min(u32::from(self.tcb.rcv_mss)).max(1);
        if want.since(cur) >= step {
            self.tcb.rcv_adv = want.0;
        }
        let wnd = (Seq(self.tcb.rcv_adv).since(nxt) >> shift).min(0xffff) as u16;
        self.tcb.last_wnd_field = wnd;
        wnd
    }

    fn base_repr(&mut self, now: u64, seq: Seq, flags: Flags) -> TcpRepr {
        let mut r = TcpRepr {
            src_port: self.tcb.local_port,
            dst_port: self.tcb.remote_port,
            seq,
            ack: Seq(0),
            flags,
            window: 0,
            ..TcpRepr::default()
        };
        if flags.ack() {
            r.ack = self.tcb.rcv_nxt();
            r.window = self.advertise();
            self.tcb.last_ack_sent = self.tcb.rcv_nxt;
            self.tcb.set(flag::ACK_NOW, false);
            self.tcb.delack_at = 0;
            self.tcb.unacked_segs = 0;
        }
        if self.tcb.has(flag::TS_OK) {
            r.timestamps = Some((self.ts_now(now), self.tcb.ts_recent));
        }
        if self.tcb.has(flag::SACK_OK) {
            let mut b = SackBlocks::EMPTY;
            for (l, rr) in self.tcb.rsack.blocks(4) {
                b.push(Seq(l), Seq(rr));
            }
            r.sack = b;
        }
        r
    }

    fn syn_repr(&mut self, now: u64) -> TcpRepr {
        let synack = self.state() == State::SynReceived;
        let flags = if synack {
            Flags::SYN | Flags::ACK
        } else {
            Flags::SYN
        };
        let iss = self.tcb.iss();
        let mut r = TcpRepr {
            src_port: self.tcb.local_port,
            dst_port: self.tcb.remote_port,
            seq: iss,
            flags,
            // RFC 7323 2.2: the window in a SYN is never scaled.
            window: self.rcv_free().min(0xffff) as u16,
            mss: Some(self.tcb.rcv_mss),
            ..TcpRepr::default()
        };
        if synack {
            r.ack = self.tcb.rcv_nxt();
            self.tcb.rcv_adv = (self.tcb.rcv_nxt() + u32::from(r.window)).0;
            self.tcb.last_ack_sent = self.tcb.rcv_nxt;
        }
        // Offer (SYN) or confirm (SYN,ACK: only what the peer offered) the options.
        if self.tcb.has(flag::WS_OK) {
            r.window_scale = Some(self.tcb.rcv_shift);
        }
        if self.tcb.has(flag::SACK_OK) {
            r.sack_permitted = true;
        }
        if self.tcb.has(flag::TS_OK) {
            r.timestamps = Some((
                self.ts_now(now),
                if synack { self.tcb.ts_recent } else { 0 },
            ));
        }
        self.tcb.set(flag::ACK_NOW, false);
        r
    }

    /// Emits every segment that is due: a pending RST, SYN or SYN,ACK, retransmissions, new
    /// data allowed by the windows, Nagle and sender SWS avoidance, a FIN, probes, and a
    /// pure ACK if one is owed. Returns how many segments were emitted.
    pub fn poll_transmit(&mut self, now: u64, mut emit: impl FnMut(&TcpRepr, &[u8])) -> usize {
        let mut count = 0;
        if self.tcb.has(flag::RST_PENDING) {
            self.tcb.set(flag::RST_PENDING, false);
            let mut r = TcpRepr {
                src_port: self.tcb.local_port,
                dst_port: self.tcb.remote_port,
                seq: Seq(self.tcb.rst_seq),
                flags: Flags(self.tcb.rst_flags),
                ..TcpRepr::default()
            };
            if r.flags.ack() {
                r.ack = Seq(self.tcb.rst_ack);
            }
            emit(&r, &[]);
            count += 1;
        }
        match self.state() {
            State::Closed | State::Listen => return count,
            State::SynSent | State::SynReceived => {
                if self.tcb.snd_nxt() == self.tcb.iss() {
                    let r = self.syn_repr(now);
                    emit(&r, &[]);
                    count += 1;
                    let iss = self.tcb.iss();
                    self.tcb.snd_nxt = (iss + 1).0;
                    self.tcb.snd_max = self.tcb.snd_max().max(iss + 1).0;
                    if self.tcb.retries == 0 {
                        self.tcb.set(flag::RTT_TIMING, true);
                        self.tcb.rtt_at = now;
                        self.tcb.rtt_seq = (iss + 1).0;
                    }
                    if self.tcb.rto_at == 0 {
                        self.arm_rto(now);
                    }
                } else if self.tcb.has(flag::ACK_NOW) && self.state() == State::SynReceived {
                    let seq = self.tcb.snd_nxt();
                    let r = self.base_repr(now, seq, Flags::ACK);
                    emit(&r, &[]);
                    count += 1;
                }
                return count;
            }
            State::TimeWait => {
                if self.tcb.has(flag::ACK_NOW) {
                    let seq = self.tcb.snd_nxt();
                    let r = self.base_repr(now, seq, Flags::ACK);
                    emit(&r, &[]);
                    count += 1;
                }
                return count;
            }
            _ => {}
        }
        count += self.transmit_data(now, &mut emit);
        // Persist timer fired. A window too small for sender SWS avoidance to use: RFC 9293
        // 3.8.6.2.1 "(d) the override timeout occurs" sends what fits. A zero window: a
        // probe of one octet beyond it (RFC 9293 3.8.6.1).
        if self.tcb.has(flag::PROBE_NOW) {
            self.tcb.set(flag::PROBE_NOW, false);
            let seq = self.tcb.snd_nxt();
            let off = seq.since(self.data_start());
            let unsent = self.snd_len().saturating_sub(off);
            let wnd_room = (self.tcb.snd_una() + self.tcb.snd_wnd).since(seq);
            if unsent > 0 && wnd_room > 0 {
                let len = wnd_room.min(unsent).min(self.mss());
                let sent = self.send_segment(now, seq, len, true, &mut emit);
                self.tcb.snd_nxt = (seq + sent).0;
                count += 1;
            } else if unsent > 0 {
                let r = self.base_repr(now, seq, Flags::ACK);
                let payload = send_peek(&self.tcb.snd_ring, self.snd, off, 1);
                emit(&r, payload);
                count += 1;
                let end = seq + payload.len() as u32;
                self.tcb.snd_max = self.tcb.snd_max().max(end).0;
            }
        }
        // Keepalive probe: <SEQ=SND.NXT-1><ACK=RCV.NXT> with no data (RFC 9293 3.8.4).
        if self.tcb.has(flag::KA_NOW) {
            self.tcb.set(flag::KA_NOW, false);
            let seq = self.tcb.snd_una() - 1u32;
            let r = self.base_repr(now, seq, Flags::ACK);
            emit(&r, &[]);
            count += 1;
        }
        if self.tcb.has(flag::ACK_NOW) || self.tcb.acks_owed > 0 {
            // One ACK per out-of-order/duplicate segment received (at most 16 per call).
            let n = self.tcb.acks_owed.clamp(1, 16);
            for _ in 0..n {
                let seq = self.tcb.snd_nxt();
                let r = self.base_repr(now, seq, Flags::ACK);
                emit(&r, &[]);
                count += 1;
            }
        }
        self.tcb.acks_owed = 0;
        self.update_persist(now);
        count
    }

    /// Arms the persist timer when data waits, nothing is in flight to elicit a window
    /// update, and the peer's window is closed or too small to use (sender SWS avoidance
    /// holds the data back, RFC 9293 3.8.6.2.1).
    fn update_persist(&mut self, now: u64) {
        let t = &*self.tcb;
        let unsent = self.data_end().since(t.snd_nxt());
        let wnd_room = (t.snd_una() + t.snd_wnd).since(t.snd_nxt());
        let stuck = wnd_room < unsent.min(self.mss());
        if unsent > 0 && stuck && t.snd_nxt() == t.snd_una() && t.rto_at == 0 {
            if t.persist_at == 0 {
                let base = t.rtt.rto().as_micros() as u64;
                let iv = (base << t.persist_shift.min(16)).min(PERSIST_MAX_US);
                self.tcb.persist_at = now + iv.max(1);
            }
        } else if !stuck || unsent == 0 {
            self.tcb.persist_at = 0;
            self.tcb.persist_shift = 0;
        }
    }

    /// Sends one data (and/or FIN) segment at `seq` with up to `len` bytes.
    fn send_segment(
        &mut self,
        now: u64,
        seq: Seq,
        len: u32,
        allow_fin: bool,
        emit: &mut impl FnMut(&TcpRepr, &[u8]),
    ) -> u32 {
        let data_start = self.data_start();
        let off = seq.since(data_start);
        let mut r = self.base_repr(now, seq, Flags::ACK);
        // RFC 6691 / RFC 9293 3.7.1: the MSS counts the data and the options beyond the
        // fixed header; SMSS already leaves room for timestamps, so SACK blocks riding on a
        // data segment take their bytes from the payload (else the datagram outgrows the MTU
        // and is fragmented).
        let ts = if r.timestamps.is_some() { 12 } else { 0 };
        let extra = (r.options_len() as u32).saturating_sub(ts);
        let len = len.min(self.mss().saturating_sub(extra).max(1));
        let payload = send_peek(&self.tcb.snd_ring, self.snd, off, len);
        let n = payload.len() as u32;
        let end = seq + n;
        let fin = allow_fin && self.tcb.has(flag::FIN_QUEUED) && end == self.data_end();
        if fin {
            r.flags |= Flags::FIN;
        }
        if n > 0 && end == self.data_end() {
            r.flags |= Flags::PSH;
        }
        if n == 0 && !fin {
            return 0;
        }
        let is_rexmit = seq.lt(self.tcb.snd_max());
        // RFC 5681 4.1: restart from the initial window after an idle period of an RTO.
        if !is_rexmit
            && self.tcb.snd_una() == self.tcb.snd_max()
            && now.saturating_sub(self.tcb.last_snd_at) > self.tcb.rtt.rto().as_micros() as u64
        {
            let mss = self.mss();
            self.tcb.cc.on_idle_restart(mss);
        }
        emit(&r, payload);
        let seg_end = end + u32::from(fin);
        if is_rexmit {
            self.tcb.retransmits = self.tcb.retransmits.wrapping_add(1);
        } else if !self.tcb.has(flag::RTT_TIMING) && !self.tcb.has(flag::TS_OK) {
            // RFC 6298 3: time one segment per RTT, never a retransmitted one (Karn).
            self.tcb.set(flag::RTT_TIMING, true);
            self.tcb.rtt_seq = seg_end.0;
            self.tcb.rtt_at = now;
        }
        if fin {
            self.tcb.set(flag::FIN_SENT, true);
        }
        self.tcb.last_snd_at = now;
        if seg_end.gt(self.tcb.snd_max()) {
            self.tcb.snd_max = seg_end.0;
        }
        // RFC 6298 5.1: "Every time a packet containing data is sent (including a
        // retransmission), if the timer is not running, start it running".
        if self.tcb.rto_at == 0 {
            self.arm_rto(now);
        }
        n + u32::from(fin)
    }

    fn transmit_data(&mut self, now: u64, emit: &mut impl FnMut(&TcpRepr, &[u8])) -> usize {
        let mut count = 0;
        let mss = self.mss();
        // FIN-WAIT-2 and CLOSE-WAIT... only states that may send data or a FIN get here;
        // FIN-WAIT-2 has nothing left to send but ACKs.
        if self.state() == State::FinWait2 {
            return 0;
        }
        while count < self.burst {
            let una = self.tcb.snd_una();
            let snd_max = self.tcb.snd_max();
            let cwnd = self.tcb.cc.cwnd();
            let sack = self.tcb.has(flag::SACK_OK);
            let recovery = self.tcb.has(flag::RECOVERY);

            // --- loss recovery retransmissions -------------------------------------
            if recovery && self.tcb.has(flag::REXMIT_UNA) {
                // RFC 5681 3.2 step 3 / RFC 6582 3.2 step 3 / RFC 6675 5 step 4.3: retransmit
                // the first unacknowledged segment.
                self.tcb.set(flag::REXMIT_UNA, false);
                let len = mss.min(snd_max.since(una));
                let sent = self.send_segment(now, una, len, true, emit);
                if sent > 0 {
                    count += 1;
                    let end = una + sent;
                    if Seq(self.tcb.high_rxt).lt(end) {
                        self.tcb.high_rxt = end.0;
                    }
                }
                continue;
            }
            let in_flight;
            if recovery && sack {
                // RFC 6675 5 step (C): "If cwnd - pipe >= 1 SMSS, the sender SHOULD transmit
                // one or more segments": NextSeg() rule 1 (lost data), then rule 2 (new data,
                // below), then rule 3.
                let pipe = self.tcb.sb.pipe(una.0, snd_max.0, self.tcb.high_rxt, mss);
                if pipe.saturating_add(mss) > cwnd {
                    break;
                }
                let rxt = self.tcb.high_rxt;
                let next = self
                    .tcb
                    .sb
                    .next_lost_seg(una.0, snd_max.0, rxt, mss)
                    .or_else(|| {
                        // Rule (3) only when rule (2), new data, has nothing to send.
                        let unsent = self.data_end().since(self.tcb.snd_nxt());
                        let wnd = (una + self.tcb.snd_wnd).since(self.tcb.snd_nxt());
                        if unsent == 0 || wnd == 0 {
                            self.tcb.sb.next_maybe_lost_seg(una.0, snd_max.0, rxt, mss)
                        } else {
                            None
                        }
                    });
                if let Some((s, e)) = next {
                    let (s, e) = (Seq(s), Seq(e));
                    if s.ge(una) && s.lt(snd_max) {
                        let len = e.since(s).min(mss).min(snd_max.since(s));
                        let sent = self.send_segment(now, s, len, true, emit);
                        if sent > 0 {
                            count += 1;
                            let end = s + sent;
                            if Seq(self.tcb.high_rxt).lt(end) {
                                self.tcb.high_rxt = end.0;
                            }
                            continue;
                        }
                    }
                }
                in_flight = pipe;
            } else if recovery && self.tcb.cc.algo() == CcAlgo::Cubic {
                // Without SACK, CUBIC's cwnd is not inflated: estimate the pipe as RFC 6675
                // would with no SACK information, one SMSS left the network per duplicate.
                let left = u32::from(self.tcb.dupacks).saturating_mul(mss);
                in_flight = self.tcb.snd_nxt().since(una).saturating_sub(left);
            } else if recovery {
                // NewReno recovery: `Cc` inflates cwnd itself (RFC 6582 3.2 steps 2 and 4).
                in_flight = self.tcb.snd_nxt().since(una);
            } else if sack && !self.tcb.sb.is_empty() {
                // Outside recovery with SACK information: SACKed data has left the network
                // (RFC 6675 SetPipe), which also gives RFC 3042 limited transmit.
                let nxt = self.tcb.snd_nxt();
                in_flight = self.tcb.sb.pipe(una.0, nxt.0, self.tcb.high_rxt, mss);
            } else {
                // RFC 3042 limited transmit: "a TCP sender SHOULD send a segment of previously
                // unsent data in response to each of the first two duplicate acknowledgments".
                let left = u32::from(self.tcb.dupacks.min(2)).saturating_mul(mss);
                in_flight = self.tcb.snd_nxt().since(una).saturating_sub(left);
            }

            // --- new data (or go-back-N after an RTO) ------------------------------
            let nxt = self.tcb.snd_nxt();
            let data_end = self.data_end();
            let avail = data_end.since(nxt);
            let wnd_room = (una + self.tcb.snd_wnd).since(nxt);
            let cwnd_room = cwnd.saturating_sub(in_flight);
            let len = avail.min(mss).min(wnd_room).min(cwnd_room);
            // Our FIN goes with (or right after) the last byte of data, once; SND.NXT past
            // the end of data means it is out (and it goes again after an RTO rewinds).
            let fin_now = self.tcb.has(flag::FIN_QUEUED) && nxt.le(data_end) && len == avail;
            if len == 0 && !fin_now {
                break;
            }
            if len > 0 && len < mss && len < avail {
                // Limited by a window: RFC 9293 3.8.6.2.1 sender SWS avoidance: send only if
                // "(c) at least a fraction Fs of the maximum window can be sent" (Fs = 1/2).
                let max_wnd = self.tcb.max_snd_wnd.max(1);
                let is_retx = nxt.lt(snd_max);
                if !is_retx && len < max_wnd / 2 {
                    break;
                }
            } else if len > 0 && len < mss && len == avail {
                // All queued data fits in a short segment: Nagle (RFC 9293 3.7.4, RFC 1122
                // 4.2.3.4): "if there is unacknowledged data ... the sending TCP buffers all
                // user data ... until the outstanding data has been acknowledged", unless
                // TCP_NODELAY, or this is a retransmission, or a FIN goes with it.
                let is_retx = nxt.lt(snd_max);
                let idle = nxt == una;
                if !(self.tcb.has(flag::NODELAY) || idle || is_retx || fin_now) {
                    break;
                }
            }
            let sent = self.send_segment(now, nxt, len, fin_now, emit);
            if sent == 0 {
                break;
            }
            self.tcb.snd_nxt = (nxt + sent).0;
            count += 1;
        }
        count
    }
}
