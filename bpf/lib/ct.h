/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Connection tracking of the packet path: the two entries of a flow, their
 * lifetimes, creating them together (with SNAT source-port allocation) in
 * the table of unconfirmed flows, and confirming them into the main table
 * (maps.h says why there are two).
 */
#ifndef FERRY_CT_H
#define FERRY_CT_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "stats.h"

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

/* Whether two entries translate alike (the same flow's entry, or one of the
 * same tuple with the same translation). */
static __always_inline int ct_same_translation(const struct ct_val *a, const struct ct_val *b)
{
	return a->new_sport == b->new_sport && a->new_dport == b->new_dport && addr_eq(a->new_src, b->new_src) &&
	       addr_eq(a->new_dst, b->new_dst);
}

/* How long an entry lives without traffic. An unconfirmed TCP flow keeps the
 * SYN lifetime even after its SYN-ACK (netfilter's SYN_RECV): a half-open
 * flow of a SYN flood must not hold ferry_ct_new for tcpEstablishedTimeout. */
static __always_inline __u64 ct_lifetime(const struct config *cfg, __u8 proto, __u8 flags, int unconfirmed)
{
	__u32 s;

	if (proto == IPPROTO_TCP) {
		if (flags & CT_CLOSING)
			s = cfg->tcp_close_timeout;
		else if ((flags & CT_REPLIED) && !unconfirmed)
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

/* Removes an entry of ferry_ct_new. Counted (ct_new_delete), so that
 * evictions can be told apart: inserts - datapath deletes - agent deletes -
 * entries left = entries the LRU evicted. */
static __always_inline void ct_new_delete(const struct ct_key *k)
{
	if (bpf_map_delete_elem(&ferry_ct_new, k) == 0)
		stat_inc(STAT_CT_NEW_DELETE);
}

/* During an upgrade's link switch (ferry_ct_prev, maps.h): a flow the
 * outgoing programs created in the retired table after the agent's first
 * copy, found there by `k`, is copied into ferry_ct_new with its partner
 * entry (as the agent's late copy would, a few milliseconds later; its
 * NOEXIST then keeps what is written here). Returns whether `k` is in
 * ferry_ct_new now. A function of its own: its key is not on the caller's
 * stack. */
static __attribute__((noinline)) int ct_adopt_retired(const struct ct_key *k)
{
	__u32 zero = 0;
	void *prev = bpf_map_lookup_elem(&ferry_ct_prev, &zero);

	if (!prev)
		return 0;
	struct ct_val *v = bpf_map_lookup_elem(prev, k);
	if (!v)
		return 0;
	struct ct_key pk;
	ct_partner_key(&pk, v, k->proto, k->family, k->dir);
	struct ct_val *pv = bpf_map_lookup_elem(prev, &pk);
	if (pv && bpf_map_update_elem(&ferry_ct_new, &pk, pv, BPF_NOEXIST) == 0)
		stat_inc(STAT_CT_NEW_INSERT);
	if (bpf_map_update_elem(&ferry_ct_new, k, v, BPF_NOEXIST) != 0)
		return 0;
	stat_inc(STAT_CT_NEW_INSERT);
	stat_inc(STAT_CT_ADOPTED);
	return 1;
}

/* During an upgrade's link switch: whether the retired table holds an open
 * flow under `k` with another translation than the closing flow `v` (found
 * by `k` in ferry_ct_new if `in_new`, else ferry_ct): the outgoing programs
 * opened the tuple again (a client reusing a TIME_WAIT port, re-balanced)
 * after the agent copied its closing predecessor. Then both entries of `v`
 * are removed here, for ct_adopt_retired to take the open flow; following
 * the stale copy would send the new connection's segments to the old flow's
 * backend, which resets it. (A flow of the retired table that this side
 * closed and opened again itself is gone from there: ct_forget_retired.) */
static __attribute__((noinline)) int ct_reopened(const struct ct_key *k, const struct ct_val *v, int in_new)
{
	__u32 zero = 0;
	void *prev = bpf_map_lookup_elem(&ferry_ct_prev, &zero);

	if (!prev)
		return 0;
	struct ct_val *open = bpf_map_lookup_elem(prev, k);
	if (!open || (open->flags & CT_CLOSING))
		return 0;
	if (ct_same_translation(open, v))
		return 0;
	struct ct_key pk;
	ct_partner_key(&pk, v, k->proto, k->family, k->dir);
	if (in_new) {
		ct_new_delete(&pk);
		ct_new_delete(k);
	} else {
		bpf_map_delete_elem(&ferry_ct, &pk);
		bpf_map_delete_elem(&ferry_ct, k);
	}
	return 1;
}

/* The live entry for `k` (confirmed flows first, then unconfirmed ones), or
 * NULL; *in_new says which table holds it. Expired entries are removed on
 * sight. While an upgrade switches the links, a miss (or a closing flow the
 * old programs have opened again since) is looked up in the retired table. */
static __always_inline struct ct_val *ct_lookup(const struct ct_key *k, __u64 now, int *in_new)
{
	struct ct_val *v = bpf_map_lookup_elem(&ferry_ct, k);

	*in_new = 0;
	if (!v) {
		v = bpf_map_lookup_elem(&ferry_ct_new, k);
		*in_new = 1;
	}
	if (v && (v->flags & CT_CLOSING) && ct_reopened(k, v, *in_new))
		v = NULL;
	if (!v) {
		*in_new = 1;
		if (ct_adopt_retired(k))
			v = bpf_map_lookup_elem(&ferry_ct_new, k);
	}
	if (v && v->expires_ns < now) {
		if (*in_new)
			ct_new_delete(k);
		else
			bpf_map_delete_elem(&ferry_ct, k);
		return NULL;
	}
	return v;
}

/* Keeps a flow alive: both entries, but the partner only when something
 * changed or half the lifetime has passed, so steady traffic costs one lookup. */
static __always_inline void ct_refresh(struct ct_val *v, const struct pkt *p, __u8 dir, const struct config *cfg,
				       __u64 now, int in_new)
{
	__u8 flags = v->flags;

	if (dir == CT_REPLY)
		flags |= CT_REPLIED;
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
		flags |= CT_CLOSING;
	__u64 life = ct_lifetime(cfg, p->proto, flags, in_new);
	if (flags == v->flags && v->expires_ns > now + life / 2)
		return;
	v->flags = flags;
	v->expires_ns = now + life;

	struct ct_key pk;
	ct_partner_key(&pk, v, p->proto, p->family, dir);
	struct ct_val *pv = in_new ? bpf_map_lookup_elem(&ferry_ct_new, &pk) : bpf_map_lookup_elem(&ferry_ct, &pk);
	if (pv) {
		pv->flags = flags;
		pv->expires_ns = now + life;
	}
}

/* Whether an unconfirmed flow is confirmed by this packet (after ct_refresh):
 * TCP once its handshake completed, i.e. the client's first segment after the
 * reply that carries neither SYN nor RST (a SYN flood's half-open flows never
 * get there; netfilter "assures" a TCP flow at the same point); any other
 * protocol on its first reply. */
static __always_inline int ct_confirms(const struct ct_val *v, const struct pkt *p, __u8 dir)
{
	if (p->proto != IPPROTO_TCP)
		return dir == CT_REPLY;
	return dir == CT_ORIGINAL && (v->flags & CT_REPLIED) && !(p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST));
}

/* Moves a flow (the entry `k` -> `v` found in ferry_ct_new, and its partner,
 * which takes v's flags and deadline) into ferry_ct: written there first,
 * then removed here. ferry_ct never
 * evicts; when it is full the flow stays where it is (ct_confirm_full). A
 * flow whose partner entry was evicted meanwhile is left to expire. A
 * function of its own: its key is not on the caller's stack. */
static __attribute__((noinline)) void ct_confirm(const struct ct_key *k, struct ct_val *v, __u8 proto, __u8 family,
						 __u8 dir)
{
	struct ct_key pk;

	ct_partner_key(&pk, v, proto, family, dir);
	struct ct_val *pv = bpf_map_lookup_elem(&ferry_ct_new, &pk);
	if (!pv)
		return;
	pv->flags = v->flags;
	pv->expires_ns = v->expires_ns;
	if (bpf_map_update_elem(&ferry_ct, k, v, BPF_ANY) != 0) {
		stat_inc(STAT_CT_CONFIRM_FULL);
		return;
	}
	if (bpf_map_update_elem(&ferry_ct, &pk, pv, BPF_ANY) != 0) {
		bpf_map_delete_elem(&ferry_ct, k);
		stat_inc(STAT_CT_CONFIRM_FULL);
		return;
	}
	ct_new_delete(&pk);
	ct_new_delete(k);
	stat_inc(STAT_CT_CONFIRM);
}

/* A packet of a tracked flow, its entry `k` -> `v` found: keeps the flow
 * alive and confirms it when this packet does (ct_confirms). Confirming
 * removes v from ferry_ct_new: the caller reads what it needs of v first. */
static __always_inline void ct_follow(const struct ct_key *k, struct ct_val *v, const struct pkt *p, __u8 dir,
				      const struct config *cfg, __u64 now, int in_new)
{
	ct_refresh(v, p, dir, cfg, now, in_new);
	if (in_new && ct_confirms(v, p, dir)) {
		v->expires_ns = now + ct_lifetime(cfg, p->proto, v->flags, 0);
		ct_confirm(k, v, p->proto, p->family, dir);
	}
}

/* During an upgrade's link switch: the flow `v` (original-direction key `k`)
 * that this side forgets to open its tuple again is removed from the retired
 * table too, where its entries (same translation) may still say it is open:
 * ct_reopened would otherwise take that stale state for the outgoing
 * programs opening the tuple again. */
static __attribute__((noinline)) void ct_forget_retired(const struct ct_key *k, const struct ct_val *v)
{
	__u32 zero = 0;
	void *prev = bpf_map_lookup_elem(&ferry_ct_prev, &zero);

	if (!prev)
		return;
	struct ct_val *old = bpf_map_lookup_elem(prev, k);
	if (!old || !ct_same_translation(old, v))
		return;
	struct ct_key pk;
	ct_partner_key(&pk, v, k->proto, k->family, k->dir);
	bpf_map_delete_elem(prev, &pk);
	bpf_map_delete_elem(prev, k);
}

/* Forgets a flow, given its original-direction key `k` (rewritten in place:
 * first into the reply entry's key, then back) and value. */
static __always_inline void ct_forget(struct ct_key *k, const struct ct_val *v, const struct pkt *p, int in_new)
{
	ct_forget_retired(k, v);
	__builtin_memcpy(k->src, v->new_dst, 16);
	__builtin_memcpy(k->dst, v->new_src, 16);
	k->sport = v->new_dport;
	k->dport = v->new_sport;
	k->dir = CT_REPLY;
	if (in_new)
		ct_new_delete(k);
	else
		bpf_map_delete_elem(&ferry_ct, k);
	ct_key_of(k, p, CT_ORIGINAL);
	if (in_new)
		ct_new_delete(k);
	else
		bpf_map_delete_elem(&ferry_ct, k);
}

/* Whether the flow `v` (its entry `k`, found in ferry_ct_new if `in_new`)
 * still has its other entry, in the table `v` is in (both move together). A
 * reply entry evicted from ferry_ct_new, or one a copy across map layouts
 * left behind, leaves an original-direction entry whose replies nothing
 * turns back: the node's stack resets them. */
static __attribute__((noinline)) int ct_has_partner(const struct ct_key *k, const struct ct_val *v, int in_new)
{
	struct ct_key pk;

	ct_partner_key(&pk, v, k->proto, k->family, k->dir);
	if (in_new)
		return bpf_map_lookup_elem(&ferry_ct_new, &pk) != NULL;
	return bpf_map_lookup_elem(&ferry_ct, &pk) != NULL;
}

static __always_inline struct ct_scratch *ct_scratch(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ferry_ct_scratch, &zero);
}

