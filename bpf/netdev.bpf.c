// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-packet load balancing on the node's devices (tcx).
 *
 *   ferry_from_netdev  ingress of an uplink: NodePort, LoadBalancer, ExternalIP
 *                      and routed ClusterIP traffic from outside; replies of
 *                      flows SNATed to this node; in DSR mode, packets another
 *                      node tunnelled here for one of this node's endpoints
 *                      (dsr.h).
 *   ferry_from_pods    ingress of a pod-facing device: pod traffic the socket
 *                      path left alone (masqueraded, hairpin, source-ranged);
 *                      replies of local endpoints.
 *   ferry_to_netdev    egress of an uplink: replies of local endpoints the
 *                      kernel routed out itself; the node's own traffic to a
 *                      frontend whose route drops.
 *   ferry_from_loop    ingress of the defrag loop's node end: datagrams the
 *                      kernel reassembled, back as in-order fragments, sent
 *                      on to the ingress they came in by (loop.h).
 *   ferry_defrag_note  netfilter, in the defrag loop's namespace: notes the
 *                      length of each reassembled SCTP packet (loop.h).
 *   ferry_xdp          XDP on an uplink (acceleration: native | best-effort):
 *                      the part of ferry_from_netdev's work on outside
 *                      traffic that needs no skb, before the kernel makes
 *                      one; everything else passes to tc unchanged (xdp.h).
 *
 * A packet's journey: parse -> neither to an address ferry serves nor from
 * a backend it translated for? pass it on at once (the fast path) ->
 * tracked flow? translate and forward -> frontend? classify the source,
 * check source ranges, read the route the model decided, pick a backend,
 * track the flow (SNAT port if masqueraded), translate, forward -> else pass
 * it on untouched.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/stats.h"
#include "lib/lb.h"
#include "lib/packet.h"
#include "lib/nat.h"
#include "lib/ct.h"
#include "lib/fwd.h"
#include "lib/icmp.h"
#include "lib/masq.h"
#include "lib/frag.h"
#include "lib/loop.h"
#include "lib/dsr.h"
#include "lib/xdp.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* HOOK_FROM_TUNNEL: ferry_from_netdev, for the inner packet of a DSR tunnel (dsr.h). */
enum hook { HOOK_FROM_NETDEV, HOOK_FROM_PODS, HOOK_TO_NETDEV, HOOK_FROM_TUNNEL };

#define CFG_DSR_ANY (CFG_DSR_TCP | CFG_DSR_DGRAM)

static __always_inline struct config *load_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ferry_config, &zero);
}

/* The model's source classes, decided from the packet (ferry_model::explain::classify_source). */
static __always_inline __u8 classify(const struct pkt *p, const struct config *cfg, enum hook hook)
{
	if ((cfg->flags & CFG_PODS_BY_RANGE) && lb_in_range(RANGE_POD, p->family, p->src))
		return CLASS_POD;
	if ((cfg->flags & CFG_PODS_BY_DEVICE) && hook == HOOK_FROM_PODS)
		return CLASS_POD;
	struct local_key lk = { .family = p->family };
	__builtin_memcpy(lk.addr, p->src, 16);
	__u8 *local = bpf_map_lookup_elem(&ferry_locals, &lk);
	if (local && (*local & LOCAL_HOST))
		return CLASS_HOST;
	return CLASS_EXTERNAL;
}

/* Whether a packet is certainly none of ferry's business, decided from its
 * linear headers alone, before any parsing or conntrack lookup (maps.h, "the
 * pass-through fast path"): it is not sent to a frontend, a node address or
 * an address a tracked flow was sent to; it does not come from a backend a
 * flow was sent to without SNAT; it is a whole TCP, UDP or SCTP packet (no
 * fragment, no ICMP error about a translated flow, no IPv6 extension header)
 * not sent into the service CIDRs (unallocated ClusterIPs are dropped); and
 * no pod egress is masqueraded on this hook. Anything else (headers not in
 * the linear area included) takes the full path. */
enum glance {
	GLANCE_FULL_PATH, /* needs the full path */
	GLANCE_PASS,      /* none of ferry's business: pass it on */
	GLANCE_TO_ADDR,   /* needs the full path; sent to an address in ferry_addrs */
};

