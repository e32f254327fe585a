//! The commands that start and talk to the daemon: up, status, down, capture.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::daemon::{self, Daemon, Options};
use super::protocol::{Answer, Request, StateFile};
use super::status::StatusReport;
use crate::config::{Config, SERVERS};

/// Why a command failed (the message says what to do).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("`keepnet {0}` needs root (it creates a TAP device and network namespaces): run it with sudo")]
    NotRoot(&'static str),
    #[error("/dev/net/tun does not exist: load the tun module (modprobe tun)")]
    NoTun,
    #[error("instance {instance:?} is already running (supervisor pid {pid}); `keepnet down` first, or pick another instance name in the config")]
    AlreadyUp { instance: String, pid: u32 },
    #[error("no keepnet instance {instance:?} is running (no control socket at {path})")]
    NotRunning { instance: String, path: PathBuf },
    #[error("the supervisor of instance {instance:?} (pid {pid}) is not running; {servers}: `keepnet up` re-adopts them, `keepnet down` ends them")]
    SupervisorGone {
        instance: String,
        pid: u32,
        servers: String,
    },
    #[error("{0}")]
    Daemon(#[from] daemon::DaemonError),
    #[error("service {name}: binary not found at {path}: build it (cargo build --release) or set its binary in the config")]
    NoServiceBinary { name: String, path: PathBuf },
    #[error("keepnet up failed: {0}")]
    StartFailed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor answered: {0}")]
    Remote(String),
    #[error("unexpected answer from the supervisor: {0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
    let what = what.into();
    move |source| ClientError::Io { what, source }
}

/// Loads the config (defaults when no file is given).
pub fn load_config(path: Option<&Path>) -> Result<Config, ClientError> {
    Ok(match path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    })
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn read_state(instance: &str) -> Option<StateFile> {
    let text = std::fs::read_to_string(super::state_path(instance)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The checks `up` makes before starting anything. Root and /dev/net/tun only for a TAP
/// link (the memory wire needs neither).
pub fn preflight(config: &Config) -> Result<(), ClientError> {
    if config.link.backend == crate::config::LinkBackend::Tap {
        if !is_root() {
            return Err(ClientError::NotRoot("up"));
        }
        if !Path::new("/dev/net/tun").exists() {
            return Err(ClientError::NoTun);
        }
    }
    for name in SERVERS {
        daemon::binary_for(config, name)?;
    }
    for svc in &config.services {
        let path = super::services::service_binary(svc);
        if !path.is_file() {
            return Err(ClientError::NoServiceBinary {
                name: svc.name.clone(),
                path,
            });
        }
    }
    if let Some(st) = read_state(&config.instance) {
        if st.supervisor_alive() {
            return Err(ClientError::AlreadyUp {
                instance: config.instance.clone(),
                pid: st.supervisor_pid,
            });
        }
    }
    Ok(())
}

/// `keepnet up`: starts the daemon and returns once every server is ready (or says why not).
pub fn up(
    config_path: Option<&Path>,
    netns: Option<String>,
    foreground: bool,
) -> Result<String, ClientError> {
    let config = load_config(config_path)?;
    preflight(&config)?;
    if foreground {
        let instance = config.instance.clone();
        let mut d = Daemon::start_or_adopt(Options { config, netns })?;
        let adopted = d.adopted().map(str::to_string);
        let r = d.serve(|r| match (r, adopted) {
            (Ok(()), Some(a)) => println!(
                "keepnet up (foreground): re-adopted instance {instance}: {a}; Ctrl-C or `keepnet down` stops it"
            ),
            (Ok(()), None) => println!(
                "keepnet up (foreground): {} servers and the services ready; Ctrl-C or `keepnet down` stops it",
                SERVERS.len()
            ),
            (Err(e), _) => eprintln!("keepnet up: {e}"),
        });
        drop(d);
        return r
            .map(|()| "keepnet: stopped".to_string())
            .map_err(ClientError::from);
    }
    let dir = super::run_dir(&config.instance);
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let log = super::log_path(&config.instance);
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io(format!("open {}", log.display())))?;
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(|e| io("pipe")(e.into()))?;
    let exe = std::env::current_exe().map_err(io("find the keepnet executable"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__daemon")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().map_err(io("dup log"))?)
        .stderr(logf)
        .env(
            "KEEPNET_READY_FD",
            std::os::fd::AsRawFd::as_raw_fd(&ready_w).to_string(),
        );
    if let Some(p) = config_path {
        let abs = std::fs::canonicalize(p).map_err(io(format!("config {}", p.display())))?;
        cmd.arg("--config").arg(abs);
    }
    if let Some(ns) = &netns {
        cmd.arg("--netns").arg(ns);
    }
    keepnet_ipc::fdpass::inherit_fds(&mut cmd, &[std::os::fd::AsFd::as_fd(&ready_w)]);
    let mut child = cmd.spawn().map_err(io("start the supervisor"))?;
    drop(ready_w);
    // The daemon writes one line ("ready" or "error: ...") and closes the pipe.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::fs::File::from(ready_r).read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let msg = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(m) => m,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ClientError::StartFailed(format!(
                "no answer from the supervisor in 60 s; see {}",
                log.display()
            )));
        }
    };
    let msg = msg.trim();
    if let Some(summary) = msg.strip_prefix("adopted: ") {
        return Ok(format!(
            "keepnet up: re-adopted instance {}: {summary}",
            config.instance
        ));
    }
    if msg == "ready" {
        return Ok(format!(
            "keepnet up: instance {} ready ({}), keepnet at {}, kernel side {} on {}{}",
            config.instance,
            SERVERS.join(", "),
            config.ip.addr,
            config.link.kernel_addr,
            config.link.tap,
            netns.map(|n| format!(" in netns {n}")).unwrap_or_default()
        ));
    }
    let _ = child.wait();
    let why = msg.strip_prefix("error: ").unwrap_or(msg);
    if why.is_empty() {
        return Err(ClientError::StartFailed(format!(
            "the supervisor exited during start-up; see {}",
            log.display()
        )));
    }
    Err(ClientError::StartFailed(why.to_string()))
}

