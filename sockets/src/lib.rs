//! keepnet application library: sockets with the shape of `std::net`, over keepnet's
//! user-space stack (docs/udp-and-sockets.md).
//!
//! A process attaches to a running keepnet instance (`keepnet up`) the first time it makes a
//! socket: it connects to the instance's control socket, receives a shared-memory region of
//! its own from the supervisor and keeps that connection open while it lives. From then on a
//! socket call moves data through rings in that region, to and from the udp or tcp server,
//! without entering the kernel unless it has to wait. UDP sockets share one attachment
//! ([`Stack`]), TCP sockets another ([`TcpStack`]).
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
//! TCP looks like `std::net` too; a [`Poller`] watches many sockets from one thread:
//!
//! ```no_run
//! use keepnet_sockets::TcpListener;
//! use std::io::{Read, Write};
//!
//! fn main() -> std::io::Result<()> {
//!     // A TCP echo server, a thread per connection.
//!     let listener = TcpListener::bind("0.0.0.0:7")?;
//!     for stream in listener.incoming() {
//!         let mut stream = stream?;
//!         std::thread::spawn(move || -> std::io::Result<()> {
//!             let mut buf = vec![0u8; 65536];
//!             loop {
//!                 let n = stream.read(&mut buf)?;
//!                 if n == 0 {
//!                     return stream.shutdown(std::net::Shutdown::Write);
//!                 }
//!                 stream.write_all(&buf[..n])?;
//!             }
//!         });
//!     }
//!     Ok(())
//! }
//! ```
//!
//! What differs from `std::net` is listed on [`UdpSocket`] and [`TcpStream`]; in short:
//! IPv4 only, and a read or write timeout reports `TimedOut` rather than `WouldBlock`.
//!
//! A restarted server is transparent. A server that is down for good (the supervisor reached
//! its restart limit and says so on the control connection) makes every call on its sockets
//! fail at once, the blocked ones included, with `ConnectionAborted`: "keepnet: the tcp
//! server is down (...)". Nothing ever waits for a server that will not come back.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod addr;
mod attach;
mod engine;
mod poll;
mod stack;
mod tcp;
mod tcp_stack;
mod udp;

pub use poll::{Event, Interest, Poller, Source};
pub use stack::{Stack, DEFAULT_INSTANCE};
pub use tcp::{Incoming, TcpListener, TcpStream};
pub use tcp_stack::{TcpStack, DEFAULT_SEND_CAP};
pub use udp::UdpSocket;
