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

#endif
