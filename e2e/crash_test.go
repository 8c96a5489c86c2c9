package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

// pluginRunner runs the pktmeta binary for one pod the way a runtime does
// (chained after ptp, with ptp's result as prevResult), so that a test can
// kill it at any moment.
type pluginRunner struct {
	e    *env
	pod  *testbed.Pod
	prev json.RawMessage
	rng  *rand.Rand
}

func newPluginRunner(t *testing.T, e *env, p *testbed.Pod) *pluginRunner {
	t.Helper()
	prev, err := json.Marshal(p.Result)
	if err != nil {
		t.Fatal(err)
	}
	return &pluginRunner{e: e, pod: p, prev: prev, rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7))}
}

func (r *pluginRunner) stdin(pin string) []byte {
	conf, _ := json.Marshal(map[string]any{
		"cniVersion": "1.0.0", "name": "pmtb", "type": "pktmeta",
		"pinPath": pin, "logFile": r.e.logFile, "logLevel": "info",
		"prevResult": r.prev,
	})
	return conf
}

// run runs one CNI command; with killAfter > 0 it SIGKILLs the plugin after
// that long (if it has not finished) and reports whether it was killed.
func (r *pluginRunner) run(cmd, pin string, killAfter time.Duration) (killed bool, out []byte, err error) {
	p := r.pod
	env := append(os.Environ(), "CNI_COMMAND="+cmd, "CNI_CONTAINERID="+p.ContainerID, "CNI_NETNS="+p.NetnsPath,
		"CNI_IFNAME="+p.IfName, "CNI_PATH="+binDir,
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s;K8S_POD_INFRA_CONTAINER_ID=%s",
			p.Spec.Namespace, p.Spec.Name, p.Spec.UID, p.ContainerID))
	nsErr := r.e.node.Do(func() error {
		c := exec.Command(filepath.Join(binDir, "pktmeta"))
		c.Env = env
		c.Stdin = bytes.NewReader(r.stdin(pin))
		var stdout, stderr bytes.Buffer
		c.Stdout, c.Stderr = &stdout, &stderr
		if err = c.Start(); err != nil {
			return nil
		}
		done := make(chan error, 1)
		go func() { done <- c.Wait() }()
		if killAfter > 0 {
			select {
			case err = <-done:
			case <-time.After(killAfter):
				c.Process.Signal(syscall.SIGKILL)
				err = <-done
				killed = true
			}
		} else {
			err = <-done
		}
		out = stdout.Bytes()
		if err != nil && !killed {
			err = fmt.Errorf("%s: %w: %s%s", cmd, err, stdout.Bytes(), stderr.Bytes())
		}
		return nil
	})
	if nsErr != nil {
		return false, nil, nsErr
	}
	return killed, out, err
}

// mustRun runs a CNI command that must succeed.
func (r *pluginRunner) mustRun(t *testing.T, cmd, pin string) time.Duration {
	t.Helper()
	start := time.Now()
	if _, _, err := r.run(cmd, pin, 0); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}

