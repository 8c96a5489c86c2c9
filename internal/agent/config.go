package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/cluster"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/plugin"
	"sigs.k8s.io/yaml"
)

// PluginSettings are the pktmeta entry the agent puts into the CNI chain.
// The same settings apply to the pods the agent attaches to itself.
type PluginSettings struct {
	PinPath        string            `json:"pinPath,omitempty"`
	Tags           map[string]string `json:"tags,omitempty"`
	StrictSource   bool              `json:"strictSource,omitempty"`
	MaxConnections uint32            `json:"maxConnections,omitempty"`
	AttachMode     string            `json:"attachMode,omitempty"`
	LogFile        string            `json:"logFile,omitempty"`
	LogLevel       string            `json:"logLevel,omitempty"`
	// MaxConnectionsPerPod, EventsPerSecondPerPod and AllowedPodTags are
	// the plugin keys of the same names (README, Configuration).
	MaxConnectionsPerPod  uint32   `json:"maxConnectionsPerPod,omitempty"`
	EventsPerSecondPerPod int64    `json:"eventsPerSecondPerPod,omitempty"`
	AllowedPodTags        []string `json:"allowedPodTags"`
	// ApplicationCgroup is the plugin key of the same name: the cgroup v2
	// directory whose sockets may ask who opened their connection; empty
	// for the node's cgroup v2 root, "none" for no such interface.
	ApplicationCgroup string `json:"applicationCgroup,omitempty"`
	// ApplicationUDP is the plugin key of the same name: unconnected UDP
	// sockets may ask too. Absent: on.
	ApplicationUDP *bool `json:"applicationUDP,omitempty"`
}

// parsed is the plugin's own reading of these settings, with its defaults
// applied: the agent attaches existing pods exactly as the plugin would.
func (p PluginSettings) parsed() (*plugin.Config, error) {
	c := Config{Plugin: p}
	e, err := c.PluginEntry()
	if err != nil {
		return nil, err
	}
	e["cniVersion"], e["name"] = "1.0.0", "probe"
	js, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	return plugin.ParseConfig(js)
}

// Config is the agent's configuration: a YAML file (the DaemonSet's
// ConfigMap) overridden by flags.
type Config struct {
	Plugin PluginSettings `json:"plugin"`

	CNIConfDir   string `json:"cniConfDir,omitempty"`
	CNIBinDir    string `json:"cniBinDir,omitempty"`
	PluginBinary string `json:"pluginBinary,omitempty"`
	// StateDir keeps what must survive agent restarts: backups of the CNI
	// config as it was before install.
	StateDir string `json:"stateDir,omitempty"`
	// RunDir holds the API socket.
	RunDir string `json:"runDir,omitempty"`

	// MetricsAddr serves /metrics, /healthz and /readyz. /metrics shows
	// who talks to whom on the node, so MetricsAuth decides who may read
	// it; the health endpoints say only "ok" or what readiness waits for
	// and are never authenticated (the kubelet probes them).
	MetricsAddr string `json:"metricsAddr,omitempty"`
	// MetricsAuth is MetricsAuthNone (the default: plain HTTP, and
	// MetricsAddr must be a loopback address), MetricsAuthKubernetes
	// (HTTPS on any address; a bearer token reviewed by the API server,
	// allowed "get" on the non-resource URL /metrics) or
	// MetricsAuthInsecure (plain HTTP on any address: only where a
	// firewall keeps out everyone who should not read it).
	MetricsAuth string `json:"metricsAuth,omitempty"`
	// MetricsCertFile and MetricsKeyFile are the PEM certificate and key
	// of the HTTPS listener (MetricsAuthKubernetes), read again when they
	// change. Without them the agent makes a self-signed certificate at
	// every start.
	MetricsCertFile string `json:"metricsCertFile,omitempty"`
	MetricsKeyFile  string `json:"metricsKeyFile,omitempty"`

	GCInterval Duration `json:"gcInterval,omitempty"`
	// MaxSeries caps the label sets of per-workload metrics.
	MaxSeries int `json:"maxSeries,omitempty"`

	// HostCgroupDir is where the host's cgroup filesystem is mounted in
	// the agent's mount namespace (a container's own cgroup mount shows
	// only its cgroup): the agent puts the application interface on the
	// cgroup v2 root found there when it starts, so that pods from before
	// the install can ask their sockets before any ADD does it. Empty: the
	// cgroup v2 root of the agent's mounts (an agent on the host).
	HostCgroupDir string `json:"hostCgroupDir,omitempty"`

	// NetnsDirs and ProcDir are where existing pods' namespaces are found.
	NetnsDirs []string `json:"netnsDirs,omitempty"`
	ProcDir   string   `json:"procDir,omitempty"`
	// CRISocket, when reachable, names existing pods (sandbox id, pod
	// namespace/name/UID, annotations) so their identity is complete.
	CRISocket string `json:"criSocket,omitempty"`

	// LabelTags are pod label keys copied into tags, through the
	// Kubernetes API (optional).
	LabelTags  []string `json:"labelTags,omitempty"`
	Kubeconfig string   `json:"kubeconfig,omitempty"`
	NodeName   string   `json:"nodeName,omitempty"`

	// UninstallOnExit: "auto" removes pktmeta on SIGTERM only when the
	// agent's DaemonSet is being deleted (needs the Kubernetes API; a
	// rolling upgrade or reboot leaves everything in place), "never", or
	// "always".
	UninstallOnExit string `json:"uninstallOnExit,omitempty"`
	PodName         string `json:"podName,omitempty"`
	PodNamespace    string `json:"podNamespace,omitempty"`

	// ClusterFile names the other nodes (internal/cluster) so that events,
	// metrics and the API name a remote origin's node, and its pod where
	// that node's pins are readable. Optional.
	ClusterFile string `json:"clusterFile,omitempty"`

	// CrossNode configures this node for carrying origins across nodes
	// from the Kubernetes API (crossnode.go).
	CrossNode CrossNodeSettings `json:"crossNode"`
}