/* While the links switch (ferry_ct_prev set): whether a live flow of the
 * other build's table holds the reply tuple s->rk. Its translation is served
 * by the programs of that build still on some links: a new flow given the
 * same NAT port would have its replies turned into that flow's client there
 * (seen: a SYN-ACK sent to another connection of the same client, which
 * reset both). The same client tuple's own closing predecessor (its reply
 * entry turns back into the very client port this flow comes from) is no
 * conflict: the new flow takes its place, as ct_forget lets it here. */
static __attribute__((noinline)) int ct_held_retired(const struct ct_scratch *s)
{
	__u32 zero = 0;
	void *prev = bpf_map_lookup_elem(&ferry_ct_prev, &zero);

	if (!prev)
		return 0;
	struct ct_val *held = bpf_map_lookup_elem(prev, &s->rk);
	if (!held || held->expires_ns < s->now)
		return 0;
	return !((held->flags & CT_CLOSING) && ct_same_translation(held, &s->reply));
}

/* Writes the reply entry s->reply under s->rk into ferry_ct_new, unless a
 * live flow holds that tuple in either table (an expired one is removed).
 * With `reclaim`, a live *unconfirmed* flow holding it is removed (both its
 * entries) and the tuple taken: netfilter's early_drop of unassured flows,
 * for when every port of the range is held. A confirmed flow's tuple is
 * never taken. */
