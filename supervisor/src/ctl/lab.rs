//! Network namespaces and the `ip` command.

use std::path::Path;
use std::process::Command;

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`ip` is not installed (package iproute2): {0}")]
    NoIp(std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("cannot enter network namespace {name}: {source}")]
    Enter {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `ip ARGS`, returning stdout.
pub fn ip(args: &[&str]) -> Result<String, LabError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(LabError::NoIp)?;
    if !out.status.success() {
        return Err(LabError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True if the named namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Creates a namespace; returns true if it was created, false if it already existed.
pub fn netns_ensure(name: &str) -> Result<bool, LabError> {
    if netns_exists(name) {
        return Ok(false);
    }
    ip(&["netns", "add", name])?;
    // Loopback up, so local tools work inside.
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(true)
}

/// Deletes a namespace (ignores one that is already gone).
pub fn netns_delete(name: &str) -> Result<(), LabError> {
    if !netns_exists(name) {
        return Ok(());
    }
    ip(&["netns", "del", name]).map(|_| ())
}

/// Moves the calling thread into a namespace; processes it spawns afterwards start there.
pub fn enter_netns(name: &str) -> Result<(), LabError> {
    let path = Path::new("/run/netns").join(name);
    let f = std::fs::File::open(&path).map_err(|source| LabError::Enter {
        name: name.into(),
        source,
    })?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| LabError::Enter {
        name: name.into(),
        source: e.into(),
    })
}

/// True if a network device of that name exists in the current namespace.
pub fn link_exists(dev: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", dev])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs a command inside a namespace (`ip netns exec`), returning (success, stdout, stderr).
pub fn netns_exec(ns: &str, cmd: &[&str]) -> std::io::Result<(bool, String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}
