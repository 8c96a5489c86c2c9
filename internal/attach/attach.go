// Package attach puts pktmeta's programs on a network interface's TC hooks
// and takes them off again, as a good neighbour: with tcx (Linux >= 6.6)
// appended after whatever is there and pinned so the attachment outlives
// the process; otherwise with clsact and direct-action cls_bpf filters that
// carry our own priority, handle and name, so that we never touch a qdisc or
// filter that is not ours.
package attach

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Mode selects the attach mechanism.
type Mode string

const (
	// Auto uses tcx when the kernel has it and falls back to Legacy.
	Auto Mode = "auto"
	// TCX requires tcx links and fails on kernels without them.
	TCX Mode = "tcx"
	// Legacy uses clsact + direct-action cls_bpf, even where tcx exists.
	Legacy Mode = "legacy"
)

// ParseMode validates a mode name.
func ParseMode(s string) (Mode, error) {
	switch Mode(s) {
	case "":
		return Auto, nil
	case Auto, TCX, Legacy:
		return Mode(s), nil
	}
	return "", fmt.Errorf("unknown attach mode %q (want auto, tcx or legacy)", s)
}

// Hook is one direction of an interface's TC layer.
type Hook string

const (
	Ingress Hook = "ingress" // packets the interface receives: from the pod, on a host veth
	Egress  Hook = "egress"  // packets the interface sends: to the pod
)

// Legacy filters are recognised by all three of these. The priority is low
// (early) because a filter before ours that ends classification hides
// packets from us, while ours always lets the next one run.
const (
	FilterPriority = 16
	FilterHandle   = 0x706d
	FilterPrefix   = "pktmeta_"
)

// ErrNoTCX is returned for Mode TCX on a kernel without tcx links.
var ErrNoTCX = errors.New("kernel has no tcx links (Linux >= 6.6); use attach mode auto or legacy")

// Programs to put on the two hooks.
type Programs struct {
	Ingress *ebpf.Program
	Egress  *ebpf.Program
	// IngressFirst puts the ingress program before the interface's other
	// tcx programs instead of after them: an uplink's must see arriving
	// packets before a program that redirects them (a BPF CNI on the NIC).
	IngressFirst bool
}

// Result says how an interface was attached.
type Result struct {
	Mode Mode // TCX or Legacy
	// NoEgress: legacy mode beside an `ingress` qdisc (e.g. the bandwidth
	// plugin's). clsact cannot be added next to it, so only the ingress
	// filter could be attached.
	NoEgress bool
}

// Attach puts progs on ifindex. For tcx, links are pinned in linkDir as
// "ingress" and "egress". On error nothing stays attached or pinned.
func Attach(ifindex int, progs Programs, mode Mode, linkDir string) (Result, error) {
	switch mode {
	case Auto, TCX:
		err := attachTCXFunc(ifindex, progs, linkDir)
		if err == nil {
			return Result{Mode: TCX}, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return Result{}, err
		}
		if mode == TCX {
			return Result{}, fmt.Errorf("attach to ifindex %d: %w", ifindex, ErrNoTCX)
		}
		fallthrough
	case Legacy:
		noEgress, err := attachLegacy(ifindex, progs)
		if err != nil {
			return Result{}, err
		}
		return Result{Mode: Legacy, NoEgress: noEgress}, nil
	}
	return Result{}, fmt.Errorf("unknown attach mode %q", mode)
}

// attachTCXFunc is attachTCX; tests swap it to play a kernel without tcx.
var attachTCXFunc = attachTCX

// HaveTCX reports whether the kernel has tcx links (Linux 6.6): a trivial
// program attached to an ifindex no device has fails with ENODEV where tcx
// exists and is not supported where it does not. Only a definite answer
// is kept; one the probe could not give (no program could be loaded) is
// "yes", so that callers go on to ask the kernel themselves rather than
// take a failure for a kernel without tcx.
func HaveTCX() bool {
	haveTCX.Lock()
	defer haveTCX.Unlock()
	if haveTCX.known {
		return haveTCX.have
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SchedCLS,
		License:      "Dual BSD/GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return true
	}
	defer prog.Close()
	l, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err == nil {
		l.Close()
	}
	haveTCX.known, haveTCX.have = true, !errors.Is(err, ebpf.ErrNotSupported)
	return haveTCX.have
}

var haveTCX struct {
	sync.Mutex
	known, have bool
}

func linkPath(linkDir string, h Hook) string { return filepath.Join(linkDir, string(h)) }