// checkWorksAndLeavesNothing: after whatever a killed plugin left, a full
// ADD, CHECK, a tagged connection and DEL must work, and DEL must leave
// nothing of the pod behind.
func (r *pluginRunner) checkWorksAndLeavesNothing(t *testing.T, pin string, host netip.AddrPort) {
	t.Helper()
	r.mustRun(t, "ADD", pin)
	r.mustRun(t, "CHECK", pin)
	c, err := r.pod.DialTCP(r.e.ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	tu := localTuple(c, datapath.ProtoTCP, host)
	d, err := datapath.OpenReader(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rec, err := d.Lookup(tu)
	w, ok, _ := d.FindAttachment(datapath.AttachmentKey{ContainerID: r.pod.ContainerID, IfName: r.pod.IfName})
	if err != nil || !ok || rec.OriginWorkload != w.ID {
		t.Fatalf("after recovery the pod's connection is not tagged: %+v %v (workload %d found %v)", rec, err, w.ID, ok)
	}
	c.Close()
	r.mustRun(t, "DEL", pin)
	requireEmpty(t, r.e, d, r.pod.HostIfindex)
}

// requireEmpty checks that nothing of any pod is left: workloads,
// endpoints, records, aliases, link pins, container locks, and programs on
// the veth.
func requireEmpty(t *testing.T, e *env, d *datapath.Datapath, hostIfindex int) {
	t.Helper()
	ws, _ := d.Workloads()
	eps, _ := d.ListEndpoints()
	recs, _ := d.Records()
	aliases, _ := d.Aliases()
	pins, _ := d.LinkPins()
	locks, _ := os.ReadDir(filepath.Join(d.PinPath, "locks"))
	if len(ws)+len(eps)+len(recs)+len(aliases)+len(pins)+len(locks) != 0 {
		t.Fatalf("left behind: %d workloads, %d endpoints, %d records, %d aliases, link pins %v, %d container locks",
			len(ws), len(eps), len(recs), len(aliases), pins, len(locks))
	}
	if hostIfindex > 0 {
		got := hooks(t, e, hostIfindex)
		if len(got.TCX[attach.Ingress])+len(got.TCX[attach.Egress])+len(got.Legacy) != 0 {
			t.Fatalf("programs left on the veth: %+v", got)
		}
	}
}

// TestKilledPluginNeverWedgesTheNode: SIGKILL at random moments of the
// first load on a node, and of ordinary ADDs. Afterwards ADD, CHECK,
// tagging and DEL work and nothing is orphaned.
func TestKilledPluginNeverWedgesTheNode(t *testing.T) {
	// A hundred ADDs, fifty of them first loads (the verifier, about two
	// seconds each here, more beside the other packages' tests): more
	// than the usual three minutes.
	e := newEnv(t, envOptions{timeout: 10 * time.Minute})
	// The chain stops at ptp: the test runs pktmeta itself, like the
	// runtime would after ptp, so that it can kill it.
	if err := e.node.SetChain(nil); err != nil {
		t.Fatal(err)
	}
	p := e.addPod("crash", "victim", nil)
	r := newPluginRunner(t, e, p)
	l, host := e.hostListener(p)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	bpffs := filepath.Dir(e.pin)

	t.Run("first load", func(t *testing.T) {
		// How long a first ADD takes here: kills land anywhere in it.
		pin := filepath.Join(bpffs, "measure")
		full := r.mustRun(t, "ADD", pin)
		r.mustRun(t, "DEL", pin)
		if err := datapath.Destroy(pin, nil); err != nil {
			t.Fatal(err)
		}
		killedMidway := r.killADDs(t, 50, full, host, func(i int) string { return filepath.Join(bpffs, fmt.Sprintf("first%d", i)) },
			func(i int, pin string) {
				if err := datapath.Destroy(pin, nil); err != nil {
					t.Fatalf("try %d: destroy: %v", i, err)
				}
				if _, err := os.Stat(pin); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("try %d: destroy left %s", i, pin)
				}
			})
		log, _ := os.ReadFile(e.logFile)
		repaired := strings.Count(string(log), "removing the pins of an interrupted load")
		t.Logf("first ADD takes %s; %d of 50 tries killed before it finished, %d of them leaving pins the next ADD threw away", full, killedMidway, repaired)
		if killedMidway < 25 || repaired == 0 {
			t.Fatalf("only %d of 50 kills landed inside the first load, %d after it had pinned anything", killedMidway, repaired)
		}
	})

	t.Run("ordinary ADD", func(t *testing.T) {
		pin := e.pin
		r.mustRun(t, "ADD", pin)
		r.mustRun(t, "DEL", pin)
		full := r.mustRun(t, "ADD", pin)
		r.mustRun(t, "DEL", pin)
		killedMidway := r.killADDs(t, 50, full, host, func(int) string { return pin }, nil)
		t.Logf("an ADD takes %s; %d of 50 tries killed before it finished", full, killedMidway)
		if killedMidway < 25 {
			t.Fatalf("only %d of 50 kills landed inside an ADD", killedMidway)
		}
	})
}

// killADDs runs n ADDs on pinOf(i), each SIGKILLed at a random moment
// within full (if it has not finished by then), checks after each that the
// node recovers (checkWorksAndLeavesNothing), runs after if given, and
// returns how many were killed before they finished.
func (r *pluginRunner) killADDs(t *testing.T, n int, full time.Duration, host netip.AddrPort, pinOf func(int) string, after func(i int, pin string)) int {
	t.Helper()
	killed := 0
	for i := range n {
		pin := pinOf(i)
		k, _, err := r.run("ADD", pin, time.Duration(r.rng.Int64N(int64(full))))
		if err != nil && !k {
			t.Fatalf("try %d: %v", i, err)
		}
		if k {
			killed++
		}
		r.checkWorksAndLeavesNothing(t, pin, host)
		if after != nil {
			after(i, pin)
		}
	}
	return killed
}

// ourLinks counts the BPF links in the kernel whose program is one of the
// datapath's: what is attached anywhere, pinned or not.
func ourLinks(t *testing.T, d *datapath.Datapath) int {
	t.Helper()
	ours := map[ebpf.ProgramID]bool{}
	for _, name := range []string{datapath.ProgOrigin, datapath.ProgStrict, datapath.ProgDeliver} {
		ours[progID(t, d.Program(name))] = true
	}
	n := 0
	it := new(link.Iterator)
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err == nil && ours[info.Program] {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestChurn: 500 pods come and go through the real chain, each opening a
// connection, four at a time. Nothing leaks: workloads, endpoints,
// records, aliases, link pins, locks, tcx links, and no program is loaded
// again.
func TestChurn(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	progsBefore := progID(t, d.Origin)
	linksBefore := ourLinks(t, d)
	const cycles, workers = 500, 4
	jobs := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				p, err := tp.node.AddPod(tp.ctx, testbed.PodSpec{Namespace: "churn", Name: fmt.Sprintf("c%d", i)})
				if err != nil {
					errs <- err
					return
				}
				dst := netip.AddrPortFrom(vip4, 80)
				if i%2 == 1 {
					dst = netip.AddrPortFrom(tp.b.IPv4, tcpPort)
				}
				c, err := p.DialTCP(tp.ctx, dst)
				if err == nil {
					err = testbed.EchoRoundTrip(c, []byte("x"), 5*time.Second)
					// Half of them leave without closing: DEL must clean up.
					if i%4 == 0 {
						c.Close()
					}
				}
				if err != nil {
					errs <- fmt.Errorf("cycle %d: %w", i, err)
					return
				}
				if err := tp.node.DelPod(tp.ctx, p); err != nil {
					errs <- fmt.Errorf("cycle %d: %w", i, err)
					return
				}
			}
		}()
	}
	for i := range cycles {
		select {
		case jobs <- i:
		case err := <-errs:
			close(jobs)
			wg.Wait()
			t.Fatal(err)
		}
	}
	close(jobs)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	ws, _ := d.Workloads()
	eps, _ := d.ListEndpoints()
	recs, _ := d.Records()
	aliases, _ := d.Aliases()
	pins, _ := d.LinkPins()
	locks, _ := os.ReadDir(filepath.Join(tp.pin, "locks"))
	// Only the two long-lived pods remain.
	if len(ws) != 2 || len(eps) != 2 || len(recs) != 0 || len(aliases) != 0 || len(pins) != 2 || len(locks) != 2 {
		t.Fatalf("after %d cycles: %d workloads, %d endpoints, %d records, %d aliases, link pins %v, %d locks; want 2, 2, 0, 0, 2, 2",
			cycles, len(ws), len(eps), len(recs), len(aliases), pins, len(locks))
	}
	if got := ourLinks(t, d); got != linksBefore {
		t.Fatalf("%d tcx links of ours after the churn, %d before", got, linksBefore)
	}
	d2 := tp.open()
	if id := progID(t, d2.Origin); id != progsBefore {
		t.Fatalf("programs reloaded during the churn: id %d then %d", progsBefore, id)
	}
	if s, _ := d.ReadStats(); s.Tagged < cycles {
		t.Fatalf("%d connections tagged, want at least %d", s.Tagged, cycles)
	}
}

