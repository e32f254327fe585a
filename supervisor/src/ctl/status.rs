//! What `keepnet status` shows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole report (`keepnet status --json` prints exactly this).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub instance: String,
    pub supervisor_pid: u32,
    pub netns: Option<String>,
    pub tap: String,
    pub keepnet_addr: String,
    pub kernel_addr: String,
    pub uptime_s: f64,
    pub servers: Vec<ServerStatus>,
    /// Services the supervisor runs.
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    /// Applications attached now.
    #[serde(default)]
    pub apps: Vec<AppStatus>,
}

/// One service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub pid: u32,
    /// `starting` (not yet bound), `running`, `restarting`.
    pub state: String,
    pub restarts: u64,
    pub last_exit: Option<String>,
    pub uptime_s: f64,
}

/// One attached application.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppStatus {
    pub app: u32,
    pub pid: u32,
    pub uid: u32,
    /// Sockets it holds in the udp server's table.
    /// The transport server it is attached to ("udp" or "tcp").
    #[serde(default)]
    pub server: String,
    pub sockets: usize,
}

/// One server.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerStatus {
    pub name: String,
    /// 0 while no instance lives (backoff, failed, stopped).
    pub pid: u32,
    pub core: Option<usize>,
    /// `starting`, `running`, `quiesced`, `backoff` (a crash loop: waiting `next_start_ms`
    /// before the next start), `restarting` (waiting for its turn in a restart of every
    /// server), `failed` (restart limit reached: not restarted; see `detail`), `stopped`
    /// (exited cleanly with `restart = "transient"`).
    pub state: String,
    pub generation: u64,
    pub restarts: u64,
    pub version: String,
    pub uptime_s: f64,
    pub heartbeat: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    /// Drops by reason (`drop.` counters without the prefix).
    pub drops: BTreeMap<String, u64>,
    /// Every other counter.
    pub counters: BTreeMap<String, u64>,
    /// How the last instance ended: "exited with code 1", "killed by signal 9 (SIGKILL)",
    /// "hung: no heartbeat for 212 ms"; null if none has ended.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// Microseconds from the start of the last outage (the exit or hang seen by the
    /// supervisor, or the `keepnet kill` it sent, whichever came first) to the new instance
    /// running; null if it never restarted.
    #[serde(default)]
    pub last_recovery_us: Option<u64>,
    /// State `backoff`: milliseconds until the next start.
    #[serde(default)]
    pub next_start_ms: Option<u64>,
    /// Why the state is what it is, in words, for `backoff`, `failed`, `stopped` and
    /// `restarting` (e.g. "failed: 10 restarts in 60 s, limit reached; not restarting").
    #[serde(default)]
    pub detail: Option<String>,
    /// The heartbeat period the supervisor watches it with (a hang: none for twice this).
    #[serde(default)]
    pub heartbeat_ms: u64,
    /// The snapshot format the running build writes, and the range it reads ("1-2").
    #[serde(default)]
    pub state_format: Option<u32>,
    #[serde(default)]
    pub state_formats_read: Option<String>,
    /// The last live update of this server (`keepnet update`), whatever its result.
    #[serde(default)]
    pub last_update: Option<UpdateReport>,
    /// A live update under way, in words.
    #[serde(default)]
    pub updating: Option<String>,
}

/// A live update of one server: what `keepnet update` prints, and `status` shows of the last.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UpdateReport {
    pub server: String,
    /// `updated` (the new build serves); `rolled back` (the new build refused the state,
    /// did not run in time or died in its grace period: the old build serves again);
    /// `refused` (the old instance never stopped: the check, the standby or the handoff
    /// failed).
    pub result: String,
    /// Why, for `rolled back` and `refused`.
    pub reason: Option<String>,
    /// When the update began (ms since the Unix epoch).
    pub at_unix_ms: u64,
    /// The binary it updated to (or tried to).
    pub binary: String,
    /// The build that served before, and the build serving now.
    pub from_build: String,
    pub build: String,
    /// The snapshot handed over: its format and size (none if no handoff happened).
    pub state_format: Option<u32>,
    pub snapshot_bytes: Option<u64>,
    /// The instance before, and the instance serving now.
    pub from_pid: u32,
    pub pid: u32,
    pub generation: u64,
    /// Microseconds no instance polled the server's rings: from the old instance's last
    /// batch to the first batch of the instance that took over (both timestamps written by
    /// the servers). None when no handoff happened, or when a rollback recovered as after a
    /// crash.
    pub blackout_us: Option<u64>,
    /// The whole update, grace period included.
    pub took_ms: u64,
    pub grace_ms: u64,
}

