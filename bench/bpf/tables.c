// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * A design study for issue 11, run by `go run ./bench --only tables`: the
 * table work of a TCP/IPv4 first packet (look the reverse tuple up, find
 * nothing, insert the new record) in four table layouts, side by side,
 * and lookups that find a record or none. Not part of the datapath: it
 * measures what each layout costs, before the datapath and the consumer
 * ABI are changed for one of them. The chunked table also deletes, and
 * bench/tables_test.go churns it from every CPU at once.
 *
 *  - lab_htab40: today's layout. A preallocated hash map, 40-byte key
 *    (IPv4 as v4-mapped IPv6), 104-byte record.
 *  - lab_htab16: the same map type with a compact IPv4 key (16 bytes) and
 *    a 48-byte record.
 *  - lab_open: a table of its own, open addressing in a plain array of
 *    64-byte slots (one cache line: state word, key, 40-byte record). The
 *    slot index comes from a hash that is the same for a tuple and its
 *    reverse (the endpoints are put in order before hashing), so the
 *    reverse lookup and the insert walk the same probe sequence: one pass,
 *    usually one cache line, where a hash map touches the reverse tuple's
 *    bucket, the new tuple's bucket and a free element.
 *  - lab_chunk: the same slots, grouped in chunks of seven, with a dense
 *    array of one 64-bit word per chunk beside them (F14's layout: seven
 *    one-byte tags of the slots' hashes, a count of the entries that
 *    overflowed past the chunk, and an insert lock bit). A lookup reads
 *    the chunk's word and only the slots whose tag matches; it goes on to
 *    the next chunk only while the count says something overflowed, so a
 *    delete just clears a tag (no tombstones, which a linear-probing
 *    table would need). The words are 2 MB for 2M slots, far fewer lines
 *    than the slots. Unlike lab_open it is complete: deletes, a
 *    generation in each slot's state, and inserts that cannot make two
 *    entries for one tuple (tables_test.go).
 *
 * Every program takes a fresh tuple from a per-CPU sequence, so every
 * repetition of a test run is a new connection; lab_floor does only that,
 * and the bench subtracts it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef TCX_NEXT
#define TCX_NEXT -1
#endif

#define IPPROTO_TCP 6
#define LAB_EEXIST 17 /* -EEXIST from a map update */

/* The tuples: from a pod address to 10.(96 + CPU).x.y:80, x.y and the
 * source port from a sequence number; port 81 for tuples without a
 * record. The CPU in the address keeps two CPUs' sequences apart. */
#define LAB_SADDR 0x0af40102 /* 10.244.1.2 */
#define LAB_DNET 0x0a600000 /* 10.96.0.0 */
#define LAB_CPU_SHIFT 16
#define LAB_CPU_MASK 0x1f
#define LAB_DPORT_KNOWN 80
#define LAB_DPORT_NONE 81
/* What the lab writes into records: any values do. */
#define LAB_RECORD_VERSION 2
#define LAB_WORKLOAD 7

/* Return codes the bench checks: the record was made, or why not. */
#define LAB_MADE TCX_NEXT
#define LAB_REVERSE_FOUND 1
#define LAB_EXISTS 2
#define LAB_FULL 3
#define LAB_INTERNAL 4
#define LAB_BUSY 5

/* How far an insert probes before it gives up (the table counts as full
 * for this tuple). Bounded so the verifier sees a constant loop. */
#define OPEN_PROBES 32

/* Slot states (struct open_slot.state). */
#define SLOT_EMPTY 0
#define SLOT_WRITING 1
#define SLOT_LIVE 2

#define READ_ONCE_STATE(s) (*(volatile __u32 *)&(s)->state)
#define READ_ONCE_U64(x) (*(volatile __u64 *)&(x))

/* jhash's initial value and final mix (linux/jhash.h). */
#define JHASH_INITVAL 0xdeadbeef

char __license[] SEC("license") = "Dual BSD/GPL";

/* The table's slot count minus one (a power of two less one), and the
 * chunk count minus one; the bench sets them before loading. */
const volatile __u32 open_mask = 0;
const volatile __u32 chunk_mask = 0;

/* A chunk: CHUNK_SLOTS slots, at CHUNK_STRIDE slots apart in chunk_slots
 * (the eighth is unused), and one word in chunk_words: the slots' tags in
 * bytes 0-6 (0: free), byte 7 the overflow count and the insert lock
 * (CHUNK_LOCK below). */
