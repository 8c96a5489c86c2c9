package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"maps"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/utils"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

// The seed corpora live in testdata/fuzz/<FuzzName>/ (plain go test runs
// them); make fuzz runs each target for FUZZTIME.

// FuzzParseConfig: no input makes ParseConfig panic; whatever it rejects is
// a CNI error with code 7 that a runtime can print; whatever it accepts has
// exactly the meaning its bytes spell: keys as written, each once, nothing
// unknown, and a config that validates again unchanged.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(head + prev + `}`))
	f.Add([]byte(head + `"strictSource": true, "strictsource": false}`))
	f.Fuzz(func(t *testing.T, stdin []byte) {
		conf, err := ParseConfig(stdin)
		if err != nil {
			wantCode7(t, err)
			return
		}
		checkAccepted(t, stdin, conf)
	})
}

// FuzzCNIStdinEnv covers what a CNI ADD reads before it touches the
// system: CNI_ARGS, CNI_CONTAINERID, CNI_IFNAME, CNI_NETNS and stdin, as
// ParseConfig, parseCNIArgs and parseAddInput take them.
func FuzzCNIStdinEnv(f *testing.F) {
	f.Add(k8sArgs, "sandbox-1", "eth0", "/var/run/netns/cni-1", []byte(head+prev+`}`))
	f.Fuzz(func(t *testing.T, cniArgs, containerID, ifname, netnsPath string, stdin []byte) {
		id, err := parseCNIArgs(cniArgs)
		if err != nil {
			wantCode7(t, err)
		}
		checkCNIArgs(t, cniArgs, id, err)

		conf, err := ParseConfig(stdin)
		if err != nil {
			wantCode7(t, err)
			return
		}
		args := &skel.CmdArgs{ContainerID: containerID, IfName: ifname, Netns: netnsPath, Args: cniArgs, StdinData: stdin}
		in, err := parseAddInput(conf, args, nil)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("%T %v: want a CNI error", err, err)
			}
			switch e.Code {
			case types.ErrInvalidNetworkConfig, types.ErrUnknownContainer, types.ErrInvalidEnvironmentVariables:
			default:
				t.Fatalf("code %d: %v", e.Code, e)
			}
			if _, err := json.Marshal(e); err != nil {
				t.Fatal(err)
			}
			return
		}
		// Accepted: what skel would have accepted, and a workload the
		// datapath can store, with tags split and bounded.
		if utils.ValidateContainerID(containerID) != nil || utils.ValidateInterfaceName(ifname) != nil || netnsPath == "" {
			t.Fatalf("accepted an environment skel refuses: %q %q %q", containerID, ifname, netnsPath)
		}
		w := in.workload
		if err := datapath.ValidateWorkload(w); err != nil {
			t.Fatal(err)
		}
		if w.ContainerID != containerID || w.IfName != ifname || w.Netns != netnsPath || w.Partial != in.id.partial() {
			t.Fatalf("workload %+v from %q %q %q", w, containerID, ifname, netnsPath)
		}
		if n := len(in.tags) + len(in.podTags); n > datapath.MaxTags {
			t.Fatalf("%d tags", n)
		}
		for k := range in.podTags {
			if _, ok := in.tags[k]; ok {
				t.Fatalf("tag %q both static and claimed by the pod", k)
			}
			if len(conf.AllowedPodTags) > 0 && !slices.Contains(conf.AllowedPodTags, k) {
				t.Fatalf("pod tag %q not in allowedPodTags %q", k, conf.AllowedPodTags)
			}
		}
		if !maps.Equal(in.tags, conf.Tags) && !(len(in.tags) == 0 && len(conf.Tags) == 0) {
			t.Fatalf("static tags %v became %v", conf.Tags, in.tags)
		}
		if conf.StrictSource && len(in.addrs) == 0 {
			t.Fatal("strict without addresses")
		}
		var out bytes.Buffer
		if err := in.prev.PrintTo(&out); err != nil {
			t.Fatalf("prevResult does not print: %v", err)
		}
	})
}

