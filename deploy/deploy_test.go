package deploy

import (
	"context"
	"errors"
	"maps"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/pktmeta/pktmeta/internal/kubenode"
)

// The image layout (hack/mkimage) the DaemonSet relies on.
const pluginInImage = "/opt/pktmeta/bin/pktmeta"

// The agent's command line: the flags and subcommands pktmeta-agent must
// accept (see cmd/pktmeta-agent).
var wantAgentArgs = []string{
	"run",
	"--cni-conf-dir=/host/etc/cni/net.d",
	"--cni-bin-dir=/host/opt/cni/bin",
	"--host-cgroup-dir=/host/sys/fs/cgroup",
	"--plugin-binary=" + pluginInImage,
	"--pin-path=/sys/fs/bpf/pktmeta",
	"--run-dir=/run/pktmeta",
	"--state-dir=/var/lib/pktmeta",
	"--config=/etc/pktmeta/config.yaml",
	"--node-name=$(NODE_NAME)",
	"--log-level=info",
}

var wantInitArgs = []string{"mount-bpffs", "--bpffs=/sys/fs/bpf"}

// Capabilities of the agent container, exactly (daemonset.yaml says why
// each one, and why not the others).
var wantCaps = []corev1.Capability{"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"}

type wantMount struct {
	volume      string
	hostPath    string // "" for a non-hostPath volume
	hostType    corev1.HostPathType
	readOnly    bool
	propagation corev1.MountPropagationMode // "" for none
}

var wantAgentMounts = map[string]wantMount{
	"/host/etc/cni/net.d": {"cni-conf", "/etc/cni/net.d", corev1.HostPathDirectoryOrCreate, false, ""},
	"/host/opt/cni/bin":   {"cni-bin", "/opt/cni/bin", corev1.HostPathDirectoryOrCreate, false, ""},
	"/sys/fs/bpf":         {"bpffs", "/sys/fs/bpf", corev1.HostPathDirectory, false, corev1.MountPropagationHostToContainer},
	// Spelt /run/netns on the host: containerd 1.6 checks the propagation
	// of a HostToContainer source without resolving /var/run -> /run.
	"/var/run/netns":  {"netns", "/run/netns", corev1.HostPathDirectoryOrCreate, true, corev1.MountPropagationHostToContainer},
	"/run/containerd": {"cri", "/run/containerd", corev1.HostPathDirectoryOrCreate, true, ""},
	// The application interface goes on the host's cgroup v2 root.
	"/host/sys/fs/cgroup": {"cgroup", "/sys/fs/cgroup", corev1.HostPathDirectory, true, ""},
	"/run/pktmeta":        {"run", "/run/pktmeta", corev1.HostPathDirectoryOrCreate, false, ""},
	"/var/lib/pktmeta":    {"state", "/var/lib/pktmeta", corev1.HostPathDirectoryOrCreate, false, ""},
	"/etc/pktmeta":        {"config", "", "", true, ""},
	"/tmp":                {"tmp", "", "", false, ""},
}

// manifests decodes every resource the kustomization lists.
func manifests(t *testing.T) []runtime.Object {
	t.Helper()
	k, err := LoadKustomization(".")
	if err != nil {
		t.Fatal(err)
	}
	var all []runtime.Object
	for _, r := range k.Resources {
		objs, err := DecodeFile(r)
		if err != nil {
			t.Fatal(err)
		}
		if len(objs) == 0 {
			t.Fatalf("%s: no objects", r)
		}
		all = append(all, objs...)
	}
	return all
}

// only returns the single object of type T.
func only[T runtime.Object](t *testing.T, objs []runtime.Object) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("%d objects of type %T, want 1", len(found), zero)
	}
	return found[0]
}

func daemonSet(t *testing.T) *appsv1.DaemonSet {
	return only[*appsv1.DaemonSet](t, manifests(t))
}

