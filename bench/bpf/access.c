// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * What one cold memory access costs on this machine, in the shapes the
 * connection table's first packet and lookups take (issue 11), run by
 * `go run ./bench --only access`. Not part of the datapath: arrays the
 * size of the datapath's default-node table at maxConnections 2M
 * (ACCESS_CHUNKS words of tags, ACCESS_SLOTS slots of 152 bytes), read
 * and written at a pseudo-random place every repetition, so that nothing
 * a repetition touches was touched recently. access_floor makes the
 * random number only; the bench subtracts it.
 *
 * The questions, one program each:
 *  - a random read of the 4 MB word array, of the 531 MB slot array, and
 *    two independent reads of the slot array at once (do misses overlap);
 *  - a random 152-byte slot write alone, and followed by an atomic
 *    operation on a hot word (which waits for the write's cache misses:
 *    a locked instruction drains the store buffer);
 *  - the table's insert, stripped to its memory accesses: the home
 *    word, the lock, the slot write, the atomic unlock; and the same with
 *    the lock in an array of its own, released with a plain store;
 *  - a slot written where this CPU wrote the last one (a per-CPU bump
 *    allocator), followed by the atomic, and the insert that would need
 *    (a random 4-byte slot reference beside the tags), and the lookup
 *    that reference costs (tags, reference, slot: three dependent
 *    accesses, against two).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#ifndef TCX_NEXT
#define TCX_NEXT -1
#endif

char __license[] SEC("license") = "Dual BSD/GPL";

/* The datapath's table for maxConnections 2M: 3 495 254 slots in 499 322
 * chunks of seven (internal/datapath tableChunks). */
#define ACCESS_CHUNKS 499322
#define ACCESS_CHUNK_SLOTS 7
#define ACCESS_SLOTS (ACCESS_CHUNKS * ACCESS_CHUNK_SLOTS)
#define ACCESS_SLOT_WORDS 19 /* 152 bytes: the datapath's struct pktmeta_slot */
#define ACCESS_LOCK (1ULL << 63)

struct access_slot {
	__u64 w[ACCESS_SLOT_WORDS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ACCESS_CHUNKS);
	__type(key, __u32);
	__type(value, __u64);
} access_words SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ACCESS_CHUNKS);
	__type(key, __u32);
	__type(value, __u32);
} access_locks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ACCESS_SLOTS);
	__type(key, __u32);
	__type(value, struct access_slot);
} access_slots SEC(".maps");

/* A slot reference per slot position, for the bump allocator's index. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ACCESS_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} access_refs SEC(".maps");

/* Per CPU: the sequence the random numbers come from, and the bump
 * allocator's next slot. */
#define ACCESS_SEQ 0
#define ACCESS_BUMP 1
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} access_cpu SEC(".maps");

/* The next pseudo-random number of this CPU's sequence (splitmix64). */
static __always_inline __u32 access_random(void)
{
	__u32 k = ACCESS_SEQ;
	__u64 *seq = bpf_map_lookup_elem(&access_cpu, &k), x;

	if (!seq)
		return 0;
	x = ++*seq * 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return (__u32)(x ^ (x >> 31));
}

static __always_inline __u32 access_scale(__u32 r, __u32 n)
{
	return ((__u64)r * n) >> 32;
}

#define ACCESS_READ(p) ((void)*(volatile __u64 *)(p))

static __always_inline void access_write_slot(struct access_slot *s, __u64 v)
{
	for (int k = 0; k < ACCESS_SLOT_WORDS; k++)
		s->w[k] = v;
}

/* Writes slot s, then makes an atomic add to a hot word: the add is a
 * locked instruction, which waits for the write's cache misses. */
static __always_inline int access_write_then_atomic(struct access_slot *s, __u64 v)
{
	__u32 zero = 0;
	__u64 *hot = bpf_map_lookup_elem(&access_words, &zero);

	if (!hot)
		return TCX_NEXT;
	access_write_slot(s, v);
	__sync_fetch_and_add(hot, 1);
	return TCX_NEXT;
}

/* Writes slot s under the lock bit of word w, the way the table's insert
 * does (compare-and-swap, the write, atomic and), and the slot's
 * reference into *ref if ref is not NULL. */
static __always_inline int access_locked_write(__u64 *w, struct access_slot *s, __u32 *ref, __u32 idx)
{
	__u64 x = *(volatile __u64 *)w & ~ACCESS_LOCK;

	if (__sync_val_compare_and_swap(w, x, x | ACCESS_LOCK) != x)
		return TCX_NEXT;
	access_write_slot(s, x);
	if (ref)
		*ref = idx;
	__sync_fetch_and_and(w, ~ACCESS_LOCK);
	return TCX_NEXT;
}

/* The home word, the slot the insert writes (its slot in the home chunk),
 * or NULL. */
static __always_inline __u64 *access_word(__u32 r, __u32 *chunk)
{
	*chunk = access_scale(r, ACCESS_CHUNKS);
	return bpf_map_lookup_elem(&access_words, chunk);
}

static __always_inline struct access_slot *access_home_slot(__u32 chunk, __u32 r)
{
	__u32 idx = chunk * ACCESS_CHUNK_SLOTS + r % ACCESS_CHUNK_SLOTS;

	return bpf_map_lookup_elem(&access_slots, &idx);
}

