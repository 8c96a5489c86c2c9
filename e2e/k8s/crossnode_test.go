package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/kubenode"
)

// nodeShow is `pktmetactl node show -o json`.
type nodeShow struct {
	ID      uint16            `json:"id"`
	MAC     bool              `json:"mac"`
	Members []netip.Prefix    `json:"members"`
	Uplinks []datapath.Uplink `json:"uplinks"`
}

func (n *nodeProbe) nodeShow(t *testing.T) (nodeShow, error) {
	t.Helper()
	out, err := n.c.exec(ctxT(t), n.ns, n.name, nil, "pktmetactl", "--pin-path", pinPathNode, "node", "show", "-o", "json")
	var st nodeShow
	if err != nil {
		return st, fmt.Errorf("pktmetactl node show: %v: %s", err, out)
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("pktmetactl node show: %v in %q", err, out)
	}
	return st, nil
}

// acrossNodes: the agent configures the node for carrying origins across
// nodes from the API alone (crossNode.mode kubernetes, the default): its
// id from a Lease owned by its Node, the cluster key from a Secret it
// makes, members from the Nodes, the uplink detected from the node's
// address, its workload table published for the other nodes. Nodes that
// join and leave (Node objects without a kubelet, each claiming an id as
// its agent would) change the members and free their ids.
func (s *suite) acrossNodes(t *testing.T) {
	ctx := ctxT(t)
	sys := s.c.cfg.systemNamespace
	node, err := s.c.client.CoreV1().Nodes().Get(ctx, s.nodeName(t), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nodeIP := netip.MustParseAddr(s.c.nodeIP(t))

	var id uint16
	t.Run("the node's id is a Lease its Node owns", func(t *testing.T) {
		poll(t, "a node id Lease held by "+node.Name, time.Minute, func() error {
			ls, err := s.c.client.CoordinationV1().Leases(sys).List(ctx, metav1.ListOptions{LabelSelector: kubenode.LabelRole + "=node-id"})
			if err != nil {
				return err
			}
			for _, l := range ls.Items {
				if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != node.Name {
					continue
				}
				if len(l.OwnerReferences) != 1 || l.OwnerReferences[0].Kind != "Node" || l.OwnerReferences[0].UID != node.UID {
					return fmt.Errorf("Lease %s owners %+v, want the Node %s", l.Name, l.OwnerReferences, node.UID)
				}
				if _, err := fmt.Sscanf(l.Name, "node-id-%d", &id); err != nil || id == 0 {
					return fmt.Errorf("Lease name %q", l.Name)
				}
				return nil
			}
			return fmt.Errorf("none among %d Leases", len(ls.Items))
		})
	})
	if id == 0 {
		t.FailNow()
	}

	t.Run("the agent made the cluster key", func(t *testing.T) {
		sec, err := s.c.client.CoreV1().Secrets(sys).Get(ctx, kubenode.KeySecret, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kubenode.ParseKey(sec.Data[kubenode.KeySecretField]); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("the datapath has the id, the MAC, the members and the uplink", func(t *testing.T) {
		poll(t, "node show", time.Minute, func() error {
			st, err := s.probe.nodeShow(t)
			if err != nil {
				return err
			}
			if st.ID != id || !st.MAC {
				return fmt.Errorf("id %d MAC %v, want %d with a MAC", st.ID, st.MAC, id)
			}
			if !slices.Contains(st.Members, netip.PrefixFrom(nodeIP, nodeIP.BitLen())) {
				return fmt.Errorf("members %v lack the node's address %s", st.Members, nodeIP)
			}
			for _, c := range node.Spec.PodCIDRs {
				if !slices.Contains(st.Members, netip.MustParsePrefix(c)) {
					return fmt.Errorf("members %v lack the node's pod CIDR %s", st.Members, c)
				}
			}
			// The uplink is the interface that holds the node's address.
			hooks := s.probe.hooks(t)
			if len(st.Uplinks) == 0 {
				return fmt.Errorf("no uplinks")
			}
			for _, u := range st.Uplinks {
				if u.Ifindex == 0 {
					return fmt.Errorf("uplink %s is gone", u.IfName)
				}
				for _, h := range u.Hooks {
					if !h.OK {
						return fmt.Errorf("uplink %s: %s", u.IfName, h.Problem)
					}
				}
				if _, ok := pktmetaHook(hooks[u.IfName].Ingress); !ok {
					return fmt.Errorf("uplink %s: no pktmeta program on its ingress hook: %+v", u.IfName, hooks[u.IfName])
				}
			}
			return nil
		})
	})

	t.Run("its workload table names its pods for the other nodes", func(t *testing.T) {
		// Read as another node's agent reads it: the same watch, from here.
		view := kubenode.New(s.c.client, sys, "observer", slog.New(slog.DiscardHandler))
		vctx, cancel := context.WithCancel(ctx)
		defer cancel()
		view.Start(vctx)
		if err := view.WaitSynced(vctx, time.Minute); err != nil {
			t.Fatal(err)
		}
		poll(t, "the web pod in node "+node.Name+"'s published table", time.Minute, func() error {
			if got := view.NodeName(id); got != node.Name {
				return fmt.Errorf("node id %d names %q, want %s", id, got, node.Name)
			}
			l, err := s.c.client.CoordinationV1().Leases(sys).Get(ctx, fmt.Sprintf("node-id-%d", id), metav1.GetOptions{})
			if err != nil {
				return err
			}
			var tab kubenode.Table
			if err := json.Unmarshal([]byte(l.Annotations[kubenode.WorkloadsAnnotation]), &tab); err != nil {
				return fmt.Errorf("annotation %s: %v", kubenode.WorkloadsAnnotation, err)
			}
			for _, w := range tab.Workloads {
				if w.UID != string(s.web.UID) {
					continue
				}
				got, ok := view.Workload(id, w.ID)
				if !ok || got.Namespace != s.web.Namespace || got.Pod != s.web.Name || got.UID != string(s.web.UID) {
					return fmt.Errorf("workload %d of node %d resolves to %+v (%v), want %s/%s", w.ID, id, got, ok, s.web.Namespace, s.web.Name)
				}
				return nil
			}
			return fmt.Errorf("pod %s/%s (uid %s) not among the %d published workloads", s.web.Namespace, s.web.Name, s.web.UID, len(tab.Workloads))
		})
	})

	t.Run("a Lease deleted by hand is claimed again, with the same id", func(t *testing.T) {
		name := fmt.Sprintf("node-id-%d", id)
		old, err := s.c.client.CoordinationV1().Leases(sys).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.c.client.CoordinationV1().Leases(sys).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// The agent's Lease watch wakes it: no waiting for the resync.
		poll(t, "the node's Lease back", 20*time.Second, func() error {
			l, err := s.c.client.CoordinationV1().Leases(sys).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if l.UID == old.UID || l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != node.Name {
				return fmt.Errorf("Lease %s uid %s holder %v", name, l.UID, l.Spec.HolderIdentity)
			}
			return nil
		})
		if ls := s.nodeLeases(t, node.Name); len(ls) != 1 {
			t.Errorf("Leases held by %s: %v, want just %s", node.Name, ls, name)
		}
	})

	t.Run("nodes join and leave", func(t *testing.T) {
		// Two Nodes without a kubelet (unschedulable, tainted, without the
		// os label the DaemonSet selects), each claiming its id as its agent
		// would, at the same moment.
		type ghost struct {
			name string
			ip   netip.Addr
			cidr netip.Prefix
			id   uint16
		}
		ghosts := []*ghost{
			{name: "pktmeta-e2e-ghost-a", ip: netip.MustParseAddr("198.51.100.201"), cidr: netip.MustParsePrefix("10.251.1.0/24")},
			{name: "pktmeta-e2e-ghost-b", ip: netip.MustParseAddr("198.51.100.202"), cidr: netip.MustParsePrefix("10.251.2.0/24")},
		}
		for _, g := range ghosts {
			t.Cleanup(func() {
				err := s.c.client.CoreV1().Nodes().Delete(context.Background(), g.name, metav1.DeleteOptions{})
				if err != nil && !apierrors.IsNotFound(err) {
					t.Errorf("delete Node %s: %v", g.name, err)
				}
			})
			n := &corev1.Node{
				ObjectMeta: metav1.ObjectMeta{Name: g.name, Labels: map[string]string{"pktmeta.dev/e2e": "ghost"}},
				Spec: corev1.NodeSpec{
					PodCIDRs:      []string{g.cidr.String()},
					PodCIDR:       g.cidr.String(),
					Unschedulable: true,
					Taints:        []corev1.Taint{{Key: "pktmeta.dev/e2e-ghost", Effect: corev1.TaintEffectNoSchedule}},
				},
			}
			if _, err := s.c.client.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
				t.Fatalf("create Node %s: %v", g.name, err)
			}
			// The status as a kubelet writes it; the controller-manager
			// writes the new Node too (taints), so a conflict is retried
			// on the latest version.
			err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
				cur, err := s.c.client.CoreV1().Nodes().Get(ctx, g.name, metav1.GetOptions{})
				if err != nil {
					return err
				}
				cur.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: g.ip.String()}}
				_, err = s.c.client.CoreV1().Nodes().UpdateStatus(ctx, cur, metav1.UpdateOptions{})
				return err
			})
			if err != nil {
				t.Fatalf("Node %s status: %v", g.name, err)
			}
		}
		var wg sync.WaitGroup
		errs := make([]error, len(ghosts))
		for i, g := range ghosts {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := kubenode.New(s.c.client, sys, g.name, slog.New(slog.DiscardHandler))
				g.id, errs[i] = c.ClaimID(ctx, 0)
			}()
		}
		wg.Wait()
		for i, g := range ghosts {
			if errs[i] != nil {
				t.Fatalf("%s claims an id: %v", g.name, errs[i])
			}
		}
		if ids := []uint16{id, ghosts[0].id, ghosts[1].id}; ids[1] == ids[2] || ids[1] == id || ids[2] == id || ids[1] == 0 || ids[2] == 0 {
			t.Fatalf("ids %v: want three different ids, none 0", ids)
		}
		// The agent watches Nodes: the newcomers are members at once.
		poll(t, "the joining nodes' addresses and pod CIDRs among the members", time.Minute, func() error {
			st, err := s.probe.nodeShow(t)
			if err != nil {
				return err
			}
			for _, g := range ghosts {
				for _, p := range []netip.Prefix{netip.PrefixFrom(g.ip, 32), g.cidr} {
					if !slices.Contains(st.Members, p) {
						return fmt.Errorf("members %v lack %s (%s)", st.Members, p, g.name)
					}
				}
			}
			return nil
		})

		// One leaves: the garbage collector removes its id's Lease (the
		// Node owns it) and the agent drops its prefixes; the other stays.
		gone := ghosts[0]
		if err := s.c.client.CoreV1().Nodes().Delete(ctx, gone.name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		poll(t, gone.name+"'s id freed and its prefixes no longer members", 2*time.Minute, func() error {
			_, err := s.c.client.CoordinationV1().Leases(sys).Get(ctx, fmt.Sprintf("node-id-%d", gone.id), metav1.GetOptions{})
			if !apierrors.IsNotFound(err) {
				return fmt.Errorf("Lease node-id-%d: %v, want it collected", gone.id, err)
			}
			st, err := s.probe.nodeShow(t)
			if err != nil {
				return err
			}
			var left []string
			for _, p := range st.Members {
				if p == gone.cidr || p.Addr() == gone.ip {
					left = append(left, p.String())
				}
			}
			if len(left) > 0 || !slices.Contains(st.Members, ghosts[1].cidr) {
				return fmt.Errorf("members %v: want %s's gone (left %s) and %s's there", st.Members, gone.name, strings.Join(left, ","), ghosts[1].name)
			}
			return nil
		})
		// The node that stays keeps its id.
		if _, err := s.c.client.CoordinationV1().Leases(sys).Get(ctx, fmt.Sprintf("node-id-%d", ghosts[1].id), metav1.GetOptions{}); err != nil {
			t.Errorf("the remaining node's Lease: %v", err)
		}
	})
}

// nodeLeases are the node id Leases held by name.
func (s *suite) nodeLeases(t *testing.T, name string) []string {
	t.Helper()
	ls, err := s.c.client.CoordinationV1().Leases(s.c.cfg.systemNamespace).List(ctxT(t), metav1.ListOptions{LabelSelector: kubenode.LabelRole + "=node-id"})
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range ls.Items {
		if l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == name {
			out = append(out, l.Name)
		}
	}
	return out
}

// nodeName is the one node's name.
func (s *suite) nodeName(t *testing.T) string {
	t.Helper()
	nodes, err := s.c.client.CoreV1().Nodes().List(ctxT(t), metav1.ListOptions{LabelSelector: "kubernetes.io/os=linux"})
	if err != nil || len(nodes.Items) != 1 {
		t.Fatalf("nodes: %v (%d)", err, len(nodes.Items))
	}
	return nodes.Items[0].Name
}
