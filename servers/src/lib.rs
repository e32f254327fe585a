//! keepnet-server: the runtime every keepnet server runs.
//!
//! A server is a type implementing [`Server`]: it polls one batch of work at a time and can
//! snapshot and restore its private state. [`run`] gives it a main loop with the
//! spin-then-park policy of DESIGN rule 6, optional pinning to a core, a heartbeat and a
//! generation in shared memory that the supervisor reads, and a control ring on which the
//! supervisor asks it to quiesce, snapshot, resume or stop. A server binary is a few lines:
//!
//! ```no_run
//! use keepnet_server::{Boot, Progress, Server, ServerError};
//! struct Nop;
//! impl Server for Nop {
//!     fn poll(&mut self) -> Result<Progress, ServerError> { Ok(Progress::IDLE) }
//!     fn has_work(&mut self) -> bool { false }
//! }
//! fn main() -> std::process::ExitCode {
//!     keepnet_server::main("nop", |_boot: &mut Boot| Ok(Nop))
//! }
//! ```
#![deny(unsafe_code)]

pub mod app;
pub mod boot;
pub mod codec;
pub mod control;
pub mod counters;
pub mod inet;
pub mod runtime;
pub mod telemetry;
pub mod wiring;

pub use boot::{Boot, BootError};
pub use control::{Command, ControlBlock, ControlMsg, Handover, ServerState};
pub use runtime::{
    main, request, run, supervisor_ends, Fault, Progress, RequestError, RunEnd, RunOptions,
    Scribbler, Server, ServerError,
};