#define CHUNK_SLOTS 7
#define CHUNK_STRIDE 8
#define CHUNK_OVERFLOW_SHIFT 56
#define CHUNK_OVERFLOW_ONE (1ULL << CHUNK_OVERFLOW_SHIFT)
/* How many chunks an insert or lookup walks at most. */
#define CHUNK_PROBES 8

struct key40 {
	__u8 saddr[16];
	__u8 daddr[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 _pad[3];
};

struct rec104 {
	__u32 version;
	__u32 flags;
	__u64 conn_id;
	__u64 first_seen_ns;
	__u64 last_seen_ns;
	__u32 origin_workload;
	__u32 origin_ifindex;
	__u32 syn_seq;
	__u32 _pad;
	__u8 rest[56];
};

struct key16 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 _pad[3];
};

/* 40 bytes: the compact record (ids and one timestamp base with a delta
 * instead of two full timestamps and padding). */
struct rec40 {
	__u64 conn_id;
	__u64 first_seen_ns;
	__u32 last_seen_delta_ms;
	__u32 flags;
	__u32 origin_workload;
	__u32 peer_workload;
	__u32 origin_ifindex;
	__u32 syn_seq;
};

struct rec48 {
	struct rec40 r;
	__u64 _spare;
};

struct open_slot {
	__u32 state;
	__u32 hash;
	struct key16 key;
	struct rec40 rec;
};

_Static_assert(sizeof(struct key40) == 40, "key40");
_Static_assert(sizeof(struct rec104) == 104, "rec104");
_Static_assert(sizeof(struct key16) == 16, "key16");
_Static_assert(sizeof(struct rec48) == 48, "rec48");
_Static_assert(sizeof(struct open_slot) == 64, "one cache line per slot");

/* Sizes are set by the bench before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct key40);
	__type(value, struct rec104);
} htab40 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct key16);
	__type(value, struct rec48);
} htab16 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct open_slot);
} open_table SEC(".maps");

/* Each table numbers its connections in its own per-CPU sequence (and
 * the floor in one more), so the lookups can pick among the records one
 * table holds. */
#define SEQ_HTAB40 0
#define SEQ_HTAB16 1
#define SEQ_OPEN 2
#define SEQ_FLOOR 3
#define SEQ_CHUNK 4
#define SEQS 5

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SEQS);
	__type(key, __u32);
	__type(value, __u64);
} lab_seq SEC(".maps");

/* Inserts refused for want of a free slot within the probe limit, by
 * table (the same indexes as lab_seq). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SEQS);
	__type(key, __u32);
	__type(value, __u64);
} lab_refused SEC(".maps");

/* Records made, by table: the bench checks that every repetition made
 * one or was refused. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SEQS);
	__type(key, __u32);
	__type(value, __u64);
} lab_made SEC(".maps");

static __always_inline int made(__u32 seq)
{
	__u64 *m = bpf_map_lookup_elem(&lab_made, &seq);

	if (m)
		++*m;
	return LAB_MADE;
}

static __always_inline int refused(__u32 seq)
{
	__u64 *r = bpf_map_lookup_elem(&lab_refused, &seq);

	if (r)
		++*r;
	return LAB_FULL;
}

/* The tuple numbered n of a CPU (see LAB_SADDR). */
static __always_inline void lab_tuple(struct key16 *k, __u32 cpu, __u64 n, __u16 dport)
{
	k->saddr = bpf_htonl(LAB_SADDR);
	k->daddr = bpf_htonl(LAB_DNET + ((cpu & LAB_CPU_MASK) << LAB_CPU_SHIFT) + (__u32)((n >> 16) & 0xffff));
	k->sport = bpf_htons((__u16)n);
	k->dport = bpf_htons(dport);
	k->proto = IPPROTO_TCP;
	k->_pad[0] = k->_pad[1] = k->_pad[2] = 0;
}

/* A new connection per call: the next number of the per-CPU sequence. */
static __always_inline int fresh(struct key16 *k, __u64 *n, __u32 seq)
{
	__u64 *s = bpf_map_lookup_elem(&lab_seq, &seq);

	if (!s)
		return -1;
	*n = ++*s;
	lab_tuple(k, bpf_get_smp_processor_id(), *n, LAB_DPORT_KNOWN);
	return 0;
}

static __always_inline void reverse16(const struct key16 *k, struct key16 *r)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
	r->_pad[0] = r->_pad[1] = r->_pad[2] = 0;
}

