//! [`Poller`]: readiness of many TCP sockets at once, in the spirit of epoll and mio, so one
//! thread can serve thousands of connections.
//!
//! Readiness is *level-triggered*: a socket is reported by every [`Poller::poll`] while it is
//! ready (a stream with unread data is readable until it is read). A poll that finds nothing
//! ready parks on the application's doorbell exactly as a blocking read does (a short spin,
//! then a futex, re-checking at least every 20 ms), so an idle poller costs nothing.
//!
//! ```no_run
//! use keepnet_sockets::{Event, Interest, Poller, TcpListener};
//! use std::io::{Read, Write};
//!
//! fn main() -> std::io::Result<()> {
//!     let listener = TcpListener::bind("0.0.0.0:7")?;
//!     listener.set_nonblocking(true)?;
//!     let poller = Poller::new();
//!     poller.register(&listener, 0, Interest::READABLE)?;
//!     let mut conns = std::collections::HashMap::new();
//!     let mut events = Vec::new();
//!     let mut buf = vec![0u8; 65536];
//!     loop {
//!         poller.poll(&mut events, None)?;
//!         for ev in &events {
//!             if ev.token == 0 {
//!                 while let Ok((s, _)) = listener.accept() {
//!                     s.set_nonblocking(true)?;
//!                     let token = conns.len() + 1;
//!                     poller.register(&s, token, Interest::READABLE)?;
//!                     conns.insert(token, s);
//!                 }
//!             } else if let Some(s) = conns.get_mut(&ev.token) {
//!                 match s.read(&mut buf) {
//!                     Ok(0) | Err(_) => {
//!                         let s = conns.remove(&ev.token).unwrap();
//!                         poller.deregister(&s)?;
//!                     }
//!                     Ok(n) => s.write_all(&buf[..n])?,
//!                 }
//!             }
//!         }
//!     }
//! }
//! ```

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::engine::{lock, Wait};
use crate::tcp_stack::TcpStack;

/// What a registration waits for: [`Interest::READABLE`], [`Interest::WRITABLE`] or both
/// (`Interest::READABLE | Interest::WRITABLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interest(u8);

impl Interest {
    /// Readable: a stream has data, EOF or an error to read; a listener has a connection to
    /// accept.
    pub const READABLE: Interest = Interest(1);
    /// Writable: a stream is connected, has room under its in-flight cap and a TX buffer is
    /// free (or it has an error to report).
    pub const WRITABLE: Interest = Interest(2);

    /// Both interests.
    pub const fn add(self, other: Interest) -> Interest {
        Interest(self.0 | other.0)
    }
    /// True if it includes [`Interest::READABLE`].
    pub const fn is_readable(self) -> bool {
        self.0 & 1 != 0
    }
    /// True if it includes [`Interest::WRITABLE`].
    pub const fn is_writable(self) -> bool {
        self.0 & 2 != 0
    }
}

impl std::ops::BitOr for Interest {
    type Output = Interest;
    fn bitor(self, other: Interest) -> Interest {
        self.add(other)
    }
}

/// One ready socket, as [`Poller::poll`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The token it was registered with.
    pub token: usize,
    /// Ready to read (or accept): the call will not block.
    pub readable: bool,
    /// Ready to write: the call will not block.
    pub writable: bool,
    /// An error is pending (the next read or write returns it; [`crate::TcpStream::take_error`]
    /// takes it). Reported whatever the interest.
    pub error: bool,
    /// The peer closed its side (EOF) or the connection is dead: reads return what is left,
    /// then 0. A dead connection is reported whatever the interest (as epoll's EPOLLHUP),
    /// so deregister or drop it.
    pub hup: bool,
}

mod sealed {
    /// The socket a source names: its stack and handle.
    pub trait Sealed {
        fn tcp_source(&self) -> (&std::sync::Arc<crate::TcpStack>, u32);
    }
}

/// A socket a [`Poller`] can watch: [`crate::TcpListener`] and [`crate::TcpStream`].
pub trait Source: sealed::Sealed {}

impl<T: sealed::Sealed> Source for T {}

impl sealed::Sealed for crate::TcpStream {
    fn tcp_source(&self) -> (&Arc<TcpStack>, u32) {
        self.source()
    }
}

impl sealed::Sealed for crate::TcpListener {
    fn tcp_source(&self) -> (&Arc<TcpStack>, u32) {
        self.source()
    }
}

#[derive(Clone, Copy, Debug)]
struct Registration {
    key: u64,
    token: usize,
    interest: Interest,
}

#[derive(Default)]
struct State {
    /// The stack of the sources: a poller watches the sockets of one attachment.
    stack: Option<Arc<TcpStack>>,
    /// By socket handle.
    regs: HashMap<u32, Registration>,
}

