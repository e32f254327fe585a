//! The `keepnet-ip` server: the engine on the driver<->ip link region
//! (`keepnet_server::wiring`, whose module doc states the buffer rules followed here).
//!
//! Each poll, in one batch:
//! 1. collect TX_POOL buffers the driver has sent (`tx_return`) onto our free list;
//! 2. read up to [`BATCH`] descriptors from `rx`, *take* each buffer (ownership moves to us)
//!    before committing the slots, so that a crash at any point leaves every buffer either
//!    on a ring or recorded as ours (and so recovered by our successor);
//! 3. copy each frame out of shared memory and hand it to the engine; the first frame the
//!    engine sends in answer (an echo reply, an ARP reply, a flushed datagram) is written back
//!    into the same RX buffer and goes out on `tx` as is, without using a TX buffer; further
//!    frames are built in TX_POOL buffers; an RX buffer with no answer goes back on
//!    `rx_return`;
//! 4. run the engine's timers;
//! 5. publish `tx` and `rx_return` once each, and mirror the engine's counters into the
//!    control block.
//!
//! At start it recovers from a predecessor's crash: TX buffers it held go back on its free
//! list, RX buffers it held go back to the driver, and buffers taken from slots it never
//! committed may be taken again once.
//!
//! ## Transports
//!
//! Handed a region `transport.udp` (or `transport.tcp`), a
//! `keepnet_server::wiring::TransportLink`, the server attaches a ring-backed transport for
//! that protocol to the engine instead of answering "protocol unreachable" (see
//! the `transport` module). The optional region `peer.udp` is the transport's control block,
//! whose doorbell we ring when we publish to it (with the eventfd `bell.udp` if handed over).
//! Each poll then also, per transport link: collects `deliver_return` (step 1); delivers
//! datagrams and ICMP errors during step 3; reads datagrams from `send` (taking each buffer
//! before committing), sends them with `IpStack::send_ip` (fragmenting as needed) and hands
//! the buffers back on `send_return` (after step 3); publishes `deliver` and `send_return`
//! (step 5). A datagram on `send` whose fragments would not find free TX buffers waits on
//! the ring until the driver returns some. Crash recovery is the link's, per transport.

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use keepnet_ipc::{BufRef, Descriptor, Doorbell, EndpointId, FreeList, RegionKind, Retakes};
use keepnet_server::codec;
use keepnet_server::control::{monotonic_ns, Counter};
use keepnet_server::wiring::{
    DatagramSlot, IpEnds, Link, TransportLink, DRIVER, IP, RX_POOL, TCP, UDP,
};
use keepnet_server::{Boot, BootError, ControlBlock, Progress, Scribbler, Server, ServerError};
use tracing::{info, warn};

use crate::transport::{send_slot_ok, Port, PortCounters, RingTransport};
use crate::wire::{proto, IPV4_HEADER};
use crate::{Config, Ctr, Event, IpStack, SavedState, SendError};

/// Frames handled per poll at most.
pub const BATCH: usize = 32;
/// TX_POOL buffers collected from `tx_return` per poll at most.
const COLLECT: usize = 256;
/// Environment variable holding the JSON configuration.
pub const CONFIG_ENV: &str = "KEEPNET_IP_CONFIG";
/// Region name of the link, and of the driver's control block (for its doorbell).
pub const LINK_REGION: &str = "link";
/// Region name of the driver's control block, if handed over.
pub const PEER_DRIVER_REGION: &str = "peer.driver";
const SNAPSHOT_FORMAT: u32 = 1;
/// The transports the server can be wired to: (name, IP protocol, endpoint). Transport
/// `NAME` comes as region `transport.NAME`, its control block as `peer.NAME`, the eventfd of
/// its doorbell as fd `bell.NAME`.
pub const TRANSPORTS: &[(&str, u8, EndpointId)] =
    &[("udp", proto::UDP, UDP), ("tcp", proto::TCP, TCP)];
/// Datagrams read from each transport's `send` ring per poll at most.
const SEND_BATCH: usize = 32;
/// Counters the server registers besides the engine's [`Ctr`]s.
pub const SERVER_COUNTERS: usize = 10;

/// Counters of the server itself (the engine's are [`Ctr`]).
struct ServerCounters {
    desc_bad: Counter,
    tx_no_buffer: Counter,
    tx_ring_full: Counter,
    frame_too_big: Counter,
    transport: PortCounters,
}

