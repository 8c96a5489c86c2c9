package kubenode

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
)

// DetectUplinks finds the interfaces (in the calling thread's network
// namespace) that a node's traffic to and from the other nodes crosses:
// the ones holding this node's InternalIP addresses, and the ones its
// routes to the other nodes' addresses and pod CIDRs go out of. With
// native routing that is the NIC; with a VXLAN overlay (flannel, Calico)
// also the VXLAN device, which sees the inner packets.
//
// Only devices that lead off the node are taken: a route may only point
// at a NIC, bond, VLAN, team or a VXLAN/Geneve tunnel; the node's own
// address may also sit on a bridge. A veth never: it is a pod's, or a
// CNI's internal device (cilium_host), and another Node object naming a
// local pod's address must not turn that pod's veth into an uplink.
// Interfaces passed over, or that cannot carry the uplink programs (no
// Ethernet headers: IPIP, WireGuard), are returned apart with the reason,
// so the caller can say what is not covered.
func DetectUplinks(self *corev1.Node, others []*corev1.Node) (uplinks []string, refused map[string]error, err error) {
	refused = map[string]error{}
	seen := map[int]bool{}
	add := func(index int, allowed map[string]bool) error {
		if index == 0 || seen[index] {
			return nil
		}
		seen[index] = true
		l, err := netlink.LinkByIndex(index)
		if err != nil {
			return fmt.Errorf("interface %d: %w", index, err)
		}
		name := l.Attrs().Name
		if l.Attrs().Flags&net.FlagLoopback != 0 {
			return nil
		}
		if !allowed[l.Type()] {
			refused[name] = fmt.Errorf("a %s device is not made an uplink automatically; list it in crossNode.uplinks if it leads to other nodes", l.Type())
			return nil
		}
		if err := datapath.CheckUplink(name); err != nil {
			refused[name] = err
			return nil
		}
		uplinks = append(uplinks, name)
		return nil
	}
	own := map[netip.Addr]bool{}
	for _, a := range InternalIPs(self) {
		own[a] = true
	}
	if len(own) > 0 {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return nil, nil, fmt.Errorf("list addresses: %w", err)
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if ok && own[ip.Unmap()] {
				if err := add(a.LinkIndex, ownAddressTypes); err != nil {
					return nil, nil, err
				}
			}
		}
	}
	for _, n := range others {
		if n.Name == self.Name {
			continue
		}
		var dsts []netip.Addr
		dsts = append(dsts, InternalIPs(n)...)
		for _, c := range podCIDRs(n) {
			if p, err := netip.ParsePrefix(c); err == nil {
				// An address inside the CIDR: the route covers it.
				dsts = append(dsts, p.Masked().Addr().Next())
			}
		}
		for _, d := range dsts {
			routes, err := netlink.RouteGet(net.IP(d.AsSlice()))
			if err != nil {
				continue // no route to it: nothing of ours goes there
			}
			for _, r := range routes {
				if err := add(r.LinkIndex, routeTypes); err != nil {
					return nil, nil, err
				}
			}
		}
	}
	slices.Sort(uplinks)
	return uplinks, refused, nil
}

// The link types (netlink's) that become uplinks: through a route to
// another node, and by holding the node's own address.
var (
	routeTypes      = map[string]bool{"device": true, "bond": true, "vlan": true, "team": true, "vxlan": true, "geneve": true}
	ownAddressTypes = map[string]bool{"device": true, "bond": true, "vlan": true, "team": true, "vxlan": true, "geneve": true, "bridge": true, "macvlan": true}
)
