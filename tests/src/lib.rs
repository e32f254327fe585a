//! Workspace-level end-to-end test suites live in `tests/tests/`.
//!
//! This library holds what the suites and their peer processes (`src/bin/*.rs`) share: the
//! layouts of the regions they exchange ([`shm`]) and the harness that spawns, watches and
//! reaps child processes ([`harness`]).
#![deny(unsafe_code)]

pub mod harness;
pub mod shm;
