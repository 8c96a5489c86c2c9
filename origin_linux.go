package pktmeta

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The getsockopt interface (bpf/include/pktmeta_origin.h).
const (
	solPktmeta    = 0x706d // SOL_PKTMETA
	soOrigin      = 1      // PKTMETA_SO_ORIGIN
	originVersion = 1      // PKTMETA_ORIGIN_VERSION
	maxTags       = 8

	flagRemote  = 1 << 0
	flagNAT     = 1 << 1
	flagUDP     = 1 << 2
	flagPartial = 1 << 3
	flagSelf    = 1 << 4
)

// rawOrigin is struct pktmeta_conn_origin.
type rawOrigin struct {
	Version        uint8
	NTags          uint8
	PodTags        uint8
	_              uint8
	Flags          uint32
	ConnID         uint64
	FirstSeenNs    uint64
	OriginNode     uint16
	_              uint16
	OriginWorkload uint32
	Namespace      [64]byte
	Pod            [256]byte
	UID            [64]byte
	Tags           [maxTags]struct {
		Key   [64]byte
		Value [128]byte
	}
}

// The layout must not drift from the C one (checked against bpf2go's type
// in the datapath's tests too).
var _ = [1]struct{}{}[unsafe.Sizeof(rawOrigin{})-RawOriginSize]

// Origin asks conn's socket who opened its connection: a *net.TCPConn
// (accepted or dialled), a connected *net.UDPConn, or anything that wraps
// one and says so (*tls.Conn, or any net.Conn with a NetConn method).
func Origin(conn net.Conn) (*ConnOrigin, error) {
	// Wrappers that say what they wrap (*tls.Conn), a bounded number deep.
	for range 16 {
		if sc, ok := conn.(syscall.Conn); ok {
			raw, err := sc.SyscallConn()
			if err != nil {
				return nil, fmt.Errorf("pktmeta: %w", err)
			}
			var o *ConnOrigin
			var oerr error
			if err := raw.Control(func(fd uintptr) { o, oerr = OriginFD(int(fd)) }); err != nil {
				return nil, fmt.Errorf("pktmeta: %w", err)
			}
			return o, oerr
		}
		w, ok := conn.(interface{ NetConn() net.Conn })
		if !ok {
			return nil, fmt.Errorf("%w: %T is no socket", ErrUnsupported, conn)
		}
		conn = w.NetConn()
	}
	return nil, fmt.Errorf("%w: %T wraps connections too deep", ErrUnsupported, conn)
}

// OriginFD is Origin for a socket file descriptor.
func OriginFD(fd int) (*ConnOrigin, error) {
	var raw rawOrigin
	size := uint32(RawOriginSize)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), solPktmeta, soOrigin,
		uintptr(unsafe.Pointer(&raw)), uintptr(unsafe.Pointer(&size)), 0)
	switch errno {
	case 0:
	case unix.ENOENT:
		return nil, ErrUnknown
	case unix.ENOTCONN:
		return nil, ErrNotConnected
	case unix.EOPNOTSUPP, unix.ENOPROTOOPT:
		return nil, ErrNotAvailable
	case unix.ENOTSOCK, unix.EBADF:
		return nil, fmt.Errorf("%w: %w", ErrUnsupported, errno)
	default:
		return nil, fmt.Errorf("pktmeta: getsockopt: %w", errno)
	}
	if size < RawOriginSize || raw.Version != originVersion {
		return nil, fmt.Errorf("pktmeta: answer of version %d, %d bytes; this library reads version %d: %w",
			raw.Version, size, originVersion, errors.ErrUnsupported)
	}
	return decodeOrigin(&raw), nil
}

func decodeOrigin(raw *rawOrigin) *ConnOrigin {
	o := &ConnOrigin{
		Namespace: cString(raw.Namespace[:]),
		Pod:       cString(raw.Pod[:]),
		UID:       cString(raw.UID[:]),
		ConnID:    raw.ConnID,
		FirstSeen: monotonicToWall(raw.FirstSeenNs),
		Remote:    raw.Flags&flagRemote != 0,
		Node:      raw.OriginNode,
		Workload:  raw.OriginWorkload,
		NAT:       raw.Flags&flagNAT != 0,
		UDP:       raw.Flags&flagUDP != 0,
		Partial:   raw.Flags&flagPartial != 0,
		Self:      raw.Flags&flagSelf != 0,
	}
	for i := 0; i < int(raw.NTags) && i < maxTags; i++ {
		k, v := cString(raw.Tags[i].Key[:]), cString(raw.Tags[i].Value[:])
		dst := &o.Tags
		if raw.PodTags&(1<<i) != 0 {
			dst = &o.PodTags
		}
		if *dst == nil {
			*dst = map[string]string{}
		}
		(*dst)[k] = v
	}
	return o
}

func cString(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// monotonicToWall turns a CLOCK_MONOTONIC reading of this node (the pod
// shares the node's clock) into wall time.
func monotonicToWall(ns uint64) time.Time {
	if ns == 0 {
		return time.Time{}
	}
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) != nil {
		return time.Time{}
	}
	return time.Now().Add(-time.Duration(uint64(ts.Nano()) - ns))
}
