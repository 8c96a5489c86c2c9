/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Layouts shared by the pktmeta datapath and its userspace (plugin, CLI,
 * agent), but not by third-party consumers: those only need pktmeta.h.
 * Each layout is covered by PKTMETA_LAYOUT_VERSION (pktmeta.h); Go reads
 * them through the types bpf2go generates from this file.
 */
#ifndef __PKTMETA_DATAPATH_H__
#define __PKTMETA_DATAPATH_H__

#include <linux/types.h>
#include "pktmeta.h"

/* Addresses a pod interface may send from (source validation). */
#define PKTMETA_MAX_ADDRS 16
#define PKTMETA_MAX_TAGS 8

/* Endpoint flags. */
#define PKTMETA_EP_STRICT (1U << 0) /* drop packets from other sources */
#define PKTMETA_EP_NO_EGRESS (1U << 1) /* no delivery hook: SYN-ACKs are not seen */

/* Map "pktmeta_eps", keyed by the ifindex of a pod's host-side veth:
 * what the datapath needs to know about the pod behind it, and what it
 * keeps per pod. Identity comes from here, never from packet contents.
 * Userspace writes the first part when it registers the pod; the datapath
 * changes only the counters, atomically (the event window is approximate). */
struct pktmeta_endpoint {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 flags; /* PKTMETA_EP_* */
	__u8 n_addrs;
	__u8 _pad;
	__u32 workload;
	__u32 max_conns; /* records this pod may hold at once; 0: no limit */
	__u32 events_per_sec; /* connections a second that produce events; 0: no limit */
	__u8 addrs[PKTMETA_MAX_ADDRS][16]; /* the pod's own: IPv4-mapped or IPv6 */
	/* Kept by the datapath. */
	__s64 live; /* records this pod opened that are in the table */
	__u64 spoofed; /* packets from another source address: not tagged */
	__u64 over_budget; /* first packets not tagged: live reached max_conns */
	__u64 table_full; /* first packets not tagged: the table was full */
	__u64 not_party; /* changes refused: not a party to the connection */
	__u64 events_limited; /* connections without events: over events_per_sec */
	__u64 ev_window_ns; /* start of the current one-second event window */
	__u32 ev_count; /* connections with events in that window */
	__u32 _pad2;
};

/* Workload flags. */
#define PKTMETA_WL_PARTIAL (1U << 0) /* identity incomplete (no Kubernetes args) */
#define PKTMETA_WL_LEGACY (1U << 1) /* attached with clsact/cls_bpf, not tcx */
#define PKTMETA_WL_STRICT (1U << 2) /* strict source check on */
#define PKTMETA_WL_NO_EGRESS (1U << 3) /* legacy beside an ingress qdisc: no delivery hook */

struct pktmeta_tag {
	__u8 key[64];
	__u8 value[128];
};

/* Map "pktmeta_wloads", keyed by workload id. Written and read by
 * userspace only: BPF sees the numeric id, never these strings. It lives in
 * bpffs so that it shares the pinned datapath's lifetime and needs no daemon. */
struct pktmeta_workload {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 flags; /* PKTMETA_WL_* */
	__u8 n_tags;
	__u8 pod_tags; /* bit i: tags[i] is claimed by the pod (annotation, label), not the operator's */
	__u32 host_ifindex;
	__u64 created_unix_ns;
	__u64 host_netns_ino; /* inode of the netns holding the host veth */
	__u8 namespace[64];
	__u8 pod[256];
	__u8 uid[64];
	__u8 container_id[128];
	__u8 ifname[16]; /* inside the pod */
	__u8 host_ifname[16];
	__u8 netns[128];
	__u8 network[64]; /* the CNI network (conflist name); empty for the agent's covers */
	struct pktmeta_tag tags[PKTMETA_MAX_TAGS];
};

