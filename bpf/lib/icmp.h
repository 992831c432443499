/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * ICMP errors on the packet path, both ways:
 *
 * - REJECT: the packet is turned, in place, into an ICMP (ICMPv6)
 *   port-unreachable error quoting it, and sent back out of the device it
 *   came in on. The client's stack matches the quoted header to its socket
 *   and fails the connection at once (ECONNREFUSED), as with kube-proxy's
 *   reject.
 * - An error about a translated flow (from the backend or a router on the
 *   way) is translated back, quoted header included, so the client's stack
 *   finds the connection it belongs to.
 */
#ifndef FERRY_ICMP_H
#define FERRY_ICMP_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "nat.h"
#include "ct.h"
#include "stats.h"

#define ICMP_DEST_UNREACH_ 3
#define ICMP_PORT_UNREACH_ 3
#define ICMP_FRAG_NEEDED_ 4
#define ICMPV6_DEST_UNREACH_ 1
#define ICMPV6_PORT_UNREACH_ 4
#define ICMPV6_PKT_TOOBIG_ 2
/* What an ICMPv4 error quotes: the IP header (options-free) and 8 bytes. */
#define QUOTE4 28
/* ICMPv6 quotes as much as fits; ferry quotes the header and 8 bytes too. */
#define QUOTE6 48

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline int swap_macs(struct __sk_buff *skb)
{
	__u8 macs[12], swapped[12];

	if (bpf_skb_load_bytes(skb, 0, macs, 12) < 0)
		return -1;
	__builtin_memcpy(swapped, macs + 6, 6);
	__builtin_memcpy(swapped + 6, macs, 6);
	return bpf_skb_store_bytes(skb, 0, swapped, 12, 0);
}

/* Turns an options-free IPv4 packet, in place, into the ICMP error
 * type/code quoting it, from its destination back to its source; `mtu` is
 * the next-hop MTU of "fragmentation needed" (0 otherwise). */
static __always_inline int icmp4_answer(struct __sk_buff *skb, const struct pkt *p, __u8 type, __u8 code, __u16 mtu)
{
	__u8 quote[QUOTE4];
	struct iphdr ip = {};
	__u8 icmp[8] = { type, code, 0, 0, 0, 0, mtu >> 8, mtu & 0xff };
	__u32 ip_off = ETH_HLEN_, icmp_off = ETH_HLEN_ + 20;

	if (p->l4_off != ETH_HLEN_ + 20) /* IP options: not quoted by ferry */
		return -1;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, quote, sizeof(quote)) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + 20 + 8 + QUOTE4, 0) < 0)
		return -1;

	*(__u8 *)&ip = 0x45;
	ip.tot_len = bpf_htons(20 + 8 + QUOTE4);
	ip.ttl = 64;
	ip.protocol = PROTO_ICMP;
	ip.saddr = p->dst[0];
	ip.daddr = p->src[0];
	ip.check = csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));

	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)icmp, sizeof(icmp), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), sum);
	__u16 c = csum_fold(sum);
	__builtin_memcpy(icmp + 2, &c, 2);

	if (bpf_skb_store_bytes(skb, ip_off, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, icmp_off, icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, icmp_off + 8, quote, sizeof(quote), 0) < 0 || swap_macs(skb) < 0)
		return -1;
	return 0;
}

static __always_inline int reject4(struct __sk_buff *skb, const struct pkt *p)
{
	return icmp4_answer(skb, p, ICMP_DEST_UNREACH_, ICMP_PORT_UNREACH_, 0);
}

/* Turns an IPv6 packet, in place, into the ICMPv6 error type/code quoting
 * it, from its destination back to its source; `mtu` is the MTU of "packet
 * too big" (0 otherwise: the field is unused). */
