// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * pktmeta datapath. Three TC programs on a pod's host-side veth:
 *
 *   pktmeta_origin  tcx ingress (packets from the pod): tags the first packet
 *                   of every connection the pod opens with a record in
 *                   pktmeta_conns, keyed by the tuple as the pod sent it.
 *   pktmeta_strict  the same, and drops packets whose source address is not
 *                   one of the pod's.
 *   pktmeta_deliver tcx egress (packets to the pod): finds the record of the
 *                   first packet reaching the pod, through conntrack when
 *                   Service DNAT changed the tuple, stores an alias under
 *                   the tuple the pod sees, and marks the record delivered.
 *
 * pktmeta_gc, a syscall program userspace runs with BPF_PROG_RUN, sweeps
 * the table for CNI DEL and GC.
 *
 * Both directions remove records on RST and on the second FIN. Every program
 * returns TCX_NEXT (== TC_ACT_UNSPEC) so programs after ours still run.
 * A TCP segment without SYN, FIN or RST pays a header parse and nothing
 * else; UDP also pays the lookup that tells "first" apart.
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

#define NSEC_PER_SEC 1000000000ULL
/* How stale a UDP record's last_seen may get before it is refreshed. */
#define UDP_REFRESH_NS NSEC_PER_SEC
#define DEFAULT_UDP_TIMEOUT_NS (120 * NSEC_PER_SEC)
/* Wake event readers once this much is waiting (a quarter of the buffer). */
#define EVENTS_WAKEUP_BYTES (64 * 1024)

char __license[] SEC("license") = "Dual BSD/GPL";

/* pktmeta_conns and pktmeta_aliases come from the public header: the
 * datapath declares them exactly as consumers do. The loader sizes them
 * from maxConnections. */
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

/* Keeps the event layout in BTF for bpf2go. */
const struct pktmeta_event *unused_event __attribute__((unused));

static __always_inline struct pktmeta_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_stats, &zero);
}

static __always_inline struct pktmeta_config *config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&pktmeta_cfg, &zero);
}

/* Unique on the node without atomics: a per-CPU sequence with the CPU in
 * the low 12 bits. Never 0. */
static __always_inline __u64 next_conn_id(struct pktmeta_counters *c)
{
	__u64 seq = ++c->conn_seq;

	return (seq << 12) | (bpf_get_smp_processor_id() & 0xfff);
}

