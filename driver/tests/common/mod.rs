//! Shared test support: watchdogs, skip rules, network namespaces, an AF_PACKET socket (the
//! kernel's side of a TAP, as a `LinkBackend`), child-process guards, test frames.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keepnet_driver::LinkBackend;

/// Aborts the whole test process if it runs longer than `limit` (a hung test never hangs CI).
pub fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: test exceeded {limit:?}; aborting");
        std::process::abort();
    });
}

/// Polls `f` until it is true; fails the test after `limit` (a guard, not a speed check).
#[track_caller]
pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips loudly, or fails when CI=true.
pub fn skip(test: &str, why: &str) {
    if ci() {
        panic!("{test}: {why}; CI=true, so this is a failure, not a skip");
    }
    eprintln!("\n******** SKIPPED: {test}: {why} ********\n");
}

/// True if this process may create TAP devices and namespaces; otherwise skips (see `skip`).
pub fn need_root(test: &str) -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip(test, "needs root");
        return false;
    }
    if !std::path::Path::new(keepnet_driver::tap::TUN_PATH).exists() {
        skip(test, "needs /dev/net/tun (modprobe tun)");
        return false;
    }
    true
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace with a test-unique name, deleted on drop (also on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = format!(
            "kn-drv-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip netns add");
        assert!(st.success(), "ip netns add {name} failed");
        let ns = Netns { name };
        // Keep the link quiet: no IPv6 autoconfiguration chatter on the TAP.
        ns.run(|| {
            for p in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
            }
        });
        ns
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        keepnet_driver::tap::in_netns(&self.name, f).expect("enter netns")
    }

    /// `ip -n NAME ARGS...`, which must succeed; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out: Output = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The kernel's RX packet count of `dev`.
    pub fn rx_packets(&self, dev: &str) -> u64 {
        let json = self.ip(&["-s", "-j", "link", "show", "dev", dev]);
        let v: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        v[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("stats64.rx.packets in ip -j -s output")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Kills and reaps a child on every exit path.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A raw AF_PACKET socket bound to one interface: what the kernel sends out of a TAP device
/// is what the TAP fd reads, and what the socket sends leaves through the interface into the
/// TAP fd. Outgoing copies are skipped on receive.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens one on interface `ifname`; call inside the interface's namespace.
    pub fn open(ifname: &str) -> io::Result<PacketSocket> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes no pointers; a non-negative result is a new fd we own.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by socket() and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string for the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: proto,
            sll_ifindex: index as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `addr` is a live sockaddr_ll and its exact size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 8 << 20;
        // SAFETY: the option value is a live c_int of the size passed. Best effort (root).
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        Ok(PacketSocket { fd })
    }
}

impl LinkBackend for PacketSocket {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            let mut from = libc::sockaddr_ll {
                sll_family: 0,
                sll_protocol: 0,
                sll_ifindex: 0,
                sll_hatype: 0,
                sll_pkttype: 0,
                sll_halen: 0,
                sll_addr: [0; 8],
            };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are live and writable for the sizes passed; `len` is
            // in/out for `from`.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(None),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: `frame` is live for the call; a bound packet socket needs no address.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::ENOBUFS) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.fd.as_raw_fd())
    }
}

/// EtherType of test frames (IEEE 802 local experimental).
pub const TEST_ETHERTYPE: u16 = 0x88b5;
/// Broadcast.
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// A test frame of `size` bytes: broadcast, EtherType 0x88b5, then a tag, a sequence number
/// and a pattern derived from both, so any change shows.
pub fn test_frame(tag: u32, seq: u64, size: usize) -> Vec<u8> {
    assert!(size >= 26);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x77]);
    f[12..14].copy_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    f[14..18].copy_from_slice(&tag.to_be_bytes());
    f[18..26].copy_from_slice(&seq.to_be_bytes());
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(tag) ^ size as u64;
    for b in &mut f[26..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    f
}

/// (tag, seq) of a test frame, if `f` is one (whatever its contents).
pub fn parse_test_frame(f: &[u8]) -> Option<(u32, u64)> {
    if f.len() < 26 || f[12..14] != TEST_ETHERTYPE.to_be_bytes() {
        return None;
    }
    let tag = u32::from_be_bytes(f[14..18].try_into().ok()?);
    let seq = u64::from_be_bytes(f[18..26].try_into().ok()?);
    Some((tag, seq))
}

/// True if `f` is exactly the test frame it claims to be.
pub fn frame_intact(f: &[u8]) -> bool {
    parse_test_frame(f).is_some_and(|(tag, seq)| test_frame(tag, seq, f.len()) == f)
}

/// An Ethernet ARP frame (60 bytes, padded).
pub fn arp_frame(op: u16, sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    let dst = if op == 1 { BROADCAST } else { tha };
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes());
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa);
    f
}

/// Checks `f` is a well-formed ARP request from `sha`/`spa` asking for `tpa`.
pub fn is_arp_request(f: &[u8], sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> bool {
    f.len() >= 42
        && f[0..6] == BROADCAST
        && f[6..12] == sha
        && f[12..14] == [0x08, 0x06]
        && f[14..16] == [0, 1]
        && f[16..18] == [0x08, 0x00]
        && f[18] == 6
        && f[19] == 4
        && f[20..22] == [0, 1]
        && f[22..28] == sha
        && f[28..32] == spa
        && f[38..42] == tpa
}

/// Makes the kernel in `ns` send a UDP datagram to 198.18.0.2, which needs ARP first.
pub fn poke_udp(ns: &Netns) {
    ns.run(|| {
        if let Ok(s) = std::net::UdpSocket::bind("198.18.0.1:0") {
            let _ = s.send_to(b"keepnet driver test", "198.18.0.2:9");
        }
    });
}

/// The kernel side's address in the lab, and keepnet's.
pub const KERNEL_IP: [u8; 4] = [198, 18, 0, 1];
pub const KEEPNET_IP: [u8; 4] = [198, 18, 0, 2];
pub const KERNEL_MAC: [u8; 6] = [0x02, 0x4b, 0x4e, 0x00, 0x00, 0x01];
pub const KEEPNET_MAC: [u8; 6] = [0x02, 0x4b, 0x4e, 0x00, 0x00, 0x02];
