//! Live update (`keepnet update SERVER [--binary PATH] [--grace MS]`, DESIGN.md "Live
//! update", docs/live-update.md).
//!
//! An update runs inside the serve loop as a small state machine, one at a time, so the
//! supervisor keeps watching every other server meanwhile; the client's connection is
//! answered when it ends.
//!
//! 1. **Check** (before anything starts): the binary exists and is executable, answers
//!    `--version` as `keepnet-SERVER BUILD state-format N reads A-B`, and A..=B holds the
//!    format the running instance writes. A second update while one runs is refused.
//! 2. **Loading**: the new binary starts in standby (regions mapped, nothing claimed), and so
//!    does the running instance's own executable (`/proc/PID/exe`, which outlives a binary
//!    replaced on disk), kept ready for a rollback. The old instance serves meanwhile.
//! 3. **Handing off**: the live applications are queued on the hotplug socket for whoever
//!    takes over, and the old instance is sent `Handoff`: at a batch boundary it writes its
//!    snapshot into the control block's snapshot area (owned by the supervisor), reserves
//!    the successor, releases every ring and hands over to it directly, then exits. The
//!    supervisor is not on that path, so its latency is not in the blackout.
//! 4. **Taking over**: the successor validates and restores the snapshot (or refuses it
//!    whole), claims the rings, bumps the generation and runs. The blackout is its first
//!    poll minus the old one's last (`first_poll_ns - handoff_ns`, both written by the
//!    servers).
//! 5. **Grace**: the successor is watched (exit, heartbeat) for `--grace`. Then the
//!    rollback standby is dismissed and the update is done.
//!
//! Rollback: a successor that refuses the snapshot, is not running in time, or dies within
//! the grace period is replaced by the rollback standby: with the same snapshot when the
//! successor never ran (the shared state is as the snapshot left it), or as after a crash
//! when it did (its recovery reads the shared state the successor left). A rollback that
//! fails too leaves the server to the ordinary restart policy.
//!
//! A supervisor that dies mid-update: standbys not yet reserved withdraw and exit (their
//! parent is gone); a reserved one takes over, as the old instance hands over without the
//! supervisor. Either way exactly one instance holds the rings (ring claims are exclusive,
//! and the old instance releases its claims before it hands over). The state file names the
//! update's processes so that a re-adopting supervisor adopts whichever serves.

use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use keepnet_server::{Command as Cmd, ControlMsg, Handover, ServerState};
use tracing::{error, info, warn};

use super::super::procs::{self, pidfd_exited, pidfd_open, Proc};
use super::super::protocol::Answer;
use super::super::status::UpdateReport;
use super::{describe_exit, send, unix_ms, Daemon, Phase};

/// Longest wait for a new build to be ready in standby.
const STANDBY_LIMIT: Duration = Duration::from_secs(5);
/// Longest wait for the running instance to answer `Handoff`.
const HANDOFF_LIMIT: Duration = Duration::from_secs(3);
/// Longest wait for a successor (or the rollback) to run once told to take over.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(5);
/// Longest wait for `BINARY --version`.
const VERSION_LIMIT: Duration = Duration::from_secs(5);
/// How long a process an update left (a dismissed standby, the old instance) may take to
/// exit before it is killed.
const LEFTOVER_LIMIT: Duration = Duration::from_secs(2);
/// The grace period when `--grace` is not given.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(500);

/// What `keepnet update` asks for.
#[derive(Clone, Debug)]
pub struct UpdateRequest {
    pub server: String,
    pub binary: Option<PathBuf>,
    pub grace: Option<Duration>,
    /// Skip the `--version` check (drills: the new build's own refusal is then what rolls
    /// the update back).
    pub skip_check: bool,
}

/// What a binary says to `--version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub server: String,
    pub build: String,
    /// The format it writes.
    pub writes: u32,
    /// The formats it reads.
    pub reads: (u32, u32),
}

