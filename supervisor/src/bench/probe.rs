//! The kernel-side UDP test client, `keepnet __udp-probe`: sends seeded random datagrams to
//! any UDP echo server (Linux or keepnet) through a std `UdpSocket`, keeps up to K of them
//! outstanding, checks that every echo is byte-identical to a datagram it sent, retries a
//! datagram whose echo is late, and prints a summary (JSON with `--json`). Exits non-zero on
//! any mismatch, loss or datagram left unsent. Tests and `keepnet bench udp` run it inside a
//! namespace with `ip netns exec NS keepnet __udp-probe ...`.
//!
//! Datagrams are a pure function of (seed, sequence number): the size is drawn from
//! [min, max], the content is random, and a datagram of 8 bytes or more carries its sequence
//! number (little endian) in its first 8 bytes. An echo of 8 bytes or more is matched by that
//! tag; a shorter one by its length and content, against the oldest outstanding datagram
//! that equals it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use serde::{Deserialize, Serialize};

use super::stats::percentile;
use crate::error::{Context, Error, Result};

/// The largest UDP payload over IPv4 (65535 - 20 - 8).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Datagrams at least this long carry their sequence number in their first bytes.
pub const TAG_LEN: usize = 8;
/// Socket buffer size asked for on both sides: room for 16 outstanding 64 KiB datagrams
/// (arriving as IPv4 fragments, each charged with its own buffer overhead) with a margin.
pub const SOCKET_BUFFER: usize = 4 << 20;
/// Upper bounds on the arguments (everything the probe does is bounded).
pub const MAX_COUNT: u64 = 10_000_000;
pub const MAX_OUTSTANDING: usize = 1024;
pub const MAX_RETRIES: u32 = 100;
pub const MAX_TIMEOUT_MS: u64 = 60_000;
pub const MAX_SECONDS: f64 = 3600.0;
/// How many settled short datagrams are remembered to recognise their late or duplicated
/// echoes.
const SHORT_RETIRED: usize = 256;

/// Arguments of the hidden `__udp-probe` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct ProbeArgs {
    /// The echo server.
    #[arg(long, value_name = "ADDR:PORT")]
    pub target: SocketAddr,
    /// Datagrams to send (each must come back once).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Smallest payload in bytes.
    #[arg(long, default_value_t = 64)]
    pub min_size: usize,
    /// Largest payload in bytes (at most 65507).
    #[arg(long, default_value_t = 64)]
    pub max_size: usize,
    /// Seed of the sizes and contents.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Datagrams in flight at once.
    #[arg(long, default_value_t = 1)]
    pub outstanding: usize,
    /// Resend a datagram whose echo has not come back after this long.
    #[arg(long, default_value_t = 200)]
    pub timeout_ms: u64,
    /// Resends per datagram before it counts as lost.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Wall-time limit of the whole run; what is still in flight then counts as lost, what
    /// was never sent as unsent.
    #[arg(long, default_value_t = 300.0)]
    pub max_seconds: f64,
    /// Local address to bind (default: any address, an ephemeral port).
    #[arg(long, value_name = "ADDR:PORT")]
    pub bind: Option<SocketAddr>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl ProbeArgs {
    /// Checks the arguments against the bounds above.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Unsupported(format!("udp probe: {m}")));
        if self.count == 0 || self.count > MAX_COUNT {
            return bad(format!("--count must be in 1..={MAX_COUNT}"));
        }
        if self.min_size > self.max_size {
            return bad(format!(
                "--min-size {} is larger than --max-size {}",
                self.min_size, self.max_size
            ));
        }
        if self.max_size > MAX_UDP_PAYLOAD {
            return bad(format!("--max-size must be at most {MAX_UDP_PAYLOAD}"));
        }
        if self.outstanding == 0 || self.outstanding > MAX_OUTSTANDING {
            return bad(format!("--outstanding must be in 1..={MAX_OUTSTANDING}"));
        }
        if self.timeout_ms == 0 || self.timeout_ms > MAX_TIMEOUT_MS {
            return bad(format!("--timeout-ms must be in 1..={MAX_TIMEOUT_MS}"));
        }
        if self.retries > MAX_RETRIES {
            return bad(format!("--retries must be at most {MAX_RETRIES}"));
        }
        if !(self.max_seconds > 0.0 && self.max_seconds <= MAX_SECONDS) {
            return bad(format!("--max-seconds must be in (0, {MAX_SECONDS}]"));
        }
        Ok(())
    }
}

