// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * pktmeta datapath. Three TC programs on a pod's host-side veth:
 *
 *   pktmeta_origin  tcx ingress (packets from the pod): tags the first packet
 *                   of every connection the pod opens with a record in
 *                   the connection table, keyed by the tuple as the pod
 *                   sent it.
 *   pktmeta_strict  the same, and drops packets whose source address is not
 *                   one of the pod's.
 *   pktmeta_deliver tcx egress (packets to the pod): finds the record of the
 *                   first packet reaching the pod, through conntrack when
 *                   Service DNAT changed the tuple, stores an alias under
 *                   the tuple the pod sees, and marks the record delivered.
 *
 * and pktmeta_sweep, which userspace runs with BPF_PROG_TEST_RUN to remove
 * the records of a deleted pod and records whose connection is over; the
 * uplink programs (uplink.h), which carry origins across nodes; and
 * pktmeta_getsockopt (sockopt.h), which tells an application in a pod who
 * opened the connection behind one of its sockets.
 *
 * Trust: identity comes from the veth a packet arrives on. A packet creates,
 * replaces or closes a record only if its source address is the pod's own
 * (source validation, always on) and the pod is a party to the connection;
 * anything else passes untouched and is counted. At a delivery hook, where
 * the sender is not known, a FIN or RST counts only once conntrack has
 * accepted it. Each pod may hold at most max_conns records, so no pod can
 * fill the table for the others; the table is never LRU: nothing live is
 * evicted, a full table refuses new records and says so.
 *
 * Records are changed with a compare-and-swap on {flags, conn_gen}, or
 * rewritten whole under their home chunk's lock (table.h); never by plain
 * stores into a slot that may have been reused for another connection
 * (see pktmeta.h).
 *
 * Every program returns TCX_NEXT (== TC_ACT_UNSPEC) so programs after ours
 * still run. A TCP segment without SYN, FIN or RST pays a header parse and
 * nothing else; UDP also needs to know whether its flow has a record,
 * which a stream of datagrams mostly learns from a per-CPU shortcut
 * instead of the table.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#define PKTMETA_DECLARE_MAPS
#include "pktmeta.h"
#include "datapath.h"
#include "parse.h"
#include "conntrack.h"

#ifndef TCX_NEXT
#define TCX_NEXT -1
#define TCX_DROP 2
#endif

#define EEXIST 17
#define E2BIG 7

#define NSEC_PER_SEC 1000000000ULL
/* How stale a UDP record's last_seen may get before it is refreshed. */
#define UDP_REFRESH_NS NSEC_PER_SEC
#define DEFAULT_UDP_TIMEOUT_NS (120 * NSEC_PER_SEC)
/* The longest jiffy of any kernel: CONFIG_HZ is at least 100. */
#define MAX_JIFFY_NS (NSEC_PER_SEC / 100)
/* Wake event readers once this much is waiting (a quarter of the buffer). */
#define EVENTS_WAKEUP_BYTES (64 * 1024)
/* Compare-and-swap attempts before giving up on a record that keeps changing. */
#define CAS_TRIES 4
/* Internal: a CPU is delivering this record, or replacing it (never set in
 * a stored record for longer than that takes; readers ignore them). */
#define F_DELIVERING (1U << 31)
#define F_REPLACING (1U << 30)
#define F_INTERNAL (F_DELIVERING | F_REPLACING)

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x) = (v))
#define barrier() asm volatile("" ::: "memory")

#include "table.h"

char __license[] SEC("license") = "Dual BSD/GPL";

/* The connection table (pktmeta_table, pktmeta_chunks, pktmeta_slots) and
 * pktmeta_aliases come from the public header: the datapath declares them
 * exactly as consumers do. The loader sizes them from maxConnections. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u32); /* host veth ifindex */
	__type(value, struct pktmeta_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_eps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32); /* workload id */
	__type(value, struct pktmeta_workload);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_wloads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_events SEC(".maps");

/* Answers this node cannot get from conntrack: UDP flows that reached a pod
 * without a record, keyed by the tuple the pod answers with. LRU: losing
 * one only matters where conntrack does not track the flow. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct pktmeta_tuple);
	__type(value, struct pktmeta_inbound_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_inbound SEC(".maps");

/* Across nodes: this node's id and key, the cluster's members, and the
 * uplink programs' counters (bpf/uplink.h). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_node_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_node SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pktmeta_member_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct pktmeta_remote_counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_xstats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_remote_live SEC(".maps");

/* What a CPU remembers of the UDP datagrams that needed nothing, in a
 * direct-mapped per-CPU cache of UDP_HIT_SLOTS per side: at the origin, a
 * datagram of a flow whose record is this veth's and fresh, or the pod's
 * answer to a flow it received; at the destination, one of a flow already
 * delivered, a reply to a flow the pod opened, or one of a flow nobody on
 * the node opened (answers, replies and those rest on births, below). A
 * datagram that
 * matches one skips the table until until_jiffies, which is never later
 * than the moment the full path would next have work to do (refresh
 * last_seen, ask conntrack about an alias), and only while
 * pktmeta_udp_epoch has not moved. The deadline is in jiffies because the
 * verifier inlines bpf_jiffies64() into one load, where a clock is a
 * helper call: about a fifth of what a hit costs. The epoch (and births)
 * are read before the tables, so a record that goes after its element was
 * read voids the slot; a fresh record's slot is written only after the
 * element is checked to still hold that connection under that tuple as
 * well. TC programs run with bottom halves disabled, which serialises them
 * on a CPU (on PREEMPT_RT too, where local_bh_disable() takes a per-CPU
 * lock), so a slot is never read half-written. Not pinned: each load
 * starts with an empty one. */
#define UDP_HIT_SLOTS 16
#define UDP_HIT_ORIGIN 0
#define UDP_HIT_DELIVERY UDP_HIT_SLOTS

struct udp_hit {
	struct pktmeta_tuple t;
	__u32 ifindex;
	/* UDP_BIRTHS_ANY: the decision rests on records and aliases that
	 * exist, whose going moves the epoch. Otherwise it also rests on
	 * none existing under the datagram's tuple, and this is
	 * pktmeta_udp_births when it was taken. */
	__u32 births;
	__u64 until_jiffies; /* 0: empty */
	__u64 epoch; /* pktmeta_udp_epoch when the decision was taken */
};

/* Odd: births only ever moves by two from zero, so no count is ever taken
 * for it. */
#define UDP_BIRTHS_ANY 0xffffffffU

/* What a shortcut's decision is taken under: both read before any table
 * is. */
struct udp_stamp {
	__u64 epoch;
	__u32 births;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * UDP_HIT_SLOTS);
	__type(key, __u32);
	__type(value, struct udp_hit);
} pktmeta_udp_hits SEC(".maps");

/* Incremented (atomically, by the programs only) whenever a UDP record
 * leaves the table or is replaced by another connection, an alias is
 * dropped on a packet's path, and when userspace changes an endpoint (it
 * runs pktmeta_sweep with PKTMETA_SWEEP_FORGET_UDP). Every shortcut
 * remembered before is then void. Pinned, so that the sweep program of
 * any process shares it. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} pktmeta_udp_epoch SEC(".maps");

/* Incremented (atomically, by the programs only) whenever a UDP record or
 * an alias is made, after it is in its table. tag() and deliver_nat() are
 * the only places either is made (the uplink carries TCP only, userspace
 * makes neither), so a datagram remembered as needing nothing because no
 * record or alias was under its tuple (a reply the pod sends to a flow it
 * received, a datagram from off the node) goes the full path again the
 * moment one could be. Its own counter, not the epoch: new flows are
 * frequent, and must not void what the fresh flows' slots remember. Not
 * pinned, like the slots: another load's programs (an upgrade, or a repair,
 * moving attachments over) do not move it, and a slot that misses a record
 * made there runs out at its deadline. On weakly ordered CPUs the
 * increment may be seen before the insert it follows; the same deadline
 * bounds that. Either way the miss is one of the record not delivered or
 * not refreshed for at most a second, never of a record made wrongly. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} pktmeta_udp_births SEC(".maps");

/* Set only by `make bench`, to measure what source validation costs: a
 * frozen constant, so on a node (where it is 0) the verifier removes the
 * branch and the programs carry no trace of it. */
volatile const __u32 bench_no_source_check = 0;

/* Keep these layouts in BTF for bpf2go. */
const struct pktmeta_event *unused_event __attribute__((unused));
const struct pktmeta_event_v4 *unused_event_v4 __attribute__((unused));
const struct pktmeta_sweep_args *unused_sweep __attribute__((unused));
const struct pktmeta_table_op *unused_table_op __attribute__((unused));
const struct pktmeta_node_config *unused_node __attribute__((unused));
const struct pktmeta_member_key *unused_member __attribute__((unused));
const struct pktmeta_remote_counters *unused_xc __attribute__((unused));

static __always_inline struct pktmeta_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_stats, &zero);
}

static __always_inline struct pktmeta_node_config *node_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_node, &zero);
}

static __always_inline __s64 *remote_live(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_remote_live, &zero);
}

static __always_inline struct pktmeta_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_cfg, &zero);
}

static __always_inline __u64 udp_epoch(void)
{
	__u32 zero = 0;
	__u64 *e = bpf_map_lookup_elem(&pktmeta_udp_epoch, &zero);

	return e ? READ_ONCE(*e) : 0;
}

static __always_inline __u32 udp_births(void)
{
	__u32 zero = 0;
	__u64 *b = bpf_map_lookup_elem(&pktmeta_udp_births, &zero);

	return b ? (__u32)READ_ONCE(*b) : 0;
}

/* A UDP record or an alias was made: forget the shortcuts that rest on
 * there being none. By two, so that births is never UDP_BIRTHS_ANY. */
static __always_inline void udp_born(void)
{
	__u32 zero = 0;
	__u64 *b = bpf_map_lookup_elem(&pktmeta_udp_births, &zero);

	if (b)
		__sync_fetch_and_add(b, 2);
}

/* A UDP record or alias left or was replaced: forget every shortcut. */
static __always_inline void udp_invalidate(void)
{
	__u32 zero = 0;
	__u64 *e = bpf_map_lookup_elem(&pktmeta_udp_epoch, &zero);

	if (e)
		__sync_fetch_and_add(e, 1);
}

