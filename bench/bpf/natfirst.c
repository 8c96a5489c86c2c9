// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The destination's first packet of a connection that came through
 * Service DNAT, measured as it happens once per connection: before every
 * repetition of a test run, nat_first puts the connection back as it was
 * before its delivery (the origin record's DELIVERED and NAT flags
 * cleared, the alias deleted), then tail-calls nat_target[0]: the
 * delivery program, or the empty program, whose run the bench subtracts.
 * Without it, every repetition after the first finds the record delivered
 * and measures a retransmitted SYN instead. Loaded against the bench
 * datapath's own tables (map replacements); not part of the datapath.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#define PKTMETA_DECLARE_MAPS
#include "pktmeta.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* Returned when the setup is missing: the bench expects TCX_NEXT. */
#define NAT_FIRST_BROKEN 2

/* The connection: its record's key (as the origin sent it) and the tuple
 * the destination sees after DNAT (the alias's key). The bench writes it. */
struct nat_first_keys {
	struct pktmeta_tuple origin;
	struct pktmeta_tuple seen;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct nat_first_keys);
} nat_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nat_target SEC(".maps");

SEC("tc")
int nat_first(struct __sk_buff *skb)
{
	struct pktmeta_slot *s;
	struct nat_first_keys *k;
	__u32 zero = 0, idx;
	int found;

	k = bpf_map_lookup_elem(&nat_keys, &zero);
	if (!k)
		return NAT_FIRST_BROKEN;
	found = pktmeta_find_slot(&k->origin);
	if (found < 0)
		return NAT_FIRST_BROKEN;
	idx = found;
	s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	if (!s)
		return NAT_FIRST_BROKEN;
	/* In place: in the bench's private table nothing else writes it. */
	s->rec.flags &= ~(PKTMETA_F_DELIVERED | PKTMETA_F_NAT);
	bpf_map_delete_elem(&pktmeta_aliases, &k->seen);
	bpf_tail_call(skb, &nat_target, 0);
	return NAT_FIRST_BROKEN;
}
