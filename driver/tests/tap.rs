//! The TAP device against the Linux kernel, in a private network namespace (root only).

mod common;

use std::time::{Duration, Instant};

use common::*;
use keepnet_driver::tap::{Tap, TapError};

/// Reads frames from the TAP until `want` matches one (poking the kernel now and then);
/// returns it.
fn read_until(tap: &Tap, ns: &Netns, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 65536];
    let mut last_poke = Instant::now();
    loop {
        match tap.recv(&mut buf).expect("tap recv") {
            Some(n) if want(&buf[..n]) => return buf[..n].to_vec(),
            Some(_) => {}
            None => {
                assert!(Instant::now() < deadline, "the expected frame never came");
                if last_poke.elapsed() > Duration::from_millis(500) {
                    poke_udp(ns);
                    last_poke = Instant::now();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

#[test]
fn kernel_arps_through_the_tap_and_takes_our_frames() {
    if !need_root("kernel_arps_through_the_tap_and_takes_our_frames") {
        return;
    }
    watchdog(Duration::from_secs(120));
    let ns = Netns::new();
    let tap = Tap::create_in_netns(&ns.name, "kn0", 1500, Some(KERNEL_MAC)).unwrap();
    assert_eq!(tap.mac(), Some(KERNEL_MAC));
    assert_eq!(tap.mtu(), Some(1500));
    let link = ns.ip(&["link", "show", "dev", "kn0"]);
    assert!(link.contains("mtu 1500"), "{link}");
    assert!(link.contains("UP"), "{link}");
    assert!(link.contains("02:4b:4e:00:00:01"), "{link}");
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "kn0"]);

    // 1. The kernel resolves 198.18.0.2: a well-formed ARP request from the TAP's MAC.
    poke_udp(&ns);
    read_until(&tap, &ns, |f| {
        is_arp_request(f, KERNEL_MAC, KERNEL_IP, KEEPNET_IP)
    });

    // 2. Our ARP reply is received by the kernel: its RX counter moves, its neighbour table
    //    learns our MAC, and the datagram it held back comes out addressed to us.
    let before = ns.rx_packets("kn0");
    let reply = arp_frame(2, KEEPNET_MAC, KEEPNET_IP, KERNEL_MAC, KERNEL_IP);
    assert!(tap.send(&reply).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.rx_packets("kn0") <= before {
        assert!(Instant::now() < deadline, "kernel never counted our frame");
        std::thread::sleep(Duration::from_millis(2));
    }
    let neigh = ns.ip(&["neigh", "show", "198.18.0.2", "dev", "kn0"]);
    assert!(
        neigh.contains("02:4b:4e:00:00:02"),
        "neighbour entry: {neigh}"
    );
    let udp = read_until(&tap, &ns, |f| {
        f.len() >= 42 && f[0..6] == KEEPNET_MAC && f[12..14] == [0x08, 0x00] && f[23] == 17
    });
    assert_eq!(&udp[6..12], &KERNEL_MAC);
    assert_eq!(&udp[30..34], &KEEPNET_IP, "IPv4 destination");
    assert_eq!(&udp[42..], b"keepnet driver test");

    // 3. The same device, handed over as an fd (what the driver process gets).
    let dup = tap.fd().try_clone_to_owned().unwrap();
    let again = Tap::from_fd(dup).unwrap();
    assert_eq!(again.name(), "kn0");
    assert_eq!(again.recv(&mut [0u8; 2048]).unwrap(), None, "non-blocking");
}

#[test]
fn a_second_opener_gets_busy_and_names_are_checked() {
    if !need_root("a_second_opener_gets_busy_and_names_are_checked") {
        return;
    }
    watchdog(Duration::from_secs(60));
    let ns = Netns::new();
    let first = Tap::create_in_netns(&ns.name, "kn0", 1500, None).unwrap();
    let e = Tap::create_in_netns(&ns.name, "kn0", 1500, None).unwrap_err();
    assert!(matches!(e, TapError::Busy { .. }), "{e}");
    assert!(e.to_string().contains("busy"), "{e}");
    // A pattern name: the kernel picks the number.
    let patterned = Tap::create_in_netns(&ns.name, "knt%d", 1400, None).unwrap();
    assert!(patterned.name().starts_with("knt"), "{}", patterned.name());
    assert!(ns
        .ip(&["link", "show", "dev", patterned.name()])
        .contains("mtu 1400"));
    // Closing the last fd removes the (non-persistent) device.
    drop(first);
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "dev", "kn0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "kn0 outlived its last fd");
    let e = Tap::create_in_netns("kn-drv-no-such-netns", "kn0", 1500, None).unwrap_err();
    assert!(matches!(e, TapError::Netns { .. }), "{e}");
}
