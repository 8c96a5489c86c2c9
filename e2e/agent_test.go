package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/view"
)

// agentEnv is a netns node whose CNI config lives in a conf dir the agent
// manages, with the agent running in the node netns as on a host.
type agentEnv struct {
	*env
	confDir, binDir, stateDir, runDir string
	primary                           string // the primary's conflist path
	original                          []byte
	metricsAddr                       string

	mu     sync.Mutex
	cmd    *exec.Cmd
	stdout *bytes.Buffer
	stderr *bytes.Buffer
}

func newAgentEnv(t *testing.T) *agentEnv {
	e := newEnv(t, envOptions{})
	// The node starts without pktmeta in its chain: ptp only.
	if err := e.node.SetChain(nil); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ae := &agentEnv{env: e, confDir: filepath.Join(dir, "net.d"), binDir: filepath.Join(dir, "bin"),
		stateDir: filepath.Join(dir, "state"), runDir: filepath.Join(dir, "run"), metricsAddr: "127.0.0.1:19964"}
	for _, d := range []string{ae.confDir, ae.binDir} {
		os.MkdirAll(d, 0o755)
	}
	// The primary's file, as kindnet would write it (not pretty-printed
	// the way we would, so byte-for-byte restore means something).
	ae.original = append(bytes.ReplaceAll(e.node.ConfList().Bytes, []byte("\n"), []byte("")), '\n')
	ae.primary = filepath.Join(ae.confDir, "10-ptp.conflist")
	if err := os.WriteFile(ae.primary, ae.original, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ae.stop)
	return ae
}

func (ae *agentEnv) args(cmd string, extra ...string) []string {
	return append([]string{cmd,
		"--cni-conf-dir", ae.confDir, "--cni-bin-dir", ae.binDir, "--plugin-binary", filepath.Join(binDir, "pktmeta"),
		"--pin-path", ae.pin, "--state-dir", ae.stateDir, "--run-dir", ae.runDir, "--metrics-addr", ae.metricsAddr,
		"--gc-interval", "1s", "--cri-socket", "", "--uninstall-on-exit", "never", "--netns-dirs", "/run/netns",
	}, extra...)
}

// start runs `pktmeta-agent run` in the node netns.
func (ae *agentEnv) start() {
	ae.t.Helper()
	ae.mu.Lock()
	defer ae.mu.Unlock()
	ae.stdout, ae.stderr = &bytes.Buffer{}, &bytes.Buffer{}
	cmd := exec.Command(filepath.Join(binDir, "pktmeta-agent"), ae.args("run")...)
	cmd.Stdout, cmd.Stderr = &lockedWriter{w: ae.stdout, mu: &ae.mu}, &lockedWriter{w: ae.stderr, mu: &ae.mu}
	if err := ae.node.Do(cmd.Start); err != nil {
		ae.t.Fatal(err)
	}
	ae.cmd = cmd
}

func (ae *agentEnv) stop() {
	ae.mu.Lock()
	cmd := ae.cmd
	ae.cmd = nil
	ae.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
	if ae.t.Failed() {
		ae.mu.Lock()
		ae.t.Logf("agent stderr:\n%s", ae.stderr.String())
		ae.mu.Unlock()
	}
}

func (ae *agentEnv) kill() {
	ae.mu.Lock()
	cmd := ae.cmd
	ae.cmd = nil
	ae.mu.Unlock()
	cmd.Process.Kill()
	cmd.Wait()
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// metric fetches /metrics in the node netns and returns the value of the
// first sample whose line starts with prefix.
func (ae *agentEnv) metric(prefix string) (float64, error) {
	// The socket must be made in the node netns; the HTTP client would dial
	// from whatever thread its goroutine lands on.
	var conn net.Conn
	if err := ae.node.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", ae.metricsAddr, 2*time.Second)
		return err
	}); err != nil {
		return 0, err
	}
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext:       func(context.Context, string, string) (net.Conn, error) { return conn, nil },
	}}
	resp, err := c.Get("http://" + ae.metricsAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, prefix) {
			var v float64
			fields := strings.Fields(line)
			fmt.Sscan(fields[len(fields)-1], &v)
			return v, nil
		}
	}
	return 0, fmt.Errorf("no metric %s", prefix)
}

// chainFromConfDir makes pods added from now on use the conflist the agent
// wrote, so what runs is what the agent installed.
func (ae *agentEnv) chainFromConfDir() {
	ae.t.Helper()
	list, err := libcni.ConfListFromFile(ae.primary)
	if err != nil {
		ae.t.Fatal(err)
	}
	var chain []map[string]any
	for _, p := range list.Plugins[1:] {
		var m map[string]any
		json.Unmarshal(p.Bytes, &m)
		chain = append(chain, m)
	}
	if err := ae.node.SetChain(chain); err != nil {
		ae.t.Fatal(err)
	}
}

