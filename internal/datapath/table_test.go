package datapath

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// clearTable empties the connection table from userspace: only while no
// program runs on it (a shared test datapath between tests).
func clearTable(tb testing.TB, d *Datapath) {
	tb.Helper()
	clearArray(tb, d.ChunksMap, make([]uint64, d.ChunksMap.MaxEntries()))
	clearArray(tb, d.SlotsMap, make([]bpfPktmetaSlot, d.SlotsMap.MaxEntries()))
}

func clearArray[V any](tb testing.TB, m *ebpf.Map, zeros []V) {
	tb.Helper()
	keys := make([]uint32, len(zeros))
	for i := range keys {
		keys[i] = uint32(i)
	}
	if _, err := m.BatchUpdate(keys, zeros, nil); err == nil {
		return
	} else if !errors.Is(err, ebpf.ErrNotSupported) {
		tb.Fatalf("clear %s: %v", m, err)
	}
	for i, k := range keys {
		if err := m.Update(k, &zeros[i], ebpf.UpdateAny); err != nil {
			tb.Fatalf("clear %s: %v", m, err)
		}
	}
}

// putRecord puts rec under t, as the datapath's own insert does, in place
// of any record there, and takes it out again when the test ends.
func putRecord(tb testing.TB, d *Datapath, t Tuple, rec bpfPktmetaRecord) {
	tb.Helper()
	k := t.key()
	var old bpfPktmetaRecord
	if d.lookupRecord(&k, &old) == nil {
		if err := d.removeRecord(&k, old.ConnId); err != nil {
			tb.Fatal(err)
		}
	}
	if err := d.insertRecord(&k, &rec); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.removeRecord(&k, rec.ConnId) })
}

// dropRecord takes the record under t out of the table behind the
// programs' back (no alias, budget or event goes with it).
func dropRecord(tb testing.TB, d *Datapath, t Tuple) {
	tb.Helper()
	k := t.key()
	var v bpfPktmetaRecord
	if err := d.lookupRecord(&k, &v); err != nil {
		tb.Fatalf("drop %s: %v", t, err)
	}
	if err := d.removeRecord(&k, v.ConnId); err != nil {
		tb.Fatalf("drop %s: %v", t, err)
	}
}

// The churn object (testdata/tablechurn.c): the datapath's table code and
// the consumers' reader, driven from every CPU at once.
//
//go:generate clang-19 -O2 -g -fdebug-compilation-dir=. -Wall -Werror -mcpu=v3 -target bpfel -I../../bpf/include -I../../bpf -I/usr/include/x86_64-linux-gnu -c testdata/tablechurn.c -o testdata/tablechurn_bpfel.o
//go:generate llvm-strip-19 -g testdata/tablechurn_bpfel.o
//go:embed testdata/tablechurn_bpfel.o
var tableChurnObject []byte

// What the churn counts (CHURN_* in testdata/tablechurn.c).
var churnCountNames = []string{"made", "exists", "full", "busy", "removed", "gone", "rewritten", "readHit", "readMiss", "torn", "duplicate", "uncheckedTorn", "uncheckedReads"}

const (
	churnMade = iota
	churnExists
	churnFull
	churnBusy
	churnRemoved
	churnGone
	churnRewritten
	churnReadHit
	churnReadMiss
	churnTorn
	churnDuplicate
	churnUncheckedTorn
	churnUncheckedReads
)

type tableChurn struct {
	Write *ebpf.Program `ebpf:"churn_write"`
	Read  *ebpf.Program `ebpf:"churn_read"`
	// ReadUnchecked copies without the state check: the control.
	ReadUnchecked *ebpf.Program `ebpf:"churn_read_unchecked"`
	Counts        *ebpf.Map     `ebpf:"churn_counts"`
	Live          *ebpf.Map     `ebpf:"churn_live"`
}

// loadTableChurn loads the churn against d's table, over keys connections;
// ordered forces the fully ordered reads and state changes (always on
// where the CPU needs them).
func loadTableChurn(t *testing.T, d *Datapath, keys uint32, ordered bool) *tableChurn {
	t.Helper()
	spec, err := ebpf.LoadCollectionSpecFromReader(bytes.NewReader(tableChurnObject))
	if err != nil {
		t.Fatal(err)
	}
	if err := spec.Variables["churn_keys"].Set(keys); err != nil {
		t.Fatal(err)
	}
	if ordered || orderedReads() {
		if err := spec.Variables["pktmeta_ordered_reads"].Set(uint32(1)); err != nil {
			t.Fatal(err)
		}
	}
	repl := map[string]*ebpf.Map{mapTable: d.TableMap, mapChunks: d.ChunksMap, mapSlots: d.SlotsMap, mapAliases: d.AliasesMap}
	for name, m := range repl {
		spec.Maps[name].MaxEntries, spec.Maps[name].Pinning = m.MaxEntries(), ebpf.PinNone
	}
	var c tableChurn
	if err := spec.LoadAndAssign(&c, &ebpf.CollectionOptions{MapReplacements: repl}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Write.Close()
		c.Read.Close()
		c.ReadUnchecked.Close()
		c.Counts.Close()
		c.Live.Close()
	})
	return &c
}

