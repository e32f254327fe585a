//! The constellation against the Linux kernel over TAP, in private network namespaces.
//! Needs root; without it each test says so loudly and skips, except under CI=true where it
//! fails. All traffic stays inside namespaces these tests create, on 198.18.0.0/15.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use keepnet_tests::lab::{counter, root_or_skip, server, Lab as LabBase, KEEPNET_IP, KEEPNET_MAC};

const KEEPNET: &str = env!("CARGO_BIN_EXE_keepnet");

/// The shared lab, run with this package's `keepnet`.
struct Lab;

impl Lab {
    #[allow(clippy::new_ret_no_self)]
    fn new(tag: &str, extra_config: &str) -> LabBase {
        LabBase::with_binary(Path::new(KEEPNET), tag, extra_config)
    }
}

fn ping(lab: &LabBase, args: &[&str]) -> (u32, u32) {
    let mut cmd = vec!["ping", "-q", "-W", "2"];
    cmd.extend_from_slice(args);
    cmd.push(KEEPNET_IP);
    let out = lab.exec(&cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    // "200 packets transmitted, 200 received"
    let line = text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or("");
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    )
}

#[test]
fn kernel_pings_keepnet_over_tap() {
    if !root_or_skip("kernel_pings_keepnet_over_tap") {
        return;
    }
    let mut lab = Lab::new("ping", "");
    lab.up();

    assert_eq!(
        ping(&lab, &["-c", "200", "-i", "0.005"]),
        (200, 200),
        "200 small pings"
    );
    assert_eq!(
        ping(&lab, &["-c", "20", "-i", "0.05", "-s", "8000"]),
        (20, 20),
        "20 fragmented pings"
    );

    let neigh = lab.exec(&["ip", "neigh", "show", KEEPNET_IP]);
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains(KEEPNET_MAC),
        "kernel's neighbour table lacks keepnet's MAC: {neigh}"
    );

    let st = lab.status();
    for name in ["driver", "ip", "udp"] {
        let s = server(&st, name);
        assert!(s["pid"].as_u64().unwrap_or(0) > 0, "{name} pid");
        assert!(s["core"].is_u64(), "{name} core");
        assert_eq!(s["generation"].as_u64(), Some(1), "{name} generation");
        assert_eq!(s["state"], "running");
        assert_eq!(s["restarts"].as_u64(), Some(0));
    }
    // 200 + 20 * 6 fragments of requests in; as many replies out, plus ARP.
    let echoes = 200 + 20;
    let frames_in = 200 + 20 * 6;
    assert!(
        counter(&st, "driver", "rx.frames") >= frames_in,
        "driver rx.frames"
    );
    assert!(
        counter(&st, "driver", "tx.frames") >= frames_in,
        "driver tx.frames"
    );
    assert!(counter(&st, "ip", "rx.frames") >= frames_in, "ip rx.frames");
    assert!(
        counter(&st, "ip", "icmp.echo_replied") >= echoes,
        "ip echo replies"
    );
    assert_eq!(
        counter(&st, "driver", "rx.frames"),
        counter(&st, "ip", "rx.frames"),
        "every frame the driver received reached ip"
    );
}

