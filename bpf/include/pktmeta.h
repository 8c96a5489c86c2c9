/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * pktmeta.h - public interface of the pktmeta datapath.
 *
 * pktmeta stashes a fixed-size record for every L4 connection a pod opens,
 * keyed by the connection's tuple as the pod sent it, in pinned BPF maps.
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
 * and load the object with these maps replaced by the node's pinned ones,
 * <pinPath>/maps/pktmeta_conns and pktmeta_aliases (default pin path
 * /sys/fs/bpf/pktmeta). The declarations below carry a placeholder size, and
 * loaders reuse a pinned map only if the sizes match: with cilium/ebpf, the
 * Go package github.com/pktmeta/pktmeta/consumer does it all (Maps() returns
 * the MapReplacements); with libbpf, open the pinned map, set the size with
 * bpf_map__set_max_entries() and hand it over with bpf_map__reuse_fd()
 * before loading.
 *
 * Read-only. Only pktmeta writes these maps. Their elements are recycled
 * the moment a record is removed (BPF hash maps have no grace period for
 * values), so a pointer from bpf_map_lookup_elem() may, a few nanoseconds
 * later, point at another connection's record. pktmeta_lookup() therefore
 * copies the record and checks, with a second lookup, that the element
 * still holds the same connection under the same key; use it instead of
 * dereferencing map values yourself, and never write through such a
 * pointer. (The one thing a copy cannot rule out is the same tuple being
 * reused by a new connection of the same pod inside those nanoseconds:
 * the identity read is then still right, the conn_id may be either.)
 *
 * Stability: every record carries a version byte, and the pinned config map
 * carries PKTMETA_LAYOUT_VERSION. A change to any layout in this file bumps
 * the version; consumers should check rec.version == PKTMETA_RECORD_VERSION.
 * Only the conns and aliases maps are part of the consumer interface.
 */
#ifndef __PKTMETA_H__
#define __PKTMETA_H__

#include <linux/types.h>

#define PKTMETA_LAYOUT_VERSION 2
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

/* One record per connection, in map "pktmeta_conns", keyed by the tuple as
 * the origin pod sent it. Written at the connection's first packet; the
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

#ifdef PKTMETA_DECLARE_MAPS
#include <bpf/bpf_helpers.h>

/* Sizes are placeholders: the pinned maps replace them at load time. The
 * tables are plain (preallocated) hashes, not LRU: pktmeta never evicts a
 * live record to make room; a full table refuses new records instead. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct pktmeta_tuple);
	__type(value, struct pktmeta_record);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_conns SEC(".maps");

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

/* Copies the record under key into *out if the element still holds the
 * same connection under that key after the copy. 0 on success. */
static __always_inline int pktmeta__copy_record(const struct pktmeta_tuple *key,
						struct pktmeta_record *out)
{
	struct pktmeta_record *e, *again;

	e = bpf_map_lookup_elem(&pktmeta_conns, key);
	if (!e)
		return -1;
	__builtin_memcpy(out, e, sizeof(*out));
	again = bpf_map_lookup_elem(&pktmeta_conns, key);
	if (again != e || *(volatile __u64 *)&e->conn_id != out->conn_id)
		return -1;
	return 0;
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
