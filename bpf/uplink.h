/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Across nodes: two TC programs on a node's uplinks, the interfaces its
 * traffic to other nodes leaves by (the NIC with native routing, the VXLAN
 * device of an overlay, which sees the inner packets).
 *
 *   pktmeta_uplink_out  egress: on the SYN of a connection with a record
 *                       (found through conntrack when NAT changed the
 *                       tuple), going to a cluster member, appends the
 *                       pktmeta TCP option (bpf/datapath.h). Any pktmeta
 *                       option already on a leaving SYN is not ours, and is
 *                       overwritten with NOPs first.
 *   pktmeta_uplink_in   ingress: on a SYN carrying the option, creates the
 *                       remote record under the tuple as it arrived, if the
 *                       source is a cluster member and the MAC verifies;
 *                       either way, cuts the option off before anything on
 *                       the node sees it.
 *
 * Both run after (egress) or before (ingress) netfilter, so the tuple they
 * see is the one on the wire, which is what the MAC covers. Included into
 * pktmeta.c: the records are the same, read and written the same way.
 */
#ifndef __PKTMETA_UPLINK_H__
#define __PKTMETA_UPLINK_H__

#include "siphash.h"

#define TCP_HDR_LEN 20
#define TCP_MAX_HDR_LEN 60
#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define IPV4_TOT_LEN_OFF 2
#define IPV4_CSUM_OFF 10
#define IPV6_PAYLOAD_LEN_OFF 4
#define TCP_CSUM_OFF 16
#define TCP_DOFF_OFF 12
#define CONN_ORIGIN_MASK ((1ULL << PKTMETA_CONN_ORIGIN_BITS) - 1)
/* The options area, padded to a power of two: reads a few bytes past a
 * bounded offset stay on the stack, and nonzero_len can mask into it. */
#define OPTS_BUF_LEN 64

/* A SYN (no ACK, FIN or RST) and where its headers are. */
struct syn_packet {
	struct packet p;
	__u32 l4off; /* TCP header, from the start of the frame */
	__u32 thlen; /* TCP header with options */
	__u32 l4len; /* what the IP header says follows it: TCP header + data */
	__u32 iplen_off; /* IPv4 total length or IPv6 payload length */
};

/* Parses a SYN. Anything else (almost every packet) returns 0 after the
 * header parse the delivery programs also pay. */
static __always_inline int parse_syn(struct __sk_buff *skb, struct syn_packet *s)
{
	void *data, *data_end;
	__u8 *th;

	/* Every byte written before anything reads it: Linux 6.1's verifier
	 * refuses a read of stack the compiler left unwritten on a path that
	 * never uses the value (6.3 lets privileged programs do it). */
	__builtin_memset(s, 0, sizeof(*s));
	if (parse_packet(skb, &s->p, 0) != PARSE_L4 || s->p.t.proto != IPPROTO_TCP ||
	    (s->p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_FIN | TCP_FLAG_RST)) != TCP_FLAG_SYN)
		return 0;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (s->p.family == 4) {
		struct iphdr *iph = data + sizeof(struct ethhdr);
		__u32 ihl;

		if ((void *)(iph + 1) > data_end)
			return 0;
		ihl = iph->ihl * 4;
		th = (__u8 *)iph + ihl;
		s->l4off = sizeof(struct ethhdr) + ihl;
		s->l4len = bpf_ntohs(iph->tot_len) - ihl;
		s->iplen_off = sizeof(struct ethhdr) + IPV4_TOT_LEN_OFF;
	} else {
		struct ipv6hdr *ip6h = data + sizeof(struct ethhdr);
		void *l4;
		__u8 proto;

		if ((void *)(ip6h + 1) > data_end)
			return 0;
		l4 = ip6h + 1;
		proto = ip6h->nexthdr;
		if (skip_ipv6_ext(&l4, data_end, &proto))
			return 0;
		th = l4;
		s->l4off = l4 - data;
		s->l4len = bpf_ntohs(ip6h->payload_len) - (__u32)(l4 - (void *)(ip6h + 1));
		s->iplen_off = sizeof(struct ethhdr) + IPV6_PAYLOAD_LEN_OFF;
	}
	if ((void *)(th + TCP_HDR_LEN) > data_end)
		return 0;
	s->thlen = (th[TCP_DOFF_OFF] >> 4) * 4;
	/* parse_l4 checked the header fits the IP length; a SYN never needs
	 * the BIG TCP form (length 0). */
	if (s->thlen < TCP_HDR_LEN || s->l4len < s->thlen || s->l4len > 0xffff - TCP_MAX_HDR_LEN)
		return 0;
	return 1;
}