#[test]
fn capture_writes_a_pcap_tcpdump_reads() {
    if !root_or_skip("capture_writes_a_pcap_tcpdump_reads") {
        return;
    }
    let mut lab = Lab::new("cap", "");
    lab.up();
    let pcap = lab.run_dir.join("cap.pcap");
    let pcap_s = pcap.to_string_lossy().into_owned();
    let cap = {
        let config = lab.config.clone();
        let run_dir = lab.run_dir.clone();
        let pcap_s = pcap_s.clone();
        std::thread::spawn(move || {
            Command::new(KEEPNET)
                .args(["capture", "--out", &pcap_s, "--seconds", "3", "--config"])
                .arg(&config)
                .env("KEEPNET_RUN_DIR", &run_dir)
                .output()
                .expect("run capture")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ping(&lab, &["-c", "10", "-i", "0.1"]), (10, 10));
    let out = cap.join().expect("capture thread");
    assert!(
        out.status.success(),
        "capture failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = Command::new("tcpdump")
        .args(["-nn", "-r", &pcap_s])
        .output();
    let Ok(dump) = dump else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("tcpdump is not installed (CI must install it)");
        }
        eprintln!("*** SKIPPED the tcpdump check: tcpdump is not installed ***");
        return;
    };
    let text = String::from_utf8_lossy(&dump.stdout);
    let requests = text.matches("ICMP echo request").count();
    let replies = text.matches("ICMP echo reply").count();
    assert!(
        requests >= 10 && replies >= 10,
        "pcap lacks the pings:\n{text}"
    );
}

#[test]
fn down_leaves_nothing_behind() {
    if !root_or_skip("down_leaves_nothing_behind") {
        return;
    }
    let mut lab = Lab::new("down", "");
    lab.up();
    let st = lab.status();
    let mut pids: Vec<i32> = ["driver", "ip", "udp"]
        .iter()
        .map(|n| server(&st, n)["pid"].as_u64().unwrap_or(0) as i32)
        .collect();
    // The services too.
    for svc in st["services"].as_array().expect("services in status") {
        pids.push(svc["pid"].as_u64().unwrap_or(0) as i32);
    }
    assert!(
        pids.iter().all(|&p| p > 0),
        "every process has a pid: {pids:?}"
    );
    let sup = st["supervisor_pid"].as_u64().unwrap_or(0) as i32;
    let out = lab.keepnet(&["down"]);
    assert!(out.status.success());
    lab.mark_down();
    for pid in pids.into_iter().chain([sup]) {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} still runs after down");
    }
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&ns.stdout).contains(&lab.ns),
        "namespace left behind"
    );
    assert!(
        !lab.keepnet(&["status"]).status.success(),
        "status after down must fail"
    );
}

#[test]
fn up_fails_fast_with_a_clear_message() {
    if !root_or_skip("up_fails_fast_with_a_clear_message") {
        return;
    }
    // A typo in the config names the line.
    let lab = Lab::new("typo", "[link]\nmtuu = 1500\n");
    let out = lab.keepnet(&["up", "--netns", &lab.ns]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("mtuu") && err.contains("line"), "{err}");

    // A server binary that does not exist.
    let lab = Lab::new(
        "nobin",
        "[servers.ip]\nbinary = \"/nonexistent/keepnet-ip\"\n",
    );
    let out = lab.keepnet(&["up", "--netns", &lab.ns]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/keepnet-ip"), "{err}");

    // Not root: run as nobody.
    let lab = Lab::new("nonroot", "");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            KEEPNET,
            "up",
            "--config",
        ])
        .arg(&lab.config)
        .env("KEEPNET_RUN_DIR", &lab.run_dir)
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("root"), "{err}");

    // The TAP name is taken: a second instance in the same namespace.
    let mut first = Lab::new("taken", "");
    first.up();
    let second = Lab::new("taken2", "");
    let out = second.keepnet(&["up", "--netns", &first.ns]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("kn0"), "{err}");
    // The failed instance left the namespace it did not create alone.
    assert_eq!(ping(&first, &["-c", "3", "-i", "0.2"]), (3, 3));
}