// wantCode7 asserts err is a CNI error with code 7 that prints as JSON.
func wantCode7(t *testing.T, err error) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("%T %v: want a CNI error", err, err)
	}
	if e.Code != types.ErrInvalidNetworkConfig || e.Msg == "" || e.Details == "" {
		t.Fatalf("code %d msg %q details %q: want code 7 with a message", e.Code, e.Msg, e.Details)
	}
	if _, err := json.Marshal(e); err != nil {
		t.Fatalf("error does not marshal: %v", err)
	}
}

// checkAccepted holds an accepted config against its bytes, read
// independently of ParseConfig.
func checkAccepted(t *testing.T, stdin []byte, conf *Config) {
	t.Helper()
	// Each key once, at every level: the keys a plain decode keeps (the
	// last of equal keys) must be as many as the document spells.
	var generic any
	d := json.NewDecoder(bytes.NewReader(stdin))
	d.UseNumber()
	if err := d.Decode(&generic); err != nil {
		t.Fatalf("accepted what encoding/json cannot decode: %v", err)
	}
	if spelt, kept := countKeys(t, stdin), keysIn(generic); spelt != kept {
		t.Fatalf("accepted %d keys of which only %d are distinct", spelt, kept)
	}
	// Exact keys: every top-level key is one the config has, spelt
	// exactly, and means what the plugin took from it.
	top, ok := generic.(map[string]any)
	if !ok {
		t.Fatalf("accepted a %T", generic)
	}
	for k := range top {
		if _, ok := configSchema.fields[k]; !ok {
			t.Fatalf("accepted unknown key %q", k)
		}
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(stdin, &raw); err != nil {
		t.Fatal(err)
	}
	same := func(key string, got any) {
		t.Helper()
		r, ok := raw[key]
		if !ok || string(r) == "null" {
			return
		}
		want := reflect.New(reflect.TypeOf(got))
		if err := json.Unmarshal(r, want.Interface()); err != nil {
			t.Fatalf("key %q: %v", key, err)
		}
		if !reflect.DeepEqual(want.Elem().Interface(), got) {
			t.Fatalf("key %q spells %#v, the plugin took %#v", key, want.Elem().Interface(), got)
		}
	}
	same("strictSource", conf.StrictSource)
	same("tags", conf.Tags)
	same("logFile", conf.LogFile)
	same("logLevel", conf.LogLevel)
	same("attachMode", conf.AttachMode)
	same("allowedPodTags", conf.AllowedPodTags)
	same("cniVersion", conf.CNIVersion)
	same("name", conf.Name)
	same("type", conf.Type)
	same("capabilities", conf.Capabilities)
	if r, ok := raw["pinPath"]; ok {
		var p string
		if json.Unmarshal(r, &p) == nil && p != "" && filepath.Clean(p) != conf.PinPath {
			t.Fatalf("pinPath %q, the plugin took %q", p, conf.PinPath)
		}
	}
	if r, ok := raw["maxConnections"]; ok {
		var n uint32
		if json.Unmarshal(r, &n) == nil && n != 0 && n != conf.MaxConnections {
			t.Fatalf("maxConnections %d, the plugin took %d", n, conf.MaxConnections)
		}
	}
	if r, ok := raw["runtimeConfig"]; ok && string(r) != "null" {
		var rc map[string]map[string]string
		if err := json.Unmarshal(r, &rc); err != nil {
			t.Fatalf("runtimeConfig: %v", err)
		}
		if a := rc["io.kubernetes.cri.pod-annotations"]; !maps.Equal(a, conf.RuntimeConfig.PodAnnotations) {
			t.Fatalf("annotations %v, the plugin took %v", a, conf.RuntimeConfig.PodAnnotations)
		}
	}
	// It validates again, unchanged.
	again := *conf
	if err := again.validate(); err != nil {
		t.Fatalf("accepted config does not validate again: %v", err)
	}
	if again.PinPath != conf.PinPath || again.MaxConnections != conf.MaxConnections || again.mode != conf.mode || again.logLevel != conf.logLevel {
		t.Fatalf("validate is not idempotent: %+v vs %+v", again, conf)
	}
	if len(conf.Tags) > datapath.MaxTags {
		t.Fatalf("%d static tags", len(conf.Tags))
	}
	for k, v := range conf.Tags {
		if err := ValidateTag(k, v); err != nil {
			t.Fatal(err)
		}
	}
	// What ADD does next with it.
	if tags, podTags, err := conf.podTags(nil); err != nil {
		wantCode7(t, err)
	} else if len(tags)+len(podTags) > datapath.MaxTags {
		t.Fatalf("%d tags", len(tags)+len(podTags))
	}
	if conf.PrevResult != nil {
		if r, err := current.NewResultFromResult(conf.PrevResult); err == nil {
			if err := r.PrintTo(io.Discard); err != nil {
				t.Fatalf("prevResult does not print: %v", err)
			}
		}
	}
}

// countKeys counts object keys as the document spells them, duplicates
// included.
func countKeys(t *testing.T, doc []byte) int {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(doc))
	d.UseNumber()
	var value func() int
	value = func() int {
		tok, err := d.Token()
		if err != nil {
			t.Fatalf("accepted invalid JSON: %v", err)
		}
		n := 0
		switch tok {
		case json.Delim('{'):
			for d.More() {
				if _, err := d.Token(); err != nil { // the key
					t.Fatal(err)
				}
				n += 1 + value()
			}
			d.Token()
		case json.Delim('['):
			for d.More() {
				n += value()
			}
			d.Token()
		}
		return n
	}
	return value()
}

