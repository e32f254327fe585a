//! Initial sequence numbers (RFC 6528), and the keyed hash the listen path shares.
//!
//! RFC 6528 section 3: `ISN = M + F(localip, localport, remoteip, remoteport, secretkey)`,
//! where `M` is a timer that ticks every 4 microseconds (RFC 9293 section 3.4.1) and `F` is
//! a pseudorandom function of the connection-id keyed with a secret. Here `F` is
//! SipHash-2-4 (Aumasson and Bernstein, 2012) keyed with a 128-bit secret and truncated to
//! its low 32 bits.
//!
//! # The secret outlives the process
//!
//! RFC 6528 section 3 asks that the ISNs of one connection-id keep advancing with the clock
//! so that a new incarnation of a connection does not reuse the sequence space of an old one
//! (RFC 9293 section 3.4.1, "Knowing When to Keep Quiet"). That holds only while `F` of a
//! given 4-tuple stays the same, so the secret must be stable across a restart of the tcp
//! server: a fresh secret would shift every 4-tuple's sequence space by a random amount.
//! The caller therefore keeps the secret in shared state (the `tcp.state` region made by the
//! supervisor, which survives the server process), creates it once with
//! [`IsnGen::from_entropy`], stores [`IsnGen::secret`] there, and on a restart passes it back
//! in with [`IsnGen::new`]. `now_us` must come from `CLOCK_MONOTONIC`, which is shared by
//! every process of the machine, so `M` keeps counting across a restart as well.

use std::fmt;
use std::io::{self, Read};
use std::net::SocketAddrV4;

/// Domain tags, so one secret can key independent functions (ISNs, cookies, table hashing).
pub(crate) const TAG_ISN: u8 = b'I';

/// RFC 6528 ISN generator: the 128-bit secret key of `F`.
///
/// Plain `#[repr(C)]` data so it can be kept in the shared state region.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IsnGen {
    secret: [u8; 16],
}

impl fmt::Debug for IsnGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is what keeps ISNs unguessable (RFC 6528 section 3); never print it.
        f.debug_struct("IsnGen").finish_non_exhaustive()
    }
}

impl IsnGen {
    /// A generator keyed with `secret` (the one kept in the shared state region).
    pub const fn new(secret: [u8; 16]) -> IsnGen {
        IsnGen { secret }
    }

    /// A generator with a fresh secret read from `/dev/urandom`.
    ///
    /// Call this once, when the shared state is created; store [`IsnGen::secret`] there.
    pub fn from_entropy() -> io::Result<IsnGen> {
        let mut secret = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut secret)?;
        Ok(IsnGen { secret })
    }

    /// The secret, for the caller to keep in shared state.
    pub const fn secret(&self) -> &[u8; 16] {
        &self.secret
    }

    /// The ISN for a connection from `local` to `remote` at `now_us` (microseconds on
    /// `CLOCK_MONOTONIC`).
    ///
    /// RFC 6528 section 3: `ISN = M + F(localip, localport, remoteip, remoteport, secretkey)`,
    /// `M` the 4-microsecond timer of RFC 9293 section 3.4.1 (mod 2^32).
    pub fn isn(&self, local: SocketAddrV4, remote: SocketAddrV4, now_us: u64) -> u32 {
        let m = (now_us / 4) as u32;
        let mut msg = [0u8; 13];
        msg[0] = TAG_ISN;
        put_tuple(&mut msg[1..13], local, remote);
        let f = siphash24(&self.secret, &msg) as u32;
        m.wrapping_add(f)
    }
}

/// Writes `local ip, local port, remote ip, remote port` (network order) into `out[..12]`.
pub(crate) fn put_tuple(out: &mut [u8], local: SocketAddrV4, remote: SocketAddrV4) {
    out[0..4].copy_from_slice(&local.ip().octets());
    out[4..6].copy_from_slice(&local.port().to_be_bytes());
    out[6..10].copy_from_slice(&remote.ip().octets());
    out[10..12].copy_from_slice(&remote.port().to_be_bytes());
}

