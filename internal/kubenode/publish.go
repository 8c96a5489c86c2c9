package kubenode

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/pktmeta/pktmeta/internal/datapath"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TableVersion is the layout of a published workload table.
const TableVersion = 1

// MaxTableBytes bounds a published table: an object's annotations hold at
// most 256 KiB together. A workload takes 100-250 bytes, up to about 2 KiB
// with eight long tags.
const MaxTableBytes = 240 << 10

// Table is a node's workload table as other nodes read it: what a remote
// origin's workload id stands for. Node-local details (veths, netns,
// container ids) stay on the node.
type Table struct {
	Version   int                 `json:"version"`
	Node      string              `json:"node"`
	Workloads []PublishedWorkload `json:"workloads"`
}

// PublishedWorkload is one workload of a Table.
type PublishedWorkload struct {
	ID        uint32            `json:"id"`
	Namespace string            `json:"namespace,omitempty"`
	Pod       string            `json:"pod,omitempty"`
	UID       string            `json:"uid,omitempty"`
	Tags      map[string]string `json:"tags,omitempty"`
	PodTags   map[string]string `json:"podTags,omitempty"`
	Partial   bool              `json:"partial,omitempty"`
}

// MakeTable is node's table of ws, sorted by id so that an unchanged
// table encodes to the same bytes. What does not fit in MaxTableBytes is
// left out, newest workloads first (and counted in the second result): a
// pod's long tags can shorten the table, never stop its publication.
func MakeTable(node string, ws []datapath.Workload) (Table, int) {
	ws = slices.Clone(ws)
	slices.SortFunc(ws, func(a, b datapath.Workload) int { return a.Created.Compare(b.Created) })
	t := Table{Version: TableVersion, Node: node, Workloads: []PublishedWorkload{}}
	size := 64 + len(node) // the envelope, generously
	left := 0
	for _, w := range ws {
		p := PublishedWorkload{ID: w.ID, Namespace: w.Namespace, Pod: w.Pod, UID: w.UID, Tags: w.Tags, PodTags: w.PodTags, Partial: w.Partial}
		b, err := json.Marshal(p)
		if err != nil || size+len(b)+1 > MaxTableBytes {
			left++
			continue
		}
		size += len(b) + 1
		t.Workloads = append(t.Workloads, p)
	}
	slices.SortFunc(t.Workloads, func(a, b PublishedWorkload) int { return cmp.Compare(a.ID, b.ID) })
	return t, left
}

// Publish writes this node's workload table to its id Lease's
// annotation when it differs from what is there. It reports whether it
// wrote.
func (c *Cluster) Publish(ctx context.Context, id uint16, t Table) (bool, error) {
	data, err := json.Marshal(t)
	if err != nil {
		return false, err
	}
	if len(data) > MaxTableBytes {
		return false, fmt.Errorf("workload table of %d bytes: over the %d an annotation may hold", len(data), MaxTableBytes)
	}
	cur, err := c.leases.Get(leaseName(id))
	if err != nil {
		return false, fmt.Errorf("this node's id Lease %s: %w", leaseName(id), err)
	}
	if cur.Spec.HolderIdentity == nil || *cur.Spec.HolderIdentity != c.nodeName {
		return false, fmt.Errorf("the Lease %s is not this node's", cur.Name)
	}
	if cur.Annotations[WorkloadsAnnotation] == string(data) {
		return false, nil
	}
	l := cur.DeepCopy()
	if l.Annotations == nil {
		l.Annotations = map[string]string{}
	}
	l.Annotations[WorkloadsAnnotation] = string(data)
	// The resourceVersion from the watch makes this a compare-and-swap:
	// a conflict means the watch is behind, and the next round retries.
	if _, err := c.cs.CoordinationV1().Leases(c.namespace).Update(ctx, l, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsConflict(err) {
			return false, nil
		}
		return false, fmt.Errorf("publish the workload table (Lease %s/%s): %w", c.namespace, l.Name, err)
	}
	return true, nil
}

// Unpublish removes this node's id Lease, and with it its workload table:
// for an uninstall, so that a node without pktmeta holds no id.
func (c *Cluster) Unpublish(ctx context.Context, id uint16) error {
	if id == 0 {
		return nil
	}
	l, err := c.cs.CoordinationV1().Leases(c.namespace).Get(ctx, leaseName(id), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove this node's id Lease: %w", err)
	}
	if l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity != c.nodeName {
		return nil // not ours (any more)
	}
	err = c.cs.CoordinationV1().Leases(c.namespace).Delete(ctx, l.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &l.UID}})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("remove this node's id Lease: %w", err)
	}
	return nil
}
