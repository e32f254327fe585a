//! TCP end to end, against the Linux kernel over TAP in a private namespace (issue 5): the
//! kernel's curl, socat and sockets talk to keepnet's services, keepnet's sockets library
//! talks to the kernel's listeners, and malformed segments are dropped and counted. Needs
//! root: skips loudly without it, fails under CI=true. Traffic stays inside the lab's
//! namespace on 198.18.0.0/15; every load is bounded in bytes and time.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use keepnet_tests::harness::Watchdog;
use keepnet_tests::lab::{binary, bytes_sha256, counter, root_or_skip, Lab, KEEPNET_IP};

const KERNEL_IP: &str = "198.18.0.1";
const GIB: u64 = 1 << 30;

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sh(lab: &Lab, script: &str) -> Output {
    let o = lab.exec(&["sh", "-c", script]);
    eprintln!("$ {script}\n{}", text(&o));
    o
}

/// A process in the lab's namespace, killed and reaped on drop.
struct Bg(Child);

impl Bg {
    fn start(lab: &Lab, script: &str) -> Bg {
        let c = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns,
                "sh",
                "-c",
                &format!("exec {script}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in netns");
        Bg(c)
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn service_log(lab: &Lab, name: &str) -> String {
    let p = lab
        .run_dir
        .join(&lab.instance)
        .join(format!("service-{name}.log"));
    std::fs::read_to_string(p).unwrap_or_default()
}

fn app(lab: &Lab, args: &[&str]) -> Output {
    let o = lab
        .app_command(&binary("kn-tcp-app"))
        .args(args)
        .output()
        .expect("run kn-tcp-app");
    eprintln!("kn-tcp-app {args:?}: {}", text(&o));
    o
}

#[test]
fn curl_fetches_a_gibibyte_intact_and_a_closed_port_is_refused() {
    if !root_or_skip("curl_fetches_a_gibibyte_intact_and_a_closed_port_is_refused") {
        return;
    }
    let _w = Watchdog::arm(
        "curl_fetches_a_gibibyte_intact_and_a_closed_port_is_refused",
        Duration::from_secs(300),
    );
    let mut lab = Lab::new("tcpcurl", "");
    lab.up();
    let want = bytes_sha256(GIB);
    let o = sh(
        &lab,
        &format!("curl -sS --fail --max-time 240 http://{KEEPNET_IP}/bytes/{GIB} | sha256sum"),
    );
    assert!(o.status.success());
    let got = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "SHA-256 of /bytes/{GIB}"
    );
    // A port nobody listens on: the kernel gets a RST and curl says so.
    let o = sh(
        &lab,
        &format!("curl -sS --max-time 10 http://{KEEPNET_IP}:81/"),
    );
    assert_eq!(o.status.code(), Some(7), "curl exit 7: failed to connect");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Connection refused") || err.contains("Couldn't connect"),
        "{err}"
    );
    let st = lab.status();
    assert!(counter(&st, "tcp", "tx.rst") >= 1);
}

#[test]
fn socat_sends_a_gibibyte_to_discard_and_keepnet_counts_exactly_that() {
    if !root_or_skip("socat_sends_a_gibibyte_to_discard_and_keepnet_counts_exactly_that") {
        return;
    }
    let _w = Watchdog::arm(
        "socat_sends_a_gibibyte_to_discard_and_keepnet_counts_exactly_that",
        Duration::from_secs(300),
    );
    let mut lab = Lab::new("tcpdisc", "");
    lab.up();
    let o = sh(
        &lab,
        &format!("head -c {GIB} /dev/zero | timeout 240 socat -u - TCP:{KEEPNET_IP}:9"),
    );
    assert!(o.status.success());
    let line = format!("closed after {GIB} bytes");
    wait_for(
        "the discard service's count",
        Duration::from_secs(30),
        || service_log(&lab, "tcp-discard").contains(&line),
    );
}

