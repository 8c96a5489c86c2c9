/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * table.h - the datapath's writes to the connection table. pktmeta.h
 * describes the table's layout and how it is read; this is the rest.
 *
 * Every write of an entry (insert, rewrite, remove) holds the lock bit of
 * the entry's home chunk: two inserts of one tuple never run at once, and
 * an insert never misses an entry of its home that another CPU is
 * rewriting. A write to a slot moves the slot to WRITING (an insert or a
 * remove: no entry to find) or REWRITING (the record only: the entry is
 * still found by its key), writes, and moves it on with a new generation,
 * so lock-free readers (pktmeta_copy_slot()) see either one whole entry or
 * a change. Entries of other homes in the same chunk change concurrently:
 * their tag bytes and overflow counts are changed with atomic operations
 * on the word only.
 *
 * The lock is taken with a bounded number of tries. A CPU that cannot get
 * it gives up (TABLE_BUSY, counted as tableBusy): the packet passes without
 * the change, a missing answer rather than a wrong one. In the packet
 * programs a lock is held for as long as one of these functions runs,
 * with softirqs off. The sweep and pktmeta_table_write run from a syscall
 * (BPF_PROG_TEST_RUN), where the thread can be interrupted, or on a fully
 * preemptible kernel preempted, while it holds one: for that while, the
 * changes other CPUs make to entries of that one chunk are given up (and
 * a packet program that interrupted the holder on its own CPU cannot wait
 * for it at all).
 *
 * The functions are global (not inlined): the verifier checks each once,
 * whatever calls it. They return TABLE_*.
 */
#ifndef __PKTMETA_TABLE_H__
#define __PKTMETA_TABLE_H__

#define TABLE_DONE 0 /* inserted, rewritten, removed */
#define TABLE_EXISTS 1 /* insert: the tuple has an entry */
#define TABLE_FULL 2 /* insert: no free slot within reach of the home chunk */
#define TABLE_BUSY 3 /* the home chunk's lock, or a slot, kept changing: try again later */
#define TABLE_GONE 4 /* rewrite, remove: the tuple holds no entry of that connection */

/* How often a writer tries for the lock of a home chunk that another CPU
 * holds (for as long as one insert, rewrite or remove takes, a few hundred
 * nanoseconds): a few microseconds of reads at most, and only under
 * contention for one chunk. */
#define TABLE_LOCK_TRIES 1024
/* How often an insert tries to claim a free slot in a chunk whose word
 * other CPUs keep changing. */
#define TABLE_CLAIM_TRIES 8
#define TABLE_TAG_BITS 8

/* Where a tuple lives: its home chunk and tag, for a table of n chunks.
 * claim is table_insert()'s: 1 + the slot of the home chunk it claimed
 * with the lock, or 0 (kept here, on the stack the walk needs anyway,
 * because the insert has no stack to spare: see table_insert()). */
struct table_pos {
	__u32 n;
	__u32 home;
	__u32 tag;
	__u32 claim;
};

static __always_inline int table_pos(const struct pktmeta_tuple *key, struct table_pos *p)
{
	__u32 zero = 0, h;
	struct pktmeta_table_info *info = bpf_map_lookup_elem(&pktmeta_table, &zero);

	if (!info)
		return -1;
	p->n = READ_ONCE(info->n_chunks);
	if (!p->n)
		return -1;
	h = pktmeta_hash(key, info->seed);
	p->home = pktmeta_home_chunk(h, p->n);
	p->tag = pktmeta_tag(h);
	p->claim = 0;
	return 0;
}

static __always_inline __u32 table_next(__u32 c, __u32 n)
{
	return c + 1 == n ? 0 : c + 1;
}

static __always_inline int table_lock(__u64 *home_word)
{
	__u64 w;

	for (int t = 0; t < TABLE_LOCK_TRIES; t++) {
		w = READ_ONCE(*home_word);
		if (w & PKTMETA_CHUNK_LOCK)
			continue;
		if (__sync_val_compare_and_swap(home_word, w, w | PKTMETA_CHUNK_LOCK) == w)
			return 0;
	}
	return -1;
}

static __always_inline void table_unlock(__u64 *home_word)
{
	__sync_fetch_and_and(home_word, ~PKTMETA_CHUNK_LOCK);
}

/* The slot of a chunk an insert takes if it is free: one the tag picks,
 * not the lowest free one, so that where an insert will write is known
 * from the hash alone (table_warm()) at any fill. */
static __always_inline __u32 table_preferred_slot(__u32 tag)
{
	return tag % PKTMETA_CHUNK_SLOTS;
}

/* The free slot of a chunk whose word is w (m = pktmeta__zero_bytes(w),
 * not 0) an insert claims: the preferred one, or else the lowest. */
