//! keepnet-udp: the UDP server. Started by the supervisor per `keepnet_server::boot`; see
//! `keepnet_udp::server` for its regions, fds and the JSON configuration in
//! `KEEPNET_UDP_CONFIG` (e.g. `{"addr":"198.18.0.2","rcvbuf":64}`).
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    keepnet_server::main("udp", keepnet_udp::server::build)
}
