//! Address helpers shared by the socket types: IPv4 only, std's resolution rules.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, ToSocketAddrs};

pub(crate) fn ipv6(a: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("keepnet speaks IPv4 only: {a} is an IPv6 address"),
    )
}

pub(crate) fn no_addresses() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "could not resolve to any addresses",
    )
}

pub(crate) fn v4(a: SocketAddr) -> io::Result<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(_) => Err(ipv6(a)),
    }
}

/// Runs `f` on each resolved address in turn until one succeeds (as std does for `bind` and
/// `connect`); the last error otherwise.
pub(crate) fn each_addr<A: ToSocketAddrs, T>(
    addr: A,
    mut f: impl FnMut(SocketAddrV4) -> io::Result<T>,
) -> io::Result<T> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        match v4(a).and_then(&mut f) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(no_addresses))
}

/// Every address `addr` resolves to, or the error of one that cannot work (none, or only
/// IPv6) before anything is attached.
pub(crate) fn resolve<A: ToSocketAddrs>(addr: A) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    if !addrs.iter().any(SocketAddr::is_ipv4) {
        return Err(addrs.first().map_or_else(no_addresses, |&a| ipv6(a)));
    }
    Ok(addrs)
}

pub(crate) fn zero_timeout() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "cannot set a 0 duration timeout",
    )
}
