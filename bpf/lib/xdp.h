/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The packet side of XDP acceleration (acceleration: native | best-effort):
 * reading, rewriting and sending a frame at XDP, before the kernel makes an
 * skb of it. The decisions (frontend, policy, backend, conntrack, DSR) are
 * the tc path's own shared helpers (lb.h, ct.h, dsr.h); only what touches
 * the packet differs, because XDP has direct access to one linear frame and
 * none of the skb helpers (bpf_skb_store_bytes, bpf_l4_csum_replace,
 * bpf_redirect_neigh, bpf_skb_adjust_room).
 *
 * What XDP takes: Ethernet + IPv4 without options and not a fragment, or
 * IPv6 without extension headers, carrying TCP or UDP, sent to an address
 * ferry serves. Everything else is passed to tc untouched (XDP_PASS) and
 * counted by why (stats.h, xdp_pass_*); tc then does what it always did.
 * A packet is rewritten only once the FIB gave a next hop with its MAC
 * addresses out of the device it came in by, so a pass never hands tc a
 * half-translated packet.
 */
#ifndef FERRY_XDP_H
#define FERRY_XDP_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "stats.h"
#include "dsr.h"

#define XDP_L4_V4 (ETH_HLEN_ + 20)
#define XDP_L4_V6 (ETH_HLEN_ + IP6_HLEN)

/* What xdp_parse found. */
enum xdp_seen {
	XDP_SEEN_OURS,     /* a whole TCP/UDP packet to an address ferry serves: p is filled */
	XDP_SEEN_NOT_OURS, /* not IP, or not sent to an address ferry serves: passed, not counted */
	XDP_SEEN_SHAPE,    /* for ferry, of a shape XDP leaves to tc */
};

/* Where and how a packet leaves: the rewritten tuple, the next hop, and for
 * DSR the outer header's addresses and endpoint tag. Passed by pointer to
 * the global functions (a pointer to a struct: the verifier knows its size). */
struct xdp_out {
	__u32 src[4];
	__u32 dst[4];
	__be16 sport;
	__be16 dport;
	__u32 ifindex;
	__u8 smac[6];
	__u8 dmac[6];
	__u32 via[4];       /* DSR: the backend's node (IPv4 in via[0]) */
	__u32 outer_src[4]; /* DSR: this node's address the tunnel leaves from */
	__u32 tag;          /* DSR: the endpoint tag (dsr_tag_of) */
};

static __always_inline int xdp_pass(__u32 why)
{
	stat_inc(why);
	return XDP_PASS;
}

/* The ports (and TCP flags) of a packet whose transport header starts at `l4`. */
static __always_inline int xdp_ports(struct pkt *p, void *l4, void *end)
{
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *t = l4;
		if ((void *)(t + 1) > end)
			return 0;
		p->sport = t->source;
		p->dport = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
		return 1;
	}
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *u = l4;
		if ((void *)(u + 1) > end)
			return 0;
		p->sport = u->source;
		p->dport = u->dest;
		return 1;
	}
	return 0;
}

/* Reads a frame into p. A packet not sent to an address ferry serves
 * (ferry_addrs, once the agent filled it: the fast path's own test) is not
 * ours and is not counted: it is all the node's other traffic. */
static __always_inline enum xdp_seen xdp_parse(struct xdp_md *ctx, struct pkt *p, const struct config *cfg)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	int whole = 0;

	if ((void *)(eth + 1) > end)
		return XDP_SEEN_NOT_OURS;
	__builtin_memset(p, 0, sizeof(*p));
	p->l3_off = ETH_HLEN_;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end)
			return XDP_SEEN_NOT_OURS;
		p->family = FAM_V4;
		p->src[0] = ip->saddr;
		p->dst[0] = ip->daddr;
		p->proto = ip->protocol;
		p->l4_off = XDP_L4_V4;
		/* No options (the transport header where XDP_L4_V4 says), not a fragment. */
		if (*(__u8 *)ip == 0x45 && !(ip->frag_off & bpf_htons(0x3fff)))
			whole = xdp_ports(p, (void *)(ip + 1), end);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end)
			return XDP_SEEN_NOT_OURS;
		p->family = FAM_V6;
		__builtin_memcpy(p->src, &ip6->saddr, 16);
		__builtin_memcpy(p->dst, &ip6->daddr, 16);
		p->proto = ip6->nexthdr;
		p->l4_off = XDP_L4_V6;
		whole = xdp_ports(p, (void *)(ip6 + 1), end);
	} else {
		return XDP_SEEN_NOT_OURS;
	}
	if (cfg->flags & CFG_FAST_PASS) {
		struct local_key k = { .family = p->family };
		__builtin_memcpy(k.addr, p->dst, 16);
		if (!bpf_map_lookup_elem(&ferry_addrs, &k))
			return XDP_SEEN_NOT_OURS;
	}
	return whole ? XDP_SEEN_OURS : XDP_SEEN_SHAPE;
}