static __always_inline void mapped40(const struct key16 *k, struct key40 *w)
{
	__builtin_memset(w, 0, sizeof(*w));
	w->saddr[10] = w->saddr[11] = 0xff;
	w->daddr[10] = w->daddr[11] = 0xff;
	__builtin_memcpy(&w->saddr[12], &k->saddr, 4);
	__builtin_memcpy(&w->daddr[12], &k->daddr, 4);
	w->sport = k->sport;
	w->dport = k->dport;
	w->proto = k->proto;
}

SEC("tc")
int lab_floor(struct __sk_buff *skb)
{
	struct key16 k, r;
	__u64 n;

	if (fresh(&k, &n, SEQ_FLOOR))
		return LAB_INTERNAL;
	reverse16(&k, &r);
	/* Keep both keys alive as the designs do. */
	if (k.sport == r.sport + 1 && n == 0)
		return LAB_INTERNAL;
	return LAB_MADE;
}

SEC("tc")
int lab_htab40(struct __sk_buff *skb)
{
	struct key16 k, r;
	struct key40 fk, rk;
	struct rec104 rec;
	__u64 n;

	if (fresh(&k, &n, SEQ_HTAB40))
		return LAB_INTERNAL;
	reverse16(&k, &r);
	mapped40(&k, &fk);
	mapped40(&r, &rk);
	if (bpf_map_lookup_elem(&htab40, &rk))
		return LAB_REVERSE_FOUND;
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.version = LAB_RECORD_VERSION;
	rec.conn_id = n;
	rec.first_seen_ns = n;
	rec.last_seen_ns = n;
	rec.origin_workload = LAB_WORKLOAD;
	rec.origin_ifindex = skb->ifindex;
	rec.syn_seq = (__u32)n;
	switch (bpf_map_update_elem(&htab40, &fk, &rec, BPF_NOEXIST)) {
	case 0:
		return made(SEQ_HTAB40);
	case -LAB_EEXIST:
		return LAB_EXISTS;
	default:
		return LAB_FULL;
	}
}

SEC("tc")
int lab_htab16(struct __sk_buff *skb)
{
	struct key16 k, r;
	struct rec48 rec;
	__u64 n;

	if (fresh(&k, &n, SEQ_HTAB16))
		return LAB_INTERNAL;
	reverse16(&k, &r);
	if (bpf_map_lookup_elem(&htab16, &r))
		return LAB_REVERSE_FOUND;
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.r.conn_id = n;
	rec.r.first_seen_ns = n;
	rec.r.origin_workload = LAB_WORKLOAD;
	rec.r.origin_ifindex = skb->ifindex;
	rec.r.syn_seq = (__u32)n;
	switch (bpf_map_update_elem(&htab16, &k, &rec, BPF_NOEXIST)) {
	case 0:
		return made(SEQ_HTAB16);
	case -LAB_EEXIST:
		return LAB_EXISTS;
	default:
		return LAB_FULL;
	}
}

static __always_inline __u32 rol32(__u32 w, int s)
{
	return (w << s) | (w >> (32 - s));
}

/* jhash_3words-style (linux/jhash.h's final mix, the protocol folded into
 * the initial value of the third word) over the tuple with its endpoints
 * in order, so a tuple and its reverse hash alike. */
static __always_inline __u32 symmetric_hash(const struct key16 *k)
{
	__u32 a = bpf_ntohl(k->saddr), b = bpf_ntohl(k->daddr);
	__u32 pa = bpf_ntohs(k->sport), pb = bpf_ntohs(k->dport);
	__u32 lo = a, hi = b, ports = (pa << 16) | pb, t;

	if (a > b || (a == b && pa > pb)) {
		lo = b;
		hi = a;
		ports = (pb << 16) | pa;
	}
	a = lo + JHASH_INITVAL + 12;
	b = hi + JHASH_INITVAL + 12;
	t = ports + (JHASH_INITVAL ^ k->proto);
	/* __jhash_final(a, b, c) */
	t ^= b; t -= rol32(b, 14);
	a ^= t; a -= rol32(t, 11);
	b ^= a; b -= rol32(a, 25);
	t ^= b; t -= rol32(b, 16);
	a ^= t; a -= rol32(t, 4);
	b ^= a; b -= rol32(a, 14);
	t ^= b; t -= rol32(b, 24);
	return t;
}

