package datapath

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"sort"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Limits of the fixed-size string fields (bytes, without the NUL).
const (
	MaxTagKeyLen   = 63
	MaxTagValueLen = 127
)

// Workload flags (PKTMETA_WL_*).
const (
	wlPartial  = 1 << 0
	wlLegacy   = 1 << 1
	wlStrict   = 1 << 2
	wlNoEgress = 1 << 3
)

// Workload is who sits behind one attachment: a pod's interface. Records
// refer to it by ID; the strings live only here, in userspace's part of the
// pinned state. It exists from CNI ADD to CNI DEL: as long as the pod's
// network namespace, and so every connection the pod takes part in.
type Workload struct {
	ID          uint32
	Namespace   string
	Pod         string
	UID         string
	ContainerID string
	IfName      string // inside the pod
	HostIfName  string
	HostIfindex uint32
	// HostNetns is the inode of the network namespace holding the host
	// veth: ifindexes only mean something there.
	HostNetns uint64
	Netns     string
	// NetnsCookie identifies the pod's network namespace to BPF (netns
	// cookie, CurrentNetnsCookie): the application interface answers only
	// sockets there. Not part of the workload entry; 0: unknown, the pod's
	// sockets get ENOENT.
	NetnsCookie uint64
	// Network is the CNI network (conflist name) that added it; empty for
	// the agent's covers of pods that existed before pktmeta. CNI GC only
	// collects its own network's attachments.
	Network string
	Tags    map[string]string
	// PodTags are claimed by the pod itself (annotations, labels): not vouched for by the operator.
	PodTags  map[string]string
	Created  time.Time
	Partial  bool // no Kubernetes identity was available
	Legacy   bool // attached with cls_bpf
	Strict   bool
	NoEgress bool // legacy beside an ingress qdisc: origin hook only
}

// Key names the attachment the way CNI does: (container id, ifname).
func (w *Workload) Key() AttachmentKey {
	return AttachmentKey{ContainerID: w.ContainerID, IfName: w.IfName}
}

// AttachmentKey identifies an attachment without a prevResult.
type AttachmentKey struct {
	ContainerID string
	IfName      string
}

func putString(dst []byte, s, field string) error {
	if len(s) > len(dst)-1 {
		return fmt.Errorf("%s is %d bytes, at most %d fit", field, len(s), len(dst)-1)
	}
	clear(dst)
	copy(dst, s)
	return nil
}

func getString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

