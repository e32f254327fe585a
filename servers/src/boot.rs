//! How a server process is started: the environment contract between the supervisor (or a
//! test acting as one) and a server binary.
//!
//! | variable | meaning |
//! |---|---|
//! | `KEEPNET_CONTROL_FD` | fd number of the server's control region (inherited) |
//! | `KEEPNET_REGIONS` | other inherited regions, `name=fd,name=fd` |
//! | `KEEPNET_FDS` | other inherited fds (eventfds, devices, sockets), `name=fd,name=fd`; `bell` is the eventfd of this server's own doorbell, `bell.NAME` a peer's, `hotplug` the server's end of its hotplug socket and `hotplug.supervisor` the supervisor's (kept, never used) |
//! | `KEEPNET_CORE` | core to pin to, or `none` |
//! | `KEEPNET_SPIN_NS` | spin budget before parking, in ns, or `forever` (dedicated core) |
//! | `KEEPNET_PARK_TIMEOUT_MS` | longest park; bounds the heartbeat period while idle |
//! | `KEEPNET_STANDBY` | `1`: start as a live-update successor and wait for the handover |
//! | `KEEPNET_LOG` | tracing filter (`info`, `keepnet=debug`, ...) |
//!
//! Every inherited fd stays open at its number for the life of the process, whether the
//! server took it or not (regions, eventfds, the TAP, both ends of the hotplug socket): the
//! supervisor may die, and the one started after it gets each fd back from the servers
//! (pidfd_getfd(2), the numbers from /proc/PID/environ). A server never closes and reuses
//! the number of an fd it was handed.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::Command;
use std::time::Duration;

use keepnet_ipc::{Region, RegionError, RegionKind, SpinPolicy};

use crate::control::{ControlBlock, ControlError};
use crate::runtime::RunOptions;

/// Why a server could not start from its environment.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{var} is not set: this program is a keepnet server and is started by the supervisor")]
    Missing { var: &'static str },
    #[error("{var}={value:?} is invalid: {why}")]
    Invalid {
        var: &'static str,
        value: String,
        why: String,
    },
    #[error("inherited fd for {what}: {source}")]
    Fd {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("region {name}: {source}")]
    Region {
        name: String,
        #[source]
        source: RegionError,
    },
    #[error("no region named {0:?} was handed to this server")]
    NoRegion(String),
    #[error("control region: {0}")]
    Control(#[from] ControlError),
}

/// What a server starts with: its control block, the regions handed to it, run options.
pub struct Boot {
    control: ControlBlock,
    regions: BTreeMap<String, OwnedFd>,
    /// Regions mapped ahead (a standby successor: see [`Boot::premap`]).
    mapped: BTreeMap<String, Region>,
    fds: BTreeMap<String, OwnedFd>,
    options: RunOptions,
}

fn var(name: &'static str) -> Result<Option<String>, BootError> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(BootError::Invalid {
            var: name,
            value: v.to_string_lossy().into_owned(),
            why: "not UTF-8".into(),
        }),
    }
}

fn parse_fd(var: &'static str, s: &str) -> Result<RawFd, BootError> {
    s.trim().parse::<RawFd>().map_err(|e| BootError::Invalid {
        var,
        value: s.into(),
        why: e.to_string(),
    })
}

