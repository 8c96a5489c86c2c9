package cluster

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadValidates(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body, want string
	}{
		{"ok", `{"version":1,"nodes":[{"id":1,"name":"a","addresses":["192.168.50.11"],"podCIDRs":["10.244.1.0/24"]},{"id":2,"name":"b","addresses":["fd00:50::12"]}]}`, ""},
		{"version", `{"version":2,"nodes":[{"id":1,"name":"a","addresses":["192.168.50.11"]}]}`, "version 2"},
		{"no nodes", `{"version":1,"nodes":[]}`, "no nodes"},
		{"id 0", `{"version":1,"nodes":[{"id":0,"name":"a","addresses":["192.168.50.11"]}]}`, "id 0"},
		{"duplicate id", `{"version":1,"nodes":[{"id":1,"name":"a","addresses":["192.168.50.11"]},{"id":1,"name":"b","addresses":["192.168.50.12"]}]}`, "twice"},
		{"duplicate name", `{"version":1,"nodes":[{"id":1,"name":"a","addresses":["192.168.50.11"]},{"id":2,"name":"a","addresses":["192.168.50.12"]}]}`, "twice"},
		{"no addresses", `{"version":1,"nodes":[{"id":1,"name":"a"}]}`, "no addresses"},
		{"bad prefix", `{"version":1,"nodes":[{"id":1,"name":"a","addresses":["192.168.50.11"],"podCIDRs":["10.244.1.0/33"]}]}`, "prefix length"},
		{"id too big", `{"version":1,"nodes":[{"id":70000,"name":"a","addresses":["192.168.50.11"]}]}`, "id"},
		{"unknown key", `{"version":1,"nodes":[{"id":1,"name":"a","address":["192.168.50.11"]}]}`, "unknown field"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, tc.name+".json")
			os.WriteFile(p, []byte(tc.body), 0o600)
			f, err := Load(p)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				want := []netip.Prefix{netip.MustParsePrefix("192.168.50.11/32"), netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:50::12/128")}
				if got := f.Members(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
					t.Fatalf("members %v", got)
				}
				if n, ok := f.ByName("b"); !ok || n.ID != 2 {
					t.Fatalf("ByName: %+v %v", n, ok)
				}
				d := NewDirectory(f)
				if d.NodeName(2) != "b" || d.NodeName(3) != "" {
					t.Fatal("NodeName")
				}
				if _, ok := d.Workload(1, 5); ok {
					t.Fatal("a node without a pin path resolved a workload")
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
		})
	}
}
