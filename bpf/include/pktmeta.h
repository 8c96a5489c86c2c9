/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * pktmeta.h - public interface of the pktmeta datapath.
 *
 * pktmeta stashes a fixed-size record for every L4 connection a pod opens,
 * keyed by the connection's tuple as the pod sent it, in a pinned table.
 * A BPF program anywhere on the node (another netns included) can read the
 * origin of the packet in front of it with pktmeta_lookup() below.
 *
 * Using it from your own program:
 *
 *   #define PKTMETA_DECLARE_MAPS   // before the include, in one object
 *   #include <pktmeta.h>
 *
 *   struct pktmeta_tuple t;
 *   struct pktmeta_record rec;
 *   pktmeta_tuple_from_ipv4(&t, iph->saddr, iph->daddr, sport, dport, IPPROTO_TCP);
 *   if (pktmeta_lookup(&t, &rec) == 0)
 *           ... rec.origin_workload, rec.conn_id ...
 *
 * and load the object with the maps declared below replaced by the node's
 * pinned ones, <pinPath>/maps/<name> (default pin path /sys/fs/bpf/pktmeta).
 * The declarations carry a placeholder size, and loaders reuse a pinned map
 * only if the sizes match: with cilium/ebpf, the Go package
 * github.com/pktmeta/pktmeta/consumer does it all (Maps() returns the
 * MapReplacements); with libbpf, open each pinned map, set the size with
 * bpf_map__set_max_entries() and hand it over with bpf_map__reuse_fd()
 * before loading, and on CPUs other than x86 set the read-only variable
 * pktmeta_ordered_reads to 1 (below).
 *
 * The table (layout 3) is pktmeta's own, in plain arrays, not a BPF hash
 * map: F14-style chunks of PKTMETA_CHUNK_SLOTS slots, one 64-bit word per
 * chunk with a one-byte tag of each slot's hash, and a hash that is the
 * same for a tuple and its reverse (see docs/ARCHITECTURE.md). Slots are
 * reused the moment a record is removed, so pktmeta_lookup() copies the
 * record and checks the slot's state word, which every write moves, before
 * and after the copy; use it instead of reading the slots yourself, and
 * never write to these maps. (The one thing a copy cannot rule out is the
 * same tuple being reused by a new connection of the same pod inside those
 * nanoseconds: the identity read is then still right, the conn_id may be
 * either.)
 *
 * Stability: every record carries a version byte, and the pinned config map
 * carries PKTMETA_LAYOUT_VERSION. A change to any layout in this file bumps
 * the version; consumers should check rec.version == PKTMETA_RECORD_VERSION.
 * Only the maps declared below are part of the consumer interface.
 */
#ifndef __PKTMETA_H__
#define __PKTMETA_H__

#include <linux/types.h>

#define PKTMETA_LAYOUT_VERSION 3
#define PKTMETA_RECORD_VERSION 3

/* Connection tuple, as a map key. IPv4 addresses are stored IPv4-mapped
 * (::ffff:a.b.c.d) so one map serves both families; the datapath never
 * takes IPv4-mapped addresses from IPv6 packets, so the two cannot collide.
 * Ports in network order. Padding must be zero: initialise keys with
 * __builtin_memset or one of the pktmeta_tuple_from_* helpers. */
struct pktmeta_tuple {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 _pad[3];
} __attribute__((aligned(8)));

/* Record flags. */
#define PKTMETA_F_DELIVERED   (1U << 0) /* reached a pod on this node; peer fields are valid */
#define PKTMETA_F_NAT         (1U << 1) /* destination saw a translated tuple; an alias exists */
#define PKTMETA_F_FIN_ORIG    (1U << 2) /* FIN from the origin */
#define PKTMETA_F_FIN_REPLY   (1U << 3) /* FIN from the peer */
#define PKTMETA_F_UDP         (1U << 4)
#define PKTMETA_F_ESTABLISHED (1U << 5) /* TCP: the peer answered the SYN */
#define PKTMETA_F_CT_SEEN     (1U << 6) /* a sweep found the connection in conntrack */
#define PKTMETA_F_QUIET       (1U << 7) /* no events: the origin was over its event rate */
#define PKTMETA_F_REMOTE      (1U << 8) /* opened on another node (origin_node); see below */

/* conn_id of a remote record: this bit, the origin node in bits 44-59 and
 * the origin node's own conn_id (its low 44 bits) below them. Local ids
 * never have it set. */
