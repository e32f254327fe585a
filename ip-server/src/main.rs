//! keepnet-ip: the IP server (Ethernet, ARP, IPv4, ICMP, routing, demux) on the link region.
//!
//! Started by the supervisor per `keepnet_server::boot`, with the regions `link` (the
//! driver<->ip link, required) and `peer.driver` (the driver's control block, optional: its
//! doorbell wakes the driver when we publish), and the JSON configuration in
//! `KEEPNET_IP_CONFIG`, e.g. `{"mac":"02:6b:6e:00:00:02","addr":"198.18.0.2/24",
//! "gateway":null,"mtu":1500}`.
#![deny(unsafe_code)]

fn main() -> std::process::ExitCode {
    keepnet_server::main("ip", keepnet_ip::server::build)
}
