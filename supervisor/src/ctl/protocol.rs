//! Requests and answers on the control socket: one JSON object per line. A request that
//! needs an fd back (the link region, for a capture) gets it with SCM_RIGHTS on the answer.

use serde::{Deserialize, Serialize};

use super::status::StatusReport;

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Per-server status.
    Status,
    /// The link region (sent as an fd), for `keepnet capture`.
    Link,
    /// Stop everything and exit.
    Down,
    /// The memory wire's region (sent as an fd), for the instance on its other side.
    Wire,
    /// An application attaches (see `keepnet_server::app`): the answer carries its region
    /// and the server's doorbell eventfd, and the connection stays open until it exits.
    Attach { protocol: u8 },
    /// Fault injection (`keepnet kill`): send `signal` to server `server`, or with
    /// `scribble`, order it to write garbage on its rings and abort. The supervisor records
    /// the instant, the start of the outage it measures.
    Kill {
        server: String,
        signal: i32,
        #[serde(default)]
        scribble: bool,
    },
}

/// An answer from the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Answer {
    Status(StatusReport),
    /// Success; any fd comes with this message.
    Ok {
        message: String,
    },
    Error {
        message: String,
    },
    /// An application attached: two fds come with this message (its region, the server's
    /// doorbell eventfd).
    Attached(keepnet_server::app::Attached),
}

/// What the daemon remembers on disk, so that `down` and a restarted supervisor find it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub instance: String,
    pub supervisor_pid: u32,
    pub netns: Option<String>,
    /// True if `up` created the namespace (so `down` removes it).
    pub created_netns: bool,
    pub tap: String,
    pub servers: Vec<(String, u32)>,
}
