//! Workspace-level end-to-end test suites live in `tests/tests/`.
//!
//! This library holds what the suites and their peer processes (`src/bin/*.rs`) share: the
//! layouts of the regions they exchange ([`shm`]) and the harness that spawns, watches and
//! reaps child processes ([`harness`]), the TAP lab of the end-to-end suites ([`lab`]) and
//! the loads they run in it ([`loads`]), and the helpers of the live-update drills
//! ([`update`]).
#![deny(unsafe_code)]

pub mod harness;
pub mod lab;
pub mod loads;
pub mod shm;
pub mod update;
