//! `keepnet-service`: the demo services, applications on the sockets library like any
//! user's program. The supervisor runs them from the config (`[[services]]`) and restarts
//! them when they exit.
//!
//! * `udp-echo [--port 7]`: RFC 862 echo: every datagram goes back to its sender unchanged.
//! * `udp-discard [--port 9]`: RFC 863 discard: datagrams are counted and thrown away.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use keepnet_sockets::UdpSocket;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "keepnet-service",
    version,
    about = "keepnet's demo services (run by `keepnet up` from [[services]] in the config)",
    long_about = "keepnet's demo services. Each attaches to the keepnet instance named by \
                  KEEPNET_INSTANCE (default \"default\") through its control socket, like any \
                  application on the sockets library."
)]
struct Cli {
    #[command(subcommand)]
    service: Service,
}

#[derive(Subcommand)]
enum Service {
    /// RFC 862 echo over UDP: sends every datagram back to its sender.
    UdpEcho {
        /// Port to bind.
        #[arg(long, default_value_t = 7)]
        port: u16,
    },
    /// RFC 863 discard over UDP: counts datagrams and drops them.
    UdpDiscard {
        /// Port to bind.
        #[arg(long, default_value_t = 9)]
        port: u16,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEPNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.service {
        Service::UdpEcho { port } => udp_echo(port),
        Service::UdpDiscard { port } => udp_discard(port),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(%e, "service failed");
            eprintln!("keepnet-service: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs a progress line at most every 10 s.
struct Progress {
    what: &'static str,
    last: Instant,
    datagrams: u64,
    bytes: u64,
}

impl Progress {
    fn new(what: &'static str) -> Progress {
        Progress {
            what,
            last: Instant::now(),
            datagrams: 0,
            bytes: 0,
        }
    }
    fn add(&mut self, n: usize) {
        self.datagrams += 1;
        self.bytes += n as u64;
        if self.last.elapsed() >= Duration::from_secs(10) {
            self.last = Instant::now();
            info!(
                datagrams = self.datagrams,
                bytes = self.bytes,
                "{}: totals so far",
                self.what
            );
        }
    }
}

fn udp_echo(port: u16) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    info!(addr = %sock.local_addr()?, "udp echo serving");
    let mut buf = vec![0u8; 65536];
    let mut p = Progress::new("udp echo");
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            // A pending error from an ICMP message is not ours to stop on.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        };
        p.add(n);
        if let Err(e) = sock.send_to(&buf[..n], from) {
            // One peer's trouble must not stop the service.
            tracing::warn!(%from, %e, "echo reply not sent");
        }
    }
}

fn udp_discard(port: u16) -> std::io::Result<()> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    info!(addr = %sock.local_addr()?, "udp discard serving");
    let mut buf = vec![0u8; 65536];
    let mut p = Progress::new("udp discard");
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => p.add(n),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e),
        }
    }
}
