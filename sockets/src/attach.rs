//! The attach handshake with an instance's supervisor (docs/udp-and-sockets.md, "Attaching an
//! application").
//!
//! The application connects to the instance's control socket, writes
//! `{"op":"attach","protocol":P}` (17 for the udp server, 6 for the tcp server) and a newline,
//! and reads one line back. With
//! `{"result":"attached","app":N,"addr":"198.18.0.2","mtu":1500}` come two fds (SCM_RIGHTS):
//! the application's region, then the eventfd of that server's doorbell. A process using
//! both servers attaches twice: two regions, two control connections. An error answers
//! `{"result":"error","message":"..."}` with no fds. The connection stays open for the life of
//! the attachment: its EOF is how the supervisor learns that the application is gone.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use keepnet_ipc::{fdpass, Region, RegionKind};
use keepnet_server::app::{AppLink, Attached};
use serde::Deserialize;

/// IP protocol number of the udp server.
pub(crate) const PROTOCOL_UDP: u8 = 17;
/// IP protocol number of the tcp server.
pub(crate) const PROTOCOL_TCP: u8 = 6;
/// How long the supervisor has to answer an attach request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest answer line accepted.
const MAX_ANSWER: usize = 64 * 1024;

/// What the handshake yields.
pub(crate) struct Attachment {
    pub link: AppLink,
    pub server_eventfd: OwnedFd,
    pub addr: Ipv4Addr,
    pub mtu: u32,
    /// The control connection: kept open for the life of the attachment.
    pub control: UnixStream,
}

#[derive(Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Answer {
    Attached(Attached),
    Error { message: String },
}

fn invalid(instance: &str, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("keepnet instance {instance:?} gave an unusable attach answer: {what}"),
    )
}

/// The name of the server speaking IP protocol `protocol`, for messages.
fn server_name(protocol: u8) -> String {
    match protocol {
        PROTOCOL_UDP => "udp".to_string(),
        PROTOCOL_TCP => "tcp".to_string(),
        p => format!("protocol {p}"),
    }
}

/// Refuses an instance name that is not a plain directory name.
pub(crate) fn check_instance_name(instance: &str) -> io::Result<()> {
    if instance.is_empty() || instance.contains('/') || instance == "." || instance == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{instance:?} is not a keepnet instance name"),
        ));
    }
    Ok(())
}

