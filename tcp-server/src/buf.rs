//! Send and receive byte rings over a byte slice (docs/tcp.md "Recovery-friendly layout").
//!
//! The ring memory is a `&mut [u8]` (a slice of the shared state region in the server, a
//! `Vec` in tests) and its geometry (`head`, `len`) lives in the [`Tcb`](crate::tcb::Tcb) as
//! a [`RingGeom`]. A view is built for the duration of one operation. The geometry may come
//! from shared memory, so it is never trusted: the capacity used is the smaller of the stored
//! one and the slice, indices are reduced modulo it, and every copy goes through `get`.

use crate::tcb::RingGeom;

/// Capacity actually usable: the stored capacity, bounded by the memory given.
#[inline]
fn cap_of(geo: &RingGeom, mem: &[u8]) -> u32 {
    geo.cap.min(u32::try_from(mem.len()).unwrap_or(u32::MAX))
}

/// Copies `src` into the ring at logical index `at` (from the start of `mem`, mod `cap`).
fn copy_in(mem: &mut [u8], cap: u32, at: u32, src: &[u8]) {
    if cap == 0 || src.is_empty() {
        return;
    }
    let cap = cap as usize;
    let at = (at as usize) % cap;
    let first = src.len().min(cap - at);
    let (a, b) = src.split_at(first);
    if let Some(d) = mem.get_mut(at..at + a.len()) {
        d.copy_from_slice(a);
    }
    if let Some(d) = mem.get_mut(..b.len()) {
        d.copy_from_slice(b);
    }
}

/// Copies from the ring at logical index `at` into `dst`.
fn copy_out(mem: &[u8], cap: u32, at: u32, dst: &mut [u8]) {
    if cap == 0 || dst.is_empty() {
        return;
    }
    let cap = cap as usize;
    let at = (at as usize) % cap;
    let first = dst.len().min(cap - at);
    let (a, b) = dst.split_at_mut(first);
    if let Some(s) = mem.get(at..at + a.len()) {
        a.copy_from_slice(s);
    }
    if let Some(s) = mem.get(..b.len()) {
        b.copy_from_slice(s);
    }
}

/// The send ring: bytes from SND.UNA onward (sent-but-unacknowledged, then unsent).
/// `write` appends user data, `consume` frees acknowledged bytes, `peek` reads any range for
/// (re)transmission.
pub struct SendRing<'a> {
    geo: &'a mut RingGeom,
    mem: &'a mut [u8],
}

impl<'a> SendRing<'a> {
    /// A view of `mem` with geometry `geo`. A corrupt geometry is repaired: `head` reduced
    /// modulo the capacity, `len` clamped to it.
    pub fn new(geo: &'a mut RingGeom, mem: &'a mut [u8]) -> Self {
        let cap = cap_of(geo, mem);
        if cap == 0 {
            geo.head = 0;
            geo.len = 0;
        } else {
            geo.head %= cap;
            geo.len = geo.len.min(cap);
        }
        SendRing { geo, mem }
    }
    /// Capacity in bytes.
    pub fn capacity(&self) -> u32 {
        cap_of(self.geo, self.mem)
    }
    /// Bytes held.
    pub fn len(&self) -> u32 {
        self.geo.len
    }
    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.geo.len == 0
    }
    /// Free space.
    pub fn free(&self) -> u32 {
        self.capacity().saturating_sub(self.geo.len)
    }
    /// Appends as much of `data` as fits; returns the count.
    pub fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free() as usize);
        let cap = self.capacity();
        let at = self.geo.head.wrapping_add(self.geo.len);
        copy_in(self.mem, cap, at, data.get(..n).unwrap_or(&[]));
        self.geo.len += n as u32;
        n
    }
    /// Frees the first `n` bytes (acknowledged); returns how many were freed.
    pub fn consume(&mut self, n: u32) -> u32 {
        let n = n.min(self.geo.len);
        let cap = self.capacity();
        if cap != 0 {
            self.geo.head = ((u64::from(self.geo.head) + u64::from(n)) % u64::from(cap)) as u32;
        }
        self.geo.len -= n;
        n
    }
    /// The longest contiguous run of up to `len` bytes starting `off` bytes after the head
    /// (it stops at the end of the memory when the range wraps, and at the bytes held).
    pub fn peek(&self, off: u32, len: u32) -> &[u8] {
        send_peek(self.geo, self.mem, off, len)
    }
    /// Copies bytes starting `off` after the head into `dst` (wrapping); returns the count.
    pub fn read_at(&self, off: u32, dst: &mut [u8]) -> usize {
        if off >= self.geo.len {
            return 0;
        }
        let n = dst.len().min((self.geo.len - off) as usize);
        let at = self.geo.head.wrapping_add(off);
        copy_out(
            self.mem,
            self.capacity(),
            at,
            dst.get_mut(..n).unwrap_or(&mut []),
        );
        n
    }
}

/// [`SendRing::peek`] without building a view (for callers that hold the geometry and the
/// memory as separate borrows).
pub fn send_peek<'m>(geo: &RingGeom, mem: &'m [u8], off: u32, len: u32) -> &'m [u8] {
    let cap = cap_of(geo, mem);
    let held = geo.len.min(cap);
    if cap == 0 || off >= held {
        return &[];
    }
    let len = len.min(held - off);
    let at = ((u64::from(geo.head) + u64::from(off)) % u64::from(cap)) as usize;
    let run = (len as usize).min(cap as usize - at);
    mem.get(at..at + run).unwrap_or(&[])
}

