package testbed

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// What an attacker inside a pod can do: pods have CAP_NET_RAW by default,
// so they can write any Ethernet frame, with any source address, on their
// own interface.

// SendFrames writes raw Ethernet frames on the pod's interface (an
// AF_PACKET socket, as `CAP_NET_RAW` allows in a pod). They leave through
// the pod's veth exactly as written.
func (p *Pod) SendFrames(frames ...[]byte) error {
	return p.Do(func() error {
		l, err := netlink.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err != nil {
			return fmt.Errorf("packet socket: %w", err)
		}
		defer unix.Close(fd)
		sa := &unix.SockaddrLinklayer{Ifindex: l.Attrs().Index, Halen: 6}
		for _, f := range frames {
			copy(sa.Addr[:], f[0:6])
			if err := unix.Sendto(fd, f, 0, sa); err != nil {
				return fmt.Errorf("send %d-byte frame: %w", len(f), err)
			}
		}
		return nil
	})
}

// MAC is the pod interface's hardware address.
func (p *Pod) MAC() (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := p.Do(func() error {
		l, err := netlink.LinkByName(p.IfName)
		if err == nil {
			mac = l.Attrs().HardwareAddr
		}
		return err
	})
	return mac, err
}

// HostVethMAC is the hardware address of the pod's host-side veth: frames
// the pod sends to it are routed by the node.
func (p *Pod) HostVethMAC() (net.HardwareAddr, error) {
	var mac net.HardwareAddr
	err := p.node.Do(func() error {
		l, err := netlink.LinkByIndex(p.HostIfindex)
		if err == nil {
			mac = l.Attrs().HardwareAddr
		}
		return err
	})
	return mac, err
}

// DialTCPFrom connects from the pod's local address to addr.
func (p *Pod) DialTCPFrom(ctx context.Context, local, addr netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := p.Do(func() error {
		var err error
		d := net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(local)}
		c, err = d.DialContext(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: dial tcp %s from %s: %w", p.Spec.Name, addr, local, err)
	}
	p.node.track(c)
	return c, nil
}

// DialUDPFrom returns a UDP socket in the pod bound to local and connected
// to addr.
func (p *Pod) DialUDPFrom(local, addr netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := p.Do(func() error {
		var err error
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(local), net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: dial udp %s from %s: %w", p.Spec.Name, addr, local, err)
	}
	p.node.track(c)
	return c, nil
}