/* The next hop towards `dst` as the kernel would forward a packet of
 * `tot_len` bytes (L3) from p's source, into out (device, MAC addresses).
 * 0 when there is none XDP can use: no route, a local destination, an
 * unresolved neighbour (tc's bpf_redirect_neigh resolves it; later packets
 * find it), a packet too big for the egress MTU, or another egress device
 * than the one the packet came in by. Only that one is certain to take XDP
 * frames: it runs this program. Another uplink may run tc only
 * (best-effort), and a driver without XDP drops what is redirected to it. */
/* A function of its own: its lookup structure is not on its callers' stack. */
static __attribute__((noinline)) int xdp_route(struct xdp_md *ctx, const struct pkt *p, const __u32 *dst,
					       __u32 tot_len, struct xdp_out *out)
{
	struct bpf_fib_lookup fib = {};

	fwd_fib_query(&fib, p, dst, ctx->ingress_ifindex);
	fib.tot_len = tot_len;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return 0;
	if (fib.ifindex != ctx->ingress_ifindex)
		return 0;
	out->ifindex = fib.ifindex;
	__builtin_memcpy(out->smac, fib.smac, 6);
	__builtin_memcpy(out->dmac, fib.dmac, 6);
	return 1;
}

/* The frame's L3 length (what the FIB checks against the egress MTU). */
static __always_inline __u32 xdp_l3_len(struct xdp_md *ctx)
{
	return (__u32)(ctx->data_end - ctx->data) - ETH_HLEN_;
}

/* Incremental checksum update (RFC 1624: HC' = ~(~HC + ~m + m')), summed
 * in 16-bit halves of values as they are on the wire. */
static __always_inline __u32 csum_acc32(__u32 sum, __u32 from, __u32 to)
{
	return sum + (~from & 0xffff) + (~from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 csum_acc16(__u32 sum, __u16 from, __u16 to)
{
	return sum + (__u16)~from + to;
}

static __always_inline __u16 csum_apply(__u16 check, __u32 delta)
{
	__u32 s = (__u16)~check;

	s += (delta & 0xffff) + (delta >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Sets the frame's MAC addresses to the next hop's and sends it back out
 * of the device it came in by (out->ifindex, xdp_route) with a redirect.
 * Not XDP_TX: on veth, frames sent back with XDP_TX are handed to the
 * peer but its NAPI is woken only when the peer runs an XDP program of its
 * own (veth_xdp_flush); with GRO alone they wait for the peer's next
 * packet (found in the lab: seconds). A redirect's flush always wakes it;
 * on a NIC's driver the cost is the same transmit path. */
static __always_inline int xdp_out_to(struct xdp_md *ctx, struct ethhdr *eth, const struct xdp_out *out)
{
	__builtin_memcpy(eth->h_dest, out->dmac, 6);
	__builtin_memcpy(eth->h_source, out->smac, 6);
	return bpf_redirect(out->ifindex, 0);
}

/* Rewrites p's tuple to out's (addresses, ports, every checksum), takes
 * one off the TTL / hop limit as a router does, and sends the frame to the
 * next hop. Passes to tc untouched when the TTL runs out (tc drops it,
 * counted). A global function: verified once, not once per caller. */
__attribute__((noinline)) int xdp_send(struct xdp_md *ctx, const struct pkt *p, const struct xdp_out *out)
{
	if (!p || !out)
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u16 *check;
	__be16 *ports;
	__u32 l4 = 0;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (p->family == FAM_V4) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || ip->ttl <= 1)
			return XDP_PASS;
		if (p->proto == IPPROTO_TCP) {
			struct tcphdr *t = (void *)(ip + 1);
			if ((void *)(t + 1) > end)
				return XDP_PASS;
			check = &t->check;
			ports = &t->source;
		} else {
			struct udphdr *u = (void *)(ip + 1);
			if ((void *)(u + 1) > end)
				return XDP_PASS;
			check = &u->check;
			ports = &u->source;
		}
		l4 = csum_acc32(l4, ip->saddr, out->src[0]);
		l4 = csum_acc32(l4, ip->daddr, out->dst[0]);
		__u16 old_ttl = *(__u16 *)&ip->ttl;
		ip->ttl--;
		__u32 l3 = csum_acc32(0, ip->saddr, out->src[0]);
		l3 = csum_acc32(l3, ip->daddr, out->dst[0]);
		l3 = csum_acc16(l3, old_ttl, *(__u16 *)&ip->ttl);
		ip->check = csum_apply(ip->check, l3);
		ip->saddr = out->src[0];
		ip->daddr = out->dst[0];
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || ip6->hop_limit <= 1)
			return XDP_PASS;
		if (p->proto == IPPROTO_TCP) {
			struct tcphdr *t = (void *)(ip6 + 1);
			if ((void *)(t + 1) > end)
				return XDP_PASS;
			check = &t->check;
			ports = &t->source;
		} else {
			struct udphdr *u = (void *)(ip6 + 1);
			if ((void *)(u + 1) > end)
				return XDP_PASS;
			check = &u->check;
			ports = &u->source;
		}
		for (int i = 0; i < 4; i++) {
			l4 = csum_acc32(l4, p->src[i], out->src[i]);
			l4 = csum_acc32(l4, p->dst[i], out->dst[i]);
		}
		ip6->hop_limit--;
		__builtin_memcpy(&ip6->saddr, out->src, 16);
		__builtin_memcpy(&ip6->daddr, out->dst, 16);
	}
	l4 = csum_acc16(l4, ports[0], out->sport);
	l4 = csum_acc16(l4, ports[1], out->dport);
	/* UDP over IPv4 without a checksum keeps none; a computed 0 is sent as 0xffff. */
	if (p->proto == IPPROTO_TCP) {
		*check = csum_apply(*check, l4);
	} else if (*check || p->family == FAM_V6) {
		__u16 c = csum_apply(*check, l4);
		*check = c ? c : 0xffff;
	}
	ports[0] = out->sport;
	ports[1] = out->dport;
	return xdp_out_to(ctx, eth, out);
}

/* xdp_send_dsr for an IPv6 packet: hop limit as a router, then an outer
 * IPv6 header (out->outer_src -> out->via, next header 41, the inner
 * traffic class, the endpoint tag as flow label) in front. */
static __always_inline int xdp_send_dsr6(struct xdp_md *ctx, const struct xdp_out *out)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if ((void *)(ip6 + 1) > end || ip6->hop_limit <= 1)
		return XDP_PASS;
	struct ipv6hdr outer = {};
	__u32 tclass = (bpf_ntohl(*(__be32 *)ip6) >> 20) & 0xff;
	__be32 word = bpf_htonl((6u << 28) | (tclass << 20) | (out->tag & FLOW_LABEL_MASK));
	__builtin_memcpy(&outer, &word, sizeof(word));
	outer.payload_len = bpf_htons(xdp_l3_len(ctx));
	outer.nexthdr = IPPROTO_IPV6_;
	outer.hop_limit = DSR_TTL;
	__builtin_memcpy(&outer.saddr, out->outer_src, 16);
	__builtin_memcpy(&outer.daddr, out->via, 16);
	if (bpf_xdp_adjust_head(ctx, -DSR6_OVERHEAD))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	struct ipv6hdr *o = (void *)(eth + 1);
	struct ipv6hdr *inner = (void *)(o + 1);
	if ((void *)(inner + 1) > end) {
		/* Cannot happen (the frame grew by what was asked); put it back as it was. */
		bpf_xdp_adjust_head(ctx, DSR6_OVERHEAD);
		return XDP_PASS;
	}
	inner->hop_limit--;
	__builtin_memcpy(o, &outer, sizeof(outer));
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	stat_inc(STAT_XDP_DSR_ENCAP);
	return xdp_out_to(ctx, eth, out);
}

