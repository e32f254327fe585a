//! Errors of the keepnet command: what failed, with the cause attached.

use std::fmt::Write as _;

/// Why a keepnet command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what}")]
    Region {
        what: String,
        #[source]
        source: keepnet_ipc::RegionError,
    },
    #[error("{what}")]
    Ring {
        what: String,
        #[source]
        source: keepnet_ipc::RingError,
    },
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The peer process misbehaved, failed or vanished.
    #[error("{0}")]
    Peer(String),
    /// A bounded wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Something that cannot happen if both sides follow the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The environment cannot run this (e.g. too few CPUs).
    #[error("{0}")]
    Unsupported(String),
    /// A keepnet error with what was being done around it.
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<Error>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description of what was being done to a lower-level error.
pub trait Context<T> {
    fn context(self, what: impl Into<String>) -> Result<T>;
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

macro_rules! impl_context {
    ($src:ty, $variant:ident) => {
        impl<T> Context<T> for std::result::Result<T, $src> {
            fn context(self, what: impl Into<String>) -> Result<T> {
                self.map_err(|source| Error::$variant {
                    what: what.into(),
                    source,
                })
            }
            fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
                self.map_err(|source| Error::$variant {
                    what: what().into(),
                    source,
                })
            }
        }
    };
}

impl_context!(std::io::Error, Io);
impl_context!(nix::errno::Errno, Sys);
impl_context!(keepnet_ipc::RegionError, Region);
impl_context!(keepnet_ipc::RingError, Ring);
impl_context!(serde_json::Error, Json);

impl<T> Context<T> for Result<T> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what.into(),
            source: Box::new(e),
        })
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::Context {
            what: what().into(),
            source: Box::new(e),
        })
    }
}

/// "what: cause: cause's cause", for one-line reports.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_causes() {
        let r: std::result::Result<(), std::io::Error> = Err(std::io::Error::other("boom"));
        let e = r.context("reading the pipe").err();
        let text = e.map(|e| chain(&e));
        assert_eq!(text.as_deref(), Some("reading the pipe: boom"));
    }
}
