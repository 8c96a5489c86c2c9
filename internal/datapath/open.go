package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
)

// OpenResult says what Open had to do.
type OpenResult struct {
	Loaded   bool // programs were loaded (and verified) by this call
	Created  bool // the maps were made by this call
	Repaired bool // pins an interrupted process left were completed or replaced
	Upgraded int  // attachments moved to new programs
	// Previous describes the state Open found when it had to act.
	Previous string
}

// Open opens the pinned datapath for changing attachments, and holds the
// node lock shared until Close. If the pinned state is not this build's
// complete datapath it first takes the lock exclusively and makes it so:
// it creates what is missing, replaces what an interrupted load left,
// loads this build's programs against the pinned maps and moves every
// attachment to them. A datapath from a newer pktmeta is refused
// (ErrNewer): downgrades are not done silently.
//
// The common case, the current datapath, only opens pins: nothing is
// loaded or verified.
func Open(o Options) (*Datapath, OpenResult, error) {
	o = o.withDefaults()
	var res OpenResult
	if o.MaxConnections > MaxCapacity {
		return nil, res, fmt.Errorf("maxConnections %d: at most %d", o.MaxConnections, MaxCapacity)
	}
	for range 3 {
		lock, err := lockNode(o.PinPath, false)
		if err != nil {
			return nil, res, err
		}
		st, err := inspect(o.PinPath)
		if err != nil {
			lock.unlock()
			return nil, res, err
		}
		if st.kind == stateCurrent || (o.BenchNoSourceCheck && st.kind == stateNewer && st.cfg.DatapathID == benchID()) {
			d, err := openPinned(o.PinPath, lock, true, o.Log)
			if err == nil {
				return d, res, nil
			}
			o.Log.Warn("pinned datapath changed under the lock; checking it again", "err", err)
		}
		lock.unlock()
		if st.kind == stateNewer {
			return nil, res, st.newerError(o.PinPath)
		}

		ex, err := lockNode(o.PinPath, true)
		if err != nil {
			return nil, res, err
		}
		r, err := ensure(o)
		ex.unlock()
		res.Loaded = res.Loaded || r.Loaded
		res.Created = res.Created || r.Created
		res.Repaired = res.Repaired || r.Repaired
		res.Upgraded += r.Upgraded
		if r.Previous != "" {
			res.Previous = r.Previous
		}
		if err != nil {
			return nil, res, err
		}
	}
	return nil, res, fmt.Errorf("pinned datapath at %s keeps changing while it is opened", o.PinPath)
}

// OpenExisting opens a committed datapath for changing attachments, and
// holds the node lock shared until Close: for DEL, GC, CHECK and the
// agent's reconcile, which change attachments of a datapath that exists.
// ErrNotLoaded when none is committed (so nothing to remove). Like Open it
// completes an incomplete datapath (a DEL must work whatever a killed
// process left), but it never creates one.
func OpenExisting(pinPath string, log *slog.Logger) (*Datapath, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	// Without the lock: a first load may commit right after this, and the
	// caller then finds nothing of its own in it anyway.
	st, err := inspectCommitted(pinPath)
	if err != nil {
		return nil, err
	}
	if st.kind == stateNewer {
		// A newer pktmeta's datapath with the maps this build knows: an
		// older plugin may still remove what it added (a rollback's DEL),
		// but it loads and upgrades nothing.
		return openAsIs(pinPath, log)
	}
	d, _, err := Open(Options{PinPath: pinPath, Log: log})
	if err == nil || errors.Is(err, ErrNotBPFFS) || errors.Is(err, ErrNewer) {
		return d, err
	}
	// Completing or upgrading failed (the verifier refused the programs,
	// memory ran out): removals still work with the maps as they are, and a
	// DEL must not fail for it.
	log.Warn("could not complete the pinned datapath; using it as it is", "pinPath", pinPath, "err", err)
	d, oerr := openAsIs(pinPath, log)
	if oerr != nil {
		return nil, errors.Join(err, oerr)
	}
	return d, nil
}

// openAsIs opens the pinned state as it is, programs optional, holding the
// node lock shared.
func openAsIs(pinPath string, log *slog.Logger) (*Datapath, error) {
	lock, err := lockNode(pinPath, false)
	if err != nil {
		return nil, err
	}
	d, err := openPinned(pinPath, lock, false, log)
	if err != nil {
		lock.unlock()
		return nil, err
	}
	return d, nil
}

