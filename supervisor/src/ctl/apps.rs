//! Attached applications: the supervisor's side of the attach protocol
//! (`keepnet_server::app`) and of the transport servers' hotplug sockets (one [`Apps`] per server: udp and tcp).
//!
//! An application connects to the control socket and asks to attach. The supervisor reads its
//! credentials (SO_PEERCRED), makes it a region of its own ([`AppLink`]), hands that region
//! to its transport server over the hotplug socket, and only then answers the application with the
//! region and its transport server's doorbell eventfd. The connection stays open: when it reaches
//! EOF (the application closed it, exited or was killed) the supervisor tells its transport server
//! to close the application's sockets and drops the region.
//!
//! The supervisor also writes on an application's control connection: one JSON line
//! ([`AppNotice`]) when its transport server fails for good (`server_failed`, the restart
//! intensity limit reached) and when it serves again after that (`server_back`), so that the
//! library fails the calls that would otherwise wait for ever ([`Apps::server_failed`],
//! [`Apps::server_back`]). Writes never block: a connection with a full buffer misses them.
//!
//! The hotplug socket is a SOCK_SEQPACKET pair: one packet per [`Hotplug`] message, the app's
//! region riding along with `Attach`. Its queue is short (net.unix.max_dgram_qlen, 10 by
//! default), so every send that finds it full first lets the server drain it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use keepnet_ipc::EndpointId;
use keepnet_server::app::{AppLink, AppNotice, Hotplug};
use tracing::{debug, info, warn};

/// The name of application `app`'s region on transport server `label` of `instance`. Its
/// memfd is called `keepnet-` and this (/proc/PID/fd shows `/memfd:keepnet-NAME (deleted)`
/// in the server and in the application): unique in the instance, and how a re-adopting
/// supervisor finds it among a server's fds.
pub fn region_name(instance: &str, label: &str, app: u32) -> String {
    format!("{instance}-{label}-app{app}")
}

/// The memfd name of a region named `name` (see `keepnet_ipc::Region::create`).
pub fn memfd_of(name: &str) -> String {
    format!("keepnet-{name}")
}

/// One attached application.
pub struct AppConn {
    /// The application id.
    pub app: u32,
    /// The control connection; its EOF detaches the application. None for an application
    /// re-adopted from a supervisor that died (its connection died with it): `pidfd`
    /// watches it instead.
    pub stream: Option<UnixStream>,
    /// A pidfd on the application (re-adopted ones): readable once it has exited, which
    /// detaches it.
    pub pidfd: Option<OwnedFd>,
    /// The application's region.
    pub link: AppLink,
    /// The application's pid and uid (SO_PEERCRED at attach).
    pub pid: u32,
    pub uid: u32,
    /// Its start time (field 22 of /proc/PID/stat; 0 if unknown), for the state file.
    pub start: u64,
}

impl AppConn {
    /// The fd the serve loop polls for this application: its control connection (EOF), or
    /// for a re-adopted one its pidfd (exit).
    pub fn watch_fd(&self) -> Option<BorrowedFd<'_>> {
        self.stream
            .as_ref()
            .map(|s| s.as_fd())
            .or_else(|| self.pidfd.as_ref().map(|f| f.as_fd()))
    }
}

/// Every attached application and the supervisor's end of the hotplug socket.
pub struct Apps {
    /// The IP protocol its applications use (17 udp, 6 tcp).
    pub protocol: u8,
    /// The transport server serving them: its endpoint and name.
    server: EndpointId,
    pub label: &'static str,
    tx: u32,
    rx: u32,
    next: u32,
    /// Attached applications by id.
    pub conns: BTreeMap<u32, AppConn>,
    /// The server failed for good and its applications were told so (`server_failed`): why.
    down: Option<String>,
    ours: UnixStream,
    theirs: OwnedFd,
}

