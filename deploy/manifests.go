// Package deploy holds pktmeta's Kubernetes manifests, a kustomize base
// (kubectl apply -k deploy/), and the strict decoding that its tests and
// e2e/kind's use to check them: unknown, misspelt (field names are
// case-sensitive) or duplicated fields are errors, as they would be for an
// API server with strict field validation.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"time"

	"github.com/pktmeta/pktmeta/plugin"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// Names the manifests and the image share.
const (
	Namespace     = "pktmeta-system"
	Name          = "pktmeta" // DaemonSet, ServiceAccount, roles
	ConfigMapName = "pktmeta-config"
	ConfigKey     = "config.yaml"
	Image         = "ghcr.io/pktmeta/pktmeta"
)

var codecs = func() serializer.CodecFactory {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, rbacv1.AddToScheme} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return serializer.NewCodecFactory(s, serializer.EnableStrict)
}()

// Decode decodes every document of a multi-document YAML stream into its
// Kubernetes API type, strictly. Documents holding only comments are
// skipped.
func Decode(data []byte) ([]runtime.Object, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	dec := codecs.UniversalDeserializer()
	var out []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		var probe map[string]any
		if err := yaml.Unmarshal(doc, &probe); err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(probe) == 0 {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		out = append(out, obj)
	}
}

