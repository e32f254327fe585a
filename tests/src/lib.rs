//! Workspace-level end-to-end test suites live in `tests/tests/`.
#![deny(unsafe_code)]
