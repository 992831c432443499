/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Direct Server Return (loadBalancing.mode dsr / hybrid): IPv4 in IPv4
 * (IPIP, protocol 4) and IPv6 in IPv6 (next header 41).
 *
 * The node an outside client's connection arrives at picks the backend as
 * always; when the backend is on another node it does not SNAT: it puts an
 * outer header of the packet's family in front of the client's packet,
 * unchanged but for its TTL (hop limit), and sends it to the backend's node
 * (ferry_tunnels, ferry_tunnels6), remembering the flow in ferry_dsr
 * (ferry_dsr6) so the rest of it follows. The backend's node takes the
 * outer header off at its uplink's ingress (dsr_decap) and sends the inner
 * packet to the endpoint the balancing node chose, with the frontend as the
 * packet names it: its conntrack reply entry turns the pod's replies back
 * into the frontend, and they leave that node straight for the client.
 *
 * Which endpoint (the "tag"), IPv4: the outer header is sent with DF set,
 * so it is an atomic datagram (RFC 6864) whose 16-bit Identification means
 * nothing to the network; it carries the low 16 bits of the chosen
 * endpoint's IPv4 address. These are unique among one node's pods when its
 * pod range is a /16 or smaller.
 *
 * IPv6 has no Identification in its fixed header. The outer header's
 * 20-bit flow label carries the low 20 bits of the endpoint's IPv6 address
 * instead. Forwarding nodes leave a flow label as its source set it (RFC
 * 6437, 2: they MUST NOT change it but for compelling security reasons),
 * and one label per endpoint still means one path per flow for ECMP. The
 * other way considered, sending the outer packet to the endpoint's own
 * address, was not taken: it needs the network between the nodes to route
 * pod addresses (an overlay's underlay does not), a host-network endpoint
 * has its node's address (no endpoint to name), and the backend's node
 * could no longer tell a tunnel to it from a packet routed through it by
 * its outer destination alone. The low 20 bits are unique among one node's
 * pods for a pod range of a /108 or smaller, and in practice in a /64 too:
 * IPAM hands addresses out from the start of the range (a per-node /64 holds
 * far fewer than a million pods).
 *
 * Either family: the backend's node takes the one local endpoint of the
 * service whose address ends so (dsr_local_endpoint). When none or several
 * match (host-network endpoints share the node's address; a tag of 0, from
 * a build that carried none or an endpoint whose low bits are 0) it
 * chooses among its own endpoints as before, counted as
 * dsr_endpoint_fallback.
 *
 * The kernel's ipip and ip6_tunnel modules are not needed (nor loaded):
 * both ends are done here with bpf_skb_adjust_room. The outer header costs
 * 20 bytes of MTU for IPv4, 40 for IPv6 (README: Direct Server Return,
 * MTU): the backend's node lowers the MSS its endpoints announce in their
 * SYN-ACKs to outside clients (dsr_clamp_mss), so the clients' TCP segments
 * fit the tunnel. A packet that still does not fit (a full-sized UDP
 * datagram) is answered as a router answers it: IPv4 with DF, ICMP
 * "fragmentation needed" (dsr_frag_needed); IPv6, which routers never
 * fragment, ICMPv6 "packet too big" (dsr_pkt_too_big), both with the MTU
 * left inside the tunnel; IPv4 without DF is dropped and counted.
 *
 * XDP (xdp.h) does the balancing node's part for both families too
 * (xdp_send_dsr); the backend's node unwraps at tc.
 */
#ifndef FERRY_DSR_H
#define FERRY_DSR_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "stats.h"
#include "fwd.h"
#include "ct.h"
#include "icmp.h"

#define IPPROTO_IPIP_ 4
#define IPPROTO_IPV6_ 41
#define DSR_OVERHEAD 20
#define DSR6_OVERHEAD 40
/* IPv4 "don't fragment", in the header's flags and offset word. */
#define IP_DF_ 0x4000
#define DSR_TTL 64
/* BPF_F_ADJ_ROOM_DECAP_L3_IPV4 / _IPV6 (Linux 6.3; newer than the UAPI headers here). */
#define DSR_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define DSR_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
/* The smallest MTU an IPv6 link has (RFC 8200, 5). */
#define IPV6_MIN_MTU_ 1280
#define FLOW_LABEL_MASK 0xfffff

/* What dsr_is_tunnelled finds. */
#define DSR_TUNNEL_NONE 0
#define DSR_TUNNEL_V4 1
#define DSR_TUNNEL_V6 2

/* The outer header's size for a packet of `family`. */
static __always_inline __u32 dsr_overhead(__u8 family)
{
	return family == FAM_V4 ? DSR_OVERHEAD : DSR6_OVERHEAD;
}

/* Whether a new flow is one DSR carries (ferry_model::dsr::carrier): from
 * outside the cluster to a NodePort, LoadBalancer IP or ExternalIP, of a
 * protocol the mode covers, not fragmented; either family. The backend's
 * locality and its node are the caller's to check. */
static __always_inline int dsr_wanted(const struct config *cfg, const struct pkt *p, __u8 fe_kind, __u8 class)
{
	__u8 need = p->proto == IPPROTO_TCP ? CFG_DSR_TCP : CFG_DSR_DGRAM;

	return (cfg->flags & need) && class == CLASS_EXTERNAL && fe_kind != FE_CLUSTER_IP && p->frag == FRAG_NONE;
}

/* What new_flow returns for a flow DSR carries (not a TC_ACT_* value): its
 * caller then calls dsr_new_flow with what dsr_pick noted. */
#define RC_DSR 0x100

/* The node address a remote IPv4 backend's packets are tunnelled to; 0: unknown. */
static __always_inline __u32 dsr_tunnel_of(__u32 backend)
{
	struct tunnel_key k = { .prefixlen = 32, .addr = backend };
	__u32 *via = bpf_map_lookup_elem(&ferry_tunnels, &k);

	return via ? *via : 0;
}

/* The same for an IPv6 backend (ferry_tunnels6), into `via`; 0: unknown. */
static __always_inline int dsr6_tunnel_of(const __u32 *backend, __u32 *via)
{
	struct tunnel6_key k = { .prefixlen = 128 };

	__builtin_memcpy(k.addr, backend, 16);
	struct tunnel6_val *v = bpf_map_lookup_elem(&ferry_tunnels6, &k);
	if (!v)
		return 0;
	__builtin_memcpy(via, v->addr, 16);
	return 1;
}

/* How long a DSR flow's entry lives after this packet. Without the replies
 * the handshake cannot be followed: an open TCP flow gets the established
 * lifetime from its first packet, a closing one the close lifetime. */
static __always_inline __u64 dsr_lifetime(const struct config *cfg, const struct pkt *p, __u8 flags)
{
	__u32 s;

	if (p->proto == IPPROTO_TCP)
		s = (flags & DSR_CLOSING) ? cfg->tcp_close_timeout : cfg->tcp_established_timeout;
	else
		s = cfg->udp_timeout;
	if (s == 0)
		s = 30;
	return (__u64)s * NSEC_PER_SEC;
}

static __always_inline __u16 csum_fold_(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* An endpoint's tag (`addr` in network order) as a number, either family:
 * IPv4 the low 16 bits of its address (the outer Identification, written
 * with bpf_htons: the address's last two bytes as they are on the wire),
 * IPv6 the low 20 bits (the outer flow label). */
static __always_inline __u32 dsr_tag_of(__u8 family, const __u32 *addr)
{
	if (family == FAM_V4)
		return bpf_ntohl(addr[0]) & 0xffff;
	return bpf_ntohl(addr[3]) & FLOW_LABEL_MASK;
}

/* Puts the outer IPv4 header (outer_src -> via, IPIP, Identification `tag`)
 * in front of the packet at L3. The inner packet is left as it is (its TTL
 * was already decremented). Returns 0, or -1 when a helper failed. */
static __always_inline int dsr4_encap(struct __sk_buff *skb, __u32 outer_src, __u32 via, __u16 tag)
{
	struct iphdr inner;
	struct iphdr outer = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &inner, sizeof(inner)) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, DSR_OVERHEAD, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) < 0)
		return -1;
	outer.version = 4;
	outer.ihl = 5;
	outer.tos = inner.tos;
	outer.tot_len = bpf_htons(bpf_ntohs(inner.tot_len) + DSR_OVERHEAD);
	/* Free in an atomic datagram (DF, never fragmented; RFC 6864 4.1). */
	outer.id = bpf_htons(tag);
	/* Don't fragment: a tunnelled packet too big for the path must not be
	 * cut in two the backend's node would have to put together. */
	outer.frag_off = bpf_htons(IP_DF_);
	outer.ttl = DSR_TTL;
	outer.protocol = IPPROTO_IPIP_;
	outer.saddr = outer_src;
	outer.daddr = via;
	outer.check = csum_fold_(bpf_csum_diff(NULL, 0, (__be32 *)&outer, sizeof(outer), 0));
	return bpf_skb_store_bytes(skb, ETH_HLEN_, &outer, sizeof(outer), BPF_F_RECOMPUTE_CSUM) < 0 ? -1 : 0;
}

