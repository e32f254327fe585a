//! TCP segment view, options and emission (RFC 9293 3.1, RFC 7323, RFC 2018).
//!
//! In the house style (see `keepnet-ip`'s `wire`, after smoltcp): [`TcpSegment`] is a typed
//! view over bytes whose [`TcpSegment::new_checked`] validates lengths once; after that no
//! accessor can panic (every read goes through [`be16`] / [`be32`], which return 0 on a short
//! buffer). [`TcpRepr`] is the parsed, validated header, and [`TcpRepr::emit`] writes a
//! header with its checksum, so no caller can leave one wrong. Every malformation has its own
//! [`WireError`] variant, so the server can count drops by reason.

pub use keepnet_server::inet::{be16, be32};
use keepnet_server::inet::{byte, put16, put32};
use std::fmt;
use std::net::Ipv4Addr;

use crate::seq::Seq;

/// Why a segment was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the 20-byte fixed header.
    Short,
    /// Data offset below 5 words (RFC 9293 3.1: "the TCP header ... is an integer multiple of
    /// 32 bits", at least 20 octets).
    DataOffset,
    /// Data offset points past the end of the buffer.
    HeaderOverrun,
    /// Checksum over the pseudo-header and segment does not verify (RFC 9293 3.1).
    Checksum,
    /// A combination of control bits no legal segment carries (no flags, SYN+FIN, SYN+RST,
    /// FIN+RST, FIN or data-only without ACK, ...).
    IllegalFlags,
    /// An option's kind byte is the last byte of the header: its length byte is missing.
    OptionTruncated,
    /// An option other than EOL/NOP with a length of 0 or 1 (it cannot cover its own kind and
    /// length bytes; RFC 9293 3.1 and RFC 1122 4.2.2.5).
    OptionLenTooSmall,
    /// An option's length runs past the end of the header.
    OptionOverrun,
    /// A known option (MSS, WS, SACK-permitted, SACK, TS) with the wrong length for its kind.
    OptionSize,
    /// The output buffer is too small for [`TcpRepr::emit`].
    BufferTooSmall,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            WireError::Short => "truncated header",
            WireError::DataOffset => "data offset below 5",
            WireError::HeaderOverrun => "data offset beyond segment",
            WireError::Checksum => "bad checksum",
            WireError::IllegalFlags => "illegal flag combination",
            WireError::OptionTruncated => "option length byte missing",
            WireError::OptionLenTooSmall => "option length below 2",
            WireError::OptionOverrun => "option overruns header",
            WireError::OptionSize => "option has the wrong length for its kind",
            WireError::BufferTooSmall => "output buffer too small",
        };
        f.write_str(s)
    }
}

impl std::error::Error for WireError {}

/// The Internet checksum (RFC 1071) and the TCP pseudo-header (RFC 9293 3.1).
pub mod checksum {
    use std::net::Ipv4Addr;

    pub use keepnet_server::inet::{add, fold};

    /// Sum of the IPv4 pseudo-header with PTCL = 6 and the TCP length (RFC 9293 3.1).
    pub fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: usize) -> u64 {
        keepnet_server::inet::pseudo_header(src, dst, 6, tcp_len)
    }
}

/// Length of the fixed TCP header.
pub const HEADER_LEN: usize = 20;
/// Largest TCP header (data offset 15).
pub const MAX_HEADER_LEN: usize = 60;
/// Most SACK blocks a segment can carry (RFC 2018 3: 4 with no other options).
pub const MAX_SACK_BLOCKS: usize = 4;

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const URGENT: usize = 18;
}

/// Option kinds (IANA "TCP Option Kind Numbers").
pub mod kind {
    /// End of option list.
    pub const EOL: u8 = 0;
    /// No-operation.
    pub const NOP: u8 = 1;
    /// Maximum segment size (RFC 9293 3.7.1).
    pub const MSS: u8 = 2;
    /// Window scale (RFC 7323 2).
    pub const WS: u8 = 3;
    /// SACK permitted (RFC 2018 2).
    pub const SACK_PERMITTED: u8 = 4;
    /// SACK (RFC 2018 3).
    pub const SACK: u8 = 5;
    /// Timestamps (RFC 7323 3).
    pub const TS: u8 = 8;
}

