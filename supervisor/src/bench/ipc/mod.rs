//! `keepnet bench ipc`: keepnet's shared-memory ring against the kernel's IPC (pipe, Unix
//! socket pair, eventfd) and against a bare shared cache line, across two processes, in two
//! placements. See [`run`].

pub mod control;
pub mod link;
pub mod peer;
mod phases;
pub mod report;
pub mod transports;

use std::io::Write;
use std::time::{Duration, Instant};

use crate::bench::affinity;
use crate::cli::IpcArgs;
use crate::error::{Context, Error, Result};
use report::Report;
use transports::ParentCtx;

/// How the two messages travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Transport {
    /// keepnet-ipc rings, doorbells for parking.
    Ring,
    Pipe,
    /// A Unix stream socket pair.
    Uds,
    Eventfd,
    /// Atomics in a shared region, pure spinning.
    Bare,
}

impl Transport {
    pub const ALL: [Transport; 5] = [
        Transport::Ring,
        Transport::Pipe,
        Transport::Uds,
        Transport::Eventfd,
        Transport::Bare,
    ];

    /// The ring is measured right after the pipe and right before bare, so that its ratios
    /// to both are taken under like conditions on a noisy machine.
    pub const MEASURE_ORDER: [Transport; 5] = [
        Transport::Pipe,
        Transport::Ring,
        Transport::Bare,
        Transport::Uds,
        Transport::Eventfd,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Ring => "ring",
            Transport::Pipe => "pipe",
            Transport::Uds => "uds",
            Transport::Eventfd => "eventfd",
            Transport::Bare => "bare",
        }
    }
}

/// Where the two processes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Placement {
    /// Parent and peer on two different CPUs.
    Pinned,
    /// Both on one CPU.
    SharedCore,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Pinned => "pinned",
            Placement::SharedCore => "shared_core",
        }
    }
}

/// Counts and time limits of one measurement. Every loop stops at whichever comes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Round trips before timing starts (also stopped after `rtt_time / 4`).
    pub rtt_warmup: usize,
    /// Most timed round trips.
    pub rtt_max: usize,
    /// Longest timed ping-pong.
    pub rtt_time: Duration,
    /// Most messages per one-way stream.
    pub stream_max: u64,
    /// Longest one-way stream.
    pub stream_time: Duration,
}

impl Plan {
    pub fn new(transport: Transport, placement: Placement, quick: bool) -> Plan {
        let full = if transport == Transport::Bare && placement == Placement::SharedCore {
            // Every wait burns a whole time slice (~8 ms a round trip): few, time-bounded.
            Plan {
                rtt_warmup: 5,
                rtt_max: 200,
                rtt_time: Duration::from_secs(2),
                stream_max: 8_000_000,
                stream_time: Duration::from_millis(500),
            }
        } else {
            Plan {
                rtt_warmup: 2_000,
                rtt_max: 20_000,
                rtt_time: Duration::from_secs(1),
                stream_max: 8_000_000,
                stream_time: Duration::from_millis(500),
            }
        };
        if quick {
            Plan {
                rtt_warmup: (full.rtt_warmup / 20).max(1),
                rtt_max: (full.rtt_max / 20).max(10),
                rtt_time: full.rtt_time / 10,
                stream_max: full.stream_max / 20,
                stream_time: full.stream_time / 10,
            }
        } else {
            full
        }
    }
}

/// Runs every (placement, transport) measurement, one peer process each, and prints the
/// table (or the JSON object) on stdout; progress goes to stderr.
pub fn run(args: &IpcArgs) -> Result<()> {
    let cpus = affinity::allowed_cpus()?;
    let (a, b) = match cpus.as_slice() {
        [a, b, ..] => (*a, *b),
        _ => {
            return Err(Error::Unsupported(format!(
                "keepnet bench ipc needs two CPUs (pinned placement), this process may use {cpus:?}"
            )))
        }
    };
    let placements = [(Placement::Pinned, a, b), (Placement::SharedCore, a, a)];
    let saved = affinity::current_mask()?;
    let result = measure_all(&placements, args.quick);
    if let Err(e) = affinity::restore_mask(&saved) {
        tracing::warn!("{}", crate::error::chain(&e));
    }
    let report = result?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let text = serde_json::to_string(&report).context("encoding the report")?;
        writeln!(out, "{text}").context("writing the report")?;
    } else {
        write!(out, "{}", report::table(&report, &placements)).context("writing the report")?;
    }
    out.flush().context("writing the report")
}

fn measure_all(placements: &[(Placement, usize, usize)], quick: bool) -> Result<Report> {
    let total = placements.len() * Transport::ALL.len();
    let mode = if quick { " (quick)" } else { "" };
    eprintln!(
        "keepnet bench ipc{mode}: {total} measurements, one peer process each; {}",
        if quick {
            "a few seconds"
        } else {
            "about half a minute"
        }
    );
    let started = Instant::now();
    let mut report = Report::default();
    let mut i = 0;
    for &(placement, parent_cpu, peer_cpu) in placements {
        for transport in Transport::MEASURE_ORDER {
            i += 1;
            let ctx = ParentCtx {
                transport,
                placement,
                peer_cpu,
                plan: Plan::new(transport, placement, quick),
            };
            let label = format!("{} {}", placement.name(), transport.name());
            let t = Instant::now();
            affinity::pin_to(parent_cpu)
                .and_then(|()| transports::run_parent(&ctx))
                .map(|f| *report.get_mut(placement).get_mut(transport) = f)
                .with_context(|| format!("measuring {label}"))?;
            let f = report.get(placement).get(transport);
            eprintln!(
                "  [{i:>2}/{total}] {label:<20} {}  ({:.1} s)",
                f.summary(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "keepnet bench ipc: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_is_measured_once() {
        let mut a = Transport::MEASURE_ORDER.map(Transport::name);
        let mut b = Transport::ALL.map(Transport::name);
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    #[test]
    fn quick_plans_are_about_twenty_times_smaller() {
        for t in Transport::ALL {
            for p in [Placement::Pinned, Placement::SharedCore] {
                let (full, quick) = (Plan::new(t, p, false), Plan::new(t, p, true));
                assert!(quick.rtt_max * 10 <= full.rtt_max);
                assert!(quick.stream_max * 20 <= full.stream_max);
                assert!(quick.rtt_warmup >= 1 && quick.rtt_max >= 1);
                assert!(quick.stream_time < full.stream_time);
            }
        }
    }

    #[test]
    fn shared_core_bare_is_bounded_tightly() {
        let p = Plan::new(Transport::Bare, Placement::SharedCore, false);
        assert!(p.rtt_max <= 200 && p.rtt_time <= Duration::from_secs(2));
    }
}
