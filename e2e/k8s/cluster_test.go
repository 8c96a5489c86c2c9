package k8s

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/streaming/pkg/httpstream"
)

// config is what the suite is told about the cluster and the builds under
// test, by make e2e-k8s (e2e/k8s/node/run.sh) or make e2e-kind.
type config struct {
	kubeconfig string
	kubectl    string
	deployDir  string // deploy/, applied through an overlay that changes only image and pull policy

	image, nextImage     string // pktmeta now, and the build a rolling update moves to
	nextVersion          string // internal/version of the next build
	nextRelease          string // its datapath release
	pluginSHA, nextSHA   string // sha256 of the CNI plugin binary in each image
	toolImage            string // e2etool + pktmetactl (e2e/k8s/images)
	pullPolicy           corev1.PullPolicy
	systemNamespace      string // deploy/'s namespace
	agentSelector        string
	workloadNamespace    string
	probeNamespace       string
	nodeProbeBPFFSPinDir string
}

func loadConfig(t *testing.T) config {
	t.Helper()
	c := config{
		kubeconfig:           os.Getenv("PKTMETA_E2E_KUBECONFIG"),
		kubectl:              envOr("PKTMETA_E2E_KUBECTL", "kubectl"),
		deployDir:            envOr("PKTMETA_E2E_DEPLOY", "../../deploy"),
		image:                os.Getenv("PKTMETA_E2E_IMAGE"),
		nextImage:            os.Getenv("PKTMETA_E2E_NEXT_IMAGE"),
		nextVersion:          os.Getenv("PKTMETA_E2E_NEXT_VERSION"),
		nextRelease:          os.Getenv("PKTMETA_E2E_NEXT_RELEASE"),
		pluginSHA:            os.Getenv("PKTMETA_E2E_PLUGIN_SHA256"),
		nextSHA:              os.Getenv("PKTMETA_E2E_NEXT_PLUGIN_SHA256"),
		toolImage:            os.Getenv("PKTMETA_E2E_TOOL_IMAGE"),
		pullPolicy:           corev1.PullPolicy(envOr("PKTMETA_E2E_PULL_POLICY", string(corev1.PullNever))),
		systemNamespace:      "pktmeta-system",
		agentSelector:        "app.kubernetes.io/name=pktmeta,app.kubernetes.io/component=agent",
		workloadNamespace:    "pktmeta-e2e",
		probeNamespace:       "pktmeta-e2e-node",
		nodeProbeBPFFSPinDir: "/sys/fs/bpf/pktmeta",
	}
	if c.kubeconfig == "" {
		t.Skip("no cluster: PKTMETA_E2E_KUBECONFIG is unset; make e2e-k8s (a local single-node Kubernetes) or make e2e-kind runs this suite against one")
	}
	for name, v := range map[string]string{
		"PKTMETA_E2E_IMAGE": c.image, "PKTMETA_E2E_NEXT_IMAGE": c.nextImage, "PKTMETA_E2E_NEXT_VERSION": c.nextVersion,
		"PKTMETA_E2E_NEXT_RELEASE": c.nextRelease, "PKTMETA_E2E_PLUGIN_SHA256": c.pluginSHA,
		"PKTMETA_E2E_NEXT_PLUGIN_SHA256": c.nextSHA, "PKTMETA_E2E_TOOL_IMAGE": c.toolImage,
	} {
		if v == "" {
			t.Fatalf("%s is unset: run the suite through make e2e-k8s or make e2e-kind, which build the images and set it", name)
		}
	}
	abs, err := filepath.Abs(c.deployDir)
	if err != nil {
		t.Fatal(err)
	}
	c.deployDir = abs
	return c
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// cluster is a connection to the API server.
type cluster struct {
	cfg    config
	rest   *rest.Config
	client kubernetes.Interface
}

func connect(t *testing.T, cfg config) *cluster {
	t.Helper()
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.kubeconfig)
	if err != nil {
		t.Fatalf("kubeconfig %s: %v", cfg.kubeconfig, err)
	}
	rc.QPS, rc.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	return &cluster{cfg: cfg, rest: rc, client: cs}
}

// kubectl runs the cluster's kubectl against the kubeconfig.
func (c *cluster) kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, c.cfg.kubectl, append([]string{"--kubeconfig", c.cfg.kubeconfig}, args...)...)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out.String(), nil
}