/// What one run did (the `--json` output).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeSummary {
    pub target: String,
    pub count: u64,
    pub outstanding: usize,
    pub min_size: usize,
    pub max_size: usize,
    /// Datagrams sent at least once.
    pub sent: u64,
    /// Datagrams whose echo came back byte-identical.
    pub echoed_ok: u64,
    /// Echoes that equal no datagram sent (wrong content, length or tag).
    pub mismatched: u64,
    /// Datagrams with no correct echo after all retries (or in flight at the time limit).
    pub lost: u64,
    /// Datagrams never sent because the time limit ran out.
    pub unsent: u64,
    /// Resends.
    pub retries: u64,
    /// Correct echoes of datagrams already answered or given up (late or duplicated).
    pub late_or_duplicate: u64,
    /// Sends and receives that failed with a transient error (ICMP unreachable reported by
    /// the kernel, no buffer space); the datagram is resent on its timeout.
    pub transient_errors: u64,
    /// From the first send to the last event.
    pub duration_s: f64,
    /// Round trips measured: datagrams answered on their first send (Karn's rule).
    pub rtt_samples: u64,
    pub rtt_p50_us: Option<f64>,
    pub rtt_p99_us: Option<f64>,
    pub rtt_max_us: Option<f64>,
    /// Correct echoes per second, first send to last correct echo.
    pub rate: f64,
    /// Payload bytes echoed correctly.
    pub bytes_ok: u64,
    /// The socket buffers the kernel granted.
    pub rcvbuf: usize,
    pub sndbuf: usize,
    /// Whether the wall-time limit ended the run.
    pub timed_out: bool,
}

impl ProbeSummary {
    /// Every datagram came back, byte for byte.
    pub fn ok(&self) -> bool {
        self.mismatched == 0 && self.lost == 0 && self.unsent == 0 && self.echoed_ok == self.count
    }

    /// One human line.
    pub fn render(&self) -> String {
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        format!(
            "udp probe {}: {} datagrams of {}..{} bytes, {} outstanding: {} echoed ok, {} \
             mismatched, {} lost, {} unsent, {} retries, {} late/duplicate, {} transient errors; \
             {:.3} s, {:.0} replies/s, rtt p50 {} µs p99 {} µs max {} µs ({} samples)",
            self.target,
            self.count,
            self.min_size,
            self.max_size,
            self.outstanding,
            self.echoed_ok,
            self.mismatched,
            self.lost,
            self.unsent,
            self.retries,
            self.late_or_duplicate,
            self.transient_errors,
            self.duration_s,
            self.rate,
            us(self.rtt_p50_us),
            us(self.rtt_p99_us),
            us(self.rtt_max_us),
            self.rtt_samples,
        )
    }
}

// ---------------------------------------------------------------------------------------
// Datagrams: a pure function of (seed, sequence number).

/// SplitMix64's finalizer: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*: small, fast, good enough for payload bytes.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        // The state must not be zero.
        XorShift(mix64(seed) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The size of datagram `seq`: uniform in `min..=max`.
pub fn datagram_size(seed: u64, seq: u64, min: usize, max: usize) -> usize {
    if max <= min {
        return min;
    }
    let span = (max - min) as u64 + 1;
    let r = mix64(mix64(seed ^ 0x5A17_0F5E_ED5A_17E5) ^ seq);
    min + (r % span) as usize
}

/// Writes datagram `seq` of `size` bytes into `buf` (replacing its contents): random bytes,
/// and the sequence number in the first [`TAG_LEN`] bytes when it is that long.
pub fn fill_datagram(seed: u64, seq: u64, size: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.reserve(size);
    let mut rng = XorShift::new(mix64(seed) ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03));
    while buf.len() < size {
        let word = rng.next_u64().to_le_bytes();
        let take = (size - buf.len()).min(8);
        buf.extend_from_slice(&word[..take]);
    }
    if size >= TAG_LEN {
        buf[..TAG_LEN].copy_from_slice(&seq.to_le_bytes());
    }
}

