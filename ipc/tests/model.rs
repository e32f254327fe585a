//! Model tests: Ring against a VecDeque, BufferPool + FreeList against a set model, with
//! handle "crashes" (a handle dropped mid-protocol and rebuilt from shared state).

use std::collections::{BTreeSet, VecDeque};

use keepnet_ipc::pool::FreeList;
use keepnet_ipc::*;
use proptest::prelude::*;

const TAG: u32 = 0xAB;

fn ring_region(cap: usize) -> (Region, usize) {
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(cap), Ring::<u64>::ALIGN);
    (
        Region::create("model", RegionKind::TEST, l.size()).unwrap(),
        off,
    )
}

#[derive(Debug, Clone)]
enum RingOp {
    Push,
    PushSlice(usize),
    Read(usize),
    Commit(usize),
    Rewind,
    PopBatch(usize),
    Pop,
    RestartProducer,
    RestartConsumer,
}

fn ring_op() -> impl Strategy<Value = RingOp> {
    prop_oneof![
        3 => Just(RingOp::Push),
        3 => (0usize..40).prop_map(RingOp::PushSlice),
        2 => (0usize..40).prop_map(RingOp::Read),
        2 => (0usize..40).prop_map(RingOp::Commit),
        1 => Just(RingOp::Rewind),
        3 => (0usize..40).prop_map(RingOp::PopBatch),
        2 => Just(RingOp::Pop),
        1 => Just(RingOp::RestartProducer),
        1 => Just(RingOp::RestartConsumer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Every op agrees with a VecDeque model: FIFO order, capacity limits (full rings hand the
    /// value back), batch boundaries, wrap-around of small rings many times over, two-phase
    /// read/commit, and handles dropped and re-claimed mid-stream.
    #[test]
    fn ring_matches_vecdeque(cap_log in 0u32..6, ops in proptest::collection::vec(ring_op(), 1..400)) {
        let cap = 1usize << cap_log;
        let (region, off) = ring_region(cap);
        let ring = Ring::<u64>::init(&region, off, cap, TAG).unwrap();
        let mut p = Some(ring.producer().unwrap());
        let mut c = Some(ring.consumer().unwrap());
        // Model: `queue` holds published, uncommitted values; the first `read` of them have
        // been read (two-phase) but not committed.
        let mut queue: VecDeque<u64> = VecDeque::new();
        let mut read = 0usize;
        let mut next = 0u64;
        for op in ops {
            let prod = p.as_mut().unwrap();
            let cons = c.as_mut().unwrap();
            match op {
                RingOp::Push => match prod.push(next) {
                    Ok(()) => { prop_assert!(queue.len() < cap); queue.push_back(next); next += 1; }
                    Err(PushError::Full(v)) => { prop_assert_eq!(queue.len(), cap); prop_assert_eq!(v, next); }
                    Err(e) => prop_assert!(false, "unexpected {:?}", e),
                },
                RingOp::PushSlice(n) => {
                    let items: Vec<u64> = (next..next + n as u64).collect();
                    let k = prod.push_slice(&items).unwrap();
                    prop_assert_eq!(k, n.min(cap - queue.len()));
                    queue.extend(&items[..k]);
                    next += k as u64;
                }
                RingOp::Read(n) => {
                    let mut out = vec![0u64; n];
                    let k = cons.read(&mut out).unwrap();
                    prop_assert_eq!(k, n.min(queue.len() - read));
                    for (i, v) in out[..k].iter().enumerate() {
                        prop_assert_eq!(*v, queue[read + i]);
                    }
                    read += k;
                }
                RingOp::Commit(n) => {
                    let r = cons.commit(n);
                    if n <= read {
                        prop_assert!(r.is_ok());
                        queue.drain(..n);
                        read -= n;
                    } else {
                        prop_assert_eq!(r, Err(RingError::OverCommit { n, pending: read }));
                    }
                }
                RingOp::Rewind => { cons.rewind(); read = 0; }
                RingOp::PopBatch(n) => {
                    let mut out = vec![0u64; n];
                    let k = cons.pop_batch(&mut out).unwrap();
                    read = 0;
                    prop_assert_eq!(k, n.min(queue.len()));
                    for v in &out[..k] {
                        prop_assert_eq!(Some(*v), queue.pop_front());
                    }
                }
                RingOp::Pop => {
                    read = 0;
                    prop_assert_eq!(cons.pop().unwrap(), queue.pop_front());
                }
                RingOp::RestartProducer => {
                    drop(p.take());
                    p = Some(ring.producer().unwrap());
                    prop_assert_eq!(p.as_ref().unwrap().tail(), next);
                }
                RingOp::RestartConsumer => {
                    // Uncommitted reads are seen again by the next instance.
                    drop(c.take());
                    c = Some(ring.consumer().unwrap());
                    read = 0;
                }
            }
            let (h, t) = ring.indices().unwrap();
            prop_assert_eq!(t - h, queue.len() as u64);
            prop_assert_eq!(ring.in_flight().unwrap(), queue.iter().copied().collect::<Vec<_>>());
        }
        prop_assert_eq!(ring.corrupt_count(), 0);
    }
}

// ---- BufferPool model -------------------------------------------------------------------

const HOME: EndpointId = EndpointId(1);
const CLIENT: EndpointId = EndpointId(2);
const COUNT: u32 = 24;

#[derive(Debug, Clone)]
enum PoolOp {
    /// Home grants n free buffers to the client.
    Grant(usize),
    /// Client collects up to n granted buffers.
    ClientCollect(usize),
    /// Client uses up to n buffers and returns them.
    Return(usize),
    /// Home collects up to n returns.
    HomeCollect(usize),
    /// Home crashes and recovers its free list from the table and its rings.
    RestartHome,
    /// Client crashes and recovers its cache.
    RestartClient,
    /// Client reads a grant slot, takes ownership, and crashes before committing.
    ClientCrashMidCollect,
    /// A buggy client returns a bogus descriptor.
    ReturnGarbage(u8),
    /// A buggy client returns a buffer it does not hold (a double return).
    ReturnForeign,
}

fn pool_op() -> impl Strategy<Value = PoolOp> {
    prop_oneof![
        3 => (0usize..10).prop_map(PoolOp::Grant),
        3 => (0usize..10).prop_map(PoolOp::ClientCollect),
        3 => (0usize..10).prop_map(PoolOp::Return),
        3 => (0usize..10).prop_map(PoolOp::HomeCollect),
        1 => Just(PoolOp::RestartHome),
        1 => Just(PoolOp::RestartClient),
        1 => Just(PoolOp::ClientCrashMidCollect),
        1 => any::<u8>().prop_map(PoolOp::ReturnGarbage),
        1 => Just(PoolOp::ReturnForeign),
    ]
}

struct PoolWorld {
    pool: BufferPool,
    grant: Ring<Descriptor>,
    ret: Ring<Descriptor>,
}

fn pool_world() -> PoolWorld {
    let mut l = RegionLayout::new();
    let pool_off = l.place(BufferPool::size_in_region(COUNT, 256), BufferPool::ALIGN);
    let g_off = l.place(
        Ring::<Descriptor>::size_in_region(8),
        Ring::<Descriptor>::ALIGN,
    );
    let r_off = l.place(
        Ring::<Descriptor>::size_in_region(8),
        Ring::<Descriptor>::ALIGN,
    );
    let region = Region::create("pool-model", RegionKind::TEST, l.size()).unwrap();
    PoolWorld {
        pool: BufferPool::init(&region, pool_off, 3, COUNT, 256, 64, HOME).unwrap(),
        grant: Ring::init(&region, g_off, 8, 1).unwrap(),
        ret: Ring::init(&region, r_off, 8, 2).unwrap(),
    }
}

fn in_flight(w: &PoolWorld) -> Vec<Descriptor> {
    let mut v = w.grant.in_flight().unwrap();
    v.extend(w.ret.in_flight().unwrap());
    v
}

fn indices(f: &FreeList) -> BTreeSet<u32> {
    let mut f = f.clone();
    std::iter::from_fn(|| f.get()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Buffers move home -> grant ring -> client -> return ring -> home. At every step each
    /// buffer is in exactly one place; after any crash, reclaim gives each endpoint exactly
    /// the buffers the model says it held privately; bad returns are counted, never accepted.
    #[test]
    fn pool_matches_set_model(ops in proptest::collection::vec(pool_op(), 1..300)) {
        let w = pool_world();
        let mut home = FreeList::recover(&w.pool, HOME, &[], &[]);
        let mut client = FreeList::new(&w.pool, CLIENT);
        let mut g_prod = w.grant.producer().unwrap();
        let mut g_cons = w.grant.consumer().unwrap();
        let mut r_prod = w.ret.producer().unwrap();
        let mut r_cons = w.ret.consumer().unwrap();
        let mut m_home: BTreeSet<u32> = (0..COUNT).collect();
        let mut m_client: BTreeSet<u32>;
        let mut garbage = 0u64;
        let mut foreign = 0u64;
        for op in ops {
            match op {
                PoolOp::Grant(n) => { home.grant(&w.pool, &mut g_prod, n).unwrap(); }
                PoolOp::ClientCollect(n) => { client.collect(&w.pool, &mut g_cons, HOME, n).unwrap(); }
                PoolOp::Return(n) => {
                    let mut batch = Vec::new();
                    while batch.len() < n {
                        match client.get() { Some(i) => batch.push(w.pool.descriptor(i, 10)), None => break }
                    }
                    let k = r_prod.push_slice(&batch).unwrap();
                    for d in &batch[k..] { client.put(d.index); }
                }
                PoolOp::HomeCollect(n) => { home.collect(&w.pool, &mut r_cons, CLIENT, n).unwrap(); }
                PoolOp::RestartHome => {
                    drop(g_prod); drop(r_cons);
                    g_prod = w.grant.producer().unwrap();
                    r_cons = w.ret.consumer().unwrap();
                    home = FreeList::recover(&w.pool, HOME, &w.grant.in_flight().unwrap(), &w.ret.in_flight().unwrap());
                }
                PoolOp::RestartClient => {
                    drop(g_cons); drop(r_prod);
                    g_cons = w.grant.consumer().unwrap();
                    r_prod = w.ret.producer().unwrap();
                    client = FreeList::recover(&w.pool, CLIENT, &w.ret.in_flight().unwrap(), &w.grant.in_flight().unwrap());
                }
                PoolOp::ClientCrashMidCollect => {
                    let mut d = [Descriptor::default(); 1];
                    g_cons.rewind();
                    // (Already ours if an earlier crash took it: then it is a re-take.)
                    if g_cons.read(&mut d).unwrap() == 1 && w.pool.owner(d[0].index) == Some(HOME) {
                        w.pool.take(&d[0], HOME, CLIENT, &mut Retakes::none()).unwrap();
                    }
                    drop(g_cons); drop(r_prod);
                    g_cons = w.grant.consumer().unwrap();
                    r_prod = w.ret.producer().unwrap();
                    client = FreeList::recover(&w.pool, CLIENT, &w.ret.in_flight().unwrap(), &w.grant.in_flight().unwrap());
                }
                PoolOp::ReturnGarbage(x) => {
                    let d = Descriptor { pool: 3, lease: 0, index: COUNT + u32::from(x), offset: 0, len: 1 };
                    if r_prod.push(d).is_ok() { garbage += 1; }
                }
                PoolOp::ReturnForeign => {
                    // A buffer the client does not hold: home's (if any).
                    if let Some(&i) = m_home.iter().next() {
                        if r_prod.push(w.pool.descriptor(i, 0)).is_ok() { foreign += 1; }
                    }
                }
            }
            // Rebuild the model from what the pieces say, then check it is a partition.
            let flight = in_flight(&w);
            let mut seen = BTreeSet::new();
            let valid_flight: Vec<u32> = flight.iter().filter(|d| d.index < COUNT).map(|d| d.index).collect();
            m_home = indices(&home);
            m_client = indices(&client);
            for i in m_home.iter().chain(&m_client) {
                prop_assert!(seen.insert(*i), "buffer {} listed twice", i);
            }
            // Foreign returns may name a buffer that is also on home's list; those are the
            // bogus ones and will be dropped on collect.
            let mut placed = seen.clone();
            for i in &valid_flight { placed.insert(*i); }
            prop_assert_eq!(placed.len() as u32, COUNT, "a buffer is lost: home {:?} client {:?} flight {:?}", m_home, m_client, valid_flight);
            // The table agrees with the private lists.
            for i in &m_home { prop_assert_eq!(w.pool.owner(*i), Some(HOME)); }
            for i in &m_client { prop_assert_eq!(w.pool.owner(*i), Some(CLIENT)); }
            // Recovery finds the private lists: everything held privately, except buffers that
            // an in-flight descriptor also names (bogus returns), which become re-takes.
            let named: BTreeSet<u32> = flight.iter().map(|d| d.index).collect();
            let (gf, rf) = (w.grant.in_flight().unwrap(), w.ret.in_flight().unwrap());
            for (me, list, out, inc) in [(HOME, &m_home, &gf, &rf), (CLIENT, &m_client, &rf, &gf)] {
                let (held, _retakes) = w.pool.recover(me, out, inc);
                let held: BTreeSet<u32> = held.into_iter().collect();
                prop_assert!(held.is_subset(list), "{:?} recovered {:?} it does not hold", me, held.difference(list).collect::<Vec<_>>());
                prop_assert!(list.difference(&held).all(|i| named.contains(i)), "{:?} lost {:?}", me, list.difference(&held).collect::<Vec<_>>());
            }
        }
        // Drain everything home and check it all came back.
        for _ in 0..10 {
            client.collect(&w.pool, &mut g_cons, HOME, usize::MAX).unwrap();
            while let Some(i) = client.get() {
                if r_prod.push(w.pool.descriptor(i, 0)).is_err() { client.put(i); break; }
            }
            home.collect(&w.pool, &mut r_cons, CLIENT, usize::MAX).unwrap();
        }
        prop_assert_eq!(home.len() as u32, COUNT);
        prop_assert_eq!(w.pool.accounting().get(&HOME).copied(), Some(COUNT));
        // Garbage and foreign returns (a buffer the client never held) are always refused and
        // counted: the lease in a foreign descriptor never matches a hand-over.
        let drops = w.pool.drops();
        prop_assert_eq!(drops.bad_index, garbage);
        prop_assert_eq!(drops.bad_owner, foreign);
        prop_assert_eq!(drops.total(), garbage + foreign);
    }
}
