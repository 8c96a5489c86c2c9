package crihost

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// TestCRIChain proves the harness with the real thing: containerd's CRI
// creates two pod sandboxes and runs the CNI chain ptp + host-local +
// pktmeta for them; a client pod connects to a server pod; the record
// pktmeta's datapath keeps for the connection names the client pod as
// containerd described it (namespace, name, UID from CNI_ARGS, a tag from
// a pod annotation through the io.kubernetes.cri.pod-annotations
// capability) and says it was delivered to the server pod. Removing the
// pods through the CRI must run CNI DEL, which empties pktmeta's workload
// table; Close must leave nothing behind.
func TestCRIChain(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("crihost: needs root to run containerd, mount bpffs and create pod network namespaces; CI runs it as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// Installing is part of the test: a machine without containerd must
	// fail here, not skip.
	tools, err := EnsureTools(ctx)
	if err != nil {
		t.Fatalf("containerd, runc and crictl are needed and could not be installed: %v", err)
	}
	if err := CleanupStale(); err != nil {
		t.Logf("cleaning up after an earlier killed run: %v", err)
	}
	tmp := t.TempDir()
	images, err := BuildTestImages(ctx, filepath.Join(tmp, "images"))
	if err != nil {
		t.Fatal(err)
	}
	cniBin := cniPlugins(t, filepath.Join(tmp, "cni-bin"))
	addPktmeta(t, ctx, cniBin)
	pin := testutil.PinPath(t)
	logFile := filepath.Join(tmp, "pktmeta.log")

	t0 := time.Now()
	h, err := Start(ctx, Options{Tools: tools, CNIBinDir: cniBin, Images: images.All()})
	if err != nil {
		t.Fatal(err)
	}
	tStart := time.Since(t0)
	t.Logf("containerd %s up in %s (snapshotter %s)", h.Dir, tStart.Round(time.Millisecond), h.Snapshotter)
	// Registered after PinPath's unmount, so it runs first: CNI DEL needs
	// the pins.
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, h, logFile)
		}
		if err := h.Close(); err != nil {
			t.Errorf("close host: %v", err)
		}
		if left := h.Leftovers(); len(left) > 0 {
			t.Errorf("left behind after Close: %v", left)
		}
	})

	// The conflist appears after containerd started, as when a node agent
	// installs it; RunPod waits for the CRI to load it.
	writeConflist(t, h.CNIConfDir(), filepath.Join(tmp, "ipam"), map[string]any{
		"type":         "pktmeta",
		"pinPath":      pin,
		"logFile":      logFile,
		"logLevel":     "debug",
		"tags":         map[string]string{"cluster": "cri"},
		"capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true},
	})

	t1 := time.Now()
	server, serverCtr := runServer(t, ctx, h)
	client, err := h.RunPod(ctx, PodSpec{
		Name: "client", Namespace: "shop",
		Annotations: map[string]string{"pktmeta.dev/team": "payments", "unrelated": "x"},
	})
	if err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(server.IP(), 8080)
	clientCtr, err := h.RunContainer(ctx, client, ContainerSpec{
		Name: "client", Image: NetutilImage,
		Args: []string{"connect", "--tcp", dst.String(), "--hold", "60s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	conn := connectedLine(t, ctx, h, clientCtr)
	tPods := time.Since(t1)
	t.Logf("2 pods, 2 containers, connection %s -> %s in %s", conn.Local, conn.Remote, tPods.Round(time.Millisecond))

	// The server saw the client's own address: no NAT between pods.
	if _, err := h.WaitLog(ctx, serverCtr, `"remote":"`+conn.Local.String()+`"`); err != nil {
		t.Fatal(err)
	}

	d, err := datapath.OpenReader(pin)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	checkRecord(t, d, datapath.Tuple{Proto: datapath.ProtoTCP, Src: conn.Local, Dst: conn.Remote}, client, server)

	// UDP through Exec in the running client container: a second flow,
	// also tagged, and the Exec helper exercised.
	res, err := h.Exec(ctx, clientCtr, "/netutil", "connect", "--udp", netip.AddrPortFrom(server.IP(), 8081).String())
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec udp connect: %v %+v", err, res)
	}
	udp := parseConnected(t, res.Stdout)
	checkRecord(t, d, datapath.Tuple{Proto: datapath.ProtoUDP, Src: udp.Local, Dst: udp.Remote}, client, server)

	// CNI DEL through the CRI: stopping and removing the pods must empty
	// the workload table and drop the pods' records.
	t2 := time.Now()
	for _, p := range []*Pod{client, server} {
		if err := h.StopPod(ctx, p); err != nil {
			t.Fatal(err)
		}
		if err := h.RemovePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	wls, err := d.Workloads()
	if err != nil {
		t.Fatal(err)
	}
	if len(wls) != 0 {
		t.Errorf("workloads left after the pods were removed: %+v", wls)
	}
	if _, err := d.Lookup(datapath.Tuple{Proto: datapath.ProtoTCP, Src: conn.Local, Dst: conn.Remote}); !errors.Is(err, datapath.ErrNoRecord) {
		t.Errorf("record of the TCP connection survived its pods' DEL: %v", err)
	}
	tRemove := time.Since(t2)
	d.Close()

	t3 := time.Now()
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	tClose := time.Since(t3)
	if left := h.Leftovers(); len(left) > 0 {
		t.Fatalf("left behind after Close: %v", left)
	}
	t.Logf("timings: start %s, 2 pods + connection %s, stop+remove pods %s, close %s; total %s",
		tStart.Round(time.Millisecond), tPods.Round(time.Millisecond), tRemove.Round(time.Millisecond),
		tClose.Round(time.Millisecond), time.Since(t0).Round(time.Millisecond))
}

// runServer starts the server pod with netutil's echo servers and waits
// until they listen.
func runServer(t *testing.T, ctx context.Context, h *Host) (*Pod, string) {
	t.Helper()
	p, err := h.RunPod(ctx, PodSpec{Name: "server", Namespace: "shop", Labels: map[string]string{"app": "server"}})
	if err != nil {
		t.Fatal(err)
	}
	if !p.IP().IsValid() || p.Netns == "" {
		t.Fatalf("server pod has no IP or netns: %+v", p)
	}
	id, err := h.RunContainer(ctx, p, ContainerSpec{
		Name: "server", Image: NetutilImage,
		Args: []string{"serve", "--tcp", ":8080", "--udp", ":8081"},
		Env:  []string{"ROLE=server"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WaitLog(ctx, id, `"listening"`); err != nil {
		t.Fatal(err)
	}
	// The environment reached the process (cri-api's env values are bytes
	// in crictl's JSON; see containerConfig).
	st, err := h.InspectContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", st.Pid))
	if err != nil || !strings.Contains(string(env), "ROLE=server\x00") {
		t.Fatalf("server environment %q (%v) lacks ROLE=server", env, err)
	}
	return p, id
}

type connected struct {
	Local, Remote netip.AddrPort
}

// connectedLine waits for netutil connect's JSON line in the container log.
func connectedLine(t *testing.T, ctx context.Context, h *Host, id string) connected {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	logs, err := h.WaitLog(wctx, id, `"connected"`)
	if err != nil {
		t.Fatal(err)
	}
	return parseConnected(t, logs)
}

func parseConnected(t *testing.T, out string) connected {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		var v struct{ Event, Local, Remote string }
		if json.Unmarshal([]byte(strings.TrimSpace(l)), &v) != nil || v.Event != "connected" {
			continue
		}
		local, err1 := netip.ParseAddrPort(v.Local)
		remote, err2 := netip.ParseAddrPort(v.Remote)
		if err1 != nil || err2 != nil {
			t.Fatalf("bad addresses in %q: %v %v", l, err1, err2)
		}
		return connected{Local: local, Remote: remote}
	}
	t.Fatalf("no connected line in:\n%s", out)
	return connected{}
}

// checkRecord asserts the datapath's record for tuple names client as its
// origin, with containerd's pod metadata and annotation tag, and was
// delivered to server.
func checkRecord(t *testing.T, d *datapath.Datapath, tuple datapath.Tuple, client, server *Pod) {
	t.Helper()
	rec, err := d.Lookup(tuple)
	if err != nil {
		t.Fatalf("no record for %s: %v", tuple, err)
	}
	if rec.Tuple != tuple {
		t.Errorf("record tuple %s, want %s", rec.Tuple, tuple)
	}
	origin, ok, err := d.Workload(rec.OriginWorkload)
	if err != nil || !ok {
		t.Fatalf("origin workload %d of %s: ok=%v err=%v", rec.OriginWorkload, tuple, ok, err)
	}
	want := datapath.Workload{Namespace: "shop", Pod: "client", UID: client.Spec.UID, ContainerID: client.ID, Netns: client.Netns}
	if origin.Namespace != want.Namespace || origin.Pod != want.Pod || origin.UID != want.UID ||
		origin.ContainerID != want.ContainerID || origin.Netns != want.Netns {
		t.Errorf("%s: origin %+v, want namespace/pod/uid/container/netns of %+v", tuple, origin, want)
	}
	if origin.PodTags["team"] != "payments" || len(origin.PodTags) != 1 || origin.Tags["cluster"] != "cri" || len(origin.Tags) != 1 {
		t.Errorf("%s: origin tags %v, pod tags %v, want cluster=cri (config) and, claimed by the pod, team=payments (annotation) only", tuple, origin.Tags, origin.PodTags)
	}
	if !rec.IsDelivered() {
		t.Fatalf("%s: record not delivered: %+v", tuple, rec)
	}
	srv, ok, err := d.FindAttachment(datapath.AttachmentKey{ContainerID: server.ID, IfName: "eth0"})
	if err != nil || !ok {
		t.Fatalf("no workload for the server pod: ok=%v err=%v", ok, err)
	}
	if rec.PeerWorkload != srv.ID || srv.Pod != "server" || srv.UID != server.Spec.UID {
		t.Errorf("%s: delivered to workload %d, want the server's %d (%+v)", tuple, rec.PeerWorkload, srv.ID, srv)
	}
}

// cniPlugins fills dir with the CNI reference plugins the conflist uses,
// from bin/cni (`make cni-plugins`) or $PKTMETA_CNI_BIN.
func cniPlugins(t *testing.T, dir string) string {
	t.Helper()
	src := os.Getenv("PKTMETA_CNI_BIN")
	if src == "" {
		repo, err := repoRoot()
		if err != nil {
			t.Fatal(err)
		}
		src = filepath.Join(repo, "bin", "cni")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"ptp", "host-local", "loopback"} {
		if err := copyFile(filepath.Join(src, p), filepath.Join(dir, p)); err != nil {
			t.Fatalf("CNI plugin %s: %v (run `make cni-plugins`)", p, err)
		}
	}
	return dir
}

// addPktmeta puts a pktmeta built now (or $PKTMETA_BIN/pktmeta, as `make
// test` provides) into dir.
func addPktmeta(t *testing.T, ctx context.Context, dir string) {
	t.Helper()
	if bin := os.Getenv("PKTMETA_BIN"); bin != "" {
		if err := copyFile(filepath.Join(bin, "pktmeta"), filepath.Join(dir, "pktmeta")); err != nil {
			t.Fatal(err)
		}
		return
	}
	repo, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(dir, "pktmeta"), "./cmd/pktmeta")
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build pktmeta: %v\n%s", err, out)
	}
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// writeConflist writes ptp + host-local followed by chained, with
// cniVersion 1.0.0: containerd 1.6's libcni refuses the 1.1.0 results the
// plugins would return for a 1.1.0 conflist.
func writeConflist(t *testing.T, confDir, ipamDir string, chained ...map[string]any) {
	t.Helper()
	plugins := []any{
		map[string]any{
			"type":   "ptp",
			"ipMasq": false,
			"ipam": map[string]any{
				"type":    "host-local",
				"dataDir": ipamDir,
				"ranges":  [][]map[string]string{{{"subnet": "10.88.0.0/24"}}},
				"routes":  []map[string]string{{"dst": "0.0.0.0/0"}},
			},
		},
	}
	for _, c := range chained {
		plugins = append(plugins, c)
	}
	list := map[string]any{"cniVersion": "1.0.0", "name": "crihost", "plugins": plugins}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	// Write then rename: containerd reloads on every change in conf_dir
	// and must never read half a file.
	tmp := filepath.Join(confDir, ".10-crihost.conflist.tmp")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(confDir, "10-crihost.conflist")); err != nil {
		t.Fatal(err)
	}
}

func dumpLogs(t *testing.T, h *Host, pktmetaLog string) {
	for _, f := range []string{h.LogPath(), pktmetaLog} {
		if b, err := os.ReadFile(f); err == nil {
			t.Logf("%s:\n%s", f, b)
		}
	}
}