#define PKTMETA_CONN_REMOTE (1ULL << 63)
#define PKTMETA_CONN_ORIGIN_BITS 44

/* One record per connection, in a slot of the table below, keyed by the
 * tuple as the origin pod sent it. Written at the connection's first packet; the
 * flags change afterwards, and the peer fields once, at delivery.
 *
 * A remote record (PKTMETA_F_REMOTE) is one a pod on another node opened:
 * it is written where the first packet enters this node, keyed by the
 * tuple as it arrived, from the pktmeta TCP option the origin node put on
 * the SYN. Its origin_workload is a workload id of node origin_node, not
 * of this one, and origin_ifindex is the interface it came in on. */
struct pktmeta_record {
	/* flags and conn_gen form one 64-bit word that pktmeta changes only
	 * with a compare-and-swap: conn_gen (the low 32 bits of conn_id) makes
	 * the swap fail on an element that was recycled for another
	 * connection. */
	__u32 flags; /* PKTMETA_F_* */
	__u32 conn_gen;
	__u64 conn_id; /* unique on the node, never 0 */
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 _pad;
	__u16 origin_node; /* remote records: the origin's node id; 0 on this node's own */
	__u32 origin_workload; /* pktmeta workload id of the sender (on origin_node if remote) */
	__u32 origin_ifindex; /* host-side veth the first packet came from */
	__u32 peer_workload; /* receiving workload once delivered, 0 if none */
	__u32 peer_ifindex; /* host-side veth it was delivered to */
	__u32 syn_seq; /* TCP: sequence number of the SYN */
	__u64 first_seen_ns; /* CLOCK_MONOTONIC, bpf_ktime_get_ns() */
	__u64 last_seen_ns; /* UDP: refreshed about once a second (advisory) */
	__u64 delivered_ns; /* CLOCK_MONOTONIC, 0 until delivered */
	struct pktmeta_tuple peer_tuple; /* tuple as the receiver saw it */
};

/* Map "pktmeta_aliases": tuple as a receiver saw it after NAT -> origin key. */
struct pktmeta_alias {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 _pad[3];
	__u32 checked_s; /* UDP: when conntrack last confirmed it, in seconds (internal) */
	__u64 conn_id;
	struct pktmeta_tuple origin;
};

/* ---- The connection table. ----
 *
 * Map "pktmeta_table": one struct pktmeta_table_info, written once when the
 * table is made. Map "pktmeta_chunks": n_chunks 64-bit words, one per
 * chunk. Map "pktmeta_slots": n_chunks * PKTMETA_CHUNK_SLOTS slots; slot i
 * of chunk c is element c * PKTMETA_CHUNK_SLOTS + i.
 *
 * A tuple's hash h (pktmeta_hash()) picks its home chunk, (h * n_chunks)
 * >> 32, and its tag, the low byte of h (1 if that is 0). Its slot is in
 * the home chunk or up to PKTMETA_CHUNK_PROBES - 1 chunks after it (the
 * last chunk is followed by the first). A chunk's word holds, in byte i
 * (i < 7), the tag of slot i or 0 when it is free; in bits 56-62 how many
 * entries of earlier home chunks lie past it (a lookup goes on to the
 * next chunk only while that is non-zero); bit 63 is the writers' lock
 * for entries whose home it is. */
#define PKTMETA_TABLE_VERSION 1
#define PKTMETA_CHUNK_SLOTS 7
#define PKTMETA_CHUNK_PROBES 8
#define PKTMETA_CHUNK_OVERFLOW_SHIFT 56
#define PKTMETA_CHUNK_OVERFLOW_MASK (0x7fULL << PKTMETA_CHUNK_OVERFLOW_SHIFT)
#define PKTMETA_CHUNK_LOCK (1ULL << 63)

struct pktmeta_table_info {
	__u32 version; /* PKTMETA_TABLE_VERSION; 0: no table yet */
	__u32 n_chunks;
	__u32 seed; /* of pktmeta_hash(): random, so that pods cannot aim tuples at a chunk */
	__u32 capacity; /* the connections it was sized for (maxConnections) */
};

/* A slot's state: its kind in the low two bits, and a generation above
 * that every write moves (WRITING -> LIVE, WRITING -> EMPTY, REWRITING ->
 * LIVE): a reader that sees the same LIVE state before and after a copy
 * copied one entry. WRITING: an entry is being made or removed (no entry
 * to find yet, or any more). REWRITING: the entry's record is being
 * rewritten in place; its key stays, so it is still found, but it cannot
 * be copied until the write is done. */
