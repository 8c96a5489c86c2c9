package k8s

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/pktmeta/pktmeta/internal/view"
)

// nodeProbe is a privileged pod on the node (host network and PID
// namespaces, the host's / at /host, bpffs at /sys/fs/bpf) running the e2e
// tool, through which the suite sees what only the node shows: the CNI
// config and plugin binary, BPF programs and tcx hooks, the pins. A pod
// rather than the test process itself, so that the same suite runs against
// a node inside a container (kind).
type nodeProbe struct {
	c    *cluster
	ns   string
	name string
}

const (
	hostRoot    = "/host"
	cniConfDir  = hostRoot + "/etc/cni/net.d"
	pluginPath  = hostRoot + "/opt/cni/bin/pktmeta"
	criSocket   = hostRoot + "/run/containerd/containerd.sock"
	metricsURL  = "http://127.0.0.1:9964/metrics"
	pinPathNode = "/sys/fs/bpf/pktmeta"
)

func startNodeProbe(t *testing.T, c *cluster) *nodeProbe {
	t.Helper()
	ns := c.cfg.probeNamespace
	c.ensureNamespace(t, ns)
	hostPathDir := corev1.HostPathDirectory
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "probe", Namespace: ns},
		Spec: corev1.PodSpec{
			HostNetwork:                   true,
			HostPID:                       true,
			TerminationGracePeriodSeconds: ptr(int64(1)),
			AutomountServiceAccountToken:  ptr(false),
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			Containers: []corev1.Container{{
				Name:            "probe",
				Image:           c.cfg.toolImage,
				ImagePullPolicy: c.cfg.pullPolicy,
				Args:            []string{"sleep"},
				SecurityContext: &corev1.SecurityContext{Privileged: ptr(true)},
				VolumeMounts: []corev1.VolumeMount{
					// No propagation: / is a private mount on some
					// hosts, and files (not mounts) are all we read.
					{Name: "host", MountPath: hostRoot},
					{Name: "bpffs", MountPath: "/sys/fs/bpf", MountPropagation: ptr(corev1.MountPropagationHostToContainer)},
				},
			}},
			Volumes: []corev1.Volume{
				{Name: "host", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/", Type: &hostPathDir}}},
				{Name: "bpffs", VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/sys/fs/bpf", Type: &hostPathDir}}},
			},
		},
	}
	if _, err := c.client.CoreV1().Pods(ns).Create(ctxT(t), p, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create the node probe: %v", err)
	}
	c.waitRunning(t, ns, "probe")
	return &nodeProbe{c: c, ns: ns, name: "probe"}
}

// run runs the e2e tool in the probe and decodes its JSON output into v.
func (n *nodeProbe) run(t *testing.T, v any, stdin []byte, args ...string) {
	t.Helper()
	out, err := n.c.exec(ctxT(t), n.ns, n.name, stdin, append([]string{"e2etool"}, args...)...)
	if err != nil {
		t.Fatalf("node probe: %v", err)
	}
	if v != nil {
		if err := json.Unmarshal(out, v); err != nil {
			t.Fatalf("node probe %v: %v in %q", args, err, out)
		}
	}
}

type fileInfo struct {
	Exists  bool     `json:"exists"`
	Dir     bool     `json:"dir"`
	Entries []string `json:"entries"`
	Size    int64    `json:"size"`
	Mode    string   `json:"mode"`
	Inode   uint64   `json:"inode"`
	SHA256  string   `json:"sha256"`
	Content []byte   `json:"content"`
}

func (n *nodeProbe) file(t *testing.T, path string) fileInfo {
	t.Helper()
	var f fileInfo
	n.run(t, &f, nil, "file", path)
	return f
}

// write replaces a host file atomically, as a primary CNI rewrites its
// config.
func (n *nodeProbe) write(t *testing.T, path string, data []byte) {
	t.Helper()
	n.run(t, nil, data, "write", path)
}

