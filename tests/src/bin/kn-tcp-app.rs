//! A test application on keepnet's sockets library, driven by the end-to-end TCP suite
//! (`tests/tests/tcp_lab.rs`): keepnet as the client. It attaches to the instance named by
//! KEEPNET_INSTANCE like any application. Every mode prints one result line and exits 0 on
//! success, 1 on failure; every wait is bounded.
//!
//! * `echo-client ADDR:PORT BYTES SEED`: connects to an echo server (socat on the kernel
//!   side), writes BYTES of seeded pseudo-random data from one thread while another reads
//!   the echo back and compares it byte by byte; then shuts down writing and expects EOF.
//!   Prints `ok BYTES SECONDS` or `FAIL why`.
//! * `half-close ADDR:PORT`: sends `hello`, shuts down writing, reads to EOF. Prints
//!   `got TEXT`.
//! * `refused ADDR:PORT`: a connect that must fail; prints `err KIND`.
//! * `hold-accept PORT N`: listens on PORT, prints `listening`, accepts N connections and
//!   holds them all, prints `held N`, then waits for EOF on stdin and exits.
//! * `wait-down ADDR:PORT`: connects, listens on an ephemeral port, prints `ready`, then
//!   blocks in a read of the connection (no timeout: the test kills it if it hangs) while
//!   another thread blocks in accept, until the tcp server is down for good. Prints
//!   `down READ_KIND ACCEPT_KIND: MESSAGE` (the read's error), exits 0 if both failed with
//!   `ConnectionAborted` saying the server is down.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use keepnet_sockets::TcpStream;

/// splitmix64: the same stream on both threads from the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

const CHUNK: usize = 64 * 1024;
const LIMIT: Duration = Duration::from_secs(300);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["echo-client", to, bytes, seed] => echo_client(
            to.parse().expect("ADDR:PORT"),
            bytes.parse().expect("BYTES"),
            seed.parse().expect("SEED"),
        ),
        ["half-close", to] => half_close(to.parse().expect("ADDR:PORT")),
        ["refused", to] => refused(to.parse().expect("ADDR:PORT")),
        ["hold-accept", port, n] => hold_accept(port.parse().expect("PORT"), n.parse().expect("N")),
        ["wait-down", to] => wait_down(to.parse().expect("ADDR:PORT")),
        _ => {
            eprintln!(
                "usage: kn-tcp-app echo-client ADDR:PORT BYTES SEED | half-close ADDR:PORT | refused ADDR:PORT | hold-accept PORT N | wait-down ADDR:PORT"
            );
            std::process::exit(2);
        }
    };
    match r {
        Ok(line) => {
            println!("{line}");
            std::process::exit(0)
        }
        Err(why) => {
            println!("FAIL {why}");
            std::process::exit(1)
        }
    }
}

/// Where in the expected stream the received bytes at `at` really come from (a failing
/// run's diagnosis: a negative shift is a duplicate, a positive one a hole).
fn locate(seed: u64, bytes: u64, at: u64, probe: &[u8]) -> String {
    if probe.len() < 16 {
        return "too few bytes to locate".into();
    }
    let from = at.saturating_sub(8 << 20);
    let to = (at + (8 << 20)).min(bytes);
    let mut rng = Rng(seed);
    let mut stream = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < to {
        let n = (bytes - pos).min(CHUNK as u64) as usize;
        rng.fill(&mut buf[..n]);
        if pos + n as u64 > from {
            stream.extend_from_slice(&buf[..n]);
        }
        pos += n as u64;
    }
    let base = pos - stream.len() as u64;
    match stream.windows(probe.len()).position(|w| w == probe) {
        Some(i) => format!(
            "the bytes there are stream bytes from {} (shift {})",
            base + i as u64,
            (base + i as u64) as i64 - at as i64
        ),
        None => "the bytes there are nowhere within 8 MiB of it (garbage)".into(),
    }
}

