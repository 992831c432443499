/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The defrag loop: the kernel's own reassembly for the datagrams a tc
 * program cannot translate fragment by fragment.
 *
 * Two kinds of datagram need their whole self: one whose later fragment
 * overtook its first (nothing to translate that fragment by yet, and a tc
 * program cannot hold a packet), and a fragmented SCTP packet whose port
 * changes (the CRC32c correction needs the SCTP packet's length, which a
 * first fragment does not tell). Their fragments go into a veth pair whose
 * far end lives in a small ferry-owned network namespace with netfilter
 * defragmentation on (a netfilter BPF link with BPF_F_NETFILTER_IP_DEFRAG)
 * and forwarding on, every route pointing back through the pair. There the
 * kernel queues the fragments until the datagram is whole, forwards it back,
 * and, because a reassembled datagram keeps the size of its largest fragment
 * (frag_max_size), sends it back as fragments of the original sizes, first
 * fragment first. On the way the netfilter program notes each reassembled
 * SCTP packet's length (ferry_sctp_len).
 *
 * Back on the node side of the pair, ferry_from_loop marks the fragments in
 * tc_index as having been round the loop (they never go in again), and hands them to
 * the ingress of the device their source is reached through (the device they
 * most likely came in on): the program there sees an ordinary in-order
 * datagram and translates it as usual, the SCTP CRC corrected with the noted
 * length. Cilium marks re-entering packets in tc_index the same way.
 *
 * The loop's forwarding counts as a hop (TTL / hop limit - 1), left as it
 * is: were the mark ever lost, a packet could go round only until its TTL
 * ran out.
 *
 * Cost: a datagram that needs the loop crosses two more veth hops and one
 * reassembly; fragments wait in the loop's queue (up to the kernel's 30 s,
 * within its ipfrag memory limits) until the datagram is whole, so a
 * datagram that lost a fragment costs only queue memory there.
 */
#ifndef FERRY_LOOP_H
#define FERRY_LOOP_H

#include "common.h"
#include "packet.h"
#include "stats.h"

/* The MAC addresses of the pair's two ends, fixed by the agent when it
 * creates the pair (crates/ferry-bpf/src/defrag_loop.rs): the loop's end is
 * where fragments are sent. Locally administered; each pair is its own link. */
#define LOOP_NODE_MAC { 0x02, 0x66, 0x65, 0x72, 0x72, 0x01 }
#define LOOP_FAR_MAC { 0x02, 0x66, 0x65, 0x72, 0x72, 0x02 }

/* tc_index bit of a packet back from the loop (kept across bpf_redirect to
 * an ingress; no qdisc of this kernel reads tc_index). Cleared by the
 * program that reads it. */
#define LOOP_TC_INDEX 0x4000

/* Where the loop is: the ifindex of the pair's node end, 0 when there is no
 * loop. Written by the agent at install, with the programs that read it (not
 * pinned: it belongs to this load). */
struct loop_cfg {
	__u32 ifindex;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct loop_cfg);
} ferry_loop SEC(".maps");

/* A reassembled SCTP packet's length, by its addresses and its 12-byte
 * common header (ports, verification tag, checksum: the checksum makes it
 * the packet's). Written in the loop's namespace by ferry_defrag_note, read
 * when the packet's first fragment comes back. LRU: an entry lives for one
 * datagram's trip. */
struct sctp_len_key {
	__u32 src[4];
	__u32 dst[4];
	__u32 hdr[3];
	__u8 family;
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sctp_len_key);
	__type(value, __u32);
} ferry_sctp_len SEC(".maps");

/* Whether the packet is back from the loop; clears the mark (it is read once).
 * Such a packet is for this host (PACKET_HOST) whatever its Ethernet
 * destination says: ferry_from_loop could not address it to the device when
 * the route's neighbour was unresolved. */
static __always_inline int loop_back(struct __sk_buff *skb)
{
	if (!(skb->tc_index & LOOP_TC_INDEX))
		return 0;
	skb->tc_index &= ~LOOP_TC_INDEX;
	bpf_skb_change_type(skb, 0 /* PACKET_HOST */);
	return 1;
}

/* Sends a fragment into the loop: addressed to the loop's end, out of the
 * node's end. */
static __always_inline int loop_send(struct __sk_buff *skb, __u32 ifindex)
{
	__u8 mac[6] = LOOP_FAR_MAC;

	if (bpf_skb_store_bytes(skb, 0, mac, 6, 0) < 0)
		return drop_packet(STAT_DROP_REWRITE);
	stat_inc(STAT_FRAG_LOOP);
	return bpf_redirect(ifindex, 0);
}

/* A first SCTP fragment back from the loop: the SCTP packet's length, as the
 * loop noted it (p->l4_len; left 0 when unknown). */