/// The daemon process (`keepnet __daemon`): start, report readiness on the pipe, serve.
pub fn daemon_main(config_path: Option<&Path>, netns: Option<String>) -> Result<(), ClientError> {
    let _ = nix::unistd::setsid();
    let ready = std::env::var("KEEPNET_READY_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
        .and_then(|fd| keepnet_ipc::fdpass::take_inherited(fd).ok())
        .map(std::fs::File::from);
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            if let Some(mut r) = ready {
                let _ = writeln!(r, "error: {e}");
            }
            return Err(e);
        }
    };
    match Daemon::start_or_adopt(Options { config, netns }) {
        Ok(mut d) => {
            let adopted = d.adopted().map(str::to_string);
            let res = d.serve(move |r| {
                if let Some(mut pipe) = ready {
                    let _ = match (r, adopted) {
                        (Ok(()), Some(a)) => writeln!(pipe, "adopted: {a}"),
                        (Ok(()), None) => writeln!(pipe, "ready"),
                        (Err(e), _) => writeln!(pipe, "error: {e}"),
                    };
                }
            });
            drop(d);
            res.map_err(ClientError::from)
        }
        Err(e) => {
            tracing::error!(%e, "start-up failed");
            if let Some(mut r) = ready {
                let _ = writeln!(r, "error: {e}");
            }
            Err(e.into())
        }
    }
}

