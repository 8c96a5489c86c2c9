// Package kind checks the kind end-to-end test's files without running it
// (run.sh needs Docker): every manifest decodes strictly, the overlay
// renders, the workloads are what run.sh's assertions assume, and run.sh
// skips cleanly where there is no Docker engine.
package kind

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/deploy"
	"github.com/pktmeta/pktmeta/internal/agent"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
)

// What run.sh relies on.
const (
	imageTag     = "e2e"      // make image IMAGE_VERSION=e2e
	staticTag    = "kind-e2e" // .tags.cluster
	appNamespace = "pktmeta-e2e"
)

// cluster is the part of kind's v1alpha4 Cluster that cluster.yaml uses.
type cluster struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Networking struct {
		DisableDefaultCNI bool   `json:"disableDefaultCNI"`
		IPFamily          string `json:"ipFamily"`
		KubeProxyMode     string `json:"kubeProxyMode"`
	} `json:"networking"`
	Nodes []struct {
		Role string `json:"role"`
	} `json:"nodes"`
}

func TestClusterConfig(t *testing.T) {
	b, err := os.ReadFile("cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c cluster
	if err := deploy.StrictYAML(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind/apiVersion %s/%s", c.Kind, c.APIVersion)
	}
	if c.Networking.DisableDefaultCNI {
		t.Error("kindnet disabled: pktmeta chains after it")
	}
	var roles []string
	for _, n := range c.Nodes {
		roles = append(roles, n.Role)
	}
	if !reflect.DeepEqual(roles, []string{"control-plane", "worker", "worker"}) {
		t.Errorf("nodes %v, want 1 control plane and 2 workers", roles)
	}
}

func byType[T runtime.Object](objs []runtime.Object) []T {
	var out []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

func TestWorkloads(t *testing.T) {
	objs, err := deploy.DecodeFile("workloads.yaml")
	if err != nil {
		t.Fatal(err)
	}
	nss := byType[*corev1.Namespace](objs)
	if len(nss) != 1 || nss[0].Name != appNamespace {
		t.Fatalf("namespaces %v, want %s", nss, appNamespace)
	}
	deps := map[string]*appsv1.Deployment{}
	for _, d := range byType[*appsv1.Deployment](objs) {
		deps[d.Name] = d
		if d.Namespace != appNamespace {
			t.Errorf("deployment %s in %q", d.Name, d.Namespace)
		}
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("deployment %s: selector does not match its pods (%v)", d.Name, err)
		}
		for _, c := range d.Spec.Template.Spec.Containers {
			if !strings.HasPrefix(c.Image, "registry.k8s.io/e2e-test-images/agnhost:") {
				t.Errorf("deployment %s: image %s, run.sh execs /agnhost", d.Name, c.Image)
			}
		}
	}
	server, client := deps["e2e-server"], deps["e2e-client"]
	if server == nil || client == nil || len(deps) != 2 {
		t.Fatalf("deployments %v, want e2e-server and e2e-client", deps)
	}
	for _, d := range deps {
		if d.Spec.Template.Labels["app.kubernetes.io/name"] != d.Name {
			t.Errorf("%s: run.sh finds its pod by app.kubernetes.io/name=%s", d.Name, d.Name)
		}
	}

	// The client's annotation is a tag the plugin accepts.
	const prefix = "pktmeta.dev/"
	team := client.Spec.Template.Annotations[prefix+"team"]
	if team != "e2e" {
		t.Errorf("client annotation %steam=%q, run.sh expects the tag team=e2e", prefix, team)
	}
	if err := deploy.CheckPlugin(deploy.PluginSettings{Tags: map[string]string{"team": team}}); err != nil {
		t.Errorf("team tag: %v", err)
	}

	// Same node as the server.
	aff := client.Spec.Template.Spec.Affinity
	if aff == nil || aff.PodAffinity == nil || len(aff.PodAffinity.RequiredDuringSchedulingIgnoredDuringExecution) != 1 {
		t.Fatal("client has no required pod affinity to the server")
	}
	term := aff.PodAffinity.RequiredDuringSchedulingIgnoredDuringExecution[0]
	sel, err := metav1.LabelSelectorAsSelector(term.LabelSelector)
	if err != nil || term.TopologyKey != "kubernetes.io/hostname" || !sel.Matches(labels.Set(server.Spec.Template.Labels)) {
		t.Errorf("client affinity %+v does not put it on the server's node", term)
	}

	// The Service the client dials.
	svcs := byType[*corev1.Service](objs)
	if len(svcs) != 1 {
		t.Fatalf("%d services, want 1", len(svcs))
	}
	svc := svcs[0]
	if svc.Name != "e2e-server" || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(server.Spec.Template.Labels)) {
		t.Errorf("service %s selector %v does not select the server", svc.Name, svc.Spec.Selector)
	}
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].Port != 80 {
		t.Fatalf("service ports %+v, want 80", svc.Spec.Ports)
	}
	target := svc.Spec.Ports[0].TargetPort.String()
	found := false
	for _, p := range server.Spec.Template.Spec.Containers[0].Ports {
		found = found || p.Name == target
	}
	if !found {
		t.Errorf("service targetPort %s is not a named port of the server", target)
	}
	if args := strings.Join(client.Spec.Template.Spec.Containers[0].Args, " "); !strings.Contains(args, "e2e-server 80") {
		t.Errorf("client does not dial the service: %q", args)
	}
}

