// Package datapath owns pktmeta's pinned BPF state, and is the only code
// that knows how it is laid out, locked, created, completed and upgraded.
//
// Layout under the pin path (default /sys/fs/bpf/pktmeta):
//
//	maps/<name>                          the maps, pinned by name (see bpf/)
//	progs/{origin,strict,deliver,sweep,uplink_out,uplink_in,getsockopt}  the programs
//	apps/getsockopt                      cgroup link of the application interface (sockopt.go)
//	uplinks/<ifname>/{ingress,egress}    tcx links of a node uplink (across nodes; uplink.go)
//	links/<containerID>/<ifname>/{ingress,egress}   tcx links of one attachment
//	locks/<containerID>/                 per-container lock (a directory: bpffs holds no files)
//
// The pin directory itself is the node lock (flock). A handle from Open or
// OpenExisting holds it shared for its whole life, so no upgrade can change
// the programs under it; loading and upgrading hold it exclusively.
// ADD, DEL and the agent's reconcile of one container are serialised by
// that container's lock, taken inside Attach and Detach. OpenReader gives a
// lock-free read-only view for the CLI, metrics and event readers.
//
// A committed datapath is one whose config slot carries a layout version:
// that is written last when the maps are first made, so whatever a killed
// process left before it is thrown away and made again.
package datapath

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// DefaultPinPath is where a node keeps pktmeta's state.
const DefaultPinPath = "/sys/fs/bpf/pktmeta"

// LayoutVersion is PKTMETA_LAYOUT_VERSION of the bundled BPF object.
const LayoutVersion = 3

// RecordVersion is PKTMETA_RECORD_VERSION of the bundled BPF object.
const RecordVersion = 3

// Limits of the fixed-size layouts (bpf/datapath.h).
const (
	MaxAddrs = 16
	MaxTags  = 8
)

// Defaults for Options and AttachOptions.
const (
	DefaultMaxConnections = 131072
	DefaultUDPTimeout     = 120 * time.Second
	// DefaultTCPHandshakeTimeout bounds how long a TCP record may wait for
	// the peer's SYN-ACK before a sweep removes it: Linux gives up a
	// connect() after 127 s (tcp_syn_retries 6).
	DefaultTCPHandshakeTimeout = 150 * time.Second
	// PodShareOfTable: by default a pod may hold 1/16 of the table.
	PodShareOfTable = 16
	// DefaultEventsPerSecond is how many connections a second a pod may
	// open with events (its records are made either way).
	DefaultEventsPerSecond = 1000
)

// Program names, as pinned under progs/.
const (
	ProgOrigin  = "origin"
	ProgStrict  = "strict"
	ProgDeliver = "deliver"
	// ProgSweep sweeps the connection table in the kernel (BPF_PROG_TEST_RUN).
	ProgSweep = "sweep"
	// ProgTableWrite changes the connection table for userspace
	// (BPF_PROG_TEST_RUN), under the programs' own locks.
	ProgTableWrite = "table_write"
	// ProgUplinkOut and ProgUplinkIn carry origins across nodes, on the
	// egress and ingress of a node's uplinks (bpf/uplink.h).
	ProgUplinkOut = "uplink_out"
	ProgUplinkIn  = "uplink_in"
)

var (
	// ErrNotLoaded means no committed datapath is pinned at the pin path.
	ErrNotLoaded = errors.New("no pinned datapath")
	// ErrNotBPFFS means the pin path is not on a bpf filesystem.
	ErrNotBPFFS = errors.New("not on a bpf filesystem")
	// ErrNewer means the pinned datapath comes from a newer (or another)
	// pktmeta than this one, which refuses to replace it.
	ErrNewer = errors.New("pinned datapath is newer than this pktmeta")
	// ErrOlderLayout means the pinned maps have an older layout, which
	// this pktmeta cannot migrate in place.
	ErrOlderLayout = errors.New("pinned maps have an older layout")
	// ErrReadOnly is returned by changes through an OpenReader handle.
	ErrReadOnly = errors.New("datapath opened read-only")
)

