package plugin

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
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
	MaxConnections = datapath.MaxCapacity
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
	// MaxConnectionsPerPod is how many records one pod may hold at once;
	// 0: the table's size / 16.
	MaxConnectionsPerPod uint32 `json:"maxConnectionsPerPod,omitempty"`
	// EventsPerSecondPerPod is how many connections a second a pod may
	// open with events (its records are made either way); 0: the default
	// (1000), -1: no limit.
	EventsPerSecondPerPod int64 `json:"eventsPerSecondPerPod,omitempty"`
	// LogFile receives the plugin's logs; stderr when empty.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `json:"logLevel,omitempty"`
	// AttachMode is auto (tcx when available), tcx, or legacy (clsact).
	AttachMode string `json:"attachMode,omitempty"`
	// AllowedPodTags limits the tag keys a pod may claim through its
	// pktmeta.dev/ annotations: absent allows any key, [] none.
	AllowedPodTags []string `json:"allowedPodTags,omitempty"`
	// ApplicationCgroup is the cgroup v2 directory whose sockets may ask
	// getsockopt(SOL_PKTMETA) who opened their connection: empty for the
	// node's cgroup v2 root (every pod), "none" for no such interface.
	ApplicationCgroup string `json:"applicationCgroup,omitempty"`
	// ApplicationUDP: unconnected UDP sockets may ask too (the recvmsg
	// programs, which every such receive on the node runs). Absent: on.
	ApplicationUDP *bool `json:"applicationUDP,omitempty"`

	RuntimeConfig struct {
		PodAnnotations map[string]string `json:"io.kubernetes.cri.pod-annotations,omitempty"`
	} `json:"runtimeConfig,omitempty"`
	// Args is the CONVENTIONS.md "args" object; accepted and ignored.
	Args json.RawMessage `json:"args,omitempty"`
	// LegacyAttachments is the pre-1.1 spelling of
	// cni.dev/valid-attachments that libcni sends along with it.
	LegacyAttachments json.RawMessage `json:"cni.dev/attachments,omitempty"`

	mode         attach.Mode
	eventsPerSec uint32
	logLevel     slog.Level
}

// configError is a CNI error with code 7 (invalid network config).
func configError(format string, a ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, "pktmeta: invalid config", fmt.Sprintf(format, a...))
}

var unknownFieldRE = regexp.MustCompile(`unknown field "([^"]+)"`)