/// The control bits (RFC 9293 3.1).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flags(pub u8);

impl Flags {
    /// No more data from sender.
    pub const FIN: Flags = Flags(0x01);
    /// Synchronize sequence numbers.
    pub const SYN: Flags = Flags(0x02);
    /// Reset the connection.
    pub const RST: Flags = Flags(0x04);
    /// Push function.
    pub const PSH: Flags = Flags(0x08);
    /// Acknowledgment field is significant.
    pub const ACK: Flags = Flags(0x10);
    /// Urgent pointer field is significant.
    pub const URG: Flags = Flags(0x20);
    /// ECN echo (RFC 3168).
    pub const ECE: Flags = Flags(0x40);
    /// Congestion window reduced (RFC 3168).
    pub const CWR: Flags = Flags(0x80);
    /// No bits.
    pub const NONE: Flags = Flags(0);

    /// All bits of `other` are set.
    #[inline]
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// FIN set.
    #[inline]
    pub fn fin(self) -> bool {
        self.contains(Flags::FIN)
    }
    /// SYN set.
    #[inline]
    pub fn syn(self) -> bool {
        self.contains(Flags::SYN)
    }
    /// RST set.
    #[inline]
    pub fn rst(self) -> bool {
        self.contains(Flags::RST)
    }
    /// PSH set.
    #[inline]
    pub fn psh(self) -> bool {
        self.contains(Flags::PSH)
    }
    /// ACK set.
    #[inline]
    pub fn ack(self) -> bool {
        self.contains(Flags::ACK)
    }

    /// Whether a legal segment may carry this combination. Illegal: no SYN, RST nor ACK at
    /// all (no flags, a bare FIN, PSH or URG: "null" and "Xmas" scans; RFC 9293 3.10.7.4
    /// "if the ACK bit is off, drop the segment"), SYN+FIN, SYN+RST, FIN+RST.
    pub fn is_legal(self) -> bool {
        if !self.syn() && !self.rst() && !self.ack() {
            return false;
        }
        !(self.syn() && self.fin() || self.syn() && self.rst() || self.fin() && self.rst())
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Flags {
    fn bitor_assign(&mut self, rhs: Flags) {
        self.0 |= rhs.0;
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let mut first = true;
        for (i, n) in NAMES.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(n)?;
                first = false;
            }
        }
        if first {
            f.write_str("-")?;
        }
        Ok(())
    }
}

/// Up to four SACK blocks `[left, right)` (RFC 2018 3), in the order they appear.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SackBlocks {
    blocks: [(Seq, Seq); MAX_SACK_BLOCKS],
    len: u8,
}

impl SackBlocks {
    /// No blocks.
    pub const EMPTY: SackBlocks = SackBlocks {
        blocks: [(Seq(0), Seq(0)); MAX_SACK_BLOCKS],
        len: 0,
    };

    /// Appends a block; false (and nothing changes) when four are already held.
    pub fn push(&mut self, left: Seq, right: Seq) -> bool {
        match self.blocks.get_mut(usize::from(self.len)) {
            Some(slot) => {
                *slot = (left, right);
                self.len += 1;
                true
            }
            None => false,
        }
    }
    /// The blocks held.
    pub fn as_slice(&self) -> &[(Seq, Seq)] {
        self.blocks
            .get(..usize::from(self.len))
            .unwrap_or(&self.blocks[..0])
    }
    /// Number of blocks.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }
    /// No blocks.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Keeps at most `n` blocks.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n.min(MAX_SACK_BLOCKS) as u8);
    }
}

/// One option as it appears on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpOption<'a> {
    /// End of option list (kind 0).
    Eol,
    /// No-operation (kind 1).
    Nop,
    /// Maximum segment size (kind 2, length 4).
    Mss(u16),
    /// Window scale shift count (kind 3, length 3), as sent (may exceed 14).
    WindowScale(u8),
    /// SACK permitted (kind 4, length 2).
    SackPermitted,
    /// SACK blocks (kind 5, length 2 + 8n, n in 1..=4).
    Sack(SackBlocks),
    /// Timestamps (kind 8, length 10).
    Timestamps {
        /// TSval.
        val: u32,
        /// TSecr.
        ecr: u32,
    },
    /// Any other option, with its data.
    Unknown {
        /// Option kind.
        kind: u8,
        /// The bytes after kind and length.
        data: &'a [u8],
    },
}