/* Unique on the node without atomics: a per-CPU sequence with the CPU in
 * the low 12 bits. Never 0. */
static __always_inline __u64 next_conn_id(struct pktmeta_counters *c)
{
	__u64 seq = ++c->conn_seq;

	return (seq << 12) | (bpf_get_smp_processor_id() & 0xfff);
}

/* ---- Records: read by copy, changed by compare-and-swap or update. ---- */

/* The record of key's LIVE entry, or NULL. A hint: the slot may be
 * rewritten or reused at any moment; decisions that last use snapshot()
 * or still_holds(). */
static __always_inline struct pktmeta_record *conn_find(const struct pktmeta_tuple *key)
{
	int found = pktmeta_find_slot(key);
	struct pktmeta_slot *s;
	__u32 idx;

	if (found < 0)
		return NULL;
	idx = found;
	s = bpf_map_lookup_elem(&pktmeta_slots, &idx);
	return s ? &s->rec : NULL;
}

/* Copies the record under key and returns the slot's record it came from,
 * or NULL. The slot's state, the same before and after the copy, proves
 * the slot held that connection under that key for the whole copy. */
static __always_inline struct pktmeta_record *snapshot(const struct pktmeta_tuple *key,
						       struct pktmeta_record *copy)
{
	int found = pktmeta_find_slot(key);
	struct pktmeta_slot *s;

	if (found < 0)
		return NULL;
	s = pktmeta_copy_slot(found, key, copy);
	return s ? &s->rec : NULL;
}

/* Per-CPU room for records being built or checked, where a program's
 * stack has none left: one slot per use (SCRATCH_*). Only the packet
 * programs use it, which do not interrupt each other on a CPU. */
#define SCRATCH_DELIVER 0
#define SCRATCH_SLOTS 1

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SCRATCH_SLOTS);
	__type(key, __u32);
	__type(value, struct pktmeta_record);
} pktmeta_scratch SEC(".maps");

static __always_inline struct pktmeta_record *scratch_record(__u32 slot)
{
	return bpf_map_lookup_elem(&pktmeta_scratch, &slot);
}

/* Per CPU: 1 while the last insert on this CPU found the table full. A
 * hint for table_warm() only (a first packet need not warm a slot it is
 * unlikely to write): inserts still run, and the next one's result sets
 * it again. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} pktmeta_table_was_full SEC(".maps");

static __always_inline __u32 *table_was_full(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_table_was_full, &zero);
}

/* Whether a first packet from ep (NULL: not known yet) is likely to
 * insert a record: the pod is under its budget and the table was not
 * full a moment ago. Only a hint, for table_warm(). */
static __always_inline int insert_likely(const struct pktmeta_endpoint *ep)
{
	__u32 *full = table_was_full();

	if (full && *full)
		return 0;
	return !ep || !ep->max_conns || READ_ONCE(ep->live) < (__s64)ep->max_conns;
}

#define EBUSY 16
#define ENOENT 2

/* A table.h result as an error: 0, -EEXIST, -E2BIG (full), -EBUSY (the
 * chunk stayed locked), -ENOENT (the connection went meanwhile). */
static __always_inline int table_error(int res)
{
	switch (res) {
	case TABLE_DONE:
		return 0;
	case TABLE_EXISTS:
		return -EEXIST;
	case TABLE_FULL:
		return -E2BIG;
	case TABLE_BUSY:
		return -EBUSY;
	default:
		return -ENOENT;
	}
}

static __always_inline void count_table_error(struct pktmeta_counters *c, int err)
{
	if (err == -EBUSY)
		c->table_busy++;
	else
		c->update_errors++;
}

/* Sets bits in the flags of e if it still holds connection conn_id.
 * Returns the flags before (bits possibly already set), or -1 when e is no
 * longer that connection. */
static __always_inline __s64 set_flags(struct pktmeta_record *e, __u64 conn_id, __u32 bits)
{
	__u64 *word = (__u64 *)e;

	for (int i = 0; i < CAS_TRIES; i++) {
		__u64 old = READ_ONCE(*word);

		if ((__u32)(old >> 32) != (__u32)conn_id)
			return -1;
		if (((__u32)old & bits) == bits)
			return (__u32)old;
		if (__sync_val_compare_and_swap(word, old, old | bits) == old)
			return (__u32)old;
	}
	return -1;
}

/* Clears bits in the flags of e if it still holds connection conn_id. */
static __always_inline void clear_flags(struct pktmeta_record *e, __u64 conn_id, __u32 bits)
{
	__u64 *word = (__u64 *)e;

	for (int i = 0; i < CAS_TRIES; i++) {
		__u64 old = READ_ONCE(*word);

		if ((__u32)(old >> 32) != (__u32)conn_id || !((__u32)old & bits))
			return;
		if (__sync_val_compare_and_swap(word, old, old & ~(__u64)bits) == old)
			return;
	}
}

static __always_inline int tcp_closing(__u32 flags)
{
	return flags & (PKTMETA_F_FIN_ORIG | PKTMETA_F_FIN_REPLY);
}

/* ---- Per-pod state. ---- */

/* Whether this node's workload opened r: workload ids are the node's own,
 * and a remote record's belongs to another node. */
static __always_inline int opened_by(const struct pktmeta_record *r, __u32 workload)
{
	return !(r->flags & PKTMETA_F_REMOTE) && r->origin_workload == workload;
}

/* The pod's own endpoint, if the record's origin is still registered. */
static __always_inline struct pktmeta_endpoint *origin_endpoint(const struct pktmeta_record *r)
{
	__u32 ifindex = r->origin_ifindex;
	struct pktmeta_endpoint *ep;

	if (r->flags & PKTMETA_F_REMOTE)
		return NULL;
	ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
	if (ep && ep->workload == r->origin_workload)
		return ep;
	return NULL;
}

/* A record of r's origin left the table: a pod's, or the node's budget
 * for remote records. */
static __always_inline void release_budget(const struct pktmeta_record *r)
{
	struct pktmeta_endpoint *ep;
	__s64 *live;

	if (r->flags & PKTMETA_F_REMOTE) {
		live = remote_live();
		if (live)
			__sync_fetch_and_add(live, -1);
		return;
	}
	ep = origin_endpoint(r);
	if (ep)
		__sync_fetch_and_add(&ep->live, -1);
}

/* Removes the record r stored under key, and its alias. Returns 1 if this
 * call removed it, 0 if it was gone (a racing close or sweep), -1 if the
 * table was too busy to (counted). */
static __always_inline int remove_record(const struct pktmeta_tuple *key, const struct pktmeta_record *r,
					 struct pktmeta_counters *c)
{
	struct pktmeta_alias *a;
	int res = table_remove(key, r->conn_id);

	if (res == TABLE_BUSY && c)
		c->table_busy++;
	if (res != TABLE_DONE)
		return res == TABLE_BUSY ? -1 : 0;
	if (r->flags & PKTMETA_F_NAT) {
		a = bpf_map_lookup_elem(&pktmeta_aliases, &r->peer_tuple);
		/* Only our own alias: the seen tuple may belong to a newer one. */
		if (a && READ_ONCE(a->conn_id) == r->conn_id)
			bpf_map_delete_elem(&pktmeta_aliases, &r->peer_tuple);
	}
	if (r->flags & PKTMETA_F_UDP)
		udp_invalidate();
	release_budget(r);
	return 1;
}

/* Whether the pod may open one more connection with events, in a one-second
 * window. Approximate under concurrency, which is all a rate limit needs. */
static __always_inline int events_allowed(struct pktmeta_endpoint *ep, __u64 now)
{
	if (!ep->events_per_sec)
		return 1;
	if (now - ep->ev_window_ns >= NSEC_PER_SEC) {
		ep->ev_window_ns = now;
		ep->ev_count = 0;
	}
	if (ep->ev_count >= ep->events_per_sec)
		return 0;
	ep->ev_count++;
	return 1;
}

/* ---- Source validation. ---- */

static __always_inline int link_local_or_unspecified(const struct packet *p)
{
	const __u64 *s = (const __u64 *)p->t.saddr;

	return p->family == 6 && ((p->t.saddr[0] == 0xfe && (p->t.saddr[1] & 0xc0) == 0x80) ||
				  (s[0] == 0 && s[1] == 0));
}

/* Whether addr is one of the pod's own addresses. */
static __always_inline int has_address(const struct pktmeta_endpoint *ep, const __u8 addr[16])
{
	const __u64 *x = (const __u64 *)addr;

	for (int i = 0; i < PKTMETA_MAX_ADDRS; i++) {
		const __u64 *a = (const __u64 *)ep->addrs[i];

		if (i >= ep->n_addrs)
			break;
		if (a[0] == x[0] && a[1] == x[1])
			return 1;
	}
	return 0;
}

/* Whether the packet's source is one of the pod's own addresses. */
static __always_inline int own_address(const struct pktmeta_endpoint *ep, const struct packet *p)
{
	return has_address(ep, p->t.saddr);
}

/* Whether the packet is addressed to one of the pod's own addresses: what
 * a delivery hook must see before it calls the pod a connection's peer (a
 * bridge floods unknown unicast to every port). */
static __always_inline int own_destination(const struct pktmeta_endpoint *ep, const struct packet *p)
{
	return has_address(ep, p->t.daddr);
}

enum sender {
	SENDER_OK,
	SENDER_UNREGISTERED, /* no endpoint: an ADD in progress */
	SENDER_LINK_LOCAL, /* never tagged, but not a forgery */
	SENDER_SPOOFED,
};

/* Decides whether the packet may create, replace or close records: it must
 * come from a registered pod, with one of that pod's own addresses. Counts
 * what it refuses. *epp is looked up if NULL. */
static __always_inline enum sender check_sender(struct __sk_buff *skb, const struct packet *p,
						 struct pktmeta_counters *c,
						 struct pktmeta_endpoint **epp)
{
	struct pktmeta_endpoint *ep = *epp;

	if (!ep) {
		__u32 ifindex = skb->ifindex;

		ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
		if (!ep) {
			c->unregistered++;
			return SENDER_UNREGISTERED;
		}
		*epp = ep;
	}
	if (link_local_or_unspecified(p)) {
		c->link_local++;
		return SENDER_LINK_LOCAL;
	}
	if (!bench_no_source_check && !own_address(ep, p)) {
		c->spoofed++;
		__sync_fetch_and_add(&ep->spoofed, 1);
		return SENDER_SPOOFED;
	}
	return SENDER_OK;
}