func hasPktmeta(path string) bool {
	list, err := libcni.ConfListFromFile(path)
	if err != nil {
		return false
	}
	for _, p := range list.Plugins {
		if p.Network.Type == "pktmeta" {
			return true
		}
	}
	return false
}

// TestAgentOnANode: the agent installs into the chain, covers pods that
// existed before it, keeps its entry when the primary rewrites the file,
// exports events and metrics and the API; tagging survives the agent being
// killed; uninstall restores the conflist byte for byte and leaves no pins.
func TestAgentOnANode(t *testing.T) {
	ae := newAgentEnv(t)
	// Pods from before pktmeta: no attachment.
	old := ae.addPod("legacy", "old-client", nil)
	srv := ae.addPod("legacy", "old-server", nil)
	ae.server(srv, tcpPort, udpPort)

	ae.start()
	eventually(t, "pktmeta in the chain and binary installed", func() error {
		if !hasPktmeta(ae.primary) {
			return fmt.Errorf("no pktmeta entry in %s", ae.primary)
		}
		_, err := os.Stat(filepath.Join(ae.binDir, "pktmeta"))
		return err
	})
	d := ae.open()
	eventually(t, "existing pods covered", func() error {
		ws, err := d.Workloads()
		if err != nil {
			return err
		}
		if len(ws) != 2 {
			return fmt.Errorf("%d workloads", len(ws))
		}
		for _, w := range ws {
			if !w.Partial || !strings.HasPrefix(w.ContainerID, "netns-") {
				return fmt.Errorf("existing pod without a CRI got %+v, want a partial identity", w)
			}
		}
		for _, p := range []*testbed.Pod{old, srv} {
			if got := hooks(t, ae.env, p.HostIfindex); len(got.TCX["ingress"]) == 0 || len(got.TCX["egress"]) == 0 {
				return fmt.Errorf("pod %s not attached yet", p.Spec.Name)
			}
		}
		return nil
	})
	conn := ae.dialTCP(old, netip.AddrPortFrom(srv.IPv4, tcpPort))
	rec, err := d.Lookup(localTuple(conn, datapath.ProtoTCP, netip.AddrPortFrom(srv.IPv4, tcpPort)))
	if err != nil || !rec.IsDelivered() {
		t.Fatalf("existing pods' connection: %+v %v", rec, err)
	}
	conn.Close()
	// The agent put the application interface on before any ADD did, and
	// a server in a pod from before the install can ask its sockets.
	if st := d.Apps(); !st.Attached || !st.Current {
		t.Fatalf("application interface after the agent started: %+v", st)
	}
	asker := startAppServer(t, srv, d)
	ac, err := old.DialTCP(ae.ctx, netip.AddrPortFrom(srv.IPv4, appTCPPort))
	if err != nil {
		t.Fatal(err)
	}
	if a := asker.next(t); a.err != nil || a.o.ConnID == 0 || !a.o.Partial {
		t.Fatalf("server in a pod from before the install asked its socket: %+v, %v; want a partial identity", a.o, a.err)
	}
	ac.Close()
	// Its unconnected UDP socket too: the agent's cover gave the pod's
	// netns its addresses.
	asker.udpOnce(t, srv)
	uc, err := old.DialUDP(netip.AddrPortFrom(srv.IPv4, appUDPPort))
	if err != nil {
		t.Fatal(err)
	}
	uc.Write([]byte("who"))
	if a := asker.next(t); a.err != nil || !a.o.Partial || (asker.udpUnconnected && a.unconnected.ConnID != a.o.ConnID) {
		t.Fatalf("UDP server in a pod from before the install: %+v, unconnected %+v, %v", a.o, a.unconnected, a.err)
	}
	uc.Close()

	// New pods go through the chain the agent wrote, annotations included.
	ae.chainFromConfDir()
	a := ae.addPod("shop", "web", map[string]string{"pktmeta.dev/team": "storefront"})
	conn = ae.dialTCP(a, netip.AddrPortFrom(srv.IPv4, tcpPort))
	defer conn.Close()
	origin := localTuple(conn, datapath.ProtoTCP, netip.AddrPortFrom(srv.IPv4, tcpPort))

	// The API, through pktmetactl as an operator runs it.
	out, code := ae.runCtl("--api-socket", filepath.Join(ae.runDir, "api.sock"), "lookup", "-o", "json",
		"--proto", "tcp", "--src", origin.Src.String(), "--dst", origin.Dst.String())
	var c view.Conn
	if code != 0 || json.Unmarshal([]byte(out), &c) != nil || c.Origin.Pod != "web" || c.PodTags["team"] != "storefront" {
		t.Fatalf("lookup through the agent API: exit %d\n%s", code, out)
	}
	// Events on stdout, metrics by workload.
	eventually(t, "events and metrics", func() error {
		ae.mu.Lock()
		events := ae.stdout.String()
		ae.mu.Unlock()
		if !strings.Contains(events, `"event":"delivered"`) || !strings.Contains(events, `"pod":"web"`) {
			return fmt.Errorf("stdout events: %q", events)
		}
		v, err := ae.metric(`pktmeta_connections_delivered_total{nat="false",origin_namespace="shop",origin_workload="web"`)
		if err != nil || v < 1 {
			return fmt.Errorf("delivered metric %v %v", v, err)
		}
		if v, err := ae.metric(`pktmeta_agent_actions_total{action="attach"}`); err != nil || v != 2 {
			return fmt.Errorf("attach actions %v %v", v, err)
		}
		return nil
	})
	// Per pod: its records against its budget, and what it was refused. The
	// pod forges one datagram from an address not its own.
	newForger(t, a).send(udpPkt(netip.MustParseAddrPort("10.244.1.250:53"), netip.AddrPortFrom(srv.IPv4, udpPort)))
	eventually(t, "per-pod metrics", func() error {
		if v, err := ae.metric(`pktmeta_pod_records{namespace="shop",pod="web"}`); err != nil || v < 1 {
			return fmt.Errorf("records of the pod %v %v", v, err)
		}
		if v, err := ae.metric(`pktmeta_pod_max_records{namespace="shop",pod="web"}`); err != nil || v <= 0 {
			return fmt.Errorf("budget of the pod %v %v", v, err)
		}
		if v, err := ae.metric(`pktmeta_pod_refused_total{namespace="shop",pod="web",reason="spoofed"}`); err != nil || v != 1 {
			return fmt.Errorf("spoofed count of the pod %v %v", v, err)
		}
		return nil
	})

	// The primary rewrites its file (kindnet does): pktmeta is back soon.
	if err := os.WriteFile(ae.primary, ae.original, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	eventually(t, "entry repaired", func() error {
		if !hasPktmeta(ae.primary) {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("repair took %s", took)
	}

	// The agent dies: tagging goes on from the pins.
	ae.kill()
	conn2 := ae.dialTCP(a, netip.AddrPortFrom(srv.IPv6, tcpPort))
	defer conn2.Close()
	if _, err := d.Lookup(localTuple(conn2, datapath.ProtoTCP, netip.AddrPortFrom(srv.IPv6, tcpPort))); err != nil {
		t.Fatalf("tagging after the agent died: %v", err)
	}

	// Uninstall: the conflist byte for byte, no binary, no pins.
	if err := ae.node.Do(func() error {
		out, err := exec.Command(filepath.Join(binDir, "pktmeta-agent"), ae.args("uninstall")...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("%v: %s", err, out)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(ae.primary)
	if !bytes.Equal(got, ae.original) {
		t.Fatalf("conflist after uninstall:\n%s\nwant, byte for byte:\n%s", got, ae.original)
	}
	if st, _ := os.Stat(ae.primary); st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	if _, err := os.Stat(filepath.Join(ae.binDir, "pktmeta")); !os.IsNotExist(err) {
		t.Fatal("plugin binary left")
	}
	if pins := pinnedFiles(t, ae.pin); len(pins) != 0 {
		t.Fatalf("pins left: %v", pins)
	}
	for _, p := range []*testbed.Pod{old, srv, a} {
		got := hooks(t, ae.env, p.HostIfindex)
		if len(got.TCX["ingress"])+len(got.TCX["egress"]) != 0 {
			t.Fatalf("pod %s still has programs: %+v", p.Spec.Name, got)
		}
	}
}

// runCtl runs pktmetactl in the node netns with explicit flags.
func (ae *agentEnv) runCtl(args ...string) (string, int) {
	var (
		out  []byte
		code int
	)
	ae.node.Do(func() error {
		cmd := exec.Command(filepath.Join(binDir, "pktmetactl"), append([]string{"--pin-path", ae.pin}, args...)...)
		var err error
		out, err = cmd.CombinedOutput()
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		return nil
	})
	return string(out), code
}
