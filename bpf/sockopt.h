/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Into the application: pktmeta_getsockopt, a cgroup getsockopt program on
 * the node's cgroup v2 root, answers getsockopt(fd, SOL_PKTMETA,
 * PKTMETA_SO_ORIGIN) with the origin of the socket's connection
 * (include/pktmeta_origin.h).
 *
 * The kernel runs it after its own getsockopt, for every getsockopt on the
 * node; anything not at SOL_PKTMETA leaves at the first test, untouched.
 * The connection is the socket's own, as the kernel holds it (ctx->sk):
 * the tuple peer -> local is the one the receiving pod saw, which the
 * records are found by directly or through the alias the delivery hook
 * wrote behind NAT. The answer goes only to the netns of the pod the
 * record was delivered to, or of the pod that opened it
 * (pktmeta_wl_netns), so a pod that binds another pod's addresses learns
 * nothing. Included into pktmeta.c.
 */
#ifndef __PKTMETA_SOCKOPT_H__
#define __PKTMETA_SOCKOPT_H__

#include "pktmeta_origin.h"

#define ENOENT 2
#define EINVAL 22
#define ENOPROTOOPT 92
#define ENOTCONN 107
#define AF_INET 2
#define AF_INET6 10
/* A getsockopt program sees at most a page of the caller's buffer. */
#define SOCKOPT_PAGE_SIZE 4096

_Static_assert(sizeof(struct pktmeta_conn_origin) == 1952, "struct pktmeta_conn_origin changed: bump PKTMETA_ORIGIN_VERSION");
_Static_assert(sizeof(struct pktmeta_conn_origin_tag) == sizeof(struct pktmeta_tag), "origin tags are copied from workload tags");

/* Keep the layout in BTF for bpf2go. */
const struct pktmeta_conn_origin *unused_origin __attribute__((unused));

/* Set by the loader where the kernel lets a getsockopt program choose the
 * errno (Linux 5.18: ctx->retval moved to the run context; before, only 0
 * or the kernel's own error were accepted, anything else became EFAULT). */
volatile const __u32 pktmeta_sockopt_errno = 0;

/* Workload id -> cookie of the pod's network namespace, written by
 * userspace when it registers the workload. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_wl_netns SEC(".maps");

/* Netns cookie -> the addresses of the pods' interfaces in that netns
 * (written by userspace with the workloads): the local address of a
 * datagram to an unconnected UDP socket bound to the wildcard, which the
 * socket does not hold. */
#define PKTMETA_NETNS_MAX_ADDRS 8
#define PKTMETA_NETNS_F_TRUNCATED 1 /* more addresses than fit: no answers */
struct pktmeta_netns_addrs {
	__u32 n_addrs;
	__u32 flags; /* PKTMETA_NETNS_F_* */
	__u8 addrs[PKTMETA_NETNS_MAX_ADDRS][16]; /* IPv4-mapped or IPv6 */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct pktmeta_netns_addrs);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_ns_addrs SEC(".maps");

/* Per unconnected UDP socket: the source of the datagram its last
 * recvmsg()/recvfrom() returned, as the kernel handed it over (written by
 * pktmeta_recvmsg4/6, which the kernel runs with that address). */
struct pktmeta_udp_peer {
	__u8 addr[16]; /* IPv4-mapped or IPv6, as the records keep them */
	__be16 port;
	__u16 _pad;
	__u32 gen; /* pktmeta_udp_peer_gen when it was written */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct pktmeta_udp_peer);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_udp_peers SEC(".maps");

/* The generation of the recvmsg programs' attachment, moved by userspace
 * before they are attached and after they are detached. Datagrams received
 * while they were off went unseen, so a peer remembered in an earlier
 * generation is not the socket's last one: such sockets get ENOTCONN until
 * they receive again. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_udp_peer_gen SEC(".maps");

static __always_inline __u32 udp_peer_gen(void)
{
	__u32 zero = 0, *g = bpf_map_lookup_elem(&pktmeta_udp_peer_gen, &zero);

	return g ? *g : 0;
}

/* memcpy and memset of more than clang inlines for BPF: 8-byte words,
 * unrolled into fixed offsets the verifier checks against the one bound
 * taken before (n is a constant multiple of 64). The barrier keeps clang
 * from folding each loop back into one call. */
