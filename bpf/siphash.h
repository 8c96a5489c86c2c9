/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * SipHash-2-4 (Aumasson, Bernstein) over a fixed 56-byte message: the MAC
 * of the cross-node option. Unrolled by the compiler; no loops the
 * verifier has to walk.
 */
#ifndef __PKTMETA_SIPHASH_H__
#define __PKTMETA_SIPHASH_H__

#include <linux/types.h>

#define SIPHASH_MSG_WORDS 7

static __always_inline __u64 sip_rotl(__u64 x, int b)
{
	return (x << b) | (x >> (64 - b));
}

#define SIPROUND(v0, v1, v2, v3)                                                                   \
	do {                                                                                       \
		v0 += v1;                                                                          \
		v1 = sip_rotl(v1, 13);                                                             \
		v1 ^= v0;                                                                          \
		v0 = sip_rotl(v0, 32);                                                             \
		v2 += v3;                                                                          \
		v3 = sip_rotl(v3, 16);                                                             \
		v3 ^= v2;                                                                          \
		v0 += v3;                                                                          \
		v3 = sip_rotl(v3, 21);                                                             \
		v3 ^= v0;                                                                          \
		v2 += v1;                                                                          \
		v1 = sip_rotl(v1, 17);                                                             \
		v1 ^= v2;                                                                          \
		v2 = sip_rotl(v2, 32);                                                             \
	} while (0)

/* SipHash-2-4 of 7 little-endian words (56 bytes) under key k. */
static __always_inline __u64 siphash_56(const __u64 m[SIPHASH_MSG_WORDS], const __u64 k[2])
{
	__u64 v0 = k[0] ^ 0x736f6d6570736575ULL;
	__u64 v1 = k[1] ^ 0x646f72616e646f6dULL;
	__u64 v2 = k[0] ^ 0x6c7967656e657261ULL;
	__u64 v3 = k[1] ^ 0x7465646279746573ULL;
	__u64 b = (__u64)(SIPHASH_MSG_WORDS * 8) << 56;

#pragma unroll
	for (int i = 0; i < SIPHASH_MSG_WORDS; i++) {
		v3 ^= m[i];
		SIPROUND(v0, v1, v2, v3);
		SIPROUND(v0, v1, v2, v3);
		v0 ^= m[i];
	}
	v3 ^= b;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	v0 ^= b;
	v2 ^= 0xff;
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	SIPROUND(v0, v1, v2, v3);
	return v0 ^ v1 ^ v2 ^ v3;
}

#endif /* __PKTMETA_SIPHASH_H__ */
