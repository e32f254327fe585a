//! A veth-connected pair of network namespaces, the Linux baseline of the network
//! benchmarks: namespace `a` holds `veth0` at [`VETH_A`], namespace `b` holds `veth1` at
//! [`VETH_B`]. Both namespaces are removed on drop, on every exit path.

use crate::ctl::lab;
use crate::error::{Error, Result};

/// Address of the `a` side (inside 198.18.0.0/15, RFC 2544).
pub const VETH_A: &str = "198.19.0.1";
/// Address of the `b` side.
pub const VETH_B: &str = "198.19.0.2";

/// The two namespaces; removed on drop.
pub struct Veth {
    pub a: String,
    pub b: String,
}

impl Veth {
    /// Creates namespaces `kn-{tag}a-PID` and `kn-{tag}b-PID` joined by a veth pair, with
    /// loopback and both ends up. Whatever was created is removed again if a step fails.
    pub fn new(tag: &str) -> Result<Veth> {
        let pid = std::process::id();
        let a = format!("kn-{tag}a-{pid}");
        let b = format!("kn-{tag}b-{pid}");
        let ip = |args: &[&str]| lab::ip(args).map_err(|e| Error::Peer(e.to_string()));
        ip(&["netns", "add", &a])?;
        // From here on the guard owns what exists, so an early return removes it.
        let v = Veth { a, b };
        ip(&["netns", "add", &v.b])?;
        ip(&[
            "-n", &v.a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
            &v.b,
        ])?;
        ip(&[
            "-n",
            &v.a,
            "addr",
            "add",
            &format!("{VETH_A}/24"),
            "dev",
            "veth0",
        ])?;
        ip(&[
            "-n",
            &v.b,
            "addr",
            "add",
            &format!("{VETH_B}/24"),
            "dev",
            "veth1",
        ])?;
        for (ns, dev) in [(&v.a, "veth0"), (&v.b, "veth1")] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = lab::netns_delete(&self.a);
        let _ = lab::netns_delete(&self.b);
    }
}
