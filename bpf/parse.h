/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Header parsing: Ethernet, IPv4 (with options), IPv6 (extension headers,
 * bounded), TCP, UDP. Anything else is reported as not parsed and the packet
 * passes untouched.
 */
#ifndef __PKTMETA_PARSE_H__
#define __PKTMETA_PARSE_H__

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "pktmeta.h"

/* IPv6 extension headers skipped before giving up. */
#define PKTMETA_MAX_EXT_HDRS 8

/* The first byte of an IPv4 header without options: version 4, five
 * 32-bit words. */
#define IPV4_NO_OPTIONS 0x45
/* The fragment offset bits of frag_off (host order): non-zero in a
 * fragment other than the first, which carries no L4 header. */
#define IPV4_FRAG_OFFSET 0x1fff
/* Bytes 8-11 of an IPv4-mapped address (::ffff:a.b.c.d) as one word the
 * way memory holds them. */
#define V4MAPPED_WORD ((__u64)bpf_htonl(0x0000ffff))

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

enum parse_result {
	PARSE_NONE = 0, /* not IP, or malformed */
	PARSE_L3, /* IP header valid, no usable TCP/UDP header */
	PARSE_L4, /* tuple filled */
	PARSE_TCP_PLAIN, /* TCP without SYN, FIN or RST: nothing to do, tuple not filled */
	PARSE_BAD_ADDR, /* IPv6 with an IPv4-mapped address: never valid on the wire */
};

struct packet {
	struct pktmeta_tuple t; /* as on the wire */
	__u32 seq; /* TCP sequence number, host order */
	__u8 tcp_flags;
	__u8 family; /* 4 or 6 */
};

/* Bytes pulled into the linear area when the headers are not all there:
 * Ethernet + IPv6 + extension headers + TCP. */
#define PKTMETA_PULL_LEN 256

static __always_inline void v4mapped(__u8 dst[16], __be32 addr)
{
	__u32 *w = (__u32 *)dst;

	w[0] = 0;
	w[1] = 0;
	w[2] = V4MAPPED_WORD;
	w[3] = addr;
}

static __always_inline int is_v4mapped(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == V4MAPPED_WORD;
}

static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_FRAGMENT:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
		return 1;
	}
	return 0;
}

/* Walks the IPv6 extension header chain from *cur. Returns 0 with *cur at
 * the L4 header and *proto set, or -1 when the chain is too long,
 * truncated, or the packet is a non-first fragment (no L4 header). */
static __always_inline int skip_ipv6_ext(void **cur, void *data_end, __u8 *proto)
{
	__u8 nexthdr = *proto;
	__u8 *h = *cur;

	for (int i = 0; i < PKTMETA_MAX_EXT_HDRS; i++) {
		if (!is_ipv6_ext(nexthdr))
			break;
		if ((void *)(h + 8) > data_end)
			return -1;
		switch (nexthdr) {
		case IPPROTO_FRAGMENT:
			/* Fragment offset (13 bits) in bytes 2-3. */
			if ((((__u16)h[2] << 8 | h[3]) & 0xfff8) != 0)
				return -1;
			nexthdr = h[0];
			h += 8;
			break;
		case IPPROTO_AH:
			nexthdr = h[0];
			h += ((__u32)h[1] + 2) * 4;
			break;
		default:
			nexthdr = h[0];
			h += ((__u32)h[1] + 1) * 8;
			break;
		}
	}
	if (is_ipv6_ext(nexthdr))
		return -1;
	*cur = h;
	*proto = nexthdr;
	return 0;
}

/* A TCP segment without SYN, FIN or RST: almost every packet, and one the
 * datapath has nothing to do with. */
static __always_inline int tcp_plain(void *l4, void *data_end, __u8 proto)
{
	__u8 *th = l4;

	if (proto != IPPROTO_TCP || (void *)(th + 20) > data_end)
		return 0;
	return !(th[13] & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)) && (th[12] >> 4) >= 5;
}

/* Fills the L4 part of p. l4_len is what the IP header says follows the
 * network headers (0: unknown, a BIG TCP packet); a header that does not
 * fit in it is padding, not a header. */
static __always_inline enum parse_result parse_l4(struct packet *p, void *l4, void *data_end, __u8 proto,
						  __u32 l4_len)
{
	if (proto == IPPROTO_TCP) {
		__u8 *th = l4;

		if ((void *)(th + 20) > data_end)
			return PARSE_L3;
		/* Data offset below 5 words: not a TCP header we can trust. */
		if ((th[12] >> 4) < 5)
			return PARSE_L3;
		if (l4_len && l4_len < (__u32)(th[12] >> 4) * 4)
			return PARSE_L3;
		__builtin_memcpy(&p->t.sport, th, 2);
		__builtin_memcpy(&p->t.dport, th + 2, 2);
		p->seq = (__u32)th[4] << 24 | (__u32)th[5] << 16 | (__u32)th[6] << 8 | th[7];
		p->tcp_flags = th[13];
	} else if (proto == IPPROTO_UDP) {
		__u8 *uh = l4;

		if ((void *)(uh + 8) > data_end)
			return PARSE_L3;
		if (l4_len && l4_len < 8)
			return PARSE_L3;
		__builtin_memcpy(&p->t.sport, uh, 2);
		__builtin_memcpy(&p->t.dport, uh + 2, 2);
		p->seq = 0;
		p->tcp_flags = 0;
	} else {
		return PARSE_L3;
	}
	p->t.proto = proto;
	p->t._pad[0] = 0;
	p->t._pad[1] = 0;
	p->t._pad[2] = 0;
	return PARSE_L4;
}

