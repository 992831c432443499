/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Datapath counters: one per decision and per drop reason, per CPU.
 * `ferry status` and /metrics read them by name; crates/ferry-bpf/src/stats.rs
 * lists the same names in the same order (a unit test keeps them in sync).
 */
#ifndef FERRY_STATS_H
#define FERRY_STATS_H

#include "common.h"

enum ferry_stat {
	STAT_SOCK_XLATE = 0,      /* socket connected/sent straight to a backend */
	STAT_SOCK_REJECT,         /* socket refused: no usable endpoint / unknown ClusterIP port */
	STAT_SOCK_REV,            /* reply source / peer name turned back into the frontend */
	STAT_SOCK_SKIP_MASQ,      /* left to the packet path: this source must be masqueraded */
	STAT_SOCK_SKIP_DROP,      /* left to the packet path: the route drops */
	STAT_SOCK_SKIP_FIREWALL,  /* left to the packet path: source ranges need the real source */
	STAT_SOCK_SKIP_HAIRPIN,   /* left to the packet path: the backend is the client itself */
	STAT_SOCK_NO_BACKEND,     /* a backend slot vanished under an update (retried next time) */
	STAT_AFFINITY_HIT,        /* session affinity kept the previous backend */
	STAT_PKT_NEW_FLOW,        /* packet path: a new flow was load-balanced */
	STAT_PKT_FORWARD,         /* packet path: a tracked flow was translated (either direction) */
	STAT_PKT_REJECT,          /* packet path: ICMP unreachable sent back (no usable endpoint) */
	STAT_DROP_NO_ENDPOINT,    /* dropped: traffic policy Local and no endpoint on this node */
	STAT_DROP_FIREWALL,       /* dropped: source outside loadBalancerSourceRanges */
	STAT_DROP_SERVICE_CIDR,   /* dropped: unallocated address inside the service CIDR */
	STAT_DROP_NAT_EXHAUSTED,  /* dropped: no free SNAT source port after all retries */
	STAT_DROP_CT_CLASH,       /* dropped: the backend-side tuple is already tracked for another flow */
	STAT_DROP_NO_ROUTE,       /* dropped: no route (FIB) to the chosen backend */
	STAT_DROP_UNSUPPORTED,    /* dropped: a translation this datapath cannot do (an SCTP port change on a fragment, with no defrag loop) */
	STAT_NAT_RETRY,           /* SNAT source-port collisions resolved by retrying */
	STAT_MASQ_NEW_FLOW,       /* pod egress: a new flow masqueraded to the node */
	STAT_ICMP_ERROR_REV,      /* an ICMP error about a translated flow was translated back */
	/* Drops and give-ups that had no counter before (issue 15); kept together for merges. */
	STAT_DROP_REWRITE,        /* dropped: a helper failed while rewriting addresses, ports or checksums */
	STAT_DROP_TTL_EXCEEDED,   /* dropped: TTL / hop limit ran out while forwarding */
	STAT_DROP_CT_INSERT,      /* dropped: the original-direction conntrack entry could not be written */
	STAT_DROP_REJECT_FAILED,  /* dropped: the ICMP error of a REJECT could not be built (IP options, helper error) */
	STAT_GIVEUP_NO_SERVICE,   /* passed on untranslated: a frontend without its service entry (mid-update) */
	STAT_GIVEUP_FAMILY,       /* passed on untranslated: the picked backend is of the other family (socket path) */
	STAT_GIVEUP_MASQ_NO_ADDR, /* pod egress left unmasqueraded: no SNAT address for the device and family */
	/* Fragments, IPv6 extension headers, SCTP CRC (issue 16). */
	STAT_FRAG_FIRST,          /* packet path: a first fragment, its verdict kept for the rest of the datagram */
	STAT_FRAG_FORWARD,        /* packet path: a later fragment translated as its first fragment was */
	STAT_FRAG_MISS,           /* a later fragment whose first fragment is not tracked (lost entry, out of order) and no defrag loop to send it to: passed untranslated */
	STAT_DROP_FRAG,           /* dropped: a later fragment of a datagram whose first fragment was dropped */
	STAT_IPV6_EXT_LIMIT,      /* IPv6 with more extension headers than the parser walks: passed to the stack untranslated */
	STAT_SCTP_CSUM_FIX,       /* SCTP port translated with its CRC32c corrected */
	/* Table pressure (issue 13). */
	STAT_CT_LOST,             /* packet path: a TCP packet without SYN to a frontend found no conntrack entry (evicted, expired or purged) and was load-balanced anew */
	/* Table pressure: what went into and out of the LRU maps, so that evictions
	 * (which an LRU makes silently) are inserts - deletes - entries left. */
	STAT_CT_NEW_INSERT,       /* entries written into ferry_ct_new (unconfirmed flows; two per flow) */
	STAT_CT_NEW_DELETE,       /* entries the datapath removed from ferry_ct_new (confirmed, expired, forgotten) */
	STAT_CT_NEW_AGENT_DELETE, /* entries the agent removed from ferry_ct_new (expired, stale UDP); written by the agent */
	STAT_CT_CONFIRM,          /* flows moved from ferry_ct_new to ferry_ct (handshake done / first reply) */
	STAT_CT_CONFIRM_FULL,     /* confirmations ferry_ct refused (full): the flow stays in ferry_ct_new, unprotected */
	STAT_CT_EARLY_DROP,       /* unconfirmed flows removed to free their SNAT port for a new flow (every port was held) */
	STAT_SOCK_REV_INSERT,     /* entries written into ferry_sock_rev (a socket's first translation to a backend) */
	STAT_SOCK_REV_DELETE,     /* entries removed from ferry_sock_rev when their connected socket closed */
	STAT_SOCK_REV_INSERT_FAIL, /* a reverse translation that could not be written: replies show the backend address */
	STAT_AFFINITY_INSERT,     /* entries written into ferry_affinity (a client's first pick of a service) */
	STAT_AFFINITY_INSERT_FAIL, /* a ClientIP affinity that could not be remembered (the next pick is random) */
	/* The pass-through fast path (issue 15). */
	STAT_DROP_PEERS_FULL,     /* dropped: a new flow's backend could not be written into ferry_peers (full), so its replies could not be found */
	/* The defrag loop (issue 16, loop.h). */
	STAT_FRAG_LOOP,           /* a fragment sent into the defrag loop (overtook its first fragment, or fragmented SCTP whose length is unknown) */
	STAT_LOOP_RETURN,         /* a fragment back from the defrag loop, in order, handed to the ingress of its source's device */
	STAT_LOOP_SCTP_LEN,       /* the defrag loop noted a reassembled SCTP packet's length (for its CRC32c correction) */
	/* Direct Server Return (issue 14, dsr.h). */
	STAT_DSR_NEW_FLOW,        /* an outside connection to a remote backend tunnelled to the backend's node (DSR) */
	STAT_DSR_ENCAP,           /* packets tunnelled (IPIP, IPv6 in IPv6) to a backend's node, first ones included */
	STAT_DSR_DECAP,           /* tunnelled packets taken out of their outer header on the backend's node */
	STAT_DSR_NO_TUNNEL,       /* a DSR candidate whose backend's node is unknown (no ferry_tunnels entry): SNAT instead */
	STAT_DROP_DSR_TOO_BIG,    /* dropped: a DSR packet that would not fit the egress MTU with the outer header (20 bytes, IPv6 40) and could not be answered */
	STAT_DSR_MSS_CLAMP,       /* SYN-ACKs to a client whose address was kept whose MSS was lowered to fit a DSR tunnel (MTU - 60, IPv6 MTU - 100) */
	STAT_DSR_ENDPOINT_FALLBACK, /* a tunnelled new flow whose carried endpoint (outer IPv4 Identification, IPv6 flow label) names no unique local endpoint of its service: chosen among them here */
	STAT_DSR_FRAG_NEEDED,     /* a DSR packet too big for the tunnel, sent with DF: answered with ICMP "fragmentation needed" (MTU - 20) so its sender makes the next ones fit */
	/* XDP acceleration (issue 14, xdp.h): what the XDP program did with a
	 * packet sent to an address ferry serves. Drops are never made at XDP:
	 * what would drop is passed to tc, which drops and counts it. */
	STAT_XDP_NEW_FLOW,        /* XDP: a new flow load-balanced and sent on (DNAT, SNAT or DSR) before tc */
	STAT_XDP_FORWARD,         /* XDP: a packet of a tracked flow translated and sent on (either direction) */
	STAT_XDP_DSR_ENCAP,       /* XDP: packets tunnelled (IPIP) to a backend's node, first ones included */
	STAT_XDP_PASS_SHAPE,      /* XDP: passed to tc for its shape: fragment, IPv4 options, IPv6 extension header, ICMP, SCTP, a tunnel, other protocols */
	STAT_XDP_PASS_TC,         /* XDP: passed to tc for its verdict: local or hairpin backend, reject/drop/policy/source-range verdicts, ClusterIP, lost or reopened flows, SYN-ACK MSS clamp, a table that refused an entry */
	STAT_XDP_PASS_FIB,        /* XDP: passed to tc: no forwarding result (no route, unresolved neighbour, too big for the MTU, local, or out of another device than the way in) */
	/* Upgrades and downgrades across map layouts (ct.h). */
	STAT_CT_ADOPTED,          /* an upgrade's link switch: a flow the outgoing programs created in the retired conntrack table, found there by the incoming ones and moved into ferry_ct_new */
	STAT_CT_MIRRORED,         /* a downgrade's link switch: a new flow also written into the older layout's rebuilt conntrack table */
	STAT_CT_STRANDED,         /* entries the agent removed because their flow's other entry belongs to another flow (left by a copy across layouts); written by the agent */
	STAT_CT_ORPHAN_SYN,       /* a SYN met an open flow whose reply entry is gone (evicted, or left behind by a copy across layouts): the flow is opened anew instead of followed */
	STAT_CT_REOPENED,         /* while the links switch: this side's closing copy of a flow gave way to the other build's table, which holds it open with another translation (ct_reopened) */
	/* IPv6 Direct Server Return (issue 14, dsr.h). */
	STAT_DSR_PKT_TOO_BIG,     /* an IPv6 DSR packet too big for the tunnel: answered with ICMPv6 "packet too big" (MTU - 40) so its sender makes the next ones fit */
	STAT_COUNT_,
};

/* Room for the counters; 128 since layout 5 (64 before: layout 5 exists
 * because the counters outgrew it). A pinned map keeps its capacity, so a
 * change here is a layout change of ferry_stats (crates/ferry-bpf/src/layout.rs). */
#define STAT_SLOTS 128
_Static_assert(STAT_COUNT_ <= STAT_SLOTS, "more counters than ferry_stats has slots: raise STAT_SLOTS (a layout change)");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	PIN_BY_NAME;
} ferry_stats SEC(".maps");

static __always_inline void stat_inc(__u32 id)
{
	__u64 *v = bpf_map_lookup_elem(&ferry_stats, &id);
	if (v)
		*v += 1;
}

/* Counts why and drops: the only way a tc program drops a packet (a test in
 * crates/ferry-bpf/tests/drops.rs greps bpf/ for any other TC_ACT_SHOT). */
static __always_inline int drop_packet(__u32 reason)
{
	stat_inc(reason);
	return TC_ACT_SHOT;
}

#endif
