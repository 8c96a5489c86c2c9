// Package datapath owns pktmeta's pinned BPF state: it loads the programs
// and maps once per node, pins them under a bpffs directory, reuses them on
// every later call, and upgrades the programs in place when a newer build
// brings different ones.
//
// Layout under the pin path (default /sys/fs/bpf/pktmeta):
//
//	maps/<name>                      the maps, pinned by name (see bpf/)
//	progs/{origin,strict,deliver,gc} the programs
//	links/<containerID>/<ifname>/{ingress,egress}   tcx links of one attachment
//
// The pin directory itself is the lock (flock) that serialises loading and
// upgrades against everything else.
package datapath

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
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
const LayoutVersion = 1

// RecordVersion is PKTMETA_RECORD_VERSION of the bundled BPF object.
const RecordVersion = 1

// Limits of the fixed-size layouts (bpf/datapath.h).
const (
	MaxAddrs = 8
	MaxTags  = 8
)

// Defaults for Options.
const (
	DefaultMaxConnections = 131072
	DefaultUDPTimeout     = 120 * time.Second
)

// Program names, as pinned under progs/.
const (
	ProgOrigin  = "origin"
	ProgStrict  = "strict"
	ProgDeliver = "deliver"
	// ProgGC sweeps the connection table in the kernel (BPF_PROG_RUN).
	ProgGC = "gc"
)

var (
	// ErrNotLoaded means no pinned datapath exists at the pin path yet.
	ErrNotLoaded = errors.New("no pinned datapath")
	// ErrNotBPFFS means the pin path is not on a bpf filesystem.
	ErrNotBPFFS = errors.New("not on a bpf filesystem")
)

// Options configure how a datapath is created. They matter only when the
// maps do not exist yet; a pinned datapath keeps the sizes it was made with.
type Options struct {
	PinPath        string
	MaxConnections uint32
	UDPTimeout     time.Duration
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
	return out
}

// Datapath is an open handle on the pinned maps and programs.
type Datapath struct {
	PinPath string

	ConnsMap     *ebpf.Map
	AliasesMap   *ebpf.Map
	EndpointsMap *ebpf.Map
	WorkloadsMap *ebpf.Map
	StatsMap     *ebpf.Map
	ConfigMap    *ebpf.Map
	EventsMap    *ebpf.Map

	Origin  *ebpf.Program
	Strict  *ebpf.Program
	Deliver *ebpf.Program
	GC      *ebpf.Program
}

// ID identifies the BPF object bundled in this binary: the sha256 of its
// bytes. Pinned programs from another object are upgraded.
func ID() [32]byte { return bundledID() }

// Hashed once: every ADD compares it.
var bundledID = sync.OnceValue(func() [32]byte { return sha256.Sum256(_BpfBytes) })

func (d *Datapath) mapsDir() string  { return filepath.Join(d.PinPath, "maps") }
func (d *Datapath) progsDir() string { return filepath.Join(d.PinPath, "progs") }

// LinksDir is where the tcx links of attachments are pinned.
func (d *Datapath) LinksDir() string { return filepath.Join(d.PinPath, "links") }

