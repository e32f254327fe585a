//! `keepnet demo`: the main job with no setup. A private namespace, keepnet up inside it,
//! traffic from the Linux kernel on the other side of the TAP (ping, UDP echo, a TCP
//! download, a download during which each server is killed and comes back, and one during
//! which the tcp server is live-updated), a report, and teardown on every exit path.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::client::{self, ClientError};
use super::instance::Instance;
use super::lab;
use crate::config::SERVERS;

fn step(title: &str) {
    println!("\n== {title}");
}

/// Runs the demo; returns Err if any step failed (after tearing down).
pub fn run() -> Result<(), ClientError> {
    step("keepnet up --netns kn-demo-PID");
    let inst = Instance::up("demo")?;
    let (netns, path, config) = (
        inst.netns.clone(),
        inst.config_path().to_path_buf(),
        inst.config.clone(),
    );
    println!("namespace {netns}, instance {}", config.instance);

    let target = config.ip.addr.addr.to_string();
    step(&format!(
        "ping from the Linux kernel side ({}) to keepnet ({target})",
        config.link.kernel_addr
    ));
    let (ok, out, err) = lab::netns_exec(
        &netns,
        &["ping", "-c", "5", "-i", "0.2", "-W", "2", &target],
    )
    .map_err(|source| ClientError::Io {
        what: "run ping (package iputils-ping)".into(),
        source,
    })?;
    print!("{out}");
    if !err.is_empty() {
        eprint!("{err}");
    }
    step(&format!(
        "large ping, fragmented both ways: ping -s 8000 {target}"
    ));
    let (ok_big, out_big, _) = lab::netns_exec(
        &netns,
        &[
            "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "8000", &target,
        ],
    )
    .map_err(|source| ClientError::Io {
        what: "run ping".into(),
        source,
    })?;
    print!("{out_big}");

    step(&format!(
        "UDP echo (RFC 862) from the kernel side: socat to the echo service on {target}:7"
    ));
    let greeting = "hello from the Linux kernel side";
    let (_, echo_out, echo_err) = lab::netns_exec(
        &netns,
        &[
            "sh",
            "-c",
            &format!("printf '{greeting}' | socat -t 2 - UDP:{target}:7"),
        ],
    )
    .map_err(|source| ClientError::Io {
        what: "run socat (package socat)".into(),
        source,
    })?;
    println!("sent {greeting:?}, echoed {echo_out:?}");
    if !echo_err.is_empty() {
        eprint!("{echo_err}");
    }
    step("UDP echo: 1000 datagrams of random sizes up to 65507 bytes (fragmented), each checked");
    let exe = std::env::current_exe().map_err(|source| ClientError::Io {
        what: "find the keepnet executable".into(),
        source,
    })?;
    let target7 = format!("{target}:7");
    let (probe_ok, probe_out, probe_err) = lab::netns_exec(
        &netns,
        &[
            &exe.to_string_lossy(),
            "__udp-probe",
            "--target",
            &target7,
            "--count",
            "1000",
            "--min-size",
            "0",
            "--max-size",
            "65507",
            "--seed",
            "1",
            "--json",
        ],
    )
    .map_err(|source| ClientError::Io {
        what: "run the UDP probe".into(),
        source,
    })?;
    match serde_json::from_str::<serde_json::Value>(probe_out.trim()) {
        Ok(v) => println!(
            "{} sent, {} echoed byte for byte, {} mismatched, {} lost, {:.1} MB each way in {:.2} s",
            v["sent"],
            v["echoed_ok"],
            v["mismatched"],
            v["lost"],
            v["bytes_ok"].as_f64().unwrap_or(0.0) / 1e6,
            v["duration_s"].as_f64().unwrap_or(0.0)
        ),
        Err(_) => print!("{probe_out}{probe_err}"),
    }
    let udp_ok = echo_out == greeting && probe_ok;

    const DOWNLOAD: u64 = 64 << 20;
    step(&format!(
        "TCP download from the kernel side: curl fetches http://{target}/bytes/{DOWNLOAD} (byte i = i mod 251) and checks its SHA-256"
    ));
    let want = crate::bench::tcp::pattern_sha256(DOWNLOAD);
    let t0 = std::time::Instant::now();
    let (curl_ok, curl_out, curl_err) = lab::netns_exec(
        &netns,
        &[
            "sh",
            "-c",
            &format!("curl -sS --fail --max-time 60 http://{target}/bytes/{DOWNLOAD} | sha256sum"),
        ],
    )
    .map_err(|source| ClientError::Io {
        what: "run curl (package curl)".into(),
        source,
    })?;
    let secs = t0.elapsed().as_secs_f64();
    eprint!("{curl_err}");
    let got = curl_out.split_whitespace().next().unwrap_or("").to_string();
    println!(
        "{DOWNLOAD} bytes in {secs:.2} s ({:.2} Gbit/s), sha256 {got} ({})",
        DOWNLOAD as f64 * 8.0 / secs / 1e9,
        if got == want { "right" } else { "WRONG" }
    );
    let tcp_ok = curl_ok && got == want;

    const CRASH_DOWNLOAD: u64 = 2 << 30;
    step(&format!(
        "crash recovery: `keepnet kill` (SIGKILL) each server in turn in the middle of a download \
         of http://{target}/bytes/{CRASH_DOWNLOAD} by curl, whose SHA-256 is checked at the end"
    ));
    let crash_ok = match crashes_during_a_download(&exe, &path, &netns, &target, CRASH_DOWNLOAD) {
        Ok(ok) => ok,
        Err(e) => {
            println!("crash recovery step failed: {e}");
            false
        }
    };

    const UPDATE_DOWNLOAD: u64 = 2 << 30;
    step(&format!(
        "live update: `keepnet update tcp` (to the binary it runs) in the middle of a download of \
         http://{target}/bytes/{UPDATE_DOWNLOAD} by curl, whose SHA-256 is checked at the end"
    ));
    let update_ok = match update_during_a_download(&exe, &path, &netns, &target, UPDATE_DOWNLOAD) {
        Ok(ok) => ok,
        Err(e) => {
            println!("live update step failed: {e}");
            false
        }
    };

    step("the kernel's neighbour table: keepnet's MAC");
    if let Ok((_, neigh, _)) = lab::netns_exec(&netns, &["ip", "neigh", "show", &target]) {
        print!("{neigh}");
    }

    step("keepnet status");
    let report = client::status(Some(&path))?;
    print!("{}", report.render());

    step("keepnet down");
    let gone = inst.down()?;
    println!("namespace {netns} removed: {gone}");

    step("report");
    println!(
        "ping (56 bytes): {}",
        if ok { "all replies" } else { "LOST REPLIES" }
    );
    println!(
        "ping (8000 bytes, fragmented): {}",
        if ok_big {
            "all replies"
        } else {
            "LOST REPLIES"
        }
    );
    println!(
        "udp echo: {}",
        if udp_ok {
            "echoed byte for byte"
        } else {
            "NO OR WRONG ECHO"
        }
    );
    println!(
        "tcp download: {}",
        if tcp_ok {
            "complete, SHA-256 right"
        } else {
            "FAILED OR CORRUPT"
        }
    );
    println!(
        "crash recovery: {}",
        if crash_ok {
            "each server killed mid-download and back; download complete, SHA-256 right"
        } else {
            "FAILED (see above)"
        }
    );
    println!(
        "live update: {}",
        if update_ok {
            "tcp updated mid-download (blackout above); download complete, SHA-256 right"
        } else {
            "FAILED (see above)"
        }
    );
    if ok && ok_big && udp_ok && tcp_ok && crash_ok && update_ok && gone {
        println!("demo: OK");
        Ok(())
    } else {
        Err(ClientError::Remote(
            "demo: some step failed (see above)".into(),
        ))
    }
}