// ParseConfig decodes and validates stdin. Keys match exactly
// (encoding/json alone would match them case-insensitively and let the last
// of two equal keys win), a key may appear only once in any object, and
// unknown keys are rejected, so a misspelt or smuggled key fails loudly
// instead of being ignored or overriding another. Every error is a CNI
// error with code 7.
func ParseConfig(stdin []byte) (*Config, error) {
	if err := checkKeys(stdin); err != nil {
		return nil, err
	}
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

	if c.MaxConnectionsPerPod > c.MaxConnections {
		return configError("key \"maxConnectionsPerPod\": %d is more than the whole table (maxConnections %d)", c.MaxConnectionsPerPod, c.MaxConnections)
	}
	switch {
	case c.EventsPerSecondPerPod == 0:
		c.eventsPerSec = datapath.DefaultEventsPerSecond
	case c.EventsPerSecondPerPod == -1:
		c.eventsPerSec = 0 // no limit
	case c.EventsPerSecondPerPod > 0 && c.EventsPerSecondPerPod <= math.MaxUint32:
		c.eventsPerSec = uint32(c.EventsPerSecondPerPod)
	default:
		return configError("key \"eventsPerSecondPerPod\": want -1 (no limit) or 1 to %d, got %d", uint32(math.MaxUint32), c.EventsPerSecondPerPod)
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
	if c.ApplicationCgroup != "" && c.ApplicationCgroup != "none" && !filepath.IsAbs(c.ApplicationCgroup) {
		return configError("key \"applicationCgroup\": want an absolute cgroup v2 directory or \"none\", got %q", c.ApplicationCgroup)
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
	for i, k := range c.AllowedPodTags {
		if err := validateTag(k, ""); err != nil {
			return configError("key \"allowedPodTags[%d]\": %v", i, err)
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

// podTags splits the pod's tags into the operator's (the config's static
// tags) and the pod's own claims (its allowed pktmeta.dev/ annotations).
func (c *Config) podTags(log *slog.Logger) (tags, podTags map[string]string, err error) {
	return MergeTags(c.Tags, c.RuntimeConfig.PodAnnotations, c.AllowedPodTags, log)
}

// MergeTags builds a pod's tags in two sets: tags, the static ones the
// operator vouches for, and podTags, what the pod claims itself through its
// annotations under the pktmeta.dev/ prefix. With allowed non-nil, only
// those tag keys may be claimed (an empty list: none); other annotations
// are ignored (logged at debug).
// A static tag wins over a pod's annotation of the same key: the key then
// appears only in tags. Both sets together hold at most datapath.MaxTags.
// Errors are CNI errors with code 7 naming the annotation.
func MergeTags(static, annotations map[string]string, allowed []string, log *slog.Logger) (tags, podTags map[string]string, err error) {
	tags = make(map[string]string, len(static))
	for k, v := range static {
		tags[k] = v
	}
	podTags = map[string]string{}
	// Annotations in key order: the same pod gives the same error and logs.
	keys := make([]string, 0, len(annotations))
	for ak := range annotations {
		keys = append(keys, ak)
	}
	sort.Strings(keys)
	for _, ak := range keys {
		v := annotations[ak]
		k, ok := strings.CutPrefix(ak, AnnotationPrefix)
		if !ok {
			continue
		}
		if allowed != nil && !slices.Contains(allowed, k) {
			if log != nil {
				log.Debug("pod annotation names a tag key that allowedPodTags does not list; ignored", "annotation", ak, "tag", k)
			}
			continue
		}
		if err := validateTag(k, v); err != nil {
			return nil, nil, configError("pod annotation %q: %v", ak, err)
		}
		if old, ok := static[k]; ok {
			if old != v && log != nil {
				log.Warn("pod annotation conflicts with a static tag; keeping the static tag", "annotation", ak, "tag", k)
			}
			continue
		}
		podTags[k] = v
	}
	if n := len(tags) + len(podTags); n > datapath.MaxTags {
		return nil, nil, configError("%d tags from config and pod annotations, at most %d", n, datapath.MaxTags)
	}
	return tags, podTags, nil
}

// ValidateTag checks a tag key and value against the layout's limits.
func ValidateTag(k, v string) error { return validateTag(k, v) }

// A schema describes the keys a JSON object of the config may have, so
// checkKeys can hold every object to exact keys before encoding/json, which
// folds case and keeps the last of two equal keys, decodes it.
type schema struct {
	// fields are the keys the object may have, each with the schema of
	// its value (nil: any value). Keys match exactly.
	fields map[string]*schema
	// open objects may also have keys not in fields (ignored by the
	// decoder), but no case variant of one of them: the decoder would
	// take it for the field.
	open bool
	// elems describes the elements of an array.
	elems *schema
}

// A nil *schema is any value: maps (tags, annotations, capabilities) and
// opaque values (args). Their keys are kept as they are by the decoder and
// only have to be unique.

func arrayOf(elem *schema) *schema { return &schema{elems: elem} }

// dnsSchema is types.DNS.
var dnsSchema = schemaOf(reflect.TypeFor[types.DNS]()).fields

// resultSchema is a prevResult as pktmeta's versions (0.3.0 to 1.1.0)
// define it: types/040 and types/100. A result is the primary plugin's and
// may carry keys the decoder ignores, so its objects are open.
var resultSchema = &schema{open: true, fields: map[string]*schema{
	"cniVersion": nil,
	"interfaces": arrayOf(&schema{open: true, fields: map[string]*schema{
		"name": nil, "mac": nil, "mtu": nil, "sandbox": nil, "socketPath": nil, "pciID": nil}}),
	"ips": arrayOf(&schema{open: true, fields: map[string]*schema{
		"version": nil, "interface": nil, "address": nil, "gateway": nil}}),
	"routes": arrayOf(&schema{open: true, fields: map[string]*schema{
		"dst": nil, "gw": nil, "mtu": nil, "advmss": nil, "priority": nil, "table": nil, "scope": nil}}),
	"dns": {open: true, fields: dnsSchema},
}}

// configSchema is Config's, read from its json tags (so a key added to
// Config is accepted exactly, and nothing else): the keys of
// types.PluginConf (what the conflist entry and libcni put there:
// cniVersion, name, type, capabilities, ipam, dns, prevResult,
// cni.dev/valid-attachments), libcni's other additions (runtimeConfig with
// the capabilities we declare, the pre-1.1 cni.dev/attachments spelling),
// CONVENTIONS.md args, and pktmeta's own keys. prevResult is decoded
// into a map and parsed by the result's version, so it gets resultSchema.
var configSchema = func() *schema {
	s := schemaOf(reflect.TypeFor[Config]())
	s.fields["prevResult"] = resultSchema
	return s
}()

var (
	unmarshalerType     = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshalerType = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// schemaOf describes how encoding/json decodes into t: structs are strict
// objects with their json keys (embedded structs' keys promoted), slices
// and arrays have elements of their element's schema, and everything else
// (maps, interfaces, raw messages, types that decode themselves) takes any
// keys, which only have to be unique.
func schemaOf(t reflect.Type) *schema {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) || reflect.PointerTo(t).Implements(textUnmarshalerType) {
		return nil
	}
	switch t.Kind() {
	case reflect.Struct:
		s := &schema{fields: map[string]*schema{}}
		addFields(s, t)
		return s
	case reflect.Slice, reflect.Array:
		if t.Elem().Kind() == reflect.Uint8 {
			return nil // []byte is a base64 string
		}
		if e := schemaOf(t.Elem()); e != nil {
			return arrayOf(e)
		}
	}
	return nil
}

func addFields(s *schema, t reflect.Type) {
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" || (!f.IsExported() && !f.Anonymous) {
			continue
		}
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if f.Anonymous && name == "" && ft.Kind() == reflect.Struct {
			addFields(s, ft) // promoted, as encoding/json promotes them
			continue
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		s.fields[name] = schemaOf(f.Type)
	}
}

// maxConfigDepth bounds nesting. A runtime's config is a few levels deep
// (prevResult.ips[0].address is four); the bound keeps absurd input from
// costing stack and memory.
const maxConfigDepth = 64

// checkKeys walks stdin token by token and rejects, naming the key's path,
// a key that appears twice in one object, a key the config does not have
// (exact spelling, including case), and anything but one JSON object.
// Values are left to the decoder, which names the key of a wrong type.
func checkKeys(stdin []byte) error {
	dec := json.NewDecoder(bytes.NewReader(stdin))
	dec.UseNumber() // no float conversion: a huge number is the decoder's to reject, by key
	tok, err := dec.Token()
	if err == io.EOF {
		return configError("parse network config: no JSON object on stdin")
	}
	if err != nil {
		return configError("parse network config: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return configError("parse network config: want a JSON object, got %s", tokenKind(tok))
	}
	if err := walkObject(dec, configSchema, nil); err != nil {
		return err
	}
	switch tok, err := dec.Token(); {
	case err == io.EOF:
		return nil
	case err != nil:
		return configError("parse network config: after the object: %v", err)
	default:
		return configError("parse network config: %s after the object", tokenKind(tok))
	}
}

// pathElem is one step of a key's path: an object key or an array index.
type pathElem struct {
	key   string
	index int // when key is unset
	isKey bool
}

func walkObject(dec *json.Decoder, s *schema, path []pathElem) error {
	if len(path) >= maxConfigDepth {
		return configError("parse network config: %s nests deeper than %d levels", renderPath(path), maxConfigDepth)
	}
	seen := map[string]bool{}
	for {
		tok, err := dec.Token()
		if err != nil {
			return configError("parse network config: in %s: %v", renderPath(path), err)
		}
		if d, ok := tok.(json.Delim); ok && d == '}' {
			return nil
		}
		key, ok := tok.(string)
		if !ok { // Token's own syntax check rules this out
			return configError("parse network config: in %s: object key is %s", renderPath(path), tokenKind(tok))
		}
		kp := append(path[:len(path):len(path)], pathElem{key: key, isKey: true})
		if seen[key] {
			return configError("duplicate key %s (a key may appear only once)", renderPath(kp))
		}
		seen[key] = true
		var child *schema
		if s != nil {
			c, known := s.fields[key]
			hint := caseHint(s, key)
			switch {
			case known:
				child = c
			case !s.open || hint != "":
				return configError("unknown key %s%s", renderPath(kp), hint)
			}
		}
		if err := walkValue(dec, child, kp); err != nil {
			return err
		}
	}
}

func walkArray(dec *json.Decoder, elem *schema, path []pathElem) error {
	if len(path) >= maxConfigDepth {
		return configError("parse network config: %s nests deeper than %d levels", renderPath(path), maxConfigDepth)
	}
	for i := 0; ; i++ {
		if !dec.More() {
			// The closing bracket (or the syntax error in its place).
			if _, err := dec.Token(); err != nil {
				return configError("parse network config: in %s: %v", renderPath(path), err)
			}
			return nil
		}
		if err := walkValue(dec, elem, append(path[:len(path):len(path)], pathElem{index: i})); err != nil {
			return err
		}
	}
}

// walkValue reads one value, described by s.
func walkValue(dec *json.Decoder, s *schema, path []pathElem) error {
	tok, err := dec.Token()
	if err != nil {
		return configError("parse network config: at %s: %v", renderPath(path), err)
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return nil // a scalar: its type is the decoder's to check
	}
	switch d {
	case '{':
		if s != nil && s.fields == nil {
			s = nil // not an object where one belongs: the decoder names it
		}
		return walkObject(dec, s, path)
	case '[':
		var elem *schema
		if s != nil {
			elem = s.elems
		}
		return walkArray(dec, elem, path)
	}
	return configError("parse network config: at %s: unexpected %v", renderPath(path), d)
}

// caseHint names the field key is a case variant of (encoding/json would
// take one for the other), or is empty.
func caseHint(s *schema, key string) string {
	for f := range s.fields {
		if f != key && strings.EqualFold(f, key) {
			return fmt.Sprintf(" (keys are case-sensitive: did you mean %q?)", f)
		}
	}
	return ""
}

func tokenKind(tok json.Token) string {
	switch tok.(type) {
	case json.Delim:
		if tok == json.Delim('[') {
			return "an array"
		}
		return "an object"
	case string:
		return "a string"
	case json.Number, float64:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%T", tok)
}

var simpleKeyRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// maxPathKey and maxPathElems bound how much of a key and of a path an
// error message repeats.
const (
	maxPathKey   = 128
	maxPathElems = 16
)

// renderPath writes a key's path as "tags.team" or "prevResult.ips[0]",
// and keys that are not plain words in brackets:
// runtimeConfig["io.kubernetes.cri.pod-annotations"]["pktmeta.dev/team"].
func renderPath(path []pathElem) string {
	if len(path) == 0 {
		return "the top-level object"
	}
	var b strings.Builder
	plain := true
	for i, e := range path {
		if len(path) > maxPathElems && i == maxPathElems/2 {
			// Deep nesting: the start and the end say where.
			b.WriteString("...")
			continue
		}
		if len(path) > maxPathElems && i > maxPathElems/2 && i < len(path)-maxPathElems/2 {
			continue
		}
		if len(e.key) > maxPathKey {
			e.key = e.key[:maxPathKey] + "..."
		}
		switch {
		case !e.isKey:
			fmt.Fprintf(&b, "[%d]", e.index)
		case simpleKeyRE.MatchString(e.key):
			if i > 0 {
				b.WriteByte('.')
			}
			b.WriteString(e.key)
		default:
			plain = false
			b.WriteString("[" + strconv.Quote(e.key) + "]")
		}
	}
	if plain {
		return `"` + b.String() + `"`
	}
	return b.String()
}

// EventsPerSecond is the validated eventsPerSecondPerPod: 0 means no limit.
func (c *Config) EventsPerSecond() uint32 { return c.eventsPerSec }
