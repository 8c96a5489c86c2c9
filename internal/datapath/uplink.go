package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/vishvananda/netlink"
)

// Across nodes. A node's uplinks (the interfaces its traffic to other
// nodes leaves by: the NIC with native routing, the VXLAN device with an
// overlay) carry ProgUplinkOut on egress and ProgUplinkIn on ingress; the
// node's id, the cluster key and the cluster's members are in maps the
// programs read. See bpf/uplink.h and docs/ARCHITECTURE.md.
//
// Layout under the pin path:
//
//	uplinks/<ifname>/{ingress,egress}   tcx links of an uplink (the directory alone for legacy filters)

// KeySize is the length of the cluster key (SipHash-2-4).
const KeySize = 16

// MaxMembers is how many prefixes the member table holds.
const MaxMembers = 16384

// Node flags (PKTMETA_NODE_*).
const nodeFlagMAC = 1 << 0

// NodeConfig says how this node carries origins across nodes.
type NodeConfig struct {
	// ID is this node's id in the cluster, 1-65535, unique among the
	// nodes; 0 turns cross-node carrying off (options are still
	// neutralised and stripped, never honoured).
	ID uint16
	// Members are the cluster's node addresses and pod CIDRs: options
	// are put only on SYNs to them and honoured only from them.
	Members []netip.Prefix
	// Key is the cluster key (KeySize bytes). With it, options carry a MAC
	// and only options with a valid one are honoured. Nil: no MAC.
	Key []byte
	// MaxRemote bounds the records of connections opened on other nodes;
	// 0 is no bound.
	MaxRemote uint32
}

// NodeState is the node config as the datapath holds it, with what it
// keeps.
type NodeState struct {
	ID         uint16         `json:"id"`
	MAC        bool           `json:"mac"`
	MaxRemote  uint32         `json:"maxRemote"`
	LiveRemote int64          `json:"liveRemote"`
	Members    []netip.Prefix `json:"members"`
}

// Validate checks c without touching anything.
func (c *NodeConfig) Validate() error {
	if c.Key != nil && len(c.Key) != KeySize {
		return fmt.Errorf("cluster key is %d bytes, want %d", len(c.Key), KeySize)
	}
	if len(c.Members) > MaxMembers {
		return fmt.Errorf("%d member prefixes, at most %d", len(c.Members), MaxMembers)
	}
	if c.ID != 0 && len(c.Members) == 0 {
		return errors.New("a node id without member prefixes would never send or honour an option: give the cluster's node addresses and pod CIDRs")
	}
	for _, p := range c.Members {
		if !p.IsValid() {
			return fmt.Errorf("member prefix %v is not valid", p)
		}
		if err := MemberPrefixOK(p); err != nil {
			return err
		}
	}
	return nil
}

// Narrowest member prefixes: wider ones would send options off the
// cluster and trust them from anywhere.
const (
	minMemberBits4 = 8
	minMemberBits6 = 16
)

// MemberPrefixOK refuses a member prefix wider than any cluster's.
func MemberPrefixOK(p netip.Prefix) error {
	if (p.Addr().Is4() && p.Bits() < minMemberBits4) || (p.Addr().Is6() && p.Bits() < minMemberBits6) {
		return fmt.Errorf("member prefix %v is too wide: options would go to, and be trusted from, addresses outside any cluster (at most /%d for IPv4, /%d for IPv6)", p, minMemberBits4, minMemberBits6)
	}
	return nil
}

func memberKey(p netip.Prefix) bpfPktmetaMemberKey {
	p = p.Masked()
	k := bpfPktmetaMemberKey{Prefixlen: uint32(p.Bits()), Addr: p.Addr().As16()}
	if p.Addr().Is4() {
		k.Prefixlen += 96
	}
	return k
}

func prefixFromKey(k bpfPktmetaMemberKey) netip.Prefix {
	a := netip.AddrFrom16(k.Addr)
	bits := int(k.Prefixlen)
	if a.Is4In6() {
		return netip.PrefixFrom(a.Unmap(), bits-96)
	}
	return netip.PrefixFrom(a, bits)
}

