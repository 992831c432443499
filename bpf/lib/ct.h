/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking of the packet path: the two entries of a flow, their
 * lifetimes, and creating them together (with SNAT source-port allocation).
 */
#ifndef FERRY_CT_H
#define FERRY_CT_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "stats.h"

#define NAT_ATTEMPTS 16

static __always_inline void ct_key_of(struct ct_key *k, const struct pkt *p, __u8 dir)
{
	__builtin_memcpy(k->src, p->src, 16);
	__builtin_memcpy(k->dst, p->dst, 16);
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->family = p->family;
	k->dir = dir;
	k->pad = 0;
}

/* The other entry of the flow `v` belongs to: its key is what `v` rewrites to, reversed. */
static __always_inline void ct_partner_key(struct ct_key *k, const struct ct_val *v, __u8 proto, __u8 family,
					   __u8 dir)
{
	__builtin_memcpy(k->src, v->new_dst, 16);
	__builtin_memcpy(k->dst, v->new_src, 16);
	k->sport = v->new_dport;
	k->dport = v->new_sport;
	k->proto = proto;
	k->family = family;
	k->dir = dir == CT_ORIGINAL ? CT_REPLY : CT_ORIGINAL;
	k->pad = 0;
}

static __always_inline __u64 ct_lifetime(const struct config *cfg, __u8 proto, __u8 flags)
{
	__u32 s;

	if (proto == IPPROTO_TCP) {
		if (flags & CT_CLOSING)
			s = cfg->tcp_close_timeout;
		else if (flags & CT_REPLIED)
			s = cfg->tcp_established_timeout;
		else
			s = cfg->tcp_syn_timeout;
	} else {
		s = cfg->udp_timeout;
	}
	if (s == 0)
		s = 30;
	return (__u64)s * NSEC_PER_SEC;
}

/* The live entry for `k`, or NULL. Expired entries are removed on sight. */
static __always_inline struct ct_val *ct_lookup(const struct ct_key *k, __u64 now)
{
	struct ct_val *v = bpf_map_lookup_elem(&ferry_ct, k);

	if (v && v->expires_ns < now) {
		bpf_map_delete_elem(&ferry_ct, k);
		return NULL;
	}
	return v;
}

/* Keeps a flow alive: both entries, but the partner only when something
 * changed or half the lifetime has passed, so steady traffic costs one lookup. */
static __always_inline void ct_refresh(struct ct_val *v, const struct pkt *p, __u8 dir, const struct config *cfg,
				       __u64 now)
{
	__u8 flags = v->flags;

	if (dir == CT_REPLY)
		flags |= CT_REPLIED;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= CT_CLOSING;
	__u64 life = ct_lifetime(cfg, p->proto, flags);
	if (flags == v->flags && v->expires_ns > now + life / 2)
		return;
	v->flags = flags;
	v->expires_ns = now + life;

	struct ct_key pk;
	ct_partner_key(&pk, v, p->proto, p->family, dir);
	struct ct_val *pv = bpf_map_lookup_elem(&ferry_ct, &pk);
	if (pv) {
		pv->flags = flags;
		pv->expires_ns = now + life;
	}
}

/* Forgets a flow, given its original-direction key `k` (rewritten in place:
 * first into the reply entry's key, then back) and value. */
static __always_inline void ct_forget(struct ct_key *k, const struct ct_val *v, const struct pkt *p)
{
	__builtin_memcpy(k->src, v->new_dst, 16);
	__builtin_memcpy(k->dst, v->new_src, 16);
	k->sport = v->new_dport;
	k->dport = v->new_sport;
	k->dir = CT_REPLY;
	bpf_map_delete_elem(&ferry_ct, k);
	ct_key_of(k, p, CT_ORIGINAL);
	bpf_map_delete_elem(&ferry_ct, k);
}

/* Creates both entries of a new flow: original (as it arrived: p) -> rewrite to
 * (nsrc:nsport -> ndst:ndport); reply (ndst:ndport -> nsrc:nsport) -> rewrite
 * back. With `snat`, the source port is chosen from the NAT range until the
 * reply tuple is free. Returns the source port used, or 0 on failure with the
 * drop reason in *why (the caller drops with it). */
static __always_inline __be16 ct_create(const struct pkt *p, const struct config *cfg, const __u32 *nsrc,
					__be16 nsport, const __u32 *ndst, __be16 ndport, int snat, __u32 service,
					__u32 backend, __u64 now, __u32 *why)
{
	struct ct_val orig = { .new_sport = nsport, .new_dport = ndport, .backend = backend, .service = service };
	struct ct_val reply = { .new_sport = p->dport, .new_dport = p->sport, .backend = backend, .service = service };
	struct ct_key rk = { .dport = nsport, .sport = ndport, .proto = p->proto, .family = p->family, .dir = CT_REPLY };
	__u64 life = ct_lifetime(cfg, p->proto, 0);
	int i;

	__builtin_memcpy(orig.new_src, nsrc, 16);
	__builtin_memcpy(orig.new_dst, ndst, 16);
	__builtin_memcpy(reply.new_src, p->dst, 16);
	__builtin_memcpy(reply.new_dst, p->src, 16);
	orig.flags = reply.flags = snat ? CT_SNAT : 0;
	orig.expires_ns = reply.expires_ns = now + life;
	__builtin_memcpy(rk.src, ndst, 16);
	__builtin_memcpy(rk.dst, nsrc, 16);

	/* ICMP echo: the identifier is both "ports", and the reply carries the same one. */
	int icmp = p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6;
	if (icmp)
		rk.sport = rk.dport;
	__u32 lo = cfg->nat_port_min, hi = cfg->nat_port_max;
	if (lo == 0 || hi < lo) {
		lo = 1024;
		hi = 29999;
	}
	for (i = 0; i < NAT_ATTEMPTS; i++) {
		if (snat && p->proto != IPPROTO_SCTP) {
			/* First try the client's own port: many flows need no port change at all. */
			__u16 port = i == 0 && bpf_ntohs(p->sport) >= lo && bpf_ntohs(p->sport) <= hi
					     ? bpf_ntohs(p->sport)
					     : lo + bpf_get_prandom_u32() % (hi - lo + 1);
			rk.dport = bpf_htons(port);
			if (icmp)
				rk.sport = rk.dport;
		}
		if (bpf_map_update_elem(&ferry_ct, &rk, &reply, BPF_NOEXIST) == 0)
			break;
		/* An expired flow may still hold the tuple. */
		struct ct_val *old = bpf_map_lookup_elem(&ferry_ct, &rk);
		if (old && old->expires_ns < now) {
			bpf_map_delete_elem(&ferry_ct, &rk);
			if (bpf_map_update_elem(&ferry_ct, &rk, &reply, BPF_NOEXIST) == 0)
				break;
		}
		if (!snat || p->proto == IPPROTO_SCTP) {
			*why = STAT_DROP_CT_CLASH;
			return 0;
		}
		stat_inc(STAT_NAT_RETRY);
	}
	if (i == NAT_ATTEMPTS) {
		*why = STAT_DROP_NAT_EXHAUSTED;
		return 0;
	}
	orig.new_sport = rk.dport;
	if (icmp)
		orig.new_dport = rk.dport;
	struct ct_key ok;
	ct_key_of(&ok, p, CT_ORIGINAL);
	if (bpf_map_update_elem(&ferry_ct, &ok, &orig, BPF_ANY) != 0) {
		bpf_map_delete_elem(&ferry_ct, &rk);
		*why = STAT_DROP_CT_INSERT;
		return 0;
	}
	return rk.dport;
}

#endif
