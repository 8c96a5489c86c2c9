package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/kubenode"
)

// The values of CrossNodeSettings.Mode.
const (
	CrossNodeOff        = "off"
	CrossNodeKubernetes = "kubernetes"
)

// CrossNodeSettings carry origins across nodes with settings from the
// Kubernetes API (internal/kubenode): this node's id, the cluster's
// members and key, the uplinks, and the names behind other nodes'
// workload ids.
type CrossNodeSettings struct {
	// Mode is CrossNodeOff (the default) or CrossNodeKubernetes.
	Mode string `json:"mode,omitempty"`
	// Namespace holds the id Leases (with the workload tables) and the
	// key Secret; empty: the agent's own (POD_NAMESPACE).
	Namespace string `json:"namespace,omitempty"`
	// Uplinks are interfaces to attach besides the detected ones
	// (kubenode.DetectUplinks).
	Uplinks []string `json:"uplinks,omitempty"`
	// Members are prefixes to trust besides the Nodes' InternalIPs and
	// pod CIDRs: the cluster's pod CIDR where the CNI allocates pod
	// addresses itself and Node.spec.podCIDRs is empty (Calico IPAM,
	// Cilium cluster-pool).
	Members []string `json:"members,omitempty"`
	// NoMAC trusts options from member addresses without a MAC (no key
	// Secret); docs/SECURITY.md says what that gives up.
	NoMAC bool `json:"noMAC,omitempty"`
	// MaxRemote bounds this node's records of other nodes' connections;
	// 0: a quarter of the table.
	MaxRemote uint32 `json:"maxRemote,omitempty"`
	// ResyncInterval is how often the node config is checked and put
	// right even when no Node changed (default 30s).
	ResyncInterval Duration `json:"resyncInterval,omitempty"`
	// PublishInterval is how often this node's workload table is compared
	// with what it published, and published again if it changed (default
	// 5s: every other agent receives each change).
	PublishInterval Duration `json:"publishInterval,omitempty"`
}

func (s *CrossNodeSettings) validate(c *Config) error {
	switch s.Mode {
	case "", CrossNodeOff:
		return nil
	case CrossNodeKubernetes:
	default:
		return fmt.Errorf("crossNode.mode: want %s or %s, got %q", CrossNodeOff, CrossNodeKubernetes, s.Mode)
	}
	switch {
	case c.ClusterFile != "":
		return errors.New("crossNode.mode kubernetes takes the other nodes from the API; clusterFile is for nodes outside Kubernetes: set one or the other")
	case c.NodeName == "":
		return errors.New("crossNode.mode kubernetes needs the node name (--node-name, NODE_NAME)")
	case s.namespace(c) == "":
		return errors.New("crossNode.mode kubernetes needs a namespace for its Leases (crossNode.namespace, or the agent's own: POD_NAMESPACE)")
	case s.MaxRemote > 1<<31:
		return errors.New("crossNode.maxRemote: too large")
	case s.ResyncInterval.Duration < time.Second || s.PublishInterval.Duration < 100*time.Millisecond:
		return errors.New("crossNode.resyncInterval: at least 1s; crossNode.publishInterval: at least 100ms")
	}
	for _, u := range s.Uplinks {
		if u == "" || len(u) > 15 {
			return fmt.Errorf("crossNode.uplinks: %q is no interface name", u)
		}
	}
	_, err := s.members()
	return err
}