static __always_inline int key16_eq(const struct key16 *x, const struct key16 *y)
{
	const __u64 *a = (const void *)x, *b = (const void *)y;

	return a[0] == b[0] && a[1] == b[1];
}

SEC("tc")
int lab_open(struct __sk_buff *skb)
{
	struct key16 k, r;
	struct open_slot *s;
	__u32 h, idx, st;
	__u64 n;

	if (fresh(&k, &n, SEQ_OPEN))
		return LAB_INTERNAL;
	reverse16(&k, &r);
	h = symmetric_hash(&k);
	for (int i = 0; i < OPEN_PROBES; i++) {
		idx = (h + i) & open_mask;
		s = bpf_map_lookup_elem(&open_table, &idx);
		if (!s)
			return LAB_INTERNAL;
		st = READ_ONCE_STATE(s);
		if (st == SLOT_LIVE) {
			if (s->hash != h)
				continue;
			if (key16_eq(&s->key, &k))
				return LAB_EXISTS;
			if (key16_eq(&s->key, &r))
				return LAB_REVERSE_FOUND;
			continue;
		}
		if (st != SLOT_EMPTY)
			return LAB_EXISTS; /* being written: leave it to the retransmit */
		if (__sync_val_compare_and_swap(&s->state, SLOT_EMPTY, SLOT_WRITING) != SLOT_EMPTY)
			return LAB_EXISTS;
		s->hash = h;
		s->key = k;
		__builtin_memset(&s->rec, 0, sizeof(s->rec));
		s->rec.conn_id = n;
		s->rec.first_seen_ns = n;
		s->rec.origin_workload = LAB_WORKLOAD;
		s->rec.origin_ifindex = skb->ifindex;
		s->rec.syn_seq = (__u32)n;
		/* The state last, with a fully ordered atomic, so a reader that
		 * sees LIVE sees the key and record. */
		__sync_lock_test_and_set(&s->state, SLOT_LIVE);
		return made(SEQ_OPEN);
	}
	return refused(SEQ_OPEN);
}

/* ---- Lookups: a known connection (hit) and an unknown one (miss). ---- */

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lab_cursor SEC(".maps");

/* ---- lab_chunk: seven slots a chunk, one word of tags a chunk. ---- */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} chunk_words SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct open_slot);
} chunk_slots SEC(".maps");

/* Byte 7 of a chunk's word: bit 63 is the chunk's insert lock (an insert
 * of a tuple whose home is this chunk is running: two inserts of one
 * tuple, or of a tuple and its reverse, share a home and so never run at
 * once), bits 56-62 count the entries that overflowed past the chunk. */
#define CHUNK_LOCK (1ULL << 63)
/* The count never reaches the lock bit: an entry lies at most
 * CHUNK_PROBES - 1 chunks past its home, so at most 7 * 7 = 49 entries
 * pass a chunk. */
#define CHUNK_OVERFLOW_MASK (0x7fULL << CHUNK_OVERFLOW_SHIFT)
/* How often an insert tries a compare-and-swap that other CPUs' inserts
 * and deletes in the same chunk can make fail. */
#define CHUNK_CAS_TRIES 4

/* A slot's state word: the kind in the low two bits (SLOT_*), a
 * generation above, moved by every delete, so a reader that copied a slot
 * between two equal reads of its state copied one entry. */
#define SLOT_KIND_MASK 3
#define SLOT_GEN_ONE 4

/* Set by the churn test to take the insert lock out, to see what it
 * prevents. */
const volatile __u32 chunk_no_lock = 0;

/* A nonzero byte from the hash bits the chunk index does not use. */
static __always_inline __u8 chunk_tag(__u32 h)
{
	__u8 t = h >> 24;

	return t ? t : 1;
}

/* Byte arithmetic on a chunk's word, so that the common cases (no tag
 * matches, the first free slot) cost a few instructions instead of a loop
 * over the seven bytes. */
#define BYTES_ONE 0x0101010101010101ULL
#define BYTES_HIGH 0x8080808080808080ULL
#define CHUNK_TAG_BYTES 0x00ffffffffffffffULL /* bytes 0-6 */

/* The zero bytes among bytes 0-6 of w, as their high bits. The lowest one
 * is exact; a borrow can mark bytes above a zero byte too, so callers
 * check every other candidate. */
static __always_inline __u64 zero_bytes(__u64 w)
{
	w |= ~CHUNK_TAG_BYTES;
	return (w - BYTES_ONE) & ~w & BYTES_HIGH;
}

