//! Helpers of the live-update drills (`tests/tests/live_update.rs` over the memory wire,
//! `tests/tests/update_lab.rs` over TAP): running `keepnet update` and reading its one
//! line, writing a "bad build" (a wrapper script that runs a server binary with a
//! `KEEPNET_FAULT` or a state-format variant in its environment), and finding the processes
//! an instance left behind (by the `KEEPNET_RUN_DIR` in their environment, which every
//! process the supervisor starts inherits), so that a test can check that an update leaves
//! exactly the processes it should, and kill (by pid) whatever its own instance leaked.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::exited;

/// What one `keepnet update ...` run printed, and how it ended.
#[derive(Clone, Debug)]
pub struct UpdateRun {
    /// The exit code (None if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// How long the command took, as the test saw it.
    pub took: Duration,
}

impl UpdateRun {
    /// The report line (`SERVER RESULT: pid A -> B, ...`), or "" if it printed none.
    pub fn line(&self) -> &str {
        self.stdout.lines().next().unwrap_or("").trim()
    }

    /// `updated`, `rolled back` or `refused` from the report line; `error` if the command
    /// printed no report but an error (a refusal before anything started); else `?`.
    pub fn result(&self) -> &str {
        let line = self.line();
        if let Some((head, _)) = line.split_once(": ") {
            if let Some((_, result)) = head.split_once(' ') {
                return result;
            }
        }
        if self.stderr.contains("keepnet: error:") {
            "error"
        } else {
            "?"
        }
    }

    /// Everything it printed, for messages and substring checks.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The number after `key ` in the report line (`generation 5`).
    fn number_after(&self, key: &str) -> Option<f64> {
        let line = self.line();
        let at = line.find(key)? + key.len();
        line[at..]
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .and_then(|n| n.parse().ok())
    }

    /// The generation the report line names.
    pub fn generation(&self) -> Option<u64> {
        self.number_after(", generation ").map(|g| g as u64)
    }

    /// The blackout the report line names, in ms (None if not measured).
    pub fn blackout_ms(&self) -> Option<f64> {
        self.number_after(", blackout ")
    }

    /// (from pid, pid) of the report line.
    pub fn pids(&self) -> Option<(u32, u32)> {
        let line = self.line();
        let at = line.find(": pid ")? + ": pid ".len();
        let mut words = line[at..].split_whitespace();
        let from = words.next()?.parse().ok()?;
        let _arrow = words.next()?;
        let to = words.next()?.trim_end_matches(',').parse().ok()?;
        Some((from, to))
    }
}

/// Runs `KEEPNET update ARGS --config CONFIG` with `KEEPNET_RUN_DIR=RUN_DIR` and echoes it
/// to stderr.
pub fn update(keepnet: &Path, config: &Path, run_dir: &Path, args: &[&str]) -> UpdateRun {
    let t = Instant::now();
    let out = Command::new(keepnet)
        .arg("update")
        .args(args)
        .arg("--config")
        .arg(config)
        .env("KEEPNET_RUN_DIR", run_dir)
        .stdin(Stdio::null())
        .output()
        .expect("run keepnet update");
    let run = UpdateRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
    };
    eprintln!(
        "$ keepnet update {} -> {:?} in {:.0} ms\n{}",
        args.join(" "),
        run.code,
        run.took.as_secs_f64() * 1000.0,
        run.text().trim_end()
    );
    run
}

/// Writes an executable wrapper `DIR/NAME` that runs `target` with `env` (shell
/// assignments, e.g. `KEEPNET_FAULT=refuse-state`) in its environment: a "bad build" (or a
/// variant) for `keepnet update SERVER --binary`. It still answers `--version` as `target`
/// does.
pub fn wrapper(dir: &Path, name: &str, env: &str, target: &Path) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("#!/bin/sh\n{env} exec {} \"$@\"\n", target.display()),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    path
}

/// The entries of process `pid`'s initial environment (empty if unreadable).
pub fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|e| !e.is_empty())
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Where process `pid`'s executable is (None if gone or unreadable).
pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// Live processes (not zombies) whose environment has `KEEPNET_RUN_DIR=run_dir`: every
/// supervisor, server, standby and service of the instances using that run directory.
pub fn processes_of_run_dir(run_dir: &Path) -> Vec<u32> {
    let want = format!("KEEPNET_RUN_DIR={}", run_dir.display());
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    pids.retain(|&p| p != me && !exited(p) && environ(p).contains(&want));
    pids.sort_unstable();
    pids
}

/// Live processes whose stdout is `log` (a server's log in an instance's run directory:
/// every instance of that server, standbys included, writes there).
pub fn processes_logging_to(run_dir: &Path, log: &Path) -> Vec<u32> {
    processes_of_run_dir(run_dir)
        .into_iter()
        .filter(|&p| std::fs::read_link(format!("/proc/{p}/fd/1")).is_ok_and(|t| t == log))
        .collect()
}

/// One line about process `pid` for messages: its command line, parent, executable and the
/// keepnet variables that tell a standby or a bad build.
pub fn describe_process(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    let vars: Vec<String> = environ(pid)
        .into_iter()
        .filter(|e| {
            [
                "KEEPNET_STANDBY=",
                "KEEPNET_FAULT=",
                "KEEPNET_UDP_STATE_FORMAT=",
            ]
            .iter()
            .any(|k| e.starts_with(k))
        })
        .collect();
    format!(
        "pid {pid} (parent {ppid}) {} exe {} {}",
        cmdline.trim(),
        exe(pid).map_or("?".into(), |p| p.display().to_string()),
        vars.join(" ")
    )
}

/// Kills `pids` with SIGKILL (each by its own pid: processes a test's own instance left
/// behind) and waits up to 2 s for them to be gone.
pub fn kill_all(pids: &[u32]) {
    for &p in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let end = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| !exited(p)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// "p50 X ms, max Y ms over N" of the blackouts.
pub fn summary_ms(v: &[f64]) -> String {
    if v.is_empty() {
        return "none reported".into();
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    format!(
        "p50 {:.3} ms, p90 {:.3} ms, max {:.3} ms over {}",
        p(0.5),
        p(0.9),
        p(1.0),
        v.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stdout: &str, stderr: &str) -> UpdateRun {
        UpdateRun {
            code: Some(0),
            stdout: stdout.into(),
            stderr: stderr.into(),
            took: Duration::ZERO,
        }
    }

    #[test]
    fn report_lines_parse() {
        let r = run(
            "tcp updated: pid 12 -> 34, build 0.1.0 -> 0.1.0, state format 1 (46 bytes), \
             generation 5, blackout 0.412 ms (took 103 ms)\n",
            "",
        );
        assert_eq!(r.result(), "updated");
        assert_eq!(r.pids(), Some((12, 34)));
        assert_eq!(r.generation(), Some(5));
        assert_eq!(r.blackout_ms(), Some(0.412));
        let r = run(
            "udp rolled back: pid 1 -> 2, build 0.1.0 -> 0.1.0, generation 3, blackout not \
             measured (took 62 ms): the new build refused the state (x: y)\n",
            "",
        );
        assert_eq!(r.result(), "rolled back");
        assert_eq!(r.blackout_ms(), None);
        assert_eq!(r.generation(), Some(3));
        let r = run(
            "",
            "keepnet: error: tcp not updated: the supervisor answered: no\n",
        );
        assert_eq!(r.result(), "error");
    }
}