/// Iterator over the options of a header. Yields one `Err` and then stops on a malformed
/// option; stops after EOL.
#[derive(Clone, Debug)]
pub struct OptionIter<'a> {
    rest: &'a [u8],
    done: bool,
}

impl<'a> OptionIter<'a> {
    /// Iterates over raw option bytes (the header after the 20 fixed bytes).
    pub fn new(bytes: &'a [u8]) -> Self {
        OptionIter {
            rest: bytes,
            done: false,
        }
    }
}

impl<'a> Iterator for OptionIter<'a> {
    type Item = Result<TcpOption<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (&k, after_kind) = match self.rest.split_first() {
            Some(x) => x,
            None => {
                self.done = true;
                return None;
            }
        };
        match k {
            kind::EOL => {
                self.done = true;
                return Some(Ok(TcpOption::Eol));
            }
            kind::NOP => {
                self.rest = after_kind;
                return Some(Ok(TcpOption::Nop));
            }
            _ => {}
        }
        // Every other option: kind, length (covering kind and length), data.
        let fail = |s: &mut Self, e| {
            s.done = true;
            Some(Err(e))
        };
        let len = match after_kind.first() {
            Some(&l) => usize::from(l),
            None => return fail(self, WireError::OptionTruncated),
        };
        if len < 2 {
            return fail(self, WireError::OptionLenTooSmall);
        }
        let (opt, rest) = match (self.rest.get(..len), self.rest.get(len..)) {
            (Some(o), Some(r)) => (o, r),
            _ => return fail(self, WireError::OptionOverrun),
        };
        self.rest = rest;
        let data = opt.get(2..).unwrap_or(&[]);
        let parsed = match k {
            kind::MSS if len == 4 => TcpOption::Mss(be16(data, 0)),
            kind::WS if len == 3 => TcpOption::WindowScale(byte(data, 0)),
            kind::SACK_PERMITTED if len == 2 => TcpOption::SackPermitted,
            kind::SACK if len >= 10 && (len - 2) % 8 == 0 && (len - 2) / 8 <= MAX_SACK_BLOCKS => {
                let mut b = SackBlocks::EMPTY;
                for c in data.chunks_exact(8) {
                    b.push(Seq(be32(c, 0)), Seq(be32(c, 4)));
                }
                TcpOption::Sack(b)
            }
            kind::TS if len == 10 => TcpOption::Timestamps {
                val: be32(data, 0),
                ecr: be32(data, 4),
            },
            kind::MSS | kind::WS | kind::SACK_PERMITTED | kind::SACK | kind::TS => {
                return fail(self, WireError::OptionSize)
            }
            _ => TcpOption::Unknown { kind: k, data },
        };
        Some(Ok(parsed))
    }
}

/// A checked view of a TCP segment (header, options, payload).
#[derive(Debug, Clone)]
pub struct TcpSegment<T: AsRef<[u8]>> {
    buf: T,
    header_len: usize,
}