/* The options of a SYN, and the pktmeta options among them. */
struct opt_scan {
	__u8 buf[OPTS_BUF_LEN];
	__u64 mask; /* bytes the pktmeta options cover */
	__u32 optlen;
	__u32 at; /* offset of the last pktmeta option */
	__u32 n; /* how many */
	__u32 cut; /* the list ended before optlen (EOL, a bad length) */
};

/* Finds the pktmeta options in sc->buf. Stops where the list ends or
 * stops making sense, as the receiving stack does. A global function: the
 * verifier checks it once, on its own, instead of once for every state the
 * callers reach it in (the walk's bounds multiply with theirs). */
__attribute__((noinline)) int pktmeta_find_options(struct opt_scan *sc)
{
	__u32 next = 0, optlen;

	if (!sc)
		return 0;
	optlen = sc->optlen;
	sc->mask = 0;
	sc->n = 0;
	sc->at = 0;
	sc->cut = 0;
	for (__u32 i = 0; i < PKTMETA_TCP_MAX_OPTS; i++) {
		__u8 kind, len;

		if (i >= optlen)
			break;
		if (i != next)
			continue;
		kind = sc->buf[i];
		if (kind == TCPOPT_EOL) {
			sc->cut = 1;
			break;
		}
		if (kind == TCPOPT_NOP) {
			next = i + 1;
			continue;
		}
		len = sc->buf[i + 1];
		if (len < 2 || i + len > optlen) {
			sc->cut = 1;
			break;
		}
		if (kind == PKTMETA_TCPOPT_KIND && len >= 4 && sc->buf[i + 2] == (PKTMETA_TCPOPT_EXID >> 8) &&
		    sc->buf[i + 3] == (PKTMETA_TCPOPT_EXID & 0xff)) {
			sc->at = i;
			sc->mask |= ((1ULL << len) - 1) << i;
			sc->n++;
		}
		next = i + len;
	}
	return sc->n;
}

/* len, which the caller has checked is 1..OPTS_BUF_LEN, in a form the
 * verifier sees is never zero: Linux 6.1's learns nothing from a test
 * against zero, and refuses a possibly zero-sized helper access. */
static __always_inline __u32 nonzero_len(__u32 len)
{
	return ((len - 1) & (OPTS_BUF_LEN - 1)) + 1;
}

/* x & mask (a constant), done where the verifier sees it: clang drops a
 * mask it can prove redundant, and Linux 6.1's verifier forgets a bound
 * once the value has been spilled to the stack and read back. */
#define bounded(x, mask)                                                                           \
	({                                                                                         \
		__u64 __v = (x);                                                                   \
		asm volatile("%0 &= " #mask : "+r"(__v));                                          \
		__v;                                                                               \
	})

/* Reads the TCP options into sc (zero-padded) and finds the pktmeta ones.
 * Returns how many there are, or -1. */
static __always_inline int load_options(struct __sk_buff *skb, const struct syn_packet *s, struct opt_scan *sc)
{
	__u32 optlen = s->thlen - TCP_HDR_LEN;

	__builtin_memset(sc, 0, sizeof(*sc));
	if (optlen == 0)
		return 0;
	if (optlen > PKTMETA_TCP_MAX_OPTS)
		return -1;
	if (bpf_skb_load_bytes(skb, s->l4off + TCP_HDR_LEN, sc->buf, nonzero_len(optlen)))
		return -1;
	sc->optlen = optlen;
	return pktmeta_find_options(sc);
}

/* Overwrites the masked option bytes with NOPs, in the packet too, and
 * fixes the TCP checksum. */
static __always_inline int nop_options(struct __sk_buff *skb, const struct syn_packet *s, struct opt_scan *sc)
{
	__u32 optlen = sc->optlen;
	__u64 mask = sc->mask;
	__u8 *buf = sc->buf;
	__s64 d;

	if (optlen == 0 || optlen > PKTMETA_TCP_MAX_OPTS || (optlen & 3))
		return -1;
	d = bpf_csum_diff((__be32 *)buf, optlen, NULL, 0, 0);
	/* Without a branch: a verifier that cannot merge "written" with "not
	 * written" (5.15's) would otherwise walk 2^40 paths. */
	for (int j = 0; j < PKTMETA_TCP_MAX_OPTS; j++) {
		__u8 m = -(__u8)((mask >> j) & 1);

		buf[j] = (buf[j] & ~m) | (TCPOPT_NOP & m);
	}
	d = bpf_csum_diff(NULL, 0, (__be32 *)buf, optlen, d);
	if (d < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, s->l4off + TCP_HDR_LEN, buf, nonzero_len(optlen), 0))
		return -1;
	return bpf_l4_csum_replace(skb, s->l4off + TCP_CSUM_OFF, 0, d, 0);
}