// DecodeFile is Decode on a file.
func DecodeFile(path string) ([]runtime.Object, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	objs, err := Decode(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return objs, nil
}

// StrictYAML decodes YAML into v, a plain Go struct (not an API type),
// refusing unknown and duplicated keys and keys whose case differs from
// the json tag (encoding/json alone would accept "PinPath" for "pinPath").
// Fields of v must not be omitempty, so that what was set survives the
// round trip this check makes.
func StrictYAML(data []byte, v any) error {
	if err := yaml.UnmarshalStrict(data, v); err != nil {
		return err
	}
	var orig any
	if err := yaml.Unmarshal(data, &orig); err != nil {
		return err
	}
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	var back any
	if err := json.Unmarshal(b, &back); err != nil {
		return err
	}
	return contained(orig, back, "")
}

// contained reports the first key or value of a that b lacks or changed.
func contained(a, b any, path string) error {
	switch a := a.(type) {
	case map[string]any:
		bm, ok := b.(map[string]any)
		if !ok {
			return fmt.Errorf("%s: want a mapping", path)
		}
		for k, av := range a {
			bv, ok := bm[k]
			if !ok {
				return fmt.Errorf("%s%s: unknown field (field names are case-sensitive)", path, k)
			}
			if err := contained(av, bv, path+k+"."); err != nil {
				return err
			}
		}
		return nil
	case []any:
		bs, ok := b.([]any)
		if !ok || len(bs) != len(a) {
			return fmt.Errorf("%s: list changed in decoding", path)
		}
		for i := range a {
			if err := contained(a[i], bs[i], path+strconv.Itoa(i)+"."); err != nil {
				return err
			}
		}
		return nil
	default:
		if !reflect.DeepEqual(a, b) {
			return fmt.Errorf("%s: value %v decodes as %v", path, a, b)
		}
		return nil
	}
}

// Kustomization is the part of kustomize's Kustomization (and Component)
// that pktmeta's kustomizations use; anything else in them is an error.
type Kustomization struct {
	APIVersion string           `json:"apiVersion"`
	Kind       string           `json:"kind"`
	Namespace  string           `json:"namespace"`
	Labels     []KustomizeLabel `json:"labels"`
	Resources  []string         `json:"resources"`
	Images     []KustomizeImage `json:"images"`
	Patches    []KustomizePatch `json:"patches"`
	Components []string         `json:"components"`
}

// KustomizeLabel is an entry of Kustomization.Labels.
type KustomizeLabel struct {
	Pairs            map[string]string `json:"pairs"`
	IncludeSelectors bool              `json:"includeSelectors"`
	IncludeTemplates bool              `json:"includeTemplates"`
}

// KustomizeImage is an entry of Kustomization.Images.
type KustomizeImage struct {
	Name    string `json:"name"`
	NewName string `json:"newName"`
	NewTag  string `json:"newTag"`
	Digest  string `json:"digest"`
}

// KustomizePatch is an entry of Kustomization.Patches (a patch file).
type KustomizePatch struct {
	Path string `json:"path"`
}

// LoadKustomization reads dir/kustomization.yaml strictly.
func LoadKustomization(dir string) (*Kustomization, error) {
	return loadKustomization(dir, "kustomize.config.k8s.io/v1beta1", "Kustomization")
}

// LoadComponent reads dir/kustomization.yaml of a kustomize Component
// (deploy/components/...) strictly.
func LoadComponent(dir string) (*Kustomization, error) {
	return loadKustomization(dir, "kustomize.config.k8s.io/v1alpha1", "Component")
}

func loadKustomization(dir, apiVersion, kind string) (*Kustomization, error) {
	p := filepath.Join(dir, "kustomization.yaml")
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	var k Kustomization
	if err := StrictYAML(b, &k); err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	if k.APIVersion != apiVersion || k.Kind != kind {
		return nil, fmt.Errorf("%s: apiVersion/kind %s/%s", p, k.APIVersion, k.Kind)
	}
	return &k, nil
}

// AgentConfig is the agent's configuration file (config.yaml in the
// ConfigMap) as the manifests write it: the contract between
// deploy/configmap.yaml and pktmeta-agent's --config.
type AgentConfig struct {
	MetricsAddr     string         `json:"metricsAddr"`
	MetricsAuth     string         `json:"metricsAuth"`
	MetricsCertFile string         `json:"metricsCertFile"`
	MetricsKeyFile  string         `json:"metricsKeyFile"`
	LabelTags       []string       `json:"labelTags"`
	UninstallOnExit string         `json:"uninstallOnExit"`
	NetnsDirs       []string       `json:"netnsDirs"`
	CRISocket       string         `json:"criSocket"`
	Plugin          PluginSettings `json:"plugin"`
	CrossNode       CrossNode      `json:"crossNode"`
}

// CrossNode is the agent's crossNode section: carrying origins across
// nodes with settings from the Kubernetes API.
type CrossNode struct {
	Mode            string   `json:"mode"`
	Namespace       string   `json:"namespace"`
	Uplinks         []string `json:"uplinks"`
	Members         []string `json:"members"`
	NoMAC           bool     `json:"noMAC"`
	MaxRemote       uint32   `json:"maxRemote"`
	ResyncInterval  string   `json:"resyncInterval"`
	PublishInterval string   `json:"publishInterval"`
}

// PluginSettings are the keys of the CNI plugin's configuration that the
// agent writes into the chain (README.md, "Configuration").
type PluginSettings struct {
	PinPath        string            `json:"pinPath"`
	Tags           map[string]string `json:"tags"`
	StrictSource   bool              `json:"strictSource"`
	MaxConnections uint32            `json:"maxConnections"`
	AttachMode     string            `json:"attachMode"`
	LogFile        string            `json:"logFile"`
	LogLevel       string            `json:"logLevel"`
	// Per-pod limits and which tag keys a pod may claim.
	MaxConnectionsPerPod  uint32   `json:"maxConnectionsPerPod"`
	EventsPerSecondPerPod int64    `json:"eventsPerSecondPerPod"`
	AllowedPodTags        []string `json:"allowedPodTags"`
}

// ParseAgentConfig decodes and checks an agent configuration file: strict
// keys, and the plugin settings and label keys as the CNI plugin's own
// parser judges them.
func ParseAgentConfig(data []byte) (*AgentConfig, error) {
	var c AgentConfig
	if err := StrictYAML(data, &c); err != nil {
		return nil, err
	}
	switch c.UninstallOnExit {
	case "auto", "never", "always":
	default:
		return nil, fmt.Errorf("uninstallOnExit: want auto, never or always, got %q", c.UninstallOnExit)
	}
	if err := checkMetrics(&c); err != nil {
		return nil, err
	}
	switch c.CrossNode.Mode {
	case "", "off", "kubernetes":
	default:
		return nil, fmt.Errorf("crossNode.mode: want off or kubernetes, got %q", c.CrossNode.Mode)
	}
	for _, p := range append([]string{c.CRISocket}, c.NetnsDirs...) {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("%q: want an absolute path", p)
		}
	}
	if err := CheckPlugin(c.Plugin); err != nil {
		return nil, fmt.Errorf("plugin: %w", err)
	}
	// A label key must be a valid tag key: ask the plugin with the key as
	// a tag of its own.
	for _, k := range c.LabelTags {
		if err := CheckPlugin(PluginSettings{Tags: map[string]string{k: ""}}); err != nil {
			return nil, fmt.Errorf("labelTags %q: %w", k, err)
		}
	}
	return &c, nil
}