func agentConfig(t *testing.T, objs []runtime.Object) *AgentConfig {
	t.Helper()
	cm := only[*corev1.ConfigMap](t, objs)
	if cm.Name != ConfigMapName {
		t.Fatalf("ConfigMap %s, want %s", cm.Name, ConfigMapName)
	}
	if len(cm.Data) != 1 || cm.Data[ConfigKey] == "" {
		t.Fatalf("ConfigMap keys %v, want only %s", slices.Collect(maps.Keys(cm.Data)), ConfigKey)
	}
	c, err := ParseAgentConfig([]byte(cm.Data[ConfigKey]))
	if err != nil {
		t.Fatalf("%s in ConfigMap %s: %v", ConfigKey, cm.Name, err)
	}
	return c
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	k, err := LoadKustomization(".")
	if err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	listed := slices.Sorted(slices.Values(k.Resources))
	if !slices.Equal(listed, files) {
		t.Errorf("resources %v, want every manifest here: %v", listed, files)
	}
	if k.Namespace != Namespace {
		t.Errorf("namespace %q, want %q", k.Namespace, Namespace)
	}
	// kustomize edit set image ghcr.io/pktmeta/pktmeta=... finds this.
	if len(k.Images) != 1 || k.Images[0].Name != Image || k.Images[0].NewTag == "" {
		t.Errorf("images %+v, want one entry named %s with a tag", k.Images, Image)
	}
	for _, l := range k.Labels {
		if l.IncludeSelectors {
			t.Errorf("labels %v include selectors: a DaemonSet's selector cannot change after install", l.Pairs)
		}
	}
}

func TestManifestsAreNamespaced(t *testing.T) {
	for _, o := range manifests(t) {
		m, err := metaOf(o)
		if err != nil {
			t.Fatal(err)
		}
		switch o.(type) {
		case *corev1.Namespace:
			if m.GetName() != Namespace {
				t.Errorf("Namespace %s, want %s", m.GetName(), Namespace)
			}
		case *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding:
			if m.GetNamespace() != "" {
				t.Errorf("%T %s has a namespace", o, m.GetName())
			}
		default:
			// Explicit, so that kubectl apply -f works without kustomize too.
			if m.GetNamespace() != Namespace {
				t.Errorf("%T %s in namespace %q, want %q", o, m.GetName(), m.GetNamespace(), Namespace)
			}
		}
		if m.GetLabels()["app.kubernetes.io/name"] != "pktmeta" {
			t.Errorf("%T %s: no app.kubernetes.io/name=pktmeta label", o, m.GetName())
		}
	}
}

func metaOf(o runtime.Object) (metav1.Object, error) {
	m, ok := o.(metav1.Object)
	if !ok {
		return nil, errors.New("object without metadata")
	}
	return m, nil
}

// The decoder must catch what a careless edit introduces.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	orig, err := os.ReadFile("daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Decode(orig); err != nil {
		t.Fatal(err)
	}
	for name, edit := range map[string][2]string{
		"misspelt field":  {"      hostNetwork: true\n", "      hostNetwrok: true\n"},
		"case of a field": {"      hostNetwork: true\n", "      hostnetwork: true\n"},
		"duplicate field": {"      hostNetwork: true\n", "      hostNetwork: true\n      hostNetwork: false\n"},
		"wrong type":      {"      terminationGracePeriodSeconds: 30\n", "      terminationGracePeriodSeconds: thirty\n"},
	} {
		if !strings.Contains(string(orig), edit[0]) {
			t.Fatalf("%s: daemonset.yaml has no %q", name, edit[0])
		}
		bad := strings.Replace(string(orig), edit[0], edit[1], 1)
		if _, err := Decode([]byte(bad)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}

	var k Kustomization
	if err := StrictYAML([]byte("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nResources: [a.yaml]\n"), &k); err == nil {
		t.Error("kustomization key in the wrong case accepted")
	}
	if err := StrictYAML([]byte("resource: [a.yaml]\n"), &k); err == nil {
		t.Error("unknown kustomization key accepted")
	}
	const okConfig = "metricsAddr: \"127.0.0.1:1\"\nuninstallOnExit: auto\ncriSocket: /x\nplugin:\n  pinPath: /sys/fs/bpf/x\n"
	if _, err := ParseAgentConfig([]byte(okConfig)); err != nil {
		t.Errorf("minimal agent config: %v", err)
	}
	for name, bad := range map[string]string{
		"key in the wrong case":             strings.Replace(okConfig, "pinPath", "pinpath", 1),
		"unknown key":                       okConfig + "logLevel: info\n",
		"maxConnections the plugin refuses": okConfig + "  maxConnections: 5\n",
		"tag the plugin refuses":            okConfig + "  tags: {\"-bad\": x}\n",
		"label key that is no tag key":      okConfig + "labelTags: [\"a b\"]\n",
		"unauthenticated metrics for all":   strings.Replace(okConfig, "127.0.0.1:1", ":1", 1),
		"metricsAuth nobody knows":          okConfig + "metricsAuth: basic\n",
		"certificate without HTTPS":         okConfig + "metricsCertFile: /a\nmetricsKeyFile: /b\n",
	} {
		if _, err := ParseAgentConfig([]byte(bad)); err == nil {
			t.Errorf("agent config with a %s accepted", name)
		}
	}
}