static __always_inline int ct_claim_reply(struct ct_scratch *s, int reclaim)
{
	if (ct_held_retired(s))
		return 0;
	struct ct_val *held = bpf_map_lookup_elem(&ferry_ct, &s->rk);

	if (held) {
		if (held->expires_ns >= s->now)
			return 0;
		bpf_map_delete_elem(&ferry_ct, &s->rk);
	}
	if (bpf_map_update_elem(&ferry_ct_new, &s->rk, &s->reply, BPF_NOEXIST) == 0) {
		stat_inc(STAT_CT_NEW_INSERT);
		return 1;
	}
	held = bpf_map_lookup_elem(&ferry_ct_new, &s->rk);
	if (!held)
		return 0;
	if (held->expires_ns >= s->now) {
		if (!reclaim)
			return 0;
		ct_partner_key(&s->victim, held, s->rk.proto, s->rk.family, CT_REPLY);
		ct_new_delete(&s->victim);
		stat_inc(STAT_CT_EARLY_DROP);
	}
	ct_new_delete(&s->rk);
	if (bpf_map_update_elem(&ferry_ct_new, &s->rk, &s->reply, BPF_NOEXIST) == 0) {
		stat_inc(STAT_CT_NEW_INSERT);
		return 1;
	}
	return 0;
}