type bpfProg struct {
	ID   uint32 `json:"id"`
	Name string `json:"name"`
	Type string `json:"type"`
}

func (n *nodeProbe) progs(t *testing.T) []bpfProg {
	t.Helper()
	var out struct {
		Progs []bpfProg `json:"progs"`
	}
	n.run(t, &out, nil, "progs")
	return out.Progs
}

type hook struct {
	Prog uint32 `json:"prog"`
	Name string `json:"name"`
	Link uint32 `json:"link"`
}

type ifaceHooks struct {
	Name    string `json:"name"`
	Ifindex int    `json:"ifindex"`
	Ingress []hook `json:"ingress"`
	Egress  []hook `json:"egress"`
}

func (n *nodeProbe) hooks(t *testing.T) map[string]ifaceHooks {
	t.Helper()
	var out struct {
		Ifaces []ifaceHooks `json:"ifaces"`
	}
	n.run(t, &out, nil, "hooks")
	m := map[string]ifaceHooks{}
	for _, i := range out.Ifaces {
		m[i.Name] = i
	}
	return m
}

// pktmetaHook is our program on one hook, if there is one.
func pktmetaHook(hs []hook) (hook, bool) {
	for _, h := range hs {
		if strings.HasPrefix(h.Name, "pktmeta_") {
			return h, true
		}
	}
	return hook{}, false
}

type sandbox struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	UID       string `json:"uid"`
}

// sandboxID is the pod sandbox's id as the CRI runtime reports it: the
// CNI_CONTAINERID of its CNI calls.
func (n *nodeProbe) sandboxID(t *testing.T, pod *corev1.Pod) string {
	t.Helper()
	var out struct {
		Sandboxes []sandbox `json:"sandboxes"`
	}
	n.run(t, &out, nil, "sandboxes", "--cri", criSocket)
	for _, s := range out.Sandboxes {
		if s.UID == string(pod.UID) {
			return s.ID
		}
	}
	t.Fatalf("the runtime has no ready sandbox for %s/%s (uid %s): %+v", pod.Namespace, pod.Name, pod.UID, out.Sandboxes)
	return ""
}

// conns reads the connection table from the pins, as pktmetactl does on a
// node without the agent's API.
func (n *nodeProbe) conns(t *testing.T) []view.Conn {
	t.Helper()
	out, err := n.c.exec(ctxT(t), n.ns, n.name, nil, "pktmetactl", "--pin-path", pinPathNode, "--api-socket", "/nonexistent", "conns", "-o", "json")
	if err != nil {
		t.Fatalf("pktmetactl conns: %v", err)
	}
	var conns []view.Conn
	if err := json.Unmarshal(out, &conns); err != nil {
		t.Fatalf("pktmetactl conns: %v in %q", err, out)
	}
	return conns
}

// nodeStatus is the part of `pktmetactl status -o json` the suite reads.
type nodeStatus struct {
	Release     uint32 `json:"release"`
	Current     bool   `json:"current"`
	Attachments []struct {
		Workload   uint32            `json:"workload"`
		Namespace  string            `json:"namespace"`
		Pod        string            `json:"pod"`
		HostIfName string            `json:"hostIfname"`
		Ingress    string            `json:"ingress"`
		Egress     string            `json:"egress"`
		Spoofed    uint64            `json:"spoofed"`
		PodTags    map[string]string `json:"podTags"`
	} `json:"attachments"`
	Counters map[string]uint64 `json:"counters"`
	Problems []string          `json:"problems"`
}

// status runs pktmetactl status; its exit status 1 only says there are
// problems, which the JSON lists.
func (n *nodeProbe) status(t *testing.T) nodeStatus {
	t.Helper()
	out, err := n.c.exec(ctxT(t), n.ns, n.name, nil, "pktmetactl", "--pin-path", pinPathNode, "status", "-o", "json")
	var st nodeStatus
	if jerr := json.Unmarshal(out, &st); jerr != nil {
		t.Fatalf("pktmetactl status: %v (%v) in %q", jerr, err, out)
	}
	return st
}

