//! pcap files that tcpdump reads, from frames and from a link's capture ring.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use keepnet_driver::pcap::{drain_capture, PcapWriter};
use keepnet_server::wiring::{CaptureRecord, Link};

/// A file path removed on drop.
struct TempFile(PathBuf);
impl TempFile {
    fn new(tag: &str) -> TempFile {
        TempFile(
            std::env::temp_dir().join(format!("keepnet-driver-{tag}-{}.pcap", std::process::id())),
        )
    }
}
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn udp_frame() -> Vec<u8> {
    let payload = b"hello";
    let mut f = vec![0u8; 14 + 20 + 8];
    f[0..6].copy_from_slice(&KEEPNET_MAC);
    f[6..12].copy_from_slice(&KERNEL_MAC);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (20 + 8 + payload.len()) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&KERNEL_IP);
    ip[16..20].copy_from_slice(&KEEPNET_IP);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&1234u16.to_be_bytes());
    udp[2..4].copy_from_slice(&7u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `tcpdump -nn -r FILE` output, or None (after a loud skip) if tcpdump is missing.
fn tcpdump(test: &str, file: &PathBuf, extra: &[&str]) -> Option<String> {
    let out = match Command::new("tcpdump")
        .arg("-nn")
        .args(extra)
        .arg("-r")
        .arg(file)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip(test, "tcpdump is not installed");
            return None;
        }
        Err(e) => panic!("running tcpdump: {e}"),
    };
    assert!(
        out.status.success(),
        "tcpdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn tcpdump_reads_what_we_write() {
    watchdog(Duration::from_secs(60));
    let tmp = TempFile::new("frames");
    let file = std::fs::File::create(&tmp.0).unwrap();
    let mut w = PcapWriter::new(std::io::BufWriter::new(file)).unwrap();
    let t0 = 1_700_000_000_000_000_000u64;
    let arp = arp_frame(1, KERNEL_MAC, KERNEL_IP, [0; 6], KEEPNET_IP);
    w.write_frame(t0, arp.len() as u32, &arp).unwrap();
    let udp = udp_frame();
    w.write_frame(t0 + 1_500, udp.len() as u32, &udp).unwrap();
    // A frame longer than the snap length is cut, and says how long it was.
    let big = test_frame(1, 1, 3000);
    w.write_frame(t0 + 3_000, big.len() as u32, &big).unwrap();
    assert_eq!(w.packets(), 3);
    w.flush().unwrap();
    drop(w);

    let Some(text) = tcpdump("tcpdump_reads_what_we_write", &tmp.0, &[]) else {
        return;
    };
    // One line per packet; tcpdump adds an indented hex dump for unknown EtherTypes.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains("ARP, Request who-has 198.18.0.2 tell 198.18.0.1"),
        "{text}"
    );
    assert!(
        lines[1].contains("198.18.0.1.1234 > 198.18.0.2.7: UDP, length 5"),
        "{text}"
    );
    assert!(lines[2].contains("length 3000"), "{text}");
    let nano = tcpdump(
        "tcpdump_reads_what_we_write",
        &tmp.0,
        &["-tt", "--time-stamp-precision=nano"],
    )
    .unwrap_or_default();
    assert!(
        nano.contains("1700000000.000001500 IP"),
        "nanosecond timestamps: {nano}"
    );
}

#[test]
fn capture_ring_drains_into_a_pcap() {
    watchdog(Duration::from_secs(60));
    let link = Link::create("pcap-link", 8).unwrap();
    let mut prod = link.capture().unwrap().producer().unwrap();
    let frames = [
        arp_frame(1, KERNEL_MAC, KERNEL_IP, [0; 6], KEEPNET_IP),
        udp_frame(),
    ];
    for (i, f) in frames.iter().enumerate() {
        let mut r = CaptureRecord {
            ts_ns: 1_700_000_000_000_000_000 + i as u64,
            orig_len: f.len() as u32,
            direction: i as u32,
            ..CaptureRecord::default()
        };
        r.data[..f.len()].copy_from_slice(f);
        prod.push(r).ok().unwrap();
    }
    let tmp = TempFile::new("ring");
    let mut w = PcapWriter::new(std::fs::File::create(&tmp.0).unwrap()).unwrap();
    assert_eq!(drain_capture(&link, &mut w).unwrap(), 2);
    assert_eq!(drain_capture(&link, &mut w).unwrap(), 0, "ring now empty");
    w.flush().unwrap();
    drop(w);
    let Some(text) = tcpdump("capture_ring_drains_into_a_pcap", &tmp.0, &[]) else {
        return;
    };
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("ARP, Request who-has 198.18.0.2"), "{text}");
    assert!(text.contains("UDP, length 5"), "{text}");
}
