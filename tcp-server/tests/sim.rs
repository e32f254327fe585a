//! Deterministic simulation tests of the TCP engine: handshake, every RFC 9293 state
//! transition, data transfer under loss/reordering/duplication, wrap-around, zero window,
//! RTO backoff, SACK recovery and the RFC 5961 hardening.

mod support;

use std::time::Duration;

use keepnet_tcp::conn::UserError;
use keepnet_tcp::seq::Seq;
use keepnet_tcp::tcb::{flag, State, TcpConfig, TcpError};
use keepnet_tcp::wire::{Flags, TcpRepr};
use support::*;

fn cfg() -> TcpConfig {
    TcpConfig {
        time_wait: Duration::from_secs(2),
        ..TcpConfig::default()
    }
}

/// The byte at stream offset `i` (so corruption or reordering shows).
fn pat(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 11) as u8 ^ (i as u8)
}

/// Moves `total` bytes from one end to the other, checking every byte.
struct Pump {
    total: u64,
    written: u64,
    read: u64,
    buf: Vec<u8>,
}

impl Pump {
    fn new(total: u64) -> Pump {
        Pump {
            total,
            written: 0,
            read: 0,
            buf: vec![0; 64 * 1024],
        }
    }
    /// One round of app I/O; true when everything arrived.
    #[track_caller]
    fn run(&mut self, s: &mut Sim, from_a: bool) -> bool {
        let (tx, rx) = if from_a {
            (&mut s.a, &mut s.b)
        } else {
            (&mut s.b, &mut s.a)
        };
        while self.written < self.total {
            let n = (self.total - self.written).min(self.buf.len() as u64) as usize;
            for (k, b) in self.buf[..n].iter_mut().enumerate() {
                *b = pat(self.written + k as u64);
            }
            let w = tx.conn().send(&self.buf[..n]).expect("send");
            self.written += w as u64;
            if w < n {
                break;
            }
        }
        loop {
            match rx.conn().recv(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    for (k, &b) in self.buf[..n].iter().enumerate() {
                        assert_eq!(
                            b,
                            pat(self.read + k as u64),
                            "byte {}",
                            self.read + k as u64
                        );
                    }
                    self.read += n as u64;
                }
                Err(UserError::WouldBlock) => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        self.read == self.total
    }
}

/// Records each distinct state of both hosts as the simulation runs.
#[derive(Default)]
struct States {
    a: Vec<State>,
    b: Vec<State>,
}

impl States {
    fn see(&mut self, s: &Sim) {
        if self.a.last() != Some(&s.a.state()) {
            self.a.push(s.a.state());
        }
        if self.b.last() != Some(&s.b.state()) {
            self.b.push(s.b.state());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handshake and state transitions
// ---------------------------------------------------------------------------------------

#[test]
fn three_way_handshake() {
    let mut s = Sim::new(1, &cfg(), &cfg(), 256 * 1024);
    s.open(1000, 5000);
    // CLOSED -> SYN-SENT (active open), LISTEN (passive open).
    assert_eq!(s.a.state(), State::SynSent);
    assert_eq!(s.b.state(), State::Listen);
    let mut st = States::default();
    assert!(s.run(100, |s| {
        st.see(s);
        s.a.state() == State::Established && s.b.state() == State::Established
    }));
    assert_eq!(st.a, [State::SynSent, State::Established]);
    assert_eq!(
        st.b,
        [State::Listen, State::SynReceived, State::Established]
    );
    let t: Vec<_> = s.trace.iter().take(3).collect();
    // <SEQ=ISS><CTL=SYN> with our options.
    assert!(t[0].from_a && t[0].repr.flags == Flags::SYN);
    assert_eq!(t[0].repr.seq, Seq(1000));
    assert_eq!(t[0].repr.mss, Some(1460));
    assert_eq!(t[0].repr.window_scale, Some(3)); // 256 KiB >> 3 fits 16 bits
    assert!(t[0].repr.sack_permitted && t[0].repr.timestamps.is_some());
    // <SEQ=ISS'><ACK=1001><CTL=SYN,ACK>
    assert!(!t[1].from_a && t[1].repr.flags == Flags::SYN | Flags::ACK);
    assert_eq!((t[1].repr.seq, t[1].repr.ack), (Seq(5000), Seq(1001)));
    assert!(t[1].repr.window_scale.is_some() && t[1].repr.sack_permitted);
    // <SEQ=1001><ACK=5001><CTL=ACK>
    assert!(t[2].from_a && t[2].repr.flags == Flags::ACK);
    assert_eq!((t[2].repr.seq, t[2].repr.ack), (Seq(1001), Seq(5001)));
    for h in [&s.a, &s.b] {
        assert!(h.tcb.has(flag::TS_OK) && h.tcb.has(flag::SACK_OK) && h.tcb.has(flag::WS_OK));
        assert_eq!(h.tcb.snd_shift, 3);
        assert_eq!(h.tcb.snd_mss, 1460 - 12);
    }
    // A little data both ways.
    let mut p = Pump::new(10_000);
    assert!(s.run(10_000, |s| p.run(s, true)));
    let mut p = Pump::new(10_000);
    assert!(s.run(10_000, |s| p.run(s, false)));
    assert_eq!(s.parse_errors, 0);
}

#[test]
fn handshake_without_options() {
    let bare = TcpConfig {
        window_scaling: false,
        timestamps: false,
        sack: false,
        ..cfg()
    };
    let mut s = Sim::new(2, &cfg(), &bare, 32 * 1024);
    s.establish(7, 9);
    for h in [&s.a, &s.b] {
        assert!(!h.tcb.has(flag::TS_OK) && !h.tcb.has(flag::SACK_OK) && !h.tcb.has(flag::WS_OK));
        assert_eq!(h.tcb.snd_shift, 0);
        assert_eq!(h.tcb.rcv_shift, 0);
    }
    let mut p = Pump::new(200_000);
    assert!(s.run(100_000, |s| p.run(s, true)));
}

#[test]
fn syn_sent_to_established_survives_lost_syn_and_synack() {
    let mut s = Sim::new(3, &cfg(), &cfg(), 64 * 1024);
    let mut dropped = 0;
    s.filter = Some(Box::new(move |_, r: &TcpRepr, _: &[u8]| {
        if r.flags.syn() && dropped < 2 {
            dropped += 1;
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }));
    s.establish(100, 200);
    // SYN lost, retransmitted after the 1 s initial RTO; then SYN,ACK lost likewise.
    let syns = s.trace.iter().filter(|t| t.repr.flags.syn()).count();
    assert_eq!(syns, 4);
    assert!(s.now >= START + 2_000_000);
}

#[test]
fn active_and_passive_close() {
    // ESTABLISHED -> FIN-WAIT-1 -> FIN-WAIT-2 -> TIME-WAIT -> CLOSED (a) and
    // ESTABLISHED -> CLOSE-WAIT -> LAST-ACK -> CLOSED (b).
    let mut s = Sim::new(4, &cfg(), &cfg(), 64 * 1024);
    s.establish(1, 2);
    s.a.conn().close().unwrap();
    assert_eq!(s.a.state(), State::FinWait1);
    let mut st = States::default();
    assert!(s.run(1000, |s| {
        st.see(s);
        s.a.state() == State::FinWait2 && s.b.state() == State::CloseWait
    }));
    // b reads EOF.
    assert_eq!(s.b.conn().recv(&mut [0; 8]), Ok(0));
    s.b.conn().close().unwrap();
    assert_eq!(s.b.state(), State::LastAck);
    assert!(s.run(1000, |s| {
        st.see(s);
        s.a.state() == State::TimeWait && s.b.state() == State::Closed
    }));
    // TIME-WAIT began when a acknowledged b's FIN and lasts 2 MSL (2 s here).
    let last_ack = s.sent_by(true).last().map(|t| t.at).unwrap();
    assert_eq!(s.a.tcb.timewait_at, last_ack + 2_000_000 + 1);
    assert!(s.run(100_000, |s| {
        st.see(s);
        s.a.state() == State::Closed
    }));
    assert!(s.now >= last_ack + 2_000_000);
    assert_eq!(
        st.a,
        [
            State::FinWait1,
            State::FinWait2,
            State::TimeWait,
            State::Closed
        ]
    );
    assert_eq!(
        st.b,
        [
            State::Established,
            State::CloseWait,
            State::LastAck,
            State::Closed
        ]
    );
    assert_eq!(s.a.tcb.error(), None);
    assert_eq!(s.b.tcb.error(), None);
}

#[test]
fn close_with_data_in_flight_delivers_everything() {
    let mut s = Sim::new(5, &cfg(), &cfg(), 64 * 1024);
    s.establish(1, 2);
    s.link.loss = 0.1;
    let data: Vec<u8> = (0..50_000u64).map(pat).collect();
    let n = s.a.conn().send(&data).unwrap();
    assert_eq!(n, 50_000);
    s.a.conn().close().unwrap();
    let mut got = Vec::new();
    assert!(s.run(200_000, |s| {
        let mut b = [0u8; 4096];
        while let Ok(n) = s.b.conn().recv(&mut b) {
            if n == 0 {
                return true;
            }
            got.extend_from_slice(&b[..n]);
        }
        false
    }));
    assert_eq!(got, data);
    assert_eq!(s.b.state(), State::CloseWait);
}

#[test]
fn simultaneous_close_goes_through_closing() {
    // FIN-WAIT-1 -> CLOSING -> TIME-WAIT -> CLOSED on both sides.
    let mut s = Sim::new(6, &cfg(), &cfg(), 64 * 1024);
    s.establish(10, 20);
    s.a.conn().close().unwrap();
    s.b.conn().close().unwrap();
    let mut st = States::default();
    assert!(s.run(100_000, |s| {
        st.see(s);
        s.a.state() == State::Closed && s.b.state() == State::Closed
    }));
    for v in [&st.a, &st.b] {
        assert_eq!(
            v,
            &[
                State::FinWait1,
                State::Closing,
                State::TimeWait,
                State::Closed
            ]
        );
    }
}

#[test]
fn simultaneous_open() {
    // SYN-SENT -> SYN-RECEIVED -> ESTABLISHED on both sides.
    let mut s = Sim::new(7, &cfg(), &cfg(), 64 * 1024);
    s.a.conn().connect(Seq(111), s.now).unwrap();
    s.b.conn().connect(Seq(999), s.now).unwrap();
    let mut st = States::default();
    assert!(s.run(1000, |s| {
        st.see(s);
        s.a.state() == State::Established && s.b.state() == State::Established
    }));
    for v in [&st.a, &st.b] {
        assert_eq!(v, &[State::SynSent, State::SynReceived, State::Established]);
    }
    let mut p = Pump::new(100_000);
    assert!(s.run(100_000, |s| p.run(s, false)));
}

#[test]
fn rst_in_syn_sent_is_connection_refused() {
    let mut s = Sim::new(8, &cfg(), &cfg(), 64 * 1024);
    // b is CLOSED: it answers the SYN with <SEQ=0><ACK=ISS+1><CTL=RST,ACK>.
    s.a.conn().connect(Seq(5), s.now).unwrap();
    assert!(s.run(100, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::ConnectionRefused));
    assert_eq!(s.a.conn().send(b"x"), Err(UserError::ConnectionRefused));
}

/// Brings `b` into `want` and returns the sim (link still up, nothing in flight that
/// matters for the RST test).
fn sim_in_state(want: State) -> Sim {
    let mut s = Sim::new(9, &cfg(), &cfg(), 64 * 1024);
    match want {
        State::SynReceived => {
            s.b.conn().listen(Seq(50));
            let syn = TcpRepr {
                src_port: A_ADDR.port(),
                dst_port: B_ADDR.port(),
                seq: Seq(7000),
                flags: Flags::SYN,
                window: 1000,
                ..TcpRepr::default()
            };
            s.inject(true, &syn, &[]);
        }
        _ => s.establish(1000, 2000),
    }
    let until = |s: &mut Sim, f: &dyn Fn(&Sim) -> bool| assert!(s.run(10_000, |s| f(s)));
    match want {
        State::SynReceived | State::Established => {}
        State::FinWait1 => s.b.conn().close().unwrap(),
        State::FinWait2 => {
            s.b.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::FinWait2);
        }
        State::CloseWait => {
            s.a.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::CloseWait);
        }
        State::LastAck => {
            s.a.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::CloseWait);
            s.b.conn().close().unwrap();
        }
        State::Closing => {
            s.a.conn().close().unwrap();
            s.b.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::Closing);
        }
        State::TimeWait => {
            s.b.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::FinWait2);
            s.a.conn().close().unwrap();
            until(&mut s, &|s| s.b.state() == State::TimeWait);
        }
        other => panic!("not a test state: {other:?}"),
    }
    assert_eq!(s.b.state(), want);
    s
}

