/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * pktmeta_origin.h - who opened this connection, asked from its socket.
 *
 * On a node running pktmeta, any process in a pod can ask one of its own
 * sockets who opened the connection behind it:
 *
 *   struct pktmeta_conn_origin o;
 *   socklen_t len = sizeof(o);
 *   if (getsockopt(fd, SOL_PKTMETA, PKTMETA_SO_ORIGIN, &o, &len) == 0)
 *           printf("%s/%s\n", o.namespace, o.pod);
 *
 * or, in C, with pktmeta_origin_get() below. No capability, mount or
 * sidecar is needed: pktmeta answers from a cgroup getsockopt program on
 * the node's cgroup v2 root, which sees every socket of every pod.
 *
 * What the answer is about: the connection the socket itself is, as the
 * kernel knows it (its local and peer address and port), never anything the
 * caller passes in. A connected TCP socket (accepted or connected), or a
 * connected UDP socket. An unconnected UDP socket is asked about the flow
 * of the datagram its last recvfrom()/recvmsg() returned: the source
 * address the kernel handed over with it (pktmeta remembers it per socket
 * as the kernel hands it over; a receive that asks for no source address
 * is not seen), and the socket's local address or, bound to the wildcard,
 * the pod's own address the flow was delivered to. The answer belongs
 * to the socket, not to the thread: it is about the last datagram any
 * reader received, so ask right after the receive, and where the answer
 * decides access give each reader its own socket (SO_REUSEPORT) or
 * connect one per peer. recvmmsg() leaves its last message's. A wildcard
 * socket gets ENOENT where two of the pod's addresses each have a flow
 * from the datagram's source to its port (it cannot tell which one the
 * datagram came to), and where the pod has more than 8 addresses.
 *
 * The answer is given to the pod that received the connection (the origin
 * record says it was delivered to this pod) and to the pod that opened it;
 * any other socket that happens to carry the same addresses (a pod binding
 * another pod's address) gets ENOENT. For UDP it names the flow's opener,
 * not the sender of the datagram in hand: without strictSource another pod
 * on the node can send a datagram with the flow's source (docs/SECURITY.md).
 * The answer lasts as long as pktmeta's record: TCP until both FINs or an
 * RST, UDP until the flow is idle for the UDP timeout (120 s).
 *
 * Errors (errno):
 *   ENOENT       pktmeta knows no origin for this socket's connection: it
 *                came from outside the cluster, from the host, from a pod
 *                without pktmeta, or before pktmeta was installed, or the
 *                record is gone (the connection is closing)
 *   ENOTCONN     the socket has no peer: listening, or unconnected UDP
 *                that has received nothing yet with a source address
 *   EINVAL       the buffer is shorter than struct pktmeta_conn_origin
 *   ENOPROTOOPT  an option name this pktmeta does not know
 *   EOPNOTSUPP   (IPv4) / ENOPROTOOPT (IPv6): pktmeta's program is not
 *                on this node, the kernel's own answer for an unknown
 *                level. On kernels before 5.18, whose getsockopt programs
 *                cannot choose an errno, pktmeta also leaves this answer
 *                for ENOENT, ENOTCONN, EINVAL and ENOPROTOOPT.
 *
 * Stability: the layout carries PKTMETA_ORIGIN_VERSION in its first byte;
 * a change to it bumps the version. A later version only ever grows the
 * struct, and answers a caller whose buffer has this version's size with
 * this version's layout.
 */
#ifndef __PKTMETA_ORIGIN_H__
#define __PKTMETA_ORIGIN_H__

#include <linux/types.h>

/* The getsockopt level ("pm", the pktmeta TCP option's ExID): not a level
 * Linux uses, so without pktmeta the kernel refuses it. */
#define SOL_PKTMETA 0x706d
#define PKTMETA_SO_ORIGIN 1

#define PKTMETA_ORIGIN_VERSION 1

/* Origin flags. */
#define PKTMETA_ORIGIN_F_REMOTE  (1U << 0) /* opened on another node (origin_node): names are not known here */
#define PKTMETA_ORIGIN_F_NAT     (1U << 1) /* reached this socket through address translation (a Service) */
#define PKTMETA_ORIGIN_F_UDP     (1U << 2)
#define PKTMETA_ORIGIN_F_PARTIAL (1U << 3) /* the origin's identity is incomplete (no Kubernetes pod arguments) */
#define PKTMETA_ORIGIN_F_SELF    (1U << 4) /* the asking socket's own pod opened the connection */

#define PKTMETA_ORIGIN_MAX_TAGS 8

struct pktmeta_conn_origin_tag {
	char key[64];
	char value[128];
};

/* All strings are NUL-terminated (empty where unknown). */
struct pktmeta_conn_origin {
	__u8 version; /* PKTMETA_ORIGIN_VERSION */
	__u8 n_tags;
	__u8 pod_tags; /* bit i: tags[i] was claimed by the origin pod (its annotations, labels); clear: set by the operator */
	__u8 _pad;
	__u32 flags; /* PKTMETA_ORIGIN_F_* */
	__u64 conn_id; /* the connection's id on the node that answers (as pktmetactl shows it) */
	__u64 first_seen_ns; /* CLOCK_MONOTONIC of this node when its first packet was seen */
	__u16 origin_node; /* PKTMETA_ORIGIN_F_REMOTE: the origin's node id; else 0 */
	__u16 _pad2;
	__u32 origin_workload; /* pktmeta's id of the origin (on origin_node when remote) */
	char namespace[64];
	char pod[256];
	char uid[64];
	struct pktmeta_conn_origin_tag tags[PKTMETA_ORIGIN_MAX_TAGS];
};

#if !defined(__bpf__) && !defined(__BPF__)
#include <errno.h>
#include <sys/socket.h>

/* Fills *o with the origin of fd's connection. 0, or -1 with errno set as
 * above. */
static inline int pktmeta_origin_get(int fd, struct pktmeta_conn_origin *o)
{
	socklen_t len = sizeof(*o);

	if (getsockopt(fd, SOL_PKTMETA, PKTMETA_SO_ORIGIN, o, &len) != 0)
		return -1;
	if (len < sizeof(*o) || o->version != PKTMETA_ORIGIN_VERSION) {
		errno = EPROTO;
		return -1;
	}
	return 0;
}
#endif

#endif /* __PKTMETA_ORIGIN_H__ */
