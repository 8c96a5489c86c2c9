// Package kubenode gives a node its place among the other nodes from the
// Kubernetes API, for carrying origins across nodes (datapath.NodeConfig):
//
//   - its node id: a Lease "node-id-<id>" in pktmeta's namespace, held by
//     the node's name and owned by its Node object, so that the garbage
//     collector frees the id when the Node is deleted;
//   - the cluster's members: every Node's InternalIP addresses and pod
//     CIDRs;
//   - the cluster key: a Secret in the same namespace, made by the first
//     agent that finds none;
//   - the names behind other nodes' workload ids: each agent publishes its
//     node's workload table (ids, pods, tags) in an annotation of its id
//     Lease, which every other agent watches. Nothing is asked of the API
//     per connection.
//
// Leases rather than ConfigMaps: the agents may write Leases in their
// namespace, and nothing else there is a Lease, so that write access
// reaches none of pktmeta's settings (the pktmeta-config ConfigMap).
package kubenode

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/pktmeta/pktmeta/internal/datapath"
	corev1 "k8s.io/api/core/v1"
)

// Names and labels of the objects in the nodes namespace.
const (
	// KeySecret holds the cluster key under KeySecretField, as hex.
	KeySecret      = "pktmeta-cluster-key"
	KeySecretField = "key"

	leasePrefix = "node-id-"
	// WorkloadsAnnotation holds the node's published workload table
	// (Table, JSON) on its id Lease.
	WorkloadsAnnotation = "pktmeta.dev/workloads"

	// LabelName marks every object the agents make; LabelRole says which
	// kind it is.
	LabelName = "app.kubernetes.io/name"
	LabelRole = "pktmeta.dev/role"
	roleID    = "node-id"
)

// leaseName is the Lease that reserves id.
func leaseName(id uint16) string { return leasePrefix + strconv.Itoa(int(id)) }

// leaseID is the id a Lease name reserves, 0 for another name.
func leaseID(name string) uint16 {
	s, ok := strings.CutPrefix(name, leasePrefix)
	if !ok {
		return 0
	}
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || strconv.FormatUint(n, 10) != s {
		return 0
	}
	return uint16(n)
}

// Members are the prefixes options go to and are honoured from: every
// node's InternalIP addresses (as /32 and /128) and its pod CIDRs, and
// extra (the operator's: a cluster pod CIDR the Nodes do not show). A pod
// CIDR wider than datapath.MemberPrefixOK allows is left out and logged:
// it would make most of the address space a member.
func Members(nodes []*corev1.Node, extra []netip.Prefix, log *slog.Logger) []netip.Prefix {
	seen := map[netip.Prefix]bool{}
	var out []netip.Prefix
	add := func(p netip.Prefix) {
		p = p.Masked()
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	for _, p := range extra {
		add(p)
	}
	for _, n := range nodes {
		for _, a := range InternalIPs(n) {
			add(netip.PrefixFrom(a, a.BitLen()))
		}
		for _, c := range podCIDRs(n) {
			p, err := netip.ParsePrefix(c)
			if err == nil {
				err = datapath.MemberPrefixOK(p)
			}
			if err != nil {
				log.Warn("a node's pod CIDR is not made a member", "node", n.Name, "podCIDR", c, "err", err)
				continue
			}
			add(p)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	if len(out) > datapath.MaxMembers {
		log.Error("more member prefixes than the member table holds; the rest are not members", "prefixes", len(out), "max", datapath.MaxMembers)
		out = out[:datapath.MaxMembers]
	}
	return out
}

// podCIDRs are a node's pod CIDRs, from the older single field when the
// list is empty.
func podCIDRs(n *corev1.Node) []string {
	if len(n.Spec.PodCIDRs) == 0 && n.Spec.PodCIDR != "" {
		return []string{n.Spec.PodCIDR}
	}
	return n.Spec.PodCIDRs
}

// InternalIPs are a node's InternalIP addresses.
func InternalIPs(n *corev1.Node) []netip.Addr {
	var out []netip.Addr
	for _, a := range n.Status.Addresses {
		if a.Type != corev1.NodeInternalIP {
			continue
		}
		ip, err := netip.ParseAddr(a.Address)
		if err != nil {
			continue
		}
		out = append(out, ip.Unmap())
	}
	return out
}

// errNoNode wraps a Node the API does not have.
func errNoNode(name string, err error) error {
	return fmt.Errorf("node %s: %w", name, err)
}
