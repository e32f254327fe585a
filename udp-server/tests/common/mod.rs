//! The two neighbours of a udp server, played by a test: the ip server on the transport link
//! and an application on its region. Shared by the in-process and the cross-process tests.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use keepnet_ipc::{BufRef, Descriptor, Doorbell, FreeList, Retakes};
use keepnet_server::app::{event, op, AppEnds, AppEvent, AppLink, AppRequest};
use keepnet_server::wiring::{DatagramSlot, IpTransportEnds, TransportLink, IP, UDP};

pub const OUR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Aborts the test process if it runs longer than `limit` (no test may hang).
pub fn watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: test exceeded {limit:?}; aborting");
        std::process::abort();
    });
}

/// Polls `f` until it holds, failing the test after `limit`.
#[track_caller]
pub fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A SOCK_SEQPACKET pair: (supervisor end, server end).
pub fn seqpacket_pair() -> (UnixStream, UnixStream) {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (UnixStream::from(a), UnixStream::from(b))
}

/// The Internet checksum the slow, obvious way (RFC 1071), independent of the crate's.
pub fn reference_sum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut s: u32 = 0;
    for c in bytes.chunks(2) {
        s += (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0));
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
    }
    s as u16
}

pub fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, 17]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// True if `d` is a UDP datagram from `src` to `dst` whose checksum verifies.
pub fn udp_checksum_ok(src: Ipv4Addr, dst: Ipv4Addr, d: &[u8]) -> bool {
    d.len() >= 8 && reference_sum(&[&pseudo(src, dst, d.len()), d]) == 0xffff
}

/// A datagram built by hand (checksum by the reference).
pub fn datagram(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut d = Vec::new();
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&(len as u16).to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let c = !reference_sum(&[&pseudo(*src.ip(), *dst.ip(), len), &d]);
    let c = if c == 0 { 0xffff } else { c };
    d[6..8].copy_from_slice(&c.to_be_bytes());
    d
}

/// An IPv4 header for a UDP datagram of `payload_len` bytes.
pub fn ip_header(src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0, 0, 64, 17, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h
}

/// The ip server's side of the transport link.
pub struct IpSide {
    pub link: TransportLink,
    pub ends: IpTransportEnds,
    pub deliver_free: FreeList,
    pub send_retakes: Retakes,
}

impl IpSide {
    /// Claims the ip ends of a freshly created link: every DELIVER_POOL buffer is ours.
    pub fn new(link: &TransportLink) -> IpSide {
        let ends = link.ip_ends().expect("ip ends");
        let mut deliver_free = FreeList::new(&link.deliver_pool, IP);
        for i in 0..link.deliver_pool.count() {
            deliver_free.put(i);
        }
        IpSide {
            link: link.clone(),
            ends,
            deliver_free,
            send_retakes: Retakes::none(),
        }
    }

    /// Takes back DELIVER_POOL buffers the server returned.
    pub fn collect(&mut self) -> usize {
        self.deliver_free
            .collect(
                &self.link.deliver_pool,
                &mut self.ends.deliver_return,
                UDP,
                1024,
            )
            .expect("deliver_return")
    }

    /// Delivers a UDP datagram, with its IP header in the headroom (as the ip server does)
    /// unless `header` is false. Returns false if no buffer is free.
    pub fn deliver(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: &[u8],
        header: bool,
    ) -> bool {
        let d = datagram(src, dst, payload);
        let h = if header {
            ip_header(*src.ip(), *dst.ip(), d.len())
        } else {
            Vec::new()
        };
        let slot = DatagramSlot {
            src: u32::from(*src.ip()),
            dst: u32::from(*dst.ip()),
            protocol: 17,
            ttl: 64,
            kind: DatagramSlot::KIND_DATAGRAM,
            broadcast: u8::from(dst.ip().is_broadcast()),
            header_len: h.len() as u32,
            ..DatagramSlot::default()
        };
        self.deliver_raw(slot, &h, &d)
    }

    /// Delivers an ICMP error about a datagram we sent from `local` to `peer`.
    pub fn deliver_icmp(&mut self, local: SocketAddrV4, peer: SocketAddrV4, code: u8) -> bool {
        let d = datagram(local, peer, b"quoted");
        let mut quote = ip_header(*local.ip(), *peer.ip(), d.len());
        quote.extend_from_slice(&d[..8]);
        let slot = DatagramSlot {
            src: u32::from(*peer.ip()),
            dst: u32::from(*local.ip()),
            protocol: 17,
            ttl: 64,
            kind: DatagramSlot::KIND_ICMP_ERROR,
            icmp_type: 3,
            icmp_code: code,
            ..DatagramSlot::default()
        };
        self.deliver_raw(slot, &[], &quote)
    }

    pub fn deliver_raw(&mut self, mut slot: DatagramSlot, header: &[u8], payload: &[u8]) -> bool {
        if self.deliver_free.is_empty() {
            self.collect();
        }
        let Some(i) = self.deliver_free.get() else {
            return false;
        };
        let pool = &self.link.deliver_pool;
        let h = pool.headroom();
        pool.write(i, h - header.len() as u32, header).unwrap();
        pool.write(i, h, payload).unwrap();
        slot.desc = pool.span(i, h, payload.len() as u32);
        self.ends.deliver.push(slot).expect("deliver ring");
        true
    }

