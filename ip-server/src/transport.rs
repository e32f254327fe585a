//! The ip side of a transport link (`keepnet_server::wiring::TransportLink`): a `Port`
//! holds the ip server's ring ends and buffer lists for one transport server, and a
//! `RingTransport` attached to the engine for that protocol copies what the engine delivers
//! into the port. The server ([`crate::server`]) drives the rest of the port each poll:
//! collecting returned buffers, reading datagrams to send, publishing.
//!
//! Buffer rules (the same as the driver<->ip link's):
//! * DELIVER_POOL buffers are ours: we fill one from our free list, push it on `deliver`, and
//!   the transport hands it back on `deliver_return`;
//! * SEND_POOL buffers are the transport's: we *take* each one named on `send` before
//!   committing the slot, copy the payload out, and push it back on `send_return`.
//!
//! A delivery never waits: with no free DELIVER_POOL buffer or no room on `deliver` the
//! datagram is dropped and counted (`drop.transport_full`).

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use keepnet_ipc::{BufRef, Descriptor, Doorbell, EndpointId, FreeList, Retakes};
use keepnet_server::control::Counter;
use keepnet_server::wiring::{DatagramSlot, IpTransportEnds, TransportLink, IP};
use keepnet_server::ServerError;
use tracing::{info, warn};

use crate::stack::{Datagram, IcmpError, Transport};

/// DELIVER_POOL buffers collected from `deliver_return` per poll at most.
const COLLECT: usize = 256;

/// Counters shared by every transport port (registered by the server).
#[derive(Clone)]
pub(crate) struct PortCounters {
    /// Datagrams (and ICMP errors) published on `deliver`.
    pub delivered: Counter,
    /// Dropped: no DELIVER_POOL buffer free, or `deliver` full.
    pub full: Counter,
    /// Datagrams from `send` the engine took (sent, or queued while ARP resolves).
    pub sent: Counter,
    /// Dropped from `send`: no route to the destination.
    pub send_no_route: Counter,
    /// Dropped from `send`: a bad slot (wrong protocol or kind, a source not ours, too big).
    pub send_bad: Counter,
    /// Dropped from `send`: the next hop is unresolved and its ARP queue is full.
    pub send_queue_full: Counter,
    /// Refused descriptors (also counted by the pool).
    pub desc_bad: Counter,
}

/// The ip server's side of one transport link.
pub(crate) struct Port {
    /// "udp" or "tcp", for logs.
    pub name: &'static str,
    pub link: TransportLink,
    pub ends: IpTransportEnds,
    deliver_free: FreeList,
    send_retakes: Retakes,
    /// Slots built this poll, published at its end.
    deliver_batch: Vec<DatagramSlot>,
    /// Free slots on `deliver` as of the last refresh, less what we pushed since.
    deliver_room: usize,
    /// SEND_POOL buffers owed to the transport that are not on `send_return` yet.
    pub send_backlog: Vec<Descriptor>,
    /// Set when sending stopped for lack of TX buffers: `send` is not "work" until the driver
    /// returns some (which wakes us).
    pub send_blocked: bool,
    pub counters: PortCounters,
}

impl Port {
    /// Claims the ip ends of `link`, rings `bell` (the transport's doorbell) whenever we
    /// publish to it, and recovers buffers from a predecessor: DELIVER_POOL buffers it held
    /// go back on our free list, SEND_POOL buffers it held go back to the transport, and
    /// buffers taken from slots it never committed may be taken again once.
    pub fn new(
        name: &'static str,
        link: TransportLink,
        bell: Option<Doorbell>,
        counters: PortCounters,
    ) -> Result<Port, ServerError> {
        let mut ends = link.ip_ends()?;
        if let Some(bell) = bell {
            ends.deliver.set_doorbell(bell.clone());
            ends.send_return.set_doorbell(bell);
        }
        // Scan the rings, then the ownership tables (keepnet_ipc::pool, crash reclamation).
        let (outgoing, incoming) = link.ip_in_flight()?;
        let deliver_free = FreeList::recover(&link.deliver_pool, IP, &outgoing, &incoming);
        let (held, send_retakes) = link.send_pool.recover(IP, &outgoing, &incoming);
        let send_backlog: Vec<Descriptor> = held
            .iter()
            .map(|&i| link.send_pool.descriptor(i, 0))
            .collect();
        info!(
            transport = name,
            protocol = link.protocol(),
            deliver_free = deliver_free.len(),
            send_returned = send_backlog.len(),
            send_retakes = send_retakes.len(),
            "transport link attached"
        );
        Ok(Port {
            name,
            deliver_batch: Vec::with_capacity(64),
            deliver_room: 0,
            deliver_free,
            send_retakes,
            send_backlog,
            send_blocked: false,
            counters,
            ends,
            link,
        })
    }

    /// The transport's endpoint id.
    pub fn peer(&self) -> EndpointId {
        self.link.transport()
    }

    /// Collects DELIVER_POOL buffers the transport is done with.
    pub fn collect_returns(&mut self) -> Result<usize, ServerError> {
        let peer = self.peer();
        Ok(self.deliver_free.collect(
            &self.link.deliver_pool,
            &mut self.ends.deliver_return,
            peer,
            COLLECT,
        )?)
    }

