//! `keepnet bench ping`: ICMP echo round trip from the Linux kernel to keepnet over TAP,
//! beside the round trip between two Linux network namespaces over a veth pair, in the same
//! run (interleaved rounds), as percentiles and ratios.

use std::process::Command;

use serde::Serialize;

use super::stats::percentile;
use super::veth::{Veth, VETH_B};
use crate::ctl::instance::Instance;
use crate::error::{Error, Result};

/// Figures for one target.
#[derive(Debug, Serialize, Clone)]
pub struct PingFigures {
    pub sent: usize,
    pub received: usize,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    pub rtt_mean_us: f64,
}

/// The whole result (`--json` prints it).
#[derive(Debug, Serialize)]
pub struct PingReport {
    pub keepnet: PingFigures,
    pub linux_veth: PingFigures,
    pub p50_ratio: f64,
    pub p99_ratio: f64,
}

/// Runs `count` pings at `interval` seconds from namespace `ns` to `dst`; returns the
/// per-reply round trips in µs and how many were sent.
fn ping(ns: &str, dst: &str, count: usize, interval: &str) -> Result<(usize, Vec<f64>)> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-W", "1", "-i", interval, "-c",
        ])
        .arg(count.to_string())
        .arg(dst)
        .output()
        .map_err(|e| Error::Peer(format!("run ping (package iputils-ping): {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    Ok((count, rtts))
}

fn figures(sent: usize, mut rtts: Vec<f64>) -> PingFigures {
    rtts.sort_by(f64::total_cmp);
    let ns: Vec<u64> = rtts.iter().map(|us| (us * 1000.0) as u64).collect();
    let p = |q| percentile(&ns, q).map_or(f64::NAN, |v| v as f64 / 1000.0);
    PingFigures {
        sent,
        received: rtts.len(),
        rtt_p50_us: p(50.0),
        rtt_p99_us: p(99.0),
        rtt_mean_us: if rtts.is_empty() {
            f64::NAN
        } else {
            rtts.iter().sum::<f64>() / rtts.len() as f64
        },
    }
}

/// Runs the benchmark: `total` pings to each target, 1 ms apart, in interleaved rounds.
pub fn run(json: bool, total: usize) -> Result<()> {
    let inst = Instance::up("bench-ping").map_err(|e| Error::Peer(e.to_string()))?;
    let veth = Veth::new("bv")?;
    let target = inst.config.ip.addr.addr.to_string();
    let rounds = 4;
    let per = (total / rounds).max(1);
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    let (mut k_sent, mut v_sent) = (0, 0);
    // Warm up ARP on both paths.
    ping(&inst.netns, &target, 3, "0.01")?;
    ping(&veth.a, VETH_B, 3, "0.01")?;
    for r in 0..rounds {
        eprintln!(
            "bench ping: round {}/{rounds} ({per} pings each to keepnet and to the veth peer)",
            r + 1
        );
        let (s, k) = ping(&inst.netns, &target, per, "0.001")?;
        k_sent += s;
        k_all.extend(k);
        let (s, v) = ping(&veth.a, VETH_B, per, "0.001")?;
        v_sent += s;
        v_all.extend(v);
    }
    drop(veth);
    inst.down().map_err(|e| Error::Peer(e.to_string()))?;
    let keepnet = figures(k_sent, k_all);
    let linux_veth = figures(v_sent, v_all);
    let report = PingReport {
        p50_ratio: keepnet.rtt_p50_us / linux_veth.rtt_p50_us,
        p99_ratio: keepnet.rtt_p99_us / linux_veth.rtt_p99_us,
        keepnet,
        linux_veth,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "ICMP echo round trip, {total} pings at 1 ms each, interleaved in {rounds} rounds"
        );
        println!(
            "{:<28} {:>6} {:>8} {:>10} {:>10} {:>10}",
            "target", "sent", "replies", "p50 µs", "p99 µs", "mean µs"
        );
        for (name, f) in [
            ("keepnet (kernel -> TAP)", &report.keepnet),
            ("Linux peer over veth", &report.linux_veth),
        ] {
            println!(
                "{:<28} {:>6} {:>8} {:>10.1} {:>10.1} {:>10.1}",
                name, f.sent, f.received, f.rtt_p50_us, f.rtt_p99_us, f.rtt_mean_us
            );
        }
        println!(
            "ratio keepnet / veth: p50 {:.2}x, p99 {:.2}x",
            report.p50_ratio, report.p99_ratio
        );
    }
    Ok(())
}