// SetNode writes the node config: the id, key and bound first, then the
// member table is made to equal c.Members (added before the stale ones go,
// so no member is missing in between).
func (d *Datapath) SetNode(c NodeConfig) error {
	if err := d.writable(); err != nil {
		return err
	}
	if err := c.Validate(); err != nil {
		return err
	}
	var raw bpfPktmetaNodeConfig
	if err := d.NodeMap.Lookup(uint32(0), &raw); err != nil {
		return fmt.Errorf("read %s: %w", mapNode, err)
	}
	raw.Version = RecordVersion
	raw.NodeId = c.ID
	raw.MaxRemote = c.MaxRemote
	raw.Flags = 0
	raw.Key = [2]uint64{}
	if c.Key != nil {
		raw.Flags |= nodeFlagMAC
		for i := range 2 {
			for j := range 8 {
				raw.Key[i] |= uint64(c.Key[i*8+j]) << (8 * j)
			}
		}
	}
	if err := d.NodeMap.Update(uint32(0), &raw, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("write %s: %w", mapNode, err)
	}
	want := map[bpfPktmetaMemberKey]bool{}
	for _, p := range c.Members {
		k := memberKey(p)
		want[k] = true
		if err := d.MembersMap.Update(&k, uint32(1), ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add member %v: %w", p, err)
		}
	}
	have, err := d.members()
	if err != nil {
		return err
	}
	for _, k := range have {
		if !want[k] {
			if err := d.MembersMap.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("remove member %v: %w", prefixFromKey(k), err)
			}
		}
	}
	return nil
}

func (d *Datapath) members() ([]bpfPktmetaMemberKey, error) {
	var out []bpfPktmetaMemberKey
	var k bpfPktmetaMemberKey
	var v uint32
	it := d.MembersMap.Iterate()
	for it.Next(&k, &v) {
		out = append(out, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", mapMembers, err)
	}
	return out, nil
}

// Node reads the node config.
func (d *Datapath) Node() (NodeState, error) {
	var raw bpfPktmetaNodeConfig
	if err := d.NodeMap.Lookup(uint32(0), &raw); err != nil {
		return NodeState{}, fmt.Errorf("read %s: %w", mapNode, err)
	}
	st := NodeState{ID: raw.NodeId, MAC: raw.Flags&nodeFlagMAC != 0, MaxRemote: raw.MaxRemote}
	// The datapath's own count, in a map userspace never writes.
	if err := d.RemoteLiveMap.Lookup(uint32(0), &st.LiveRemote); err != nil {
		return st, fmt.Errorf("read %s: %w", mapRemoteLive, err)
	}
	keys, err := d.members()
	if err != nil {
		return st, err
	}
	for _, k := range keys {
		st.Members = append(st.Members, prefixFromKey(k))
	}
	slices.SortFunc(st.Members, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return st, nil
}

// uplinkHooks is the hook table of an uplink: both programs, always.
var uplinkHooks = []Requirement{
	{Hook: attach.Ingress, Program: ProgUplinkIn},
	{Hook: attach.Egress, Program: ProgUplinkOut},
}

func (d *Datapath) uplinksDir() string { return filepath.Join(d.PinPath, "uplinks") }

// UplinkDir is where an uplink's tcx links are pinned.
func (d *Datapath) UplinkDir(ifname string) string {
	return filepath.Join(d.uplinksDir(), pinName(ifname))
}

// Uplink is one attached uplink.
type Uplink struct {
	IfName  string       `json:"ifname"`
	Ifindex int          `json:"ifindex"` // 0: the interface is gone
	Mode    attach.Mode  `json:"mode"`
	Hooks   []HookStatus `json:"hooks,omitempty"`
}

// AttachUplink puts the uplink programs on ifname (in the calling thread's
// network namespace). Attaching an attached uplink again is a no-op.
func (d *Datapath) AttachUplink(ifname string, mode attach.Mode) (Uplink, error) {
	if err := d.writable(); err != nil {
		return Uplink{}, err
	}
	lnk, err := uplinkLink(ifname)
	if err != nil {
		return Uplink{}, err
	}
	ifindex := lnk.Attrs().Index
	lock, err := d.lockContainerPinName("uplink_" + pinName(ifname))
	if err != nil {
		return Uplink{}, err
	}
	defer lock.unlock(false)
	dir := d.UplinkDir(ifname)
	if _, err := os.Stat(dir); err == nil {
		up := d.uplink(ifname)
		if up.Ifindex == ifindex && hooksOK(up.Hooks) {
			return up, nil
		}
		// A stale directory (the interface was recreated) or a half
		// attachment: start again.
		if err := attach.Detach(ifindex, dir); err != nil {
			return Uplink{}, fmt.Errorf("uplink %s: remove the old attachment: %w", ifname, err)
		}
	}
	// The directory records the uplink for status, upgrade and uninstall,
	// so it exists before anything is attached: a process killed at any
	// point after leaves a record that uninstall follows. Without tcx,
	// legacy is chosen here rather than by Attach's fallback, whose failed
	// tcx try removes the directory on the way.
	if mode == attach.Auto && !attach.HaveTCX() {
		mode = attach.Legacy
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return Uplink{}, fmt.Errorf("create %s: %w", dir, err)
	}
	res, err := attach.Attach(ifindex, attach.Programs{Ingress: d.UplinkIn, Egress: d.UplinkOut, IngressFirst: true}, mode, dir)
	if err == nil && res.NoEgress {
		attach.Detach(ifindex, dir)
		err = errors.New("it has an `ingress` qdisc, so clsact (and the egress hook) cannot be added; tcx (Linux >= 6.6) has no such limit")
	}
	if err != nil {
		os.Remove(dir)
		return Uplink{}, fmt.Errorf("attach uplink %s: %w", ifname, err)
	}
	// A legacy attachment pins nothing in the directory: make sure it is
	// still there.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		attach.Detach(ifindex, dir)
		return Uplink{}, fmt.Errorf("create %s: %w", dir, err)
	}
	d.log.Info("uplink attached", "ifname", ifname, "ifindex", ifindex, "mode", res.Mode)
	return d.uplink(ifname), nil
}

// CheckUplink says whether ifname (in the calling thread's network
// namespace) can carry the uplink programs, without changing anything.
func CheckUplink(ifname string) error {
	_, err := uplinkLink(ifname)
	return err
}

func uplinkLink(ifname string) (netlink.Link, error) {
	lnk, err := netlink.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("uplink %s: %w", ifname, err)
	}
	// The programs parse Ethernet frames: on an IP-only device (an IPIP or
	// WireGuard tunnel) they would see nothing, and neutralise nothing.
	if a := lnk.Attrs(); a.EncapType != "ether" || len(a.HardwareAddr) != 6 {
		return nil, fmt.Errorf("uplink %s is a %s device without Ethernet headers; pktmeta's uplink programs parse Ethernet (a NIC, a bridge, a VXLAN device)", ifname, a.EncapType)
	}
	return lnk, nil
}

