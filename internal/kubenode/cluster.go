package kubenode

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	coordlisters "k8s.io/client-go/listers/coordination/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// Cluster is one node's view of the others, kept current by watches on
// Nodes (cluster-wide) and on pktmeta's Leases in its namespace. It is a
// view.Remote.
type Cluster struct {
	cs        kubernetes.Interface
	namespace string
	nodeName  string
	log       *slog.Logger

	nodes  corelisters.NodeLister
	leases coordlisters.LeaseNamespaceLister
	synced []cache.InformerSynced

	// changed is signalled (without blocking) when a Node changes.
	changed chan struct{}

	mu      sync.Mutex
	idNames map[uint16]string      // node id -> node name, from the Leases
	parsed  map[uint16]parsedTable // node id -> its published table
}

type parsedTable struct {
	resourceVersion string
	byID            map[uint32]datapath.Workload
}

// New returns the view; Start runs its watches.
func New(cs kubernetes.Interface, namespace, nodeName string, log *slog.Logger) *Cluster {
	return &Cluster{cs: cs, namespace: namespace, nodeName: nodeName, log: log,
		changed: make(chan struct{}, 1), idNames: map[uint16]string{}, parsed: map[uint16]parsedTable{}}
}

// Start runs the watches until ctx ends. Call it once; WaitSynced waits
// for their first lists.
func (c *Cluster) Start(ctx context.Context) {
	// Only what the agent reads is kept: Nodes and Leases come without
	// their managedFields (and Nodes without images and volumes), which
	// are most of their size.
	trim := informers.WithTransform(func(obj any) (any, error) {
		switch o := obj.(type) {
		case *corev1.Node:
			o.ManagedFields = nil
			o.Status.Images = nil
			o.Status.VolumesAttached, o.Status.VolumesInUse = nil, nil
		case *coordinationv1.Lease:
			o.ManagedFields = nil
		}
		return obj, nil
	})
	all := informers.NewSharedInformerFactoryWithOptions(c.cs, 10*time.Minute, trim)
	ours := informers.NewSharedInformerFactoryWithOptions(c.cs, 10*time.Minute, trim,
		informers.WithNamespace(c.namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelRole + "=" + roleID }))

	nodes := all.Core().V1().Nodes()
	nodes.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.signal() },
		// Kubelets update their Node's status every few seconds: only a
		// change of what the node config is made of counts.
		UpdateFunc: func(o, n any) {
			if a, ok := o.(*corev1.Node); ok {
				if b, ok := n.(*corev1.Node); ok && !nodeConfigChanged(a, b) {
					return
				}
			}
			c.signal()
		},
		DeleteFunc: func(any) { c.signal() },
	})
	leases := ours.Coordination().V1().Leases()
	leases.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { c.leaseSeen(o, false) },
		UpdateFunc: func(_, o any) { c.leaseSeen(o, false) },
		DeleteFunc: func(o any) { c.leaseSeen(o, true) },
	})
	c.nodes, c.leases = nodes.Lister(), leases.Lister().Leases(c.namespace)
	c.synced = []cache.InformerSynced{nodes.Informer().HasSynced, leases.Informer().HasSynced}
	all.Start(ctx.Done())
	ours.Start(ctx.Done())
}

// WaitSynced waits for the watches' first lists, at most timeout.
func (c *Cluster) WaitSynced(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if !cache.WaitForCacheSync(ctx.Done(), c.synced...) {
		return fmt.Errorf("the watches of Nodes and of Leases in %s have not listed after %s (API down? RBAC: see deploy/rbac.yaml)", c.namespace, timeout)
	}
	return nil
}