/* Fills p from the headers. A plain TCP segment returns PARSE_TCP_PLAIN as
 * soon as its flags are read, before any address is copied, unless
 * need_tuple (strict mode checks the source of every packet). */
static __always_inline enum parse_result parse_linear(struct __sk_buff *skb, struct packet *p,
						      const int need_tuple)
{
	void *data, *data_end, *l4;
	struct ethhdr *eth;
	__u32 l4_len;
	__u8 proto;

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return PARSE_NONE;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		__u32 ihl;

		if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
			return PARSE_NONE;
		ihl = iph->ihl * 4;
		l4_len = bpf_ntohs(iph->tot_len);
		/* 0 is a BIG TCP packet (longer than 64 KiB); the length is then
		 * the skb's, and the headers are checked against the data. */
		if (l4_len) {
			if (l4_len < ihl)
				return PARSE_NONE;
			l4_len -= ihl;
		}
		proto = iph->protocol;
		l4 = (void *)iph + ihl;
		/* Non-first fragments carry no L4 header. */
		if (iph->frag_off & bpf_htons(IPV4_FRAG_OFFSET))
			proto = 0;
		if (!need_tuple && tcp_plain(l4, data_end, proto))
			return PARSE_TCP_PLAIN;
		p->family = 4;
		v4mapped(p->t.saddr, iph->saddr);
		v4mapped(p->t.daddr, iph->daddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end || ip6h->version != 6)
			return PARSE_NONE;
		proto = ip6h->nexthdr;
		l4 = ip6h + 1;
		if (skip_ipv6_ext(&l4, data_end, &proto))
			proto = 0;
		if (!need_tuple && tcp_plain(l4, data_end, proto))
			return PARSE_TCP_PLAIN;
		p->family = 6;
		__builtin_memcpy(p->t.saddr, &ip6h->saddr, 16);
		__builtin_memcpy(p->t.daddr, &ip6h->daddr, 16);
		/* ::ffff:a.b.c.d is how tuples hold IPv4 addresses: an IPv6
		 * packet carrying one could pose as an IPv4 connection. */
		if (is_v4mapped(p->t.saddr) || is_v4mapped(p->t.daddr))
			return PARSE_BAD_ADDR;
		/* Payload length covers the extension headers too; 0 is a
		 * jumbogram or BIG TCP packet. */
		l4_len = bpf_ntohs(ip6h->payload_len);
		if (l4_len) {
			__u32 ext = l4 - (void *)(ip6h + 1);

			if (l4_len < ext)
				return PARSE_L3;
			l4_len -= ext;
		}
	} else {
		return PARSE_NONE;
	}
	return parse_l4(p, l4, data_end, proto, l4_len);
}

/* Parses the headers in the linear area. A pod's own stack puts its headers
 * there (payload goes to page fragments), so the pull, which may copy and
 * reallocate, only runs when they really are cut short. */
static __always_inline enum parse_result parse_packet(struct __sk_buff *skb, struct packet *p,
						      const int need_tuple)
{
	enum parse_result res = parse_linear(skb, p, need_tuple);
	__u32 linear;

	if (res == PARSE_L4 || res == PARSE_TCP_PLAIN || res == PARSE_BAD_ADDR)
		return res;
	linear = skb->data_end - skb->data;
	if (linear >= skb->len || linear >= PKTMETA_PULL_LEN)
		return res;
	if (bpf_skb_pull_data(skb, skb->len < PKTMETA_PULL_LEN ? skb->len : PKTMETA_PULL_LEN))
		return res;
	return parse_linear(skb, p, need_tuple);
}

static __always_inline void tuple_reverse(struct pktmeta_tuple *dst, const struct pktmeta_tuple *src)
{
	__builtin_memcpy(dst->saddr, src->daddr, 16);
	__builtin_memcpy(dst->daddr, src->saddr, 16);
	dst->sport = src->dport;
	dst->dport = src->sport;
	dst->proto = src->proto;
	dst->_pad[0] = 0;
	dst->_pad[1] = 0;
	dst->_pad[2] = 0;
}

static __always_inline int tuple_equal(const struct pktmeta_tuple *a, const struct pktmeta_tuple *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	/* 40 bytes, padding always zero: five words. */
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

#endif /* __PKTMETA_PARSE_H__ */
