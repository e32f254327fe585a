//! keepnet IP server: Ethernet, ARP, IPv4, ICMP, routing, demux.
//!
//! * [`IpStack`]: the protocol engine, plain code with no I/O, driven by a clock and frames
//!   (the same code runs in the server and in deterministic simulations);
//! * [`wire`]: checked packet views and builders (smoltcp style) and the Internet checksum;
//! * [`server`]: the `keepnet-ip` server on the driver<->ip link region;
//! * `transport` (private): the ip side of the ip<->transport links (UDP, TCP).
#![deny(unsafe_code)]

pub mod arp;
pub mod config;
pub mod counters;
pub mod frag;
pub mod server;
pub mod stack;
mod transport;
pub mod wire;

pub use config::{Config, ConfigError};
pub use counters::{Counters, Ctr};
pub use stack::{
    Datagram, Disposition, Event, IcmpError, IpStack, SavedState, SendError, Transport,
};
pub use wire::Mac;
