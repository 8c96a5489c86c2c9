package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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
// in the map pktmeta_wl_netns.
//
// Layout under the pin path:
//
//	apps/getsockopt   the cgroup link

// ProgGetsockopt is the application interface's program.
const ProgGetsockopt = "getsockopt"

func (d *Datapath) appsDir() string { return filepath.Join(d.PinPath, "apps") }

// AppsLinkPath is where the cgroup link of ProgGetsockopt is pinned.
func (d *Datapath) AppsLinkPath() string { return filepath.Join(d.appsDir(), "getsockopt") }

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
	// CgroupID is the id (inode) of the cgroup the program is on.
	CgroupID uint64 `json:"cgroupId,omitempty"`
	// Current: the link runs this datapath's program.
	Current bool   `json:"current"`
	Problem string `json:"problem,omitempty"`
}

// Apps reports the application interface's attachment.
func (d *Datapath) Apps() AppsState {
	l, err := link.LoadPinnedLink(d.AppsLinkPath(), nil)
	if errors.Is(err, os.ErrNotExist) {
		return AppsState{Problem: "not attached: applications get EOPNOTSUPP/ENOPROTOOPT from getsockopt(SOL_PKTMETA)"}
	}
	if err != nil {
		return AppsState{Problem: fmt.Sprintf("open pinned link: %v", err)}
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return AppsState{Problem: fmt.Sprintf("link info: %v", err)}
	}
	st := AppsState{Attached: true}
	if c := info.Cgroup(); c != nil {
		st.CgroupID = c.CgroupId
	}
	if d.Getsockopt != nil {
		if pi, err := d.Getsockopt.Info(); err == nil {
			id, _ := pi.ID()
			st.Current = id == info.Program
		}
	}
	if !st.Current {
		st.Problem = "the link runs another program than this datapath's"
	}
	return st
}

// AttachApps puts ProgGetsockopt on the cgroup v2 directory cgroupDir
// (CgroupRoot for the node) and pins the link. Idempotent: a link already
// there on that cgroup is moved to this datapath's program if needed; one
// on another cgroup is replaced. Concurrent callers end with one link.
func (d *Datapath) AttachApps(cgroupDir string) error {
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
	path := d.AppsLinkPath()
	if l, err := link.LoadPinnedLink(path, nil); err == nil {
		defer l.Close()
		info, err := l.Info()
		if err == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == st.Ino {
			if pi, err := d.Getsockopt.Info(); err == nil {
				if id, _ := pi.ID(); id == info.Program {
					return nil // the common case: every ADD after the first
				}
			}
			if err := l.Update(d.Getsockopt); err != nil {
				return fmt.Errorf("move the application link to this datapath's program: %w", err)
			}
			return nil
		}
		// A link on another cgroup (or a defunct one): replace it.
		if err := d.detachApps(); err != nil {
			return fmt.Errorf("remove the application link on another cgroup: %w", err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open pinned application link: %w", err)
	}
	if err := os.MkdirAll(d.appsDir(), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", d.appsDir(), err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupDir, Attach: ebpf.AttachCGroupGetsockopt, Program: d.Getsockopt})
	if err != nil {
		return fmt.Errorf("attach %s to cgroup %s: %w", ProgGetsockopt, cgroupDir, err)
	}
	defer l.Close()
	if err := l.Pin(path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil // another ADD was first; closing ours detaches it
		}
		return fmt.Errorf("pin application link: %w", err)
	}
	return nil
}

// DetachApps takes ProgGetsockopt off its cgroup.
func (d *Datapath) DetachApps() error {
	if err := d.writable(); err != nil {
		return err
	}
	return d.detachApps()
}

func (d *Datapath) detachApps() error {
	path := d.AppsLinkPath()
	l, err := link.LoadPinnedLink(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		os.Remove(d.appsDir())
		return nil
	}
	if err != nil {
		// Not a link we can open: removing the pin is all there is.
		if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fmt.Errorf("remove application link: %w", rerr)
		}
		os.Remove(d.appsDir())
		return nil
	}
	defer l.Close()
	if err := l.Unpin(); err != nil {
		return fmt.Errorf("remove application link: %w", err)
	}
	os.Remove(d.appsDir())
	// Now, not when the kernel's deferred release of the last reference
	// gets to it: whoever removes pktmeta sees the program gone at once.
	if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		return fmt.Errorf("detach application link: %w", err)
	}
	return nil
}

// upgradeApps moves the application link to the freshly loaded program.
func (d *Datapath) upgradeApps() {
	l, err := link.LoadPinnedLink(d.AppsLinkPath(), nil)
	if err != nil {
		return
	}
	defer l.Close()
	if err := l.Update(d.Getsockopt); err != nil {
		d.log.Warn("upgrade application link", "err", err)
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

func (d *Datapath) deleteWorkloadNetns(id uint32) {
	if d.WorkloadNetnsMap != nil {
		d.WorkloadNetnsMap.Delete(id)
	}
}

// backfillWorkloadNetns gives the workloads of an older release, which
// had no netns entries, theirs (an upgrade): from their netns path, as
// long as the pod lives.
func (d *Datapath) backfillWorkloadNetns() {
	ws, err := d.Workloads()
	if err != nil {
		return
	}
	for _, w := range ws {
		var have uint64
		if d.WorkloadNetnsMap.Lookup(w.ID, &have) == nil || w.Netns == "" {
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

// GetsockoptPrograms lists the ids of the getsockopt programs attached
// to the cgroup v2 directory cgroupDir, pktmeta's and anyone else's.
func GetsockoptPrograms(cgroupDir string) ([]ebpf.ProgramID, error) {
	f, err := os.Open(cgroupDir)
	if err != nil {
		return nil, fmt.Errorf("open cgroup: %w", err)
	}
	defer f.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachCGroupGetsockopt})
	if err != nil {
		return nil, fmt.Errorf("query getsockopt programs of %s: %w", cgroupDir, err)
	}
	var ids []ebpf.ProgramID
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids, nil
}