/* ---- Events. ---- */

/* Waking the reader (an irq_work, an IPI) costs more than the rest of a
 * first packet together. Readers poll; the event that makes the backlog
 * cross a quarter of the buffer wakes them, once. */
static __always_inline __u64 wakeup_flag(__u64 pending, __u64 size)
{
	return pending < EVENTS_WAKEUP_BYTES && pending + size + 8 >= EVENTS_WAKEUP_BYTES ? BPF_RB_FORCE_WAKEUP
												 : BPF_RB_NO_WAKEUP;
}

static __always_inline __be32 v4_of(const __u8 addr[16])
{
	return *(const __be32 *)&addr[12];
}

static __always_inline void emit(struct pktmeta_counters *c, __u8 type, __u8 reason,
				 const struct pktmeta_record *rec, const struct pktmeta_tuple *origin,
				 const struct pktmeta_tuple *seen, __u32 ifindex, __u64 now)
{
	struct pktmeta_config *cfg = config();
	struct pktmeta_event_v4 *e4;
	struct pktmeta_event *e;
	__u64 pending;

	if (rec->flags & PKTMETA_F_QUIET)
		return;
	if (cfg && (cfg->flags & PKTMETA_CFG_NO_EVENTS))
		return;
	pending = bpf_ringbuf_query(&pktmeta_events, BPF_RB_AVAIL_DATA);
	if (is_v4mapped(origin->saddr) && is_v4mapped(origin->daddr) &&
	    (!seen || (is_v4mapped(seen->saddr) && is_v4mapped(seen->daddr)))) {
		e4 = bpf_ringbuf_reserve(&pktmeta_events, sizeof(*e4), 0);
		if (!e4) {
			c->events_dropped++;
			return;
		}
		e4->version = PKTMETA_RECORD_VERSION;
		e4->type = type;
		e4->reason = reason;
		e4->proto = origin->proto;
		e4->flags = rec->flags & ~F_INTERNAL;
		e4->conn_id = rec->conn_id;
		e4->ts_ns = now;
		e4->origin_workload = rec->origin_workload;
		e4->peer_workload = rec->peer_workload;
		e4->ifindex = ifindex;
		e4->saddr = v4_of(origin->saddr);
		e4->daddr = v4_of(origin->daddr);
		e4->sport = origin->sport;
		e4->dport = origin->dport;
		if (seen) {
			e4->seen_saddr = v4_of(seen->saddr);
			e4->seen_daddr = v4_of(seen->daddr);
			e4->seen_sport = seen->sport;
			e4->seen_dport = seen->dport;
		} else {
			e4->seen_saddr = 0;
			e4->seen_daddr = 0;
			e4->seen_sport = 0;
			e4->seen_dport = 0;
		}
		e4->_pad = 0;
		bpf_ringbuf_submit(e4, wakeup_flag(pending, sizeof(*e4)));
		return;
	}
	e = bpf_ringbuf_reserve(&pktmeta_events, sizeof(*e), 0);
	if (!e) {
		c->events_dropped++;
		return;
	}
	e->version = PKTMETA_RECORD_VERSION;
	e->type = type;
	e->reason = reason;
	e->_pad = 0;
	e->flags = rec->flags & ~F_INTERNAL;
	e->conn_id = rec->conn_id;
	e->ts_ns = now;
	e->origin_workload = rec->origin_workload;
	e->peer_workload = rec->peer_workload;
	e->ifindex = ifindex;
	e->_pad2 = 0;
	__builtin_memcpy(&e->tuple, origin, sizeof(e->tuple));
	if (seen)
		__builtin_memcpy(&e->seen, seen, sizeof(e->seen));
	else
		__builtin_memset(&e->seen, 0, sizeof(e->seen));
	bpf_ringbuf_submit(e, wakeup_flag(pending, sizeof(*e)));
}

/* ---- Conntrack. ---- */

static __always_inline int tuple_is_v4(const struct pktmeta_tuple *t)
{
	return is_v4mapped(t->saddr);
}

/* Looks the tuple up in the host's conntrack (either direction matches).
 * Returns the entry (release it with bpf_ct_release) or NULL, and sets
 * *unavailable when conntrack cannot be asked at all. */
static __always_inline struct nf_conn *ct_lookup(struct __sk_buff *skb, const struct pktmeta_tuple *q,
						 struct bpf_ct_opts *opts, int *unavailable)
{
	struct bpf_sock_tuple bt;
	__u32 len;

	*unavailable = 0;
	if (!pktmeta_have_ct_kfuncs) {
		*unavailable = 1;
		return NULL;
	}
	__builtin_memset(&bt, 0, sizeof(bt));
	__builtin_memset(opts, 0, sizeof(*opts));
	opts->netns_id = BPF_F_CURRENT_NETNS;
	opts->l4proto = q->proto;
	if (tuple_is_v4(q)) {
		__builtin_memcpy(&bt.ipv4.saddr, &q->saddr[12], 4);
		__builtin_memcpy(&bt.ipv4.daddr, &q->daddr[12], 4);
		bt.ipv4.sport = q->sport;
		bt.ipv4.dport = q->dport;
		len = sizeof(bt.ipv4);
	} else {
		__builtin_memcpy(bt.ipv6.saddr, q->saddr, 16);
		__builtin_memcpy(bt.ipv6.daddr, q->daddr, 16);
		bt.ipv6.sport = q->sport;
		bt.ipv6.dport = q->dport;
		len = sizeof(bt.ipv6);
	}
	return bpf_skb_ct_lookup(skb, &bt, len, opts, PKTMETA_CT_OPTS_SZ);
}

/* What conntrack says about a tuple. */
#define CT_NONE 0 /* no entry */
#define CT_REPLY 1 /* an entry, and the tuple travels in its reply direction */
#define CT_ORIGINAL 2 /* an entry, and the tuple travels in its original direction */

/* Asks conntrack about the tuple the packet carries: CT_*, or -1 when
 * conntrack cannot be asked. With orig, fills *orig with the entry's
 * original tuple (what the origin sent before any NAT) for CT_REPLY.
 * Global (not inlined): the lookup's arguments live in a frame of their
 * own, not in the delivery program's, which has to leave room on the
 * stack for the table's writers (table.h). */
__attribute__((noinline)) int ct_direction(struct __sk_buff *skb, const struct pktmeta_tuple *q,
					   struct pktmeta_tuple *orig)
{
	struct bpf_ct_opts opts;
	struct nf_conn *ct;
	int unavailable, reply;

	if (!q)
		return -1;
	ct = ct_lookup(skb, q, &opts, &unavailable);
	if (unavailable)
		return -1;
	if (!ct)
		return CT_NONE;
	reply = opts.dir == IP_CT_DIR_REPLY;
	if (reply && orig) {
		const struct nf_conntrack_tuple *o = &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;

		__builtin_memset(orig, 0, sizeof(*orig));
		if (tuple_is_v4(q)) {
			v4mapped(orig->saddr, o->src.u3.ip);
			v4mapped(orig->daddr, o->dst.u3.ip);
		} else {
			__builtin_memcpy(orig->saddr, o->src.u3.ip6, 16);
			__builtin_memcpy(orig->daddr, o->dst.u3.ip6, 16);
		}
		orig->sport = o->src.u.all;
		orig->dport = o->dst.u.all;
		orig->proto = q->proto;
	}
	bpf_ct_release(ct);
	return reply ? CT_REPLY : CT_ORIGINAL;
}

/* Looks up the conntrack entry a packet belongs to, whichever way NAT
 * changed it: the tuple as it travels matches an entry after the reverse
 * NAT of a reply, the reverse tuple after DNAT or SNAT of an original.
 * Sets *dir to the direction the packet travels in the entry. */
static __always_inline struct nf_conn *ct_entry(struct __sk_buff *skb, const struct pktmeta_tuple *t,
						int *dir, int *unavailable)
{
	struct bpf_ct_opts opts;
	struct pktmeta_tuple rev;
	struct nf_conn *ct;

	/* One NULL test per lookup result: Linux 6.1's verifier does not know
	 * a non-NULL nf_conn stays non-NULL, so a second test (as "ct ||
	 * *unavailable" made) sends it down a path where the reference
	 * leaks ("Unreleased reference"). */
	ct = ct_lookup(skb, t, &opts, unavailable);
	if (ct) {
		*dir = opts.dir;
		return ct;
	}
	if (*unavailable)
		return NULL;
	tuple_reverse(&rev, t);
	ct = ct_lookup(skb, &rev, &opts, unavailable);
	*dir = !opts.dir;
	return ct;
}

/* Whether conntrack accepted this FIN or RST: 1 yes, 0 no, -1 conntrack
 * cannot tell (no entry, or no conntrack). A FIN counts when conntrack
 * marked a close from this packet's direction (it does that only for a FIN
 * inside the window) or the connection is past both FINs; an RST when the
 * connection is closed. */
static __always_inline int ct_close_accepted(struct __sk_buff *skb, const struct packet *p)
{
	int dir, unavailable, ok, state;
	struct nf_conn *ct;

	ct = ct_entry(skb, &p->t, &dir, &unavailable);
	if (!ct)
		return -1;
	state = ct->proto.tcp.state;
	if (p->tcp_flags & TCP_FLAG_RST)
		ok = state == PKTMETA_CT_TCP_CLOSE;
	else
		ok = state == PKTMETA_CT_TCP_LAST_ACK || state == PKTMETA_CT_TCP_TIME_WAIT ||
		     state == PKTMETA_CT_TCP_CLOSE ||
		     (dir == IP_CT_DIR_ORIGINAL ? ct->proto.tcp.seen[0].flags : ct->proto.tcp.seen[1].flags) &
			     PKTMETA_CT_TCP_FLAG_CLOSE_INIT;
	bpf_ct_release(ct);
	return ok;
}

/* Whether conntrack accepted this SYN-ACK (the connection moved past
 * SYN_SENT): 1 yes, 0 no (a forged one), -1 conntrack cannot tell. */