/* Puts the outer IPv6 header (outer_src -> via, next header 41, the inner
 * packet's traffic class, flow label `tag`) in front of the packet at L3.
 * The payload length is the whole inner packet's (skb->len counts the
 * Ethernet header at tc). Returns 0, or -1 when a helper failed. */
static __always_inline int dsr6_encap(struct __sk_buff *skb, const __u32 *outer_src, const __u32 *via, __u32 tag)
{
	__be32 first;
	struct ipv6hdr outer = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &first, sizeof(first)) < 0)
		return -1;
	if (bpf_skb_adjust_room(skb, DSR6_OVERHEAD, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6) < 0)
		return -1;
	__u32 tclass = (bpf_ntohl(first) >> 20) & 0xff;
	__be32 word = bpf_htonl((6u << 28) | (tclass << 20) | (tag & FLOW_LABEL_MASK));
	__builtin_memcpy(&outer, &word, sizeof(word));
	outer.payload_len = bpf_htons(skb->len - ETH_HLEN_ - DSR6_OVERHEAD);
	outer.nexthdr = IPPROTO_IPV6_;
	outer.hop_limit = DSR_TTL;
	__builtin_memcpy(&outer.saddr, outer_src, 16);
	__builtin_memcpy(&outer.daddr, via, 16);
	return bpf_skb_store_bytes(skb, ETH_HLEN_, &outer, sizeof(outer), BPF_F_RECOMPUTE_CSUM) < 0 ? -1 : 0;
}

