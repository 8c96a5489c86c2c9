package attach

import (
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
)

// passProg returns TCX_NEXT, like pktmeta's programs.
func passProg(t *testing.T, name string) *ebpf.Program {
	t.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         name,
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// veth makes a veth pair in the test's netns and returns the first end.
func veth(t *testing.T) int {
	t.Helper()
	la := netlink.NewLinkAttrs()
	la.Name = "pmt0"
	v := &netlink.Veth{LinkAttrs: la, PeerName: "pmt1"}
	if err := netlink.LinkAdd(v); err != nil {
		t.Fatal(err)
	}
	l, err := netlink.LinkByName("pmt0")
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Index
}

func TestTCXAttachPinsAndDetaches(t *testing.T) {
	if !HaveTCX() {
		t.Skip("this kernel has no tcx (6.6); TestNoTCXKernel covers the fallback")
	}
	pin := testutil.PinPath(t)
	testutil.InNewNetns(t, func() {
		ifindex := veth(t)
		in, out := passProg(t, "pktmeta_origin"), passProg(t, "pktmeta_deliver")
		dir := filepath.Join(pin, "links", "c1", "eth0")
		res, err := Attach(ifindex, Programs{Ingress: in, Egress: out}, Auto, dir)
		if err != nil || res.Mode != TCX {
			t.Fatalf("attach: %+v %v", res, err)
		}
		got, err := Query(ifindex)
		if err != nil || !got.Has(Ingress, progID(t, in)) || !got.Has(Egress, progID(t, out)) {
			t.Fatalf("query %+v %v", got, err)
		}
		// The attachment lives in the pins, not in this process.
		in2 := passProg(t, "pktmeta_strict")
		if err := Update(ifindex, dir, Ingress, false, in2); err != nil {
			t.Fatal(err)
		}
		got, _ = Query(ifindex)
		if !got.Has(Ingress, progID(t, in2)) || got.Has(Ingress, progID(t, in)) {
			t.Fatalf("after update %+v", got)
		}
		if err := Detach(ifindex, dir); err != nil {
			t.Fatal(err)
		}
		if err := Detach(ifindex, dir); err != nil {
			t.Fatalf("second detach: %v", err)
		}
		got, _ = Query(ifindex)
		if len(got.TCX[Ingress])+len(got.TCX[Egress]) != 0 {
			t.Fatalf("left attached: %+v", got)
		}
	})
}

func TestNoTCXKernel(t *testing.T) {
	orig := attachTCXFunc
	attachTCXFunc = func(int, Programs, string) error {
		return fmt.Errorf("attach tcx link: %w", ebpf.ErrNotSupported)
	}
	defer func() { attachTCXFunc = orig }()
	pin := testutil.PinPath(t)
	testutil.InNewNetns(t, func() {
		ifindex := veth(t)
		in, out := passProg(t, "pktmeta_origin"), passProg(t, "pktmeta_deliver")
		dir := filepath.Join(pin, "links", "c1", "eth0")

		// Mode tcx: a clear error, nothing attached.
		_, err := Attach(ifindex, Programs{Ingress: in, Egress: out}, TCX, dir)
		if !errors.Is(err, ErrNoTCX) {
			t.Fatalf("mode tcx without tcx: %v", err)
		}
		if got, _ := Query(ifindex); len(got.Legacy) != 0 {
			t.Fatalf("attached anyway: %+v", got)
		}
		// Mode auto: falls back to clsact + cls_bpf.
		res, err := Attach(ifindex, Programs{Ingress: in, Egress: out}, Auto, dir)
		if err != nil || res.Mode != Legacy || res.NoEgress {
			t.Fatalf("auto without tcx: %+v %v", res, err)
		}
		got, _ := Query(ifindex)
		if got.Legacy[Ingress] != progID(t, in) || got.Legacy[Egress] != progID(t, out) {
			t.Fatalf("legacy filters %+v", got)
		}
		if err := Detach(ifindex, dir); err != nil {
			t.Fatal(err)
		}
		if got, _ := Query(ifindex); len(got.Legacy) != 0 {
			t.Fatalf("filters left: %+v", got)
		}
	})
}

func TestLegacyBesideIngressQdisc(t *testing.T) {
	testutil.InNewNetns(t, func() {
		ifindex := veth(t)
		q := &netlink.Ingress{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_INGRESS}}
		if err := netlink.QdiscAdd(q); err != nil {
			t.Fatal(err)
		}
		in, out := passProg(t, "pktmeta_origin"), passProg(t, "pktmeta_deliver")
		res, err := Attach(ifindex, Programs{Ingress: in, Egress: out}, Legacy, "")
		if err != nil || !res.NoEgress {
			t.Fatalf("legacy beside ingress qdisc: %+v %v", res, err)
		}
		if err := Detach(ifindex, ""); err != nil {
			t.Fatal(err)
		}
		qs, _ := netlink.QdiscList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}})
		found := false
		for _, q := range qs {
			found = found || q.Type() == "ingress"
		}
		if !found {
			t.Fatal("detach removed a qdisc that is not ours")
		}
	})
}