#define COPY_STEP 64
static __always_inline void copy_big(void *dst, const void *src, const __u32 n)
{
	__u64 *d = dst;
	const __u64 *s = src;

#pragma unroll
	for (__u32 i = 0; i < n / 8; i++) {
		d[i] = s[i];
		if (i % (COPY_STEP / 8) == COPY_STEP / 8 - 1)
			barrier();
	}
}

static __always_inline void zero_big(void *dst, const __u32 n)
{
	__u64 *d = dst;

#pragma unroll
	for (__u32 i = 0; i < n / 8; i++) {
		d[i] = 0;
		if (i % (COPY_STEP / 8) == COPY_STEP / 8 - 1)
			barrier();
	}
}

static __always_inline int sockopt_fail(struct bpf_sockopt *ctx, int err)
{
	/* Nothing of the buffer goes back to the caller. (Separate 4-byte
	 * stores: the context takes no 8-byte write over optlen and retval.) */
	WRITE_ONCE(ctx->optlen, 0);
	if (pktmeta_sockopt_errno)
		WRITE_ONCE(ctx->retval, -err);
	return 1;
}

static __always_inline int in_netns(__u32 workload, __u64 netns)
{
	__u64 *n;

	if (!workload)
		return 0;
	n = bpf_map_lookup_elem(&pktmeta_wl_netns, &workload);
	return n && *n == netns;
}

/* The socket's connection, peer -> local: the tuple the receiving side
 * saw. Ports in network order (bpf_sock has the local one in host order).
 * An AF_INET6 socket holding an IPv4 connection has IPv4-mapped
 * addresses, which is how the records store IPv4. */
static __always_inline int sock_tuple(struct bpf_sock *sk, struct pktmeta_tuple *t)
{
	/* A 4-byte load: the only width Linux 5.15 accepts for dst_port. */
	__u32 dport = *(volatile __u32 *)&sk->dst_port;
	__u32 family = sk->family;

	__builtin_memset(t, 0, sizeof(*t));
	t->sport = (__be16)(dport & 0xffff);
	t->dport = bpf_htons((__u16)sk->src_port);
	t->proto = (__u8)sk->protocol;
	if (family == AF_INET) {
		pktmeta__v4mapped(t->saddr, sk->dst_ip4);
		pktmeta__v4mapped(t->daddr, sk->src_ip4);
	} else if (family == AF_INET6) {
		__u32 *s = (__u32 *)t->saddr, *d = (__u32 *)t->daddr;

		s[0] = sk->dst_ip6[0];
		s[1] = sk->dst_ip6[1];
		s[2] = sk->dst_ip6[2];
		s[3] = sk->dst_ip6[3];
		d[0] = sk->src_ip6[0];
		d[1] = sk->src_ip6[1];
		d[2] = sk->src_ip6[2];
		d[3] = sk->src_ip6[3];
	} else {
		return -ENOENT;
	}
	if (t->proto != IPPROTO_TCP && t->proto != IPPROTO_UDP)
		return -ENOENT;
	if (!t->sport)
		return -ENOTCONN;
	return 0;
}

static __always_inline void reverse_tuple(const struct pktmeta_tuple *t, struct pktmeta_tuple *r)
{
	__builtin_memcpy(r->saddr, t->daddr, sizeof(r->saddr));
	__builtin_memcpy(r->daddr, t->saddr, sizeof(r->daddr));
	r->sport = t->dport;
	r->dport = t->sport;
	r->proto = t->proto;
	r->_pad[0] = r->_pad[1] = r->_pad[2] = 0;
}

/* The connection t (peer -> local) as this netns may know it: delivered
 * to this pod, or opened by it (then t reversed is its own tuple).
 * Returns PKTMETA_ORIGIN_F_SELF or 0, or -ENOENT. A subprogram: the
 * wildcard case calls it once per address of the pod. */
static __noinline int find_conn(const struct pktmeta_tuple *t, __u64 netns, struct pktmeta_record *rec)
{
	struct pktmeta_tuple r;

	if (!t || !rec)
		return -ENOENT;
	if (pktmeta_lookup(t, rec) == 0 && (rec->flags & PKTMETA_F_DELIVERED) &&
	    in_netns(rec->peer_workload, netns))
		return 0; /* This pod received it. */
	/* This pod opened it: its own tuple, local -> peer. */
	reverse_tuple(t, &r);
	if (pktmeta__copy_record(&r, rec) || (rec->flags & PKTMETA_F_REMOTE) ||
	    !in_netns(rec->origin_workload, netns))
		return -ENOENT;
	return PKTMETA_ORIGIN_F_SELF;
}