impl<T: AsRef<[u8]>> TcpSegment<T> {
    /// Checks, in order: the fixed header fits (`Short`), data offset >= 5 (`DataOffset`),
    /// the header with options fits (`HeaderOverrun`). Flags, options and the checksum are
    /// checked by [`TcpRepr::parse`] (or [`TcpSegment::checksum_ok`], [`TcpSegment::options`]).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Short);
        }
        let header_len = usize::from(byte(b, field::OFF) >> 4) * 4;
        if header_len < HEADER_LEN {
            return Err(WireError::DataOffset);
        }
        if header_len > b.len() {
            return Err(WireError::HeaderOverrun);
        }
        Ok(TcpSegment { buf, header_len })
    }
    /// Source port.
    pub fn src_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::SRC_PORT)
    }
    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        be16(self.buf.as_ref(), field::DST_PORT)
    }
    /// Sequence number.
    pub fn seq(&self) -> Seq {
        Seq(be32(self.buf.as_ref(), field::SEQ))
    }
    /// Acknowledgment number (meaningful only with ACK).
    pub fn ack(&self) -> Seq {
        Seq(be32(self.buf.as_ref(), field::ACK))
    }
    /// Header length in bytes (20..=60).
    pub fn header_len(&self) -> usize {
        self.header_len
    }
    /// Control bits.
    pub fn flags(&self) -> Flags {
        Flags(byte(self.buf.as_ref(), field::FLAGS))
    }
    /// Window field (unscaled).
    pub fn window(&self) -> u16 {
        be16(self.buf.as_ref(), field::WINDOW)
    }
    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buf.as_ref(), field::CHECKSUM)
    }
    /// Urgent pointer.
    pub fn urgent(&self) -> u16 {
        be16(self.buf.as_ref(), field::URGENT)
    }
    /// Raw option bytes.
    pub fn option_bytes(&self) -> &[u8] {
        self.buf
            .as_ref()
            .get(HEADER_LEN..self.header_len)
            .unwrap_or(&[])
    }
    /// Iterator over the options.
    pub fn options(&self) -> OptionIter<'_> {
        OptionIter::new(self.option_bytes())
    }
    /// The payload.
    pub fn payload(&self) -> &[u8] {
        self.buf.as_ref().get(self.header_len..).unwrap_or(&[])
    }
    /// The whole segment.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }
    /// The checksum verifies over the IPv4 pseudo-header and the whole segment
    /// (RFC 9293 3.1).
    pub fn checksum_ok(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        let b = self.buf.as_ref();
        let acc = checksum::add(checksum::pseudo_header(src, dst, b.len()), b);
        checksum::fold(acc) == 0xffff
    }
}

/// A parsed, validated TCP header; also what the engine fills in to send one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpRepr {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: Seq,
    /// Acknowledgment number (sent as 0 unless `flags` has ACK).
    pub ack: Seq,
    /// Control bits.
    pub flags: Flags,
    /// Window field as on the wire (unscaled).
    pub window: u16,
    /// MSS option.
    pub mss: Option<u16>,
    /// Window scale option (shift count, clamped to 14 on parse, RFC 7323 2.3).
    pub window_scale: Option<u8>,
    /// SACK-permitted option.
    pub sack_permitted: bool,
    /// SACK blocks.
    pub sack: SackBlocks,
    /// Timestamps option `(TSval, TSecr)`.
    pub timestamps: Option<(u32, u32)>,
}

impl Default for TcpRepr {
    fn default() -> Self {
        TcpRepr {
            src_port: 0,
            dst_port: 0,
            seq: Seq(0),
            ack: Seq(0),
            flags: Flags::NONE,
            window: 0,
            mss: None,
            window_scale: None,
            sack_permitted: false,
            sack: SackBlocks::EMPTY,
            timestamps: None,
        }
    }
}

impl TcpRepr {
    /// Parses a checked view: the checksum over the pseudo-header (`Checksum`), the control
    /// bits (`IllegalFlags`), then every option (first malformed one's error). Unknown options
    /// are skipped (RFC 9293 3.1: "A TCP implementation MUST ignore without error any TCP
    /// option it does not implement"). Options after EOL are not read.
    pub fn parse<T: AsRef<[u8]>>(
        seg: &TcpSegment<T>,
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<TcpRepr, WireError> {
        if !seg.checksum_ok(src, dst) {
            return Err(WireError::Checksum);
        }
        Self::parse_unchecked_sum(seg)
    }

    /// As [`TcpRepr::parse`] but without checking the checksum (for a caller that verified
    /// it already, or offloaded it).
    pub fn parse_unchecked_sum<T: AsRef<[u8]>>(seg: &TcpSegment<T>) -> Result<TcpRepr, WireError> {
        let flags = seg.flags();
        if !flags.is_legal() {
            return Err(WireError::IllegalFlags);
        }
        let mut r = TcpRepr {
            src_port: seg.src_port(),
            dst_port: seg.dst_port(),
            seq: seg.seq(),
            ack: if flags.ack() { seg.ack() } else { Seq(0) },
            flags,
            window: seg.window(),
            ..TcpRepr::default()
        };
        for opt in seg.options() {
            match opt? {
                TcpOption::Mss(m) => r.mss = Some(m),
                // RFC 7323 2.3: "If a Window Scale option is received with a shift.cnt value
                // larger than 14, the TCP SHOULD log the error but MUST use 14 instead".
                TcpOption::WindowScale(s) => r.window_scale = Some(s.min(14)),
                TcpOption::SackPermitted => r.sack_permitted = true,
                TcpOption::Sack(b) => r.sack = b,
                TcpOption::Timestamps { val, ecr } => r.timestamps = Some((val, ecr)),
                TcpOption::Eol | TcpOption::Nop | TcpOption::Unknown { .. } => {}
            }
        }
        Ok(r)
    }

    /// Length of the options this repr emits, padded to a multiple of 4.
    pub fn options_len(&self) -> usize {
        let n = self.fixed_options_len();
        let blocks = self.sack_blocks_that_fit(40usize.saturating_sub(n));
        if blocks > 0 {
            n + 4 + 8 * blocks // NOP NOP + 2 + 8n
        } else {
            n
        }
    }

    /// Length of every option but SACK blocks.
    fn fixed_options_len(&self) -> usize {
        let mut n = 0;
        if self.mss.is_some() {
            n += 4;
        }
        if self.window_scale.is_some() {
            n += 4; // NOP + 3
        }
        if self.sack_permitted {
            n += 4; // NOP NOP + 2 (or 2 + TS packing; kept simple)
        }
        if self.timestamps.is_some() {
            n += 12; // NOP NOP + 10
        }
        n
    }

    fn sack_blocks_that_fit(&self, room: usize) -> usize {
        if room < 12 {
            return 0;
        }
        self.sack.len().min((room - 4) / 8)
    }

    /// Header length this repr emits (20 + options).
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.options_len()
    }

