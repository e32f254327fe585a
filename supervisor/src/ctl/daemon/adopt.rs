//! Re-adoption: the supervisor died, its servers did not. `keepnet up` (the `__daemon` it
//! starts) finds the state file of its instance with the supervisor gone and servers alive,
//! and takes them over instead of starting a second constellation on top of them.
//!
//! Nothing the dead supervisor held is lost, because every fd it owned is also open in some
//! server for that server's whole life (servers keep every fd they were handed, see
//! `keepnet_server::boot`). The new supervisor gets each one back with pidfd_getfd(2):
//!
//! | what | from (first live one) | how the fd number is found |
//! |---|---|---|
//! | server X's control block | X (`KEEPNET_CONTROL_FD`), ip (`peer.X`), or for ip: driver, udp, tcp (`peer.ip`) | /proc/PID/environ |
//! | `link` | driver, ip | `KEEPNET_REGIONS` |
//! | `transport.udp`, `transport.tcp` | udp / tcp, ip | `KEEPNET_REGIONS` |
//! | `udp.state`, `tcp.state` | udp / tcp | `KEEPNET_REGIONS` |
//! | doorbell eventfds of driver, udp, tcp | the server (`bell`), ip (`bell.X`) | `KEEPNET_FDS` |
//! | TAP fd / memory wire and its eventfds | driver (`tap` / `wire`, `wire.rx`, `wire.peer`) | `KEEPNET_FDS`, `KEEPNET_REGIONS` |
//! | hotplug socket pair of udp, tcp | the server (`hotplug`, `hotplug.supervisor`) | `KEEPNET_FDS` |
//! | each application's region | its transport server, else the application | /proc/PID/fd: the memfd `keepnet-INSTANCE-tcp-appN` |
//!
//! Every fd fetched is checked for what it must be (the memfd name, an eventfd, a socket,
//! /dev/net/tun) before its header is checked by the usual `open`. A region no live process
//! holds fails the re-adoption with its name, and the running servers are left alone.
//! A server is only taken for the one in the state file if its pid is alive with the start
//! time recorded (field 22 of /proc/PID/stat) and runs the binary recorded.
//!
//! Applications' control connections died with the old supervisor: each re-adopted
//! application is watched through a pidfd instead, and detached when it exits. Services are
//! watched the same way and restarted by the usual policy. A server that exited while no
//! supervisor watched is restarted at once (its exit status is unknown).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use keepnet_ipc::{Region, RegionKind};
use keepnet_server::app::AppLink;
use keepnet_server::wiring::{Link, TransportLink, TCP, UDP};
use keepnet_server::ControlBlock;
use keepnet_tcp::state::TcpState;
use tracing::{info, warn};

use super::super::apps::{memfd_of, region_name, AppConn, Apps};
use super::super::lab;
use super::super::procs;
use super::super::protocol::{ServerRecord, StateFile};
use super::super::services::ServiceProc;
use super::{
    binary_for, hotplug_drain, io, placement, unix_ms, Daemon, DaemonError, Options, Phase,
    ServerProc, TCP_APPS, TCP_APP_BUFFERS, UDP_APPS,
};
use crate::config::{Config, LinkBackend, WireSide, SERVERS};

/// What `up` finds for its instance.
pub(super) enum Survey {
    /// Nothing of it runs: start anew.
    Fresh,
    /// Its supervisor is gone and servers are alive: re-adopt them.
    Adopt(Box<StateFile>),
}