/// The engine's counters mirrored into the control block: the block holds totals across
/// restarts, so each poll adds what changed since the last one.
struct Mirror {
    handles: Vec<Counter>,
    last: Vec<u64>,
}

impl Mirror {
    fn new(control: &ControlBlock) -> Mirror {
        Mirror {
            handles: Ctr::ALL.iter().map(|c| control.counter(c.name())).collect(),
            last: vec![0; Ctr::ALL.len()],
        }
    }

    fn sync(&mut self, stack: &IpStack) {
        for ((c, h), last) in Ctr::ALL.iter().zip(&self.handles).zip(&mut self.last) {
            let v = stack.count(*c);
            if v != *last {
                h.add(v.wrapping_sub(*last));
                *last = v;
            }
        }
    }
}

/// The server.
pub struct IpServer {
    stack: IpStack,
    link: Link,
    ends: IpEnds,
    tx_free: FreeList,
    rx_retakes: Retakes,
    /// RX_POOL buffers owed to the driver that did not fit on `rx_return` yet.
    rx_backlog: Vec<Descriptor>,
    tx_batch: Vec<Descriptor>,
    descs: [Descriptor; BATCH],
    scratch: Vec<u8>,
    mirror: Mirror,
    counters: ServerCounters,
    /// Attached transport links (shared with the engine's [`RingTransport`]s).
    ports: Vec<Rc<RefCell<Port>>>,
    /// A datagram to send, copied out of its SEND_POOL buffer.
    dgram: Vec<u8>,
    sends: Vec<(DatagramSlot, BufRef)>,
}

fn now() -> Duration {
    Duration::from_nanos(monotonic_ns())
}

