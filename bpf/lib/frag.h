/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IP fragments on the packet path. Only a datagram's first fragment carries
 * the transport header the load balancer decides on; the later ones carry
 * data only. The verdict on the first fragment (translated to which
 * addresses, passed, dropped) is kept in ferry_frags (LRU) under (source,
 * destination, IP identification, protocol) as the fragment arrived, and
 * the later fragments get the same: their addresses rewritten (the L4
 * checksum lives in the first fragment, which the translation already
 * fixed), then forwarded the same way.
 *
 * A later fragment whose entry is gone (evicted, or it overtook its first
 * fragment) goes into the defrag loop (loop.h), and so does the rest of its
 * datagram (FRAG_LOOP), first fragment included: the loop gives the datagram
 * back in order. Without a loop (or for a fragment already back from it) it
 * is counted as frag_miss and passed to the stack untranslated, which is
 * what happened to every later fragment before tracking.
 */
#ifndef FERRY_FRAG_H
#define FERRY_FRAG_H

#include "common.h"
#include "maps.h"
#include "packet.h"
#include "nat.h"
#include "stats.h"
#include "loop.h"

static __always_inline void frag_key_of(struct frag_key *k, const __u32 *src, const __u32 *dst, const struct pkt *p)
{
	__builtin_memcpy(k->src, src, 16);
	__builtin_memcpy(k->dst, dst, 16);
	k->id = p->frag_id;
	/* Not p->proto: a later IPv6 fragment's walk stops at its fragment header. */
	k->proto = p->frag_next;
	k->family = p->family;
	k->pad = 0;
}

/* The addresses a first fragment arrived with, kept here across its
 * translation: the program's stack has no 32 bytes to spare for them. Per
 * CPU, not pinned: it lives for one packet. */
struct frag_arrival {
	__u32 src[4];
	__u32 dst[4];
	__u32 looped; /* the first fragment went into the defrag loop */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct frag_arrival);
} ferry_frag_arrival SEC(".maps");

/* Before a first fragment is translated: note the addresses it arrived with. */
static __attribute__((noinline)) void frag_arrived(const struct pkt *p)
{
	__u32 zero = 0;
	struct frag_arrival *a = bpf_map_lookup_elem(&ferry_frag_arrival, &zero);

	if (!a)
		return;
	__builtin_memcpy(a->src, p->src, 16);
	__builtin_memcpy(a->dst, p->dst, 16);
	a->looped = 0;
}

/* A first fragment goes into the defrag loop (its verdict, FRAG_LOOP, is kept by frag_remember). */
static __attribute__((noinline)) int frag_first_to_loop(struct __sk_buff *skb, __u32 loop)
{
	__u32 zero = 0;
	struct frag_arrival *a = bpf_map_lookup_elem(&ferry_frag_arrival, &zero);

	if (a)
		a->looped = 1;
	return loop_send(skb, loop);
}

/* Whether a first fragment's datagram is already going through the defrag
 * loop (a later fragment overtook it and went first). */
static __attribute__((noinline)) int frag_looping(const struct pkt *p)
{
	struct frag_key k;

	frag_key_of(&k, p->src, p->dst, p);
	struct frag_val *v = bpf_map_lookup_elem(&ferry_frags, &k);
	return v && v->verdict == FRAG_LOOP;
}

/* After a first fragment was handled with result rc (p as it left: translated
 * when its addresses changed): keep the verdict for the later fragments. */
static __attribute__((noinline)) void frag_remember(const struct pkt *p, int rc)
{
	__u32 zero = 0;
	struct frag_arrival *a = bpf_map_lookup_elem(&ferry_frag_arrival, &zero);
	struct frag_key k;
	struct frag_val v = {};

	if (!a)
		return;
	frag_key_of(&k, a->src, a->dst, p);
	__builtin_memcpy(v.new_src, p->src, 16);
	__builtin_memcpy(v.new_dst, p->dst, 16);
	if (a->looped)
		v.verdict = FRAG_LOOP;
	else if (!addr_eq(a->src, p->src) || !addr_eq(a->dst, p->dst))
		v.verdict = FRAG_XLATE;
	else if (rc == TC_ACT_OK)
		v.verdict = FRAG_PASS;
	else
		v.verdict = FRAG_DROP;
	bpf_map_update_elem(&ferry_frags, &k, &v, BPF_ANY);
	stat_inc(STAT_FRAG_FIRST);
}

/* Rewrites a later fragment's addresses: IPv4 header checksum and address fields; IPv6 address fields. */
static __always_inline int frag_rewrite(struct __sk_buff *skb, struct pkt *p, const __u32 *src, const __u32 *dst)
{
	if (p->family == FAM_V4) {
		if (src[0] != p->src[0] &&
		    (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, p->src[0], src[0], 4) < 0 ||
		     bpf_skb_store_bytes(skb, p->l3_off + IP4_SADDR_OFF, &src[0], 4, 0) < 0))
			return -1;
		if (dst[0] != p->dst[0] &&
		    (bpf_l3_csum_replace(skb, p->l3_off + IP4_CSUM_OFF, p->dst[0], dst[0], 4) < 0 ||
		     bpf_skb_store_bytes(skb, p->l3_off + IP4_DADDR_OFF, &dst[0], 4, 0) < 0))
			return -1;
	} else {
		if (bpf_skb_store_bytes(skb, p->l3_off + IP6_SADDR_OFF, src, 16, 0) < 0 ||
		    bpf_skb_store_bytes(skb, p->l3_off + IP6_DADDR_OFF, dst, 16, 0) < 0)
			return -1;
	}
	__builtin_memcpy(p->src, src, 16);
	__builtin_memcpy(p->dst, dst, 16);
	return 0;
}

/* What a later fragment gets, as a tc verdict. *translated says it was
 * rewritten and the caller must deliver it as the first fragment was. `loop`:
 * the defrag loop's ifindex when the fragment may go there, else 0. */
static __always_inline int frag_follow(struct __sk_buff *skb, struct pkt *p, __u32 loop, int *translated)
{
	struct frag_key k;

	*translated = 0;
	frag_key_of(&k, p->src, p->dst, p);
	struct frag_val *v = bpf_map_lookup_elem(&ferry_frags, &k);
	if (!v || v->verdict == FRAG_LOOP) {
		if (!loop) {
			stat_inc(STAT_FRAG_MISS);
			return TC_ACT_OK;
		}
		if (!v) {
			/* Its first fragment must follow it into the loop. */
			struct frag_val lv = { .verdict = FRAG_LOOP };
			bpf_map_update_elem(&ferry_frags, &k, &lv, BPF_ANY);
		}
		return loop_send(skb, loop);
	}
	if (v->verdict == FRAG_DROP)
		return drop_packet(STAT_DROP_FRAG);
	if (v->verdict != FRAG_XLATE)
		return TC_ACT_OK;
	__u32 src[4], dst[4];
	__builtin_memcpy(src, v->new_src, 16);
	__builtin_memcpy(dst, v->new_dst, 16);
	if (frag_rewrite(skb, p, src, dst) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_FRAG_FORWARD);
	*translated = 1;
	return TC_ACT_OK;
}

#endif
