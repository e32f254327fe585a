//! UDP on the wire (RFC 768): a checked view of a received datagram, the header builder, the
//! Internet checksum over the IPv4 pseudo-header (RFC 1071), and the little of IPv4 the server
//! reads (the header quoted in ICMP errors).
//!
//! Untrusted bytes go through [`UdpPacket::new_checked`] or [`Quote::parse`] only; after
//! either succeeds no accessor can panic or read out of bounds.

use keepnet_server::inet::be16;
use std::net::Ipv4Addr;

/// Bytes of a UDP header.
pub const UDP_HEADER: usize = 8;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Smallest IPv4 header.
pub const IPV4_HEADER: usize = 20;
/// Largest IPv4 header (IHL 15).
pub const IPV4_HEADER_MAX: usize = 60;

/// Why a received datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a UDP header.
    #[error("datagram of {0} bytes is shorter than a UDP header")]
    Short(usize),
    /// The length field is below 8 or above the bytes received.
    #[error("UDP length field {field} does not fit the {received} bytes received")]
    BadLength { field: u16, received: usize },
}

pub use keepnet_server::inet::{add as ones_sum, fold};

/// The sum of the IPv4 pseudo-header of RFC 768: source, destination, zero, protocol 17 and
/// the UDP length.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: u16) -> u64 {
    keepnet_server::inet::pseudo_header(src, dst, PROTO_UDP, usize::from(udp_len))
}

/// A UDP datagram whose length was checked (RFC 768): at least a header, and the length
/// field between 8 and the bytes received. Bytes beyond the length field (link-layer padding
/// that IP let through) are cut off.
#[derive(Clone, Copy, Debug)]
pub struct UdpPacket<'a> {
    buf: &'a [u8],
}

impl<'a> UdpPacket<'a> {
    /// Checks the header and the length field.
    pub fn new_checked(datagram: &'a [u8]) -> Result<UdpPacket<'a>, WireError> {
        if datagram.len() < UDP_HEADER {
            return Err(WireError::Short(datagram.len()));
        }
        let field = be16(datagram, 4);
        // RFC 768: "Length is the length in octets of this user datagram including this
        // header and the data. (This means the minimum value of the length is eight.)"
        // A length beyond what arrived means the datagram was truncated: drop it (RFC 1122
        // 4.1.3.4 asks for silent discard of what cannot be verified). Shorter is allowed;
        // the rest is not UDP data (Linux trims the same way).
        if usize::from(field) < UDP_HEADER || usize::from(field) > datagram.len() {
            return Err(WireError::BadLength {
                field,
                received: datagram.len(),
            });
        }
        Ok(UdpPacket {
            buf: &datagram[..usize::from(field)],
        })
    }

    /// Source port (0: none given, RFC 768).
    pub fn src_port(&self) -> u16 {
        be16(self.buf, 0)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buf, 2)
    }
    /// The length field (header included).
    pub fn len(&self) -> u16 {
        self.buf.len() as u16
    }
    /// Never true: a checked packet holds at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The checksum field as sent (0: the sender computed none).
    pub fn checksum(&self) -> u16 {
        be16(self.buf, 6)
    }
    /// The data after the header.
    pub fn payload(&self) -> &'a [u8] {
        self.buf.get(UDP_HEADER..).unwrap_or(&[])
    }
    /// Offset of the payload within the datagram given to [`UdpPacket::new_checked`].
    pub fn payload_offset(&self) -> usize {
        UDP_HEADER
    }

    /// Verifies the checksum over the pseudo-header (RFC 768). A zero checksum field means
    /// the sender computed none, and is accepted (RFC 768; RFC 1122 4.1.3.4).
    pub fn checksum_ok(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        if self.checksum() == 0 {
            return true;
        }
        fold(ones_sum(pseudo_header_sum(src, dst, self.len()), self.buf)) == 0xffff
    }
}

/// Builds the header of a datagram carrying `payload` from `src:src_port` to `dst:dst_port`,
/// with its checksum (RFC 768: over the pseudo-header, the header and the data; "If the
/// computed checksum is zero, it is transmitted as all ones", since zero means "none").
/// The caller checked that `payload` fits (at most 65527 bytes).
pub fn udp_header(
    src: Ipv4Addr,
    src_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    payload: &[u8],
) -> [u8; UDP_HEADER] {
    let len = (UDP_HEADER + payload.len()).min(usize::from(u16::MAX)) as u16;
    let mut h = [0u8; UDP_HEADER];
    h[0..2].copy_from_slice(&src_port.to_be_bytes());
    h[2..4].copy_from_slice(&dst_port.to_be_bytes());
    h[4..6].copy_from_slice(&len.to_be_bytes());
    let s = ones_sum(ones_sum(pseudo_header_sum(src, dst, len), &h), payload);
    let c = match !fold(s) {
        0 => 0xffff,
        c => c,
    };
    h[6..8].copy_from_slice(&c.to_be_bytes());
    h
}

