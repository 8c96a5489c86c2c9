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
}

// Name is namespace/pod, or the container id for workloads without one.
func (w *Workload) Name() string {
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
	PodTags   map[string]string `json:"podTags,omitempty"`
	ConnID    uint64            `json:"connID"`
	FirstSeen string            `json:"firstSeen"`
	Peer      *Workload         `json:"peer,omitempty"`
	Seen      *Seen             `json:"seen,omitempty"`
	NAT       bool              `json:"nat,omitempty"`
	Delivered string            `json:"delivered,omitempty"`
}

// Resolver maps workload ids to identities, reading the table once.
type Resolver struct {
	byID map[uint32]datapath.Workload
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

// ConnFromRecord renders one record.
func (r *Resolver) ConnFromRecord(rec datapath.Record) Conn {
	origin, tags, podTags := r.Lookup(rec.OriginWorkload)
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
	if rec.IsDelivered() {
		c.Peer, _, _ = r.Lookup(rec.PeerWorkload)
		c.Seen = &Seen{Src: rec.PeerTuple.Src.String(), Dst: rec.PeerTuple.Dst.String()}
		c.NAT = rec.Flags&datapath.FlagNAT != 0
		c.Delivered = stamp(rec.Delivered)
	}
	return c
}

// Conns lists every live connection, oldest first.
func Conns(d *datapath.Datapath) ([]Conn, error) {
	res, err := NewResolver(d)
	if err != nil {
		return nil, err
	}
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
	Time   string            `json:"time"`
	Event  string            `json:"event"`
	Reason string            `json:"reason,omitempty"`
	ConnID uint64            `json:"connID"`
	Proto  string            `json:"proto"`
	Src    string            `json:"src"`
	Dst    string            `json:"dst"`
	Origin *Workload         `json:"origin,omitempty"`
	Tags   map[string]string `json:"tags,omitempty"`
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
	out.Origin, out.Tags, out.PodTags = r.Lookup(e.OriginWorkload)
	if e.Type == datapath.EventDelivered {
		out.Peer, _, _ = r.Lookup(e.PeerWorkload)
		out.Seen = &Seen{Src: e.Seen.Src.String(), Dst: e.Seen.Dst.String()}
		out.NAT = e.Flags&datapath.FlagNAT != 0
	}
	return out
}