// keysIn counts the keys of a decoded value.
func keysIn(v any) int {
	n := 0
	switch v := v.(type) {
	case map[string]any:
		for _, e := range v {
			n += 1 + keysIn(e)
		}
	case []any:
		for _, e := range v {
			n += keysIn(e)
		}
	}
	return n
}

// k8sArgsStruct is how CNI's own plugins read the identity: types.LoadArgs
// into a struct of this shape.
type k8sArgsStruct struct {
	types.CommonArgs
	K8S_POD_NAMESPACE types.UnmarshallableString
	K8S_POD_NAME      types.UnmarshallableString
	K8S_POD_UID       types.UnmarshallableString
}

// checkCNIArgs compares parseCNIArgs with CNI's LoadArgs wherever LoadArgs
// accepts the string: same identity, unless the string repeats an
// identity key (LoadArgs lets the last one win; pktmeta refuses).
func checkCNIArgs(t *testing.T, cniArgs string, id podIdentity, err error) {
	t.Helper()
	// An identity key given twice is refused, whatever else is there.
	count := map[string]int{}
	for _, pair := range strings.Split(cniArgs, ";") {
		if k, _, ok := strings.Cut(pair, "="); ok {
			count[k]++
		}
	}
	for _, k := range []string{"K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID"} {
		if count[k] > 1 && err == nil {
			t.Fatalf("%q: %s given %d times, accepted", cniArgs, k, count[k])
		}
	}
	var ref k8sArgsStruct
	if types.LoadArgs(cniArgs, &ref) != nil {
		return // pktmeta reads more than LoadArgs (unknown or odd pairs of other keys)
	}
	if err != nil {
		if !strings.Contains(err.Error(), "duplicate key") {
			t.Fatalf("%q: LoadArgs accepts it, pktmeta says %v", cniArgs, err)
		}
		return
	}
	want := podIdentity{
		Namespace: string(ref.K8S_POD_NAMESPACE),
		Name:      string(ref.K8S_POD_NAME),
		UID:       string(ref.K8S_POD_UID),
	}
	if id != want {
		t.Fatalf("%q: pktmeta reads %+v, LoadArgs %+v", cniArgs, id, want)
	}
}
