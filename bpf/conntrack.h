/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The conntrack kfuncs and the slice of struct nf_conn the datapath reads.
 * The structs are CO-RE: field offsets come from the running kernel's BTF,
 * so no vmlinux.h is needed and the object stays portable.
 */
#ifndef __PKTMETA_CONNTRACK_H__
#define __PKTMETA_CONNTRACK_H__

#include <linux/types.h>
#include <linux/bpf.h>

#ifndef BPF_F_CURRENT_NETNS
#define BPF_F_CURRENT_NETNS (-1)
#endif

#define IP_CT_DIR_ORIGINAL 0
#define IP_CT_DIR_REPLY 1

/* The 12-byte form every kernel since 5.18 accepts (newer ones also take a
 * 16-byte form with a zone). */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8 l4proto;
	__u8 dir;
	__u8 reserved[2];
};
#define PKTMETA_CT_OPTS_SZ 12

union nf_inet_addr {
	__u32 all[4];
	__be32 ip;
	__be32 ip6[4];
} __attribute__((preserve_access_index));

union nf_conntrack_man_proto {
	__be16 all;
} __attribute__((preserve_access_index));

struct nf_conntrack_man {
	union nf_inet_addr u3;
	union nf_conntrack_man_proto u;
	__u16 l3num;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple {
	struct nf_conntrack_man src;
	struct {
		union nf_inet_addr u3;
		union {
			__be16 all;
		} u;
		__u8 protonum;
		__u8 dir;
	} dst;
} __attribute__((preserve_access_index));

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
} __attribute__((preserve_access_index));

/* TCP tracking state: enum tcp_conntrack (uapi nf_conntrack_tcp.h). */
#define PKTMETA_CT_TCP_ESTABLISHED 3
#define PKTMETA_CT_TCP_FIN_WAIT 4
#define PKTMETA_CT_TCP_CLOSE_WAIT 5
#define PKTMETA_CT_TCP_LAST_ACK 6
#define PKTMETA_CT_TCP_TIME_WAIT 7
#define PKTMETA_CT_TCP_CLOSE 8

/* ip_ct_tcp_state.flags: conntrack accepted a FIN from that direction. */
#define PKTMETA_CT_TCP_FLAG_CLOSE_INIT 0x04
#define PKTMETA_CT_TCP_SYN_RECV 2

struct ip_ct_tcp_state {
	__u8 flags;
} __attribute__((preserve_access_index));

struct ip_ct_tcp {
	struct ip_ct_tcp_state seen[2];
	__u8 state;
} __attribute__((preserve_access_index));

union nf_conntrack_proto {
	struct ip_ct_tcp tcp;
} __attribute__((preserve_access_index));

struct nf_conn {
	struct nf_conntrack_tuple_hash tuplehash[2];
	union nf_conntrack_proto proto;
} __attribute__((preserve_access_index));

/* __weak: the object still loads where conntrack (or its BTF) is absent;
 * the datapath then skips NAT resolution and counts ct_unavailable. */
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple__sz, struct bpf_ct_opts *opts,
					 __u32 opts__sz) __ksym __weak;
extern void bpf_ct_release(struct nf_conn *ct) __ksym __weak;

/* 1 when the loader found the kfuncs above in the kernel's BTF (vmlinux,
 * or nf_conntrack's once loaded): the loader sets it from the same BTF the
 * kfuncs are resolved against. Not bpf_ksym_exists(): cilium/ebpf encodes
 * the address load of a module's kfunc with the module's BTF fd index in
 * the instruction's offset, which the verifier rejects ("BPF_LD_IMM64 uses
 * reserved fields"; seen on 6.1 and 6.12). With 0 the verifier drops the calls as dead code. */
volatile const __u32 pktmeta_have_ct_kfuncs = 0;

#endif /* __PKTMETA_CONNTRACK_H__ */
