package plugin

import (
	"fmt"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// hostVeth finds the host side of the pod's interface: the veth peer of
// ifname inside the pod's netns, which must live in the plugin's own
// network namespace (the host's). The kernel answers, not the prevResult:
// the prevResult's host interfaces are what the primary plugin says, and
// an ifindex only means something inside one namespace, so a peer ifindex
// taken from the pod netns and looked up here could name an unrelated
// veth here whose index merely collides with a peer in a third namespace.
// Both ends are checked with netlink:
//
//   - in the pod netns, ifname is a veth whose peer's namespace
//     (IFLA_LINK_NETNSID) is the id the pod netns has for this one;
//   - here, the peer's ifindex (IFLA_LINK) names a veth whose own peer's
//     namespace is the pod netns and whose peer is ifname's ifindex.
//
// The prevResult is not needed for this; the parameter stays for the
// callers' sake.
func hostVeth(podNS ns.NetNS, ifname string, _ *current.Result) (netlink.Link, error) {
	self, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("open the plugin's own netns: %w", err)
	}
	defer self.Close()
	return vethPeerIn(self, netns.NsHandle(podNS.Fd()), podNS.Path(), ifname)
}

// vethPeerIn returns the link in netns host that is the veth peer of
// ifname in netns pod (podPath names it in errors), after checking the
// pairing from both sides.
func vethPeerIn(host, pod netns.NsHandle, podPath, ifname string) (netlink.Link, error) {
	if host.Equal(pod) {
		return nil, fmt.Errorf("netns %s is the plugin's own network namespace (%s), not a pod's", podPath, nsName(host))
	}
	podLink, err := podVethPeer(pod, podPath, ifname, host)
	if err != nil {
		return nil, err
	}
	return hostVethPeer(host, podLink.Attrs().ParentIndex, pod, podPath, podLink)
}

// podVethPeer checks, inside netns pod, that ifname is a veth whose peer
// lives in netns host, and returns it (ParentIndex is the peer's ifindex,
// meaningful in host only).
func podVethPeer(pod netns.NsHandle, podPath, ifname string, host netns.NsHandle) (netlink.Link, error) {
	hostName := nsName(host)
	ph, err := netlink.NewHandleAt(pod, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", podPath, err)
	}
	defer ph.Close()
	// Dumping the link first matters: filling in IFLA_LINK_NETNSID makes
	// the kernel assign the peer's netns an id in the pod netns if it had
	// none, so the question after it has a stable answer; an id that is
	// still unassigned (-1) then means "not this netns", never "equal".
	podLink, err := ph.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("interface %s in netns %s: %w", ifname, podPath, err)
	}
	pa := podLink.Attrs()
	if podLink.Type() != "veth" {
		return nil, fmt.Errorf("interface %s in netns %s is a %s, not a veth (pktmeta needs a veth-based primary CNI)", ifname, podPath, podLink.Type())
	}
	if pa.ParentIndex <= 0 {
		return nil, fmt.Errorf("veth %s in netns %s reports no peer", ifname, podPath)
	}
	peerNS := nsid(pa.NetNsID)
	hostInPod, err := ph.GetNetNsIdByFd(int(host))
	if err != nil {
		return nil, fmt.Errorf("id of netns %s as seen from netns %s: %w", hostName, podPath, err)
	}
	hostInPod = nsid(hostInPod)
	if peerNS < 0 || hostInPod < 0 || peerNS != hostInPod {
		where := fmt.Sprintf("the netns with id %d in the pod netns", peerNS)
		switch {
		case pa.NetNsID == -1: // no IFLA_LINK_NETNSID: both ends in one netns
			where = "netns " + podPath + " itself"
		case peerNS < 0:
			where = "a netns without an id in the pod netns"
		}
		return nil, fmt.Errorf("the veth peer of %s in netns %s (ifindex %d) lives in %s, not in the plugin's netns %s (%s in the pod netns); ifindex %d in %s is not this pod's",
			ifname, podPath, pa.ParentIndex, where, hostName, idString(hostInPod), pa.ParentIndex, hostName)
	}
	return podLink, nil
}

// hostVethPeer checks, inside netns host, that ifindex names a veth whose
// peer is podLink in netns pod, and returns it.
func hostVethPeer(host netns.NsHandle, ifindex int, pod netns.NsHandle, podPath string, podLink netlink.Link) (netlink.Link, error) {
	hostName := nsName(host)
	ifname := podLink.Attrs().Name
	hh, err := netlink.NewHandleAt(host, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %s: %w", hostName, err)
	}
	defer hh.Close()
	// The link first, then the id: see podVethPeer.
	hostLink, err := hh.LinkByIndex(ifindex)
	if err != nil {
		return nil, fmt.Errorf("the veth peer of %s in netns %s (ifindex %d) is not in netns %s: %w", ifname, podPath, ifindex, hostName, err)
	}
	ha := hostLink.Attrs()
	if hostLink.Type() != "veth" {
		return nil, fmt.Errorf("ifindex %d in netns %s is %s, a %s, not the veth peer of %s in netns %s", ifindex, hostName, ha.Name, hostLink.Type(), ifname, podPath)
	}
	linkNS := nsid(ha.NetNsID)
	podInHost, err := hh.GetNetNsIdByFd(int(pod))
	if err != nil {
		return nil, fmt.Errorf("id of netns %s as seen from netns %s: %w", podPath, hostName, err)
	}
	podInHost = nsid(podInHost)
	if linkNS < 0 || podInHost < 0 || linkNS != podInHost {
		return nil, fmt.Errorf("veth %s (ifindex %d) in netns %s has its peer in the netns with %s there, not in netns %s (%s there) where %s is",
			ha.Name, ifindex, hostName, idString(linkNS), podPath, idString(podInHost), ifname)
	}
	if ha.ParentIndex != podLink.Attrs().Index {
		return nil, fmt.Errorf("veth %s (ifindex %d) in netns %s is paired with ifindex %d in netns %s, not with %s (ifindex %d)",
			ha.Name, ifindex, hostName, ha.ParentIndex, podPath, ifname, podLink.Attrs().Index)
	}
	return hostLink, nil
}

// nsid reads a netns id from netlink: IFLA_LINK_NETNSID and NETNSA_NSID
// are signed 32-bit, vishvananda/netlink hands the first over as an
// unsigned value (an unassigned id, -1, arrives as 4294967295) and uses -1
// for "attribute absent" (the peer is in the link's own netns). Every
// negative result means "no id".
func nsid(v int) int { return int(int32(uint32(v))) }

func idString(id int) string {
	if id < 0 {
		return "no id"
	}
	return fmt.Sprintf("id %d", id)
}

// nsName names a netns the way /proc/<pid>/ns/net does: net:[inode].
func nsName(h netns.NsHandle) string {
	var st unix.Stat_t
	if err := unix.Fstat(int(h), &st); err != nil {
		return h.String()
	}
	return fmt.Sprintf("net:[%d]", st.Ino)
}