#[test]
fn rst_in_each_synchronized_state() {
    for (state, err) in [
        (State::SynReceived, Some(TcpError::ConnectionReset)),
        (State::Established, Some(TcpError::ConnectionReset)),
        (State::FinWait1, Some(TcpError::ConnectionReset)),
        (State::FinWait2, Some(TcpError::ConnectionReset)),
        (State::CloseWait, Some(TcpError::ConnectionReset)),
        (State::Closing, None),
        (State::LastAck, None),
        (State::TimeWait, None),
    ] {
        let mut s = sim_in_state(state);
        let rst = TcpRepr {
            src_port: A_ADDR.port(),
            dst_port: B_ADDR.port(),
            seq: s.b.tcb.rcv_nxt(),
            flags: Flags::RST,
            ..TcpRepr::default()
        };
        s.inject(true, &rst, &[]);
        assert_eq!(s.b.state(), State::Closed, "RST in {state:?}");
        assert_eq!(s.b.tcb.error(), err, "error after RST in {state:?}");
        assert!(
            s.b.poll(s.now).is_empty(),
            "no answer to a RST in {state:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// RFC 5961 and PAWS
// ---------------------------------------------------------------------------------------

fn established() -> Sim {
    let mut s = Sim::new(10, &cfg(), &cfg(), 64 * 1024);
    s.establish(3_000_000, 4_000_000);
    // Some data so the windows and SND.UNA have moved.
    let mut p = Pump::new(20_000);
    assert!(s.run(10_000, |s| p.run(s, true)));
    assert!(s.run(10_000, |s| s.a.tcb.snd_una == s.a.tcb.snd_max));
    s.run_until_time(s.now + 1_000_000, 10_000);
    s.trace.clear();
    s
}

fn from_a(s: &Sim, seq: Seq, flags: Flags) -> TcpRepr {
    TcpRepr {
        src_port: A_ADDR.port(),
        dst_port: B_ADDR.port(),
        seq,
        ack: s.a.tcb.rcv_nxt(),
        flags,
        window: 1000,
        ..TcpRepr::default()
    }
}

#[track_caller]
fn assert_challenge_ack(out: &[(TcpRepr, Vec<u8>)], s: &Sim) {
    assert_eq!(out.len(), 1, "{out:?}");
    let (r, p) = &out[0];
    assert_eq!(r.flags, Flags::ACK);
    assert!(p.is_empty());
    assert_eq!(r.seq, s.b.tcb.snd_nxt());
    assert_eq!(r.ack, s.b.tcb.rcv_nxt());
}

#[test]
fn rfc5961_blind_rst_in_window_gets_challenge_ack() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    s.inject(true, &from_a(&s, nxt + 100, Flags::RST), &[]);
    assert_eq!(s.b.state(), State::Established);
    assert_eq!(s.b.tcb.challenge_acks, 1);
    let out = s.b.poll(s.now);
    assert_challenge_ack(&out, &s);
    // Out of the window entirely: silently dropped, no ACK (RFC 5961 3.2 case 1).
    s.inject(true, &from_a(&s, nxt + 10_000_000, Flags::RST), &[]);
    assert_eq!(s.b.state(), State::Established);
    assert!(s.b.poll(s.now).is_empty());
    // The connection still works.
    let mut p = Pump::new(5_000);
    assert!(s.run(10_000, |s| p.run(s, true)));
}

#[test]
fn rfc5961_exact_rst_resets() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    s.inject(true, &from_a(&s, nxt, Flags::RST), &[]);
    assert_eq!(s.b.state(), State::Closed);
    assert_eq!(
        s.b.conn().recv(&mut [0; 4]),
        Err(UserError::ConnectionReset)
    );
}

#[test]
fn rfc5961_syn_in_established_gets_challenge_ack() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    for seq in [nxt, nxt + 5, nxt - 1_000_000u32] {
        let syn = TcpRepr {
            flags: Flags::SYN,
            ack: Seq(0),
            ..from_a(&s, seq, Flags::SYN)
        };
        let before = s.b.tcb.challenge_acks;
        s.inject(true, &syn, &[]);
        assert_eq!(s.b.state(), State::Established);
        let out = s.b.poll(s.now);
        if seq == nxt - 1_000_000u32 {
            // Out of window: the acceptability test already answers with an ACK.
            assert_eq!(out.len(), 1);
        } else {
            assert_eq!(s.b.tcb.challenge_acks, before + 1);
            assert_challenge_ack(&out, &s);
        }
    }
}