#define PKTMETA_SLOT_EMPTY 0
#define PKTMETA_SLOT_WRITING 1
#define PKTMETA_SLOT_LIVE 2
#define PKTMETA_SLOT_REWRITING 3
#define PKTMETA_SLOT_KIND_MASK 3ULL
#define PKTMETA_SLOT_GEN_ONE 4ULL

struct pktmeta_slot {
	__u64 state;
	struct pktmeta_tuple key;
	struct pktmeta_record rec;
};

#ifdef PKTMETA_DECLARE_MAPS
#include <bpf/bpf_helpers.h>

/* Set to 1 before loading where the CPU's loads may pass earlier loads
 * (arm64, and anything but x86): a copy's two reads of a slot's state are
 * then fully ordered atomic operations, without which a copy that raced a
 * write can go unnoticed there. On x86-64 plain reads suffice and this
 * stays 0 (the verifier drops the atomic branch). The Go package consumer
 * sets it. The datapath's writers use it too: on x86-64 they move a
 * slot's state with plain stores, elsewhere with exchanges. */
const volatile __u32 pktmeta_ordered_reads = 0;

/* Sizes are placeholders: the pinned maps replace them at load time. The
 * aliases are a plain (preallocated) hash, not LRU: pktmeta never evicts a
 * live entry to make room; a full table refuses new ones instead. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_table_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_chunks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct pktmeta_tuple);
	__type(value, struct pktmeta_alias);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_aliases SEC(".maps");

static __always_inline void pktmeta__v4mapped(__u8 dst[16], __be32 addr)
{
	__builtin_memset(dst, 0, 10);
	dst[10] = 0xff;
	dst[11] = 0xff;
	__builtin_memcpy(&dst[12], &addr, 4);
}

/* Fills t from IPv4 addresses and L4 ports (network order). */
static __always_inline int pktmeta_tuple_from_ipv4(struct pktmeta_tuple *t, __be32 saddr,
						   __be32 daddr, __be16 sport, __be16 dport,
						   __u8 proto)
{
	__builtin_memset(t, 0, sizeof(*t));
	pktmeta__v4mapped(t->saddr, saddr);
	pktmeta__v4mapped(t->daddr, daddr);
	t->sport = sport;
	t->dport = dport;
	t->proto = proto;
	return 0;
}

/* Fills t from IPv6 addresses and L4 ports (network order). */
static __always_inline int pktmeta_tuple_from_ipv6(struct pktmeta_tuple *t, const __u8 saddr[16],
						   const __u8 daddr[16], __be16 sport, __be16 dport,
						   __u8 proto)
{
	__builtin_memset(t, 0, sizeof(*t));
	__builtin_memcpy(t->saddr, saddr, 16);
	__builtin_memcpy(t->daddr, daddr, 16);
	t->sport = sport;
	t->dport = dport;
	t->proto = proto;
	return 0;
}

#define PKTMETA__JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 pktmeta__rol32(__u32 w, int s)
{
	return (w << s) | (w >> (32 - s));
}

/* linux/jhash.h's __jhash_mix and __jhash_final. */
#define PKTMETA__JHASH_MIX(a, b, c)                                          \
	do {                                                                 \
		a -= c; a ^= pktmeta__rol32(c, 4); c += b;                   \
		b -= a; b ^= pktmeta__rol32(a, 6); a += c;                   \
		c -= b; c ^= pktmeta__rol32(b, 8); b += a;                   \
		a -= c; a ^= pktmeta__rol32(c, 16); c += b;                  \
		b -= a; b ^= pktmeta__rol32(a, 19); a += c;                  \
		c -= b; c ^= pktmeta__rol32(b, 4); b += a;                   \
	} while (0)
#define PKTMETA__JHASH_FINAL(a, b, c)                                        \
	do {                                                                 \
		c ^= b; c -= pktmeta__rol32(b, 14);                          \
		a ^= c; a -= pktmeta__rol32(c, 11);                          \
		b ^= a; b -= pktmeta__rol32(a, 25);                          \
		c ^= b; c -= pktmeta__rol32(b, 16);                          \
		a ^= c; a -= pktmeta__rol32(c, 4);                           \
		b ^= a; b -= pktmeta__rol32(a, 14);                          \
		c ^= b; c -= pktmeta__rol32(b, 24);                          \
	} while (0)

