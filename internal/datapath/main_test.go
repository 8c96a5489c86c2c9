package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// shared holds the datapaths tests share, by table size, pinned in a
// private bpffs mounted for the package's test run.
var shared struct {
	sync.Mutex
	dir string
	ds  map[uint32]*Datapath
}

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Lock()
	for _, d := range shared.ds {
		d.Close()
	}
	if shared.dir != "" {
		unix.Unmount(shared.dir, unix.MNT_DETACH)
		os.RemoveAll(shared.dir)
	}
	shared.Unlock()
	os.Exit(code)
}

func sharedDatapath(t *testing.T, maxConns uint32) *Datapath {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (BPF, bpffs, network namespaces); CI runs it as root")
	}
	shared.Lock()
	defer shared.Unlock()
	if d, ok := shared.ds[maxConns]; ok {
		return d
	}
	if shared.dir == "" {
		dir, err := os.MkdirTemp("", "pktmeta-datapath-test-")
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
			os.RemoveAll(dir)
			t.Fatalf("mount bpffs at %s: %v", dir, err)
		}
		shared.dir = dir
		shared.ds = map[uint32]*Datapath{}
	}
	d, _, err := Open(Options{PinPath: filepath.Join(shared.dir, fmt.Sprint(maxConns)), MaxConnections: maxConns, Log: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	shared.ds[maxConns] = d
	return d
}

// resetDatapath empties every map a test can have filled and restores the
// config, so that a shared datapath looks freshly made.
func resetDatapath(t *testing.T, d *Datapath) {
	t.Helper()
	clearTable(t, d)
	for _, m := range []*ebpf.Map{d.AliasesMap, d.EndpointsMap, d.WorkloadsMap} {
		var keys [][]byte
		k := make([]byte, m.KeySize())
		it := m.Iterate()
		v := make([]byte, m.ValueSize())
		for it.Next(&k, &v) {
			keys = append(keys, append([]byte(nil), k...))
		}
		for _, k := range keys {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Fatal(err)
			}
		}
	}
	// The tables were changed from here: what the CPUs remember of UDP
	// flows is void.
	if err := d.ForgetUDPShortcuts(); err != nil {
		t.Fatal(err)
	}
	zero := make([]bpfPktmetaCounters, ebpf.MustPossibleCPU())
	if err := d.StatsMap.Put(uint32(0), zero); err != nil {
		t.Fatal(err)
	}
	if err := d.XStatsMap.Put(uint32(0), make([]bpfPktmetaRemoteCounters, ebpf.MustPossibleCPU())); err != nil {
		t.Fatal(err)
	}
	if err := d.RemoteLiveMap.Put(uint32(0), int64(0)); err != nil {
		t.Fatal(err)
	}
	if err := d.NodeMap.Put(uint32(0), bpfPktmetaNodeConfig{}); err != nil {
		t.Fatal(err)
	}
	if err := d.SetNode(NodeConfig{}); err != nil {
		t.Fatal(err)
	}
	if err := writeConfig(d.ConfigMap, Config{LayoutVersion: LayoutVersion, Release: Release, UDPTimeout: DefaultUDPTimeout, DatapathID: bundledID()}); err != nil {
		t.Fatal(err)
	}
	rd, err := d.NewEventReader()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	for {
		rd.SetDeadline(time.Now().Add(10 * time.Millisecond))
		if _, err := rd.Read(); err != nil {
			return
		}
	}
}
