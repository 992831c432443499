// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level load balancing (cgroup v2 hooks).
 *
 * A socket that connects or sends to a service frontend is pointed straight
 * at a backend, once, before a packet exists: no per-packet NAT, no
 * conntrack for east-west traffic. Replies and getpeername() are turned back
 * into the frontend through ferry_sock_rev, keyed by (socket cookie, backend),
 * so one UDP socket may talk to several services.
 *
 * The socket path only does what is exactly equivalent to kube-proxy. When the
 * model's route needs something a socket cannot express -- masquerading a pod,
 * a silent drop, a source-range check on a pod's real address, a pod reaching
 * itself (hairpin) -- it leaves the address alone and the packet path (tc)
 * handles the first packet instead.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/stats.h"
#include "lib/lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

enum xlate { XLATE_PASS, XLATE_DONE, XLATE_REJECT };

/* A socket address in the form the maps use. */
struct sock_target {
	__u32 addr[4];
	__be16 port;
	__u8 family;
	__u8 proto;
};

static __always_inline __u8 sock_class(struct bpf_sock_addr *ctx, __u8 family)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&ferry_config, &zero);

	if (!cfg)
		return CLASS_EXTERNAL;
	if (bpf_get_netns_cookie(ctx) == cfg->host_netns)
		return CLASS_HOST;
	return family == FAM_V4 ? cfg->pod_class[FAM_V4] : cfg->pod_class[FAM_V6];
}

/* The source a host socket will use: its bound address, else the node's primary address. */
static __always_inline void host_source(struct bpf_sock_addr *ctx, __u8 family, __u32 *src)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&ferry_config, &zero);
	struct bpf_sock *sk = ctx->sk;

	src[0] = src[1] = src[2] = src[3] = 0;
	if (sk) {
		if (family == FAM_V4) {
			src[0] = sk->src_ip4;
		} else {
			src[0] = sk->src_ip6[0];
			src[1] = sk->src_ip6[1];
			src[2] = sk->src_ip6[2];
			src[3] = sk->src_ip6[3];
		}
	}
	if (addr_is_zero(src) && cfg) {
		if (family == FAM_V4) {
			src[0] = cfg->primary[FAM_V4][0];
		} else {
			src[0] = cfg->primary[FAM_V6][0];
			src[1] = cfg->primary[FAM_V6][1];
			src[2] = cfg->primary[FAM_V6][2];
			src[3] = cfg->primary[FAM_V6][3];
		}
	}
}

/* True when the backend is listening inside the caller's own network
 * namespace: the pod is reaching itself through its service (hairpin). */
