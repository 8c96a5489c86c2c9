package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/pktmeta/pktmeta/internal/testutil"
)

func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func TestEnsureLoadsOnceAndReuses(t *testing.T) {
	pin := testutil.PinPath(t)
	d, res, err := Ensure(Options{PinPath: pin, MaxConnections: 4096}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !res.Loaded || !res.Created {
		t.Fatalf("first Ensure: %+v, want loaded and created", res)
	}
	info, _ := d.Origin.Info()
	id1, _ := info.ID()

	d2, res2, err := Ensure(Options{PinPath: pin, MaxConnections: 9999}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	if res2.Loaded || res2.Created {
		t.Fatalf("second Ensure: %+v, want neither loaded nor created", res2)
	}
	info2, _ := d2.Origin.Info()
	id2, _ := info2.ID()
	if id1 != id2 {
		t.Fatalf("second Ensure reloaded the program: id %d then %d", id1, id2)
	}
	if got := d2.ConnsMap.MaxEntries(); got != 4096 {
		t.Fatalf("conns max entries %d, want the pinned 4096", got)
	}
}

// A plugin killed between creating the maps and writing the config must
// not leave a node where no pod can be added or deleted.
func TestInterruptedFirstLoadRecovers(t *testing.T) {
	pin := testutil.PinPath(t)
	// What the dead plugin left: the maps, pinned, with a zero config.
	spec, err := loadBpf()
	if err != nil {
		t.Fatal(err)
	}
	delete(spec.Maps, ".bss")
	delete(spec.Variables, bpfVarUnusedEvent)
	d0 := &Datapath{PinPath: pin}
	if err := os.MkdirAll(d0.mapsDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d0.mapsDir()}})
	if err != nil {
		t.Fatal(err)
	}
	coll.Close()

	if _, err := OpenMaps(pin); !errors.Is(err, ErrNotLoaded) {
		t.Fatalf("OpenMaps of a half-made datapath: %v, want ErrNotLoaded", err)
	}
	d, res, err := Ensure(Options{PinPath: pin}, testLogger())
	if err != nil {
		t.Fatalf("Ensure after an interrupted load: %v", err)
	}
	defer d.Close()
	if !res.Loaded || res.Created {
		t.Fatalf("%+v: want loaded into the existing maps", res)
	}
	if cur, _ := d.Current(); !cur {
		t.Fatal("config not completed")
	}
}

// Workload IDs start at the attachment key's hash; taken IDs are skipped
// and finding the workload again probes, it does not scan.
func TestWorkloadIDsProbeFromTheKeyHash(t *testing.T) {
	pin := testutil.PinPath(t)
	d, _, err := Ensure(Options{PinPath: pin, MaxConnections: 4096}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
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
	id, err := d.RegisterWorkload(w)
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

// Records reads the table in batches; more than one batch must all come back.
func TestRecordsAcrossBatches(t *testing.T) {
	pin := testutil.PinPath(t)
	d, _, err := Ensure(Options{PinPath: pin, MaxConnections: 16384}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	const n = 10000
	keys := make([]bpfPktmetaTuple, n)
	vals := make([]bpfPktmetaRecord, n)
	for i := range keys {
		keys[i] = Tuple{Proto: ProtoTCP, Src: netip.AddrPortFrom(netip.MustParseAddr("10.0.0.1"), uint16(i+1)), Dst: netip.MustParseAddrPort("10.0.0.2:80")}.key()
		vals[i] = bpfPktmetaRecord{Version: RecordVersion, ConnId: uint64(i + 1)}
	}
	if _, err := d.ConnsMap.BatchUpdate(keys, vals, nil); err != nil {
		t.Fatal(err)
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
		if f.Name == mapConns && (f.Entries != n || f.Max != 16384) {
			t.Fatalf("map fill %+v, want %d of 16384", f, n)
		}
	}
}