/* The index of the byte whose high bit is the lowest set bit of m
 * (nonzero): the high bits below it, counted by a multiply. */
static __always_inline __u32 lowest_byte(__u64 m)
{
	__u64 below = (m & -m) - 1;

	return (((below & BYTES_HIGH) >> 7) * BYTES_ONE) >> 56;
}

static __always_inline __u8 byte_at(__u64 w, __u32 i)
{
	return w >> (8 * i);
}

/* What a walk of the chunks found for a tuple (and its reverse, which has
 * the same hash and so the same chunks and tag). */
#define WALK_NONE 0
#define WALK_KEY 1
#define WALK_REVERSE 2
#define WALK_BUSY 3
#define WALK_TOO_LONG 4

/* Walks from the tuple's home chunk while the overflow counts say an
 * entry of it may lie further on. Only LIVE slots count: an insert that
 * holds the home chunk's lock knows no other insert of this tuple is
 * running, and a slot being deleted is gone. */
static __always_inline int chunk_walk(const struct key16 *k, const struct key16 *r, __u32 h,
				      struct open_slot **found, __u32 *found_idx)
{
	__u8 tag = chunk_tag(h);
	__u32 c = h & chunk_mask, idx, i;
	struct open_slot *s;
	__u64 *word, w, m;

	for (int step = 0; step < CHUNK_PROBES; step++) {
		word = bpf_map_lookup_elem(&chunk_words, &c);
		if (!word)
			return WALK_BUSY;
		w = READ_ONCE_U64(*word);
		m = zero_bytes(w ^ (tag * BYTES_ONE));
		for (int n = 0; n < CHUNK_SLOTS && m; n++) {
			i = lowest_byte(m);
			m &= m - 1;
			if (byte_at(w, i) != tag)
				continue;
			idx = c * CHUNK_STRIDE + i;
			s = bpf_map_lookup_elem(&chunk_slots, &idx);
			if (!s)
				return WALK_BUSY;
			if ((READ_ONCE_STATE(s) & SLOT_KIND_MASK) != SLOT_LIVE)
				continue;
			if (key16_eq(&s->key, k)) {
				*found = s;
				*found_idx = idx;
				return WALK_KEY;
			}
			if (r && key16_eq(&s->key, r))
				return WALK_REVERSE;
		}
		if (!(w & CHUNK_OVERFLOW_MASK))
			return WALK_NONE;
		c = (c + 1) & chunk_mask;
	}
	return WALK_TOO_LONG;
}

/* What the churn did, per CPU (CHURN_*). */
#define CHURN_MADE 0
#define CHURN_EXISTS 1
#define CHURN_BUSY 2
#define CHURN_FULL 3
#define CHURN_DELETED 4
#define CHURN_ABSENT 5
#define CHURN_DUPLICATE 6
#define CHURN_COUNTS 7

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CHURN_COUNTS);
	__type(key, __u32);
	__type(value, __u64);
} churn_counts SEC(".maps");

static __always_inline void churn_count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&churn_counts, &what);

	if (n)
		++*n;
}


/* Adds delta overflow counts to the chunks from home up to, not
 * including, end. */
static __always_inline void chunk_count_overflow(__u32 home, __u32 end, __s64 delta)
{
	__u32 c = home;
	__u64 *word;

	for (int step = 0; step < CHUNK_PROBES && c != end; step++) {
		word = bpf_map_lookup_elem(&chunk_words, &c);
		if (!word)
			return;
		__sync_fetch_and_add(word, (__u64)(delta * (__s64)CHUNK_OVERFLOW_ONE));
		c = (c + 1) & chunk_mask;
	}
}

static __always_inline int chunk_lock(__u64 *home_word)
{
	__u64 w;

	if (chunk_no_lock)
		return 0;
	for (int t = 0; t < CHUNK_CAS_TRIES; t++) {
		w = READ_ONCE_U64(*home_word);
		if (w & CHUNK_LOCK)
			return -1;
		if (__sync_val_compare_and_swap(home_word, w, w | CHUNK_LOCK) == w)
			return 0;
	}
	return -1;
}

static __always_inline void chunk_unlock(__u64 *home_word)
{
	if (!chunk_no_lock)
		__sync_fetch_and_and(home_word, ~CHUNK_LOCK);
}