    /// Bytes [`TcpRepr::emit`] writes for `payload_len` bytes of payload.
    pub fn buffer_len(&self, payload_len: usize) -> usize {
        self.header_len() + payload_len
    }

    /// Sequence space the segment occupies: payload plus one each for SYN and FIN.
    pub fn seg_len(&self, payload_len: usize) -> u32 {
        payload_len as u32 + u32::from(self.flags.syn()) + u32::from(self.flags.fin())
    }

    /// Writes the header, `payload` and the checksum into the front of `buf` and returns the
    /// number of bytes written. SACK blocks that do not fit in the 40 bytes of option space
    /// are left out (the first ones are kept, RFC 2018 4).
    pub fn emit(
        &self,
        buf: &mut [u8],
        payload: &[u8],
        src: Ipv4Addr,
        dst: Ipv4Addr,
    ) -> Result<usize, WireError> {
        let hlen = self.header_len();
        let total = hlen + payload.len();
        let out = buf.get_mut(..total).ok_or(WireError::BufferTooSmall)?;
        put16(out, field::SRC_PORT, self.src_port);
        put16(out, field::DST_PORT, self.dst_port);
        put32(out, field::SEQ, self.seq.0);
        put32(
            out,
            field::ACK,
            if self.flags.ack() { self.ack.0 } else { 0 },
        );
        if let Some(b) = out.get_mut(field::OFF) {
            *b = ((hlen / 4) as u8) << 4;
        }
        if let Some(b) = out.get_mut(field::FLAGS) {
            *b = self.flags.0;
        }
        put16(out, field::WINDOW, self.window);
        put16(out, field::CHECKSUM, 0);
        put16(out, field::URGENT, 0);
        let mut at = HEADER_LEN;
        let mut push = |bytes: &[u8]| {
            if let Some(s) = out.get_mut(at..at + bytes.len()) {
                s.copy_from_slice(bytes);
            }
            at += bytes.len();
        };
        if let Some(m) = self.mss {
            let [a, b] = m.to_be_bytes();
            push(&[kind::MSS, 4, a, b]);
        }
        if let Some(s) = self.window_scale {
            push(&[kind::NOP, kind::WS, 3, s]);
        }
        if self.sack_permitted {
            push(&[kind::NOP, kind::NOP, kind::SACK_PERMITTED, 2]);
        }
        if let Some((val, ecr)) = self.timestamps {
            push(&[kind::NOP, kind::NOP, kind::TS, 10]);
            push(&val.to_be_bytes());
            push(&ecr.to_be_bytes());
        }
        let room = 40usize.saturating_sub(self.fixed_options_len());
        let blocks = self.sack_blocks_that_fit(room);
        if blocks > 0 {
            push(&[kind::NOP, kind::NOP, kind::SACK, (2 + 8 * blocks) as u8]);
            for &(l, r) in self.sack.as_slice().iter().take(blocks) {
                push(&l.0.to_be_bytes());
                push(&r.0.to_be_bytes());
            }
        }
        push(payload);
        let acc = checksum::add(checksum::pseudo_header(src, dst, total), out);
        let sum = !checksum::fold(acc);
        put16(out, field::CHECKSUM, sum);
        Ok(total)
    }