static __always_inline int ct_synack_accepted(struct __sk_buff *skb, const struct packet *p)
{
	int dir, unavailable, state;
	struct nf_conn *ct;

	ct = ct_entry(skb, &p->t, &dir, &unavailable);
	if (!ct)
		return -1;
	state = ct->proto.tcp.state;
	bpf_ct_release(ct);
	return state >= PKTMETA_CT_TCP_SYN_RECV;
}

/* conntrack's TCP state for a record's key (the tuple as the origin sent
 * it, which is the entry's original tuple): > 0 the state, 0 no entry, -1
 * no conntrack to ask. */
static __always_inline int ct_tcp_state(struct __sk_buff *skb, const struct pktmeta_tuple *q)
{
	struct bpf_ct_opts opts;
	struct nf_conn *ct;
	int unavailable, state;

	ct = ct_lookup(skb, q, &opts, &unavailable);
	if (unavailable)
		return -1;
	if (!ct)
		return 0;
	state = ct->proto.tcp.state;
	bpf_ct_release(ct);
	return state;
}

/* ---- The origin side: packets from a pod. ---- */

/* Writes the record for the first packet of a connection from a pod that
 * check_sender accepted. */
static __always_inline void tag(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c,
				struct pktmeta_endpoint *ep)
{
	struct pktmeta_record rec, old, *e;
	__u64 now, timeout;
	__s64 claim;
	/* int, not long: before Linux 6.4 ("bpf: return long from
	 * bpf_map_ops funcs") the map op a map helper call is rewritten to
	 * returns int, the upper half of the 64-bit result is zero, and
	 * -EEXIST reads as 4294967279. Found on 6.1 by make test-kernels. */
	int err;

	now = bpf_ktime_get_ns();
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.version = PKTMETA_RECORD_VERSION;
	rec.flags = p->t.proto == IPPROTO_UDP ? PKTMETA_F_UDP : 0;
	rec.conn_id = next_conn_id(c);
	rec.conn_gen = (__u32)rec.conn_id;
	rec.first_seen_ns = now;
	rec.last_seen_ns = now;
	rec.origin_workload = ep->workload;
	rec.origin_ifindex = skb->ifindex;
	rec.syn_seq = p->seq;

	if (!events_allowed(ep, now)) {
		rec.flags |= PKTMETA_F_QUIET;
		c->events_limited++;
		__sync_fetch_and_add(&ep->events_limited, 1);
	}

	/* At its budget a pod gets no new record; a retransmit or a tuple it
	 * reuses still finds (or replaces) its own. */
	if (ep->max_conns && READ_ONCE(ep->live) >= (__s64)ep->max_conns) {
		if (!conn_find(&p->t)) {
			c->over_budget++;
			__sync_fetch_and_add(&ep->over_budget, 1);
			return;
		}
		err = -EEXIST;
	} else {
		__u32 *full = table_was_full();

		err = table_error(table_insert(&p->t, &rec));
		if (full && *full != (err == -E2BIG))
			*full = err == -E2BIG;
	}
	if (err == -EEXIST) {
		e = snapshot(&p->t, &old);
		if (!e)
			return; /* changing under us: leave it to the packet's retransmit */
		if (!opened_by(&old, ep->workload)) {
			/* Another workload's record on a tuple with our address: a
			 * stale one of a pod that is gone may be replaced, a live
			 * one is not ours to touch. */
			if (origin_endpoint(&old)) {
				c->not_party++;
				__sync_fetch_and_add(&ep->not_party, 1);
				return;
			}
		} else if (p->t.proto == IPPROTO_TCP) {
			/* Same SYN again: a retransmit, not a new connection. */
			if (old.syn_seq == p->seq && !tcp_closing(old.flags)) {
				c->syn_retransmits++;
				return;
			}
			/* Otherwise the tuple was reused (TIME_WAIT reuse). */
		} else {
			struct pktmeta_config *cfg = config();

			timeout = cfg && cfg->udp_timeout_ns ? cfg->udp_timeout_ns : DEFAULT_UDP_TIMEOUT_NS;
			/* Another CPU just created the flow: one flow, one id. */
			if ((__s64)(now - old.last_seen_ns) < (__s64)timeout)
				return;
		}
		/* One replacer: two CPUs that both found the record stale
		 * would otherwise make two connection ids. */
		claim = set_flags(e, old.conn_id, F_REPLACING);
		if (claim < 0 || ((__u32)claim & F_REPLACING))
			return;
		err = table_error(table_rewrite(&p->t, old.conn_id, &rec));
		if (err)
			clear_flags(e, old.conn_id, F_REPLACING);
		else if (old.flags & PKTMETA_F_UDP)
			udp_invalidate();
		if (!err && !opened_by(&old, ep->workload)) {
			release_budget(&old);
			__sync_fetch_and_add(&ep->live, 1);
		}
	} else if (!err) {
		__sync_fetch_and_add(&ep->live, 1);
	}
	if (err == -E2BIG) {
		c->table_full++;
		__sync_fetch_and_add(&ep->table_full, 1);
		return;
	}
	if (err) {
		count_table_error(c, err);
		return;
	}
	if (p->t.proto == IPPROTO_UDP)
		udp_born();
	c->tagged++;
	emit(c, PKTMETA_EV_OPENED, 0, &rec, &p->t, NULL, skb->ifindex, now);
}

/* Where a FIN or RST belongs: the record's key, a validated copy of the
 * record, and whether the packet travels from the origin. */
struct close_target {
	struct pktmeta_tuple key;
	struct pktmeta_record rec;
	struct pktmeta_record *elem;
	int from_origin;
};

/* Finds the record through one tuple as the origin sent it or as the
 * receiver saw it (alias). */
static __always_inline int find_one(const struct pktmeta_tuple *t, struct close_target *ct)
{
	struct pktmeta_alias *a;
	struct pktmeta_alias alias;

	ct->elem = snapshot(t, &ct->rec);
	if (ct->elem) {
		__builtin_memcpy(&ct->key, t, sizeof(ct->key));
		return 1;
	}
	a = bpf_map_lookup_elem(&pktmeta_aliases, t);
	if (!a)
		return 0;
	__builtin_memcpy(&alias, a, sizeof(alias));
	if (bpf_map_lookup_elem(&pktmeta_aliases, t) != a || READ_ONCE(a->conn_id) != alias.conn_id)
		return 0;
	ct->elem = snapshot(&alias.origin, &ct->rec);
	if (!ct->elem || ct->rec.conn_id != alias.conn_id)
		return 0;
	__builtin_memcpy(&ct->key, &alias.origin, sizeof(ct->key));
	return 1;
}

/* Finds the record a FIN or RST belongs to, in either direction and on
 * either side of a NAT. */
static __always_inline int find_for_close(const struct pktmeta_tuple *seen, struct close_target *ct)
{
	struct pktmeta_tuple rev;

	ct->from_origin = 1;
	if (find_one(seen, ct))
		return 1;
	ct->from_origin = 0;
	tuple_reverse(&rev, seen);
	return find_one(&rev, ct);
}

/* RST ends a connection at once; FIN ends it once both sides sent one. */
static __always_inline void apply_close(struct __sk_buff *skb, const struct packet *p,
					struct pktmeta_counters *c, struct close_target *ct)
{
	__u32 both = PKTMETA_F_FIN_ORIG | PKTMETA_F_FIN_REPLY;
	__u8 reason;

	__u32 fin_bit = 0;
	int res;

	if (p->tcp_flags & TCP_FLAG_RST) {
		reason = PKTMETA_CLOSE_RST;
	} else {
		__s64 old;

		fin_bit = ct->from_origin ? PKTMETA_F_FIN_ORIG : PKTMETA_F_FIN_REPLY;
		old = set_flags(ct->elem, ct->rec.conn_id, fin_bit);
		/* Only the packet that completes the pair closes it: FINs are seen
		 * on both veths of a pod-to-pod connection. */
		if (old < 0 || ((__u32)old & both) == both || (((__u32)old | fin_bit) & both) != both)
			return;
		ct->rec.flags = (__u32)old | fin_bit;
		reason = PKTMETA_CLOSE_FIN;
	}
	res = remove_record(&ct->key, &ct->rec, c);
	if (res < 0 && fin_bit) {
		/* The table was too busy: the FIN's bit goes again, so that
		 * the next sighting of it (the other veth, a retransmit)
		 * completes the pair once more. */
		clear_flags(ct->elem, ct->rec.conn_id, fin_bit);
		return;
	}
	if (res <= 0)
		return;
	c->closed++;
	emit(c, PKTMETA_EV_CLOSED, reason, &ct->rec, &ct->key, NULL, skb->ifindex, bpf_ktime_get_ns());
}

/* A FIN or RST from a pod: it counts only if the pod is a party. With a
 * validated source, matching the tuple already means owning one of its
 * addresses; the workload check holds even if two pods shared one. */
static __always_inline void close_from_pod(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c,
					   struct pktmeta_endpoint *ep)
{
	struct close_target ct;
	int party;

	if (check_sender(skb, p, c, &ep) != SENDER_OK)
		return;
	if (!find_for_close(&p->t, &ct))
		return;
	if (ct.from_origin)
		party = opened_by(&ct.rec, ep->workload);
	else
		/* The receiver's side; a receiver with no delivery hook is
		 * never recorded as the peer. */
		party = ct.rec.peer_workload == ep->workload || !(ct.rec.flags & PKTMETA_F_DELIVERED);
	if (!party) {
		c->not_party++;
		__sync_fetch_and_add(&ep->not_party, 1);
		return;
	}
	/* The origin's own stack resets a connection still in SYN_SENT when
	 * a forged SYN-ACK with a bad ACK reaches it, and carries on
	 * connecting: such an RST must not end the record. A connection that
	 * really never completes is swept after the handshake bound. (Without
	 * a delivery hook the SYN-ACK is never seen, so nothing waits for it.) */
	if ((p->tcp_flags & TCP_FLAG_RST) && ct.from_origin && !(ct.rec.flags & PKTMETA_F_ESTABLISHED) &&
	    !(ep->flags & PKTMETA_EP_NO_EGRESS))
		return;
	apply_close(skb, p, c, &ct);
	/* A simultaneous open whose SYNs crossed before either was delivered
	 * left two records of one connection, one each way: the close ends
	 * the other one too, where this pod is its receiver. */
	if (ct.from_origin) {
		struct pktmeta_tuple rev;

		tuple_reverse(&rev, &p->t);
		if (find_one(&rev, &ct) && !(ct.rec.flags & PKTMETA_F_UDP) &&
		    (ct.rec.peer_workload == ep->workload || !(ct.rec.flags & PKTMETA_F_DELIVERED))) {
			ct.from_origin = 0;
			apply_close(skb, p, c, &ct);
		}
	}
}