/* The table's hash of a tuple: jhash (the kernel's hash maps' own, seeded
 * the same way) over ten 32-bit words: the lower endpoint's address, the
 * higher one's, both ports (the lower endpoint's in the high half) and the
 * protocol, where "lower" compares the addresses as four native-order
 * words, then the ports. A tuple and its reverse hash alike. */
static __always_inline __u32 pktmeta_hash(const struct pktmeta_tuple *t, __u32 seed)
{
	const __u32 *s = (const __u32 *)t->saddr, *d = (const __u32 *)t->daddr;
	const __u32 *lo = s, *hi = d;
	__u32 sp = t->sport, dp = t->dport, ports = (sp << 16) | dp;
	__u32 a, b, c;
	int swap;

	if (s[0] != d[0])
		swap = s[0] > d[0];
	else if (s[1] != d[1])
		swap = s[1] > d[1];
	else if (s[2] != d[2])
		swap = s[2] > d[2];
	else if (s[3] != d[3])
		swap = s[3] > d[3];
	else
		swap = sp > dp;
	if (swap) {
		lo = d;
		hi = s;
		ports = (dp << 16) | sp;
	}
	a = b = c = PKTMETA__JHASH_INITVAL + (10 << 2) + seed;
	a += lo[0]; b += lo[1]; c += lo[2];
	PKTMETA__JHASH_MIX(a, b, c);
	a += lo[3]; b += hi[0]; c += hi[1];
	PKTMETA__JHASH_MIX(a, b, c);
	a += hi[2]; b += hi[3]; c += ports;
	PKTMETA__JHASH_MIX(a, b, c);
	a += t->proto;
	PKTMETA__JHASH_FINAL(a, b, c);
	return c;
}

static __always_inline __u32 pktmeta_home_chunk(__u32 h, __u32 n_chunks)
{
	return ((__u64)h * n_chunks) >> 32;
}

static __always_inline __u8 pktmeta_tag(__u32 h)
{
	__u8 tag = h;

	return tag ? tag : 1;
}

static __always_inline int pktmeta__tuple_eq(const struct pktmeta_tuple *x, const struct pktmeta_tuple *y)
{
	const __u64 *a = (const __u64 *)x, *b = (const __u64 *)y;

	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4];
}

/* Byte arithmetic on a chunk's word: the bytes among 0-6 that are zero,
 * as their high bits. The lowest one is exact; a borrow can mark bytes
 * above a zero byte too, so callers check each candidate. */
#define PKTMETA__BYTES_ONE 0x0101010101010101ULL
#define PKTMETA__BYTES_HIGH 0x8080808080808080ULL
#define PKTMETA__TAG_BYTES 0x00ffffffffffffffULL

static __always_inline __u64 pktmeta__zero_bytes(__u64 w)
{
	w |= ~PKTMETA__TAG_BYTES;
	return (w - PKTMETA__BYTES_ONE) & ~w & PKTMETA__BYTES_HIGH;
}

/* The index of the byte whose high bit is the lowest set bit of m. */
static __always_inline __u32 pktmeta__lowest_byte(__u64 m)
{
	__u64 below = (m & -m) - 1;

	return (((below & PKTMETA__BYTES_HIGH) >> 7) * PKTMETA__BYTES_ONE) >> 56;
}

/* A global function (kernel 5.12 and later) by default: the verifier
 * checks the walk's loops once, not once for every place that looks a
 * tuple up, which would take a program with a few lookups past its
 * limits. Define PKTMETA_INLINE_FIND before the include to inline it
 * instead: a program that also makes tail calls needs that on kernels
 * that do not allow tail calls beside BPF-to-BPF calls (arm64 before
 * Linux 6.0), and on x86-64 such a program's stack is limited to 256
 * bytes a frame. */
#ifdef PKTMETA_INLINE_FIND
#define PKTMETA__FIND static __always_inline
#else
#define PKTMETA__FIND __attribute__((noinline))
#endif

/* Finds the slot holding t, LIVE or being rewritten: its index in
 * pktmeta_slots, or -1. A hint only: the slot may change at any moment
 * (pktmeta_lookup() copies and checks). */
