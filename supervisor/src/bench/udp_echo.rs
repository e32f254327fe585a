//! `keepnet __udp-echo-server`: a Linux UDP echo server on a std `UdpSocket`, the baseline
//! of `keepnet bench udp` (run inside a namespace with `ip netns exec`). It sends every
//! datagram back to where it came from, for a bounded number of seconds, then exits.

use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::probe::{is_transient, size_buffers, MAX_SECONDS, SOCKET_BUFFER};
use crate::error::{Context, Error, Result};

/// The line the server prints on stdout once its socket is bound (then the address).
pub const READY: &str = "udp-echo-server: listening on";

/// Arguments of the hidden `__udp-echo-server` subcommand.
#[derive(Clone, Debug, clap::Args)]
pub struct EchoServerArgs {
    /// Address and port to serve.
    #[arg(long, value_name = "ADDR:PORT")]
    pub bind: SocketAddr,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    pub seconds: f64,
}

/// Serves until the time is up; prints [`READY`] and the bound address on stdout first, and
/// a count of what it echoed on stderr at the end.
pub fn run(args: EchoServerArgs) -> Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= MAX_SECONDS) {
        return Err(Error::Unsupported(format!(
            "udp echo server: --seconds must be in (0, {MAX_SECONDS}]"
        )));
    }
    let sock = UdpSocket::bind(args.bind)
        .with_context(|| format!("bind a UDP socket to {}", args.bind))?;
    size_buffers(&sock, SOCKET_BUFFER)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .context("set the receive timeout")?;
    let local = sock.local_addr().context("read the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{READY} {local}");
        let _ = out.flush();
    }
    let deadline = Instant::now() + Duration::from_secs_f64(args.seconds);
    let mut buf = vec![0u8; 65_536];
    let (mut echoed, mut failed) = (0u64, 0u64);
    while Instant::now() < deadline {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => match sock.send_to(buf.get(..n).unwrap_or(&[]), from) {
                Ok(_) => echoed += 1,
                Err(e) if is_transient(&e) => failed += 1,
                Err(e) => return Err(e).with_context(|| format!("send to {from}")),
            },
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) if is_transient(&e) => failed += 1,
            Err(e) => return Err(e).with_context(|| format!("receive on {local}")),
        }
    }
    eprintln!("udp-echo-server {local}: {echoed} datagrams echoed, {failed} transient errors");
    Ok(())
}
