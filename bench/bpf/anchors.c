// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Benchmark programs, run with BPF_PROG_TEST_RUN next to pktmeta's own:
 * the floor (an empty program), the alternatives pktmeta is compared with
 * (skb->mark, XDP data_meta, BPF local storage, an allocating hash map),
 * and wrappers that give every repetition of a test run a fresh tuple
 * before tail-calling the program under test. Not part of the datapath.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>

#ifndef TCX_NEXT
#define TCX_NEXT -1
#endif

char __license[] SEC("license") = "Dual BSD/GPL";

/* As many bytes as a pktmeta record. */
#define META_LEN 104

struct meta {
	__u8 bytes[META_LEN];
};

SEC("tc")
int floor_prog(struct __sk_buff *skb)
{
	return TCX_NEXT;
}

SEC("tc")
int mark_write(struct __sk_buff *skb)
{
	skb->mark = 0x70b;
	return TCX_NEXT;
}

/* Reserve and write META_LEN bytes of data_meta, then give them back: a
 * test run reuses one xdp_buff, so the headroom must be the same at the
 * end of every repetition. */
SEC("xdp")
int xdp_meta(struct xdp_md *ctx)
{
	struct meta *m;
	void *data;

	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(*m)))
		return XDP_ABORTED;
	m = (void *)(long)ctx->data_meta;
	data = (void *)(long)ctx->data;
	if ((void *)(m + 1) > data)
		return XDP_ABORTED;
	__builtin_memset(m, 0x5a, sizeof(*m));
	if (bpf_xdp_adjust_meta(ctx, sizeof(*m)))
		return XDP_ABORTED;
	return XDP_PASS;
}

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meta);
} sk_store SEC(".maps");

/* Socket local storage: create (allocates the socket's storage and the
 * element) and delete, on the socket a test run gives the skb. */
SEC("tc")
int sk_storage(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct meta *m;

	if (!sk)
		return 2;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 2;
	m = bpf_sk_storage_get(&sk_store, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!m)
		return 2;
	m->bytes[0] = 1;
	bpf_sk_storage_delete(&sk_store, sk);
	return TCX_NEXT;
}

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct meta);
} task_store SEC(".maps");

/* Task local storage, the same way, on the task running the test. */
SEC("tc")
int task_storage(struct __sk_buff *skb)
{
	struct task_struct *t = bpf_get_current_task_btf();
	struct meta *m;

	m = bpf_task_storage_get(&task_store, t, NULL, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!m)
		return 2;
	m->bytes[0] = 1;
	bpf_task_storage_delete(&task_store, t);
	return TCX_NEXT;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seq SEC(".maps");

static __always_inline __u64 next_seq(void)
{
	__u32 zero = 0;
	__u64 *s = bpf_map_lookup_elem(&seq, &zero);

	if (!s)
		return 0;
	return ++*s;
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1 << 20);
	__type(key, __u64);
	__type(value, struct meta);
} alloc_hash SEC(".maps");

/* An insert into an allocating hash map under a fresh key, then its
 * delete so the map does not fill up. */
SEC("tc")
int hash_alloc(struct __sk_buff *skb)
{
	struct meta m = {};
	__u64 k = next_seq();

	if (bpf_map_update_elem(&alloc_hash, &k, &m, BPF_NOEXIST))
		return 2;
	bpf_map_delete_elem(&alloc_hash, &k);
	return TCX_NEXT;
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} target SEC(".maps");

/* Rewrites the packet's source port and two bytes of its destination
 * address from a per-CPU sequence, so every repetition is a new tuple,
 * then tail-calls target[0]. (Not the source address: pktmeta tags only
 * the pod's own.) Run against the floor program to measure what the
 * rewrite itself costs. */
SEC("tc")
int fresh_v4(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + sizeof(struct ethhdr);
	__u8 *l4 = (void *)(iph + 1);
	__u64 n = next_seq();

	if ((void *)(l4 + 2) > end)
		return 2;
	l4[0] = n >> 8;
	l4[1] = n;
	((__u8 *)&iph->daddr)[2] = n >> 16;
	((__u8 *)&iph->daddr)[1] = n >> 24;
	bpf_tail_call(skb, &target, 0);
	return 2;
}

SEC("tc")
int fresh_v6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6h = data + sizeof(struct ethhdr);
	__u8 *l4 = (void *)(ip6h + 1);
	__u64 n = next_seq();

	if ((void *)(l4 + 2) > end)
		return 2;
	l4[0] = n >> 8;
	l4[1] = n;
	ip6h->daddr.in6_u.u6_addr8[13] = n >> 16;
	ip6h->daddr.in6_u.u6_addr8[12] = n >> 24;
	bpf_tail_call(skb, &target, 0);
	return 2;
}

/* The events ring buffer's write alone, at the two sizes pktmeta's events
 * come in (bpf/datapath.h: pktmeta_event, 120 B; pktmeta_event_v4, 64 B),
 * into a ring of the same size, the same way (query, reserve, fill, submit
 * without wakeup). The bench drains it between runs. */
#define EVENTS_RING_BYTES (256 * 1024)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, EVENTS_RING_BYTES);
} events_ring SEC(".maps");

struct event_full {
	__u64 w[15];
};

struct event_v4 {
	__u64 w[8];
};

SEC("tc")
int event_full(struct __sk_buff *skb)
{
	__u64 pending = bpf_ringbuf_query(&events_ring, BPF_RB_AVAIL_DATA);
	struct event_full *e = bpf_ringbuf_reserve(&events_ring, sizeof(*e), 0);

	if (!e)
		return 2;
	for (int i = 0; i < 15; i++)
		e->w[i] = pending + i;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return TCX_NEXT;
}

SEC("tc")
int event_v4(struct __sk_buff *skb)
{
	__u64 pending = bpf_ringbuf_query(&events_ring, BPF_RB_AVAIL_DATA);
	struct event_v4 *e = bpf_ringbuf_reserve(&events_ring, sizeof(*e), 0);

	if (!e)
		return 2;
	for (int i = 0; i < 8; i++)
		e->w[i] = pending + i;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return TCX_NEXT;
}

/* The least a getsockopt program can be: what the kernel's cgroup hook
 * costs every getsockopt on the node once any program is on the sockets'
 * cgroup, before the program does anything. */
SEC("cgroup/getsockopt")
int getsockopt_empty(struct bpf_sockopt *ctx)
{
	return 1;
}

/* The same for a cgroup recvmsg4 program: what the kernel's hook costs
 * every recvfrom of an unconnected UDP socket on the node. */
SEC("cgroup/recvmsg4")
int recvmsg4_empty(struct bpf_sock_addr *ctx)
{
	return 1;
}
