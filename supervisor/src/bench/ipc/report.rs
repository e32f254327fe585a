//! Results: the JSON shape (a contract, see DESIGN.md) and the human table.

use std::fmt::Write as _;

use serde::Serialize;

use super::{Placement, Transport};

/// The four figures of one transport in one placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Figures {
    /// Median round trip of a 64-byte message, ns.
    pub rtt_p50_ns: u64,
    /// 99th percentile round trip, ns.
    pub rtt_p99_ns: u64,
    /// One-way messages per second, 32 per operation.
    pub oneway_batched_per_s: f64,
    /// One-way messages per second, one per operation.
    pub oneway_unbatched_per_s: f64,
}

impl Figures {
    /// One line for progress output.
    pub fn summary(&self) -> String {
        format!(
            "rtt p50 {}, p99 {}; one-way {} batched, {} unbatched",
            fmt_value(self.rtt_p50_ns as f64, Kind::Nanos),
            fmt_value(self.rtt_p99_ns as f64, Kind::Nanos),
            fmt_value(self.oneway_batched_per_s, Kind::Rate),
            fmt_value(self.oneway_unbatched_per_s, Kind::Rate),
        )
    }
}

/// Every transport in one placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct PlacementFigures {
    pub ring: Figures,
    pub pipe: Figures,
    pub uds: Figures,
    pub eventfd: Figures,
    pub bare: Figures,
}

impl PlacementFigures {
    pub fn get(&self, t: Transport) -> &Figures {
        match t {
            Transport::Ring => &self.ring,
            Transport::Pipe => &self.pipe,
            Transport::Uds => &self.uds,
            Transport::Eventfd => &self.eventfd,
            Transport::Bare => &self.bare,
        }
    }

    pub fn get_mut(&mut self, t: Transport) -> &mut Figures {
        match t {
            Transport::Ring => &mut self.ring,
            Transport::Pipe => &mut self.pipe,
            Transport::Uds => &mut self.uds,
            Transport::Eventfd => &mut self.eventfd,
            Transport::Bare => &mut self.bare,
        }
    }
}

/// The whole result of `keepnet bench ipc`; `--json` prints exactly this.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    pub pinned: PlacementFigures,
    pub shared_core: PlacementFigures,
}

impl Report {
    pub fn get(&self, p: Placement) -> &PlacementFigures {
        match p {
            Placement::Pinned => &self.pinned,
            Placement::SharedCore => &self.shared_core,
        }
    }

    pub fn get_mut(&mut self, p: Placement) -> &mut PlacementFigures {
        match p {
            Placement::Pinned => &mut self.pinned,
            Placement::SharedCore => &mut self.shared_core,
        }
    }
}

/// Which way is better, for the legend and the ratios.
#[derive(Clone, Copy)]
enum Kind {
    Nanos,
    Rate,
}

const COLUMNS: [(&str, Kind); 4] = [
    ("rtt p50", Kind::Nanos),
    ("rtt p99", Kind::Nanos),
    ("one-way batched", Kind::Rate),
    ("one-way unbatched", Kind::Rate),
];

fn values(f: &Figures) -> [f64; 4] {
    [
        f.rtt_p50_ns as f64,
        f.rtt_p99_ns as f64,
        f.oneway_batched_per_s,
        f.oneway_unbatched_per_s,
    ]
}

fn fmt_value(v: f64, kind: Kind) -> String {
    match kind {
        Kind::Nanos if v >= 1e6 => format!("{:.2} ms", v / 1e6),
        Kind::Nanos if v >= 1e4 => format!("{:.1} µs", v / 1e3),
        Kind::Nanos if v >= 1e3 => format!("{:.2} µs", v / 1e3),
        Kind::Nanos => format!("{v:.0} ns"),
        Kind::Rate if v >= 1e6 => format!("{:.1} M/s", v / 1e6),
        Kind::Rate if v >= 1e3 => format!("{:.1} k/s", v / 1e3),
        Kind::Rate => format!("{v:.0} /s"),
    }
}

fn fmt_ratio(v: f64, base: f64) -> String {
    if base.is_nan() || base <= 0.0 || !v.is_finite() {
        return "-".into();
    }
    let r = v / base;
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else {
        format!("{r:.2}x")
    }
}

/// The table: per placement, one row per transport; each figure with its ratio to the
/// pipe's and to bare's.
pub fn table(report: &Report, cpus: &[(Placement, usize, usize)]) -> String {
    let mut s = String::new();
    for &(placement, parent, peer) in cpus {
        let pf = report.get(placement);
        let how = match placement {
            Placement::Pinned => {
                format!("parent on CPU {parent}, peer on CPU {peer}; ring waits spin")
            }
            Placement::SharedCore => {
                format!("parent and peer both on CPU {parent}; ring waits park at once")
            }
        };
        let _ = writeln!(s, "{} ({how})", placement.name());
        let _ = write!(s, "{:<9}", "");
        for (name, _) in COLUMNS {
            let _ = write!(s, " | {name:<27}");
        }
        let _ = writeln!(s);
        let _ = write!(s, "{:<9}", "transport");
        for _ in COLUMNS {
            let _ = write!(s, " | {:>10} {:>7} {:>8}", "value", "x pipe", "x bare");
        }
        let _ = writeln!(s);
        let pipe = values(pf.get(Transport::Pipe));
        let bare = values(pf.get(Transport::Bare));
        for t in Transport::ALL {
            let v = values(pf.get(t));
            let _ = write!(s, "{:<9}", t.name());
            for (i, (_, kind)) in COLUMNS.iter().enumerate() {
                let _ = write!(
                    s,
                    " | {:>10} {:>7} {:>8}",
                    fmt_value(v[i], *kind),
                    fmt_ratio(v[i], pipe[i]),
                    fmt_ratio(v[i], bare[i])
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "x pipe, x bare: the figure divided by the pipe's and by bare's (rtt: lower is better; \
         one-way messages/s: higher is better). 64-byte messages; batched = 32 per operation."
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let f = Figures {
            rtt_p50_ns: 200,
            rtt_p99_ns: 1500,
            oneway_batched_per_s: 5.0e7,
            oneway_unbatched_per_s: 2.0e6,
        };
        let pf = PlacementFigures {
            ring: f,
            pipe: f,
            uds: f,
            eventfd: f,
            bare: f,
        };
        Report {
            pinned: pf,
            shared_core: pf,
        }
    }

    #[test]
    fn json_has_the_documented_shape() -> Result<(), serde_json::Error> {
        let v = serde_json::to_value(sample())?;
        for p in ["pinned", "shared_core"] {
            for t in ["ring", "pipe", "uds", "eventfd", "bare"] {
                for k in [
                    "rtt_p50_ns",
                    "rtt_p99_ns",
                    "oneway_batched_per_s",
                    "oneway_unbatched_per_s",
                ] {
                    assert!(v[p][t][k].is_number(), "{p}.{t}.{k}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn table_shows_values_and_ratios() {
        let t = table(
            &sample(),
            &[(Placement::Pinned, 0, 1), (Placement::SharedCore, 0, 0)],
        );
        assert!(t.contains("pinned (parent on CPU 0, peer on CPU 1"));
        assert!(t.contains("shared_core"));
        assert!(t.contains("200 ns"));
        assert!(t.contains("1.50 µs"));
        assert!(t.contains("50.0 M/s"));
        assert!(t.contains("1.00x"));
        assert_eq!(fmt_ratio(1.0, 0.0), "-");
        assert_eq!(fmt_ratio(250.0, 1.0), "250x");
    }
}