/// SipHash-2-4 of `data` keyed with `key` (the reference algorithm, little-endian words).
pub(crate) fn siphash24(key: &[u8; 16], data: &[u8]) -> u64 {
    let k0 = u64::from_le_bytes([
        key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
    ]);
    let k1 = u64::from_le_bytes([
        key[8], key[9], key[10], key[11], key[12], key[13], key[14], key[15],
    ]);
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let m = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    // Last block: the remaining bytes, and the length mod 256 in the top byte.
    let mut last = [0u8; 8];
    let rest = chunks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = data.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    fn sa(a: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(a), port)
    }

    fn msg(len: usize) -> Vec<u8> {
        (0..len as u8).collect()
    }

    #[test]
    fn siphash24_reference_vectors() {
        // The SipHash paper's test vectors: key 00..0f, message 00..len-1
        // (`vectors_sip64` in the reference implementation, read as little-endian u64).
        assert_eq!(siphash24(&KEY, &msg(0)), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(&KEY, &msg(1)), 0x74f8_39c5_93dc_67fd);
        assert_eq!(siphash24(&KEY, &msg(7)), 0xab02_00f5_8b01_d137);
        assert_eq!(siphash24(&KEY, &msg(8)), 0x93f5_f579_9a93_2462);
        assert_eq!(siphash24(&KEY, &msg(15)), 0xa129_ca61_49be_45e5);
        assert_eq!(siphash24(&KEY, &msg(63)), 0x958a_324c_eb06_4572);
    }

    #[test]
    fn isn_is_deterministic() {
        let g = IsnGen::new(KEY);
        let (l, r) = (sa([10, 0, 0, 1], 80), sa([10, 0, 0, 2], 40000));
        assert_eq!(g.isn(l, r, 123_456), g.isn(l, r, 123_456));
        assert_eq!(IsnGen::new(KEY).isn(l, r, 7), g.isn(l, r, 7));
    }

    #[test]
    fn different_four_tuples_differ() {
        let g = IsnGen::new(KEY);
        let l = sa([10, 0, 0, 1], 80);
        let r = sa([10, 0, 0, 2], 40000);
        let base = g.isn(l, r, 0);
        for (l2, r2) in [
            (sa([10, 0, 0, 9], 80), r),
            (sa([10, 0, 0, 1], 81), r),
            (l, sa([10, 0, 0, 3], 40000)),
            (l, sa([10, 0, 0, 2], 40001)),
            (r, l), // the two directions are different connection-ids
        ] {
            assert_ne!(g.isn(l2, r2, 0), base, "{l2} {r2}");
        }
    }

    #[test]
    fn grows_with_time_in_4us_ticks() {
        let g = IsnGen::new(KEY);
        let (l, r) = (sa([192, 168, 1, 1], 443), sa([192, 168, 1, 7], 5555));
        let t0 = 1_000_000_000u64;
        let i0 = g.isn(l, r, t0);
        assert_eq!(g.isn(l, r, t0 + 3), i0, "same 4 us tick");
        assert_eq!(g.isn(l, r, t0 + 4), i0.wrapping_add(1));
        assert_eq!(g.isn(l, r, t0 + 4_000_000), i0.wrapping_add(1_000_000));
        // M wraps mod 2^32 after 2^32 ticks (about 4.77 hours) and the ISN with it.
        assert_eq!(g.isn(l, r, t0 + 4 * (1u64 << 32)), i0);
    }

    #[test]
    fn secret_matters() {
        let (l, r) = (sa([10, 0, 0, 1], 80), sa([10, 0, 0, 2], 40000));
        let mut other = KEY;
        other[15] ^= 1;
        assert_ne!(
            IsnGen::new(KEY).isn(l, r, 0),
            IsnGen::new(other).isn(l, r, 0)
        );
    }

    #[test]
    fn restart_with_kept_secret_continues_sequence_space() {
        // A restarted server given the same secret and the same monotonic clock produces
        // ISNs that keep advancing from where the old process left off.
        let before = IsnGen::from_entropy().expect("urandom");
        let after = IsnGen::new(*before.secret());
        let (l, r) = (sa([10, 0, 0, 1], 80), sa([10, 0, 0, 2], 40000));
        let a = before.isn(l, r, 5_000_000);
        let b = after.isn(l, r, 5_000_400);
        assert_eq!(b.wrapping_sub(a), 100);
    }

    #[test]
    fn from_entropy_differs_and_debug_hides_secret() {
        let a = IsnGen::from_entropy().expect("urandom");
        let b = IsnGen::from_entropy().expect("urandom");
        assert_ne!(a.secret(), b.secret());
        assert_eq!(format!("{a:?}"), "IsnGen { .. }");
    }
}