/* Whether the packet at L3 is an IPv4 DSR tunnel packet for this node:
 * IPv4 in IPv4 without options or fragmentation, sent to an address of
 * this node by another node (its ferry_tunnels entry names itself),
 * carrying a whole TCP, UDP or SCTP packet. */
static __always_inline int dsr4_is_tunnelled(struct __sk_buff *skb)
{
	struct iphdr outer;
	__u8 inner_vihl_proto[10];

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &outer, sizeof(outer)) < 0)
		return 0;
	if (outer.protocol != IPPROTO_IPIP_ || *(__u8 *)&outer != 0x45 || (outer.frag_off & bpf_htons(0x3fff)))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_ + DSR_OVERHEAD, inner_vihl_proto, sizeof(inner_vihl_proto)) < 0)
		return 0;
	if ((inner_vihl_proto[0] >> 4) != 4 || !has_ports(inner_vihl_proto[9]))
		return 0;
	struct local_key lk = { .family = FAM_V4 };
	lk.addr[0] = outer.daddr;
	__u8 *local = bpf_map_lookup_elem(&ferry_locals, &lk);
	if (!local || !(*local & LOCAL_HOST))
		return 0;
	return dsr_tunnel_of(outer.saddr) == outer.saddr;
}

/* The same for IPv6: IPv6 in IPv6 (the outer header without extension
 * headers), sent to an address of this node by another node
 * (ferry_tunnels6), carrying an IPv6 packet (whose extension headers, if
 * any, parse() walks after the decapsulation). */
static __always_inline int dsr6_is_tunnelled(struct __sk_buff *skb)
{
	struct ipv6hdr outer;
	__u8 inner_v;
	__u32 via[4];

	if (bpf_skb_load_bytes(skb, ETH_HLEN_, &outer, sizeof(outer)) < 0)
		return 0;
	if (outer.nexthdr != IPPROTO_IPV6_ || (*(__u8 *)&outer >> 4) != 6)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_ + DSR6_OVERHEAD, &inner_v, 1) < 0 || (inner_v >> 4) != 6)
		return 0;
	struct local_key lk = { .family = FAM_V6 };
	__builtin_memcpy(lk.addr, &outer.daddr, 16);
	__u8 *local = bpf_map_lookup_elem(&ferry_locals, &lk);
	if (!local || !(*local & LOCAL_HOST))
		return 0;
	__u32 src[4];
	__builtin_memcpy(src, &outer.saddr, 16);
	return dsr6_tunnel_of(src, via) && addr_eq(via, src);
}