/// The part of an ICMP error's quote the server reads: the quoted IPv4 header and the first
/// 8 bytes of what followed it (the UDP header of a datagram we sent, RFC 792).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Quoted source (ours).
    pub src: Ipv4Addr,
    /// Quoted destination (the peer).
    pub dst: Ipv4Addr,
    /// Quoted protocol.
    pub protocol: u8,
    /// Quoted UDP source port (our local port).
    pub src_port: u16,
    /// Quoted UDP destination port (the peer's port).
    pub dst_port: u16,
}

impl Quote {
    /// Parses a quote; None if it is not an IPv4 header followed by at least 8 bytes.
    pub fn parse(quote: &[u8]) -> Option<Quote> {
        let first = *quote.first()?;
        let ihl = usize::from(first & 0x0f) * 4;
        if first >> 4 != 4 || ihl < IPV4_HEADER || quote.len() < ihl + UDP_HEADER {
            return None;
        }
        let addr = |at: usize| -> Option<Ipv4Addr> {
            let b = quote.get(at..at + 4)?;
            Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        };
        Some(Quote {
            protocol: *quote.get(9)?,
            src: addr(12)?,
            dst: addr(16)?,
            src_port: be16(quote, ihl),
            dst_port: be16(quote, ihl + 2),
        })
    }
}

/// True if `header` looks like the IPv4 header of a datagram (version 4, its IHL equal to
/// its length): what the ip server copied into the headroom, to be quoted in an ICMP error.
pub fn ipv4_header_ok(header: &[u8]) -> bool {
    match header.first() {
        Some(&b) => {
            b >> 4 == 4 && usize::from(b & 0x0f) * 4 == header.len() && header.len() >= IPV4_HEADER
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain 16-bit-at-a-time reference sum, to check the 32-bit fast path.
    fn reference(data: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for c in data.chunks(2) {
            let w = (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0));
            s += w;
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn sum_matches_reference_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..4 {
            for end in start..data.len() {
                let d = &data[start..end];
                assert_eq!(fold(ones_sum(0, d)), reference(d), "{start}..{end}");
            }
        }
        // Carries all the way round.
        assert_eq!(fold(ones_sum(0, &[0xff; 4096])), 0xffff);
    }

    #[test]
    fn length_field_is_checked() {
        assert_eq!(
            UdpPacket::new_checked(&[0; 7]).unwrap_err(),
            WireError::Short(7)
        );
        let mut d = [0u8; 12];
        d[5] = 7;
        assert!(matches!(
            UdpPacket::new_checked(&d),
            Err(WireError::BadLength { field: 7, .. })
        ));
        d[5] = 13;
        assert!(UdpPacket::new_checked(&d).is_err());
        d[5] = 10;
        let p = UdpPacket::new_checked(&d).unwrap();
        assert_eq!((p.len(), p.payload().len()), (10, 2));
    }

    #[test]
    fn quote_parses_only_ipv4_with_eight_bytes() {
        let mut q = vec![0x45u8, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0];
        q.extend_from_slice(&[198, 18, 0, 2, 198, 18, 0, 1]);
        q.extend_from_slice(&[0x30, 0x39, 0, 53, 0, 8, 0, 0]);
        let p = Quote::parse(&q).unwrap();
        assert_eq!((p.src_port, p.dst_port, p.protocol), (12345, 53, 17));
        assert_eq!(p.dst, Ipv4Addr::new(198, 18, 0, 1));
        assert!(Quote::parse(&q[..27]).is_none());
        q[0] = 0x44;
        assert!(Quote::parse(&q).is_none());
        q[0] = 0x65;
        assert!(Quote::parse(&q).is_none());
        assert!(Quote::parse(&[]).is_none());
        assert!(ipv4_header_ok(&[0x45; 20]));
        assert!(!ipv4_header_ok(&[0x46; 20]));
        assert!(!ipv4_header_ok(&[]));
    }
}