/* Map "pktmeta_stats": per-CPU, one slot. */
struct pktmeta_counters {
	__u64 origin_packets; /* examined by the origin programs: all but plain TCP segments and UDP shortcut hits */
	__u64 deliver_packets; /* examined by the delivery program: all but plain TCP segments and UDP shortcut hits */
	__u64 not_parsed; /* passed untouched: not TCP/UDP over IP, truncated, fragment */
	__u64 tagged; /* first packets that created a record */
	__u64 syn_retransmits; /* SYN for a record that already exists */
	__u64 unregistered; /* first packet on a veth with no endpoint */
	__u64 update_errors; /* map update failed for another reason */
	__u64 deliveries; /* records marked delivered */
	__u64 nat_resolved; /* deliveries that needed a conntrack lookup */
	__u64 misses; /* TCP first packet, or any UDP datagram, at a destination with no record */
	__u64 udp_replies; /* UDP from a pod that conntrack says is a reply */
	__u64 closed; /* records removed on FIN/RST */
	__u64 strict_drops;
	__u64 events_dropped; /* ring buffer full */
	__u64 ct_unavailable; /* NAT resolution skipped: no conntrack kfuncs */
	__u64 spoofed; /* not the pod's own source address: not tagged, changes nothing */
	__u64 link_local; /* IPv6 link-local or unspecified source: never tagged */
	__u64 over_budget; /* first packets of a pod at its maxConnectionsPerPod */
	__u64 table_full; /* first packets refused by a full connection table */
	__u64 aliases_full; /* deliveries behind NAT refused by a full alias table */
	__u64 not_party; /* replace/close refused: the sender is not a party */
	__u64 simultaneous_opens; /* SYN whose reverse tuple already has a record */
	__u64 unverified_closes; /* FIN/RST at a delivery hook that conntrack did not confirm */
	__u64 events_limited; /* connections without events: origin over its event rate */
	__u64 udp_preexisting; /* UDP without a record that conntrack already tracked: not tagged */
	__u64 not_for_pod; /* first packets at a delivery hook for an address not the pod's: not delivered */
	__u64 table_busy; /* changes given up: other CPUs held the connection's chunk of the table */
	__u64 conn_seq; /* per-CPU part of the connection id */
};

/* Event types. */
#define PKTMETA_EV_OPENED 1
#define PKTMETA_EV_DELIVERED 2
#define PKTMETA_EV_CLOSED 3

/* Close reasons. */
#define PKTMETA_CLOSE_FIN 1
#define PKTMETA_CLOSE_RST 2

/* Ring buffer "pktmeta_events" carries these. */
struct pktmeta_event {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 type; /* PKTMETA_EV_* */
	__u8 reason; /* CLOSED: PKTMETA_CLOSE_* */
	__u8 _pad;
	__u32 flags; /* record flags after the event */
	__u64 conn_id;
	__u64 ts_ns; /* CLOCK_MONOTONIC */
	__u32 origin_workload;
	__u32 peer_workload;
	__u32 ifindex; /* veth the packet was on */
	__u32 _pad2;
	struct pktmeta_tuple tuple; /* as the origin sent it */
	struct pktmeta_tuple seen; /* DELIVERED: as the receiver saw it */
};

/* The same event when its tuples are IPv4 (the common case), 64 bytes
 * instead of 120: with the ring's 8-byte header, about one cache line of
 * the ring per event instead of two, and writing cold ring lines is most
 * of what an event costs. Readers tell the two apart by their size. */
struct pktmeta_event_v4 {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 type; /* PKTMETA_EV_* */
	__u8 reason; /* CLOSED: PKTMETA_CLOSE_* */
	__u8 proto;
	__u32 flags; /* record flags after the event */
	__u64 conn_id;
	__u64 ts_ns; /* CLOCK_MONOTONIC */
	__u32 origin_workload;
	__u32 peer_workload;
	__u32 ifindex; /* veth the packet was on */
	__be32 saddr; /* the tuple as the origin sent it */
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be32 seen_saddr; /* DELIVERED: as the receiver saw it, else 0 */
	__be32 seen_daddr;
	__be16 seen_sport;
	__be16 seen_dport;
	__u32 _pad;
};