static __always_inline int icmp6_answer(struct __sk_buff *skb, const struct pkt *p, __u8 type, __u8 code, __u32 mtu)
{
	__u8 quote[QUOTE6];
	struct ipv6hdr ip6 = {};
	__u8 icmp[8] = { type, code, 0, 0, mtu >> 24, (mtu >> 16) & 0xff, (mtu >> 8) & 0xff, mtu & 0xff };
	__u32 icmp_off = ETH_HLEN_ + IP6_HLEN;
	struct {
		__u32 src[4];
		__u32 dst[4];
		__be32 len;
		__be32 next;
	} pseudo = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, quote, sizeof(quote)) < 0)
		return -1;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + IP6_HLEN + 8 + QUOTE6, 0) < 0)
		return -1;

	*(__u8 *)&ip6 = 0x60;
	ip6.payload_len = bpf_htons(8 + QUOTE6);
	ip6.nexthdr = PROTO_ICMPV6;
	ip6.hop_limit = 64;
	__builtin_memcpy(&ip6.saddr, p->dst, 16);
	__builtin_memcpy(&ip6.daddr, p->src, 16);

	__builtin_memcpy(pseudo.src, p->dst, 16);
	__builtin_memcpy(pseudo.dst, p->src, 16);
	pseudo.len = bpf_htonl(8 + QUOTE6);
	pseudo.next = bpf_htonl(PROTO_ICMPV6);
	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&pseudo, sizeof(pseudo), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)icmp, sizeof(icmp), sum);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)quote, sizeof(quote), sum);
	__u16 c = csum_fold(sum);
	__builtin_memcpy(icmp + 2, &c, 2);

	if (bpf_skb_store_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6), 0) < 0 ||
	    bpf_skb_store_bytes(skb, icmp_off, icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, icmp_off + 8, quote, sizeof(quote), 0) < 0 || swap_macs(skb) < 0)
		return -1;
	return 0;
}

static __always_inline int reject6(struct __sk_buff *skb, const struct pkt *p)
{
	return icmp6_answer(skb, p, ICMPV6_DEST_UNREACH_, ICMPV6_PORT_UNREACH_, 0);
}

