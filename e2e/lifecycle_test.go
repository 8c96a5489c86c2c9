package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

func progID(t *testing.T, p *ebpf.Program) ebpf.ProgramID {
	t.Helper()
	info, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

// hooks lists the program IDs on a host veth, queried in the node netns.
func hooks(t *testing.T, e *env, ifindex int) attach.Attached {
	t.Helper()
	var a attach.Attached
	err := e.node.Do(func() error {
		var err error
		a, err = attach.Query(ifindex)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// pinnedFiles lists every pin under the pin path, relative to it.
func pinnedFiles(t *testing.T, pin string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(pin, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(pin, p)
			out = append(out, rel)
		}
		return nil
	})
	return out
}

func linkPins(t *testing.T, pin string) []string {
	var out []string
	for _, f := range pinnedFiles(t, pin) {
		if strings.HasPrefix(f, "links/") {
			out = append(out, f)
		}
	}
	return out
}

// TestSecondADDReusesPinnedPrograms: only the first ADD on a node loads
// and verifies programs; later ADDs open the pins.
func TestSecondADDReusesPinnedPrograms(t *testing.T) {
	e := newEnv(t, envOptions{})
	a := e.addPod("default", "a", nil)
	d := e.open()
	ids := []ebpf.ProgramID{progID(t, d.Origin), progID(t, d.Strict), progID(t, d.Deliver)}
	b := e.addPod("default", "b", nil)
	d2, err := datapath.OpenReader(e.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Close()
	ids2 := []ebpf.ProgramID{progID(t, d2.Origin), progID(t, d2.Strict), progID(t, d2.Deliver)}
	if fmt.Sprint(ids) != fmt.Sprint(ids2) {
		t.Fatalf("program ids changed across ADDs: %v -> %v", ids, ids2)
	}
	log, _ := os.ReadFile(e.logFile)
	if n := strings.Count(string(log), `msg="datapath loaded" plugin=pktmeta verb=ADD containerID=`+a.ContainerID); n == 0 {
		t.Fatal("first ADD did not report loading the datapath")
	}
	if strings.Contains(string(log), `msg="datapath loaded" plugin=pktmeta verb=ADD containerID=`+b.ContainerID) {
		t.Fatal("second ADD loaded the datapath again")
	}
	for _, p := range []*testbed.Pod{a, b} {
		got := hooks(t, e, p.HostIfindex)
		if !got.Has(attach.Ingress, ids[0]) || !got.Has(attach.Egress, ids[2]) {
			t.Fatalf("pod %s: hooks %+v, want origin %d and deliver %d", p.Spec.Name, got, ids[0], ids[2])
		}
	}
}

// TestDELRemovesEveryTrace: links, pins, endpoint, workload and the pod's
// records and aliases are gone after DEL; a second DEL and a DEL with a
// gone netns succeed.
func TestDELRemovesEveryTrace(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	wa := tp.workloadOf(d, tp.a)
	// Leave connections open on purpose: UDP has no close, and a TCP
	// connection whose pod vanishes never sends its FIN.
	tcpConn := tp.dialTCP(tp.a, netip.AddrPortFrom(vip4, 80))
	defer tcpConn.Close()
	udpConn := tp.dialUDP(tp.a, netip.AddrPortFrom(tp.b.IPv6, udpPort))
	defer udpConn.Close()
	// A Service connection's alias is among the traces, where the kernel
	// has the conntrack kfuncs to resolve it.
	if aliases, _ := d.Aliases(); len(aliases) == 0 && haveConntrackKfuncs(t) {
		t.Fatal("no alias for the Service connection")
	}

	// DEL only (the netns and veth stay), run the plugin's DEL alone so
	// the veth still exists when we look for leftovers on it.
	conf := tp.pluginConf(t, tp.a)
	if _, err := tp.node.ExecPlugin(tp.ctx, "pktmeta", "DEL", tp.a, conf, nil); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	got := hooks(t, tp.env, tp.a.HostIfindex)
	if len(got.TCX[attach.Ingress])+len(got.TCX[attach.Egress])+len(got.Legacy) != 0 {
		t.Fatalf("programs left on the veth: %+v", got)
	}
	if _, ok, _ := d.FindAttachment(wa.Key()); ok {
		t.Fatal("workload left")
	}
	if _, ok, _ := d.Workload(wa.ID); ok {
		t.Fatal("workload entry left")
	}
	eps, _ := d.ListEndpoints()
	if _, ok := eps[uint32(tp.a.HostIfindex)]; ok {
		t.Fatal("endpoint left")
	}
	recs, _ := d.Records()
	for _, r := range recs {
		if r.OriginWorkload == wa.ID || r.PeerWorkload == wa.ID {
			t.Fatalf("record of the deleted pod left: %+v", r)
		}
	}
	if aliases, _ := d.Aliases(); len(aliases) != 0 {
		t.Fatalf("aliases left: %+v", aliases)
	}
	for _, f := range linkPins(t, tp.pin) {
		if strings.Contains(f, tp.a.ContainerID) {
			t.Fatalf("pin left: %s", f)
		}
	}
	// The other pod is untouched.
	if _, ok, _ := d.FindAttachment(datapath.AttachmentKey{ContainerID: tp.b.ContainerID, IfName: "eth0"}); !ok {
		t.Fatal("DEL of one pod removed the other")
	}

	// Again, then through the whole chain, then with the netns gone and
	// without a prevResult.
	if _, err := tp.node.ExecPlugin(tp.ctx, "pktmeta", "DEL", tp.a, conf, nil); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
	if err := tp.node.DelPodNetwork(tp.ctx, tp.a); err != nil {
		t.Fatalf("chain DEL: %v", err)
	}
	if err := tp.node.RemovePodNetns(tp.b); err != nil {
		t.Fatal(err)
	}
	noPrev := tp.pluginConfNoPrev(t)
	if _, err := tp.node.ExecPlugin(tp.ctx, "pktmeta", "DEL", tp.b, noPrev, nil); err != nil {
		t.Fatalf("DEL with gone netns and no prevResult: %v", err)
	}
	if ws, _ := d.Workloads(); len(ws) != 0 {
		t.Fatalf("workloads left: %+v", ws)
	}
	if pins := linkPins(t, tp.pin); len(pins) != 0 {
		t.Fatalf("link pins left: %v", pins)
	}
}

// pluginConf renders pktmeta's config as the runtime passes it, with the
// pod's prevResult.
func (e *env) pluginConf(t *testing.T, p *testbed.Pod) []byte {
	t.Helper()
	conf := e.pktmetaConf(nil)
	conf["cniVersion"] = "1.0.0"
	conf["name"] = "pmtb"
	if p != nil {
		b, err := json.Marshal(p.Result)
		if err != nil {
			t.Fatal(err)
		}
		var prev map[string]any
		json.Unmarshal(b, &prev)
		conf["prevResult"] = prev
	}
	b, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (e *env) pluginConfNoPrev(t *testing.T) []byte { return e.pluginConf(t, nil) }

func cniCode(err error) (uint, string) {
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code, e.Msg + ": " + e.Details
	}
	return 0, fmt.Sprint(err)
}

// TestCHECKFailsWhenDetached: CHECK passes on a healthy pod and fails once
// someone detaches our program.
func TestCHECKFailsWhenDetached(t *testing.T) {
	for _, mode := range []string{"tcx", "legacy"} {
		t.Run(mode, func(t *testing.T) {
			requireMode(t, mode)
			e := newEnv(t, envOptions{conf: map[string]any{"attachMode": mode}})
			p := e.addPod("default", "a", nil)
			if err := e.node.CheckPod(e.ctx, p); err != nil {
				t.Fatalf("CHECK on a healthy pod: %v", err)
			}
			d := e.open()
			w := e.workloadOf(d, p)
			if mode == "tcx" {
				l, err := link.LoadPinnedLink(filepath.Join(d.AttachmentLinkDir(w.Key()), "ingress"), nil)
				if err != nil {
					t.Fatal(err)
				}
				if err := l.Detach(); err != nil {
					t.Fatalf("detach: %v", err)
				}
				l.Close()
			} else {
				if _, err := e.node.Run(e.ctx, "tc", "filter", "del", "dev", p.HostVeth, "ingress"); err != nil {
					t.Fatal(err)
				}
			}
			err := e.node.CheckPod(e.ctx, p)
			if err == nil || !strings.Contains(err.Error(), "not attached") {
				t.Fatalf("CHECK after detach: %v, want 'not attached'", err)
			}
			out, code := e.ctl("status")
			if code != 1 || !strings.Contains(out, "ingress hook missing") {
				t.Fatalf("pktmetactl status exit %d, want 1 and the missing hook named:\n%s", code, out)
			}
		})
	}
}

// TestGCRemovesInvalidAttachments: GC keeps what is in
// cni.dev/valid-attachments and removes the rest.
func TestGCRemovesInvalidAttachments(t *testing.T) {
	e := newEnv(t, envOptions{cniVersion: "1.1.0"})
	a := e.addPod("default", "a", nil)
	b := e.addPod("default", "b", nil)
	c := e.addPod("default", "c", nil)
	d := e.open()
	wc := e.workloadOf(d, c)
	if err := e.node.GC(e.ctx, []*testbed.Pod{a, b}); err != nil {
		t.Fatalf("GC: %v", err)
	}
	ws, _ := d.Workloads()
	if len(ws) != 2 {
		t.Fatalf("%d workloads after GC, want 2", len(ws))
	}
	if _, ok, _ := d.Workload(wc.ID); ok {
		t.Fatal("GC kept the invalid attachment")
	}
	for _, f := range linkPins(t, e.pin) {
		if strings.Contains(f, c.ContainerID) {
			t.Fatalf("GC left pin %s", f)
		}
	}
	for _, p := range []*testbed.Pod{a, b} {
		if err := e.node.CheckPod(e.ctx, p); err != nil {
			t.Fatalf("GC broke valid pod %s: %v", p.Spec.Name, err)
		}
	}
}

// TestSTATUS: usable with a pinned datapath or a bpffs to create one in;
// code 50 when the pin path is not on bpffs.
func TestSTATUS(t *testing.T) {
	e := newEnv(t, envOptions{cniVersion: "1.1.0"})
	if err := e.node.Status(e.ctx); err != nil {
		t.Fatalf("STATUS before any pod: %v", err)
	}
	e.addPod("default", "a", nil)
	if err := e.node.Status(e.ctx); err != nil {
		t.Fatalf("STATUS with a datapath: %v", err)
	}
	conf := map[string]any{"cniVersion": "1.1.0", "name": "pmtb", "type": "pktmeta", "pinPath": filepath.Join(t.TempDir(), "pktmeta")}
	b, _ := json.Marshal(conf)
	_, err := e.node.ExecPlugin(e.ctx, "pktmeta", "STATUS", nil, b, nil)
	if code, msg := cniCode(err); code != types.ErrPluginNotAvailable || !strings.Contains(msg, "bpf") {
		t.Fatalf("STATUS off bpffs: code %d (%s), want 50", code, msg)
	}
	// ADD off bpffs: try again later (bpffs may not be mounted yet at boot).
	p := e.addPod("default", "b", nil)
	add := e.pktmetaConf(map[string]any{"pinPath": conf["pinPath"]})
	prev, _ := json.Marshal(p.Result)
	var prevMap map[string]any
	json.Unmarshal(prev, &prevMap)
	add["cniVersion"], add["name"], add["prevResult"] = "1.1.0", "pmtb", prevMap
	b, _ = json.Marshal(add)
	_, err = e.node.ExecPlugin(e.ctx, "pktmeta", "ADD", p, b, []string{"CNI_CONTAINERID=off-bpffs"})
	if code, msg := cniCode(err); code != types.ErrTryAgainLater || !strings.Contains(msg, "bpf") {
		t.Fatalf("ADD off bpffs: code %d (%s), want 11", code, msg)
	}
}

// TestBadInputErrors: malformed config and missing prevResult get CNI
// errors that name the problem, and leave nothing behind.
func TestBadInputErrors(t *testing.T) {
	e := newEnv(t, envOptions{})
	p := e.addPod("default", "a", nil)
	good := e.pluginConf(t, p)
	var base map[string]any
	json.Unmarshal(good, &base)
	d := e.open()
	before := len(linkPins(t, e.pin))

	for _, c := range []struct {
		name  string
		patch map[string]any
		code  uint
		want  string
	}{
		{"bad maxConnections", map[string]any{"maxConnections": 3}, types.ErrInvalidNetworkConfig, `"maxConnections"`},
		{"unknown key", map[string]any{"tgas": map[string]any{"a": "b"}}, types.ErrInvalidNetworkConfig, `"tgas"`},
		{"bad attachMode", map[string]any{"attachMode": "xdp"}, types.ErrInvalidNetworkConfig, `"attachMode"`},
		{"no prevResult", map[string]any{"prevResult": nil}, types.ErrInvalidNetworkConfig, "chained plugin"},
		{"bad annotation tag", map[string]any{"runtimeConfig": map[string]any{testbed.PodAnnotationsCapability: map[string]any{"pktmeta.dev/bad key": "x"}}}, types.ErrInvalidNetworkConfig, "pktmeta.dev/bad key"},
	} {
		t.Run(c.name, func(t *testing.T) {
			conf := map[string]any{}
			for k, v := range base {
				conf[k] = v
			}
			for k, v := range c.patch {
				if v == nil {
					delete(conf, k)
				} else {
					conf[k] = v
				}
			}
			b, _ := json.Marshal(conf)
			// A second ADD for the same container replaces the attachment, so
			// use another container id: a failed ADD must add nothing.
			env := []string{"CNI_CONTAINERID=failing-" + strings.ReplaceAll(c.name, " ", "-")}
			_, err := e.node.ExecPlugin(e.ctx, "pktmeta", "ADD", p, b, env)
			code, msg := cniCode(err)
			if code != c.code || !strings.Contains(msg, c.want) {
				t.Fatalf("code %d %q, want %d naming %s", code, msg, c.code, c.want)
			}
		})
	}
	if _, err := e.node.ExecPlugin(e.ctx, "pktmeta", "ADD", p, []byte("{not json"), nil); err == nil {
		t.Fatal("malformed JSON accepted")
	}

	// An interface that is no veth fails after the datapath is loaded.
	_, err := e.node.ExecPlugin(e.ctx, "pktmeta", "ADD", p, good, []string{"CNI_CONTAINERID=not-a-veth", "CNI_IFNAME=lo"})
	if err == nil || !strings.Contains(err.Error(), "veth") {
		t.Fatalf("ADD on lo: %v, want an error about veths", err)
	}

	ws, _ := d.Workloads()
	if len(ws) != 1 {
		t.Fatalf("%d workloads after failed ADDs, want only the good pod's", len(ws))
	}
	if after := len(linkPins(t, e.pin)); after != before {
		t.Fatalf("link pins %d -> %d after failed ADDs", before, after)
	}
	if err := e.node.CheckPod(e.ctx, p); err != nil {
		t.Fatalf("failed ADDs disturbed the good pod: %v", err)
	}
}

// TestUpgradeReplacesProgramsInPlace: pinned programs from another build
// are replaced on every attached veth by a tcx link update; the links stay
// the same objects and tagging continues.
func TestUpgradeReplacesProgramsInPlace(t *testing.T) {
	for _, mode := range []string{"tcx", "legacy"} {
		t.Run(mode, func(t *testing.T) {
			requireMode(t, mode)
			tp := newTwoPods(t, envOptions{conf: map[string]any{"attachMode": mode}})
			d := tp.open()
			oldOrigin := progID(t, d.Origin)
			var oldLink link.ID
			if mode == "tcx" {
				oldLink = linkID(t, d, tp.workloadOf(d, tp.a))
			}

			// Pretend the pinned programs came from an older release:
			// its workloads without netns entries, and (legacy) one from
			// before the application interface, without the cgroup link,
			// or (tcx) one whose link the upgrade moves.
			srv := startAppServer(t, tp.b, d)
			oldApps := appsLinkID(t, tp.env)
			forgetApps(t, tp.env, mode == "legacy")
			tp.rewriteConfig(func(c *datapath.Config) { c.Release--; c.DatapathID = [32]byte{1} })
			c := tp.addPod("shop", "new", nil)

			d2, err := datapath.OpenReader(tp.pin)
			if err != nil {
				t.Fatal(err)
			}
			defer d2.Close()
			newOrigin := progID(t, d2.Origin)
			if newOrigin == oldOrigin {
				t.Fatal("programs were not reloaded")
			}
			if cur, _ := d2.Current(); !cur {
				t.Fatal("config does not carry this build's id after the upgrade")
			}
			for _, p := range []*testbed.Pod{tp.a, tp.b, c} {
				got := hooks(t, tp.env, p.HostIfindex)
				if !got.Has(attach.Ingress, newOrigin) || got.Has(attach.Ingress, oldOrigin) {
					t.Fatalf("pod %s ingress: %+v, want only the new program %d", p.Spec.Name, got, newOrigin)
				}
			}
			if mode == "tcx" {
				if id := linkID(t, d2, tp.workloadOf(d2, tp.a)); id != oldLink {
					t.Fatalf("link replaced (%d -> %d), want updated in place", oldLink, id)
				}
			}
			// Old pods are still tagged, by the new programs.
			conn := tp.dialTCP(tp.a, netip.AddrPortFrom(vip4, 80))
			defer conn.Close()
			if _, err := d2.Lookup(localTuple(conn, datapath.ProtoTCP, netip.AddrPortFrom(vip4, 80))); err != nil {
				t.Fatalf("after upgrade: %v", err)
			}
			// And an application in an old pod can ask its socket: the
			// upgrade gave the old workloads their netns, the ADD the link.
			if st := d2.Apps(); !st.Attached || !st.Current {
				t.Fatalf("application interface after the upgrade: %+v", st)
			}
			if id := appsLinkID(t, tp.env); mode == "tcx" && id != oldApps {
				t.Fatalf("application link replaced (%d -> %d), want updated in place", oldApps, id)
			}
			ac, err := tp.a.DialTCP(tp.ctx, netip.AddrPortFrom(tp.b.IPv4, appTCPPort))
			if err != nil {
				t.Fatal(err)
			}
			defer ac.Close()
			if a := srv.next(t); a.err != nil || a.o.Pod != "frontend" {
				t.Fatalf("server in an old pod asked its socket after the upgrade: %+v, %v", a.o, a.err)
			}
			// Unconnected UDP too: the upgrade gave the old pods' netns
			// their addresses.
			if st := d2.Apps(); st.UDP != (d2.Recvmsg4 != nil) {
				t.Fatalf("recvmsg programs attached: %+v, loaded: %v", st, d2.Recvmsg4 != nil)
			}
			srv.udpOnce(t, tp.b)
			uc, err := tp.a.DialUDP(netip.AddrPortFrom(tp.b.IPv4, appUDPPort))
			if err != nil {
				t.Fatal(err)
			}
			defer uc.Close()
			uc.Write([]byte("who"))
			if a := srv.next(t); a.err != nil || a.o.Pod != "frontend" || (srv.udpUnconnected && a.unconnected.Pod != "frontend") {
				t.Fatalf("UDP server in an old pod after the upgrade: %+v, unconnected %+v, %v", a.o, a.unconnected, a.err)
			}
		})
	}
}

// forgetApps takes the application interface's state away, as a release
// before it had none: the workloads' netns entries and the netns
// addresses and, with detach, the cgroup links.
func forgetApps(t *testing.T, e *env, detach bool) {
	t.Helper()
	d, err := datapath.OpenExisting(e.pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if detach {
		if err := d.DetachApps(); err != nil {
			t.Fatal(err)
		}
	}
	var (
		id     uint32
		cookie uint64
		keys   []uint32
	)
	for it := d.WorkloadNetnsMap.Iterate(); it.Next(&id, &cookie); {
		keys = append(keys, id)
	}
	for _, k := range keys {
		if err := d.WorkloadNetnsMap.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
	if len(keys) == 0 {
		t.Fatal("no workload had a netns entry to forget")
	}
	var (
		ns      uint64
		nsAddrs []uint64
		raw     = make([]byte, d.NetnsAddrsMap.ValueSize())
	)
	for it := d.NetnsAddrsMap.Iterate(); it.Next(&ns, &raw); {
		nsAddrs = append(nsAddrs, ns)
	}
	for _, k := range nsAddrs {
		if err := d.NetnsAddrsMap.Delete(k); err != nil {
			t.Fatal(err)
		}
	}
}

// appsLinkID is the id of the application interface's pinned link.
func appsLinkID(t *testing.T, e *env) link.ID {
	t.Helper()
	return pinnedLinkID(t, filepath.Join(e.pin, "apps", "getsockopt"))
}

func linkID(t *testing.T, d *datapath.Datapath, w datapath.Workload) link.ID {
	t.Helper()
	return pinnedLinkID(t, filepath.Join(d.AttachmentLinkDir(w.Key()), "ingress"))
}

func pinnedLinkID(t *testing.T, path string) link.ID {
	t.Helper()
	l, err := link.LoadPinnedLink(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		t.Fatal(err)
	}
	return info.ID
}

// TestLegacyAttach: the clsact + cls_bpf path on a kernel that has tcx,
// forced by config. Filters carry our priority, handle and name; DEL
// removes only them.
func TestLegacyAttach(t *testing.T) {
	tp := newTwoPods(t, envOptions{conf: map[string]any{"attachMode": "legacy"}})
	d := tp.open()
	for _, p := range []*testbed.Pod{tp.a, tp.b} {
		if got := hooks(t, tp.env, p.HostIfindex); len(got.TCX[attach.Ingress]) != 0 || got.Legacy[attach.Ingress] == 0 || got.Legacy[attach.Egress] == 0 {
			t.Fatalf("pod %s hooks %+v, want legacy filters only", p.Spec.Name, got)
		}
	}
	// Someone else's filter on the same hook, before ours, that lets
	// packets continue down the chain.
	if _, err := tp.node.Run(tp.ctx, "tc", "filter", "add", "dev", tp.a.HostVeth, "ingress", "prio", "1", "protocol", "all", "u32", "match", "u32", "0xdeadbeef", "0xffffffff", "at", "0", "classid", "1:1"); err != nil {
		t.Fatal(err)
	}
	for _, c := range trafficCases {
		t.Run(c.name, func(t *testing.T) {
			if c.vip {
				requireConntrackKfuncs(t)
			}
			origin, seen, conn := tp.connect(c)
			defer conn.Close()
			rec, err := d.Lookup(seen)
			if err != nil {
				t.Fatal(err)
			}
			if rec.Tuple != origin || !rec.IsDelivered() {
				t.Fatalf("record %+v", rec)
			}
		})
	}
	conf := tp.pluginConf(t, tp.a)
	if _, err := tp.node.ExecPlugin(tp.ctx, "pktmeta", "DEL", tp.a, conf, nil); err != nil {
		t.Fatal(err)
	}
	out, err := tp.node.Run(tp.ctx, "tc", "filter", "show", "dev", tp.a.HostVeth, "ingress")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), "pktmeta") || !strings.Contains(string(out), "u32") {
		t.Fatalf("after DEL, ingress filters:\n%s\nwant the u32 filter and none of ours", out)
	}
}

// TestBandwidthChainedBefore: the bandwidth plugin puts an ingress qdisc
// and tbf on the host veth. tcx works beside them; the legacy path can only
// add its ingress filter there (no clsact next to an ingress qdisc) and
// says so.
func TestBandwidthChainedBefore(t *testing.T) {
	bw := map[string]any{"type": "bandwidth", "ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000}
	t.Run("tcx", func(t *testing.T) {
		requireMode(t, "tcx")
		tp := newTwoPods(t, envOptions{before: []map[string]any{bw}})
		d := tp.open()
		out, _ := tp.node.Run(tp.ctx, "tc", "qdisc", "show", "dev", tp.a.HostVeth)
		if !strings.Contains(string(out), "ingress") {
			t.Fatalf("bandwidth did not add its ingress qdisc:\n%s", out)
		}
		for _, c := range []trafficCase{trafficCases[0], trafficCases[4], trafficCases[5]} {
			_, seen, conn := tp.connect(c)
			defer conn.Close()
			rec, err := d.Lookup(seen)
			if err != nil || !rec.IsDelivered() {
				t.Fatalf("%s beside bandwidth: %+v %v", c.name, rec, err)
			}
		}
		if err := tp.node.CheckPod(tp.ctx, tp.a); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("legacy", func(t *testing.T) {
		tp := newTwoPods(t, envOptions{before: []map[string]any{bw}, conf: map[string]any{"attachMode": "legacy"}})
		d := tp.open()
		w := tp.workloadOf(d, tp.a)
		if !w.Legacy || !w.NoEgress {
			t.Fatalf("workload %+v, want legacy without egress", w)
		}
		// Traffic still flows: we never get in the way.
		conn := tp.dialTCP(tp.a, netip.AddrPortFrom(tp.b.IPv4, tcpPort))
		conn.Close()
		if err := tp.node.CheckPod(tp.ctx, tp.a); err != nil {
			t.Fatalf("CHECK: %v", err)
		}
		// bandwidth's prio-1 redirect to its ifb runs first and the packets
		// come back with classification skipped: status must say so.
		out, _ := tp.ctl("status")
		if !strings.Contains(out, "unavailable (ingress qdisc present") || !strings.Contains(out, "after foreign filters at prio [1]") {
			t.Fatalf("status does not explain the legacy limits beside bandwidth:\n%s", out)
		}
		// DEL removes our filter and leaves bandwidth's qdiscs alone.
		if _, err := tp.node.ExecPlugin(tp.ctx, "pktmeta", "DEL", tp.a, tp.pluginConf(t, tp.a), nil); err != nil {
			t.Fatal(err)
		}
		out2, _ := tp.node.Run(tp.ctx, "tc", "qdisc", "show", "dev", tp.a.HostVeth)
		filters, _ := tp.node.Run(tp.ctx, "tc", "filter", "show", "dev", tp.a.HostVeth, "parent", "ffff:")
		if !strings.Contains(string(out2), "ingress") || strings.Contains(string(filters), "pktmeta") || !strings.Contains(string(filters), "mirred") {
			t.Fatalf("after DEL: qdiscs\n%s\nfilters\n%s", out2, filters)
		}
	})
}

// TestADDPassesPrevResultThrough: for every spec version pktmeta speaks,
// ADD prints the prevResult unchanged. Repeating ADD for the same
// container replaces its attachment instead of adding a second one.
func TestADDPassesPrevResultThrough(t *testing.T) {
	e := newEnv(t, envOptions{})
	p := e.addPod("default", "a", nil)
	out, err := e.node.ExecPlugin(e.ctx, "pktmeta", "VERSION", nil, []byte(`{"cniVersion":"1.1.0"}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var vi struct {
		Supported []string `json:"supportedVersions"`
	}
	json.Unmarshal(out, &vi)
	if strings.Join(vi.Supported, ",") != "0.3.0,0.3.1,0.4.0,1.0.0,1.1.0" {
		t.Fatalf("VERSION: %s", out)
	}
	for _, v := range []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			prev, err := p.Result.GetAsVersion(v)
			if err != nil {
				t.Fatal(err)
			}
			prevJSON, _ := json.Marshal(prev)
			var prevMap map[string]any
			json.Unmarshal(prevJSON, &prevMap)
			conf := e.pktmetaConf(nil)
			conf["cniVersion"], conf["name"], conf["prevResult"] = v, "pmtb", prevMap
			b, _ := json.Marshal(conf)
			out, err := e.node.ExecPlugin(e.ctx, "pktmeta", "ADD", p, b, nil)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			var got map[string]any
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("stdout is not the result: %v\n%s", err, out)
			}
			gotJSON, _ := json.Marshal(got)
			wantJSON, _ := json.Marshal(prevMap)
			if string(gotJSON) != string(wantJSON) {
				t.Fatalf("result\n%s\nwant the prevResult\n%s", gotJSON, wantJSON)
			}
		})
	}
	d := e.open()
	if ws, _ := d.Workloads(); len(ws) != 1 {
		t.Fatalf("%d workloads after repeated ADDs of one pod, want 1", len(ws))
	}
	if err := e.node.CheckPod(e.ctx, p); err != nil {
		t.Fatal(err)
	}
}