#[test]
fn a_hundred_concurrent_connections_each_echo_10_mib_intact() {
    if !root_or_skip("a_hundred_concurrent_connections_each_echo_10_mib_intact") {
        return;
    }
    let _w = Watchdog::arm(
        "a_hundred_concurrent_connections_each_echo_10_mib_intact",
        Duration::from_secs(400),
    );
    let mut lab = Lab::new("tcpecho", "");
    lab.up();
    let keepnet = binary("keepnet");
    let k = keepnet.to_string_lossy();
    let o = sh(
        &lab,
        &format!(
            "{k} __tcp-probe echo --to {KEEPNET_IP}:7 --conns 100 --bytes {} --seed 5 --timeout-s 300",
            10 << 20
        ),
    );
    if !o.status.success() {
        // Whether a server was restarted meanwhile, and why: the first thing to know.
        let st = lab.status();
        for s in st["servers"].as_array().into_iter().flatten() {
            eprintln!(
                "{}: restarts {}, last exit {}",
                s["name"], s["restarts"], s["last_exit"]
            );
        }
    }
    assert!(o.status.success());
    let line = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value =
        serde_json::from_str(line.lines().last().unwrap_or("{}")).expect("probe prints JSON");
    assert_eq!(v["passed"], true, "{v}");
    assert_eq!(v["ok"], 100, "{v}");
    assert_eq!(v["mismatched"], 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
}

#[test]
fn half_close_works_both_ways() {
    if !root_or_skip("half_close_works_both_ways") {
        return;
    }
    let _w = Watchdog::arm("half_close_works_both_ways", Duration::from_secs(120));
    let mut lab = Lab::new("tcphalf", "");
    lab.up();
    // The kernel closes its sending side first; keepnet's echo still sends everything back.
    let py = format!(
        "import socket\n\
         s=socket.create_connection(('{KEEPNET_IP}',7),timeout=20)\n\
         data=bytes(i%253 for i in range(300000))\n\
         s.sendall(data); s.shutdown(socket.SHUT_WR)\n\
         got=b''\n\
         while True:\n\
         \x20   b=s.recv(65536)\n\
         \x20   if not b: break\n\
         \x20   got+=b\n\
         print('same' if got==data else 'differ %d' % len(got))\n"
    );
    let o = lab.exec(&["python3", "-c", &py]);
    eprintln!("{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "same");
    // keepnet closes its sending side first; the kernel answers after the EOF.
    let server = format!(
        "import socket\n\
         l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         l.bind(('{KERNEL_IP}',7001)); l.listen(1); l.settimeout(30)\n\
         c,_=l.accept(); c.settimeout(30)\n\
         got=b''\n\
         while True:\n\
         \x20   b=c.recv(4096)\n\
         \x20   if not b: break\n\
         \x20   got+=b\n\
         c.sendall(b'after eof: '+got); c.close()\n"
    );
    let _srv = Bg::start(
        &lab,
        &format!("python3 -c \"{}\"", server.replace('"', "\\\"")),
    );
    std::thread::sleep(Duration::from_millis(500));
    let o = app(&lab, &["half-close", &format!("{KERNEL_IP}:7001")]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "got after eof: hello"
    );
}

#[test]
fn keepnet_as_client_echoes_256_mib_through_socat() {
    if !root_or_skip("keepnet_as_client_echoes_256_mib_through_socat") {
        return;
    }
    let _w = Watchdog::arm(
        "keepnet_as_client_echoes_256_mib_through_socat",
        Duration::from_secs(300),
    );
    let mut lab = Lab::new("tcpcli", "");
    lab.up();
    let _socat = Bg::start(
        &lab,
        // EXEC:cat, not PIPE: socat's PIPE echo can block forever writing 8 KiB into its own
        // pipe with only one page free (socat is also the pipe's only reader).
        &format!("socat TCP-LISTEN:7002,bind={KERNEL_IP},reuseaddr EXEC:cat"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let o = app(
        &lab,
        &[
            "echo-client",
            &format!("{KERNEL_IP}:7002"),
            &(256u64 << 20).to_string(),
            "42",
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("ok "),
        "keepnet client echo failed"
    );
    // And a port with no listener on the kernel side is refused.
    let o = app(&lab, &["refused", &format!("{KERNEL_IP}:7003")]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "err ConnectionRefused"
    );
}

/// Raw segments from the kernel side: each malformation dropped and counted by its reason,
/// while an established connection carries on.
#[test]
fn malformed_segments_are_dropped_and_counted_while_a_connection_carries_on() {
    if !root_or_skip("malformed_segments_are_dropped_and_counted_while_a_connection_carries_on") {
        return;
    }
    let _w = Watchdog::arm(
        "malformed_segments_are_dropped_and_counted_while_a_connection_carries_on",
        Duration::from_secs(120),
    );
    let mut lab = Lab::new("tcpbad", "");
    lab.up();
    let py = format!(
        r#"
import socket, struct, time
K, D = '{KERNEL_IP}', '{KEEPNET_IP}'
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b)//2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
def seg(sport, dport, seq, ack, flags, opts=b'', payload=b'', off=None, bad_sum=False, win=65535):
    hl = 20 + len(opts)
    o = (off if off is not None else hl // 4) << 4
    h = struct.pack('!HHIIBBHHH', sport, dport, seq, ack, o, flags, win, 0, 0) + opts + payload
    ph = socket.inet_aton(K) + socket.inet_aton(D) + struct.pack('!BBH', 0, 6, len(h))
    c = csum(ph + h)
    if bad_sum: c ^= 0x1234
    return h[:16] + struct.pack('!H', c) + h[18:]
live = socket.create_connection((D, 7), timeout=10)
live.sendall(b'before'); assert live.recv(100) == b'before'
lport = live.getsockname()[1]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
S, A, R, F, P = 0x02, 0x10, 0x04, 0x01, 0x08
sends = [
  ('checksum', seg(40000, 7, 1, 0, S, bad_sum=True)),
  ('offset_low', seg(40001, 7, 1, 0, S, off=3)),
  ('offset_high', seg(40002, 7, 1, 0, S, off=15)),
  ('opt_truncated', seg(40003, 7, 1, 0, S, opts=b'\x01\x01\x01\x02')),
  ('opt_len0', seg(40004, 7, 1, 0, S, opts=b'\x08\x00\x01\x01')),
  ('opt_overrun', seg(40005, 7, 1, 0, S, opts=b'\x02\x08\x05\xb4')),
  ('syn_fin', seg(40006, 7, 1, 0, S | F)),
  ('no_flags', seg(40007, 7, 1, 0, 0)),
  ('syn_rst', seg(40008, 7, 1, 0, S | R)),
  ('rst_wrong_seq', seg(lport, 7, 12345, 0, R)),
  ('data_outside_window', seg(lport, 7, 0x7fff0000, 0, A | P, payload=b'junk')),
]
for name, b in sends:
    raw.sendto(b, (D, 0)); time.sleep(0.02)
time.sleep(0.3)
live.sendall(b'after'); assert live.recv(100) == b'after'
live.close()
print('ok')
"#
    );
    let o = lab.exec(&["python3", "-c", &py]);
    eprintln!("{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "ok");
    let st = lab.status();
    let c = |n: &str| counter(&st, "tcp", n);
    assert!(c("drop.checksum") >= 1, "checksum");
    assert!(c("drop.data_offset") >= 2, "data offset low and high");
    assert!(
        c("drop.bad_option") >= 3,
        "truncated, zero-length, overrunning options"
    );
    assert!(c("drop.illegal_flags") >= 3, "SYN+FIN, no flags, SYN+RST");
    assert!(
        c("rx.challenge_acks") + c("drop.unacceptable") >= 2,
        "RST with a wrong sequence number, data outside the window"
    );
}

#[test]
fn a_download_completes_through_a_syn_flood() {
    if !root_or_skip("a_download_completes_through_a_syn_flood") {
        return;
    }
    let _w = Watchdog::arm(
        "a_download_completes_through_a_syn_flood",
        Duration::from_secs(240),
    );
    let mut lab = Lab::new("tcpflood", "");
    lab.up();
    // The kernel would answer keepnet's SYN-ACKs to the flood with RSTs and empty the SYN
    // queue; drop those RSTs inside the lab so the queue overflows and cookies are used.
    let o = sh(
        &lab,
        "iptables -A OUTPUT -p tcp --tcp-flags RST RST --dport 80 -j DROP",
    );
    let filtered = o.status.success();
    let _flood = Bg::start(
        &lab,
        &format!("timeout 60 hping3 -q -S -p 80 -i u200 -c 100000 {KEEPNET_IP}"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let n: u64 = 256 << 20;
    let o = sh(
        &lab,
        &format!("curl -sS --fail --max-time 120 http://{KEEPNET_IP}/bytes/{n} | sha256sum"),
    );
    assert!(o.status.success());
    let got = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        got.split_whitespace().next(),
        Some(bytes_sha256(n).as_str())
    );
    let st = lab.status();
    eprintln!(
        "syn-acks {} cookies {} (RSTs filtered: {filtered})",
        counter(&st, "tcp", "listen.synacks"),
        counter(&st, "tcp", "listen.cookies_sent")
    );
    assert!(
        counter(&st, "tcp", "listen.synacks") > 100,
        "the flood reached keepnet"
    );
}

/// 10,000 idle established connections at once: the kernel opens them to an application
/// that accepts and holds every one; each is still established after a pause.
#[test]
fn ten_thousand_idle_connections_are_held_at_once() {
    if !root_or_skip("ten_thousand_idle_connections_are_held_at_once") {
        return;
    }
    let _w = Watchdog::arm(
        "ten_thousand_idle_connections_are_held_at_once",
        Duration::from_secs(240),
    );
    let mut lab = Lab::new("tcp10k", "");
    lab.up();
    const N: usize = 10_000;
    let mut holder = lab
        .app_command(&binary("kn-tcp-app"))
        .args(["hold-accept", "7100", &N.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kn-tcp-app");
    let mut out = std::io::BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    use std::io::BufRead;
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "listening");
    let py = format!(
        "import socket, resource, time\n\
         h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))\n\
         socks = []\n\
         t = time.time()\n\
         for i in range({N}):\n\
         \x20   s = socket.socket(); s.settimeout(10)\n\
         \x20   s.connect(('{KEEPNET_IP}', 7100)); socks.append(s)\n\
         print('opened %d in %.1f s' % (len(socks), time.time() - t), flush=True)\n\
         time.sleep(5)\n\
         alive = 0\n\
         for s in socks:\n\
         \x20   s.setblocking(False)\n\
         \x20   try:\n\
         \x20       s.recv(1)\n\
         \x20   except BlockingIOError:\n\
         \x20       alive += 1\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print('established', alive, flush=True)\n"
    );
    let o = lab.exec(&["python3", "-c", &py]);
    eprintln!("{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains(&format!("established {N}")), "{stdout}");
    line.clear();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), format!("held {N}"));
    let st = lab.status();
    assert!(counter(&st, "tcp", "conn.accepted") >= N as u64);
    drop(holder.stdin.take());
    let _ = holder.kill();
    let _ = holder.wait();
}