/// The sequence number a datagram of [`TAG_LEN`] bytes or more carries.
pub fn tag_of(data: &[u8]) -> Option<u64> {
    let head: [u8; TAG_LEN] = data.get(..TAG_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(head))
}

// ---------------------------------------------------------------------------------------
// The bookkeeping, free of sockets (so tests drive it with a fake server).

/// What the tracker needs to know.
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub count: u64,
    pub min_size: usize,
    pub max_size: usize,
    pub seed: u64,
    pub outstanding: usize,
    pub timeout: Duration,
    pub retries: u32,
}

impl From<&ProbeArgs> for TrackerConfig {
    fn from(a: &ProbeArgs) -> Self {
        TrackerConfig {
            count: a.count,
            min_size: a.min_size,
            max_size: a.max_size,
            seed: a.seed,
            outstanding: a.outstanding,
            timeout: Duration::from_millis(a.timeout_ms),
            retries: a.retries,
        }
    }
}

/// A datagram in flight.
#[derive(Debug)]
struct Slot {
    seq: u64,
    payload: Vec<u8>,
    first_sent: Instant,
    last_sent: Instant,
    sends: u32,
}

/// What an echo turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// The echo of an outstanding datagram, byte for byte.
    Ok(u64),
    /// A correct echo of a datagram already answered or given up.
    LateOrDuplicate(u64),
    /// Equal to nothing sent.
    Mismatch,
}

/// Outstanding datagrams, counters and round trips.
#[derive(Debug)]
pub struct Tracker {
    cfg: TrackerConfig,
    next_seq: u64,
    inflight: Vec<Slot>,
    /// The latest short (untagged) datagrams answered or given up, newest last, at most
    /// [`SHORT_RETIRED`]: a short echo that matches nothing in flight is compared with these
    /// before it counts as a mismatch.
    short_retired: VecDeque<u64>,
    spare: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    rtts_ns: Vec<u64>,
    first_send: Option<Instant>,
    last_ok: Option<Instant>,
    pub echoed_ok: u64,
    pub mismatched: u64,
    pub lost: u64,
    pub retries: u64,
    pub late_or_duplicate: u64,
    pub transient_errors: u64,
    pub bytes_ok: u64,
}

/// Whether a socket error leaves the socket usable (the datagram is resent on its timeout).
pub fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::Interrupted
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
    ) || e.raw_os_error() == Some(nix::libc::ENOBUFS)
}

impl Tracker {
    pub fn new(cfg: TrackerConfig) -> Tracker {
        let samples = usize::try_from(cfg.count).unwrap_or(0).min(1 << 22);
        Tracker {
            inflight: Vec::with_capacity(cfg.outstanding),
            cfg,
            next_seq: 0,
            short_retired: VecDeque::with_capacity(SHORT_RETIRED),
            spare: Vec::new(),
            scratch: Vec::new(),
            rtts_ns: Vec::with_capacity(samples),
            first_send: None,
            last_ok: None,
            echoed_ok: 0,
            mismatched: 0,
            lost: 0,
            retries: 0,
            late_or_duplicate: 0,
            transient_errors: 0,
            bytes_ok: 0,
        }
    }

    fn retire_short(&mut self, seq: u64) {
        if self.short_retired.len() >= SHORT_RETIRED {
            self.short_retired.pop_front();
        }
        self.short_retired.push_back(seq);
    }

    /// Datagrams in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Everything sent and settled.
    pub fn finished(&self) -> bool {
        self.next_seq >= self.cfg.count && self.inflight.is_empty()
    }