func TestDaemonSet(t *testing.T) {
	objs := manifests(t)
	ds := only[*appsv1.DaemonSet](t, objs)
	spec := ds.Spec.Template.Spec

	if ds.Name != Name {
		t.Errorf("DaemonSet %s, want %s (the Role names it)", ds.Name, Name)
	}
	sel, err := metav1.LabelSelectorAsSelector(ds.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(ds.Spec.Template.Labels)) {
		t.Errorf("selector %v does not select the template's labels %v (%v)", ds.Spec.Selector, ds.Spec.Template.Labels, err)
	}
	if !spec.HostNetwork {
		t.Error("hostNetwork is not set")
	}
	if spec.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName %q", spec.PriorityClassName)
	}
	if !reflect.DeepEqual(spec.Tolerations, []corev1.Toleration{{Operator: corev1.TolerationOpExists}}) {
		t.Errorf("tolerations %+v, want one that tolerates every taint", spec.Tolerations)
	}
	if spec.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy %q: the agent must not depend on cluster DNS", spec.DNSPolicy)
	}
	if spec.TerminationGracePeriodSeconds == nil || *spec.TerminationGracePeriodSeconds < 10 {
		t.Error("terminationGracePeriodSeconds unset or too short for an uninstall")
	}
	us := ds.Spec.UpdateStrategy
	if us.Type != appsv1.RollingUpdateDaemonSetStrategyType || us.RollingUpdate == nil || us.RollingUpdate.MaxUnavailable == nil {
		t.Fatalf("updateStrategy %+v, want RollingUpdate with maxUnavailable", us)
	}
	if mu := us.RollingUpdate.MaxUnavailable; !(mu.Type == intstr.Int && mu.IntVal == 1) && !(mu.Type == intstr.String && mu.StrVal == "10%") {
		t.Errorf("maxUnavailable %s, want 1 or 10%%", mu.String())
	}
	if ms := us.RollingUpdate.MaxSurge; ms != nil && ms.IntValue() != 0 {
		t.Errorf("maxSurge %s: two agents on a node would share the host port", ms.String())
	}
	if spec.ServiceAccountName != only[*corev1.ServiceAccount](t, objs).Name {
		t.Errorf("serviceAccountName %q is not the manifests' ServiceAccount", spec.ServiceAccountName)
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
		if hp := v.HostPath; hp != nil && (hp.Path == "/" || hp.Path == "/proc" || strings.HasPrefix(hp.Path, "/proc/")) {
			t.Errorf("volume %s mounts the host's %s", v.Name, hp.Path)
		}
	}
	used := map[string]bool{}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for _, c := range all {
		if !strings.HasPrefix(c.Image, Image+":") {
			t.Errorf("container %s: image %s, want %s:<tag> (kustomize sets the tag)", c.Name, c.Image, Image)
		}
		if c.Image != spec.Containers[0].Image {
			t.Errorf("container %s: image %s differs from the agent's", c.Name, c.Image)
		}
		privileged := c.SecurityContext != nil && c.SecurityContext.Privileged != nil && *c.SecurityContext.Privileged
		for _, m := range c.VolumeMounts {
			if _, ok := volumes[m.Name]; !ok {
				t.Errorf("container %s mounts unknown volume %s", c.Name, m.Name)
			}
			used[m.Name] = true
			// The API refuses Bidirectional for unprivileged containers.
			if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional && !privileged {
				t.Errorf("container %s: Bidirectional mount %s without privileged", c.Name, m.MountPath)
			}
		}
		if sc := c.SecurityContext; sc != nil && sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
			// The API's rule, applied whatever the spelling.
			if privileged || (sc.Capabilities != nil && slices.ContainsFunc(sc.Capabilities.Add, func(c corev1.Capability) bool {
				return strings.TrimPrefix(string(c), "CAP_") == "SYS_ADMIN"
			})) {
				t.Errorf("container %s: allowPrivilegeEscalation false with privileged or SYS_ADMIN", c.Name)
			}
		}
	}
	for n := range volumes {
		if !used[n] {
			t.Errorf("volume %s is not mounted", n)
		}
	}

	// The init container: the only privileged code, and it only mounts bpffs.
	if len(spec.InitContainers) != 1 {
		t.Fatalf("%d init containers, want 1", len(spec.InitContainers))
	}
	ic := spec.InitContainers[0]
	if !slices.Equal(ic.Args, wantInitArgs) || len(ic.Command) != 0 {
		t.Errorf("init container command %q args %q, want the image's entrypoint with %q", ic.Command, ic.Args, wantInitArgs)
	}
	if ic.SecurityContext == nil || ic.SecurityContext.Privileged == nil || !*ic.SecurityContext.Privileged {
		t.Error("init container is not privileged: Bidirectional propagation needs it")
	}
	if len(ic.VolumeMounts) != 1 || ic.VolumeMounts[0].Name != "bpffs" || ic.VolumeMounts[0].MountPath != "/sys/fs/bpf" ||
		ic.VolumeMounts[0].MountPropagation == nil || *ic.VolumeMounts[0].MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("init container mounts %+v, want only bpffs at /sys/fs/bpf, Bidirectional", ic.VolumeMounts)
	}

	// The agent.
	if len(spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(spec.Containers))
	}
	c := spec.Containers[0]
	if len(c.Command) != 0 || !slices.Equal(c.Args, wantAgentArgs) {
		t.Errorf("agent command %q args %q\nwant the entrypoint with %q", c.Command, c.Args, wantAgentArgs)
	}
	sc := c.SecurityContext
	if sc == nil {
		t.Fatal("agent has no securityContext")
	}
	if sc.Privileged == nil || *sc.Privileged {
		t.Error("agent must be explicitly unprivileged")
	}
	if sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("agent drops %v, want [ALL]", sc.Capabilities)
	} else if got := slices.Sorted(slices.Values(sc.Capabilities.Add)); !slices.Equal(got, slices.Sorted(slices.Values(wantCaps))) {
		t.Errorf("agent adds capabilities %v, want exactly %v", got, wantCaps)
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		t.Error("agent root filesystem is writable")
	}
	if sc.RunAsUser == nil || *sc.RunAsUser != 0 {
		t.Error("agent must run as uid 0 (host files are root's; no DAC_OVERRIDE)")
	}
	if sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("agent seccomp %+v, want RuntimeDefault", sc.SeccompProfile)
	}
	if sc.AppArmorProfile == nil || sc.AppArmorProfile.Type != corev1.AppArmorProfileTypeUnconfined {
		t.Errorf("agent AppArmor %+v, want Unconfined (container profiles deny writes to /sys/fs/bpf)", sc.AppArmorProfile)
	}

	env := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			env[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	for n, path := range map[string]string{"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"} {
		if env[n] != path {
			t.Errorf("env %s from %q, want the downward API's %s", n, env[n], path)
		}
	}

	mounts := map[string]corev1.VolumeMount{}
	for _, m := range c.VolumeMounts {
		mounts[m.MountPath] = m
	}
	if len(mounts) != len(wantAgentMounts) {
		t.Errorf("agent mounts %v, want %d", slices.Sorted(maps.Keys(mounts)), len(wantAgentMounts))
	}
	for path, w := range wantAgentMounts {
		m, ok := mounts[path]
		if !ok {
			t.Errorf("agent does not mount %s", path)
			continue
		}
		prop := corev1.MountPropagationMode("")
		if m.MountPropagation != nil && *m.MountPropagation != corev1.MountPropagationNone {
			prop = *m.MountPropagation
		}
		if m.Name != w.volume || m.ReadOnly != w.readOnly || prop != w.propagation || m.SubPath != "" {
			t.Errorf("mount %s: volume %s readOnly %v propagation %q subPath %q; want %s %v %q", path, m.Name, m.ReadOnly, prop, m.SubPath, w.volume, w.readOnly, w.propagation)
		}
		v := volumes[m.Name]
		// containerd 1.6 checks a propagated mount's source without
		// resolving symlinks: a source below /var/run (a symlink to
		// /run) is looked up on "/", private on many nodes, and refused.
		if prop != "" && v.HostPath != nil && strings.HasPrefix(v.HostPath.Path, "/var/run/") {
			t.Errorf("volume %s: hostPath %s with %s propagation: spell it %s", v.Name, v.HostPath.Path, prop, strings.TrimPrefix(v.HostPath.Path, "/var"))
		}
		switch {
		case w.hostPath != "":
			if v.HostPath == nil || v.HostPath.Path != w.hostPath || v.HostPath.Type == nil || *v.HostPath.Type != w.hostType {
				t.Errorf("volume %s: %+v, want hostPath %s type %s", v.Name, v.HostPath, w.hostPath, w.hostType)
			}
		case v.HostPath != nil:
			t.Errorf("volume %s is a hostPath", v.Name)
		}
	}
	if v := volumes["config"]; v.ConfigMap == nil || v.ConfigMap.Name != ConfigMapName {
		t.Errorf("config volume %+v, want ConfigMap %s", v.VolumeSource, ConfigMapName)
	}

	// Flags point into the mounts.
	flags := map[string]string{}
	for _, a := range c.Args[1:] {
		k, v, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !ok {
			t.Fatalf("argument %q is not --flag=value", a)
		}
		flags[k] = v
	}
	for _, f := range []string{"cni-conf-dir", "cni-bin-dir", "run-dir", "state-dir"} {
		if _, ok := mounts[flags[f]]; !ok {
			t.Errorf("--%s=%s is not a mount", f, flags[f])
		}
	}
	if !strings.HasPrefix(flags["pin-path"], mounts["/sys/fs/bpf"].MountPath+"/") || ic.Args[1] != "--bpffs="+ic.VolumeMounts[0].MountPath {
		t.Errorf("--pin-path=%s and the init container's %s: want bpffs mounted where the init container mounts it, and the pins below it", flags["pin-path"], ic.Args[1])
	}
	switch flags["log-level"] {
	case "debug", "info", "warn", "error":
	default:
		t.Errorf("--log-level=%s", flags["log-level"])
	}
	if _, ok := mounts[filepath.Dir(flags["config"])]; !ok || filepath.Base(flags["config"]) != ConfigKey {
		t.Errorf("--config=%s is not %s in the config mount", flags["config"], ConfigKey)
	}
	if flags["plugin-binary"] != pluginInImage {
		t.Errorf("--plugin-binary=%s, the image has it at %s", flags["plugin-binary"], pluginInImage)
	}

	// One metrics port everywhere: ConfigMap, container/host port, probes.
	// Unauthenticated, so on loopback, where the probes go.
	if _, ok := flags["metrics-addr"]; ok {
		t.Error("--metrics-addr: the metrics listener is the ConfigMap's alone (deploy/components/prometheus changes it there)")
	}
	if len(c.Ports) != 1 || c.Ports[0].Name != "metrics" || c.Ports[0].HostPort != c.Ports[0].ContainerPort || c.Ports[0].Protocol != corev1.ProtocolTCP {
		t.Fatalf("ports %+v, want one TCP port named metrics with hostPort = containerPort", c.Ports)
	}
	port := c.Ports[0].ContainerPort
	cfg := agentConfig(t, objs)
	cfgHost, cfgPort, err := net.SplitHostPort(cfg.MetricsAddr)
	if err != nil || cfgPort != strconv.Itoa(int(port)) {
		t.Errorf("ConfigMap metricsAddr %s, container port %d", cfg.MetricsAddr, port)
	}
	if cfgHost != "127.0.0.1" || cfg.MetricsAuth != "none" {
		t.Errorf("ConfigMap metricsAddr %s metricsAuth %q: want /metrics without authentication on loopback only", cfg.MetricsAddr, cfg.MetricsAuth)
	}
	for k := range ds.Spec.Template.Annotations {
		if strings.HasPrefix(k, "prometheus.io/") {
			t.Errorf("annotation %s: nothing outside the node can scrape the base's /metrics", k)
		}
	}
	if cfg.Plugin.PinPath != flags["pin-path"] {
		t.Errorf("ConfigMap plugin.pinPath %s, --pin-path %s", cfg.Plugin.PinPath, flags["pin-path"])
	}
	if !strings.HasPrefix(cfg.CRISocket, mounts["/run/containerd"].MountPath+"/") {
		t.Errorf("criSocket %s is not in the CRI mount", cfg.CRISocket)
	}
	for _, d := range cfg.NetnsDirs {
		if _, ok := mounts[d]; !ok {
			t.Errorf("netnsDirs %s is not a mount", d)
		}
	}
	checkProbes(t, c, corev1.URISchemeHTTP)

	r := c.Resources
	if r.Requests.Cpu().IsZero() || r.Requests.Memory().IsZero() || r.Limits.Memory().IsZero() {
		t.Errorf("resources %+v: want CPU and memory requests and a memory limit", r)
	}
	if !r.Limits.Cpu().IsZero() {
		t.Error("CPU limit on a node agent: throttling delays attaching pods")
	}
	if r.Limits.Memory().Cmp(*r.Requests.Memory()) < 0 {
		t.Error("memory limit below the request")
	}
}

