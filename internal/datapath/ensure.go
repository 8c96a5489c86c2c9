package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
)

// EnsureResult says what Ensure had to do.
type EnsureResult struct {
	Loaded   bool // programs were loaded (and verified) by this call
	Created  bool // the maps did not exist before
	Upgraded int  // attachments moved to the new programs
}

// Ensure returns the pinned datapath at opts.PinPath. The common case, a
// datapath pinned by this same build, only opens pins: nothing is loaded
// or verified. Otherwise it takes the exclusive lock, loads the programs
// (creating and pinning missing maps), moves every existing attachment to
// them atomically, and pins them.
func Ensure(opts Options, log *slog.Logger) (*Datapath, EnsureResult, error) {
	opts = opts.withDefaults()
	if d, err := Open(opts.PinPath); err == nil {
		cur, err := d.Current()
		if err == nil && cur {
			return d, EnsureResult{}, nil
		}
		d.Close()
	}

	lock, err := LockPinPath(opts.PinPath, true)
	if err != nil {
		return nil, EnsureResult{}, err
	}
	defer lock.Unlock()
	return ensureLocked(opts, log)
}

func ensureLocked(opts Options, log *slog.Logger) (*Datapath, EnsureResult, error) {
	var res EnsureResult
	// Another process may have done the work while we waited for the lock.
	if d, err := Open(opts.PinPath); err == nil {
		if cur, err := d.Current(); err == nil && cur {
			return d, res, nil
		}
		d.Close()
	} else if !errors.Is(err, ErrNotLoaded) {
		return nil, res, err
	}

	d := &Datapath{PinPath: opts.PinPath}
	for _, dir := range []string{d.mapsDir(), d.progsDir(), d.LinksDir()} {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, res, fmt.Errorf("create %s: %w", dir, err)
		}
	}

	spec, err := loadBpf()
	if err != nil {
		return nil, res, fmt.Errorf("parse bundled BPF object: %w", err)
	}
	// Only there to put the event layout into BTF for bpf2go.
	delete(spec.Maps, ".bss")
	delete(spec.Variables, bpfVarUnusedEvent)

	_, statErr := os.Stat(filepath.Join(d.mapsDir(), mapConfig))
	res.Created = errors.Is(statErr, os.ErrNotExist)
	// The object declares the connection tables with a placeholder size
	// (the public header's). New ones get maxConnections; pinned ones keep
	// theirs, since a pinned map is reused only if the spec matches it.
	for _, name := range []string{mapConns, mapAliases} {
		spec.Maps[name].MaxEntries = opts.MaxConnections
		m, err := ebpf.LoadPinnedMap(filepath.Join(d.mapsDir(), name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, res, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		spec.Maps[name].MaxEntries = m.MaxEntries()
		m.Close()
	}

	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		Maps: ebpf.MapOptions{PinPath: d.mapsDir()},
	})
	if err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			log.Error("BPF verifier rejected the datapath", "log", fmt.Sprintf("%+v", verr))
		}
		if !res.Created {
			return nil, res, fmt.Errorf("load datapath against pinned maps in %s (remove them to start over): %w", d.mapsDir(), err)
		}
		return nil, res, fmt.Errorf("load datapath: %w", err)
	}
	res.Loaded = true
	for name, dst := range d.mapSlots() {
		*dst = coll.Maps[name]
	}
	d.Origin = coll.Programs[bpfProgPktmetaOrigin]
	d.Strict = coll.Programs[bpfProgPktmetaStrict]
	d.Deliver = coll.Programs[bpfProgPktmetaDeliver]
	d.GC = coll.Programs[bpfProgPktmetaGc]

	cfg := Config{LayoutVersion: LayoutVersion, UDPTimeout: opts.UDPTimeout}
	old, err := d.ReadConfig()
	if err != nil {
		d.Close()
		return nil, res, err
	}
	switch old.LayoutVersion {
	case 0:
		// New maps, or maps from a first load that was interrupted.
	case LayoutVersion:
		cfg.UDPTimeout, cfg.EventsOff, cfg.DatapathID = old.UDPTimeout, old.EventsOff, old.DatapathID
	default:
		d.Close()
		return nil, res, fmt.Errorf("pinned maps have layout version %d, this build needs %d", old.LayoutVersion, LayoutVersion)
	}
	// The layout goes in first, with the old datapath id: whatever happens
	// next, the maps are identified, and the id says the upgrade is pending.
	if err := d.WriteConfig(cfg); err != nil {
		d.Close()
		return nil, res, err
	}

	// Move existing attachments before the pins change, so that a crash in
	// between leaves the old ID in the config and the next call redoes it.
	n, err := d.upgradeAttachments(log)
	res.Upgraded = n
	if err != nil {
		d.Close()
		return nil, res, err
	}

	if err := d.pinPrograms(); err != nil {
		d.Close()
		return nil, res, err
	}
	cfg.DatapathID = ID()
	if err := d.WriteConfig(cfg); err != nil {
		d.Close()
		return nil, res, err
	}
	log.Info("datapath loaded", "pinPath", d.PinPath, "createdMaps", res.Created, "upgradedAttachments", res.Upgraded)
	return d, res, nil
}

