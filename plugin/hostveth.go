package plugin

import (
	"fmt"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

// hostVeth finds the host side of the pod's interface the way the
// bandwidth plugin does: the peer ifindex of ifname inside the pod's netns,
// matched against the prevResult's host interfaces (empty Sandbox). When
// the primary plugin did not report its host interface, the peer ifindex
// alone is trusted if it is a veth in this netns.
func hostVeth(netns ns.NetNS, ifname string, prev *current.Result) (netlink.Link, error) {
	var (
		peer int
		err  error
	)
	if nsErr := netns.Do(func(ns.NetNS) error {
		_, peer, err = ip.GetVethPeerIfindex(ifname)
		return nil
	}); nsErr != nil {
		return nil, fmt.Errorf("enter netns %s: %w", netns.Path(), nsErr)
	}
	if err != nil || peer <= 0 {
		return nil, fmt.Errorf("interface %s in %s has no veth peer (pktmeta needs a veth-based primary CNI): %v", ifname, netns.Path(), err)
	}
	link, err := netlink.LinkByIndex(peer)
	if err != nil {
		return nil, fmt.Errorf("veth peer of %s (ifindex %d) is not in the host netns: %w", ifname, peer, err)
	}
	if prev != nil {
		for _, iface := range prev.Interfaces {
			if iface.Sandbox == "" && iface.Name == link.Attrs().Name {
				return link, nil
			}
		}
	}
	if link.Type() != "veth" {
		return nil, fmt.Errorf("peer of %s is %s, a %s, not a veth", ifname, link.Attrs().Name, link.Type())
	}
	return link, nil
}
