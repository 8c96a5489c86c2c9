package datapath

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
)

// Stats are the datapath's counters summed over CPUs.
type Stats struct {
	OriginPackets  uint64 `json:"originPackets"`
	DeliverPackets uint64 `json:"deliverPackets"`
	NotParsed      uint64 `json:"notParsed"`
	Tagged         uint64 `json:"tagged"`
	SynRetransmits uint64 `json:"synRetransmits"`
	Unregistered   uint64 `json:"unregistered"`
	UpdateErrors   uint64 `json:"updateErrors"`
	Deliveries     uint64 `json:"deliveries"`
	NATResolved    uint64 `json:"natResolved"`
	Misses         uint64 `json:"misses"`
	UDPReplies     uint64 `json:"udpReplies"`
	Closed         uint64 `json:"closed"`
	StrictDrops    uint64 `json:"strictDrops"`
	EventsDropped  uint64 `json:"eventsDropped"`
	CTUnavailable  uint64 `json:"ctUnavailable"`
	// Refused or not trusted (see docs/SECURITY.md).
	Spoofed           uint64 `json:"spoofed"`
	LinkLocal         uint64 `json:"linkLocal"`
	OverBudget        uint64 `json:"overBudget"`
	TableFull         uint64 `json:"tableFull"`
	AliasesFull       uint64 `json:"aliasesFull"`
	NotParty          uint64 `json:"notParty"`
	SimultaneousOpens uint64 `json:"simultaneousOpens"`
	UnverifiedCloses  uint64 `json:"unverifiedCloses"`
	EventsLimited     uint64 `json:"eventsLimited"`
	UDPPreexisting    uint64 `json:"udpPreexisting"`
	NotForPod         uint64 `json:"notForPod"`
	// TableBusy: changes given up because other CPUs held the
	// connection's chunk of the table for too long (bpf/table.h).
	TableBusy uint64 `json:"tableBusy"`
}

// ReadStats sums the per-CPU counters.
func (d *Datapath) ReadStats() (Stats, error) {
	var perCPU []bpfPktmetaCounters
	if err := d.StatsMap.Lookup(uint32(0), &perCPU); err != nil {
		return Stats{}, fmt.Errorf("read counters: %w", err)
	}
	var s Stats
	for _, c := range perCPU {
		s.OriginPackets += c.OriginPackets
		s.DeliverPackets += c.DeliverPackets
		s.NotParsed += c.NotParsed
		s.Tagged += c.Tagged
		s.SynRetransmits += c.SynRetransmits
		s.Unregistered += c.Unregistered
		s.UpdateErrors += c.UpdateErrors
		s.Deliveries += c.Deliveries
		s.NATResolved += c.NatResolved
		s.Misses += c.Misses
		s.UDPReplies += c.UdpReplies
		s.Closed += c.Closed
		s.StrictDrops += c.StrictDrops
		s.EventsDropped += c.EventsDropped
		s.CTUnavailable += c.CtUnavailable
		s.Spoofed += c.Spoofed
		s.LinkLocal += c.LinkLocal
		s.OverBudget += c.OverBudget
		s.TableFull += c.TableFull
		s.AliasesFull += c.AliasesFull
		s.NotParty += c.NotParty
		s.SimultaneousOpens += c.SimultaneousOpens
		s.UnverifiedCloses += c.UnverifiedCloses
		s.EventsLimited += c.EventsLimited
		s.UDPPreexisting += c.UdpPreexisting
		s.NotForPod += c.NotForPod
		s.TableBusy += c.TableBusy
	}
	return s, nil
}

// Fields returns the counters as name/value pairs, in declaration order.
func (s Stats) Fields() []StatField { return fields(s) }

// Fields returns the counters as name/value pairs, in declaration order.
func (s RemoteStats) Fields() []StatField { return fields(s) }

func fields(s any) []StatField {
	v := reflect.ValueOf(s)
	t := v.Type()
	out := make([]StatField, t.NumField())
	for i := range out {
		out[i] = StatField{Name: t.Field(i).Tag.Get("json"), Value: v.Field(i).Uint()}
	}
	return out
}

// StatField is one named counter.
type StatField struct {
	Name  string
	Value uint64
}

// MapFill is how full one map is.
type MapFill struct {
	Name    string `json:"name"`
	Entries int    `json:"entries"`
	Max     uint32 `json:"max"`
}

// MapFill counts the entries of the connection table (its slots map, and
// the capacity it was made for as the maximum), the alias, endpoint and
// workload maps. It reads them in batches, so a Prometheus scrape of a
// million-record table is a few hundred syscalls, not two million.
func (d *Datapath) MapFill() []MapFill {
	var out []MapFill
	for _, m := range []struct {
		name  string
		m     *ebpf.Map
		count func(*ebpf.Map) (int, error)
	}{
		{mapSlots, d.SlotsMap, d.countRecords},
		{mapAliases, d.AliasesMap, countEntries[bpfPktmetaTuple, bpfPktmetaAlias]},
		{mapEndpoints, d.EndpointsMap, countEntries[uint32, bpfPktmetaEndpoint]},
		{mapWorkloads, d.WorkloadsMap, countEntries[uint32, bpfPktmetaWorkload]},
	} {
		n, err := m.count(m.m)
		if err != nil {
			continue
		}
		limit := m.m.MaxEntries()
		if m.m == d.SlotsMap {
			// The table has more slots than it was made for.
			limit = d.Capacity()
		}
		out = append(out, MapFill{Name: m.name, Entries: n, Max: limit})
	}
	return out
}

// countRecords counts the table's entries from the chunks' tag bytes (a
// nineteenth of the table's bytes, read once: metrics and status ask
// often), not from the slots. An insert claims its tag just before it
// writes its slot, and a remove clears it last, so the count may include
// entries a moment from being made or gone.
func (d *Datapath) countRecords(*ebpf.Map) (int, error) {
	words, err := d.chunkWords()
	n := 0
	for _, w := range words {
		n += tagsSet(w)
	}
	return n, err
}

// tagsSet counts the nonzero tag bytes (0-6) of a chunk's word.
func tagsSet(w uint64) int {
	n := 0
	for i := range chunkSlots {
		if uint8(w>>(8*i)) != 0 {
			n++
		}
	}
	return n
}

// countEntries reads a hash map in batches of about 1 MiB and counts.
func countEntries[K, V any](m *ebpf.Map) (int, error) {
	batch := max(16, (1<<20)/int(m.ValueSize()))
	keys, vals := make([]K, batch), make([]V, batch)
	n := 0
	var cursor ebpf.MapBatchCursor
	for {
		got, err := m.BatchLookup(&cursor, keys, vals, nil)
		n += got
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