// DetachUplink takes the uplink programs off ifname. A gone interface or a
// second call is not an error.
func (d *Datapath) DetachUplink(ifname string) error {
	if err := d.writable(); err != nil {
		return err
	}
	ifindex := 0
	if lnk, err := netlink.LinkByName(ifname); err == nil {
		ifindex = lnk.Attrs().Index
	}
	lock, err := d.lockContainerPinName("uplink_" + pinName(ifname))
	if err != nil {
		return err
	}
	defer lock.unlock(false)
	dir := d.UplinkDir(ifname)
	if err := attach.Detach(ifindex, dir); err != nil {
		return fmt.Errorf("detach uplink %s: %w", ifname, err)
	}
	os.Remove(dir)
	return nil
}

// Uplinks lists the attached uplinks and checks their hooks.
func (d *Datapath) Uplinks() ([]Uplink, error) {
	ents, err := os.ReadDir(d.uplinksDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list uplinks: %w", err)
	}
	var out []Uplink
	for _, e := range ents {
		out = append(out, d.uplink(unpinName(e.Name())))
	}
	return out, nil
}

// Attached reports whether the uplink's interface exists and both
// programs are on their hooks.
func (u Uplink) Attached() bool { return u.Ifindex != 0 && hooksOK(u.Hooks) }

func hooksOK(hs []HookStatus) bool {
	for _, h := range hs {
		if !h.OK {
			return false
		}
	}
	return len(hs) > 0
}

// uplink describes one uplink directory: its interface and whether each
// program is on its hook.
func (d *Datapath) uplink(ifname string) Uplink {
	up := Uplink{IfName: ifname, Mode: attach.Legacy}
	dir := d.UplinkDir(ifname)
	if _, err := os.Stat(filepath.Join(dir, string(attach.Ingress))); err == nil {
		up.Mode = attach.TCX
	}
	lnk, err := netlink.LinkByName(ifname)
	if err != nil {
		for _, r := range uplinkHooks {
			up.Hooks = append(up.Hooks, HookStatus{Requirement: r, Problem: "interface " + ifname + " is gone"})
		}
		return up
	}
	up.Ifindex = lnk.Attrs().Index
	got, err := attach.Query(up.Ifindex)
	for _, r := range uplinkHooks {
		hs := HookStatus{Requirement: r}
		prog := d.Program(r.Program)
		switch {
		case err != nil:
			hs.Problem = err.Error()
		case prog == nil:
			hs.Problem = fmt.Sprintf("program %s is not pinned", r.Program)
		default:
			info, ierr := prog.Info()
			if ierr != nil {
				hs.Problem = ierr.Error()
				break
			}
			hs.ProgramID, _ = info.ID()
			hs.OK = got.Has(r.Hook, hs.ProgramID)
			if !hs.OK {
				hs.Problem = fmt.Sprintf("pktmeta program %s (id %d) is not attached to uplink %s %s", info.Name, hs.ProgramID, ifname, r.Hook)
			}
		}
		up.Hooks = append(up.Hooks, hs)
	}
	return up
}

