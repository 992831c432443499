/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Egress masquerading of pod traffic (masquerade: bpf), and translating ICMP
 * errors about translated flows back to the endpoint of the flow.
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
#include "icmp.h"

#define ICMP_ECHO_REQUEST_ 8
#define ICMPV6_ECHO_REQUEST_ 128

static __always_inline void masq_snat_address(const struct config *cfg, __u32 ifindex, __u8 family, __u32 *out)
{
	struct device *d = bpf_map_lookup_elem(&ferry_devices, &ifindex);
	__u8 f = family == FAM_V4 ? FAM_V4 : FAM_V6;

	if (d && !addr_is_zero(d->snat[f]))
		__builtin_memcpy(out, d->snat[f], 16);
	else
		__builtin_memcpy(out, cfg->primary[f], 16);
}

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
	masq_snat_address(cfg, skb->ifindex, p->family, nsrc);
	if (addr_is_zero(nsrc))
		return TC_ACT_OK;
	__builtin_memcpy(dst, p->dst, 16);
	__be16 nsport = ct_create(p, cfg, nsrc, p->sport, dst, p->dport, 1, 0, 0, now);
	if (!nsport)
		return TC_ACT_SHOT;
	if (nat_rewrite(skb, p, nsrc, nsport, dst, p->dport) < 0)
		return TC_ACT_SHOT;
	stat_inc(STAT_MASQ_NEW_FLOW);
	return TC_ACT_OK;
}

static __always_inline int icmp_is_error(const struct pkt *p)
{
	if (p->proto == PROTO_ICMP)
		return p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12;
	if (p->proto == PROTO_ICMPV6)
		return p->icmp_type >= 1 && p->icmp_type <= 4;
	return 0;
}

/* An ICMP error quoting a packet of a translated flow, addressed to the
 * translated source: rewrite the outer destination back to the flow's real
 * endpoint, and the quoted packet back to what that endpoint sent (its own
 * address and port as source, the frontend it dialled as destination), so
 * its stack matches the error to its socket (port unreachable, and path MTU:
 * "fragmentation needed" / "packet too big"). The quoted L4 checksum is left
 * alone, as no receiver checks it. Returns 1 when the packet was translated
 * (the caller then delivers it), 0 when it is not about a tracked flow. */
static __always_inline int icmp_error_rev_nat(struct __sk_buff *skb, struct pkt *p, __u64 now)
{
	__u32 inner_off = p->l4_off + 8;
	__u32 inner_l4;
	__u8 inner_proto;
	__u32 isrc[4] = {}, idst[4] = {};
	__be16 iports[2];

	if (p->family == FAM_V4) {
		__u8 hdr[20];
		if (bpf_skb_load_bytes(skb, inner_off, hdr, sizeof(hdr)) < 0 || (hdr[0] & 0x0f) != 5)
			return 0;
		inner_proto = hdr[9];
		__builtin_memcpy(&isrc[0], hdr + 12, 4);
		__builtin_memcpy(&idst[0], hdr + 16, 4);
		inner_l4 = inner_off + 20;
	} else {
		__u8 hdr[40];
		if (bpf_skb_load_bytes(skb, inner_off, hdr, sizeof(hdr)) < 0)
			return 0;
		inner_proto = hdr[6];
		__builtin_memcpy(isrc, hdr + 8, 16);
		__builtin_memcpy(idst, hdr + 24, 16);
		inner_l4 = inner_off + 40;
	}
	if (!has_ports(inner_proto) || bpf_skb_load_bytes(skb, inner_l4, iports, sizeof(iports)) < 0)
		return 0;
	/* The quoted packet went out as (isrc:sport -> idst:dport); its flow's
	 * reply direction is the reverse, which says what isrc really is. */
	struct ct_key k = { .sport = iports[1], .dport = iports[0], .proto = inner_proto, .family = p->family,
			    .dir = CT_REPLY };
	__builtin_memcpy(k.src, idst, 16);
	__builtin_memcpy(k.dst, isrc, 16);
	struct ct_val *v = ct_lookup(&k, now);
	if (!v || !addr_eq(p->dst, isrc))
		return 0;
	__u32 real[4], fe[4];
	__builtin_memcpy(real, v->new_dst, 16);
	__builtin_memcpy(fe, v->new_src, 16);
	__be16 real_port = v->new_dport, fe_port = v->new_sport;
	__u32 icmp_csum = p->l4_off + 2;

	/* Outer destination (and, for ICMPv6, its pseudo-header share of the checksum). */
	if (p->family == FAM_V4) {
		if (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, p->dst[0], real[0], 4) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3_off + IP4_DADDR_OFF, &real[0], 4, 0) < 0)
			return 0;
		/* Quoted addresses and header checksum change together: the
		 * quoted header still sums to the same value, so the ICMP checksum
		 * only needs the port changes below. */
		__u16 old_check, new_check;
		if (bpf_skb_load_bytes(skb, inner_off + 10, &old_check, 2) < 0)
			return 0;
		__s64 d = bpf_csum_diff(&isrc[0], 4, &real[0], 4, ~((__u32)old_check) & 0xffff);
		d = bpf_csum_diff(&idst[0], 4, &fe[0], 4, d);
		new_check = csum_fold(d);
		if (bpf_skb_store_bytes(skb, inner_off + 10, &new_check, 2, 0) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + 12, &real[0], 4, 0) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + 16, &fe[0], 4, 0) < 0)
			return 0;
	} else {
		__s64 d = bpf_csum_diff(p->dst, 16, real, 16, 0);
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, d, BPF_F_PSEUDO_HDR) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3_off + IP6_DADDR_OFF, real, 16, 0) < 0)
			return 0;
		d = bpf_csum_diff(isrc, 16, real, 16, 0);
		d = bpf_csum_diff(idst, 16, fe, 16, d);
		if (bpf_l4_csum_replace(skb, icmp_csum, 0, d, 0) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + 8, real, 16, 0) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + 24, fe, 16, 0) < 0)
			return 0;
	}
	if (iports[0] != real_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum, iports[0], real_port, 2) < 0 ||
		    bpf_skb_store_bytes(skb, inner_l4, &real_port, 2, 0) < 0)
			return 0;
	}
	if (iports[1] != fe_port) {
		if (bpf_l4_csum_replace(skb, icmp_csum, iports[1], fe_port, 2) < 0 ||
		    bpf_skb_store_bytes(skb, inner_l4 + 2, &fe_port, 2, 0) < 0)
			return 0;
	}
	__builtin_memcpy(p->dst, real, 16);
	stat_inc(STAT_ICMP_ERROR_REV);
	return 1;
}

#endif