/* ---- The per-CPU UDP shortcut (pktmeta_udp_hits). ---- */

/* The slot of a flow: its ports and the low address words (an IPv4
 * address, as the wire carries it), so that flows on fixed port pairs to
 * many peers spread. udp4_known() computes the same from the headers. */
static __always_inline struct udp_hit *udp_hit_at(__u32 ifindex, __u16 sport, __u16 dport, __u32 saddr_lo,
						  __u32 daddr_lo, __u32 side)
{
	__u32 h = ifindex ^ sport ^ dport ^ saddr_lo ^ daddr_lo;
	__u32 i = side + ((h ^ (h >> 16) ^ (h >> 8)) & (UDP_HIT_SLOTS - 1));

	return bpf_map_lookup_elem(&pktmeta_udp_hits, &i);
}

static __always_inline struct udp_hit *udp_hit_slot(const struct packet *p, __u32 ifindex, __u32 side)
{
	/* Volatile reads: otherwise clang may copy the fields from registers
	 * it left unset on paths where the parser found no L4 header, a copy
	 * the verifier refuses (R9 !read_ok). */
	return udp_hit_at(ifindex, READ_ONCE(p->t.sport), READ_ONCE(p->t.dport),
			  READ_ONCE(*(const __u32 *)&p->t.saddr[12]), READ_ONCE(*(const __u32 *)&p->t.daddr[12]), side);
}

/* Whether slot h answers for a flow: it was written for this veth under
 * the current epoch (and births, if its decision rests on them) and has not
 * run out. */
static __always_inline int udp_hit_live(const struct udp_hit *h, __u32 ifindex, __u64 epoch)
{
	__u32 births = h->births;

	return h->ifindex == ifindex && h->epoch == epoch && (births == UDP_BIRTHS_ANY || births == udp_births()) &&
	       (__s64)(READ_ONCE(h->until_jiffies) - bpf_jiffies64()) > 0;
}

/* Whether this CPU remembers the datagram's flow as needing nothing. Sets
 * *st to what the caller's decision, if it takes one, is made under: read
 * before the tables are. */
static __always_inline int udp_shortcut(const struct packet *p, __u32 ifindex, __u32 side, struct udp_stamp *st)
{
	struct udp_hit *h = udp_hit_slot(p, ifindex, side);

	st->epoch = udp_epoch();
	if (h && udp_hit_live(h, ifindex, st->epoch) && tuple_equal(&h->t, &p->t))
		return 1;
	st->births = udp_births();
	return 0;
}

#define UDP4_NOT_SIMPLE -1

/* Whether the packet may be a UDP datagram udp4_known() can judge: the
 * byte where an IPv4 header without options holds the protocol says UDP.
 * Inline, so that a TCP segment pays one compare and no call. */
static __always_inline int udp4_maybe(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + sizeof(struct ethhdr);

	return (void *)(iph + 1) <= data_end && iph->protocol == IPPROTO_UDP;
}

/* The shortcut for the commonest datagram, IPv4 without options, asked
 * straight from the headers before anything is parsed into a tuple: the
 * slot is found and compared with words built from the header fields, the
 * same decision udp_shortcut() takes on the parsed tuple (and the same slot,
 * so either finds what the other remembered). Returns 1 (a hit), 0 (a miss,
 * with *st read before any table is), or UDP4_NOT_SIMPLE for a packet
 * this does not judge: not Ethernet + IPv4 with a 20-byte header + UDP, a
 * non-first fragment, or headers the parser would not take as a UDP
 * datagram (the same checks as parse_linear()). Those take the parser and
 * udp_shortcut(). The words are the tuple's little-endian layout; a
 * big-endian build has no fast path.
 *
 * A subprogram, not inlined: inlined, its outcomes reach the parser as
 * different states and the verifier walks the rest of each program once
 * per outcome (origin 363k -> 448k instructions processed on 6.18);
 * called, both programs verify in fewer instructions than before it
 * existed (230k, 210k). It writes *st on a miss although udp_shortcut()
 * writes it again: without that, the stamp reaches the parser zeroed on
 * some paths and written on others, and origin verifies in 365k. The call
 * costs a hit 2-3 ns. */
static __noinline int udp4_known(struct __sk_buff *skb, __u32 side, struct udp_stamp *st)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = (void *)(eth + 1);
	__u8 *uh = (void *)(iph + 1);
	const __u64 *t;
	struct udp_hit *h;
	__u32 saddr, daddr, ports, ifindex, tot;

	if ((void *)(uh + 8) > data_end || iph->protocol != IPPROTO_UDP || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    *(__u8 *)iph != IPV4_NO_OPTIONS || (iph->frag_off & bpf_htons(IPV4_FRAG_OFFSET)))
		return UDP4_NOT_SIMPLE;
	/* 0 is a packet longer than 64 KiB; otherwise the UDP header must fit
	 * in what the IP header says follows it. */
	tot = bpf_ntohs(iph->tot_len);
	if (tot && tot < sizeof(*iph) + 8)
		return UDP4_NOT_SIMPLE;
	saddr = iph->saddr;
	daddr = iph->daddr;
	ports = *(__u32 *)uh;
	ifindex = skb->ifindex;
	st->epoch = udp_epoch();
	h = udp_hit_at(ifindex, (__u16)ports, (__u16)(ports >> 16), saddr, daddr, side);
	/* The tuple of this datagram, word by word: ::ffff:saddr, ::ffff:daddr,
	 * ports, protocol, zero padding. */
	t = h ? (const __u64 *)&h->t : NULL;
	if (t && udp_hit_live(h, ifindex, st->epoch) && t[0] == 0 &&
	    t[1] == ((__u64)saddr << 32 | V4MAPPED_WORD) && t[2] == 0 &&
	    t[3] == ((__u64)daddr << 32 | V4MAPPED_WORD) && t[4] == ((__u64)IPPROTO_UDP << 32 | ports))
		return 1;
	st->births = udp_births();
	return 0;
#else
	return UDP4_NOT_SIMPLE;
#endif
}

/* Remembers the datagram's flow as needing nothing until until (coarse
 * clock), for as long as the epoch stays, and births too unless they are
 * UDP_BIRTHS_ANY. The slot is looked up again
 * rather than kept from udp_shortcut(): the delivery program has no stack
 * to spare for it.
 *
 * The kernel's tick length (CONFIG_HZ) is not known here, so the deadline
 * is converted as if every jiffy were the longest any kernel has
 * (MAX_JIFFY_NS): on a faster tick the slot runs out early, never late. One
 * jiffy is taken off for the coarse clock, which may lag the tick jiffies
 * just counted by up to one. */
static __always_inline void udp_remember(const struct packet *p, __u32 ifindex, __u32 side, __u64 epoch,
					 __u32 births, __u64 until)
{
	struct udp_hit *h = udp_hit_slot(p, ifindex, side);
	__s64 left;

	if (!h)
		return;
	left = (__s64)(until - bpf_ktime_get_coarse_ns()) - (__s64)MAX_JIFFY_NS;
	if (left < (__s64)MAX_JIFFY_NS)
		return;
	__builtin_memcpy(&h->t, &p->t, sizeof(h->t));
	h->ifindex = ifindex;
	h->births = births;
	h->epoch = epoch;
	h->until_jiffies = bpf_jiffies64() + (__u64)left / MAX_JIFFY_NS;
}

/* Remembers the datagram's flow as needing nothing for a second, on a
 * decision that rests on nothing being under its tuple (births). */
static __always_inline void udp_remember_none(const struct packet *p, __u32 ifindex, __u32 side,
					      const struct udp_stamp *st)
{
	udp_remember(p, ifindex, side, st->epoch, st->births, bpf_ktime_get_coarse_ns() + UDP_REFRESH_NS);
}

/* Whether e is still the element holding the connection whose first word
 * ({flags, conn_gen}) was word under key: a decision read from it may be
 * remembered. A preallocated hash recycles an element the moment a record
 * is replaced (mark_delivered writes a new one), so a pointer from a
 * lookup alone does not prove it. */
static __always_inline int still_holds(const struct pktmeta_tuple *key, const struct pktmeta_record *e, __u64 word)
{
	const struct pktmeta_slot *s = (const void *)e - __builtin_offsetof(struct pktmeta_slot, rec);

	return (READ_ONCE(s->state) & PKTMETA_SLOT_KIND_MASK) == PKTMETA_SLOT_LIVE && pktmeta__tuple_eq(&s->key, key) &&
	       READ_ONCE(*(const __u64 *)e) == word;
}

/* How long a fresh UDP record needs nothing: until it is due a refresh. */
static __always_inline __u64 udp_quiet_ns(__u64 timeout)
{
	return timeout / 2 < UDP_REFRESH_NS ? timeout / 2 : UDP_REFRESH_NS;
}

/* Whether rec, the record of the reverse tuple, is a flow this pod
 * received (so the pod's datagram answers it): delivered to it, or the pod
 * has no delivery hook to mark deliveries with. A record that never
 * reached the pod (a SYN or datagram dropped on the way) proves nothing. */
static __always_inline int received_here(const struct pktmeta_record *rec, const struct pktmeta_endpoint *ep)
{
	return (READ_ONCE(rec->flags) & PKTMETA_F_DELIVERED) ? READ_ONCE(rec->peer_workload) == ep->workload
							      : !!(ep->flags & PKTMETA_EP_NO_EGRESS);
}

