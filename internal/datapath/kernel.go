package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// MinKernel is the oldest Linux the datapath loads on. What sets it is
// bpf_for_each_map_elem (5.13), which the in-kernel sweep needs; BPF
// compare-and-exchange (5.12), which every claim on a record needs, and
// bpf_ktime_get_coarse_ns (5.11, also the first with BPF memory charged to
// memcg instead of RLIMIT_MEMLOCK) come before it. make test-kernels boots
// 5.10 to show the refusal; the oldest kernel it shows working is 5.15.
const MinKernel = "5.13"

// ErrKernelTooOld is returned by Open on a kernel older than MinKernel.
var ErrKernelTooOld = errors.New("kernel too old for the pktmeta datapath")

// KernelFeatures is what the running kernel lets the datapath do, probed
// by feature (never by version number) when the programs are loaded.
type KernelFeatures struct {
	// TCX: tcx links (6.6). Without them attach mode auto uses clsact +
	// cls_bpf, which is then the main path, not a fallback.
	TCX bool
	// ConntrackKfuncs: bpf_skb_ct_lookup and bpf_ct_release resolve, and
	// bpf_ct_opts reports the direction (5.19; the kfuncs alone came in
	// 5.18, where dir reads ORIGINAL for every packet), with nf_conntrack
	// built in or loaded. Without them the programs still load (the calls
	// are weak), but Service NAT is not resolved, closes seen at delivery
	// hooks are not verified and the sweep cannot ask conntrack.
	ConntrackKfuncs bool
	// Apps: a cgroup getsockopt program may call bpf_get_netns_cookie
	// (5.15), which the application interface's program needs to tell
	// which pod asks. Without it that program is not loaded; the rest of
	// the datapath is unaffected.
	Apps bool
	// AppsUDP: a cgroup recvmsg program may call bpf_sk_storage_get,
	// which the application interface needs to answer unconnected UDP
	// sockets (the source of the datagram recvmsg returned). Without it
	// those get ENOTCONN; connected sockets are answered as before.
	AppsUDP bool
}

// Missing lists, for status and logs, what the datapath goes without.
func (k KernelFeatures) Missing() []string {
	var m []string
	if !k.ConntrackKfuncs {
		m = append(m, "no conntrack kfuncs (bpf_skb_ct_lookup with bpf_ct_opts.dir: Linux 5.19, with nf_conntrack): Service NAT is not resolved, closes at the destination are not verified (unverifiedCloses), the sweep cannot ask conntrack")
	}
	if !k.Apps {
		m = append(m, "no bpf_get_netns_cookie for cgroup getsockopt programs (Linux 5.15): applications cannot ask their sockets who opened their connections (getsockopt SOL_PKTMETA is not answered)")
	} else if !k.AppsUDP {
		m = append(m, "no bpf_sk_storage_get for cgroup recvmsg programs: unconnected UDP sockets cannot ask who opened the flow of the datagram they received (ENOTCONN)")
	}
	return m
}

// haveAppsProgram reports whether the application interface's program can
// load: a getsockopt program that calls bpf_get_netns_cookie.
func haveAppsProgram() bool {
	return features.HaveProgramHelper(ebpf.CGroupSockopt, asm.FnGetNetnsCookie) == nil
}

// haveAppsUDPPrograms reports whether the recvmsg programs can load.
func haveAppsUDPPrograms() bool {
	return features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSkStorageGet) == nil
}

// requiredFeatures refuses a kernel the datapath cannot run on, naming
// what it lacks, before the verifier gets a chance to say it less clearly.
func requiredFeatures() error {
	for _, h := range []struct {
		fn    asm.BuiltinFunc
		what  string
		since string
	}{
		{asm.FnKtimeGetCoarseNs, "bpf_ktime_get_coarse_ns", "5.11"},
		{asm.FnForEachMapElem, "bpf_for_each_map_elem", "5.13"},
		{asm.FnRingbufReserve, "the BPF ring buffer", "5.8"},
	} {
		err := features.HaveProgramHelper(ebpf.SchedCLS, h.fn)
		if errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("%w: Linux %s lacks %s (Linux %s); pktmeta needs Linux %s or newer",
				ErrKernelTooOld, KernelRelease(), h.what, h.since, MinKernel)
		}
		if err != nil {
			return fmt.Errorf("probe for %s: %w", h.what, err)
		}
	}
	return nil
}

