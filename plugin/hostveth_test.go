package plugin

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// vethNode is a "host" netns (the test thread's, as the plugin's own netns
// is the plugin process's) and helpers to make more namespaces and links.
// Every namespace is anonymous: closing its last handle (at cleanup, also
// after a failure) removes it with every link in it.
type vethNode struct {
	t    *testing.T
	host netns.NsHandle
}

// withHost runs fn on a locked thread inside a fresh netns standing for
// the host.
func withHost(t *testing.T, fn func(n *vethNode)) {
	testutil.InNewNetns(t, func() {
		host, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer host.Close()
		fn(&vethNode{t: t, host: host})
	})
}

// newNetns makes another netns and leaves the thread in the host's.
func (n *vethNode) newNetns() netns.NsHandle {
	n.t.Helper()
	h, err := netns.New()
	if err != nil {
		n.t.Fatalf("new netns: %v", err)
	}
	n.t.Cleanup(func() { h.Close() })
	if err := netns.Set(n.host); err != nil {
		n.t.Fatalf("back to the host netns: %v", err)
	}
	return h
}

// veth creates name (with ifindex index, 0: any) in netns at, its peer
// peerName in netns peerAt.
func (n *vethNode) veth(at netns.NsHandle, name string, index int, peerAt netns.NsHandle, peerName string) {
	n.t.Helper()
	h, err := netlink.NewHandleAt(at)
	if err != nil {
		n.t.Fatal(err)
	}
	defer h.Close()
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name, Index: index}, PeerName: peerName, PeerNamespace: netlink.NsFd(peerAt)}
	if err := h.LinkAdd(v); err != nil {
		n.t.Fatalf("veth %s(%d)/%s: %v", name, index, peerName, err)
	}
}

func (n *vethNode) link(at netns.NsHandle, name string) netlink.Link {
	n.t.Helper()
	h, err := netlink.NewHandleAt(at)
	if err != nil {
		n.t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		n.t.Fatalf("link %s: %v", name, err)
	}
	return l
}

// cniNetns opens a netns handle the way cmdAdd does, by path.
func (n *vethNode) cniNetns(h netns.NsHandle) ns.NetNS {
	n.t.Helper()
	netNS, err := ns.GetNS(fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), int(h)))
	if err != nil {
		n.t.Fatal(err)
	}
	n.t.Cleanup(func() { netNS.Close() })
	return netNS
}

func wantErr(t *testing.T, err error, want ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("accepted, want an error naming %q", want)
	}
	t.Log(err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%q does not name %s", err, w)
		}
	}
}

func TestHostVeth(t *testing.T) {
	t.Run("peer here", func(t *testing.T) {
		withHost(t, func(n *vethNode) {
			pod := n.newNetns()
			n.veth(n.host, "vethpod1", 0, pod, "eth0")
			link, err := hostVeth(n.cniNetns(pod), "eth0", nil)
			if err != nil {
				t.Fatal(err)
			}
			want := n.link(n.host, "vethpod1")
			if link.Attrs().Name != "vethpod1" || link.Attrs().Index != want.Attrs().Index {
				t.Fatalf("got %s (%d), want vethpod1 (%d)", link.Attrs().Name, link.Attrs().Index, want.Attrs().Index)
			}
		})
	})

	// The pod's veth peer sits in a third netns with ifindex 4242; the
	// host has an unrelated veth with that same ifindex, itself paired
	// with another interface of the same pod, so both namespaces have ids
	// for each other and no "unassigned" shortcut decides the case.
	t.Run("peer in a third netns, colliding ifindex here", func(t *testing.T) {
		withHost(t, func(n *vethNode) {
			pod, third := n.newNetns(), n.newNetns()
			n.veth(third, "vethT", 4242, pod, "eth0")
			n.veth(n.host, "vethX", 4242, pod, "eth1")
			eth0 := n.link(pod, "eth0")
			n.link(pod, "eth1") // assigns the host's id in the pod netns
			if eth0.Attrs().ParentIndex != 4242 || n.link(n.host, "vethX").Attrs().Index != 4242 {
				t.Fatalf("no collision built: eth0's peer %d", eth0.Attrs().ParentIndex)
			}
			netNS := n.cniNetns(pod)
			_, err := hostVeth(netNS, "eth0", nil)
			wantErr(t, err, "eth0", netNS.Path(), "4242", "not in the plugin's netns", nsName(n.host))

			// The host side alone also refuses: vethX's peer is eth1.
			_, err = hostVethPeer(n.host, 4242, pod, netNS.Path(), eth0)
			wantErr(t, err, "vethX", "eth0", "paired with ifindex")
			// eth1 is vethX's peer, so the same call with it passes.
			if l, err := hostVethPeer(n.host, 4242, pod, netNS.Path(), n.link(pod, "eth1")); err != nil || l.Attrs().Name != "vethX" {
				t.Fatalf("%v %v", l, err)
			}
			// And a host veth whose peer is in the third netns.
			n.veth(n.host, "vethY", 0, third, "vethZ")
			y := n.link(n.host, "vethY")
			_, err = hostVethPeer(n.host, y.Attrs().Index, pod, netNS.Path(), eth0)
			wantErr(t, err, "vethY", "has its peer in the netns with id 1 there", netNS.Path())
		})
	})

	t.Run("not a veth", func(t *testing.T) {
		withHost(t, func(n *vethNode) {
			pod := n.newNetns()
			h, err := netlink.NewHandleAt(pod)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			// A bridge: dummy is a module this kernel may lack.
			if err := h.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}}); err != nil {
				t.Fatal(err)
			}
			netNS := n.cniNetns(pod)
			_, err = hostVeth(netNS, "eth0", nil)
			wantErr(t, err, "eth0", netNS.Path(), "bridge", "not a veth")
			_, err = hostVeth(netNS, "eth9", nil)
			wantErr(t, err, "eth9", netNS.Path())

			// A host-side ifindex that is no veth.
			n.veth(n.host, "vethpod1", 0, pod, "eth1")
			if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br7", Index: 777}}); err != nil {
				t.Fatal(err)
			}
			_, err = hostVethPeer(n.host, 777, pod, netNS.Path(), n.link(pod, "eth1"))
			wantErr(t, err, "777", "br7", "not the veth peer of eth1")
		})
	})

	t.Run("both ends in the pod netns", func(t *testing.T) {
		withHost(t, func(n *vethNode) {
			pod := n.newNetns()
			n.veth(pod, "eth0", 0, pod, "vethself")
			netNS := n.cniNetns(pod)
			_, err := hostVeth(netNS, "eth0", nil)
			wantErr(t, err, "eth0", "netns "+netNS.Path()+" itself")
		})
	})

	t.Run("pod netns is the host's", func(t *testing.T) {
		withHost(t, func(n *vethNode) {
			n.veth(n.host, "eth0", 0, n.host, "vethhost")
			_, err := hostVeth(n.cniNetns(n.host), "eth0", nil)
			wantErr(t, err, "the plugin's own network namespace")
		})
	})
}