#[test]
fn rfc5961_ack_out_of_range_is_dropped_with_ack() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    let rcv_before = s.b.tcb.rcv_nxt;
    // ACK far below SND.UNA - MAX.SND.WND carrying data: not accepted.
    let mut seg = from_a(&s, nxt, Flags::ACK);
    seg.ack = s.b.tcb.snd_una() - 10_000_000u32;
    s.inject(true, &seg, b"blind data");
    assert_eq!(s.b.tcb.rcv_nxt, rcv_before);
    assert_challenge_ack(&s.b.poll(s.now), &s);
    // ACK for data never sent: also dropped.
    seg.ack = s.b.tcb.snd_max() + 1000;
    s.inject(true, &seg, b"blind data");
    assert_eq!(s.b.tcb.rcv_nxt, rcv_before);
    assert_challenge_ack(&s.b.poll(s.now), &s);
}

#[test]
fn paws_drops_old_timestamps() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    let recent = s.b.tcb.ts_recent;
    let mut seg = from_a(&s, nxt, Flags::ACK);
    seg.timestamps = Some((recent.wrapping_sub(1000), 0));
    s.inject(true, &seg, b"old duplicate");
    assert_eq!(s.b.tcb.rcv_nxt(), nxt, "PAWS must drop it");
    assert_eq!(s.b.poll(s.now).len(), 1, "and answer with an ACK");
    seg.timestamps = Some((recent.wrapping_add(1), 0));
    s.inject(true, &seg, b"fresh");
    assert_eq!(s.b.tcb.rcv_nxt(), nxt + 5);
}