/* Sends a packet of a DSR flow into the tunnel (dsr.h): TTL as a router,
 * then an outer IPv4 header (out->outer_src -> out->via, IPIP, DF, the
 * endpoint tag as Identification) in front, made room for with
 * bpf_xdp_adjust_head (IPv6: xdp_send_dsr6). The inner packet is otherwise
 * as it came. */
__attribute__((noinline)) int xdp_send_dsr(struct xdp_md *ctx, const struct xdp_out *out)
{
	if (!out)
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return xdp_send_dsr6(ctx, out);
	if ((void *)(ip + 1) > end || ip->ttl <= 1)
		return XDP_PASS;
	struct iphdr outer = {};
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = ip->tos;
	outer.tot_len = bpf_htons(bpf_ntohs(ip->tot_len) + DSR_OVERHEAD);
	outer.id = bpf_htons((__u16)out->tag);
	outer.frag_off = bpf_htons(IP_DF_);
	outer.ttl = DSR_TTL;
	outer.protocol = IPPROTO_IPIP_;
	outer.saddr = out->outer_src[0];
	outer.daddr = out->via[0];
	__u32 sum = 0;
	__u16 *w = (__u16 *)&outer;
	for (int i = 0; i < 10; i++)
		sum += w[i];
	outer.check = csum_apply(0xffff, sum);
	if (bpf_xdp_adjust_head(ctx, -DSR_OVERHEAD))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	struct iphdr *o = (void *)(eth + 1);
	struct iphdr *inner = (void *)(o + 1);
	if ((void *)(inner + 1) > end) {
		/* Cannot happen (the frame grew by what was asked); put it back as it was. */
		bpf_xdp_adjust_head(ctx, DSR_OVERHEAD);
		return XDP_PASS;
	}
	__u16 old_ttl = *(__u16 *)&inner->ttl;
	inner->ttl--;
	inner->check = csum_apply(inner->check, csum_acc16(0, old_ttl, *(__u16 *)&inner->ttl));
	__builtin_memcpy(o, &outer, sizeof(outer));
	eth->h_proto = bpf_htons(ETH_P_IP);
	stat_inc(STAT_XDP_DSR_ENCAP);
	return xdp_out_to(ctx, eth, out);
}

#endif
