// Package consumer helps third-party BPF programs read pktmeta's metadata.
//
// A consumer's C code includes bpf/include/pktmeta.h with
// PKTMETA_DECLARE_MAPS and calls pktmeta_lookup(). Before loading it, hand
// its CollectionSpec to Maps: the declared pktmeta maps are then replaced
// by the node's pinned ones, whatever size they were created with.
package consumer

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime"

	"github.com/cilium/ebpf"
)

// DefaultPinPath is pktmeta's default pin directory.
const DefaultPinPath = "/sys/fs/bpf/pktmeta"

// MapNames are the maps of pktmeta's consumer interface (pktmeta.h).
var MapNames = []string{"pktmeta_table", "pktmeta_chunks", "pktmeta_slots", "pktmeta_aliases"}

// Maps opens the pinned pktmeta maps that spec declares and returns them
// for CollectionOptions.MapReplacements. It also makes spec's declarations
// match them (size), stops the loader from pinning them again, and, on
// CPUs other than x86-64, turns on pktmeta.h's ordered reads
// (pktmeta_ordered_reads). The caller closes the maps after loading.
func Maps(spec *ebpf.CollectionSpec, pinPath string) (map[string]*ebpf.Map, error) {
	if pinPath == "" {
		pinPath = DefaultPinPath
	}
	if v, ok := spec.Variables["pktmeta_ordered_reads"]; ok && runtime.GOARCH != "amd64" {
		if err := v.Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("pktmeta_ordered_reads: %w", err)
		}
	}
	out := map[string]*ebpf.Map{}
	var errs []error
	for _, name := range MapNames {
		ms, ok := spec.Maps[name]
		if !ok {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinPath, "maps", name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			errs = append(errs, fmt.Errorf("open pinned %s (is pktmeta running on this node?): %w", name, err))
			continue
		}
		ms.MaxEntries = m.MaxEntries()
		ms.Pinning = ebpf.PinNone
		out[name] = m
	}
	if err := errors.Join(errs...); err != nil {
		for _, m := range out {
			m.Close()
		}
		return nil, err
	}
	return out, nil
}