impl Boot {
    /// Reads the environment contract above.
    pub fn from_env() -> Result<Boot, BootError> {
        let cfd = var("KEEPNET_CONTROL_FD")?.ok_or(BootError::Missing {
            var: "KEEPNET_CONTROL_FD",
        })?;
        let cfd = parse_fd("KEEPNET_CONTROL_FD", &cfd)?;
        let owned = keepnet_ipc::fdpass::take_inherited(cfd).map_err(|source| BootError::Fd {
            what: "control".into(),
            source,
        })?;
        let region =
            Region::open(owned, RegionKind::CONTROL).map_err(|source| BootError::Region {
                name: "control".into(),
                source,
            })?;
        let control = ControlBlock::open(region)?;
        let regions = named_fds("KEEPNET_REGIONS")?;
        let mut fds = named_fds("KEEPNET_FDS")?;
        let control = match fds.remove("bell") {
            Some(fd) => control.with_bell_eventfd(fd),
            None => control,
        };
        let core = match var("KEEPNET_CORE")?.as_deref().map(str::trim) {
            None | Some("") | Some("none") => None,
            Some(c) => Some(c.parse::<usize>().map_err(|e| BootError::Invalid {
                var: "KEEPNET_CORE",
                value: c.into(),
                why: e.to_string(),
            })?),
        };
        let spin = match var("KEEPNET_SPIN_NS")?.as_deref().map(str::trim) {
            None | Some("") => SpinPolicy::PARK_AT_ONCE,
            Some("forever") => SpinPolicy::never_park(),
            Some(n) => {
                SpinPolicy::spin_for(Duration::from_nanos(n.parse::<u64>().map_err(|e| {
                    BootError::Invalid {
                        var: "KEEPNET_SPIN_NS",
                        value: n.into(),
                        why: e.to_string(),
                    }
                })?))
            }
        };
        let park_timeout = match var("KEEPNET_PARK_TIMEOUT_MS")?.as_deref().map(str::trim) {
            None | Some("") => RunOptions::default().park_timeout,
            Some(n) => Duration::from_millis(n.parse::<u64>().map_err(|e| BootError::Invalid {
                var: "KEEPNET_PARK_TIMEOUT_MS",
                value: n.into(),
                why: e.to_string(),
            })?),
        };
        let standby = matches!(var("KEEPNET_STANDBY")?.as_deref().map(str::trim), Some("1"));
        Ok(Boot {
            control,
            regions,
            mapped: BTreeMap::new(),
            fds,
            options: RunOptions {
                core,
                spin,
                park_timeout,
                standby,
            },
        })
    }

    /// The server's control block.
    pub fn control(&self) -> &ControlBlock {
        &self.control
    }

    /// Run options from the environment.
    pub fn options(&self) -> &RunOptions {
        &self.options
    }

    /// Standby: maps every region handed over now, so that the build after the handover
    /// finds them mapped (no mmap in the blackout); the applications' regions handed over as
    /// `app.ID` are mapped with their pages in, for the attach after the handover. A region that
    /// does not map stays for [`Boot::region`] to report.
    pub fn premap(&mut self) {
        let names: Vec<String> = self.regions.keys().cloned().collect();
        for name in names {
            let Some(fd) = self.regions.get(&name) else {
                continue;
            };
            let Ok(dup) = fd.try_clone() else { continue };
            // The inherited fd itself stays open at its number for the process's life (a
            // re-adopting supervisor fetches it there); the mapping holds a duplicate.
            // Applications' regions (`app.ID`, a few MiB each) get their pages faulted in now:
            // the successor maps them again from the hotplug socket's fds, and finds these.
            let app = name.starts_with("app.");
            let small = std::fs::File::from(match fd.try_clone() {
                Ok(f) => f,
                Err(_) => continue,
            })
            .metadata()
            .is_ok_and(|m| m.len() <= POPULATE_LIMIT);
            if let Ok(r) = Region::premap(dup, app || small) {
                if !app {
                    self.mapped.insert(name, r);
                }
            }
        }
    }

    /// Maps the region handed over under `name` (each can be taken once).
    pub fn region(&mut self, name: &str, kind: RegionKind) -> Result<Region, BootError> {
        if let Some(r) = self.mapped.remove(name) {
            r.check_kind(kind).map_err(|source| BootError::Region {
                name: name.into(),
                source,
            })?;
            return Ok(r);
        }
        let fd = self
            .regions
            .remove(name)
            .ok_or_else(|| BootError::NoRegion(name.into()))?;
        Region::open(fd, kind).map_err(|source| BootError::Region {
            name: name.into(),
            source,
        })
    }

    /// Takes the inherited fd handed over under `name` (each can be taken once).
    pub fn fd(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.remove(name)
    }