static __attribute__((noinline)) void loop_sctp_len(struct __sk_buff *skb, struct pkt *p)
{
	struct sctp_len_key k = { .family = p->family };

	if (bpf_skb_load_bytes(skb, p->l4_off, k.hdr, sizeof(k.hdr)) < 0)
		return;
	__builtin_memcpy(k.src, p->src, 16);
	__builtin_memcpy(k.dst, p->dst, 16);
	__u32 *len = bpf_map_lookup_elem(&ferry_sctp_len, &k);
	if (len && *len <= 0xffff)
		p->l4_len = *len;
}

/* A packet back from the loop (ferry_from_loop): re-enters at the ingress of
 * the device its source is reached through, addressed to that device, marked
 * as back. Only the addresses are read: whatever went in comes back. */
static __always_inline int loop_return(struct __sk_buff *skb)
{
	struct bpf_fib_lookup fib = {};
	__be16 proto;

	if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
		return TC_ACT_OK;
	if (proto == bpf_htons(ETH_P_IP)) {
		fib.family = AF_INET;
		/* saddr, daddr: the lookup goes back to the source */
		if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 12, &fib.ipv4_dst, 4) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN_ + 16, &fib.ipv4_src, 4) < 0)
			return drop_packet(STAT_DROP_REWRITE);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		fib.family = AF_INET6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN_ + 8, fib.ipv6_dst, 16) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN_ + 24, fib.ipv6_src, 16) < 0)
			return drop_packet(STAT_DROP_REWRITE);
	} else {
		return TC_ACT_OK; /* nothing else is sent into the loop */
	}
	/* The loop's own multicast (an IPv6 router's MLD reports; the lookup's source is the
	 * packet's destination): not traffic, the node's stack may have it. */
	if ((fib.family == AF_INET && (bpf_ntohl(fib.ipv4_src) >> 28) == 0xe) ||
	    (fib.family == AF_INET6 && ((__u8 *)fib.ipv6_src)[0] == 0xff))
		return TC_ACT_OK;
	fib.ifindex = skb->ifindex;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) || fib.ifindex == skb->ifindex)
		return drop_packet(STAT_DROP_NO_ROUTE);
	/* Addressed as if it came in there (with no neighbour known, the MAC
	 * addresses are unknown too: loop_back makes it PACKET_HOST anyway). */
	if (rc == BPF_FIB_LKUP_RET_SUCCESS &&
	    (bpf_skb_store_bytes(skb, 0, fib.smac, 6, 0) < 0 || bpf_skb_store_bytes(skb, 6, fib.dmac, 6, 0) < 0))
		return drop_packet(STAT_DROP_REWRITE);
	skb->tc_index |= LOOP_TC_INDEX;
	stat_inc(STAT_LOOP_RETURN);
	return bpf_redirect(fib.ifindex, BPF_F_INGRESS);
}

/* ---- in the loop's namespace: a netfilter program (no packet writes) ---- */

#define NF_ACCEPT 1

/* The kernel's own types, as far as read here (CO-RE relocates the offsets). */
struct sk_buff {
	unsigned char *head;
	__u16 network_header;
} __attribute__((preserve_access_index));

struct bpf_nf_ctx {
	const void *state;
	struct sk_buff *skb;
} __attribute__((preserve_access_index));

/* A reassembled datagram passing through the loop: if it is SCTP right after
 * the IP header, note its SCTP packet's length for its first fragment's way
 * back (ferry_sctp_len). IPv6 extension headers before SCTP are not walked:
 * that packet's length stays unknown and its port change dropped. */
static __always_inline void loop_note_sctp(struct sk_buff *skb)
{
	__u8 h[40];
	struct sctp_len_key k = {};
	__u32 len, hlen;

	unsigned char *ip = skb->head + skb->network_header;
	if (bpf_probe_read_kernel(h, sizeof(h), ip) < 0)
		return;
	if ((h[0] >> 4) == 4) {
		hlen = (h[0] & 0x0f) * 4;
		if (h[9] != IPPROTO_SCTP || hlen < 20)
			return;
		len = ((__u32)h[2] << 8 | h[3]);
		if (len < hlen + 12)
			return;
		len -= hlen;
		k.family = FAM_V4;
		__builtin_memcpy(k.src, h + 12, 4);
		__builtin_memcpy(k.dst, h + 16, 4);
	} else if ((h[0] >> 4) == 6) {
		hlen = IP6_HLEN;
		if (h[6] != IPPROTO_SCTP)
			return;
		len = ((__u32)h[4] << 8 | h[5]);
		k.family = FAM_V6;
		__builtin_memcpy(k.src, h + 8, 16);
		__builtin_memcpy(k.dst, h + 24, 16);
	} else {
		return;
	}
	if (len < 12 || bpf_probe_read_kernel(k.hdr, sizeof(k.hdr), ip + hlen) < 0)
		return;
	if (bpf_map_update_elem(&ferry_sctp_len, &k, &len, BPF_ANY) == 0)
		stat_inc(STAT_LOOP_SCTP_LEN);
}

#endif
