//! keepnet application library: sockets with the shape of `std::net`, over keepnet's
//! user-space stack (docs/udp-and-sockets.md).
//!
//! A process attaches to a running keepnet instance (`keepnet up`) the first time it makes a
//! socket: it connects to the instance's control socket, receives a shared-memory region of
//! its own from the supervisor and keeps that connection open while it lives. From then on a
//! socket call moves data through rings in that region, to and from the udp server, without
//! entering the kernel unless it has to wait.
//!
//! The instance is named by the `KEEPNET_INSTANCE` environment variable (default `default`);
//! its control socket is `$KEEPNET_RUN_DIR/<instance>/ctl.sock` (default run directory
//! `/run/keepnet`).
//!
//! ```no_run
//! use keepnet_sockets::UdpSocket;
//! use std::time::Duration;
//!
//! fn main() -> std::io::Result<()> {
//!     // A UDP echo server on keepnet's address, port 7.
//!     let socket = UdpSocket::bind("0.0.0.0:7")?;
//!     socket.set_read_timeout(Some(Duration::from_secs(30)))?;
//!     let mut buf = [0u8; 2048];
//!     loop {
//!         let (n, from) = socket.recv_from(&mut buf)?;
//!         socket.send_to(&buf[..n], from)?;
//!     }
//! }
//! ```
//!
//! What differs from `std::net::UdpSocket` is listed on [`UdpSocket`]; in short: IPv4 only,
//! and a read timeout reports `TimedOut` rather than `WouldBlock`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod attach;
mod stack;
mod udp;

pub use stack::{Stack, DEFAULT_INSTANCE};
pub use udp::UdpSocket;
