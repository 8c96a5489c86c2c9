package main

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Return codes of bench/bpf/tables.c.
const (
	labMade         = retNext
	labReverseFound = 1
	labExists       = 2
	labFull         = 3

	// tables.c's SEQ_*: each table's index in lab_seq and lab_refused.
	seqHtab40 = 0
	seqHtab16 = 1
	seqOpen   = 2
	seqChunk  = 4

	// chunkStride is tables.c's CHUNK_STRIDE: slots per chunk in
	// chunk_slots, so chunk_words has capacity/chunkStride words.
	chunkStride = 8
)

// tableStudy measures the table work of a TCP/IPv4 first packet (reverse
// lookup that misses, then the insert) in three layouts: today's hash map
// (40-byte key, 104-byte record), the same map with compact IPv4 layouts
// (16 + 48 bytes), and open addressing in an array of one-line slots with
// a hash that puts a tuple and its reverse in the same place. Each layout
// is measured at the default table size and at 2M slots holding 1k and
// 1M records, every run paired with the program that only makes the
// tuple, whose time is subtracted. A design study for issue 11: none of
// these tables is the datapath's.
func tableStudy(cfg config, rep *Report) error {
	// One CPU for the whole study: every program numbers its tuples in a
	// per-CPU sequence, and the lookups pick among the records the same
	// CPU made.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread's affinity changed, let it go
		var one unix.CPUSet
		one.Set(0)
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			errc <- fmt.Errorf("table study: pin to CPU 0: %w", err)
			return
		}
		errc <- tableStudyOnOneCPU(cfg, rep)
	}()
	return <-errc
}

func tableStudyOnOneCPU(cfg config, rep *Report) error {
	const section = "tables"
	repeat, runs := 2000, 15
	if cfg.quick {
		repeat, runs = 1000, 5
	}
	type design struct {
		name, note        string
		seq               uint32 // its index in lab_seq and lab_refused
		insert, hit, miss *ebpf.Program
	}
	for _, size := range []struct {
		label    string
		capacity uint32
		live     int
	}{
		{"131072 slots (the default), 1k live", 131072, 1_000},
		{"2M slots, 1k live", 1 << 21, 1_000},
		{"2M slots, 1M live", 1 << 21, 1_000_000},
		// 70 % of the slots: where open addressing starts to pay for
		// its probe sequences; the 2M-entry hash maps hold it easily.
		{"2M slots, 1.4M live (70 %)", 1 << 21, 1_400_000},
	} {
		objs, err := loadTableStudy(size.capacity)
		if err != nil {
			return err
		}
		err = func() error {
			defer objs.Close()
			designs := []design{
				{"hash map, 40-byte key + 104-byte record (today's layout)", "preallocated BPF_MAP_TYPE_HASH", seqHtab40,
					objs.LabHtab40, objs.LabHtab40Hit, objs.LabHtab40Miss},
				{"hash map, 16-byte IPv4 key + 48-byte record", "preallocated BPF_MAP_TYPE_HASH", seqHtab16,
					objs.LabHtab16, objs.LabHtab16Hit, objs.LabHtab16Miss},
				{"open addressing, 64-byte slots, symmetric hash", "BPF_MAP_TYPE_ARRAY, linear probing", seqOpen,
					objs.LabOpen, objs.LabOpenHit, objs.LabOpenMiss},
				{"chunks of 7 slots + a word of tags a chunk, symmetric hash", "two BPF_MAP_TYPE_ARRAYs, F14-style chunks", seqChunk,
					objs.LabChunk, objs.LabChunkHit, objs.LabChunkMiss},
			}
			data := make([]byte, 64)
			if size.live == 1_000 && size.capacity == 1<<21 {
				if err := tableMemory(objs, size.capacity, rep); err != nil {
					return err
				}
			}
			if err := warmTables(objs, data, size.capacity); err != nil {
				return err
			}
			for _, d := range designs {
				// Fill the table with live records the same way the
				// measured packets make them (an insert a table of its
				// own refuses is counted, and answered below).
				if _, _, err := d.insert.Benchmark(data, size.live, nil); err != nil {
					return fmt.Errorf("%s: prefill %d: %v", d.name, size.live, err)
				}
			}
			for _, d := range designs {
				for _, m := range []struct {
					what  string
					prog  *ebpf.Program
					floor *ebpf.Program
					note  string
				}{
					{"first packet (reverse lookup misses, insert)", d.insert, objs.LabFloor, "a new tuple every repetition"},
					{"lookup of a live record (copy, check again)", d.hit, objs.LabPickFloor, "a live record picked in scattered order"},
					{"lookup of a tuple without a record", d.miss, objs.LabPickFloor, "no record under the tuple"},
				} {
					var samples, over []float64
					for range runs {
						_, floor, err := m.floor.Benchmark(data, repeat, nil)
						if err != nil {
							return fmt.Errorf("floor: %w", err)
						}
						ret, took, err := m.prog.Benchmark(data, repeat, nil)
						if err != nil {
							return fmt.Errorf("%s, %s: %w", d.name, m.what, err)
						}
						// A refused insert (and a lookup of its tuple)
						// is a possible answer once a table refuses.
						if ret != labMade && !(ret == labFull && refusedBy(objs, d.seq) > 0) {
							return fmt.Errorf("%s, %s at %s: the last repetition returned %d (%d reverse found, %d exists or changed, %d full or not found)",
								d.name, m.what, size.label, ret, labReverseFound, labExists, labFull)
						}
						samples = append(samples, float64(took.Nanoseconds()))
						over = append(over, float64(took.Nanoseconds()-floor.Nanoseconds()))
					}
					r := summarize(m.what+", "+d.name+", "+size.label, "ns/pkt", section, samples)
					o := median(over)
					r.OverFloor, r.Note = &o, d.note+": "+m.note
					rep.Results = append(rep.Results, r)
				}
				if n := refusedBy(objs, d.seq); n > 0 {
					rep.Results[len(rep.Results)-3].Note += fmt.Sprintf("; %d inserts refused (no free slot within the probe limit), prefill included", n)
				}
			}
			return nil
		}()
		if err != nil {
			return fmt.Errorf("table study, %s: %w", size.label, err)
		}
	}
	return nil
}