static __always_inline void emit(struct pktmeta_counters *c, __u8 type, __u8 reason,
				 const struct pktmeta_record *rec, const struct pktmeta_tuple *origin,
				 const struct pktmeta_tuple *seen, __u32 ifindex, __u64 now)
{
	struct pktmeta_config *cfg = config();
	struct pktmeta_event *e;
	__u64 pending;

	if (cfg && (cfg->flags & PKTMETA_CFG_NO_EVENTS))
		return;
	pending = bpf_ringbuf_query(&pktmeta_events, BPF_RB_AVAIL_DATA);
	e = bpf_ringbuf_reserve(&pktmeta_events, sizeof(*e), 0);
	if (!e) {
		c->events_dropped++;
		return;
	}
	e->version = PKTMETA_RECORD_VERSION;
	e->type = type;
	e->reason = reason;
	e->_pad = 0;
	e->flags = rec->flags;
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
	/* Waking the reader (an irq_work, an IPI) costs more than the rest of
	 * a first packet together. Readers poll; the event that makes the
	 * backlog cross a quarter of the buffer wakes them, once. */
	bpf_ringbuf_submit(e, pending < EVENTS_WAKEUP_BYTES && pending + sizeof(*e) + 8 >= EVENTS_WAKEUP_BYTES ?
				      BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* Writes the record for the first packet of a connection. */
static __always_inline void tag(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c,
				struct pktmeta_endpoint *ep)
{
	struct pktmeta_record rec, *old;
	__u64 now;
	long err;

	if (!ep) {
		__u32 ifindex = skb->ifindex;

		ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
		if (!ep) {
			c->unregistered++;
			return;
		}
	}

	now = bpf_ktime_get_ns();
	__builtin_memset(&rec, 0, sizeof(rec));
	rec.version = PKTMETA_RECORD_VERSION;
	rec.flags = p->t.proto == IPPROTO_UDP ? PKTMETA_F_UDP : 0;
	rec.conn_id = next_conn_id(c);
	rec.first_seen_ns = now;
	rec.last_seen_ns = now;
	rec.origin_workload = ep->workload;
	rec.origin_ifindex = skb->ifindex;
	rec.syn_seq = p->seq;

	err = bpf_map_update_elem(&pktmeta_conns, &p->t, &rec, BPF_NOEXIST);
	if (err == -17 /* EEXIST */) {
		old = bpf_map_lookup_elem(&pktmeta_conns, &p->t);
		/* Same SYN again: a retransmit, not a new connection. */
		if (old && p->t.proto == IPPROTO_TCP && old->syn_seq == p->seq &&
		    !(old->flags & (PKTMETA_F_FIN_ORIG | PKTMETA_F_FIN_REPLY))) {
			c->syn_retransmits++;
			return;
		}
		/* The tuple was reused (TIME_WAIT reuse, expired UDP flow). */
		err = bpf_map_update_elem(&pktmeta_conns, &p->t, &rec, BPF_ANY);
	}
	if (err) {
		c->update_errors++;
		return;
	}
	c->tagged++;
	emit(c, PKTMETA_EV_OPENED, 0, &rec, &p->t, NULL, skb->ifindex, now);
}

/* Finds the record a FIN or RST belongs to, in either direction and on
 * either side of a NAT. Returns the record and fills key with its key. */
static __always_inline struct pktmeta_record *find_for_close(const struct pktmeta_tuple *seen,
							     struct pktmeta_tuple *key, int *from_origin)
{
	struct pktmeta_record *rec;
	struct pktmeta_alias *alias;
	struct pktmeta_tuple rev;

	*from_origin = 1;
	rec = bpf_map_lookup_elem(&pktmeta_conns, seen);
	if (rec) {
		__builtin_memcpy(key, seen, sizeof(*key));
		return rec;
	}
	alias = bpf_map_lookup_elem(&pktmeta_aliases, seen);
	if (alias) {
		__builtin_memcpy(key, &alias->origin, sizeof(*key));
		return bpf_map_lookup_elem(&pktmeta_conns, key);
	}
	*from_origin = 0;
	tuple_reverse(&rev, seen);
	rec = bpf_map_lookup_elem(&pktmeta_conns, &rev);
	if (rec) {
		__builtin_memcpy(key, &rev, sizeof(*key));
		return rec;
	}
	alias = bpf_map_lookup_elem(&pktmeta_aliases, &rev);
	if (alias) {
		__builtin_memcpy(key, &alias->origin, sizeof(*key));
		return bpf_map_lookup_elem(&pktmeta_conns, key);
	}
	return NULL;
}

/* RST ends a connection at once; FIN ends it once both sides sent one. */
static __always_inline void close_tcp(struct __sk_buff *skb, struct packet *p, struct pktmeta_counters *c)
{
	struct pktmeta_tuple key;
	struct pktmeta_record *rec;
	__u32 fin_bit, both = PKTMETA_F_FIN_ORIG | PKTMETA_F_FIN_REPLY;
	__u8 reason;
	int from_origin;

	rec = find_for_close(&p->t, &key, &from_origin);
	if (!rec)
		return;
	if (p->tcp_flags & TCP_FLAG_RST) {
		reason = PKTMETA_CLOSE_RST;
	} else {
		__u32 old;

		fin_bit = from_origin ? PKTMETA_F_FIN_ORIG : PKTMETA_F_FIN_REPLY;
		old = __sync_fetch_and_or(&rec->flags, fin_bit);
		/* Only the packet that completes the pair closes it: FINs are seen
		 * on both veths of a pod-to-pod connection. */
		if ((old & both) == both || ((old | fin_bit) & both) != both)
			return;
		reason = PKTMETA_CLOSE_FIN;
	}
	emit(c, PKTMETA_EV_CLOSED, reason, rec, &key, NULL, skb->ifindex, bpf_ktime_get_ns());
	if (rec->flags & PKTMETA_F_NAT)
		bpf_map_delete_elem(&pktmeta_aliases, &rec->peer_tuple);
	if (bpf_map_delete_elem(&pktmeta_conns, &key) == 0)
		c->closed++;
}

/* Asks conntrack about the tuple the packet carries. Returns 1 when conntrack
 * has an entry and the packet travels in its reply direction, 0 when it
 * travels in the original direction or there is no entry, -1 when conntrack
 * cannot be asked. With want_orig, fills *orig with the entry's original
 * tuple: what the origin sent before any NAT. */
static __always_inline int ct_direction(struct __sk_buff *skb, const struct packet *p,
					const struct pktmeta_tuple *q, struct pktmeta_tuple *orig)
{
	struct bpf_sock_tuple bt;
	struct bpf_ct_opts opts;
	struct nf_conn *ct;
	__u32 len;
	int reply;

	if (!pktmeta_ksym_exists(bpf_skb_ct_lookup) || !pktmeta_ksym_exists(bpf_ct_release))
		return -1;

	__builtin_memset(&bt, 0, sizeof(bt));
	__builtin_memset(&opts, 0, sizeof(opts));
	opts.netns_id = BPF_F_CURRENT_NETNS;
	opts.l4proto = q->proto;
	if (p->family == 4) {
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
	ct = bpf_skb_ct_lookup(skb, &bt, len, &opts, PKTMETA_CT_OPTS_SZ);
	if (!ct)
		return 0;
	reply = opts.dir == IP_CT_DIR_REPLY;
	if (reply && orig) {
		const struct nf_conntrack_tuple *o = &ct->tuplehash[IP_CT_DIR_ORIGINAL].tuple;

		__builtin_memset(orig, 0, sizeof(*orig));
		if (p->family == 4) {
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
	return reply;
}

static __always_inline void udp_from_pod(struct __sk_buff *skb, struct packet *p,
					 struct pktmeta_counters *c, struct pktmeta_endpoint *ep)
{
	struct pktmeta_record *rec;
	struct pktmeta_config *cfg;
	__u64 now, timeout;
	__s64 idle;

	rec = bpf_map_lookup_elem(&pktmeta_conns, &p->t);
	if (rec) {
		now = bpf_ktime_get_coarse_ns();
		cfg = config();
		timeout = cfg && cfg->udp_timeout_ns ? cfg->udp_timeout_ns : DEFAULT_UDP_TIMEOUT_NS;
		/* Signed: the coarse clock may lag the precise one last_seen
		 * started from. */
		idle = now - rec->last_seen_ns;
		if (idle < (__s64)timeout) {
			/* A plain store, at most once a second per flow (more often
			 * only for timeouts under two seconds). */
			if (idle > (__s64)UDP_REFRESH_NS || idle > (__s64)(timeout / 2))
				rec->last_seen_ns = now;
			return;
		}
		/* Idle past the timeout: a new flow on an old tuple. */
	} else {
		struct pktmeta_tuple rev;

		/* The pod answers a flow someone else opened: a flow tagged here
		 * (found without conntrack), or one conntrack knows. Host-veth
		 * ingress runs before PREROUTING, so a new flow has no conntrack
		 * entry yet. */
		tuple_reverse(&rev, &p->t);
		if (bpf_map_lookup_elem(&pktmeta_conns, &rev) || ct_direction(skb, p, &p->t, NULL) == 1) {
			c->udp_replies++;
			return;
		}
	}
	tag(skb, p, c, ep);
}

static __always_inline int addr_allowed(const struct pktmeta_endpoint *ep, const struct packet *p)
{
	const __u64 *s = (const __u64 *)p->t.saddr;

	/* IPv6 link-local (ND, router solicitations) and the unspecified
	 * address (DAD) never leave the link. */
	if (p->family == 6 && ((p->t.saddr[0] == 0xfe && (p->t.saddr[1] & 0xc0) == 0x80) ||
			       (s[0] == 0 && s[1] == 0)))
		return 1;
	for (int i = 0; i < PKTMETA_MAX_ADDRS; i++) {
		const __u64 *a = (const __u64 *)ep->addrs[i];

		if (i >= ep->n_addrs)
			break;
		if (a[0] == s[0] && a[1] == s[1])
			return 1;
	}
	return 0;
}

static __always_inline int from_pod(struct __sk_buff *skb, const int strict)
{
	struct pktmeta_endpoint *ep = NULL;
	struct pktmeta_counters *c;
	enum parse_result res;
	struct packet p;

	/* Plain TCP segments leave before anything is written, the counters
	 * included (bpf_stats run counts say how many packets the program
	 * saw). */
	res = parse_packet(skb, &p, strict);
	if (res == PARSE_TCP_PLAIN)
		return TCX_NEXT;
	c = counters();
	if (!c)
		return TCX_NEXT;
	c->origin_packets++;

	if (strict && res != PARSE_NONE) {
		__u32 ifindex = skb->ifindex;

		ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
		/* Fail closed: strict mode without an endpoint cannot vouch for anything. */
		if (!ep || !addr_allowed(ep, &p)) {
			c->strict_drops++;
			return TCX_DROP;
		}
	}
	if (res != PARSE_L4) {
		c->not_parsed++;
		return TCX_NEXT;
	}

	if (p.t.proto == IPPROTO_TCP) {
		if ((p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
			tag(skb, &p, c, ep);
		else if (p.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
			close_tcp(skb, &p, c);
		return TCX_NEXT;
	}
	udp_from_pod(skb, &p, c, ep);
	return TCX_NEXT;
}

/* Marks the record delivered to the pod behind this veth, once. */
static __always_inline void mark_delivered(struct __sk_buff *skb, struct pktmeta_record *rec,
					   const struct pktmeta_tuple *origin,
					   const struct pktmeta_tuple *seen, __u32 nat,
					   struct pktmeta_counters *c)
{
	struct pktmeta_endpoint *ep;
	__u32 ifindex = skb->ifindex;
	__u32 old;
	__u64 now;

	if (rec->flags & PKTMETA_F_DELIVERED)
		return;
	/* Peer fields first, then the flag (a full barrier): whoever sees
	 * DELIVERED sees them. Racing CPUs write the same values; the atomic
	 * decides which one counts and reports the delivery. */
	now = bpf_ktime_get_ns();
	ep = bpf_map_lookup_elem(&pktmeta_eps, &ifindex);
	rec->peer_workload = ep ? ep->workload : 0;
	rec->peer_ifindex = ifindex;
	rec->delivered_ns = now;
	__builtin_memcpy(&rec->peer_tuple, seen, sizeof(rec->peer_tuple));
	old = __sync_fetch_and_or(&rec->flags, PKTMETA_F_DELIVERED | nat);
	if (old & PKTMETA_F_DELIVERED)
		return;
	c->deliveries++;
	if (nat)
		c->nat_resolved++;
	emit(c, PKTMETA_EV_DELIVERED, 0, rec, origin, seen, ifindex, now);
}

/* First packet at the destination with no record under the tuple it
 * carries: ask conntrack what the origin sent, and alias the two. */
static __always_inline void deliver_nat(struct __sk_buff *skb, struct packet *p,
					struct pktmeta_counters *c)
{
	struct pktmeta_tuple rev, orig;
	struct pktmeta_record *rec;
	struct pktmeta_alias alias;
	int dir;

	/* The packet is already translated; conntrack knows it as the reverse
	 * of the entry's reply tuple. */
	tuple_reverse(&rev, &p->t);
	dir = ct_direction(skb, p, &rev, &orig);
	if (dir < 0) {
		c->ct_unavailable++;
		return;
	}
	if (dir != 1 || tuple_equal(&orig, &p->t)) {
		c->misses++;
		return;
	}
	rec = bpf_map_lookup_elem(&pktmeta_conns, &orig);
	if (!rec) {
		c->misses++;
		return;
	}
	__builtin_memset(&alias, 0, sizeof(alias));
	alias.version = PKTMETA_RECORD_VERSION;
	alias.conn_id = rec->conn_id;
	__builtin_memcpy(&alias.origin, &orig, sizeof(orig));
	if (bpf_map_update_elem(&pktmeta_aliases, &p->t, &alias, BPF_ANY)) {
		c->update_errors++;
		return;
	}
	mark_delivered(skb, rec, &orig, &p->t, PKTMETA_F_NAT, c);
}

static __always_inline void udp_to_pod(struct __sk_buff *skb, struct packet *p,
				       struct pktmeta_counters *c)
{
	struct pktmeta_record *rec;
	struct pktmeta_alias *alias;
	struct pktmeta_tuple rev;

	rec = bpf_map_lookup_elem(&pktmeta_conns, &p->t);
	if (rec) {
		if (!(rec->flags & PKTMETA_F_DELIVERED))
			mark_delivered(skb, rec, &p->t, &p->t, 0, c);
		return;
	}
	alias = bpf_map_lookup_elem(&pktmeta_aliases, &p->t);
	if (alias) {
		rec = bpf_map_lookup_elem(&pktmeta_conns, &alias->origin);
		/* Still the connection the alias was made for: nothing to do. */
		if (rec && rec->conn_id == alias->conn_id)
			return;
	}
	/* A reply to a flow the receiving pod opened itself. */
	tuple_reverse(&rev, &p->t);
	if (bpf_map_lookup_elem(&pktmeta_conns, &rev))
		return;
	deliver_nat(skb, p, c);
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
	struct pktmeta_record *rec;
	enum parse_result res;
	struct packet p;

	res = parse_packet(skb, &p, 0);
	if (res == PARSE_TCP_PLAIN)
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
		if ((p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
			rec = bpf_map_lookup_elem(&pktmeta_conns, &p.t);
			if (rec)
				mark_delivered(skb, rec, &p.t, &p.t, 0, c);
			else
				deliver_nat(skb, &p, c);
		} else if (p.tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) {
			close_tcp(skb, &p, c);
		}
		return TCX_NEXT;
	}
	udp_to_pod(skb, &p, c);
	return TCX_NEXT;
}

struct sweep_state {
	struct pktmeta_sweep args;
	__u64 now;
};

static long sweep_record(void *map, struct pktmeta_tuple *key, struct pktmeta_record *rec,
			 struct sweep_state *st)
{
	__u32 id = st->args.workload;
	int gone = id && (rec->origin_workload == id || rec->peer_workload == id);
	int idle = st->args.udp_idle_ns && (rec->flags & PKTMETA_F_UDP) &&
		   (__s64)(st->now - rec->last_seen_ns) > (__s64)st->args.udp_idle_ns;

	st->args.visited++;
	if (!gone && !idle)
		return 0;
	if (rec->flags & PKTMETA_F_NAT)
		bpf_map_delete_elem(&pktmeta_aliases, &rec->peer_tuple);
	if (bpf_map_delete_elem(&pktmeta_conns, key) == 0)
		st->args.removed++;
	return 0;
}

/* Removes the records of a deleted pod, and idle UDP records, in one pass
 * over the table in the kernel: CNI DEL runs it with BPF_PROG_RUN instead
 * of copying a table of up to millions of records out to userspace. */
SEC("syscall")
int pktmeta_gc(struct pktmeta_sweep *ctx)
{
	struct sweep_state st;

	__builtin_memcpy(&st.args, ctx, sizeof(st.args));
	st.args.visited = 0;
	st.args.removed = 0;
	st.now = bpf_ktime_get_ns();
	bpf_for_each_map_elem(&pktmeta_conns, sweep_record, &st, 0);
	ctx->visited = st.args.visited;
	ctx->removed = st.args.removed;
	return 0;
}
