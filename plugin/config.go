package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

// AnnotationPrefix marks pod annotations that become tags:
// "pktmeta.dev/team: payments" tags the pod with team=payments.
const AnnotationPrefix = "pktmeta.dev/"

// Bounds of maxConnections.
const (
	MinConnections = 1024
	MaxConnections = 1 << 24
)

// Config is the plugin's entry in the conflist, plus what the runtime adds.
type Config struct {
	types.PluginConf

	// PinPath is the bpffs directory holding the datapath.
	PinPath string `json:"pinPath,omitempty"`
	// Tags are static tags for every pod of this network.
	Tags map[string]string `json:"tags,omitempty"`
	// StrictSource drops packets from a pod whose source address is not
	// one of the pod's addresses in prevResult.
	StrictSource bool `json:"strictSource,omitempty"`
	// MaxConnections sizes the connection table when it is first created.
	MaxConnections uint32 `json:"maxConnections,omitempty"`
	// LogFile receives the plugin's logs; stderr when empty.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"logLevel,omitempty"`
	// AttachMode is auto (tcx when available), tcx, or legacy (clsact).
	AttachMode string `json:"attachMode,omitempty"`

	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig,omitempty"`
	// Args is the CONVENTIONS.md "args" object; accepted and ignored.
	Args json.RawMessage `json:"args,omitempty"`
	// LegacyAttachments is the pre-1.1 spelling of
	// cni.dev/valid-attachments that libcni sends along with it.
	LegacyAttachments json.RawMessage `json:"cni.dev/attachments,omitempty"`

	mode     attach.Mode
	logLevel slog.Level
}

// configError is a CNI error with code 7 (invalid network config).
func configError(format string, a ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, "pktmeta: invalid config", fmt.Sprintf(format, a...))
}

var unknownFieldRE = regexp.MustCompile(`unknown field "([^"]+)"`)

// ParseConfig decodes and validates stdin. Unknown keys are rejected so a
// misspelt key fails loudly instead of being ignored.
func ParseConfig(stdin []byte) (*Config, error) {
	conf := &Config{}
	dec := json.NewDecoder(bytes.NewReader(stdin))
	dec.DisallowUnknownFields()
	if err := dec.Decode(conf); err != nil {
		if m := unknownFieldRE.FindStringSubmatch(err.Error()); m != nil {
			return nil, configError("unknown key %q", m[1])
		}
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return nil, configError("key %q: want %s, got JSON %s", te.Field, te.Type, te.Value)
		}
		return nil, configError("parse network config: %v", err)
	}
	if err := conf.validate(); err != nil {
		return nil, err
	}
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil {
		return nil, configError("key \"prevResult\": %v", err)
	}
	return conf, nil
}

func (c *Config) validate() error {
	if c.PinPath == "" {
		c.PinPath = datapath.DefaultPinPath
	}
	if !filepath.IsAbs(c.PinPath) || filepath.Clean(c.PinPath) == "/" {
		return configError("key \"pinPath\": want an absolute directory below a bpffs mount, got %q", c.PinPath)
	}
	c.PinPath = filepath.Clean(c.PinPath)

	if c.MaxConnections == 0 {
		c.MaxConnections = datapath.DefaultMaxConnections
	}
	if c.MaxConnections < MinConnections || c.MaxConnections > MaxConnections {
		return configError("key \"maxConnections\": want %d to %d, got %d", MinConnections, MaxConnections, c.MaxConnections)
	}

	mode, err := attach.ParseMode(c.AttachMode)
	if err != nil {
		return configError("key \"attachMode\": %v", err)
	}
	c.mode = mode

	switch strings.ToLower(c.LogLevel) {
	case "", "warn", "warning":
		c.logLevel = slog.LevelWarn
	case "debug":
		c.logLevel = slog.LevelDebug
	case "info":
		c.logLevel = slog.LevelInfo
	case "error":
		c.logLevel = slog.LevelError
	default:
		return configError("key \"logLevel\": want debug, info, warn or error, got %q", c.LogLevel)
	}
	if c.LogFile != "" && !filepath.IsAbs(c.LogFile) {
		return configError("key \"logFile\": want an absolute path, got %q", c.LogFile)
	}

	if len(c.Tags) > datapath.MaxTags {
		return configError("key \"tags\": %d tags, at most %d", len(c.Tags), datapath.MaxTags)
	}
	for k, v := range c.Tags {
		if err := validateTag(k, v); err != nil {
			return configError("key \"tags\": %v", err)
		}
	}
	return nil
}

var tagKeyRE = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$`)

func validateTag(k, v string) error {
	if len(k) == 0 || len(k) > datapath.MaxTagKeyLen || !tagKeyRE.MatchString(k) {
		return fmt.Errorf("tag key %q: want 1 to %d characters of [A-Za-z0-9._/-], starting and ending alphanumeric", k, datapath.MaxTagKeyLen)
	}
	if len(v) > datapath.MaxTagValueLen {
		return fmt.Errorf("tag %q: value is %d bytes, at most %d", k, len(v), datapath.MaxTagValueLen)
	}
	for _, r := range v {
		if r < 0x20 || r == 0x7f {
			return fmt.Errorf("tag %q: value has a control character", k)
		}
	}
	return nil
}

// podTags merges the static tags with the pod's pktmeta.dev/ annotations.
func (c *Config) podTags(log *slog.Logger) (map[string]string, error) {
	return MergeTags(c.Tags, c.RuntimeConfig.PodAnnotations, log)
}

// MergeTags builds a pod's tags: the static ones, plus its annotations
// under the pktmeta.dev/ prefix. The operator's static tags win over a
// pod's own annotations. Errors are CNI errors with code 7.
func MergeTags(static, annotations map[string]string, log *slog.Logger) (map[string]string, error) {
	tags := make(map[string]string, len(static))
	for k, v := range static {
		tags[k] = v
	}
	for ak, v := range annotations {
		k, ok := strings.CutPrefix(ak, AnnotationPrefix)
		if !ok {
			continue
		}
		if err := validateTag(k, v); err != nil {
			return nil, configError("pod annotation %q: %v", ak, err)
		}
		if old, ok := static[k]; ok {
			if old != v {
				log.Warn("pod annotation conflicts with a static tag; keeping the static tag", "annotation", ak, "tag", k)
			}
			continue
		}
		tags[k] = v
	}
	if len(tags) > datapath.MaxTags {
		return nil, configError("%d tags from config and pod annotations, at most %d", len(tags), datapath.MaxTags)
	}
	return tags, nil
}

// ValidateTag checks a tag key and value against the layout's limits.
func ValidateTag(k, v string) error { return validateTag(k, v) }