// counts sums the churn's per-CPU counters.
func (c *tableChurn) counts(t *testing.T) []uint64 {
	t.Helper()
	out := make([]uint64, len(churnCountNames))
	for i := range out {
		var perCPU []uint64
		if err := c.Counts.Lookup(uint32(i), &perCPU); err != nil {
			t.Fatal(err)
		}
		for _, v := range perCPU {
			out[i] += v
		}
	}
	return out
}

// onCPUs runs progs[i] ops times on CPU i, all at once.
func onCPUs(t *testing.T, progs []*ebpf.Program, ops int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(progs))
	for cpu, prog := range progs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread() // not unlocked: the thread's affinity changes, so it goes
			var set unix.CPUSet
			set.Set(cpu)
			if err := unix.SchedSetaffinity(0, &set); err != nil {
				errs <- err
				return
			}
			if ret, _, err := prog.Benchmark(make([]byte, 64), ops, nil); err != nil || ret != tcxNext {
				errs <- fmt.Errorf("CPU %d: %s returned %d: %v", cpu, prog, ret, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// tcxNext is what a program returns that lets the packet go on (TCX_NEXT).
const tcxNext = ^uint32(0)

// checkTable reads the table at rest (nothing running) and returns every
// broken invariant, and each tuple's live entries.
func checkTable(t *testing.T, d *Datapath) (problems []string, live map[bpfPktmetaTuple]int) {
	t.Helper()
	n := d.table.chunks
	words := make([]uint64, n)
	for c := range n {
		if err := d.ChunksMap.Lookup(c, &words[c]); err != nil {
			t.Fatal(err)
		}
	}
	live = map[bpfPktmetaTuple]int{}
	passing := make([]uint64, n) // entries of earlier homes past each chunk
	for c := range n {
		w := words[c]
		if w&(1<<63) != 0 {
			problems = append(problems, fmt.Sprintf("chunk %d: lock bit left set", c))
		}
		for i := range uint32(chunkSlots) {
			var s bpfPktmetaSlot
			if err := d.SlotsMap.Lookup(c*chunkSlots+i, &s); err != nil {
				t.Fatal(err)
			}
			tag := uint8(w >> (8 * i))
			switch s.State & slotKindMask {
			case 0:
				if tag != 0 {
					problems = append(problems, fmt.Sprintf("chunk %d slot %d: empty, tag %#x", c, i, tag))
				}
			case slotLive:
				home, want := homeAndTag(tupleHash(&s.Key, d.table.seed), n)
				if tag != want {
					problems = append(problems, fmt.Sprintf("chunk %d slot %d: tag %#x, its hash says %#x", c, i, tag, want))
				}
				dist := (c + n - home) % n
				if dist >= chunkProbes {
					problems = append(problems, fmt.Sprintf("chunk %d slot %d: %d chunks past its home %d", c, i, dist, home))
				}
				for j := range dist {
					passing[(home+j)%n]++
				}
				live[s.Key]++
				var found bpfPktmetaSlot
				if err := d.findSlot(&s.Key, &found); err != nil || found.Rec.ConnId != s.Rec.ConnId {
					problems = append(problems, fmt.Sprintf("chunk %d slot %d: %s not found by a lookup (%v)", c, i, tupleFromKey(&s.Key), err))
				}
			default:
				problems = append(problems, fmt.Sprintf("chunk %d slot %d: state %#x left mid-write", c, i, s.State))
			}
		}
	}
	for c := range n {
		if got := (words[c] >> 56) & 0x7f; got != passing[c] {
			problems = append(problems, fmt.Sprintf("chunk %d: overflow count %d, %d entries lie past it", c, got, passing[c]))
		}
	}
	for k, v := range live {
		if v > 1 {
			problems = append(problems, fmt.Sprintf("%s: %d live entries", tupleFromKey(&k), v))
		}
	}
	return problems, live
}

// The table under inserts, removes and in-place rewrites of the same
// tuples from every CPU at once, read by consumers on the others: the
// invariants hold at rest, no tuple ever has two entries, and no reader
// ever gets a record mixed from two writes.
func TestTableUnderChurn(t *testing.T) {
	cpus := runtime.NumCPU()
	if cpus < 2 {
		t.Skip("needs two CPUs for the operations to race")
	}
	const ops = 200_000
	for _, c := range []struct {
		name     string
		capacity uint32
		keys     uint32
		prefill  int  // records of other tuples put in first
		ordered  bool // the fully ordered reads and writes of CPUs other than x86
	}{
		// Few tuples: the CPUs keep writing the same ones.
		{"16 tuples", 1024, 16, 0, false},
		// A table at about its capacity (the churn keeps about half of
		// its tuples live): long paths past full chunks, some inserts
		// refused.
		{"600 tuples in a table made for 1024 and holding 750", 1024, 600, 750, false},
		// The exchanges and atomic reads arm64 uses, run here: no arm64
		// machine runs the tests, but x86 must find them as correct.
		{"16 tuples, fully ordered", 1024, 16, 0, true},
		{"600 tuples in a table holding 750, fully ordered", 1024, 600, 750, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			// The package's shared datapath of that size, emptied (a
			// load costs the verifier 18 s under emulation).
			d := sharedDatapath(t, c.capacity)
			resetDatapath(t, d)
			for i := range c.prefill {
				tu := Tuple{Proto: ProtoUDP, Src: netip.MustParseAddrPort("10.1.0.1:53"), Dst: netip.AddrPortFrom(netip.MustParseAddr("10.2.0.1"), uint16(1000+i))}
				if err := d.InsertRecord(tu, uint64(1<<40+i)); err != nil {
					t.Fatal(err)
				}
			}
			ch := loadTableChurn(t, d, c.keys, c.ordered)
			writers := make([]*ebpf.Program, cpus)
			for i := range writers {
				writers[i] = ch.Write
			}
			onCPUs(t, writers, ops)
			// Then one CPU reads while the others write, each way round,
			// with the reader's check and, the control, without it.
			for _, read := range []*ebpf.Program{ch.Read, ch.ReadUnchecked} {
				for reader := range cpus {
					progs := slices.Clone(writers)
					progs[reader] = read
					onCPUs(t, progs, ops)
				}
			}
			got := ch.counts(t)
			var b strings.Builder
			for i, name := range churnCountNames {
				fmt.Fprintf(&b, " %s %d", name, got[i])
			}
			t.Logf("churn:%s", b.String())
			if got[churnMade] == 0 || got[churnRemoved] == 0 || got[churnRewritten] == 0 || got[churnReadHit] == 0 {
				t.Fatalf("the churn did not exercise the table:%s", b.String())
			}
			if got[churnTorn] != 0 {
				t.Errorf("%d reads returned a record mixed from two writes", got[churnTorn])
			}
			if got[churnDuplicate] != 0 {
				t.Errorf("%d inserts made a second live entry for a tuple", got[churnDuplicate])
			}
			problems, live := checkTable(t, d)
			for _, p := range problems {
				t.Error(p)
			}
			// What the churn counted live is what the table holds.
			total := 0
			for _, v := range live {
				total += v
			}
			var counted int64
			for n := range c.keys {
				var v int64
				if err := ch.Live.Lookup(n, &v); err != nil {
					t.Fatal(err)
				}
				counted += v
			}
			if int64(total) != counted+int64(c.prefill) {
				t.Errorf("%d entries live in the table, the churn counted %d and put %d in first", total, counted, c.prefill)
			}
			recs, err := d.Records()
			if err != nil || len(recs) != total {
				t.Errorf("Records: %d (%v), want %d", len(recs), err, total)
			}
		})
	}
}

// The userspace walk (findSlot, tupleHash) finds what the datapath's
// insert put, for both families and any ports: the two hashes agree.
// A tuple and its reverse share their home chunk and tag.
func TestTableHashAgreesWithTheDatapath(t *testing.T) {
	d := sharedDatapath(t, 4096)
	resetDatapath(t, d)
	rng := rand.New(rand.NewPCG(1, 2))
	var tuples []Tuple
	for i := range 3000 {
		var src, dst netip.Addr
		if i%2 == 0 {
			src = netip.AddrFrom4([4]byte{10, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))})
			dst = netip.AddrFrom4([4]byte{10, byte(rng.IntN(256)), byte(rng.IntN(256)), byte(rng.IntN(256))})
		} else {
			var a, b [16]byte
			for j := range a {
				a[j], b[j] = byte(rng.IntN(256)), byte(rng.IntN(256))
			}
			src, dst = netip.AddrFrom16(a), netip.AddrFrom16(b)
		}
		tu := Tuple{Proto: []uint8{ProtoTCP, ProtoUDP}[i%3%2], Src: netip.AddrPortFrom(src, uint16(rng.IntN(65536))), Dst: netip.AddrPortFrom(dst, uint16(rng.IntN(65536)))}
		if err := d.InsertRecord(tu, uint64(i+1)); err != nil {
			t.Fatalf("insert %s: %v", tu, err)
		}
		tuples = append(tuples, tu)
	}
	for i, tu := range tuples {
		r, err := d.Lookup(tu)
		if err != nil || r.ConnID != uint64(i+1) || r.Tuple != tu {
			t.Fatalf("lookup %s: %+v, %v", tu, r, err)
		}
		k, rk := tu.key(), tu.Reverse().key()
		if h, rh := tupleHash(&k, d.table.seed), tupleHash(&rk, d.table.seed); h != rh {
			t.Fatalf("%s hashes to %#x, its reverse to %#x", tu, h, rh)
		}
	}
	if problems, _ := checkTable(t, d); len(problems) > 0 {
		t.Fatal(problems)
	}
}
