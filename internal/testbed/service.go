package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Service is a ClusterIP-like service with a single backend, implemented
// with nftables DNAT in the node namespace as kube-proxy's nftables mode
// does: a nat chain on prerouting (traffic from pods) and one on output
// (traffic from the node itself), both at priority dstnat (-100). There is no
// masquerade, so a pod reaching itself through its own service (hairpin)
// does not work.
type Service struct {
	Proto   string         // "tcp" or "udp"
	VIP     netip.AddrPort // IPv4 or IPv6
	Backend netip.AddrPort // same family as VIP
}

func (s Service) String() string {
	return fmt.Sprintf("%s %s->%s", s.Proto, s.VIP, s.Backend)
}

func (s Service) validate() error {
	if s.Proto != "tcp" && s.Proto != "udp" {
		return fmt.Errorf("service %s: proto must be tcp or udp", s)
	}
	if !s.VIP.IsValid() || !s.Backend.IsValid() {
		return fmt.Errorf("service %s: VIP and Backend must be set", s)
	}
	if s.VIP.Addr().Unmap().Is4() != s.Backend.Addr().Unmap().Is4() {
		return fmt.Errorf("service %s: VIP and Backend families differ", s)
	}
	return nil
}

// AddService adds s to the node's nftables table (inet <node ID>).
func (n *Node) AddService(s Service) error {
	if err := s.validate(); err != nil {
		return fmt.Errorf("add service: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	services := append(slices.Clone(n.services), s)
	if err := n.syncServices(services); err != nil {
		return fmt.Errorf("add service %s: %w", s, err)
	}
	n.services = services
	return nil
}

// DelService removes a service added by AddService.
func (n *Node) DelService(s Service) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return ErrClosed
	}
	i := slices.Index(n.services, s)
	if i < 0 {
		return fmt.Errorf("del service %s: not found", s)
	}
	services := slices.Delete(slices.Clone(n.services), i, i+1)
	if err := n.syncServices(services); err != nil {
		return fmt.Errorf("del service %s: %w", s, err)
	}
	n.services = services
	return nil
}

// syncServices replaces the whole table in one nft transaction, which is
// simpler than tracking rule handles and never leaves a half-updated table.
func (n *Node) syncServices(services []Service) error {
	var b strings.Builder
	// Declaring the table first makes the delete succeed the first time.
	fmt.Fprintf(&b, "table inet %s {}\ndelete table inet %s\n", n.ID, n.ID)
	fmt.Fprintf(&b, "table inet %s {\n", n.ID)
	// nft only accepts the name dstnat for prerouting; it is -100 for both.
	for _, hook := range []string{"prerouting", "output"} {
		fmt.Fprintf(&b, "  chain %s {\n    type nat hook %s priority -100; policy accept;\n", hook, hook)
		for _, s := range services {
			fam := "ip6"
			if s.VIP.Addr().Unmap().Is4() {
				fam = "ip"
			}
			be := netip.AddrPortFrom(s.Backend.Addr().Unmap(), s.Backend.Port())
			fmt.Fprintf(&b, "    %s daddr %s %s dport %d dnat %s to %s\n",
				fam, s.VIP.Addr().Unmap(), s.Proto, s.VIP.Port(), fam, be)
		}
		b.WriteString("  }\n")
	}
	b.WriteString("}\n")
	if _, err := runIn(context.Background(), n.NetnsPath, []byte(b.String()), "nft", "-f", "-"); err != nil {
		return err
	}
	n.nftTable = true
	return nil
}
