// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Churn for table_test.go: the datapath's own table code (bpf/table.h) and
 * the consumers' reader (pktmeta_lookup() of bpf/include/pktmeta.h), run
 * from every CPU at once against a datapath's table (map replacements).
 * Not part of the datapath.
 *
 * Every record written is derived from its connection id, so a reader
 * that copied half of one record and half of another sees fields that do
 * not agree.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#define PKTMETA_DECLARE_MAPS
#include "pktmeta.h"

#ifndef TCX_NEXT
#define TCX_NEXT -1
#endif
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

#include "table.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* How many connections the churn works on; set before loading. */
const volatile __u32 churn_keys = 1;

#define CHURN_MAX_KEYS 4096
#define CHURN_BROKEN 2

/* What happened, per CPU (CHURN_*). */
#define CHURN_MADE 0
#define CHURN_EXISTS 1
#define CHURN_FULL 2
#define CHURN_BUSY 3
#define CHURN_REMOVED 4
#define CHURN_GONE 5
#define CHURN_REWRITTEN 6
#define CHURN_READ_HIT 7
#define CHURN_READ_MISS 8
#define CHURN_TORN 9 /* a reader got a record whose fields disagree */
#define CHURN_DUPLICATE 10 /* two live entries for one tuple */
#define CHURN_RAW_TORN 11 /* the same, read without the state check */
#define CHURN_RAW_READS 12
#define CHURN_COUNTS 13

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CHURN_COUNTS);
	__type(key, __u32);
	__type(value, __u64);
} churn_counts SEC(".maps");

/* Live entries per connection, kept so that the count is never above the
 * truth: up after an insert published one, down before a remove takes one
 * away (up again if it did not). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CHURN_MAX_KEYS);
	__type(key, __u32);
	__type(value, __s64);
} churn_live SEC(".maps");

/* Per-CPU sequence for connection ids. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} churn_seq SEC(".maps");

static __always_inline void count(__u32 what)
{
	__u64 *n = bpf_map_lookup_elem(&churn_counts, &what);

	if (n)
		++*n;
}

/* Connection n: IPv4 for even n, IPv6 for odd. */
static __always_inline void churn_tuple(struct pktmeta_tuple *t, __u32 n)
{
	__builtin_memset(t, 0, sizeof(*t));
	if (n & 1) {
		t->saddr[0] = 0xfd;
		t->daddr[0] = 0xfd;
		t->saddr[15] = 1;
		t->daddr[15] = 2;
	} else {
		t->saddr[10] = t->saddr[11] = 0xff;
		t->daddr[10] = t->daddr[11] = 0xff;
		t->saddr[12] = 10;
		t->saddr[15] = 1;
		t->daddr[12] = 10;
		t->daddr[15] = 2;
	}
	t->sport = (__u16)(1024 + n);
	t->dport = 80;
	t->proto = 6;
}

#define MIX1 0x9e3779b97f4a7c15ULL
#define MIX2 0xc2b2ae3d27d4eb4fULL

/* A record every field of which follows from conn_id and n. */
static __always_inline void churn_record(struct pktmeta_record *r, __u64 conn_id, __u32 n)
{
	__builtin_memset(r, 0, sizeof(*r));
	r->conn_id = conn_id;
	r->conn_gen = (__u32)conn_id;
	r->version = PKTMETA_RECORD_VERSION;
	r->origin_workload = n;
	r->origin_ifindex = (__u32)(conn_id >> 7);
	r->peer_workload = (__u32)(conn_id * 3);
	r->syn_seq = (__u32)(conn_id ^ MIX1);
	r->first_seen_ns = conn_id ^ MIX1;
	r->last_seen_ns = conn_id ^ MIX2;
	r->delivered_ns = conn_id * MIX1;
	r->peer_tuple.sport = (__u16)conn_id;
	r->peer_tuple.proto = 6;
}