/* Adds delta (a multiple of 4, either sign) to the TCP header length and
 * the IP length, with every checksum that covers them. The bytes added or
 * removed at the end of the header are the caller's. */
static __always_inline int resize_tcp_header(struct __sk_buff *skb, const struct syn_packet *s, int delta)
{
	__u32 csum_off = s->l4off + TCP_CSUM_OFF;
	__be16 old_w, new_w, old_ip, new_ip;
	__u32 new_thlen = s->thlen + delta;

	if (bpf_skb_load_bytes(skb, s->l4off + TCP_DOFF_OFF, &old_w, sizeof(old_w)))
		return -1;
	/* Data offset: high nibble of byte 12, in 32-bit words. */
	new_w = old_w;
	((__u8 *)&new_w)[0] = (((__u8 *)&old_w)[0] & 0x0f) | ((new_thlen / 4) << 4);
	if (bpf_skb_store_bytes(skb, s->l4off + TCP_DOFF_OFF, &new_w, sizeof(new_w), 0) ||
	    bpf_l4_csum_replace(skb, csum_off, old_w, new_w, sizeof(new_w)))
		return -1;
	/* The pseudo-header's TCP length. */
	if (bpf_l4_csum_replace(skb, csum_off, bpf_htons(s->l4len), bpf_htons(s->l4len + delta),
				BPF_F_PSEUDO_HDR | sizeof(__be16)))
		return -1;
	if (bpf_skb_load_bytes(skb, s->iplen_off, &old_ip, sizeof(old_ip)))
		return -1;
	new_ip = bpf_htons(bpf_ntohs(old_ip) + delta);
	if (bpf_skb_store_bytes(skb, s->iplen_off, &new_ip, sizeof(new_ip), 0))
		return -1;
	if (s->p.family == 4 &&
	    bpf_l3_csum_replace(skb, sizeof(struct ethhdr) + IPV4_CSUM_OFF, old_ip, new_ip, sizeof(new_ip)))
		return -1;
	return 0;
}

/* Whether addr belongs to a cluster member (a node address or pod CIDR). */
static __always_inline int cluster_member(const __u8 addr[16])
{
	struct pktmeta_member_key k;

	k.prefixlen = 128;
	__builtin_memcpy(k.addr, addr, 16);
	return bpf_map_lookup_elem(&pktmeta_members, &k) != NULL;
}

/* The MAC of an option: the tuple as sent, the SYN's sequence number and
 * option bytes 4-15, under the cluster key. */
struct mac_msg {
	struct pktmeta_tuple t;
	__be32 seq;
	__u8 body[PKTMETA_TCPOPT_LEN - 4 - PKTMETA_TCPOPT_MAC_LEN];
};
_Static_assert(sizeof(struct mac_msg) == SIPHASH_MSG_WORDS * 8, "MAC message is 7 words");

struct mac_input {
	struct mac_msg m;
	__u64 key[2];
};

/* A global function: the verifier checks SipHash's thousand instructions
 * once, not once per path that reaches them. */