func TestOverlay(t *testing.T) {
	k, err := deploy.LoadKustomization("overlay")
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(k.Resources, []string{"../../../deploy"}) {
		t.Errorf("resources %v, want the deploy/ base", k.Resources)
	}
	if len(k.Images) != 1 || k.Images[0].Name != deploy.Image || k.Images[0].NewTag != imageTag || k.Images[0].NewName != "" {
		t.Errorf("images %+v, want %s:%s", k.Images, deploy.Image, imageTag)
	}
	run, err := os.ReadFile("run.sh")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(run), "IMAGE_VERSION="+imageTag+" ") {
		t.Errorf("run.sh does not build the image with IMAGE_VERSION=%s", imageTag)
	}

	var ds *appsv1.DaemonSet
	var cm *corev1.ConfigMap
	for _, p := range k.Patches {
		objs, err := deploy.DecodeFile(filepath.Join("overlay", p.Path))
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			switch o := o.(type) {
			case *appsv1.DaemonSet:
				ds = o
			case *corev1.ConfigMap:
				cm = o
			default:
				t.Errorf("%s: unexpected %T", p.Path, o)
			}
		}
	}
	if ds == nil || cm == nil {
		t.Fatal("want a DaemonSet and a ConfigMap patch")
	}
	if ds.Name != deploy.Name || ds.Namespace != deploy.Namespace || cm.Name != deploy.ConfigMapName || cm.Namespace != deploy.Namespace {
		t.Errorf("patches name %s/%s and %s/%s", ds.Namespace, ds.Name, cm.Namespace, cm.Name)
	}
	cfg, err := deploy.ParseAgentConfig([]byte(cm.Data[deploy.ConfigKey]))
	if err != nil {
		t.Fatalf("e2e config.yaml: %v", err)
	}
	if cfg.Plugin.Tags["cluster"] != staticTag {
		t.Errorf("static tags %v, run.sh expects cluster=%s", cfg.Plugin.Tags, staticTag)
	}
	// ... and the agent itself accepts it.
	p := filepath.Join(t.TempDir(), deploy.ConfigKey)
	if err := os.WriteFile(p, []byte(cm.Data[deploy.ConfigKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	acfg := agent.Defaults()
	if err := acfg.LoadFile(p); err != nil {
		t.Fatalf("pktmeta-agent refuses the e2e config: %v", err)
	}
	if err := acfg.Validate(); err != nil {
		t.Fatalf("pktmeta-agent refuses the e2e config: %v", err)
	}

	// The e2e config is the base's but for logs, tags and labels: anything
	// else would make the e2e test something the base never ships.
	base := baseConfig(t)
	strip := func(c deploy.AgentConfig) deploy.AgentConfig {
		c.Plugin.LogLevel, c.Plugin.Tags, c.LabelTags = "", nil, nil
		return c
	}
	if a, b := strip(*cfg), strip(*base); !reflect.DeepEqual(a, b) {
		t.Errorf("e2e config differs from deploy/configmap.yaml beyond logs and tags:\n e2e  %+v\n base %+v", a, b)
	}
}

func baseConfig(t *testing.T) *deploy.AgentConfig {
	t.Helper()
	objs, err := deploy.DecodeFile("../../deploy/configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cms := byType[*corev1.ConfigMap](objs)
	if len(cms) != 1 {
		t.Fatal("deploy/configmap.yaml: want one ConfigMap")
	}
	c, err := deploy.ParseAgentConfig([]byte(cms[0].Data[deploy.ConfigKey]))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// The overlay renders, and the result is what run.sh expects. Skipped
// where neither kustomize nor kubectl is installed.
func TestOverlayRenders(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := deploy.KustomizeBuild(ctx, "overlay")
	if errors.Is(err, deploy.ErrNoKustomize) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	objs, err := deploy.Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	dss := byType[*appsv1.DaemonSet](objs)
	if len(dss) != 1 {
		t.Fatalf("%d DaemonSets rendered", len(dss))
	}
	spec := dss[0].Spec.Template.Spec
	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("containers %d+%d: a patch added a container instead of changing one", len(spec.InitContainers), len(spec.Containers))
	}
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		if c.Image != deploy.Image+":"+imageTag || c.ImagePullPolicy != corev1.PullNever {
			t.Errorf("container %s: image %s pull %s, want %s:%s, Never", c.Name, c.Image, c.ImagePullPolicy, deploy.Image, imageTag)
		}
	}
	// The base's security settings survive the patch.
	if sc := spec.Containers[0].SecurityContext; sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Add) == 0 || !spec.HostNetwork {
		t.Error("the patch lost the agent's security context or hostNetwork")
	}
	cms := byType[*corev1.ConfigMap](objs)
	if len(cms) != 1 {
		t.Fatalf("%d ConfigMaps rendered", len(cms))
	}
	cfg, err := deploy.ParseAgentConfig([]byte(cms[0].Data[deploy.ConfigKey]))
	if err != nil || cfg.Plugin.Tags["cluster"] != staticTag {
		t.Errorf("rendered config: %v, tags %v", err, cfg.Plugin.Tags)
	}
}

// Where there is no Docker, run.sh says so and succeeds, before building
// or creating anything.
func TestRunSkipsWithoutDocker(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	// A PATH with nothing but what run.sh needs before its check: no
	// docker, no kind.
	bin := t.TempDir()
	for _, tool := range []string{"dirname"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("no %s", tool)
		}
		if err := os.Symlink(p, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, "run.sh")
	cmd.Env = []string{"PATH=" + bin, "HOME=" + t.TempDir(), "MAKE=/nonexistent/make"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("run.sh without docker: %v\n%s", err, out)
	}
	if want := "kind e2e needs a Docker engine that can run kind; none here (no docker command): skipping\n"; string(out) != want {
		t.Errorf("output %q, want %q", out, want)
	}

	st, err := os.Stat("run.sh")
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&0o111 == 0 {
		t.Error("run.sh is not executable")
	}
}
