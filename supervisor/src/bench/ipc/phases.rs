//! The measurement loops, generic over a transport's halves. Both processes run
//! [`Phase::ALL`] in order: the parent drives and times, the peer echoes or sinks.

use std::time::{Duration, Instant};

use super::control::{CtlMsg, CtlWriter};
use super::link::{msg, seq_of, set_seq, Msg, Phase, Rx, Tx, BATCH, MSG_SIZE};
use super::peer::Peer;
use super::report::Figures;
use super::Plan;
use crate::bench::stats::{monotonic_ns, percentile, DeadlineCheck};
use crate::error::{Error, Result};

/// Slack past a phase's planned time before a spinning wait gives up.
const ABORT_SLACK: Duration = Duration::from_secs(5);
/// Slack past a phase's planned time before the watchdog kills the peer.
const WATCHDOG_SLACK: Duration = Duration::from_secs(10);
/// The longest the peer spends in one phase before it gives up by itself.
const PEER_PHASE_LIMIT: Duration = Duration::from_secs(120);

/// Parent side: runs every phase against the peer and returns the figures.
pub fn parent<T: Tx, R: Rx>(
    tx: &mut T,
    rx: &mut R,
    peer: &mut Peer,
    plan: &Plan,
) -> Result<Figures> {
    let mut fig = Figures::default();
    for phase in Phase::ALL {
        tx.set_phase(phase);
        rx.set_phase(phase);
        peer.ready(phase)?;
        let planned = match phase {
            Phase::Rtt => plan.rtt_time + plan.rtt_time / 4,
            Phase::Unbatched | Phase::Batched => plan.stream_time,
        };
        let start = Instant::now();
        peer.arm(start + planned + WATCHDOG_SLACK);
        let abort = start + planned + ABORT_SLACK;
        match phase {
            Phase::Rtt => {
                let (mut samples, trips) = rtt(tx, rx, plan, abort)?;
                let done = peer.done(phase)?;
                if done.received != trips {
                    return Err(Error::Protocol(format!(
                        "the peer echoed {} messages, we sent {trips}",
                        done.received
                    )));
                }
                samples.sort_unstable();
                let (Some(p50), Some(p99)) =
                    (percentile(&samples, 50.0), percentile(&samples, 99.0))
                else {
                    return Err(Error::Protocol("no round trip was measured".into()));
                };
                fig.rtt_p50_ns = p50.max(1);
                fig.rtt_p99_ns = p99.max(1);
            }
            Phase::Unbatched | Phase::Batched => {
                let batched = phase == Phase::Batched;
                let (sent, t0) = stream(tx, batched, plan, abort)?;
                let done = peer.done(phase)?;
                if done.received != sent || done.errors != 0 {
                    return Err(Error::Protocol(format!(
                        "{phase:?}: sent {sent} messages, the peer received {} with {} out of sequence",
                        done.received, done.errors
                    )));
                }
                let secs = done.end_ns.saturating_sub(t0) as f64 / 1e9;
                if secs <= 0.0 {
                    return Err(Error::Protocol(format!(
                        "{phase:?}: the peer's end time is not after our start time"
                    )));
                }
                let rate = (sent as f64 / secs).round().max(1.0);
                if batched {
                    fig.oneway_batched_per_s = rate;
                } else {
                    fig.oneway_unbatched_per_s = rate;
                }
            }
        }
        peer.disarm();
    }
    Ok(fig)
}

/// Ping-pong: warm up, then time each round trip until the count or the time is reached.
/// Returns the samples (ns) and the number of round trips made in all.
fn rtt<T: Tx, R: Rx>(
    tx: &mut T,
    rx: &mut R,
    plan: &Plan,
    abort: Instant,
) -> Result<(Vec<u64>, u64)> {
    let mut out: Msg = msg(0);
    let mut back = [[0u8; MSG_SIZE]; 1];
    let mut seq: u64 = 0;
    let mut round_trip = |seq: u64| -> Result<()> {
        set_seq(&mut out, seq);
        tx.send_one(&out, abort)?;
        let r = rx.recv(&mut back, abort)?;
        if r.end || r.n != 1 || (R::CARRIES_PAYLOAD && seq_of(&back[0]) != seq) {
            return Err(Error::Protocol(format!(
                "round trip {seq}: got {r:?} carrying seq {}",
                seq_of(&back[0])
            )));
        }
        Ok(())
    };
    let warm_until = Instant::now() + plan.rtt_time / 4;
    for _ in 0..plan.rtt_warmup {
        round_trip(seq)?;
        seq += 1;
        if Instant::now() >= warm_until {
            break;
        }
    }
    let mut samples = Vec::with_capacity(plan.rtt_max);
    let until = Instant::now() + plan.rtt_time;
    let mut prev = Instant::now();
    while samples.len() < plan.rtt_max {
        round_trip(seq)?;
        seq += 1;
        let now = Instant::now();
        samples.push(now.duration_since(prev).as_nanos() as u64);
        prev = now;
        if now >= until {
            break;
        }
    }
    tx.send_end(abort)?;
    Ok((samples, seq))
}

