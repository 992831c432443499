//! Names of the datapath counters in `bpf/lib/stats.h`, in enum order.

/// `enum ferry_stat` in bpf/lib/stats.h, as metric-friendly names.
pub const NAMES: &[&str] = &[
    "sock_xlate",
    "sock_reject",
    "sock_rev",
    "sock_skip_masq",
    "sock_skip_drop",
    "sock_skip_firewall",
    "sock_skip_hairpin",
    "sock_no_backend",
    "affinity_hit",
    "pkt_new_flow",
    "pkt_forward",
    "pkt_reject",
    "drop_no_endpoint",
    "drop_firewall",
    "drop_service_cidr",
    "drop_nat_exhausted",
    "drop_ct_clash",
    "drop_no_route",
    "drop_unsupported",
    "nat_retry",
    "masq_new_flow",
    "icmp_error_rev",
    "drop_rewrite",
    "drop_ttl_exceeded",
    "drop_ct_insert",
    "drop_reject_failed",
    "giveup_no_service",
    "giveup_family",
    "giveup_masq_no_addr",
    "frag_first",
    "frag_forward",
    "frag_miss",
    "drop_frag",
    "ipv6_ext_limit",
    "sctp_csum_fix",
    "ct_lost",
    "ct_new_insert",
    "ct_new_delete",
    "ct_new_agent_delete",
    "ct_confirm",
    "ct_confirm_full",
    "ct_early_drop",
    "sock_rev_insert",
    "sock_rev_delete",
    "sock_rev_insert_fail",
    "affinity_insert",
    "affinity_insert_fail",
    "drop_peers_full",
    "frag_loop",
    "loop_return",
    "loop_sctp_len",
    "dsr_new_flow",
    "dsr_encap",
    "dsr_decap",
    "dsr_no_tunnel",
    "drop_dsr_too_big",
    "dsr_mss_clamp",
    "dsr_endpoint_fallback",
    "dsr_frag_needed",
    "xdp_new_flow",
    "xdp_forward",
    "xdp_dsr_encap",
    "xdp_pass_shape",
    "xdp_pass_tc",
    "xdp_pass_fib",
    "ct_adopted",
    "ct_mirrored",
    "ct_stranded",
    "ct_orphan_syn",
    "ct_reopened",
    "dsr_pkt_too_big",
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_c_enum() {
        let header = include_str!("../../../bpf/lib/stats.h");
        let from_c: Vec<String> = header
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("STAT_") && !l.starts_with("STAT_COUNT_") && !l.starts_with("STAT_SLOTS"))
            .map(|l| l.split([',', ' ', '=']).next().unwrap().trim_start_matches("STAT_").to_lowercase())
            .collect();
        assert_eq!(from_c, super::NAMES);
    }
}