// The values of Config.MetricsAuth.
const (
	MetricsAuthNone       = "none"
	MetricsAuthKubernetes = "kubernetes"
	MetricsAuthInsecure   = "insecure"
)

// DefaultMetricsAddr is reachable from the node itself only.
const DefaultMetricsAddr = "127.0.0.1:9964"

// Duration reads "30s" from YAML and JSON.
type Duration struct{ time.Duration }

// UnmarshalJSON accepts a Go duration string.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("want a duration like \"30s\": %w", err)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	d.Duration = v
	return nil
}

// MarshalJSON writes the duration as a string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// Defaults for a node: the paths are the DaemonSet's mounts.
func Defaults() Config {
	return Config{
		Plugin:          PluginSettings{PinPath: datapath.DefaultPinPath},
		CNIConfDir:      "/etc/cni/net.d",
		CNIBinDir:       "/opt/cni/bin",
		PluginBinary:    "/opt/pktmeta/bin/pktmeta",
		StateDir:        "/var/lib/pktmeta",
		RunDir:          "/run/pktmeta",
		MetricsAddr:     DefaultMetricsAddr,
		MetricsAuth:     MetricsAuthNone,
		GCInterval:      Duration{30 * time.Second},
		NetnsDirs:       []string{"/var/run/netns"},
		CRISocket:       "/run/containerd/containerd.sock",
		UninstallOnExit: "auto",
		CrossNode: CrossNodeSettings{
			Mode:            CrossNodeOff,
			ResyncInterval:  Duration{30 * time.Second},
			PublishInterval: Duration{5 * time.Second},
		},
	}
}

// LoadFile merges a YAML (or JSON) file into c. Unknown keys are errors.
func (c *Config) LoadFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	if err := yaml.UnmarshalStrict(b, c); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Validate checks the configuration with the plugin's own rules, so a
// setting the CNI plugin would refuse is refused here first.
func (c *Config) Validate() error {
	if _, err := c.PluginEntry(); err != nil {
		return err
	}
	if _, err := attach.ParseMode(c.Plugin.AttachMode); err != nil {
		return fmt.Errorf("plugin.attachMode: %w", err)
	}
	switch c.UninstallOnExit {
	case "auto", "never", "always":
	default:
		return fmt.Errorf("uninstallOnExit: want auto, never or always, got %q", c.UninstallOnExit)
	}
	if err := c.validateMetrics(); err != nil {
		return err
	}
	if c.GCInterval.Duration < time.Second {
		return fmt.Errorf("gcInterval: at least 1s, got %s", c.GCInterval)
	}
	if err := c.CrossNode.validate(c); err != nil {
		return err
	}
	if c.ClusterFile != "" {
		if _, err := cluster.Load(c.ClusterFile); err != nil {
			return fmt.Errorf("clusterFile: %w", err)
		}
	}
	for _, p := range []string{c.CNIConfDir, c.CNIBinDir, c.StateDir, c.RunDir} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%q: want an absolute path", p)
		}
	}
	return nil
}

