//! TAP devices: Ethernet frames between keepnet and the Linux kernel.
//!
//! The supervisor owns the device (DESIGN rule 1): it calls [`Tap::create`] (or
//! [`Tap::create_in_netns`] for a lab namespace), keeps the fd for the life of the instance,
//! and hands a copy to the driver process, which wraps it with [`Tap::from_fd`]. A driver crash
//! therefore never destroys the device or the kernel side's address.
//!
//! As in Firecracker's `tap.rs`: the fd becomes an [`OwnedFd`] the moment it exists, it is
//! close-on-exec and non-blocking, every ioctl sits in one small function with a SAFETY note,
//! and each failure is a typed error naming the ioctl.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::LinkBackend;

/// The clone device every TAP is made through.
pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;
/// Bytes of Ethernet header on top of the MTU (no FCS on a TAP, no VLAN tag).
pub const ETH_HEADER: usize = 14;

/// Why a TAP device could not be opened or configured.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device {name:?}: {op} needs root (CAP_NET_ADMIN)")]
    NoPermission { name: String, op: &'static str },
    #[error("{TUN_PATH} missing: load the tun module (modprobe tun): {source}")]
    NoTunDevice {
        #[source]
        source: io::Error,
    },
    #[error("TAP device {name:?} is busy: another process already has it open (EBUSY)")]
    Busy { name: String },
    #[error("bad TAP device name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("TAP device {name:?}: ioctl {ioctl} failed: {source}")]
    Ioctl {
        name: String,
        ioctl: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("opening {TUN_PATH}: {0}")]
    Open(#[source] io::Error),
    #[error("the inherited fd is not a TAP device: {0}")]
    NotTap(String),
    #[error("network namespace {netns:?}: {why}")]
    Netns { netns: String, why: String },
}

/// `struct ifreq` as plain bytes: the name, then the 24-byte union, read and written through
/// typed helpers below. Keeping it a byte struct means building one needs no `unsafe`
/// (`mem::zeroed` of libc's union) and reading a field cannot read an inactive union member.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == std::mem::size_of::<libc::ifreq>());
const _: () = assert!(std::mem::align_of::<IfReq>() <= std::mem::align_of::<libc::ifreq>());

impl IfReq {
    fn new(name: &str) -> IfReq {
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (d, s) in r.name.iter_mut().zip(name.bytes().take(MAX_NAME)) {
            *d = s;
        }
        r
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(MAX_NAME);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_flags(&mut self, f: i16) {
        self.data[..2].copy_from_slice(&f.to_ne_bytes());
    }
    fn set_mtu(&mut self, mtu: i32) {
        self.data[..4].copy_from_slice(&mtu.to_ne_bytes());
    }
    /// `ifru_hwaddr`: a `struct sockaddr` (family, then 14 bytes of address).
    fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
    fn hwaddr(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.data[2..8]);
        m
    }
}

/// Runs one interface ioctl that reads and/or writes a `struct ifreq`.
fn ifreq_ioctl(fd: BorrowedFd<'_>, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: every `req` passed here (TUNSETIFF, TUNGETIFF, SIOCSIFMTU, SIOCSIFHWADDR,
    // SIOCGIFHWADDR, SIOCGIFFLAGS, SIOCSIFFLAGS) takes a pointer to one `struct ifreq`, which
    // the kernel reads and may overwrite in place and does not keep. `IfReq` has ifreq's size
    // (asserted at compile time) and no invalid bit patterns, it lives across the call, and
    // `fd` is a descriptor borrowed (so open) for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    let bad = |why| {
        Err(TapError::BadName {
            name: name.into(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 15 bytes (IFNAMSIZ)");
    }
    if name == "." || name == ".." {
        return bad("reserved");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// A TAP device: one Ethernet frame per read and write, no packet-information header.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    mtu: Option<u32>,
    mac: Option<[u8; 6]>,
}

impl Tap {
    /// Opens (creating it if missing) the TAP device `name` in the calling thread's network
    /// namespace, sets its MTU and, if given, its MAC address (the kernel side's address: the
    /// source of the frames Linux sends), and brings it up.
    ///
    /// The fd is close-on-exec and non-blocking. The device is not persistent: it goes away
    /// when the last fd on it closes. `name` may be a pattern such as `tap%d`; [`Tap::name`]
    /// gives the name the kernel chose.
    pub fn create(name: &str, mtu: u32, mac: Option<[u8; 6]>) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => {
                    TapError::NoTunDevice { source: e }
                }
                Some(libc::EACCES | libc::EPERM) => TapError::NoPermission {
                    name: name.into(),
                    op: "opening /dev/net/tun",
                },
                _ => TapError::Open(e),
            })?;
        // std opens with O_CLOEXEC; from here on the fd is owned and closes on every path.
        let fd = OwnedFd::from(file);

        let mut ifr = IfReq::new(name);
        ifr.set_flags((libc::IFF_TAP | libc::IFF_NO_PI) as i16);
        ifreq_ioctl(fd.as_fd(), libc::TUNSETIFF as libc::c_ulong, &mut ifr).map_err(|e| match e
            .raw_os_error()
        {
            Some(libc::EPERM | libc::EACCES) => TapError::NoPermission {
                name: name.into(),
                op: "TUNSETIFF",
            },
            Some(libc::EBUSY) => TapError::Busy { name: name.into() },
            Some(libc::EINVAL) => TapError::Ioctl {
                name: name.into(),
                ioctl: "TUNSETIFF (is the name taken by a device that is not a TAP?)",
                source: e,
            },
            _ => TapError::Ioctl {
                name: name.into(),
                ioctl: "TUNSETIFF",
                source: e,
            },
        })?;
        let name = ifr.name();

        // Interface ioctls go through any socket of the device's namespace.
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| TapError::Ioctl {
            name: name.clone(),
            ioctl: "socket(AF_INET) for interface ioctls",
            source: e.into(),
        })?;
        let sioc = |req: libc::c_ulong, what: &'static str, ifr: &mut IfReq| {
            ifreq_ioctl(sock.as_fd(), req, ifr).map_err(|e| match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::NoPermission {
                    name: name.clone(),
                    op: what,
                },
                _ => TapError::Ioctl {
                    name: name.clone(),
                    ioctl: what,
                    source: e,
                },
            })
        };

        let mut r = IfReq::new(&name);
        r.set_mtu(i32::try_from(mtu).unwrap_or(i32::MAX));
        sioc(libc::SIOCSIFMTU, "SIOCSIFMTU", &mut r)?;
        if let Some(mac) = mac {
            let mut r = IfReq::new(&name);
            r.set_hwaddr(mac);
            sioc(libc::SIOCSIFHWADDR, "SIOCSIFHWADDR", &mut r)?;
        }
        let mut r = IfReq::new(&name);
        sioc(libc::SIOCGIFHWADDR, "SIOCGIFHWADDR", &mut r)?;
        let mac = r.hwaddr();
        let mut r = IfReq::new(&name);
        sioc(libc::SIOCGIFFLAGS, "SIOCGIFFLAGS", &mut r)?;
        r.set_flags(r.flags() | libc::IFF_UP as i16);
        sioc(libc::SIOCSIFFLAGS, "SIOCSIFFLAGS", &mut r)?;

        Ok(Tap {
            fd,
            name,
            mtu: Some(mtu),
            mac: Some(mac),
        })
    }

    /// [`Tap::create`] inside the network namespace `netns` (a name under `/run/netns`, as
    /// made by `ip netns add`, or a path such as `/proc/PID/ns/net`). Runs on a short-lived
    /// thread that joins the namespace, so the calling thread's namespace is untouched.
    pub fn create_in_netns(
        netns: &str,
        name: &str,
        mtu: u32,
        mac: Option<[u8; 6]>,
    ) -> Result<Tap, TapError> {
        let name = name.to_string();
        in_netns(netns, move || Tap::create(&name, mtu, mac))?
    }

    /// Wraps a TAP fd handed over by the supervisor (the driver process). Checks with
    /// TUNGETIFF that it is a TAP without packet information, and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let mut ifr = IfReq::new("");
        ifreq_ioctl(fd.as_fd(), libc::TUNGETIFF as libc::c_ulong, &mut ifr)
            .map_err(|e| TapError::NotTap(format!("TUNGETIFF: {e}")))?;
        let flags = i32::from(ifr.flags());
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_NO_PI == 0 {
            return Err(TapError::NotTap(format!(
                "device {:?} has flags {flags:#x}, expected IFF_TAP|IFF_NO_PI",
                ifr.name()
            )));
        }
        let name = ifr.name();
        let ioctl_err = |ioctl, e: Errno| TapError::Ioctl {
            name: name.clone(),
            ioctl,
            source: e.into(),
        };
        let fl = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| ioctl_err("fcntl(F_GETFL)", e))?;
        let fl = nix::fcntl::OFlag::from_bits_retain(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(fl))
            .map_err(|e| ioctl_err("fcntl(F_SETFL O_NONBLOCK)", e))?;
        Ok(Tap {
            fd,
            name,
            mtu: None,
            mac: None,
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MTU set at creation (None for a TAP made with [`Tap::from_fd`]).
    pub fn mtu(&self) -> Option<u32> {
        self.mtu
    }

    /// The interface's MAC address read back at creation: the kernel side's address, the
    /// source of every frame Linux sends on it (None for [`Tap::from_fd`]).
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    /// The raw fd, to poll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The fd, to hand to a driver process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads one frame. `Ok(None)` when no frame is waiting (EAGAIN). A frame longer than
    /// `buf` is cut to `buf.len()`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes one frame. `Ok(false)` if the device would block (EAGAIN): try again later.
    pub fn send(&self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match nix::unistd::write(&self.fd, frame) {
                Ok(_) => return Ok(true),
                Err(Errno::EAGAIN) => return Ok(false),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl LinkBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Tap::recv(self, buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        Tap::send(self, frame)
    }
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.raw_fd())
    }
}

/// Runs `f` on a new thread that has joined the network namespace `netns` (a name under
/// `/run/netns`, or a path), and returns its result. Sockets and devices `f` creates belong
/// to that namespace and keep working from any thread afterwards. The caller's thread and
/// namespace are untouched.
pub fn in_netns<T, F>(netns: &str, f: F) -> Result<T, TapError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = if netns.contains('/') {
        netns.to_string()
    } else {
        format!("/run/netns/{netns}")
    };
    let err = |why: String| TapError::Netns {
        netns: netns.to_string(),
        why,
    };
    let ns = std::fs::File::open(&path).map_err(|e| err(format!("open {path}: {e}")))?;
    let handle = std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || -> Result<T, String> {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                if e == Errno::EPERM {
                    "setns needs root (CAP_SYS_ADMIN)".to_string()
                } else {
                    format!("setns: {e}")
                }
            })?;
            Ok(f())
        })
        .map_err(|e| err(format!("spawn thread: {e}")))?;
    match handle.join() {
        Ok(r) => r.map_err(err),
        Err(p) => std::panic::resume_unwind(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "a b", "x:1", ".", "..", "sixteen-chars-xx"] {
            assert!(
                matches!(check_name(bad), Err(TapError::BadName { .. })),
                "{bad:?}"
            );
        }
        for ok in ["kn0", "tap%d", "fifteen-chars-x"] {
            check_name(ok).unwrap();
        }
        let e = Tap::create("a/b", 1500, None).unwrap_err();
        assert!(e.to_string().contains("bad TAP device name"), "{e}");
    }

    #[test]
    fn ifreq_fields_round_trip() {
        let mut r = IfReq::new("kn0");
        assert_eq!(r.name(), "kn0");
        r.set_flags(0x1002);
        assert_eq!(r.flags(), 0x1002);
        r.set_hwaddr([2, 0, 0, 0, 0, 1]);
        assert_eq!(r.hwaddr(), [2, 0, 0, 0, 0, 1]);
        let long = IfReq::new("0123456789abcdefghij");
        assert_eq!(long.name().len(), MAX_NAME);
    }

    #[test]
    fn without_privilege_the_error_says_root() {
        // SAFETY: geteuid takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return; // Meaningful only unprivileged; the root tests cover success.
        }
        let e = Tap::create("kn-noperm", 1500, None).unwrap_err();
        assert!(
            matches!(
                e,
                TapError::NoPermission { .. } | TapError::NoTunDevice { .. }
            ),
            "{e}"
        );
        if matches!(e, TapError::NoPermission { .. }) {
            assert!(e.to_string().contains("needs root (CAP_NET_ADMIN)"), "{e}");
        }
    }

    #[test]
    fn from_fd_refuses_a_non_tap() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = Tap::from_fd(f.into()).unwrap_err();
        assert!(matches!(e, TapError::NotTap(_)), "{e}");
    }
}
