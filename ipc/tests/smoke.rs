use keepnet_ipc::*;

#[test]
fn ring_push_pop_and_wrap() {
    let mut l = RegionLayout::new();
    let off = l.place(Ring::<u64>::size_in_region(8), Ring::<u64>::ALIGN);
    let r = Region::create("smoke", RegionKind::TEST, l.size()).unwrap();
    let ring = Ring::<u64>::init(&r, off, 8, 7).unwrap();
    let mut p = ring.producer().unwrap();
    let mut c = Ring::<u64>::open(&r.reopen(RegionKind::TEST).unwrap(), off, 7)
        .unwrap()
        .consumer()
        .unwrap();
    assert!(matches!(
        ring.producer(),
        Err(RingError::AlreadyClaimed { .. })
    ));
    let mut next = 0u64;
    let mut got = 0u64;
    for round in 0..100 {
        let batch: Vec<u64> = (next..next + (round % 9)).collect();
        let n = p.push_slice(&batch).unwrap();
        next += n as u64;
        let mut out = [0u64; 5];
        let k = c.pop_batch(&mut out).unwrap();
        for v in &out[..k] {
            assert_eq!(*v, got);
            got += 1;
        }
    }
    while let Some(v) = c.pop().unwrap() {
        assert_eq!(v, got);
        got += 1;
    }
    assert_eq!(got, next);
}