// pinPrograms pins the loaded programs, replacing older pins atomically
// (pin to a temporary name, rename over; bpffs forbids dots in names).
func (d *Datapath) pinPrograms() error {
	for name, p := range d.progSlots() {
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
// programs. tcx links are updated in place (BPF_LINK_UPDATE), legacy
// filters replaced; either way the hook is never empty. An attachment that
// cannot be moved (its veth is being deleted) keeps the old program, which
// works against the same maps; it is logged, and status reports it.
func (d *Datapath) upgradeAttachments(log *slog.Logger) (int, error) {
	workloads, err := d.Workloads()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, w := range workloads {
		ingress := d.Origin
		if w.Strict {
			ingress = d.Strict
		}
		dir := d.AttachmentLinkDir(w.Key())
		hooks := []struct {
			h    attach.Hook
			prog *ebpf.Program
		}{{attach.Ingress, ingress}, {attach.Egress, d.Deliver}}
		if w.NoEgress {
			hooks = hooks[:1]
		}
		ok := true
		for _, h := range hooks {
			if err := attach.Update(int(w.HostIfindex), dir, h.h, w.Legacy, h.prog); err != nil {
				log.Warn("upgrade attachment", "containerID", w.ContainerID, "ifname", w.IfName, "hook", h.h, "err", err)
				ok = false
			}
		}
		if ok {
			n++
		}
	}
	return n, nil
}

// AttachmentLinkDir is where an attachment's tcx links are pinned.
func (d *Datapath) AttachmentLinkDir(k AttachmentKey) string {
	return filepath.Join(d.LinksDir(), pinName(k.ContainerID), pinName(k.IfName))
}

// pinName escapes s for bpffs, which refuses names containing a dot
// (CNI allows dots in container ids and interface names).
func pinName(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '.' || c == '%' || c == '/' || c < 0x20 || c >= 0x7f {
			fmt.Fprintf(&b, "%%%02x", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// Destroy removes the pinned datapath: link pins (detaching whatever they
// still hold), programs and maps. It removes only names pktmeta uses, and
// pinPath itself only if that leaves it empty: a pin path pointed at a
// shared directory does not take others' pins with it.
func Destroy(pinPath string) error {
	d := &Datapath{PinPath: pinPath}
	var errs []error
	if dirs, err := os.ReadDir(d.LinksDir()); err == nil {
		for _, c := range dirs {
			ifaces, _ := os.ReadDir(filepath.Join(d.LinksDir(), c.Name()))
			for _, i := range ifaces {
				if err := RemoveLinkDir(filepath.Join(d.LinksDir(), c.Name(), i.Name())); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	for name := range d.progSlots() {
		if err := os.Remove(filepath.Join(d.progsDir(), name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for name := range d.mapSlots() {
		if err := os.Remove(filepath.Join(d.mapsDir(), name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	for _, dir := range []string{d.LinksDir(), d.progsDir(), d.mapsDir(), pinPath} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}
