package main

import (
	"fmt"
	"math/rand/v2"

	"github.com/cilium/ebpf"
)

// accessRefs is access.c's ACCESS_SLOTS: slot positions, each with a
// reference to fill.
const accessRefs = 499322 * 7

// coldAccess measures what one cold memory access costs here, in the
// shapes of the connection table's first packet and lookups
// (bench/bpf/access.c): a random place in arrays the size of the
// datapath's table at maxConnections 2M, every repetition. Each run is
// paired with a run of the program that only makes the random number,
// whose time is subtracted. Not the datapath: the accesses alone, so that
// BENCHMARKS.md can say which of them a first packet's cost is made of.
func coldAccess(cfg config, rep *Report) error {
	const section = "access"
	repeat, runs := 200_000, cfg.runs
	if cfg.quick {
		repeat = 50_000
	}
	var objs accessObjects
	if err := loadAccessObjects(&objs, nil); err != nil {
		return fmt.Errorf("access: load: %w", err)
	}
	defer objs.Close()
	// The references point at random slots, as a table's would after a
	// while: a lookup through one lands anywhere.
	keys, refs := make([]uint32, accessRefs), make([]uint32, accessRefs)
	for i := range keys {
		keys[i], refs[i] = uint32(i), rand.Uint32N(accessRefs)
	}
	if _, err := objs.AccessRefs.BatchUpdate(keys, refs, nil); err != nil {
		return fmt.Errorf("access: fill the references: %w", err)
	}
	data := make([]byte, 64)
	for _, m := range []struct {
		name, note string
		prog       *ebpf.Program
	}{
		{"read 8 bytes of the 4 MB word array", "the chunk words of a 2M table: 499 322 × 8 B", objs.AccessWordRead},
		{"read 8 bytes of the 531 MB slot array", "3 495 254 slots × 152 B", objs.AccessSlotRead},
		{"two independent reads of the slot array", "whether two misses overlap", objs.AccessTwoSlotReads},
		{"write a 152-byte slot", "nothing after it", objs.AccessSlotWrite},
		{"write a 152-byte slot, then an atomic add to a hot word", "the atomic (a locked instruction) waits for the write's misses", objs.AccessSlotWriteThenAtomic},
		{"insert: word, lock (compare-and-swap), slot write, unlock (atomic and)", "the datapath's insert, its memory accesses only", objs.AccessInsert},
		{"insert with the lock in its own array, released by a plain store", "no locked instruction after the slot write", objs.AccessInsertPlainUnlock},
		{"write the slot after this CPU's last one, then an atomic add", "a per-CPU bump allocator", objs.AccessBumpWriteThenAtomic},
		{"insert into a bump-allocated slot, with a random 4-byte slot reference", "what an index of references beside the tags costs an insert", objs.AccessBumpInsert},
		{"lookup: word, then the slot", "today's cold lookup", objs.AccessLookup},
		{"lookup through a slot reference: word, reference, slot", "three dependent accesses", objs.AccessLookupThroughRef},
	} {
		var samples, over []float64
		for range runs {
			_, floor, err := objs.AccessFloor.Benchmark(data, repeat, nil)
			if err != nil {
				return fmt.Errorf("access: floor: %w", err)
			}
			_, took, err := m.prog.Benchmark(data, repeat, nil)
			if err != nil {
				return fmt.Errorf("access: %s: %w", m.name, err)
			}
			samples = append(samples, float64(took.Nanoseconds()))
			over = append(over, float64(took.Nanoseconds()-floor.Nanoseconds()))
		}
		r := summarize(m.name, "ns/access", section, samples)
		o := median(over)
		r.OverFloor = &o
		r.Note = m.note + fmt.Sprintf("; a random place every repetition, %d repetitions a run", repeat)
		rep.add(r)
	}
	return nil
}