// tableMemory reports each layout's memory per slot, from the kernel's
// accounting of its maps (the memlock line of fdinfo). The chunked table
// uses seven of every eight slots, and counts its tag words too.
func tableMemory(objs *tablesObjects, capacity uint32, rep *Report) error {
	for _, t := range []struct {
		name  string
		maps  []*ebpf.Map
		slots float64
	}{
		{"hash map, 40-byte key + 104-byte record (today's layout)", []*ebpf.Map{objs.Htab40}, float64(capacity)},
		{"hash map, 16-byte IPv4 key + 48-byte record", []*ebpf.Map{objs.Htab16}, float64(capacity)},
		{"open addressing, 64-byte slots", []*ebpf.Map{objs.OpenTable}, float64(capacity)},
		{"chunks of 7 slots + a word of tags a chunk", []*ebpf.Map{objs.ChunkSlots, objs.ChunkWords}, float64(capacity) * 7 / chunkStride},
	} {
		var total int64
		for _, m := range t.maps {
			n, err := fdinfoMemlock(m)
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			total += n
		}
		r := summarize("bytes per slot, "+t.name, "bytes", "tables", []float64{float64(total) / t.slots})
		r.Note = fmt.Sprintf("kernel accounting of the maps at %d slots", capacity)
		rep.add(r)
	}
	return nil
}

