package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Into the application. ProgGetsockopt, on a cgroup v2 directory (the
// node's cgroup v2 root, so every pod's sockets), answers
// getsockopt(fd, SOL_PKTMETA, PKTMETA_SO_ORIGIN) with the origin of the
// socket's connection (bpf/sockopt.h, bpf/include/pktmeta_origin.h). It
// answers a pod only about connections delivered to it or opened by it,
// which it tells by the network namespace: each workload's netns cookie is
// in the map pktmeta_wl_netns. ProgRecvmsg4/6 beside it remember, per
// unconnected UDP socket, the source of the datagram recvmsg returned;
// with the pod's addresses (pktmeta_ns_addrs, by netns cookie) that is
// the flow such a socket is answered about.
//
// Layout under the pin path:
//
//	apps/getsockopt   the cgroup links, one per appHooks entry
//	apps/recvmsg4
//	apps/recvmsg6

// The application interface's programs.
const (
	ProgGetsockopt = "getsockopt"
	ProgRecvmsg4   = "recvmsg4"
	ProgRecvmsg6   = "recvmsg6"
)

// appHook is one program of the application interface and the cgroup hook
// it runs on.
type appHook struct {
	prog   string // ProgGetsockopt, ...; also the link's pin name
	attach ebpf.AttachType
}

// appHooks: which program on which cgroup hook. Attach, upgrade, status
// and detach all walk this one table. The getsockopt program comes first:
// where it is, the interface is.
var appHooks = []appHook{
	{ProgGetsockopt, ebpf.AttachCGroupGetsockopt},
	{ProgRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg},
	{ProgRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg},
}

func (d *Datapath) appsDir() string { return filepath.Join(d.PinPath, "apps") }

func (d *Datapath) appLinkPath(prog string) string { return filepath.Join(d.appsDir(), prog) }

// AppsLinkPath is where the cgroup link of ProgGetsockopt is pinned.
func (d *Datapath) AppsLinkPath() string { return d.appLinkPath(ProgGetsockopt) }

// HaveSockoptErrno reports whether a getsockopt program may choose the
// errno the caller gets (Linux 5.18 came with bpf_set_retval, which is
// what is probed; the program itself writes ctx->retval). Without it an
// application gets the kernel's answer for an unknown level (EOPNOTSUPP,
// ENOPROTOOPT) where pktmeta would say ENOENT or ENOTCONN.
func HaveSockoptErrno() bool {
	return features.HaveProgramHelper(ebpf.CGroupSockopt, asm.FnSetRetval) == nil
}

// CgroupRoot finds the root of the cgroup v2 hierarchy in this mount
// namespace: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a
// hybrid one (cgroup v1 controllers, v2 beside them for systemd). A bind
// mount of a subtree is skipped. Inside a cgroup namespace the
// namespace's own cgroup looks like the root here, so a process in a
// container (the agent) must not use this: it uses CgroupRootAt on a
// mount of the host's cgroup filesystem instead.
func CgroupRoot() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find the cgroup v2 mount: %w", err)
	}
	defer f.Close()
	return cgroupRootIn(f)
}

func cgroupRootIn(f *os.File) (string, error) {
	sc := bufio.NewScanner(f)
	var found []string
	for sc.Scan() {
		// id parent major:minor root mountpoint options... - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		if fields[3] != "/" {
			continue
		}
		found = append(found, unescapeMountPath(fields[4]))
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	if len(found) == 0 {
		return "", errors.New("no cgroup v2 hierarchy is mounted here (a cgroup v1 only host, or a container without the host's cgroup mount): applications cannot ask their sockets")
	}
	// /sys/fs/cgroup first where the host has several mounts.
	for _, p := range found {
		if p == "/sys/fs/cgroup" || p == "/sys/fs/cgroup/unified" {
			return p, nil
		}
	}
	return found[0], nil
}