/// One-way stream until the count or the time is reached, then the end marker. Returns the
/// messages sent and CLOCK_MONOTONIC at the start.
fn stream<T: Tx>(tx: &mut T, batched: bool, plan: &Plan, abort: Instant) -> Result<(u64, u64)> {
    let mut seq: u64 = 0;
    let mut stop = DeadlineCheck::new(Instant::now() + plan.stream_time);
    let t0 = monotonic_ns();
    if batched {
        let mut batch = [msg(0); BATCH];
        while seq < plan.stream_max {
            for (i, m) in batch.iter_mut().enumerate() {
                set_seq(m, seq + i as u64);
            }
            tx.send_batch(&batch, abort)?;
            seq += BATCH as u64;
            if stop.expired() {
                break;
            }
        }
    } else {
        let mut m = msg(0);
        while seq < plan.stream_max {
            set_seq(&mut m, seq);
            tx.send_one(&m, abort)?;
            seq += 1;
            if stop.expired() {
                break;
            }
        }
    }
    tx.send_end(abort)?;
    Ok((seq, t0))
}

/// Peer side: answers every phase until its end marker, reporting on the control channel.
pub fn child<T: Tx, R: Rx>(tx: &mut T, rx: &mut R, ctl: &mut CtlWriter) -> Result<()> {
    for phase in Phase::ALL {
        tx.set_phase(phase);
        rx.set_phase(phase);
        ctl.send(&CtlMsg::Ready { phase })?;
        let abort = Instant::now() + PEER_PHASE_LIMIT;
        let (received, errors, end_ns) = match phase {
            Phase::Rtt => echo(tx, rx, abort)?,
            Phase::Unbatched => sink(rx, 1, abort)?,
            Phase::Batched => sink(rx, BATCH, abort)?,
        };
        ctl.send(&CtlMsg::Done {
            phase,
            received,
            errors,
            end_ns,
        })?;
    }
    Ok(())
}

fn echo<T: Tx, R: Rx>(tx: &mut T, rx: &mut R, abort: Instant) -> Result<(u64, u64, u64)> {
    let mut buf = [[0u8; MSG_SIZE]; 1];
    let mut n: u64 = 0;
    loop {
        let r = rx.recv(&mut buf, abort)?;
        if r.end {
            return Ok((n, 0, monotonic_ns()));
        }
        if r.n != 1 {
            return Err(Error::Protocol(format!(
                "ping-pong: received {} messages at once",
                r.n
            )));
        }
        tx.send_one(&buf[0], abort)?;
        n += 1;
    }
}

/// Receives up to `per_op` messages per operation, checking sequence numbers, until the end
/// marker. Returns (received, out of sequence, CLOCK_MONOTONIC at the end marker).
fn sink<R: Rx>(rx: &mut R, per_op: usize, abort: Instant) -> Result<(u64, u64, u64)> {
    let mut buf = [[0u8; MSG_SIZE]; BATCH];
    let buf = &mut buf[..per_op.clamp(1, BATCH)];
    let (mut count, mut errors, mut expected) = (0u64, 0u64, 0u64);
    loop {
        let r = rx.recv(buf, abort)?;
        if R::CARRIES_PAYLOAD {
            for m in &buf[..r.n] {
                let s = seq_of(m);
                if s != expected {
                    errors += 1;
                }
                expected = s.wrapping_add(1);
            }
        }
        count += r.n as u64;
        if r.end {
            return Ok((count, errors, monotonic_ns()));
        }
    }
}