// Close releases the handles. Pinned state stays.
func (d *Datapath) Close() error {
	var errs []error
	for _, c := range []interface{ Close() error }{d.ConnsMap, d.AliasesMap, d.EndpointsMap, d.WorkloadsMap, d.StatsMap, d.ConfigMap, d.EventsMap, d.Origin, d.Strict, d.Deliver, d.GC} {
		if c == nil || isNilHandle(c) {
			continue
		}
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

func isNilHandle(c interface{ Close() error }) bool {
	switch v := c.(type) {
	case *ebpf.Map:
		return v == nil
	case *ebpf.Program:
		return v == nil
	}
	return false
}

// Program returns the program for a pinned name (ProgOrigin, ...).
func (d *Datapath) Program(name string) *ebpf.Program {
	switch name {
	case ProgOrigin:
		return d.Origin
	case ProgStrict:
		return d.Strict
	case ProgDeliver:
		return d.Deliver
	case ProgGC:
		return d.GC
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

// Open opens the pinned maps and programs without loading anything. It
// fails with ErrNotLoaded when nothing (or not all of it) is pinned yet, and
// when the pinned layout is not the one this build understands.
func Open(pinPath string) (*Datapath, error) {
	d, err := OpenMaps(pinPath)
	if err != nil {
		return nil, err
	}
	if err := d.OpenPrograms(); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// OpenMaps opens only the pinned maps: enough to read and remove state,
// even when the programs are missing.
func OpenMaps(pinPath string) (*Datapath, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	d := &Datapath{PinPath: pinPath}
	if err := CheckBPFFS(pinPath); err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(d.mapsDir(), mapConfig)); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", pinPath, ErrNotLoaded)
	}
	if err := d.openMaps(); err != nil {
		d.Close()
		return nil, err
	}
	cfg, err := d.ReadConfig()
	if err != nil {
		d.Close()
		return nil, err
	}
	switch cfg.LayoutVersion {
	case LayoutVersion:
		return d, nil
	case 0:
		// Maps created by a load that did not finish; the next ADD completes it.
		d.Close()
		return nil, fmt.Errorf("%s: maps without a layout version (an interrupted first load): %w", pinPath, ErrNotLoaded)
	}
	d.Close()
	return nil, fmt.Errorf("pinned datapath at %s has layout version %d, this build needs %d", pinPath, cfg.LayoutVersion, LayoutVersion)
}

// Map names, as in bpf/pktmeta.c.
const (
	mapConns     = "pktmeta_conns"
	mapAliases   = "pktmeta_aliases"
	mapEndpoints = "pktmeta_eps"
	mapWorkloads = "pktmeta_wloads"
	mapStats     = "pktmeta_stats"
	mapConfig    = "pktmeta_cfg"
	mapEvents    = "pktmeta_events"
)

func (d *Datapath) openMaps() error {
	for name, dst := range d.mapSlots() {
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.mapsDir(), name), nil)
		if err != nil {
			return fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = m
	}
	return nil
}

// OpenPrograms opens the pinned programs of a datapath opened with OpenMaps.
func (d *Datapath) OpenPrograms() error {
	for name, dst := range d.progSlots() {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(d.progsDir(), name), nil)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("program %s not pinned: %w", name, ErrNotLoaded)
			}
			return fmt.Errorf("open pinned program %s: %w", name, err)
		}
		*dst = p
	}
	return nil
}

func (d *Datapath) mapSlots() map[string]**ebpf.Map {
	return map[string]**ebpf.Map{
		mapConns:     &d.ConnsMap,
		mapAliases:   &d.AliasesMap,
		mapEndpoints: &d.EndpointsMap,
		mapWorkloads: &d.WorkloadsMap,
		mapStats:     &d.StatsMap,
		mapConfig:    &d.ConfigMap,
		mapEvents:    &d.EventsMap,
	}
}

func (d *Datapath) progSlots() map[string]**ebpf.Program {
	return map[string]**ebpf.Program{
		ProgOrigin:  &d.Origin,
		ProgStrict:  &d.Strict,
		ProgDeliver: &d.Deliver,
		ProgGC:      &d.GC,
	}
}

// Config is the decoded pktmeta_cfg slot.
type Config struct {
	LayoutVersion uint32
	EventsOff     bool
	UDPTimeout    time.Duration
	DatapathID    [32]byte
}

// ReadConfig reads the config slot.
func (d *Datapath) ReadConfig() (Config, error) {
	var raw bpfPktmetaConfig
	if err := d.ConfigMap.Lookup(uint32(0), &raw); err != nil {
		return Config{}, fmt.Errorf("read %s: %w", mapConfig, err)
	}
	return Config{
		LayoutVersion: raw.LayoutVersion,
		EventsOff:     raw.Flags&cfgNoEvents != 0,
		UDPTimeout:    time.Duration(raw.UdpTimeoutNs),
		DatapathID:    raw.DatapathId,
	}, nil
}

const cfgNoEvents = 1 << 0

// WriteConfig replaces the config slot.
func (d *Datapath) WriteConfig(c Config) error {
	raw := bpfPktmetaConfig{
		LayoutVersion: c.LayoutVersion,
		UdpTimeoutNs:  uint64(c.UDPTimeout),
		DatapathId:    c.DatapathID,
	}
	if c.EventsOff {
		raw.Flags |= cfgNoEvents
	}
	if err := d.ConfigMap.Update(uint32(0), &raw, ebpf.UpdateAny); err != nil {
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
	return bytes.Equal(cfg.DatapathID[:], id[:]), nil
}