// CgroupRootAt finds the cgroup v2 root in a mount of the host's cgroup
// filesystem at dir (a container's view of the host's /sys/fs/cgroup):
// dir itself on a unified host, dir/unified on a hybrid one.
func CgroupRootAt(dir string) (string, error) {
	for _, p := range []string{dir, filepath.Join(dir, "unified")} {
		var st unix.Statfs_t
		if unix.Statfs(p, &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC {
			return p, nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 hierarchy at %s or %s/unified (a cgroup v1 only host?)", dir, dir)
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%3o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// AppsState is whether applications can ask their sockets.
type AppsState struct {
	Attached bool `json:"attached"`
	// UDP: the recvmsg programs are attached too, so unconnected UDP
	// sockets are answered.
	UDP bool `json:"udp"`
	// CgroupID is the id (inode) of the cgroup the programs are on.
	CgroupID uint64 `json:"cgroupId,omitempty"`
	// Current: every link runs this datapath's program.
	Current bool   `json:"current"`
	Problem string `json:"problem,omitempty"`
}

// Apps reports the application interface's attachment.
func (d *Datapath) Apps() AppsState {
	st := AppsState{Current: true}
	var problems []string
	udpLinks := 0
	for _, h := range appHooks {
		l, err := link.LoadPinnedLink(d.appLinkPath(h.prog), nil)
		if errors.Is(err, os.ErrNotExist) {
			if h.prog == ProgGetsockopt {
				st := AppsState{Problem: "not attached: applications get EOPNOTSUPP/ENOPROTOOPT from getsockopt(SOL_PKTMETA)"}
				for _, o := range appHooks {
					if _, err := os.Stat(d.appLinkPath(o.prog)); o.prog != ProgGetsockopt && err == nil {
						st.Problem += "; the " + o.prog + " link is left on without it (uninstall, or the next ADD, mends it)"
					}
				}
				return st
			}
			continue // off on this kernel, or applicationUDP false
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("open pinned link %s: %v", h.prog, err))
			st.Current = false
			continue
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			problems = append(problems, fmt.Sprintf("link info %s: %v", h.prog, err))
			st.Current = false
			continue
		}
		switch h.prog {
		case ProgGetsockopt:
			st.Attached = true
			if c := info.Cgroup(); c != nil {
				st.CgroupID = c.CgroupId
			}
		case ProgRecvmsg4, ProgRecvmsg6:
			udpLinks++
		}
		if !d.runs(h.prog, info.Program) {
			st.Current = false
			problems = append(problems, "the "+h.prog+" link runs another program than this datapath's")
		}
	}
	switch udpLinks {
	case 2:
		st.UDP = st.Attached
	case 1:
		st.Current = false
		problems = append(problems, "one recvmsg link of two (an interrupted attach: the next ADD or the agent completes it)")
	}
	st.Problem = strings.Join(problems, "; ")
	return st
}

// runs reports whether id is this datapath's program prog.
func (d *Datapath) runs(prog string, id ebpf.ProgramID) bool {
	p := d.Program(prog)
	if p == nil {
		return false
	}
	pi, err := p.Info()
	if err != nil {
		return false
	}
	have, _ := pi.ID()
	return have == id
}

// AttachApps puts the application interface's programs on the cgroup v2
// directory cgroupDir (CgroupRoot for the node) and pins the links; the
// recvmsg programs only with udp (they run on every unconnected UDP
// receive of the cgroup: without them such sockets get ENOTCONN), and
// without it their links are removed. Idempotent: a link already there on
// that cgroup is moved to this datapath's program if needed; links on
// another cgroup are replaced. Concurrent callers end with one link per
// hook.
func (d *Datapath) AttachApps(cgroupDir string, udp bool) error {
	if err := d.writable(); err != nil {
		return err
	}
	if d.Getsockopt == nil {
		return fmt.Errorf("program %s is not loaded", ProgGetsockopt)
	}
	var st unix.Stat_t
	if err := unix.Stat(cgroupDir, &st); err != nil {
		return fmt.Errorf("cgroup %s: %w", cgroupDir, err)
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(cgroupDir, &sfs); err != nil || sfs.Type != unix.CGROUP2_SUPER_MAGIC {
		return fmt.Errorf("%s is not a cgroup v2 directory", cgroupDir)
	}
	elsewhere, err := d.appLinksElsewhere(st.Ino)
	if err != nil {
		return err
	}
	if elsewhere {
		// Links on another cgroup (or a defunct one): replace them all,
		// so that the hooks never run on two cgroups.
		if err := d.detachApps(); err != nil {
			return fmt.Errorf("remove the application links on another cgroup: %w", err)
		}
	}
	if err := os.MkdirAll(d.appsDir(), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", d.appsDir(), err)
	}
	for _, h := range appHooks {
		var err error
		if h.prog == ProgGetsockopt || udp {
			err = d.attachApp(h, cgroupDir)
		} else {
			err = d.detachApp(h)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// appLinksElsewhere reports whether any pinned application link is on
// another cgroup than cgroupID, or on one that is gone.
func (d *Datapath) appLinksElsewhere(cgroupID uint64) (bool, error) {
	for _, h := range appHooks {
		l, err := link.LoadPinnedLink(d.appLinkPath(h.prog), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("open pinned application link %s: %w", h.prog, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != cgroupID {
			return true, nil
		}
	}
	return false, nil
}

// attachApp makes h's pinned link on cgroupDir run this datapath's
// program; a program this kernel cannot run leaves no link.
func (d *Datapath) attachApp(h appHook, cgroupDir string) error {
	path := d.appLinkPath(h.prog)
	prog := d.Program(h.prog)
	l, err := link.LoadPinnedLink(path, nil)
	switch {
	case err == nil:
		defer l.Close()
		if prog == nil {
			return d.detachApp(h) // left from a kernel that could run it
		}
		info, err := l.Info()
		if err == nil && d.runs(h.prog, info.Program) {
			return nil // the common case: every ADD after the first
		}
		if err := l.Update(prog); err != nil {
			return fmt.Errorf("move the application link %s to this datapath's program: %w", h.prog, err)
		}
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("open pinned application link %s: %w", h.prog, err)
	case prog == nil:
		return nil
	}
	if h.prog != ProgGetsockopt {
		// Before: what an earlier attachment remembered is stale.
		if err := d.bumpUDPPeerGen(); err != nil {
			return err
		}
	}
	l, err = link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: h.attach, Program: prog})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", h.prog, cgroupDir, err)
	}
	defer l.Close()
	if err := l.Pin(path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil // another ADD was first; closing ours detaches it
		}
		return fmt.Errorf("pin application link %s: %w", h.prog, err)
	}
	return nil
}

// dropApp removes the pinned program prog and its link: for a program
// this load left out, so that an older load's copy does not run on.
func (d *Datapath) dropApp(prog string) {
	os.Remove(filepath.Join(d.progsDir(), prog))
	for _, h := range appHooks {
		if h.prog == prog {
			if err := d.detachApp(h); err != nil {
				d.log.Warn("remove the link of a program not loaded", "prog", prog, "err", err)
			}
		}
	}
}

// DetachApps takes the application interface's programs off their cgroup.
func (d *Datapath) DetachApps() error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.detachApps()
}

func (d *Datapath) detachApps() error {
	var errs []error
	for _, h := range appHooks {
		errs = append(errs, d.detachApp(h))
	}
	os.Remove(d.appsDir())
	return errors.Join(errs...)
}

func (d *Datapath) detachApp(h appHook) error {
	path := d.appLinkPath(h.prog)
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		// Not a link we can open: removing the pin is all there is.
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("remove application link %s: %w", h.prog, rerr)
		}
	} else {
		defer l.Close()
		if err := l.Unpin(); err != nil {
			return fmt.Errorf("remove application link %s: %w", h.prog, err)
		}
		// Now, not when the kernel's deferred release of the last
		// reference gets to it: whoever removes pktmeta sees the program
		// gone at once.
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("detach application link %s: %w", h.prog, err)
		}
	}
	if h.prog != ProgGetsockopt {
		// After: the datagrams from now on go unseen.
		return d.bumpUDPPeerGen()
	}
	return nil
}

// bumpUDPPeerGen moves the generation of the recvmsg programs'
// attachment (pktmeta_udp_peer_gen): every peer a socket remembers from
// before is stale, and the socket gets ENOTCONN until it receives again.
func (d *Datapath) bumpUDPPeerGen() error {
	if d.UDPPeerGenMap == nil {
		return nil
	}
	var gen uint32
	if err := d.UDPPeerGenMap.Lookup(uint32(0), &gen); err != nil {
		return fmt.Errorf("read the recvmsg programs' generation: %w", err)
	}
	if err := d.UDPPeerGenMap.Update(uint32(0), gen+1, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("move the recvmsg programs' generation: %w", err)
	}
	return nil
}

// upgradeApps moves the application links to the freshly loaded programs;
// links for programs the older release did not have come with the next
// AttachApps (the ADD, the agent's start).
func (d *Datapath) upgradeApps() {
	for _, h := range appHooks {
		prog := d.Program(h.prog)
		if prog == nil {
			continue
		}
		l, err := link.LoadPinnedLink(d.appLinkPath(h.prog), nil)
		if err != nil {
			continue
		}
		if err := l.Update(prog); err != nil {
			d.log.Warn("upgrade application link", "prog", h.prog, "err", err)
		}
		l.Close()
	}
}

// putWorkloadNetns records which network namespace w's pod is in, for the
// application interface; without it (cookie 0) the pod's sockets get
// ENOENT.
func (d *Datapath) putWorkloadNetns(id uint32, cookie uint64) error {
	if d.WorkloadNetnsMap == nil {
		return nil
	}
	if cookie == 0 {
		// Unknown: no entry, not one an earlier workload of this id left.
		d.deleteWorkloadNetns(id)
		return nil
	}
	if err := d.WorkloadNetnsMap.Update(id, cookie, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("store workload netns: %w", err)
	}
	return nil
}

// deleteWorkloadNetns forgets workload id's netns, and its addresses there.
func (d *Datapath) deleteWorkloadNetns(id uint32) {
	if d.WorkloadNetnsMap == nil {
		return
	}
	var cookie uint64
	if d.WorkloadNetnsMap.Lookup(id, &cookie) != nil {
		return
	}
	d.WorkloadNetnsMap.Delete(id)
	d.syncNetnsAddrs(cookie)
}

// netnsAddrsTruncated is PKTMETA_NETNS_F_TRUNCATED: the netns has more
// pod addresses than pktmeta_ns_addrs holds.
const netnsAddrsTruncated = 1

// syncNetnsAddrs rewrites the addresses the application interface knows
// for the netns cookie from the workloads in it (an unconnected UDP socket
// bound to the wildcard is asked about the datagram's flow to one of
// these): after a workload of that netns comes or goes.
func (d *Datapath) syncNetnsAddrs(cookie uint64) {
	if d.NetnsAddrsMap == nil || d.WorkloadNetnsMap == nil || cookie == 0 {
		return
	}
	want, err := d.wantedNetnsAddrs(cookie)
	if err != nil {
		d.log.Warn("read workload netns entries", "err", err)
		return
	}
	raw, ok := want[cookie]
	if !ok {
		d.NetnsAddrsMap.Delete(cookie)
		return
	}
	if raw.Flags&netnsAddrsTruncated != 0 {
		// Here, where the entry is written, not in every GC's comparison.
		d.log.Warn("more pod addresses in one netns than fit: its unconnected UDP sockets bound to the wildcard get ENOENT", "netns", cookie, "max", len(raw.Addrs))
	}
	if err := d.NetnsAddrsMap.Update(cookie, &raw, ebpf.UpdateAny); err != nil {
		d.log.Warn("store the pod addresses of a netns: its unconnected UDP sockets get ENOENT", "netns", cookie, "err", err)
	}
}

// wantedNetnsAddrs computes, from the workloads' netns entries and
// endpoints, the pod addresses of the netns cookie only, or of every
// netns (only 0), as pktmeta_ns_addrs should hold them.
func (d *Datapath) wantedNetnsAddrs(only uint64) (map[uint64]bpfPktmetaNetnsAddrs, error) {
	var (
		id     uint32
		cookie uint64
	)
	addrs := map[uint64][]netip.Addr{}
	it := d.WorkloadNetnsMap.Iterate()
	for it.Next(&id, &cookie) {
		if only != 0 && cookie != only {
			continue
		}
		w, ok, err := d.Workload(id)
		if err != nil {
			d.log.Warn("read a workload of a netns", "workload", id, "err", err)
		}
		if !ok {
			continue
		}
		ep, ok, err := d.Endpoint(w.HostIfindex)
		if err != nil {
			d.log.Warn("read an endpoint of a netns", "workload", id, "ifindex", w.HostIfindex, "err", err)
		}
		if !ok || ep.Workload != id {
			continue
		}
		for _, a := range ep.Addrs {
			if !slices.Contains(addrs[cookie], a) {
				addrs[cookie] = append(addrs[cookie], a)
			}
		}
	}
	if err := it.Err(); err != nil {
		return nil, err
	}
	want := make(map[uint64]bpfPktmetaNetnsAddrs, len(addrs))
	for c, as := range addrs {
		// One order whatever the map's iteration order: IPv4 first, then
		// by address, so that which ones are kept past the limit does not
		// change from one sync to the next.
		slices.SortFunc(as, netip.Addr.Compare)
		var raw bpfPktmetaNetnsAddrs
		if len(as) > len(raw.Addrs) {
			// Flagged: the program then answers no wildcard socket of
			// this netns, rather than maybe about the wrong address.
			as = as[:len(raw.Addrs)]
			raw.Flags |= netnsAddrsTruncated
		}
		for i, a := range as {
			raw.Addrs[i] = a.As16() // IPv4 as IPv4-mapped, as the records keep it
		}
		raw.N_addrs = uint32(len(as))
		want[c] = raw
	}
	return want, nil
}

// backfillWorkloadNetns gives the workloads of an older release, which
// had no netns entries, theirs (an upgrade): from their netns path, as
// long as the pod lives. Then every netns's addresses are reconciled with
// the workloads (written where missing or different, removed where no
// workload is).
func (d *Datapath) backfillWorkloadNetns() {
	ws, err := d.Workloads()
	if err != nil {
		d.log.Warn("read workloads for their netns entries", "err", err)
		return
	}
	for _, w := range ws {
		var have uint64
		if d.WorkloadNetnsMap.Lookup(w.ID, &have) == nil {
			continue
		}
		if w.Netns == "" {
			continue
		}
		cookie, err := NetnsCookieOf(w.Netns)
		if err != nil {
			d.log.Warn("no netns cookie for a workload: its pod's sockets cannot be asked", "workload", w.ID, "netns", w.Netns, "err", err)
			continue
		}
		if err := d.putWorkloadNetns(w.ID, cookie); err != nil {
			d.log.Warn("store workload netns", "workload", w.ID, "err", err)
		}
	}
	d.reconcileNetnsAddrs()
}

// reconcileNetnsAddrs brings pktmeta_ns_addrs in line with the
// workloads: it removes the entries of netns no workload is in (what a
// crash between a workload's removal and its netns's sync left) and
// rewrites entries that differ (a sync that lost a race with another,
// e.g. garbage collection's with an ADD). Each netns found wrong is
// synced afresh rather than written from this pass's view, which narrows
// that race (two syncs may still interleave; the next pass mends it).
// It returns how many entries it rewrote or removed.
func (d *Datapath) reconcileNetnsAddrs() int {
	if d.NetnsAddrsMap == nil || d.WorkloadNetnsMap == nil {
		return 0
	}
	want, err := d.wantedNetnsAddrs(0)
	if err != nil {
		d.log.Warn("read workload netns entries", "err", err)
		return 0
	}
	var (
		cookie uint64
		raw    bpfPktmetaNetnsAddrs
		wrong  []uint64
	)
	have := map[uint64]bool{}
	it := d.NetnsAddrsMap.Iterate()
	for it.Next(&cookie, &raw) {
		have[cookie] = true
		if w, ok := want[cookie]; !ok || w != raw {
			wrong = append(wrong, cookie)
		}
	}
	if err := it.Err(); err != nil {
		d.log.Warn("read netns addresses", "err", err)
	}
	for c := range want {
		if !have[c] {
			wrong = append(wrong, c)
		}
	}
	for _, c := range wrong {
		d.syncNetnsAddrs(c)
	}
	return len(wrong)
}

// CurrentNetnsCookie returns the cookie of the calling thread's network
// namespace (SO_NETNS_COOKIE, Linux 5.14), the id BPF programs see.
func CurrentNetnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket for the netns cookie: %w", err)
	}
	defer unix.Close(fd)
	var cookie uint64
	l := uint32(unsafe.Sizeof(cookie))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_NETNS_COOKIE,
		uintptr(unsafe.Pointer(&cookie)), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0, fmt.Errorf("getsockopt SO_NETNS_COOKIE: %w", errno)
	}
	return cookie, nil
}

// NetnsCookieOf returns the cookie of the network namespace at path.
func NetnsCookieOf(path string) (uint64, error) {
	var cookie uint64
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		var err error
		cookie, err = CurrentNetnsCookie()
		return err
	})
	return cookie, err
}

// CgroupAppPrograms lists, per application hook (ProgGetsockopt,
// ProgRecvmsg4, ProgRecvmsg6), the ids of the programs attached to the
// cgroup v2 directory cgroupDir on that hook, pktmeta's and anyone else's.
func CgroupAppPrograms(cgroupDir string) (map[string][]ebpf.ProgramID, error) {
	f, err := os.Open(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer f.Close()
	progs := map[string][]ebpf.ProgramID{}
	for _, h := range appHooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: h.attach})
		if err != nil {
			return nil, fmt.Errorf("query %s programs of %s: %w", h.prog, cgroupDir, err)
		}
		for _, p := range res.Programs {
			progs[h.prog] = append(progs[h.prog], p.ID)
		}
	}
	return progs, nil
}
