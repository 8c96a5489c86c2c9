package kubenode

import (
	"cmp"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func node(name string, cidrs []string, addrs ...corev1.NodeAddress) *corev1.Node {
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: corev1.NodeSpec{PodCIDRs: cidrs}, Status: corev1.NodeStatus{Addresses: addrs}}
}

func internal(ip string) corev1.NodeAddress {
	return corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: ip}
}

func TestMembers(t *testing.T) {
	nodes := []*corev1.Node{
		node("a", []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, internal("192.168.50.11"), internal("fd00:50::11"),
			corev1.NodeAddress{Type: corev1.NodeExternalIP, Address: "203.0.113.9"}, corev1.NodeAddress{Type: corev1.NodeHostName, Address: "a"}),
		// A pod CIDR wider than any cluster's is not made a member; a
		// malformed one neither.
		node("b", []string{"10.0.0.0/4", "nonsense"}, internal("192.168.50.12")),
		// Only the legacy single field.
		{ObjectMeta: metav1.ObjectMeta{Name: "c"}, Spec: corev1.NodeSpec{PodCIDR: "10.244.3.0/24"}},
		// The same address twice is one member.
		node("d", nil, internal("192.168.50.11")),
	}
	got := Members(nodes, []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}, slog.New(slog.DiscardHandler))
	want := []netip.Prefix{
		netip.MustParsePrefix("10.96.0.0/12"),
		netip.MustParsePrefix("10.244.1.0/24"),
		netip.MustParsePrefix("10.244.3.0/24"),
		netip.MustParsePrefix("192.168.50.11/32"),
		netip.MustParsePrefix("192.168.50.12/32"),
		netip.MustParsePrefix("fd00:10:244:1::/64"),
		netip.MustParsePrefix("fd00:50::11/128"),
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Members\n got %v\nwant %v", got, want)
	}
}

func TestLeaseNames(t *testing.T) {
	for _, id := range []uint16{1, 42, 65535} {
		if got := leaseID(leaseName(id)); got != id {
			t.Errorf("leaseID(leaseName(%d)) = %d", id, got)
		}
	}
	for _, name := range []string{"node-id-0", "node-id-65536", "node-id-007", "node-id-", "node-id-1x", "other-1"} {
		if got := leaseID(name); got != 0 {
			t.Errorf("leaseID(%q) = %d, want 0 (no node id Lease)", name, got)
		}
	}
}

func TestParseKey(t *testing.T) {
	if k, err := ParseKey([]byte("000102030405060708090a0b0c0d0e0f\n")); err != nil || len(k) != datapath.KeySize || k[15] != 15 {
		t.Errorf("a good key: %x, %v", k, err)
	}
	for _, bad := range []string{"", "0001", "0123456789abcdef", strings.Repeat("zz", 16), strings.Repeat("00", 17)} {
		if _, err := ParseKey([]byte(bad)); err == nil {
			t.Errorf("ParseKey(%q): no error", bad)
		}
	}
}