    /// The RST to answer a segment that belongs to no connection, or is unacceptable in a
    /// non-synchronized state (RFC 9293 3.10.7.1): "If the ACK bit is off, sequence number
    /// zero is used, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>. If the ACK bit is on,
    /// <SEQ=SEG.ACK><CTL=RST>". `None` if the segment is itself a RST ("An incoming segment
    /// containing a RST is discarded").
    pub fn rst_reply(seg: &TcpRepr, payload_len: usize) -> Option<TcpRepr> {
        if seg.flags.rst() {
            return None;
        }
        let base = TcpRepr {
            src_port: seg.dst_port,
            dst_port: seg.src_port,
            ..TcpRepr::default()
        };
        Some(if seg.flags.ack() {
            TcpRepr {
                seq: seg.ack,
                flags: Flags::RST,
                ..base
            }
        } else {
            TcpRepr {
                seq: Seq(0),
                ack: seg.seq + seg.seg_len(payload_len),
                flags: Flags::RST | Flags::ACK,
                ..base
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const DST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    fn syn() -> TcpRepr {
        TcpRepr {
            src_port: 40000,
            dst_port: 80,
            seq: Seq(0xdead_beef),
            flags: Flags::SYN,
            window: 65535,
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            timestamps: Some((1, 0)),
            ..TcpRepr::default()
        }
    }

    fn build(r: &TcpRepr, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; r.buffer_len(payload.len())];
        let n = r.emit(&mut b, payload, SRC, DST).unwrap();
        assert_eq!(n, b.len());
        b
    }

    #[test]
    fn round_trip_syn_with_all_options() {
        let r = syn();
        let b = build(&r, &[]);
        assert_eq!(b.len() % 4, 0);
        let v = TcpSegment::new_checked(&b[..]).unwrap();
        assert!(v.checksum_ok(SRC, DST));
        assert!(!v.checksum_ok(DST, Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(TcpRepr::parse(&v, SRC, DST).unwrap(), r);
    }

    #[test]
    fn round_trip_ack_with_sack_and_payload() {
        let mut r = TcpRepr {
            src_port: 1,
            dst_port: 2,
            seq: Seq(u32::MAX - 3),
            ack: Seq(77),
            flags: Flags::ACK | Flags::PSH,
            window: 1000,
            timestamps: Some((5, 6)),
            ..TcpRepr::default()
        };
        for i in 0..4u32 {
            r.sack.push(Seq(100 * i), Seq(100 * i + 50));
        }
        let b = build(&r, b"hello");
        let v = TcpSegment::new_checked(&b[..]).unwrap();
        assert_eq!(v.payload(), b"hello");
        let p = TcpRepr::parse(&v, SRC, DST).unwrap();
        // With timestamps only three blocks fit in 40 bytes.
        assert_eq!(p.sack.len(), 3);
        assert_eq!(p.sack.as_slice(), &r.sack.as_slice()[..3]);
        r.timestamps = None;
        let b = build(&r, b"");
        let p = TcpRepr::parse(&TcpSegment::new_checked(&b[..]).unwrap(), SRC, DST).unwrap();
        assert_eq!(p.sack.len(), 4);
        // A corrupted byte fails the checksum.
        let mut c = build(&r, b"xy");
        let last = c.len() - 1;
        c[last] ^= 0x40;
        assert_eq!(
            TcpRepr::parse(&TcpSegment::new_checked(&c[..]).unwrap(), SRC, DST),
            Err(WireError::Checksum)
        );
    }

    /// Builds a segment with raw option bytes (padded by the caller) and a fixed checksum.
    fn with_options(opts: &[u8], flags: u8) -> Vec<u8> {
        let mut b = build(
            &TcpRepr {
                flags: Flags(flags),
                ..TcpRepr::default()
            },
            &[],
        );
        b.extend_from_slice(opts);
        b[12] = (((20 + opts.len()) / 4) as u8) << 4;
        b[16] = 0;
        b[17] = 0;
        let acc = checksum::add(checksum::pseudo_header(SRC, DST, b.len()), &b);
        let s = !checksum::fold(acc);
        b[16..18].copy_from_slice(&s.to_be_bytes());
        b
    }

    fn parse_err(b: &[u8]) -> Option<WireError> {
        match TcpSegment::new_checked(b) {
            Err(e) => Some(e),
            Ok(v) => TcpRepr::parse(&v, SRC, DST).err(),
        }
    }

    #[test]
    fn header_length_errors_are_distinct() {
        let b = with_options(&[], 0x10);
        assert_eq!(parse_err(&b[..19]), Some(WireError::Short));
        let mut d = b.clone();
        d[12] = 4 << 4;
        assert_eq!(parse_err(&d), Some(WireError::DataOffset));
        d[12] = 6 << 4;
        assert_eq!(parse_err(&d), Some(WireError::HeaderOverrun));
        d[12] = 15 << 4;
        assert_eq!(parse_err(&d), Some(WireError::HeaderOverrun));
    }

    #[test]
    fn option_errors_are_distinct() {
        // Kind byte with no length byte.
        assert_eq!(
            parse_err(&with_options(&[1, 1, 1, 2], 0x10)),
            Some(WireError::OptionTruncated)
        );
        // Length 0 and 1 on a non-NOP/EOL option.
        assert_eq!(
            parse_err(&with_options(&[2, 0, 0, 0], 0x10)),
            Some(WireError::OptionLenTooSmall)
        );
        assert_eq!(
            parse_err(&with_options(&[99, 1, 0, 0], 0x10)),
            Some(WireError::OptionLenTooSmall)
        );
        // Length past the header.
        assert_eq!(
            parse_err(&with_options(&[99, 9, 0, 0], 0x10)),
            Some(WireError::OptionOverrun)
        );
        // Known kinds with the wrong size.
        assert_eq!(
            parse_err(&with_options(&[2, 3, 0, 0], 0x10)),
            Some(WireError::OptionSize)
        );
        assert_eq!(
            parse_err(&with_options(&[5, 6, 0, 0, 0, 0, 0, 0], 0x10)),
            Some(WireError::OptionSize)
        );
        // Unknown option and EOL with junk after it are fine.
        assert_eq!(parse_err(&with_options(&[99, 4, 0, 0], 0x10)), None);
        assert_eq!(parse_err(&with_options(&[0, 9, 9, 9], 0x10)), None);
        // Window scale above 14 is clamped.
        let b = with_options(&[3, 3, 20, 0], 0x02);
        let r = TcpRepr::parse(&TcpSegment::new_checked(&b[..]).unwrap(), SRC, DST).unwrap();
        assert_eq!(r.window_scale, Some(14));
    }

    #[test]
    fn illegal_flag_combinations() {
        for bad in [
            0x00u8,
            0x01,
            0x08,
            0x20,
            0x29,
            0x03,
            0x06,
            0x12 | 0x01,
            0x14 | 0x01,
        ] {
            assert_eq!(
                parse_err(&with_options(&[], bad)),
                Some(WireError::IllegalFlags),
                "{:?}",
                Flags(bad)
            );
        }
        for good in [0x02u8, 0x12, 0x10, 0x11, 0x18, 0x04, 0x14, 0x19] {
            assert_eq!(
                parse_err(&with_options(&[], good)),
                None,
                "{:?}",
                Flags(good)
            );
        }
    }

    #[test]
    fn rst_reply_rules() {
        let s = syn();
        let r = TcpRepr::rst_reply(&s, 0).unwrap();
        assert_eq!(r.seq, Seq(0));
        assert_eq!(r.ack, s.seq + 1);
        assert_eq!(r.flags, Flags::RST | Flags::ACK);
        let a = TcpRepr {
            flags: Flags::ACK,
            ack: Seq(5),
            ..s
        };
        let r = TcpRepr::rst_reply(&a, 10).unwrap();
        assert_eq!((r.seq, r.flags), (Seq(5), Flags::RST));
        assert!(TcpRepr::rst_reply(
            &TcpRepr {
                flags: Flags::RST,
                ..s
            },
            0
        )
        .is_none());
    }
}