/* Sweep flags. */
#define PKTMETA_SWEEP_CONNTRACK (1U << 0) /* remove TCP records conntrack says are over */
#define PKTMETA_SWEEP_ALIASES (1U << 1) /* remove aliases whose record is gone */
#define PKTMETA_SWEEP_FORGET_UDP (1U << 2) /* only void every CPU's UDP shortcut (bump the epoch) */

#define PKTMETA_SWEEP_MAGIC 0x7065657773746d70ULL /* "pmtsweep" */

/* Arguments and results of the pktmeta_sweep program, which userspace runs
 * with BPF_PROG_TEST_RUN on a packet made of an Ethernet header and this. */
struct pktmeta_sweep_args {
	__u64 magic; /* PKTMETA_SWEEP_MAGIC */
	__u32 workload; /* remove the records this workload opened or received; 0: none */
	__u32 flags; /* PKTMETA_SWEEP_* */
	__u64 udp_idle_ns; /* remove UDP records idle this long; 0: none */
	__u64 tcp_pending_ns; /* remove TCP records whose handshake did not complete in this long; 0: none */
	__u64 ct_min_age_ns; /* ask conntrack only about records at least this old */
	/* Results. */
	__u64 visited;
	__u64 removed_workload;
	__u64 removed_udp_idle;
	__u64 removed_tcp_pending;
	__u64 removed_tcp_over; /* conntrack: closed, or gone after it was seen */
	__u64 removed_aliases;
	__u64 ct_checked;
	__u64 ct_unavailable; /* 1: no conntrack kfuncs, no conntrack checks */
};

/* Operations of the pktmeta_table_write program, through which userspace
 * changes the connection table: with the datapath's own code, so under
 * the same locks as the programs (see table.h). */
#define PKTMETA_TABLE_OP_INSERT 1 /* rec under key, unless key has an entry */
#define PKTMETA_TABLE_OP_REMOVE 2 /* the entry of connection rec.conn_id under key, and nothing else */

#define PKTMETA_TABLE_OP_MAGIC 0x706f656c62746d70ULL /* "pmtblop" */

/* The argument of pktmeta_table_write, which userspace runs with
 * BPF_PROG_TEST_RUN on a packet of an Ethernet header and this. */
struct pktmeta_table_op {
	__u64 magic; /* PKTMETA_TABLE_OP_MAGIC */
	__u32 op; /* PKTMETA_TABLE_OP_* */
	__s32 result; /* out: what table.h returned (TABLE_*) */
	struct pktmeta_tuple key;
	struct pktmeta_record rec;
};

/* Config flags. */
#define PKTMETA_CFG_NO_EVENTS (1U << 0)
/* Set by userspace, read by status only: the programs were loaded where
 * the conntrack kfuncs did not resolve. */
#define PKTMETA_CFG_NO_CONNTRACK (1U << 1)

/* Map "pktmeta_cfg": one slot, written by userspace when the datapath
 * is created or upgraded. A non-zero layout_version commits the maps: a
 * load interrupted before that is thrown away and redone. */
struct pktmeta_config {
	__u32 layout_version; /* PKTMETA_LAYOUT_VERSION of the maps */
	__u32 flags; /* PKTMETA_CFG_* */
	__u64 udp_timeout_ns; /* a UDP record unused for this long is a new flow */
	__u8 datapath_id[32]; /* sha256 of the BPF object the programs came from */
	__u32 release; /* ordered: the pktmeta datapath release the programs came from */
	__u32 _pad;
};

/* Map "pktmeta_inbound": UDP flows someone off the node (or untagged)
 * opened to a pod, keyed by the tuple the pod answers with; the value is
 * the pod's host veth. What tells an answer from a new flow where conntrack
 * does not track the traffic. */
struct pktmeta_inbound_flow {
	__u32 ifindex;
	__u32 _pad;
};

/* ---- Across nodes. ---- */

