// Package view turns the datapath's numeric records into what people read:
// connections and events with the origin's identity and tags resolved from
// the workload table. pktmetactl and the demo print these; JSON field names
// are part of the CLI's interface.
package view

import (
	"fmt"
	"sort"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
)

// Workload is the identity of one side of a connection.
type Workload struct {
	ID          uint32 `json:"workload"`
	Namespace   string `json:"namespace,omitempty"`
	Pod         string `json:"pod,omitempty"`
	UID         string `json:"uid,omitempty"`
	ContainerID string `json:"containerID,omitempty"`
	// Unknown: the id is not in the workload table (pod already deleted).
	Unknown bool `json:"unknown,omitempty"`
	// Remote: a workload of another node (NodeID, named Node), whose
	// connection reached this one with the pktmeta TCP option.
	Remote bool   `json:"remote,omitempty"`
	NodeID uint16 `json:"nodeID,omitempty"`
	Node   string `json:"node,omitempty"`
}

// Name is namespace/pod, or the container id for workloads without one;
// a remote one's ends in @node.
func (w *Workload) Name() string {
	if w != nil && w.Remote {
		node := w.Node
		if node == "" {
			node = fmt.Sprintf("node:%d", w.NodeID)
		}
		local := *w
		local.Remote = false
		return local.Name() + "@" + node
	}
	switch {
	case w == nil:
		return "-"
	case w.Unknown:
		return fmt.Sprintf("workload:%d(gone)", w.ID)
	case w.Pod != "":
		return w.Namespace + "/" + w.Pod
	case w.ContainerID != "":
		return "container:" + short(w.ContainerID)
	}
	return fmt.Sprintf("workload:%d", w.ID)
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// Seen is the tuple a receiver saw.
type Seen struct {
	Src string `json:"src"`
	Dst string `json:"dst"`
}

// Conn is one connection as `pktmetactl conns` shows it.
type Conn struct {
	Proto  string            `json:"proto"`
	Src    string            `json:"src"`
	Dst    string            `json:"dst"`
	Origin *Workload         `json:"origin"`
	Tags   map[string]string `json:"tags"`
	// PodTags are tags the origin pod claimed for itself (annotations,
	// labels); only Tags come from the operator.
	PodTags map[string]string `json:"podTags,omitempty"`
	ConnID  uint64            `json:"connID"`
	// OriginConnID: for a remote origin, the connection's id on its node
	// (as far as the option carries it: the low 44 bits).
	OriginConnID uint64    `json:"originConnID,omitempty"`
	FirstSeen    string    `json:"firstSeen"`
	Peer         *Workload `json:"peer,omitempty"`
	Seen         *Seen     `json:"seen,omitempty"`
	NAT          bool      `json:"nat,omitempty"`
	Delivered    string    `json:"delivered,omitempty"`
}

// Remote resolves what another node's ids stand for: a node's name, and
// the identity behind one of its workload ids. Outside Kubernetes it is
// the cluster file (internal/cluster).
type Remote interface {
	NodeName(id uint16) string // "" when unknown
	Workload(node uint16, id uint32) (datapath.Workload, bool)
}

// Resolver maps workload ids to identities, reading the table once.
type Resolver struct {
	byID map[uint32]datapath.Workload
	// Remote resolves remote origins; nil shows their ids only.
	Remote Remote
}

// NewResolver snapshots the workload table.
func NewResolver(d *datapath.Datapath) (*Resolver, error) {
	all, err := d.Workloads()
	if err != nil {
		return nil, err
	}
	r := &Resolver{byID: make(map[uint32]datapath.Workload, len(all))}
	for _, w := range all {
		r.byID[w.ID] = w
	}
	return r, nil
}

// Refresh re-reads the table (for long-running readers).
func (r *Resolver) Refresh(d *datapath.Datapath) error {
	n, err := NewResolver(d)
	if err != nil {
		return err
	}
	r.byID = n.byID
	return nil
}

// Lookup returns a workload's identity, its operator tags and the tags it
// claimed itself; nil for id 0 (not a pod).
func (r *Resolver) Lookup(id uint32) (*Workload, map[string]string, map[string]string) {
	if id == 0 {
		return nil, nil, nil
	}
	w, ok := r.byID[id]
	if !ok {
		return &Workload{ID: id, Unknown: true}, nil, nil
	}
	return &Workload{ID: id, Namespace: w.Namespace, Pod: w.Pod, UID: w.UID, ContainerID: w.ContainerID}, w.Tags, w.PodTags
}

// Has reports whether the resolver knows id.
func (r *Resolver) Has(id uint32) bool {
	_, ok := r.byID[id]
	return ok
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

// LookupRemote is Lookup for a workload of another node.
func (r *Resolver) LookupRemote(node uint16, id uint32) (*Workload, map[string]string, map[string]string) {
	w := &Workload{ID: id, Remote: true, NodeID: node, Unknown: true}
	if r.Remote == nil {
		return w, nil, nil
	}
	w.Node = r.Remote.NodeName(node)
	wl, ok := r.Remote.Workload(node, id)
	if !ok {
		return w, nil, nil
	}
	w.Unknown = false
	w.Namespace, w.Pod, w.UID, w.ContainerID = wl.Namespace, wl.Pod, wl.UID, wl.ContainerID
	return w, wl.Tags, wl.PodTags
}

func (r *Resolver) origin(rec datapath.Record) (*Workload, map[string]string, map[string]string) {
	if rec.IsRemote() {
		return r.LookupRemote(rec.OriginNode, rec.OriginWorkload)
	}
	return r.Lookup(rec.OriginWorkload)
}

// ConnFromRecord renders one record.
func (r *Resolver) ConnFromRecord(rec datapath.Record) Conn {
	origin, tags, podTags := r.origin(rec)
	if origin == nil {
		origin = &Workload{Unknown: true}
	}
	if tags == nil {
		tags = map[string]string{}
	}
	c := Conn{
		Proto:     datapath.ProtoName(rec.Tuple.Proto),
		Src:       rec.Tuple.Src.String(),
		Dst:       rec.Tuple.Dst.String(),
		Origin:    origin,
		Tags:      tags,
		PodTags:   podTags,
		ConnID:    rec.ConnID,
		FirstSeen: stamp(rec.FirstSeen),
	}
	if rec.IsRemote() {
		c.OriginConnID = rec.OriginConnID()
	}
	if rec.IsDelivered() {
		c.Peer, _, _ = r.Lookup(rec.PeerWorkload)
		c.Seen = &Seen{Src: rec.PeerTuple.Src.String(), Dst: rec.PeerTuple.Dst.String()}
		c.NAT = rec.Flags&datapath.FlagNAT != 0
		c.Delivered = stamp(rec.Delivered)
	}
	return c
}

// Conns lists every live connection, oldest first; remote resolves remote
// origins (nil: ids only).
func Conns(d *datapath.Datapath, remote Remote) ([]Conn, error) {
	res, err := NewResolver(d)
	if err != nil {
		return nil, err
	}
	res.Remote = remote
	recs, err := d.Records()
	if err != nil {
		return nil, err
	}
	sort.Slice(recs, func(i, j int) bool {
		if !recs[i].FirstSeen.Equal(recs[j].FirstSeen) {
			return recs[i].FirstSeen.Before(recs[j].FirstSeen)
		}
		return recs[i].ConnID < recs[j].ConnID
	})
	out := make([]Conn, 0, len(recs))
	for _, rec := range recs {
		out = append(out, res.ConnFromRecord(rec))
	}
	return out, nil
}

// Event is one ring-buffer event as `pktmetactl events -o json` prints it.
type Event struct {
	Time   string `json:"time"`
	Event  string `json:"event"`
	Reason string `json:"reason,omitempty"`
	ConnID uint64 `json:"connID"`
	// OriginConnID: see Conn.
	OriginConnID uint64            `json:"originConnID,omitempty"`
	Proto        string            `json:"proto"`
	Src          string            `json:"src"`
	Dst          string            `json:"dst"`
	Origin       *Workload         `json:"origin,omitempty"`
	Tags         map[string]string `json:"tags,omitempty"`
	// PodTags: claimed by the origin pod itself, see Conn.
	PodTags map[string]string `json:"podTags,omitempty"`
	Peer    *Workload         `json:"peer,omitempty"`
	Seen    *Seen             `json:"seen,omitempty"`
	NAT     bool              `json:"nat,omitempty"`
}

// EventFrom renders one event.
func (r *Resolver) EventFrom(e datapath.Event) Event {
	out := Event{
		Time:   stamp(e.Time),
		Event:  e.TypeName(),
		Reason: e.ReasonName(),
		ConnID: e.ConnID,
		Proto:  datapath.ProtoName(e.Tuple.Proto),
		Src:    e.Tuple.Src.String(),
		Dst:    e.Tuple.Dst.String(),
	}
	if e.Flags&datapath.FlagRemote != 0 {
		node := datapath.ConnOriginNode(e.ConnID)
		out.Origin, out.Tags, out.PodTags = r.LookupRemote(node, e.OriginWorkload)
		out.OriginConnID = e.ConnID & datapath.ConnOriginMask
	} else {
		out.Origin, out.Tags, out.PodTags = r.Lookup(e.OriginWorkload)
	}
	if e.Type == datapath.EventDelivered {
		out.Peer, _, _ = r.Lookup(e.PeerWorkload)
		out.Seen = &Seen{Src: e.Seen.Src.String(), Dst: e.Seen.Dst.String()}
		out.NAT = e.Flags&datapath.FlagNAT != 0
	}
	return out
}
