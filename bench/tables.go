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
	labBusy         = 5

	// tables.c's SEQ_*: each table's index in lab_seq, lab_made and
	// lab_refused.
	seqHtab40 = 0
	seqHtab16 = 1
	seqOpen   = 2
	seqChunk  = 4

	// prefillRun is how many records a test run of the prefill makes.
	prefillRun = 1000

	// chunkStride is tables.c's CHUNK_STRIDE: slots per chunk in
	// chunk_slots, so chunk_words has capacity/chunkStride words.
	chunkStride = 8
)

// tableStudy measures, in four layouts, the table work of a TCP/IPv4
// first packet (a reverse lookup that misses, then the insert) and
// lookups that find a record or none: today's hash map (40-byte key,
// 104-byte record), the same map with compact IPv4 layouts (16 + 48
// bytes), and two tables of our own in arrays of one-line slots with a
// hash that puts a tuple and its reverse in the same place (linear
// probing, and F14-style chunks). Each at the default table size (with
// the hash maps' free lists fresh, and shuffled as on a node that has run
// a while) and at 2M slots holding 1k, 1M and 1.4M records; every run is
// paired with a program that only makes the tuple, whose time is
// subtracted. A design study for issue 11: none of these tables is the
// datapath's.
func tableStudy(cfg config, rep *Report) error {
	// One CPU for the whole study: every program numbers its tuples in a
	// per-CPU sequence, and the lookups pick among the records the same
	// CPU made.
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread's affinity changed, let it go
		var allowed, one unix.CPUSet
		if err := unix.SchedGetaffinity(0, &allowed); err != nil {
			errc <- fmt.Errorf("table study: CPUs allowed: %w", err)
			return
		}
		cpu := 0
		for !allowed.IsSet(cpu) && cpu < 1024 {
			cpu++
		}
		one.Set(cpu)
		if err := unix.SchedSetaffinity(0, &one); err != nil {
			errc <- fmt.Errorf("table study: pin to CPU %d: %w", cpu, err)
			return
		}
		errc <- tableStudyOnOneCPU(cfg, rep)
	}()
	return <-errc
}

// tableSize is one configuration of the study.
type tableSize struct {
	label    string
	capacity uint32
	live     int
	// fresh leaves the hash maps as created (free elements in address
	// order) instead of filling and emptying them first.
	fresh bool
}

