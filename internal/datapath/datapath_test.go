package datapath

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/pktmeta/pktmeta/internal/testutil"
)

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// mustOpen opens (creating) the datapath at pin and closes it at cleanup.
func mustOpen(tb testing.TB, pin string, maxConns uint32) (*Datapath, OpenResult) {
	tb.Helper()
	d, res, err := Open(Options{PinPath: pin, MaxConnections: maxConns, Log: testLogger()})
	if err != nil {
		tb.Fatalf("open %s: %v", pin, err)
	}
	tb.Cleanup(func() { d.Close() })
	return d, res
}

// withConfig rewrites the pinned config slot, as another build would have
// left it, without holding any handle.
func withConfig(tb testing.TB, pin string, change func(*Config)) {
	tb.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", mapConfig), nil)
	if err != nil {
		tb.Fatal(err)
	}
	defer m.Close()
	cfg, err := readConfig(m)
	if err != nil {
		tb.Fatal(err)
	}
	change(&cfg)
	if err := writeConfig(m, cfg); err != nil {
		tb.Fatal(err)
	}
}

func progID(tb testing.TB, p *ebpf.Program) ebpf.ProgramID {
	tb.Helper()
	info, err := p.Info()
	if err != nil {
		tb.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// Every change to the BPF object needs a new Release (see release.go).
func TestReleaseNamesTheObject(t *testing.T) {
	sum := sha256.Sum256(_BpfBytes)
	if got := hex.EncodeToString(sum[:]); got != releaseObject {
		t.Fatalf("the BPF object changed (sha256 %s) but release.go still names %q for release %d: bump Release and set releaseObject = %q",
			got, releaseObject, Release, got)
	}
}

func TestOpenLoadsOnceAndReuses(t *testing.T) {
	pin := testutil.PinPath(t)
	d, res := mustOpen(t, pin, 4096)
	if !res.Loaded || !res.Created {
		t.Fatalf("first Open: %+v, want loaded and created", res)
	}
	id1 := progID(t, d.Origin)
	d.Close()

	d2, res2 := mustOpen(t, pin, 9999)
	if res2.Loaded || res2.Created {
		t.Fatalf("second Open: %+v, want neither loaded nor created", res2)
	}
	if id2 := progID(t, d2.Origin); id1 != id2 {
		t.Fatalf("second Open reloaded the program: id %d then %d", id1, id2)
	}
	if got := d2.Capacity(); got != 4096 {
		t.Fatalf("table capacity %d, want the pinned 4096", got)
	}
	if got, want := d2.SlotsMap.MaxEntries(), tableChunks(4096)*chunkSlots; got != want {
		t.Fatalf("table slots %d, want the pinned %d", got, want)
	}
	if cur, _ := d2.Current(); !cur {
		t.Fatal("not current after Open")
	}
}

// A DEL that has to take an older release's datapath as it is (completing
// it failed) still removes the pod's endpoint: the map release 5 added is
// left nil, and voiding the UDP shortcuts, which such programs never had,
// is skipped. Without its sweep program as well, the endpoint still goes.
// One load for all cases (a load is half a minute of verifier under TCG):
// the loading handle stays open and pins back what a case removed.
func TestOlderDatapathTakenAsItIsStillDeletes(t *testing.T) {
	pin := testutil.PinPath(t)
	d, _ := mustOpen(t, pin, 4096)
	defer d.Close()
	epochPin := filepath.Join(pin, "maps", mapUDPEpoch)
	sweepPin := filepath.Join(pin, "progs", ProgSweep)
	for _, c := range []struct {
		name                  string
		noEpochMap, noSweeper bool
	}{
		{"no epoch map", true, false},
		{"no epoch map, no sweep program", true, true},
		{"no sweep program", false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			if err := d.PutEndpoint(7, Endpoint{Workload: 3, MaxConnections: 10}); err != nil {
				t.Fatal(err)
			}
			if c.noEpochMap {
				if err := os.Remove(epochPin); err != nil {
					t.Fatal(err)
				}
				defer func() {
					// A clone: the handle's own map believes it is still
					// pinned there and would not pin again.
					m, err := d.UDPEpochMap.Clone()
					if err == nil {
						err = m.Pin(epochPin)
						m.Close()
					}
					if err != nil {
						t.Fatal(err)
					}
				}()
			}
			if c.noSweeper {
				if err := os.Remove(sweepPin); err != nil {
					t.Fatal(err)
				}
				defer func() {
					p, err := d.Sweeper.Clone()
					if err == nil {
						err = p.Pin(sweepPin)
						p.Close()
					}
					if err != nil {
						t.Fatal(err)
					}
				}()
			}
			old, err := openAsIs(pin, testLogger())
			if err != nil {
				t.Fatalf("openAsIs: %v", err)
			}
			defer old.Close()
			if (old.UDPEpochMap == nil) != c.noEpochMap || (old.Sweeper == nil) != c.noSweeper {
				t.Fatalf("opened epoch map %v, sweeper %v: not the state under test", old.UDPEpochMap != nil, old.Sweeper != nil)
			}
			if err := old.DeleteEndpoint(7, 3); err != nil {
				t.Fatalf("DeleteEndpoint: %v", err)
			}
			if _, ok, err := old.Endpoint(7); ok || err != nil {
				t.Fatalf("endpoint still there (%v, %v)", ok, err)
			}
		})
	}
}

// A handle holds the node lock shared for its whole life: an upgrade (which
// needs it exclusively) waits for it, so a caller never attaches superseded
// programs.
func TestHandleHoldsTheLockForItsLife(t *testing.T) {
	pin := testutil.PinPath(t)
	d, _ := mustOpen(t, pin, 4096)
	withConfig(t, pin, func(c *Config) { c.Release = Release - 1 })

	done := make(chan OpenResult)
	go func() {
		d2, res, err := Open(Options{PinPath: pin, Log: testLogger()})
		if err != nil {
			t.Error(err)
		} else {
			d2.Close()
		}
		done <- res
	}()
	select {
	case res := <-done:
		t.Fatalf("the upgrade ran while a handle was open: %+v", res)
	case <-time.After(300 * time.Millisecond):
	}
	d.Close()
	if res := <-done; !res.Loaded {
		t.Fatalf("upgrade after the handle closed: %+v, want loaded", res)
	}
}

// A process waiting for the node lock while Destroy removes the pin
// directory locks the directory that is there once it gets the lock, not
// the removed one: otherwise it and a process that made the directory
// again would both hold the node lock.
func TestNodeLockFollowsARemovedDirectory(t *testing.T) {
	pin := testutil.PinPath(t)
	held, err := lockNode(pin, true)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *nodeLock, 1)
	go func() {
		l, err := lockNode(pin, false)
		if err != nil {
			t.Error(err)
		}
		got <- l
	}()
	time.Sleep(100 * time.Millisecond) // let it block on the old directory
	if err := os.Remove(pin); err != nil {
		t.Fatal(err)
	}
	held.unlock()
	l := <-got
	if l == nil {
		return
	}
	defer l.unlock()
	if !sameFile(l.f, pin) {
		t.Fatal("the waiter holds the lock of a removed directory")
	}
}

