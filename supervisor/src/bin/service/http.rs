//! The `http` demo service: a small HTTP/1.1 server (RFC 9110, RFC 9112) with keep-alive.
//!
//! * `GET /bytes/N`: N bytes (any N a u64 holds), byte i being `i % 251`, as
//!   `application/octet-stream` with `Content-Length: N`, streamed from one pattern buffer:
//!   nothing N-sized is ever allocated;
//! * `GET /` and `GET /status`: a short `text/plain` status page (uptime, connections and
//!   requests served, bytes served);
//! * `HEAD` of either: the same headers, no body; anything else: 404; a method other than
//!   GET and HEAD: 405.
//!
//! A connection carries requests one after another until the client says
//! `Connection: close`, speaks HTTP/1.0, sends something that is not HTTP (400, then close),
//! or stays idle for [`IDLE`]. The request head is limited to [`MAX_HEAD`] bytes (431 past it).
//! Parsing ([`parse_request`]), routing ([`route`]) and the body generator ([`Pattern`]) are
//! plain functions with no I/O.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keepnet_sockets::TcpStream;
use tracing::debug;

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a connection may sit between requests (or inside one) before it is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// Largest request body read and thrown away (a GET with a body, a refused POST); past it the
/// connection is closed after the answer.
const MAX_BODY: u64 = 1 << 20;
/// The modulus of the `/bytes/N` pattern (a prime: no buffer size hides a shift).
pub const PERIOD: usize = 251;
/// Bytes per write of a `/bytes/N` body.
const CHUNK: usize = 64 * 1024;

/// The HTTP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub version: Version,
    /// The connection ends after the answer (`Connection: close`, or HTTP/1.0).
    pub close: bool,
    /// Declared body length (0 without `Content-Length`).
    pub content_length: u64,
}

/// Why a request head is refused: the status to answer with (the connection then closes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

fn refuse(status: u16, reason: &'static str) -> Refusal {
    Refusal { status, reason }
}