SEC("tc")
int access_floor(struct __sk_buff *skb)
{
	return access_random() == 0xffffffff ? 1 : TCX_NEXT;
}

SEC("tc")
int access_word_read(struct __sk_buff *skb)
{
	__u32 c;
	__u64 *w = access_word(access_random(), &c);

	if (w)
		ACCESS_READ(w);
	return TCX_NEXT;
}

SEC("tc")
int access_slot_read(struct __sk_buff *skb)
{
	__u32 idx = access_scale(access_random(), ACCESS_SLOTS);
	struct access_slot *s = bpf_map_lookup_elem(&access_slots, &idx);

	if (s)
		ACCESS_READ(s);
	return TCX_NEXT;
}

SEC("tc")
int access_two_slot_reads(struct __sk_buff *skb)
{
	__u32 r = access_random();
	__u32 i = access_scale(r, ACCESS_SLOTS), j = access_scale(r * 0x9e3779b1u, ACCESS_SLOTS);
	struct access_slot *s = bpf_map_lookup_elem(&access_slots, &i);
	struct access_slot *t = bpf_map_lookup_elem(&access_slots, &j);

	if (s)
		ACCESS_READ(s);
	if (t)
		ACCESS_READ(t);
	return TCX_NEXT;
}

SEC("tc")
int access_slot_write(struct __sk_buff *skb)
{
	__u32 r = access_random(), idx = access_scale(r, ACCESS_SLOTS);
	struct access_slot *s = bpf_map_lookup_elem(&access_slots, &idx);

	if (s)
		access_write_slot(s, r);
	return TCX_NEXT;
}

SEC("tc")
int access_slot_write_then_atomic(struct __sk_buff *skb)
{
	__u32 r = access_random(), idx = access_scale(r, ACCESS_SLOTS);
	struct access_slot *s = bpf_map_lookup_elem(&access_slots, &idx);

	return s ? access_write_then_atomic(s, r) : TCX_NEXT;
}

SEC("tc")
int access_insert(struct __sk_buff *skb)
{
	__u32 r = access_random(), c;
	__u64 *w = access_word(r, &c);
	struct access_slot *s;

	if (!w)
		return TCX_NEXT;
	s = access_home_slot(c, r);
	return s ? access_locked_write(w, s, NULL, 0) : TCX_NEXT;
}

SEC("tc")
int access_insert_plain_unlock(struct __sk_buff *skb)
{
	__u32 r = access_random(), c, *lock;
	__u64 *w = access_word(r, &c), x;
	struct access_slot *s;

	if (!w)
		return TCX_NEXT;
	lock = bpf_map_lookup_elem(&access_locks, &c);
	s = access_home_slot(c, r);
	if (!lock || !s)
		return TCX_NEXT;
	if (__sync_val_compare_and_swap(lock, 0, 1) != 0)
		return TCX_NEXT;
	x = *(volatile __u64 *)w;
	__sync_fetch_and_or(w, 1);
	access_write_slot(s, x);
	*(volatile __u32 *)lock = 0;
	return TCX_NEXT;
}

/* The next slot of this CPU's bump allocator. */
static __always_inline struct access_slot *access_bump(__u32 *idx)
{
	__u32 k = ACCESS_BUMP;
	__u64 *next = bpf_map_lookup_elem(&access_cpu, &k);

	if (!next)
		return NULL;
	*idx = (*next)++ % ACCESS_SLOTS;
	return bpf_map_lookup_elem(&access_slots, idx);
}

SEC("tc")
int access_bump_write_then_atomic(struct __sk_buff *skb)
{
	__u32 idx;
	struct access_slot *s = access_bump(&idx);

	return s ? access_write_then_atomic(s, idx) : TCX_NEXT;
}

SEC("tc")
int access_bump_insert(struct __sk_buff *skb)
{
	__u32 r = access_random(), c, idx, pos, *ref;
	__u64 *w = access_word(r, &c);
	struct access_slot *s;

	if (!w)
		return TCX_NEXT;
	pos = c * ACCESS_CHUNK_SLOTS + r % ACCESS_CHUNK_SLOTS;
	ref = bpf_map_lookup_elem(&access_refs, &pos);
	s = access_bump(&idx);
	if (!ref || !s)
		return TCX_NEXT;
	return access_locked_write(w, s, ref, idx);
}

SEC("tc")
int access_lookup(struct __sk_buff *skb)
{
	__u32 r = access_random(), c;
	__u64 *w = access_word(r, &c);
	struct access_slot *s;

	if (!w)
		return TCX_NEXT;
	ACCESS_READ(w);
	s = access_home_slot(c, r);
	if (s)
		ACCESS_READ(s);
	return TCX_NEXT;
}

SEC("tc")
int access_lookup_through_ref(struct __sk_buff *skb)
{
	__u32 r = access_random(), c, pos, idx, *ref;
	__u64 *w = access_word(r, &c);
	struct access_slot *s;

	if (!w)
		return TCX_NEXT;
	ACCESS_READ(w);
	pos = c * ACCESS_CHUNK_SLOTS + r % ACCESS_CHUNK_SLOTS;
	ref = bpf_map_lookup_elem(&access_refs, &pos);
	if (!ref)
		return TCX_NEXT;
	idx = *(volatile __u32 *)ref;
	s = bpf_map_lookup_elem(&access_slots, &idx);
	if (s)
		ACCESS_READ(s);
	return TCX_NEXT;
}