/* One step of the NAT port walk (a bpf_loop callback over twice the range):
 * port number `i` of the range, counted from a random start; the first pass
 * looks for a free port, the second takes over the first port an
 * unconfirmed flow holds. Stops the loop when it has a port. */
static long ct_nat_probe(__u32 i, void *unused)
{
	struct ct_scratch *s = ct_scratch();

	if (!s || s->size == 0)
		return 1;
	s->rk.dport = bpf_htons((__u16)(s->lo + (s->start + i) % s->size));
	if (s->icmp)
		s->rk.sport = s->rk.dport;
	if (ct_claim_reply(s, i >= s->size)) {
		s->found = 1;
		return 1;
	}
	stat_inc(STAT_NAT_RETRY);
	return 0;
}

/* During a downgrade's link switch (ferry_ct_next, maps.h): a new flow's
 * two entries, just written into ferry_ct_new, are written into the older
 * layout's rebuilt table too, so that the older programs taking a link over
 * find the flow from its first packet they see (a reply among them). Its
 * later changes reach that table through the command's copies. */
static __attribute__((noinline)) void ct_mirror_next(const struct ct_key *ok, struct ct_scratch *s)
{
	__u32 zero = 0;
	void *next = bpf_map_lookup_elem(&ferry_ct_next, &zero);

	if (!next)
		return;
	if (bpf_map_update_elem(next, &s->rk, &s->reply, BPF_ANY) == 0 &&
	    bpf_map_update_elem(next, ok, &s->orig, BPF_ANY) == 0)
		stat_inc(STAT_CT_MIRRORED);
}

