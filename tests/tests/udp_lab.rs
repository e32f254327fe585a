//! UDP end to end, against the Linux kernel over TAP in a private namespace (issue 4): the
//! echo service, ICMP port unreachable both ways, port ownership between applications, and
//! the sockets library's error kinds on the real stack. Needs root: skips loudly without it,
//! fails under CI=true. Traffic stays inside the lab's namespace on 198.18.0.0/15.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keepnet_tests::harness::Watchdog;
use keepnet_tests::lab::{binary, counter, root_or_skip, Lab, KEEPNET_IP};

/// An application process the test owns: killed and reaped on drop.
struct App {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl App {
    fn start(lab: &Lab, args: &[&str]) -> App {
        let mut child = lab
            .app_command(&binary("kn-udp-app"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kn-udp-app");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        App { child, out }
    }

    fn line(&mut self) -> String {
        let mut s = String::new();
        let _ = self.out.read_line(&mut s);
        s.trim().to_string()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes stdin and waits for the exit.
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            assert!(Instant::now() < end, "app did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `kn-udp-app ARGS` to completion and returns its first output line.
fn run_app(lab: &Lab, args: &[&str]) -> String {
    let out = lab
        .app_command(&binary("kn-udp-app"))
        .args(args)
        .output()
        .expect("run kn-udp-app");
    eprintln!(
        "kn-udp-app {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Retries `try-bind PORT` until it succeeds or `limit` passes.
fn bind_frees_within(lab: &Lab, port: u16, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        if run_app(lab, &["try-bind", &port.to_string()]) == "ok" {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn kernel_echoes_10000_random_datagrams_through_keepnet() {
    if !root_or_skip("kernel_echoes_10000_random_datagrams_through_keepnet") {
        return;
    }
    let _w = Watchdog::arm("udp echo", Duration::from_secs(600));
    let mut lab = Lab::new("udpecho", "");
    lab.up();

    // A standard tool first: socat's datagram comes back unchanged.
    let out = lab.exec(&[
        "sh",
        "-c",
        &format!("printf 'hello keepnet' | socat -t 2 - UDP:{KEEPNET_IP}:7"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello keepnet");

    // A datagram sent with no checksum (SO_NO_CHECK: the field is 0, "none", RFC 768) is
    // accepted and echoed.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, 11, 1)\n\
         s.settimeout(3)\n\
         s.sendto(b'no checksum', ('{KEEPNET_IP}', 7))\n\
         print(s.recv(100).decode())\n"
    );
    let out = lab.exec(&["python3", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no checksum",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 10,000 round trips, random sizes 0..=65507, random bytes, each reply checked.
    let keepnet = binary("keepnet");
    let target = format!("{KEEPNET_IP}:7");
    let out = lab.exec(&[
        keepnet.to_str().expect("path"),
        "__udp-probe",
        "--target",
        &target,
        "--count",
        "10000",
        "--min-size",
        "0",
        "--max-size",
        "65507",
        "--seed",
        "4",
        "--outstanding",
        "1",
        "--timeout-ms",
        "1000",
        "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_str(text.trim()).expect("probe JSON");
    assert_eq!(
        r["mismatched"].as_u64(),
        Some(0),
        "every echo byte-identical"
    );
    assert_eq!(r["lost"].as_u64(), Some(0), "every datagram echoed");
    assert_eq!(r["echoed_ok"].as_u64(), Some(10000));
    assert!(out.status.success());

    let st = lab.status();
    assert!(counter(&st, "udp", "rx.datagrams") >= 10000);
    assert!(counter(&st, "udp", "tx.datagrams") >= 10000);
    assert_eq!(counter(&st, "udp", "drop.checksum"), 0);
}

#[test]
fn closed_ports_are_refused_both_ways() {
    if !root_or_skip("closed_ports_are_refused_both_ways") {
        return;
    }
    let _w = Watchdog::arm("udp refused", Duration::from_secs(120));
    let mut lab = Lab::new("udprefused", "");
    lab.up();

    // The kernel, connected to a port nobody bound on keepnet, gets ECONNREFUSED from
    // keepnet's ICMP port unreachable.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.connect(('{KEEPNET_IP}', 4444))\n\
         s.send(b'anyone?')\n\
         try:\n    s.recv(100)\n    print('answered')\n\
         except ConnectionRefusedError:\n    print('refused')\n\
         except socket.timeout:\n    print('timeout')\n"
    );
    let out = lab.exec(&["python3", "-c", &script]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "refused",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = lab.status();
    assert!(counter(&st, "udp", "icmp.unreach_sent") >= 1);

    // The sockets library on the real stack: timeouts, non-blocking, every error kind, and
    // ConnectionRefused from the kernel's ICMP port unreachable.
    let out = lab
        .app_command(&binary("kn-udp-app"))
        .args(["checks", "198.18.0.1"])
        .output()
        .expect("kn-udp-app checks");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "library checks failed:\n{text}");
    for name in [
        "read_timeout",
        "nonblocking",
        "addr_in_use",
        "addr_not_available",
        "not_connected",
        "too_long",
        "connection_refused",
    ] {
        assert!(
            text.contains(&format!("ok {name}")),
            "{name} missing:\n{text}"
        );
    }
}

#[test]
fn applications_own_their_ports_and_regions() {
    if !root_or_skip("applications_own_their_ports_and_regions") {
        return;
    }
    let _w = Watchdog::arm("udp apps", Duration::from_secs(180));
    let mut lab = Lab::new("udpapps", "services = []\n");
    lab.up();

    // Two applications cannot bind the same port.
    let mut a = App::start(&lab, &["hold", "5555"]);
    let first = a.line();
    assert!(first.starts_with("bound 5555"), "{first}");
    let second = run_app(&lab, &["try-bind", "5555"]);
    assert!(second.starts_with("err AddrInUse"), "{second}");

    // Another user's application cannot reach the first one's region.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("kn-udp-app"))
        .args(["peek-other", &a.pid().to_string()])
        .env("KEEPNET_RUN_DIR", &lab.run_dir)
        .env("KEEPNET_INSTANCE", &lab.instance)
        .output()
        .expect("setpriv");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "denied", "another app opened a region");

    // Each application has a region of its own: the supervisor lists distinct ids.
    let st = lab.status();
    let apps = st["apps"].as_array().expect("apps in status");
    assert!(apps
        .iter()
        .any(|x| x["pid"].as_u64() == Some(u64::from(a.pid()))));

    // Killed without closing: the port is free again.
    let _ = a.child.kill();
    let _ = a.child.wait();
    assert!(
        bind_frees_within(&lab, 5555, Duration::from_secs(5)),
        "port 5555 still bound after its app was killed"
    );

    // Exited without closing: the same.
    let mut b = App::start(&lab, &["hold", "6666", "--no-close"]);
    assert!(b.line().starts_with("bound 6666"));
    assert!(b.finish().success());
    assert!(
        bind_frees_within(&lab, 6666, Duration::from_secs(5)),
        "port 6666 still bound after its app exited"
    );

    // Nothing attached any more.
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let st = lab.status();
        if st["apps"].as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(Instant::now() < end, "apps still attached: {}", st["apps"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::io::stderr().flush();
}

/// Echo one datagram from the kernel side with socat; true if it came back unchanged.
fn socat_echo(lab: &Lab, text: &str) -> bool {
    let out = lab.exec(&[
        "sh",
        "-c",
        &format!("printf '{text}' | socat -t 2 - UDP:{KEEPNET_IP}:7"),
    ]);
    String::from_utf8_lossy(&out.stdout) == text
}

/// Waits until `pred(status)` holds, at most `limit`.
fn wait_status(lab: &Lab, limit: Duration, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let end = Instant::now() + limit;
    loop {
        let st = lab.status();
        if pred(&st) {
            return;
        }
        assert!(Instant::now() < end, "{what}: not within {limit:?}: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn service<'a>(st: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in status"))
}

#[test]
fn services_restart_and_sockets_survive_a_udp_server_crash() {
    if !root_or_skip("services_restart_and_sockets_survive_a_udp_server_crash") {
        return;
    }
    let _w = Watchdog::arm("udp restarts", Duration::from_secs(180));
    let mut lab = Lab::new("udprestart", "");
    lab.up();
    assert!(socat_echo(&lab, "before"));

    // A service that dies is started again, and serves again.
    let st = lab.status();
    let echo_pid = service(&st, "udp-echo")["pid"].as_u64().expect("echo pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(echo_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the echo service");
    wait_status(
        &lab,
        Duration::from_secs(10),
        "echo service restarted",
        |st| {
            let s = service(st, "udp-echo");
            s["restarts"].as_u64() == Some(1) && s["state"] == "running"
        },
    );
    assert!(socat_echo(&lab, "after the service restart"));

    // The udp server dies: a fresh one keeps every bound socket, so the echo service (not
    // restarted) serves on.
    let st = lab.status();
    let udp_pid = keepnet_tests::lab::server(&st, "udp")["pid"]
        .as_u64()
        .expect("udp pid") as i32;
    let echo_pid = service(&st, "udp-echo")["pid"].as_u64();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(udp_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the udp server");
    wait_status(
        &lab,
        Duration::from_secs(10),
        "udp server restarted",
        |st| {
            let s = keepnet_tests::lab::server(st, "udp");
            s["restarts"].as_u64() == Some(1)
                && s["state"] == "running"
                && s["generation"].as_u64() == Some(2)
        },
    );
    // Up to a few datagrams in flight may be lost to the crash (UDP); then echo works.
    let end = Instant::now() + Duration::from_secs(5);
    while !socat_echo(&lab, "after the udp server restart") {
        assert!(Instant::now() < end, "no echo after the udp server restart");
    }
    let st = lab.status();
    assert_eq!(
        service(&st, "udp-echo")["pid"].as_u64(),
        echo_pid,
        "the service was not restarted"
    );
    assert_eq!(service(&st, "udp-echo")["restarts"].as_u64(), Some(1));
    // Its port is still taken.
    let taken = run_app(&lab, &["try-bind", "7"]);
    assert!(taken.starts_with("err AddrInUse"), "{taken}");
}