func (c *Cluster) signal() {
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

// nodeConfigChanged reports whether anything the node config is made of
// (UID, InternalIPs, pod CIDRs) differs between two versions of a Node.
func nodeConfigChanged(a, b *corev1.Node) bool {
	return a.UID != b.UID || !slices.Equal(InternalIPs(a), InternalIPs(b)) || !slices.Equal(podCIDRs(a), podCIDRs(b))
}

// Changed is signalled when the node config may have to change: a Node
// added, deleted, or changed in its addresses or pod CIDRs, or this
// node's id Lease changed or gone.
func (c *Cluster) Changed() <-chan struct{} { return c.changed }

func (c *Cluster) leaseSeen(obj any, deleted bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	l, ok := obj.(*coordinationv1.Lease)
	if !ok {
		return
	}
	id := leaseID(l.Name)
	if id == 0 {
		return
	}
	c.mu.Lock()
	was := c.idNames[id]
	if deleted || l.Spec.HolderIdentity == nil {
		delete(c.idNames, id)
		delete(c.parsed, id)
	} else {
		c.idNames[id] = *l.Spec.HolderIdentity
	}
	now := c.idNames[id]
	c.mu.Unlock()
	// This node's Lease gone or taken over: the loop must claim again
	// now, not at the next resync, or another node may get the id
	// while this one still uses it.
	if (was == c.nodeName) != (now == c.nodeName) {
		c.signal()
	}
}

// OwnLease reports whether the Lease of id is this node's: held by its
// name and owned by its current Node object.
func (c *Cluster) OwnLease(id uint16) bool {
	self, err := c.Self()
	if err != nil {
		return false
	}
	l, err := c.leases.Get(leaseName(id))
	if err != nil {
		return false
	}
	return l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == c.nodeName && ownedBy(l.OwnerReferences, self)
}

// Nodes are the cluster's Nodes as last seen.
func (c *Cluster) Nodes() ([]*corev1.Node, error) {
	ns, err := c.nodes.List(labels.Everything())
	if err != nil {
		return nil, err
	}
	slices.SortFunc(ns, func(a, b *corev1.Node) int { return strings.Compare(a.Name, b.Name) })
	return ns, nil
}

// Self is this node's Node.
func (c *Cluster) Self() (*corev1.Node, error) {
	n, err := c.nodes.Get(c.nodeName)
	if err != nil {
		return nil, errNoNode(c.nodeName, err)
	}
	return n, nil
}

// ClaimID returns this node's id: the one its Lease already holds, or
// prefer if it is free (the id the node had: records on other nodes keep
// naming it rightly), or the lowest free one, reserved by creating its
// Lease. Creating is the reservation: of two agents racing for one id,
// the API lets one create the Lease and the other moves on. A Lease held
// by this node's name but owned by an older Node of that name (deleted
// and registered again) is removed; the garbage collector would remove it
// too.
func (c *Cluster) ClaimID(ctx context.Context, prefer uint16) (uint16, error) {
	self, err := c.cs.CoreV1().Nodes().Get(ctx, c.nodeName, metav1.GetOptions{})
	if err != nil {
		return 0, errNoNode(c.nodeName, err)
	}
	leases := c.cs.CoordinationV1().Leases(c.namespace)
	list, err := leases.List(ctx, metav1.ListOptions{LabelSelector: LabelRole + "=" + roleID})
	if err != nil {
		return 0, fmt.Errorf("list node id Leases in %s: %w", c.namespace, err)
	}
	used := map[uint16]bool{}
	for _, l := range list.Items {
		id := leaseID(l.Name)
		if id == 0 {
			continue
		}
		if l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity == c.nodeName {
			if ownedBy(l.OwnerReferences, self) {
				return id, nil
			}
			err := leases.Delete(ctx, l.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &l.UID}})
			if err != nil && !apierrors.IsNotFound(err) {
				return 0, fmt.Errorf("remove the Lease %s of an earlier node %s: %w", l.Name, c.nodeName, err)
			}
			c.log.Info("removed the node id Lease of an earlier node of this name", "lease", l.Name)
			continue
		}
		used[id] = true
	}
	holder := c.nodeName
	for i := 0; i <= 65535; i++ {
		id := uint16(i)
		if i == 0 {
			id = prefer
		}
		if id == 0 || used[id] || (i > 0 && id == prefer) {
			continue
		}
		l := &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{
				Name:      leaseName(id),
				Namespace: c.namespace,
				Labels:    map[string]string{LabelName: "pktmeta", LabelRole: roleID},
				// The Node owns its id: deleting the Node frees it.
				OwnerReferences: []metav1.OwnerReference{nodeOwner(self)},
			},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: &holder},
		}
		_, err := leases.Create(ctx, l, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			continue // another node took it since the list
		}
		if err != nil {
			return 0, fmt.Errorf("create the node id Lease %s in %s: %w", l.Name, c.namespace, err)
		}
		c.log.Info("node id claimed", "id", id, "lease", l.Name)
		return id, nil
	}
	return 0, errors.New("all 65535 node ids are taken")
}

