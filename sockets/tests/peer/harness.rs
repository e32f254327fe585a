//! What every stand-in server shares, whatever it serves: the region, the thread that serves
//! it, the lock around the server's state and the bounded waits a test makes on it.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keepnet_ipc::{new_eventfd, Doorbell, EndpointId, Pod, Ring, SpinPolicy};
use keepnet_server::app::AppLink;

/// keepnet's address in these tests.
pub const KN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The app id of the test region.
pub const APP: u32 = 1;
/// Longest any test waits for something to happen.
pub const BOUND: Duration = Duration::from_secs(10);

/// A server's state, as the harness drives it.
pub trait Serve: Send + 'static {
    /// Serves what the app sent (requests, returned buffers); true if it pushed anything
    /// for the app.
    fn serve(&mut self, link: &AppLink) -> bool;
    /// Brings the state up to date before a test looks at it or after it changed it; true if
    /// it pushed anything for the app.
    fn refresh(&mut self, link: &AppLink) -> bool;
}

struct Shared<S> {
    state: Mutex<S>,
    changed: Condvar,
    stop: AtomicBool,
}

/// A stand-in server serving a region in a thread; stops the thread when dropped.
pub struct Harness<S> {
    pub link: AppLink,
    app_bell: Doorbell,
    shared: Arc<Shared<S>>,
    thread: Option<JoinHandle<()>>,
}

/// A fresh region for application [`APP`] talking IP protocol `protocol` to `server`, with
/// `tx` and `rx` buffers, and two handles of the server's eventfd (the app's, the server's).
pub fn region(protocol: u8, server: EndpointId, tx: u32, rx: u32) -> (AppLink, OwnedFd, OwnedFd) {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!("t-sockets-{protocol}-{}", N.fetch_add(1, Ordering::Relaxed));
    let link = AppLink::create(&name, APP, protocol, server, tx, rx).unwrap();
    let efd = new_eventfd().unwrap();
    let server_efd = efd.try_clone().unwrap();
    (link, efd, server_efd)
}

fn lock<S>(m: &Mutex<S>) -> MutexGuard<'_, S> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn nonempty<T: Pod>(r: &Ring<T>) -> bool {
    r.indices().is_ok_and(|(h, t)| h != t)
}

impl<S: Serve> Harness<S> {
    /// Serves `link` with `state` in a thread, parked on the server's doorbell (`efd`).
    pub fn start(link: AppLink, efd: OwnedFd, state: S) -> Harness<S> {
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let app_bell = link.app_bell().unwrap();
        let server_bell = link.server_bell().unwrap().with_eventfd(efd);
        let (requests, rx_return) = (link.requests().unwrap(), link.rx_return().unwrap());
        let (l, s, bell) = (link.clone(), Arc::clone(&shared), app_bell.clone());
        let thread = std::thread::spawn(move || {
            while !s.stop.load(Ordering::Acquire) {
                server_bell.wait_fds(
                    SpinPolicy::PARK_AT_ONCE,
                    Some(Duration::from_millis(5)),
                    || nonempty(&requests) || nonempty(&rx_return),
                    &[],
                );
                let mut st = lock(&s.state);
                if st.serve(&l) {
                    bell.ring();
                }
                drop(st);
                s.changed.notify_all();
            }
        });
        Harness {
            link,
            app_bell,
            shared,
            thread: Some(thread),
        }
    }

    /// Runs `f` on the server's state (brought up to date first), then rings the app for
    /// whatever it pushed.
    pub fn with<R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        let mut st = lock(&self.shared.state);
        st.refresh(&self.link);
        let r = f(&mut st);
        st.refresh(&self.link);
        self.app_bell.ring();
        r
    }

    /// Waits (at most [`BOUND`]) until `cond` holds, then returns `f` of the state.
    #[track_caller]
    pub fn wait_for<R>(&self, mut cond: impl FnMut(&S) -> bool, f: impl FnOnce(&S) -> R) -> R {
        let deadline = Instant::now() + BOUND;
        let mut st = lock(&self.shared.state);
        loop {
            if st.refresh(&self.link) {
                self.app_bell.ring();
            }
            if cond(&st) {
                return f(&st);
            }
            assert!(
                Instant::now() < deadline,
                "the peer never saw what the test waited for"
            );
            st = self
                .shared
                .changed
                .wait_timeout(st, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Times the application parked on its doorbell.
    pub fn app_parks(&self) -> u64 {
        self.app_bell.parks()
    }
}

impl<S> Drop for Harness<S> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