static __always_inline int addr_unspecified(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;

	/* :: or ::ffff:0.0.0.0 (an AF_INET socket's wildcard, mapped). */
	return w[0] == 0 && w[1] == 0 && (w[2] == 0 || w[2] == bpf_htonl(0xffff)) && w[3] == 0;
}

static __always_inline int addr_v4mapped(const __u8 a[16])
{
	const __u32 *w = (const __u32 *)a;

	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0xffff);
}

/* An unconnected UDP socket: the connection of the datagram its last
 * recvmsg() returned. Its peer comes from the socket's storage; its local
 * address is the socket's own, or, bound to the wildcard, whichever of the
 * pod's addresses of the peer's family the flow was delivered to. */
static __always_inline int find_udp_last(struct bpf_sock *sk, struct pktmeta_tuple *t, __u64 netns,
					 struct pktmeta_record *rec)
{
	struct pktmeta_netns_addrs *na;
	struct pktmeta_udp_peer *p;
	__u64 conn_id = 0;
	__u8 match[16];
	int v4;

	p = bpf_sk_storage_get(&pktmeta_udp_peers, sk, 0, 0);
	if (!p || !p->port || p->gen != udp_peer_gen())
		return -ENOTCONN;
	__builtin_memcpy(t->saddr, p->addr, sizeof(t->saddr));
	t->sport = p->port;
	if (!addr_unspecified(t->daddr))
		return find_conn(t, netns, rec);
	na = bpf_map_lookup_elem(&pktmeta_ns_addrs, &netns);
	/* Truncated: the datagram may have come to an address not listed,
	 * and a listed one matching would be a wrong answer. */
	if (!na || (na->flags & PKTMETA_NETNS_F_TRUNCATED))
		return -ENOENT;
	v4 = addr_v4mapped(t->saddr);
	/* Every address, not the first that matches: the peer may have a flow
	 * to two of the pod's addresses from one port, and the socket does
	 * not say which of them the datagram came to. Then there is no one
	 * answer, and a wrong one is worse than none. (The match is kept by
	 * its connection id and address, never by its index: an index the
	 * verifier tracks exactly multiplies the states it walks.) */
	for (__u32 i = 0; i < PKTMETA_NETNS_MAX_ADDRS; i++) {
		if (i >= na->n_addrs)
			break;
		if (addr_v4mapped(na->addrs[i]) != v4)
			continue;
		__builtin_memcpy(t->daddr, na->addrs[i], sizeof(t->daddr));
		if (find_conn(t, netns, rec) < 0)
			continue;
		if (conn_id && rec->conn_id != conn_id)
			return -ENOENT;
		conn_id = rec->conn_id;
		__builtin_memcpy(match, t->daddr, sizeof(match));
	}
	if (!conn_id)
		return -ENOENT;
	/* rec holds what the last lookup left: the match's again. */
	__builtin_memcpy(t->daddr, match, sizeof(t->daddr));
	return find_conn(t, netns, rec);
}

/* What an unconnected UDP socket's recvmsg() hands over: the datagram's
 * source. The kernel runs these for every UDP recvmsg() that asks for the
 * source address, in the cgroup they are on; they only remember it. */
