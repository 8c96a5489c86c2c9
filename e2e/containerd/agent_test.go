// Package containerd runs pktmeta's node agent the way the DaemonSet runs
// it, as a container of a real container runtime: a private containerd 1.6
// with its CRI (internal/crihost) creates every pod sandbox and runs the
// CNI chain itself, exactly as kubelet + containerd do on a node. It is
// e2e/agent_test.go's scenario with the runtime and the container in it.
package containerd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/deploy"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/crihost"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Pod names as controllers make them, so that the metrics' workload labels
// (derived from the name without API access) are tested too.
const (
	clientPod = "client-6b7c9d8f5d-k2x7p" // a Deployment's pod: workload "client"
	serverPod = "server-0"                // a StatefulSet's pod: workload "server"
	legacyPod = "legacy-db-0"             // exists before pktmeta: workload "legacy-db"
	agentPod  = "pktmeta-x7k2p"           // the DaemonSet's pod
	nodeName  = "node-1"
)

// TestAgentInContainerd: the agent, in a container with the DaemonSet's
// args, mounts and capabilities, installs itself into the chain containerd
// uses; a pod from before the install is covered with its complete CRI
// identity; two new pods connect and the destination's view — pktmetactl
// through the agent's API, the agent's events, its metrics — names the
// client and its annotation tag; a rewrite of the primary conflist is
// repaired within seconds; tagging survives the agent being killed; the
// uninstall command (same image, same mounts) restores the conflist byte
// for byte and leaves no pins, no plugin and no programs on the pod veths.
func TestAgentInContainerd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: it runs containerd, mounts bpffs and creates pod network namespaces (CI runs it as root)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	t0 := time.Now()
	repo := repoRoot(t)
	tmp := t.TempDir()

	// The image build (~13 s here, mostly mkimage gzipping the layer at
	// best compression) is the slowest step: it runs while containerd starts and the first pod is
	// made. Registered after TempDir, so it is stopped before tmp goes.
	buildCtx, stopBuild := context.WithCancel(ctx)
	img := buildImage(buildCtx, repo, filepath.Join(tmp, "image"))
	t.Cleanup(func() { stopBuild(); <-img.done })

	// Installing containerd is part of the test: without it, fail.
	tools, err := crihost.EnsureTools(ctx)
	if err != nil {
		t.Fatalf("containerd, runc and crictl are needed and could not be installed: %v", err)
	}
	if err := crihost.CleanupStale(); err != nil {
		t.Logf("cleaning up after an earlier killed run: %v", err)
	}
	testImages, err := crihost.BuildTestImages(ctx, filepath.Join(tmp, "test-images"))
	if err != nil {
		t.Fatal(err)
	}
	// The CNI directories are the host's own (inside its shared directory):
	// containerd reads them, the agent container mounts them.
	h, err := crihost.Start(ctx, crihost.Options{Tools: tools, Images: testImages.All()})
	if err != nil {
		t.Fatal(err)
	}
	tStart := time.Since(t0)

	var (
		bpfDir     string
		containers = map[string]string{} // name -> id, whose logs a failure prints
		dumped     bool
	)
	dump := func() {
		if t.Failed() && !dumped {
			dumped = true
			dumpLogs(t, h, containers)
		}
	}
	t.Cleanup(func() {
		dump()
		// Removes the pods (CNI DEL through containerd), stops containerd and
		// removes everything else, the bpffs mount below its directory
		// included.
		if err := h.Close(); err != nil {
			t.Errorf("close containerd host: %v", err)
		}
		if left := h.Leftovers(); len(left) > 0 {
			t.Errorf("left behind by the containerd host: %v", left)
		}
		if bpfDir != "" {
			if err := unix.Unmount(bpfDir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				t.Errorf("unmount bpffs %s: %v", bpfDir, err)
			}
		}
	})

	// ---- The node before pktmeta ----------------------------------------
	confDir, binDir := h.CNIConfDir(), h.CNIBinDir()
	copyCNIPlugins(t, repo, binDir)
	mkdir := func(name string) string {
		p, err := h.MkdirShared(name)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	// The node's bpffs will be a private one, mounted (by the DaemonSet's
	// init container, below) in the host's shared directory: the
	// containers can mount it with propagation only from a shared mount.
	// The plugin runs in the host's mount namespace (from containerd) and
	// reads pinPath from the conflist, so the containers mount it at this
	// same path: one pin path string for the agent and the plugin.
	bpfDir = mkdir("bpf")
	pin := filepath.Join(bpfDir, "pktmeta")
	runDir, stateDir, cfgDir, tmpDir, ipamDir := mkdir("run"), mkdir("state"), mkdir("config"), mkdir("tmp"), mkdir("ipam")

	// The primary's conflist, the only file in the conf dir: ptp without
	// masquerading (the server must see the client's own address) and
	// host-local with its own dataDir. cniVersion 1.0.0: containerd 1.6's
	// libcni refuses 1.1.0 results. Compact, not the two-space form the
	// agent writes, so that a byte-for-byte restore proves something. The
	// subnet is ours alone: other tests' pods share the root netns.
	subnet := fmt.Sprintf("10.199.%d.0/24", os.Getpid()%250)
	original := []byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp","ipMasq":false,"mtu":1500,`+
		`"ipam":{"type":"host-local","dataDir":%q,"ranges":[[{"subnet":%q}]],"routes":[{"dst":"0.0.0.0/0"}]}}]}`+"\n", ipamDir, subnet))
	primary := filepath.Join(confDir, "10-ptp.conflist")
	if err := replaceFile(primary, original, 0o644); err != nil {
		t.Fatal(err)
	}

	// A pod from before pktmeta: its ADD ran ptp + host-local only.
	legacy := runPod(t, ctx, h, crihost.PodSpec{Name: legacyPod, Namespace: "legacy",
		Annotations: map[string]string{"pktmeta.dev/team": "legacy"}})
	if _, err := h.RunContainer(ctx, legacy, crihost.ContainerSpec{Name: "db", Image: crihost.NetutilImage,
		Args: []string{"serve", "--tcp", ":5432"}}); err != nil {
		t.Fatal(err)
	}

	// ---- The agent, as the DaemonSet runs it ----------------------------
	if err := img.wait(); err != nil {
		t.Fatalf("the pktmeta image could not be built: %v", err)
	}
	t.Logf("make image took %s", img.took.Round(time.Millisecond))
	if err := h.ImportImage(ctx, img.tar); err != nil {
		t.Fatal(err)
	}
	ds, cm := manifests(t, repo)
	if !ds.Spec.Template.Spec.HostNetwork {
		t.Fatal("the DaemonSet's pod is not hostNetwork; this test assumes it is")
	}
	// The ConfigMap's config.yaml, as mounted at /etc/pktmeta: the flags
	// below override what must differ on this node (as the DaemonSet's own
	// flags do).
	if err := os.WriteFile(filepath.Join(cfgDir, deploy.ConfigKey), []byte(cm.Data[deploy.ConfigKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(h.Socket) != h.Dir || filepath.Base(h.Socket) != "containerd.sock" {
		t.Fatalf("containerd socket %s: the cri mount below assumes <dir>/containerd.sock", h.Socket)
	}
	if err := os.MkdirAll(h.NetnsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	metricsAddr := freeAddr(t)
	flags := map[string]string{
		"pin-path":          pin,
		"metrics-addr":      metricsAddr,
		"node-name":         nodeName, // $(NODE_NAME), which kubelet expands
		"cri-socket":        "/run/containerd/containerd.sock",
		"netns-dirs":        h.NetnsDir(),
		"gc-interval":       "1s",
		"uninstall-on-exit": "never",
	}
	hostToContainer := crihost.PropagationHostToContainer
	volumes := map[string]hostMount{
		"cni-conf": {hostPath: confDir},
		"cni-bin":  {hostPath: binDir},
		"bpffs":    {hostPath: bpfDir, containerPath: bpfDir},
		// The CRI reports each pod's netns by its host path, which the agent
		// opens to match it with the veth's peer: mounted where the host has
		// it, as the DaemonSet does with /var/run/netns. (This containerd
		// keeps them under its state dir, away from other tests' netns.)
		"netns": {hostPath: h.NetnsDir(), containerPath: h.NetnsDir()},
		// The socket's directory, at the DaemonSet's /run/containerd. It
		// holds this containerd's whole tree, pods' netns and rootfs mounts
		// included: with HostToContainer (the DaemonSet's is private) their
		// unmounts reach the container too, so it never keeps a removed
		// pod's netns alive.
		"cri": {hostPath: h.Dir, propagation: &hostToContainer},
		// The host's cgroup filesystem, read-only: the agent puts the
		// application interface on its v2 root from inside the container.
		"cgroup": {hostPath: "/sys/fs/cgroup"},
		"run":    {hostPath: runDir},
		"state":  {hostPath: stateDir},
		"config": {hostPath: cfgDir},
		"tmp":    {hostPath: tmpDir},
	}
	env := []string{"NODE_NAME=" + nodeName, "POD_NAME=" + agentPod, "POD_NAMESPACE=" + deploy.Namespace}
	// The sandbox is privileged because the init container is (kubelet
	// does the same); the agent container is not.
	agentSandbox := runPod(t, ctx, h, crihost.PodSpec{Name: agentPod, Namespace: deploy.Namespace, HostNetwork: true,
		Privileged: true, Labels: ds.Spec.Template.Labels})

	// The init container mounts bpffs on the host (Bidirectional
	// propagation, privileged), as on a node without one.
	initSpec := podContainer(t, ds, "mount-bpffs", "mount-bpffs", "mount-bpffs", map[string]string{"bpffs": bpfDir}, volumes, env)
	initID, err := h.RunContainer(ctx, agentSandbox, initSpec)
	if initID != "" {
		containers["mount-bpffs"] = initID
	}
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	code, err := h.WaitContainerExit(wctx, initID)
	wcancel()
	if err != nil || code != 0 {
		t.Fatalf("init container mount-bpffs: exit %d, %v", code, err)
	}
	if err := datapath.CheckBPFFS(bpfDir); err != nil {
		t.Fatalf("after the init container, the host has no bpffs at %s: %v", bpfDir, err)
	}

	runSpec := podContainer(t, ds, "agent", "agent", "run", flags, volumes, env)
	t.Logf("agent: %s %s", runSpec.Image, strings.Join(runSpec.Args, " "))
	tAgent := time.Now()
	agentID, err := h.RunContainer(ctx, agentSandbox, runSpec)
	if agentID != "" {
		containers["agent"] = agentID
	}
	if err != nil {
		t.Fatal(err)
	}
	// Exactly the DaemonSet's capabilities (drop ALL, add the four), not
	// privileged, read-only root.
	st, err := h.InspectContainer(ctx, agentID)
	if err != nil || st.Pid == 0 {
		t.Fatalf("agent container: %+v %v", st, err)
	}
	if runSpec.Privileged || !runSpec.ReadOnlyRootfs || len(runSpec.CapDrop) != 1 || runSpec.CapDrop[0] != "ALL" {
		t.Fatalf("agent container spec %+v: want the DaemonSet's unprivileged, read-only, drop-ALL context", runSpec)
	}
	if got, err := procCapEff(st.Pid); err != nil || got != capMask(t, runSpec.CapAdd) {
		t.Fatalf("agent CapEff %#x (%v), want exactly %v (%#x)", got, err, runSpec.CapAdd, capMask(t, runSpec.CapAdd))
	}
	// Polls below fail at once, with the agent's log, when it has exited.
	agentUp := func() error {
		st, err := h.InspectContainer(ctx, agentID)
		if err == nil && st.State != "CONTAINER_RUNNING" {
			logs, _ := h.Logs(ctx, agentID)
			t.Fatalf("agent container %s (exit %d):\n%s", st.State, st.ExitCode, logs)
		}
		return err
	}

	// (1) pktmeta goes into the primary conflist and its binary into the
	// CNI bin dir; containerd loads the new chain.
	eventually(t, 20*time.Second, "pktmeta entry in "+primary, func() error {
		if err := agentUp(); err != nil {
			return err
		}
		if pktmetaEntry(primary) == nil {
			b, _ := os.ReadFile(primary)
			return fmt.Errorf("no pktmeta entry:\n%s", b)
		}
		return nil
	})
	tInstalled := time.Since(tAgent)
	entry := pktmetaEntry(primary)
	if entry["pinPath"] != pin {
		t.Errorf("entry pinPath %v, want %s (the agent's --pin-path)", entry["pinPath"], pin)
	}
	if caps, _ := entry["capabilities"].(map[string]any); caps["io.kubernetes.cri.pod-annotations"] != true {
		t.Errorf("entry %v lacks the pod-annotations capability", entry)
	}
	installed, err := os.ReadFile(filepath.Join(binDir, "pktmeta"))
	if err != nil {
		t.Fatalf("plugin binary not installed: %v", err)
	}
	want, err := os.ReadFile(filepath.Join(img.root, "pktmeta"))
	if err != nil || !bytes.Equal(installed, want) {
		t.Fatalf("installed plugin (%d bytes) is not the image's /opt/pktmeta/bin/pktmeta (%d bytes, %v)", len(installed), len(want), err)
	}
	if fi, _ := os.Stat(filepath.Join(binDir, "pktmeta")); fi == nil || fi.Mode().Perm()&0o111 == 0 {
		t.Errorf("installed plugin is not executable: %v", fi)
	}
	// New pods must run the new chain: containerd reloads its conf dir
	// asynchronously.
	eventually(t, 10*time.Second, "containerd loads ptp + pktmeta", func() error {
		chain, err := loadedChain(ctx, h)
		if err == nil && strings.Join(chain, ",") != "ptp,pktmeta" {
			err = fmt.Errorf("loaded chain %v", chain)
		}
		return err
	})
	metricsURL := "http://" + metricsAddr
	eventually(t, 10*time.Second, "/readyz", func() error {
		if err := agentUp(); err != nil {
			return err
		}
		return getOK(metricsURL + "/readyz")
	})

	// (2) The pod from before install: covered by the agent, with the
	// complete identity the CRI gives (sandbox id, namespace, name, UID,
	// annotation tag), not the partial one of a bare netns.
	var d *datapath.Datapath
	eventually(t, 10*time.Second, "pinned datapath", func() error {
		d, err = datapath.OpenReader(pin)
		return err
	})
	dOpen := true
	defer func() {
		if dOpen {
			d.Close()
		}
	}()
	// The agent, in its container (its own cgroup namespace, the host's
	// cgroup filesystem mounted read-only), put the application interface
	// on the host's cgroup v2 root.
	eventually(t, 10*time.Second, "application interface attached by the agent", func() error {
		if st := d.Apps(); !st.Attached || !st.Current || st.UDP != (d.Recvmsg4 != nil) {
			return fmt.Errorf("application interface: %+v (recvmsg programs loaded: %v)", st, d.Recvmsg4 != nil)
		}
		root, err := datapath.CgroupRoot()
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Stat(root, &st); err != nil {
			return err
		}
		if got := d.Apps().CgroupID; got != st.Ino {
			return fmt.Errorf("attached to cgroup %d, the host's cgroup v2 root %s is %d", got, root, st.Ino)
		}
		return nil
	})
	var legacyW datapath.Workload
	eventually(t, 15*time.Second, "pod from before install covered", func() error {
		if err := agentUp(); err != nil {
			return err
		}
		ws, err := d.Workloads()
		if err != nil {
			return err
		}
		for _, w := range ws {
			if filepath.Base(w.Netns) != filepath.Base(legacy.Netns) {
				continue
			}
			if w.Partial {
				t.Fatalf("pod from before install covered with a partial identity %+v: the agent did not match it through the CRI", w)
			}
			a, err := attach.Query(int(w.HostIfindex))
			if err != nil {
				return err
			}
			if len(a.TCX[attach.Ingress]) == 0 || len(a.TCX[attach.Egress]) == 0 {
				return fmt.Errorf("workload registered but %s not attached yet: %+v", w.HostIfName, a)
			}
			legacyW = w
			return nil
		}
		return fmt.Errorf("no workload for netns %s among %d", legacy.Netns, len(ws))
	})
	checkIdentity(t, "pod from before install", legacyW, legacy, map[string]string{"team": "legacy"})
	tCovered := time.Since(tAgent)

	// (3) Two new pods through containerd's chain; the client carries a
	// pktmeta annotation and an unrelated one, which the CRI passes to the
	// plugin (all annotations, through the pod-annotations capability).
	server := runPod(t, ctx, h, crihost.PodSpec{Name: serverPod, Namespace: "shop"})
	serverCtr, err := h.RunContainer(ctx, server, crihost.ContainerSpec{Name: "server", Image: crihost.NetutilImage,
		Args: []string{"serve", "--tcp", ":8080"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.WaitLog(ctx, serverCtr, `"listening"`); err != nil {
		t.Fatal(err)
	}
	client := runPod(t, ctx, h, crihost.PodSpec{Name: clientPod, Namespace: "shop",
		Annotations: map[string]string{"pktmeta.dev/team": "payments", "example.com/unrelated": "x"}})
	dst := netip.AddrPortFrom(server.IP(), 8080).String()
	conn := connect(t, ctx, h, client, "client", dst)
	payments := map[string]string{"team": "payments"}
	// The plugin that containerd ran attached them, not the agent.
	for _, p := range []*crihost.Pod{server, client} {
		if _, ok, err := d.FindAttachment(datapath.AttachmentKey{ContainerID: p.ID, IfName: "eth0"}); err != nil || !ok {
			t.Fatalf("pod %s has no attachment from its CNI ADD: %v", p.Spec.Name, err)
		}
	}

	// Through the agent, as an operator would: `kubectl exec ds/pktmeta --
	// pktmetactl conns`. No flags: pktmetactl asks the agent's API socket
	// (/run/pktmeta/api.sock, in the run dir); its fallback, the default pin
	// path /sys/fs/bpf/pktmeta, is on no bpffs in this container, so an
	// answer can only come from the agent.
	res, err := h.Exec(ctx, agentID, "pktmetactl", "conns", "-o", "json")
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("pktmetactl conns in the agent container: %v %+v", err, res)
	}
	if fi, err := os.Stat(filepath.Join(runDir, "api.sock")); err != nil || fi.Mode()&os.ModeSocket == 0 {
		t.Errorf("the agent's API socket is not in the host's run dir: %v %v", fi, err)
	}
	var conns []view.Conn
	if err := json.Unmarshal([]byte(res.Stdout), &conns); err != nil {
		t.Fatalf("pktmetactl conns -o json: %v\n%s", err, res.Stdout)
	}
	var c *view.Conn
	for i := range conns {
		if conns[i].Proto == "tcp" && conns[i].Src == conn.Local.String() && conns[i].Dst == conn.Remote.String() {
			c = &conns[i]
		}
	}
	if c == nil {
		t.Fatalf("pktmetactl conns has no %s -> %s:\n%s", conn.Local, conn.Remote, res.Stdout)
	}
	if o := c.Origin; o == nil || o.Namespace != "shop" || o.Pod != clientPod || o.UID != client.Spec.UID || o.ContainerID != client.ID {
		t.Errorf("pktmetactl: origin %+v, want shop/%s uid %s sandbox %s", o, clientPod, client.Spec.UID, client.ID)
	}
	if !equalTags(c.PodTags, payments) || len(c.Tags) != 0 {
		t.Errorf("pktmetactl: tags %v, pod tags %v, want exactly pod tags %v (claimed by the pod; the unrelated annotation is no tag)", c.Tags, c.PodTags, payments)
	}
	if p := c.Peer; p == nil || p.Namespace != "shop" || p.Pod != serverPod || p.ContainerID != server.ID || c.Delivered == "" {
		t.Errorf("pktmetactl: not delivered to the server: peer %+v, delivered %q", p, c.Delivered)
	}
	t.Logf("pktmetactl conns (through the agent): %s -> %s origin %s pod tags %v peer %s", c.Src, c.Dst, c.Origin.Name(), c.PodTags, c.Peer.Name())

	// (4) The agent's stdout: the opened and delivered events of this
	// connection, with the client's identity.
	eventually(t, 5*time.Second, "events on the agent's stdout", func() error {
		logs, err := h.Logs(ctx, agentID)
		if err != nil {
			return err
		}
		var opened, delivered bool
		for _, ev := range agentEvents(logs) {
			if ev.ConnID != c.ConnID || ev.Origin == nil || ev.Origin.Pod != clientPod || ev.Origin.Namespace != "shop" ||
				ev.Origin.UID != client.Spec.UID || !equalTags(ev.PodTags, payments) {
				continue
			}
			switch {
			case ev.Event == "opened":
				opened = true
			case ev.Event == "delivered" && ev.Peer != nil && ev.Peer.Pod == serverPod:
				delivered = true
			}
		}
		if !opened || !delivered {
			return fmt.Errorf("connection %d: opened %v, delivered %v in:\n%s", c.ConnID, opened, delivered, logs)
		}
		return nil
	})

	// (5) Metrics on the node's network (hostNetwork): the delivery by
	// origin and destination workload, the datapath's counters, and what
	// the agent did: one install, one attach (the pod from before; the new
	// ones came through the chain).
	eventually(t, 5*time.Second, "metrics", func() error {
		s, err := scrape(metricsURL+"/metrics", "pktmeta_connections_delivered_total")
		if err != nil {
			return err
		}
		if v, ok := find(s, map[string]string{"origin_namespace": "shop", "origin_workload": "client",
			"peer_namespace": "shop", "peer_workload": "server", "proto": "tcp", "nat": "false"}); !ok || v < 1 {
			return fmt.Errorf("pktmeta_connections_delivered_total for shop/client -> shop/server: %v %v (%+v)", v, ok, s)
		}
		s, err = scrape(metricsURL+"/metrics", "pktmeta_datapath_total")
		if err != nil {
			return err
		}
		if v, ok := find(s, map[string]string{"counter": "tagged"}); !ok || v < 1 {
			return fmt.Errorf(`pktmeta_datapath_total{counter="tagged"} %v %v`, v, ok)
		}
		s, err = scrape(metricsURL+"/metrics", "pktmeta_agent_actions_total")
		if err != nil {
			return err
		}
		for action, want := range map[string]float64{"install": 1, "attach": 1} {
			if v, _ := find(s, map[string]string{"action": action}); v != want {
				return fmt.Errorf("pktmeta_agent_actions_total{action=%q} %v, want %v (%+v)", action, v, want, s)
			}
		}
		return getOK(metricsURL + "/readyz")
	})

	// (6) The primary CNI rewrites its file with its own bytes (kindnet
	// does, on every start): pktmeta is back within 3 s.
	tRepair := time.Now()
	if err := replaceFile(primary, original, 0o644); err != nil {
		t.Fatal(err)
	}
	eventually(t, 3*time.Second, "pktmeta entry repaired", func() error {
		if pktmetaEntry(primary) == nil {
			return errors.New("no pktmeta entry yet")
		}
		return nil
	})
	repairTook := time.Since(tRepair)
	eventually(t, 5*time.Second, "repair counted", func() error {
		s, err := scrape(metricsURL+"/metrics", "pktmeta_agent_actions_total")
		if v, _ := find(s, map[string]string{"action": "repair"}); err == nil && v < 1 {
			err = fmt.Errorf("no repair action in %+v", s)
		}
		return err
	})

	// (7) The agent is killed (SIGKILL: no shutdown code runs; with
	// uninstall-on-exit=never it would not uninstall anyway). The datapath
	// runs from the pins: new connections, from a pod the plugin attached
	// and from the one the agent attached, are still tagged and delivered.
	if err := h.StopContainer(ctx, agentID, 0); err != nil {
		t.Fatal(err)
	}
	if st, err := h.InspectContainer(ctx, agentID); err != nil || st.State != "CONTAINER_EXITED" {
		t.Fatalf("agent after crictl stop --timeout 0: %+v %v", st, err)
	}
	if pktmetaEntry(primary) == nil {
		t.Fatal("killing the agent took pktmeta out of the chain")
	}
	if _, err := os.Stat(filepath.Join(binDir, "pktmeta")); err != nil {
		t.Fatalf("killing the agent removed the plugin: %v", err)
	}
	// Read the pins afresh: what the test held open proves nothing about
	// what is still pinned.
	d.Close()
	if d, err = datapath.OpenReader(pin); err != nil {
		dOpen = false
		t.Fatalf("pinned datapath after the agent was killed: %v", err)
	}
	conn2 := connect(t, ctx, h, client, "client-again", dst)
	checkOrigin(t, d, datapath.Tuple{Proto: datapath.ProtoTCP, Src: conn2.Local, Dst: conn2.Remote}, client, payments, server)
	conn3 := connect(t, ctx, h, legacy, "db-client", dst)
	checkOrigin(t, d, datapath.Tuple{Proto: datapath.ProtoTCP, Src: conn3.Local, Dst: conn3.Remote}, legacy, map[string]string{"team": "legacy"}, server)

	// The pods' host veths, to check that uninstall leaves them bare.
	type veth struct {
		pod     string
		ifindex int
		name    string
	}
	var veths []veth
	for _, p := range []*crihost.Pod{legacy, server, client} {
		w, ok, err := d.FindAttachment(datapath.AttachmentKey{ContainerID: p.ID, IfName: "eth0"})
		if err != nil || !ok {
			t.Fatalf("no attachment for %s: %v", p.Spec.Name, err)
		}
		veths = append(veths, veth{p.Spec.Name, int(w.HostIfindex), w.HostIfName})
	}
	d.Close()
	dOpen = false

	// (8) Uninstall, as a container of the same image with the same mounts
	// and capabilities: `pktmeta-agent uninstall` + the run flags.
	tUninstall := time.Now()
	unSpec := podContainer(t, ds, "agent", "uninstall", "uninstall", flags, volumes, env)
	unID, err := h.RunContainer(ctx, agentSandbox, unSpec)
	if unID != "" {
		containers["uninstall"] = unID
	}
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel = context.WithTimeout(ctx, 30*time.Second)
	code, err = h.WaitContainerExit(wctx, unID)
	wcancel()
	if err != nil || code != 0 {
		logs, _ := h.Logs(ctx, unID)
		t.Fatalf("pktmeta-agent uninstall: exit %d, %v\n%s", code, err, logs)
	}
	got, err := os.ReadFile(primary)
	if err != nil || !bytes.Equal(got, original) {
		t.Fatalf("conflist after uninstall (%v):\n%s\nwant, byte for byte:\n%s", err, got, original)
	}
	if fi, err := os.Stat(primary); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("conflist mode after uninstall: %v %v, want 0644", fi.Mode().Perm(), err)
	}
	if names, _ := os.ReadDir(confDir); len(names) != 1 {
		t.Errorf("conf dir after uninstall holds %v, want only %s", names, filepath.Base(primary))
	}
	if _, err := os.Stat(filepath.Join(binDir, "pktmeta")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("plugin binary after uninstall: %v", err)
	}
	if pins, err := pinsUnder(bpfDir); err != nil || len(pins) != 0 {
		t.Errorf("pins in the bpffs after uninstall: %v %v", pins, err)
	}
	// The pod veths of a real containerd's pods are in the root netns,
	// where this test runs.
	for _, v := range veths {
		l, err := netlink.LinkByIndex(v.ifindex)
		if err != nil || l.Attrs().Name != v.name {
			t.Fatalf("host veth %s (%d) of %s is gone: %v", v.name, v.ifindex, v.pod, err)
		}
		a, err := attach.Query(v.ifindex)
		if err != nil {
			t.Fatal(err)
		}
		if n := len(a.TCX[attach.Ingress]) + len(a.TCX[attach.Egress]) + len(a.Legacy); n != 0 {
			t.Errorf("host veth %s of %s still has %d programs: %+v", v.name, v.pod, n, a)
		}
	}
	eventually(t, 10*time.Second, "containerd loads ptp alone again", func() error {
		chain, err := loadedChain(ctx, h)
		if err == nil && strings.Join(chain, ",") != "ptp" {
			err = fmt.Errorf("loaded chain %v", chain)
		}
		return err
	})
	tUninstallTook := time.Since(tUninstall)

	// Pods removed through the CRI (CNI DEL of ptp alone now), then
	// containerd and everything it made. The logs go with the pods: print
	// them now if anything above failed.
	dump()
	for _, p := range []*crihost.Pod{client, server, legacy, agentSandbox} {
		if err := h.RemovePod(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if left := h.Leftovers(); len(left) > 0 {
		t.Fatalf("left behind: %v", left)
	}
	t.Logf("timings: containerd up %s, image %s; agent to chain %s, to covering the old pod %s; repair %s; uninstall %s; total %s",
		tStart.Round(time.Millisecond), img.took.Round(time.Millisecond), tInstalled.Round(time.Millisecond),
		tCovered.Round(time.Millisecond), repairTook.Round(time.Millisecond), tUninstallTook.Round(time.Millisecond),
		time.Since(t0).Round(time.Millisecond))
}

// runPod runs a pod sandbox through the CRI (containerd runs the CNI chain
// for it unless it is hostNetwork).
func runPod(t *testing.T, ctx context.Context, h *crihost.Host, spec crihost.PodSpec) *crihost.Pod {
	t.Helper()
	p, err := h.RunPod(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if !spec.HostNetwork && (!p.IP().IsValid() || p.Netns == "") {
		t.Fatalf("pod %s has no address or netns: %+v", spec.Name, p)
	}
	return p
}

// connect runs `netutil connect --tcp dst --hold` as a new container of
// pod and returns the connection once made. It stays open (a closed TCP
// connection's record is removed on FIN).
func connect(t *testing.T, ctx context.Context, h *crihost.Host, pod *crihost.Pod, name, dst string) connected {
	t.Helper()
	id, err := h.RunContainer(ctx, pod, crihost.ContainerSpec{Name: name, Image: crihost.NetutilImage,
		Args: []string{"connect", "--tcp", dst, "--hold", "10m"}})
	if err != nil {
		t.Fatal(err)
	}
	c, err := waitConnected(ctx, h, id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// freeAddr is a loopback address with a port nothing listens on now.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func getOK(url string) error {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// dumpLogs prints what a failure needs: the agent's (and uninstall's)
// container logs, and the end of containerd's log (CNI errors, the plugin's
// stderr).
func dumpLogs(t *testing.T, h *crihost.Host, containers map[string]string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for name, id := range containers {
		logs, err := h.Logs(ctx, id)
		t.Logf("container %s (%s) log (%v):\n%s", name, id, err, logs)
	}
	if b, err := os.ReadFile(h.LogPath()); err == nil {
		lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
		if len(lines) > 80 {
			lines = lines[len(lines)-80:]
		}
		t.Logf("containerd log (last %d lines):\n%s", len(lines), strings.Join(lines, "\n"))
	}
}