// Options say where the datapath is pinned and how to create it. The sizes
// matter only when the maps are made; a pinned datapath keeps its own.
type Options struct {
	PinPath        string
	MaxConnections uint32
	UDPTimeout     time.Duration
	// Log receives what loading and upgrading did; nil discards it.
	Log *slog.Logger
	// BenchNoSourceCheck loads programs that skip the source address
	// check, so that `make bench` can show what the check costs. Only on
	// an empty pin path; never on a node.
	BenchNoSourceCheck bool
}

func (o *Options) withDefaults() Options {
	out := *o
	if out.PinPath == "" {
		out.PinPath = DefaultPinPath
	}
	if out.MaxConnections == 0 {
		out.MaxConnections = DefaultMaxConnections
	}
	if out.UDPTimeout == 0 {
		out.UDPTimeout = DefaultUDPTimeout
	}
	if out.Log == nil {
		out.Log = slog.New(slog.DiscardHandler)
	}
	return out
}

// Datapath is an open handle on the pinned maps and programs.
type Datapath struct {
	PinPath string

	// The connection table (bpf/include/pktmeta.h): its description, one
	// word per chunk, and the slots.
	TableMap      *ebpf.Map
	ChunksMap     *ebpf.Map
	SlotsMap      *ebpf.Map
	AliasesMap    *ebpf.Map
	EndpointsMap  *ebpf.Map
	WorkloadsMap  *ebpf.Map
	StatsMap      *ebpf.Map
	ConfigMap     *ebpf.Map
	EventsMap     *ebpf.Map
	InboundMap    *ebpf.Map
	NodeMap       *ebpf.Map
	MembersMap    *ebpf.Map
	XStatsMap     *ebpf.Map
	RemoteLiveMap *ebpf.Map
	UDPEpochMap   *ebpf.Map
	// WorkloadNetnsMap: workload id -> netns cookie (the application
	// interface, sockopt.go).
	WorkloadNetnsMap *ebpf.Map
	// NetnsAddrsMap: netns cookie -> the pods' addresses in it;
	// UDPPeersMap: per UDP socket, the source its last recvmsg returned.
	NetnsAddrsMap *ebpf.Map
	UDPPeersMap   *ebpf.Map
	// UDPPeerGenMap: the generation of the recvmsg programs' attachment.
	UDPPeerGenMap *ebpf.Map

	Origin  *ebpf.Program
	Strict  *ebpf.Program
	Deliver *ebpf.Program
	Sweeper *ebpf.Program
	// TableWriter changes the connection table for userspace.
	TableWriter *ebpf.Program
	// The uplink programs (across nodes), attached to a node's uplinks.
	UplinkOut *ebpf.Program
	UplinkIn  *ebpf.Program
	// Getsockopt answers applications' getsockopt(SOL_PKTMETA) on the
	// node's cgroup v2 root (sockopt.go).
	Getsockopt *ebpf.Program
	// Recvmsg4 and Recvmsg6 remember what unconnected UDP sockets
	// received, for Getsockopt (sockopt.go).
	Recvmsg4 *ebpf.Program
	Recvmsg6 *ebpf.Program

	table tableInfo // read from TableMap when the handle opens
	log   *slog.Logger
	lock  *nodeLock // nil for a reader
}

// ID identifies the BPF object bundled in this binary: the sha256 of its
// bytes.
func ID() [32]byte { return bundledID() }

// Hashed once: every ADD compares it.
var bundledID = sync.OnceValue(func() [32]byte { return sha256.Sum256(_BpfBytes) })

func (d *Datapath) mapsDir() string  { return filepath.Join(d.PinPath, "maps") }
func (d *Datapath) progsDir() string { return filepath.Join(d.PinPath, "progs") }
func (d *Datapath) locksDir() string { return filepath.Join(d.PinPath, "locks") }

// LinksDir is where the tcx links of attachments are pinned.
func (d *Datapath) LinksDir() string { return filepath.Join(d.PinPath, "links") }

// ReadOnly reports whether the handle came from OpenReader.
func (d *Datapath) ReadOnly() bool { return d.lock == nil }

func (d *Datapath) writable() error {
	if d.lock == nil {
		return ErrReadOnly
	}
	return nil
}

