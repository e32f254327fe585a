//! The Internet checksum (RFC 1071) and the IPv4 pseudo-header sum that UDP (RFC 768) and
//! TCP (RFC 9293 3.1) cover, and the bounds-checked big-endian field accessors the parsers
//! use: one implementation for the ip, udp and tcp servers.

use std::net::Ipv4Addr;

/// Big-endian u16 at `at`, or 0 if the buffer is too short (never panics).
#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at.saturating_add(2)) {
        Some(&[x, y]) => u16::from_be_bytes([x, y]),
        _ => 0,
    }
}

/// Big-endian u32 at `at`, or 0 if the buffer is too short (never panics).
#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at.saturating_add(4)) {
        Some(&[a, c, d, e]) => u32::from_be_bytes([a, c, d, e]),
        _ => 0,
    }
}

/// The byte at `at`, or 0 if the buffer is too short (never panics).
#[inline]
pub fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Writes `v` big-endian at `at` if it fits (builders size their buffers first).
#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    if let Some(s) = b.get_mut(at..at.saturating_add(2)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Writes `v` big-endian at `at` if it fits.
#[inline]
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at.saturating_add(4)) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Ones'-complement sum of `data` as big-endian 16-bit words (an odd last byte is padded
/// with zero), added to `acc`. Not folded: see [`fold`].
pub fn add(acc: u64, data: &[u8]) -> u64 {
    // 32-bit words summed into 64 bits: 2^16 = 1 (mod 2^16 - 1), so this is the same sum
    // once folded, at half the additions. 2^32 words would be needed to overflow.
    let mut s = acc;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        s += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let mut pairs = words.remainder().chunks_exact(2);
    for p in &mut pairs {
        s += u64::from(u16::from_be_bytes([p[0], p[1]]));
    }
    if let [b] = pairs.remainder() {
        s += u64::from(*b) << 8;
    }
    s
}

/// Folds a sum from [`add`] to 16 bits (end-around carry).
pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// The checksum to store: the complement of the folded sum.
pub fn compute(data: &[u8]) -> u16 {
    !fold(add(0, data))
}

/// True if `data`, checksum field included, sums to all ones.
pub fn verify(data: &[u8]) -> bool {
    fold(add(0, data)) == 0xffff
}

/// Sum of the IPv4 pseudo-header: source, destination, zero, `protocol`, and the transport
/// length `len` (RFC 768; RFC 9293 3.1).
pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u64 {
    let mut acc = add(0, &src.octets());
    acc = add(acc, &dst.octets());
    acc + u64::from(protocol) + ((len as u64) & 0xffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain RFC 1071 loop over 16-bit words.
    fn reference(d: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in d.chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn matches_the_reference_at_every_length_and_offset() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..5 {
            for end in start..data.len() {
                let d = &data[start..end];
                assert_eq!(fold(add(0, d)), reference(d), "{start}..{end}");
            }
        }
        assert_eq!(fold(add(0, &[0xff; 4096])), 0xffff);
        // RFC 1071 section 3's example.
        let ex = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(add(0, &ex)), 0xddf2);
        assert_eq!(compute(&ex), 0x220d);
    }

    #[test]
    fn pseudo_header_sums_its_fields() {
        let (s, d) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
        let mut p = [0u8; 12];
        p[0..4].copy_from_slice(&s.octets());
        p[4..8].copy_from_slice(&d.octets());
        p[9] = 17;
        p[10..12].copy_from_slice(&1234u16.to_be_bytes());
        assert_eq!(fold(pseudo_header(s, d, 17, 1234)), fold(add(0, &p)));
    }
}
