/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reading a packet into the few fields the load balancer decides on.
 * Loads go through bpf_skb_load_bytes, so non-linear skbs (GRO, veth) parse
 * the same as linear ones.
 */
#ifndef FERRY_PACKET_H
#define FERRY_PACKET_H

#include "common.h"
#include "maps.h"
#include "stats.h"

#define ETH_HLEN_ 14
#define IP6_HLEN 40
#define PROTO_ICMP 1
#define PROTO_ICMPV6 58

/* IPv6 extension headers the parser walks, at most IP6_EXT_MAX of them. */
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_DSTOPTS 60
#define IP6_EXT_MAX 4

/* pkt.frag: where the packet stands in a fragmented datagram. */
#define FRAG_NONE 0  /* not fragmented */
#define FRAG_FIRST 1 /* offset 0, more follow: carries the transport header */
#define FRAG_LATER 2 /* no transport header: translated as its first fragment was (frag.h) */

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct pkt {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport; /* ICMP echo: the identifier */
	__be16 dport; /* ICMP echo: the identifier too */
	__u8 proto;
	__u8 family;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u32 l3_off;
	__u32 l4_off; /* FRAG_LATER: where the fragment's data starts */
	__u32 frag_id; /* IPv4 identification (network order, low half) or IPv6 fragment identification */
	__u8 frag;      /* FRAG_* */
	__u8 frag_next; /* the protocol fragments are keyed by: IPv4's, or the IPv6 fragment header's next header */
	__u16 l4_len;   /* a first SCTP fragment back from the defrag loop: the SCTP packet's length (loop.h); else 0 */
};

/* Byte offset of the L4 checksum, or 0 when the protocol has none we maintain. */
static __always_inline __u32 l4_csum_off(const struct pkt *p)
{
	switch (p->proto) {
	case IPPROTO_TCP:
		return 16;
	case IPPROTO_UDP:
		return 6;
	case PROTO_ICMP:
	case PROTO_ICMPV6:
		return 2;
	default:
		return 0;
	}
}

static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

static __always_inline int ip6_is_ext(__u8 nexthdr)
{
	return nexthdr == NH_HOPOPTS || nexthdr == NH_ROUTING || nexthdr == NH_FRAGMENT || nexthdr == NH_DSTOPTS;
}

/* Walks the IPv6 extension headers (hop-by-hop, routing, destination
 * options, fragment) to the transport header: sets proto, l4_off and the
 * fragment fields. Returns 0 when the chain is longer than IP6_EXT_MAX
 * (counted; the kernel stack gets the packet untranslated) or unreadable. */
static __always_inline int parse_ip6_ext(struct __sk_buff *skb, struct pkt *p, __u8 nexthdr)
{
	__u32 off = ETH_HLEN_ + IP6_HLEN;

	for (int i = 0; i < IP6_EXT_MAX && ip6_is_ext(nexthdr); i++) {
		__u8 h[8];
		if (bpf_skb_load_bytes(skb, off, h, sizeof(h)) < 0)
			return 0;
		if (nexthdr == NH_FRAGMENT) {
			__u16 off_m = ((__u16)h[2] << 8) | h[3];
			__builtin_memcpy(&p->frag_id, h + 4, 4);
			p->frag_next = h[0];
			if (off_m & 0xfff8)
				p->frag = FRAG_LATER;
			else if (off_m & 1)
				p->frag = FRAG_FIRST;
			nexthdr = h[0];
			off += 8;
			if (p->frag == FRAG_LATER)
				break; /* what follows is data, not headers */
		} else {
			nexthdr = h[0];
			off += ((__u32)h[1] + 1) * 8;
		}
	}
	if (p->frag != FRAG_LATER && ip6_is_ext(nexthdr)) {
		stat_inc(STAT_IPV6_EXT_LIMIT);
		return 0;
	}
	p->proto = nexthdr;
	p->l4_off = off;
	return 1;
}

/* Parses Ethernet + IPv4/IPv6 (with extension headers) + TCP/UDP/SCTP/ICMP.
 * Fragments after the first parse with no ports (p->frag == FRAG_LATER).
 * Returns 0 when the packet is something the load balancer leaves alone
 * (other protocols, more IPv6 extension headers than IP6_EXT_MAX). */
static __attribute__((noinline)) int parse(struct __sk_buff *skb, struct pkt *p)
{
	__be16 proto;

	if (bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)) < 0)
		return 0;
	__builtin_memset(p, 0, sizeof(*p));
	p->l3_off = ETH_HLEN_;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip, sizeof(ip)) < 0)
			return 0;
		__u8 vihl = *(__u8 *)&ip;
		if ((vihl >> 4) != 4 || (vihl & 0x0f) < 5)
			return 0;
		p->family = FAM_V4;
		p->src[0] = ip.saddr;
		p->dst[0] = ip.daddr;
		p->proto = ip.protocol;
		p->l4_off = ETH_HLEN_ + (vihl & 0x0f) * 4;
		p->frag_id = ip.id;
		p->frag_next = ip.protocol;
		/* Only the first fragment carries ports. */
		if (ip.frag_off & bpf_htons(0x1fff))
			p->frag = FRAG_LATER;
		else if (ip.frag_off & bpf_htons(0x2000))
			p->frag = FRAG_FIRST;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_, &ip6, sizeof(ip6)) < 0)
			return 0;
		p->family = FAM_V6;
		__builtin_memcpy(p->src, &ip6.saddr, 16);
		__builtin_memcpy(p->dst, &ip6.daddr, 16);
		if (!parse_ip6_ext(skb, p, ip6.nexthdr))
			return 0;
	} else {
		return 0;
	}
	if (p->frag == FRAG_LATER)
		return 1;

	switch (p->proto) {
	case IPPROTO_TCP: {
		__u8 hdr[14];
		if (bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
			return 0;
		__builtin_memcpy(&p->sport, hdr, 2);
		__builtin_memcpy(&p->dport, hdr + 2, 2);
		p->tcp_flags = hdr[13];
		return 1;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)) < 0)
			return 0;
		p->sport = ports[0];
		p->dport = ports[1];
		return 1;
	}
	case PROTO_ICMP:
	case PROTO_ICMPV6: {
		__u8 hdr[8];
		if (bpf_skb_load_bytes(skb, p->l4_off, hdr, sizeof(hdr)) < 0)
			return 0;
		p->icmp_type = hdr[0];
		__builtin_memcpy(&p->sport, hdr + 4, 2);
		p->dport = p->sport;
		return 1;
	}
	default:
		return 0;
	}
}

#endif
