//! keepnet IP server: Ethernet, ARP, IPv4, ICMP, routing, demux.
//!
//! Filled in by a later issue; the crate exists so the workspace has the design's shape.
#![deny(unsafe_code)]