static __always_inline __u32 table_free_slot(__u64 w, __u64 m, __u32 preferred)
{
	if (!(__u8)(w >> (TABLE_TAG_BITS * preferred)))
		return preferred;
	return pktmeta__lowest_byte(m);
}

/* The claim an insert makes in its home chunk whose word is w: its tag in
 * the byte of the free slot it takes, or 0 when the chunk is full. A
 * function of w alone, so the lock loop carries nothing else out. */
static __always_inline __u64 table_home_claim(__u64 w, __u32 tag)
{
	__u64 m = pktmeta__zero_bytes(w);

	if (!m)
		return 0;
	return (__u64)tag << (TABLE_TAG_BITS * table_free_slot(w, m, table_preferred_slot(tag)));
}

/* Moves a slot the caller owns (claimed, or under its home's lock) to
 * state v. Readers copy a slot between two reads of its state, so every
 * store before this one must be seen before it, and this one before every
 * store after it. x86-64 sees a CPU's stores in the order they were made:
 * a plain store suffices, and does not wait for the slot's cache lines the
 * way an exchange (a locked instruction) does. Elsewhere
 * (pktmeta_ordered_reads, set by the loader) an exchange, which is fully
 * ordered. */
static __always_inline void table_set_state(struct pktmeta_slot *s, __u64 v)
{
	asm volatile("" ::: "memory");
	if (pktmeta_ordered_reads)
		__sync_lock_test_and_set(&s->state, v);
	else
		*(volatile __u64 *)&s->state = v;
	asm volatile("" ::: "memory");
}

/* Reads the 8 bytes at offset off of a slot, for table_warm(). */
#define TABLE_TOUCH(s, off) ((void)*(volatile __u64 *)((void *)(s) + (off)))

/* Starts the loads of what inserting key will touch: its home chunk's
 * word and, if slot_too, the slot it prefers there. The loads do not
 * depend on each other, so their cache misses (and page walks) overlap
 * instead of coming one after the other: the first packet of a
 * connection reads the chunk's word to look the reverse tuple up (which
 * hashes alike), and the insert then writes a slot already on its way to
 * the cache. A guess: when the preferred slot is taken, the insert writes
 * another, cold, one, and a packet that will not insert (a pod over its
 * budget, a full table) should not pass slot_too. */
static __always_inline void table_warm(const struct pktmeta_tuple *key, int slot_too)
{
	struct pktmeta_slot *s;
	struct table_pos p;
	__u64 *word;
	__u32 idx;

	if (table_pos(key, &p))
		return;
	word = bpf_map_lookup_elem(&pktmeta_chunks, &p.home);
	if (word)
		(void)*(volatile __u64 *)word;
	if (!slot_too)
		return;
	idx = p.home * PKTMETA_CHUNK_SLOTS + table_preferred_slot(p.tag);
	s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	if (!s)
		return;
	/* 56 bytes apart at most: every 64-byte cache line of the 152-byte
	 * slot, wherever the slot starts. */
	TABLE_TOUCH(s, 0);
	TABLE_TOUCH(s, 56);
	TABLE_TOUCH(s, 104);
	TABLE_TOUCH(s, sizeof(*s) - 8);
}

/* The slot of key's entry, walked from its home (the caller holds the
 * home's lock, so no entry of this home is being written), or -1. The
 * slots of the home chunk whose bytes' high bits are set in skip are not
 * looked at: the caller's own claim, which holds no entry yet. */
static __always_inline __s64 table_walk(const struct pktmeta_tuple *key, const struct table_pos *p, __u64 skip)
{
	__u32 c = p->home, i, idx;
	struct pktmeta_slot *s;
	__u64 *word, w, m;

	for (int step = 0; step < PKTMETA_CHUNK_PROBES; step++) {
		word = bpf_map_lookup_elem(&pktmeta_chunks, &c);
		if (!word)
			return -1;
		w = READ_ONCE(*word);
		m = pktmeta__zero_bytes(w ^ (p->tag * PKTMETA__BYTES_ONE)) & ~skip;
		skip = 0;
		for (int k = 0; k < PKTMETA_CHUNK_SLOTS && m; k++) {
			i = pktmeta__lowest_byte(m);
			m &= m - 1;
			if ((__u8)(w >> (TABLE_TAG_BITS * i)) != p->tag)
				continue;
			idx = c * PKTMETA_CHUNK_SLOTS + i;
			s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
			if (!s)
				return -1;
			/* LIVE (or REWRITING, which no entry of a locked home is). */
			if ((READ_ONCE(s->state) & PKTMETA_SLOT_LIVE) && pktmeta__tuple_eq(&s->key, key))
				return idx;
		}
		if (!(w & PKTMETA_CHUNK_OVERFLOW_MASK))
			return -1;
		c = table_next(c, p->n);
	}
	return -1;
}

