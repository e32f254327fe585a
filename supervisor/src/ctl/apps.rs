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
//! The hotplug socket is a SOCK_SEQPACKET pair: one packet per [`Hotplug`] message, the app's
//! region riding along with `Attach`. Its queue is short (net.unix.max_dgram_qlen, 10 by
//! default), so every send that finds it full first lets the server drain it.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use keepnet_ipc::EndpointId;
use keepnet_server::app::{AppLink, Hotplug};
use tracing::{info, warn};

/// One attached application.
pub struct AppConn {
    /// The application id.
    pub app: u32,
    /// The control connection; its EOF detaches the application.
    pub stream: UnixStream,
    /// The application's region.
    pub link: AppLink,
    /// The application's pid and uid (SO_PEERCRED at attach).
    pub pid: u32,
    pub uid: u32,
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
            ours,
            theirs: b,
        })
    }

    /// The server's end (inherited as fd `hotplug` at every spawn).
    pub fn server_end(&self) -> BorrowedFd<'_> {
        self.theirs.as_fd()
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
            &format!("{instance}-{}-app{app}", self.label),
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
            stream,
            link,
            pid,
            uid: cred.uid(),
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
        if !drain() {
            warn!(
                server = self.label,
                "the restarted server did not read its hotplug socket"
            );
        }
    }

    /// The application whose control connection is `fd`.
    pub fn by_fd(&self, fd: std::os::fd::RawFd) -> Option<u32> {
        use std::os::fd::AsRawFd;
        self.conns
            .values()
            .find(|c| c.stream.as_raw_fd() == fd)
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
