/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * REJECT on the packet path: the packet is turned, in place, into an ICMP
 * (ICMPv6) port-unreachable error quoting it, and sent back out of the device
 * it came in on. The client's stack matches the quoted header to its socket
 * and fails the connection at once (ECONNREFUSED), as with kube-proxy's reject.
 */
#ifndef FERRY_ICMP_H
#define FERRY_ICMP_H

#include "common.h"
#include "packet.h"

#define ICMP_DEST_UNREACH_ 3
#define ICMP_PORT_UNREACH_ 3
#define ICMPV6_DEST_UNREACH_ 1
#define ICMPV6_PORT_UNREACH_ 4
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

static __always_inline int reject4(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 quote[QUOTE4];
	struct iphdr ip = {};
	__u8 icmp[8] = { ICMP_DEST_UNREACH_, ICMP_PORT_UNREACH_ };
	__u32 ip_off = ETH_HLEN_, icmp_off = ETH_HLEN_ + 20;

	if (p->l4_off != ETH_HLEN_ + 20) /* IP options: let the stack deal with it */
		return TC_ACT_SHOT;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, quote, sizeof(quote)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + 20 + 8 + QUOTE4, 0) < 0)
		return TC_ACT_SHOT;

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
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

static __always_inline int reject6(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 quote[QUOTE6];
	struct ipv6hdr ip6 = {};
	__u8 icmp[8] = { ICMPV6_DEST_UNREACH_, ICMPV6_PORT_UNREACH_ };
	__u32 icmp_off = ETH_HLEN_ + IP6_HLEN;
	struct {
		__u32 src[4];
		__u32 dst[4];
		__be32 len;
		__be32 next;
	} pseudo = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, quote, sizeof(quote)) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + IP6_HLEN + 8 + QUOTE6, 0) < 0)
		return TC_ACT_SHOT;

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
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* Answers the packet with port unreachable and consumes it. */
static __always_inline int reject(struct __sk_buff *skb, const struct pkt *p)
{
	stat_inc(STAT_PKT_REJECT);
	return p->family == FAM_V4 ? reject4(skb, p) : reject6(skb, p);
}

#endif