// DetachPinned detaches the tcx links pinned for key without opening the
// datapath: for a DEL that meets maps of a layout it cannot read (a
// rollback across a layout change). Legacy filters go with the pod's veth.
func DetachPinned(pinPath string, key AttachmentKey) error {
	d := &Datapath{PinPath: pinPath}
	return attach.Detach(0, d.AttachmentLinkDir(key))
}

// OpenReader opens a committed datapath for reading, without any lock: for
// the CLI, metrics and event readers, which must neither wait for nor hold
// up an upgrade. Changes through it fail with ErrReadOnly.
func OpenReader(pinPath string) (*Datapath, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	if _, err := inspectCommitted(pinPath); err != nil {
		return nil, err
	}
	return openPinned(pinPath, nil, false, slog.New(slog.DiscardHandler))
}

// inspectCommitted classifies what is pinned and fails unless it is a
// committed datapath with maps this build can read: ErrNotLoaded when
// nothing is committed, the layout errors otherwise.
func inspectCommitted(pinPath string) (pinState, error) {
	if err := CheckBPFFS(pinPath); err != nil {
		return pinState{}, err
	}
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return pinState{}, fmt.Errorf("%s: %w", pinPath, ErrNotLoaded)
	}
	st, err := inspect(pinPath)
	if err != nil {
		return st, err
	}
	switch {
	case st.kind == stateNone:
		return st, fmt.Errorf("%s: %w", pinPath, ErrNotLoaded)
	case st.kind == stateOlderLayout:
		return st, st.layoutError(pinPath)
	case st.kind == stateNewer && st.cfg.LayoutVersion != LayoutVersion:
		return st, st.newerError(pinPath)
	}
	return st, nil
}

// openPinned opens every pinned map and the pinned programs. With
// needProgs, a missing program is an error.
func openPinned(pinPath string, lock *nodeLock, needProgs bool, log *slog.Logger) (*Datapath, error) {
	d := &Datapath{PinPath: pinPath, log: log}
	for name, dst := range d.mapSlots() {
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.mapsDir(), name), nil)
		if errors.Is(err, os.ErrNotExist) && !needProgs && newerMaps[name] {
			// An older release's datapath, taken as it is (a DEL where
			// completing it failed): its programs never used this map.
			continue
		}
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		*dst = m
	}
	for name, dst := range d.progSlots() {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(d.progsDir(), name), nil)
		if errors.Is(err, os.ErrNotExist) && (!needProgs || optionalProgs[name]) {
			continue
		}
		if err != nil {
			d.Close()
			return nil, fmt.Errorf("open pinned program %s: %w", name, err)
		}
		*dst = p
	}
	t, err := readTable(d.TableMap, d.ChunksMap, d.SlotsMap)
	if err != nil {
		d.Close()
		return nil, err
	}
	d.table = t
	d.lock = lock
	return d, nil
}

// What inspect found.
type stateKind int

const (
	stateNone        stateKind = iota // nothing committed (maybe leftovers of an interrupted first load)
	stateCurrent                      // this build's datapath, complete
	stateIncomplete                   // this build's layout and release, something missing
	stateOlder                        // same layout, an older release: upgrade the programs
	stateOlderLayout                  // maps of an older layout: no migration exists
	stateNewer                        // a newer release or layout, or another build of this release
)

func (k stateKind) String() string {
	return [...]string{"nothing committed", "current", "incomplete", "an older release", "an older map layout", "newer"}[k]
}

type pinState struct {
	kind      stateKind
	cfg       Config // when committed
	leftovers bool   // stateNone: pins of an interrupted load are there
	missing   []string
}

func (s pinState) newerError(pinPath string) error {
	if s.cfg.Release == Release && s.cfg.LayoutVersion == LayoutVersion {
		return fmt.Errorf("%w: %s holds another build of datapath release %d (object %x, this one %x); refusing to replace it: deploy one pktmeta build per node, or uninstall first",
			ErrNewer, pinPath, Release, s.cfg.DatapathID[:6], idPrefix())
	}
	return fmt.Errorf("%w: %s holds datapath release %d (map layout %d) and this pktmeta is release %d (layout %d); refusing to downgrade: upgrade this plugin, or uninstall pktmeta on the node first",
		ErrNewer, pinPath, s.cfg.Release, s.cfg.LayoutVersion, Release, LayoutVersion)
}