func attachTCX(ifindex int, progs Programs, linkDir string) (err error) {
	if err := os.MkdirAll(linkDir, 0o700); err != nil {
		return fmt.Errorf("create link directory: %w", err)
	}
	var pinned []link.Link
	defer func() {
		if err == nil {
			return
		}
		for _, l := range pinned {
			l.Unpin()
			l.Close()
		}
		removeEmptyDirs(linkDir)
	}()
	for _, h := range []struct {
		hook Hook
		typ  ebpf.AttachType
		prog *ebpf.Program
	}{{Ingress, ebpf.AttachTCXIngress, progs.Ingress}, {Egress, ebpf.AttachTCXEgress, progs.Egress}} {
		anchor := link.Tail()
		if h.hook == Ingress && progs.IngressFirst {
			anchor = link.Head()
		}
		l, err := link.AttachTCX(link.TCXOptions{
			Interface: ifindex,
			Program:   h.prog,
			Attach:    h.typ,
			Anchor:    anchor,
		})
		if err != nil {
			return fmt.Errorf("attach tcx %s to ifindex %d: %w", h.hook, ifindex, err)
		}
		if err := pinReplacing(l, linkPath(linkDir, h.hook)); err != nil {
			l.Close()
			return err
		}
		pinned = append(pinned, l)
	}
	for _, l := range pinned {
		l.Close() // the pin holds the link now
	}
	return nil
}

// pinReplacing pins l at path. A pin left there by an earlier attachment of
// the same (container, ifname) — a retried ADD — is detached first.
func pinReplacing(l link.Link, path string) error {
	if old, err := link.LoadPinnedLink(path, nil); err == nil {
		old.Unpin()
		old.Close()
	}
	if err := l.Pin(path); err != nil {
		return fmt.Errorf("pin link %s: %w", path, err)
	}
	return nil
}

// Detach removes what Attach put on ifindex: the pinned tcx links in
// linkDir and our legacy filters. Missing links, a gone interface and a
// second call are not errors.
func Detach(ifindex int, linkDir string) error {
	var errs []error
	for _, h := range []Hook{Ingress, Egress} {
		if linkDir == "" {
			break
		}
		p := linkPath(linkDir, h)
		l, err := link.LoadPinnedLink(p, nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			// Not a link we can load: drop the pin so nothing leaks.
			if rmErr := os.Remove(p); rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("remove pin %s: %w (load: %v)", p, rmErr, err))
			}
			continue
		}
		// Unpinning drops the last reference; the kernel detaches the link.
		if err := l.Unpin(); err != nil {
			errs = append(errs, fmt.Errorf("unpin %s: %w", p, err))
		}
		l.Close()
	}
	if linkDir != "" {
		removeEmptyDirs(linkDir)
	}
	if ifindex > 0 {
		if err := detachLegacy(ifindex); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeEmptyDirs removes linkDir and its parent if they are empty.
func removeEmptyDirs(linkDir string) {
	if os.Remove(linkDir) == nil {
		os.Remove(filepath.Dir(linkDir))
	}
}

// Update atomically replaces the program of an attachment: tcx link update
// or legacy filter replace. No packet sees the hook without a program.
func Update(ifindex int, linkDir string, h Hook, legacy bool, prog *ebpf.Program) error {
	if legacy {
		return replaceFilter(ifindex, h, prog, false)
	}
	p := linkPath(linkDir, h)
	l, err := link.LoadPinnedLink(p, nil)
	if err != nil {
		return fmt.Errorf("load link %s: %w", p, err)
	}
	defer l.Close()
	if err := l.Update(prog); err != nil {
		return fmt.Errorf("update link %s: %w", p, err)
	}
	return nil
}

// Attached is what is on an interface's hooks right now.
type Attached struct {
	// Program IDs on each hook, in run order, ours or not.
	TCX map[Hook][]ebpf.ProgramID
	// Our legacy filters' program IDs per hook.
	Legacy map[Hook]ebpf.ProgramID
	// Priorities of foreign filters that run before our legacy filter. One
	// that ends classification (the bandwidth plugin's redirect to its ifb
	// does) hides packets from us.
	ForeignBefore map[Hook][]uint16
}

// Query lists the programs on ifindex's hooks.
func Query(ifindex int) (Attached, error) {
	a := Attached{TCX: map[Hook][]ebpf.ProgramID{}, Legacy: map[Hook]ebpf.ProgramID{}, ForeignBefore: map[Hook][]uint16{}}
	for _, h := range []struct {
		hook Hook
		typ  ebpf.AttachType
	}{{Ingress, ebpf.AttachTCXIngress}, {Egress, ebpf.AttachTCXEgress}} {
		res, err := link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: h.typ})
		if errors.Is(err, unix.EINVAL) || errors.Is(err, ebpf.ErrNotSupported) {
			// Before 6.6 the kernel has no tcx attach types and answers
			// EINVAL: there is nothing to find. (Asked per call rather
			// than through HaveTCX, whose probe loads a program: an ADD
			// on a legacy node queries once and should not pay that.)
			break
		}
		if err != nil {
			return a, fmt.Errorf("query tcx %s of ifindex %d: %w", h.hook, ifindex, err)
		}
		if res != nil {
			for _, p := range res.Programs {
				a.TCX[h.hook] = append(a.TCX[h.hook], p.ID)
			}
		}
	}
	filters, err := listFilters(ifindex)
	if err != nil {
		return a, err
	}
	for h, fs := range filters {
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && isOurs(bf) {
				a.Legacy[h] = ebpf.ProgramID(bf.Id)
			}
		}
		if _, ok := a.Legacy[h]; !ok {
			continue
		}
		for _, f := range fs {
			if p := f.Attrs().Priority; p < FilterPriority {
				a.ForeignBefore[h] = append(a.ForeignBefore[h], p)
			}
		}
	}
	return a, nil
}