// ---------------------------------------------------------------------------------------
// Sequence wrap-around, zero window, RTO, SACK
// ---------------------------------------------------------------------------------------

#[test]
fn sequence_number_wrap_around() {
    let mut s = Sim::new(11, &cfg(), &cfg(), 64 * 1024);
    s.link.loss = 0.02;
    s.establish(u32::MAX - 3000, u32::MAX - 10);
    let mut p = Pump::new(1 << 20);
    assert!(s.run(1_000_000, |s| p.run(s, true)));
    let mut p = Pump::new(1 << 20);
    assert!(s.run(1_000_000, |s| p.run(s, false)));
    // Both sequence spaces wrapped.
    assert!(s.a.tcb.snd_una < 1 << 21 && s.b.tcb.snd_una < 1 << 21);
    s.a.conn().close().unwrap();
    s.b.conn().close().unwrap();
    assert!(s.run(100_000, |s| s.a.state() == State::Closed
        && s.b.state() == State::Closed));
}

#[test]
fn zero_window_probe_and_window_update() {
    let mut s = Sim::new(12, &cfg(), &cfg(), 16 * 1024);
    s.establish(1, 1);
    let data: Vec<u8> = (0..40_000u64).map(pat).collect();
    let mut sent = s.a.conn().send(&data).unwrap();
    // b does not read: the window closes.
    assert!(s.run(100_000, |s| {
        sent += s.a.conn().send(&data[sent..]).unwrap();
        s.b.tcb.last_wnd_field == 0 && s.a.tcb.snd_wnd == 0 && s.a.tcb.snd_una == s.a.tcb.snd_nxt
    }));
    let closed_at = s.now;
    s.trace.clear();
    // Ten seconds with the window shut: a probes (with backoff), nothing times out.
    s.run(100_000, |s| {
        sent += s.a.conn().send(&data[sent..]).unwrap();
        s.now >= closed_at + 10_000_000
    });
    let probes: Vec<u64> = s
        .sent_by(true)
        .filter(|t| t.len == 1)
        .map(|t| t.at)
        .collect();
    assert!(probes.len() >= 3, "probes: {probes:?}");
    for w in probes.windows(3) {
        assert!(w[2] - w[1] >= w[1] - w[0], "persist backs off: {probes:?}");
    }
    assert_eq!(s.a.state(), State::Established);
    assert_eq!(s.b.conn().recv_queue(), 16 * 1024);
    // b reads: a window update goes out and the transfer resumes.
    let mut got = Vec::new();
    assert!(s.run(200_000, |s| {
        if sent < data.len() {
            sent += s.a.conn().send(&data[sent..]).unwrap();
        }
        let mut b = [0u8; 1000];
        while let Ok(n) = s.b.conn().recv(&mut b) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        got.len() == data.len()
    }));
    assert_eq!(got, data);
}