func (s pinState) layoutError(pinPath string) error {
	return fmt.Errorf("%w: %s holds maps of layout %d and this pktmeta needs layout %d; there is no in-place migration between them: run `pktmeta-agent uninstall` on the node (or delete the DaemonSet) and install again",
		ErrOlderLayout, pinPath, s.cfg.LayoutVersion, LayoutVersion)
}

// inspect classifies what is pinned at pinPath. It only reads, so it needs
// no lock to be safe, only to be stable.
func inspect(pinPath string) (pinState, error) {
	d := &Datapath{PinPath: pinPath}
	var st pinState
	cfgMap, err := ebpf.LoadPinnedMap(filepath.Join(d.mapsDir(), mapConfig), nil)
	if errors.Is(err, os.ErrNotExist) {
		st.leftovers = anyPins(d)
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("open pinned map %s: %w", mapConfig, err)
	}
	defer cfgMap.Close()
	cfg, err := readAnyConfig(cfgMap)
	if err != nil {
		return st, err
	}
	st.cfg = cfg
	switch {
	case cfg.LayoutVersion == 0:
		st.leftovers = true
		return st, nil
	case cfg.LayoutVersion > LayoutVersion, cfg.Release > Release:
		st.kind = stateNewer
		return st, nil
	case cfg.LayoutVersion < LayoutVersion:
		st.kind = stateOlderLayout
		return st, nil
	case cfg.Release < Release:
		st.kind = stateOlder
		return st, nil
	case cfg.DatapathID != bundledID():
		st.kind = stateNewer
		return st, nil
	}
	for _, name := range mapNames {
		if _, err := os.Stat(filepath.Join(d.mapsDir(), name)); err != nil {
			st.missing = append(st.missing, "map "+name)
		}
	}
	for name := range progNames {
		if optionalProgs[name] {
			continue
		}
		if _, err := os.Stat(filepath.Join(d.progsDir(), name)); err != nil {
			st.missing = append(st.missing, "program "+name)
		}
	}
	st.kind = stateCurrent
	if len(st.missing) > 0 {
		st.kind = stateIncomplete
	}
	return st, nil
}

// readAnyConfig reads a config slot of this or any other layout: every
// layout starts with the layout version, so another layout's config (one
// of another size) is still classified older or newer, never taken for
// the leftovers of a killed load and thrown away. Only this layout's is
// decoded further.
func readAnyConfig(m *ebpf.Map) (Config, error) {
	if m.Type() != ebpf.Array || m.KeySize() != 4 || m.ValueSize() < 4 {
		return Config{}, fmt.Errorf("pinned %s is not a pktmeta config map (%v, key %d bytes, value %d bytes); refusing to touch it",
			mapConfig, m.Type(), m.KeySize(), m.ValueSize())
	}
	if m.ValueSize() == uint32(binary.Size(bpfPktmetaConfig{})) {
		return readConfig(m)
	}
	raw := make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), &raw); err != nil {
		return Config{}, fmt.Errorf("read %s: %w", mapConfig, err)
	}
	c := Config{LayoutVersion: binary.NativeEndian.Uint32(raw)}
	if c.LayoutVersion == LayoutVersion {
		return Config{}, fmt.Errorf("pinned %s says layout %d but has %d-byte values; refusing to touch it", mapConfig, LayoutVersion, m.ValueSize())
	}
	return c, nil
}

// anyPins reports whether maps/ or progs/ hold anything.
func anyPins(d *Datapath) bool {
	for _, dir := range []string{d.mapsDir(), d.progsDir()} {
		if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
			return true
		}
	}
	return false
}

// ensure makes the pinned datapath this build's, complete. The caller
// holds the node lock exclusively.
func ensure(o Options) (OpenResult, error) {
	var res OpenResult
	st, err := inspect(o.PinPath)
	if err != nil {
		return res, err
	}
	d := &Datapath{PinPath: o.PinPath, log: o.Log}
	if o.BenchNoSourceCheck && (st.kind != stateNone || st.leftovers) {
		return res, fmt.Errorf("%s: BenchNoSourceCheck needs an empty pin path", o.PinPath)
	}
	switch st.kind {
	case stateCurrent:
		return res, nil // another process did it while we waited
	case stateNewer:
		return res, st.newerError(o.PinPath)
	case stateOlderLayout:
		return res, st.layoutError(o.PinPath)
	case stateNone:
		if st.leftovers {
			// Nothing committed, so nothing in these pins is state
			// anyone relies on: an interrupted first load, or an
			// interrupted uninstall. Start again from nothing.
			o.Log.Warn("removing the pins of an interrupted load or uninstall", "pinPath", o.PinPath)
			if err := d.removePins(); err != nil {
				return res, err
			}
			res.Repaired = true
			res.Previous = "interrupted load"
		}
		res.Created = true
	case stateIncomplete:
		res.Repaired = true
		res.Previous = "incomplete: " + strings.Join(st.missing, ", ")
	case stateOlder:
		res.Previous = fmt.Sprintf("release %d", st.cfg.Release)
	}
	err = d.load(o, st, &res)
	d.Close()
	return res, err
}

