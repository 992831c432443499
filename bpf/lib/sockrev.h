/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The socket path's reverse-translation map, in a header of its own so that
 * the socket-destroy iterator (sockdestroy.bpf.c) can share the pinned map
 * without declaring every other map of the datapath.
 */
#ifndef FERRY_SOCKREV_H
#define FERRY_SOCKREV_H

#include "common.h"

#ifndef PIN_BY_NAME
#define PIN_BY_NAME __uint(pinning, LIBBPF_PIN_BY_NAME)
#endif

/* ---- socket reverse translation: what a socket really connected to ---- */

struct rev_key {
	__u64 cookie; /* socket cookie */
	__u32 addr[4]; /* backend */
	__be16 port;
	__u8 family;
	__u8 pad[5];
};

struct rev_val {
	__u32 addr[4]; /* frontend */
	__be16 port;
	__u8 family;
	__u8 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct rev_key);
	__type(value, struct rev_val);
	PIN_BY_NAME;
} ferry_sock_rev SEC(".maps");

/* A socket's IPv6 peer as socket-LB keys it: an IPv4-mapped address (a
 * dual-stack socket talking IPv4) becomes the IPv4 address. Sets addr and
 * returns the family (FAM_V4 or FAM_V6). */
static __always_inline __u8 rev_peer6(__u32 addr[4], __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
	if (!a0 && !a1 && a2 == bpf_htonl(0xffff)) {
		addr[0] = a3;
		addr[1] = addr[2] = addr[3] = 0;
		return FAM_V4;
	}
	addr[0] = a0;
	addr[1] = a1;
	addr[2] = a2;
	addr[3] = a3;
	return FAM_V6;
}

#endif
