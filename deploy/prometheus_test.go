package deploy

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/agent"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
	"sigs.k8s.io/yaml"
)

// The component that serves the base's /metrics to an in-cluster
// Prometheus.
const promComponent = "components/prometheus"

// What the overlay adds, exactly.
var (
	wantReviewRules = []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{"authorization.k8s.io"}, Resources: []string{"subjectaccessreviews"}, Verbs: []string{"create"}},
	}
	wantReaderRules = []rbacv1.PolicyRule{{NonResourceURLs: []string{"/metrics"}, Verbs: []string{"get"}}}
)

// patched applies a strategic merge patch file to obj, as kustomize's
// patches do, after checking that the patch decodes strictly and names obj.
func patched[T runtime.Object](t *testing.T, obj T, patchFile string) T {
	t.Helper()
	b, err := os.ReadFile(patchFile)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 1 {
		t.Fatalf("%s: %d objects, want 1", patchFile, len(objs))
	}
	pm, err := metaOf(objs[0])
	if err != nil {
		t.Fatal(err)
	}
	om, _ := metaOf(obj)
	if reflect.TypeOf(objs[0]) != reflect.TypeOf(obj) || pm.GetName() != om.GetName() || pm.GetNamespace() != om.GetNamespace() {
		t.Fatalf("%s patches %T %s/%s, want %T %s/%s", patchFile, objs[0], pm.GetNamespace(), pm.GetName(), obj, om.GetNamespace(), om.GetName())
	}
	patch, err := yaml.YAMLToJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	orig, err := json.Marshal(obj)
	if err != nil {
		t.Fatal(err)
	}
	var zero T
	schema := reflect.New(reflect.TypeOf(zero).Elem()).Interface()
	out, err := strategicpatch.StrategicMergePatch(orig, patch, schema)
	if err != nil {
		t.Fatalf("%s: %v", patchFile, err)
	}
	res := reflect.New(reflect.TypeOf(zero).Elem()).Interface().(T)
	if err := json.Unmarshal(out, res); err != nil {
		t.Fatal(err)
	}
	return res
}