    fn send_one(
        transient: &mut u64,
        payload: &[u8],
        send: &mut impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match send(payload) {
            Ok(()) => Ok(()),
            Err(e) if is_transient(&e) => {
                *transient += 1;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Sends new datagrams until K are in flight or all have been sent, each stamped with
    /// the clock read just before its send (`now` is the clock). `send` returns a transient
    /// error for a datagram the network did not take (it is resent on timeout); any other
    /// error ends the run.
    pub fn fill(
        &mut self,
        mut now: impl FnMut() -> Instant,
        mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        while self.inflight.len() < self.cfg.outstanding && self.next_seq < self.cfg.count {
            let seq = self.next_seq;
            let size = datagram_size(self.cfg.seed, seq, self.cfg.min_size, self.cfg.max_size);
            let mut payload = self.spare.pop().unwrap_or_default();
            fill_datagram(self.cfg.seed, seq, size, &mut payload);
            let now = now();
            self.first_send.get_or_insert(now);
            Self::send_one(&mut self.transient_errors, &payload, &mut send)?;
            self.next_seq += 1;
            self.inflight.push(Slot {
                seq,
                payload,
                first_sent: now,
                last_sent: now,
                sends: 1,
            });
        }
        Ok(())
    }

    fn settle(&mut self, i: usize, at: Instant) -> u64 {
        let slot = self.inflight.remove(i);
        if slot.sends == 1 {
            let ns = at.saturating_duration_since(slot.first_sent).as_nanos();
            self.rtts_ns.push(u64::try_from(ns).unwrap_or(u64::MAX));
        }
        if slot.payload.len() < TAG_LEN {
            self.retire_short(slot.seq);
        }
        self.echoed_ok += 1;
        self.bytes_ok += slot.payload.len() as u64;
        self.last_ok = Some(at);
        self.spare.push(slot.payload);
        slot.seq
    }

    /// Whether `data` is datagram `seq` (one already sent), regenerated.
    fn equals_sent(&mut self, seq: u64, data: &[u8]) -> bool {
        if seq >= self.next_seq {
            return false;
        }
        let size = datagram_size(self.cfg.seed, seq, self.cfg.min_size, self.cfg.max_size);
        if size != data.len() {
            return false;
        }
        fill_datagram(self.cfg.seed, seq, size, &mut self.scratch);
        self.scratch == data
    }

    /// Classifies an echo that arrived at `at` and settles the datagram it answers.
    pub fn on_echo(&mut self, data: &[u8], at: Instant) -> Echo {
        let found = if data.len() >= TAG_LEN {
            let tag = tag_of(data);
            self.inflight
                .iter()
                .position(|s| Some(s.seq) == tag && s.payload == data)
        } else {
            // The oldest equal one (equal short datagrams are interchangeable).
            self.inflight
                .iter()
                .enumerate()
                .filter(|(_, s)| s.payload == data)
                .min_by_key(|(_, s)| s.seq)
                .map(|(i, _)| i)
        };
        if let Some(i) = found {
            return Echo::Ok(self.settle(i, at));
        }
        let late = if data.len() >= TAG_LEN {
            tag_of(data).filter(|&seq| {
                !self.inflight.iter().any(|s| s.seq == seq) && self.equals_sent(seq, data)
            })
        } else {
            let candidates = std::mem::take(&mut self.short_retired);
            let hit = candidates
                .iter()
                .rev()
                .copied()
                .find(|&seq| self.equals_sent(seq, data));
            self.short_retired = candidates;
            hit
        };
        match late {
            Some(seq) => {
                self.late_or_duplicate += 1;
                Echo::LateOrDuplicate(seq)
            }
            None => {
                self.mismatched += 1;
                Echo::Mismatch
            }
        }
    }

    /// Resends each datagram whose echo is overdue at `now`, or gives it up as lost once it
    /// has been resent `retries` times.
    pub fn expire(
        &mut self,
        now: Instant,
        mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let mut i = 0;
        while i < self.inflight.len() {
            let Some(slot) = self.inflight.get_mut(i) else {
                break;
            };
            if now.saturating_duration_since(slot.last_sent) < self.cfg.timeout {
                i += 1;
                continue;
            }
            if slot.sends <= self.cfg.retries {
                slot.sends += 1;
                slot.last_sent = now;
                self.retries += 1;
                Self::send_one(&mut self.transient_errors, &slot.payload, &mut send)?;
                i += 1;
            } else {
                let slot = self.inflight.remove(i);
                self.lost += 1;
                if slot.payload.len() < TAG_LEN {
                    self.retire_short(slot.seq);
                }
                self.spare.push(slot.payload);
            }
        }
        Ok(())
    }

    /// Gives up on everything in flight (the time limit ran out); returns how many were
    /// never sent.
    pub fn abandon(&mut self) -> u64 {
        self.lost += self.inflight.len() as u64;
        self.inflight.clear();
        self.cfg.count.saturating_sub(self.next_seq)
    }

    /// The summary so far, `end` being the end of the run.
    pub fn summary(&self, end: Instant, unsent: u64, timed_out: bool) -> ProbeSummary {
        let mut sorted = self.rtts_ns.clone();
        sorted.sort_unstable();
        let us = |q: f64| percentile(&sorted, q).map(|ns| ns as f64 / 1000.0);
        let duration = self
            .first_send
            .map_or(0.0, |t| end.saturating_duration_since(t).as_secs_f64());
        let busy = match (self.first_send, self.last_ok) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        ProbeSummary {
            target: String::new(),
            count: self.cfg.count,
            outstanding: self.cfg.outstanding,
            min_size: self.cfg.min_size,
            max_size: self.cfg.max_size,
            sent: self.next_seq,
            echoed_ok: self.echoed_ok,
            mismatched: self.mismatched,
            lost: self.lost,
            unsent,
            retries: self.retries,
            late_or_duplicate: self.late_or_duplicate,
            transient_errors: self.transient_errors,
            duration_s: duration,
            rtt_samples: sorted.len() as u64,
            rtt_p50_us: us(50.0),
            rtt_p99_us: us(99.0),
            rtt_max_us: us(100.0),
            rate: if busy > 0.0 {
                self.echoed_ok as f64 / busy
            } else {
                0.0
            },
            bytes_ok: self.bytes_ok,
            rcvbuf: 0,
            sndbuf: 0,
            timed_out,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The socket side.

/// Asks for `bytes` of receive and send buffer (forcing past the sysctl limits when root),
/// returns what the kernel granted.
pub fn size_buffers(sock: &UdpSocket, bytes: usize) -> Result<(usize, usize)> {
    if setsockopt(sock, sockopt::RcvBufForce, &bytes).is_err() {
        setsockopt(sock, sockopt::RcvBuf, &bytes).context("setsockopt SO_RCVBUF")?;
    }
    if setsockopt(sock, sockopt::SndBufForce, &bytes).is_err() {
        setsockopt(sock, sockopt::SndBuf, &bytes).context("setsockopt SO_SNDBUF")?;
    }
    let rcv = getsockopt(sock, sockopt::RcvBuf).context("getsockopt SO_RCVBUF")?;
    let snd = getsockopt(sock, sockopt::SndBuf).context("getsockopt SO_SNDBUF")?;
    Ok((rcv, snd))
}

/// How long one blocking receive waits before the loop looks at the timers again.
pub fn poll_interval(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

/// Runs the probe and returns its summary (whether or not everything came back).
pub fn probe(args: &ProbeArgs) -> Result<ProbeSummary> {
    args.validate()?;
    let bind = args.bind.unwrap_or_else(|| {
        if args.target.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        }
    });
    let sock = UdpSocket::bind(bind).with_context(|| format!("bind a UDP socket to {bind}"))?;
    let (rcvbuf, sndbuf) = size_buffers(&sock, SOCKET_BUFFER)?;
    sock.connect(args.target)
        .with_context(|| format!("connect the UDP socket to {}", args.target))?;
    let timeout = Duration::from_millis(args.timeout_ms);
    sock.set_read_timeout(Some(poll_interval(timeout)))
        .context("set the receive timeout")?;

    let mut tracker = Tracker::new(TrackerConfig::from(args));
    let mut buf = vec![0u8; 65_536];
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let send = |p: &[u8]| sock.send(p).map(|_| ());
    let (unsent, timed_out) = loop {
        if Instant::now() >= deadline {
            break (tracker.abandon(), true);
        }
        tracker
            .fill(Instant::now, send)
            .with_context(|| format!("send to {}", args.target))?;
        if tracker.finished() {
            break (0, false);
        }
        match sock.recv(&mut buf) {
            Ok(n) => {
                let at = Instant::now();
                let data = buf.get(..n).unwrap_or(&[]);
                tracker.on_echo(data, at);
            }
            Err(e) if is_transient(&e) => {
                if !matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) {
                    tracker.transient_errors += 1;
                }
            }
            Err(e) => {
                return Err(e).with_context(|| format!("receive from {}", args.target));
            }
        }
        tracker
            .expire(Instant::now(), send)
            .with_context(|| format!("resend to {}", args.target))?;
    };
    let mut s = tracker.summary(Instant::now(), unsent, timed_out);
    s.target = args.target.to_string();
    s.rcvbuf = rcvbuf;
    s.sndbuf = sndbuf;
    Ok(s)
}

/// `keepnet __udp-probe`: prints the summary; an error (non-zero exit) if anything was
/// mismatched, lost or left unsent.
pub fn run(args: ProbeArgs) -> Result<()> {
    let s = probe(&args)?;
    let text = if args.json {
        serde_json::to_string(&s).context("encode the summary")?
    } else {
        s.render()
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    if s.ok() {
        Ok(())
    } else {
        Err(Error::Peer(format!(
            "udp probe to {}: {} of {} echoed ok; {} mismatched, {} lost, {} unsent",
            s.target, s.echoed_ok, s.count, s.mismatched, s.lost, s.unsent
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct P {
        #[command(flatten)]
        a: ProbeArgs,
    }

    fn args(extra: &[&str]) -> std::result::Result<ProbeArgs, clap::Error> {
        let mut v = vec!["probe", "--target", "198.19.0.2:7"];
        v.extend_from_slice(extra);
        P::try_parse_from(v).map(|p| p.a)
    }

    fn cfg(count: u64, min: usize, max: usize, k: usize, retries: u32) -> TrackerConfig {
        TrackerConfig {
            count,
            min_size: min,
            max_size: max,
            seed: 42,
            outstanding: k,
            timeout: Duration::from_millis(10),
            retries,
        }
    }

    #[test]
    fn argument_validation() {
        assert!(args(&[]).is_ok_and(|a| a.validate().is_ok()));
        let ok = |x: &[&str]| args(x).is_ok_and(|a| a.validate().is_ok());
        assert!(ok(&["--min-size", "0", "--max-size", "65507"]));
        assert!(ok(&["--outstanding", "16", "--count", "5"]));
        assert!(!ok(&["--count", "0"]));
        assert!(!ok(&["--min-size", "100", "--max-size", "99"]));
        assert!(!ok(&["--max-size", "65508"]));
        assert!(!ok(&["--outstanding", "0"]));
        assert!(!ok(&["--outstanding", "1025"]));
        assert!(!ok(&["--timeout-ms", "0"]));
        assert!(!ok(&["--retries", "101"]));
        assert!(!ok(&["--max-seconds", "0"]));
        assert!(!ok(&["--max-seconds", "NaN"]));
        assert!(!ok(&["--max-seconds", "4000"]));
        assert!(args(&["--target", "nonsense"]).is_err());
        assert!(P::try_parse_from(["probe"]).is_err());
    }

    #[test]
    fn datagrams_are_deterministic_sized_and_tagged() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for seq in 0..500u64 {
            let size = datagram_size(7, seq, 0, 100);
            assert!(size <= 100);
            assert_eq!(size, datagram_size(7, seq, 0, 100));
            fill_datagram(7, seq, size, &mut a);
            fill_datagram(7, seq, size, &mut b);
            assert_eq!(a.len(), size);
            assert_eq!(a, b);
            if size >= TAG_LEN {
                assert_eq!(tag_of(&a), Some(seq));
            } else {
                assert_eq!(tag_of(&a), None);
            }
        }
        assert_eq!(datagram_size(7, 3, 64, 64), 64);
        // Different seeds and sequence numbers give different contents.
        fill_datagram(7, 1, 64, &mut a);
        fill_datagram(8, 1, 64, &mut b);
        assert_ne!(a[TAG_LEN..], b[TAG_LEN..]);
        fill_datagram(7, 2, 64, &mut b);
        assert_ne!(a[TAG_LEN..], b[TAG_LEN..]);
        // Sizes cover the range.
        let sizes: std::collections::BTreeSet<usize> =
            (0..5000).map(|s| datagram_size(1, s, 0, 9)).collect();
        assert_eq!(sizes.len(), 10);
        fill_datagram(1, 0, 0, &mut a);
        assert!(a.is_empty());
    }

    /// Drives a tracker against a fake server that echoes what `f` makes of each datagram.
    fn drive(t: &mut Tracker, mut f: impl FnMut(&[u8]) -> Vec<Vec<u8>>) -> Vec<Echo> {
        let mut wire: Vec<Vec<u8>> = Vec::new();
        let mut seen = Vec::new();
        // A virtual clock: one second passes per step, so everything in flight is overdue
        // at the end of each step.
        let mut clock = Instant::now();
        for _ in 0..100_000 {
            if t.finished() {
                break;
            }
            t.fill(
                || clock,
                |p| {
                    wire.extend(f(p));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            for d in std::mem::take(&mut wire) {
                seen.push(t.on_echo(&d, clock));
            }
            clock += Duration::from_secs(1);
            t.expire(clock, |p| {
                wire.extend(f(p));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
            for d in std::mem::take(&mut wire) {
                seen.push(t.on_echo(&d, clock));
            }
        }
        seen
    }

    #[test]
    fn faithful_echo_is_all_ok() {
        for (min, max, k) in [(0, 20, 1), (0, 20, 16), (64, 64, 16), (1, 3000, 4)] {
            let mut t = Tracker::new(cfg(300, min, max, k, 1));
            let seen = drive(&mut t, |p| vec![p.to_vec()]);
            assert!(seen.iter().all(|e| matches!(e, Echo::Ok(_))));
            assert_eq!(t.echoed_ok, 300);
            let s = t.summary(Instant::now(), 0, false);
            assert!(s.ok(), "{s:?}");
            assert_eq!(s.rtt_samples, 300);
            assert_eq!((s.retries, s.lost, s.mismatched), (0, 0, 0));
        }
    }

    #[test]
    fn echoes_out_of_order_match() {
        let mut t = Tracker::new(cfg(64, 0, 40, 16, 0));
        let mut held = Vec::new();
        t.fill(Instant::now, |p| {
            held.push(p.to_vec());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(held.len(), 16);
        for d in held.iter().rev() {
            assert!(matches!(t.on_echo(d, Instant::now()), Echo::Ok(_)));
        }
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.echoed_ok, 16);
    }

    #[test]
    fn corruption_truncation_and_strangers_are_mismatches() {
        let mut t = Tracker::new(cfg(10, 64, 64, 1, 2));
        let mut n = 0;
        let seen = drive(&mut t, |p| {
            n += 1;
            let mut bad = p.to_vec();
            match n % 4 {
                1 => {
                    let last = bad.len() - 1;
                    bad[last] ^= 1;
                    vec![bad, p.to_vec()]
                }
                2 => vec![p[..p.len() - 1].to_vec(), p.to_vec()],
                3 => vec![vec![0xEE; 64], p.to_vec()],
                _ => vec![p.to_vec()],
            }
        });
        assert_eq!(t.echoed_ok, 10);
        assert_eq!(t.mismatched, 8);
        assert_eq!(seen.iter().filter(|e| **e == Echo::Mismatch).count(), 8);
        assert!(!t.summary(Instant::now(), 0, false).ok());
    }

    #[test]
    fn drops_are_retried_then_lost() {
        // Drop the first send of every datagram: all come back on the retry.
        let mut t = Tracker::new(cfg(20, 8, 100, 4, 1));
        let mut sends = std::collections::HashMap::new();
        drive(&mut t, |p| {
            let c = sends.entry(p.to_vec()).or_insert(0);
            *c += 1;
            if *c == 1 {
                vec![]
            } else {
                vec![p.to_vec()]
            }
        });
        let s = t.summary(Instant::now(), 0, false);
        assert!(s.ok(), "{s:?}");
        assert_eq!((s.retries, s.rtt_samples), (20, 0));
        // A black hole: each datagram is sent 1 + retries times, then lost.
        let mut t = Tracker::new(cfg(5, 0, 10, 2, 3));
        let mut total = 0;
        drive(&mut t, |_| {
            total += 1;
            vec![]
        });
        assert_eq!((t.lost, t.retries, total), (5, 15, 20));
        assert!(!t.summary(Instant::now(), 0, false).ok());
    }

    #[test]
    fn duplicates_and_late_echoes_are_counted_not_mismatched() {
        for (min, max) in [(0, 7), (8, 64)] {
            let mut t = Tracker::new(cfg(50, min, max, 1, 1));
            let mut first = true;
            let mut dup = Vec::new();
            drive(&mut t, |p| {
                let mut out = vec![p.to_vec(), p.to_vec()];
                // Echo a datagram's first copy only after its retry: it comes in late.
                if first {
                    first = false;
                    dup = p.to_vec();
                    out.clear();
                } else if !dup.is_empty() && p == dup.as_slice() {
                    out.push(p.to_vec());
                }
                out
            });
            assert_eq!(t.echoed_ok, 50);
            assert_eq!(t.mismatched, 0, "sizes {min}..{max}");
            assert!(t.late_or_duplicate >= 49, "{}", t.late_or_duplicate);
        }
    }

    #[test]
    fn an_echo_after_the_datagram_was_given_up_is_late_not_mismatched() {
        for size in [4, 64] {
            let mut t = Tracker::new(cfg(2, size, size, 1, 0));
            let mut held = Vec::new();
            let t0 = Instant::now();
            let push = |p: &[u8]| {
                held.push(p.to_vec());
                Ok(())
            };
            t.fill(|| t0, push).unwrap_or_else(|e| panic!("{e}"));
            t.expire(t0 + Duration::from_secs(1), |_| Ok(()))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(t.lost, 1);
            let mut held2 = Vec::new();
            t.fill(
                || t0,
                |p: &[u8]| {
                    held2.push(p.to_vec());
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            // The lost one's echo arrives, late, then the second one's.
            assert_eq!(t.on_echo(&held[0], t0), Echo::LateOrDuplicate(0));
            assert_eq!(t.on_echo(&held2[0], t0), Echo::Ok(1));
            assert_eq!((t.mismatched, t.echoed_ok, t.late_or_duplicate), (0, 1, 1));
        }
    }

    #[test]
    fn abandon_counts_in_flight_as_lost_and_rest_as_unsent() {
        let mut t = Tracker::new(cfg(100, 64, 64, 16, 1));
        t.fill(Instant::now, |_| Ok(()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.abandon(), 84);
        assert_eq!(t.lost, 16);
        let s = t.summary(Instant::now(), 84, true);
        assert!(!s.ok() && s.timed_out && s.sent == 16);
    }

    #[test]
    fn transient_send_errors_are_counted_and_fatal_ones_returned() {
        let mut t = Tracker::new(cfg(3, 64, 64, 1, 1));
        let r = t.fill(Instant::now, |_| {
            Err(std::io::Error::from_raw_os_error(nix::libc::ENOBUFS))
        });
        assert!(r.is_ok());
        assert_eq!(t.transient_errors, 1);
        let r = t.expire(Instant::now() + Duration::from_secs(1), |_| {
            Err(std::io::Error::from(ErrorKind::PermissionDenied))
        });
        assert!(r.is_err());
    }

    #[test]
    fn summary_json_round_trips() {
        let mut t = Tracker::new(cfg(10, 64, 64, 1, 0));
        drive(&mut t, |p| vec![p.to_vec()]);
        let s = t.summary(Instant::now(), 0, false);
        let text = serde_json::to_string(&s).unwrap_or_default();
        let back: ProbeSummary = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(back, s);
        assert!(s.rtt_p50_us.is_some() && s.rtt_p99_us.is_some());
    }
}