static __always_inline enum glance glance_at(struct __sk_buff *skb, const struct config *cfg, enum hook hook)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct local_key k = {};
	__u32 src[4] = {};

	if (!(cfg->flags & CFG_FAST_PASS) || (hook == HOOK_TO_NETDEV && (cfg->flags & CFG_MASQ_BPF)))
		return GLANCE_FULL_PATH;
	if ((void *)(eth + 1) > end)
		return GLANCE_FULL_PATH;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > end || (ip->frag_off & bpf_htons(0x3fff)) || !has_ports(ip->protocol))
			return GLANCE_FULL_PATH;
		k.family = FAM_V4;
		k.addr[0] = ip->daddr;
		src[0] = ip->saddr;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > end || !has_ports(ip6->nexthdr))
			return GLANCE_FULL_PATH;
		k.family = FAM_V6;
		__builtin_memcpy(k.addr, &ip6->daddr, 16);
		__builtin_memcpy(src, &ip6->saddr, 16);
	} else {
		return GLANCE_FULL_PATH;
	}
	if (bpf_map_lookup_elem(&ferry_addrs, &k))
		return GLANCE_TO_ADDR;
	if (lb_in_range(RANGE_SERVICE, k.family, k.addr))
		return GLANCE_FULL_PATH;
	__builtin_memcpy(k.addr, src, 16);
	return bpf_map_lookup_elem(&ferry_peers, &k) ? GLANCE_FULL_PATH : GLANCE_PASS;
}

/* Records that flows go to `addr` without SNAT, so that its replies skip the
 * fast path (once per backend: a lookup when it is known). 0 when the map is full. */
static __always_inline int note_peer(__u8 family, const __u32 *addr)
{
	struct local_key k = { .family = family };
	__u8 one = 1;

	__builtin_memcpy(k.addr, addr, 16);
	if (bpf_map_lookup_elem(&ferry_peers, &k))
		return 1;
	long rc = bpf_map_update_elem(&ferry_peers, &k, &one, BPF_NOEXIST);
	return rc == 0 || rc == -17 /* EEXIST: another CPU wrote it */;
}

/* Sends a translated packet on: up the stack when it is for this node, out of
 * the egress device otherwise; on egress hooks the kernel already routed it. */
