//! The engine's counters: one enum, one name each (the names `keepnet status` shows).
//!
//! Every frame given to [`crate::IpStack::handle_frame`] ends in `rx.handled` or in exactly
//! one per-frame drop reason (see [`Ctr::is_frame_drop`]), which also bumps `rx.dropped`.
//! Other drops count packets or datagrams the engine gave up on later (ARP never resolved,
//! reassembly timed out, no route for something we originate).

keepnet_server::counter_set! {
    /// True for the drop reasons a received frame can end in (each such drop also
    /// bumps `rx.dropped`).
    is_frame_drop;
    RxFrames => "rx.frames", false;
    RxBytes => "rx.bytes", false;
    RxHandled => "rx.handled", false;
    RxDropped => "rx.dropped", false;
    TxFrames => "tx.frames", false;
    TxBytes => "tx.bytes", false;
    ArpRequestsIn => "arp.requests_in", false;
    ArpRepliesIn => "arp.replies_in", false;
    ArpReplies => "arp.replies", false;
    ArpRequests => "arp.requests", false;
    ArpAnnounces => "arp.announces", false;
    IpDelivered => "ip.delivered", false;
    IpSent => "ip.sent", false;
    IpFragsIn => "ip.frags_in", false;
    IpReassembled => "ip.reassembled", false;
    IpFragsOut => "ip.frags_out", false;
    IcmpEchoRequestsIn => "icmp.echo_requests_in", false;
    IcmpEchoReplied => "icmp.echo_replied", false;
    IcmpEchoRepliesIn => "icmp.echo_replies_in", false;
    IcmpEchoRequestsSent => "icmp.echo_requests_sent", false;
    IcmpErrorsIn => "icmp.errors_in", false;
    IcmpErrorsToTransport => "icmp.errors_to_transport", false;
    IcmpErrorsUnmatched => "icmp.errors_unmatched", false;
    IcmpErrorsSent => "icmp.errors_sent", false;
    IcmpEventsLost => "icmp.events_lost", false;
    DropEthShort => "drop.eth_short", true;
    DropEthNotOurs => "drop.eth_not_ours", true;
    DropEthType => "drop.eth_type", true;
    DropArpMalformed => "drop.arp_malformed", true;
    DropArpNotOurs => "drop.arp_not_ours", true;
    DropArpConflict => "drop.arp_conflict", true;
    DropIpv4Short => "drop.ipv4_short", true;
    DropIpv4Version => "drop.ipv4_version", true;
    DropIpv4Ihl => "drop.ipv4_ihl", true;
    DropIpv4Checksum => "drop.ipv4_checksum", true;
    DropIpv4TotalLen => "drop.ipv4_total_len", true;
    DropIpv4NotOurs => "drop.ipv4_not_ours", true;
    DropIpv4Src => "drop.ipv4_src", true;
    DropFragBad => "drop.frag_bad", true;
    DropFragDuplicate => "drop.frag_duplicate", true;
    DropFragOverlap => "drop.frag_overlap", true;
    DropFragLimit => "drop.frag_limit", true;
    DropIcmpShort => "drop.icmp_short", true;
    DropIcmpChecksum => "drop.icmp_checksum", true;
    DropIcmpType => "drop.icmp_type", true;
    DropIcmpBroadcast => "drop.icmp_broadcast", true;
    DropProtoUnreachable => "drop.proto_unreachable", true;
    DropFragTimeout => "drop.frag_timeout", false;
    DropFragEvicted => "drop.frag_evicted", false;
    DropNoRoute => "drop.no_route", false;
    DropArpUnresolved => "drop.arp_unresolved", false;
    DropArpQueueFull => "drop.arp_queue_full", false;
    DropTxTooBig => "drop.tx_too_big", false;
}

#[cfg(test)]
mod tests {
    use super::*;
    use keepnet_server::control::{COUNTERS, COUNTER_NAME};

    #[test]
    fn names_are_unique_and_fit_the_control_block() {
        let mut names: Vec<&str> = Ctr::ALL.iter().map(|c| c.name()).collect();
        assert!(names.iter().all(|n| n.len() <= COUNTER_NAME), "names fit");
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Ctr::ALL.len(), "unique");
        // The server registers its own too (drop.desc_bad, drop.tx_no_buffer, transport.*...).
        let server = crate::server::SERVER_COUNTERS;
        assert!(
            Ctr::ALL.len() + server <= COUNTERS,
            "{} counters",
            Ctr::ALL.len() + server
        );
        for (i, c) in Ctr::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            assert_eq!(
                c.name().starts_with("drop.") && c.is_frame_drop(),
                c.is_frame_drop()
            );
        }
    }
}