/// What [`parse_request`] made of the bytes so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet: read more.
    Partial,
    /// A request, and how many bytes its head took.
    Done(Request, usize),
    /// Not a request we serve.
    Refused(Refusal),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where the head ends (after its empty line, CRLF or a lone LF as RFC 9112 2.2 allows).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        // An empty line: "\n\n" or "\n\r\n".
        match buf.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Parses the request head at the start of `buf` (after any empty lines before it, which
/// RFC 9112 2.2 says to ignore).
pub fn parse_request(buf: &[u8]) -> Parsed {
    // Leading empty lines.
    let mut start = 0;
    loop {
        match &buf[start..] {
            [b'\r', b'\n', ..] => start += 2,
            [b'\n', ..] => start += 1,
            [b'\r'] | [] => return Parsed::Partial,
            _ => break,
        }
    }
    let Some(end) = head_end(&buf[start..]).map(|e| e + start) else {
        if buf.len() > MAX_HEAD {
            return Parsed::Refused(refuse(431, "Request Header Fields Too Large"));
        }
        // Refuse garbage early rather than waiting for a head that never ends.
        let first = &buf[start..];
        if let Some(sp) = first.iter().position(|&b| b == b' ') {
            if sp == 0 || !first[..sp].iter().all(|&b| is_tchar(b)) {
                return Parsed::Refused(refuse(400, "Bad Request"));
            }
        } else if !first.iter().all(|&b| is_tchar(b)) {
            return Parsed::Refused(refuse(400, "Bad Request"));
        }
        return Parsed::Partial;
    };
    if end > MAX_HEAD {
        return Parsed::Refused(refuse(431, "Request Header Fields Too Large"));
    }
    match parse_head(&buf[start..end]) {
        Ok(r) => Parsed::Done(r, end),
        Err(e) => Parsed::Refused(e),
    }
}

fn parse_head(head: &[u8]) -> Result<Request, Refusal> {
    let bad = || refuse(400, "Bad Request");
    let text = std::str::from_utf8(head).map_err(|_| bad())?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let line = lines.next().ok_or_else(bad)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(bad());
    }
    if target.is_empty() || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    let version = match version {
        "HTTP/1.1" => Version::Http11,
        "HTTP/1.0" => Version::Http10,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(refuse(505, "HTTP Version Not Supported"))
        }
        _ => return Err(bad()),
    };
    let mut close = version == Version::Http10;
    let mut content_length: Option<u64> = None;
    let mut host = false;
    for l in lines {
        if l.is_empty() {
            break;
        }
        // No obsolete line folding, no space before the colon (RFC 9112 5.1, 5.2).
        let (name, value) = l.split_once(':').ok_or_else(bad)?;
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(bad());
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(bad());
        }
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = value.parse().map_err(|_| bad())?;
            if content_length.is_some_and(|c| c != n) {
                return Err(bad());
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // No request bodies in chunks here.
            return Err(refuse(501, "Not Implemented"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        } else if name.eq_ignore_ascii_case("host") {
            host = true;
        }
    }
    // RFC 9112 3.2: a 1.1 request without Host is answered 400.
    if version == Version::Http11 && !host {
        return Err(bad());
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        version,
        close,
        content_length: content_length.unwrap_or(0),
    })
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/bytes/N`.
    Bytes(u64),
    /// `/` or `/status`.
    Status,
    /// 400: `/bytes/` with something that is not a number.
    BadNumber,
    NotFound,
    /// A method other than GET and HEAD.
    MethodNotAllowed,
}

/// Routes a request (the target's query is ignored; an absolute-form target is reduced to
/// its path).
pub fn route(method: &str, target: &str) -> Route {
    if method != "GET" && method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or(path);
    match path {
        "/" | "/status" => Route::Status,
        p => match p.strip_prefix("/bytes/") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                n.parse().map_or(Route::BadNumber, Route::Bytes)
            }
            Some(_) => Route::BadNumber,
            None => Route::NotFound,
        },
    }
}

/// The `/bytes/N` body: byte i is `i % 251`. One buffer serves every chunk: the chunk at
/// offset `o` is a window of it starting at `o % 251`.
pub struct Pattern {
    buf: Vec<u8>,
}

impl Default for Pattern {
    fn default() -> Pattern {
        Pattern::new()
    }
}

impl Pattern {
    /// The pattern for chunks of up to [`CHUNK`] bytes.
    pub fn new() -> Pattern {
        Pattern {
            buf: (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect(),
        }
    }

    /// The bytes of the body from `offset` on, at most `len` of them and at most one chunk.
    pub fn chunk(&self, offset: u64, len: u64) -> &[u8] {
        let start = (offset % PERIOD as u64) as usize;
        let n = len.min(CHUNK as u64) as usize;
        &self.buf[start..start + n]
    }
}

/// The service's counters, shared by its connections.
pub struct Stats {
    started: Instant,
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            started: Instant::now(),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// The status page.
    pub fn page(&self) -> String {
        format!(
            "keepnet http service\n\
             uptime: {} s\n\
             connections served: {}\n\
             requests served: {}\n\
             bytes served: {}\n",
            self.started.elapsed().as_secs(),
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// The head of a response.
fn response_head(status: u16, reason: &str, kind: &str, len: u64, close: bool) -> String {
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nServer: keepnet-service\r\nContent-Type: {kind}\r\n\
         Content-Length: {len}\r\n"
    );
    if status == 405 {
        h.push_str("Allow: GET, HEAD\r\n");
    }
    h.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    });
    h
}

/// Sends a small complete response; returns the bytes written.
fn small(
    mut out: &TcpStream,
    status: u16,
    reason: &str,
    body: &str,
    head_only: bool,
    close: bool,
) -> io::Result<u64> {
    let mut r = response_head(
        status,
        reason,
        "text/plain; charset=utf-8",
        body.len() as u64,
        close,
    );
    if !head_only {
        r.push_str(body);
    }
    out.write_all(r.as_bytes())?;
    Ok(r.len() as u64)
}

/// Serves one connection until it ends. Errors are the connection's (a reset peer).
pub fn serve(stream: TcpStream, stats: &Stats, pattern: &Pattern) -> io::Result<()> {
    stats.connections.fetch_add(1, Ordering::Relaxed);
    stream.set_read_timeout(Some(IDLE))?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut tmp = vec![0u8; 16 * 1024];
    loop {
        let (req, used) = loop {
            match parse_request(&buf) {
                Parsed::Done(r, n) => break (r, n),
                Parsed::Refused(e) => {
                    small(&stream, e.status, e.reason, e.reason, false, true)?;
                    return Ok(());
                }
                Parsed::Partial => {}
            }
            let n = match (&stream).read(&mut tmp) {
                Ok(n) => n,
                // An idle keep-alive connection ends quietly.
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return Ok(()),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        buf.drain(..used);
        // A body nobody asked for is read and dropped (a small one), or ends the connection.
        let mut close = req.close;
        let mut left = req.content_length;
        if left > MAX_BODY {
            close = true;
        } else {
            while left > 0 {
                if !buf.is_empty() {
                    let k = (left as usize).min(buf.len());
                    buf.drain(..k);
                    left -= k as u64;
                    continue;
                }
                let n = (&stream).read(&mut tmp)?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let head_only = req.method == "HEAD";
        debug!(method = %req.method, target = %req.target, "http request");
        let sent = match route(&req.method, &req.target) {
            Route::Bytes(n) => {
                let head = response_head(200, "OK", "application/octet-stream", n, close);
                (&stream).write_all(head.as_bytes())?;
                let mut sent = head.len() as u64;
                if !head_only {
                    let mut at = 0;
                    while at < n {
                        let c = pattern.chunk(at, n - at);
                        (&stream).write_all(c)?;
                        at += c.len() as u64;
                        stats.bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
                    }
                    sent += n;
                }
                sent
            }
            Route::Status => small(&stream, 200, "OK", &stats.page(), head_only, close)?,
            Route::BadNumber => small(
                &stream,
                400,
                "Bad Request",
                "bad byte count\n",
                head_only,
                close,
            )?,
            Route::NotFound => small(&stream, 404, "Not Found", "not found\n", head_only, close)?,
            Route::MethodNotAllowed => small(
                &stream,
                405,
                "Method Not Allowed",
                "only GET and HEAD\n",
                false,
                close,
            )?,
        };
        debug!(sent, "http response");
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(s: &str) -> (Request, usize) {
        match parse_request(s.as_bytes()) {
            Parsed::Done(r, n) => (r, n),
            p => panic!("{s:?}: {p:?}"),
        }
    }

    fn refused(s: &[u8]) -> u16 {
        match parse_request(s) {
            Parsed::Refused(r) => r.status,
            p => panic!("{s:?}: {p:?}"),
        }
    }

    #[test]
    fn parses_a_get_with_keep_alive_and_pipelining() {
        let two = "GET /bytes/10 HTTP/1.1\r\nHost: x\r\nUser-Agent: curl\r\n\r\nGET / HTTP/1.1\r\n";
        let (r, n) = done(two);
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/bytes/10");
        assert_eq!(r.version, Version::Http11);
        assert!(!r.close);
        assert_eq!(r.content_length, 0);
        assert_eq!(&two[n..], "GET / HTTP/1.1\r\n");
        assert_eq!(parse_request(&two.as_bytes()[n..]), Parsed::Partial);
    }

    #[test]
    fn connection_close_and_http_1_0_close() {
        let (r, _) = done("GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(r.close);
        let (r, _) = done("HEAD /status HTTP/1.0\r\n\r\n");
        assert!(r.close);
        assert_eq!(r.version, Version::Http10);
        assert_eq!(r.method, "HEAD");
        // Leading empty lines are skipped; bare LFs end lines too.
        let (r, n) = done("\r\n\nGET /x HTTP/1.1\nhost: y\n\n");
        assert_eq!((r.target.as_str(), n), ("/x", 28));
    }

    #[test]
    fn partial_heads_wait_and_garbage_is_refused() {
        assert_eq!(parse_request(b""), Parsed::Partial);
        assert_eq!(
            parse_request(b"GET /bytes/1 HTTP/1.1\r\nHost"),
            Parsed::Partial
        );
        assert_eq!(parse_request(b"GE"), Parsed::Partial);
        assert_eq!(refused(b"\x16\x03\x01\x02\x00\x01\x00"), 400);
        assert_eq!(refused(b"GET\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"),
            400
        );
        assert_eq!(refused(b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
        assert_eq!(refused(b"GET / HTTP/1.1\r\n\r\n"), 400, "1.1 needs Host");
        assert_eq!(refused(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"), 505);
        assert_eq!(refused(b"GET / FTP/1.0\r\n\r\n"), 400);
        assert_eq!(refused(b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        assert_eq!(
            refused(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            refused(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
            400
        );
        let (r, _) = done("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n");
        assert_eq!(r.content_length, 12);
    }

    #[test]
    fn heads_past_the_limit_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert_eq!(refused(&big), 431);
        big.extend_from_slice(b"\r\n");
        assert_eq!(refused(&big), 431);
    }

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/bytes/0"), Route::Bytes(0));
        assert_eq!(route("GET", "/bytes/17179869184"), Route::Bytes(1 << 34));
        assert_eq!(route("HEAD", "/bytes/5?x=1"), Route::Bytes(5));
        assert_eq!(route("GET", "http://198.18.0.2/bytes/7"), Route::Bytes(7));
        assert_eq!(route("GET", "/"), Route::Status);
        assert_eq!(route("GET", "/status"), Route::Status);
        assert_eq!(route("GET", "http://host"), Route::Status);
        assert_eq!(route("GET", "/bytes/"), Route::BadNumber);
        assert_eq!(route("GET", "/bytes/12a"), Route::BadNumber);
        assert_eq!(route("GET", "/bytes/-1"), Route::BadNumber);
        assert_eq!(
            route("GET", "/bytes/99999999999999999999999"),
            Route::BadNumber
        );
        assert_eq!(route("GET", "/nope"), Route::NotFound);
        assert_eq!(route("GET", "/bytes"), Route::NotFound);
        assert_eq!(route("POST", "/"), Route::MethodNotAllowed);
    }

    #[test]
    fn the_pattern_is_i_mod_251_across_chunks() {
        let p = Pattern::new();
        // Walk a body in chunks of the size the server writes, at odd starts too.
        for (start, total) in [(0u64, 300_000u64), (1, 70_000), (250, 131_073)] {
            let mut at = start;
            while at < start + total {
                let c = p.chunk(at, start + total - at);
                assert!(!c.is_empty() && c.len() <= CHUNK);
                for (k, &b) in c.iter().enumerate() {
                    assert_eq!(b, ((at + k as u64) % 251) as u8, "byte {}", at + k as u64);
                }
                at += c.len() as u64;
            }
            assert_eq!(at, start + total);
        }
        // Far out (16 GiB and beyond) it still holds, and a short tail is cut to length.
        let far = (1u64 << 34) + 12345;
        let c = p.chunk(far, 10);
        assert_eq!(c.len(), 10);
        for (k, &b) in c.iter().enumerate() {
            assert_eq!(b, ((far + k as u64) % 251) as u8);
        }
        assert_eq!(p.chunk(5, 1u64 << 40).len(), CHUNK);
    }

    #[test]
    fn response_heads() {
        let h = response_head(200, "OK", "application/octet-stream", 1 << 34, false);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(h.contains("Content-Length: 17179869184\r\n"));
        assert!(h.contains("Content-Type: application/octet-stream\r\n"));
        assert!(h.ends_with("Connection: keep-alive\r\n\r\n"));
        let h = response_head(405, "Method Not Allowed", "text/plain", 0, true);
        assert!(h.contains("Allow: GET, HEAD\r\n"));
        assert!(h.ends_with("Connection: close\r\n\r\n"));
        let page = Stats::default().page();
        assert!(page.contains("uptime: 0 s"), "{page}");
        assert!(page.contains("bytes served: 0"), "{page}");
    }
}