static __always_inline void udp_from_pod(struct __sk_buff *skb, struct packet *p,
					 struct pktmeta_counters *c, struct pktmeta_endpoint *ep,
					 const int strict, struct udp_stamp *st)
{
	struct pktmeta_record *rec, *r;
	struct pktmeta_inbound_flow *in;
	struct pktmeta_config *cfg;
	struct pktmeta_tuple rev;
	__u64 now, timeout;
	__s64 idle;
	int ct;

	/* The next datagram of a flow this CPU just found fresh (from_pod()
	 * asked already, unless the source had to be checked first). */
	if (strict && udp_shortcut(p, skb->ifindex, UDP_HIT_ORIGIN, st))
		return;
	/* Past the shortcut: a flow's first datagram, or one whose shortcut
	 * entry went (a per-CPU cache of 16), whose record is then usually
	 * in the very slot warmed. */
	table_warm(&p->t, insert_likely(ep));
	rec = conn_find(&p->t);
	/* A record of another veth's is not this pod's flow (an address that
	 * moved to this pod while the old one's record lives): tag() decides. */
	if (rec && READ_ONCE(rec->origin_ifindex) == skb->ifindex) {
		__u64 word = READ_ONCE(*(__u64 *)rec);
		__u64 last = READ_ONCE(rec->last_seen_ns);

		now = bpf_ktime_get_coarse_ns();
		cfg = config();
		timeout = cfg && cfg->udp_timeout_ns ? cfg->udp_timeout_ns : DEFAULT_UDP_TIMEOUT_NS;
		/* Signed: the coarse clock may lag the precise one last_seen
		 * started from. */
		idle = now - last;
		if (idle < (__s64)timeout) {
			if (idle <= (__s64)udp_quiet_ns(timeout)) {
				/* Nothing to do until the refresh is due: the
				 * same decision this path would take for every
				 * datagram until then. */
				if (still_holds(&p->t, rec, word))
					udp_remember(p, skb->ifindex, UDP_HIT_ORIGIN, st->epoch, UDP_BIRTHS_ANY,
						     last + udp_quiet_ns(timeout));
				return;
			}
			/* At most once a second per flow (more often only for
			 * timeouts under two seconds), and only for the pod's own
			 * datagrams, from the record's own workload: a forger
			 * must not keep a flow alive, nor a new pod on an old
			 * pod's address. The compare-and-swap leaves a recycled
			 * element alone. */
			if (check_sender(skb, p, c, &ep) != SENDER_OK)
				return;
			if (READ_ONCE(rec->origin_workload) == ep->workload) {
				if (READ_ONCE(*(__u64 *)rec) == word)
					__sync_val_compare_and_swap(&rec->last_seen_ns, last, now);
				return;
			}
		}
		/* Idle past the timeout, or another workload's: a new flow. */
	} else if (!rec) {
		/* The pod answers a flow someone else opened: one tagged here
		 * that reached this pod, one that reached it untagged (from off
		 * the node), or one conntrack knows. */
		if (check_sender(skb, p, c, &ep) != SENDER_OK)
			return;
		/* Each "nothing to do" below (an answer to a record this pod
		 * received or to its inbound entry, or what conntrack says)
		 * holds for the flow's next datagrams until a record is made
		 * under their tuple (births), the record answered goes (the
		 * epoch), or a second passes: remembered. */
		tuple_reverse(&rev, &p->t);
		r = conn_find(&rev);
		if (r && received_here(r, ep)) {
			c->udp_replies++;
			udp_remember_none(p, skb->ifindex, UDP_HIT_ORIGIN, st);
			return;
		}
		in = bpf_map_lookup_elem(&pktmeta_inbound, &p->t);
		if (in && READ_ONCE(in->ifindex) == skb->ifindex) {
			c->udp_replies++;
			udp_remember_none(p, skb->ifindex, UDP_HIT_ORIGIN, st);
			return;
		}
		/* Host-veth ingress runs before PREROUTING, so the first
		 * datagram of a new flow has no conntrack entry yet. An entry in
		 * either direction means the flow began before pktmeta saw it:
		 * as an answer, or because a datagram posing as one of its ends
		 * (a forgery, without strictSource) reached conntrack first.
		 * Either way nobody here can vouch for who opened it, so it is
		 * not tagged: a missing answer, never a wrong one. */
		ct = ct_direction(skb, &p->t, NULL);
		if (ct == CT_REPLY) {
			c->udp_replies++;
			udp_remember_none(p, skb->ifindex, UDP_HIT_ORIGIN, st);
			return;
		}
		if (ct == CT_ORIGINAL) {
			c->udp_preexisting++;
			udp_remember_none(p, skb->ifindex, UDP_HIT_ORIGIN, st);
			return;
		}
		tag(skb, p, c, ep);
		return;
	}
	if (check_sender(skb, p, c, &ep) != SENDER_OK)
		return;
	tag(skb, p, c, ep);
}

/* A SYN without ACK from a pod: the first packet of a TCP connection. */
static __always_inline void syn_from_pod(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c,
					 struct pktmeta_endpoint *ep)
{
	struct pktmeta_record *r;
	struct pktmeta_tuple rev;

	if (check_sender(skb, p, c, &ep) != SENDER_OK)
		return;
	table_warm(&p->t, insert_likely(ep));
	/* Simultaneous open: the other side's SYN came first and owns the
	 * connection; one connection, one record. */
	tuple_reverse(&rev, &p->t);
	r = conn_find(&rev);
	if (r && !(READ_ONCE(r->flags) & (PKTMETA_F_UDP | PKTMETA_F_FIN_ORIG | PKTMETA_F_FIN_REPLY)) &&
	    received_here(r, ep)) {
		c->simultaneous_opens++;
		return;
	}
	tag(skb, p, c, ep);
}

/* A pod answers the SYN of a connection a pod on another node opened: the
 * handshake completed (a remote record has no origin veth on this node to
 * see the SYN-ACK at). Only the pod it was delivered to counts. */
static __always_inline void synack_from_pod(struct __sk_buff *skb, struct packet *p)
{
	struct close_target ct;
	struct pktmeta_tuple rev;

	/* The reverse of the answer is the tuple the pod saw: the record's
	 * key, or an alias of it behind this node's DNAT. */
	tuple_reverse(&rev, &p->t);
	if (!find_one(&rev, &ct))
		return;
	if (!(ct.rec.flags & PKTMETA_F_REMOTE) || (ct.rec.flags & PKTMETA_F_ESTABLISHED) ||
	    !(ct.rec.flags & PKTMETA_F_DELIVERED) || ct.rec.peer_ifindex != skb->ifindex)
		return;
	set_flags(ct.elem, ct.rec.conn_id, PKTMETA_F_ESTABLISHED);
}

static __always_inline int from_pod(struct __sk_buff *skb, const int strict)
{
	struct pktmeta_endpoint *ep = NULL;
	struct pktmeta_counters *c;
	enum parse_result res;
	struct udp_stamp st = {};
	struct packet p;
	__u8 flags;

	/* Plain TCP segments leave before anything is written, the counters
	 * included (bpf_stats run counts say how many packets the program
	 * saw), and so do UDP datagrams of a flow this CPU just found fresh
	 * (in strict mode only once their source is checked, below): an IPv4
	 * one before it is even parsed. */
	if (!strict && udp4_maybe(skb) && udp4_known(skb, UDP_HIT_ORIGIN, &st) == 1)
		return TCX_NEXT;
	res = parse_packet(skb, &p, strict);
	if (res == PARSE_TCP_PLAIN)
		return TCX_NEXT;
	/* Asked again when the headers did not settle it (a miss there
	 * costs a second slot compare): carrying what udp4_known() found
	 * past the parser would make the verifier walk it once per answer. */
	if (!strict && res == PARSE_L4 && p.t.proto == IPPROTO_UDP && udp_shortcut(&p, skb->ifindex, UDP_HIT_ORIGIN, &st))
		return TCX_NEXT;
	c = counters();
	if (!c)
		return TCX_NEXT;
	c->origin_packets++;

	if (strict && res != PARSE_NONE) {
		__u32 ifindex = skb->ifindex;

		ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
		/* Fail closed: strict mode without an endpoint cannot vouch for
		 * anything. IPv6 link-local and :: pass (ND, DAD), but never
		 * create records (check_sender). */
		if (!ep || res == PARSE_BAD_ADDR || (!link_local_or_unspecified(&p) && !own_address(ep, &p))) {
			c->strict_drops++;
			if (ep)
				__sync_fetch_and_add(&ep->spoofed, 1);
			return TCX_DROP;
		}
	}
	if (res == PARSE_BAD_ADDR) {
		c->spoofed++;
		return TCX_NEXT;
	}
	if (res != PARSE_L4) {
		c->not_parsed++;
		return TCX_NEXT;
	}

	if (p.t.proto == IPPROTO_TCP) {
		flags = p.tcp_flags;
		if (flags & TCP_FLAG_SYN) {
			/* SYN|FIN and SYN|RST are not openings (Linux drops them);
			 * SYN|ACK is the answer to someone else's. */
			if (!(flags & (TCP_FLAG_ACK | TCP_FLAG_FIN | TCP_FLAG_RST)))
				syn_from_pod(skb, &p, c, ep);
			else if ((flags & TCP_FLAG_ACK) && !(flags & (TCP_FLAG_FIN | TCP_FLAG_RST)))
				synack_from_pod(skb, &p);
		} else if (flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) {
			close_from_pod(skb, &p, c, ep);
		}
		return TCX_NEXT;
	}
	udp_from_pod(skb, &p, c, ep, strict, &st);
	return TCX_NEXT;
}

/* ---- The delivery side: packets to a pod. ---- */

/* The pod behind this veth, if the packet is addressed to it: a bridge
 * floods unknown unicast to every port, and only the owner of the
 * destination address is the connection's peer. */
static __always_inline struct pktmeta_endpoint *receiver(struct __sk_buff *skb, const struct packet *p,
							 struct pktmeta_counters *c)
{
	__u32 ifindex = skb->ifindex;
	struct pktmeta_endpoint *ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);

	if (!ep) {
		c->unregistered++;
		return NULL;
	}
	if (!own_destination(ep, p)) {
		c->not_for_pod++;
		return NULL;
	}
	return ep;
}

/* Marks the record under key delivered to the pod behind this veth, once.
 * The record is rewritten whole under its home chunk's lock, never by
 * plain stores: the slot may be reused at any time. One CPU wins the
 * claim. */