func nodeOwner(n *corev1.Node) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: n.Name, UID: n.UID}
}

func ownedBy(refs []metav1.OwnerReference, n *corev1.Node) bool {
	return slices.ContainsFunc(refs, func(r metav1.OwnerReference) bool { return r.Kind == "Node" && r.UID == n.UID })
}

// Key returns the cluster key from its Secret, making the Secret with a
// random key when there is none yet. Of agents racing to make it, one
// wins and the others read its key.
func (c *Cluster) Key(ctx context.Context) ([]byte, error) {
	secrets := c.cs.CoreV1().Secrets(c.namespace)
	for range 3 {
		s, err := secrets.Get(ctx, KeySecret, metav1.GetOptions{})
		if err == nil {
			return ParseKey(s.Data[KeySecretField])
		}
		if !apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("read the cluster key (Secret %s/%s): %w", c.namespace, KeySecret, err)
		}
		key := make([]byte, datapath.KeySize)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: KeySecret, Namespace: c.namespace,
				Labels: map[string]string{LabelName: "pktmeta"}},
			Data: map[string][]byte{KeySecretField: []byte(hex.EncodeToString(key))},
		}
		_, err = secrets.Create(ctx, s, metav1.CreateOptions{})
		if err == nil {
			c.log.Info("made the cluster key", "secret", c.namespace+"/"+KeySecret)
			return key, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("make the cluster key (Secret %s/%s): %w", c.namespace, KeySecret, err)
		}
	}
	return nil, errors.New("the cluster key Secret kept appearing and disappearing")
}

// ParseKey reads a cluster key: 32 hex digits, as pktmetactl's key files.
func ParseKey(b []byte) ([]byte, error) {
	k, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(k) != datapath.KeySize {
		return nil, fmt.Errorf("cluster key: want %d hex digits under %q", 2*datapath.KeySize, KeySecretField)
	}
	return k, nil
}

// NodeName names a node id (view.Remote).
func (c *Cluster) NodeName(id uint16) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.idNames[id]
}

// Workload returns what another node published for one of its workload
// ids (view.Remote).
func (c *Cluster) Workload(node uint16, id uint32) (datapath.Workload, bool) {
	if c.leases == nil {
		return datapath.Workload{}, false
	}
	l, err := c.leases.Get(leaseName(node))
	if err != nil || l.Spec.HolderIdentity == nil {
		return datapath.Workload{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	t, ok := c.parsed[node]
	if !ok || t.resourceVersion != l.ResourceVersion {
		// Parsed once per version of the Lease, not per lookup.
		t = parsedTable{resourceVersion: l.ResourceVersion, byID: map[uint32]datapath.Workload{}}
		var tab Table
		if err := json.Unmarshal([]byte(l.Annotations[WorkloadsAnnotation]), &tab); err == nil && tab.Version == TableVersion && tab.Node == *l.Spec.HolderIdentity {
			for _, w := range tab.Workloads {
				t.byID[w.ID] = datapath.Workload{ID: w.ID, Namespace: w.Namespace, Pod: w.Pod, UID: w.UID, Tags: w.Tags, PodTags: w.PodTags, Partial: w.Partial}
			}
		}
		c.parsed[node] = t
	}
	w, ok := t.byID[id]
	return w, ok
}