/* Creates both entries of a new flow in ferry_ct_new: original (as it
 * arrived: p) -> rewrite to (nsrc:nsport -> ndst:ndport); reply (ndst:ndport
 * -> nsrc:nsport) -> rewrite back. With `snat`, the source port is chosen
 * from the NAT range until the reply tuple is free: first the client's own
 * port, then a walk over the whole range from a random port, so the probes
 * grow with the range's occupancy; when every port is held, a second pass
 * takes over a port of an unconfirmed flow (early drop), and a flow is
 * refused only when confirmed flows hold every port for this destination. Returns the source port used, or 0 on
 * failure with the drop reason in *why (the caller drops with it). The
 * entries are built in a per-CPU scratch value: the caller's stack is full. */
static __always_inline __be16 ct_create(const struct pkt *p, const struct config *cfg, const __u32 *nsrc,
					__be16 nsport, const __u32 *ndst, __be16 ndport, int snat, __u32 service,
					__u32 backend, __u64 now, __u32 *why)
{
	struct ct_scratch *s = ct_scratch();

	if (!s) {
		*why = STAT_DROP_CT_INSERT;
		return 0;
	}
	__builtin_memset(s, 0, sizeof(*s));
	__u64 life = now + ct_lifetime(cfg, p->proto, 0, 1);
	s->orig.new_sport = nsport;
	s->orig.new_dport = ndport;
	s->orig.backend = s->reply.backend = backend;
	s->orig.service = s->reply.service = service;
	s->reply.new_sport = p->dport;
	s->reply.new_dport = p->sport;
	__builtin_memcpy(s->orig.new_src, nsrc, 16);
	__builtin_memcpy(s->orig.new_dst, ndst, 16);
	__builtin_memcpy(s->reply.new_src, p->dst, 16);
	__builtin_memcpy(s->reply.new_dst, p->src, 16);
	s->orig.flags = s->reply.flags = snat ? CT_SNAT : 0;
	s->orig.expires_ns = s->reply.expires_ns = life;
	__builtin_memcpy(s->rk.src, ndst, 16);
	__builtin_memcpy(s->rk.dst, nsrc, 16);
	s->rk.sport = ndport;
	s->rk.dport = nsport;
	s->rk.proto = p->proto;
	s->rk.family = p->family;
	s->rk.dir = CT_REPLY;
	s->now = now;

	/* ICMP echo: the identifier is both "ports", and the reply carries the same one. */
	s->icmp = p->proto == PROTO_ICMP || p->proto == PROTO_ICMPV6;
	if (s->icmp)
		s->rk.sport = s->rk.dport;
	__u32 lo = cfg->nat_port_min, hi = cfg->nat_port_max;
	if (lo == 0 || hi < lo) {
		lo = 1024;
		hi = 29999;
	}
	s->lo = lo;
	s->size = hi - lo + 1;
	if (snat && p->proto != IPPROTO_SCTP) {
		/* First the client's own port: many flows need no port change at all. */
		__u16 own = bpf_ntohs(p->sport);
		if (own >= lo && own <= hi) {
			if (ct_claim_reply(s, 0))
				s->found = 1;
			else
				stat_inc(STAT_NAT_RETRY);
		}
		if (!s->found) {
			s->start = bpf_get_prandom_u32() % s->size;
			bpf_loop(2 * s->size, ct_nat_probe, NULL, 0);
		}
		if (!s->found) {
			*why = STAT_DROP_NAT_EXHAUSTED;
			return 0;
		}
	} else if (!ct_claim_reply(s, 0)) {
		*why = STAT_DROP_CT_CLASH;
		return 0;
	}
	s->orig.new_sport = s->rk.dport;
	if (s->icmp)
		s->orig.new_dport = s->rk.dport;
	struct ct_key ok;
	ct_key_of(&ok, p, CT_ORIGINAL);
	if (bpf_map_update_elem(&ferry_ct_new, &ok, &s->orig, BPF_NOEXIST) == 0) {
		stat_inc(STAT_CT_NEW_INSERT);
	} else if (bpf_map_update_elem(&ferry_ct_new, &ok, &s->orig, BPF_ANY) != 0) {
		ct_new_delete(&s->rk);
		*why = STAT_DROP_CT_INSERT;
		return 0;
	}
	ct_mirror_next(&ok, s);
	return s->rk.dport;
}

#endif