/// Sends one request and reads one answer (and any fd that came with it).
pub fn call(
    instance: &str,
    req: &Request,
) -> Result<(Answer, Vec<std::os::fd::OwnedFd>), ClientError> {
    let path = super::socket_path(instance);
    let stream = UnixStream::connect(&path).map_err(|_| match read_state(instance) {
        Some(st) if !st.supervisor_alive() => ClientError::SupervisorGone {
            instance: instance.into(),
            pid: st.supervisor_pid,
            servers: live_servers(&st),
        },
        _ => ClientError::NotRunning {
            instance: instance.into(),
            path: path.clone(),
        },
    })?;
    // An update answers when it ends: its steps' limits plus its grace period.
    let wait = match req {
        Request::Update { grace_ms, .. } => {
            Duration::from_secs(60) + Duration::from_millis(grace_ms.unwrap_or(0))
        }
        _ => Duration::from_secs(30),
    };
    stream.set_read_timeout(Some(wait)).map_err(io("socket"))?;
    let mut text = serde_json::to_string(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(io("send request"))?;
    if matches!(req, Request::Link | Request::Wire) {
        let mut buf = vec![0u8; 4096];
        let (n, fds) =
            keepnet_ipc::fdpass::recv_fds(&stream, &mut buf).map_err(io("receive answer"))?;
        let ans: Answer =
            serde_json::from_slice(&buf[..n]).map_err(|e| ClientError::Protocol(e.to_string()))?;
        return Ok((ans, fds));
    }
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(io("read answer"))?;
    if line.is_empty() {
        return Err(ClientError::Protocol(
            "the supervisor closed the connection without answering (did it die? `keepnet up` \
             re-adopts the constellation, and settles an update it left half-way)"
                .into(),
        ));
    }
    let ans: Answer = serde_json::from_str(line.trim())
        .map_err(|e| ClientError::Protocol(format!("{e}: {line:?}")))?;
    Ok((ans, Vec::new()))
}

/// `keepnet status`.
pub fn status(config_path: Option<&Path>) -> Result<StatusReport, ClientError> {
    let config = load_config(config_path)?;
    match call(&config.instance, &Request::Status)?.0 {
        Answer::Status(s) => Ok(s),
        Answer::Error { message } => Err(ClientError::Remote(message)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// The servers of a state file whose supervisor is gone, in words: which still run.
fn live_servers(st: &StateFile) -> String {
    let alive: Vec<String> = server_pids(st)
        .into_iter()
        .filter(|(_, pid, start)| super::procs::alive_as(*pid, *start))
        .map(|(name, pid, _)| format!("{name} {pid}"))
        .collect();
    if alive.is_empty() {
        "none of its servers runs".into()
    } else {
        format!("its servers still run ({})", alive.join(", "))
    }
}

/// (name, pid, start time) per server of a state file (start 0 where an old file has none).
fn server_pids(st: &StateFile) -> Vec<(String, u32, u64)> {
    if st.procs.is_empty() {
        return st.servers.iter().map(|(n, p)| (n.clone(), *p, 0)).collect();
    }
    st.procs
        .iter()
        .map(|r| (r.name.clone(), r.pid, r.start))
        .collect()
}

/// `keepnet down` for an instance whose supervisor died: ends its services and servers by
/// pid (each checked to be the process recorded: same start time, or for an old state file
/// without one a `keepnet-NAME` binary), removes the namespace `up` made (the TAP device
/// went with the driver, its last holder) and the state file.
fn down_without_supervisor(config: &Config, st: &StateFile) -> Result<String, ClientError> {
    let grace = Duration::from_secs(2);
    let mut ended = Vec::new();
    let mut services = 0;
    for svc in &st.services {
        if svc.pid != 0 && svc.start != 0 && super::procs::end_process(svc.pid, svc.start, grace) {
            services += 1;
            ended.push((svc.pid, svc.start));
        }
    }
    let mut servers = 0;
    for (name, pid, start) in server_pids(st).into_iter().rev() {
        if pid == 0 {
            continue;
        }
        let start = if start != 0 {
            start
        } else {
            // An old state file: only a process running keepnet's server binary.
            let ours = super::procs::exe(pid).is_some_and(|e| {
                e.file_name()
                    .is_some_and(|f| f.to_string_lossy() == format!("keepnet-{name}"))
            });
            match (ours, super::procs::start_time(pid)) {
                (true, Some(s)) => s,
                _ => continue,
            }
        };
        if super::procs::end_process(pid, start, grace) {
            servers += 1;
            ended.push((pid, start));
        }
    }
    // Their reaper is init (their parent, the supervisor, is gone): give it a moment, so
    // that nothing of the instance is left in the process table when `down` returns.
    let end = Instant::now() + Duration::from_secs(3);
    while ended
        .iter()
        .any(|&(pid, start)| super::procs::exists_as(pid, start))
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    if st.created_netns {
        if let Some(ns) = &st.netns {
            super::lab::netns_delete(ns)
                .map_err(|e| ClientError::StartFailed(format!("removing namespace {ns}: {e}")))?;
        }
    }
    let _ = std::fs::remove_file(super::socket_path(&config.instance));
    let _ = std::fs::remove_file(super::state_path(&config.instance));
    Ok(format!(
        "keepnet down: instance {} stopped (its supervisor, pid {}, was not running: ended {servers} server{} and {services} service{} by pid)",
        config.instance,
        st.supervisor_pid,
        if servers == 1 { "" } else { "s" },
        if services == 1 { "" } else { "s" },
    ))
}

/// `keepnet down`: stops the instance and waits until its supervisor is gone. Returns the
/// line to show the user. With the supervisor dead, ends what it left by pid.
pub fn down(config_path: Option<&Path>) -> Result<String, ClientError> {
    let config = load_config(config_path)?;
    let state = read_state(&config.instance);
    if let Some(st) = &state {
        if !st.supervisor_alive() {
            // No supervisor holds the lock either (one may be starting or re-adopting).
            match super::try_lock(&config.instance) {
                Ok(Some(_lock)) => return down_without_supervisor(&config, st),
                Ok(None) => {
                    return Err(ClientError::Usage(format!(
                        "a supervisor of instance {:?} is starting (it holds {}): try again in a moment",
                        config.instance,
                        super::lock_path(&config.instance).display()
                    )))
                }
                Err(e) => return Err(io("lock")(e)),
            }
        }
    }
    match call(&config.instance, &Request::Down) {
        Ok((Answer::Ok { .. }, _)) => {}
        Ok((Answer::Error { message }, _)) => return Err(ClientError::Remote(message)),
        Ok((other, _)) => return Err(ClientError::Protocol(format!("{other:?}"))),
        Err(e) => return Err(e),
    }
    if let Some(st) = state {
        let end = Instant::now() + Duration::from_secs(10);
        // Until it is gone from the process table (reaped), as callers checking its pid
        // expect.
        while super::procs::exists_as(st.supervisor_pid, st.supervisor_start)
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(format!(
        "keepnet down: instance {} stopped",
        config.instance
    ))
}

/// A signal named as `kill(1)` takes it: `KILL`, `SIGKILL`, `kill` or a number.
pub fn parse_signal(text: &str) -> Result<nix::sys::signal::Signal, ClientError> {
    use nix::sys::signal::Signal;
    let t = text.trim();
    let sig = if let Ok(n) = t.parse::<i32>() {
        Signal::try_from(n).ok()
    } else {
        let upper = t.to_ascii_uppercase();
        let name = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        name.parse::<Signal>().ok()
    };
    sig.ok_or_else(|| {
        ClientError::Usage(format!(
            "unknown signal {text:?}: use a name such as KILL, TERM, STOP, SEGV, ABRT (with or without SIG) or a number from 1 to 31"
        ))
    })
}

/// `keepnet kill SERVER [--signal SIG | --scribble]`: fault injection through the
/// supervisor, which records the instant. Returns the line to show the user.
pub fn kill(
    config_path: Option<&Path>,
    server: &str,
    signal: Option<&str>,
    scribble: bool,
) -> Result<String, ClientError> {
    if !SERVERS.contains(&server) {
        return Err(ClientError::Usage(format!(
            "unknown server {server:?}: use one of {}",
            SERVERS.join(", ")
        )));
    }
    if scribble && signal.is_some() {
        return Err(ClientError::Usage(
            "--scribble and --signal exclude each other (a scribbling server aborts itself)".into(),
        ));
    }
    let sig = parse_signal(signal.unwrap_or("KILL"))?;
    let config = load_config(config_path)?;
    let req = Request::Kill {
        server: server.to_string(),
        signal: sig as i32,
        scribble,
    };
    match call(&config.instance, &req)?.0 {
        Answer::Ok { message } => Ok(message),
        Answer::Error { message } => Err(ClientError::Remote(message)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// `keepnet update`: one live update, answered when it ends (updated, rolled back or
/// refused after it began); a refusal before it began is an error.
pub fn update(
    config_path: Option<&Path>,
    server: &str,
    binary: Option<&Path>,
    grace_ms: u64,
    skip_check: bool,
) -> Result<super::status::UpdateReport, ClientError> {
    if !SERVERS.contains(&server) {
        return Err(ClientError::Usage(format!(
            "unknown server {server:?}: use one of {}",
            SERVERS.join(", ")
        )));
    }
    let config = load_config(config_path)?;
    let binary = binary.map(|b| {
        std::path::absolute(b)
            .unwrap_or_else(|_| b.to_path_buf())
            .to_string_lossy()
            .into_owned()
    });
    let req = Request::Update {
        server: server.to_string(),
        binary,
        grace_ms: Some(grace_ms),
        skip_check,
    };
    match call(&config.instance, &req)?.0 {
        Answer::Updated { update } => Ok(update),
        Answer::Error { message } => Err(ClientError::Remote(message)),
        other => Err(ClientError::Protocol(format!("{other:?}"))),
    }
}

/// `keepnet capture`: mirrors frames at the driver into a pcap file.
pub fn capture(config_path: Option<&Path>, out: &Path, seconds: f64) -> Result<u64, ClientError> {
    let config = load_config(config_path)?;
    let (ans, mut fds) = call(&config.instance, &Request::Link)?;
    if let Answer::Error { message } = ans {
        return Err(ClientError::Remote(message));
    }
    let fd = fds
        .pop()
        .ok_or_else(|| ClientError::Protocol("no link region came with the answer".into()))?;
    let region = keepnet_ipc::Region::open(fd, keepnet_ipc::RegionKind::RINGS)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let link = keepnet_server::wiring::Link::open(region)
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let mut ring = link.capture().and_then(|r| r.consumer()).map_err(|e| {
        ClientError::Remote(format!("capture ring: {e} (another capture running?)"))
    })?;
    // Drop whatever an earlier capture left.
    let mut scratch = vec![keepnet_server::wiring::CaptureRecord::default(); 64];
    while ring.pop_batch(&mut scratch).unwrap_or(0) > 0 {}
    let file = std::fs::File::create(out).map_err(io(format!("create {}", out.display())))?;
    let mut writer = keepnet_driver::pcap::PcapWriter::new(std::io::BufWriter::new(file))
        .map_err(io(format!("write {}", out.display())))?;
    link.set_capture(true);
    let end = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    let mut frames = 0u64;
    let mut last_report = Instant::now();
    let result = loop {
        let n = match ring.pop_batch(&mut scratch) {
            Ok(n) => n,
            Err(e) => break Err(ClientError::Protocol(e.to_string())),
        };
        if let Err(e) = scratch[..n].iter().try_for_each(|r| writer.write_record(r)) {
            break Err(ClientError::Io {
                what: format!("write {}", out.display()),
                source: e,
            });
        }
        frames += n as u64;
        if n == 0 {
            if Instant::now() >= end {
                break Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!("capture: {frames} frames");
            last_report = Instant::now();
        }
    };
    link.set_capture(false);
    // Frames mirrored before the switch went off.
    while let Ok(n) = ring.pop_batch(&mut scratch) {
        if n == 0 {
            break;
        }
        for r in &scratch[..n] {
            let _ = writer.write_record(r);
            frames += 1;
        }
    }
    writer
        .flush()
        .map_err(io(format!("write {}", out.display())))?;
    result.map(|()| frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn signals_by_name_with_or_without_sig_or_by_number() {
        for (text, sig) in [
            ("KILL", Signal::SIGKILL),
            ("SIGKILL", Signal::SIGKILL),
            ("kill", Signal::SIGKILL),
            ("9", Signal::SIGKILL),
            ("STOP", Signal::SIGSTOP),
            ("sigsegv", Signal::SIGSEGV),
            (" TERM ", Signal::SIGTERM),
            ("6", Signal::SIGABRT),
        ] {
            assert_eq!(parse_signal(text).unwrap(), sig, "{text}");
        }
        for bad in ["", "0", "-9", "99", "FOO", "SIG", "SIGKILLL", "9x"] {
            let e = parse_signal(bad).unwrap_err().to_string();
            assert!(e.contains("unknown signal"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn kill_refuses_an_unknown_server_before_anything_else() {
        let e = kill(None, "tpc", None, false).unwrap_err().to_string();
        assert_eq!(e, "unknown server \"tpc\": use one of driver, ip, udp, tcp");
        let e = kill(None, "tcp", Some("KILL"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exclude each other"), "{e}");
    }
}
