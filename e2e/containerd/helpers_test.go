package containerd

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/deploy"
	"github.com/pktmeta/pktmeta/internal/crihost"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
	"golang.org/x/sys/unix"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// repoRoot is the directory holding the module's go.mod (the test runs in
// e2e/containerd).
func repoRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if b, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil && bytes.Contains(b, []byte("module github.com/pktmeta/pktmeta\n")) {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no github.com/pktmeta/pktmeta go.mod above the test's directory")
		}
		dir = parent
	}
}

// imageBuild is `make image` running in the background: it takes longer
// than everything else the test sets up, so it overlaps with it.
type imageBuild struct {
	tar, root string // the tarball and the binaries that went into it
	done      chan struct{}
	err       error
	took      time.Duration
}

// buildImage runs the image recipe users run (hack/image.mk: static,
// reproducible binaries, then hack/mkimage), with bin/ redirected to dir so
// that nothing in the work tree changes.
func buildImage(ctx context.Context, repo, dir string) *imageBuild {
	b := &imageBuild{
		tar:  filepath.Join(dir, "pktmeta-image.tar"),
		root: filepath.Join(dir, "image-root", "linux-"+runtime.GOARCH),
		done: make(chan struct{}),
	}
	go func() {
		defer close(b.done)
		t0 := time.Now()
		cmd := exec.CommandContext(ctx, "make", "-C", repo, "-f", "hack/image.mk", "image",
			"BIN="+dir, "IMAGE_TAR="+b.tar, "IMAGE_ARCH="+runtime.GOARCH, "IMAGE_VERSION=dev")
		cmd.WaitDelay = 5 * time.Second
		// Run from `make test`, a parent make's flags and variables (BIN=...)
		// must not reach this one.
		for _, e := range os.Environ() {
			if k, _, _ := strings.Cut(e, "="); k != "MAKEFLAGS" && k != "MFLAGS" && k != "MAKELEVEL" {
				cmd.Env = append(cmd.Env, e)
			}
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("make image: %w\n%s", err, out)
		}
		b.took = time.Since(t0)
	}()
	return b
}

func (b *imageBuild) wait() error {
	<-b.done
	return b.err
}

// copyCNIPlugins fills dir with the reference plugins the primary conflist
// and containerd's own loopback network need, from bin/cni (`make
// cni-plugins`) or $PKTMETA_CNI_BIN. pktmeta is deliberately not among
// them: installing it is the agent's job.
func copyCNIPlugins(t *testing.T, repo, dir string) {
	t.Helper()
	src := os.Getenv("PKTMETA_CNI_BIN")
	if src == "" {
		src = filepath.Join(repo, "bin", "cni")
	}
	for _, p := range []string{"ptp", "host-local", "loopback"} {
		if err := copyFile(filepath.Join(src, p), filepath.Join(dir, p), 0o755); err != nil {
			t.Fatalf("CNI plugin %s: %v (run `make cni-plugins`)", p, err)
		}
	}
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// replaceFile writes b to path through a temporary file and a rename, as
// primary CNIs (kindnet) do: containerd reloads on every change in its conf
// dir and must never read half a file. ".temp" is not a CNI config
// extension, so neither containerd nor the agent looks at the temporary.
func replaceFile(path string, b []byte, mode os.FileMode) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".temp")
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil { // umask
		return err
	}
	return os.Rename(tmp, path)
}

// pktmetaEntry returns the pktmeta entry of a conflist, nil when it has
// none (or does not parse: a file caught mid-write counts as not yet).
func pktmetaEntry(path string) map[string]any {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var list struct {
		Plugins []map[string]any `json:"plugins"`
	}
	if json.Unmarshal(b, &list) != nil {
		return nil
	}
	for _, p := range list.Plugins {
		if p["type"] == "pktmeta" {
			return p
		}
	}
	return nil
}

