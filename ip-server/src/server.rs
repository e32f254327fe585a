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

use std::time::Duration;

use keepnet_ipc::{Descriptor, Doorbell, FreeList, RegionKind, Retakes};
use keepnet_server::codec;
use keepnet_server::control::{monotonic_ns, Counter};
use keepnet_server::wiring::{IpEnds, Link, DRIVER, IP, RX_POOL};
use keepnet_server::{Boot, BootError, ControlBlock, Progress, Server, ServerError};
use tracing::{info, warn};

use crate::{Config, Ctr, Event, IpStack, SavedState};

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

/// Counters of the server itself (the engine's are [`Ctr`]).
struct ServerCounters {
    desc_bad: Counter,
    tx_no_buffer: Counter,
    tx_ring_full: Counter,
    frame_too_big: Counter,
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
    IpServer::new(cfg, link, driver_bell, boot.control())
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
        })
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
        Ok(())
    }
}

impl Server for IpServer {
    fn poll(&mut self) -> Result<Progress, ServerError> {
        let now = now();
        let mut work = self.tx_free.collect(
            &self.link.tx_pool,
            &mut self.ends.tx_return,
            DRIVER,
            COLLECT,
        )? as u64;

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
            ..
        } = self;
        let headroom = link.rx_pool.headroom();
        let mut emit = |frame: &[u8], reuse: &mut Option<u32>| {
            let len = frame.len() as u32;
            if let Some(i) = reuse.take() {
                if link.rx_pool.write(i, headroom, frame).is_ok() {
                    tx_batch.push(link.rx_pool.span(i, headroom, len));
                    return;
                }
                *reuse = Some(i);
            }
            if tx_free.is_empty() {
                let _ = tx_free.collect(&link.tx_pool, &mut ends.tx_return, DRIVER, COLLECT);
            }
            let Some(i) = tx_free.get() else {
                counters.tx_no_buffer.inc();
                return;
            };
            if link
                .tx_pool
                .write(i, link.tx_pool.headroom(), frame)
                .is_err()
            {
                tx_free.put(i);
                counters.frame_too_big.inc();
                return;
            }
            tx_batch.push(link.tx_pool.span(i, link.tx_pool.headroom(), len));
        };
        for r in taken.iter().flatten() {
            let len = link.rx_pool.read(r, scratch);
            let frame = scratch.get(..len).unwrap_or(&[]);
            let mut reuse = Some(r.index());
            stack.handle_frame(now, frame, |f| emit(f, &mut reuse));
            if let Some(i) = reuse {
                rx_backlog.push(link.rx_pool.descriptor(i, 0));
            }
        }
        work += stack.poll(now, |f| emit(f, &mut None)) as u64;
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
            || self.stack.next_deadline().is_some_and(|d| d <= now())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        codec::encode(
            "ip",
            SNAPSHOT_FORMAT,
            env!("CARGO_PKG_VERSION"),
            &self.stack.save(now()),
        )
        .map_err(|e| ServerError::Snapshot(e.to_string()))
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), ServerError> {
        let snap = codec::decode(snapshot, "ip", 1..=SNAPSHOT_FORMAT)
            .map_err(|e| ServerError::Restore(e.to_string()))?;
        let state: SavedState = snap
            .state()
            .map_err(|e| ServerError::Restore(e.to_string()))?;
        self.stack
            .restore(now(), &state)
            .map_err(ServerError::Restore)
    }
}