/// Parses `keepnet-NAME BUILD state-format N reads A-B`.
pub fn parse_version(line: &str) -> Result<VersionInfo, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let bad = || {
        format!(
            "its --version said {:?}, not \"keepnet-NAME BUILD state-format N reads A-B\"",
            line.trim()
        )
    };
    match words.as_slice() {
        [name, build, "state-format", n, "reads", range] => {
            let server = name.strip_prefix("keepnet-").ok_or_else(bad)?;
            let writes = n.parse().map_err(|_| bad())?;
            let (a, b) = range.split_once('-').ok_or_else(bad)?;
            let reads = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if reads.0 > reads.1 || writes < reads.0 || writes > reads.1 {
                return Err(bad());
            }
            Ok(VersionInfo {
                server: server.into(),
                build: (*build).into(),
                writes,
                reads,
            })
        }
        _ => Err(bad()),
    }
}

/// Runs `binary --version` (bounded) and parses it.
fn ask_version(binary: &Path) -> Result<VersionInfo, String> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .env_remove("KEEPNET_CONTROL_FD")
        .spawn()
        .map_err(|e| format!("cannot run it: {e}"))?;
    let end = Instant::now() + VERSION_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "its --version did not answer within {VERSION_LIMIT:?}"
                ));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut out);
    }
    if !status.success() {
        return Err(format!("its --version {}", describe_exit(status)));
    }
    parse_version(out.lines().next().unwrap_or(""))
}

/// A process started in standby for an update.
#[derive(Debug)]
struct Standby {
    child: Child,
    pidfd: Option<OwnedFd>,
    start: u64,
}

impl Standby {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once it exited (reaped).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if self.pidfd.as_ref().is_some_and(|fd| !pidfd_exited(fd)) {
            return None;
        }
        self.child.try_wait().ok().flatten()
    }

    /// Kills and reaps it.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
enum Step {
    /// Both standbys loading; the old instance serves.
    Loading { until: Instant },
    /// `Handoff` sent (request `seq`); waiting for the old instance's answer.
    HandingOff { until: Instant, seq: u32 },
    /// The old instance handed over; the successor is taking over.
    TakingOver { until: Instant },
    /// The successor runs; watched until then.
    Grace { until: Instant },
    /// The rollback standby was told `order` because of `why`.
    RollingBack {
        until: Instant,
        why: String,
        order: Handover,
    },
}

/// An update under way (at most one).
#[derive(Debug)]
pub(super) struct Update {
    server: usize,
    client: Option<UnixStream>,
    binary: PathBuf,
    to_build: String,
    grace: Duration,
    began: Instant,
    began_unix_ms: u64,
    from_pid: u32,
    from_build: String,
    /// The successor (the new binary), until it runs as the server.
    new: Option<Standby>,
    new_pid: u32,
    /// The running instance's own build, ready for a rollback.
    fallback: Option<Standby>,
    fallback_pid: u32,
    /// The old instance once it answered the handoff: reaped when it exits.
    old: Option<Proc>,
    old_pidfd: Option<OwnedFd>,
    step: Step,
    snapshot: Option<(u32, u64)>,
    blackout_us: Option<u64>,
    /// The server log's length when the update began: what the update's processes said
    /// comes after it.
    log_from: u64,
}

impl Update {
    /// The update's processes, for the state file: (old, successor, rollback standby).
    pub(super) fn pids(&self) -> (usize, u32, u32, u32) {
        (self.server, self.from_pid, self.new_pid, self.fallback_pid)
    }

    /// The binary it updates to.
    pub(super) fn binary(&self) -> &Path {
        &self.binary
    }

    /// What status shows of it.
    pub(super) fn describe(&self) -> String {
        let step = match &self.step {
            Step::Loading { .. } => "loading the new build in standby",
            Step::HandingOff { .. } => "handing off",
            Step::TakingOver { .. } => "the new build is taking over",
            Step::Grace { .. } => "the new build serves; in its grace period",
            Step::RollingBack { .. } => "rolling back",
        };
        format!(
            "update to {} ({}) under way for {} ms: {step}",
            self.binary.display(),
            self.to_build,
            self.began.elapsed().as_millis()
        )
    }