// load loads the bundled object against the pinned maps (creating missing
// ones), moves every attachment to its programs, pins them, and commits.
func (d *Datapath) load(o Options, st pinState, res *OpenResult) error {
	// A kernel the programs cannot run on is refused before anything is
	// created.
	if err := requiredFeatures(); err != nil {
		return err
	}
	for _, dir := range []string{d.mapsDir(), d.progsDir(), d.LinksDir(), d.locksDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
	}
	kf := KernelFeatures{TCX: attach.HaveTCX(), ConntrackKfuncs: probeConntrackKfuncs(o.Log), Apps: haveAppsProgram()}
	kf.AppsUDP = kf.Apps && haveAppsUDPPrograms()
	o.Log.Info("kernel features", "kernel", KernelRelease(), "tcx", kf.TCX, "conntrackKfuncs", kf.ConntrackKfuncs, "apps", kf.Apps, "appsUDP", kf.AppsUDP)
	for _, m := range kf.Missing() {
		o.Log.Warn("the datapath runs without a kernel feature", "kernel", KernelRelease(), "missing", m)
	}
	spec, err := loadBpf()
	if err != nil {
		return fmt.Errorf("parse bundled BPF object: %w", err)
	}
	// Only there to put layouts into BTF for bpf2go.
	delete(spec.Maps, ".bss")
	delete(spec.Variables, bpfVarUnusedEvent)
	delete(spec.Variables, bpfVarUnusedEventV4)
	delete(spec.Variables, bpfVarUnusedSweep)
	delete(spec.Variables, bpfVarUnusedTableOp)
	delete(spec.Variables, bpfVarUnusedNode)
	delete(spec.Variables, bpfVarUnusedMember)
	delete(spec.Variables, bpfVarUnusedXc)
	delete(spec.Variables, bpfVarUnusedOrigin)
	if kf.ConntrackKfuncs {
		if err := spec.Variables[bpfVarPktmetaHaveCtKfuncs].Set(uint32(1)); err != nil {
			return fmt.Errorf("conntrack kfunc switch: %w", err)
		}
	}
	if !kf.Apps {
		// The packet programs do not need it: load them without it.
		delete(spec.Programs, bpfProgPktmetaGetsockopt)
	}
	if !kf.AppsUDP {
		delete(spec.Programs, bpfProgPktmetaRecvmsg4)
		delete(spec.Programs, bpfProgPktmetaRecvmsg6)
	}
	if HaveSockoptErrno() {
		if err := spec.Variables[bpfVarPktmetaSockoptErrno].Set(uint32(1)); err != nil {
			return fmt.Errorf("getsockopt errno switch: %w", err)
		}
	}
	if orderedReads() {
		if err := spec.Variables[bpfVarPktmetaOrderedReads].Set(uint32(1)); err != nil {
			return fmt.Errorf("ordered reads switch: %w", err)
		}
	}
	if o.BenchNoSourceCheck {
		if err := spec.Variables[bpfVarBenchNoSourceCheck].Set(uint32(1)); err != nil {
			return fmt.Errorf("bench switch: %w", err)
		}
	}

	// The object declares the connection table and the aliases with a
	// placeholder size (the public header's). New ones are made for
	// maxConnections; pinned ones keep theirs, since a pinned map is
	// reused only if the spec matches it.
	chunks := tableChunks(o.MaxConnections)
	for name, size := range map[string]uint32{mapChunks: chunks, mapSlots: chunks * chunkSlots, mapAliases: o.MaxConnections} {
		spec.Maps[name].MaxEntries = size
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.mapsDir(), name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("open pinned map %s: %w", name, err)
		}
		spec.Maps[name].MaxEntries = m.MaxEntries()
		m.Close()
	}

	coll, err := loadCollection(spec, d.mapsDir(), o.Log)
	if err != nil {
		return fmt.Errorf("load datapath against the maps in %s: %w", d.mapsDir(), err)
	}
	defer coll.Close()
	res.Loaded = true
	for name, dst := range d.mapSlots() {
		*dst = coll.Maps[name]
		delete(coll.Maps, name) // d owns it now
	}
	// Before any program runs on them: new tables get their seed, and
	// the table is read back as every handle reads it.
	if err := initTable(d.TableMap, d.ChunksMap, d.SlotsMap, o.MaxConnections); err != nil {
		return err
	}
	if d.table, err = readTable(d.TableMap, d.ChunksMap, d.SlotsMap); err != nil {
		return err
	}
	for name, dst := range d.progSlots() {
		*dst = coll.Programs[progNames[name]]
		delete(coll.Programs, progNames[name])
		if *dst == nil && optionalProgs[name] {
			// Not loaded (this kernel, or its verifier): no copy an
			// older load pinned may run on in its place.
			d.dropApp(name)
		}
	}

	cfg := Config{LayoutVersion: LayoutVersion, UDPTimeout: o.UDPTimeout, NoConntrack: !kf.ConntrackKfuncs}
	if st.kind != stateNone {
		// Keep the settings and, until the end, the old identity: a crash
		// before the commit below makes the next Open redo the upgrade.
		cfg.UDPTimeout, cfg.EventsOff = st.cfg.UDPTimeout, st.cfg.EventsOff
		cfg.Release, cfg.DatapathID = st.cfg.Release, st.cfg.DatapathID
		n, err := d.upgradeAttachments()
		res.Upgraded = n
		if err != nil {
			return err
		}
		d.upgradeUplinks()
		d.upgradeApps()
		d.backfillWorkloadNetns()
	}
	if err := d.pinPrograms(); err != nil {
		return err
	}
	cfg.Release, cfg.DatapathID = Release, bundledID()
	if o.BenchNoSourceCheck {
		// Not this build's programs as a node would run them: any normal
		// Open refuses the pin path ("another build").
		cfg.DatapathID = benchID()
	}
	if err := writeConfig(d.ConfigMap, cfg); err != nil {
		return err
	}
	o.Log.Info("datapath loaded", "pinPath", d.PinPath, "release", Release, "createdMaps", res.Created,
		"previous", res.Previous, "upgradedAttachments", res.Upgraded)
	return nil
}

