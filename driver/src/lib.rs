//! keepnet link backends: TAP, the in-memory wire with fault injection, the pcap mirror.
//!
//! Filled in by a later issue; the crate exists so the workspace has the design's shape.
#![deny(unsafe_code)]