/* Adds delta to the overflow counts of the chunks from home up to, not
 * including, end: the chunks an entry stored in chunk end lies past. */
static __always_inline void table_count_overflow(const struct table_pos *p, __u32 end, __s64 delta)
{
	__u32 c = p->home;
	__u64 *word;

	for (int step = 0; step < PKTMETA_CHUNK_PROBES && c != end; step++) {
		word = bpf_map_lookup_elem(&pktmeta_chunks, &c);
		if (!word)
			return;
		__sync_fetch_and_add(word, (__u64)(delta << PKTMETA_CHUNK_OVERFLOW_SHIFT));
		c = table_next(c, p->n);
	}
}

/* The slot of key's entry if it is connection conn_id's; the caller holds
 * the home's lock. */
static __always_inline struct pktmeta_slot *table_entry_of(const struct pktmeta_tuple *key, const struct table_pos *p,
							    __u64 conn_id, __u32 *idx)
{
	struct pktmeta_slot *s;
	__s64 found = table_walk(key, p, 0);

	if (found < 0)
		return NULL;
	*idx = found;
	s = bpf_map_lookup_elem(&pktmeta_slots, idx);
	if (!s || READ_ONCE(s->rec.conn_id) != conn_id)
		return NULL;
	return s;
}

/* Inserts rec under key unless key has an entry.
 *
 * Its stack frame must stay at 96 bytes: a packet program that calls it
 * (the uplink's, 408 bytes) is then exactly at the verifier's 512-byte
 * limit on kernels that round every frame up to 32 bytes (5.15 does). */
__attribute__((noinline)) int table_insert(const struct pktmeta_tuple *key, const struct pktmeta_record *rec)
{
	__u64 *home_word, *word = NULL, w, m, gen;
	__u32 c, i = 0, idx, claimed = 0;
	struct pktmeta_slot *s;
	struct table_pos p;

	if (!key || !rec || table_pos(key, &p))
		return TABLE_BUSY;
	home_word = bpf_map_lookup_elem(&pktmeta_chunks, &p.home);
	if (!home_word)
		return TABLE_BUSY;
	/* The lock, and with it the claim of a free slot in the home chunk
	 * when it has one: one atomic operation for both. Walks skip the
	 * claimed slot (not LIVE) until it is written. An insert that finds
	 * its tuple (a retransmit) holds the slot only for its walk; an
	 * insert of another home meanwhile takes another. Only w leaves the
	 * loop (the claim is worked out from it again below): anything else
	 * it carried out would make the verifier check the rest of the
	 * function once per try on older kernels (5.15 gave up). */
	for (int t = 0; t < TABLE_LOCK_TRIES; t++) {
		w = READ_ONCE(*home_word);
		if (w & PKTMETA_CHUNK_LOCK)
			continue;
		if (__sync_val_compare_and_swap(home_word, w, w | PKTMETA_CHUNK_LOCK | table_home_claim(w, p.tag)) == w) {
			claimed = 1;
			break;
		}
	}
	if (!claimed)
		return TABLE_BUSY;
	/* The claimed byte: the tag is not 0, so the claim's lowest set bit
	 * is in it. */
	m = table_home_claim(w, p.tag);
	if (m)
		p.claim = 1 + pktmeta__lowest_byte(m);
	if (table_walk(key, &p, p.claim ? 0x80ULL << (TABLE_TAG_BITS * (p.claim - 1)) : 0) >= 0) {
		__sync_fetch_and_and(home_word, ~(PKTMETA_CHUNK_LOCK |
						  (p.claim ? (__u64)p.tag << (TABLE_TAG_BITS * (p.claim - 1)) : 0)));
		return TABLE_EXISTS;
	}
	c = p.home;
	if (p.claim) {
		i = p.claim - 1;
		word = home_word;
		goto write;
	}
	/* The home chunk is full: the first chunk after it with a free slot. */
	claimed = 0;
	for (int step = 0; step < PKTMETA_CHUNK_PROBES; step++) {
		word = bpf_map_lookup_elem(&pktmeta_chunks, &c);
		if (!word)
			break;
		if (pktmeta__zero_bytes(READ_ONCE(*word)))
			break;
		word = NULL;
		c = table_next(c, p.n);
	}
	if (!word) {
		table_unlock(home_word);
		return TABLE_FULL;
	}
	/* Counted before the claim, so that a lookup never stops short of
	 * the entry; a claim that fails counts it down again. */
	table_count_overflow(&p, c, 1);
	for (int t = 0; t < TABLE_CLAIM_TRIES; t++) {
		w = READ_ONCE(*word);
		m = pktmeta__zero_bytes(w);
		if (!m)
			break;
		i = table_free_slot(w, m, table_preferred_slot(p.tag));
		if (__sync_val_compare_and_swap(word, w, w | ((__u64)p.tag << (TABLE_TAG_BITS * i))) == w) {
			claimed = 1;
			break;
		}
	}
	if (!claimed)
		goto undo;
write:
	idx = c * PKTMETA_CHUNK_SLOTS + i;
	s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	if (!s) {
		__sync_fetch_and_and(word, ~(0xffULL << (TABLE_TAG_BITS * i)));
		goto undo;
	}
	/* The slot is EMPTY (a remove clears the tag last) and ours: the
	 * claim was the fully ordered operation that saw its tag cleared. */
	gen = READ_ONCE(s->state) & ~PKTMETA_SLOT_KIND_MASK;
	table_set_state(s, PKTMETA_SLOT_WRITING);
	__builtin_memcpy(&s->key, key, sizeof(s->key));
	__builtin_memcpy(&s->rec, rec, sizeof(s->rec));
	table_set_state(s, gen | PKTMETA_SLOT_LIVE);
	table_unlock(home_word);
	return TABLE_DONE;
undo:
	table_count_overflow(&p, c, -1);
	table_unlock(home_word);
	return TABLE_BUSY;
}

