package testbed

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
)

// A Cluster is two or more Nodes wired together the way a real cluster's
// nodes are: a "fabric" namespace holds a bridge (the L2 network between
// the machines), each node has an eth0 on it, and either routes to the
// other nodes' pod CIDRs through their eth0 address (native routing, as
// host-gw, Calico without encapsulation, or a cloud's routes do) or a VXLAN
// device with static FDB and neighbour entries (as flannel's vxlan backend
// sets up), over which those routes go. Each node keeps everything of a
// Node: its own pods, conflist, conntrack and nftables.
//
// Addresses: node i (1-based) is 192.168.50.(10+i) and fd00:50::(10+i) on
// the fabric, and its pods get 10.244.i.0/24 and fd00:10:244:i::/64.

// Underlay addressing of the fabric.
const (
	fabricPrefix4 = "192.168.50.0/24"
	fabricPrefix6 = "fd00:50::/64"
	vxlanID       = 42
	// vxlanDev has a dot in its name, as flannel.1 and vxlan.calico do.
	vxlanDev  = "vxlan.pm"
	vxlanPort = 4789
	// VXLANMTU leaves room for the 50 bytes of VXLAN over IPv4.
	VXLANMTU = 1450
)

// ClusterConfig describes a cluster.
type ClusterConfig struct {
	// Nodes is how many nodes; default 2.
	Nodes int
	// Node is the template of every node's Config; Subnet4, Subnet6 and
	// Chain are set per node.
	Node Config
	// Chain returns node i's plugins after ptp (e.g. pktmeta with the
	// node's own pin path).
	Chain func(i int) []map[string]any
	// VXLAN puts a VXLAN device between the nodes and routes the pod
	// CIDRs over it; otherwise they are routed natively over eth0.
	VXLAN bool
}

// ClusterNode is one node of a Cluster.
type ClusterNode struct {
	*Node
	Index        int        // 1-based
	Addr4, Addr6 netip.Addr // its eth0 on the fabric
	PodCIDR4     netip.Prefix
	PodCIDR6     netip.Prefix
	// Uplink is the interface traffic to other nodes' pods leaves by:
	// eth0, or the VXLAN device (vxlan.pm, which sees the inner packets).
	Uplink string
}

// Cluster is the nodes and the fabric between them.
type Cluster struct {
	ID    string
	Nodes []*ClusterNode
	VXLAN bool
	// FabricNetnsPath is the namespace holding the bridge.
	FabricNetnsPath string
}

func nodeMAC(i int) string { return fmt.Sprintf("02:00:00:00:42:%02x", i) }

// NewCluster creates the fabric and the nodes, and wires them. On error,
// whatever was created is removed.
func NewCluster(cfg ClusterConfig) (_ *Cluster, err error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 2
	}
	if cfg.Nodes < 2 || cfg.Nodes > 9 {
		return nil, fmt.Errorf("new cluster: %d nodes, want 2-9", cfg.Nodes)
	}
	id, err := newID()
	if err != nil {
		return nil, fmt.Errorf("new cluster: %w", err)
	}
	c := &Cluster{ID: id, VXLAN: cfg.VXLAN}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	fabric := filepath.Join(netnsDir, id+"-fabric")
	if err := newNetns(fabric); err != nil {
		return nil, fmt.Errorf("new cluster: %w", err)
	}
	c.FabricNetnsPath = fabric
	ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
	defer cancel()
	ipFabric := func(args ...string) error {
		if out, err := runIn(ctx, fabric, nil, "ip", args...); err != nil {
			return fmt.Errorf("fabric: ip %v: %w: %s", args, err, out)
		}
		return nil
	}
	if err := ipFabric("link", "add", "br0", "type", "bridge"); err != nil {
		return nil, err
	}
	if err := ipFabric("link", "set", "br0", "up"); err != nil {
		return nil, err
	}
	if err := ipFabric("link", "set", "lo", "up"); err != nil {
		return nil, err
	}

	for i := 1; i <= cfg.Nodes; i++ {
		nc := cfg.Node
		nc.Subnet4 = fmt.Sprintf("10.244.%d.0/24", i)
		nc.Subnet6 = fmt.Sprintf("fd00:10:244:%d::/64", i)
		if cfg.Chain != nil {
			nc.Chain = cfg.Chain(i)
		}
		if cfg.VXLAN {
			nc.MTU = VXLANMTU
		}
		n, err := NewNode(nc)
		if err != nil {
			return nil, fmt.Errorf("new cluster: node %d: %w", i, err)
		}
		cn := &ClusterNode{
			Node:     n,
			Index:    i,
			Addr4:    netip.MustParseAddr(fmt.Sprintf("192.168.50.%d", 10+i)),
			Addr6:    netip.MustParseAddr(fmt.Sprintf("fd00:50::%d", 10+i)),
			PodCIDR4: netip.MustParsePrefix(nc.Subnet4),
			PodCIDR6: netip.MustParsePrefix(nc.Subnet6),
			Uplink:   "eth0",
		}
		c.Nodes = append(c.Nodes, cn)
		port := fmt.Sprintf("n%d", i)
		// Created in the fabric, the node's end moved into the node.
		if err := ipFabric("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", filepath.Base(n.NetnsPath)); err != nil {
			return nil, err
		}
		if err := ipFabric("link", "set", port, "master", "br0", "up"); err != nil {
			return nil, err
		}
		if err := cn.ip(ctx, "addr", "add", cn.Addr4.String()+"/24", "dev", "eth0"); err != nil {
			return nil, err
		}
		if err := cn.ip(ctx, "addr", "add", cn.Addr6.String()+"/64", "dev", "eth0", "nodad"); err != nil {
			return nil, err
		}
		if err := cn.ip(ctx, "link", "set", "eth0", "up"); err != nil {
			return nil, err
		}
	}
	for _, n := range c.Nodes {
		if err := c.wire(ctx, n); err != nil {
			return nil, fmt.Errorf("new cluster: node %d: %w", n.Index, err)
		}
	}
	return c, nil
}