// Close releases the handles and, for a writable handle, the node lock.
// Pinned state stays.
func (d *Datapath) Close() error {
	var errs []error
	for _, m := range d.mapSlots() {
		if *m != nil {
			errs = append(errs, (*m).Close())
			*m = nil
		}
	}
	for _, p := range d.progSlots() {
		if *p != nil {
			errs = append(errs, (*p).Close())
			*p = nil
		}
	}
	if d.lock != nil {
		errs = append(errs, d.lock.unlock())
		d.lock = nil
	}
	return errors.Join(errs...)
}

// Program returns the program for a pinned name (ProgOrigin, ...).
func (d *Datapath) Program(name string) *ebpf.Program {
	if p, ok := d.progSlots()[name]; ok {
		return *p
	}
	return nil
}

// CheckBPFFS reports whether dir (or its closest existing parent) is on a
// bpf filesystem.
func CheckBPFFS(dir string) error {
	for p := filepath.Clean(dir); ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		err := unix.Statfs(p, &st)
		if err == nil {
			if st.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("%s: %w (mount one with: mount -t bpf bpf /sys/fs/bpf)", p, ErrNotBPFFS)
			}
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) || p == "/" {
			return fmt.Errorf("statfs %s: %w", p, err)
		}
	}
}

// Map names, as in bpf/pktmeta.c.
const (
	mapTable      = "pktmeta_table"
	mapChunks     = "pktmeta_chunks"
	mapSlots      = "pktmeta_slots"
	mapAliases    = "pktmeta_aliases"
	mapEndpoints  = "pktmeta_eps"
	mapWorkloads  = "pktmeta_wloads"
	mapStats      = "pktmeta_stats"
	mapConfig     = "pktmeta_cfg"
	mapEvents     = "pktmeta_events"
	mapInbound    = "pktmeta_inbound"
	mapNode       = "pktmeta_node"
	mapMembers    = "pktmeta_members"
	mapXStats     = "pktmeta_xstats"
	mapRemoteLive = "pktmeta_remote_live"
	mapUDPEpoch   = "pktmeta_udp_epoch"
	mapWlNetns    = "pktmeta_wl_netns"
	mapNsAddrs    = "pktmeta_ns_addrs"
	mapUDPPeers   = "pktmeta_udp_peers"
	mapUDPPeerGen = "pktmeta_udp_peer_gen"
)

// mapNames lists every map; the config comes last, as the commit point.
var mapNames = []string{mapTable, mapChunks, mapSlots, mapAliases, mapEndpoints, mapWorkloads, mapStats, mapEvents, mapInbound, mapNode, mapMembers, mapXStats, mapRemoteLive, mapUDPEpoch, mapWlNetns, mapNsAddrs, mapUDPPeers, mapUDPPeerGen, mapConfig}

// retiredMaps are maps of older layouts: an uninstall removes them too.
// pktmeta_conns was the connection table until layout 3.
var retiredMaps = []string{"pktmeta_conns"}

// newerMaps are the maps a datapath of an older release of this layout
// may not have. A handle that takes pinned state as it is (no programs
// needed) leaves them nil where they are missing; everything that uses
// them says what it does without.
var newerMaps = map[string]bool{mapUDPEpoch: true, mapWlNetns: true, mapNsAddrs: true, mapUDPPeers: true, mapUDPPeerGen: true}

// optionalProgs are programs a kernel may be unable to run without the
// rest of the datapath suffering: they are left out of the load there
// (KernelFeatures says why), and a pinned datapath without them is
// complete.
var optionalProgs = map[string]bool{ProgGetsockopt: true, ProgRecvmsg4: true, ProgRecvmsg6: true}

// progNames lists every program with its name in the object.
var progNames = map[string]string{
	ProgOrigin:     bpfProgPktmetaOrigin,
	ProgStrict:     bpfProgPktmetaStrict,
	ProgDeliver:    bpfProgPktmetaDeliver,
	ProgSweep:      bpfProgPktmetaSweep,
	ProgTableWrite: bpfProgPktmetaTableWrite,
	ProgUplinkOut:  bpfProgPktmetaUplinkOut,
	ProgUplinkIn:   bpfProgPktmetaUplinkIn,

	ProgGetsockopt: bpfProgPktmetaGetsockopt,
	ProgRecvmsg4:   bpfProgPktmetaRecvmsg4,
	ProgRecvmsg6:   bpfProgPktmetaRecvmsg6,
}

