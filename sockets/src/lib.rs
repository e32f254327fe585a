//! keepnet application library: TcpListener, TcpStream, UdpSocket over socket rings.
//!
//! Filled in by a later issue; the crate exists so the workspace has the design's shape.
#![deny(unsafe_code)]