func (w *Workload) encode() (*bpfPktmetaWorkload, error) {
	raw := &bpfPktmetaWorkload{
		Version:       RecordVersion,
		HostIfindex:   w.HostIfindex,
		HostNetnsIno:  w.HostNetns,
		CreatedUnixNs: uint64(w.Created.UnixNano()),
	}
	for _, f := range []struct {
		set  bool
		flag uint8
	}{{w.Partial, wlPartial}, {w.Legacy, wlLegacy}, {w.Strict, wlStrict}, {w.NoEgress, wlNoEgress}} {
		if f.set {
			raw.Flags |= f.flag
		}
	}
	for _, f := range []struct {
		dst        []byte
		val, field string
	}{
		{raw.Namespace[:], w.Namespace, "namespace"},
		{raw.Pod[:], w.Pod, "pod name"},
		{raw.Uid[:], w.UID, "pod UID"},
		{raw.ContainerId[:], w.ContainerID, "container id"},
		{raw.Ifname[:], w.IfName, "interface name"},
		{raw.HostIfname[:], w.HostIfName, "host interface name"},
		{raw.Netns[:], w.Netns, "netns path"},
		{raw.Network[:], w.Network, "network name"},
	} {
		if err := putString(f.dst, f.val, f.field); err != nil {
			return nil, err
		}
	}
	// One table for both kinds, told apart by a bit per slot: the
	// operator's tags and the ones the pod claimed for itself.
	all := make(map[string]string, len(w.Tags)+len(w.PodTags))
	claimed := map[string]bool{}
	for k, v := range w.PodTags {
		all[k] = v
		claimed[k] = true
	}
	for k, v := range w.Tags {
		if _, dup := all[k]; dup {
			return nil, fmt.Errorf("tag %q is both an operator tag and a pod tag", k)
		}
		all[k] = v
	}
	if len(all) > MaxTags {
		return nil, fmt.Errorf("%d tags, at most %d", len(all), MaxTags)
	}
	keys := make([]string, 0, len(all))
	for k := range all {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for i, k := range keys {
		if err := putString(raw.Tags[i].Key[:], k, "tag key "+k); err != nil {
			return nil, err
		}
		if err := putString(raw.Tags[i].Value[:], all[k], "value of tag "+k); err != nil {
			return nil, err
		}
		if claimed[k] {
			raw.PodTags |= 1 << i
		}
	}
	raw.N_tags = uint8(len(keys))
	return raw, nil
}

func decodeWorkload(id uint32, raw *bpfPktmetaWorkload) Workload {
	w := Workload{
		ID:          id,
		Namespace:   getString(raw.Namespace[:]),
		Pod:         getString(raw.Pod[:]),
		UID:         getString(raw.Uid[:]),
		ContainerID: getString(raw.ContainerId[:]),
		IfName:      getString(raw.Ifname[:]),
		HostIfName:  getString(raw.HostIfname[:]),
		HostIfindex: raw.HostIfindex,
		HostNetns:   raw.HostNetnsIno,
		Netns:       getString(raw.Netns[:]),
		Network:     getString(raw.Network[:]),
		Created:     time.Unix(0, int64(raw.CreatedUnixNs)),
		Partial:     raw.Flags&wlPartial != 0,
		Legacy:      raw.Flags&wlLegacy != 0,
		Strict:      raw.Flags&wlStrict != 0,
		NoEgress:    raw.Flags&wlNoEgress != 0,
	}
	for i := 0; i < int(raw.N_tags) && i < MaxTags; i++ {
		k, v := getString(raw.Tags[i].Key[:]), getString(raw.Tags[i].Value[:])
		dst := &w.Tags
		if raw.PodTags&(1<<i) != 0 {
			dst = &w.PodTags
		}
		if *dst == nil {
			*dst = map[string]string{}
		}
		(*dst)[k] = v
	}
	return w
}

// CurrentNetns returns the inode of the calling thread's network namespace.
func CurrentNetns() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &st); err != nil {
		return 0, fmt.Errorf("stat own netns: %w", err)
	}
	return st.Ino, nil
}

// ValidateWorkload checks that w fits the fixed-size layout.
func ValidateWorkload(w *Workload) error {
	_, err := w.encode()
	return err
}

// idProbes is how many consecutive IDs, from the attachment key's hash, a
// workload may take. With at most 65536 workloads in a 2^32 space, all of
// them taken is practically impossible, so a lookup that probes them all
// and finds nothing is authoritative: no scan of the table.
const idProbes = 16

// idSlot is where an attachment's workload IDs start: a hash of its
// (container id, ifname), so finding it is a few lookups, not a scan, and
// concurrent ADDs need no shared counter.
func idSlot(k AttachmentKey) uint32 {
	h := fnv.New32a()
	h.Write([]byte(k.ContainerID))
	h.Write([]byte{0})
	h.Write([]byte(k.IfName))
	return h.Sum32()
}

// registerWorkload stores w under a free ID near its key's hash and
// returns the ID.
func (d *Datapath) registerWorkload(w *Workload) (uint32, error) {
	raw, err := w.encode()
	if err != nil {
		return 0, fmt.Errorf("workload %s/%s: %w", w.Namespace, w.Pod, err)
	}
	base := idSlot(w.Key())
	for i := range uint32(idProbes) {
		id := base + i
		if id == 0 {
			continue // 0 means "no workload" in records
		}
		err := d.WorkloadsMap.Update(id, raw, ebpf.UpdateNoExist)
		if errors.Is(err, ebpf.ErrKeyExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("store workload: %w", err)
		}
		w.ID = id
		return id, nil
	}
	return 0, fmt.Errorf("store workload: the %d IDs of %s/%s are all taken", idProbes, w.ContainerID, w.IfName)
}

// updateWorkload rewrites an existing workload entry.
func (d *Datapath) updateWorkload(w *Workload) error {
	raw, err := w.encode()
	if err != nil {
		return err
	}
	if err := d.WorkloadsMap.Update(w.ID, raw, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("update workload %d: %w", w.ID, err)
	}
	return nil
}

// deleteWorkload removes a workload entry; a missing one is not an error.
func (d *Datapath) deleteWorkload(id uint32) error {
	d.deleteWorkloadNetns(id)
	if err := d.WorkloadsMap.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete workload %d: %w", id, err)
	}
	return nil
}