    /// Takes what the server put on `send`, copies each payload out and hands each buffer
    /// back on `send_return`.
    pub fn take_sends(&mut self) -> Vec<(DatagramSlot, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(s) = self.ends.send.pop().expect("send ring") {
            let r: BufRef = self
                .link
                .send_pool
                .take(&s.desc, UDP, IP, &mut self.send_retakes)
                .expect("a valid SEND_POOL descriptor");
            let mut bytes = vec![0u8; r.len() as usize];
            self.link.send_pool.read(&r, &mut bytes);
            out.push((s, bytes));
            let back = self.link.send_pool.descriptor(r.index(), 0);
            self.ends.send_return.push(back).expect("send_return ring");
        }
        out
    }
}

/// An application on its region.
pub struct AppSide {
    pub link: AppLink,
    pub ends: AppEnds,
    pub tx_free: Vec<u32>,
    /// Rings the server (with the server's eventfd, when it has one).
    pub bell: Doorbell,
    pub events: VecDeque<AppEvent>,
    next_id: u32,
    retakes: Retakes,
}

impl AppSide {
    /// The app's side of a freshly created region: every TX buffer is the app's.
    pub fn new(link: &AppLink, bell: Doorbell) -> AppSide {
        AppSide {
            ends: link.app_ends().expect("app ends"),
            tx_free: (0..link.tx_pool.count()).collect(),
            link: link.clone(),
            bell,
            events: VecDeque::new(),
            next_id: 1,
            retakes: Retakes::none(),
        }
    }

    /// Pushes a request (with a fresh id unless `id` is 0 on purpose) and rings the server.
    pub fn push(&mut self, mut req: AppRequest, want_reply: bool) -> u32 {
        if want_reply {
            req.id = self.next_id;
            self.next_id += 1;
        }
        self.ends.requests.push(req).expect("requests ring");
        self.bell.ring();
        req.id
    }

    pub fn bind_req(&mut self, addr: Ipv4Addr, port: u16) -> u32 {
        self.push(
            AppRequest {
                op: op::BIND,
                addr: u32::from(addr),
                port,
                ..AppRequest::default()
            },
            true,
        )
    }

    /// Takes back TX buffers the server returned.
    pub fn collect_tx(&mut self) {
        let me = self.link.endpoint();
        while let Some(d) = self.ends.tx_return.pop().expect("tx_return ring") {
            let r = self
                .link
                .tx_pool
                .take(&d, UDP, me, &mut self.retakes)
                .expect("a valid returned TX buffer");
            self.tx_free.push(r.index());
        }
    }

    /// Sends `payload` from `socket` to `dst` (0.0.0.0:0: the peer). Returns the request id
    /// (0: no reply wanted).
    pub fn send(&mut self, socket: u32, dst: SocketAddrV4, payload: &[u8], reply: bool) -> u32 {
        if self.tx_free.is_empty() {
            self.collect_tx();
        }
        let i = self.tx_free.pop().expect("a free TX buffer");
        let pool = &self.link.tx_pool;
        pool.write(i, pool.headroom(), payload).unwrap();
        let desc = pool.descriptor(i, payload.len() as u32);
        self.push(
            AppRequest {
                op: op::SEND,
                socket,
                addr: u32::from(*dst.ip()),
                port: dst.port(),
                desc,
                ..AppRequest::default()
            },
            reply,
        )
    }

    /// Moves events from the ring into `events`.
    pub fn pump(&mut self) {
        while let Some(e) = self.ends.events.pop().expect("events ring") {
            self.events.push_back(e);
        }
    }

    /// Removes and returns the reply to request `id`, if it came.
    pub fn reply(&mut self, id: u32) -> Option<AppEvent> {
        self.pump();
        let at = self
            .events
            .iter()
            .position(|e| e.kind == event::REPLY && e.id == id)?;
        self.events.remove(at)
    }

    /// Removes and returns every datagram event that came, with its payload; the buffers
    /// stay with the app (see [`AppSide::give_back`]).
    pub fn datagrams(&mut self) -> Vec<(AppEvent, BufRef, Vec<u8>)> {
        self.pump();
        let mut out = Vec::new();
        let me = self.link.endpoint();
        let mut rest = VecDeque::new();
        while let Some(e) = self.events.pop_front() {
            if e.kind != event::DATAGRAM {
                rest.push_back(e);
                continue;
            }
            let r = self
                .link
                .rx_pool
                .take(&e.desc, UDP, me, &mut self.retakes)
                .expect("a valid DATAGRAM descriptor");
            let mut bytes = vec![0u8; r.len() as usize];
            self.link.rx_pool.read(&r, &mut bytes);
            out.push((e, r, bytes));
        }
        self.events = rest;
        out
    }

    /// Hands an RX buffer back to the server.
    pub fn give_back(&mut self, r: &BufRef) {
        let d: Descriptor = self.link.rx_pool.descriptor(r.index(), 0);
        self.ends.rx_return.push(d).expect("rx_return ring");
        self.bell.ring();
    }
}
