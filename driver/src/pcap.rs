//! Classic pcap files (LINKTYPE_ETHERNET, nanosecond timestamps) for `keepnet capture`, and
//! [`drain_capture`], which moves the driver's capture ring into one.
//!
//! The format is the original libpcap one (magic `0xa1b23c4d`: nanosecond resolution), which
//! tcpdump, tshark and Wireshark read. It has no field for the direction of a frame; records
//! keep it in [`CaptureRecord::direction`] should a pcapng writer want it later.
#![deny(unsafe_code)]

use std::io::{self, Write};

use keepnet_ipc::{Consumer, RingError};
use keepnet_server::wiring::{CaptureRecord, Link, CAPTURE_SNAPLEN};

/// Magic of a pcap file with nanosecond timestamps.
pub const MAGIC_NS: u32 = 0xa1b2_3c4d;
/// LINKTYPE_ETHERNET.
pub const LINKTYPE_ETHERNET: u32 = 1;

/// Writes a pcap stream: the global header at creation, then one record per frame.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    snaplen: u32,
    packets: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Starts a stream with the capture ring's snap length ([`CAPTURE_SNAPLEN`]).
    pub fn new(out: W) -> io::Result<PcapWriter<W>> {
        PcapWriter::with_snaplen(out, CAPTURE_SNAPLEN as u32)
    }

    /// Starts a stream keeping at most `snaplen` bytes of each frame.
    pub fn with_snaplen(mut out: W, snaplen: u32) -> io::Result<PcapWriter<W>> {
        let mut h = [0u8; 24];
        h[0..4].copy_from_slice(&MAGIC_NS.to_le_bytes());
        h[4..6].copy_from_slice(&2u16.to_le_bytes());
        h[6..8].copy_from_slice(&4u16.to_le_bytes());
        // thiszone (8..12) and sigfigs (12..16) stay 0.
        h[16..20].copy_from_slice(&snaplen.to_le_bytes());
        h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(PcapWriter {
            out,
            snaplen,
            packets: 0,
        })
    }

    /// Writes one frame seen at `ts_ns` (ns since the Unix epoch) that was `orig_len` bytes
    /// long on the wire; at most `snaplen` bytes of `data` are kept.
    pub fn write_frame(&mut self, ts_ns: u64, orig_len: u32, data: &[u8]) -> io::Result<()> {
        let keep = data.len().min(self.snaplen as usize).min(orig_len as usize);
        let mut h = [0u8; 16];
        let secs = u32::try_from(ts_ns / 1_000_000_000).unwrap_or(u32::MAX);
        h[0..4].copy_from_slice(&secs.to_le_bytes());
        h[4..8].copy_from_slice(&((ts_ns % 1_000_000_000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(keep as u32).to_le_bytes());
        h[12..16].copy_from_slice(&orig_len.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(&data[..keep])?;
        self.packets += 1;
        Ok(())
    }

    /// Writes a record from the capture ring (its length fields are checked, not trusted).
    pub fn write_record(&mut self, r: &CaptureRecord) -> io::Result<()> {
        let keep = (r.orig_len as usize).min(CAPTURE_SNAPLEN);
        self.write_frame(r.ts_ns, r.orig_len, &r.data[..keep])
    }

    /// Frames written so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Why a capture drain failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture ring: {0}")]
    Ring(#[from] RingError),
    #[error("writing the capture: {0}")]
    Io(#[from] io::Error),
}

/// Moves every record waiting on the link's capture ring into `writer`; returns how many.
/// Claims the ring's consumer side for the call (it fails if another live process holds it);
/// a caller draining repeatedly may keep a consumer and use [`drain_capture_from`].
pub fn drain_capture<W: Write>(
    link: &Link,
    writer: &mut PcapWriter<W>,
) -> Result<usize, CaptureError> {
    let mut c = link.capture()?.consumer()?;
    drain_capture_from(&mut c, writer)
}

/// [`drain_capture`] from a consumer the caller holds.
pub fn drain_capture_from<W: Write>(
    ring: &mut Consumer<CaptureRecord>,
    writer: &mut PcapWriter<W>,
) -> Result<usize, CaptureError> {
    let mut batch = vec![CaptureRecord::default(); 16];
    let mut total = 0;
    loop {
        ring.rewind();
        let n = ring.read(&mut batch)?;
        if n == 0 {
            return Ok(total);
        }
        for r in &batch[..n] {
            writer.write_record(r)?;
        }
        // Commit only what was written: a failed write leaves the records for a retry.
        ring.commit(n)?;
        total += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_record_layout() {
        let mut w = PcapWriter::with_snaplen(Vec::new(), 64).unwrap();
        w.write_frame(1_700_000_000_123_456_789, 100, &[0xab; 100])
            .unwrap();
        let b = w.into_inner();
        assert_eq!(b.len(), 24 + 16 + 64);
        assert_eq!(&b[0..4], &[0x4d, 0x3c, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 64);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 1);
        assert_eq!(
            u32::from_le_bytes(b[24..28].try_into().unwrap()),
            1_700_000_000
        );
        assert_eq!(
            u32::from_le_bytes(b[28..32].try_into().unwrap()),
            123_456_789
        );
        assert_eq!(u32::from_le_bytes(b[32..36].try_into().unwrap()), 64);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 100);
    }

    #[test]
    fn a_lying_record_is_clamped() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let r = CaptureRecord {
            orig_len: u32::MAX,
            ..CaptureRecord::default()
        };
        w.write_record(&r).unwrap();
        assert_eq!(w.into_inner().len(), 24 + 16 + CAPTURE_SNAPLEN);
    }
}
