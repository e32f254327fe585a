//! Requests and answers on the control socket: one JSON object per line. A request that
//! needs an fd back (the link region, for a capture) gets it with SCM_RIGHTS on the answer.
//!
//! An `attach` connection stays open after its answer, and the supervisor may write more
//! lines on it: notifications ([`keepnet_server::app::AppNotice`]),
//! `{"event":"server_failed","server":"tcp","detail":"..."}` when the application's transport
//! server is down for good (its restart limit reached) and `{"event":"server_back",...}` when
//! it serves again. The application writes nothing more; its EOF detaches it.

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
    /// Notifications may follow on the same connection (module docs).
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
    /// Live update of `server` to `binary` (default: the binary it was started from), see
    /// `daemon::update`. Answered with `updated` when it ends, or an error at once.
    Update {
        server: String,
        #[serde(default)]
        binary: Option<String>,
        #[serde(default)]
        grace_ms: Option<u64>,
        #[serde(default)]
        skip_check: bool,
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
    /// A live update ended (updated, rolled back, or refused after it began).
    Updated {
        update: super::status::UpdateReport,
    },
}

/// What the daemon remembers on disk, so that `down` and a restarted supervisor find it.
/// Written (atomically: a temporary file renamed over it) at every change that matters: the
/// start, each server (re)start and failure, each application attach and detach, each
/// service (re)start. A supervisor that finds it with its `supervisor_pid` gone and its
/// servers alive re-adopts them (see `daemon::adopt`). Fields after `servers` came with
/// re-adoption; a file without them reads with their defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub instance: String,
    pub supervisor_pid: u32,
    pub netns: Option<String>,
    /// True if `up` created the namespace (so `down` removes it).
    pub created_netns: bool,
    pub tap: String,
    /// (name, pid) per server; pid 0 while none runs.
    pub servers: Vec<(String, u32)>,
    /// Start time of the supervisor (field 22 of /proc/PID/stat): a live process with its
    /// pid and another start time is not it.
    #[serde(default)]
    pub supervisor_start: u64,
    /// When the constellation first came up (ms since the Unix epoch; kept across
    /// re-adoptions: status shows the constellation's uptime).
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Per server: its process and what the restart policy needs to carry on.
    #[serde(default)]
    pub procs: Vec<ServerRecord>,
    /// Attached applications.
    #[serde(default)]
    pub apps: Vec<AppRecord>,
    /// Services.
    #[serde(default)]
    pub services: Vec<ServiceRecord>,
    /// The next application id per transport server ("udp", "tcp"): a re-adopting
    /// supervisor never hands out an id a live application holds.
    #[serde(default)]
    pub next_app: Vec<(String, u32)>,
}

/// One server in the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerRecord {
    pub name: String,
    /// 0 while no instance runs (backoff, failed, stopped).
    pub pid: u32,
    /// Field 22 of /proc/PID/stat at its start.
    #[serde(default)]
    pub start: u64,
    /// The binary it was started as.
    #[serde(default)]
    pub binary: String,
    /// What /proc/PID/exe said once it ran (the binary, or what a wrapper script exec'd);
    /// a re-adopting supervisor takes a process for this server only if it runs this.
    #[serde(default)]
    pub exe: String,
    #[serde(default)]
    pub restarts: u64,
    #[serde(default)]
    pub last_exit: Option<String>,
    #[serde(default)]
    pub last_recovery_us: Option<u64>,
    /// "starting", "up", "backoff", "restarting", "failed", "stopped".
    #[serde(default)]
    pub phase: String,
    /// Why it failed or stopped (status `detail`).
    #[serde(default)]
    pub detail: Option<String>,
    /// Consecutive failed starts (the backoff exponent).
    #[serde(default)]
    pub failed_starts: u32,
    /// The restarts within the intensity window, ms since the Unix epoch.
    #[serde(default)]
    pub restart_times_unix_ms: Vec<u64>,
    /// Its last live update.
    #[serde(default)]
    pub last_update: Option<super::status::UpdateReport>,
    /// A live update under way when the file was written: the pids of the successor and of
    /// the rollback standby. A re-adopting supervisor adopts whichever of them (or the old
    /// instance) serves, and ends the others.
    #[serde(default)]
    pub update_pids: Vec<u32>,
    /// The binary that update was to.
    #[serde(default)]
    pub update_binary: Option<String>,
}

/// One attached application in the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppRecord {
    pub app: u32,
    pub pid: u32,
    /// Field 22 of /proc/PID/stat (0: unknown).
    #[serde(default)]
    pub start: u64,
    pub uid: u32,
    /// 17 udp, 6 tcp.
    pub protocol: u8,
    /// The name of its region's memfd (`keepnet-INSTANCE-tcp-app3`), as /proc/PID/fd shows
    /// it in its transport server and in the application.
    pub region: String,
}

/// One service in the state file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceRecord {
    pub name: String,
    /// 0 while it is not running.
    pub pid: u32,
    #[serde(default)]
    pub start: u64,
    #[serde(default)]
    pub restarts: u64,
    #[serde(default)]
    pub last_exit: Option<String>,
}

impl StateFile {
    /// True if the supervisor that wrote this file runs: its pid is alive (not a zombie)
    /// with the start time recorded (where one is).
    pub fn supervisor_alive(&self) -> bool {
        super::procs::alive_as(self.supervisor_pid, self.supervisor_start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_of_the_old_format_reads_with_defaults() {
        let old = r#"{"instance":"x","supervisor_pid":12,"netns":null,"created_netns":false,
            "tap":"kn0","servers":[["driver",13],["ip",14]]}"#;
        let st: StateFile = serde_json::from_str(old).expect("old state file");
        assert_eq!(st.servers, vec![("driver".into(), 13), ("ip".into(), 14)]);
        assert!(st.procs.is_empty() && st.apps.is_empty() && st.services.is_empty());
        assert_eq!(st.supervisor_start, 0);
        let again: StateFile =
            serde_json::from_str(&serde_json::to_string(&st).expect("json")).expect("reads");
        assert_eq!(again.servers, st.servers);
    }
}