#[test]
fn rto_backoff_then_timed_out() {
    let c = TcpConfig {
        max_retries: 6,
        ..cfg()
    };
    let mut s = Sim::new(13, &c, &c, 64 * 1024);
    s.establish(1, 1);
    s.trace.clear();
    s.down = true;
    s.a.conn().send(b"into the void").unwrap();
    assert!(s.run(10_000, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::TimedOut));
    assert_eq!(s.a.conn().send(b"x"), Err(UserError::TimedOut));
    let at: Vec<u64> = s
        .sent_by(true)
        .filter(|t| t.len > 0)
        .map(|t| t.at)
        .collect();
    assert_eq!(at.len(), 7, "1 transmission + 6 retransmissions: {at:?}");
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for g in gaps.windows(2) {
        assert_eq!(g[1], g[0] * 2, "RTO doubles: {gaps:?}");
    }
    assert!(gaps[0] >= 200_000, "at least min RTO: {gaps:?}");
}

#[test]
fn syn_retries_then_timed_out() {
    let c = TcpConfig {
        max_syn_retries: 3,
        ..cfg()
    };
    let mut s = Sim::new(14, &c, &c, 64 * 1024);
    s.down = true;
    s.open(1, 1);
    assert!(s.run(10_000, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::TimedOut));
    let at: Vec<u64> = s.sent_by(true).map(|t| t.at - START).collect();
    // RFC 6298 2.1: initial RTO 1 s, doubled each time.
    assert_eq!(at, [0, 1_000_000, 3_000_000, 7_000_000]);
}