/// The receive ring: in-order bytes not yet read by the user (`len` of them from `head`),
/// then room for out-of-order bytes, written at their distance from RCV.NXT. Which of those
/// bytes are valid is tracked by [`RecvSack`](crate::sack::RecvSack).
pub struct RecvRing<'a> {
    geo: &'a mut RingGeom,
    mem: &'a mut [u8],
}

impl<'a> RecvRing<'a> {
    /// A view of `mem` with geometry `geo` (repaired as in [`SendRing::new`]).
    pub fn new(geo: &'a mut RingGeom, mem: &'a mut [u8]) -> Self {
        let cap = cap_of(geo, mem);
        if cap == 0 {
            geo.head = 0;
            geo.len = 0;
        } else {
            geo.head %= cap;
            geo.len = geo.len.min(cap);
        }
        RecvRing { geo, mem }
    }
    /// Capacity in bytes.
    pub fn capacity(&self) -> u32 {
        cap_of(self.geo, self.mem)
    }
    /// In-order bytes waiting for the user.
    pub fn len(&self) -> u32 {
        self.geo.len
    }
    /// No bytes waiting.
    pub fn is_empty(&self) -> bool {
        self.geo.len == 0
    }
    /// Space from RCV.NXT to the end of the ring: the most the window may offer.
    pub fn free(&self) -> u32 {
        self.capacity().saturating_sub(self.geo.len)
    }
    /// Writes `data` at `off` bytes past RCV.NXT, clipped to the free space; returns the
    /// bytes written (from the front of `data`).
    pub fn write_at(&mut self, off: u32, data: &[u8]) -> usize {
        let free = self.free();
        if off >= free {
            return 0;
        }
        let n = data.len().min((free - off) as usize);
        let at = self.geo.head.wrapping_add(self.geo.len).wrapping_add(off);
        let cap = self.capacity();
        copy_in(self.mem, cap, at, data.get(..n).unwrap_or(&[]));
        n
    }
    /// Makes `n` more bytes (already written at RCV.NXT) readable: RCV.NXT advanced by `n`.
    pub fn commit(&mut self, n: u32) {
        self.geo.len = self.geo.len.saturating_add(n).min(self.capacity());
    }
    /// Copies up to `dst.len()` readable bytes out without freeing them; returns the count.
    pub fn peek(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.geo.len as usize);
        copy_out(
            self.mem,
            self.capacity(),
            self.geo.head,
            dst.get_mut(..n).unwrap_or(&mut []),
        );
        n
    }
    /// Frees up to `n` readable bytes; returns the count.
    pub fn discard(&mut self, n: usize) -> usize {
        let n = n.min(self.geo.len as usize);
        let cap = self.capacity();
        if cap != 0 {
            self.geo.head = ((u64::from(self.geo.head) + n as u64) % u64::from(cap)) as u32;
        }
        self.geo.len -= n as u32;
        n
    }
    /// Copies up to `dst.len()` readable bytes out and frees them; returns the count.
    pub fn read(&mut self, dst: &mut [u8]) -> usize {
        let n = self.peek(dst);
        self.discard(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(cap: u32) -> RingGeom {
        RingGeom {
            off: 0,
            cap,
            head: 0,
            len: 0,
        }
    }

    #[test]
    fn send_ring_wraps() {
        let mut g = geo(8);
        let mut m = vec![0u8; 8];
        let mut r = SendRing::new(&mut g, &mut m);
        assert_eq!(r.write(b"abcdef"), 6);
        assert_eq!(r.consume(4), 4);
        assert_eq!(r.write(b"ghijklmn"), 6);
        assert_eq!(r.len(), 8);
        assert_eq!(r.free(), 0);
        // head at 4: "efghij" then wraps "kl".
        assert_eq!(r.peek(0, 100), b"efgh");
        assert_eq!(r.peek(4, 100), b"ijkl");
        let mut out = [0u8; 8];
        assert_eq!(r.read_at(1, &mut out), 7);
        assert_eq!(&out[..7], b"fghijkl");
        assert_eq!(r.consume(100), 8);
        assert!(r.is_empty());
    }

    #[test]
    fn corrupt_geometry_is_repaired() {
        let mut g = RingGeom {
            off: 0,
            cap: 1000,
            head: 5000,
            len: 9999,
        };
        let mut m = vec![0u8; 16];
        let r = SendRing::new(&mut g, &mut m);
        assert_eq!(r.capacity(), 16);
        assert_eq!(r.len(), 16);
        assert!(r.peek(3, 100).len() <= 16);
    }

    #[test]
    fn recv_ring_out_of_order() {
        let mut g = geo(10);
        let mut m = vec![0u8; 10];
        let mut r = RecvRing::new(&mut g, &mut m);
        assert_eq!(r.write_at(3, b"defg"), 4);
        assert_eq!(r.write_at(0, b"abc"), 3);
        r.commit(7);
        assert_eq!(r.free(), 3);
        assert_eq!(r.write_at(2, b"xyz"), 1);
        let mut out = [0u8; 5];
        assert_eq!(r.read(&mut out), 5);
        assert_eq!(&out, b"abcde");
        assert_eq!(r.write_at(0, b"hijklmn"), 7);
        r.commit(7);
        let mut out = [0u8; 20];
        assert_eq!(r.read(&mut out), 9);
        assert_eq!(&out[..9], b"fghijklmn");
    }
}