    /// Copies `payload` into a DELIVER_POOL buffer and queues `slot` (its descriptor filled
    /// in here) for `deliver`; drops and counts it if no buffer or no slot is free.
    /// `header`, if any, goes into the headroom right before the payload (for a transport
    /// that answers with an ICMP error quoting it).
    fn offer(&mut self, mut slot: DatagramSlot, header: &[u8], payload: &[u8]) {
        if self.deliver_batch.len() >= self.deliver_room {
            self.deliver_room = self.ends.deliver.free_slots().unwrap_or(0);
        }
        if self.deliver_batch.len() >= self.deliver_room {
            self.counters.full.inc();
            return;
        }
        if self.deliver_free.is_empty() {
            let _ = self.collect_returns();
        }
        let Some(i) = self.deliver_free.get() else {
            self.counters.full.inc();
            return;
        };
        let pool = &self.link.deliver_pool;
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let hlen = u32::try_from(header.len()).unwrap_or(u32::MAX);
        let header_ok =
            hlen <= pool.headroom() && pool.write(i, pool.headroom() - hlen, header).is_ok();
        slot.header_len = if header_ok { hlen } else { 0 };
        if pool.write(i, pool.headroom(), payload).is_err() {
            // Larger than a buffer: cannot happen for an IPv4 payload.
            self.deliver_free.put(i);
            self.counters.full.inc();
            return;
        }
        slot.desc = pool.span(i, pool.headroom(), len);
        self.deliver_batch.push(slot);
    }

    /// Reads up to `out.capacity()` slots from `send` while `fits(payload_len)` says the
    /// datagram can go out now, taking each buffer before committing its slot. A slot that
    /// does not fit stays on the ring (and sets `send_blocked`). Refused descriptors are
    /// counted and their slots consumed.
    pub fn read_sends(
        &mut self,
        out: &mut Vec<(DatagramSlot, BufRef)>,
        max: usize,
        mut fits: impl FnMut(u32) -> bool,
    ) -> Result<usize, ServerError> {
        let mut slots = [DatagramSlot::default(); 32];
        let want = max.min(slots.len());
        self.ends.send.rewind();
        let n = self.ends.send.read(&mut slots[..want])?;
        let peer = self.peer();
        let mut used = 0;
        self.send_blocked = false;
        for s in &slots[..n] {
            if !fits(s.desc.len) {
                self.send_blocked = true;
                break;
            }
            used += 1;
            match self
                .link
                .send_pool
                .take(&s.desc, peer, IP, &mut self.send_retakes)
            {
                Ok(r) => out.push((*s, r)),
                Err(e) => {
                    self.counters.desc_bad.inc();
                    warn!(transport = self.name, %e, "bad send descriptor dropped");
                }
            }
        }
        self.ends.send.commit(used)?;
        // What we did not use is read again next time.
        self.ends.send.rewind();
        Ok(used)
    }

    /// Gives a SEND_POOL buffer back to the transport (published at the end of the poll).
    pub fn send_done(&mut self, index: u32) {
        self.send_backlog
            .push(self.link.send_pool.descriptor(index, 0));
    }

    /// Publishes `deliver` and `send_return` (one push, so one doorbell ring, each).
    pub fn publish(&mut self) -> Result<(), ServerError> {
        if !self.deliver_batch.is_empty() {
            let pushed = self.ends.deliver.push_slice(&self.deliver_batch)?;
            self.counters.delivered.add(pushed as u64);
            self.deliver_room = self.deliver_room.saturating_sub(pushed);
            for s in self.deliver_batch.drain(..).skip(pushed) {
                // Only a ring the transport shrank behind our back gets here.
                self.deliver_free.put(s.desc.index);
                self.counters.full.inc();
            }
        }
        if !self.send_backlog.is_empty() {
            let pushed = self.ends.send_return.push_slice(&self.send_backlog)?;
            self.send_backlog.drain(..pushed);
        }
        Ok(())
    }

    /// Whether a poll has something to do for this port.
    pub fn has_work(&mut self) -> bool {
        self.ends.deliver_return.has_data()
            || (!self.send_blocked && self.ends.send.has_data())
            || !self.send_backlog.is_empty()
            || !self.deliver_batch.is_empty()
    }
}

/// The engine's view of a port: a [`Transport`] that queues what it is given on `deliver`.
pub(crate) struct RingTransport(pub Rc<RefCell<Port>>);

impl Transport for RingTransport {
    fn deliver(&mut self, _now: Duration, d: &Datagram<'_>) {
        let Ok(mut p) = self.0.try_borrow_mut() else {
            return;
        };
        let slot = DatagramSlot {
            src: u32::from(d.src),
            dst: u32::from(d.dst),
            protocol: d.protocol,
            ttl: d.ttl,
            kind: DatagramSlot::KIND_DATAGRAM,
            broadcast: u8::from(d.broadcast),
            ..DatagramSlot::default()
        };
        p.offer(slot, d.header, d.payload);
    }

    fn icmp_error(&mut self, _now: Duration, e: &IcmpError<'_>) {
        let Ok(mut p) = self.0.try_borrow_mut() else {
            return;
        };
        let slot = DatagramSlot {
            src: u32::from(e.from),
            dst: u32::from(e.to),
            protocol: e.protocol,
            ttl: e.ttl,
            kind: DatagramSlot::KIND_ICMP_ERROR,
            icmp_type: e.icmp_type,
            icmp_code: e.icmp_code,
            icmp_rest: u32::from_be_bytes(e.rest),
            ..DatagramSlot::default()
        };
        p.offer(slot, &[], e.quote);
    }
}

/// Checks a slot read from `send` of the port for `protocol`; `our` is our address.
pub(crate) fn send_slot_ok(s: &DatagramSlot, protocol: u8, our: Ipv4Addr) -> bool {
    (s.kind == DatagramSlot::KIND_DATAGRAM || s.kind == DatagramSlot::KIND_UNREACHABLE)
        && s.protocol == protocol
        && (s.src == 0 || s.src == u32::from(our))
}