// Workload returns one workload by ID.
func (d *Datapath) Workload(id uint32) (Workload, bool, error) {
	var raw bpfPktmetaWorkload
	err := d.WorkloadsMap.Lookup(id, &raw)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Workload{}, false, nil
	}
	if err != nil {
		return Workload{}, false, fmt.Errorf("look up workload %d: %w", id, err)
	}
	return decodeWorkload(id, &raw), true, nil
}

// Workloads returns every workload.
func (d *Datapath) Workloads() ([]Workload, error) {
	var (
		out []Workload
		id  uint32
		raw bpfPktmetaWorkload
	)
	it := d.WorkloadsMap.Iterate()
	for it.Next(&id, &raw) {
		out = append(out, decodeWorkload(id, &raw))
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list workloads: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// FindAttachment returns the workload of an attachment.
func (d *Datapath) FindAttachment(key AttachmentKey) (Workload, bool, error) {
	base := idSlot(key)
	var raw bpfPktmetaWorkload
	for i := range uint32(idProbes) {
		id := base + i
		if id == 0 {
			continue
		}
		err := d.WorkloadsMap.Lookup(id, &raw)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		}
		if err != nil {
			return Workload{}, false, fmt.Errorf("look up workload %d: %w", id, err)
		}
		if w := decodeWorkload(id, &raw); w.Key() == key {
			return w, true, nil
		}
	}
	return Workload{}, false, nil
}

// ModifyWorkload re-reads the workload of key under its container's lock,
// lets change edit it, and writes it back if change returns true: the
// agent's label tags go through it, so they never race an ADD or DEL of the
// same pod.
func (d *Datapath) ModifyWorkload(key AttachmentKey, change func(w *Workload) bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	cl, err := d.lockContainer(key.ContainerID)
	if err != nil {
		return err
	}
	defer cl.unlock(false)
	w, ok, err := d.FindAttachment(key)
	if err != nil || !ok {
		return err
	}
	if !change(&w) {
		return nil
	}
	return d.updateWorkload(&w)
}

// Endpoint is the datapath's view of a pod veth: who is behind it, what it
// may do, and what the datapath counted for it.
type Endpoint struct {
	Workload        uint32
	Strict          bool
	NoEgress        bool
	Addrs           []netip.Addr
	MaxConnections  uint32
	EventsPerSecond uint32
	// Counted by the datapath since the pod was registered.
	Live          int64  // records the pod opened that are in the table
	Spoofed       uint64 // packets with a source that is not the pod's
	OverBudget    uint64 // first packets not tagged: Live was at MaxConnections
	TableFull     uint64 // first packets not tagged: the table was full
	NotParty      uint64 // changes refused: not a party to the connection
	EventsLimited uint64 // connections without events: over EventsPerSecond
}

const (
	epStrict   = 1 << 0
	epNoEgress = 1 << 1
)

// putEndpoint registers the pod behind host ifindex with the datapath. The
// counters start at zero.
func (d *Datapath) putEndpoint(ifindex uint32, ep Endpoint) error {
	if len(ep.Addrs) > MaxAddrs {
		return fmt.Errorf("%d addresses, at most %d", len(ep.Addrs), MaxAddrs)
	}
	raw := bpfPktmetaEndpoint{
		Version:      RecordVersion,
		Workload:     ep.Workload,
		N_addrs:      uint8(len(ep.Addrs)),
		MaxConns:     ep.MaxConnections,
		EventsPerSec: ep.EventsPerSecond,
	}
	if ep.Strict {
		raw.Flags |= epStrict
	}
	if ep.NoEgress {
		raw.Flags |= epNoEgress
	}
	for i, a := range ep.Addrs {
		raw.Addrs[i] = a.As16()
	}
	if err := d.EndpointsMap.Update(ifindex, &raw, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("register endpoint ifindex %d: %w", ifindex, err)
	}
	d.forgetUDPShortcuts()
	return nil
}

// PutEndpoint registers an endpoint directly, without a workload or an
// attachment: for tests that drive the programs with BPF_PROG_TEST_RUN.
func (d *Datapath) PutEndpoint(ifindex uint32, ep Endpoint) error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.putEndpoint(ifindex, ep)
}

