package main

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Chunk layout constants of tables.c, for the checks below.
const (
	chunkSlots         = 7
	chunkProbes        = 8
	chunkOverflowShift = 56
	chunkLock          = uint64(1) << 63
	slotKindMask       = 3
	slotLive           = 2
	slotWriting        = 1
)

// TestChunkTableUnderChurn: the chunked table of the layout study
// (bench/bpf/tables.c), hammered with inserts and deletes of the same few
// hundred tuples and their reverses from every CPU at once, is whole
// afterwards: no lock or half-written slot left, tags and slots agree,
// one entry per connection (never a tuple twice, never a tuple and its
// reverse), every entry within reach of its home chunk, and every
// chunk's overflow count exactly the number of entries that passed it.
// Every insert also counts, before it lets go of its home chunk, the live
// entries that hold its tuple: never more than its own. Without the
// insert lock two inserts of one tuple can both succeed; the second
// subtest shows how often the same churn does that (logged, not asserted:
// it is a race, and deletes soon remove such copies).
func TestChunkTableUnderChurn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: loads BPF programs")
	}
	cpus := runtime.NumCPU()
	if cpus < 2 {
		t.Skip("needs two CPUs for the operations to race")
	}
	const (
		capacity = 1024 // 128 chunks, 896 usable slots
		ops      = 300_000
	)
	for _, c := range []struct {
		name        string
		keys        uint32
		deleteShare uint32 // in 256ths
		noLock      uint32
	}{
		// Few tuples: the CPUs keep inserting and deleting the same ones.
		{"16 tuples, with the insert lock", 16, 128, 0},
		{"16 tuples, without the insert lock", 16, 128, 1},
		// Many tuples, mostly inserts: three quarters of the tuples live
		// (about 75 % of the usable slots), long overflow paths, some
		// inserts refused.
		{"900 tuples, a table three quarters full", 900, 64, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			objs, err := loadTableStudyWith(capacity, map[string]uint32{
				"churn_keys": c.keys, "churn_delete_share": c.deleteShare, "chunk_no_lock": c.noLock})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { objs.Close() })
			churnOnEveryCPU(t, objs.LabChunkChurn, cpus, ops)
			counts := make([]uint64, 7)
			for i := range counts {
				if counts[i], err = perCPUSum(objs.ChurnCounts, uint32(i)); err != nil {
					t.Fatal(err)
				}
			}
			t.Logf("made %d, exists %d, busy %d, full %d, deleted %d, absent %d; %d inserts found their tuple twice",
				counts[0], counts[1], counts[2], counts[3], counts[4], counts[5], counts[6])
			if counts[0] == 0 || counts[4] == 0 {
				t.Fatalf("the churn made %d entries and deleted %d: it did not exercise the table", counts[0], counts[4])
			}
			problems, live, err := checkChunkTable(objs, capacity)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%d entries live afterwards", live)
			if c.noLock == 0 {
				for _, p := range problems {
					t.Error(p)
				}
				if counts[6] != 0 {
					t.Errorf("%d inserts found their tuple in the table twice", counts[6])
				}
				return
			}
			t.Logf("without the lock: %d inserts found their tuple twice, %d problems at rest", counts[6], len(problems))
			for i, p := range problems {
				if i == 5 {
					break
				}
				t.Log(p)
			}
		})
	}
}

// churnOnEveryCPU runs prog ops times on each CPU, all at once.
func churnOnEveryCPU(t *testing.T, prog *ebpf.Program, cpus, ops int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, cpus)
	for cpu := range cpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread() // not unlocked: the thread's affinity is changed, so it goes
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				errs <- err
				return
			}
			if ret, _, err := prog.Benchmark(make([]byte, 64), ops, nil); err != nil || ret != retNext {
				errs <- fmt.Errorf("CPU %d: returned %d: %v", cpu, ret, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// checkChunkTable reads the chunked table at rest and lists every
// invariant it breaks.
func checkChunkTable(objs *tablesObjects, capacity uint32) (problems []string, live int, err error) {
	chunks := capacity / chunkStride
	words := make([]uint64, chunks)
	for c := range chunks {
		if err := objs.ChunkWords.Lookup(c, &words[c]); err != nil {
			return nil, 0, err
		}
	}
	type entry struct {
		chunk, home uint32
		key         tablesKey16
	}
	var entries []entry
	seen := map[tablesKey16]uint32{}
	for idx := range capacity {
		var s tablesOpenSlot
		if err := objs.ChunkSlots.Lookup(idx, &s); err != nil {
			return nil, 0, err
		}
		c, i := idx/chunkStride, idx%chunkStride
		kind := s.State & slotKindMask
		if i == chunkSlots {
			if s.State != 0 {
				problems = append(problems, fmt.Sprintf("slot %d: the unused eighth slot of chunk %d has state %#x", idx, c, s.State))
			}
			continue
		}
		tag := uint8(words[c] >> (8 * i))
		switch {
		case kind == slotWriting:
			problems = append(problems, fmt.Sprintf("slot %d: left half written", idx))
		case kind == slotLive && tag == 0:
			problems = append(problems, fmt.Sprintf("slot %d: live without a tag", idx))
		case kind != slotLive && tag != 0:
			problems = append(problems, fmt.Sprintf("slot %d: tagged but not live (state %#x)", idx, s.State))
		case kind == slotLive:
			want := uint8(s.Hash >> 24)
			if want == 0 {
				want = 1
			}
			if tag != want {
				problems = append(problems, fmt.Sprintf("slot %d: tag %#x, its hash says %#x", idx, tag, want))
			}
			if other, dup := seen[s.Key]; dup {
				problems = append(problems, fmt.Sprintf("slots %d and %d hold the same tuple", other, idx))
			}
			seen[s.Key] = idx
			entries = append(entries, entry{chunk: c, home: s.Hash & (chunks - 1), key: s.Key})
		}
	}
	want := make([]uint64, chunks)
	for _, e := range entries {
		r := tablesKey16{Saddr: e.key.Daddr, Daddr: e.key.Saddr, Sport: e.key.Dport, Dport: e.key.Sport, Proto: e.key.Proto}
		if other, both := seen[r]; both {
			problems = append(problems, fmt.Sprintf("slot %d holds the reverse of a tuple slot %d holds: two entries for one connection", other, seen[e.key]))
		}
		dist := (e.chunk - e.home) & (chunks - 1)
		if dist >= chunkProbes {
			problems = append(problems, fmt.Sprintf("an entry of home chunk %d lies %d chunks on, out of reach", e.home, dist))
		}
		for c := e.home; c != e.chunk; c = (c + 1) & (chunks - 1) {
			want[c]++
		}
	}
	for c, w := range words {
		if w&chunkLock != 0 {
			problems = append(problems, fmt.Sprintf("chunk %d: insert lock left set", c))
		}
		if got := (w &^ chunkLock) >> chunkOverflowShift; got != want[c] {
			problems = append(problems, fmt.Sprintf("chunk %d: overflow count %d, %d entries passed it", c, got, want[c]))
		}
	}
	return problems, len(entries), nil
}