/// Attaches to `instance` through the control socket at `path`, for the server speaking IP
/// protocol `protocol` ([`PROTOCOL_UDP`], [`PROTOCOL_TCP`]).
pub(crate) fn attach_at(instance: &str, path: &Path, protocol: u8) -> io::Result<Attachment> {
    let control = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no keepnet instance {instance:?} is running (no control socket at {}); \
                 start one with `keepnet up`",
                path.display()
            ),
        ),
        kind => io::Error::new(
            kind,
            format!(
                "cannot reach keepnet instance {instance:?} at {}: {e}",
                path.display()
            ),
        ),
    })?;
    control.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let request = serde_json::json!({ "op": "attach", "protocol": protocol });
    let mut line = request.to_string();
    line.push('\n');
    (&control).write_all(line.as_bytes()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("keepnet instance {instance:?}: sending the attach request failed: {e}"),
        )
    })?;

    // The answer normally comes in one message with its fds; read on until the newline.
    let mut text = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !text.contains(&b'\n') {
        let (n, more) = fdpass::recv_fds(&control, &mut buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "keepnet instance {instance:?}: the supervisor did not answer the attach \
                     request within {ANSWER_TIMEOUT:?}"
                ),
            ),
            _ => io::Error::new(
                e.kind(),
                format!("keepnet instance {instance:?}: reading the attach answer failed: {e}"),
            ),
        })?;
        fds.extend(more);
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "keepnet instance {instance:?}: the supervisor closed the control \
                     connection without answering the attach request"
                ),
            ));
        }
        text.extend_from_slice(&buf[..n]);
        if text.len() > MAX_ANSWER {
            return Err(invalid(instance, "answer line too long"));
        }
    }
    let end = text.iter().position(|&b| b == b'\n').unwrap_or(text.len());
    let answer: Answer = serde_json::from_slice(&text[..end]).map_err(|e| invalid(instance, e))?;
    let attached = match answer {
        Answer::Attached(a) => a,
        Answer::Error { message } => {
            return Err(io::Error::other(format!(
                "keepnet instance {instance:?} refused to attach this application: {message}"
            )))
        }
    };
    let addr: Ipv4Addr = attached
        .addr
        .parse()
        .map_err(|e| invalid(instance, format_args!("address {:?}: {e}", attached.addr)))?;
    let mut fds = fds.into_iter();
    let (Some(region_fd), Some(server_eventfd)) = (fds.next(), fds.next()) else {
        return Err(invalid(
            instance,
            "expected two fds (the application region and the server's eventfd)",
        ));
    };
    let region = Region::open(region_fd, RegionKind::RINGS)
        .map_err(|e| invalid(instance, format_args!("region: {e}")))?;
    let link = AppLink::open(region).map_err(|e| invalid(instance, format_args!("region: {e}")))?;
    if link.app() != attached.app {
        return Err(invalid(
            instance,
            format_args!(
                "the region is application {}'s, the answer says {}",
                link.app(),
                attached.app
            ),
        ));
    }
    if link.protocol() != protocol {
        return Err(invalid(
            instance,
            format_args!(
                "the region talks IP protocol {}, not {} ({protocol})",
                link.protocol(),
                server_name(protocol)
            ),
        ));
    }
    control.set_read_timeout(None)?;
    Ok(Attachment {
        link,
        server_eventfd,
        addr,
        mtu: attached.mtu,
        control,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};

    use keepnet_ipc::new_eventfd;
    use keepnet_server::wiring::{TCP, UDP};

    /// A fresh directory for one test's control socket.
    fn scratch_dir() -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "kn-sockets-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A fake supervisor answering one attach request with `answer`; returns the request
    /// line it read, after the client hung up (so the test also sees the connection stayed
    /// open until then).
    fn fake_supervisor(
        path: &Path,
        answer: impl FnOnce(&UnixStream) + Send + 'static,
    ) -> std::thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            answer(&stream);
            // Wait for the client's EOF (the end of the attachment).
            let mut rest = String::new();
            let _ = reader.read_line(&mut rest);
            line
        })
    }

    #[test]
    fn no_control_socket_is_not_found_and_names_the_instance() {
        let dir = scratch_dir();
        let e = attach_at("lab-7", &dir.join("lab-7").join("ctl.sock"), PROTOCOL_UDP)
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let msg = e.to_string();
        assert!(msg.contains("\"lab-7\""), "{msg}");
        assert!(msg.contains("keepnet up"), "{msg}");
        // A stale socket file nobody listens on reads the same.
        let path = dir.join("ctl.sock");
        drop(UnixListener::bind(&path).unwrap());
        let e = attach_at("stale", &path, PROTOCOL_UDP).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("\"stale\""));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn supervisor_error_is_reported_with_its_message() {
        let dir = scratch_dir();
        let path = dir.join("ctl.sock");
        let sup = fake_supervisor(&path, |s| {
            let mut w = s;
            w.write_all(b"{\"result\":\"error\",\"message\":\"too many applications\"}\n")
                .unwrap();
        });
        let e = attach_at("default", &path, PROTOCOL_UDP).err().unwrap();
        assert!(e.to_string().contains("too many applications"), "{e}");
        assert_eq!(
            sup.join().unwrap().trim(),
            r#"{"op":"attach","protocol":17}"#
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn handshake_maps_the_region() {
        let dir = scratch_dir();
        let path = dir.join("ctl.sock");
        let link = AppLink::create("t-sock-attach", 5, 17, UDP, 4, 8).unwrap();
        let efd = new_eventfd().unwrap();
        let (l2, efd2) = (link.clone(), efd.try_clone().unwrap());
        let sup = fake_supervisor(&path, move |s| {
            let line =
                b"{\"result\":\"attached\",\"app\":5,\"addr\":\"198.18.0.2\",\"mtu\":1500}\n";
            fdpass::send_fds(s, line, &[l2.region().fd(), efd2.as_fd()]).unwrap();
        });
        let a = attach_at("default", &path, PROTOCOL_UDP).unwrap();
        assert_eq!(a.addr, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(a.mtu, 1500);
        assert_eq!(a.link.app(), 5);
        assert_eq!(a.link.tx_pool.count(), 4);
        assert_eq!(a.link.rx_pool.count(), 8);
        // The same memory: a request pushed by the app is seen on the supervisor's mapping.
        let mut ends = a.link.app_ends().unwrap();
        ends.requests
            .push(keepnet_server::app::AppRequest {
                op: 4,
                socket: 9,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(link.requests().unwrap().in_flight().unwrap()[0].socket, 9);
        // The eventfd is the server's: a write on ours is readable on theirs.
        let mut theirs = std::fs::File::from(a.server_eventfd.try_clone().unwrap());
        theirs.write_all(&1u64.to_ne_bytes()).unwrap();
        let mut b = [0u8; 8];
        let mut ours = std::fs::File::from(efd.try_clone().unwrap());
        std::io::Read::read_exact(&mut ours, &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 1);
        drop(ends);
        drop(a);
        sup.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tcp_attach_asks_for_protocol_6_and_refuses_a_udp_region() {
        let dir = scratch_dir();
        let path = dir.join("ctl.sock");
        let link = AppLink::create("t-sock-attach-tcp", 5, 6, TCP, 4, 8).unwrap();
        let efd = new_eventfd().unwrap();
        let l2 = link.clone();
        let sup = fake_supervisor(&path, move |s| {
            let line =
                b"{\"result\":\"attached\",\"app\":5,\"addr\":\"198.18.0.2\",\"mtu\":1500}\n";
            fdpass::send_fds(s, line, &[l2.region().fd(), efd.as_fd()]).unwrap();
        });
        let a = attach_at("default", &path, PROTOCOL_TCP).unwrap();
        assert_eq!((a.link.protocol(), a.link.server()), (6, TCP));
        drop(a);
        assert_eq!(
            sup.join().unwrap().trim(),
            r#"{"op":"attach","protocol":6}"#
        );
        let _ = std::fs::remove_file(&path);

        // A udp region handed to a tcp attach is refused, naming both.
        let udp = AppLink::create("t-sock-attach-tcp-udp", 5, 17, UDP, 4, 8).unwrap();
        let efd = new_eventfd().unwrap();
        let sup = fake_supervisor(&path, move |s| {
            let line =
                b"{\"result\":\"attached\",\"app\":5,\"addr\":\"198.18.0.2\",\"mtu\":1500}\n";
            fdpass::send_fds(s, line, &[udp.region().fd(), efd.as_fd()]).unwrap();
        });
        let e = attach_at("default", &path, PROTOCOL_TCP).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("protocol 17, not tcp (6)"), "{e}");
        sup.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn wrong_app_id_or_missing_fds_are_refused() {
        let dir = scratch_dir();
        let path = dir.join("ctl.sock");
        let sup = fake_supervisor(&path, |s| {
            let mut w = s;
            w.write_all(
                b"{\"result\":\"attached\",\"app\":1,\"addr\":\"198.18.0.2\",\"mtu\":1500}\n",
            )
            .unwrap();
        });
        let e = attach_at("default", &path, PROTOCOL_UDP).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("two fds"), "{e}");
        sup.join().unwrap();
        let _ = std::fs::remove_file(&path);

        let link = AppLink::create("t-sock-attach-id", 5, 17, UDP, 4, 8).unwrap();
        let efd = new_eventfd().unwrap();
        let sup = fake_supervisor(&path, move |s| {
            let line =
                b"{\"result\":\"attached\",\"app\":6,\"addr\":\"198.18.0.2\",\"mtu\":1500}\n";
            fdpass::send_fds(s, line, &[link.region().fd(), efd.as_fd()]).unwrap();
        });
        let e = attach_at("default", &path, PROTOCOL_UDP).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("application 5"), "{e}");
        sup.join().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
