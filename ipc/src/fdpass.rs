//! Handing region fds to other processes: by inheritance across exec, or over a Unix socket
//! with SCM_RIGHTS.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Most fds one message may carry.
pub const MAX_FDS: usize = 32;

/// Arranges for `fds` to survive `exec` in the child that `cmd` spawns, at the same numbers
/// (regions are created close-on-exec, so nothing leaks to other children). Pass the numbers
/// to the child yourself, e.g. in an environment variable.
pub fn inherit_fds(cmd: &mut Command, fds: &[BorrowedFd<'_>]) {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // SAFETY: the closure runs in the forked child before exec; it calls only fcntl, which is
    // async-signal-safe, touches no lock and allocates nothing (`raw` was built before fork).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sends `payload` and `fds` in one message. The payload must not be empty.
pub fn send_fds(sock: &UnixStream, payload: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    if payload.is_empty() || fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "send_fds needs a non-empty payload and at most MAX_FDS fds",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let iov = [IoSlice::new(payload)];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    if n != payload.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "short write of an fd-carrying message",
        ));
    }
    Ok(())
}

/// Receives one message sent by [`send_fds`]: the payload bytes read into `buf` and the fds
/// that came with it, each now owned by this process (close-on-exec).
pub fn recv_fds(sock: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel just installed these fds in our table for us; nothing
                // else knows their numbers, so taking ownership is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "control message truncated: too many fds sent",
        ));
    }
    Ok((msg.bytes, fds))
}

static TAKEN: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Takes ownership of an fd inherited across exec (its number came in an environment variable
/// or argument). Refuses a number that is not open, or that was already taken in this process,
/// so no two owners can close the same fd.
pub fn take_inherited(fd: RawFd) -> std::io::Result<OwnedFd> {
    if fd < 3 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("fd {fd} is a standard stream, not an inherited region"),
        ));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if taken.contains(&fd) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("inherited fd {fd} was already taken"),
        ));
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("inherited fd {fd} is not open: {e}"),
        )
    })?;
    taken.push(fd);
    // SAFETY: the fd is open (checked), and the registry above guarantees this function hands
    // it out once; inherited fds are not owned by anything else in a freshly exec'd process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it from leaking into the server's own children.
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(owned)
}
