//! keepnet-tcp: the TCP server. Started by the supervisor per `keepnet_server::boot`; see
//! `keepnet_tcp::server` for its regions, fds and the JSON configuration in
//! `KEEPNET_TCP_CONFIG` (e.g. `{"addr":"198.18.0.2"}`).
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    keepnet_server::main("tcp", keepnet_tcp::server::build)
}