PKTMETA__FIND int pktmeta_find_slot(const struct pktmeta_tuple *t)
{
	struct pktmeta_table_info *info;
	struct pktmeta_slot *s;
	__u32 zero = 0, n, c, i, idx;
	__u64 *word, w, m;
	__u8 tag;
	__u32 h;

	if (!t)
		return -1;
	info = bpf_map_lookup_elem(&pktmeta_table, &zero);
	if (!info)
		return -1;
	n = *(volatile __u32 *)&info->n_chunks;
	if (!n)
		return -1;
	h = pktmeta_hash(t, info->seed);
	tag = pktmeta_tag(h);
	c = pktmeta_home_chunk(h, n);
	for (int step = 0; step < PKTMETA_CHUNK_PROBES; step++) {
		word = bpf_map_lookup_elem(&pktmeta_chunks, &c);
		if (!word)
			return -1;
		w = *(volatile __u64 *)word;
		m = pktmeta__zero_bytes(w ^ (tag * PKTMETA__BYTES_ONE));
		for (int k = 0; k < PKTMETA_CHUNK_SLOTS && m; k++) {
			i = pktmeta__lowest_byte(m);
			m &= m - 1;
			if ((__u8)(w >> (8 * i)) != tag)
				continue;
			idx = c * PKTMETA_CHUNK_SLOTS + i;
			s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
			if (!s)
				return -1;
			/* LIVE or REWRITING: an entry, with its key. */
			if ((*(volatile __u64 *)&s->state & PKTMETA_SLOT_LIVE) && pktmeta__tuple_eq(&s->key, t))
				return idx;
		}
		if (!(w & PKTMETA_CHUNK_OVERFLOW_MASK))
			return -1;
		c = c + 1 == n ? 0 : c + 1;
	}
	return -1;
}

/* A slot's state, read in order with the reads around it (see
 * pktmeta_ordered_reads). */
static __always_inline __u64 pktmeta_slot_state(struct pktmeta_slot *s)
{
	__u64 st;

	asm volatile("" ::: "memory");
	if (pktmeta_ordered_reads)
		st = __sync_fetch_and_add(&s->state, 0);
	else
		st = *(volatile __u64 *)&s->state;
	asm volatile("" ::: "memory");
	return st;
}

/* Copies the record in slot idx into *out if the slot held a LIVE entry
 * under key t for the whole copy; returns the slot, or NULL. */
static __always_inline struct pktmeta_slot *pktmeta_copy_slot(__u32 idx, const struct pktmeta_tuple *t,
							      struct pktmeta_record *out)
{
	struct pktmeta_slot *s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	__u64 st;

	if (!s)
		return NULL;
	st = pktmeta_slot_state(s);
	if ((st & PKTMETA_SLOT_KIND_MASK) != PKTMETA_SLOT_LIVE || !pktmeta__tuple_eq(&s->key, t))
		return NULL;
	__builtin_memcpy(out, &s->rec, sizeof(*out));
	if (pktmeta_slot_state(s) != st)
		return NULL;
	return s;
}

/* Copies the record under key into *out. 0 on success. */
static __always_inline int pktmeta__copy_record(const struct pktmeta_tuple *key,
						struct pktmeta_record *out)
{
	int idx = pktmeta_find_slot(key);

	if (idx < 0)
		return -1;
	return pktmeta_copy_slot(idx, key, out) ? 0 : -1;
}

/* Copies the origin record of the connection the tuple belongs to, as the
 * tuple is seen here, into *out: the origin's own tuple, or the tuple a
 * receiver saw after Service DNAT (through the alias the destination side
 * wrote). Only the direction origin -> receiver is indexed; reverse the
 * tuple to look up a reply. Returns 0, or -1 when pktmeta knows nothing of
 * it (or the record changed under the lookup: treat it as unknown). */
static __always_inline int pktmeta_lookup(const struct pktmeta_tuple *t, struct pktmeta_record *out)
{
	struct pktmeta_alias *a;
	struct pktmeta_alias alias;

	if (pktmeta__copy_record(t, out) == 0)
		return 0;
	a = bpf_map_lookup_elem(&pktmeta_aliases, t);
	if (!a)
		return -1;
	__builtin_memcpy(&alias, a, sizeof(alias));
	/* The alias element is recycled like a record: check it still
	 * belongs to t. */
	if (bpf_map_lookup_elem(&pktmeta_aliases, t) != a ||
	    *(volatile __u64 *)&a->conn_id != alias.conn_id)
		return -1;
	if (pktmeta__copy_record(&alias.origin, out))
		return -1;
	/* The origin key may have been reused by a newer connection. */
	if (out->conn_id != alias.conn_id)
		return -1;
	return 0;
}
#endif /* PKTMETA_DECLARE_MAPS */

#endif /* __PKTMETA_H__ */