    /// Ends the standbys still waiting (`down`, or a daemon that stops).
    pub(super) fn abandon(&mut self) {
        for s in [self.new.take(), self.fallback.take()]
            .into_iter()
            .flatten()
        {
            s.kill();
        }
        if let Some(Proc::Child(mut c)) = self.old.take() {
            procs::reap_within(&mut c, Duration::from_secs(1));
        }
    }
}

impl Daemon {
    /// `keepnet update`: checks, then starts the update (answered on `client` when it
    /// ends). A refusal is answered at once.
    pub(super) fn begin_update(&mut self, client: UnixStream, req: UpdateRequest) {
        match self.start_update(req) {
            Ok(mut u) => {
                let _ = client.set_write_timeout(Some(Duration::from_secs(2)));
                u.client = Some(client);
                self.update = Some(u);
                // On disk at once: a supervisor that dies now leaves its successor the
                // update's processes to settle.
                if let Err(e) = self.write_state() {
                    warn!(%e, "could not write the state file");
                }
            }
            Err(message) => send(&client, &Answer::Error { message }, &[]),
        }
    }

    fn start_update(&mut self, req: UpdateRequest) -> Result<Update, String> {
        if let Some(u) = &self.update {
            return Err(format!(
                "an update of {} is under way ({}); one at a time",
                self.servers[u.server].name,
                u.describe()
            ));
        }
        let Some(i) = self.servers.iter().position(|s| s.name == req.server) else {
            return Err(format!(
                "no server named {:?}: use {}",
                req.server,
                crate::config::SERVERS.join(", ")
            ));
        };
        let s = &self.servers[i];
        let name = s.name;
        let from_pid = s.pid();
        if s.phase != Phase::Up
            || from_pid == 0
            || s.doom.is_some()
            || s.control.state() != Some(ServerState::Running)
            || s.control.pid() != from_pid
        {
            return Err(format!(
                "{name} is {}, not running: nothing to update (its restart policy brings it back)",
                s.state()
            ));
        }
        let binary = req.binary.clone().unwrap_or_else(|| s.binary.clone());
        let binary = std::path::absolute(&binary).unwrap_or(binary);
        let meta = std::fs::metadata(&binary)
            .map_err(|e| format!("new binary {}: {e}; {name} left as it is", binary.display()))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(format!(
                "new binary {} is not an executable file; {name} left as it is",
                binary.display()
            ));
        }
        let from_build = s.control.version();
        let running = s.control.state_formats();
        let to_build = if req.skip_check {
            "(unchecked)".to_string()
        } else {
            let v = ask_version(&binary).map_err(|e| {
                format!("new binary {}: {e}; {name} left as it is", binary.display())
            })?;
            if v.server != name {
                return Err(format!(
                    "new binary {} is keepnet-{}, not keepnet-{name}; {name} left as it is",
                    binary.display(),
                    v.server
                ));
            }
            if let Some((_, writes)) = running {
                if writes < v.reads.0 || writes > v.reads.1 {
                    let which = if writes > v.reads.1 { "newer" } else { "older" };
                    return Err(format!(
                        "new binary {} ({}) reads state formats {}-{}, but the running {name} \
                         ({from_build}) writes format {writes}, {which} than it reads: \
                         refused before it started; {name} left as it is",
                        binary.display(),
                        v.build,
                        v.reads.0,
                        v.reads.1
                    ));
                }
            }
            v.build
        };
        // Nobody may wait in standby now: a fresh slate for the two processes started here.
        if s.control.standby_pids().iter().any(|&p| p != 0) {
            warn!(server = name, pids = ?s.control.standby_pids(), "stale standby slots cleared");
        }
        s.control.clear_handover();
        // The rollback build: what the running instance executes, even if the file it was
        // started from has since been replaced.
        let own = PathBuf::from(format!("/proc/{from_pid}/exe"));
        let log_from = std::fs::metadata(self.log_file(name)).map_or(0, |m| m.len());
        let new = self.start_standby(i, &binary).map_err(|e| {
            format!(
                "cannot start {}: {e}; {name} left as it is",
                binary.display()
            )
        })?;
        // ... with the environment it runs with (a variant selected there, say), under the
        // boot variables of this start.
        let own_env = procs::environ(from_pid).unwrap_or_default();
        let fallback = match self.start_standby_with(i, &own, &own_env) {
            Ok(f) => f,
            Err(e) => {
                new.kill();
                return Err(format!(
                    "cannot start the running build again for a rollback ({}: {e}); {name} left as it is",
                    own.display()
                ));
            }
        };
        let grace = req.grace.unwrap_or(DEFAULT_GRACE);
        info!(
            server = name,
            binary = %binary.display(),
            build = %to_build,
            from = %from_build,
            new_pid = new.pid(),
            rollback_pid = fallback.pid(),
            grace_ms = grace.as_millis() as u64,
            "update: starting the new build in standby"
        );
        let u = Update {
            server: i,
            client: None,
            binary,
            to_build,
            grace,
            began: Instant::now(),
            began_unix_ms: unix_ms(),
            from_pid,
            from_build,
            new_pid: new.pid(),
            new: Some(new),
            fallback_pid: fallback.pid(),
            fallback: Some(fallback),
            old: None,
            old_pidfd: None,
            step: Step::Loading {
                until: Instant::now() + STANDBY_LIMIT,
            },
            snapshot: None,
            blackout_us: None,
            log_from,
        };
        Ok(u)
    }

    fn start_standby(&self, i: usize, binary: &Path) -> Result<Standby, String> {
        self.start_standby_with(i, binary, &Default::default())
    }

    /// Starts `binary` in standby for server `i`; `env` adds variables the start itself
    /// does not set.
    fn start_standby_with(
        &self,
        i: usize,
        binary: &Path,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<Standby, String> {
        let mut cmd = self.command(i, binary, true).map_err(|e| e.to_string())?;
        let set: Vec<String> = cmd
            .get_envs()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        for (k, v) in env {
            if !set.contains(k) {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().map_err(|e| e.to_string())?;
        let pid = child.id();
        Ok(Standby {
            pidfd: pidfd_open(pid).ok(),
            start: procs::start_time(pid).unwrap_or(0),
            child,
        })
    }

    /// True while an update owns server `i` (its exits and heartbeat are the update's to
    /// judge, not the restart policy's).
    pub(super) fn updating(&self, i: usize) -> bool {
        self.update
            .as_ref()
            .is_some_and(|u| u.server == i && !matches!(u.step, Step::Loading { .. }))
    }

    /// One look at the update under way, if any (from the serve loop).
    pub(super) fn poll_update(&mut self) {
        self.reap_leftovers();
        let Some(mut u) = self.update.take() else {
            return;
        };
        let now = Instant::now();
        let done: Option<(&'static str, Option<String>)> =
            match std::mem::replace(&mut u.step, Step::Loading { until: now }) {
                Step::Loading { until } => self.poll_loading(&mut u, until, now),
                Step::HandingOff { until, seq } => self.poll_handing_off(&mut u, until, seq, now),
                Step::TakingOver { until } => self.poll_taking_over(&mut u, until, now),
                Step::Grace { until } => self.poll_grace(&mut u, until, now),
                Step::RollingBack { until, why, order } => {
                    self.poll_rolling_back(&mut u, until, why, order, now)
                }
            };
        if let Some((result, reason)) = done {
            self.finish_update(u, result, reason);
        } else {
            self.update = Some(u);
        }
    }

    fn poll_loading(
        &mut self,
        u: &mut Update,
        until: Instant,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        let s = &self.servers[i];
        if s.pid() != u.from_pid || s.phase != Phase::Up {
            return Some((
                "refused",
                Some(format!(
                    "the running {} instance (pid {}) ended while the new build loaded; its restart policy took over",
                    s.name, u.from_pid
                )),
            ));
        }
        for (what, st) in [
            ("new build", &mut u.new),
            ("rollback standby", &mut u.fallback),
        ] {
            if let Some(status) = st.as_mut().and_then(Standby::exited) {
                let log = self.log_tail(i, u.log_from);
                st.take();
                return Some((
                    "refused",
                    Some(format!(
                        "the {what} {} before it was ready in standby{log}; the old instance never stopped",
                        describe_exit(status)
                    )),
                ));
            }
        }
        let ready = |p: u32| s.control.is_standby(p);
        if ready(u.new_pid) && ready(u.fallback_pid) {
            // The successor reads the live applications at takeover, before its first poll.
            self.queue_apps(i);
            let s = &mut self.servers[i];
            s.seq = s.seq.wrapping_add(1);
            let msg = ControlMsg {
                value: u64::from(u.new_pid),
                ..ControlMsg::command(Cmd::Handoff, s.seq)
            };
            if s.commands.push(msg).is_err() {
                return Some((
                    "refused",
                    Some(format!(
                        "{}'s command ring is full; the old instance never stopped",
                        s.name
                    )),
                ));
            }
            u.step = Step::HandingOff {
                until: now + HANDOFF_LIMIT,
                seq: s.seq,
            };
            return None;
        }
        if now >= until {
            let (new_ready, fallback_ready) = (ready(u.new_pid), ready(u.fallback_pid));
            let which = if new_ready {
                "the rollback standby"
            } else {
                "the new build"
            };
            if !new_ready {
                if let Some(st) = u.new.take() {
                    st.kill();
                }
            }
            if !fallback_ready {
                if let Some(st) = u.fallback.take() {
                    st.kill();
                }
            }
            return Some((
                "refused",
                Some(format!(
                    "{which} was not ready in standby within {} s (killed); the old instance never stopped",
                    STANDBY_LIMIT.as_secs()
                )),
            ));
        }
        u.step = Step::Loading { until };
        None
    }

    fn poll_handing_off(
        &mut self,
        u: &mut Update,
        until: Instant,
        seq: u32,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        let s = &mut self.servers[i];
        loop {
            match s.replies.pop() {
                Ok(Some(r)) if r.seq == seq => {
                    if r.kind != ControlMsg::OK {
                        return Some((
                            "refused",
                            Some(format!(
                                "the running instance refused the handoff ({}) and serves on",
                                match r.value {
                                    keepnet_server::runtime::handoff_error::TOO_BIG =>
                                        "its snapshot does not fit the snapshot area",
                                    keepnet_server::runtime::handoff_error::SNAPSHOT =>
                                        "it could not write its snapshot",
                                    keepnet_server::runtime::handoff_error::NO_SUCCESSOR =>
                                        "the successor no longer waits in standby",
                                    _ => "unknown error",
                                }
                            )),
                        ));
                    }
                    let format = s.control.read_snapshot().ok().and_then(|b| {
                        keepnet_server::codec::decode(&b, s.name, 0..=u32::MAX)
                            .ok()
                            .map(|d| d.header.format_version)
                    });
                    u.snapshot = Some((format.unwrap_or(0), r.value));
                    // The old instance is the update's now: it exits on its own.
                    u.old = s.child.take();
                    u.old_pidfd = s.pidfd.take();
                    s.phase = Phase::Starting;
                    s.started = now;
                    u.step = Step::TakingOver {
                        until: now + TAKEOVER_LIMIT,
                    };
                    return None;
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => break,
            }
        }
        let exited = s.child.as_mut().and_then(|c| c.try_exit(s.pidfd.as_ref()));
        if let Some(status) = exited {
            // It died before it answered: as any crash, the restart policy's.
            self.on_exit(i, status);
            return Some((
                "refused",
                Some("the running instance died before it answered the handoff; restarted as after a crash".into()),
            ));
        }
        if now >= until {
            return Some((
                "refused",
                Some(format!(
                    "the running instance did not answer the handoff within {} s; it was left serving",
                    HANDOFF_LIMIT.as_secs()
                )),
            ));
        }
        u.step = Step::HandingOff { until, seq };
        None
    }

    fn poll_taking_over(
        &mut self,
        u: &mut Update,
        until: Instant,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        let control = self.servers[i].control.clone();
        if control.pid() == u.new_pid
            && control.state() == Some(ServerState::Running)
            && control.first_poll_ns() != 0
        {
            let off = control.handoff_ns();
            let on = control.first_poll_ns();
            u.blackout_us = (on >= off && off != 0).then(|| (on - off) / 1000);
            if let Some(st) = u.new.take() {
                self.adopt_standby(i, st, now);
            }
            info!(
                server = self.servers[i].name,
                pid = u.new_pid,
                generation = control.generation().get(),
                blackout_us = u.blackout_us.unwrap_or(0),
                "update: the new build serves; grace period"
            );
            u.step = Step::Grace {
                until: now + u.grace,
            };
            return None;
        }
        let refused = control.handover_result() == Some(false);
        let exited = u.new.as_mut().and_then(Standby::exited);
        if refused || exited.is_some() || now >= until {
            let log = self.log_tail(i, u.log_from);
            let why = if refused {
                format!("the new build refused the state{log}")
            } else if let Some(st) = exited {
                format!("the new build {} while taking over{log}", describe_exit(st))
            } else {
                format!(
                    "the new build was not running {} s after the handover (killed)",
                    TAKEOVER_LIMIT.as_secs()
                )
            };
            if let Some(st) = u.new.take() {
                // Reaped before the rollback claims the rings it may hold.
                st.kill();
            }
            return self.roll_back(u, why, Handover::Restore, now);
        }
        u.step = Step::TakingOver { until };
        None
    }

    fn poll_grace(
        &mut self,
        u: &mut Update,
        until: Instant,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        self.check_heartbeat(i, now);
        let s = &mut self.servers[i];
        let exited = s.child.as_mut().and_then(|c| c.try_exit(s.pidfd.as_ref()));
        if let Some(status) = exited {
            let how = s.doom.take().unwrap_or_else(|| {
                status.map_or_else(|| procs::STATUS_UNKNOWN.into(), describe_exit)
            });
            let pid = s.pid();
            s.child = None;
            s.pidfd = None;
            s.last_exit = Some(how.clone());
            self.release_all_claims(pid);
            let log = self.log_tail(i, u.log_from);
            let why = format!(
                "the new build {how} {} ms into its {} ms grace period{log}",
                now.duration_since(until.checked_sub(u.grace).unwrap_or(now))
                    .as_millis(),
                u.grace.as_millis()
            );
            // It ran: the shared state moved on since the snapshot, so the rollback
            // recovers from the shared state, as after any crash.
            return self.roll_back(u, why, Handover::Fresh, now);
        }
        if now >= until {
            if let Some(f) = u.fallback.take() {
                self.servers[i].control.hand_over(f.pid(), Handover::Abort);
                self.leftovers.push((f.child, Instant::now()));
            }
            return Some(("updated", None));
        }
        u.step = Step::Grace { until };
        None
    }

    fn poll_rolling_back(
        &mut self,
        u: &mut Update,
        until: Instant,
        why: String,
        order: Handover,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        let control = self.servers[i].control.clone();
        if control.pid() == u.fallback_pid && control.state() == Some(ServerState::Running) {
            let on = control.first_poll_ns();
            if on == 0 {
                u.step = Step::RollingBack { until, why, order };
                return None;
            }
            let off = control.handoff_ns();
            u.blackout_us =
                (order == Handover::Restore && on >= off && off != 0).then(|| (on - off) / 1000);
            if let Some(st) = u.fallback.take() {
                self.adopt_standby(i, st, now);
                let s = &mut self.servers[i];
                s.phase = Phase::Up;
                s.beat = (s.control.heartbeat(), now);
            }
            return Some(("rolled back", Some(why)));
        }
        let refused = control.handover_result() == Some(false);
        let exited = u.fallback.as_mut().and_then(Standby::exited);
        if refused || exited.is_some() || now >= until {
            if let Some(st) = u.fallback.take() {
                st.kill();
            }
            let log = self.log_tail(i, u.log_from);
            error!(
                server = self.servers[i].name,
                "update: the rollback failed too{log}"
            );
            // The ordinary restart policy takes it from here (crash recovery).
            let s = &mut self.servers[i];
            s.child = None;
            s.pidfd = None;
            s.outage_since = Some(s.outage_since.unwrap_or(now));
            s.phase = Phase::Backoff { at: now };
            return Some((
                "rolled back",
                Some(format!(
                    "{why}; the rollback to the old build failed too{log}: restarting {} as after a crash",
                    self.servers[i].binary.display()
                )),
            ));
        }
        u.step = Step::RollingBack { until, why, order };
        None
    }

    /// Tells the rollback standby to take over (`order`: Restore the snapshot, or Fresh:
    /// recover from the shared state).
    fn roll_back(
        &mut self,
        u: &mut Update,
        why: String,
        order: Handover,
        now: Instant,
    ) -> Option<(&'static str, Option<String>)> {
        let i = u.server;
        warn!(server = self.servers[i].name, reason = %why, "update: rolling back");
        let Some(f) = &u.fallback else {
            let s = &mut self.servers[i];
            s.phase = Phase::Backoff { at: now };
            return Some((
                "rolled back",
                Some(format!(
                    "{why}; no rollback standby: restarting as after a crash"
                )),
            ));
        };
        let pid = f.pid();
        self.queue_apps(i);
        let s = &mut self.servers[i];
        s.phase = Phase::Starting;
        s.started = now;
        s.control.hand_over(pid, order);
        u.step = Step::RollingBack {
            until: now + TAKEOVER_LIMIT,
            why,
            order,
        };
        None
    }

    /// Makes standby `st`, now serving, server `i`'s instance.
    fn adopt_standby(&mut self, i: usize, st: Standby, now: Instant) {
        let s = &mut self.servers[i];
        s.pidfd = st.pidfd;
        s.start = st.start;
        s.exe = procs::exe(st.child.id());
        s.child = Some(Proc::Child(st.child));
        s.started = now;
        s.phase = Phase::Up;
        s.beat = (s.control.heartbeat(), now);
        s.beat_wait = None;
        let _ = self.write_state();
    }

    fn finish_update(&mut self, mut u: Update, result: &'static str, reason: Option<String>) {
        let i = u.server;
        for st in [u.new.take(), u.fallback.take()].into_iter().flatten() {
            let pid = st.pid();
            self.servers[i].control.hand_over(pid, Handover::Abort);
            self.leftovers.push((st.child, Instant::now()));
        }
        if let Some(Proc::Child(c)) = u.old.take() {
            self.leftovers.push((c, Instant::now()));
        }
        let s = &mut self.servers[i];
        if result == "updated" {
            s.binary = u.binary.clone();
        }
        let report = UpdateReport {
            server: s.name.into(),
            result: result.into(),
            reason,
            at_unix_ms: u.began_unix_ms,
            binary: u.binary.display().to_string(),
            from_build: u.from_build.clone(),
            build: s.control.version(),
            state_format: u.snapshot.map(|(f, _)| f).filter(|&f| f != 0),
            snapshot_bytes: u.snapshot.map(|(_, n)| n),
            from_pid: u.from_pid,
            pid: s.pid(),
            generation: s.control.generation().get(),
            blackout_us: u.blackout_us,
            took_ms: u.began.elapsed().as_millis() as u64,
            grace_ms: u.grace.as_millis() as u64,
        };
        match result {
            "updated" => info!(
                server = s.name,
                pid = report.pid,
                build = %report.build,
                blackout_us = report.blackout_us.unwrap_or(0),
                "update: done"
            ),
            _ => warn!(
                server = s.name,
                result,
                reason = report.reason.as_deref().unwrap_or(""),
                blackout_us = report.blackout_us.unwrap_or(0),
                "update: not done"
            ),
        }
        s.last_update = Some(report.clone());
        if let Some(client) = u.client.take() {
            send(&client, &Answer::Updated { update: report }, &[]);
        }
        let _ = self.write_state();
    }

    /// Queues the live applications on a transport server's hotplug socket for whoever
    /// takes over next (it reads them before its first poll).
    fn queue_apps(&mut self, i: usize) {
        let name = self.servers[i].name;
        if let Some(set) = self.apps.iter().find(|set| set.label == name) {
            set.queue_all();
        }
    }

    /// Frees every ring side `pid` held.
    fn release_all_claims(&self, pid: u32) {
        super::release_rings(&self.link, pid);
        super::release_transport(&self.udp_link, pid);
        super::release_transport(&self.tcp_link, pid);
        for c in self.apps.iter().flat_map(|set| set.conns.values()) {
            c.link.release_claims_of(pid);
        }
    }

    /// The last errors and warnings in server `i`'s log since byte `from`, as " (...)".
    fn log_tail(&self, i: usize, from: u64) -> String {
        let log = self.log_file(self.servers[i].name);
        let bytes = std::fs::read(&log).unwrap_or_default();
        let start = usize::try_from(from).unwrap_or(0).min(bytes.len());
        let text = String::from_utf8_lossy(&bytes[start..]);
        let last: Vec<&str> = text
            .lines()
            .rev()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(2)
            .collect();
        if last.is_empty() {
            return String::new();
        }
        let strip = |l: &str| -> String {
            // Drop the timestamp and level prefix the log lines start with.
            l.split_once("server{name=")
                .map_or(l, |(_, rest)| {
                    rest.split_once(": ").map_or(rest, |(_, m)| m)
                })
                .trim()
                .to_string()
        };
        format!(
            " ({})",
            last.into_iter()
                .rev()
                .map(strip)
                .collect::<Vec<_>>()
                .join("; ")
        )
    }

    /// Reaps processes an update left behind (dismissed standbys, old instances);
    /// kills one that lingers.
    fn reap_leftovers(&mut self) {
        let now = Instant::now();
        self.leftovers.retain_mut(|(c, since)| match c.try_wait() {
            Ok(Some(_)) | Err(_) => false,
            Ok(None) => {
                // Told to go (Abort) or done: one that is still here after this (a build
                // hung before it even waited for orders) is killed.
                if now.duration_since(*since) >= LEFTOVER_LIMIT {
                    warn!(
                        pid = c.id(),
                        "update: a process it left did not exit; killing it"
                    );
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
                true
            }
        });
    }

    /// Ends an update for `down`: standbys killed, the client told.
    pub(super) fn abandon_update(&mut self) {
        if let Some(mut u) = self.update.take() {
            u.abandon();
            if let Some(c) = u.client.take() {
                let message = "the constellation was stopped during the update".to_string();
                send(&c, &Answer::Error { message }, &[]);
            }
        }
        for (mut c, _) in self.leftovers.drain(..) {
            procs::reap_within(&mut c, Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines_parse_and_garbage_is_refused() {
        let v = parse_version("keepnet-udp 0.1.0 state-format 2 reads 1-2\n").unwrap();
        assert_eq!(
            v,
            VersionInfo {
                server: "udp".into(),
                build: "0.1.0".into(),
                writes: 2,
                reads: (1, 2)
            }
        );
        for bad in [
            "",
            "keepnet-udp 0.1.0",
            "udp 0.1.0 state-format 1 reads 1-1",
            "keepnet-udp 0.1.0 state-format x reads 1-1",
            "keepnet-udp 0.1.0 state-format 3 reads 1-2",
            "keepnet-udp 0.1.0 state-format 1 reads 2-1",
            "keepnet-udp 0.1.0 state-format 1 reads 1",
        ] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
    }
}