// Every state a pin path can be in, and what Open, OpenExisting and
// OpenReader make of it.
func TestPinnedStates(t *testing.T) {
	type want struct {
		openErr  error // nil: Open succeeds
		loaded   bool
		repaired bool
		existing error // OpenExisting's error
		// existingAsIs: OpenExisting opens it without changing it (a
		// newer release with this build's maps: DEL works, nothing loads).
		existingAsIs bool
	}
	for _, c := range []struct {
		name  string
		setup func(t *testing.T, pin string)
		want  want
	}{
		{"empty", func(*testing.T, string) {}, want{loaded: true, existing: ErrNotLoaded}},
		{"current", func(t *testing.T, pin string) { createAt(t, pin) }, want{existing: nil}},
		{"uncommitted maps", func(t *testing.T, pin string) { pinMapsOnly(t, pin, mapNames) }, want{loaded: true, repaired: true, existing: ErrNotLoaded}},
		{"some maps of a killed first load", func(t *testing.T, pin string) {
			pinMapsOnly(t, pin, []string{mapConfig, mapEvents, mapStats})
		}, want{loaded: true, repaired: true, existing: ErrNotLoaded}},
		{"a program pin missing", func(t *testing.T, pin string) {
			createAt(t, pin)
			os.Remove(filepath.Join(pin, "progs", ProgDeliver))
		}, want{loaded: true, repaired: true}},
		{"a map pin missing", func(t *testing.T, pin string) {
			createAt(t, pin)
			os.Remove(filepath.Join(pin, "maps", mapEvents))
		}, want{loaded: true, repaired: true}},
		{"older release", func(t *testing.T, pin string) {
			createAt(t, pin)
			withConfig(t, pin, func(c *Config) { c.Release--; c.DatapathID = [32]byte{1} })
		}, want{loaded: true}},
		{"newer release", func(t *testing.T, pin string) {
			createAt(t, pin)
			withConfig(t, pin, func(c *Config) { c.Release++ })
		}, want{openErr: ErrNewer, existingAsIs: true}},
		{"another build of this release", func(t *testing.T, pin string) {
			createAt(t, pin)
			withConfig(t, pin, func(c *Config) { c.DatapathID = [32]byte{2} })
		}, want{openErr: ErrNewer, existingAsIs: true}},
		{"layout 1 (a smaller config)", func(t *testing.T, pin string) {
			// What release 1 pinned: a 48-byte config with layout 1.
			os.MkdirAll(filepath.Join(pin, "maps"), 0o700)
			m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 48, MaxEntries: 1})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			v := make([]byte, 48)
			v[0] = 1
			if err := m.Put(uint32(0), v); err != nil {
				t.Fatal(err)
			}
			if err := m.Pin(filepath.Join(pin, "maps", mapConfig)); err != nil {
				t.Fatal(err)
			}
		}, want{openErr: ErrOlderLayout, existing: ErrOlderLayout}},
		{"newer layout", func(t *testing.T, pin string) {
			createAt(t, pin)
			withConfig(t, pin, func(c *Config) { c.LayoutVersion++ })
		}, want{openErr: ErrNewer, existing: ErrNewer}},
	} {
		t.Run(c.name+"/Open", func(t *testing.T) {
			pin := testutil.PinPath(t)
			c.setup(t, pin)
			d, res, err := Open(Options{PinPath: pin, MaxConnections: 4096, Log: testLogger()})
			if c.want.openErr != nil {
				if !errors.Is(err, c.want.openErr) {
					t.Fatalf("Open: %v, want %v", err, c.want.openErr)
				}
				if !strings.Contains(err.Error(), "refusing") && !strings.Contains(err.Error(), "uninstall") {
					t.Fatalf("error does not say what it refuses or what to do: %v", err)
				}
				if _, err := os.Stat(filepath.Join(pin, "maps", mapConfig)); err != nil {
					t.Fatalf("the refused state was touched: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer d.Close()
			if res.Loaded != c.want.loaded || res.Repaired != c.want.repaired {
				t.Fatalf("Open: %+v, want loaded=%v repaired=%v", res, c.want.loaded, c.want.repaired)
			}
			requireCurrent(t, pin)
		})
		t.Run(c.name+"/OpenExisting", func(t *testing.T) {
			pin := testutil.PinPath(t)
			c.setup(t, pin)
			d, err := OpenExisting(pin, testLogger())
			if c.want.existing != nil {
				if !errors.Is(err, c.want.existing) {
					t.Fatalf("OpenExisting: %v, want %v", err, c.want.existing)
				}
				return
			}
			if err != nil {
				t.Fatalf("OpenExisting: %v", err)
			}
			d.Close()
			if c.want.existingAsIs {
				if st, _ := inspect(pin); st.kind != stateNewer {
					t.Fatalf("OpenExisting changed a newer datapath: now %v", st.kind)
				}
				return
			}
			// It completes what it finds, as DEL must work on it.
			requireCurrent(t, pin)
		})
	}
}

// requireCurrent checks that pin holds this build's complete datapath and
// that a reader can open it.
func requireCurrent(t *testing.T, pin string) {
	t.Helper()
	st, err := inspect(pin)
	if err != nil || st.kind != stateCurrent {
		t.Fatalf("pinned state %v (%v), missing %v", st.kind, err, st.missing)
	}
	r, err := OpenReader(pin)
	if err != nil {
		t.Fatalf("OpenReader: %v", err)
	}
	if cur, _ := r.Current(); !cur {
		t.Fatal("not current")
	}
	r.Close()
}

// createAt makes a current datapath at pin and closes the handle.
func createAt(t *testing.T, pin string) {
	t.Helper()
	d, _, err := Open(Options{PinPath: pin, MaxConnections: 4096, Log: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// pinMapsOnly pins some of the maps, with a zero (uncommitted) config: what
// a process killed during its first load leaves.
func pinMapsOnly(t *testing.T, pin string, names []string) {
	t.Helper()
	spec, err := loadBpf()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(pin, "maps"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		ms := spec.Maps[name].Copy()
		ms.Pinning = ebpf.PinNone
		if ms.MaxEntries == 1 {
			ms.MaxEntries = 1024
		}
		m, err := ebpf.NewMap(ms)
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Pin(filepath.Join(pin, "maps", name)); err != nil {
			t.Fatal(err)
		}
		m.Close()
	}
}

// Workload IDs start at the attachment key's hash; taken IDs are skipped
// and finding the workload again probes, it does not scan.
func TestWorkloadIDsProbeFromTheKeyHash(t *testing.T) {
	d, _ := mustOpen(t, testutil.PinPath(t), 4096)
	key := AttachmentKey{ContainerID: "abc", IfName: "eth0"}
	base := idSlot(key)
	// Others already hold the first four IDs.
	for i := range uint32(4) {
		other := &Workload{ContainerID: fmt.Sprintf("other%d", i), IfName: "eth0"}
		raw, _ := other.encode()
		if err := d.WorkloadsMap.Update(base+i, raw, ebpf.UpdateNoExist); err != nil {
			t.Fatal(err)
		}
	}
	w := &Workload{ContainerID: "abc", IfName: "eth0", Pod: "p"}
	id, err := d.registerWorkload(w)
	if err != nil || id != base+4 {
		t.Fatalf("registered as %d (%v), want %d", id, err, base+4)
	}
	got, ok, err := d.FindAttachment(key)
	if err != nil || !ok || got.ID != id || got.Pod != "p" {
		t.Fatalf("find: %+v %v %v", got, ok, err)
	}
	if _, ok, _ := d.FindAttachment(AttachmentKey{ContainerID: "nope", IfName: "eth0"}); ok {
		t.Fatal("found a workload that was never registered")
	}
}

// Records reads the table in batches; more than one batch must all come
// back (a table made for 4096 has 6832 slots: two batches).
func TestRecordsAcrossBatches(t *testing.T) {
	d := sharedDatapath(t, 4096)
	resetDatapath(t, d)
	const n = 3000
	for i := range n {
		tu := Tuple{Proto: ProtoTCP, Src: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i+1)), Dst: netip.MustParseAddrPort("10.0.0.2:80")}
		if err := d.InsertRecord(tu, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
	}
	recs, err := d.Records()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for _, r := range recs {
		seen[r.ConnID] = true
	}
	if len(recs) != n || len(seen) != n {
		t.Fatalf("%d records (%d distinct), want %d", len(recs), len(seen), n)
	}
	for _, f := range d.MapFill() {
		if f.Name == mapSlots && (f.Entries != n || f.Max != 4096) {
			t.Fatalf("map fill %+v, want %d of 4096", f, n)
		}
	}
}

// A reader handle changes nothing and takes no lock.
func TestReaderIsReadOnly(t *testing.T) {
	pin := testutil.PinPath(t)
	mustOpen(t, pin, 4096) // holds the shared lock: a reader must not wait for it either
	r, err := OpenReader(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.Attach(&Workload{ContainerID: "c", IfName: "eth0"}, AttachOptions{}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Attach through a reader: %v", err)
	}
	if _, err := r.Detach(AttachmentKey{ContainerID: "c", IfName: "eth0"}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Detach through a reader: %v", err)
	}
	if _, err := r.Sweep(SweepOptions{Hygiene: true}); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("Sweep through a reader: %v", err)
	}
}

// Destroy removes every pin and the directory; an interrupted Destroy
// (config gone first) leaves a state the next Open starts over from.
func TestDestroy(t *testing.T) {
	pin := testutil.PinPath(t)
	d, _ := mustOpen(t, pin, 4096)
	d.Close()
	// Interrupted right after its first step.
	os.Remove(filepath.Join(pin, "maps", mapConfig))
	d2, res := mustOpen(t, pin, 4096)
	if !res.Repaired || !res.Created {
		t.Fatalf("Open after an interrupted destroy: %+v", res)
	}
	d2.Close()
	if err := Destroy(pin, testLogger()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin path still there: %v", err)
	}
}