/// Reads the state file of `config`'s instance: a live supervisor is an error (never a
/// second constellation), live servers are re-adopted, and otherwise what is left of a dead
/// constellation (its services, the namespace it made) is cleared for a fresh start.
pub(super) fn survey(config: &Config) -> Result<Survey, DaemonError> {
    let path = super::super::state_path(&config.instance);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(Survey::Fresh);
    };
    let st: StateFile = match serde_json::from_str(&text) {
        Ok(st) => st,
        Err(e) => {
            warn!(%e, path = %path.display(), "unreadable state file: starting anew");
            return Ok(Survey::Fresh);
        }
    };
    if st.supervisor_pid != std::process::id() && st.supervisor_alive() {
        return Err(DaemonError::Running {
            instance: config.instance.clone(),
            pid: st.supervisor_pid,
        });
    }
    let records = records_of(&st, config);
    let alive: Vec<&str> = records
        .iter()
        .filter(|r| server_alive(r))
        .map(|r| r.name.as_str())
        .collect();
    if !alive.is_empty() {
        info!(
            instance = %config.instance,
            old_supervisor = st.supervisor_pid,
            servers = ?alive,
            "supervisor gone, servers alive: re-adopting"
        );
        return Ok(Survey::Adopt(Box::new(st)));
    }
    // A dead constellation: end its services (applications of no server now) and remove
    // the namespace it made, so the fresh one starts clean and owns it.
    for svc in &st.services {
        if svc.start != 0
            && procs::end_process(svc.pid, svc.start, std::time::Duration::from_secs(2))
        {
            info!(service = %svc.name, pid = svc.pid, "ended a service left by a dead constellation");
        }
    }
    if st.created_netns {
        if let Some(ns) = &st.netns {
            if let Err(e) = lab::netns_delete(ns) {
                warn!(%e, netns = %ns, "could not remove the namespace a dead constellation made");
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    Ok(Survey::Fresh)
}

/// One record per server, in `SERVERS` order, from the state file (an old file without
/// `procs` gives pids only; its binaries are the config's).
fn records_of(st: &StateFile, config: &Config) -> Vec<ServerRecord> {
    SERVERS
        .iter()
        .map(|&name| {
            let mut r = st
                .procs
                .iter()
                .find(|r| r.name == name)
                .cloned()
                .unwrap_or_else(|| ServerRecord {
                    name: name.to_string(),
                    pid: st
                        .servers
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0, |(_, p)| *p),
                    ..ServerRecord::default()
                });
            if r.binary.is_empty() {
                r.binary = binary_for(config, name)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default();
            }
            r
        })
        .collect()
}

/// True if `exe` (from /proc/PID/exe) is `binary`.
fn same_binary(exe: &Path, binary: &Path) -> bool {
    exe == binary || std::fs::canonicalize(binary).is_ok_and(|b| b == exe)
}

/// What /proc/PID/exe must say for the server of record `r`.
fn expected_exe(r: &ServerRecord) -> &Path {
    Path::new(if r.exe.is_empty() { &r.binary } else { &r.exe })
}

/// True if the server of record `r` runs: its pid alive with the recorded start time,
/// running the recorded executable.
fn server_alive(r: &ServerRecord) -> bool {
    r.pid != 0
        && procs::alive_as(r.pid, r.start)
        && procs::exe(r.pid).is_some_and(|e| same_binary(&e, expected_exe(r)))
}

/// Waits (at most 3 s) until server `name`'s control block shows a live instance running:
/// a live update that lost its supervisor finishes or falls back on its own. Then ends the
/// update's standby processes that did not take over (they withdraw by themselves too).
fn settle(name: &str, control: &ControlBlock, update_pids: &[u32]) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let pid = control.pid();
        if control.state() == Some(keepnet_server::ServerState::Running) && procs::alive_as(pid, 0)
        {
            break;
        }
        if std::time::Instant::now() >= end {
            warn!(
                server = name,
                state = ?control.state(),
                pid,
                "no instance runs after the interrupted update: restarting it"
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut pids: Vec<u32> = control.standby_pids().to_vec();
    pids.extend(update_pids.iter().skip(1));
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        // Started in standby for this constellation (one that hung before it registered,
        // too), and not the instance that serves.
        let standby = procs::environ(pid).is_ok_and(|e| {
            e.get("KEEPNET_STANDBY").map(String::as_str) == Some("1")
                && e.contains_key("KEEPNET_CONTROL_FD")
        });
        if pid != 0 && pid != control.pid() && standby {
            if let Ok(fd) = procs::pidfd_open(pid) {
                let _ = procs::pidfd_send_signal(
                    std::os::fd::AsFd::as_fd(&fd),
                    nix::sys::signal::Signal::SIGKILL,
                );
                info!(
                    server = name,
                    pid, "ended a standby left by the interrupted update"
                );
            }
        }
    }
    control.clear_handover();
}

/// A live server of the constellation being re-adopted: its pidfd and the fd numbers its
/// environment names.
struct Live {
    pid: u32,
    start: u64,
    pidfd: OwnedFd,
    control: Option<RawFd>,
    regions: BTreeMap<String, RawFd>,
    fds: BTreeMap<String, RawFd>,
}

/// `name=fd,name=fd` (KEEPNET_REGIONS, KEEPNET_FDS).
fn named(list: Option<&String>) -> BTreeMap<String, RawFd> {
    list.map(|l| {
        l.split(',')
            .filter_map(|item| {
                let (n, fd) = item.split_once('=')?;
                Some((n.trim().to_string(), fd.trim().parse().ok()?))
            })
            .collect()
    })
    .unwrap_or_default()
}

impl Live {
    /// Server process `pid` if it is the one recorded (alive, same start time unless
    /// `start` is 0, running `binary`); its pidfd is taken first, so the checks and every
    /// fd fetched later name this very process.
    fn find(pid: u32, start: u64, binary: &Path) -> Option<Live> {
        if pid == 0 {
            return None;
        }
        let pidfd = procs::pidfd_open(pid).ok()?;
        if !procs::alive_as(pid, start) {
            return None;
        }
        if !procs::exe(pid).is_some_and(|e| same_binary(&e, binary)) {
            return None;
        }
        let env = procs::environ(pid).ok()?;
        Some(Live {
            pid,
            start: if start == 0 {
                procs::start_time(pid).unwrap_or(0)
            } else {
                start
            },
            pidfd,
            control: env
                .get("KEEPNET_CONTROL_FD")
                .and_then(|v| v.trim().parse().ok()),
            regions: named(env.get("KEEPNET_REGIONS")),
            fds: named(env.get("KEEPNET_FDS")),
        })
    }
}

/// Where one of the dead supervisor's fds may be found: (server, which fd of it).
#[derive(Clone, Copy)]
enum Src {
    Control(&'static str),
    Region(&'static str, &'static str),
    Fd(&'static str, &'static str),
}

/// The live servers of the constellation being re-adopted, by name.
struct Servers(BTreeMap<&'static str, Live>);

impl Servers {
    /// The first of `sources` that a live server holds and that passes `check` (given what
    /// /proc says the fetched fd is). The error names `what` and why each source failed.
    fn grab(
        &self,
        what: &str,
        sources: &[Src],
        check: &dyn Fn(&str) -> bool,
    ) -> Result<OwnedFd, String> {
        let mut tried = Vec::new();
        for src in sources {
            let (server, fd, label) = match *src {
                Src::Control(s) => (s, self.0.get(s).and_then(|l| l.control), "control".into()),
                Src::Region(s, n) => (
                    s,
                    self.0.get(s).and_then(|l| l.regions.get(n).copied()),
                    format!("region {n}"),
                ),
                Src::Fd(s, n) => (
                    s,
                    self.0.get(s).and_then(|l| l.fds.get(n).copied()),
                    format!("fd {n}"),
                ),
            };
            let Some(live) = self.0.get(server) else {
                tried.push(format!("{server}: not running"));
                continue;
            };
            let Some(fd) = fd else {
                tried.push(format!("{server} (pid {}): has no {label}", live.pid));
                continue;
            };
            match procs::pidfd_getfd(live.pidfd.as_fd(), fd) {
                Ok(got) => {
                    let link = procs::own_fd_link(got.as_fd());
                    if check(&link) {
                        return Ok(got);
                    }
                    tried.push(format!(
                        "{server} (pid {}): its {label} (fd {fd}) is {link:?}",
                        live.pid
                    ));
                }
                Err(e) => tried.push(format!(
                    "{server} (pid {}): pidfd_getfd of its {label} (fd {fd}): {e}{}",
                    live.pid,
                    if e.kind() == std::io::ErrorKind::PermissionDenied {
                        " (needs root, or the same user with kernel.yama.ptrace_scope = 0)"
                    } else {
                        ""
                    }
                )),
            }
        }
        Err(format!(
            "{what} is held by no live server that can hand it over ({})",
            tried.join("; ")
        ))
    }
}

/// A check that an fd is the memfd of the region named `name`.
fn memfd(name: String) -> impl Fn(&str) -> bool {
    let want = memfd_of(&name);
    move |link| procs::memfd_name(link) == Some(want.as_str())
}

fn eventfd(link: &str) -> bool {
    link == "anon_inode:[eventfd]"
}

fn socket(link: &str) -> bool {
    link.starts_with("socket:[")
}

/// The region's memfds of apps of `label` in process `pid`: app id -> fd number there.
fn app_regions(pid: u32, instance: &str, label: &str) -> BTreeMap<u32, RawFd> {
    let prefix = memfd_of(&region_name(instance, label, 0));
    let prefix = prefix.trim_end_matches('0');
    procs::fd_links(pid)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(fd, link)| {
            let n = procs::memfd_name(&link)?.strip_prefix(prefix)?;
            Some((n.parse().ok()?, fd))
        })
        .collect()
}

impl Daemon {
    /// Re-adopts the constellation the state file `st` describes (see the module docs).
    /// On error nothing of it was touched.
    pub(super) fn adopt(opts: Options, st: StateFile) -> Result<Daemon, DaemonError> {
        let config = opts.config.clone();
        let instance = config.instance.clone();
        let fail = |why: String| DaemonError::Adopt {
            instance: instance.clone(),
            why,
        };
        let run_dir = super::super::run_dir(&instance);
        std::fs::create_dir_all(&run_dir).map_err(io(format!("create {}", run_dir.display())))?;
        if opts.netns.is_some() && opts.netns != st.netns {
            warn!(
                asked = ?opts.netns,
                running_in = ?st.netns,
                "the constellation runs in another namespace than --netns says: re-adopting it there"
            );
        }
        if let Some(ns) = &st.netns {
            lab::enter_netns(ns)?;
        }
        let records = records_of(&st, &config);

        // The live servers.
        let mut live = Servers(BTreeMap::new());
        for (&name, r) in SERVERS.iter().zip(&records) {
            if let Some(l) = Live::find(r.pid, r.start, expected_exe(r)) {
                live.0.insert(name, l);
            }
        }
        if live.0.is_empty() {
            return Err(fail("none of its servers runs any more".into()));
        }

        // Control blocks, first: a server started just before the old supervisor died may
        // run under a pid the state file does not have yet, but its control block does.
        let mut controls = Vec::new();
        for &name in SERVERS.iter() {
            let sources: Vec<Src> = if name == "ip" {
                vec![
                    Src::Control("ip"),
                    Src::Region("driver", "peer.ip"),
                    Src::Region("udp", "peer.ip"),
                    Src::Region("tcp", "peer.ip"),
                ]
            } else {
                let peer = match name {
                    "driver" => "peer.driver",
                    "udp" => "peer.udp",
                    _ => "peer.tcp",
                };
                vec![Src::Control(name), Src::Region("ip", peer)]
            };
            let fd = live
                .grab(
                    &format!("the control block of {name}"),
                    &sources,
                    &memfd(format!("{name}-control")),
                )
                .map_err(&fail)?;
            let region = Region::open(fd, RegionKind::CONTROL)
                .map_err(|e| fail(format!("the control block of {name}: {e}")))?;
            controls.push(
                ControlBlock::open(region)
                    .map_err(|e| fail(format!("the control block of {name}: {e}")))?,
            );
        }
        let mut records = records;
        for ((&name, r), control) in SERVERS.iter().zip(records.iter_mut()).zip(&controls) {
            // A live update was under way: let it settle (a reserved successor takes over
            // without a supervisor; one that was not reserved withdraws), then adopt
            // whichever instance serves.
            let updating = !r.update_pids.is_empty();
            if updating {
                settle(name, control, &r.update_pids);
            }
            let serving = control.pid();
            let moved_on = updating
                && serving != 0
                && procs::alive_as(serving, 0)
                && live.0.get(name).is_some_and(|l| l.pid != serving);
            if live.0.contains_key(name) && !moved_on {
                continue;
            }
            let pid = serving;
            if pid != 0 && pid != r.pid {
                // Its own control fd must be this very control block (a pid reused by
                // another instance's server runs the same binary).
                let same = |l: &Live| {
                    l.control.is_some_and(|n| {
                        let theirs = std::fs::metadata(format!("/proc/{pid}/fd/{n}"));
                        let ours = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(
                            &control.region().fd(),
                        ));
                        matches!((theirs, ours), (Ok(t), Ok(o))
                            if std::os::unix::fs::MetadataExt::ino(&t) == o.st_ino
                                && std::os::unix::fs::MetadataExt::dev(&t) == o.st_dev)
                    })
                };
                // An update's successor or rollback runs its own executable.
                let exe = if r.update_pids.contains(&pid) {
                    procs::exe(pid)
                } else {
                    Some(expected_exe(r).to_path_buf())
                };
                if let Some(l) = exe
                    .as_deref()
                    .and_then(|e| Live::find(pid, 0, e))
                    .filter(same)
                {
                    info!(
                        server = name,
                        pid, "found running under the pid its control block names"
                    );
                    if updating && r.update_pids.get(1) == Some(&pid) {
                        if let Some(b) = &r.update_binary {
                            r.binary = b.clone();
                        }
                    }
                    r.pid = pid;
                    r.start = l.start;
                    if let Some(e) = &exe {
                        r.exe = e.to_string_lossy().into_owned();
                    }
                    live.0.insert(name, l);
                }
            }
        }

        // Regions, bells, the link's device.
        let region = |what: &str, srcs: &[Src], kind: RegionKind| -> Result<Region, DaemonError> {
            let fd = live
                .grab(
                    &format!("region {what}"),
                    srcs,
                    &memfd(format!("{instance}-{what}")),
                )
                .map_err(&fail)?;
            Region::open(fd, kind).map_err(|e| fail(format!("region {what}: {e}")))
        };
        let shm = |what: &str, e: String| fail(format!("region {what}: {e}"));
        let link = Link::open(region(
            "link",
            &[Src::Region("driver", "link"), Src::Region("ip", "link")],
            RegionKind::RINGS,
        )?)
        .map_err(|e| shm("link", e.to_string()))?;
        let udp_link = TransportLink::open_for(
            region(
                "transport.udp",
                &[
                    Src::Region("udp", "transport.udp"),
                    Src::Region("ip", "transport.udp"),
                ],
                RegionKind::RINGS,
            )?,
            17,
            UDP,
        )
        .map_err(|e| shm("transport.udp", e.to_string()))?;
        let tcp_link = TransportLink::open_for(
            region(
                "transport.tcp",
                &[
                    Src::Region("tcp", "transport.tcp"),
                    Src::Region("ip", "transport.tcp"),
                ],
                RegionKind::RINGS,
            )?,
            6,
            TCP,
        )
        .map_err(|e| shm("transport.tcp", e.to_string()))?;
        let udp_state = keepnet_udp::state::SocketTable::open(region(
            "udp.state",
            &[Src::Region("udp", "udp.state")],
            RegionKind::GENERIC,
        )?)
        .map_err(|e| shm("udp.state", e.to_string()))?;
        let tcp_state = TcpState::open(region(
            "tcp.state",
            &[Src::Region("tcp", "tcp.state")],
            RegionKind::GENERIC,
        )?)
        .map_err(|e| shm("tcp.state", e.to_string()))?;
        let bell = |name: &'static str, peer: &'static str| {
            live.grab(
                &format!("the doorbell eventfd of {name}"),
                &[Src::Fd(name, "bell"), Src::Fd("ip", peer)],
                &eventfd,
            )
            .map_err(&fail)
        };
        let driver_bell = bell("driver", "bell.driver")?;
        let udp_bell = bell("udp", "bell.udp")?;
        let tcp_bell = bell("tcp", "bell.tcp")?;
        let mut tap = None;
        let mut wire = None;
        let mut wire_bells = None;
        match config.link.backend {
            LinkBackend::Tap => {
                tap = Some(
                    live.grab(
                        &format!("the TAP device {}", config.link.tap),
                        &[Src::Fd("driver", "tap")],
                        &|l: &str| l == "/dev/net/tun",
                    )
                    .map_err(&fail)?,
                );
            }
            LinkBackend::Wire => {
                let fd = live
                    .grab(
                        "region wire (the memory wire)",
                        &[Src::Region("driver", "wire")],
                        &|l: &str| {
                            procs::memfd_name(l)
                                .is_some_and(|n| n.starts_with("keepnet-") && n.ends_with("-wire"))
                        },
                    )
                    .map_err(&fail)?;
                let r = Region::open(fd, RegionKind::RINGS)
                    .map_err(|e| fail(format!("region wire: {e}")))?;
                wire = Some(
                    keepnet_driver::wire::Wire::open(r)
                        .map_err(|e| fail(format!("region wire: {e}")))?,
                );
                let rx = live
                    .grab(
                        "the memory wire's eventfd wire.rx",
                        &[Src::Fd("driver", "wire.rx")],
                        &eventfd,
                    )
                    .map_err(&fail)?;
                let peer = live
                    .grab(
                        "the memory wire's eventfd wire.peer",
                        &[Src::Fd("driver", "wire.peer")],
                        &eventfd,
                    )
                    .map_err(&fail)?;
                wire_bells = Some(match config.link.wire_side {
                    WireSide::A => (rx, peer),
                    WireSide::B => (peer, rx),
                });
            }
        }

        // The hotplug socket pairs and the applications.
        let mut apps = Vec::new();
        let mut forget: Vec<(usize, u32)> = Vec::new();
        for (k, (protocol, server, label, tx, rx)) in [
            (17u8, UDP, "udp", AppLink::DEFAULT_TX, AppLink::DEFAULT_RX),
            (6u8, TCP, "tcp", TCP_APP_BUFFERS.0, TCP_APP_BUFFERS.1),
        ]
        .into_iter()
        .enumerate()
        {
            let recorded_next = st
                .next_app
                .iter()
                .find(|(l, _)| l == label)
                .map_or(1, |(_, n)| *n);
            let mut set = match live.0.get(label) {
                Some(l) => {
                    let theirs = live
                        .grab(
                            &format!("the {label} server's end of its hotplug socket"),
                            &[Src::Fd(label, "hotplug")],
                            &socket,
                        )
                        .map_err(&fail)?;
                    let ours = live
                        .grab(
                            &format!(
                                "the supervisor's end of the {label} server's hotplug socket \
                                 (fd hotplug.supervisor: a server started by a keepnet \
                                 without re-adoption lacks it)"
                            ),
                            &[Src::Fd(label, "hotplug.supervisor")],
                            &socket,
                        )
                        .map_err(&fail)?;
                    let held = app_regions(l.pid, &instance, label);
                    let top = held.keys().max().map_or(0, |m| m + 1);
                    Apps::readopted(
                        protocol,
                        server,
                        label,
                        tx,
                        rx,
                        ours,
                        theirs,
                        recorded_next.max(top),
                    )
                    .map_err(io("hotplug socket"))?
                }
                // The server is gone, and its hotplug socket with it: a fresh pair for the
                // one about to start.
                None => {
                    let mut set = Apps::new(protocol, server, label, tx, rx)
                        .map_err(io("hotplug socket pair"))?;
                    set.start_ids_at(recorded_next);
                    set
                }
            };
            let held = live
                .0
                .get(label)
                .map(|l| app_regions(l.pid, &instance, label))
                .unwrap_or_default();
            let recorded: Vec<_> = st.apps.iter().filter(|a| a.protocol == protocol).collect();
            for a in &recorded {
                match adopt_app(&live, label, &held, a, &instance) {
                    Ok(conn) => {
                        info!(
                            app = a.app,
                            pid = a.pid,
                            server = label,
                            "application re-adopted"
                        );
                        set.adopt(conn);
                    }
                    Err(why) => {
                        warn!(app = a.app, pid = a.pid, server = label, %why, "application not re-adopted: detached");
                        forget.push((k, a.app));
                    }
                }
            }
            // Regions the server holds for applications the state file does not know: their
            // attach never got its answer.
            for &app in held.keys() {
                if !recorded.iter().any(|a| a.app == app) {
                    forget.push((k, app));
                }
            }
            apps.push(set);
        }

        // The servers, as the supervisor tracks them.
        let opts_per_server = placement(&config);
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut servers = Vec::new();
        let mut dead = Vec::new();
        for (((&name, r), control), run) in SERVERS
            .iter()
            .zip(&records)
            .zip(controls)
            .zip(opts_per_server)
        {
            let mut control = control;
            let bell = match name {
                "driver" => Some(&driver_bell),
                "udp" => Some(&udp_bell),
                "tcp" => Some(&tcp_bell),
                _ => None,
            };
            if let Some(b) = bell {
                control = control.with_bell_eventfd(b.try_clone().map_err(io("dup eventfd"))?);
            }
            // The dead supervisor's ends of the control rings are ours now (its pid may
            // have been reused: release them by its pid rather than trust the takeover).
            for ring in [control.commands(), control.replies()]
                .into_iter()
                .flatten()
            {
                ring.release_claims_of(st.supervisor_pid);
            }
            let binary = PathBuf::from(&r.binary);
            let mut s = ServerProc::new(name, binary, control, run, &config)?;
            // Replies to the dead supervisor's commands are nobody's; new sequence numbers
            // start far from its.
            while let Ok(Some(_)) = s.replies.pop() {}
            s.seq = (now_ms as u32) | 0x8000_0000;
            s.restarts = r.restarts;
            s.last_exit = r.last_exit.clone();
            s.last_recovery_us = r.last_recovery_us;
            s.failed_starts = r.failed_starts;
            s.history = r
                .restart_times_unix_ms
                .iter()
                .filter_map(|&t| {
                    let ago = std::time::Duration::from_millis(now_ms.saturating_sub(t));
                    (ago < s.sup.window).then(|| now.checked_sub(ago)).flatten()
                })
                .collect();
            match live.0.remove(name) {
                Some(l) => {
                    s.child = Some(procs::Proc::Adopted { pid: l.pid });
                    s.start = l.start;
                    s.exe = procs::exe(l.pid);
                    s.pidfd = Some(l.pidfd);
                    s.started = procs::age(l.pid)
                        .and_then(|a| now.checked_sub(a))
                        .unwrap_or(now);
                    let running = s.control.state() == Some(keepnet_server::ServerState::Running)
                        && s.control.pid() == l.pid;
                    s.phase = if running { Phase::Up } else { Phase::Starting };
                    s.beat = (s.control.heartbeat(), now);
                }
                None => match r.phase.as_str() {
                    "failed" => {
                        s.phase = Phase::Failed(r.detail.clone().unwrap_or_default());
                    }
                    "stopped" => {
                        s.phase = Phase::Stopped(r.detail.clone().unwrap_or_default());
                    }
                    _ => dead.push((servers.len(), r.pid)),
                },
            }
            servers.push(s);
        }

        let mut services: Vec<ServiceProc> = config
            .services
            .iter()
            .cloned()
            .map(ServiceProc::new)
            .collect();
        for svc in &mut services {
            let Some(rec) = st.services.iter().find(|r| r.name == svc.cfg.name) else {
                continue;
            };
            svc.restarts = rec.restarts;
            svc.last_exit = rec.last_exit.clone();
            if rec.pid != 0 && svc.adopt(rec.pid, rec.start) {
                continue;
            }
            // Gone while no supervisor watched it: started again by the usual policy.
            if rec.pid != 0 {
                svc.last_exit = Some(procs::STATUS_UNKNOWN.to_string());
            }
            svc.start_soon();
        }

        let started_unix_ms = if st.started_unix_ms == 0 {
            now_ms
        } else {
            st.started_unix_ms
        };
        let mut d = Daemon {
            opts: Options {
                config: config.clone(),
                netns: st.netns.clone(),
            },
            started: now
                .checked_sub(std::time::Duration::from_millis(
                    now_ms.saturating_sub(started_unix_ms),
                ))
                .unwrap_or(now),
            started_unix_ms,
            adopted: None,
            link,
            udp_link,
            udp_state,
            tap,
            wire,
            wire_bells,
            driver_bell,
            udp_bell,
            tcp_link,
            tcp_state,
            tcp_bell,
            apps,
            services,
            servers,
            created_netns: st.created_netns,
            listener: None,
            run_dir,
            last_restart_all: None,
            last_watch: Instant::now(),
            // Until the end: a failure on the way leaves the servers alone.
            disowned: true,
            lock: None,
            update: None,
            leftovers: Vec::new(),
        };
        debug_assert_eq!(d.apps[UDP_APPS].label, "udp");
        debug_assert_eq!(d.apps[TCP_APPS].label, "tcp");

        // Applications that went away while no supervisor watched them.
        for (k, app) in forget {
            let label = d.apps[k].label;
            let server = d.servers.iter().position(|s| s.name == label);
            let (apps, servers) = (&mut d.apps, &mut d.servers);
            let mut drain = || server.is_some_and(|i| hotplug_drain(&mut servers[i]));
            apps[k].forget(app, &mut drain);
        }

        d.bind_control_socket()?;
        d.disowned = false;
        // Servers that exited while no supervisor watched: restarted as after any exit.
        let mut restarted = Vec::new();
        for (i, pid) in dead {
            let s = &mut d.servers[i];
            s.child = Some(procs::Proc::Adopted { pid });
            s.started = now.checked_sub(s.sup.min_runtime).unwrap_or(now);
            restarted.push(s.name);
            d.on_exit(i, None);
        }
        let pids: Vec<String> = d
            .servers
            .iter()
            .map(|s| format!("{} {}", s.name, s.pid()))
            .collect();
        let apps_n: usize = d.apps.iter().map(|a| a.conns.len()).sum();
        let services_n = d
            .services
            .iter()
            .filter(|s| s.child.as_ref().is_some_and(procs::Proc::adopted))
            .count();
        let summary = format!(
            "{} ({}); {apps_n} application{} and {services_n} service{} re-adopted",
            pids.join(", "),
            if restarted.is_empty() {
                "no server restarted".to_string()
            } else {
                format!(
                    "restarted {}: exited while no supervisor watched",
                    restarted.join(", ")
                )
            },
            if apps_n == 1 { "" } else { "s" },
            if services_n == 1 { "" } else { "s" },
        );
        d.write_state()?;
        info!(
            instance = %instance,
            old_supervisor = st.supervisor_pid,
            %summary,
            "re-adopted"
        );
        d.adopted = Some(summary);
        Ok(d)
    }
}

/// Re-adopts application record `a` of transport server `label`: its region from the server
/// (`held`: app id -> fd there) or else from the application itself, its process watched
/// through a pidfd. An error says why not (it is then detached).
fn adopt_app(
    live: &Servers,
    label: &str,
    held: &BTreeMap<u32, RawFd>,
    a: &super::super::protocol::AppRecord,
    instance: &str,
) -> Result<AppConn, String> {
    let pidfd = procs::pidfd_open(a.pid).map_err(|e| format!("pid {} is gone ({e})", a.pid))?;
    if !procs::alive_as(a.pid, a.start) {
        return Err(format!("pid {} exited", a.pid));
    }
    let want = memfd_of(&region_name(instance, label, a.app));
    if want != a.region {
        warn!(app = a.app, recorded = %a.region, expected = %want, "the state file names another region");
    }
    let from_server = live.0.get(label).and_then(|l| {
        let fd = *held.get(&a.app)?;
        procs::pidfd_getfd(l.pidfd.as_fd(), fd).ok()
    });
    let fd = match from_server {
        Some(fd) => fd,
        None => {
            // The server is gone (or lost it): the application holds its region too.
            let fds = procs::fd_links(a.pid).map_err(|e| format!("its fds: {e}"))?;
            let n = fds
                .iter()
                .find(|(_, l)| procs::memfd_name(l) == Some(want.as_str()))
                .map(|(fd, _)| *fd)
                .ok_or_else(|| format!("no live process holds its region {want}"))?;
            procs::pidfd_getfd(pidfd.as_fd(), n)
                .map_err(|e| format!("pidfd_getfd of its region in the application: {e}"))?
        }
    };
    if procs::memfd_name(&procs::own_fd_link(fd.as_fd())) != Some(want.as_str()) {
        return Err(format!("the fd fetched is not its region {want}"));
    }
    let region = Region::open(fd, RegionKind::RINGS).map_err(|e| format!("its region: {e}"))?;
    let link = AppLink::open(region).map_err(|e| format!("its region: {e}"))?;
    if link.app() != a.app {
        return Err(format!("its region says app {}", link.app()));
    }
    Ok(AppConn {
        app: a.app,
        stream: None,
        pidfd: Some(pidfd),
        link,
        pid: a.pid,
        uid: a.uid,
        start: a.start,
    })
}