func TestPrometheusComponent(t *testing.T) {
	k, err := LoadComponent(promComponent)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(k.Resources, []string{"rbac.yaml"}) || len(k.Images) != 0 || k.Namespace != "" || len(k.Components) != 0 {
		t.Errorf("resources %v images %v namespace %q components %v: want rbac.yaml and nothing else", k.Resources, k.Images, k.Namespace, k.Components)
	}
	for _, l := range k.Labels {
		if l.IncludeSelectors {
			t.Errorf("labels %v include selectors", l.Pairs)
		}
	}
	var patches []string
	for _, p := range k.Patches {
		patches = append(patches, p.Path)
	}
	if !slices.Equal(patches, []string{"configmap-patch.yaml", "daemonset-patch.yaml"}) {
		t.Errorf("patches %v", patches)
	}
	files, _ := filepath.Glob(filepath.Join(promComponent, "*.yaml"))
	for _, f := range files {
		if b := filepath.Base(f); b != "kustomization.yaml" && !slices.Contains(k.Resources, b) && !slices.Contains(patches, b) {
			t.Errorf("%s is not used by the kustomization", f)
		}
	}

	base := manifests(t)
	baseDS := only[*appsv1.DaemonSet](t, base)
	baseCM := only[*corev1.ConfigMap](t, base)

	// The DaemonSet: the probes speak HTTPS, nothing else changes.
	ds := patched(t, baseDS.DeepCopy(), filepath.Join(promComponent, "daemonset-patch.yaml"))
	c := ds.Spec.Template.Spec.Containers[0]
	checkProbes(t, c, corev1.URISchemeHTTPS)
	back := ds.DeepCopy()
	for _, p := range []*corev1.Probe{back.Spec.Template.Spec.Containers[0].StartupProbe, back.Spec.Template.Spec.Containers[0].LivenessProbe, back.Spec.Template.Spec.Containers[0].ReadinessProbe} {
		if p != nil && p.HTTPGet != nil {
			p.HTTPGet.Scheme = corev1.URISchemeHTTP
		}
	}
	if !reflect.DeepEqual(back, baseDS) {
		t.Error("the DaemonSet patch changes more than the probes' scheme")
	}

	// The ConfigMap: HTTPS on every address with Kubernetes
	// authentication; the rest is the base's.
	cm := patched(t, baseCM.DeepCopy(), filepath.Join(promComponent, "configmap-patch.yaml"))
	if len(cm.Data) != 1 {
		t.Errorf("ConfigMap keys %d, want only %s", len(cm.Data), ConfigKey)
	}
	cfg, err := ParseAgentConfig([]byte(cm.Data[ConfigKey]))
	if err != nil {
		t.Fatalf("overlay config.yaml: %v", err)
	}
	host, port, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil || host != "" || port != strconv.Itoa(int(c.Ports[0].ContainerPort)) || cfg.MetricsAuth != "kubernetes" {
		t.Errorf("overlay metricsAddr %s metricsAuth %s: want :%d (every address, the container port) with kubernetes", cfg.MetricsAddr, cfg.MetricsAuth, c.Ports[0].ContainerPort)
	}
	baseCfg := agentConfig(t, base)
	rest := *cfg
	rest.MetricsAddr, rest.MetricsAuth = baseCfg.MetricsAddr, baseCfg.MetricsAuth
	if !reflect.DeepEqual(rest, *baseCfg) {
		t.Errorf("overlay config.yaml differs from the base's beyond the metrics listener:\n overlay %+v\n base    %+v", rest, *baseCfg)
	}
	// ... and the agent itself accepts it.
	p := filepath.Join(t.TempDir(), ConfigKey)
	if err := os.WriteFile(p, []byte(cm.Data[ConfigKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	acfg := agent.Defaults()
	if err := acfg.LoadFile(p); err != nil {
		t.Fatal(err)
	}
	acfg.NodeName, acfg.PodNamespace = "node-1", Namespace // the DaemonSet's
	if err := acfg.Validate(); err != nil || acfg.MetricsAuth != agent.MetricsAuthKubernetes {
		t.Fatalf("pktmeta-agent with the overlay's config: auth %s, %v", acfg.MetricsAuth, err)
	}

	// RBAC: the agent may review tokens and access; the scraper's role.
	objs, err := DecodeFile(filepath.Join(promComponent, "rbac.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(objs) != 3 {
		t.Fatalf("rbac.yaml: %d objects, want two ClusterRoles and a ClusterRoleBinding", len(objs))
	}
	roles := map[string]*rbacv1.ClusterRole{}
	var crb *rbacv1.ClusterRoleBinding
	for _, o := range objs {
		switch o := o.(type) {
		case *rbacv1.ClusterRole:
			roles[o.Name] = o
		case *rbacv1.ClusterRoleBinding:
			crb = o
		default:
			t.Errorf("rbac.yaml: unexpected %T", o)
		}
		if m, _ := metaOf(o); m.GetLabels()["app.kubernetes.io/name"] != "pktmeta" || m.GetNamespace() != "" {
			t.Errorf("%T %s: namespace %q labels %v", o, m.GetName(), m.GetNamespace(), m.GetLabels())
		}
	}
	auth, reader := roles["pktmeta-metrics-auth"], roles["pktmeta-metrics-reader"]
	if auth == nil || !reflect.DeepEqual(auth.Rules, wantReviewRules) || auth.AggregationRule != nil {
		t.Errorf("ClusterRole pktmeta-metrics-auth %+v, want create on tokenreviews and subjectaccessreviews only", auth)
	}
	if reader == nil || !reflect.DeepEqual(reader.Rules, wantReaderRules) || reader.AggregationRule != nil {
		t.Errorf("ClusterRole pktmeta-metrics-reader %+v, want get on /metrics only", reader)
	}
	sa := only[*corev1.ServiceAccount](t, base)
	if crb == nil || crb.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "pktmeta-metrics-auth"}) ||
		!reflect.DeepEqual(crb.Subjects, []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: Namespace}}) {
		t.Errorf("ClusterRoleBinding %+v, want pktmeta-metrics-auth for the agent's service account", crb)
	}
}

// A kustomization of the base with the component renders, and the result
// is the base plus the reviews. Skipped where neither kustomize nor
// kubectl is installed.
func TestPrometheusComponentRenders(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	here, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	// Outside deploy/ (kustomize refuses a base that contains its user),
	// by relative paths (it refuses absolute ones).
	dir := t.TempDir()
	rel, err := filepath.Rel(dir, here)
	if err != nil {
		t.Fatal(err)
	}
	k := "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - " + rel +
		"\ncomponents:\n  - " + filepath.Join(rel, promComponent) + "\n"
	if err := os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(k), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := KustomizeBuild(ctx, dir)
	if errors.Is(err, ErrNoKustomize) {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	objs, err := Decode(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := len(manifests(t)) + 3; len(objs) != want {
		t.Errorf("%d objects rendered, want %d", len(objs), want)
	}
	ds := only[*appsv1.DaemonSet](t, objs)
	checkProbes(t, ds.Spec.Template.Spec.Containers[0], corev1.URISchemeHTTPS)
	cfg := agentConfig(t, objs)
	if cfg.MetricsAuth != "kubernetes" || cfg.MetricsAddr != ":9964" {
		t.Errorf("rendered metricsAddr %s metricsAuth %s", cfg.MetricsAddr, cfg.MetricsAuth)
	}
	var bound bool
	for _, o := range objs {
		crb, ok := o.(*rbacv1.ClusterRoleBinding)
		if ok && crb.RoleRef.Name == "pktmeta-metrics-auth" {
			bound = len(crb.Subjects) == 1 && crb.Subjects[0].Namespace == Namespace && crb.Labels["app.kubernetes.io/part-of"] == "pktmeta"
		}
	}
	if !bound {
		t.Error("rendered: no pktmeta-metrics-auth binding for the agent, labelled part-of pktmeta")
	}
}