// checkProbes: GET /healthz (startup, liveness) and /readyz (readiness)
// on the metrics port, at the node's loopback (where the base's metrics
// listen; the kubelet probes from the host), with scheme.
func checkProbes(t *testing.T, c corev1.Container, scheme corev1.URIScheme) {
	t.Helper()
	for name, p := range map[string]*corev1.Probe{"startup": c.StartupProbe, "liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		want := "/healthz"
		if name == "readiness" {
			want = "/readyz"
		}
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != want || p.HTTPGet.Port != intstr.FromString("metrics") ||
			p.HTTPGet.Host != "127.0.0.1" || p.HTTPGet.Scheme != scheme || len(p.HTTPGet.HTTPHeaders) != 0 {
			t.Errorf("%s probe %+v, want GET %s %s on the metrics port at 127.0.0.1", name, p, scheme, want)
		}
	}
}

func TestRBAC(t *testing.T) {
	objs := manifests(t)
	sa := only[*corev1.ServiceAccount](t, objs)
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa.Name, Namespace: Namespace}}

	cr := only[*rbacv1.ClusterRole](t, objs)
	wantCR := []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "nodes"}, Verbs: []string{"get", "list", "watch"}}}
	if !reflect.DeepEqual(cr.Rules, wantCR) || cr.AggregationRule != nil {
		t.Errorf("ClusterRole rules %+v, want only read access to pods and nodes", cr.Rules)
	}
	crb := only[*rbacv1.ClusterRoleBinding](t, objs)
	if crb.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: cr.Name}) || !reflect.DeepEqual(crb.Subjects, subject) {
		t.Errorf("ClusterRoleBinding %+v %+v", crb.RoleRef, crb.Subjects)
	}

	role := only[*rbacv1.Role](t, objs)
	ds := only[*appsv1.DaemonSet](t, objs)
	// Its own DaemonSet; the Leases (node ids, workload tables) and the
	// cluster key Secret by name, plus create for the first agent to make
	// it. Nothing that writes ConfigMaps (pktmeta's settings).
	wantRole := []rbacv1.PolicyRule{
		{APIGroups: []string{"apps"}, Resources: []string{"daemonsets"}, ResourceNames: []string{ds.Name}, Verbs: []string{"get"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"get", "list", "watch", "create", "update", "delete"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{kubenode.KeySecret}, Verbs: []string{"get"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	}
	if role.Namespace != Namespace || !reflect.DeepEqual(role.Rules, wantRole) {
		t.Errorf("Role %s/%s rules %+v, want %+v", role.Namespace, role.Name, role.Rules, wantRole)
	}
	rb := only[*rbacv1.RoleBinding](t, objs)
	if rb.Namespace != Namespace || rb.RoleRef != (rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name}) || !reflect.DeepEqual(rb.Subjects, subject) {
		t.Errorf("RoleBinding %s %+v %+v", rb.Namespace, rb.RoleRef, rb.Subjects)
	}
}

func TestNamespace(t *testing.T) {
	objs := manifests(t)
	ns := only[*corev1.Namespace](t, objs)
	for _, mode := range []string{"enforce", "audit", "warn"} {
		if v := ns.Labels["pod-security.kubernetes.io/"+mode]; v != "privileged" {
			t.Errorf("pod-security %s=%q, want privileged (hostPath, hostNetwork, capabilities, a privileged init container)", mode, v)
		}
	}
	q := only[*corev1.ResourceQuota](t, objs)
	sel := q.Spec.ScopeSelector
	if sel == nil || len(sel.MatchExpressions) != 1 || sel.MatchExpressions[0].ScopeName != corev1.ResourceQuotaScopePriorityClass ||
		!slices.Contains(sel.MatchExpressions[0].Values, daemonSet(t).Spec.Template.Spec.PriorityClassName) {
		t.Errorf("ResourceQuota scope %+v, want the DaemonSet's priority class", sel)
	}
}

func TestConfigMap(t *testing.T) {
	c := agentConfig(t, manifests(t))
	if c.UninstallOnExit != "auto" {
		t.Errorf("uninstallOnExit %q: deleting the DaemonSet must uninstall, rolling it must not", c.UninstallOnExit)
	}
	if len(c.LabelTags) == 0 {
		t.Error("no labelTags: the example should show enrichment")
	}
	if c.CrossNode.Mode != "kubernetes" || c.CrossNode.NoMAC {
		t.Errorf("crossNode %+v: want mode kubernetes with the MAC, so a cluster carries origins across nodes as installed", c.CrossNode)
	}
}

// The base renders with kustomize (or kubectl's), and what comes out still
// decodes strictly. Skipped where neither is installed.
func TestKustomizeBuild(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := KustomizeBuild(ctx, ".")
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
	if want := len(manifests(t)); len(objs) != want {
		t.Errorf("%d objects rendered, want %d", len(objs), want)
	}
	ds := only[*appsv1.DaemonSet](t, objs)
	k, _ := LoadKustomization(".")
	for _, c := range append(ds.Spec.Template.Spec.InitContainers, ds.Spec.Template.Spec.Containers...) {
		if c.Image != Image+":"+k.Images[0].NewTag {
			t.Errorf("rendered image %s", c.Image)
		}
	}
	if ds.Labels["app.kubernetes.io/part-of"] != "pktmeta" || ds.Spec.Selector.MatchLabels["app.kubernetes.io/part-of"] != "" {
		t.Errorf("labels %v selector %v", ds.Labels, ds.Spec.Selector.MatchLabels)
	}
	crb := only[*rbacv1.ClusterRoleBinding](t, objs)
	if crb.Subjects[0].Namespace != Namespace {
		t.Errorf("ClusterRoleBinding subject namespace %s", crb.Subjects[0].Namespace)
	}
}