static __always_inline struct pktmeta_udp_peer *udp_peer_slot(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return NULL;
	/* A connected socket's peer is the socket's own: nothing to keep.
	 * (4-byte load, as in sock_tuple.) */
	if (*(volatile __u32 *)&sk->dst_port)
		return NULL;
	return bpf_sk_storage_get(&pktmeta_udp_peers, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
}

SEC("cgroup/recvmsg4")
int pktmeta_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct pktmeta_udp_peer *p = udp_peer_slot(ctx);

	if (p) {
		pktmeta__v4mapped(p->addr, ctx->user_ip4);
		p->port = (__be16)ctx->user_port;
		p->gen = udp_peer_gen();
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int pktmeta_recvmsg6(struct bpf_sock_addr *ctx)
{
	struct pktmeta_udp_peer *p = udp_peer_slot(ctx);

	if (p) {
		__u32 *a = (__u32 *)p->addr;

		a[0] = ctx->user_ip6[0];
		a[1] = ctx->user_ip6[1];
		a[2] = ctx->user_ip6[2];
		a[3] = ctx->user_ip6[3];
		p->port = (__be16)ctx->user_port;
		p->gen = udp_peer_gen();
	}
	return 1;
}

SEC("cgroup/getsockopt")
int pktmeta_getsockopt(struct bpf_sockopt *ctx)
{
	struct pktmeta_workload *w;
	struct pktmeta_conn_origin *o;
	struct pktmeta_record rec;
	struct pktmeta_tuple t;
	struct bpf_sock *sk;
	__u32 flags = 0;
	__u64 netns;
	int err;

	if (ctx->level != SOL_PKTMETA) {
		__s32 len = ctx->optlen;

		/* Not ours: hand the call back as the kernel left it. optlen 0
		 * tells the kernel to copy nothing back, which is what keeps
		 * it untouched where the kernel would otherwise copy this
		 * program's view over the caller's: a call the kernel failed
		 * (before 5.18 the caller's buffer and length would be
		 * rewritten, e.g. the length SO_PEERSEC reports with ERANGE),
		 * a buffer longer than the page this program sees (EFAULT
		 * before 6.5), and a successful call that reports more than
		 * the caller's buffer holds (NETLINK_LIST_MEMBERSHIPS with a
		 * short buffer: EFAULT). Anything else is returned as is. */
		if (ctx->retval != 0 || len < 0 || len > SOCKOPT_PAGE_SIZE) {
			WRITE_ONCE(ctx->optlen, 0);
			return 1;
		}
		if (ctx->optval + len > ctx->optval_end)
			WRITE_ONCE(ctx->optlen, 0);
		return 1;
	}
	/* The kernel refuses a level it does not know, so 0 here means an
	 * earlier program on the cgroup chain (another pktmeta, with its own
	 * pin path) answered: its answer stands. */
	if (ctx->retval == 0)
		return 1;
	if (ctx->optname != PKTMETA_SO_ORIGIN)
		return sockopt_fail(ctx, ENOPROTOOPT);
	o = ctx->optval;
	if ((void *)(o + 1) > ctx->optval_end)
		return sockopt_fail(ctx, EINVAL);
	sk = ctx->sk;
	if (!sk)
		return sockopt_fail(ctx, ENOTCONN);
	netns = bpf_get_netns_cookie(ctx);
	err = sock_tuple(sk, &t);
	if (err == -ENOTCONN && t.proto == IPPROTO_UDP)
		err = find_udp_last(sk, &t, netns, &rec);
	else if (!err)
		err = find_conn(&t, netns, &rec);
	if (err < 0)
		return sockopt_fail(ctx, -err);
	flags |= err;

	if (rec.flags & PKTMETA_F_REMOTE)
		flags |= PKTMETA_ORIGIN_F_REMOTE;
	if (rec.flags & PKTMETA_F_NAT)
		flags |= PKTMETA_ORIGIN_F_NAT;
	if (rec.flags & PKTMETA_F_UDP)
		flags |= PKTMETA_ORIGIN_F_UDP;
	w = NULL;
	if (!(rec.flags & PKTMETA_F_REMOTE))
		w = bpf_map_lookup_elem(&pktmeta_wloads, &rec.origin_workload);
	if (w) {
		if (w->flags & PKTMETA_WL_PARTIAL)
			flags |= PKTMETA_ORIGIN_F_PARTIAL;
		o->n_tags = w->n_tags;
		o->pod_tags = w->pod_tags;
		copy_big(o->namespace, w->namespace, sizeof(o->namespace));
		copy_big(o->pod, w->pod, sizeof(o->pod));
		copy_big(o->uid, w->uid, sizeof(o->uid));
		copy_big(o->tags, w->tags, sizeof(o->tags));
	} else {
		o->n_tags = 0;
		o->pod_tags = 0;
		zero_big(o->namespace, sizeof(o->namespace));
		zero_big(o->pod, sizeof(o->pod));
		zero_big(o->uid, sizeof(o->uid));
		zero_big(o->tags, sizeof(o->tags));
	}
	o->version = PKTMETA_ORIGIN_VERSION;
	o->_pad = 0;
	o->flags = flags;
	o->conn_id = rec.conn_id;
	o->first_seen_ns = rec.first_seen_ns;
	o->origin_node = rec.origin_node;
	o->_pad2 = 0;
	o->origin_workload = rec.origin_workload;
	WRITE_ONCE(ctx->optlen, sizeof(*o));
	WRITE_ONCE(ctx->retval, 0);
	return 1;
}

#endif /* __PKTMETA_SOCKOPT_H__ */
