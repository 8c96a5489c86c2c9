package e2e

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// TestKernelFeatures: on this kernel, a pod ADDed through the real chain
// in attach mode auto gets tcx where the kernel has it and clsact +
// cls_bpf where it does not; pktmetactl status names the kernel, what it
// lacks, and turns each missing feature into a problem. Below the minimum
// kernel the ADD fails, saying which feature is missing and which Linux
// is needed, and leaves no datapath behind. make test-kernels prints the
// line this test logs as each kernel's capabilities.
func TestKernelFeatures(t *testing.T) {
	release := datapath.KernelRelease()
	if testutil.KernelOlderThan(datapath.MinKernel) {
		e := newEnv(t, envOptions{})
		_, err := e.node.AddPod(e.ctx, testbed.PodSpec{Namespace: "default", Name: "old-kernel"})
		if err == nil {
			t.Fatalf("ADD on Linux %s (below %s) succeeded", release, datapath.MinKernel)
		}
		_, msg := cniCode(err)
		if !strings.Contains(msg, "pktmeta needs Linux "+datapath.MinKernel+" or newer") || !strings.Contains(msg, "lacks") {
			t.Fatalf("ADD on Linux %s failed without naming what it lacks: %v", release, err)
		}
		for _, f := range pinnedFiles(t, e.pin) {
			if strings.HasPrefix(f, "maps/") || strings.HasPrefix(f, "progs/") || strings.HasPrefix(f, "links/") {
				t.Errorf("the refused ADD left %s pinned", f)
			}
		}
		t.Logf("kernel features: below the minimum %s, refused: %s", datapath.MinKernel, strings.TrimSuffix(firstLine(msg), ": "))
		return
	}

	tp := newTwoPods(t, envOptions{})
	out, code := tp.ctl("status", "-o", "json")
	var st struct {
		Kernel struct {
			Release         string `json:"release"`
			TCX             bool   `json:"tcx"`
			ConntrackKfuncs bool   `json:"conntrackKfuncs"`
		} `json:"kernel"`
		Attachments []struct {
			HostIfName string `json:"hostIfname"`
			Mode       string `json:"mode"`
		} `json:"attachments"`
		Problems []string `json:"problems"`
	}
	// With problems the exit is 1 and ctl appends stderr after the JSON.
	if err := json.NewDecoder(strings.NewReader(out)).Decode(&st); err != nil {
		t.Fatalf("status -o json: %v\n%s", err, out)
	}
	if st.Kernel.Release != release {
		t.Errorf("status names kernel %q, uname says %q", st.Kernel.Release, release)
	}

	// tcx came with 6.6: the probe must agree with the version.
	wantTCX := !testutil.KernelOlderThan("6.6")
	if attach.HaveTCX() != wantTCX || st.Kernel.TCX != wantTCX {
		t.Errorf("tcx probed %v, status says %v, Linux %s should have it: %v", attach.HaveTCX(), st.Kernel.TCX, release, wantTCX)
	}
	wantMode := "legacy"
	if wantTCX {
		wantMode = "tcx"
	}
	if len(st.Attachments) != 2 {
		t.Fatalf("attachments %+v, want the two pods'", st.Attachments)
	}
	for _, a := range st.Attachments {
		if a.Mode != wantMode {
			t.Fatalf("attachment of %s in mode %s, want %s (auto)", a.HostIfName, a.Mode, wantMode)
		}
	}

	// The conntrack kfuncs: the kernel's own BTF says whether they exist
	// (the load asked for nf_conntrack, so a module is loaded by now).
	wantCT := haveConntrackKfuncs(t)
	if st.Kernel.ConntrackKfuncs != wantCT {
		t.Errorf("status says conntrack kfuncs %v, the kernel's BTF says %v", st.Kernel.ConntrackKfuncs, wantCT)
	}
	ctProblem := false
	for _, pr := range st.Problems {
		if strings.Contains(pr, "no conntrack kfuncs") {
			ctProblem = true
		}
	}
	switch {
	case !wantCT && (!ctProblem || code != 1):
		t.Errorf("without conntrack kfuncs status must report the problem and exit 1: exit %d, problems %q", code, st.Problems)
	case wantCT && (ctProblem || code != 0):
		t.Errorf("with every feature status must be clean: exit %d, problems %q", code, st.Problems)
	}

	// What the destination finds, direct and through a Service. Without
	// the kfuncs a Service connection is a miss, never a wrong answer, and
	// counted as such.
	d := tp.open()
	wb := tp.workloadOf(d, tp.b)
	for _, c := range []trafficCase{{"tcp4", datapath.ProtoTCP, false, false}, {"tcp4-service", datapath.ProtoTCP, false, true}} {
		origin, seen, conn := tp.connect(c)
		rec, err := d.Lookup(origin)
		conn.Close()
		if err != nil {
			t.Fatalf("%s: the origin's record: %v", c.name, err)
		}
		delivered := rec.IsDelivered() && rec.PeerWorkload == wb.ID && rec.PeerTuple == seen
		if want := wantCT || !c.vip; delivered != want {
			t.Errorf("%s (conntrack kfuncs %v): delivered %v, want %v (record %+v)", c.name, wantCT, delivered, want, rec)
		}
	}
	if stats, err := d.ReadStats(); err != nil {
		t.Fatal(err)
	} else if !wantCT && stats.CTUnavailable == 0 {
		t.Errorf("no conntrack kfuncs, yet ctUnavailable is 0: %+v", stats)
	}
	t.Logf("kernel features: attach=%s tcx=%s conntrack-kfuncs=%s", st.Attachments[0].Mode, yesNo(st.Kernel.TCX), yesNo(st.Kernel.ConntrackKfuncs))
}