__attribute__((noinline)) __u32 pktmeta_option_mac(struct mac_input *in)
{
	if (!in)
		return 0;
	return (__u32)siphash_56((const __u64 *)&in->m, in->key);
}

static __always_inline __u32 option_mac(const struct syn_packet *s, const __u8 *opt, const struct pktmeta_node_config *n)
{
	struct mac_input in;

	__builtin_memcpy(&in.m.t, &s->p.t, sizeof(in.m.t));
	in.m.seq = bpf_htonl(s->p.seq);
	__builtin_memcpy(in.m.body, opt + 4, sizeof(in.m.body));
	in.key[0] = n->key[0];
	in.key[1] = n->key[1];
	return pktmeta_option_mac(&in);
}

static __always_inline void put_be(__u8 *dst, __u64 v, int bytes)
{
#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < bytes)
			dst[i] = v >> (8 * (bytes - 1 - i));
}

static __always_inline __u64 get_be(const __u8 *src, int bytes)
{
	__u64 v = 0;

#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < bytes)
			v = v << 8 | src[i];
	return v;
}

static __always_inline struct pktmeta_remote_counters *xcounters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_xstats, &zero);
}

/* The record of the connection a leaving SYN opens: under the tuple it
 * carries, or, after DNAT or SNAT on this node, under the tuple conntrack
 * says the origin sent. */
static __always_inline int leaving_record(struct __sk_buff *skb, const struct syn_packet *s,
					  struct pktmeta_record *rec)
{
	struct pktmeta_tuple rev, orig;

	if (snapshot(&s->p.t, rec))
		return 1;
	tuple_reverse(&rev, &s->p.t);
	__builtin_memset(&orig, 0, sizeof(orig)); /* see alias_current() */
	if (ct_direction(skb, &rev, &orig) != CT_REPLY || tuple_equal(&orig, &s->p.t))
		return 0;
	return snapshot(&orig, rec) != NULL;
}

static __always_inline int uplink_out(struct __sk_buff *skb)
{
	struct pktmeta_remote_counters *xc;
	struct pktmeta_node_config *n;
	struct pktmeta_record rec;
	struct syn_packet s;
	struct opt_scan sc;
	__u8 opt[PKTMETA_TCPOPT_LEN];
	__u32 origin_node, mac = 0;
	int found;
	__u64 conn;
	__s64 d;

	if (!parse_syn(skb, &s))
		return TCX_NEXT;
	xc = xcounters();
	if (!xc)
		return TCX_NEXT;
	xc->out_syns++;
	/* Only this program writes pktmeta options, and only after this: one
	 * already here came from a pod or the host. */
	found = load_options(skb, &s, &sc);
	if (found < 0)
		return TCX_DROP; /* options that cannot be read cannot be checked */
	if (found) {
		if (nop_options(skb, &s, &sc))
			return TCX_DROP; /* never let a forged option through */
		xc->opt_neutralised += found;
	}
	n = node_config();
	if (!n || !n->node_id)
		return TCX_NEXT;
	if (!cluster_member(s.p.t.daddr)) {
		xc->out_not_member++;
		return TCX_NEXT;
	}
	if (!leaving_record(skb, &s, &rec)) {
		xc->out_no_record++;
		return TCX_NEXT;
	}
	/* After an EOL or a bad length the receiver stops reading: an option
	 * appended there would reach its pod unread. */
	if (sc.cut) {
		xc->out_list_cut++;
		return TCX_NEXT;
	}
	/* Appended at the end of the header, which must be the end of the
	 * packet: no data (TCP Fast Open), no padding after it. */
	if (s.thlen + PKTMETA_TCPOPT_LEN > TCP_MAX_HDR_LEN || s.l4len != s.thlen || skb->len != s.l4off + s.thlen) {
		xc->opt_no_room++;
		return TCX_NEXT;
	}
	/* A remote record leaving again (this node forwards the connection,
	 * for a NodePort say) keeps its origin: its conn_id holds the origin
	 * node's id in the same low bits. */
	origin_node = (rec.flags & PKTMETA_F_REMOTE) ? rec.origin_node : n->node_id;
	conn = rec.conn_id & CONN_ORIGIN_MASK;
	opt[0] = PKTMETA_TCPOPT_KIND;
	opt[1] = PKTMETA_TCPOPT_LEN;
	put_be(&opt[2], PKTMETA_TCPOPT_EXID, 2);
	put_be(&opt[4], (__u64)PKTMETA_TCPOPT_VERSION << 44 | conn, 6);
	put_be(&opt[10], origin_node, 2);
	put_be(&opt[12], rec.origin_workload, 4);
	if (n->flags & PKTMETA_NODE_MAC)
		mac = option_mac(&s, opt, n);
	put_be(&opt[16], mac, 4);

	if (bpf_skb_change_tail(skb, skb->len + PKTMETA_TCPOPT_LEN, 0)) {
		xc->opt_no_room++;
		return TCX_NEXT;
	}
	d = bpf_csum_diff(NULL, 0, (__be32 *)opt, sizeof(opt), 0);
	if (d < 0 || bpf_skb_store_bytes(skb, s.l4off + s.thlen, opt, sizeof(opt), 0) ||
	    bpf_l4_csum_replace(skb, s.l4off + TCP_CSUM_OFF, 0, d, 0) ||
	    resize_tcp_header(skb, &s, PKTMETA_TCPOPT_LEN))
		return TCX_DROP; /* half-changed: a SYN with a bad checksum; the retransmit tries again */
	xc->opt_added++;
	return TCX_NEXT;
}