/* Inserts k with record rec unless k or its reverse r is in the table.
 * Returns LAB_MADE, LAB_EXISTS, LAB_REVERSE_FOUND, LAB_BUSY (another CPU
 * holds the home chunk, or kept changing the chunk with the free slot:
 * leave it to the retransmit) or LAB_FULL. */
static __always_inline int chunk_insert(const struct key16 *k, const struct key16 *r, const struct rec40 *rec)
{
	__u32 h = symmetric_hash(k), home = h & chunk_mask, c, idx, st, i;
	__u64 *home_word, *word = NULL, w, m;
	struct open_slot *s = NULL;
	__u8 tag = chunk_tag(h);
	int res, claimed = 0;

	home_word = bpf_map_lookup_elem(&chunk_words, &home);
	if (!home_word)
		return LAB_INTERNAL;
	if (chunk_lock(home_word))
		return LAB_BUSY;
	res = chunk_walk(k, r, h, &s, &idx);
	if (res != WALK_NONE) {
		chunk_unlock(home_word);
		switch (res) {
		case WALK_KEY:
			return LAB_EXISTS;
		case WALK_REVERSE:
			return LAB_REVERSE_FOUND;
		case WALK_TOO_LONG:
			return LAB_FULL;
		default:
			return LAB_INTERNAL;
		}
	}
	/* The first chunk from home with a free slot. */
	c = home;
	for (int step = 0; step < CHUNK_PROBES; step++) {
		word = bpf_map_lookup_elem(&chunk_words, &c);
		if (!word)
			break;
		w = READ_ONCE_U64(*word);
		if (zero_bytes(w))
			break;
		c = (c + 1) & chunk_mask;
	}
	if (!word || !zero_bytes(READ_ONCE_U64(*word))) {
		chunk_unlock(home_word);
		return LAB_FULL;
	}
	/* Count the overflow first, so a lookup never stops short of the
	 * entry; a claim that fails counts it down again. */
	chunk_count_overflow(home, c, 1);
	word = bpf_map_lookup_elem(&chunk_words, &c);
	if (!word)
		goto undo;
	for (int t = 0; t < CHUNK_CAS_TRIES; t++) {
		w = READ_ONCE_U64(*word);
		m = zero_bytes(w);
		if (!m)
			goto undo;
		i = lowest_byte(m);
		if (__sync_val_compare_and_swap(word, w, w | ((__u64)tag << (8 * i))) == w) {
			claimed = 1;
			break;
		}
	}
	if (!claimed)
		goto undo;
	idx = c * CHUNK_STRIDE + i;
	s = bpf_map_lookup_elem(&chunk_slots, &idx);
	if (!s)
		goto undo;
	/* The slot is EMPTY (a delete clears its tag last): readers that
	 * match the new tag skip it until it is LIVE. The exchange marks it
	 * WRITING and returns the generation the last delete left. */
	st = __sync_lock_test_and_set(&s->state, SLOT_WRITING) & ~SLOT_KIND_MASK;
	s->hash = h;
	s->key = *k;
	s->rec = *rec;
	__sync_lock_test_and_set(&s->state, st | SLOT_LIVE);
	chunk_unlock(home_word);
	return LAB_MADE;
undo:
	chunk_count_overflow(home, c, -1);
	chunk_unlock(home_word);
	return LAB_BUSY;
}

/* Deletes k: the slot leaves LIVE first (readers and walks skip it), the
 * overflow counts of its path go down, the slot becomes EMPTY with a new
 * generation, and only then is its tag cleared, so an insert can claim the
 * slot only once nothing of the old entry is left to write. */
static __always_inline int chunk_delete(const struct key16 *k)
{
	__u32 h = symmetric_hash(k), home = h & chunk_mask, idx = 0, st;
	struct open_slot *s = NULL;
	__u64 *word;

	if (chunk_walk(k, NULL, h, &s, &idx) != WALK_KEY || !s)
		return LAB_FULL; /* not found */
	st = READ_ONCE_STATE(s);
	if ((st & SLOT_KIND_MASK) != SLOT_LIVE ||
	    __sync_val_compare_and_swap(&s->state, st, (st & ~SLOT_KIND_MASK) | SLOT_WRITING) != st)
		return LAB_BUSY; /* another CPU is deleting it */
	chunk_count_overflow(home, idx / CHUNK_STRIDE, -1);
	__sync_lock_test_and_set(&s->state, (st & ~SLOT_KIND_MASK) + SLOT_GEN_ONE);
	word = bpf_map_lookup_elem(&chunk_words, &(__u32){idx / CHUNK_STRIDE});
	if (!word)
		return LAB_INTERNAL;
	__sync_fetch_and_and(word, ~(0xffULL << (8 * (idx % CHUNK_STRIDE))));
	return LAB_MADE;
}