static __always_inline int churn_record_ok(const struct pktmeta_record *r, __u32 n)
{
	__u64 id = r->conn_id;

	return r->conn_gen == (__u32)id && r->version == PKTMETA_RECORD_VERSION && r->origin_workload == n &&
	       r->origin_ifindex == (__u32)(id >> 7) && r->peer_workload == (__u32)(id * 3) &&
	       r->syn_seq == (__u32)(id ^ MIX1) && r->first_seen_ns == (id ^ MIX1) && r->last_seen_ns == (id ^ MIX2) &&
	       r->delivered_ns == id * MIX1 && r->peer_tuple.sport == (__u16)id && r->flags == 0;
}

static __always_inline __u64 next_id(void)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&churn_seq, &zero);

	if (!seq)
		return 0;
	return (++*seq << 8) | bpf_get_smp_processor_id();
}

/* One write on a random connection: insert (half of them), remove or
 * rewrite (a quarter each). */
SEC("tc")
int churn_write(struct __sk_buff *skb)
{
	__u32 rnd = bpf_get_prandom_u32(), n = rnd % churn_keys;
	__s64 *live = bpf_map_lookup_elem(&churn_live, &n);
	struct pktmeta_record rec, old;
	struct pktmeta_tuple t;
	__u64 id = next_id();
	int res;

	if (!live || !id)
		return CHURN_BROKEN;
	churn_tuple(&t, n);
	switch ((rnd >> 16) & 3) {
	case 0:
	case 1:
		churn_record(&rec, id, n);
		res = table_insert(&t, &rec);
		if (res == TABLE_DONE && __sync_fetch_and_add(live, 1) >= 1)
			count(CHURN_DUPLICATE);
		count(res == TABLE_DONE ? CHURN_MADE : res == TABLE_EXISTS ? CHURN_EXISTS : res == TABLE_FULL ? CHURN_FULL : CHURN_BUSY);
		break;
	case 2:
		if (pktmeta_lookup(&t, &old))
			break;
		__sync_fetch_and_add(live, -1);
		res = table_remove(&t, old.conn_id);
		if (res != TABLE_DONE)
			__sync_fetch_and_add(live, 1);
		count(res == TABLE_DONE ? CHURN_REMOVED : res == TABLE_GONE ? CHURN_GONE : CHURN_BUSY);
		break;
	default:
		if (pktmeta_lookup(&t, &old))
			break;
		churn_record(&rec, id, n);
		res = table_rewrite(&t, old.conn_id, &rec);
		count(res == TABLE_DONE ? CHURN_REWRITTEN : res == TABLE_GONE ? CHURN_GONE : CHURN_BUSY);
	}
	return TCX_NEXT;
}

/* One read of a random connection, as a consumer reads. */
SEC("tc")
int churn_read(struct __sk_buff *skb)
{
	__u32 n = bpf_get_prandom_u32() % churn_keys;
	struct pktmeta_record rec;
	struct pktmeta_tuple t;

	churn_tuple(&t, n);
	if (pktmeta_lookup(&t, &rec)) {
		count(CHURN_READ_MISS);
		return TCX_NEXT;
	}
	count(churn_record_ok(&rec, n) ? CHURN_READ_HIT : CHURN_TORN);
	return TCX_NEXT;
}

/* The control: a read that copies the slot without checking its state
 * before and after, to show what the check catches. */
SEC("tc")
int churn_read_unchecked(struct __sk_buff *skb)
{
	__u32 n = bpf_get_prandom_u32() % churn_keys, idx;
	struct pktmeta_record rec;
	struct pktmeta_tuple t;
	struct pktmeta_slot *s;
	int found;

	churn_tuple(&t, n);
	found = pktmeta_find_slot(&t);
	if (found < 0)
		return TCX_NEXT;
	idx = found;
	s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	if (!s)
		return TCX_NEXT;
	__builtin_memcpy(&rec, &s->rec, sizeof(rec));
	count(CHURN_RAW_READS);
	if (rec.conn_id && !churn_record_ok(&rec, n))
		count(CHURN_RAW_TORN);
	return TCX_NEXT;
}
