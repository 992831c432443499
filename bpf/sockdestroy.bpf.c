// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-LB's half of "no UDP flow stuck on a removed backend".
 *
 * connect() on a UDP socket is translated once (sock.bpf.c); after that the
 * kernel sends every datagram of the connected socket straight to the chosen
 * backend, and no cgroup hook runs again. When that backend goes away the
 * socket would keep sending to it forever. The agent therefore fills
 * ferry_gone with the removed backends and runs this UDP socket iterator in
 * every network namespace that has socket-LB clients: a connected UDP socket
 * whose peer is a removed backend *and* that socket-LB pointed there (its
 * ferry_sock_rev entry exists) is destroyed with the bpf_sock_destroy kfunc.
 * The application sees ECONNABORTED and reconnects, which picks a live
 * backend; sockets that connected to a pod address directly are never touched.
 *
 * Only the few kernel structure fields below are used, declared with
 * preserve_access_index so libbpf relocates them against the running
 * kernel's BTF (no vmlinux.h needed at build time).
 */
#include "lib/common.h"
#include "lib/sockrev.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TCP_ESTABLISHED 1 /* a connected UDP socket's skc_state */

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
} __attribute__((preserve_access_index));

struct inet_sock {
	struct sock sk;
} __attribute__((preserve_access_index));

struct udp_sock {
	struct inet_sock inet;
} __attribute__((preserve_access_index));

struct bpf_iter_meta {
	void *seq;
} __attribute__((preserve_access_index));

struct bpf_iter__udp {
	struct bpf_iter_meta *meta;
	struct udp_sock *udp_sk;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* A removed backend (address as in ferry_backends, port in network order). */
struct gone_key {
	__u32 addr[4];
	__be16 port;
	__u8 family;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct gone_key);
	__type(value, __u8);
} ferry_gone SEC(".maps");

/* How many sockets this run destroyed (read by the agent). */
__u64 destroyed = 0;

SEC("iter/udp")
int ferry_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock_common *sk = (struct sock_common *)ctx->udp_sk;
	if (!sk)
		return 0;
	if (sk->skc_state != TCP_ESTABLISHED)
		return 0;

	struct gone_key gone = { .port = sk->skc_dport };
	unsigned short family = sk->skc_family;
	if (family == AF_INET) {
		gone.family = FAM_V4;
		gone.addr[0] = sk->skc_daddr;
	} else if (family == AF_INET6) {
		gone.family = rev_peer6(gone.addr, sk->skc_v6_daddr.in6_u.u6_addr32[0],
					sk->skc_v6_daddr.in6_u.u6_addr32[1], sk->skc_v6_daddr.in6_u.u6_addr32[2],
					sk->skc_v6_daddr.in6_u.u6_addr32[3]);
	} else {
		return 0;
	}
	if (!bpf_map_lookup_elem(&ferry_gone, &gone))
		return 0;

	struct rev_key rk = { .cookie = bpf_get_socket_cookie(sk), .port = gone.port, .family = gone.family };
	__builtin_memcpy(rk.addr, gone.addr, sizeof(rk.addr));
	if (!bpf_map_lookup_elem(&ferry_sock_rev, &rk))
		return 0; /* not ours: connected to the pod address directly */

	if (bpf_sock_destroy(sk) == 0)
		__sync_fetch_and_add(&destroyed, 1);
	return 0;
}