/* Whether the packet is a DSR tunnel packet for this node, and of which
 * family (DSR_TUNNEL_*). */
static __attribute__((noinline)) int dsr_is_tunnelled(struct __sk_buff *skb)
{
	__be16 proto;

	if (bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)) < 0)
		return DSR_TUNNEL_NONE;
	if (proto == bpf_htons(ETH_P_IP))
		return dsr4_is_tunnelled(skb) ? DSR_TUNNEL_V4 : DSR_TUNNEL_NONE;
	if (proto == bpf_htons(ETH_P_IPV6))
		return dsr6_is_tunnelled(skb) ? DSR_TUNNEL_V6 : DSR_TUNNEL_NONE;
	return DSR_TUNNEL_NONE;
}

/* The endpoint tag a tunnel packet of `family` carries (dsr_tag_of): the
 * outer Identification (IPv4) or flow label (IPv6); 0: none. Read before
 * dsr_decap. */
static __always_inline __u32 dsr_carried_tag(struct __sk_buff *skb, __u8 family)
{
	if (family == FAM_V4) {
		__be16 id = 0;
		bpf_skb_load_bytes(skb, ETH_HLEN_ + 4, &id, sizeof(id));
		return bpf_ntohs(id);
	}
	__be32 first = 0;
	bpf_skb_load_bytes(skb, ETH_HLEN_, &first, sizeof(first));
	return bpf_ntohl(first) & FLOW_LABEL_MASK;
}

/* dsr_local_endpoint's walk over a service's local set (a bpf_loop callback). */
struct dsr_search {
	struct slot_key slot;
	__u32 tag;
	__u8 family;
	__u8 pad[3];
	__u32 found;     /* the backend id whose address ends in `tag` */
	__u32 ambiguous; /* another one does too */
};

static long dsr_search_step(__u64 i, void *ctx)
{
	struct dsr_search *d = ctx;

	d->slot.slot = (__u16)i;
	__u32 *id = bpf_map_lookup_elem(&ferry_slots, &d->slot);
	if (!id || *id == d->found)
		return 0;
	__u32 bid = *id;
	struct backend *be = bpf_map_lookup_elem(&ferry_backends, &bid);
	if (!be || be->family != d->family || !(be->flags & BE_LOCAL) || dsr_tag_of(d->family, be->addr) != d->tag)
		return 0;
	if (d->found) {
		d->ambiguous = 1;
		return 1;
	}
	d->found = bid;
	return 0;
}

/* The one local endpoint of `service` (local set) of `family` whose address
 * ends in `tag`: the endpoint the balancing node chose. 0 when there is none
 * or more than one (the caller chooses as before, counted). */
static __always_inline __u32 dsr_local_endpoint(__u32 service, const struct svc_val *svc, __u8 family, __u32 tag)
{
	struct dsr_search d = {
		.slot = { .service = service, .rev = svc->rev, .set = SET_LOCAL }, .tag = tag, .family = family
	};
	__u32 count = svc->count[SET_LOCAL];

	if (!tag || !count)
		return 0;
	bpf_loop(count, dsr_search_step, &d, 0);
	return d.ambiguous ? 0 : d.found;
}

/* Takes the outer header of a `family` tunnel off. Returns 0, or -1 when
 * the helper failed. */
static __always_inline int dsr_decap(struct __sk_buff *skb, __u8 family)
{
	long rc = family == FAM_V4
			  ? bpf_skb_adjust_room(skb, -DSR_OVERHEAD, BPF_ADJ_ROOM_MAC, DSR_ADJ_ROOM_DECAP_L3_IPV4)
			  : bpf_skb_adjust_room(skb, -DSR6_OVERHEAD, BPF_ADJ_ROOM_MAC, DSR_ADJ_ROOM_DECAP_L3_IPV6);
	return rc < 0 ? -1 : 0;
}

/* Whether a packet of a DSR flow fits the egress MTU of `ifindex` with the
 * outer header of its family. */