// checkMetrics applies the agent's rules for its metrics listener:
// without authentication ("none", the default) only on loopback.
func checkMetrics(c *AgentConfig) error {
	host, port, err := net.SplitHostPort(c.MetricsAddr)
	if err != nil || port == "" {
		return fmt.Errorf("metricsAddr %q: want [host]:port (%v)", c.MetricsAddr, err)
	}
	switch c.MetricsAuth {
	case "", "none":
		ip, err := netip.ParseAddr(host)
		if host != "localhost" && (err != nil || !ip.Unmap().IsLoopback()) {
			return fmt.Errorf("metricsAddr %q: unauthenticated metrics on a non-loopback address (metricsAuth %q)", c.MetricsAddr, c.MetricsAuth)
		}
	case "kubernetes", "insecure":
	default:
		return fmt.Errorf("metricsAuth: want none, kubernetes or insecure, got %q", c.MetricsAuth)
	}
	if (c.MetricsCertFile == "") != (c.MetricsKeyFile == "") {
		return errors.New("metricsCertFile and metricsKeyFile: want both or neither")
	}
	if c.MetricsCertFile != "" && (c.MetricsAuth != "kubernetes" || !filepath.IsAbs(c.MetricsCertFile) || !filepath.IsAbs(c.MetricsKeyFile)) {
		return errors.New("metricsCertFile and metricsKeyFile: absolute paths, with metricsAuth kubernetes")
	}
	return nil
}

// CheckPlugin runs the CNI plugin's own configuration parser on s, as an
// entry of a conflist. Zero values stand for unset keys.
func CheckPlugin(s PluginSettings) error {
	entry := map[string]any{"cniVersion": "1.0.0", "name": "pktmeta-config-check", "type": "pktmeta"}
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	var fields map[string]any
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	for k, v := range fields {
		switch v := v.(type) {
		case string:
			if v == "" {
				continue // unset
			}
		case bool:
			if !v {
				continue
			}
		case float64:
			if v == 0 {
				continue
			}
		case nil:
			continue
		}
		entry[k] = v
	}
	conf, err := json.Marshal(entry)
	if err != nil {
		return err
	}
	_, err = plugin.ParseConfig(conf)
	return err
}

// ErrNoKustomize says that no kustomize is available here.
var ErrNoKustomize = errors.New("neither kustomize nor kubectl found")

// KustomizeBuild renders a kustomization with kustomize or, failing that,
// kubectl's built-in kustomize.
func KustomizeBuild(ctx context.Context, dir string) ([]byte, error) {
	var cmd *exec.Cmd
	if p, err := exec.LookPath("kustomize"); err == nil {
		cmd = exec.CommandContext(ctx, p, "build", dir)
	} else if p, err := exec.LookPath("kubectl"); err == nil {
		cmd = exec.CommandContext(ctx, p, "kustomize", dir)
	} else {
		return nil, ErrNoKustomize
	}
	cmd.WaitDelay = 5 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w\n%s", cmd, err, stderr.Bytes())
	}
	return out, nil
}
