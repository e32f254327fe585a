//! The engine's counters: one enum, one short name each (the names `keepnet status` shows).
//!
//! Every datagram given to [`crate::Engine::receive`] bumps `rx.datagrams` and then ends in
//! `rx.delivered` or in exactly one drop reason ([`Ctr::is_rx_drop`]). The server registers a
//! few counters of its own besides these (see [`crate::server`]).

keepnet_server::counter_set! {
    /// True for the reasons a received datagram can be dropped for.
    is_rx_drop;
    RxDatagrams => "rx.datagrams", false;
    RxDelivered => "rx.delivered", false;
    RxBytes => "rx.bytes", false;
    TxDatagrams => "tx.datagrams", false;
    TxBytes => "tx.bytes", false;
    TxRefused => "tx.refused", false;
    IcmpUnreachSent => "icmp.unreach_sent", false;
    IcmpUnreachSuppressed => "icmp.unreach_suppressed", false;
    IcmpErrorsIn => "icmp.errors_in", false;
    IcmpErrorsReported => "icmp.errors_reported", false;
    IcmpErrorsIgnored => "icmp.errors_ignored", false;
    StateRepaired => "state.repaired", false;
    DropShort => "drop.short", true;
    DropLength => "drop.length", true;
    DropChecksum => "drop.checksum", true;
    DropBadSrc => "drop.bad_src", true;
    DropNoSocket => "drop.no_socket", true;
    DropRcvbufFull => "drop.rcvbuf_full", true;
    DropIcmpMalformed => "drop.icmp_malformed", false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepnet_server::control::{COUNTERS, COUNTER_NAME};

    #[test]
    fn names_are_unique_short_and_fit_the_control_block() {
        let mut names: Vec<&str> = Ctr::ALL.iter().map(|c| c.name()).collect();
        assert!(names.iter().all(|n| n.len() <= COUNTER_NAME));
        names.extend(crate::server::SERVER_COUNTERS);
        let total = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), total, "names are unique");
        assert!(total <= 32, "{total} counters: keep it short");
        assert!(total <= COUNTERS);
        for (i, c) in Ctr::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert!(!c.is_rx_drop() || c.name().starts_with("drop."));
        }
    }
}
