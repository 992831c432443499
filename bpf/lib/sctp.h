/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * SCTP port translation: correcting the CRC32c after a port change.
 *
 * SCTP's checksum is CRC32c over the whole SCTP packet, which no BPF helper
 * updates. But a CRC is affine: for two messages of the same length,
 * crc(A) ^ crc(B) = crc0(A ^ B), where crc0 is the bare division (no initial
 * value, no final xor). A ⊕ B is zero but for the two port bytes at offset
 * `off`, so crc0(A ^ B) is crc0 of those two bytes followed by n = len - off - 2
 * zero bytes, and appending n zero bytes multiplies by x^(8n) modulo the
 * CRC32c polynomial. x^(8n) is the product of the x^(8*2^k) for the bits k
 * of n (a 16-entry table), so the correction costs at most 16
 * multiplications in GF(2)[x]/P, each a 32-step branch-free loop, whatever
 * the packet's length. Everything is in the reflected bit order CRC32c uses
 * (bit 31 is x^0), and the checksum field holds the CRC little-endian.
 */
#ifndef FERRY_SCTP_H
#define FERRY_SCTP_H

#include "common.h"
#include "packet.h"
#include "stats.h"

#define CRC32C_POLY 0x82f63b78 /* reflected */
#define SCTP_CSUM_OFF 8

/* x^(8*2^k) mod P, k = 0..15, reflected: enough for any n < 65536 bytes. */
static const __u32 crc32c_x8_pow2k[16] = {
	0x00800000, 0x00008000, 0x82f63b78, 0x6ea2d55c, 0x18b8ea18, 0x510ac59a, 0xb82be955, 0xb8fdb1e7,
	0x88e56f72, 0x74c360a4, 0xe4172b16, 0x0d65762a, 0x35d73a62, 0x28461564, 0xbf455269, 0xe2ea32dc,
};

/* a * b mod P (reflected). */
static __always_inline __u32 crc32c_mul(__u32 a, __u32 b)
{
	__u32 p = 0;

	for (int i = 0; i < 32; i++) {
		p ^= b & -((a >> (31 - i)) & 1);
		b = (b >> 1) ^ (CRC32C_POLY & -(b & 1));
	}
	return p;
}

/* crc0 of two bytes, then `n` zero bytes after them. A global function: the
 * verifier checks its ~5,000 steps once, not once per path that calls it. */
__attribute__((noinline)) __u32 crc32c_delta(__u32 b0, __u32 b1, __u32 n)
{
	__u32 c = b0 & 0xff;

	for (int i = 0; i < 8; i++)
		c = (c >> 1) ^ (CRC32C_POLY & -(c & 1));
	c ^= b1 & 0xff;
	for (int i = 0; i < 8; i++)
		c = (c >> 1) ^ (CRC32C_POLY & -(c & 1));
	for (int k = 0; k < 16; k++) {
		__u32 m = crc32c_mul(c, crc32c_x8_pow2k[k]);
		c ^= (c ^ m) & -((n >> k) & 1);
	}
	return c;
}

/* The SCTP packet's length (IP payload after the headers the parser walked), 0 if unknown.
 * A first fragment's comes from the defrag loop, which saw the whole packet (loop.h). */
static __always_inline __u32 sctp_len(struct __sk_buff *skb, const struct pkt *p)
{
	__be16 len;
	__u32 hdrs = p->l4_off - p->l3_off;

	/* A first fragment's length fields say nothing about the datagram. */
	if (p->frag != FRAG_NONE)
		return p->l4_len;
	if (p->family == FAM_V4) {
		if (bpf_skb_load_bytes(skb, p->l3_off + 2, &len, 2) < 0)
			return 0;
		return bpf_ntohs(len) > hdrs ? bpf_ntohs(len) - hdrs : 0;
	}
	if (bpf_skb_load_bytes(skb, p->l3_off + 4, &len, 2) < 0)
		return 0;
	return bpf_ntohs(len) + IP6_HLEN > hdrs ? bpf_ntohs(len) + IP6_HLEN - hdrs : 0;
}

/* Rewrites the SCTP port at `port_off` (0: source, 2: destination) from `from`
 * to `to` and corrects the CRC32c to match. Returns -1 when it cannot. */
static __always_inline int sctp_nat_port(struct __sk_buff *skb, const struct pkt *p, __u32 port_off, __be16 from,
					 __be16 to)
{
	__u32 len = sctp_len(skb, p);
	__u32 crc;
	__u8 d[2], f[2], t[2];

	if (len < 12 || len > 0xffff)
		return -1;
	if (bpf_skb_load_bytes(skb, p->l4_off + SCTP_CSUM_OFF, &crc, 4) < 0)
		return -1;
	__builtin_memcpy(f, &from, 2);
	__builtin_memcpy(t, &to, 2);
	d[0] = f[0] ^ t[0];
	d[1] = f[1] ^ t[1];
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	crc = __builtin_bswap32(crc);
#endif
	crc ^= crc32c_delta(d[0], d[1], len - port_off - 2);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	crc = __builtin_bswap32(crc);
#endif
	if (bpf_skb_store_bytes(skb, p->l4_off + port_off, &to, 2, 0) < 0 ||
	    bpf_skb_store_bytes(skb, p->l4_off + SCTP_CSUM_OFF, &crc, 4, 0) < 0)
		return -1;
	stat_inc(STAT_SCTP_CSUM_FIX);
	return 0;
}

#endif