/// Watches many TCP sockets of one attachment ([`crate::TcpStack`]) for readiness.
///
/// All methods take `&self`: a poller may be shared between threads (each `poll` reports
/// every ready socket). A socket dropped while registered is forgotten on the next poll;
/// deregistering first is tidier.
#[derive(Default)]
pub struct Poller {
    state: Mutex<State>,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field("registered", &lock(&self.state).regs.len())
            .finish_non_exhaustive()
    }
}

impl Poller {
    /// A poller watching nothing yet.
    pub fn new() -> Poller {
        Poller::default()
    }

    /// The stack and handle of `source`, checked against the stack of earlier ones.
    fn source<'a>(&self, source: &'a impl Source) -> io::Result<(&'a Arc<TcpStack>, u32)> {
        let (stack, socket) = source.tcp_source();
        let st = lock(&self.state);
        match &st.stack {
            Some(s) if !Arc::ptr_eq(s, stack) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a poller watches the sockets of one keepnet attachment; this socket is \
                 another's",
            )),
            _ => Ok((stack, socket)),
        }
    }

    /// Starts watching `source` for `interest`; its events carry `token`.
    ///
    /// # Errors
    /// `AlreadyExists` if it is registered already (use [`Poller::reregister`]);
    /// `InvalidInput` if it belongs to another attachment than the sources before it.
    pub fn register(
        &self,
        source: &impl Source,
        token: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.set(source, token, interest, false)
    }

    /// Changes the token and interest of a registered `source`.
    ///
    /// # Errors
    /// `NotFound` if it is not registered.
    pub fn reregister(
        &self,
        source: &impl Source,
        token: usize,
        interest: Interest,
    ) -> io::Result<()> {
        self.set(source, token, interest, true)
    }

    fn set(
        &self,
        source: &impl Source,
        token: usize,
        interest: Interest,
        re: bool,
    ) -> io::Result<()> {
        let (stack, socket) = self.source(source)?;
        let key = stack.key(socket)?;
        let mut st = lock(&self.state);
        let known = st.regs.get(&socket).is_some_and(|r| r.key == key);
        match (known, re) {
            (true, false) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "this socket is registered already (use reregister)",
                ))
            }
            (false, true) => return Err(not_registered()),
            _ => {}
        }
        st.stack.get_or_insert_with(|| Arc::clone(stack));
        st.regs.insert(
            socket,
            Registration {
                key,
                token,
                interest,
            },
        );
        Ok(())
    }

    /// Stops watching `source`.
    ///
    /// # Errors
    /// `NotFound` if it is not registered.
    pub fn deregister(&self, source: &impl Source) -> io::Result<()> {
        let (_, socket) = self.source(source)?;
        lock(&self.state)
            .regs
            .remove(&socket)
            .map(|_| ())
            .ok_or_else(not_registered)
    }

    /// How many sources are registered.
    pub fn len(&self) -> usize {
        lock(&self.state).regs.len()
    }

    /// True when no source is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until at least one registered socket is ready, or `timeout` passes (None: no
    /// limit; `Some(Duration::ZERO)`: just look), and fills `events` (cleared first) with
    /// every ready one. Returns how many.
    ///
    /// # Errors
    /// `InvalidInput` when nothing was ever registered and there is no timeout (the wait
    /// could never end); `ConnectionAborted` when the tcp server is down for good (the
    /// supervisor said so; a blocked poll returns it too); what the attachment fails with
    /// (an inconsistent region).
    pub fn poll(&self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<usize> {
        events.clear();
        let Some(stack) = lock(&self.state).stack.clone() else {
            return match timeout {
                Some(t) => {
                    std::thread::sleep(t);
                    Ok(0)
                }
                None => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "nothing is registered with this poller: a poll without a timeout would \
                     wait for ever",
                )),
            };
        };
        let wait = match timeout {
            Some(t) if t.is_zero() => Wait::Now,
            t => Wait::new(false, t),
        };
        let found = stack.wait_ready(wait, |g| {
            let mut st = lock(&self.state);
            let mut stale = Vec::new();
            for (&socket, reg) in &st.regs {
                let Some(r) = TcpStack::ready(g, socket, reg.key) else {
                    stale.push(socket);
                    continue;
                };
                let readable = r.readable && reg.interest.is_readable();
                let writable = r.writable && reg.interest.is_writable();
                if readable || writable || r.error || r.dead {
                    events.push(Event {
                        token: reg.token,
                        readable,
                        writable,
                        error: r.error,
                        hup: r.hup,
                    });
                }
            }
            for socket in stale {
                st.regs.remove(&socket);
            }
            (!events.is_empty()).then_some(Ok(events.len()))
        })?;
        Ok(found.unwrap_or(0))
    }
}

fn not_registered() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "this socket is not registered with this poller",
    )
}
