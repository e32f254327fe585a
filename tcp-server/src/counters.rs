//! The tcp server's counters, mirrored into its control block (`keepnet status`). Every
//! drop has a counter named by its reason (`drop.*`).

keepnet_server::counter_set! {
    /// True for the reasons a received segment can be dropped for.
    is_rx_drop;
    RxSegments => "rx.segments", false;
    RxBytes => "rx.bytes", false;
    TxSegments => "tx.segments", false;
    TxBytes => "tx.bytes", false;
    TxRst => "tx.rst", false;
    RxRst => "rx.rst", false;
    SynAcks => "listen.synacks", false;
    Cookies => "listen.cookies_sent", false;
    CookiesOk => "listen.cookies_ok", false;
    Accepted => "conn.accepted", false;
    Connected => "conn.connected", false;
    Closed => "conn.closed", false;
    Resets => "conn.reset", false;
    TimedOut => "conn.timed_out", false;
    Retransmits => "tx.retransmits", false;
    ChallengeAcks => "rx.challenge_acks", false;
    DeliveredBytes => "app.rx_bytes", false;
    AcceptedBytes => "app.tx_bytes", false;
    IcmpIn => "icmp.errors_in", false;
    DropShort => "drop.short", true;
    DropDataOffset => "drop.data_offset", true;
    DropChecksum => "drop.checksum", true;
    DropIllegalFlags => "drop.illegal_flags", true;
    DropBadOption => "drop.bad_option", true;
    DropNoSocket => "drop.no_socket", true;
    DropUnacceptable => "drop.unacceptable", true;
    DropSynQueue => "drop.syn_queue_full", true;
    DropAcceptQueue => "drop.accept_queue_full", true;
    DropNoConns => "drop.no_conn_slot", true;
    DropBadSlot => "drop.bad_slot", true;
    DropDescBad => "drop.desc_bad", true;
    DropSendFull => "drop.send_full", false;
    DropAppBad => "drop.app_bad", false;
    DropNoApp => "drop.no_app", false;
    HotplugBad => "hotplug.bad", false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepnet_server::control::{COUNTERS, COUNTER_NAME};

    #[test]
    fn names_are_unique_short_and_fit_the_control_block() {
        let mut seen = std::collections::HashSet::new();
        for c in Ctr::ALL {
            assert!(c.name().len() < COUNTER_NAME, "{}", c.name());
            assert!(seen.insert(c.name()), "{} twice", c.name());
        }
        // Plus the two gauges the server keeps (apps, conns, listeners).
        assert!(Ctr::ALL.len() + 3 <= COUNTERS);
    }
}