static __always_inline void mark_delivered(struct __sk_buff *skb, const struct pktmeta_endpoint *ep,
					   const struct pktmeta_tuple *key, const struct pktmeta_tuple *seen,
					   __u32 nat, struct pktmeta_counters *c)
{
	struct pktmeta_record *rec, *e;
	__u32 ifindex = skb->ifindex;
	__s64 old;
	__u64 now;
	int err;

	/* The copy is built in per-CPU scratch: this program's stack is
	 * close to the limit, and the table's writer needs a frame of its
	 * own on top of it. */
	rec = scratch_record(SCRATCH_DELIVER);
	if (!rec)
		return;
	e = snapshot(key, rec);
	if (!e || (rec->flags & (PKTMETA_F_DELIVERED | F_INTERNAL)))
		return;
	old = set_flags(e, rec->conn_id, F_DELIVERING);
	if (old < 0 || ((__u32)old & (PKTMETA_F_DELIVERED | F_INTERNAL)))
		return;
	now = bpf_ktime_get_ns();
	rec->flags = ((__u32)old | PKTMETA_F_DELIVERED | nat) & ~F_INTERNAL;
	rec->peer_workload = ep->workload;
	rec->peer_ifindex = ifindex;
	rec->delivered_ns = now;
	__builtin_memcpy(&rec->peer_tuple, seen, sizeof(rec->peer_tuple));
	err = table_error(table_rewrite(key, rec->conn_id, rec));
	if (err) {
		/* Closed in between, or the chunk stayed locked: give the
		 * claim back. */
		clear_flags(e, rec->conn_id, F_DELIVERING);
		count_table_error(c, err);
		return;
	}
	c->deliveries++;
	if (nat)
		c->nat_resolved++;
	emit(c, PKTMETA_EV_DELIVERED, 0, rec, key, seen, ifindex, now);
}

/* Removes the alias under the tuple a packet carries once conntrack no
 * longer resolves it to the alias's connection (SNAT can give a seen
 * tuple to a new flow while the old record lives). */
static __always_inline void drop_alias(const struct pktmeta_tuple *t)
{
	if (bpf_map_lookup_elem(&pktmeta_aliases, t) && !bpf_map_delete_elem(&pktmeta_aliases, t))
		udp_invalidate();
}

static __always_inline __u32 now_seconds(void)
{
	return bpf_ktime_get_coarse_ns() / NSEC_PER_SEC;
}

/* What deliver_nat() found. */
#define NAT_NONE 0 /* conntrack tracks the flow, and no record is behind the packet */
#define NAT_DELIVERED 1 /* the packet belongs to a record, delivered now or before */
#define NAT_FAILED 2 /* it does, but the alias could not be written */
#define NAT_UNTRACKED 3 /* conntrack cannot be asked, or has no entry */

/* First packet at the destination with no record under the tuple it
 * carries: ask conntrack what the origin sent, and alias the two. Returns
 * NAT_*. */
static __always_inline int deliver_nat(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c,
				       const struct pktmeta_endpoint *ep)
{
	/* Scopes kept tight, and the original tuple kept only in the alias:
	 * the delivery program is close to the 512-byte stack. */
	struct pktmeta_alias alias;
	int err; /* 32 bits: see tag() */
	int dir;

	__builtin_memset(&alias, 0, sizeof(alias));
	{
		struct pktmeta_tuple rev;

		/* The packet is already translated; conntrack knows it as the
		 * reverse of the entry's reply tuple. */
		tuple_reverse(&rev, &p->t);
		dir = ct_direction(skb, &rev, &alias.origin);
	}
	/* An opaque copy from here on: otherwise clang threads the later
	 * tests of dir back to the tests of the conntrack entry inside
	 * ct_direction(), past its release, and Linux 6.1's verifier sees a
	 * path that leaks the reference ("Unreleased reference"). */
	asm volatile("" : "+r"(dir));
	if (dir < 0) {
		c->ct_unavailable++;
		return NAT_UNTRACKED;
	}
	if (dir != CT_REPLY || tuple_equal(&alias.origin, &p->t))
		goto miss;
	{
		struct pktmeta_record rec;

		if (!snapshot(&alias.origin, &rec))
			goto miss;
		if (rec.flags & PKTMETA_F_DELIVERED)
			return NAT_DELIVERED;
		alias.conn_id = rec.conn_id;
	}
	alias.version = PKTMETA_RECORD_VERSION;
	alias.checked_s = now_seconds();
	err = bpf_map_update_elem(&pktmeta_aliases, &p->t, &alias, BPF_ANY);
	if (err) {
		if (err == -E2BIG)
			c->aliases_full++;
		else
			c->update_errors++;
		return NAT_FAILED;
	}
	if (p->t.proto == IPPROTO_UDP)
		udp_born();
	mark_delivered(skb, ep, &alias.origin, &p->t, PKTMETA_F_NAT, c);
	return NAT_DELIVERED;
miss:
	c->misses++;
	drop_alias(&p->t);
	return dir == CT_NONE ? NAT_UNTRACKED : NAT_NONE;
}

/* Whether an alias still resolves, through conntrack, to its connection:
 * asked at most once a second per alias. */
static __always_inline int alias_current(struct __sk_buff *skb, const struct packet *p, struct pktmeta_alias *a,
					 const struct pktmeta_tuple *origin)
{
	struct pktmeta_tuple rev, orig;
	__u32 now = now_seconds(), checked = READ_ONCE(a->checked_s);
	int dir;

	if (now - checked < 1)
		return 1;
	tuple_reverse(&rev, &p->t);
	/* Initialised: before Linux 6.x a global function's pointer
	 * arguments must point at initialised memory. */
	__builtin_memset(&orig, 0, sizeof(orig));
	dir = ct_direction(skb, &rev, &orig);
	if (dir < 0)
		return 1; /* cannot ask: keep it */
	if (dir != CT_REPLY || !tuple_equal(&orig, origin))
		return 0;
	__sync_val_compare_and_swap(&a->checked_s, checked, now);
	return 1;
}

static __always_inline void udp_to_pod(struct __sk_buff *skb, struct packet *p,
				       struct pktmeta_counters *c, const struct udp_stamp *st)
{
	struct pktmeta_endpoint *ep;
	struct pktmeta_record *rec;
	struct pktmeta_alias *alias;
	struct pktmeta_inbound_flow in = {};
	struct pktmeta_tuple rev, origin;
	struct pktmeta_config *cfg;
	int nat;

	rec = conn_find(&p->t);
	if (rec) {
		__u64 word = READ_ONCE(*(__u64 *)rec);

		if (!((__u32)word & PKTMETA_F_DELIVERED)) {
			if ((ep = receiver(skb, p, c)))
				mark_delivered(skb, ep, &p->t, &p->t, 0, c);
			return;
		}
		/* Delivered stays delivered while the record lives, and a new
		 * flow can take this tuple only once the old one was idle for
		 * the UDP timeout, at least twice this long. */
		if (!still_holds(&p->t, rec, word))
			return;
		cfg = config();
		udp_remember(p, skb->ifindex, UDP_HIT_DELIVERY, st->epoch, UDP_BIRTHS_ANY,
			     bpf_ktime_get_coarse_ns() +
				     udp_quiet_ns(cfg && cfg->udp_timeout_ns ? cfg->udp_timeout_ns : DEFAULT_UDP_TIMEOUT_NS));
		return;
	}
	alias = bpf_map_lookup_elem(&pktmeta_aliases, &p->t);
	if (alias) {
		__u64 id = READ_ONCE(alias->conn_id);

		__builtin_memcpy(&origin, &alias->origin, sizeof(origin));
		rec = conn_find(&origin);
		/* Still the connection the alias was made for: nothing to do
		 * until conntrack is due to be asked again (alias_current). */
		if (rec && READ_ONCE(rec->conn_id) == id && alias_current(skb, p, alias, &origin)) {
			udp_remember(p, skb->ifindex, UDP_HIT_DELIVERY, st->epoch, UDP_BIRTHS_ANY,
				     (__u64)(READ_ONCE(alias->checked_s) + 1) * NSEC_PER_SEC);
			return;
		}
		drop_alias(&p->t);
	}
	/* From here on, what the flow's next datagrams need holds until a
	 * record or alias is made under their tuple (births), the record
	 * answered goes (the epoch), or a second passes: remembered. */
	/* A reply to a flow the receiving pod opened itself. */
	tuple_reverse(&rev, &p->t);
	if (conn_find(&rev)) {
		udp_remember_none(p, skb->ifindex, UDP_HIT_DELIVERY, st);
		return;
	}
	ep = receiver(skb, p, c);
	if (!ep)
		return;
	nat = deliver_nat(skb, p, c, ep);
	if (nat == NAT_DELIVERED)
		return;
	/* Nobody on this node opened it: remember that the pod received it
	 * first, so its answer is not taken for a flow it opened where
	 * conntrack does not tell. */
	if (!bpf_map_lookup_elem(&pktmeta_inbound, &rev)) {
		in.ifindex = skb->ifindex;
		bpf_map_update_elem(&pktmeta_inbound, &rev, &in, BPF_ANY);
	}
	/* Remembered only where conntrack tracks the flow: where it does not,
	 * the inbound entry just written is all that tells the pod's answers
	 * from flows it opens, and every datagram must keep it (an LRU) from
	 * going. An alias that could not be written is tried again with the
	 * next datagram. */
	if (nat == NAT_NONE)
		udp_remember_none(p, skb->ifindex, UDP_HIT_DELIVERY, st);
}

/* The peer answered the SYN: the handshake completed (the sweep's bound on
 * half-open connections no longer applies, and the origin's own RSTs count
 * again). Replies arrive un-NATed, so the reverse of what the pod receives
 * is its own tuple. A SYN-ACK conntrack did not accept (a forged one) does
 * not count. */
static __always_inline void synack_to_pod(struct __sk_buff *skb, struct packet *p)
{
	struct pktmeta_record rec, *e;
	struct pktmeta_tuple rev;

	tuple_reverse(&rev, &p->t);
	e = snapshot(&rev, &rec);
	if (!e || (rec.flags & (PKTMETA_F_ESTABLISHED | PKTMETA_F_UDP)) || rec.origin_ifindex != skb->ifindex)
		return;
	if (ct_synack_accepted(skb, p) == 0)
		return;
	set_flags(e, rec.conn_id, PKTMETA_F_ESTABLISHED);
}

/* A FIN or RST on its way to a pod. One that a local pod sent was handled
 * at that pod's own hook, where its source was checked. Anything else could
 * be forged: it counts only once conntrack accepted it (conntrack checks the
 * sequence window), and otherwise the connection is left to the sweep. */
