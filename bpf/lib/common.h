/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared includes, constants and small helpers for every ferry BPF object. */
#ifndef FERRY_COMMON_H
#define FERRY_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* errno values returned to sockets (no libc in BPF). */
#define FERRY_EPERM 1
#define FERRY_ECONNREFUSED 111

#define NSEC_PER_SEC 1000000000ULL

/* Address families as stored in maps (not AF_* values: they must fit the
 * LPM key layout and index small arrays). */
#define FAM_V4 0
#define FAM_V6 1

/* Source classes, as the model defines them (ferry_model::SourceClass). */
#define CLASS_POD 0
#define CLASS_HOST 1
#define CLASS_EXTERNAL 2
#define CLASS_COUNT 3

/* Which route of a service applies: ClusterIP traffic or external frontends. */
#define PATH_INTERNAL 0
#define PATH_EXTERNAL 1

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

static __always_inline int addr_is_zero(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

#endif
