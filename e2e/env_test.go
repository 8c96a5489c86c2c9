// Package e2e runs pktmeta the way a node does: the real CNI chain (ptp +
// host-local, optionally bandwidth, then pktmeta) invoked through libcni
// from a node network namespace, pods as network namespaces, Services as
// nftables DNAT, and real TCP and UDP traffic between them. Every test
// pins into its own private bpffs mount.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

var (
	binDir    string // pktmeta, pktmetactl
	repoDir   string // the source tree (examples)
	cniBinDir string // ptp, host-local, bandwidth
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipped, needs root (netns, BPF, bpffs); CI runs it as root")
		return 0
	}
	_, here, _, _ := runtime.Caller(0)
	repo := filepath.Dir(filepath.Dir(here))
	repoDir = repo
	binDir = os.Getenv("PKTMETA_BIN")
	if binDir == "" {
		// Not run through make: build the binaries under test ourselves.
		tmp, err := os.MkdirTemp("", "pktmeta-e2e-bin-")
		if err != nil {
			fmt.Println(err)
			return 1
		}
		defer os.RemoveAll(tmp)
		for _, cmd := range []string{"pktmeta", "pktmetactl", "pktmeta-demo", "pktmeta-agent"} {
			build := exec.Command("go", "build", "-o", filepath.Join(tmp, cmd), "./cmd/"+cmd)
			build.Dir = repo
			out, err := build.CombinedOutput()
			if err != nil {
				fmt.Printf("build %s: %v\n%s", cmd, err, out)
				return 1
			}
		}
		binDir = tmp
	}
	cniBinDir = os.Getenv("PKTMETA_CNI_BIN")
	if cniBinDir == "" {
		cniBinDir = filepath.Join(repo, "bin", "cni")
	}
	for _, p := range []string{"ptp", "host-local", "bandwidth"} {
		if _, err := os.Stat(filepath.Join(cniBinDir, p)); err != nil {
			fmt.Printf("e2e: CNI plugin %s not found in %s: run `make cni-plugins` (make test does)\n", p, cniBinDir)
			return 1
		}
	}
	if err := testbed.CleanupStale(); err != nil {
		fmt.Println("e2e: cleaning up after an earlier killed run:", err)
	}
	return m.Run()
}

type envOptions struct {
	// before are plugins chained between ptp and pktmeta (bandwidth).
	before []map[string]any
	// conf is merged into pktmeta's plugin config.
	conf       map[string]any
	cniVersion string
	// timeout bounds everything the test does through the env's context
	// (3 minutes if 0).
	timeout time.Duration
}

type env struct {
	t       *testing.T
	ctx     context.Context
	node    *testbed.Node
	pin     string
	logFile string
}

func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	testutil.RequireRoot(t)
	if o.timeout == 0 {
		o.timeout = 3 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, pin: testutil.PinPath(t), logFile: filepath.Join(t.TempDir(), "pktmeta.log")}
	cfg := testbed.Config{
		CNIPath:    []string{cniBinDir, binDir},
		Subnet6:    "fd00:10:244:1::/64",
		NoDAD:      true,
		CNIVersion: o.cniVersion,
		Chain:      append(append([]map[string]any{}, o.before...), e.pktmetaConf(o.conf)),
	}
	n, err := testbed.NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.node = n
	// Registered after PinPath's unmount, so it runs first: DEL needs the pins.
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Errorf("close node: %v", err)
		}
		if t.Failed() {
			if b, err := os.ReadFile(e.logFile); err == nil {
				t.Logf("pktmeta log:\n%s", b)
			}
		}
	})
	return e
}

func (e *env) pktmetaConf(extra map[string]any) map[string]any {
	c := map[string]any{
		"type":         "pktmeta",
		"pinPath":      e.pin,
		"logFile":      e.logFile,
		"logLevel":     "debug",
		"tags":         map[string]any{"cluster": "e2e"},
		"capabilities": map[string]any{testbed.PodAnnotationsCapability: true},
	}
	for k, v := range extra {
		c[k] = v
	}
	return c
}

func (e *env) addPod(ns, name string, annotations map[string]string) *testbed.Pod {
	e.t.Helper()
	p, err := e.node.AddPod(e.ctx, testbed.PodSpec{Namespace: ns, Name: name, Annotations: annotations})
	if err != nil {
		e.t.Fatalf("add pod %s/%s: %v", ns, name, err)
	}
	return p
}