/// A shell pipeline in a namespace, in a process group of its own: the whole group is killed
/// (by its id, the pipeline's own pid) and reaped on drop.
struct Pipeline {
    child: Child,
    status: Option<ExitStatus>,
}

impl Pipeline {
    fn start(netns: &str, script: &str) -> Result<Pipeline, ClientError> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| ClientError::Io {
                what: "start curl in the namespace".into(),
                source,
            })?;
        Ok(Pipeline {
            child,
            status: None,
        })
    }

    fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status.is_none()
    }

    /// Waits at most `limit` (then kills the group); returns stdout and stderr.
    fn finish(mut self, limit: Duration) -> (String, String) {
        let end = Instant::now() + limit;
        while self.running() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (out, err)
    }

    fn kill(&mut self) {
        if self.running() {
            let pgid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One server in a status report, as JSON (so fields this build may lack are just absent).
fn server_json(config: &Path, name: &str) -> Result<serde_json::Value, ClientError> {
    let report = client::status(Some(config))?;
    let v = serde_json::to_value(&report).map_err(|e| ClientError::Protocol(e.to_string()))?;
    v["servers"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .cloned()
        .ok_or_else(|| ClientError::Protocol(format!("status lists no server {name}")))
}

/// Kills each server with `keepnet kill` during a curl download, printing for each the
/// recovery time from status; true if every server came back while the download was under
/// way and the download completed with the right SHA-256.
fn crashes_during_a_download(
    exe: &Path,
    config: &Path,
    netns: &str,
    target: &str,
    bytes: u64,
) -> Result<bool, ClientError> {
    let mut dl = Pipeline::start(
        netns,
        &format!(
            "{{ curl -sS --fail --max-time 150 http://{target}/bytes/{bytes}; \
             echo curl_exit=$? >&2; }} | sha256sum"
        ),
    )?;
    let gen_of = |name: &str| -> Result<u64, ClientError> {
        Ok(server_json(config, name)?["generation"]
            .as_u64()
            .unwrap_or(0))
    };
    let first: Vec<u64> = SERVERS
        .iter()
        .map(|n| gen_of(n))
        .collect::<Result<_, _>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let mut all_back = true;
    let mut all_mid = true;
    for name in SERVERS {
        let gen = server_json(config, name)?["generation"]
            .as_u64()
            .unwrap_or(0);
        let mid = dl.running();
        all_mid &= mid;
        let mut kill = Command::new(exe);
        kill.args(["kill", name, "--config"])
            .arg(config)
            .env("RUST_LOG", "warn");
        let (status, out, err) =
            crate::bench::child::run_bounded(&mut kill, Duration::from_secs(10))
                .map_err(|e| ClientError::Protocol(format!("keepnet kill {name}: {e}")))?;
        if !status.is_some_and(|s| s.success()) {
            println!("keepnet kill {name} failed: {}{}", out.trim(), err.trim());
            all_back = false;
            continue;
        }
        let end = Instant::now() + Duration::from_secs(10);
        let back = loop {
            let s = server_json(config, name)?;
            if s["generation"].as_u64().unwrap_or(0) > gen && s["state"] == "running" {
                break Some(s);
            }
            if Instant::now() >= end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match back {
            Some(s) => println!(
                "{}: serving again after {} (status: last_recovery_us), generation {}{}",
                out.trim(),
                s["last_recovery_us"]
                    .as_u64()
                    .map_or("? ms".into(), |us| format!("{:.2} ms", us as f64 / 1000.0)),
                s["generation"],
                if mid {
                    ""
                } else {
                    " (the download had already ended)"
                }
            ),
            None => {
                println!("{}: NOT serving again within 10 s", out.trim());
                all_back = false;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (out, err) = dl.finish(Duration::from_secs(160));
    // Restarts beyond the one kill each (a hang the supervisor saw, say) cost no connection
    // either, but they are not what was asked for: say so.
    for (name, g0) in SERVERS.iter().zip(&first) {
        let s = server_json(config, name)?;
        let extra = s["generation"].as_u64().unwrap_or(0).saturating_sub(g0 + 1);
        if extra > 0 {
            println!(
                "NOTE: {name} was also restarted {extra} more time(s) during this step (last \
                 exit: {})",
                s["last_exit"]
            );
        }
    }
    let intact = download_checked(&out, &err, bytes, "the four crashes");
    Ok(all_back && all_mid && intact)
}

/// Live-updates the tcp server with `keepnet update tcp` (to the binary it runs, the default
/// grace period) half a second into a curl download, printing the update's line; true if
/// the update was `updated` while the download was under way and the download completed
/// with the right SHA-256.
fn update_during_a_download(
    exe: &Path,
    config: &Path,
    netns: &str,
    target: &str,
    bytes: u64,
) -> Result<bool, ClientError> {
    let before = server_json(config, "tcp")?;
    let mut dl = Pipeline::start(
        netns,
        &format!(
            "{{ curl -sS --fail --max-time 150 http://{target}/bytes/{bytes}; \
             echo curl_exit=$? >&2; }} | sha256sum"
        ),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mid_before = dl.running();
    let mut update = Command::new(exe);
    update
        .args(["update", "tcp", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn");
    let (status, out, err) = crate::bench::child::run_bounded(&mut update, Duration::from_secs(90))
        .map_err(|e| ClientError::Protocol(format!("keepnet update tcp: {e}")))?;
    let mid_after = dl.running();
    let exit_ok = status.is_some_and(|s| s.success());
    let line = out.trim();
    // Status says the same as the command did, or the update was not what it seemed.
    let after = server_json(config, "tcp")?;
    let last = &after["last_update"];
    let updated = exit_ok && last["result"] == "updated";
    if updated {
        println!("{line}");
        println!(
            "status: tcp pid {} -> {}, generation {} -> {}, state {}, blackout {} (last_update)",
            before["pid"],
            after["pid"],
            before["generation"],
            after["generation"],
            after["state"],
            last["blackout_us"]
                .as_u64()
                .map_or("not measured".into(), |us| format!(
                    "{:.3} ms",
                    us as f64 / 1000.0
                )),
        );
    } else {
        println!(
            "keepnet update tcp: NOT UPDATED ({}): {}{}",
            status.map_or("killed at its time limit".into(), |s| s.to_string()),
            line,
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(" {}", err.trim())
            }
        );
        if !last.is_null() {
            println!(
                "status last_update: result {}, reason {}",
                last["result"], last["reason"]
            );
        }
    }
    if !(mid_before && mid_after) {
        println!(
            "NOTE: the download was not under way {} the update: it did not run through it",
            if mid_before { "after" } else { "before" }
        );
    }
    let (out, err) = dl.finish(Duration::from_secs(160));
    let intact = download_checked(&out, &err, bytes, "the update");
    Ok(updated && mid_before && mid_after && intact)
}

/// A finished curl download of `bytes` pattern bytes (its stdout: the SHA-256; its stderr:
/// `curl_exit=N` and anything else, echoed): prints how it went `through` what, and says
/// whether curl exited 0 with the right SHA-256.
fn download_checked(out: &str, err: &str, bytes: u64, through: &str) -> bool {
    let curl_exit = err
        .lines()
        .find_map(|l| l.strip_prefix("curl_exit="))
        .map(str::trim)
        .unwrap_or("?")
        .to_string();
    for l in err.lines().filter(|l| !l.starts_with("curl_exit=")) {
        eprintln!("{l}");
    }
    let got = out.split_whitespace().next().unwrap_or("").to_string();
    let right = got == crate::bench::tcp::pattern_sha256(bytes);
    println!(
        "download of {bytes} bytes through {through}: curl exit {curl_exit}, sha256 {got} ({})",
        if right { "right" } else { "WRONG" }
    );
    curl_exit == "0" && right
}