func (s *CrossNodeSettings) members() ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, m := range s.Members {
		p, err := netip.ParsePrefix(m)
		if err == nil {
			err = datapath.MemberPrefixOK(p)
		}
		if err != nil {
			return nil, fmt.Errorf("crossNode.members %q: %w", m, err)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

func (s *CrossNodeSettings) namespace(c *Config) string {
	if s.Namespace != "" {
		return s.Namespace
	}
	return c.PodNamespace
}

// crossNode is the state of the cross-node loop.
type crossNode struct {
	c   *kubenode.Cluster
	mu  sync.Mutex
	id  uint16
	key []byte
	// applied: this process has written the node config once. The key
	// cannot be read back, so the first round always writes it.
	applied bool
	// refused are the interfaces already logged as unable to carry the
	// uplink programs, and leftOut the workloads last left out of the
	// published table (logged when they change, not every round).
	refused map[string]bool
	leftOut int
}

// crossNodeLoop claims this node's id and keeps its node config (members,
// uplinks) and its published workload table current until ctx ends.
func (a *Agent) crossNodeLoop(ctx context.Context, x *crossNode) {
	s := a.cfg.CrossNode
	wait := func(d time.Duration) bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	x.c.Start(ctx)
	for {
		err := x.c.WaitSynced(ctx, 30*time.Second)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		a.log.Error("across nodes: no view of the cluster yet", "err", err)
	}
	for {
		err := a.crossNodeSetup(ctx, x)
		if err == nil {
			break
		}
		a.log.Error("across nodes: not configured yet", "err", err)
		if !wait(10 * time.Second) {
			return
		}
	}
	resync := time.NewTicker(s.ResyncInterval.Duration)
	defer resync.Stop()
	publish := time.NewTicker(s.PublishInterval.Duration)
	defer publish.Stop()
	a.applyNode(ctx, x)
	a.publishWorkloads(ctx, x)
	for {
		select {
		case <-ctx.Done():
			return
		case <-x.c.Changed():
			a.applyNode(ctx, x)
		case <-resync.C:
			a.applyNode(ctx, x)
		case <-publish.C:
			a.publishWorkloads(ctx, x)
		}
	}
}

// crossNodeSetup claims the node id and reads (or makes) the key.
func (a *Agent) crossNodeSetup(ctx context.Context, x *crossNode) error {
	id, err := x.c.ClaimID(ctx, 0)
	if err != nil {
		return err
	}
	var key []byte
	if !a.cfg.CrossNode.NoMAC {
		if key, err = x.c.Key(ctx); err != nil {
			return err
		}
	}
	x.mu.Lock()
	x.id, x.key = id, key
	x.mu.Unlock()
	return nil
}

// applyNode makes the datapath's node config and uplinks what the API
// says. It is idempotent: an unchanged cluster changes nothing.
func (a *Agent) applyNode(ctx context.Context, x *crossNode) {
	if err := a.applyNodeOnce(ctx, x); err != nil {
		a.log.Error("across nodes: node config not applied", "err", err)
	}
}

func (a *Agent) applyNodeOnce(ctx context.Context, x *crossNode) error {
	s := a.cfg.CrossNode
	x.mu.Lock()
	id, key := x.id, x.key
	x.mu.Unlock()
	// The id's Lease gone (deleted by hand, or collected with a Node that
	// was deleted and registered again): claim again, the same id if it
	// is still free.
	if !x.c.OwnLease(id) {
		nid, err := x.c.ClaimID(ctx, id)
		if err != nil {
			return err
		}
		if nid != id {
			a.log.Warn("across nodes: this node's id changed", "was", id, "now", nid)
		}
		id = nid
		x.mu.Lock()
		x.id = id
		x.mu.Unlock()
	}
	self, err := x.c.Self()
	if err != nil {
		return err
	}
	nodes, err := x.c.Nodes()
	if err != nil {
		return err
	}
	extra, err := s.members()
	if err != nil {
		return err
	}
	members := kubenode.Members(nodes, extra, a.log)
	uplinks, refused, err := kubenode.DetectUplinks(self, nodes)
	if err != nil {
		return err
	}
	for name, why := range refused {
		if !x.refused[name] {
			a.log.Warn("across nodes: an interface towards other nodes cannot carry the uplink programs; connections through it arrive as misses", "ifname", name, "err", why)
		}
	}
	x.refused = map[string]bool{}
	for name := range refused {
		x.refused[name] = true
	}
	for _, u := range s.Uplinks {
		if !slices.Contains(uplinks, u) {
			uplinks = append(uplinks, u)
		}
	}
	mode, err := attach.ParseMode(a.cfg.Plugin.AttachMode)
	if err != nil {
		return err
	}
	d, err := datapath.OpenExisting(a.cfg.Plugin.PinPath, a.log)
	if err != nil {
		return err
	}
	defer d.Close()
	have, err := d.Uplinks()
	if err != nil {
		return err
	}
	// Uplinks first, as pktmetactl node set does: until the node has its
	// id they only neutralise and strip.
	var errs []error
	for _, u := range uplinks {
		i := slices.IndexFunc(have, func(h datapath.Uplink) bool { return h.IfName == u })
		if i >= 0 && have[i].Attached() {
			continue
		}
		if _, err := d.AttachUplink(u, mode); err != nil {
			errs = append(errs, err)
		}
	}
	// An uplink no longer detected stays: detection can miss an interface
	// for a moment (an address renewed, routes being rewritten), an
	// operator may have attached it, and the programs on an interface that
	// leads nowhere cost +4 ns a segment and keep stripping options. Only
	// a gone interface's record is removed.
	for _, h := range have {
		if h.Ifindex == 0 {
			a.log.Info("across nodes: uplink interface gone; removing its record", "ifname", h.IfName)
			errs = append(errs, d.DetachUplink(h.IfName))
		}
	}
	cfg := datapath.NodeConfig{ID: id, Members: members, Key: key, MaxRemote: s.MaxRemote}
	if cfg.MaxRemote == 0 {
		cfg.MaxRemote = d.Capacity() / 4
	}
	cur, err := d.Node()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if cur.ID != cfg.ID || cur.MAC != (key != nil) || cur.MaxRemote != cfg.MaxRemote || !slices.Equal(cur.Members, members) || !x.wasApplied() {
		if err := d.SetNode(cfg); err != nil {
			return errors.Join(append(errs, err)...)
		}
		x.mu.Lock()
		x.applied = true
		x.mu.Unlock()
		a.log.Info("across nodes: node config applied", "id", id, "members", len(members), "mac", key != nil, "uplinks", uplinks)
	}
	return errors.Join(errs...)
}

// publishWorkloads publishes this node's workload table when it changed.
func (a *Agent) publishWorkloads(ctx context.Context, x *crossNode) {
	a.mu.Lock()
	d := a.d
	a.mu.Unlock()
	ws, err := d.Workloads()
	if err != nil {
		a.log.Warn("across nodes: read workloads", "err", err)
		return
	}
	t, left := kubenode.MakeTable(a.cfg.NodeName, ws)
	if left > 0 && left != x.leftOut {
		a.log.Warn("across nodes: workload table too large to publish whole; the newest workloads are not named on other nodes", "left out", left)
	}
	x.leftOut = left
	x.mu.Lock()
	id := x.id
	x.mu.Unlock()
	if _, err := x.c.Publish(ctx, id, t); err != nil {
		a.log.Warn("across nodes", "err", err)
	}
}

func (x *crossNode) wasApplied() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.applied
}