/// Internet checksum (RFC 1071).
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// An Ethernet frame to keepnet from `src_mac` carrying an IPv4 packet.
fn ipv4_frame(
    src_mac: [u8; 6],
    ihl_words: u8,
    total_len: Option<u16>,
    frag: u16,
    id: u16,
    payload: &[u8],
    good_sum: bool,
) -> Vec<u8> {
    let mut f = vec![0x02, 0x6b, 0x6e, 0x00, 0x00, 0x02];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let hl = 20usize;
    let tl = total_len.unwrap_or((hl + payload.len()) as u16);
    let mut h = vec![
        0x40 | ihl_words,
        0,
        (tl >> 8) as u8,
        tl as u8,
        (id >> 8) as u8,
        id as u8,
        (frag >> 8) as u8,
        frag as u8,
        64,
        1,
        0,
        0,
        198,
        18,
        0,
        1,
        198,
        18,
        0,
        2,
    ];
    let s = csum(&h);
    let s = if good_sum { s } else { s ^ 0x5a5a };
    h[10] = (s >> 8) as u8;
    h[11] = s as u8;
    f.extend_from_slice(&h);
    f.extend_from_slice(payload);
    f
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn bad_frames_are_counted_and_change_nothing() {
    if !root_or_skip("bad_frames_are_counted_and_change_nothing") {
        return;
    }
    let mut lab = Lab::new("bad", "");
    lab.up();
    assert_eq!(ping(&lab, &["-c", "2", "-i", "0.2"]), (2, 2));
    let mac_out = lab.exec(&["cat", "/sys/class/net/kn0/address"]);
    let mac_text = String::from_utf8_lossy(&mac_out.stdout);
    let mut src = [0u8; 6];
    for (d, p) in src.iter_mut().zip(mac_text.trim().split(':')) {
        *d = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    let icmp = {
        let mut m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        m.extend_from_slice(&[0xab; 32]);
        let s = csum(&m);
        m[2] = (s >> 8) as u8;
        m[3] = s as u8;
        m
    };
    let mut frames: Vec<(&str, Vec<u8>)> = vec![
        (
            "ipv4_short",
            ipv4_frame(src, 5, None, 0, 1, &[], true)[..14 + 10].to_vec(),
        ),
        (
            "ipv4_checksum",
            ipv4_frame(src, 5, None, 0, 2, &icmp, false),
        ),
        ("ipv4_ihl", ipv4_frame(src, 4, None, 0, 3, &icmp, true)),
        (
            "ipv4_total_len",
            ipv4_frame(src, 5, Some(1400), 0, 4, &icmp, true),
        ),
    ];
    // Overlapping fragments: 0..16 then 8..24 of the same datagram.
    frames.push((
        "frag_overlap",
        ipv4_frame(src, 5, None, 0x2000, 77, &icmp[..16], true),
    ));
    frames.push((
        "frag_overlap",
        ipv4_frame(src, 5, None, 0x2001, 77, &icmp[..16], true),
    ));
    // Endless fragments: many first fragments, never completed.
    for id in 0..200u16 {
        frames.push((
            "frag_endless",
            ipv4_frame(src, 5, None, 0x2000, 1000 + id, &icmp[..16], true),
        ));
    }
    // ARP with a bogus hardware length.
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&src);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 7, 4, 0, 1]);
    arp.extend_from_slice(&[0u8; 28]);
    frames.push(("arp_malformed", arp));

    let script = format!(
        "import socket,binascii\ns=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('kn0',0))\nfor h in {:?}:\n    s.send(binascii.unhexlify(h))\n",
        frames.iter().map(|(_, f)| hex(f)).collect::<Vec<_>>()
    );
    let out = lab.exec(&["python3", "-c", &script]);
    assert!(
        out.status.success(),
        "raw send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(300));

    let st = lab.status();
    for reason in [
        "ipv4_short",
        "ipv4_checksum",
        "ipv4_ihl",
        "ipv4_total_len",
        "frag_overlap",
        "arp_malformed",
    ] {
        let n = server(&st, "ip")["drops"][reason].as_u64().unwrap_or(0);
        assert!(
            n >= 1,
            "no drop counted for {reason}: {}",
            server(&st, "ip")["drops"]
        );
    }
    let d = &server(&st, "ip")["drops"];
    let endless = d["frag_limit"].as_u64().unwrap_or(0) + d["frag_evicted"].as_u64().unwrap_or(0);
    assert!(endless >= 1, "endless fragments hit no limit: {d}");
    for name in ["driver", "ip"] {
        assert_eq!(
            server(&st, name)["restarts"].as_u64(),
            Some(0),
            "{name} restarted"
        );
        assert_eq!(
            server(&st, name)["generation"].as_u64(),
            Some(1),
            "{name} generation"
        );
    }
    assert_eq!(
        ping(&lab, &["-c", "3", "-i", "0.2"]),
        (3, 3),
        "ping right after the bad frames"
    );
}

/// `keepnet demo`, the README's main command, end to end: ping, UDP echo, the TCP download
/// with its SHA-256, and a clean `down`.
#[test]
fn demo_runs_every_step_and_says_ok() {
    if !root_or_skip("demo_runs_every_step_and_says_ok") {
        return;
    }
    let _w = keepnet_tests::harness::Watchdog::arm("keepnet demo", Duration::from_secs(300));
    let out = Command::new(KEEPNET)
        .arg("demo")
        .output()
        .expect("run keepnet demo");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "keepnet demo failed");
    assert!(text.contains("tcp download: complete, SHA-256 right"));
    assert!(text.trim_end().ends_with("demo: OK"));
}