// loadCollection loads spec with its maps pinned in mapsDir. A program
// of the application interface the verifier rejects is left out (the
// probes decide by helper, but a verifier may still refuse one: its
// complexity limit, a backported helper with other rules): that costs the
// application interface, never the packet programs. Without the
// getsockopt program the recvmsg programs are of no use, and the two
// recvmsg programs go together.
func loadCollection(spec *ebpf.CollectionSpec, mapsDir string, log *slog.Logger) (*ebpf.Collection, error) {
	opts := ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: mapsDir}}
	for {
		coll, err := ebpf.NewCollectionWithOptions(spec, opts)
		var verr *ebpf.VerifierError
		if err == nil || !errors.As(err, &verr) {
			return coll, err
		}
		var drop []string
		switch {
		case rejected(err, bpfProgPktmetaGetsockopt):
			drop = []string{bpfProgPktmetaGetsockopt, bpfProgPktmetaRecvmsg4, bpfProgPktmetaRecvmsg6}
		case rejected(err, bpfProgPktmetaRecvmsg4), rejected(err, bpfProgPktmetaRecvmsg6):
			drop = []string{bpfProgPktmetaRecvmsg4, bpfProgPktmetaRecvmsg6}
		default:
			log.Error("BPF verifier rejected the datapath", "log", fmt.Sprintf("%+v", verr))
			return nil, err
		}
		log.Warn("BPF verifier rejected a program of the application interface: loading the datapath without it",
			"leftOut", drop, "err", err)
		log.Debug("verifier log", "log", fmt.Sprintf("%+v", verr))
		for _, name := range drop {
			delete(spec.Programs, name)
		}
	}
}

// rejected reports whether err is about loading program name (cilium/ebpf
// names it: "program NAME: ...").
func rejected(err error, name string) bool {
	return strings.Contains(err.Error(), "program "+name+":")
}