static __always_inline int backend_is_self(struct bpf_sock_addr *ctx, const struct backend *be, __u8 proto)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;

	if (be->family == FAM_V4) {
		t.ipv4.daddr = be->addr[0];
		t.ipv4.dport = be->port;
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.daddr, be->addr, sizeof(t.ipv6.daddr));
		t.ipv6.dport = be->port;
		size = sizeof(t.ipv6);
	}
	if (proto == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	else if (proto == IPPROTO_TCP)
		sk = bpf_sk_lookup_tcp(ctx, &t, size, BPF_F_CURRENT_NETNS, 0);
	else
		return 0;
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Decides and, when the socket path may serve the connection, rewrites
 * `target` to a backend and records the reverse translation. */
static __always_inline enum xlate sock_xlate(struct bpf_sock_addr *ctx, struct sock_target *target)
{
	struct fe_val *fe = lb_lookup_frontend(target->addr, target->family, target->port, target->proto);
	if (!fe)
		return XLATE_PASS;
	if (fe->kind == FE_CLUSTER_IP_ANY_PORT) {
		stat_inc(STAT_SOCK_REJECT);
		return XLATE_REJECT;
	}
	__u32 service = fe->service;
	struct svc_val *svc = bpf_map_lookup_elem(&ferry_services, &service);
	if (!svc) {
		stat_inc(STAT_GIVEUP_NO_SERVICE);
		return XLATE_PASS;
	}

	__u8 class = sock_class(ctx, target->family);
	__u8 act = lb_action(svc, fe, class);
	switch (act & ACT_MASK) {
	case ACT_REJECT:
		stat_inc(STAT_SOCK_REJECT);
		return XLATE_REJECT;
	case ACT_FORWARD_CLUSTER:
	case ACT_FORWARD_LOCAL:
		break;
	default:
		stat_inc(STAT_SOCK_SKIP_DROP);
		return XLATE_PASS;
	}
	/* The host's own address is already "the node's address": masquerading it
	 * changes nothing. A pod would keep its own address on this path. */
	if ((act & ACT_MASQ) && class != CLASS_HOST) {
		stat_inc(STAT_SOCK_SKIP_MASQ);
		return XLATE_PASS;
	}
	if (fe->flags & FE_FIREWALL) {
		__u32 src[4];
		if (class != CLASS_HOST) {
			stat_inc(STAT_SOCK_SKIP_FIREWALL);
			return XLATE_PASS;
		}
		host_source(ctx, target->family, src);
		if (!lb_firewall_allows(service, target->family, src)) {
			stat_inc(STAT_SOCK_SKIP_FIREWALL);
			return XLATE_PASS;
		}
	}

	struct aff_key aff = { .netns = bpf_get_netns_cookie(ctx) };
	__u8 set = (act & ACT_MASK) == ACT_FORWARD_LOCAL ? SET_LOCAL : SET_CLUSTER;
	__u32 id = lb_pick(service, svc, set, &aff);
	struct backend *be = id ? bpf_map_lookup_elem(&ferry_backends, &id) : NULL;
	if (!be) {
		stat_inc(STAT_SOCK_NO_BACKEND);
		return XLATE_PASS;
	}
	if (be->family != target->family) {
		stat_inc(STAT_GIVEUP_FAMILY);
		return XLATE_PASS;
	}
	if (class != CLASS_HOST && backend_is_self(ctx, be, target->proto)) {
		stat_inc(STAT_SOCK_SKIP_HAIRPIN);
		return XLATE_PASS;
	}

	struct rev_key rk = { .cookie = bpf_get_socket_cookie(ctx), .port = be->port, .family = be->family };
	struct rev_val rv = { .port = target->port, .family = target->family };
	__builtin_memcpy(rk.addr, be->addr, sizeof(rk.addr));
	__builtin_memcpy(rv.addr, target->addr, sizeof(rv.addr));
	/* An entry already there is rewritten in place: an update would take a
	 * fresh node from the LRU (evicting another socket's entry when full). */
	struct rev_val *held = bpf_map_lookup_elem(&ferry_sock_rev, &rk);
	if (held)
		*held = rv;
	else if (bpf_map_update_elem(&ferry_sock_rev, &rk, &rv, BPF_NOEXIST) == 0)
		stat_inc(STAT_SOCK_REV_INSERT);
	else
		stat_inc(STAT_SOCK_REV_INSERT_FAIL);

	__builtin_memcpy(target->addr, be->addr, sizeof(target->addr));
	target->port = be->port;
	stat_inc(STAT_SOCK_XLATE);
	return XLATE_DONE;
}

/* Turns a backend address seen by the socket back into the frontend it asked for. */
static __always_inline int sock_rev(struct bpf_sock_addr *ctx, struct sock_target *peer)
{
	struct rev_key rk = { .cookie = bpf_get_socket_cookie(ctx), .port = peer->port, .family = peer->family };
	struct rev_val *rv;

	__builtin_memcpy(rk.addr, peer->addr, sizeof(rk.addr));
	rv = bpf_map_lookup_elem(&ferry_sock_rev, &rk);
	if (!rv || rv->family != peer->family)
		return 0;
	__builtin_memcpy(peer->addr, rv->addr, sizeof(peer->addr));
	peer->port = rv->port;
	stat_inc(STAT_SOCK_REV);
	return 1;
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_UDP || ctx->type == 2 /* SOCK_DGRAM */)
		return IPPROTO_UDP;
	if (ctx->protocol == IPPROTO_SCTP)
		return IPPROTO_SCTP;
	return IPPROTO_TCP;
}

/* ---- IPv4 ---- */

static __always_inline void load4(struct bpf_sock_addr *ctx, struct sock_target *t, __u8 proto)
{
	t->addr[0] = ctx->user_ip4;
	t->addr[1] = t->addr[2] = t->addr[3] = 0;
	t->port = (__be16)ctx->user_port;
	t->family = FAM_V4;
	t->proto = proto;
}

