//! The one place that knows how private state is serialized for live update (serde + bincode
//! 2; bincode is unmaintained, so nothing else may name it).
//!
//! A snapshot is `b"KNSNAP01"`, a little-endian `u32` header length, the header, the payload.
//! The header names the server, the state format version, the build version, the payload
//! length and its CRC-32. A snapshot is untrusted input to the restoring side: every field is
//! checked before the payload is decoded, and decoding is bounded in size.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"KNSNAP01";
/// Largest payload a snapshot may carry.
pub const MAX_PAYLOAD: usize = 64 << 20;

/// What a snapshot says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    /// Server name (`driver`, `ip`, `tcp`, `udp`, ...).
    pub server: String,
    /// Version of the state format the payload is in.
    pub format_version: u32,
    /// Build version of the binary that wrote it.
    pub build_version: String,
    /// Payload bytes.
    pub payload_len: u64,
    /// CRC-32 (IEEE) of the payload.
    pub crc32: u32,
}

/// Why a snapshot was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("snapshot is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("not a keepnet snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot header is malformed: {0}")]
    BadHeader(String),
    #[error("snapshot is for server {found:?}, not {expected:?}")]
    WrongServer { found: String, expected: String },
    #[error("snapshot state format {found} is newer than this build reads (up to {max})")]
    TooNew { found: u32, max: u32 },
    #[error("snapshot state format {found} is older than this build reads (from {min})")]
    TooOld { found: u32, min: u32 },
    #[error("snapshot payload checksum mismatch (header {expected:#010x}, payload {found:#010x})")]
    Checksum { expected: u32, found: u32 },
    #[error("snapshot payload of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("snapshot payload does not decode: {0}")]
    Payload(String),
    #[error("state does not encode: {0}")]
    Encode(String),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Serializes `state` with a header.
pub fn encode<T: Serialize>(
    server: &str,
    format_version: u32,
    build_version: &str,
    state: &T,
) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(state, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let header = SnapshotHeader {
        server: server.into(),
        format_version,
        build_version: build_version.into(),
        payload_len: payload.len() as u64,
        crc32: crc32fast::hash(&payload),
    };
    let h = bincode::serde::encode_to_vec(&header, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(12 + h.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// A checked snapshot: the header passed every check, the payload matches its checksum.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// The header.
    pub header: SnapshotHeader,
    payload: &'a [u8],
}

impl Snapshot<'_> {
    /// Decodes the payload as `T` (pick `T` by `header.format_version`).
    pub fn state<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        let (v, used) = bincode::serde::decode_from_slice::<T, _>(self.payload, config())
            .map_err(|e| CodecError::Payload(e.to_string()))?;
        if used != self.payload.len() {
            return Err(CodecError::Payload(format!(
                "{} trailing bytes after the state",
                self.payload.len() - used
            )));
        }
        Ok(v)
    }
}

/// Checks a snapshot for `server` whose format this build reads (`formats`, inclusive).
pub fn decode<'a>(
    bytes: &'a [u8],
    server: &str,
    formats: std::ops::RangeInclusive<u32>,
) -> Result<Snapshot<'a>, CodecError> {
    if bytes.len() < 12 {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let hlen = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
    let rest = &bytes[12..];
    if hlen > rest.len() {
        return Err(CodecError::Truncated(bytes.len()));
    }
    let (header, used): (SnapshotHeader, usize) = bincode::serde::decode_from_slice(
        &rest[..hlen],
        bincode::config::standard().with_limit::<4096>(),
    )
    .map_err(|e| CodecError::BadHeader(e.to_string()))?;
    if used != hlen {
        return Err(CodecError::BadHeader("trailing bytes in header".into()));
    }
    if header.server != server {
        return Err(CodecError::WrongServer {
            found: header.server,
            expected: server.into(),
        });
    }
    if header.format_version > *formats.end() {
        return Err(CodecError::TooNew {
            found: header.format_version,
            max: *formats.end(),
        });
    }
    if header.format_version < *formats.start() {
        return Err(CodecError::TooOld {
            found: header.format_version,
            min: *formats.start(),
        });
    }
    if header.payload_len > MAX_PAYLOAD as u64 {
        return Err(CodecError::TooLarge(header.payload_len));
    }
    let payload = &rest[hlen..];
    if payload.len() as u64 != header.payload_len {
        return Err(CodecError::Truncated(bytes.len()));
    }
    let found = crc32fast::hash(payload);
    if found != header.crc32 {
        return Err(CodecError::Checksum {
            expected: header.crc32,
            found,
        });
    }
    Ok(Snapshot { header, payload })
}

/// A server's [`crate::Server::snapshot`]: `state` encoded with [`crate::runtime::BUILD_VERSION`], the
/// error as the runtime reports it.
pub fn save<T: Serialize>(
    server: &str,
    format_version: u32,
    state: &T,
) -> Result<Vec<u8>, crate::ServerError> {
    encode(server, format_version, crate::runtime::BUILD_VERSION, state)
        .map_err(|e| crate::ServerError::Snapshot(e.to_string()))
}

/// A server's [`crate::Server::restore`] of a snapshot in one of `formats` decoded as `T`
/// (every check of [`decode`]), the error as the runtime reports it.
pub fn load<T: DeserializeOwned>(
    bytes: &[u8],
    server: &str,
    formats: std::ops::RangeInclusive<u32>,
) -> Result<T, crate::ServerError> {
    decode(bytes, server, formats)
        .and_then(|snap| snap.state())
        .map_err(|e| crate::ServerError::Restore(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct V1 {
        a: u64,
        names: Vec<String>,
    }

    fn snap() -> Vec<u8> {
        encode(
            "tcp",
            1,
            "0.1.0",
            &V1 {
                a: 7,
                names: vec!["x".into()],
            },
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let b = snap();
        let s = decode(&b, "tcp", 1..=1).unwrap();
        assert_eq!(s.header.build_version, "0.1.0");
        assert_eq!(
            s.state::<V1>().unwrap(),
            V1 {
                a: 7,
                names: vec!["x".into()]
            }
        );
    }

    #[test]
    fn refuses_what_it_must() {
        let b = snap();
        assert_eq!(
            decode(&b, "udp", 1..=1).unwrap_err(),
            CodecError::WrongServer {
                found: "tcp".into(),
                expected: "udp".into()
            }
        );
        assert_eq!(
            decode(&b, "tcp", 0..=0).unwrap_err(),
            CodecError::TooNew { found: 1, max: 0 }
        );
        assert_eq!(
            decode(&b, "tcp", 2..=3).unwrap_err(),
            CodecError::TooOld { found: 1, min: 2 }
        );
        assert_eq!(
            decode(&b[..5], "tcp", 1..=1).unwrap_err(),
            CodecError::Truncated(5)
        );
        assert!(matches!(
            decode(&b[..b.len() - 1], "tcp", 1..=1),
            Err(CodecError::Truncated(_))
        ));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert_eq!(
            decode(&bad, "tcp", 1..=1).unwrap_err(),
            CodecError::BadMagic
        );
        let mut flip = b.clone();
        let last = flip.len() - 1;
        flip[last] ^= 0x55;
        assert!(matches!(
            decode(&flip, "tcp", 1..=1),
            Err(CodecError::Checksum { .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000usize {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            if len > 12 {
                v[..8].copy_from_slice(MAGIC);
            }
            let _ = decode(&v, "tcp", 0..=9).map(|s| s.state::<V1>());
        }
    }
}