// loadedChain is the plugin types of the pod network containerd's CRI has
// loaded right now (`crictl info`: cniconfig.Networks, the eth0 one; the
// other is containerd's own loopback).
func loadedChain(ctx context.Context, h *crihost.Host) ([]string, error) {
	out, err := h.Crictl(ctx, "info", "-o", "json")
	if err != nil {
		return nil, err
	}
	var info struct {
		CNIConfig struct {
			Networks []struct {
				IFName string `json:"IFName"`
				Config struct {
					Plugins []struct {
						Network struct {
							Type string `json:"type"`
						} `json:"Network"`
					} `json:"Plugins"`
				} `json:"Config"`
			} `json:"Networks"`
		} `json:"cniconfig"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		return nil, fmt.Errorf("crictl info: %w", err)
	}
	for _, n := range info.CNIConfig.Networks {
		if n.IFName != "eth0" {
			continue
		}
		var types []string
		for _, p := range n.Config.Plugins {
			types = append(types, p.Network.Type)
		}
		return types, nil
	}
	return nil, errors.New("crictl info: no eth0 network loaded")
}

// eventually polls f every 50 ms until it returns nil, and fails the test
// with f's last error after timeout.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// manifests reads the DaemonSet and the ConfigMap from deploy/, strictly,
// as deploy's own tests do.
func manifests(t *testing.T, repo string) (*appsv1.DaemonSet, *corev1.ConfigMap) {
	t.Helper()
	var (
		ds *appsv1.DaemonSet
		cm *corev1.ConfigMap
	)
	for _, f := range []string{"daemonset.yaml", "configmap.yaml"} {
		objs, err := deploy.DecodeFile(filepath.Join(repo, "deploy", f))
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			switch o := o.(type) {
			case *appsv1.DaemonSet:
				ds = o
			case *corev1.ConfigMap:
				cm = o
			}
		}
	}
	if ds == nil || cm == nil || cm.Data[deploy.ConfigKey] == "" {
		t.Fatalf("deploy/: no DaemonSet or no ConfigMap with %s", deploy.ConfigKey)
	}
	return ds, cm
}

// hostMount says where a DaemonSet volume comes from on the test's node,
// and where it goes in the container when that must differ from the
// DaemonSet's mountPath.
type hostMount struct {
	hostPath      string
	containerPath string // "" keeps the DaemonSet's mountPath
	propagation   *crihost.Propagation
}

// podContainer translates one of the DaemonSet's containers (container
// or init container, by name) into a CRI container: its image, args with
// flag overrides, environment (the downward API's values), mounts (every
// volume it mounts must have a hostMount: a volume added to the DaemonSet
// fails the test until it is provided here too), capabilities, privilege,
// user and read-only root. sub replaces the container's subcommand (its
// first arg: "run" becomes "uninstall" for the uninstall container).
func podContainer(t *testing.T, ds *appsv1.DaemonSet, dsName, name, sub string, flags map[string]string, volumes map[string]hostMount, env []string) crihost.ContainerSpec {
	t.Helper()
	var c *corev1.Container
	pod := &ds.Spec.Template.Spec
	for _, list := range [][]corev1.Container{pod.InitContainers, pod.Containers} {
		for i := range list {
			if list[i].Name == dsName {
				c = &list[i]
			}
		}
	}
	if c == nil {
		t.Fatalf("the DaemonSet has no container %s", dsName)
	}
	if len(c.Args) == 0 || strings.HasPrefix(c.Args[0], "-") {
		t.Fatalf("DaemonSet container %s args %q: want a subcommand first", dsName, c.Args)
	}
	// Flags, "--name=value" as the DaemonSet writes them; overridden in
	// place, missing ones appended (sorted, so the command line is stable).
	args := []string{sub}
	used := map[string]bool{}
	for _, a := range c.Args[1:] {
		k, _, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !ok || !strings.HasPrefix(a, "--") {
			t.Fatalf("DaemonSet container %s arg %q: want --name=value", dsName, a)
		}
		if v, ok := flags[k]; ok {
			a = "--" + k + "=" + v
			used[k] = true
		}
		args = append(args, a)
	}
	var extra []string
	for k, v := range flags {
		if !used[k] {
			extra = append(extra, "--"+k+"="+v)
		}
	}
	sort.Strings(extra)
	args = append(args, extra...)
	for _, a := range args {
		if strings.Contains(a, "$(") {
			t.Fatalf("agent arg %q still refers to an environment variable", a)
		}
	}

	var mounts []crihost.Mount
	for _, vm := range c.VolumeMounts {
		hm, ok := volumes[vm.Name]
		if !ok {
			t.Fatalf("the DaemonSet mounts volume %q at %s, which this test does not provide", vm.Name, vm.MountPath)
		}
		m := crihost.Mount{HostPath: hm.hostPath, ContainerPath: vm.MountPath, ReadOnly: vm.ReadOnly}
		if hm.containerPath != "" {
			m.ContainerPath = hm.containerPath
		}
		if vm.MountPropagation != nil {
			switch *vm.MountPropagation {
			case corev1.MountPropagationHostToContainer:
				m.Propagation = crihost.PropagationHostToContainer
			case corev1.MountPropagationBidirectional:
				m.Propagation = crihost.PropagationBidirectional
			}
		}
		if hm.propagation != nil {
			m.Propagation = *hm.propagation
		}
		mounts = append(mounts, m)
	}

	sc := c.SecurityContext
	if sc == nil {
		t.Fatalf("DaemonSet container %s has no securityContext", dsName)
	}
	spec := crihost.ContainerSpec{
		Name:   name,
		Image:  c.Image,
		Args:   args,
		Env:    env,
		Mounts: mounts,
	}
	if caps := sc.Capabilities; caps != nil {
		for _, c := range caps.Add {
			spec.CapAdd = append(spec.CapAdd, string(c))
		}
		for _, c := range caps.Drop {
			spec.CapDrop = append(spec.CapDrop, string(c))
		}
	}
	if sc.Privileged != nil {
		spec.Privileged = *sc.Privileged
	}
	if sc.ReadOnlyRootFilesystem != nil {
		spec.ReadOnlyRootfs = *sc.ReadOnlyRootFilesystem
	}
	spec.RunAsUser = sc.RunAsUser
	return spec
}

// capMask is the capability set named by the DaemonSet ("BPF", ...).
func capMask(t *testing.T, names []string) uint64 {
	t.Helper()
	bits := map[string]uint{
		"BPF": unix.CAP_BPF, "PERFMON": unix.CAP_PERFMON, "NET_ADMIN": unix.CAP_NET_ADMIN, "SYS_ADMIN": unix.CAP_SYS_ADMIN,
		"NET_RAW": unix.CAP_NET_RAW, "SYS_PTRACE": unix.CAP_SYS_PTRACE, "SYS_RESOURCE": unix.CAP_SYS_RESOURCE,
		"DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "CHOWN": unix.CAP_CHOWN,
	}
	var m uint64
	for _, n := range names {
		b, ok := bits[n]
		if !ok {
			t.Fatalf("capability %s: add it to capMask", n)
		}
		m |= 1 << b
	}
	return m
}

// procCapEff reads a process's effective capabilities.
func procCapEff(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapEff in /proc/%d/status", pid)
}

type connected struct {
	Local, Remote netip.AddrPort
}

// waitConnected waits for netutil connect's {"event":"connected"} line in
// a container's log.
func waitConnected(ctx context.Context, h *crihost.Host, id string) (connected, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	logs, err := h.WaitLog(ctx, id, `"connected"`)
	if err != nil {
		return connected{}, err
	}
	for _, l := range strings.Split(logs, "\n") {
		var v struct{ Event, Local, Remote string }
		if i := strings.IndexByte(l, '{'); i < 0 || json.Unmarshal([]byte(l[i:]), &v) != nil || v.Event != "connected" {
			continue
		}
		local, err1 := netip.ParseAddrPort(v.Local)
		remote, err2 := netip.ParseAddrPort(v.Remote)
		if err := errors.Join(err1, err2); err != nil {
			return connected{}, fmt.Errorf("connected line %q: %w", l, err)
		}
		return connected{Local: local, Remote: remote}, nil
	}
	return connected{}, fmt.Errorf("no connected line in:\n%s", logs)
}

// agentEvents are the datapath events among the agent's log lines. crictl
// logs prints the container's stdout (events, JSON lines) and stderr (its
// slog JSON) interleaved, each line as written.
func agentEvents(logs string) []view.Event {
	var out []view.Event
	for _, l := range strings.Split(logs, "\n") {
		var ev view.Event
		if i := strings.IndexByte(l, '{'); i < 0 || json.Unmarshal([]byte(l[i:]), &ev) != nil {
			continue
		}
		if ev.Event == "opened" || ev.Event == "delivered" || ev.Event == "closed" {
			out = append(out, ev)
		}
	}
	return out
}

// sample is one Prometheus sample of the text format.
type sample struct {
	labels map[string]string
	value  float64
}

var labelRE = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"`)

// scrape GETs url and returns the samples of metric name.
func scrape(url, name string) ([]sample, error) {
	c := http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	var out []sample
	for _, l := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(l, name+"{") && !strings.HasPrefix(l, name+" ") {
			continue
		}
		s := sample{labels: map[string]string{}}
		if i := strings.LastIndexByte(l, '}'); i >= 0 {
			for _, m := range labelRE.FindAllStringSubmatch(l[:i], -1) {
				s.labels[m[1]] = m[2]
			}
		}
		f := strings.Fields(l)
		if s.value, err = strconv.ParseFloat(f[len(f)-1], 64); err != nil {
			return nil, fmt.Errorf("%q: %w", l, err)
		}
		out = append(out, s)
	}
	return out, nil
}