func TestMakeTable(t *testing.T) {
	base := time.Unix(1700000000, 0)
	// Pods that claim eight long tags each (about 1.7 KiB a workload):
	// more than an annotation holds.
	tags := map[string]string{}
	for i := range 8 {
		tags[fmt.Sprintf("%c%s", 'a'+i, strings.Repeat("k", 62))] = strings.Repeat("v", 127)
	}
	var ws []datapath.Workload
	for i := range 200 {
		ws = append(ws, datapath.Workload{ID: uint32(10000 - i), Namespace: "ns", Pod: "p", PodTags: tags, Created: base.Add(time.Duration(i) * time.Second),
			HostIfName: "veth0", Netns: "/var/run/netns/x"})
	}
	tab, left := MakeTable("node-1", ws)
	b, err := json.Marshal(tab)
	if err != nil {
		t.Fatal(err)
	}
	if left == 0 || len(tab.Workloads)+left != len(ws) || len(b) > MaxTableBytes || len(b) < MaxTableBytes*9/10 {
		t.Fatalf("table of %d workloads, %d bytes (limit %d), %d left out", len(tab.Workloads), len(b), MaxTableBytes, left)
	}
	if tab.Node != "node-1" || tab.Version != TableVersion || strings.Contains(string(b), "veth0") || strings.Contains(string(b), "netns") {
		t.Errorf("table %s...: want node-1, version %d, nothing node-local", b[:200], TableVersion)
	}
	// Sorted by id, the oldest kept.
	if !slices.IsSortedFunc(tab.Workloads, func(a, b PublishedWorkload) int { return cmp.Compare(a.ID, b.ID) }) {
		t.Error("not sorted by id")
	}
	if tab.Workloads[len(tab.Workloads)-1].ID != 10000 {
		t.Errorf("the oldest workload (id 10000) left out")
	}
	// The same workloads in another order make the same table.
	slices.Reverse(ws)
	again, _ := MakeTable("node-1", ws)
	if !reflect.DeepEqual(tab, again) {
		t.Error("the table depends on the order of the workloads")
	}
}

// DetectUplinks in a namespace laid out like a node: the node's address
// on a bridge (standing for its NIC: this kernel has no dummy devices);
// another node reached over it and its pods over a VXLAN device; a third
// node's pods over a TUN device, which has no Ethernet headers; a Node
// whose "address" is a local pod's, routed to the pod's veth, which must
// never become an uplink; a node without a route, skipped.
func TestDetectUplinks(t *testing.T) {
	testutil.InNewNetns(t, func() {
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		lo, err := netlink.LinkByName("lo")
		must(err)
		must(netlink.LinkSetUp(lo))
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
		must(netlink.LinkAdd(br))
		must(netlink.AddrAdd(br, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(192, 168, 77, 1), Mask: net.CIDRMask(24, 32)}}))
		must(netlink.LinkSetUp(br))
		pod := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "pod0"}, PeerName: "pod0p"}
		must(netlink.LinkAdd(pod))
		for _, n := range []string{"pod0", "pod0p"} {
			l, err := netlink.LinkByName(n)
			must(err)
			must(netlink.LinkSetUp(l))
		}
		vx := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "vx0"}, VxlanId: 42, Port: 4789, VtepDevIndex: mustIndex(t, "br0")}
		must(netlink.LinkAdd(vx))
		must(netlink.LinkSetUp(vx))
		tun := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tun0"}, Mode: netlink.TUNTAP_MODE_TUN}
		must(netlink.LinkAdd(tun))
		must(netlink.LinkSetUp(tun))
		route := func(cidr, dev string) {
			_, dst, err := net.ParseCIDR(cidr)
			must(err)
			must(netlink.RouteAdd(&netlink.Route{Dst: dst, LinkIndex: mustIndex(t, dev)}))
		}
		route("10.250.2.0/24", "vx0")
		route("10.250.3.0/24", "tun0")
		route("10.250.1.5/32", "pod0") // a local pod, as ptp or Calico route it

		self := node("self", []string{"10.250.1.0/24"}, internal("192.168.77.1"))
		nodes := []*corev1.Node{
			self,
			node("b", []string{"10.250.2.0/24"}, internal("192.168.77.2")),
			node("c", []string{"10.250.3.0/24"}, internal("192.168.77.3")),
			node("claims-a-local-pod", nil, internal("10.250.1.5")),
			node("unreachable", []string{"10.250.9.0/24"}, internal("198.51.100.7")),
		}
		ups, refused, err := DetectUplinks(self, nodes)
		must(err)
		if want := []string{"br0", "vx0"}; !reflect.DeepEqual(ups, want) {
			t.Errorf("uplinks %v, want %v", ups, want)
		}
		if len(refused) != 2 || refused["tun0"] == nil || refused["pod0"] == nil {
			t.Errorf("refused %v, want tun0 (no Ethernet headers) and pod0 (a veth)", refused)
		}
	})
}

func mustIndex(t *testing.T, name string) int {
	t.Helper()
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}