/* Creates the record of a connection a pod on another node opened, from
 * an option uplink_in trusts. */
static __always_inline void remote_tag(struct __sk_buff *skb, const struct syn_packet *s, const __u8 *opt,
				       struct pktmeta_node_config *n, struct pktmeta_remote_counters *xc)
{
	struct pktmeta_counters *c = counters();
	struct pktmeta_record rec, old, *e;
	__u64 now, conn;
	__u16 origin_node;
	__s64 claim, *live;
	int err; /* 32 bits: see tag() */

	if (!c)
		return;
	origin_node = get_be(&opt[10], 2);
	conn = get_be(&opt[4], 6) & CONN_ORIGIN_MASK;
	now = bpf_ktime_get_ns();
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.version = PKTMETA_RECORD_VERSION;
	rec.flags = PKTMETA_F_REMOTE;
	rec.conn_id = PKTMETA_CONN_REMOTE | (__u64)origin_node << PKTMETA_CONN_ORIGIN_BITS | conn;
	rec.conn_gen = (__u32)rec.conn_id;
	rec.origin_node = origin_node;
	rec.origin_workload = get_be(&opt[12], 4);
	rec.origin_ifindex = skb->ifindex;
	rec.syn_seq = s->p.seq;
	rec.first_seen_ns = now;
	rec.last_seen_ns = now;

	live = remote_live();
	if (!live)
		return;
	if (n->max_remote && READ_ONCE(*live) >= (__s64)n->max_remote) {
		if (!conn_find(&s->p.t)) {
			xc->remote_over_budget++;
			return;
		}
		err = -EEXIST;
	} else {
		err = table_error(table_insert(&s->p.t, &rec));
	}
	if (err == -EEXIST) {
		e = snapshot(&s->p.t, &old);
		if (!e)
			return;
		/* Only a remote record may be replaced by one. */
		if (!(old.flags & PKTMETA_F_REMOTE)) {
			xc->remote_not_party++;
			return;
		}
		/* The same origin connection again: its retransmit, or a
		 * replay. Never a new connection (that gets a new id at its
		 * origin), so it never replaces the record, closing or not. */
		if (old.conn_id == rec.conn_id) {
			xc->remote_retransmits++;
			return;
		}
		claim = set_flags(e, old.conn_id, F_REPLACING);
		if (claim < 0 || ((__u32)claim & F_REPLACING))
			return;
		err = table_error(table_rewrite(&s->p.t, old.conn_id, &rec));
		if (err)
			clear_flags(e, old.conn_id, F_REPLACING);
	} else if (!err) {
		__sync_fetch_and_add(live, 1);
	}
	if (err == -E2BIG) {
		xc->remote_table_full++;
		return;
	}
	if (err) {
		count_table_error(c, err);
		return;
	}
	xc->remote_tagged++;
	emit(c, PKTMETA_EV_OPENED, 0, &rec, &s->p.t, NULL, skb->ifindex, now);
}

