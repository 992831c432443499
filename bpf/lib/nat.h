/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Rewriting addresses and ports in place, with checksum fix-ups.
 *
 * IPv4: the header checksum and the L4 pseudo-header part change with the
 * addresses. IPv6: no header checksum; the L4 checksum covers the addresses
 * through the pseudo-header. UDP over IPv4 may carry a zero checksum, which
 * must stay zero. SCTP's CRC32c covers ports but not addresses, so an address
 * change needs nothing and a port change corrects the CRC (sctp.h).
 */
#ifndef FERRY_NAT_H
#define FERRY_NAT_H

#include "common.h"
#include "packet.h"
#include "sctp.h"

#define IP4_CSUM_OFF 10
#define IP4_SADDR_OFF 12
#define IP4_DADDR_OFF 16
#define IP6_SADDR_OFF 8
#define IP6_DADDR_OFF 24

static __always_inline __u64 l4_csum_flags(const struct pkt *p)
{
	__u64 f = 0;
	if (p->proto == IPPROTO_UDP)
		f |= BPF_F_MARK_MANGLED_0;
	return f;
}

/* Replaces the source (`which` = 0) or destination (1) address. */
static __always_inline int nat_addr(struct __sk_buff *skb, const struct pkt *p, int which, const __u32 *from,
				    const __u32 *to)
{
	__u32 csum_off = l4_csum_off(p);
	/* ICMPv4 has no pseudo-header; ICMPv6 does. */
	int pseudo = p->proto != PROTO_ICMP;

	if (p->family == FAM_V4) {
		__u32 off = p->l3_off + (which ? IP4_DADDR_OFF : IP4_SADDR_OFF);
		if (from[0] == to[0])
			return 0;
		if (csum_off && pseudo &&
		    bpf_l4_csum_replace(skb, p->l4_off + csum_off, from[0], to[0],
					BPF_F_PSEUDO_HDR | sizeof(__u32) | l4_csum_flags(p)) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, from[0], to[0], sizeof(__u32)) < 0)
			return -1;
		return bpf_skb_store_bytes(skb, off, &to[0], sizeof(__u32), 0);
	}
	__u32 off = p->l3_off + (which ? IP6_DADDR_OFF : IP6_SADDR_OFF);
	if (addr_eq(from, to))
		return 0;
	if (csum_off && pseudo) {
		__s64 diff = bpf_csum_diff((__be32 *)from, 16, (__be32 *)to, 16, 0);
		if (bpf_l4_csum_replace(skb, p->l4_off + csum_off, 0, diff, BPF_F_PSEUDO_HDR | l4_csum_flags(p)) < 0)
			return -1;
	}
	return bpf_skb_store_bytes(skb, off, to, 16, 0);
}

/* Replaces the source (`which` = 0) or destination (1) port; for ICMP echo the identifier. */
static __always_inline int nat_port(struct __sk_buff *skb, const struct pkt *p, int which, __be16 from, __be16 to)
{
	__u32 csum_off = l4_csum_off(p);
	__u32 off;

	if (from == to)
		return 0;
	if (p->proto == IPPROTO_SCTP)
		return sctp_nat_port(skb, p, which ? 2 : 0, from, to);
	if (p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6)
		off = p->l4_off + 4;
	else
		off = p->l4_off + (which ? 2 : 0);
	if (csum_off && bpf_l4_csum_replace(skb, p->l4_off + csum_off, from, to, sizeof(__u16) | l4_csum_flags(p)) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0);
}

/* Rewrites the packet's tuple to (src:sport -> dst:dport). */
static __always_inline int nat_rewrite(struct __sk_buff *skb, struct pkt *p, const __u32 *src, __be16 sport,
				       const __u32 *dst, __be16 dport)
{
	if (nat_addr(skb, p, 0, p->src, src) < 0 || nat_addr(skb, p, 1, p->dst, dst) < 0)
		return -1;
	if (p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6) {
		if (nat_port(skb, p, 0, p->sport, sport) < 0)
			return -1;
	} else if (nat_port(skb, p, 0, p->sport, sport) < 0 || nat_port(skb, p, 1, p->dport, dport) < 0) {
		return -1;
	}
	__builtin_memcpy(p->src, src, 16);
	__builtin_memcpy(p->dst, dst, 16);
	p->sport = sport;
	p->dport = dport;
	return 0;
}

#endif