impl Apps {
    /// A fresh table and hotplug socket pair.
    pub fn new(
        protocol: u8,
        server: EndpointId,
        label: &'static str,
        tx: u32,
        rx: u32,
    ) -> std::io::Result<Apps> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(std::io::Error::from)?;
        let ours = UnixStream::from(a);
        ours.set_nonblocking(true)?;
        Ok(Apps {
            protocol,
            server,
            label,
            tx,
            rx,
            next: 1,
            conns: BTreeMap::new(),
            down: None,
            ours,
            theirs: b,
        })
    }

    /// A table re-adopted from a supervisor that died: the hotplug socket pair fetched back
    /// from the server (`ours` was its `hotplug.supervisor`, `theirs` its `hotplug`), ids
    /// handed out from `next` on; the applications come with [`Apps::adopt`].
    #[allow(clippy::too_many_arguments)]
    pub fn readopted(
        protocol: u8,
        server: EndpointId,
        label: &'static str,
        tx: u32,
        rx: u32,
        ours: OwnedFd,
        theirs: OwnedFd,
        next: u32,
    ) -> std::io::Result<Apps> {
        let ours = UnixStream::from(ours);
        ours.set_nonblocking(true)?;
        Ok(Apps {
            protocol,
            server,
            label,
            tx,
            rx,
            next: next.max(1),
            conns: BTreeMap::new(),
            down: None,
            ours,
            theirs,
        })
    }

    /// Adds an application re-adopted from a supervisor that died (its region fetched back,
    /// its process watched through `conn.pidfd`).
    pub fn adopt(&mut self, conn: AppConn) {
        self.next = self.next.max(conn.app.saturating_add(1));
        self.conns.insert(conn.app, conn);
    }

    /// Tells the server to forget application `app`, which is not in the table (it went
    /// away while no supervisor watched it).
    pub fn forget(&mut self, app: u32, drain: &mut dyn FnMut() -> bool) {
        self.next = self.next.max(app.saturating_add(1));
        if let Err(e) = self.send(&Hotplug::Detach { app }, None, drain) {
            warn!(app, %e, server = self.label, "could not queue the detach of a vanished application");
        }
        let _ = drain();
        info!(
            app,
            server = self.label,
            "application gone while no supervisor watched: detached"
        );
    }

    /// The next application id.
    pub fn next_id(&self) -> u32 {
        self.next
    }

    /// Hands out ids from `next` on at least (ids below may still be known to the server).
    pub fn start_ids_at(&mut self, next: u32) {
        self.next = self.next.max(next);
    }

    /// The server's end (inherited as fd `hotplug` at every spawn).
    pub fn server_end(&self) -> BorrowedFd<'_> {
        self.theirs.as_fd()
    }

    /// The supervisor's end, also handed to the server (fd `hotplug.supervisor`), which
    /// keeps it open and never uses it: it outlives a supervisor that dies.
    pub fn supervisor_end(&self) -> BorrowedFd<'_> {
        self.ours.as_fd()
    }

    /// Creates the region of a new application connected on `stream`, and queues its
    /// `Attach` for the server. `drain` asks the server to read the hotplug socket (and
    /// waits for its answer). Returns the new id.
    pub fn attach(
        &mut self,
        instance: &str,
        stream: UnixStream,
        drain: &mut dyn FnMut() -> bool,
    ) -> Result<u32, String> {
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| format!("SO_PEERCRED: {e}"))?;
        let app = self.next;
        self.next = self
            .next
            .checked_add(1)
            .ok_or("application ids exhausted")?;
        let link = AppLink::create(
            &region_name(instance, self.label, app),
            app,
            self.protocol,
            self.server,
            self.tx,
            self.rx,
        )
        .map_err(|e| format!("application region: {e}"))?;
        let pid = u32::try_from(cred.pid()).unwrap_or(0);
        let conn = AppConn {
            app,
            stream: Some(stream),
            pidfd: None,
            link,
            pid,
            uid: cred.uid(),
            start: super::procs::start_time(pid).unwrap_or(0),
        };
        self.send(
            &Hotplug::Attach { app, pid },
            Some(conn.link.region().fd()),
            drain,
        )
        .map_err(|e| format!("hotplug: {e}"))?;
        if !drain() {
            // Undo: the server may still read the Attach later, so tell it to forget it.
            let _ = self.send(&Hotplug::Detach { app }, None, drain);
            return Err(format!(
                "the {} server did not take the application (is it running? see `keepnet status`)",
                self.label
            ));
        }
        info!(
            app,
            pid,
            uid = cred.uid(),
            server = self.label,
            "application attached"
        );
        self.conns.insert(app, conn);
        Ok(app)
    }

    /// Detaches application `app` (its connection reached EOF): the server closes its
    /// sockets; the region goes when the last mapping does.
    pub fn detach(&mut self, app: u32, drain: &mut dyn FnMut() -> bool) -> Option<AppConn> {
        let conn = self.conns.remove(&app)?;
        if let Err(e) = self.send(&Hotplug::Detach { app }, None, drain) {
            warn!(app, %e, server = self.label, "could not queue the detach (a restarted server will get the live list)");
        }
        let _ = drain();
        info!(
            app,
            pid = conn.pid,
            server = self.label,
            "application detached"
        );
        Some(conn)
    }

    /// After a restart of the server: every live application again, then the list of them.
    pub fn resend_all(&self, drain: &mut dyn FnMut() -> bool) {
        self.queue_all_with(drain);
        if !drain() {
            warn!(
                server = self.label,
                "the restarted server did not read its hotplug socket"
            );
        }
    }

    /// Before a live-update handover: every live application and the list of them, queued
    /// for the instance that takes over (it reads them before its first poll).
    pub fn queue_all(&self) {
        self.queue_all_with(&mut || false);
    }

    fn queue_all_with(&self, drain: &mut dyn FnMut() -> bool) {
        for c in self.conns.values() {
            let m = Hotplug::Attach {
                app: c.app,
                pid: c.pid,
            };
            if let Err(e) = self.send(&m, Some(c.link.region().fd()), drain) {
                warn!(app = c.app, %e, server = self.label, "could not re-send an application to its server");
            }
        }
        let live = Hotplug::Live {
            apps: self.conns.keys().copied().collect(),
        };
        if let Err(e) = self.send(&live, None, drain) {
            warn!(%e, "could not send the live application list");
        }
    }

    /// Writes `msg` as one JSON line on the control connection of every attached
    /// application, without blocking: a connection whose buffer is full, or that is broken,
    /// is skipped (logged at debug). Returns how many got the whole line.
    pub fn notify(&self, msg: &AppNotice) -> usize {
        use nix::sys::socket::MsgFlags;
        use std::os::fd::AsRawFd;
        let Ok(mut line) = serde_json::to_vec(msg) else {
            return 0;
        };
        line.push(b'\n');
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        let mut told = 0;
        for c in self.conns.values() {
            // A re-adopted application has no control connection (it died with the
            // supervisor it attached to): it cannot be told.
            let Some(stream) = &c.stream else { continue };
            match nix::sys::socket::send(stream.as_raw_fd(), &line, flags) {
                Ok(n) if n == line.len() => told += 1,
                Ok(n) => debug!(
                    app = c.app,
                    sent = n,
                    len = line.len(),
                    server = self.label,
                    "notification cut short (control connection nearly full)"
                ),
                Err(e) => debug!(
                    app = c.app,
                    %e,
                    server = self.label,
                    "notification not delivered (control connection full or broken)"
                ),
            }
        }
        told
    }

    /// The server failed for good (`detail` says why): tells every attached application,
    /// whose library then fails every call on this server's sockets at once.
    pub fn server_failed(&mut self, detail: &str) {
        self.down = Some(detail.to_string());
        let told = self.notify(&AppNotice::ServerFailed {
            server: self.label.to_string(),
            detail: detail.to_string(),
        });
        info!(
            server = self.label,
            apps = self.conns.len(),
            told,
            "applications told the server is down"
        );
    }

    /// The server serves again: if its applications were told it had failed, tells them it
    /// is back.
    pub fn server_back(&mut self) {
        if self.down.take().is_none() {
            return;
        }
        let told = self.notify(&AppNotice::ServerBack {
            server: self.label.to_string(),
        });
        info!(
            server = self.label,
            apps = self.conns.len(),
            told,
            "applications told the server is back"
        );
    }

    /// The application whose control connection (or pidfd, see [`AppConn::watch_fd`]) is
    /// `fd`.
    pub fn by_fd(&self, fd: std::os::fd::RawFd) -> Option<u32> {
        use std::os::fd::AsRawFd;
        self.conns
            .values()
            .find(|c| c.watch_fd().is_some_and(|w| w.as_raw_fd() == fd))
            .map(|c| c.app)
    }

    fn send(
        &self,
        msg: &Hotplug,
        fd: Option<BorrowedFd<'_>>,
        drain: &mut dyn FnMut() -> bool,
    ) -> std::io::Result<()> {
        let text = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        for attempt in 0..50 {
            let r = if fds.is_empty() {
                use std::io::Write;
                (&self.ours).write(&text).map(|_| ())
            } else {
                keepnet_ipc::fdpass::send_fds(&self.ours, &text, &fds)
            };
            match r {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Queue full: let the server read it, then try again.
                    if !drain() {
                        std::thread::sleep(Duration::from_millis(2 * attempt.min(10)));
                    }
                }
                other => return other,
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the {} server does not read its hotplug socket", self.label),
        ))
    }
}