    /// The doorbell of a peer server, to ring after publishing to it: its control block
    /// handed over as region `region`, with its eventfd `fd` when it parks in poll. `None`
    /// (with a warning) when the region was not handed over.
    pub fn peer_doorbell(
        &mut self,
        region: &str,
        fd: &str,
    ) -> Result<Option<keepnet_ipc::Doorbell>, crate::ServerError> {
        match self.region(region, RegionKind::CONTROL) {
            Ok(r) => {
                let bell = ControlBlock::open(r)?.doorbell().clone();
                Ok(Some(match self.fd(fd) {
                    Some(efd) => bell.with_eventfd(efd),
                    None => bell,
                }))
            }
            Err(BootError::NoRegion(_)) => {
                tracing::warn!("no {region} region: that peer is not woken when we publish to it");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The hotplug socket handed over as fd `name`, if any (with a warning if not: no
    /// application can attach).
    pub fn hotplug(
        &mut self,
        name: &str,
    ) -> Result<Option<crate::app::HotplugSocket>, crate::ServerError> {
        match self.fd(name) {
            Some(fd) => crate::app::HotplugSocket::new(fd)
                .map(Some)
                .map_err(|e| crate::ServerError::Fatal(format!("{name} socket: {e}"))),
            None => {
                tracing::warn!("no {name} fd: no application can attach");
                Ok(None)
            }
        }
    }

    /// The control block and run options; every inherited fd no part of the server took is
    /// kept open for the life of the process (see [`keep_for_life`]).
    pub(crate) fn into_parts(mut self) -> (ControlBlock, RunOptions) {
        let left = std::mem::take(&mut self.regions)
            .into_values()
            .chain(std::mem::take(&mut self.fds).into_values());
        keep_for_life(left);
        (self.control, self.options)
    }
}

/// Regions up to this size are mapped by a standby with their pages faulted in (the
/// transport pools, the udp socket table, control blocks); larger ones (the tcp state table)
/// would take long and pin memory the server may never touch.
const POPULATE_LIMIT: u64 = 16 << 20;

/// Inherited fds nobody took, open until the process exits.
static KEPT: std::sync::Mutex<Vec<OwnedFd>> = std::sync::Mutex::new(Vec::new());

/// Keeps `fds` open until the process exits. Every fd the supervisor hands a server stays
/// open in it for its whole life, taken or not (the supervisor's end of the hotplug socket,
/// `hotplug.supervisor`, is one no server uses): a supervisor that dies loses nothing, and
/// its successor fetches each one back from the server with pidfd_getfd(2), at the number
/// the server's environment names.
pub fn keep_for_life(fds: impl IntoIterator<Item = OwnedFd>) {
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    kept.extend(fds);
}

fn named_fds(var_name: &'static str) -> Result<BTreeMap<String, OwnedFd>, BootError> {
    let mut out = BTreeMap::new();
    let Some(list) = var(var_name)? else {
        return Ok(out);
    };
    for item in list.split(',').filter(|s| !s.trim().is_empty()) {
        let (name, fd) = item.split_once('=').ok_or_else(|| BootError::Invalid {
            var: var_name,
            value: list.clone(),
            why: format!("{item:?} is not name=fd"),
        })?;
        let fd = parse_fd(var_name, fd)?;
        let owned = keepnet_ipc::fdpass::take_inherited(fd).map_err(|source| BootError::Fd {
            what: name.into(),
            source,
        })?;
        out.insert(name.to_string(), owned);
    }
    Ok(out)
}

/// Supervisor side: sets up `cmd` to start a server with `control`, the named `regions` and
/// `options`, per the environment contract above.
pub fn prepare(
    cmd: &mut Command,
    control: &ControlBlock,
    regions: &[(&str, &Region)],
    options: &RunOptions,
) {
    prepare_with_fds(cmd, control, regions, &[], options)
}

/// [`prepare`], also handing over other fds by name (`bell`, `bell.driver`, a TAP fd...).
pub fn prepare_with_fds(
    cmd: &mut Command,
    control: &ControlBlock,
    regions: &[(&str, &Region)],
    other: &[(&str, BorrowedFd<'_>)],
    options: &RunOptions,
) {
    let mut fds = vec![control.region().fd()];
    let mut list = Vec::new();
    for (name, r) in regions {
        fds.push(r.fd());
        list.push(format!("{name}={}", r.fd().as_raw_fd()));
    }
    let mut extra = Vec::new();
    for (name, fd) in other {
        fds.push(fd.as_fd());
        extra.push(format!("{name}={}", fd.as_raw_fd()));
    }
    keepnet_ipc::fdpass::inherit_fds(cmd, &fds);
    let core = options
        .core
        .map_or_else(|| "none".to_string(), |c| c.to_string());
    let spin = options
        .spin
        .spin
        .map_or_else(|| "forever".to_string(), |d| d.as_nanos().to_string());
    cmd.env(
        "KEEPNET_CONTROL_FD",
        control.region().fd().as_raw_fd().to_string(),
    )
    .env("KEEPNET_REGIONS", list.join(","))
    .env("KEEPNET_FDS", extra.join(","))
    .env("KEEPNET_CORE", core)
    .env("KEEPNET_SPIN_NS", spin)
    .env(
        "KEEPNET_PARK_TIMEOUT_MS",
        options.park_timeout.as_millis().to_string(),
    )
    .env("KEEPNET_STANDBY", if options.standby { "1" } else { "0" });
}