// overlay writes a kustomization that applies deploy/ as a user would,
// changing only the image reference and its pull policy (the images are
// imported into the node, never pulled).
func (c *cluster) overlay(t *testing.T, image string) string {
	t.Helper()
	dir := t.TempDir()
	rel, err := filepath.Rel(dir, c.cfg.deployDir)
	if err != nil {
		t.Fatal(err)
	}
	name, tag, ok := strings.Cut(image, ":")
	if !ok || strings.Contains(tag, "/") {
		t.Fatalf("image %q has no tag", image)
	}
	k := fmt.Sprintf(`apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - %s
images:
  - name: ghcr.io/pktmeta/pktmeta
    newName: %s
    newTag: %s
patches:
  - target: {kind: DaemonSet, name: pktmeta}
    patch: |-
      - {op: replace, path: /spec/template/spec/initContainers/0/imagePullPolicy, value: %s}
      - {op: replace, path: /spec/template/spec/containers/0/imagePullPolicy, value: %s}
`, rel, name, tag, c.cfg.pullPolicy, c.cfg.pullPolicy)
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// poll calls f until it returns nil or the timeout passes, and fails the
// test with f's last error. It is a deadline for something to happen, not
// a measurement: nothing asserts how long it took.
func poll(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	if err := pollErr(timeout, f); err != nil {
		t.Fatalf("%s: still not so after %s: %v", what, timeout, err)
	}
}

func pollErr(timeout time.Duration, f func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// ensureNamespace creates ns (and deletes it when the test ends).
func (c *cluster) ensureNamespace(t *testing.T, ns string) {
	t.Helper()
	ctx := ctxT(t)
	_, err := c.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.client.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{})
	})
}

// podSpec is a pod of the e2e tool image.
type podSpec struct {
	name        string
	args        []string
	labels      map[string]string
	annotations map[string]string
}

// runPod creates an ordinary pod (the runtime's default capabilities,
// CAP_NET_RAW included) and waits until it runs, with an IP.
func (c *cluster) runPod(t *testing.T, ns string, s podSpec) *corev1.Pod {
	t.Helper()
	labels := map[string]string{"pktmeta.test/pod": s.name}
	for k, v := range s.labels {
		labels[k] = v
	}
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Namespace: ns, Labels: labels, Annotations: s.annotations},
		Spec: corev1.PodSpec{
			TerminationGracePeriodSeconds: ptr(int64(1)),
			AutomountServiceAccountToken:  ptr(false),
			EnableServiceLinks:            ptr(false),
			Containers: []corev1.Container{{
				Name:            "main",
				Image:           c.cfg.toolImage,
				ImagePullPolicy: c.cfg.pullPolicy,
				Args:            s.args,
			}},
		},
	}
	ctx := ctxT(t)
	if _, err := c.client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, s.name, err)
	}
	return c.waitRunning(t, ns, s.name)
}

func (c *cluster) waitRunning(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	poll(t, "pod "+ns+"/"+name+" running", 2*time.Minute, func() error {
		p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			return fmt.Errorf("phase %s, IP %q, conditions %v: %s", p.Status.Phase, p.Status.PodIP, p.Status.Conditions, c.podEvents(ns, name))
		}
		pod = p
		return nil
	})
	return pod
}

// containerState says how a pod's containers are doing, with the end of
// their log (a usage error is not JSON), for messages.
func (c *cluster) containerState(ns, name string) string {
	p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, s := range p.Status.ContainerStatuses {
		fmt.Fprintf(&b, "container %s restarts %d", s.Name, s.RestartCount)
		if t := s.LastTerminationState.Terminated; t != nil {
			fmt.Fprintf(&b, ", last exit %d (%s)", t.ExitCode, t.Reason)
		}
	}
	if raw, err := c.client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{Previous: true, TailLines: ptr(int64(3))}).DoRaw(context.Background()); err == nil && len(raw) > 0 {
		fmt.Fprintf(&b, "; previous log: %q", raw)
	}
	return b.String()
}

// podEvents summarises the events of a pod, for messages.
func (c *cluster) podEvents(ns, name string) string {
	ev, err := c.client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, e := range ev.Items {
		fmt.Fprintf(&b, "[%s %s: %s] ", e.Type, e.Reason, e.Message)
	}
	return b.String()
}

