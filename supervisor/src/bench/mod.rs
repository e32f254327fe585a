//! `keepnet bench TARGET`: benchmarks, each beside its baselines in the same run.

pub mod affinity;
pub mod child;
pub mod fds;
pub mod interrupt;
pub mod ipc;
pub mod ping;
pub mod probe;
pub mod recovery;
#[cfg(feature = "smoltcp-bench")]
pub mod smol;
pub mod stats;
pub mod tcp;
pub mod tcp_probe;
pub mod tcp_server;
pub mod udp;
pub mod udp_echo;
pub mod update;
pub mod veth;

use crate::cli::{BenchArgs, BenchTarget};
use crate::error::Result;

/// Runs the benchmark named on the command line.
pub fn run(args: BenchArgs) -> Result<()> {
    match args.target {
        BenchTarget::Ipc(a) => ipc::run(&a),
        BenchTarget::Ping(a) => ping::run(a.json, a.count),
        BenchTarget::Udp(a) => udp::run(a),
        BenchTarget::Tcp(a) => tcp::run(a),
        BenchTarget::Recovery(a) => recovery::run(a),
        BenchTarget::Update(a) => update::run(a),
    }
}