// validateMetrics refuses a metrics listener that would show the node's
// connections to whoever reaches it, unless asked for in so many words.
func (c *Config) validateMetrics() error {
	host, port, err := net.SplitHostPort(c.MetricsAddr)
	if err != nil || port == "" {
		return fmt.Errorf("metricsAddr %q: want host:port, e.g. %s", c.MetricsAddr, DefaultMetricsAddr)
	}
	switch c.MetricsAuth {
	case MetricsAuthNone:
		if !IsLoopbackHost(host) {
			return fmt.Errorf("metricsAddr %q with metricsAuth %s would show who talks to whom on this node to anyone who reaches it: "+
				"bind a loopback address (%s), set metricsAuth: %s (HTTPS, Kubernetes tokens and RBAC), "+
				"or metricsAuth: %s if a firewall keeps everyone else out", c.MetricsAddr, MetricsAuthNone, DefaultMetricsAddr, MetricsAuthKubernetes, MetricsAuthInsecure)
		}
	case MetricsAuthKubernetes, MetricsAuthInsecure:
	default:
		return fmt.Errorf("metricsAuth: want %s, %s or %s, got %q", MetricsAuthNone, MetricsAuthKubernetes, MetricsAuthInsecure, c.MetricsAuth)
	}
	if (c.MetricsCertFile == "") != (c.MetricsKeyFile == "") {
		return errors.New("metricsCertFile and metricsKeyFile: want both or neither")
	}
	if c.MetricsCertFile != "" {
		if c.MetricsAuth != MetricsAuthKubernetes {
			return fmt.Errorf("metricsCertFile: only metricsAuth %s serves HTTPS", MetricsAuthKubernetes)
		}
		for _, p := range []string{c.MetricsCertFile, c.MetricsKeyFile} {
			if !filepath.IsAbs(p) {
				return fmt.Errorf("%q: want an absolute path", p)
			}
		}
	}
	return nil
}

// IsLoopbackHost reports whether a listen address's host part binds the
// loopback interface only: "localhost" or a loopback IP. An empty host,
// 0.0.0.0 and :: bind every address.
func IsLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// PluginEntry renders the conflist entry, checked by the plugin's parser.
func (c *Config) PluginEntry() (map[string]any, error) {
	e := map[string]any{
		"type":         "pktmeta",
		"capabilities": map[string]any{"io.kubernetes.cri.pod-annotations": true},
	}
	p := c.Plugin
	if p.PinPath != "" {
		e["pinPath"] = p.PinPath
	}
	if len(p.Tags) > 0 {
		e["tags"] = p.Tags
	}
	if p.StrictSource {
		e["strictSource"] = true
	}
	if p.MaxConnections != 0 {
		e["maxConnections"] = p.MaxConnections
	}
	if p.AttachMode != "" {
		e["attachMode"] = p.AttachMode
	}
	if p.LogFile != "" {
		e["logFile"] = p.LogFile
	}
	if p.LogLevel != "" {
		e["logLevel"] = p.LogLevel
	}
	if p.MaxConnectionsPerPod != 0 {
		e["maxConnectionsPerPod"] = p.MaxConnectionsPerPod
	}
	if p.EventsPerSecondPerPod != 0 {
		e["eventsPerSecondPerPod"] = p.EventsPerSecondPerPod
	}
	if p.ApplicationCgroup != "" {
		e["applicationCgroup"] = p.ApplicationCgroup
	}
	if p.ApplicationUDP != nil {
		e["applicationUDP"] = *p.ApplicationUDP
	}
	if p.AllowedPodTags != nil { // [] means "none", absent "any"
		e["allowedPodTags"] = p.AllowedPodTags
	}
	probe := map[string]any{"cniVersion": "1.0.0", "name": "probe"}
	for k, v := range e {
		probe[k] = v
	}
	b, err := yaml.Marshal(probe)
	if err != nil {
		return nil, err
	}
	js, err := yaml.YAMLToJSON(b)
	if err != nil {
		return nil, err
	}
	if _, err := plugin.ParseConfig(js); err != nil {
		return nil, fmt.Errorf("plugin settings: %w", err)
	}
	return e, nil
}