// setEndpointNoEgress flags an endpoint whose veth has no delivery hook.
// A read-modify-write: counts the datapath adds in between are lost, and
// this runs only right after registration, on a rare path (legacy beside
// an ingress qdisc).
func (d *Datapath) setEndpointNoEgress(ifindex, workload uint32) error {
	var raw bpfPktmetaEndpoint
	if err := d.EndpointsMap.Lookup(ifindex, &raw); err != nil {
		return fmt.Errorf("look up endpoint %d: %w", ifindex, err)
	}
	if raw.Workload != workload {
		return fmt.Errorf("endpoint %d was replaced", ifindex)
	}
	raw.Flags |= epNoEgress
	if err := d.EndpointsMap.Update(ifindex, &raw, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("update endpoint %d: %w", ifindex, err)
	}
	return nil
}

// DeleteEndpoint removes ifindex's endpoint if it still belongs to workload.
func (d *Datapath) DeleteEndpoint(ifindex, workload uint32) error {
	var raw bpfPktmetaEndpoint
	if err := d.EndpointsMap.Lookup(ifindex, &raw); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		return fmt.Errorf("look up endpoint %d: %w", ifindex, err)
	}
	// The ifindex may have been reused by a newer pod.
	if raw.Workload != workload {
		return nil
	}
	if err := d.EndpointsMap.Delete(ifindex); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete endpoint %d: %w", ifindex, err)
	}
	d.forgetUDPShortcuts()
	return nil
}

// forgetUDPShortcuts voids the UDP shortcuts after an endpoint changed. A
// failure is logged, not returned: an ADD or DEL must not fail for a
// cache, and what a stale slot can do is bounded (it expires within a
// second and never attributes a record; ARCHITECTURE.md).
func (d *Datapath) forgetUDPShortcuts() {
	if err := d.ForgetUDPShortcuts(); err != nil && d.log != nil {
		d.log.Warn("could not void the UDP shortcuts; they expire within a second", "err", err)
	}
}

// ForgetUDPShortcuts voids what every CPU remembers of UDP flows that
// needed nothing (pktmeta_udp_hits in bpf/pktmeta.c). The programs bump
// the epoch themselves whenever a UDP record goes; userspace calls this
// when it changes an endpoint. The bump is the sweep program's, run with
// PKTMETA_SWEEP_FORGET_UDP: an atomic increment, which parallel ADDs and
// DELs doing read-modify-writes through the map could not guarantee.
func (d *Datapath) ForgetUDPShortcuts() error {
	if d.UDPEpochMap == nil {
		return nil // an older release's programs: no shortcut to void
	}
	if d.Sweeper == nil {
		return fmt.Errorf("void the UDP shortcuts: %w", errNoSweeper)
	}
	if _, err := d.runSweep(bpfPktmetaSweepArgs{Magic: sweepMagic, Flags: sweepForgetUDP}); err != nil {
		return fmt.Errorf("void the UDP shortcuts: %w", err)
	}
	return nil
}

// Endpoint returns the endpoint registered for a host ifindex.
func (d *Datapath) Endpoint(ifindex uint32) (Endpoint, bool, error) {
	var raw bpfPktmetaEndpoint
	err := d.EndpointsMap.Lookup(ifindex, &raw)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return Endpoint{}, false, nil
	}
	if err != nil {
		return Endpoint{}, false, fmt.Errorf("look up endpoint %d: %w", ifindex, err)
	}
	return decodeEndpoint(&raw), true, nil
}

func decodeEndpoint(raw *bpfPktmetaEndpoint) Endpoint {
	ep := Endpoint{
		Workload:        raw.Workload,
		Strict:          raw.Flags&epStrict != 0,
		NoEgress:        raw.Flags&epNoEgress != 0,
		MaxConnections:  raw.MaxConns,
		EventsPerSecond: raw.EventsPerSec,
		Live:            raw.Live,
		Spoofed:         raw.Spoofed,
		OverBudget:      raw.OverBudget,
		TableFull:       raw.TableFull,
		NotParty:        raw.NotParty,
		EventsLimited:   raw.EventsLimited,
	}
	for i := 0; i < int(raw.N_addrs) && i < MaxAddrs; i++ {
		ep.Addrs = append(ep.Addrs, netip.AddrFrom16(raw.Addrs[i]).Unmap())
	}
	return ep
}

// ListEndpoints lists registered endpoints by host ifindex.
func (d *Datapath) ListEndpoints() (map[uint32]Endpoint, error) {
	out := map[uint32]Endpoint{}
	var (
		ifindex uint32
		raw     bpfPktmetaEndpoint
	)
	it := d.EndpointsMap.Iterate()
	for it.Next(&ifindex, &raw) {
		out[ifindex] = decodeEndpoint(&raw)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list endpoints: %w", err)
	}
	return out, nil
}