// Has reports whether prog is attached on hook h, by either mechanism.
func (a Attached) Has(h Hook, id ebpf.ProgramID) bool {
	for _, p := range a.TCX[h] {
		if p == id {
			return true
		}
	}
	return a.Legacy[h] == id && id != 0
}

func hookParent(h Hook) uint32 {
	if h == Ingress {
		return netlink.HANDLE_MIN_INGRESS
	}
	return netlink.HANDLE_MIN_EGRESS
}

// attachLegacy adds clsact (unless it or an `ingress` qdisc is there) and
// our two filters. Returns noEgress when only ingress was possible.
func attachLegacy(ifindex int, progs Programs) (noEgress bool, err error) {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return false, fmt.Errorf("find ifindex %d: %w", ifindex, err)
	}
	kind, err := ingressQdiscKind(lnk)
	if err != nil {
		return false, err
	}
	switch kind {
	case "clsact":
	case "ingress":
		noEgress = true
	case "":
		q := &netlink.GenericQdisc{
			QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
			QdiscType:  "clsact",
		}
		// The qdisc stays when we detach: others may have filters on it by
		// then, and it goes away with the veth.
		if err := netlink.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
			return false, fmt.Errorf("add clsact to %s: %w", lnk.Attrs().Name, err)
		}
	}
	if err := replaceFilter(ifindex, Ingress, progs.Ingress, true); err != nil {
		return false, err
	}
	if noEgress {
		return true, nil
	}
	if err := replaceFilter(ifindex, Egress, progs.Egress, true); err != nil {
		detachLegacy(ifindex)
		return false, err
	}
	return false, nil
}

// ingressQdiscKind returns "clsact", "ingress" or "" for the qdisc at ffff:.
func ingressQdiscKind(lnk netlink.Link) (string, error) {
	qdiscs, err := netlink.QdiscList(lnk)
	if err != nil {
		return "", fmt.Errorf("list qdiscs of %s: %w", lnk.Attrs().Name, err)
	}
	for _, q := range qdiscs {
		if q.Attrs().Parent == netlink.HANDLE_INGRESS || q.Attrs().Handle == netlink.MakeHandle(0xffff, 0) {
			switch q.Type() {
			case "clsact", "ingress":
				return q.Type(), nil
			}
		}
	}
	return "", nil
}

func replaceFilter(ifindex int, h Hook, prog *ebpf.Program, create bool) error {
	info, err := prog.Info()
	if err != nil {
		return fmt.Errorf("program info: %w", err)
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    hookParent(h),
			Handle:    FilterHandle,
			Priority:  FilterPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Fd:           prog.FD(),
		Name:         FilterPrefix + strings.TrimPrefix(info.Name, FilterPrefix),
		DirectAction: true,
	}
	if !create {
		// Replacing: the filter must be ours already.
		ours, err := ourFilters(ifindex)
		if err != nil {
			return err
		}
		if _, ok := ours[h]; !ok {
			return fmt.Errorf("no pktmeta %s filter on ifindex %d to replace", h, ifindex)
		}
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach cls_bpf %s filter to ifindex %d: %w", h, ifindex, err)
	}
	return nil
}

func isOurs(f *netlink.BpfFilter) bool {
	return f.Priority == FilterPriority && f.Handle == FilterHandle && strings.HasPrefix(f.Name, FilterPrefix)
}

// listFilters lists every filter on both hooks; none when the interface
// or its clsact/ingress qdisc is gone.
func listFilters(ifindex int) (map[Hook][]netlink.Filter, error) {
	out := map[Hook][]netlink.Filter{}
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return out, nil
		}
		return nil, fmt.Errorf("find ifindex %d: %w", ifindex, err)
	}
	for _, h := range []Hook{Ingress, Egress} {
		filters, err := netlink.FilterList(lnk, hookParent(h))
		if err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				continue
			}
			return nil, fmt.Errorf("list %s filters of %s: %w", h, lnk.Attrs().Name, err)
		}
		out[h] = filters
	}
	return out, nil
}

// ourFilters finds our filters: our priority, our handle, our name prefix.
func ourFilters(ifindex int) (map[Hook]*netlink.BpfFilter, error) {
	all, err := listFilters(ifindex)
	if err != nil {
		return nil, err
	}
	out := map[Hook]*netlink.BpfFilter{}
	for h, fs := range all {
		for _, f := range fs {
			if bf, ok := f.(*netlink.BpfFilter); ok && isOurs(bf) {
				out[h] = bf
			}
		}
	}
	return out, nil
}

func detachLegacy(ifindex int) error {
	filters, err := ourFilters(ifindex)
	if err != nil {
		return err
	}
	var errs []error
	for h, f := range filters {
		if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete %s filter from ifindex %d: %w", h, ifindex, err))
		}
	}
	return errors.Join(errs...)
}