func (e *env) open() *datapath.Datapath {
	e.t.Helper()
	d, err := datapath.OpenReader(e.pin)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { d.Close() })
	return d
}

// rewriteConfig changes the pinned config slot, as another build of
// pktmeta would have left it.
func (e *env) rewriteConfig(change func(*datapath.Config)) {
	e.t.Helper()
	d, err := datapath.OpenExisting(e.pin, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	defer d.Close()
	cfg, err := d.ReadConfig()
	if err != nil {
		e.t.Fatal(err)
	}
	change(&cfg)
	if err := d.WriteConfig(cfg); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) workloadOf(d *datapath.Datapath, p *testbed.Pod) datapath.Workload {
	e.t.Helper()
	w, ok, err := d.FindAttachment(datapath.AttachmentKey{ContainerID: p.ContainerID, IfName: p.IfName})
	if err != nil || !ok {
		e.t.Fatalf("no workload for pod %s/%s: %v", p.Spec.Namespace, p.Spec.Name, err)
	}
	return w
}

// server runs TCP and UDP echo servers in p.
func (e *env) server(p *testbed.Pod, tcpPort, udpPort int) {
	e.t.Helper()
	l, err := p.ListenTCP(tcpPort)
	if err != nil {
		e.t.Fatal(err)
	}
	tcp := testbed.ServeTCPEcho(l)
	e.t.Cleanup(func() { tcp.Close() })
	u, err := p.ListenUDP(udpPort)
	if err != nil {
		e.t.Fatal(err)
	}
	srv := testbed.ServeUDPEcho(u)
	e.t.Cleanup(func() { srv.Close() })
}

// dialTCP connects from p to dst and completes one echo round trip.
func (e *env) dialTCP(p *testbed.Pod, dst netip.AddrPort) net.Conn {
	e.t.Helper()
	c, err := p.DialTCP(e.ctx, dst)
	if err != nil {
		e.t.Fatalf("dial %s: %v", dst, err)
	}
	if err := testbed.EchoRoundTrip(c, []byte("ping"), 5*time.Second); err != nil {
		e.t.Fatalf("echo via %s: %v", dst, err)
	}
	return c
}

func (e *env) dialUDP(p *testbed.Pod, dst netip.AddrPort) net.Conn {
	e.t.Helper()
	c, err := p.DialUDP(dst)
	if err != nil {
		e.t.Fatalf("dial udp %s: %v", dst, err)
	}
	if err := testbed.EchoRoundTrip(c, []byte("ping"), 5*time.Second); err != nil {
		e.t.Fatalf("udp echo via %s: %v", dst, err)
	}
	return c
}

func localTuple(c net.Conn, proto uint8, dst netip.AddrPort) datapath.Tuple {
	src := netip.MustParseAddrPort(c.LocalAddr().String())
	return datapath.Tuple{Proto: proto, Src: netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), Dst: dst}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ctl runs pktmetactl against the test's pin path, in the node netns
// where the pod veths are, as an operator on the node would.
func (e *env) ctl(args ...string) (string, int) {
	e.t.Helper()
	return runCtl(e.ctx, e.t, e.node.Do, append([]string{"--pin-path", e.pin, "--api-socket", ""}, args...)...)
}

// runCtl runs pktmetactl through do (a node's Do: in its network
// namespace) and returns its stdout, with stderr after it when it fails,
// and its exit status.
func runCtl(ctx context.Context, t *testing.T, do func(func() error) error, args ...string) (string, int) {
	t.Helper()
	var (
		out []byte
		err error
	)
	nsErr := do(func() error {
		out, err = exec.CommandContext(ctx, filepath.Join(binDir, "pktmetactl"), args...).Output()
		return nil
	})
	if nsErr != nil {
		t.Fatal(nsErr)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out) + string(ee.Stderr), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("pktmetactl %s: %v", strings.Join(args, " "), err)
	}
	return string(out), 0
}

func (e *env) ctlJSON(v any, args ...string) {
	e.t.Helper()
	out, code := e.ctl(append(args, "-o", "json")...)
	if code != 0 {
		e.t.Fatalf("pktmetactl %s: exit %d: %s", strings.Join(args, " "), code, out)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		e.t.Fatalf("pktmetactl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}