/* Cuts the one pktmeta option at the end of the options off the packet;
 * falls back to NOPs where it is not last, or data or padding follow. */
static __always_inline int strip_options(struct __sk_buff *skb, const struct syn_packet *s, struct opt_scan *sc,
					 struct pktmeta_remote_counters *xc)
{
	__u8 zero[PKTMETA_TCPOPT_LEN] = {};
	__u32 at = sc->at, optlen = sc->optlen;
	__u8 *buf = sc->buf;
	__s64 d;

	if (sc->n == 1 && at <= PKTMETA_TCP_MAX_OPTS - PKTMETA_TCPOPT_LEN &&
	    at + PKTMETA_TCPOPT_LEN == optlen && s->l4len == s->thlen && skb->len == s->l4off + s->thlen &&
	    buf[(at = bounded(at, 31)) + 1] == PKTMETA_TCPOPT_LEN) {
		/* Zero the bytes first, so that each change below is one the
		 * checksum helpers account for, whatever the skb's checksum
		 * state; then shrink the header and drop them. */
		d = bpf_csum_diff((__be32 *)&buf[at], PKTMETA_TCPOPT_LEN, NULL, 0, 0);
		if (d < 0 || bpf_skb_store_bytes(skb, s->l4off + TCP_HDR_LEN + at, zero, sizeof(zero), 0) ||
		    bpf_l4_csum_replace(skb, s->l4off + TCP_CSUM_OFF, 0, d, 0) ||
		    resize_tcp_header(skb, s, -PKTMETA_TCPOPT_LEN) ||
		    bpf_skb_change_tail(skb, skb->len - PKTMETA_TCPOPT_LEN, 0))
			return -1;
		return 0;
	}
	xc->stripped_nop++;
	return nop_options(skb, s, sc);
}

static __always_inline int uplink_in(struct __sk_buff *skb)
{
	struct pktmeta_remote_counters *xc;
	struct pktmeta_node_config *n;
	struct syn_packet s;
	struct opt_scan sc;
	__u8 opt[PKTMETA_TCPOPT_LEN] = {};
	int found, trusted = 0;
	__u32 at;

	if (!parse_syn(skb, &s))
		return TCX_NEXT;
	xc = xcounters();
	if (!xc)
		return TCX_NEXT;
	xc->in_syns++;
	found = load_options(skb, &s, &sc);
	if (found <= 0)
		return TCX_NEXT;
	at = sc.at;
	xc->in_options++;
	n = node_config();
	if (!n || !n->node_id) {
		xc->node_off++;
	} else if (found != 1 || at > PKTMETA_TCP_MAX_OPTS - PKTMETA_TCPOPT_LEN ||
		   (__builtin_memcpy(opt, &sc.buf[bounded(at, 31)], sizeof(opt)), opt[1] != PKTMETA_TCPOPT_LEN) ||
		   (opt[4] >> 4) != PKTMETA_TCPOPT_VERSION) {
		xc->malformed++;
	} else if (!cluster_member(s.p.t.saddr)) {
		xc->untrusted++;
	} else {
		/* Node 0 is no node. (Our own id is fine: a pod of ours that
		 * reached one of ours through another node's NodePort.) */
		if (!get_be(&opt[10], 2))
			xc->malformed++;
		else if ((n->flags & PKTMETA_NODE_MAC) && option_mac(&s, opt, n) != (__u32)get_be(&opt[16], 4))
			xc->bad_mac++;
		else
			trusted = 1;
	}
	/* Stripped whether trusted or not: nothing past this hook sees it. */
	if (strip_options(skb, &s, &sc, xc))
		return TCX_DROP;
	if (trusted)
		remote_tag(skb, &s, opt, n, xc);
	return TCX_NEXT;
}

SEC("tc")
int pktmeta_uplink_out(struct __sk_buff *skb)
{
	return uplink_out(skb);
}

SEC("tc")
int pktmeta_uplink_in(struct __sk_buff *skb)
{
	return uplink_in(skb);
}

#endif /* __PKTMETA_UPLINK_H__ */