// probeConntrackKfuncs reports whether the conntrack kfuncs will resolve.
// On distribution kernels nf_conntrack is a module, often not loaded yet
// when the first pod starts; a weak kfunc that does not resolve at load
// stays unresolved in those programs. So the module is asked for first,
// the way any conntrack tool gets it: a ctnetlink request makes the
// kernel load nf_conntrack_netlink and with it nf_conntrack (no modprobe
// binary is needed in the caller's container).
func probeConntrackKfuncs(log *slog.Logger) bool {
	if _, err := os.Stat("/sys/module/nf_conntrack"); errors.Is(err, os.ErrNotExist) {
		if err := RequestConntrackModule(); err != nil {
			log.Warn("could not have the kernel load nf_conntrack", "err", err)
		}
	}
	for _, spec := range kernelBTF() {
		var fn *btf.Func
		var opts *btf.Struct
		if spec.TypeByName("bpf_skb_ct_lookup", &fn) != nil || spec.TypeByName("bpf_ct_opts", &opts) != nil {
			continue
		}
		// 5.18's bpf_ct_opts has no dir: every packet would look like
		// the original direction, and NAT would resolve the wrong way.
		for _, m := range opts.Members {
			if m.Name == "dir" {
				return true
			}
		}
		log.Warn("the conntrack kfuncs do not report the direction (Linux 5.18): not using them")
		return false
	}
	return false
}

// kernelBTF is the BTF the loader resolves kfuncs against: vmlinux's, and
// nf_conntrack's where it is a loaded module.
func kernelBTF() []*btf.Spec {
	var specs []*btf.Spec
	if spec, err := btf.LoadKernelSpec(); err == nil {
		specs = append(specs, spec)
	}
	if _, err := os.Stat("/sys/kernel/btf/nf_conntrack"); err == nil {
		if spec, err := btf.LoadKernelModuleSpec("nf_conntrack"); err == nil {
			specs = append(specs, spec)
		}
	}
	return specs
}

// RequestConntrackModule has the kernel load nf_conntrack where it is a
// module not loaded yet: a ctnetlink request (conntrack statistics, one
// small answer) to a kernel without ctnetlink makes nfnetlink load
// nf_conntrack_netlink, and with it nf_conntrack, before it answers. The
// kernel runs its own modprobe, so the caller's container needs none.
func RequestConntrackModule() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return fmt.Errorf("netfilter netlink socket: %w", err)
	}
	defer unix.Close(fd)
	const (
		nfnlSubsysCtnetlink = 1 // NFNL_SUBSYS_CTNETLINK
		ctGetStats          = 5 // IPCTNL_MSG_CT_GET_STATS
	)
	// nlmsghdr (16 bytes) + nfgenmsg (family, version, res_id).
	msg := make([]byte, unix.NLMSG_HDRLEN+4)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], nfnlSubsysCtnetlink<<8|ctGetStats)
	binary.NativeEndian.PutUint16(msg[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	msg[unix.NLMSG_HDRLEN] = unix.AF_UNSPEC
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("ctnetlink request: %w", err)
	}
	// The request is handled (the module loaded) before sendto returns;
	// the answer only says how.
	tv := unix.Timeval{Sec: 1}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	buf := make([]byte, 4096)
	_, _, _ = unix.Recvfrom(fd, buf, 0)
	return nil
}

// KernelRelease is the running kernel's release (uname -r).
func KernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "(unknown)"
	}
	return unix.ByteSliceToString(u.Release[:])
}
