package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
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

	MetricsAddr string   `json:"metricsAddr,omitempty"`
	GCInterval  Duration `json:"gcInterval,omitempty"`
	// MaxSeries caps the label sets of per-workload metrics.
	MaxSeries int `json:"maxSeries,omitempty"`

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
}

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
		MetricsAddr:     ":9964",
		GCInterval:      Duration{30 * time.Second},
		NetnsDirs:       []string{"/var/run/netns"},
		CRISocket:       "/run/containerd/containerd.sock",
		UninstallOnExit: "auto",
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
	if c.GCInterval.Duration < time.Second {
		return fmt.Errorf("gcInterval: at least 1s, got %s", c.GCInterval)
	}
	for _, p := range []string{c.CNIConfDir, c.CNIBinDir, c.StateDir, c.RunDir} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%q: want an absolute path", p)
		}
	}
	return nil
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