SEC("tc")
int lab_chunk(struct __sk_buff *skb)
{
	struct key16 k, r;
	struct rec40 rec;
	int res;
	__u64 n;

	if (fresh(&k, &n, SEQ_CHUNK))
		return LAB_INTERNAL;
	reverse16(&k, &r);
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.conn_id = n;
	rec.first_seen_ns = n;
	rec.origin_workload = LAB_WORKLOAD;
	rec.origin_ifindex = skb->ifindex;
	rec.syn_seq = (__u32)n;
	res = chunk_insert(&k, &r, &rec);
	if (res == LAB_MADE)
		return made(SEQ_CHUNK);
	return res == LAB_FULL ? refused(SEQ_CHUNK) : res;
}

/* ---- The churn test: inserts and deletes from every CPU at once. ---- */

/* Keys of the churn test: this many tuples, shared by all CPUs, and the
 * share of operations that are deletes, in 256ths. */
const volatile __u32 churn_keys = 1;
const volatile __u32 churn_delete_share = 128;

/* Live entries per connection of the churn (its tuple or the reverse),
 * counted so that the count is never more than the truth: up after an
 * insert published its entry, down before a delete takes one away (and
 * up again if the delete did not). A count that reaches two is two live
 * entries for one connection: CHURN_DUPLICATE. */
#define CHURN_MAX_KEYS 4096

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CHURN_MAX_KEYS);
	__type(key, __u32);
	__type(value, __s64);
} churn_live SEC(".maps");

/* One operation on a random connection of churn_keys, by its tuple or its
 * reverse (so reverse checks race too): insert or delete. */
SEC("tc")
int lab_chunk_churn(struct __sk_buff *skb)
{
	__u32 n = bpf_get_prandom_u32() % churn_keys, rnd = bpf_get_prandom_u32();
	int reverse = rnd & 0x100;
	__s64 *live = bpf_map_lookup_elem(&churn_live, &n);
	struct key16 k, r;
	struct rec40 rec;
	int res;

	if (!live)
		return LAB_INTERNAL;
	/* The same tuples on every CPU: CPU 0's. */
	lab_tuple(&k, 0, n, LAB_DPORT_KNOWN);
	reverse16(&k, &r);
	if ((rnd & 0xff) < churn_delete_share) {
		__sync_fetch_and_add(live, -1);
		res = chunk_delete(reverse ? &r : &k);
		if (res != LAB_MADE)
			__sync_fetch_and_add(live, 1);
		churn_count(res == LAB_MADE ? CHURN_DELETED : res == LAB_FULL ? CHURN_ABSENT : CHURN_BUSY);
		return TCX_NEXT;
	}
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.conn_id = n;
	res = reverse ? chunk_insert(&r, &k, &rec) : chunk_insert(&k, &r, &rec);
	if (res == LAB_MADE && __sync_fetch_and_add(live, 1) >= 1)
		churn_count(CHURN_DUPLICATE);
	churn_count(res == LAB_MADE ? CHURN_MADE : res == LAB_FULL ? CHURN_FULL : res == LAB_BUSY ? CHURN_BUSY : CHURN_EXISTS);
	return TCX_NEXT;
}

/* Multiplier of Knuth's multiplicative hash: spreads consecutive cursors
 * over the records made so far. */
#define SCATTER 2654435761ULL

/* A tuple to look up. known: one of the records this CPU made (the bench
 * runs the study on one CPU), picked in scattered order; otherwise a
 * tuple no record has (port 81). */
static __always_inline int pick(struct key16 *k, int known, __u32 seq)
{
	__u32 zero = 0;
	__u64 *made = bpf_map_lookup_elem(&lab_seq, &seq);
	__u64 *cur = bpf_map_lookup_elem(&lab_cursor, &zero);
	__u64 n;

	if (!made || !cur || !*made)
		return -1;
	n = 1 + (++*cur * SCATTER) % *made;
	lab_tuple(k, bpf_get_smp_processor_id(), n, known ? LAB_DPORT_KNOWN : LAB_DPORT_NONE);
	return 0;
}

