//! keepnet TCP server (RFC 9293 and companions).
//!
//! Filled in by a later issue; the crate exists so the workspace has the design's shape.
#![deny(unsafe_code)]
