/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Load-balancing steps shared by the socket and packet paths: find the
 * frontend, read the route the model decided for this source class, pick a
 * backend (random, or the remembered one under session affinity).
 */
#ifndef FERRY_LB_H
#define FERRY_LB_H

#include "common.h"
#include "maps.h"
#include "stats.h"

/* The frontend a destination hits, trying the exact address, then "any
 * NodePort address" when the destination serves NodePorts, then the
 * ClusterIP marker (any other port on a ClusterIP is rejected). */
static __always_inline struct fe_val *lb_lookup_frontend(const __u32 *addr, __u8 family, __be16 port, __u8 proto)
{
	struct fe_key k = {};
	struct fe_val *fe;

	__builtin_memcpy(k.addr, addr, sizeof(k.addr));
	k.port = port;
	k.proto = proto;
	k.family = family;
	fe = bpf_map_lookup_elem(&ferry_frontends, &k);
	if (fe)
		return fe;

	struct local_key lk = { .family = family };
	__builtin_memcpy(lk.addr, addr, sizeof(lk.addr));
	__u8 *local = bpf_map_lookup_elem(&ferry_locals, &lk);
	if (local && (*local & LOCAL_NODEPORT)) {
		__builtin_memset(k.addr, 0, sizeof(k.addr));
		fe = bpf_map_lookup_elem(&ferry_frontends, &k);
		if (fe)
			return fe;
		__builtin_memcpy(k.addr, addr, sizeof(k.addr));
	}
	k.port = 0;
	k.proto = 0;
	return bpf_map_lookup_elem(&ferry_frontends, &k);
}

static __always_inline __u8 lb_action(const struct svc_val *svc, const struct fe_val *fe, __u8 class)
{
	__u8 path = fe->kind == FE_CLUSTER_IP ? PATH_INTERNAL : PATH_EXTERNAL;

	if (class >= CLASS_COUNT)
		class = CLASS_EXTERNAL;
	return svc->action[path][class];
}

static __always_inline int lb_in_range(__u8 kind, __u8 family, const __u32 *addr)
{
	struct range_key k = { .prefixlen = 32 + (family == FAM_V4 ? 32 : 128), .kind = kind, .family = family };

	__builtin_memcpy(k.addr, addr, sizeof(k.addr));
	return bpf_map_lookup_elem(&ferry_ranges, &k) != NULL;
}

/* Whether `src` may reach a firewalled frontend of `service`. */
static __always_inline int lb_firewall_allows(__u32 service, __u8 family, const __u32 *src)
{
	struct fw_key k = { .prefixlen = 32 + (family == FAM_V4 ? 32 : 128), .service = service };

	__builtin_memcpy(k.addr, src, sizeof(k.addr));
	return bpf_map_lookup_elem(&ferry_firewall, &k) != NULL;
}

static __always_inline __u32 lb_slot_backend(__u32 service, const struct svc_val *svc, __u8 set, __u32 idx)
{
	struct slot_key k = { .service = service, .rev = svc->rev, .set = set, .slot = (__u16)idx };
	__u32 *id = bpf_map_lookup_elem(&ferry_slots, &k);

	return id ? *id : 0;
}

/* Picks a backend id from `set` (0: none usable). `aff` is the affinity key
 * (client identity filled in by the caller), used when the service has
 * ClientIP affinity. */
static __always_inline __u32 lb_pick(__u32 service, const struct svc_val *svc, __u8 set, struct aff_key *aff)
{
	__u32 count = set == SET_LOCAL ? svc->count[SET_LOCAL] : svc->count[SET_CLUSTER];
	__u64 now = 0;
	__u32 id;

	if (count == 0)
		return 0;
	if (svc->flags & SVC_AFFINITY) {
		aff->service = service;
		now = bpf_ktime_get_ns();
		struct aff_val *prev = bpf_map_lookup_elem(&ferry_affinity, aff);
		if (prev && now - prev->last_ns <= (__u64)svc->affinity_timeout * NSEC_PER_SEC) {
			struct member_key mk = { .service = service, .backend = prev->backend };
			__u8 *sets = bpf_map_lookup_elem(&ferry_members, &mk);
			if (sets && (*sets & (1 << set))) {
				prev->last_ns = now;
				stat_inc(STAT_AFFINITY_HIT);
				return prev->backend;
			}
		}
	}
	id = lb_slot_backend(service, svc, set, bpf_get_prandom_u32() % count);
	if (id && (svc->flags & SVC_AFFINITY)) {
		/* A client already known is rewritten in place: an update would take
		 * a fresh node from the LRU (evicting another client when full). */
		struct aff_val *held = bpf_map_lookup_elem(&ferry_affinity, aff);
		if (held) {
			held->backend = id;
			held->last_ns = now;
		} else {
			struct aff_val v = { .backend = id, .last_ns = now };
			if (bpf_map_update_elem(&ferry_affinity, aff, &v, BPF_NOEXIST) == 0)
				stat_inc(STAT_AFFINITY_INSERT);
			else
				stat_inc(STAT_AFFINITY_INSERT_FAIL);
		}
	}
	return id;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 hash_mix(__u32 h, __u32 k)
{
	k *= 0xcc9e2d51;
	k = rotl32(k, 15);
	k *= 0x1b873593;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

/* A flow's hash (MurmurHash3 mixing over the 5-tuple): the same on every
 * node, so with the same Maglev table every node picks the same backend. */
static __always_inline __u32 flow_hash(const __u32 *src, const __u32 *dst, __be16 sport, __be16 dport, __u8 proto)
{
	__u32 h = 0x9e3779b9 ^ proto;

	h = hash_mix(h, src[0]);
	h = hash_mix(h, src[1]);
	h = hash_mix(h, src[2]);
	h = hash_mix(h, src[3]);
	h = hash_mix(h, dst[0]);
	h = hash_mix(h, dst[1]);
	h = hash_mix(h, dst[2]);
	h = hash_mix(h, dst[3]);
	h = hash_mix(h, ((__u32)sport << 16) | dport);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The backend Maglev assigns to a flow hash (0: no table). */
static __always_inline __u32 lb_maglev(__u32 service, __u8 set, __u32 hash, __u32 size)
{
	__u64 key = ((__u64)service << 8) | set;
	void *table = bpf_map_lookup_elem(&ferry_maglev, &key);
	__u32 slot, *id;

	if (!table || size == 0)
		return 0;
	slot = hash % size;
	id = bpf_map_lookup_elem(table, &slot);
	return id ? *id : 0;
}

#endif