// upgradeUplinks points every uplink at the freshly loaded programs.
func (d *Datapath) upgradeUplinks() {
	ups, _ := d.Uplinks()
	for _, up := range ups {
		if up.Ifindex == 0 {
			continue
		}
		for _, r := range uplinkHooks {
			if err := attach.Update(up.Ifindex, d.UplinkDir(up.IfName), r.Hook, up.Mode == attach.Legacy, d.Program(r.Program)); err != nil {
				d.log.Warn("upgrade uplink", "ifname", up.IfName, "hook", r.Hook, "err", err)
			}
		}
	}
}

// detachUplinks takes the programs off every uplink (Destroy).
func (d *Datapath) detachUplinks() error {
	ents, err := os.ReadDir(d.uplinksDir())
	if err != nil {
		return nil
	}
	var errs []error
	for _, e := range ents {
		ifindex := 0
		if lnk, err := netlink.LinkByName(unpinName(e.Name())); err == nil {
			ifindex = lnk.Attrs().Index
		}
		errs = append(errs, attach.Detach(ifindex, filepath.Join(d.uplinksDir(), e.Name())))
		os.Remove(filepath.Join(d.uplinksDir(), e.Name()))
	}
	os.Remove(d.uplinksDir())
	return errors.Join(errs...)
}

// RemoteStats are the uplink programs' counters summed over CPUs.
type RemoteStats struct {
	OutSYNs           uint64 `json:"outSyns"`
	OptAdded          uint64 `json:"optAdded"`
	OptNoRoom         uint64 `json:"optNoRoom"`
	OptNeutralised    uint64 `json:"optNeutralised"`
	OutNoRecord       uint64 `json:"outNoRecord"`
	OutNotMember      uint64 `json:"outNotMember"`
	InSYNs            uint64 `json:"inSyns"`
	InOptions         uint64 `json:"inOptions"`
	RemoteTagged      uint64 `json:"remoteTagged"`
	Untrusted         uint64 `json:"untrusted"`
	BadMAC            uint64 `json:"badMac"`
	Malformed         uint64 `json:"malformed"`
	StrippedNOP       uint64 `json:"strippedNop"`
	RemoteRetransmits uint64 `json:"remoteRetransmits"`
	RemoteOverBudget  uint64 `json:"remoteOverBudget"`
	RemoteTableFull   uint64 `json:"remoteTableFull"`
	RemoteNotParty    uint64 `json:"remoteNotParty"`
	NodeOff           uint64 `json:"nodeOff"`
	OutListCut        uint64 `json:"outListCut"`
}

// ReadRemoteStats sums the uplink counters.
func (d *Datapath) ReadRemoteStats() (RemoteStats, error) {
	var perCPU []bpfPktmetaRemoteCounters
	if err := d.XStatsMap.Lookup(uint32(0), &perCPU); err != nil {
		return RemoteStats{}, fmt.Errorf("read uplink counters: %w", err)
	}
	var s RemoteStats
	for _, c := range perCPU {
		s.OutSYNs += c.OutSyns
		s.OptAdded += c.OptAdded
		s.OptNoRoom += c.OptNoRoom
		s.OptNeutralised += c.OptNeutralised
		s.OutNoRecord += c.OutNoRecord
		s.OutNotMember += c.OutNotMember
		s.InSYNs += c.InSyns
		s.InOptions += c.InOptions
		s.RemoteTagged += c.RemoteTagged
		s.Untrusted += c.Untrusted
		s.BadMAC += c.BadMac
		s.Malformed += c.Malformed
		s.StrippedNOP += c.StrippedNop
		s.RemoteRetransmits += c.RemoteRetransmits
		s.RemoteOverBudget += c.RemoteOverBudget
		s.RemoteTableFull += c.RemoteTableFull
		s.RemoteNotParty += c.RemoteNotParty
		s.NodeOff += c.NodeOff
		s.OutListCut += c.OutListCut
	}
	return s, nil
}
