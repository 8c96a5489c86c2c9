// Package discover finds pod interfaces on a node that have no pktmeta
// attachment: pods that existed before pktmeta was installed, or that were
// created while another writer had dropped pktmeta from the CNI chain. It
// works from the host side, the way the CNI plugin does: a veth in the host
// network namespace whose peer lives in another namespace is a pod's.
package discover

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PodInterface is one pod veth as seen from both of its ends.
type PodInterface struct {
	HostIfName  string
	HostIfindex int
	NetnsPath   string // a path that opens the pod's network namespace
	NetnsIno    uint64
	IfName      string // the peer's name inside the pod (eth0)
	Addrs       []netip.Addr
}

// Options says where to look for pod network namespaces.
type Options struct {
	// NetnsDirs hold bind-mounted namespaces (containerd and CRI-O use
	// /var/run/netns).
	NetnsDirs []string
	// ProcDir, when set, is a procfs whose /<pid>/ns/net files are also
	// candidates (runtimes that do not bind-mount namespaces). Opening other
	// processes' namespace files needs CAP_SYS_PTRACE.
	ProcDir string
}

// Veths lists pod veths in the calling thread's network namespace whose
// peer namespace can be found and opened. skip says which host ifindexes
// are already attached.
func Veths(opts Options, skip func(ifindex int) bool) ([]PodInterface, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	var candidates []netlink.Link
	for _, l := range links {
		a := l.Attrs()
		// A veth whose peer is in another namespace carries that
		// namespace's id (IFLA_LINK_NETNSID); pod veths always do.
		if l.Type() != "veth" || a.NetNsID < 0 || uint32(a.NetNsID) == math.MaxUint32 || a.ParentIndex <= 0 || skip(a.Index) {
			continue
		}
		candidates = append(candidates, l)
	}
	if len(candidates) == 0 {
		return nil, nil
	}
	byID, err := namespacesByID(opts)
	if err != nil {
		return nil, err
	}
	var out []PodInterface
	for _, l := range candidates {
		a := l.Attrs()
		nsPath, ok := byID[a.NetNsID]
		if !ok {
			continue // a namespace we cannot open: not a pod we can vouch for
		}
		pi := PodInterface{HostIfName: a.Name, HostIfindex: a.Index, NetnsPath: nsPath}
		if err := peerInfo(&pi, a.ParentIndex); err != nil {
			continue // the pod went away meanwhile
		}
		out = append(out, pi)
	}
	return out, nil
}

// namespacesByID maps the namespace ids the host netns assigned (what a
// veth reports as its peer's IFLA_LINK_NETNSID) to openable paths.
func namespacesByID(opts Options) (map[int]string, error) {
	var paths []string
	for _, dir := range opts.NetnsDirs {
		entries, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", dir, err)
		}
		for _, e := range entries {
			paths = append(paths, filepath.Join(dir, e.Name()))
		}
	}
	if opts.ProcDir != "" {
		entries, _ := os.ReadDir(opts.ProcDir)
		for _, e := range entries {
			if _, err := strconv.Atoi(e.Name()); err == nil {
				paths = append(paths, filepath.Join(opts.ProcDir, e.Name(), "ns", "net"))
			}
		}
	}
	out := map[int]string{}
	seen := map[uint64]bool{}
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Fstat(int(f.Fd()), &st) == nil && !seen[st.Ino] {
			seen[st.Ino] = true
			// Not a namespace file (or not bind-mounted): no id.
			if id, err := netlink.GetNetNsIdByFd(int(f.Fd())); err == nil && id >= 0 {
				out[id] = p
			}
		}
		f.Close()
	}
	return out, nil
}

// peerInfo reads the pod side of the veth: its name and addresses.
func peerInfo(pi *PodInterface, peerIndex int) error {
	return ns.WithNetNSPath(pi.NetnsPath, func(ns.NetNS) error {
		var st unix.Stat_t
		if err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &st); err == nil {
			pi.NetnsIno = st.Ino
		}
		l, err := netlink.LinkByIndex(peerIndex)
		if err != nil {
			return fmt.Errorf("peer ifindex %d: %w", peerIndex, err)
		}
		pi.IfName = l.Attrs().Name
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", pi.IfName, err)
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok || ip.IsLinkLocalUnicast() {
				continue
			}
			pi.Addrs = append(pi.Addrs, ip.Unmap())
		}
		return nil
	})
}