// kernelHasFunc looks name up in vmlinux's BTF and in nf_conntrack's, if
// that module is loaded.
func kernelHasFunc(t *testing.T, name string) bool {
	t.Helper()
	var fn *btf.Func
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatalf("kernel BTF: %v", err)
	}
	if spec.TypeByName(name, &fn) == nil {
		return true
	}
	if _, err := os.Stat("/sys/kernel/btf/nf_conntrack"); errors.Is(err, os.ErrNotExist) {
		return false
	}
	mod, err := btf.LoadKernelModuleSpec("nf_conntrack")
	if err != nil {
		t.Fatalf("nf_conntrack BTF: %v", err)
	}
	return mod.TypeByName(name, &fn) == nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// requireMode skips a test of attach mode tcx on a kernel without tcx
// (before 6.6), where attach mode auto is legacy and TestKernelFeatures
// checks that it is.
func requireMode(t *testing.T, mode string) {
	t.Helper()
	if mode == "tcx" && !attach.HaveTCX() {
		t.Skipf("Linux %s has no tcx (6.6): attach mode tcx cannot run here", datapath.KernelRelease())
	}
}

// requireConntrackKfuncs skips what needs the conntrack kfuncs (Service
// NAT resolution, closes verified at the destination, the conntrack
// sweep) on a kernel without them (before 5.19); TestKernelFeatures checks
// what pktmeta does there instead.
func requireConntrackKfuncs(t *testing.T) {
	t.Helper()
	if !haveConntrackKfuncs(t) {
		t.Skipf("Linux %s has no conntrack kfuncs (5.19): no Service NAT resolution or conntrack checks here", datapath.KernelRelease())
	}
}

// haveConntrackKfuncs asks the kernel's BTF, after having the kernel load
// nf_conntrack (a ctnetlink request), as the datapath's load does.
func haveConntrackKfuncs(t *testing.T) bool {
	t.Helper()
	if _, err := os.Stat("/sys/module/nf_conntrack"); errors.Is(err, os.ErrNotExist) {
		if err := datapath.RequestConntrackModule(); err != nil {
			t.Fatal(err)
		}
	}
	have := kernelHasFunc(t, "bpf_skb_ct_lookup") && !testutil.KernelOlderThan("5.19")
	// Every kernel from 5.19 builds them with nf_conntrack's BTF; a probe
	// that says otherwise there must fail the run, not skip its tests.
	if !have && !testutil.KernelOlderThan("5.19") {
		t.Fatalf("Linux %s should have the conntrack kfuncs, but its BTF has no bpf_skb_ct_lookup", datapath.KernelRelease())
	}
	return have
}
