//! The control channel between the benchmark and its peer: one JSON object per line on a
//! Unix socket pair, peer to parent only. It carries no measured traffic.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::link::Phase;
use crate::error::{Context, Error, Result};

/// Longest control line accepted from the peer.
const MAX_LINE: u64 = 64 * 1024;

/// What the peer reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum CtlMsg {
    /// The peer is set up and about to wait for the phase's first message.
    Ready { phase: Phase },
    /// The peer saw the phase's end marker.
    Done {
        phase: Phase,
        /// Messages received (one-way) or echoed (rtt), end marker excluded.
        received: u64,
        /// Messages whose sequence number was not the expected one.
        errors: u64,
        /// CLOCK_MONOTONIC when the end marker arrived.
        end_ns: u64,
    },
    /// The peer failed and is exiting.
    Failed { error: String },
}

/// Parent side.
#[derive(Debug)]
pub struct CtlReader {
    r: BufReader<UnixStream>,
    line: String,
}

impl CtlReader {
    pub fn new(s: UnixStream) -> Self {
        CtlReader {
            r: BufReader::new(s),
            line: String::new(),
        }
    }

    /// Waits at most `timeout` for the next message.
    pub fn recv(&mut self, timeout: Duration) -> Result<CtlMsg> {
        self.r
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .context("setting the control channel's timeout")?;
        self.line.clear();
        let n = match (&mut self.r).take(MAX_LINE).read_line(&mut self.line) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::Timeout(format!(
                    "no word from the peer in {timeout:?}"
                )))
            }
            Err(e) => return Err(e).context("reading the control channel"),
        };
        if n == 0 {
            return Err(Error::Peer(
                "the peer closed its control channel (it exited or was killed)".into(),
            ));
        }
        let msg: CtlMsg = serde_json::from_str(self.line.trim_end())
            .with_context(|| format!("bad control message from the peer: {:?}", self.line))?;
        if let CtlMsg::Failed { error } = msg {
            return Err(Error::Peer(format!("the peer failed: {error}")));
        }
        Ok(msg)
    }
}

/// Peer side.
#[derive(Debug)]
pub struct CtlWriter {
    w: UnixStream,
}

impl CtlWriter {
    pub fn new(s: UnixStream) -> Self {
        CtlWriter { w: s }
    }

    pub fn send(&mut self, msg: &CtlMsg) -> Result<()> {
        let mut line = serde_json::to_string(msg).context("encoding a control message")?;
        line.push('\n');
        self.w
            .write_all(line.as_bytes())
            .context("writing the control channel")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_cross_the_channel() -> Result<()> {
        let (a, b) = UnixStream::pair().context("socketpair")?;
        let mut w = CtlWriter::new(a);
        let mut r = CtlReader::new(b);
        let done = CtlMsg::Done {
            phase: Phase::Batched,
            received: 3,
            errors: 0,
            end_ns: 9,
        };
        w.send(&CtlMsg::Ready { phase: Phase::Rtt })?;
        w.send(&done)?;
        assert_eq!(
            r.recv(Duration::from_secs(5))?,
            CtlMsg::Ready { phase: Phase::Rtt }
        );
        assert_eq!(r.recv(Duration::from_secs(5))?, done);
        w.send(&CtlMsg::Failed { error: "x".into() })?;
        assert!(matches!(
            r.recv(Duration::from_secs(5)),
            Err(Error::Peer(_))
        ));
        assert!(matches!(
            r.recv(Duration::from_millis(10)),
            Err(Error::Timeout(_))
        ));
        drop(w);
        assert!(matches!(
            r.recv(Duration::from_secs(5)),
            Err(Error::Peer(_))
        ));
        Ok(())
    }
}