// pinPrograms pins the loaded programs, replacing older pins atomically
// (pin to a temporary name, rename over; bpffs forbids dots in names).
func (d *Datapath) pinPrograms() error {
	for name, p := range d.progSlots() {
		if *p == nil && optionalProgs[name] {
			continue // not loaded on this kernel
		}
		final := filepath.Join(d.progsDir(), name)
		tmp := final + "_new"
		os.Remove(tmp)
		if err := (*p).Pin(tmp); err != nil {
			return fmt.Errorf("pin program %s: %w", name, err)
		}
		if err := os.Rename(tmp, final); err != nil {
			os.Remove(tmp)
			return fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	return nil
}

// upgradeAttachments points every attachment at the freshly loaded
// programs, following the hook table. tcx links are updated in place
// (BPF_LINK_UPDATE), legacy filters replaced; either way the hook is never
// empty. An attachment that cannot be moved (its veth is being deleted)
// keeps the old program, which works against the same maps; it is logged,
// and status reports it.
func (d *Datapath) upgradeAttachments() (int, error) {
	workloads, err := d.Workloads()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, w := range workloads {
		ok := true
		for _, r := range Requirements(w) {
			if err := attach.Update(int(w.HostIfindex), d.AttachmentLinkDir(w.Key()), r.Hook, w.Legacy, d.Program(r.Program)); err != nil {
				d.log.Warn("upgrade attachment", "containerID", w.ContainerID, "ifname", w.IfName, "hook", r.Hook, "err", err)
				ok = false
			}
		}
		if ok {
			n++
		}
	}
	return n, nil
}

// removePins removes every pin of ours: link pins (detaching what they
// hold), programs and maps, the config first. Only names pktmeta uses.
func (d *Datapath) removePins() error {
	var errs []error
	if err := os.Remove(filepath.Join(d.mapsDir(), mapConfig)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	errs = append(errs, d.detachUplinks(), d.detachApps())
	if dirs, err := os.ReadDir(d.LinksDir()); err == nil {
		for _, c := range dirs {
			ifaces, _ := os.ReadDir(filepath.Join(d.LinksDir(), c.Name()))
			for _, i := range ifaces {
				if err := attach.Detach(0, filepath.Join(d.LinksDir(), c.Name(), i.Name())); err != nil {
					errs = append(errs, err)
				}
			}
			os.Remove(filepath.Join(d.LinksDir(), c.Name()))
		}
	}
	for name := range progNames {
		for _, n := range []string{name, name + "_new"} {
			if err := os.Remove(filepath.Join(d.progsDir(), n)); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	for _, name := range append(mapNames, retiredMaps...) {
		if err := os.Remove(filepath.Join(d.mapsDir(), name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Destroy removes the pinned datapath: it detaches every attachment (tcx
// links and legacy filters), then removes the pins, the config first so
// that an interrupted Destroy leaves an uncommitted state the next Open
// throws away. It removes only names pktmeta uses, and pinPath itself
// only if that leaves it empty: a pin path pointed at a shared directory
// does not take others' pins with it. It holds the node lock exclusively.
func Destroy(pinPath string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := CheckBPFFS(pinPath); err != nil {
		return err
	}
	if _, err := os.Stat(pinPath); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	lock, err := lockNode(pinPath, true)
	if err != nil {
		return err
	}
	defer lock.unlock()
	var errs []error
	st, err := inspect(pinPath)
	if err != nil {
		return err
	}
	if st.kind != stateNone && st.cfg.LayoutVersion == LayoutVersion {
		d, err := openPinned(pinPath, nil, false, log)
		if err != nil {
			errs = append(errs, err)
		} else {
			ws, err := d.Workloads()
			errs = append(errs, err)
			for _, w := range ws {
				// The records go with the maps; only the hooks matter here.
				errs = append(errs, attach.Detach(d.liveIfindex(w), d.AttachmentLinkDir(w.Key())))
			}
			d.Close()
		}
	}
	d := &Datapath{PinPath: pinPath}
	errs = append(errs, d.removePins())
	for _, dir := range []string{d.LinksDir(), d.locksDir()} {
		if ents, err := os.ReadDir(dir); err == nil {
			for _, e := range ents {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}
	for _, dir := range []string{d.LinksDir(), d.progsDir(), d.mapsDir(), d.locksDir(), pinPath} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// benchID is the datapath id of the bench build without source
// validation.
func benchID() [32]byte {
	id := bundledID()
	id[31] ^= 0xff
	return id
}

func idPrefix() []byte {
	id := bundledID()
	return id[:6]
}
