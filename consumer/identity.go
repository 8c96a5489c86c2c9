package consumer

import (
	"fmt"

	"github.com/pktmeta/pktmeta/internal/datapath"
)

// Identity is who a workload id in a record (origin_workload,
// peer_workload) stands for.
type Identity struct {
	ID          uint32
	Namespace   string
	Pod         string
	UID         string
	ContainerID string
	// Tags are the operator's (the plugin config's static tags): trust them.
	Tags map[string]string
	// PodTags are claimed by the pod itself (its annotations and labels):
	// true only as far as you trust whoever may edit the pod.
	PodTags map[string]string
}

// Identities resolves workload ids from the node's pinned state. It reads
// without any lock and never blocks pktmeta.
type Identities struct {
	d *datapath.Datapath
}

// OpenIdentities opens the pinned workload table at pinPath (default
// DefaultPinPath).
func OpenIdentities(pinPath string) (*Identities, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	d, err := datapath.OpenReader(pinPath)
	if err != nil {
		return nil, fmt.Errorf("open pktmeta at %s: %w", pinPath, err)
	}
	return &Identities{d: d}, nil
}

// Lookup returns the identity of a workload id; false when no pod on the
// node has it (any more). A record with PKTMETA_F_REMOTE set names a
// workload of another node (origin_node): its origin_workload is not this
// node's, and must not be looked up here.
func (i *Identities) Lookup(id uint32) (Identity, bool, error) {
	w, ok, err := i.d.Workload(id)
	if err != nil || !ok {
		return Identity{}, false, err
	}
	return Identity{ID: id, Namespace: w.Namespace, Pod: w.Pod, UID: w.UID, ContainerID: w.ContainerID, Tags: w.Tags, PodTags: w.PodTags}, true, nil
}

// Close releases the pinned maps.
func (i *Identities) Close() error { return i.d.Close() }