static __always_inline int dsr_fits(struct __sk_buff *skb, const struct pkt *p, __u32 ifindex)
{
	__u32 mtu = 0;
	__u32 overhead = dsr_overhead(p->family);

	if (!skb->gso_size)
		return bpf_check_mtu(skb, ifindex, &mtu, overhead, 0) == BPF_MTU_CHK_RET_SUCCESS;
	/* A GSO packet (veth hands them on whole) leaves as segments of
	 * gso_size bytes of payload, each behind the headers and the tunnel. */
	__u8 doff = 0;
	if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) < 0 || p->proto != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) < 0)
		return 0;
	return (p->l4_off - ETH_HLEN_) + (doff >> 4) * 4 + skb->gso_size + overhead <= mtu;
}

/* A packet too big for the tunnel, answered as a router answers it, with
 * the MTU left inside the tunnel, back out of the device it came in on, so
 * that the sender's next packets fit. IPv4: when its sender forbade
 * fragmenting (DF: TCP segments, and UDP of a stack doing path MTU
 * discovery, Linux's default), "fragmentation needed"; without DF it is
 * dropped (tc cannot fragment). IPv6 (never fragmented on the way): "packet
 * too big", unless the MTU left would be below IPv6's minimum (dropped).
 * Counted either way (dsr_frag_needed, dsr_pkt_too_big, drop_dsr_too_big). */
static __always_inline int dsr_too_big(struct __sk_buff *skb, const struct pkt *p, __u32 ifindex)
{
	__u32 mtu = 0;

	if (p->family != FAM_V4) {
		if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) < 0 || mtu < IPV6_MIN_MTU_ + DSR6_OVERHEAD)
			return drop_packet(STAT_DROP_DSR_TOO_BIG);
		if (icmp6_answer(skb, p, ICMPV6_PKT_TOOBIG_, 0, mtu - DSR6_OVERHEAD) < 0)
			return drop_packet(STAT_DROP_REJECT_FAILED);
		stat_inc(STAT_DSR_PKT_TOO_BIG);
		return bpf_redirect(skb->ifindex, 0);
	}
	__be16 frag_off = 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 6, &frag_off, 2) < 0 || !(frag_off & bpf_htons(IP_DF_)) ||
	    bpf_check_mtu(skb, ifindex, &mtu, 0, 0) < 0 || mtu < 576 + DSR_OVERHEAD)
		return drop_packet(STAT_DROP_DSR_TOO_BIG);
	if (icmp4_answer(skb, p, ICMP_DEST_UNREACH_, ICMP_FRAG_NEEDED_, mtu - DSR_OVERHEAD) < 0)
		return drop_packet(STAT_DROP_REJECT_FAILED);
	stat_inc(STAT_DSR_FRAG_NEEDED);
	return bpf_redirect(skb->ifindex, 0);
}

/* Sends a packet of a DSR flow through the tunnel out of `ifindex`: as a
 * router would forward it (TTL / hop limit), inside an outer header of its
 * family from `outer_src` to `via` carrying `tag`. */
