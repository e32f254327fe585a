//! Child processes of the benchmarks, each bounded in time and killed (by its pid) on every
//! exit path.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::interrupt;
use crate::error::{Context, Result};

/// A child process that is killed and reaped on drop.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn drain(r: Option<impl std::io::Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
    r.map(|mut r| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    })
}

/// Runs a command to completion within `limit` (killing it after), returning its status
/// (`None` if it was killed), stdout and stderr.
pub fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> Result<(Option<ExitStatus>, String, String)> {
    run_bounded_or_cancel(cmd, limit, &AtomicBool::new(false))
}

/// [`run_bounded`], and the command is also killed as soon as another thread sets `cancel`.
pub fn run_bounded_or_cancel(
    cmd: &mut Command,
    limit: Duration,
    cancel: &AtomicBool,
) -> Result<(Option<ExitStatus>, String, String)> {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {what}"))?;
    let mut child = Reaped(child);
    let (out, err) = (drain(child.0.stdout.take()), drain(child.0.stderr.take()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child
            .0
            .try_wait()
            .with_context(|| format!("wait for {what}"))?
        {
            break Some(st);
        }
        // On an interrupt the guard kills and reaps it.
        interrupt::check()?;
        if Instant::now() >= deadline || cancel.load(Ordering::Relaxed) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // Killed (if still running) and reaped here, so its pipes close and the readers end.
    drop(child);
    let text = |h: Option<JoinHandle<Vec<u8>>>| {
        h.and_then(|h| h.join().ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    };
    Ok((status, text(out), text(err)))
}

/// The last `n` non-empty lines of a text, for error messages.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