type httpResult struct {
	OK        bool   `json:"ok"`
	Status    int    `json:"status"`
	Err       string `json:"err"`
	Body      string `json:"body"`
	Truncated bool   `json:"truncated"`
}

// httpGet fetches a URL from a pod (the probe: the node's network).
func (c *cluster) httpGet(t *testing.T, ns, pod, url string) httpResult {
	t.Helper()
	out, err := c.exec(ctxT(t), ns, pod, nil, "e2etool", "http-get", url)
	if err != nil {
		t.Fatalf("http-get %s from %s/%s: %v", url, ns, pod, err)
	}
	var r httpResult
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("http-get: %v in %q", err, out)
	}
	if r.Truncated {
		t.Fatalf("http-get %s: the body was cut at %d bytes", url, len(r.Body))
	}
	return r
}

// watcher is a long-running probe command (watch-hooks, watch-file) that
// prints one summary when its stop file appears.
type watcher struct {
	n        *nodeProbe
	stopFile string
	done     chan struct{}
	out      []byte
	err      error
}

// startWatch starts a watcher and returns once it took its first sample.
func (n *nodeProbe) startWatch(t *testing.T, name string, args ...string) *watcher {
	t.Helper()
	// A new stop file for every watch: the tool image has no rm.
	w := &watcher{n: n, stopFile: fmt.Sprintf("/tmp/stop-%s-%d", name, time.Now().UnixNano()), done: make(chan struct{})}
	started := make(chan struct{})
	sw := &signalWriter{signal: started, marker: []byte(`"watching"`)}
	go func() {
		defer close(w.done)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		w.err = n.c.execTo(ctx, n.ns, n.name, sw, append([]string{"e2etool"}, append(args, "--stop-file", w.stopFile)...)...)
		w.out = sw.bytes()
	}()
	select {
	case <-started:
	case <-w.done:
		t.Fatalf("%s ended before it started: %v: %s", name, w.err, w.out)
	case <-time.After(2 * time.Minute):
		t.Fatalf("%s did not start", name)
	}
	return w
}

// stop ends the watcher and decodes its summary (the last line) into v.
func (w *watcher) stop(t *testing.T, v any) {
	t.Helper()
	if _, err := w.n.c.exec(ctxT(t), w.n.ns, w.n.name, []byte("stop\n"), "e2etool", "write", w.stopFile); err != nil {
		t.Fatalf("stop watcher: %v", err)
	}
	select {
	case <-w.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("watcher did not stop")
	}
	if w.err != nil {
		t.Fatalf("watcher: %v: %s", w.err, w.out)
	}
	lines := strings.Split(strings.TrimSpace(string(w.out)), "\n")
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), v); err != nil {
		t.Fatalf("watcher summary: %v in %q", err, w.out)
	}
}

// signalWriter collects output and closes signal when marker first shows.
type signalWriter struct {
	mu     sync.Mutex
	buf    []byte
	marker []byte
	signal chan struct{}
	fired  bool
}

func (s *signalWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = append(s.buf, p...)
	if !s.fired && strings.Contains(string(s.buf), string(s.marker)) {
		s.fired = true
		close(s.signal)
	}
	return len(p), nil
}

func (s *signalWriter) bytes() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]byte(nil), s.buf...)
}

var _ io.Writer = (*signalWriter)(nil)

// nodeIP is the node's InternalIP.
func (c *cluster) nodeIP(t *testing.T) string {
	t.Helper()
	nodes, err := c.client.CoreV1().Nodes().List(ctxT(t), metav1.ListOptions{})
	if err != nil || len(nodes.Items) == 0 {
		t.Fatalf("nodes: %v (%d)", err, len(nodes.Items))
	}
	for _, a := range nodes.Items[0].Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	t.Fatalf("node %s has no InternalIP", nodes.Items[0].Name)
	return ""
}

func describe(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