// TestParallelADDsOnAnEmptyNode: kubelet starts 32 pods at once on a node
// where nothing is loaded yet; they race for the first load. Then they are
// deleted all at once.
func TestParallelADDsOnAnEmptyNode(t *testing.T) {
	e := newEnv(t, envOptions{})
	const n = 32
	pods := make([]*testbed.Pod, n)
	parallel(t, n, func(i int) error {
		p, err := e.node.AddPod(e.ctx, testbed.PodSpec{Namespace: "par", Name: fmt.Sprintf("p%d", i)})
		pods[i] = p
		return err
	})
	d := e.open()
	ws, _ := d.Workloads()
	if len(ws) != n {
		t.Fatalf("%d workloads, want %d", len(ws), n)
	}
	ids := map[uint32]bool{}
	for _, w := range ws {
		ids[w.ID] = true
	}
	if len(ids) != n {
		t.Fatal("workload ids collide")
	}
	st := e.status()
	for _, a := range st.Attachments {
		if a.Ingress != "ok" || a.Egress != "ok" {
			t.Fatalf("attachment %+v", a)
		}
	}
	parallel(t, n, func(i int) error { return e.node.DelPod(context.Background(), pods[i]) })
	requireEmpty(t, e, d, 0)
}

// TestUpgradeRacingADDs: a newer plugin meets an older datapath while 16
// pods are being added; every ADD succeeds and every pod, old and new, ends
// up on the new programs.
func TestUpgradeRacingADDs(t *testing.T) {
	e := newEnv(t, envOptions{})
	old := []*testbed.Pod{e.addPod("up", "old1", nil), e.addPod("up", "old2", nil)}
	e.rewriteConfig(func(c *datapath.Config) { c.Release--; c.DatapathID = [32]byte{9} })
	const n = 16
	pods := make([]*testbed.Pod, n)
	parallel(t, n, func(i int) error {
		p, err := e.node.AddPod(e.ctx, testbed.PodSpec{Namespace: "up", Name: fmt.Sprintf("new%d", i)})
		pods[i] = p
		return err
	})
	d := e.open()
	if cur, _ := d.Current(); !cur {
		t.Fatal("not upgraded")
	}
	origin, deliver := progID(t, d.Origin), progID(t, d.Deliver)
	for _, p := range append(old, pods...) {
		got := hooks(t, e, p.HostIfindex)
		if !got.Has(attach.Ingress, origin) || !got.Has(attach.Egress, deliver) || len(got.TCX[attach.Ingress]) != 1 || len(got.TCX[attach.Egress]) != 1 {
			t.Fatalf("pod %s: hooks %+v, want only the new programs %d/%d", p.Spec.Name, got, origin, deliver)
		}
	}
	// A downgrade is refused, and says why.
	e.rewriteConfig(func(c *datapath.Config) { c.Release++ })
	_, err := e.node.AddPod(e.ctx, testbed.PodSpec{Namespace: "up", Name: "older-plugin"})
	if err == nil || !strings.Contains(err.Error(), "refusing to downgrade") {
		t.Fatalf("ADD against a newer datapath: %v, want a refusal that says so", err)
	}
}

// parallel runs fn(0..n-1) at once and fails t on the first error.
func parallel(t *testing.T, n int, fn func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

var _ = net.IPv4len