#[test]
fn sack_recovers_multiple_holes_in_one_window() {
    let c = TcpConfig {
        nodelay: true,
        ..cfg()
    };
    let mut s = Sim::new(15, &c, &c, 1 << 20);
    s.establish(1000, 2000);
    let mss = u32::from(s.a.tcb.snd_mss);
    let start = s.a.tcb.snd_nxt();
    // Drop segments 2, 5 and 8 of the first flight, once each.
    let holes: Vec<Seq> = [2u32, 5, 8].iter().map(|k| start + k * mss).collect();
    let mut dropped = Vec::new();
    let h = holes.clone();
    s.filter = Some(Box::new(move |from_a, r: &TcpRepr, p: &[u8]| {
        if from_a && !p.is_empty() && h.contains(&r.seq) && !dropped.contains(&r.seq) {
            dropped.push(r.seq);
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }));
    s.trace.clear();
    let mut p = Pump::new(u64::from(mss) * 60);
    assert!(s.run(100_000, |s| p.run(s, true)));
    // Retransmissions: segments sent at a sequence number already sent before.
    let mut highest = start;
    let mut rexmits = Vec::new();
    for t in s.sent_by(true).filter(|t| t.len > 0) {
        if t.repr.seq.lt(highest) {
            rexmits.push(t.repr.seq);
        }
        highest = highest.max(t.repr.seq + t.len as u32);
    }
    rexmits.sort_by_key(|q| q.0.wrapping_sub(start.0));
    assert_eq!(rexmits, holes, "only the holes are retransmitted");
    assert_eq!(s.a.tcb.rto_count, 0, "no RTO");
    assert_eq!(s.a.tcb.retransmits, 3);
    // The receiver sent SACK blocks.
    assert!(s.sent_by(false).any(|t| !t.repr.sack.is_empty()));
}

#[test]
fn newreno_recovers_without_sack() {
    let c = TcpConfig {
        nodelay: true,
        sack: false,
        cc: keepnet_tcp::tcb::TcpConfig::default().cc,
        ..cfg()
    };
    let mut s = Sim::new(16, &c, &c, 1 << 20);
    s.establish(1000, 2000);
    let mss = u32::from(s.a.tcb.snd_mss);
    let start = s.a.tcb.snd_nxt();
    let holes: Vec<Seq> = [2u32, 6].iter().map(|k| start + k * mss).collect();
    let mut dropped = Vec::new();
    let h = holes.clone();
    s.filter = Some(Box::new(move |from_a, r: &TcpRepr, p: &[u8]| {
        if from_a && !p.is_empty() && h.contains(&r.seq) && !dropped.contains(&r.seq) {
            dropped.push(r.seq);
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }));
    let mut p = Pump::new(u64::from(mss) * 60);
    assert!(s.run(100_000, |s| p.run(s, true)));
    assert_eq!(
        s.a.tcb.rto_count, 0,
        "partial ACKs repair the second hole, no RTO"
    );
    assert_eq!(s.a.tcb.retransmits, 2);
}

// ---------------------------------------------------------------------------------------
// Bulk transfer under faults
// ---------------------------------------------------------------------------------------

#[test]
fn bulk_64mib_with_loss_reordering_duplication() {
    let mut s = Sim::new(0x5eed, &cfg(), &cfg(), 256 * 1024);
    s.establish(0xfff0_0000, 77);
    s.tracing = false;
    s.link = LinkCfg {
        delay_us: 2_000,
        loss: 0.05,
        dup: 0.01,
        reorder: 0.05,
        reorder_us: 3_000,
    };
    let total = 64u64 << 20;
    let mut p = Pump::new(total);
    let t0 = std::time::Instant::now();
    let ok = s.run(20_000_000, |s| p.run(s, true));
    eprintln!(
        "64 MiB: {} steps, {} segments, {} dropped, sim {:.1} s, wall {:?}, rexmits {}, rtos {}",
        s.steps,
        s.sent,
        s.dropped,
        (s.now - START) as f64 / 1e6,
        t0.elapsed(),
        s.a.tcb.retransmits,
        s.a.tcb.rto_count
    );
    assert!(ok, "transfer incomplete: read {} of {total}", p.read);
    assert_eq!(p.read, total);
    assert_eq!(s.parse_errors, 0);
    s.a.conn().close().unwrap();
    s.b.conn().close().unwrap();
    assert!(s.run(1_000_000, |s| s.a.state() == State::Closed
        && s.b.state() == State::Closed));
}

// ---------------------------------------------------------------------------------------
// ACK policy, keepalive, closing with unread data, challenge ACK throttling
// ---------------------------------------------------------------------------------------

#[test]
fn delayed_ack_and_every_second_segment() {
    let c = TcpConfig {
        nodelay: true,
        ..cfg()
    };
    let mut s = Sim::new(17, &c, &c, 64 * 1024);
    s.establish(1, 1);
    s.trace.clear();
    // One small segment: b's ACK waits for the delayed-ACK timer (40 ms).
    s.a.conn().send(b"ping").unwrap();
    let una0 = s.a.tcb.snd_una;
    assert!(s.run(1000, |s| s.a.tcb.snd_una != una0));
    let data_at = s.sent_by(true).find(|t| t.len > 0).unwrap().at;
    let ack_at = s.sent_by(false).last().unwrap().at;
    assert_eq!(ack_at - data_at, 5_000 + 40_000, "link delay + delayed ACK");
    // Two full-sized segments: the second is acknowledged at once (RFC 9293 3.8.6.3).
    s.trace.clear();
    let mss = usize::from(s.a.tcb.snd_mss);
    s.a.conn().send(&vec![7u8; 2 * mss]).unwrap();
    let una0 = s.a.tcb.snd_una;
    assert!(s.run(1000, |s| s.a.tcb.snd_una == una0 + 2 * mss as u32));
    let data_at = s.sent_by(true).find(|t| t.len > 0).unwrap().at;
    let acks: Vec<u64> = s.sent_by(false).map(|t| t.at).collect();
    assert_eq!(
        acks,
        [data_at + 5_000],
        "one immediate ACK for two segments"
    );
}

#[test]
fn keepalive_probes_then_timed_out() {
    let c = TcpConfig {
        keepalive: true,
        keepalive_idle: Duration::from_secs(10),
        keepalive_interval: Duration::from_secs(2),
        keepalive_count: 3,
        ..cfg()
    };
    let mut s = Sim::new(18, &c, &cfg(), 64 * 1024);
    s.establish(1, 1);
    s.trace.clear();
    // Idle with the peer answering: probes are acknowledged and the connection lives on.
    let t0 = s.now;
    s.run_until_time(t0 + 35_000_000, 10_000);
    assert_eq!(s.a.state(), State::Established);
    let probes = s
        .sent_by(true)
        .filter(|t| t.repr.seq == s.a.tcb.snd_una() - 1)
        .count();
    assert!(probes >= 3, "{probes} probes in 35 s");
    // The peer vanishes: after 3 unanswered probes the connection times out.
    s.down = true;
    assert!(s.run(10_000, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::TimedOut));
}

#[test]
fn close_with_unread_data_sends_rst() {
    let mut s = Sim::new(19, &cfg(), &cfg(), 64 * 1024);
    s.establish(1, 1);
    s.a.conn().send(b"unread").unwrap();
    assert!(s.run(1000, |s| s.b.conn().recv_queue() == 6));
    // RFC 1122 4.2.2.13: CLOSE with data pending sends a RST.
    s.b.conn().close().unwrap();
    assert_eq!(s.b.state(), State::Closed);
    assert!(s.run(1000, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::ConnectionReset));
}

#[test]
fn data_after_close_sends_rst() {
    let mut s = Sim::new(20, &cfg(), &cfg(), 64 * 1024);
    s.establish(1, 1);
    s.b.conn().close().unwrap();
    assert!(s.run(1000, |s| s.b.state() == State::FinWait2));
    // a keeps sending after b closed: b answers with a RST.
    s.a.conn().send(b"too late").unwrap();
    assert!(s.run(1000, |s| s.a.state() == State::Closed));
    assert_eq!(s.a.tcb.error(), Some(TcpError::ConnectionReset));
    assert_eq!(s.b.state(), State::Closed);
}

#[test]
fn rfc5961_challenge_acks_are_rate_limited() {
    let mut s = established();
    let nxt = s.b.tcb.rcv_nxt();
    for i in 0..50u32 {
        s.inject(true, &from_a(&s, nxt + 1 + i, Flags::RST), &[]);
        s.b.poll(s.now);
    }
    assert_eq!(s.b.state(), State::Established);
    assert_eq!(
        s.b.tcb.challenge_acks,
        keepnet_tcp::conn::CHALLENGE_ACK_LIMIT
    );
    assert_eq!(
        s.b.tcb.challenge_throttled,
        50 - keepnet_tcp::conn::CHALLENGE_ACK_LIMIT
    );
    // A second later the budget is back.
    s.now += 1_000_000;
    s.inject(true, &from_a(&s, nxt + 1, Flags::RST), &[]);
    assert_eq!(s.b.poll(s.now).len(), 1);
}
