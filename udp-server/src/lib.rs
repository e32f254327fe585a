//! keepnet UDP server: UDP sockets for applications, over the ip server.
//!
//! * [`engine`]: the protocol (RFC 768 and RFC 1122 4.1), plain code with no I/O: binding
//!   and port allocation, connecting, the header and checksum of what is sent, validation
//!   and demultiplexing of what is received, ICMP port unreachable and ICMP errors;
//! * [`state`]: the socket table in shared memory (region `udp.state`), which outlives a
//!   crash of the server, and the [`Store`] trait the engine writes it through;
//! * [`server`]: the `keepnet-udp` server on the transport link, the socket table and the
//!   application regions (its module docs state the boot contract);
//! * [`wire`]: checked views and builders for UDP, the Internet checksum;
//! * [`counters`]: the engine's named counters.
#![deny(unsafe_code)]

pub mod counters;
pub mod engine;
pub mod server;
pub mod state;
pub mod wire;

pub use counters::{Counters, Ctr};
pub use engine::{Config, Engine, Rx, SocketId};
pub use server::{build, UdpServer};
pub use state::{SocketTable, Store};
