/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Sending a translated packet on: a FIB lookup finds the egress device, the
 * neighbour subsystem fills in the MAC addresses (bpf_redirect_neigh). The
 * packet skips the host's netfilter and routing, which would otherwise see a
 * packet arriving with the node's own address as source (after SNAT) and
 * drop it as martian.
 */
#ifndef FERRY_FWD_H
#define FERRY_FWD_H

#include "common.h"
#include "packet.h"
#include "maps.h"
#include "stats.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* The FIB lookup of a packet like p sent to dst, entering by ifindex (tc
 * and XDP alike). */
static __always_inline void fwd_fib_query(struct bpf_fib_lookup *fib, const struct pkt *p, const __u32 *dst,
					  __u32 ifindex)
{
	fib->family = p->family == FAM_V4 ? AF_INET : AF_INET6;
	fib->l4_protocol = p->proto;
	fib->ifindex = ifindex;
	if (p->family == FAM_V4) {
		fib->ipv4_src = p->src[0];
		fib->ipv4_dst = dst[0];
	} else {
		__builtin_memcpy(fib->ipv6_src, p->src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
	}
}

/* Egress device for p's destination. 0: no route. Sets *local when the
 * destination is an address of this node (deliver up the stack instead). */
static __always_inline __u32 fwd_egress(struct __sk_buff *skb, const struct pkt *p, const __u32 *dst, int *local)
{
	struct bpf_fib_lookup fib = {};
	long rc;

	*local = 0;
	fwd_fib_query(&fib, p, dst, skb->ingress_ifindex ? skb->ingress_ifindex : skb->ifindex);
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return fib.ifindex;
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED) {
		*local = 1;
		return skb->ifindex;
	}
	return 0;
}

/* The SNAT address for traffic leaving through `ifindex`: the device's own,
 * else the node's primary address of the family. */
static __always_inline void fwd_snat_address(const struct config *cfg, __u32 ifindex, __u8 family, __u32 *out)
{
	struct device *d = bpf_map_lookup_elem(&ferry_devices, &ifindex);
	__u8 f = family == FAM_V4 ? FAM_V4 : FAM_V6;

	if (d && !addr_is_zero(d->snat[f]))
		__builtin_memcpy(out, d->snat[f], 16);
	else
		__builtin_memcpy(out, cfg->primary[f], 16);
}

/* Decrements TTL / hop limit, as a router must. Returns 1 when it runs out,
 * -1 when a helper failed. */
static __always_inline int fwd_ttl(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 ttl;

	if (p->family == FAM_V4) {
		__u16 old_word, new_word;
		if (bpf_skb_load_bytes(skb, p->l3_off + 8, &old_word, 2) < 0)
			return -1;
		ttl = ((__u8 *)&old_word)[0];
		if (ttl <= 1)
			return 1;
		new_word = old_word;
		((__u8 *)&new_word)[0] = ttl - 1;
		if (bpf_l3_csum_replace(skb, p->l3_off + 10, old_word, new_word, 2) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, p->l3_off + 8, &new_word, 2, 0);
	}
	if (bpf_skb_load_bytes(skb, p->l3_off + 7, &ttl, 1) < 0)
		return -1;
	if (ttl <= 1)
		return 1;
	ttl--;
	return bpf_skb_store_bytes(skb, p->l3_off + 7, &ttl, 1, 0);
}

/* Sends the (already rewritten) packet out of `ifindex`. */
static __always_inline int fwd_redirect(struct __sk_buff *skb, const struct pkt *p, __u32 ifindex)
{
	int rc = fwd_ttl(skb, p);

	if (rc > 0)
		return drop_packet(STAT_DROP_TTL_EXCEEDED);
	if (rc < 0)
		return drop_packet(STAT_DROP_REWRITE);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

#endif
