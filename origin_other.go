//go:build !linux

package pktmeta

import (
	"fmt"
	"net"
)

// Origin is only answered on Linux.
func Origin(conn net.Conn) (*ConnOrigin, error) {
	return nil, fmt.Errorf("%w: pktmeta runs on Linux", ErrUnsupported)
}

// OriginFD is only answered on Linux.
func OriginFD(fd int) (*ConnOrigin, error) { return Origin(nil) }
