//! Handing file descriptors to a child process by inheritance (DESIGN rule 1): the parent
//! clears close-on-exec on exactly the fds it names, in the child only
//! ([`keepnet_ipc::fdpass::inherit_fds`]), and tells the child their numbers in
//! [`FDS_ENV`] as `name=number,...`. The child adopts each number once, by name.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Context, Error, Result};

/// The environment variable that carries the inherited fd numbers.
pub const FDS_ENV: &str = "KEEPNET_BENCH_FDS";

/// Parent side: named fds for one child. Keep it alive until the child has been spawned, then
/// drop it so that the parent closes its copies (a pipe then reports EOF when the child dies).
#[derive(Debug, Default)]
pub struct HandOff {
    fds: Vec<(&'static str, OwnedFd)>,
}

impl HandOff {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hand-off of one region under the name `region`.
    pub fn with_region(region: &keepnet_ipc::Region) -> Result<HandOff> {
        let mut h = HandOff::new();
        h.add(
            "region",
            region
                .fd()
                .try_clone_to_owned()
                .context("duplicating the region fd")?,
        );
        Ok(h)
    }

    /// Adds an fd under `name` (lowercase letters, digits and `_`).
    pub fn add(&mut self, name: &'static str, fd: impl Into<OwnedFd>) -> &mut Self {
        self.fds.push((name, fd.into()));
        self
    }

    /// `name=number,...` for [`FDS_ENV`].
    pub fn env_value(&self) -> String {
        self.fds
            .iter()
            .map(|(n, fd)| format!("{n}={}", fd.as_raw_fd()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Makes `cmd`'s child inherit these fds and learn their numbers.
    pub fn apply(&self, cmd: &mut Command) {
        let borrowed: Vec<_> = self.fds.iter().map(|(_, fd)| fd.as_fd()).collect();
        keepnet_ipc::fdpass::inherit_fds(cmd, &borrowed);
        cmd.env(FDS_ENV, self.env_value());
    }
}

/// Child side: the fds named in [`FDS_ENV`], not yet adopted.
#[derive(Debug)]
pub struct Inherited {
    fds: HashMap<String, RawFd>,
}

static PARSED: AtomicBool = AtomicBool::new(false);

impl Inherited {
    /// Reads [`FDS_ENV`]. Succeeds at most once per process, so that no number can be adopted
    /// twice.
    pub fn from_env() -> Result<Inherited> {
        if PARSED.swap(true, Ordering::SeqCst) {
            return Err(Error::Protocol(format!(
                "{FDS_ENV} was already read in this process"
            )));
        }
        let value = std::env::var(FDS_ENV).map_err(|_| {
            Error::Peer(format!(
                "{FDS_ENV} is not set: this subcommand is started by keepnet itself"
            ))
        })?;
        Ok(Inherited {
            fds: parse(&value)?,
        })
    }

    /// Adopts the fd named `name`: checks that it is open, makes it close-on-exec again, and
    /// takes ownership of it.
    pub fn take(&mut self, name: &str) -> Result<OwnedFd> {
        let fd = self.fds.remove(name).ok_or_else(|| {
            Error::Protocol(format!("no inherited fd named {name:?} in {FDS_ENV}"))
        })?;
        keepnet_ipc::fdpass::take_inherited(fd)
            .with_context(|| format!("adopting inherited fd {name}={fd}"))
    }
}

fn parse(value: &str) -> Result<HashMap<String, RawFd>> {
    let bad = |why: &str| Error::Protocol(format!("bad {FDS_ENV} value {value:?}: {why}"));
    let mut fds = HashMap::new();
    for item in value.split(',').filter(|s| !s.is_empty()) {
        let (name, num) = item
            .split_once('=')
            .ok_or_else(|| bad("expected name=number"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(bad("names are [a-z0-9_]+"));
        }
        let fd: RawFd = num.parse().map_err(|_| bad("fd numbers are integers"))?;
        if fd <= 2 {
            return Err(bad("fds 0-2 are stdio, not inherited fds"));
        }
        if fds.values().any(|&v| v == fd) || fds.insert(name.to_string(), fd).is_some() {
            return Err(bad("duplicate name or number"));
        }
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_numbers() {
        let m = parse("ctl=5,region=7").map_err(|e| e.to_string());
        let m = m
            .as_ref()
            .map(|m| (m.get("ctl").copied(), m.get("region").copied()));
        assert_eq!(m, Ok((Some(5), Some(7))));
    }

    #[test]
    fn rejects_garbage() {
        for v in ["ctl", "ctl=x", "ctl=1", "Ctl=5", "a=5,b=5", "a=5,a=6", "=5"] {
            assert!(parse(v).is_err(), "{v} should be rejected");
        }
    }
}