// logLines returns a pod's JSON log lines as maps.
func (c *cluster) logLines(t *testing.T, ns, name string) []map[string]any {
	t.Helper()
	raw, err := c.client.CoreV1().Pods(ns).GetLogs(name, &corev1.PodLogOptions{}).DoRaw(ctxT(t))
	if err != nil {
		t.Fatalf("logs of %s/%s: %v", ns, name, err)
	}
	var out []map[string]any
	sc := bufio.NewScanner(bytes.NewReader(raw))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// events filters a pod's log lines by their "event" field.
func (c *cluster) events(t *testing.T, ns, name, event string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range c.logLines(t, ns, name) {
		if l["event"] == event {
			out = append(out, l)
		}
	}
	return out
}

// waitEvent waits for a pod to log at least n lines of one event.
func (c *cluster) waitEvent(t *testing.T, ns, name, event string, n int) []map[string]any {
	t.Helper()
	var got []map[string]any
	poll(t, fmt.Sprintf("%s/%s logging %d %q", ns, name, n, event), 2*time.Minute, func() error {
		got = c.events(t, ns, name, event)
		if len(got) < n {
			return fmt.Errorf("%d so far; errors: %v; %s", len(got), c.events(t, ns, name, "error"), c.containerState(ns, name))
		}
		return nil
	})
	return got
}

// exec runs a command in a pod's first container and returns its stdout;
// a non-zero exit is an error that carries stderr, with stdout returned.
func (c *cluster) exec(ctx context.Context, ns, pod string, stdin []byte, cmd ...string) ([]byte, error) {
	var out bytes.Buffer
	var in io.Reader
	if stdin != nil {
		in = bytes.NewReader(stdin)
	}
	err := c.stream(ctx, ns, pod, in, &out, cmd...)
	return out.Bytes(), err
}

// execTo runs a command in a pod, its stdout written to w as it comes.
func (c *cluster) execTo(ctx context.Context, ns, pod string, w io.Writer, cmd ...string) error {
	return c.stream(ctx, ns, pod, nil, w, cmd...)
}

func (c *cluster) stream(ctx context.Context, ns, pod string, stdin io.Reader, stdout io.Writer, cmd ...string) error {
	req := c.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Command: cmd, Stdin: stdin != nil, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ws, err := remotecommand.NewWebSocketExecutor(c.rest, http.MethodGet, req.URL().String())
	if err != nil {
		return err
	}
	spdy, err := remotecommand.NewSPDYExecutor(c.rest, http.MethodPost, req.URL())
	if err != nil {
		return err
	}
	ex, err := remotecommand.NewFallbackExecutor(ws, spdy, func(err error) bool {
		return httpstream.IsUpgradeFailure(err) || httpstream.IsHTTPSProxyError(err)
	})
	if err != nil {
		return err
	}
	var stderr bytes.Buffer
	if err := ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: stdin, Stdout: stdout, Stderr: &stderr}); err != nil {
		return fmt.Errorf("exec %s in %s/%s: %w: %s", strings.Join(cmd, " "), ns, pod, err, stderr.String())
	}
	return nil
}

// agentPods lists the pktmeta agent pods.
func (c *cluster) agentPods(ctx context.Context) ([]corev1.Pod, error) {
	l, err := c.client.CoreV1().Pods(c.cfg.systemNamespace).List(ctx, metav1.ListOptions{LabelSelector: c.cfg.agentSelector})
	if err != nil {
		return nil, err
	}
	return l.Items, nil
}

// daemonSet returns pktmeta's DaemonSet.
func (c *cluster) daemonSet(ctx context.Context) (*appsv1.DaemonSet, error) {
	return c.client.AppsV1().DaemonSets(c.cfg.systemNamespace).Get(ctx, "pktmeta", metav1.GetOptions{})
}

// waitRolledOut waits until the DaemonSet runs its current template on
// every node it wants, all of them ready and available.
func (c *cluster) waitRolledOut(t *testing.T, timeout time.Duration) *appsv1.DaemonSet {
	t.Helper()
	var ds *appsv1.DaemonSet
	poll(t, "DaemonSet pktmeta rolled out and ready", timeout, func() error {
		d, err := c.daemonSet(context.Background())
		if err != nil {
			return err
		}
		s := d.Status
		if s.ObservedGeneration < d.Generation || s.DesiredNumberScheduled == 0 ||
			s.UpdatedNumberScheduled != s.DesiredNumberScheduled || s.NumberReady != s.DesiredNumberScheduled ||
			s.NumberAvailable != s.DesiredNumberScheduled {
			return fmt.Errorf("status %+v; agent pods: %s", s, c.agentSummary())
		}
		ds = d
		return nil
	})
	return ds
}

// agentSummary says what the agent pods are doing, for messages.
func (c *cluster) agentSummary() string {
	pods, err := c.agentPods(context.Background())
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range pods {
		fmt.Fprintf(&b, "%s %s", p.Name, p.Status.Phase)
		for _, s := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			fmt.Fprintf(&b, " [%s ready=%v restarts=%d", s.Name, s.Ready, s.RestartCount)
			if s.State.Waiting != nil {
				fmt.Fprintf(&b, " waiting %s: %s", s.State.Waiting.Reason, s.State.Waiting.Message)
			}
			if s.State.Terminated != nil {
				fmt.Fprintf(&b, " terminated %s: %s", s.State.Terminated.Reason, s.State.Terminated.Message)
			}
			b.WriteString("]")
		}
		fmt.Fprintf(&b, " %s; ", c.podEvents(p.Namespace, p.Name))
	}
	return b.String()
}

// agentLogs returns the agent container's log, for messages.
func (c *cluster) agentLogs(ctx context.Context) string {
	pods, err := c.agentPods(ctx)
	if err != nil || len(pods) == 0 {
		return fmt.Sprintf("(no agent pod: %v)", err)
	}
	raw, err := c.client.CoreV1().Pods(pods[0].Namespace).GetLogs(pods[0].Name, &corev1.PodLogOptions{Container: "agent"}).DoRaw(ctx)
	if err != nil {
		return err.Error()
	}
	return string(raw)
}

func ptr[T any](v T) *T { return &v }

var errNotYet = errors.New("not yet")
