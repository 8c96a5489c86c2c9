// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * origincount: a pktmeta consumer. Attached to a pod's own eth0 (tcx
 * ingress, inside the pod's netns), it counts the connections reaching the
 * pod by the workload that opened them. It keeps its own map keyed by
 * pktmeta's connection id, so a connection is counted once however many
 * packets it sends and whatever other consumers store.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define PKTMETA_DECLARE_MAPS
#include "pktmeta.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct origin_count {
	__u64 connections;
	__u64 last_conn_id;
};

/* Origin workload id -> connections seen from it. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct origin_count);
} counts SEC(".maps");

/* Connections already counted: our own state, keyed by pktmeta's conn id. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u8);
} counted SEC(".maps");

/* Packets that pktmeta knew nothing about. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} unknown SEC(".maps");

/* Connections opened on other nodes (PKTMETA_F_REMOTE): their
 * origin_workload is another node's id, so they are not counted with this
 * node's workloads. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} remote SEC(".maps");

SEC("tc")
int origincount(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct pktmeta_tuple t;
	struct pktmeta_record rec;
	struct origin_count *c, init = {};
	__u8 proto, *l4, one = 1;
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end)
		return -1; /* TCX_NEXT */
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);

		if ((void *)(iph + 1) > data_end || iph->ihl < 5)
			return -1;
		proto = iph->protocol;
		l4 = (__u8 *)iph + iph->ihl * 4;
		if ((void *)(l4 + 4) > data_end)
			return -1;
		pktmeta_tuple_from_ipv4(&t, iph->saddr, iph->daddr, *(__be16 *)l4, *(__be16 *)(l4 + 2), proto);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);

		if ((void *)(ip6h + 1) > data_end)
			return -1;
		/* No extension headers in this example. */
		proto = ip6h->nexthdr;
		l4 = (__u8 *)(ip6h + 1);
		if ((void *)(l4 + 4) > data_end)
			return -1;
		pktmeta_tuple_from_ipv6(&t, ip6h->saddr.s6_addr, ip6h->daddr.s6_addr, *(__be16 *)l4,
					*(__be16 *)(l4 + 2), proto);
	} else {
		return -1;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return -1;

	/* A copy, checked against element recycling (see pktmeta.h). */
	if (pktmeta_lookup(&t, &rec) || rec.version != PKTMETA_RECORD_VERSION) {
		__u64 *u = bpf_map_lookup_elem(&unknown, &zero);

		if (u)
			__sync_fetch_and_add(u, 1);
		return -1;
	}
	if (bpf_map_update_elem(&counted, &rec.conn_id, &one, BPF_NOEXIST))
		return -1; /* already counted */
	if (rec.flags & PKTMETA_F_REMOTE) {
		__u64 *r = bpf_map_lookup_elem(&remote, &zero);

		if (r)
			__sync_fetch_and_add(r, 1);
		return -1;
	}
	c = bpf_map_lookup_elem(&counts, &rec.origin_workload);
	if (!c) {
		bpf_map_update_elem(&counts, &rec.origin_workload, &init, BPF_NOEXIST);
		c = bpf_map_lookup_elem(&counts, &rec.origin_workload);
		if (!c)
			return -1;
	}
	__sync_fetch_and_add(&c->connections, 1);
	c->last_conn_id = rec.conn_id;
	return -1;
}