static __always_inline int dsr_send(struct __sk_buff *skb, const struct pkt *p, const __u32 *outer_src,
				    const __u32 *via, __u32 tag, __u32 ifindex)
{
	if (!dsr_fits(skb, p, ifindex))
		return dsr_too_big(skb, p, ifindex);
	int rc = fwd_ttl(skb, p);
	if (rc > 0)
		return drop_packet(STAT_DROP_TTL_EXCEEDED);
	if (rc == 0)
		rc = p->family == FAM_V4 ? dsr4_encap(skb, outer_src[0], via[0], (__u16)tag)
					 : dsr6_encap(skb, outer_src, via, tag);
	if (rc < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_DSR_ENCAP);
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

/* The egress device towards a backend's node `via` (of the packet's
 * family); 0: no route (or it is this node). */
static __always_inline __u32 dsr_egress(struct __sk_buff *skb, const struct pkt *p, const __u32 *via)
{
	int local;
	__u32 ifindex = fwd_egress(skb, p, via, &local);

	return local ? 0 : ifindex;
}

/* Whether DSR can carry a new flow to the remote backend `id` (address
 * `backend_addr` of `family`, port `backend_port`) of `service`: its node is
 * known (else counted, and the caller SNATs it as in snat mode). Notes the
 * choice for dsr_new_flow in the per-CPU scratch (the packet is handled on
 * this CPU to the end): dsr for IPv4, dsr6 for IPv6. */
static __always_inline int dsr_pick(__u8 family, const __u32 *backend_addr, __be16 backend_port, __u32 id,
				    __u32 service)
{
	__u32 zero = 0;
	struct ct_scratch *s = bpf_map_lookup_elem(&ferry_ct_scratch, &zero);

	if (!s)
		return 0;
	if (family == FAM_V4) {
		__u32 via = dsr_tunnel_of(backend_addr[0]);
		if (!via) {
			stat_inc(STAT_DSR_NO_TUNNEL);
			return 0;
		}
		s->dsr.via = via;
		s->dsr.backend = id;
		s->dsr.service = service;
		s->dsr.backend_addr = backend_addr[0];
		s->dsr.backend_port = backend_port;
		return 1;
	}
	if (!dsr6_tunnel_of(backend_addr, s->dsr6.via)) {
		stat_inc(STAT_DSR_NO_TUNNEL);
		return 0;
	}
	s->dsr6.backend = id;
	s->dsr6.service = service;
	__builtin_memcpy(s->dsr6.backend_addr, backend_addr, 16);
	s->dsr6.backend_port = backend_port;
	return 1;
}

/* Remembers the new flow dsr_pick noted in the scratch `s` in ferry_dsr
 * (ferry_dsr6), leaving from `outer_src` (tc and XDP alike). Returns 0, or
 * -1 when the map refused it. */
static __always_inline int dsr_record(struct ct_scratch *s, const struct pkt *p, const struct config *cfg,
				      const __u32 *outer_src)
{
	__u64 expires = bpf_ktime_get_ns() + dsr_lifetime(cfg, p, 0);
	long rc;

	ct_key_of(&s->rk, p, CT_ORIGINAL);
	if (p->family == FAM_V4) {
		s->dsr.outer_src = outer_src[0];
		s->dsr.flags = 0;
		s->dsr.pad = 0;
		s->dsr.expires_ns = expires;
		rc = bpf_map_update_elem(&ferry_dsr, &s->rk, &s->dsr, BPF_ANY);
	} else {
		__builtin_memcpy(s->dsr6.outer_src, outer_src, 16);
		s->dsr6.flags = 0;
		s->dsr6.pad = 0;
		s->dsr6.pad2 = 0;
		s->dsr6.expires_ns = expires;
		rc = bpf_map_update_elem(&ferry_dsr6, &s->rk, &s->dsr6, BPF_ANY);
	}
	if (rc < 0)
		return -1;
	stat_inc(STAT_DSR_NEW_FLOW);
	return 0;
}

/* Keeps a DSR flow's entry (its flags and expiry) alive after this packet of it. */
static __always_inline void dsr_refresh_(__u8 *flags, __u64 *expires_ns, const struct pkt *p,
					 const struct config *cfg, __u64 now)
{
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		*flags |= DSR_CLOSING;
	*expires_ns = now + dsr_lifetime(cfg, p, *flags);
}

static __always_inline void dsr_refresh(struct dsr_val *v, const struct pkt *p, const struct config *cfg, __u64 now)
{
	dsr_refresh_(&v->flags, &v->expires_ns, p, cfg, now);
}

/* Whether a DSR flow's entry is done with: expired, or a SYN opens the
 * 4-tuple of a closing flow anew. */
static __always_inline int dsr_over_(__u8 flags, __u64 expires_ns, const struct pkt *p, __u64 now)
{
	int reopen = p->proto == IPPROTO_TCP && (flags & DSR_CLOSING) &&
		     (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	return expires_ns < now || reopen;
}

static __always_inline int dsr_over(const struct dsr_val *v, const struct pkt *p, __u64 now)
{
	return dsr_over_(v->flags, v->expires_ns, p, now);
}

/* A new flow dsr_pick chose: remembered in ferry_dsr / ferry_dsr6 (key and
 * value in the scratch, off the stack), then tunnelled. */
static __attribute__((noinline)) int dsr_new_flow(struct __sk_buff *skb, struct pkt *p, const struct config *cfg)
{
	__u32 zero = 0;
	struct ct_scratch *s = bpf_map_lookup_elem(&ferry_ct_scratch, &zero);
	if (!s)
		return drop_packet(STAT_DROP_CT_INSERT);
	__u32 via[4] = {};
	__u32 tag;
	if (p->family == FAM_V4) {
		via[0] = s->dsr.via;
		tag = dsr_tag_of(FAM_V4, &s->dsr.backend_addr);
	} else {
		__builtin_memcpy(via, s->dsr6.via, 16);
		tag = dsr_tag_of(FAM_V6, s->dsr6.backend_addr);
	}
	__u32 ifindex = dsr_egress(skb, p, via);
	if (!ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	__u32 src[4];
	fwd_snat_address(cfg, ifindex, p->family, src);
	if (dsr_record(s, p, cfg, src) < 0)
		return drop_packet(STAT_DROP_CT_INSERT);
	return dsr_send(skb, p, src, via, tag, ifindex);
}

/* A packet of a flow this node carries by DSR: tunnelled as its first one
 * was. Returns -1 when it is none (or its entry expired, or a SYN opens the
 * 4-tuple of a closing flow anew): the caller goes on as usual. */
static __attribute__((noinline)) int dsr_tracked(struct __sk_buff *skb, struct pkt *p, const struct config *cfg)
{
	struct ct_key k;
	__u64 now = bpf_ktime_get_ns();
	__u32 outer_src[4] = {}, via[4] = {};
	__u32 tag;

	ct_key_of(&k, p, CT_ORIGINAL);
	if (p->family == FAM_V4) {
		struct dsr_val *v = bpf_map_lookup_elem(&ferry_dsr, &k);
		if (!v)
			return -1;
		if (dsr_over(v, p, now)) {
			bpf_map_delete_elem(&ferry_dsr, &k);
			return -1;
		}
		dsr_refresh(v, p, cfg, now);
		outer_src[0] = v->outer_src;
		via[0] = v->via;
		tag = dsr_tag_of(FAM_V4, &v->backend_addr);
	} else {
		struct dsr6_val *v = bpf_map_lookup_elem(&ferry_dsr6, &k);
		if (!v)
			return -1;
		if (dsr_over_(v->flags, v->expires_ns, p, now)) {
			bpf_map_delete_elem(&ferry_dsr6, &k);
			return -1;
		}
		dsr_refresh_(&v->flags, &v->expires_ns, p, cfg, now);
		__builtin_memcpy(outer_src, v->outer_src, 16);
		__builtin_memcpy(via, v->via, 16);
		tag = dsr_tag_of(FAM_V6, v->backend_addr);
	}
	if (p->frag != FRAG_NONE)
		return drop_packet(STAT_DROP_UNSUPPORTED);
	__u32 ifindex = dsr_egress(skb, p, via);
	if (!ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	return dsr_send(skb, p, outer_src, via, tag, ifindex);
}

/* The backend's side of the MTU: a SYN-ACK of a flow that keeps an outside
 * client's address (a DSR flow; also one of externalTrafficPolicy Local,
 * which costs it the tunnel's bytes of segment size) announces at most the
 * egress MTU - the tunnel (20, IPv6 40) - its headers (IPv4 + TCP 40, IPv6
 * + TCP 60) as its MSS, so that the client's segments fit the tunnel. The
 * MSS option is looked for first among the options, where every TCP stack
 * puts it. Returns -1 when a helper failed. */
static __attribute__((noinline)) int dsr_clamp_mss(struct __sk_buff *skb, struct pkt *p)
{
	__u8 opt[4];
	__u8 doff;
	__u32 mtu = 0;
	int local;
	__u32 floor = p->family == FAM_V4 ? 576 : IPV6_MIN_MTU_;
	__u32 cost = p->family == FAM_V4 ? DSR_OVERHEAD + 40 : DSR6_OVERHEAD + 60;

	if (bpf_skb_load_bytes(skb, p->l4_off + 12, &doff, 1) < 0 || (doff >> 4) < 6)
		return 0;
	if (bpf_skb_load_bytes(skb, p->l4_off + 20, opt, sizeof(opt)) < 0 || opt[0] != 2 || opt[1] != 4)
		return 0;
	__u32 ifindex = fwd_egress(skb, p, p->dst, &local);
	if (!ifindex || local || bpf_check_mtu(skb, ifindex, &mtu, 0, 0) < 0 || mtu < floor)
		return 0;
	__u16 max = mtu - cost;
	__u16 mss = ((__u16)opt[2] << 8) | opt[3];
	if (mss <= max)
		return 0;
	__be16 old = bpf_htons(mss), new = bpf_htons(max);
	if (bpf_l4_csum_replace(skb, p->l4_off + 16, old, new, 2) < 0 ||
	    bpf_skb_store_bytes(skb, p->l4_off + 22, &new, 2, 0) < 0)
		return -1;
	stat_inc(STAT_DSR_MSS_CLAMP);
	return 0;
}

#endif
