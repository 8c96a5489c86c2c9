package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
)

// hookTable says which program goes on which hook of a pod's host veth,
// for which workload. Attach, upgrade, CHECK and status all read it, so
// they cannot disagree about what a correct attachment is.
var hookTable = []struct {
	hook    attach.Hook
	program string
	applies func(w Workload) bool
}{
	{attach.Ingress, ProgOrigin, func(w Workload) bool { return !w.Strict }},
	{attach.Ingress, ProgStrict, func(w Workload) bool { return w.Strict }},
	// Legacy beside an `ingress` qdisc has no egress hook to put it on.
	{attach.Egress, ProgDeliver, func(w Workload) bool { return !w.NoEgress }},
}

// Requirement is one program that must be on one hook.
type Requirement struct {
	Hook    attach.Hook
	Program string // ProgOrigin, ProgStrict, ProgDeliver
}

// Requirements lists what must be attached for w.
func Requirements(w Workload) []Requirement {
	var out []Requirement
	for _, h := range hookTable {
		if h.applies(w) {
			out = append(out, Requirement{Hook: h.hook, Program: h.program})
		}
	}
	return out
}

// HookStatus is one requirement and whether it holds right now.
type HookStatus struct {
	Requirement
	ProgramID ebpf.ProgramID // the pinned program's id
	OK        bool
	Problem   string // when not OK
}

// programs returns the programs of w's requirements, for attach.Attach.
func (d *Datapath) programs(w Workload) (attach.Programs, error) {
	var p attach.Programs
	for _, r := range Requirements(w) {
		prog := d.Program(r.Program)
		if prog == nil {
			return p, fmt.Errorf("program %s is not loaded", r.Program)
		}
		switch r.Hook {
		case attach.Ingress:
			p.Ingress = prog
		case attach.Egress:
			p.Egress = prog
		}
	}
	return p, nil
}

// HookStatus checks every requirement of w against what is on its host
// veth right now (tcx links or our legacy filters). The veth must be in
// the calling thread's network namespace.
func (d *Datapath) HookStatus(w Workload) ([]HookStatus, error) {
	got, err := attach.Query(int(w.HostIfindex))
	if err != nil {
		return nil, err
	}
	var out []HookStatus
	for _, r := range Requirements(w) {
		hs := HookStatus{Requirement: r}
		prog := d.Program(r.Program)
		if prog == nil {
			hs.Problem = fmt.Sprintf("program %s is not pinned", r.Program)
			out = append(out, hs)
			continue
		}
		info, err := prog.Info()
		if err != nil {
			return nil, fmt.Errorf("program %s info: %w", r.Program, err)
		}
		hs.ProgramID, _ = info.ID()
		hs.OK = got.Has(r.Hook, hs.ProgramID)
		if !hs.OK {
			hs.Problem = fmt.Sprintf("pktmeta program %s (id %d) is not attached to %s %s", info.Name, hs.ProgramID, w.HostIfName, r.Hook)
		}
		out = append(out, hs)
	}
	return out, nil
}