/* Replaces the record of connection conn_id under key with rec, in place:
 * readers see the old record or the new one, never a mix. */
__attribute__((noinline)) int table_rewrite(const struct pktmeta_tuple *key, __u64 conn_id,
					    const struct pktmeta_record *rec)
{
	struct pktmeta_slot *s;
	__u64 *home_word, gen;
	struct table_pos p;
	__u32 idx;

	if (!key || !rec || table_pos(key, &p))
		return TABLE_BUSY;
	home_word = bpf_map_lookup_elem(&pktmeta_chunks, &p.home);
	if (!home_word)
		return TABLE_BUSY;
	if (table_lock(home_word))
		return TABLE_BUSY;
	s = table_entry_of(key, &p, conn_id, &idx);
	if (!s) {
		table_unlock(home_word);
		return TABLE_GONE;
	}
	/* REWRITING, not WRITING: lookups still find the entry (a packet
	 * must not take it for gone while its record is rewritten), copies
	 * wait for the new generation. */
	gen = READ_ONCE(s->state) & ~PKTMETA_SLOT_KIND_MASK;
	table_set_state(s, PKTMETA_SLOT_REWRITING);
	__builtin_memcpy(&s->rec, rec, sizeof(s->rec));
	table_set_state(s, (gen + PKTMETA_SLOT_GEN_ONE) | PKTMETA_SLOT_LIVE);
	table_unlock(home_word);
	return TABLE_DONE;
}

/* Removes the entry of connection conn_id under key. The slot leaves LIVE
 * first (readers and walks skip it), the overflow counts of its path go
 * down, the slot becomes EMPTY with a new generation, and only then is
 * its tag cleared, so an insert claims the slot only once nothing of the
 * old entry is left to write. */
__attribute__((noinline)) int table_remove(const struct pktmeta_tuple *key, __u64 conn_id)
{
	struct pktmeta_slot *s;
	__u64 *home_word, *word, gen;
	struct table_pos p;
	__u32 idx, c;

	if (!key || table_pos(key, &p))
		return TABLE_BUSY;
	home_word = bpf_map_lookup_elem(&pktmeta_chunks, &p.home);
	if (!home_word)
		return TABLE_BUSY;
	if (table_lock(home_word))
		return TABLE_BUSY;
	s = table_entry_of(key, &p, conn_id, &idx);
	if (!s) {
		table_unlock(home_word);
		return TABLE_GONE;
	}
	gen = READ_ONCE(s->state) & ~PKTMETA_SLOT_KIND_MASK;
	table_set_state(s, PKTMETA_SLOT_WRITING);
	c = idx / PKTMETA_CHUNK_SLOTS;
	table_count_overflow(&p, c, -1);
	table_set_state(s, gen + PKTMETA_SLOT_GEN_ONE);
	word = bpf_map_lookup_elem(&pktmeta_chunks, &c);
	if (word)
		__sync_fetch_and_and(word, ~(0xffULL << (TABLE_TAG_BITS * (idx % PKTMETA_CHUNK_SLOTS))));
	table_unlock(home_word);
	return TABLE_DONE;
}

#endif /* __PKTMETA_TABLE_H__ */