/* The pktmeta TCP option, on the SYN of a connection leaving the node for
 * another cluster member: an RFC 6994 experimental option (kind 253, a
 * 16-bit ExID), 20 bytes, all fields big-endian:
 *
 *   0      kind 253
 *   1      length 20
 *   2-3    ExID 0x706d ("pm")
 *   4-9    version (high 4 bits) | origin conn_id (low 44 bits)
 *   10-11  origin node id
 *   12-15  origin workload id (on the origin node)
 *   16-19  MAC: SipHash-2-4 under the cluster key of the tuple as sent,
 *          the SYN's sequence number and bytes 4-15, truncated to 32 bits;
 *          zero where the cluster has no key
 *
 * Appended to the SYN's options, never inside them, so that the receiver
 * can cut it off again. */
#define PKTMETA_TCPOPT_KIND 253
#define PKTMETA_TCPOPT_LEN 20
#define PKTMETA_TCPOPT_EXID 0x706d
#define PKTMETA_TCPOPT_VERSION 1
#define PKTMETA_TCPOPT_MAC_LEN 4
/* TCP header: 20 bytes, plus at most 40 of options. */
#define PKTMETA_TCP_MAX_OPTS 40

/* Node flags. */
#define PKTMETA_NODE_MAC (1U << 0) /* a cluster key is set: add MACs, and honour only options with a valid one */

/* Map "pktmeta_node": one slot, written by userspace only (pktmetactl
 * node). node_id 0: this node takes no part in carrying origins across
 * nodes (options are still neutralised and stripped, never honoured).
 * Map "pktmeta_remote_live", one __s64 slot the datapath alone writes,
 * counts the remote records in the table against max_remote. */
struct pktmeta_node_config {
	__u8 version; /* PKTMETA_RECORD_VERSION */
	__u8 _pad;
	__u16 node_id;
	__u32 flags; /* PKTMETA_NODE_* */
	__u32 max_remote; /* remote records this node holds at once; 0: no limit */
	__u32 _pad2;
	__u64 key[2]; /* SipHash key, with PKTMETA_NODE_MAC */
};

/* Map "pktmeta_members" (LPM trie): the cluster's node addresses and pod
 * CIDRs. Options go only to them, and are honoured only from them. IPv4
 * prefixes are stored IPv4-mapped, with 96 added to the length. */
struct pktmeta_member_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Map "pktmeta_xstats": per-CPU, one slot. The uplink programs' counters
 * (a map of their own, so the pktmeta_counters layout stays as it was). */
struct pktmeta_remote_counters {
	__u64 out_syns; /* SYNs leaving through an uplink */
	__u64 opt_added; /* options put on */
	__u64 opt_no_room; /* SYNs that had no room for the option (or carried data): left as they were */
	__u64 opt_neutralised; /* pktmeta options found on a leaving SYN (not ours): overwritten with NOPs */
	__u64 out_no_record; /* SYNs to a member with no record (host traffic, untagged pods, NAT unresolved without the conntrack kfuncs) */
	__u64 out_not_member; /* SYNs to a destination outside the cluster: no option */
	__u64 in_syns; /* SYNs entering through an uplink */
	__u64 in_options; /* of those, with a pktmeta option */
	__u64 remote_tagged; /* remote records created */
	__u64 untrusted; /* options from a source that is no cluster member: stripped, not honoured */
	__u64 bad_mac; /* options whose MAC did not verify: stripped, not honoured */
	__u64 malformed; /* unknown version, bad length, two options: stripped, not honoured */
	__u64 stripped_nop; /* options that could not be cut off, overwritten with NOPs instead */
	__u64 remote_retransmits; /* SYN for a remote record that already exists */
	__u64 remote_over_budget; /* remote records refused: max_remote reached */
	__u64 remote_table_full;
	__u64 remote_not_party; /* option for a tuple a local record holds: not honoured */
	__u64 node_off; /* options stripped on a node with no node id */
	__u64 out_list_cut; /* leaving SYNs whose options end early (EOL, a bad length): no option added after them */
};

#endif /* __PKTMETA_DATAPATH_H__ */