func (d *Datapath) mapSlots() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		mapTable:      &d.TableMap,
		mapChunks:     &d.ChunksMap,
		mapSlots:      &d.SlotsMap,
		mapAliases:    &d.AliasesMap,
		mapEndpoints:  &d.EndpointsMap,
		mapWorkloads:  &d.WorkloadsMap,
		mapStats:      &d.StatsMap,
		mapConfig:     &d.ConfigMap,
		mapEvents:     &d.EventsMap,
		mapInbound:    &d.InboundMap,
		mapNode:       &d.NodeMap,
		mapMembers:    &d.MembersMap,
		mapXStats:     &d.XStatsMap,
		mapRemoteLive: &d.RemoteLiveMap,
		mapUDPEpoch:   &d.UDPEpochMap,
		mapWlNetns:    &d.WorkloadNetnsMap,
		mapNsAddrs:    &d.NetnsAddrsMap,
		mapUDPPeers:   &d.UDPPeersMap,
		mapUDPPeerGen: &d.UDPPeerGenMap,
	}
}

func (d *Datapath) progSlots() map[string]**ebpf.Program {
	return map[string]**ebpf.Program{
		ProgOrigin:     &d.Origin,
		ProgStrict:     &d.Strict,
		ProgDeliver:    &d.Deliver,
		ProgSweep:      &d.Sweeper,
		ProgTableWrite: &d.TableWriter,
		ProgUplinkOut:  &d.UplinkOut,
		ProgUplinkIn:   &d.UplinkIn,

		ProgGetsockopt: &d.Getsockopt,
		ProgRecvmsg4:   &d.Recvmsg4,
		ProgRecvmsg6:   &d.Recvmsg6,
	}
}

// Config is the decoded pktmeta_cfg slot.
type Config struct {
	LayoutVersion uint32
	Release       uint32
	EventsOff     bool
	// NoConntrack: the programs were loaded without the conntrack kfuncs
	// (KernelFeatures.ConntrackKfuncs), so they resolve no NAT.
	NoConntrack bool
	UDPTimeout  time.Duration
	DatapathID  [32]byte
}

// ReadConfig reads the config slot.
func (d *Datapath) ReadConfig() (Config, error) {
	return readConfig(d.ConfigMap)
}

func readConfig(m *ebpf.Map) (Config, error) {
	var raw bpfPktmetaConfig
	if err := m.Lookup(uint32(0), &raw); err != nil {
		return Config{}, fmt.Errorf("read %s: %w", mapConfig, err)
	}
	return Config{
		LayoutVersion: raw.LayoutVersion,
		Release:       raw.Release,
		EventsOff:     raw.Flags&cfgNoEvents != 0,
		NoConntrack:   raw.Flags&cfgNoConntrack != 0,
		UDPTimeout:    time.Duration(raw.UdpTimeoutNs),
		DatapathID:    raw.DatapathId,
	}, nil
}

const (
	cfgNoEvents    = 1 << 0 // PKTMETA_CFG_NO_EVENTS
	cfgNoConntrack = 1 << 1 // PKTMETA_CFG_NO_CONNTRACK
)

// WriteConfig replaces the config slot. Tests use it to play an older or
// newer datapath; everything else goes through Open.
func (d *Datapath) WriteConfig(c Config) error {
	if err := d.writable(); err != nil {
		return err
	}
	return writeConfig(d.ConfigMap, c)
}

func writeConfig(m *ebpf.Map, c Config) error {
	raw := bpfPktmetaConfig{
		LayoutVersion: c.LayoutVersion,
		Release:       c.Release,
		UdpTimeoutNs:  uint64(c.UDPTimeout),
		DatapathId:    c.DatapathID,
	}
	if c.EventsOff {
		raw.Flags |= cfgNoEvents
	}
	if c.NoConntrack {
		raw.Flags |= cfgNoConntrack
	}
	if err := m.Update(uint32(0), &raw, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write %s: %w", mapConfig, err)
	}
	return nil
}

// Current reports whether the pinned programs come from this build.
func (d *Datapath) Current() (bool, error) {
	cfg, err := d.ReadConfig()
	if err != nil {
		return false, err
	}
	id := ID()
	return cfg.Release == Release && bytes.Equal(cfg.DatapathID[:], id[:]), nil
}