/* Answers the packet with port unreachable and consumes it. */
static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p)
{
	if ((p->family == FAM_V4 ? reject4(skb, p) : reject6(skb, p)) < 0)
		return drop_packet(STAT_DROP_REJECT_FAILED);
	stat_inc(STAT_PKT_REJECT);
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int icmp_is_error(const struct pkt *p)
{
	if (p->proto == PROTO_ICMP)
		return p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12;
	if (p->proto == PROTO_ICMPV6)
		return p->icmp_type >= 1 && p->icmp_type <= 4;
	return 0;
}

/* Rewrites `len` bytes (4 or 16; 2 for ports) of the ICMP message at `off`
 * from `from` to `to`, keeping the ICMP checksum right. */
static __always_inline int icmp_rewrite(struct __sk_buff *skb, __u32 csum_off, __u32 off, const void *from,
					const void *to, __u32 len)
{
	__s64 d = bpf_csum_diff((__be32 *)from, len, (__be32 *)to, len, 0);

	if (d < 0 || bpf_l4_csum_replace(skb, csum_off, 0, d, 0) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, to, len, 0);
}

/* An ICMP error quoting a packet of a translated flow, addressed to the
 * translated source: the packet the client sent, seen back. The outer
 * destination and the quoted source go back to the client, the quoted
 * destination back to the frontend the client dialled (and an outer source
 * that is the backend itself becomes the frontend too), every checksum kept
 * valid. Returns 1 when translated (the caller delivers it), 0 when it is
 * not about a tracked flow (nothing was written), -1 when a rewrite failed
 * halfway (the caller drops it). */
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
	 * reply direction is the reverse, which says what both ends really are. */
	struct ct_key k = { .sport = iports[1], .dport = iports[0], .proto = inner_proto, .family = p->family,
			    .dir = CT_REPLY };
	__builtin_memcpy(k.src, idst, 16);
	__builtin_memcpy(k.dst, isrc, 16);
	int in_new;
	struct ct_val *v = ct_lookup(&k, now, &in_new);
	if (!v || !addr_eq(p->dst, isrc))
		return 0;
	__u32 client[4], frontend[4];
	__builtin_memcpy(client, v->new_dst, 16);
	__builtin_memcpy(frontend, v->new_src, 16);
	__be16 client_port = v->new_dport, frontend_port = v->new_sport;
	int outer_src = addr_eq(p->src, idst) && !addr_eq(idst, frontend);
	__u32 csum = p->l4_off + 2;

	if (p->family == FAM_V4) {
		/* Outer header: its own checksum; ICMPv4 has no pseudo-header. */
		if (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, p->dst[0], client[0], 4) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3_off + IP4_DADDR_OFF, &client[0], 4, 0) < 0)
			return -1;
		if (outer_src && (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, p->src[0], frontend[0], 4) < 0 ||
				  bpf_skb_store_bytes(skb, p->l3_off + IP4_SADDR_OFF, &frontend[0], 4, 0) < 0))
			return -1;
		/* Quoted header: addresses and its checksum, each change also in the ICMP checksum. */
		__u16 old_check, new_check;
		if (bpf_skb_load_bytes(skb, inner_off + IP4_CSUM_OFF, &old_check, 2) < 0)
			return -1;
		__s64 d = bpf_csum_diff(&isrc[0], 4, &client[0], 4, ~((__u32)old_check) & 0xffff);
		d = bpf_csum_diff(&idst[0], 4, &frontend[0], 4, d);
		new_check = csum_fold(d);
		if (bpf_l4_csum_replace(skb, csum, old_check, new_check, 2) < 0 ||
		    bpf_skb_store_bytes(skb, inner_off + IP4_CSUM_OFF, &new_check, 2, 0) < 0 ||
		    icmp_rewrite(skb, csum, inner_off + IP4_SADDR_OFF, &isrc[0], &client[0], 4) < 0 ||
		    icmp_rewrite(skb, csum, inner_off + IP4_DADDR_OFF, &idst[0], &frontend[0], 4) < 0)
			return -1;
	} else {
		/* Outer addresses: ICMPv6 covers them through its pseudo-header. */
		__s64 d = bpf_csum_diff(p->dst, 16, client, 16, 0);
		if (bpf_l4_csum_replace(skb, csum, 0, d, BPF_F_PSEUDO_HDR) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3_off + IP6_DADDR_OFF, client, 16, 0) < 0)
			return -1;
		if (outer_src) {
			d = bpf_csum_diff(p->src, 16, frontend, 16, 0);
			if (bpf_l4_csum_replace(skb, csum, 0, d, BPF_F_PSEUDO_HDR) < 0 ||
			    bpf_skb_store_bytes(skb, p->l3_off + IP6_SADDR_OFF, frontend, 16, 0) < 0)
				return -1;
		}
		if (icmp_rewrite(skb, csum, inner_off + IP6_SADDR_OFF, isrc, client, 16) < 0 ||
		    icmp_rewrite(skb, csum, inner_off + IP6_DADDR_OFF, idst, frontend, 16) < 0)
			return -1;
	}
	if (iports[0] != client_port &&
	    (bpf_l4_csum_replace(skb, csum, iports[0], client_port, 2) < 0 ||
	     bpf_skb_store_bytes(skb, inner_l4, &client_port, 2, 0) < 0))
		return -1;
	if (iports[1] != frontend_port &&
	    (bpf_l4_csum_replace(skb, csum, iports[1], frontend_port, 2) < 0 ||
	     bpf_skb_store_bytes(skb, inner_l4 + 2, &frontend_port, 2, 0) < 0))
		return -1;
	if (outer_src)
		__builtin_memcpy(p->src, frontend, 16);
	__builtin_memcpy(p->dst, client, 16);
	stat_inc(STAT_ICMP_ERROR_REV);
	return 1;
}

#endif
