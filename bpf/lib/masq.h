/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress masquerading of pod traffic (masquerade: bpf). ICMP errors about
 * masqueraded flows are translated back by icmp.h, as for service flows.
 *
 * The decision mirrors ferry_model::egress: a new connection from one of this
 * node's pods to a destination outside every exempt range leaves with the
 * SNAT address of its egress device. The flow is tracked like a service flow
 * (ct.h), so replies are translated on ingress by the same lookup.
 */
#ifndef FERRY_MASQ_H
#define FERRY_MASQ_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "ct.h"
#include "nat.h"
#include "lb.h"
#include "fwd.h"

#define ICMP_ECHO_REQUEST_ 8
#define ICMPV6_ECHO_REQUEST_ 128

/* Egress of an uplink: masquerades a new pod connection if the rules say so. */
static __always_inline int masquerade(struct __sk_buff *skb, struct pkt *p, const struct config *cfg, __u64 now)
{
	if (!(cfg->flags & CFG_MASQ_BPF))
		return TC_ACT_OK;
	if (p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6) {
		if (p->icmp_type != (p->proto == PROTO_ICMP ? ICMP_ECHO_REQUEST_ : ICMPV6_ECHO_REQUEST_))
			return TC_ACT_OK;
	} else if (p->proto == IPPROTO_TCP) {
		/* Only a SYN starts a flow; a mid-stream packet without state was never masqueraded. */
		if ((p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return TC_ACT_OK;
	} else if (p->proto != IPPROTO_UDP) {
		return TC_ACT_OK;
	}
	if (!lb_in_range(RANGE_MASQ_SOURCE, p->family, p->src) || lb_in_range(RANGE_NO_MASQ, p->family, p->dst))
		return TC_ACT_OK;

	__u32 nsrc[4], dst[4];
	fwd_snat_address(cfg, skb->ifindex, p->family, nsrc);
	if (addr_is_zero(nsrc)) {
		stat_inc(STAT_GIVEUP_MASQ_NO_ADDR);
		return TC_ACT_OK;
	}
	__builtin_memcpy(dst, p->dst, 16);
	__u32 why = STAT_DROP_CT_INSERT;
	__be16 nsport = ct_create(p, cfg, nsrc, p->sport, dst, p->dport, 1, 0, 0, now, &why);
	if (!nsport)
		return drop_packet(why);
	if (nat_rewrite(skb, p, nsrc, nsport, dst, p->dport) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_MASQ_NEW_FLOW);
	return TC_ACT_OK;
}

#endif