/// Builds the server from its boot environment (the `keepnet-ip` binary's whole job).
pub fn build(boot: &mut Boot) -> Result<IpServer, ServerError> {
    let text = std::env::var(CONFIG_ENV).map_err(|e| {
        ServerError::Fatal(format!(
            "{CONFIG_ENV}: {e} (expected JSON such as {{\"mac\":\"02:6b:6e:00:00:02\",\"addr\":\"198.18.0.2/24\"}})"
        ))
    })?;
    let cfg =
        Config::from_json(&text).map_err(|e| ServerError::Fatal(format!("{CONFIG_ENV}: {e}")))?;
    let link = boot.region(LINK_REGION, RegionKind::RINGS)?;
    let link = Link::open(link).map_err(|e| ServerError::Fatal(format!("link region: {e}")))?;
    let driver_bell: Option<Doorbell> = match boot.region(PEER_DRIVER_REGION, RegionKind::CONTROL) {
        // The driver parks in poll() on its TAP fd and its doorbell's eventfd: ringing its
        // doorbell must write that eventfd (fd `bell.driver`), not just wake a futex.
        Ok(r) => {
            let bell = ControlBlock::open(r)?.doorbell().clone();
            Some(match boot.fd("bell.driver") {
                Some(fd) => bell.with_eventfd(fd),
                None => bell,
            })
        }
        Err(BootError::NoRegion(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut server = IpServer::new(cfg, link, driver_bell, boot.control())?;
    for &(name, protocol, endpoint) in TRANSPORTS {
        let region = match boot.region(&format!("transport.{name}"), RegionKind::RINGS) {
            Ok(r) => r,
            Err(BootError::NoRegion(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let tlink = TransportLink::open_for(region, protocol, endpoint)
            .map_err(|e| ServerError::Fatal(format!("transport.{name} region: {e}")))?;
        let bell = match boot.region(&format!("peer.{name}"), RegionKind::CONTROL) {
            Ok(r) => {
                let bell = ControlBlock::open(r)?.doorbell().clone();
                Some(match boot.fd(&format!("bell.{name}")) {
                    Some(fd) => bell.with_eventfd(fd),
                    None => bell,
                })
            }
            Err(BootError::NoRegion(_)) => None,
            Err(e) => return Err(e.into()),
        };
        server.attach_transport(name, tlink, bell)?;
    }
    Ok(server)
}

impl IpServer {
    /// Claims the ip ends of `link`, recovers buffers from a predecessor, registers counters
    /// in `control`.
    pub fn new(
        cfg: Config,
        link: Link,
        driver_bell: Option<Doorbell>,
        control: &ControlBlock,
    ) -> Result<IpServer, ServerError> {
        let mut stack = IpStack::new(cfg).map_err(|e| ServerError::Fatal(e.to_string()))?;
        stack.set_next_ident((monotonic_ns() / 1000) as u16 ^ std::process::id() as u16);
        let mut ends = link.ip_ends()?;
        if let Some(bell) = driver_bell {
            ends.tx.set_doorbell(bell.clone());
            ends.rx_return.set_doorbell(bell);
        }
        // Scan the rings, then the ownership tables (keepnet_ipc::pool, crash reclamation).
        let (outgoing, incoming) = link.ip_in_flight()?;
        let tx_free = FreeList::recover(&link.tx_pool, IP, &outgoing, &incoming);
        let (held_rx, rx_retakes) = link.rx_pool.recover(IP, &outgoing, &incoming);
        let rx_backlog: Vec<Descriptor> = held_rx
            .iter()
            .map(|&i| link.rx_pool.descriptor(i, 0))
            .collect();
        info!(
            addr = %stack.config().addr,
            mac = %stack.config().mac,
            mtu = stack.config().mtu,
            tx_free = tx_free.len(),
            rx_returned = rx_backlog.len(),
            rx_retakes = rx_retakes.len(),
            "ip engine ready"
        );
        let counters = ServerCounters {
            desc_bad: control.counter("drop.desc_bad"),
            tx_no_buffer: control.counter("drop.tx_no_buffer"),
            tx_ring_full: control.counter("drop.tx_ring_full"),
            frame_too_big: control.counter("drop.frame_too_big"),
            transport: PortCounters {
                delivered: control.counter("transport.delivered"),
                full: control.counter("drop.transport_full"),
                sent: control.counter("transport.sent"),
                send_no_route: control.counter("drop.transport_send_no_route"),
                send_bad: control.counter("drop.transport_send_bad"),
                send_queue_full: control.counter("drop.transport_send_queue_full"),
                desc_bad: control.counter("drop.desc_bad"),
            },
        };
        let scratch = vec![0u8; link.rx_pool.buf_size() as usize];
        Ok(IpServer {
            stack,
            mirror: Mirror::new(control),
            link,
            ends,
            tx_free,
            rx_retakes,
            rx_backlog,
            tx_batch: Vec::with_capacity(4 * BATCH),
            descs: [Descriptor::default(); BATCH],
            scratch,
            counters,
            ports: Vec::new(),
            dgram: Vec::new(),
            sends: Vec::with_capacity(SEND_BATCH),
        })
    }

    /// Attaches a transport link (`name` is for logs): claims its ip ends, recovers its
    /// buffers from a predecessor, and attaches a ring-backed transport for its protocol to
    /// the engine. `bell` is the transport's doorbell, rung when we publish to it.
    pub fn attach_transport(
        &mut self,
        name: &'static str,
        link: TransportLink,
        bell: Option<Doorbell>,
    ) -> Result<(), ServerError> {
        let protocol = link.protocol();
        if self
            .ports
            .iter()
            .any(|p| p.borrow().link.protocol() == protocol)
        {
            return Err(ServerError::Fatal(format!(
                "two transport links for protocol {protocol}"
            )));
        }
        if self.dgram.is_empty() {
            self.dgram = vec![0u8; link.send_pool.buf_size() as usize];
        }
        let port = Rc::new(RefCell::new(Port::new(
            name,
            link,
            bell,
            self.counters.transport.clone(),
        )?));
        self.stack
            .attach(protocol, Box::new(RingTransport(port.clone())));
        self.ports.push(port);
        Ok(())
    }

    /// The engine.
    pub fn stack(&self) -> &IpStack {
        &self.stack
    }

    fn publish(&mut self) -> Result<(), ServerError> {
        if !self.tx_batch.is_empty() {
            let pushed = self.ends.tx.push_slice(&self.tx_batch)?;
            for d in self.tx_batch.drain(..).skip(pushed) {
                self.counters.tx_ring_full.inc();
                if d.pool == RX_POOL {
                    self.rx_backlog
                        .push(self.link.rx_pool.descriptor(d.index, 0));
                } else {
                    self.tx_free.put(d.index);
                }
            }
        }
        if !self.rx_backlog.is_empty() {
            let pushed = self.ends.rx_return.push_slice(&self.rx_backlog)?;
            self.rx_backlog.drain(..pushed);
        }
        for p in &self.ports {
            p.borrow_mut().publish()?;
        }
        Ok(())
    }
}

impl Server for IpServer {
    const STATE_FORMATS: (u32, u32) = (1, SNAPSHOT_FORMAT);

    fn poll(&mut self) -> Result<Progress, ServerError> {
        let now = now();
        let mut work = self.tx_free.collect(
            &self.link.tx_pool,
            &mut self.ends.tx_return,
            DRIVER,
            COLLECT,
        )? as u64;
        for p in &self.ports {
            work += p.borrow_mut().collect_returns()? as u64;
        }

        // Take before commit: see the module doc.
        self.ends.rx.rewind();
        let n = self.ends.rx.read(&mut self.descs)?;
        let mut taken = [None; BATCH];
        for (slot, d) in taken.iter_mut().zip(&self.descs[..n]) {
            match self.link.rx_pool.take(d, DRIVER, IP, &mut self.rx_retakes) {
                Ok(r) => *slot = Some(r),
                Err(e) => {
                    self.counters.desc_bad.inc();
                    warn!(%e, "bad rx descriptor dropped");
                }
            }
        }
        self.ends.rx.commit(n)?;
        work += n as u64;

        let IpServer {
            stack,
            link,
            ends,
            tx_free,
            tx_batch,
            scratch,
            counters,
            rx_backlog,
            ports,
            dgram,
            sends,
            ..
        } = self;
        let mut em = Emitter {
            link,
            tx_return: &mut ends.tx_return,
            tx_free,
            tx_batch,
            counters,
        };
        for r in taken.iter().flatten() {
            let len = em.link.rx_pool.read(r, scratch);
            let frame = scratch.get(..len).unwrap_or(&[]);
            let mut reuse = Some(r.index());
            stack.handle_frame(now, frame, |f| em.emit(f, &mut reuse));
            if let Some(i) = reuse {
                rx_backlog.push(em.link.rx_pool.descriptor(i, 0));
            }
        }

        // Datagrams from the transports, while their fragments find TX buffers.
        for port in ports.iter() {
            work += send_from(now, stack, port, &mut em, sends, dgram)?;
        }

        work += stack.poll(now, |f| em.emit(f, &mut None)) as u64;
        // Nobody pings from the server yet; echo replies are only counted.
        while let Some(Event::EchoReply { .. }) = stack.poll_event() {}

        self.publish()?;
        self.mirror.sync(&self.stack);
        Ok(Progress(work))
    }

    fn has_work(&mut self) -> bool {
        self.ends.rx.has_data()
            || self.ends.tx_return.has_data()
            || !self.rx_backlog.is_empty()
            || self.ports.iter().any(|p| p.borrow_mut().has_work())
            || self.stack.next_deadline().is_some_and(|d| d <= now())
    }

    fn scribble(&mut self, garbage: &mut Scribbler) -> usize {
        let mut n = garbage.fill(&mut self.ends.tx, Scribbler::descriptor);
        n += garbage.fill(&mut self.ends.rx_return, Scribbler::descriptor);
        for p in &self.ports {
            let mut p = p.borrow_mut();
            n += garbage.fill(&mut p.ends.deliver, Scribbler::datagram);
            n += garbage.fill(&mut p.ends.send_return, Scribbler::descriptor);
        }
        n
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        codec::save("ip", SNAPSHOT_FORMAT, &self.stack.save(now()))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ServerError> {
        let state: SavedState = codec::load(snapshot, "ip", 1..=SNAPSHOT_FORMAT)?;
        self.stack
            .restore(now(), &state)
            .map_err(ServerError::Restore)
    }
}

/// Where the engine's frames go: into the RX buffer being answered when the first answer
/// fits there, else into TX_POOL buffers; all onto `tx_batch`.
struct Emitter<'a> {
    link: &'a Link,
    tx_return: &'a mut keepnet_ipc::Consumer<Descriptor>,
    tx_free: &'a mut FreeList,
    tx_batch: &'a mut Vec<Descriptor>,
    counters: &'a ServerCounters,
}

impl Emitter<'_> {
    fn collect(&mut self) {
        let _ = self
            .tx_free
            .collect(&self.link.tx_pool, self.tx_return, DRIVER, COLLECT);
    }

    fn emit(&mut self, frame: &[u8], reuse: &mut Option<u32>) {
        let link = self.link;
        let len = frame.len() as u32;
        if let Some(i) = reuse.take() {
            let headroom = link.rx_pool.headroom();
            if link.rx_pool.write(i, headroom, frame).is_ok() {
                self.tx_batch.push(link.rx_pool.span(i, headroom, len));
                return;
            }
            *reuse = Some(i);
        }
        if self.tx_free.is_empty() {
            self.collect();
        }
        let Some(i) = self.tx_free.get() else {
            self.counters.tx_no_buffer.inc();
            return;
        };
        if link
            .tx_pool
            .write(i, link.tx_pool.headroom(), frame)
            .is_err()
        {
            self.tx_free.put(i);
            self.counters.frame_too_big.inc();
            return;
        }
        self.tx_batch
            .push(link.tx_pool.span(i, link.tx_pool.headroom(), len));
    }
}

/// Sends what a transport put on its `send` ring, as long as the fragments of each datagram
/// find free TX buffers (the rest waits on the ring); each SEND_POOL buffer goes back to the
/// transport. Returns the slots consumed.
fn send_from(
    now: Duration,
    stack: &mut IpStack,
    port: &Rc<RefCell<Port>>,
    em: &mut Emitter<'_>,
    sends: &mut Vec<(DatagramSlot, BufRef)>,
    dgram: &mut [u8],
) -> Result<u64, ServerError> {
    let mtu = usize::from(stack.config().mtu);
    let our = stack.config().addr;
    let pool_size = em.link.tx_pool.count() as usize;
    if em.tx_free.len() < pool_size / 2 {
        em.collect();
    }
    let mut budget = em.tx_free.len();
    sends.clear();
    let n = port.borrow_mut().read_sends(sends, SEND_BATCH, |len| {
        // A datagram larger than the whole TX pool goes out when the pool is all free (and
        // loses the fragments that find no buffer), rather than never.
        let need = frames_for(len as usize, mtu).min(pool_size);
        if need > budget {
            return false;
        }
        budget -= need;
        true
    })?;
    let (protocol, counters) = {
        let p = port.borrow();
        (p.link.protocol(), p.counters.clone())
    };
    for (slot, r) in sends.drain(..) {
        let len = port.borrow().link.send_pool.read(&r, dgram);
        let payload = dgram.get(..len).unwrap_or(&[]);
        if send_slot_ok(&slot, protocol, our) {
            let dst = Ipv4Addr::from(slot.dst);
            if slot.kind == DatagramSlot::KIND_UNREACHABLE {
                match stack
                    .send_unreachable(now, dst, slot.icmp_code, payload, |f| em.emit(f, &mut None))
                {
                    Ok(()) => counters.sent.inc(),
                    Err(SendError::NoRoute) => counters.send_no_route.inc(),
                    Err(SendError::TooBig) => counters.send_bad.inc(),
                    Err(SendError::QueueFull) => counters.send_queue_full.inc(),
                }
                port.borrow_mut().send_done(r.index());
                continue;
            }
            match stack.send_ip(now, dst, slot.protocol, payload, |f| em.emit(f, &mut None)) {
                Ok(()) => counters.sent.inc(),
                Err(SendError::NoRoute) => counters.send_no_route.inc(),
                Err(SendError::TooBig) => counters.send_bad.inc(),
                Err(SendError::QueueFull) => counters.send_queue_full.inc(),
            }
        } else {
            counters.send_bad.inc();
        }
        port.borrow_mut().send_done(r.index());
    }
    Ok(n as u64)
}

/// Frames a datagram with `payload` bytes takes on a link with `mtu` (fragments above it).
fn frames_for(payload: usize, mtu: usize) -> usize {
    let chunk = (mtu.saturating_sub(IPV4_HEADER) / 8 * 8).max(8);
    if payload + IPV4_HEADER <= mtu {
        1
    } else {
        payload.div_ceil(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_counts() {
        assert_eq!(frames_for(0, 1500), 1);
        assert_eq!(frames_for(1480, 1500), 1);
        assert_eq!(frames_for(1481, 1500), 2);
        assert_eq!(frames_for(20000, 1500), 14);
        assert_eq!(frames_for(65515, 1500), 45);
        assert_eq!(frames_for(100, 68), 3);
    }
}