static __always_inline void close_to_pod(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c)
{
	struct close_target ct;
	__u32 in = skb->ingress_ifindex;

	if (in && bpf_map_lookup_elem(&pktmeta_eps, &in))
		return;
	if (!find_for_close(&p->t, &ct))
		return;
	if (ct_close_accepted(skb, p) != 1) {
		c->unverified_closes++;
		return;
	}
	apply_close(skb, p, c, &ct);
}

SEC("tc")
int pktmeta_origin(struct __sk_buff *skb)
{
	return from_pod(skb, 0);
}

SEC("tc")
int pktmeta_strict(struct __sk_buff *skb)
{
	return from_pod(skb, 1);
}

SEC("tc")
int pktmeta_deliver(struct __sk_buff *skb)
{
	struct pktmeta_counters *c;
	enum parse_result res;
	struct udp_stamp st = {};
	struct packet p;
	__u8 flags;

	/* Like the origin: plain TCP segments, and datagrams of a flow this
	 * CPU just found delivered, leave before anything is written. */
	if (udp4_maybe(skb) && udp4_known(skb, UDP_HIT_DELIVERY, &st) == 1)
		return TCX_NEXT;
	res = parse_packet(skb, &p, 0);
	if (res == PARSE_TCP_PLAIN)
		return TCX_NEXT;
	/* Asked again when the headers did not settle it (see from_pod()). */
	if (res == PARSE_L4 && p.t.proto == IPPROTO_UDP && udp_shortcut(&p, skb->ifindex, UDP_HIT_DELIVERY, &st))
		return TCX_NEXT;
	c = counters();
	if (!c)
		return TCX_NEXT;
	c->deliver_packets++;
	if (res != PARSE_L4) {
		c->not_parsed++;
		return TCX_NEXT;
	}

	if (p.t.proto == IPPROTO_TCP) {
		flags = p.tcp_flags;
		if (flags & TCP_FLAG_SYN) {
			if (flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
				return TCX_NEXT;
			if (flags & TCP_FLAG_ACK) {
				synack_to_pod(skb, &p);
			} else {
				struct pktmeta_record *rec = conn_find(&p.t);
				struct pktmeta_endpoint *ep;

				/* A retransmitted SYN of a delivered connection stops at
				 * this read (a hint only: mark_delivered re-reads). */
				if (rec && (READ_ONCE(rec->flags) & PKTMETA_F_DELIVERED))
					return TCX_NEXT;
				ep = receiver(skb, &p, c);
				if (!ep)
					return TCX_NEXT;
				if (rec)
					mark_delivered(skb, ep, &p.t, &p.t, 0, c);
				else
					deliver_nat(skb, &p, c, ep);
			}
		} else if (flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) {
			close_to_pod(skb, &p, c);
		}
		return TCX_NEXT;
	}
	udp_to_pod(skb, &p, c, &st);
	return TCX_NEXT;
}

#include "uplink.h"
#include "sockopt.h"

/* ---- The sweep. ---- */

struct sweep_state {
	struct __sk_buff *skb;
	struct pktmeta_sweep_args args;
	__u64 now;
};

static __always_inline int no_delivery_hook(const struct pktmeta_record *r)
{
	struct pktmeta_endpoint *ep = origin_endpoint(r);

	return ep && (ep->flags & PKTMETA_EP_NO_EGRESS);
}

/* How often the sweep copies a slot that keeps changing under it. */
#define SWEEP_COPY_TRIES 64

static long sweep_record(void *map, __u32 *idx, struct pktmeta_slot *slot, struct sweep_state *st)
{
	struct pktmeta_record *val = &slot->rec, r;
	__u32 id = st->args.workload;
	struct pktmeta_tuple key;
	__u64 *removed = NULL, state_word;
	__s64 age;
	int state;

	/* A slot is visited when it holds a whole LIVE entry (the same state
	 * before and after the copy); one that a CPU is writing is copied
	 * again, for about as long as a write takes, so that a pod's DEL
	 * does not pass its record by for being delivered at that moment. */
	for (int i = 0;; i++) {
		if (i == SWEEP_COPY_TRIES)
			return 0;
		state_word = pktmeta_slot_state(slot);
		if ((state_word & PKTMETA_SLOT_KIND_MASK) == PKTMETA_SLOT_EMPTY)
			return 0;
		if ((state_word & PKTMETA_SLOT_KIND_MASK) != PKTMETA_SLOT_LIVE)
			continue;
		__builtin_memcpy(&key, &slot->key, sizeof(key));
		__builtin_memcpy(&r, val, sizeof(r));
		if (pktmeta_slot_state(slot) == state_word)
			break;
	}
	st->args.visited++;
	age = st->now - r.first_seen_ns;
	if (id && (opened_by(&r, id) || r.peer_workload == id)) {
		removed = &st->args.removed_workload;
	} else if (r.flags & PKTMETA_F_UDP) {
		if (st->args.udp_idle_ns && (__s64)(st->now - r.last_seen_ns) > (__s64)st->args.udp_idle_ns)
			removed = &st->args.removed_udp_idle;
	} else {
		if ((st->args.flags & PKTMETA_SWEEP_CONNTRACK) && age >= (__s64)st->args.ct_min_age_ns &&
		    !st->args.ct_unavailable) {
			state = ct_tcp_state(st->skb, &key);
			if (state < 0) {
				st->args.ct_unavailable = 1;
			} else {
				st->args.ct_checked++;
				if (state > 0 && !(r.flags & PKTMETA_F_CT_SEEN))
					set_flags(val, r.conn_id, PKTMETA_F_CT_SEEN);
				/* A remote record sees no SYN-ACK where the connection
				 * does not end in a pod of this node (a NodePort
				 * forwarded on, a host service): conntrack's word that
				 * the handshake completed stands in for it. */
				if ((r.flags & PKTMETA_F_REMOTE) && !(r.flags & PKTMETA_F_ESTABLISHED) &&
				    state >= PKTMETA_CT_TCP_ESTABLISHED && state <= PKTMETA_CT_TCP_TIME_WAIT) {
					set_flags(val, r.conn_id, PKTMETA_F_ESTABLISHED);
					r.flags |= PKTMETA_F_ESTABLISHED;
				}
				/* Over: closed or timing out in conntrack, or gone from
				 * it after a sweep saw it there. Without that sighting,
				 * a missing entry proves nothing (conntrack may not
				 * track this traffic at all). */
				if (state == PKTMETA_CT_TCP_CLOSE || state == PKTMETA_CT_TCP_TIME_WAIT ||
				    (state == 0 && (r.flags & PKTMETA_F_CT_SEEN)))
					removed = &st->args.removed_tcp_over;
			}
		}
		if (!removed && st->args.tcp_pending_ns && !(r.flags & PKTMETA_F_ESTABLISHED) &&
		    age > (__s64)st->args.tcp_pending_ns && !no_delivery_hook(&r))
			removed = &st->args.removed_tcp_pending;
	}
	if (!removed)
		return 0;
	/* Only the connection copied: the tuple may have been reused since. */
	if (remove_record(&key, &r, NULL) > 0)
		(*removed)++;
	return 0;
}

static long sweep_alias(void *map, struct pktmeta_tuple *key, struct pktmeta_alias *val,
			struct sweep_state *st)
{
	struct pktmeta_record *r;
	__u64 id = READ_ONCE(val->conn_id);

	r = conn_find(&val->origin);
	if (r && READ_ONCE(r->conn_id) == id)
		return 0;
	if (READ_ONCE(val->conn_id) != id)
		return 0;
	if (bpf_map_delete_elem(&pktmeta_aliases, key) == 0)
		st->args.removed_aliases++;
	return 0;
}

/* Removes the records of a deleted pod, idle UDP records, and TCP records
 * whose connection is over, in one pass over the table in the kernel: CNI
 * DEL, CNI GC and the agent run it with BPF_PROG_TEST_RUN instead of copying
 * a table of up to millions of records out to userspace. It is a TC program
 * (not a syscall one) because conntrack can only be asked with an skb. */
SEC("tc")
int pktmeta_sweep(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct pktmeta_sweep_args *args = data + sizeof(struct ethhdr);
	struct sweep_state st;

	if ((void *)(args + 1) > data_end || args->magic != PKTMETA_SWEEP_MAGIC)
		return TCX_NEXT;
	__builtin_memcpy(&st.args, args, sizeof(st.args));
	st.skb = skb;
	st.now = bpf_ktime_get_ns();
	st.args.visited = 0;
	st.args.removed_workload = 0;
	st.args.removed_udp_idle = 0;
	st.args.removed_tcp_pending = 0;
	st.args.removed_tcp_over = 0;
	st.args.removed_aliases = 0;
	st.args.ct_checked = 0;
	st.args.ct_unavailable = 0;
	if (st.args.flags & PKTMETA_SWEEP_FORGET_UDP) {
		/* Userspace changed an endpoint: an atomic increment, which a
		 * read-modify-write through the map could not be. */
		udp_invalidate();
	} else {
		bpf_for_each_map_elem(&pktmeta_slots, sweep_record, &st, 0);
		if (st.args.flags & PKTMETA_SWEEP_ALIASES)
			bpf_for_each_map_elem(&pktmeta_aliases, sweep_alias, &st, 0);
	}

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	args = data + sizeof(struct ethhdr);
	if ((void *)(args + 1) > data_end)
		return TCX_NEXT;
	__builtin_memcpy(args, &st.args, sizeof(st.args));
	return 0;
}

/* Changes the connection table for userspace (struct pktmeta_table_op):
 * tests and the bench put records in, and take them out behind the other
 * programs' back. */
SEC("tc")
int pktmeta_table_write(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct pktmeta_table_op *args = data + sizeof(struct ethhdr);
	struct pktmeta_table_op op;

	if ((void *)(args + 1) > data_end || args->magic != PKTMETA_TABLE_OP_MAGIC)
		return TCX_NEXT;
	__builtin_memcpy(&op, args, sizeof(op));
	switch (op.op) {
	case PKTMETA_TABLE_OP_INSERT:
		op.result = table_insert(&op.key, &op.rec);
		break;
	case PKTMETA_TABLE_OP_REMOVE:
		op.result = table_remove(&op.key, op.rec.conn_id);
		break;
	default:
		op.result = -1;
	}
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	args = data + sizeof(struct ethhdr);
	if ((void *)(args + 1) > data_end)
		return TCX_NEXT;
	args->result = op.result;
	return 0;
}