SEC("tc")
int lab_pick_floor(struct __sk_buff *skb)
{
	struct key16 k;

	if (pick(&k, 1, SEQ_OPEN))
		return LAB_INTERNAL;
	if (k.sport == 0 && k.dport == 0)
		return LAB_INTERNAL;
	return LAB_MADE;
}

/* Reads as the datapath's snapshot() does: copy, look up again, same
 * element and same connection. */
static __always_inline int htab40_read(int known)
{
	struct key16 k;
	struct key40 w;
	struct rec104 copy, *e;

	if (pick(&k, known, SEQ_HTAB40))
		return LAB_INTERNAL;
	mapped40(&k, &w);
	e = bpf_map_lookup_elem(&htab40, &w);
	if (!e)
		return known ? LAB_FULL : LAB_MADE;
	__builtin_memcpy(&copy, e, sizeof(copy));
	if (bpf_map_lookup_elem(&htab40, &w) != e || READ_ONCE_U64(e->conn_id) != copy.conn_id)
		return LAB_EXISTS;
	return known ? LAB_MADE : LAB_FULL;
}

static __always_inline int htab16_read(int known)
{
	struct key16 k;
	struct rec48 copy, *e;

	if (pick(&k, known, SEQ_HTAB16))
		return LAB_INTERNAL;
	e = bpf_map_lookup_elem(&htab16, &k);
	if (!e)
		return known ? LAB_FULL : LAB_MADE;
	__builtin_memcpy(&copy, e, sizeof(copy));
	if (bpf_map_lookup_elem(&htab16, &k) != e || READ_ONCE_U64(e->r.conn_id) != copy.r.conn_id)
		return LAB_EXISTS;
	return known ? LAB_MADE : LAB_FULL;
}

/* A reader of the open table: probe from the tuple's place until the
 * key or an empty slot; copy the record between two reads of the state
 * word (a writer would move it). */
static __always_inline int open_read(int known)
{
	struct key16 k;
	struct open_slot *s;
	struct rec40 copy;
	__u32 h, idx, st;

	if (pick(&k, known, SEQ_OPEN))
		return LAB_INTERNAL;
	h = symmetric_hash(&k);
	for (int i = 0; i < OPEN_PROBES; i++) {
		idx = (h + i) & open_mask;
		s = bpf_map_lookup_elem(&open_table, &idx);
		if (!s)
			return LAB_INTERNAL;
		st = READ_ONCE_STATE(s);
		if (st == SLOT_EMPTY)
			break;
		if (st != SLOT_LIVE || s->hash != h || !key16_eq(&s->key, &k))
			continue;
		__builtin_memcpy(&copy, &s->rec, sizeof(copy));
		if (READ_ONCE_STATE(s) != st)
			return LAB_EXISTS;
		return known ? LAB_MADE : LAB_FULL;
	}
	return known ? LAB_FULL : LAB_MADE;
}

static __always_inline int chunk_read(int known)
{
	struct open_slot *s = NULL;
	struct rec40 copy;
	struct key16 k;
	__u32 st, idx = 0;

	if (pick(&k, known, SEQ_CHUNK))
		return LAB_INTERNAL;
	if (chunk_walk(&k, NULL, symmetric_hash(&k), &s, &idx) != WALK_KEY || !s)
		return known ? LAB_FULL : LAB_MADE;
	st = READ_ONCE_STATE(s);
	__builtin_memcpy(&copy, &s->rec, sizeof(copy));
	if (READ_ONCE_STATE(s) != st || !key16_eq(&s->key, &k))
		return LAB_EXISTS;
	return known ? LAB_MADE : LAB_FULL;
}

SEC("tc")
int lab_htab40_hit(struct __sk_buff *skb)
{
	return htab40_read(1);
}

SEC("tc")
int lab_htab40_miss(struct __sk_buff *skb)
{
	return htab40_read(0);
}

SEC("tc")
int lab_htab16_hit(struct __sk_buff *skb)
{
	return htab16_read(1);
}

SEC("tc")
int lab_htab16_miss(struct __sk_buff *skb)
{
	return htab16_read(0);
}

SEC("tc")
int lab_open_hit(struct __sk_buff *skb)
{
	return open_read(1);
}

SEC("tc")
int lab_open_miss(struct __sk_buff *skb)
{
	return open_read(0);
}

SEC("tc")
int lab_chunk_hit(struct __sk_buff *skb)
{
	return chunk_read(1);
}

SEC("tc")
int lab_chunk_miss(struct __sk_buff *skb)
{
	return chunk_read(0);
}

