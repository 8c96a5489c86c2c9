package datapath

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"testing"
	"time"
	"unsafe"
)

// The Go mirrors of the C layouts must have the C sizes: a mismatch would
// corrupt every map access.
func TestLayoutSizes(t *testing.T) {
	for _, c := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"pktmeta_tuple", unsafe.Sizeof(bpfPktmetaTuple{}), 40},
		{"pktmeta_record", unsafe.Sizeof(bpfPktmetaRecord{}), 104},
		{"pktmeta_alias", unsafe.Sizeof(bpfPktmetaAlias{}), 56},
		{"pktmeta_event", unsafe.Sizeof(bpfPktmetaEvent{}), 120},
		{"pktmeta_event_v4", unsafe.Sizeof(bpfPktmetaEventV4{}), 64},
		{"pktmeta_endpoint", unsafe.Sizeof(bpfPktmetaEndpoint{}), 336},
		{"pktmeta_sweep_args", unsafe.Sizeof(bpfPktmetaSweepArgs{}), 104},
		{"pktmeta_config", unsafe.Sizeof(bpfPktmetaConfig{}), 56},
	} {
		if c.got != c.want {
			t.Errorf("%s: %d bytes, want %d", c.name, c.got, c.want)
		}
	}
}

func TestTupleKeyEncoding(t *testing.T) {
	v4 := Tuple{Proto: ProtoTCP, Src: netip.MustParseAddrPort("10.0.0.1:443"), Dst: netip.MustParseAddrPort("10.0.0.2:8080")}
	k := v4.key()
	raw := (*[40]byte)(unsafe.Pointer(&k))
	// IPv4-mapped addresses, ports in network order, padding zero.
	wantSrc := [16]byte{10: 0xff, 11: 0xff, 12: 10, 15: 1}
	if [16]byte(raw[0:16]) != wantSrc {
		t.Fatalf("saddr % x", raw[0:16])
	}
	if binary.BigEndian.Uint16(raw[32:]) != 443 || binary.BigEndian.Uint16(raw[34:]) != 8080 || raw[36] != 6 || raw[37]|raw[38]|raw[39] != 0 {
		t.Fatalf("ports/proto/pad % x", raw[32:])
	}
	if back := tupleFromKey(&k); back != v4 {
		t.Fatalf("round trip %s != %s", back, v4)
	}
	v6 := Tuple{Proto: ProtoUDP, Src: netip.MustParseAddrPort("[fd00::1]:53"), Dst: netip.MustParseAddrPort("[fd00::2]:5353")}
	k6 := v6.key()
	if back := tupleFromKey(&k6); back != v6 {
		t.Fatalf("round trip %s != %s", back, v6)
	}
	if v6.Reverse().Reverse() != v6 || v6.Reverse().Src != v6.Dst {
		t.Fatal("reverse")
	}
}

func TestWorkloadEncoding(t *testing.T) {
	w := Workload{
		Namespace: "shop", Pod: "web-0", UID: "0a1b", ContainerID: strings.Repeat("c", 64), IfName: "eth0",
		HostIfName: "veth1234", HostIfindex: 7, Netns: "/var/run/netns/x", Tags: map[string]string{"b": "2", "a": "1"},
		PodTags: map[string]string{"team": "payments", "c": ""}, Network: "k8s-pod-network",
		Created: time.Unix(1700000000, 5), Legacy: true, Strict: true,
	}
	raw, err := w.encode()
	if err != nil {
		t.Fatal(err)
	}
	got := decodeWorkload(9, raw)
	w.ID = 9
	if got.Namespace != w.Namespace || got.Pod != w.Pod || got.ContainerID != w.ContainerID || got.HostIfindex != 7 ||
		!got.Created.Equal(w.Created) || !got.Legacy || !got.Strict || got.NoEgress || got.Partial ||
		len(got.Tags) != 2 || got.Tags["a"] != "1" || got.Tags["b"] != "2" ||
		len(got.PodTags) != 2 || got.PodTags["team"] != "payments" || got.PodTags["c"] != "" || got.Network != "k8s-pod-network" {
		t.Fatalf("round trip: %+v", got)
	}
	for _, bad := range []Workload{
		{Namespace: strings.Repeat("n", 64)},
		{Tags: map[string]string{"k": strings.Repeat("v", 128)}},
		{Tags: map[string]string{"1": "", "2": "", "3": "", "4": "", "5": "", "6": "", "7": "", "8": "", "9": ""}},
		// The limit counts both kinds, and a key is one kind or the other.
		{Tags: map[string]string{"1": "", "2": "", "3": "", "4": "", "5": ""}, PodTags: map[string]string{"6": "", "7": "", "8": "", "9": ""}},
		{Tags: map[string]string{"team": "a"}, PodTags: map[string]string{"team": "b"}},
	} {
		if err := ValidateWorkload(&bad); err == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

func TestPinNameEscapesDots(t *testing.T) {
	for in, want := range map[string]string{
		"abc123":      "abc123",
		"pod.v1":      "pod%2ev1",
		"eth0.100":    "eth0%2e100",
		"50%":         "50%25",
		"a/b":         "a%2fb",
		"tab\there":   "tab%09here",
		"container_1": "container_1",
	} {
		if got := pinName(in); got != want {
			t.Errorf("pinName(%q) = %q, want %q", in, got, want)
		}
		if back := unpinName(pinName(in)); back != in {
			t.Errorf("unpinName(pinName(%q)) = %q", in, back)
		}
	}
}