impl UpdateReport {
    /// One line: "tcp updated: pid 12 -> 34, build 0.1.0 -> 0.1.0, state format 1 (96
    /// bytes), generation 5, blackout 0.41 ms".
    pub fn line(&self) -> String {
        let mut s = format!(
            "{} {}: pid {} -> {}, build {} -> {}",
            self.server, self.result, self.from_pid, self.pid, self.from_build, self.build
        );
        if let (Some(f), Some(n)) = (self.state_format, self.snapshot_bytes) {
            s.push_str(&format!(", state format {f} ({n} bytes)"));
        }
        s.push_str(&format!(", generation {}", self.generation));
        match self.blackout_us {
            Some(us) => s.push_str(&format!(", blackout {:.3} ms", us as f64 / 1000.0)),
            None if self.result != "refused" => s.push_str(", blackout not measured"),
            None => {}
        }
        s.push_str(&format!(" (took {} ms)", self.took_ms));
        if let Some(r) = &self.reason {
            s.push_str(&format!(": {r}"));
        }
        s
    }
}

impl StatusReport {
    /// The human table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "instance {}  supervisor pid {}  netns {}  up {:.1}s\nlink {}: keepnet {}  kernel {}\n\n",
            self.instance,
            self.supervisor_pid,
            self.netns.as_deref().unwrap_or("(host)"),
            self.uptime_s,
            self.tap,
            self.keepnet_addr,
            self.kernel_addr
        );
        s.push_str(&format!(
            "{:<7} {:>7} {:>4} {:<9} {:>4} {:>8} {:<8} {:>9} {:>10} {:>10} {:>7}\n",
            "server",
            "pid",
            "core",
            "state",
            "gen",
            "restarts",
            "version",
            "uptime",
            "pkts in",
            "pkts out",
            "drops"
        ));
        for v in &self.servers {
            s.push_str(&format!(
                "{:<7} {:>7} {:>4} {:<9} {:>4} {:>8} {:<8} {:>8.1}s {:>10} {:>10} {:>7}\n",
                v.name,
                v.pid,
                v.core.map_or("-".to_string(), |c| c.to_string()),
                v.state,
                v.generation,
                v.restarts,
                v.version,
                v.uptime_s,
                v.packets_in,
                v.packets_out,
                v.drops.values().sum::<u64>()
            ));
        }
        let mut first = true;
        for v in &self.servers {
            let formats = v
                .state_formats_read
                .as_deref()
                .map(|r| format!(", state format {} (reads {r})", v.state_format.unwrap_or(0)))
                .unwrap_or_default();
            if v.last_update.is_none() && v.updating.is_none() {
                continue;
            }
            if std::mem::take(&mut first) {
                s.push('\n');
            }
            s.push_str(&format!("{}: build {}{formats}\n", v.name, v.version));
            if let Some(u) = &v.updating {
                s.push_str(&format!("  {u}\n"));
            }
            if let Some(u) = &v.last_update {
                s.push_str(&format!("  last update: {}\n", u.line()));
            }
        }
        let mut first = true;
        for v in &self.servers {
            if v.restarts == 0 && v.detail.is_none() && v.last_exit.is_none() {
                continue;
            }
            if std::mem::take(&mut first) {
                s.push('\n');
            }
            let mut line = format!("{}: restarts {}", v.name, v.restarts);
            if let Some(e) = &v.last_exit {
                line.push_str(&format!(", last exit: {e}"));
            }
            if let Some(us) = v.last_recovery_us {
                line.push_str(&format!(
                    ", serving again after {:.2} ms",
                    us as f64 / 1000.0
                ));
            }
            if let Some(d) = &v.detail {
                line.push_str(&format!("\n  {d}"));
            }
            s.push_str(&line);
            s.push('\n');
        }
        if !self.services.is_empty() {
            s.push_str(&format!(
                "\n{:<16} {:>7} {:<10} {:>8} {:>9}  last exit\n",
                "service", "pid", "state", "restarts", "uptime"
            ));
            for v in &self.services {
                s.push_str(&format!(
                    "{:<16} {:>7} {:<10} {:>8} {:>8.1}s  {}\n",
                    v.name,
                    v.pid,
                    v.state,
                    v.restarts,
                    v.uptime_s,
                    v.last_exit.as_deref().unwrap_or("-")
                ));
            }
        }
        if !self.apps.is_empty() {
            s.push_str(&format!("\napplications attached: {}\n", self.apps.len()));
            for a in &self.apps {
                s.push_str(&format!(
                    "  {:<3} app {:>4}  pid {:>7}  uid {:>5}  sockets {}\n",
                    a.server, a.app, a.pid, a.uid, a.sockets
                ));
            }
        }
        for v in &self.servers {
            let nonzero: Vec<String> = v
                .drops
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            if !nonzero.is_empty() {
                s.push_str(&format!("{} drops: {}\n", v.name, nonzero.join(" ")));
            }
        }
        s
    }
}