static __always_inline int deliver(struct __sk_buff *skb, const struct pkt *p, enum hook hook)
{
	int local;
	__u32 ifindex;

	if (hook == HOOK_TO_NETDEV)
		return TC_ACT_OK;
	ifindex = fwd_egress(skb, p, p->dst, &local);
	if (!ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	if (local)
		return TC_ACT_OK;
	return fwd_redirect(skb, p, ifindex);
}

/* A packet of a tracked flow, in either direction. Returns -1 on a miss. */
static __always_inline int track(struct __sk_buff *skb, struct pkt *p, const struct config *cfg, __u8 dir,
				 enum hook hook, __u64 now)
{
	struct ct_key k;
	int in_new;
	ct_key_of(&k, p, dir);
	struct ct_val *v = ct_lookup(&k, now, &in_new);
	if (!v)
		return -1;
	/* A SYN reusing the 4-tuple of a flow that is closing (TIME_WAIT reuse)
	 * opens a new flow, balanced again as netfilter does, rather than going
	 * after a backend that may be gone. A SYN of an open flow (a retransmit)
	 * follows it, unless the flow's reply entry is gone: its SYN-ACK would
	 * meet nothing that turns it back, and the node's stack would reset it,
	 * for every later connection reusing the tuple (seen after a copy across
	 * map layouts kept such an entry); it opens a new flow too. */
	if (dir == CT_ORIGINAL && p->proto == IPPROTO_TCP &&
	    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		int closing = v->flags & CT_CLOSING;
		if (closing || !ct_has_partner(&k, v, in_new)) {
			if (!closing)
				stat_inc(STAT_CT_ORPHAN_SYN);
			ct_forget(&k, v, p, in_new);
			return -1;
		}
	}
	__u32 src[4], dst[4];
	__builtin_memcpy(src, v->new_src, 16);
	__builtin_memcpy(dst, v->new_dst, 16);
	__be16 sport = v->new_sport, dport = v->new_dport;
	__u8 v_flags = v->flags;
	/* Copied out first: confirming removes v from ferry_ct_new. */
	ct_follow(&k, v, p, dir, cfg, now, in_new);
	if (nat_rewrite(skb, p, src, sport, dst, dport) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	/* DSR: a local endpoint's SYN-ACK to a client whose address was kept (dsr.h). */
	if (dir == CT_REPLY && (cfg->flags & CFG_DSR_ANY) && p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN) &&
	    !(v_flags & CT_SNAT) && !lb_in_range(RANGE_POD, p->family, p->dst) && dsr_clamp_mss(skb, p) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_PKT_FORWARD);
	return deliver(skb, p, hook);
}

/* The backend (id) a new flow of `service` goes to under route action
 * `act`, tc and XDP alike: Maglev's choice when the service uses Maglev and
 * not ClientIP affinity, else the set's pick (which keeps an affine client's
 * backend). 0: none. */
static __always_inline __u32 lb_choose(__u32 service, const struct svc_val *svc, __u8 act, const struct pkt *p,
				       const struct config *cfg)
{
	struct aff_key aff = {};
	__builtin_memcpy(aff.client, p->src, 16);
	__u8 set = (act & ACT_MASK) == ACT_FORWARD_LOCAL ? SET_LOCAL : SET_CLUSTER;
	__u32 id = 0;
	if ((svc->flags & SVC_MAGLEV) && !(svc->flags & SVC_AFFINITY))
		id = lb_maglev(service, set, flow_hash(p->src, p->dst, p->sport, p->dport, p->proto), cfg->maglev_size);
	if (!id)
		id = lb_pick(service, svc, set, &aff);
	return id;
}

/* A first packet: load-balance it if it is for a frontend. */
static __always_inline int new_flow(struct __sk_buff *skb, struct pkt *p, const struct config *cfg, enum hook hook,
				    __u64 now)
{
	if (!has_ports(p->proto))
		return TC_ACT_OK;
	struct fe_val *fe = lb_lookup_frontend(p->dst, p->family, p->dport, p->proto);
	if (!fe) {
		if (lb_in_range(RANGE_SERVICE, p->family, p->dst))
			return drop_packet(STAT_DROP_SERVICE_CIDR);
		return TC_ACT_OK;
	}
	if (fe->kind == FE_CLUSTER_IP_ANY_PORT)
		return hook == HOOK_TO_NETDEV ? TC_ACT_OK : reject(skb, p);

	__u32 service = fe->service;
	struct svc_val *svc = bpf_map_lookup_elem(&ferry_services, &service);
	if (!svc) {
		stat_inc(STAT_GIVEUP_NO_SERVICE);
		return TC_ACT_OK;
	}
	__u8 class = classify(p, cfg, hook);
	if ((fe->flags & FE_FIREWALL) && !lb_firewall_allows(service, p->family, p->src))
		return drop_packet(STAT_DROP_FIREWALL);
	__u8 act = lb_action(svc, fe, class);
	switch (act & ACT_MASK) {
	case ACT_REJECT:
		return hook == HOOK_TO_NETDEV ? TC_ACT_OK : reject(skb, p);
	case ACT_DROP:
		return drop_packet(STAT_DROP_NO_ENDPOINT);
	case ACT_FORWARD_CLUSTER:
	case ACT_FORWARD_LOCAL:
		break;
	default:
		return TC_ACT_OK;
	}
	/* The node's own connections are the socket path's; it only leaves drops to us. */
	if (hook == HOOK_TO_NETDEV)
		return TC_ACT_OK;
	/* Mid-flow TCP without conntrack: its entry was evicted (LRU), expired
	 * or purged, and the flow is re-balanced (it may be reset). */
	if (p->proto == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
		stat_inc(STAT_CT_LOST);

	__u32 id = lb_choose(service, svc, act, p, cfg);
	struct backend *be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
	if (!be || be->family != p->family)
		return drop_packet(STAT_DROP_NO_ENDPOINT);
	__u32 bdst[4];
	__builtin_memcpy(bdst, be->addr, 16);
	__be16 bport = be->port;
	/* DSR: a remote backend's node answers the client itself (dsr.h); a
	 * backend whose node is unknown is reached by SNAT, as in snat mode. */
	if (hook == HOOK_FROM_NETDEV && !(be->flags & BE_LOCAL) && !addr_eq(p->src, bdst) &&
	    dsr_wanted(cfg, p, fe->kind, class) && dsr_pick(p->family, bdst, bport, id, service))
		return RC_DSR;
	/* A port change rewrites SCTP's CRC32c from the packet's length, which a first fragment
	 * tells only when it comes back from the defrag loop (none on this node, or it failed). */
	if (p->proto == IPPROTO_SCTP && bport != p->dport && p->frag != FRAG_NONE && !p->l4_len)
		return drop_packet(STAT_DROP_UNSUPPORTED);

	int local;
	__u32 ifindex = fwd_egress(skb, p, bdst, &local);
	if (!ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	/* Hairpin: the client is the endpoint; without SNAT its reply would skip the un-NAT. */
	int masq = ((act & ACT_MASQ) || addr_eq(p->src, bdst)) && !local;
	__u32 nsrc[4];
	if (masq)
		fwd_snat_address(cfg, ifindex, p->family, nsrc);
	else if (!note_peer(p->family, bdst))
		return drop_packet(STAT_DROP_PEERS_FULL);
	else
		__builtin_memcpy(nsrc, p->src, 16);
	__u32 why = STAT_DROP_CT_INSERT;
	__be16 nsport = ct_create(p, cfg, nsrc, p->sport, bdst, bport, masq, service, id, now, &why);
	if (!nsport)
		return drop_packet(why);
	if (nat_rewrite(skb, p, nsrc, nsport, bdst, bport) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_PKT_NEW_FLOW);
	if (local)
		return TC_ACT_OK;
	return fwd_redirect(skb, p, ifindex);
}

/* A new flow tunnelled here by another node (DSR): the inner packet still
 * names the frontend the client used (for a NodePort, the other node's
 * address). Traffic policy, source ranges and the endpoint were decided
 * there; here it goes to the endpoint the outer header named (`tag`,
 * dsr_local_endpoint). When no unique local endpoint of the service matches
 * (counted): the one Maglev picks when it is local, else one of the local
 * set. Tracked like any flow without SNAT, so the reply entry sends the
 * pod's replies from the frontend straight to the client. */
static __attribute__((noinline)) int tunnelled_flow(struct __sk_buff *skb, struct pkt *p, const struct config *cfg,
						    __u32 tag)
{
	__u64 now = bpf_ktime_get_ns();
	struct fe_key k = { .port = p->dport, .proto = p->proto, .family = p->family };

	__builtin_memcpy(k.addr, p->dst, 16);
	struct fe_val *fe = bpf_map_lookup_elem(&ferry_frontends, &k);
	if (!fe) {
		/* a NodePort, on the balancing node's address */
		__builtin_memset(k.addr, 0, sizeof(k.addr));
		fe = bpf_map_lookup_elem(&ferry_frontends, &k);
	}
	if (!fe || fe->kind == FE_CLUSTER_IP || fe->kind == FE_CLUSTER_IP_ANY_PORT)
		return drop_packet(STAT_DROP_NO_ENDPOINT);
	__u32 service = fe->service;
	struct svc_val *svc = bpf_map_lookup_elem(&ferry_services, &service);
	if (!svc)
		return drop_packet(STAT_DROP_NO_ENDPOINT);
	__u32 id = dsr_local_endpoint(service, svc, p->family, tag);
	struct backend *be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
	if (!id)
		stat_inc(STAT_DSR_ENDPOINT_FALLBACK);
	if (!id && (svc->flags & SVC_MAGLEV) && !(svc->flags & SVC_AFFINITY)) {
		id = lb_maglev(service, SET_CLUSTER, flow_hash(p->src, p->dst, p->sport, p->dport, p->proto),
			       cfg->maglev_size);
		be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
		if (!be || !(be->flags & BE_LOCAL))
			id = 0;
	}
	if (!id) {
		struct aff_key aff = {};
		__builtin_memcpy(aff.client, p->src, 16);
		id = lb_pick(service, svc, SET_LOCAL, &aff);
		be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
	}
	if (!be || be->family != p->family || !(be->flags & BE_LOCAL))
		return drop_packet(STAT_DROP_NO_ENDPOINT);
	__u32 bdst[4];
	__builtin_memcpy(bdst, be->addr, 16);
	__be16 bport = be->port;
	int local;
	__u32 ifindex = fwd_egress(skb, p, bdst, &local);
	if (!ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	if (!note_peer(p->family, bdst))
		return drop_packet(STAT_DROP_PEERS_FULL);
	__u32 why = STAT_DROP_CT_INSERT;
	__be16 nsport = ct_create(p, cfg, p->src, p->sport, bdst, bport, 0, service, id, now, &why);
	if (!nsport)
		return drop_packet(why);
	if (nat_rewrite(skb, p, p->src, nsport, bdst, bport) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_PKT_NEW_FLOW);
	if (local)
		return TC_ACT_OK;
	return fwd_redirect(skb, p, ifindex);
}

/* A packet with a transport header, step one: an ICMP error about a
 * translated flow, or a packet of a tracked flow. Returns -1 when it is
 * neither. Functions of their own (BPF-to-BPF calls) from here on: the
 * verifier's 512-byte stack budget is per call chain, and the steps'
 * frames are not live at the same time.
 *
 * A global function (not static): the verifier checks it once, for any
 * hook, instead of once for every path that reaches a call of it. With the
 * DSR tunnel's call (from_tunnel) ferry_from_netdev needed more than the
 * verifier's million instructions; as a global function, about 730k (base
 * 835k). Its pointer arguments may then be NULL as far as the verifier
 * knows. */
__attribute__((noinline)) int handle_tracked(struct __sk_buff *skb, struct pkt *p, const struct config *cfg,
					     enum hook hook, int original_first)
{
	if (!p || !cfg)
		return -1;
	__u64 now = bpf_ktime_get_ns();
	if (icmp_is_error(p)) {
		if (hook == HOOK_TO_NETDEV)
			return TC_ACT_OK;
		int rc = icmp_error_rev_nat(skb, p, now);
		if (rc < 0)
			return drop_packet(STAT_DROP_REWRITE);
		return rc ? deliver(skb, p, hook) : TC_ACT_OK;
	}
	/* Either order finds the flow (a packet matches one of its two entries);
	 * the likelier one first saves two lookups. */
	__u8 first = original_first ? CT_ORIGINAL : CT_REPLY;
	int rc = track(skb, p, cfg, first, hook, now);
	if (rc >= 0)
		return rc;
	return track(skb, p, cfg, first ^ 1, hook, now);
}

/* Step two: a new flow to a frontend, or pod egress to masquerade. */
static __attribute__((noinline)) int handle_new(struct __sk_buff *skb, struct pkt *p, const struct config *cfg,
						enum hook hook)
{
	__u64 now = bpf_ktime_get_ns();
	int rc = new_flow(skb, p, cfg, hook, now);
	if (rc == TC_ACT_OK && hook == HOOK_TO_NETDEV)
		return masquerade(skb, p, cfg, now);
	return rc;
}

/* A packet another node tunnelled here (DSR), the outer header checked
 * (dsr_is_tunnelled): unwrapped, then its flow is followed or begun. The
 * inner packet names the frontend on the other node, which the fast path
 * would pass on, and never is a fragment (dsr_wanted): none of the steps
 * of `handle` but these two apply. */
static __attribute__((noinline)) int from_tunnel(struct __sk_buff *skb, struct pkt *p, const struct config *cfg,
						 __u8 family)
{
	__u32 tag = dsr_carried_tag(skb, family);

	if (dsr_decap(skb, family) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_DSR_DECAP);
	if (!parse(skb, p))
		return TC_ACT_OK;
	if (p->frag != FRAG_NONE || p->family != family)
		return drop_packet(STAT_DROP_UNSUPPORTED);
	int rc = handle_tracked(skb, p, cfg, HOOK_FROM_TUNNEL, 1);
	return rc >= 0 ? rc : tunnelled_flow(skb, p, cfg, tag);
}

/* The defrag loop's ifindex if this packet may go into it (loop.h): an
 * ingress, and not back from the loop already. 0 otherwise. */
static __always_inline __u32 loop_for(enum hook hook, int back)
{
	__u32 zero = 0;

	if (back || hook == HOOK_TO_NETDEV || hook == HOOK_FROM_TUNNEL)
		return 0;
	struct loop_cfg *c = bpf_map_lookup_elem(&ferry_loop, &zero);
	return c ? c->ifindex : 0;
}

/* A fragment after the first: translated and sent on as its first fragment
 * was (frag.h), or into the defrag loop. A function of its own, as the steps
 * above. Only protocols whose first fragment gets a verdict may wait in the
 * loop for it. */
static __attribute__((noinline)) int handle_later_fragment(struct __sk_buff *skb, struct pkt *p, enum hook hook,
							   int back)
{
	int translated;
	__u32 loop = has_ports(p->frag_next) || p->frag_next == PROTO_ICMP || p->frag_next == PROTO_ICMPV6
			     ? loop_for(hook, back)
			     : 0;
	int rc = frag_follow(skb, p, loop, &translated);

	return translated ? deliver(skb, p, hook) : rc;
}

/* A first fragment, before the load balancer sees it: into the defrag loop
 * when a later fragment of its datagram went there first, or when it is SCTP
 * whose length only the whole packet tells (a port change must correct the
 * CRC32c over all of it). Back from the loop, an SCTP fragment gets the
 * length the loop noted. Returns -1 when the packet goes on as usual. */
static __attribute__((noinline)) int handle_first_fragment(struct __sk_buff *skb, struct pkt *p, enum hook hook,
							   int back)
{
	__u32 loop = loop_for(hook, back);

	if (back && p->proto == IPPROTO_SCTP)
		loop_sctp_len(skb, p);
	if (loop && (p->proto == IPPROTO_SCTP || frag_looping(p)))
		return frag_first_to_loop(skb, loop);
	return -1;
}

static __always_inline int handle(struct __sk_buff *skb, enum hook hook)
{
	struct pkt p;
	struct config *cfg = load_config();
	if (!cfg)
		return TC_ACT_OK;
	/* DSR: another node's tunnel to one of our endpoints (dsr.h). */
	if (hook == HOOK_FROM_NETDEV && (cfg->flags & CFG_DSR_ANY)) {
		int tunnel = dsr_is_tunnelled(skb);
		if (tunnel != DSR_TUNNEL_NONE)
			return from_tunnel(skb, &p, cfg, tunnel == DSR_TUNNEL_V4 ? FAM_V4 : FAM_V6);
	}
	enum glance glance = glance_at(skb, cfg, hook);
	/* Back from the defrag loop (mark cleared here): never sent into it again. */
	int back = loop_back(skb);
	if (glance == GLANCE_PASS || !parse(skb, &p))
		return TC_ACT_OK;
	/* DSR: a flow this node tunnels goes on the same way (dsr.h). Its
	 * packets are sent to a frontend address (ferry_addrs). */
	if (hook == HOOK_FROM_NETDEV && (cfg->flags & CFG_DSR_ANY) && has_ports(p.proto) &&
	    (glance == GLANCE_TO_ADDR || !(cfg->flags & CFG_FAST_PASS))) {
		int rc = dsr_tracked(skb, &p, cfg);
		if (rc >= 0)
			return rc;
	}
	if (p.frag == FRAG_LATER)
		return handle_later_fragment(skb, &p, hook, back);
	if (p.frag == FRAG_FIRST) {
		frag_arrived(&p);
		int looped = handle_first_fragment(skb, &p, hook, back);
		if (looped >= 0) {
			frag_remember(&p, looped);
			return looped;
		}
	}
	/* Sent to a frontend or node address, not to a SNAT port there: the
	 * original direction of a flow, most likely (a reply to a SNATed flow
	 * comes to a port of natPortRange, which never overlaps NodePorts). */
	__u16 dport = bpf_ntohs(p.dport);
	int original_first =
		glance == GLANCE_TO_ADDR && (dport < cfg->nat_port_min || dport > cfg->nat_port_max);
	int rc = handle_tracked(skb, &p, cfg, hook, original_first);
	if (rc < 0)
		rc = handle_new(skb, &p, cfg, hook);
	/* Called from here, not from new_flow: its frame would not fit on top. */
	if (rc == RC_DSR)
		rc = dsr_new_flow(skb, &p, cfg);
	if (p.frag == FRAG_FIRST)
		frag_remember(&p, rc);
	return rc;
}

/* ---- XDP acceleration (xdp.h) ----
 *
 * The same decisions as ferry_from_netdev, in the same order, from the same
 * maps and helpers: a DSR flow, a tracked flow, a new flow to a frontend.
 * Whatever tc would answer other than "translate and send it out of an
 * uplink" (deliver locally, reject, drop, a verdict XDP leaves to tc) is
 * passed to tc untouched, which then decides it as it always did; state XDP
 * wrote before a pass (an affinity, nothing else) is what tc would write. */

/* What the steps below answer besides -1 ("not this step's") and an XDP
 * action (a pass, counted): send the packet as `out` says, rewritten
 * (xdp_send) or tunnelled (xdp_send_dsr). ferry_xdp sends it, so that no
 * step's stack frame lies under the sending function's. */
#define XDP_DO_SEND 0x100
#define XDP_DO_TUNNEL 0x101

/* A packet of a flow this node tunnels (DSR): into the tunnel as its first
 * packet was. An entry that is over (dsr_over) is tc's to remove and
 * balance anew. */
__attribute__((noinline)) int xdp_dsr_tracked(struct xdp_md *ctx, struct pkt *p, const struct config *cfg,
					      struct xdp_out *out)
{
	struct ct_key k;

	if (!p || !cfg || !out)
		return -1;
	__u64 now = bpf_ktime_get_ns();
	ct_key_of(&k, p, CT_ORIGINAL);
	if (p->family == FAM_V4) {
		struct dsr_val *v = bpf_map_lookup_elem(&ferry_dsr, &k);
		if (!v)
			return -1;
		if (dsr_over(v, p, now))
			return xdp_pass(STAT_XDP_PASS_TC);
		out->dst[0] = v->via;
		if (!xdp_route(ctx, p, out->dst, xdp_l3_len(ctx) + DSR_OVERHEAD, out))
			return xdp_pass(STAT_XDP_PASS_FIB);
		dsr_refresh(v, p, cfg, now);
		out->via[0] = v->via;
		out->outer_src[0] = v->outer_src;
		out->tag = dsr_tag_of(FAM_V4, &v->backend_addr);
		return XDP_DO_TUNNEL;
	}
	struct dsr6_val *v = bpf_map_lookup_elem(&ferry_dsr6, &k);
	if (!v)
		return -1;
	if (dsr_over_(v->flags, v->expires_ns, p, now))
		return xdp_pass(STAT_XDP_PASS_TC);
	__builtin_memcpy(out->dst, v->via, 16);
	if (!xdp_route(ctx, p, out->dst, xdp_l3_len(ctx) + DSR6_OVERHEAD, out))
		return xdp_pass(STAT_XDP_PASS_FIB);
	dsr_refresh_(&v->flags, &v->expires_ns, p, cfg, now);
	__builtin_memcpy(out->via, v->via, 16);
	__builtin_memcpy(out->outer_src, v->outer_src, 16);
	out->tag = dsr_tag_of(FAM_V6, v->backend_addr);
	return XDP_DO_TUNNEL;
}

/* One direction of xdp_tracked. */
static __always_inline int xdp_track(struct xdp_md *ctx, struct pkt *p, const struct config *cfg,
				     struct xdp_out *out, __u8 dir, __u64 now)
{
	struct ct_key k;
	int in_new;

	ct_key_of(&k, p, dir);
	struct ct_val *v = ct_lookup(&k, now, &in_new);
	if (!v)
		return -1;
	/* tc's: a SYN meeting a tracked flow (opened anew when the flow is
	 * closing or lost its reply entry: track), and a SYN-ACK to a client
	 * whose address was kept (the DSR MSS clamp). */
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN) &&
	    ((dir == CT_ORIGINAL && !(p->tcp_flags & TCP_FLAG_ACK)) || (dir == CT_REPLY && !(v->flags & CT_SNAT))))
		return xdp_pass(STAT_XDP_PASS_TC);
	__builtin_memcpy(out->src, v->new_src, 16);
	__builtin_memcpy(out->dst, v->new_dst, 16);
	out->sport = v->new_sport;
	out->dport = v->new_dport;
	if (!xdp_route(ctx, p, out->dst, xdp_l3_len(ctx), out))
		return xdp_pass(STAT_XDP_PASS_FIB);
	ct_follow(&k, v, p, dir, cfg, now, in_new);
	stat_inc(STAT_XDP_FORWARD);
	return XDP_DO_SEND;
}

/* A packet of a tracked flow, in either direction (handle_tracked's order). */
__attribute__((noinline)) int xdp_tracked(struct xdp_md *ctx, struct pkt *p, const struct config *cfg,
					  struct xdp_out *out, int original_first)
{
	if (!p || !cfg || !out)
		return -1;
	__u64 now = bpf_ktime_get_ns();
	__u8 first = original_first ? CT_ORIGINAL : CT_REPLY;
	int rc = xdp_track(ctx, p, cfg, out, first, now);
	if (rc >= 0)
		return rc;
	return xdp_track(ctx, p, cfg, out, first ^ 1, now);
}

/* A new flow DSR carries (new_flow's RC_DSR, then dsr_new_flow), to the
 * backend `id` that out names. */
static __always_inline int xdp_dsr_new(struct xdp_md *ctx, struct pkt *p, const struct config *cfg,
				       const __u32 *via, __u32 id, __u32 service, struct xdp_out *out)
{
	__u32 zero = 0, backend_addr[4];
	__be16 backend_port = out->dport;
	struct ct_scratch *s = bpf_map_lookup_elem(&ferry_ct_scratch, &zero);

	if (!s)
		return xdp_pass(STAT_XDP_PASS_TC);
	__builtin_memcpy(backend_addr, out->dst, 16);
	__builtin_memcpy(out->dst, via, 16);
	if (!xdp_route(ctx, p, out->dst, xdp_l3_len(ctx) + dsr_overhead(p->family), out))
		return xdp_pass(STAT_XDP_PASS_FIB);
	fwd_snat_address(cfg, out->ifindex, p->family, out->src);
	if (p->family == FAM_V4) {
		s->dsr.via = via[0];
		s->dsr.backend = id;
		s->dsr.service = service;
		s->dsr.backend_addr = backend_addr[0];
		s->dsr.backend_port = backend_port;
	} else {
		__builtin_memcpy(s->dsr6.via, via, 16);
		s->dsr6.backend = id;
		s->dsr6.service = service;
		__builtin_memcpy(s->dsr6.backend_addr, backend_addr, 16);
		s->dsr6.backend_port = backend_port;
	}
	if (dsr_record(s, p, cfg, out->src) < 0)
		return xdp_pass(STAT_XDP_PASS_TC);
	__builtin_memcpy(out->via, via, 16);
	__builtin_memcpy(out->outer_src, out->src, 16);
	out->tag = dsr_tag_of(p->family, backend_addr);
	stat_inc(STAT_XDP_NEW_FLOW);
	return XDP_DO_TUNNEL;
}

/* A first packet to a frontend (new_flow's decisions, in its order), for
 * a NodePort, LoadBalancer IP or ExternalIP whose backend is on another
 * node: DNAT (+SNAT as the model's route says), or DSR. */
__attribute__((noinline)) int xdp_new(struct xdp_md *ctx, struct pkt *p, const struct config *cfg,
				      struct xdp_out *out)
{
	if (!p || !cfg || !out)
		return XDP_PASS;
	struct fe_val *fe = lb_lookup_frontend(p->dst, p->family, p->dport, p->proto);
	/* Not a frontend (the node's own traffic, an unallocated ClusterIP):
	 * tc's to pass on or drop, uncounted here like any traffic not ours. */
	if (!fe)
		return XDP_PASS;
	if (fe->kind == FE_CLUSTER_IP || fe->kind == FE_CLUSTER_IP_ANY_PORT)
		return xdp_pass(STAT_XDP_PASS_TC);
	__u32 service = fe->service;
	struct svc_val *svc = bpf_map_lookup_elem(&ferry_services, &service);
	if (!svc)
		return xdp_pass(STAT_XDP_PASS_TC);
	__u8 class = classify(p, cfg, HOOK_FROM_NETDEV);
	if ((fe->flags & FE_FIREWALL) && !lb_firewall_allows(service, p->family, p->src))
		return xdp_pass(STAT_XDP_PASS_TC);
	__u8 act = lb_action(svc, fe, class);
	if ((act & ACT_MASK) != ACT_FORWARD_CLUSTER && (act & ACT_MASK) != ACT_FORWARD_LOCAL)
		return xdp_pass(STAT_XDP_PASS_TC);
	/* Mid-flow TCP without conntrack: tc counts it (ct_lost) and balances it anew. */
	if (p->proto == IPPROTO_TCP && !(p->tcp_flags & TCP_FLAG_SYN))
		return xdp_pass(STAT_XDP_PASS_TC);

	__u32 id = lb_choose(service, svc, act, p, cfg);
	struct backend *be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
	/* A local backend is delivered by the kernel (tc); the client as its
	 * own backend (hairpin) needs tc's SNAT to itself. */
	if (!be || be->family != p->family || (be->flags & BE_LOCAL) || addr_eq(p->src, be->addr))
		return xdp_pass(STAT_XDP_PASS_TC);
	__builtin_memcpy(out->dst, be->addr, 16);
	out->dport = be->port;
	if (dsr_wanted(cfg, p, fe->kind, class)) {
		__u32 via[4] = {};
		int known;
		if (p->family == FAM_V4) {
			via[0] = dsr_tunnel_of(out->dst[0]);
			known = via[0] != 0;
		} else {
			known = dsr6_tunnel_of(out->dst, via);
		}
		if (known)
			return xdp_dsr_new(ctx, p, cfg, via, id, service, out);
		stat_inc(STAT_DSR_NO_TUNNEL);
	}
	if (!xdp_route(ctx, p, out->dst, xdp_l3_len(ctx), out))
		return xdp_pass(STAT_XDP_PASS_FIB);
	int masq = act & ACT_MASQ;
	if (masq)
		fwd_snat_address(cfg, out->ifindex, p->family, out->src);
	else if (!note_peer(p->family, out->dst))
		return xdp_pass(STAT_XDP_PASS_TC);
	else
		__builtin_memcpy(out->src, p->src, 16);
	__u32 why = STAT_DROP_CT_INSERT;
	__u64 now = bpf_ktime_get_ns();
	out->sport = ct_create(p, cfg, out->src, p->sport, out->dst, out->dport, masq, service, id, now, &why);
	if (!out->sport)
		return xdp_pass(STAT_XDP_PASS_TC);
	stat_inc(STAT_XDP_NEW_FLOW);
	return XDP_DO_SEND;
}

SEC("xdp")
int ferry_xdp(struct xdp_md *ctx)
{
	struct xdp_out out = {};
	struct pkt p;
	struct config *cfg = load_config();
	int rc = -1;

	if (!cfg)
		return XDP_PASS;
	enum xdp_seen seen = xdp_parse(ctx, &p, cfg);
	if (seen == XDP_SEEN_NOT_OURS)
		return XDP_PASS;
	if (seen == XDP_SEEN_SHAPE)
		return xdp_pass(STAT_XDP_PASS_SHAPE);
	if (cfg->flags & CFG_DSR_ANY)
		rc = xdp_dsr_tracked(ctx, &p, cfg, &out);
	if (rc < 0) {
		/* As in handle: to a SNAT port, the reply direction first. */
		__u16 dport = bpf_ntohs(p.dport);
		rc = xdp_tracked(ctx, &p, cfg, &out, dport < cfg->nat_port_min || dport > cfg->nat_port_max);
	}
	if (rc < 0)
		rc = xdp_new(ctx, &p, cfg, &out);
	if (rc == XDP_DO_SEND)
		return xdp_send(ctx, &p, &out);
	if (rc == XDP_DO_TUNNEL)
		return xdp_send_dsr(ctx, &out);
	return rc;
}

SEC("tcx/ingress")
int ferry_from_netdev(struct __sk_buff *skb)
{
	return handle(skb, HOOK_FROM_NETDEV);
}

SEC("tcx/ingress")
int ferry_from_pods(struct __sk_buff *skb)
{
	return handle(skb, HOOK_FROM_PODS);
}

SEC("tcx/egress")
int ferry_to_netdev(struct __sk_buff *skb)
{
	return handle(skb, HOOK_TO_NETDEV);
}

SEC("tcx/ingress")
int ferry_from_loop(struct __sk_buff *skb)
{
	return loop_return(skb);
}

SEC("netfilter")
int ferry_defrag_note(struct bpf_nf_ctx *ctx)
{
	loop_note_sctp(ctx->skb);
	return NF_ACCEPT;
}
