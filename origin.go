// Package pktmeta lets an application in a pod ask one of its own sockets
// who opened the connection behind it: one getsockopt, answered by
// pktmeta's datapath on the node (bpf/include/pktmeta_origin.h has the
// same for C).
//
//	func handler(w http.ResponseWriter, r *http.Request) {
//		conn := r.Context().Value(connKey).(net.Conn) // from http.Server.ConnContext
//		o, err := pktmeta.Origin(conn)
//		if err == nil {
//			log.Printf("caller %s/%s tags %v", o.Namespace, o.Pod, o.Tags)
//		}
//	}
//
// It imports nothing of pktmeta's own and needs no privilege, mount or
// sidecar: any process in any pod on a pktmeta node may ask its sockets.
package pktmeta

import (
	"errors"
	"time"
)

// ConnOrigin is who opened a connection, as the node's pktmeta recorded it
// at the connection's first packet.
type ConnOrigin struct {
	// Namespace, Pod and UID of the pod that opened the connection; empty
	// for a Remote origin, whose names this node does not hold.
	Namespace string
	Pod       string
	UID       string
	// Tags the operator set for the origin pod (vouched for by the node).
	Tags map[string]string
	// PodTags the origin pod claimed itself (its annotations, labels): not
	// vouched for by anyone but that pod.
	PodTags map[string]string
	// ConnID is the connection's id on this node (pktmetactl shows it).
	ConnID uint64
	// FirstSeen is when the node saw the connection's first packet.
	FirstSeen time.Time
	// Remote: opened on another node, Node; Workload is pktmeta's id of the
	// origin there (pktmetactl on that node names it).
	Remote   bool
	Node     uint16
	Workload uint32
	// NAT: the connection reached this socket through address translation
	// (a Service).
	NAT bool
	UDP bool
	// Partial: the origin's identity is incomplete (no Kubernetes pod
	// arguments were given to its CNI ADD).
	Partial bool
	// Self: the asking socket's own pod opened the connection.
	Self bool
}

var (
	// ErrUnknown: pktmeta knows no origin for this socket's connection
	// (from outside the cluster, the host, a pod without pktmeta, opened
	// before pktmeta was installed, or closing). ENOENT.
	ErrUnknown = errors.New("pktmeta knows no origin for this connection")
	// ErrNotConnected: the socket has no peer to ask about: a listener,
	// or an unconnected UDP socket that has received nothing with a
	// source address yet, or whose node runs pktmeta with
	// applicationUDP false (or on a kernel without the recvmsg programs).
	// Otherwise an unconnected UDP socket is answered about the datagram
	// its last recvfrom/ReadFrom returned, by any thread. ENOTCONN.
	ErrNotConnected = errors.New("socket has no peer pktmeta can answer about (a listener, or an unconnected UDP socket before a datagram pktmeta saw it receive)")
	// ErrNotAvailable: nothing answered getsockopt(SOL_PKTMETA): pktmeta
	// is not on this node, or (Linux before 5.18, where pktmeta cannot
	// choose the errno) it knows nothing about this socket.
	ErrNotAvailable = errors.New("pktmeta does not answer on this node")
	// ErrUnsupported: not something pktmeta can be asked about: a
	// net.Conn that is no socket, a file descriptor that is no socket, or
	// not Linux. (A socket that is not TCP or UDP over IP gets ErrUnknown.)
	ErrUnsupported = errors.New("pktmeta: unsupported connection")
)

// RawOriginSize is sizeof(struct pktmeta_conn_origin): the buffer
// getsockopt(SOL_PKTMETA, PKTMETA_SO_ORIGIN) fills.
const RawOriginSize = 1952