// find returns the value of the first sample carrying all of want's labels.
func find(samples []sample, want map[string]string) (float64, bool) {
next:
	for _, s := range samples {
		for k, v := range want {
			if s.labels[k] != v {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

// pinsUnder lists every file and directory below dir, the root of a bpffs
// mount, except the two the kernel itself puts at the root of every bpffs
// (CONFIG_BPF_PRELOAD's iterators).
func pinsUnder(dir string) ([]string, error) {
	var out []string
	err := filepath.WalkDir(dir, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch p {
		case dir, filepath.Join(dir, "maps.debug"), filepath.Join(dir, "progs.debug"):
			return nil
		}
		out = append(out, p)
		return nil
	})
	return out, err
}

// checkOrigin asserts that the record of tuple names pod as its origin with
// the identity containerd gave it (sandbox id, namespace, name, UID, netns)
// and exactly the tags want, and that it was delivered to peer.
func checkOrigin(t *testing.T, d *datapath.Datapath, tuple datapath.Tuple, pod *crihost.Pod, tags map[string]string, peer *crihost.Pod) {
	t.Helper()
	rec, err := d.Lookup(tuple)
	if err != nil {
		t.Fatalf("no record for %s: %v", tuple, err)
	}
	w, ok, err := d.Workload(rec.OriginWorkload)
	if err != nil || !ok {
		t.Fatalf("%s: origin workload %d: ok=%v err=%v", tuple, rec.OriginWorkload, ok, err)
	}
	checkIdentity(t, tuple.String(), w, pod, tags)
	if !rec.IsDelivered() {
		t.Fatalf("%s: not delivered: %+v", tuple, rec)
	}
	p, ok, err := d.Workload(rec.PeerWorkload)
	if err != nil || !ok || p.ContainerID != peer.ID || p.Pod != peer.Spec.Name {
		t.Fatalf("%s: delivered to workload %d (%+v, %v), want the pod %s/%s", tuple, rec.PeerWorkload, p, err, peer.Spec.Namespace, peer.Spec.Name)
	}
}

// checkIdentity asserts that w is pod's complete identity, and that the
// pod's annotation tags are there, as claimed by the pod (the test's agent
// has no static tags).
func checkIdentity(t *testing.T, what string, w datapath.Workload, pod *crihost.Pod, podTags map[string]string) {
	t.Helper()
	if w.Partial || w.ContainerID != pod.ID || w.Namespace != pod.Spec.Namespace || w.Pod != pod.Spec.Name ||
		w.UID != pod.Spec.UID || w.Netns != pod.Netns || w.IfName != "eth0" {
		t.Errorf("%s: identity %+v\nwant complete: sandbox %s, %s/%s, uid %s, netns %s, eth0",
			what, w, pod.ID, pod.Spec.Namespace, pod.Spec.Name, pod.Spec.UID, pod.Netns)
	}
	if !equalTags(w.PodTags, podTags) || len(w.Tags) != 0 {
		t.Errorf("%s: tags %v, pod tags %v, want exactly pod tags %v", what, w.Tags, w.PodTags, podTags)
	}
}

func equalTags(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}