fn echo_client(to: SocketAddr, bytes: u64, seed: u64) -> Result<String, String> {
    let start = Instant::now();
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| format!("try_clone: {e}"))?;
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut rng = Rng(seed);
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            rng.fill(&mut buf[..n]);
            w.write_all(&buf[..n])
                .map_err(|e| format!("write at {sent}: {e}"))?;
            sent += n as u64;
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))
    });
    let mut r = s;
    let mut rng = Rng(seed);
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut seen = 0u64;
    let mut want_at = 0usize;
    let mut want_len = 0usize;
    while seen < bytes {
        if start.elapsed() > LIMIT {
            return Err(format!("time limit after {seen} of {bytes} bytes"));
        }
        let n = match r.read(&mut got) {
            Ok(0) => return Err(format!("EOF after {seen} of {bytes} bytes")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read at {seen}: {e}")),
        };
        let mut off = 0;
        while off < n {
            if want_at == want_len {
                want_len = (bytes - seen).min(CHUNK as u64) as usize;
                rng.fill(&mut want[..want_len]);
                want_at = 0;
            }
            let k = (n - off).min(want_len - want_at);
            if got[off..off + k] != want[want_at..want_at + k] {
                let first = (0..k)
                    .find(|&i| got[off + i] != want[want_at + i])
                    .unwrap_or(0);
                let at = seen + first as u64;
                let probe = &got[off + first..(off + first + 64).min(n)];
                return Err(format!(
                    "mismatch near byte {at} after {:.3}s: {}",
                    start.elapsed().as_secs_f64(),
                    locate(seed, bytes, at, probe)
                ));
            }
            off += k;
            want_at += k;
            seen += k as u64;
        }
    }
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("writer panicked".into()),
    }
    let mut tail = [0u8; 16];
    match r.read(&mut tail) {
        Ok(0) => {}
        Ok(n) => return Err(format!("{n} bytes past the end")),
        Err(e) => return Err(format!("waiting for EOF: {e}")),
    }
    Ok(format!("ok {bytes} {:.3}", start.elapsed().as_secs_f64()))
}

fn half_close(to: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"hello").map_err(|e| format!("write: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut text = Vec::new();
    s.read_to_end(&mut text)
        .map_err(|e| format!("read to EOF: {e}"))?;
    Ok(format!("got {}", String::from_utf8_lossy(&text)))
}

fn refused(to: SocketAddr) -> Result<String, String> {
    match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
        Ok(_) => Err(format!("connected to {to}")),
        Err(e) => Ok(format!("err {:?}", e.kind())),
    }
}

fn hold_accept(port: u16, n: usize) -> Result<String, String> {
    let l = keepnet_sockets::TcpListener::bind_with_backlog(("0.0.0.0", port), 4096)
        .map_err(|e| format!("listen on {port}: {e}"))?;
    println!("listening");
    let start = Instant::now();
    let mut held = Vec::with_capacity(n);
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    while held.len() < n {
        if start.elapsed() > LIMIT {
            return Err(format!(
                "only {} of {n} connections after {LIMIT:?}",
                held.len()
            ));
        }
        match l.accept() {
            Ok((s, _)) => held.push(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("accept after {}: {e}", held.len())),
        }
    }
    println!("held {}", held.len());
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    Ok(format!("released {}", held.len()))
}

fn wait_down(to: SocketAddr) -> Result<String, String> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
        .map_err(|e| format!("connect {to}: {e}"))?;
    let l = keepnet_sockets::TcpListener::bind("0.0.0.0:0").map_err(|e| format!("listen: {e}"))?;
    let accept = std::thread::spawn(move || l.accept().map(|_| ()));
    println!("ready");
    let mut buf = [0u8; 4096];
    let read = (&s).read(&mut buf);
    let accept = accept.join().map_err(|_| "the accept thread panicked")?;
    let (Err(r), Err(a)) = (read, accept) else {
        return Err("a read or an accept succeeded".into());
    };
    let line = format!("down {:?} {:?}: {r}", r.kind(), a.kind());
    let clear = |e: &std::io::Error| {
        e.kind() == ErrorKind::ConnectionAborted && e.to_string().contains("server is down")
    };
    if clear(&r) && clear(&a) {
        Ok(line)
    } else {
        Err(format!("{line} / accept: {a}"))
    }
}