// refusedBy sums, over the CPUs, the inserts a table refused.
func refusedBy(objs *tablesObjects, seq uint32) uint64 {
	var per []uint64
	if err := objs.LabRefused.Lookup(seq, &per); err != nil {
		return 0
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n
}

// warmTables touches every page of every table once before anything is
// measured, as on a node that has been running a while. On this guest the
// first touch of a page of a fresh map costs microseconds (measured: lab_open
// on a fresh 2M-slot table, 6.4 µs per insert at first, falling as pages
// are touched, 0.2 µs once all were), which would charge a table for its
// memory being new rather than for its layout. The hash maps are filled to
// capacity by their own program and emptied from userspace (every bucket
// and element touched); the array gets one write per page.
func warmTables(objs *tablesObjects, data []byte, capacity uint32) error {
	for _, w := range []struct {
		prog  *ebpf.Program
		m     *ebpf.Map
		drain func(*ebpf.MapBatchCursor) (int, error)
	}{
		{objs.LabHtab40, objs.Htab40, func(c *ebpf.MapBatchCursor) (int, error) {
			keys, vals := make([]tablesKey40, 4096), make([]tablesRec104, 4096)
			return objs.Htab40.BatchLookupAndDelete(c, keys, vals, nil)
		}},
		{objs.LabHtab16, objs.Htab16, func(c *ebpf.MapBatchCursor) (int, error) {
			keys, vals := make([]tablesKey16, 4096), make([]tablesRec48, 4096)
			return objs.Htab16.BatchLookupAndDelete(c, keys, vals, nil)
		}},
	} {
		// A preallocated hash refuses inserts once full: the last
		// repetitions return "full".
		if ret, _, err := w.prog.Benchmark(data, int(capacity)+1, nil); err != nil || ret != labFull {
			return fmt.Errorf("%s: fill to capacity: returned %d: %v", w.m, ret, err)
		}
		var cursor ebpf.MapBatchCursor
		for {
			_, err := w.drain(&cursor)
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				break
			}
			if err != nil {
				return fmt.Errorf("%s: empty the table: %w", w.m, err)
			}
		}
		var k, v []byte
		if it := w.m.Iterate(); it.Next(&k, &v) {
			return fmt.Errorf("%s: the table is not empty after the drain", w.m)
		}
	}
	const slotsPerPage = 4096 / 64
	keys := make([]uint32, 0, capacity/slotsPerPage)
	for i := uint32(0); i < capacity; i += slotsPerPage {
		keys = append(keys, i)
	}
	for _, m := range []*ebpf.Map{objs.OpenTable, objs.ChunkSlots} {
		if _, err := m.BatchUpdate(keys, make([]tablesOpenSlot, len(keys)), nil); err != nil {
			return fmt.Errorf("%s: touch every page: %w", m, err)
		}
	}
	words := make([]uint32, capacity/chunkStride)
	for i := range words {
		words[i] = uint32(i)
	}
	if _, err := objs.ChunkWords.BatchUpdate(words, make([]uint64, len(words)), nil); err != nil {
		return fmt.Errorf("chunk_words: touch every page: %w", err)
	}
	// Number the tuples from 1 again (the fills above used them up), so
	// every sequence counts exactly the records its table holds.
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	for seq := uint32(0); seq < objs.LabSeq.MaxEntries(); seq++ {
		if err := objs.LabSeq.Update(seq, make([]uint64, cpus), ebpf.UpdateExist); err != nil {
			return fmt.Errorf("reset sequence %d: %w", seq, err)
		}
	}
	return nil
}

// loadTableStudy loads bench/bpf/tables.c with every table sized to
// capacity (a power of two: the open table's index is a mask).
func loadTableStudy(capacity uint32) (*tablesObjects, error) {
	if capacity&(capacity-1) != 0 {
		return nil, fmt.Errorf("table study: capacity %d is not a power of two", capacity)
	}
	spec, err := loadTables()
	if err != nil {
		return nil, err
	}
	for _, m := range []string{"htab40", "htab16", "open_table", "chunk_slots"} {
		spec.Maps[m].MaxEntries = capacity
	}
	spec.Maps["chunk_words"].MaxEntries = capacity / chunkStride
	for name, v := range map[string]uint32{"open_mask": capacity - 1, "chunk_mask": capacity/chunkStride - 1} {
		if err := spec.Variables[name].Set(v); err != nil {
			return nil, fmt.Errorf("table study: set %s: %w", name, err)
		}
	}
	var objs tablesObjects
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("table study: load: %w", err)
	}
	return &objs, nil
}