func (n *ClusterNode) ip(ctx context.Context, args ...string) error {
	if out, err := runIn(ctx, n.NetnsPath, nil, "ip", args...); err != nil {
		return fmt.Errorf("node %d: ip %v: %w: %s", n.Index, args, err, out)
	}
	return nil
}

// wire gives n its routes to every other node's pods.
func (c *Cluster) wire(ctx context.Context, n *ClusterNode) error {
	if c.VXLAN {
		n.Uplink = vxlanDev
		steps := [][]string{
			{"link", "add", vxlanDev, "address", nodeMAC(n.Index), "type", "vxlan", "id", fmt.Sprint(vxlanID),
				"local", n.Addr4.String(), "dev", "eth0", "dstport", fmt.Sprint(vxlanPort), "nolearning"},
			{"link", "set", vxlanDev, "mtu", fmt.Sprint(VXLANMTU), "up"},
			// flannel's way: the device holds the .0 of the node's pod CIDR.
			{"addr", "add", n.PodCIDR4.Addr().String() + "/32", "dev", vxlanDev},
			{"addr", "add", n.PodCIDR6.Addr().String() + "/128", "dev", vxlanDev, "nodad"},
		}
		for _, s := range steps {
			if err := n.ip(ctx, s...); err != nil {
				return err
			}
		}
	}
	for _, o := range c.Nodes {
		if o == n {
			continue
		}
		var steps [][]string
		if c.VXLAN {
			gw4, gw6 := o.PodCIDR4.Addr().String(), o.PodCIDR6.Addr().String()
			steps = [][]string{
				{"neigh", "add", gw4, "lladdr", nodeMAC(o.Index), "dev", vxlanDev, "nud", "permanent"},
				{"-6", "neigh", "add", gw6, "lladdr", nodeMAC(o.Index), "dev", vxlanDev, "nud", "permanent"},
				{"route", "add", o.PodCIDR4.String(), "via", gw4, "dev", vxlanDev, "onlink"},
				{"-6", "route", "add", o.PodCIDR6.String(), "via", gw6, "dev", vxlanDev, "onlink"},
			}
			if out, err := runIn(ctx, n.NetnsPath, nil, "bridge", "fdb", "append", nodeMAC(o.Index), "dev", vxlanDev, "dst", o.Addr4.String()); err != nil {
				return fmt.Errorf("bridge fdb: %w: %s", err, out)
			}
		} else {
			steps = [][]string{
				{"route", "add", o.PodCIDR4.String(), "via", o.Addr4.String(), "dev", "eth0"},
				{"-6", "route", "add", o.PodCIDR6.String(), "via", o.Addr6.String(), "dev", "eth0"},
			}
		}
		for _, s := range steps {
			if err := n.ip(ctx, s...); err != nil {
				return err
			}
		}
	}
	return nil
}

// Close closes every node, then the fabric. Idempotent.
func (c *Cluster) Close() error {
	var errs []error
	for _, n := range c.Nodes {
		errs = append(errs, n.Close())
	}
	c.Nodes = nil
	if c.FabricNetnsPath != "" {
		errs = append(errs, removeNetns(c.FabricNetnsPath))
		c.FabricNetnsPath = ""
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close cluster %s: %w", c.ID, err)
	}
	return nil
}
