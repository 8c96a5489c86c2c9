// Package cluster is what a node knows of the other nodes of its cluster
// without Kubernetes: a cluster file listing every node's id, name,
// addresses and pod CIDRs. From it a node takes its own id and the member
// prefixes (datapath.NodeConfig), and pktmetactl the names behind a remote
// origin's node and workload ids.
//
// Names behind another node's workload ids come from that node's own
// workload table, read-only, where this host can open its pins: on the
// netns testbed every node shares one kernel and bpffs, so it can. A node
// whose pins are out of reach resolves to its name and the bare workload
// id; nothing is ever guessed.
package cluster

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
)

// FileVersion is the cluster file format this build reads.
const FileVersion = 1

// Node is one node of the cluster.
type Node struct {
	ID        uint16         `json:"id"`
	Name      string         `json:"name"`
	Addresses []netip.Addr   `json:"addresses"`
	PodCIDRs  []netip.Prefix `json:"podCIDRs"`
	// PinPath is where the node's datapath is pinned, if this host can
	// read it (empty: its workload names are not resolvable from here).
	PinPath string `json:"pinPath,omitempty"`
}

// File is the cluster file.
type File struct {
	Version int    `json:"version"`
	Nodes   []Node `json:"nodes"`
}

// Load reads and validates a cluster file.
func Load(path string) (*File, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("cluster file: %w", err)
	}
	var f File
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("cluster file %s: %w", path, err)
	}
	if err := f.Validate(); err != nil {
		return nil, fmt.Errorf("cluster file %s: %w", path, err)
	}
	return &f, nil
}

// Validate checks ids, names and prefixes.
func (f *File) Validate() error {
	if f.Version != FileVersion {
		return fmt.Errorf("version %d, this pktmeta reads version %d", f.Version, FileVersion)
	}
	if len(f.Nodes) == 0 {
		return errors.New("no nodes")
	}
	ids, names := map[uint16]bool{}, map[string]bool{}
	for i, n := range f.Nodes {
		switch {
		case n.ID == 0:
			return fmt.Errorf("nodes[%d] (%s): id 0 is no node; ids are 1-65535", i, n.Name)
		case n.Name == "":
			return fmt.Errorf("nodes[%d]: no name", i)
		case ids[n.ID]:
			return fmt.Errorf("node id %d is used twice", n.ID)
		case names[n.Name]:
			return fmt.Errorf("node name %q is used twice", n.Name)
		case len(n.Addresses) == 0:
			return fmt.Errorf("node %s has no addresses", n.Name)
		}
		ids[n.ID], names[n.Name] = true, true
		for _, a := range n.Addresses {
			if !a.IsValid() {
				return fmt.Errorf("node %s: invalid address", n.Name)
			}
		}
		for _, p := range n.PodCIDRs {
			if !p.IsValid() {
				return fmt.Errorf("node %s: invalid pod CIDR", n.Name)
			}
			if err := datapath.MemberPrefixOK(p); err != nil {
				return fmt.Errorf("node %s: %w", n.Name, err)
			}
		}
	}
	return nil
}

// ByName returns the named node.
func (f *File) ByName(name string) (Node, bool) {
	for _, n := range f.Nodes {
		if n.Name == name {
			return n, true
		}
	}
	return Node{}, false
}

// ByID returns the node with that id.
func (f *File) ByID(id uint16) (Node, bool) {
	for _, n := range f.Nodes {
		if n.ID == id {
			return n, true
		}
	}
	return Node{}, false
}

// Members are every node's addresses (as /32 and /128) and pod CIDRs: the
// prefixes options go to and are honoured from.
func (f *File) Members() []netip.Prefix {
	var out []netip.Prefix
	for _, n := range f.Nodes {
		for _, a := range n.Addresses {
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
		out = append(out, n.PodCIDRs...)
	}
	return out
}

// Directory resolves remote origins from a cluster file (view.Remote).
// Another node's workload table is read at most once a second, and again
// only for an id it did not hold.
type Directory struct {
	f *File

	mu    sync.Mutex
	cache map[uint16]*nodeTable
}

type nodeTable struct {
	read time.Time
	byID map[uint32]datapath.Workload
}

// NewDirectory returns a directory over f.
func NewDirectory(f *File) *Directory {
	return &Directory{f: f, cache: map[uint16]*nodeTable{}}
}

// NodeName returns the node's name, "" when the file does not list it.
func (d *Directory) NodeName(id uint16) string {
	n, ok := d.f.ByID(id)
	if !ok {
		return ""
	}
	return n.Name
}

// Workload returns the identity behind a workload id of another node.
func (d *Directory) Workload(node uint16, id uint32) (datapath.Workload, bool) {
	n, ok := d.f.ByID(node)
	if !ok || n.PinPath == "" {
		return datapath.Workload{}, false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.cache[node]
	if t != nil {
		if w, ok := t.byID[id]; ok {
			return w, true
		}
		if time.Since(t.read) < time.Second {
			return datapath.Workload{}, false
		}
	}
	t = &nodeTable{read: time.Now(), byID: map[uint32]datapath.Workload{}}
	d.cache[node] = t
	dp, err := datapath.OpenReader(n.PinPath)
	if err != nil {
		return datapath.Workload{}, false
	}
	defer dp.Close()
	ws, err := dp.Workloads()
	if err != nil {
		return datapath.Workload{}, false
	}
	for _, w := range ws {
		t.byID[w.ID] = w
	}
	w, ok := t.byID[id]
	return w, ok
}