static __always_inline int forward4(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct sock_target t;

	load4(ctx, &t, proto);
	switch (sock_xlate(ctx, &t)) {
	case XLATE_DONE:
		ctx->user_ip4 = t.addr[0];
		ctx->user_port = t.port;
		return SYS_PROCEED;
	case XLATE_REJECT:
		bpf_set_retval(-FERRY_ECONNREFUSED);
		return SYS_REJECT;
	default:
		return SYS_PROCEED;
	}
}

static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	struct sock_target t;

	load4(ctx, &t, 0);
	if (sock_rev(ctx, &t)) {
		ctx->user_ip4 = t.addr[0];
		ctx->user_port = t.port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int ferry_connect4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, sock_proto(ctx));
}

SEC("cgroup/sendmsg4")
int ferry_sendmsg4(struct bpf_sock_addr *ctx)
{
	return forward4(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg4")
int ferry_recvmsg4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

SEC("cgroup/getpeername4")
int ferry_getpeername4(struct bpf_sock_addr *ctx)
{
	return reverse4(ctx);
}

/* ---- IPv6 (and IPv4-mapped IPv6 on dual-stack sockets) ---- */

static __always_inline int is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void load6(struct bpf_sock_addr *ctx, struct sock_target *t, __u8 proto)
{
	__u32 a[4];

	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	t->port = (__be16)ctx->user_port;
	t->proto = proto;
	if (is_v4_mapped(a)) {
		t->addr[0] = a[3];
		t->addr[1] = t->addr[2] = t->addr[3] = 0;
		t->family = FAM_V4;
	} else {
		__builtin_memcpy(t->addr, a, sizeof(a));
		t->family = FAM_V6;
	}
}

static __always_inline void store6(struct bpf_sock_addr *ctx, const struct sock_target *t)
{
	if (t->family == FAM_V4) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->user_ip6[3] = t->addr[0];
	} else {
		ctx->user_ip6[0] = t->addr[0];
		ctx->user_ip6[1] = t->addr[1];
		ctx->user_ip6[2] = t->addr[2];
		ctx->user_ip6[3] = t->addr[3];
	}
	ctx->user_port = t->port;
}

static __always_inline int forward6(struct bpf_sock_addr *ctx, __u8 proto)
{
	struct sock_target t;

	load6(ctx, &t, proto);
	switch (sock_xlate(ctx, &t)) {
	case XLATE_DONE:
		store6(ctx, &t);
		return SYS_PROCEED;
	case XLATE_REJECT:
		bpf_set_retval(-FERRY_ECONNREFUSED);
		return SYS_REJECT;
	default:
		return SYS_PROCEED;
	}
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	struct sock_target t;

	load6(ctx, &t, 0);
	if (sock_rev(ctx, &t))
		store6(ctx, &t);
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int ferry_connect6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, sock_proto(ctx));
}

SEC("cgroup/sendmsg6")
int ferry_sendmsg6(struct bpf_sock_addr *ctx)
{
	return forward6(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg6")
int ferry_recvmsg6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

SEC("cgroup/getpeername6")
int ferry_getpeername6(struct bpf_sock_addr *ctx)
{
	return reverse6(ctx);
}

/* ---- socket close: forget the reverse translation of a connected socket ----
 *
 * A connected socket (TCP, connected UDP) has exactly one peer, so its
 * ferry_sock_rev entry is known at close and is removed, instead of waiting
 * for LRU eviction that would also push out entries live unconnected UDP
 * sockets still need. An unconnected socket has no peer here; its entries
 * age out of the LRU. */
SEC("cgroup/sock_release")
int ferry_sock_release(struct bpf_sock *sk)
{
	struct rev_key rk = { .cookie = bpf_get_socket_cookie(sk), .port = (__be16)sk->dst_port };

	if (!rk.port)
		return SYS_PROCEED;
	if (sk->family == AF_INET) {
		rk.family = FAM_V4;
		rk.addr[0] = sk->dst_ip4;
	} else if (sk->family == AF_INET6) {
		rk.family = rev_peer6(rk.addr, sk->dst_ip6[0], sk->dst_ip6[1], sk->dst_ip6[2], sk->dst_ip6[3]);
	} else {
		return SYS_PROCEED;
	}
	if (bpf_map_delete_elem(&ferry_sock_rev, &rk) == 0)
		stat_inc(STAT_SOCK_REV_DELETE);
	return SYS_PROCEED;
}
