//! `keepnet demo`: the main job with no setup. A private namespace, keepnet up inside it,
//! traffic from the Linux kernel on the other side of the TAP, a report, and teardown on every
//! exit path.

use super::client::{self, ClientError};
use super::instance::Instance;
use super::lab;

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
    if ok && ok_big && udp_ok && tcp_ok && gone {
        println!("demo: OK");
        Ok(())
    } else {
        Err(ClientError::Remote(
            "demo: some step failed (see above)".into(),
        ))
    }
}