func tableStudyOnOneCPU(cfg config, rep *Report) error {
	const section = "tables"
	repeat, runs := 2000, 15
	sizes := []tableSize{
		{"131072 slots (the default), 1k live, hash maps fresh", 131072, 1_000, true},
		{"131072 slots (the default), 1k live", 131072, 1_000, false},
		{"2M slots, 1k live", 1 << 21, 1_000, false},
		{"2M slots, 1M live", 1 << 21, 1_000_000, false},
		// Where open addressing starts to pay for its probe sequences;
		// the 2M-entry hash maps hold it easily.
		{"2M slots, 1.4M live", 1 << 21, 1_400_000, false},
	}
	if cfg.quick {
		repeat, runs, sizes = 1000, 5, sizes[:2]
	}
	type design struct {
		name, note        string
		seq               uint32 // its index in lab_seq, lab_made and lab_refused
		usable            float64
		insert, hit, miss *ebpf.Program
	}
	for _, size := range sizes {
		objs, err := loadTableStudy(size.capacity)
		if err != nil {
			return err
		}
		err = func() error {
			defer objs.Close()
			slots := float64(size.capacity)
			designs := []design{
				{"hash map, 40-byte key + 104-byte record (today's layout)", "preallocated BPF_MAP_TYPE_HASH", seqHtab40, slots,
					objs.LabHtab40, objs.LabHtab40Hit, objs.LabHtab40Miss},
				{"hash map, 16-byte IPv4 key + 48-byte record", "preallocated BPF_MAP_TYPE_HASH", seqHtab16, slots,
					objs.LabHtab16, objs.LabHtab16Hit, objs.LabHtab16Miss},
				{"open addressing, 64-byte slots, symmetric hash", "BPF_MAP_TYPE_ARRAY, linear probing", seqOpen, slots,
					objs.LabOpen, objs.LabOpenHit, objs.LabOpenMiss},
				{"chunks of 7 slots + a word of tags a chunk, symmetric hash", "two BPF_MAP_TYPE_ARRAYs, F14-style chunks", seqChunk, slots * 7 / chunkStride,
					objs.LabChunk, objs.LabChunkHit, objs.LabChunkMiss},
			}
			data := make([]byte, 64)
			if size.live == 1_000 && size.capacity == 1<<21 {
				if err := tableMemory(objs, size.capacity, rep); err != nil {
					return err
				}
			}
			if err := warmTables(objs, data, size.capacity, !size.fresh); err != nil {
				return err
			}
			for _, d := range designs {
				// Fill the table with live records the same way the
				// measured packets make them; every insert makes one or
				// is refused (a table of our own, at its probe limit).
				// A test run interrupted by a signal runs again whole
				// (EINTR), so the fill goes in runs of prefillRun,
				// counting what was made: it overshoots by less than one.
				for {
					made, refused, err := outcomes(objs, d.seq)
					if err != nil {
						return err
					}
					if made+refused >= uint64(size.live) {
						break
					}
					n := min(uint64(prefillRun), uint64(size.live)-made-refused)
					if _, _, err := d.insert.Benchmark(data, int(n), nil); err != nil {
						return fmt.Errorf("%s: prefill %d: %w", d.name, size.live, err)
					}
				}
			}
			for _, d := range designs {
				// The lookups first, while the table holds what the
				// size says; the first packets' runs add their records.
				for _, m := range []struct {
					what, note   string
					prog, floor  *ebpf.Program
					makesRecords bool
				}{
					{"lookup of a live record (copy, check again)", "a live record picked in scattered order", d.hit, objs.LabPickFloor, false},
					{"lookup of a tuple without a record", "no record under the tuple", d.miss, objs.LabPickFloor, false},
					{"first packet (reverse lookup misses, insert)", fmt.Sprintf("a new tuple every repetition; the runs add %d records", runs*repeat), d.insert, objs.LabFloor, true},
				} {
					var samples, over []float64
					for range runs {
						_, floor, err := m.floor.Benchmark(data, repeat, nil)
						if err != nil {
							return fmt.Errorf("floor: %w", err)
						}
						made0, refused0, err := outcomes(objs, d.seq)
						if err != nil {
							return err
						}
						ret, took, err := m.prog.Benchmark(data, repeat, nil)
						if err != nil {
							return fmt.Errorf("%s, %s: %w", d.name, m.what, err)
						}
						made1, refused1, err := outcomes(objs, d.seq)
						if err != nil {
							return err
						}
						// At least repeat: a test run a signal interrupts
						// is run again whole (EINTR), so its programs can
						// run more often than asked.
						switch {
						case m.makesRecords && ((made1-made0)+(refused1-refused0) < uint64(repeat) || (ret != labMade && ret != labFull)):
							return fmt.Errorf("%s, %s at %s: %d of %d repetitions made a record or were refused, the last returned %d",
								d.name, m.what, size.label, (made1-made0)+(refused1-refused0), repeat, ret)
						// A lookup may meet a tuple whose insert was
						// refused; otherwise it must find what it looks for.
						case !m.makesRecords && ret != labMade && !(ret == labFull && refused1 > 0):
							return fmt.Errorf("%s, %s at %s: the last repetition returned %d (%d changed under it, %d not found or found)",
								d.name, m.what, size.label, ret, labExists, labFull)
						}
						samples = append(samples, float64(took.Nanoseconds()))
						over = append(over, float64(took.Nanoseconds()-floor.Nanoseconds()))
					}
					r := summarize(m.what+", "+d.name+", "+size.label, "ns/pkt", section, samples)
					o := median(over)
					r.OverFloor = &o
					r.Note = fmt.Sprintf("%s: %s; %.1f %% of the usable slots live before the runs", d.note, m.note, 100*float64(size.live)/d.usable)
					if m.makesRecords {
						if _, n, err := outcomes(objs, d.seq); err == nil && n > 0 {
							r.Note += fmt.Sprintf("; %d inserts refused (no free slot within the probe limit), prefill included", n)
						}
					}
					rep.add(r)
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

// outcomes sums, over the CPUs, the records a table made and the inserts
// it refused.
func outcomes(objs *tablesObjects, seq uint32) (made, refused uint64, err error) {
	if made, err = perCPUSum(objs.LabMade, seq); err != nil {
		return 0, 0, err
	}
	if refused, err = perCPUSum(objs.LabRefused, seq); err != nil {
		return 0, 0, err
	}
	return made, refused, nil
}

// perCPUSum sums a per-CPU counter over the CPUs.
func perCPUSum(m *ebpf.Map, key uint32) (uint64, error) {
	var per []uint64
	if err := m.Lookup(key, &per); err != nil {
		return 0, fmt.Errorf("read %s[%d]: %w", m, key, err)
	}
	var n uint64
	for _, v := range per {
		n += v
	}
	return n, nil
}

// warmTables touches every page of every table once before anything is
// measured, as on a node that has been running a while. On this guest the
// first touch of a page of a fresh map costs microseconds (measured: lab_open
// on a fresh 2M-slot table, 6.4 µs per insert at first, falling as pages
// are touched, 0.2 µs once all were), which would charge a table for its
// memory being new rather than for its layout. Unless shuffleHashMaps is
// false, the hash maps are filled to capacity by their own program and
// emptied from userspace (every bucket and element touched, and the free
// list left in the order the drain pushed the elements back); the arrays
// get one write per page.
func warmTables(objs *tablesObjects, data []byte, capacity uint32, shuffleHashMaps bool) error {
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
		if !shuffleHashMaps {
			break
		}
		// A preallocated hash refuses inserts once full: the last
		// repetitions return "full".
		ret, _, err := w.prog.Benchmark(data, int(capacity)+1, nil)
		if err != nil {
			return fmt.Errorf("%s: fill to capacity: %w", w.m, err)
		}
		if ret != labFull {
			return fmt.Errorf("%s: fill to capacity: the last insert returned %d, not full", w.m, ret)
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
	// every sequence counts exactly the records its table holds, and
	// count what the tables make from here on.
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return fmt.Errorf("possible CPUs: %w", err)
	}
	for _, m := range []*ebpf.Map{objs.LabSeq, objs.LabMade, objs.LabRefused} {
		for seq := uint32(0); seq < m.MaxEntries(); seq++ {
			if err := m.Update(seq, make([]uint64, cpus), ebpf.UpdateExist); err != nil {
				return fmt.Errorf("reset %s[%d]: %w", m, seq, err)
			}
		}
	}
	return nil
}

// loadTableStudy loads bench/bpf/tables.c with every table sized to
// capacity (a power of two: the open table's index is a mask).
func loadTableStudy(capacity uint32) (*tablesObjects, error) {
	return loadTableStudyWith(capacity, nil)
}

// loadTableStudyWith is loadTableStudy with more of tables.c's constants
// set (the churn test's).
func loadTableStudyWith(capacity uint32, vars map[string]uint32) (*tablesObjects, error) {
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
	consts := map[string]uint32{"open_mask": capacity - 1, "chunk_mask": capacity/chunkStride - 1}
	for name, v := range vars {
		consts[name] = v
	}
	for name, v := range consts {
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
