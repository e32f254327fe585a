//! keepnet TCP server (RFC 9293 and companions).
//!
//! The protocol engine is sans-I/O (see `docs/tcp.md`): [`seq`] sequence numbers, [`wire`]
//! segment views and emission, [`tcb`] the plain-data control block, [`buf`] the byte rings,
//! and [`conn`] the state machine that drives them from segments and clock ticks.
#![deny(unsafe_code)]

pub mod buf;
pub mod cc;
pub mod conn;
pub mod counters;
pub mod isn;
pub mod listen;
pub mod rtt;
pub mod sack;
pub mod seq;
pub mod server;
pub mod state;
pub mod tcb;
pub mod wire;
