package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// head is what every test config starts with.
const head = `{"cniVersion":"1.0.0","name":"n","type":"pktmeta",`

// wantConfigError asserts err is a CNI error with code 7 whose details
// contain every one of want.
func wantConfigError(t *testing.T, conf string, err error, want ...string) {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Errorf("%s: error %v, want a CNI error", conf, err)
		return
	}
	if e.Code != types.ErrInvalidNetworkConfig {
		t.Errorf("%s: code %d (%s), want 7", conf, e.Code, e.Details)
	}
	for _, w := range want {
		if !strings.Contains(e.Details, w) {
			t.Errorf("%s: %q does not name %s", conf, e.Details, w)
		}
	}
}

func TestParseConfigExactKeys(t *testing.T) {
	pa := `"io.kubernetes.cri.pod-annotations"`
	for _, c := range []struct {
		conf string
		want []string
	}{
		// The cases: a case variant must not switch strict off or
		// move the pins.
		{head + `"strictSource": true, "strictsource": false}`, []string{`unknown key "strictsource"`, `did you mean "strictSource"`}},
		{head + `"strictsource": false}`, []string{`"strictsource"`}},
		{head + `"pinPath": "/sys/fs/bpf/a", "PINPATH": "/sys/fs/bpf/b"}`, []string{`unknown key "PINPATH"`, `"pinPath"`}},
		{head + `"Tags": {"a": "b"}}`, []string{`"Tags"`, `"tags"`}},
		// Unicode case folding: encoding/json takes "ſ" (U+017F) for "s".
		{head + `"ſtrictSource": false}`, []string{`strictSource`}},
		// ... and "K" (U+212A, Kelvin) for "k".
		{head + "\"runtimeConfig\": {\"io.\u212aubernetes.cri.pod-annotations\": {}}}", []string{`did you mean ` + pa}},
		{head + `"CNIVersion": "0.4.0"}`, []string{`"CNIVersion"`, `"cniVersion"`}},
		{head + `"runtimeConfig": {"IO.KUBERNETES.CRI.POD-ANNOTATIONS": {}}}`, []string{`runtimeConfig["IO.KUBERNETES.CRI.POD-ANNOTATIONS"]`, `did you mean ` + pa}},
		{head + `"runtimeConfig": {"portMappings": []}}`, []string{`unknown key "runtimeConfig.portMappings"`}},
		{head + `"ipam": {"Type": "host-local"}}`, []string{`"ipam.Type"`}},
		{head + `"dns": {"nameServers": []}}`, []string{`"dns.nameServers"`}},
		{head + `"cni.dev/valid-attachments": [{"containerID": "a", "ifName": "eth0"}]}`, []string{`["cni.dev/valid-attachments"][0].ifName`}},
		// prevResult is open (unknown keys pass, as they always did), but
		// a case variant of a result key would be decoded as that key.
		{head + `"prevResult": {"cniVersion": "1.0.0", "IPs": []}}`, []string{`"prevResult.IPs"`, `did you mean "ips"`}},
		{head + `"prevResult": {"cniVersion": "1.0.0", "ips": [{"Address": "10.0.0.2/24"}]}}`, []string{`"prevResult.ips[0].Address"`}},
		{head + `"prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "a"}, {"name": "b", "Sandbox": "/x"}]}}`, []string{`"prevResult.interfaces[1].Sandbox"`}},
		// Duplicates, at every level.
		{head + `"strictSource": true, "strictSource": false}`, []string{`duplicate key "strictSource"`}},
		{head + `"name": "other"}`, []string{`duplicate key "name"`}},
		{head + `"tags": {"team": "ops", "team": "attacker"}}`, []string{`duplicate key "tags.team"`}},
		{head + `"tags": {"team": "ops", "te\u0061m": "attacker"}}`, []string{`duplicate key "tags.team"`}},
		{head + `"tags": {"a": "1"}, "tags": {"b": "2"}}`, []string{`duplicate key "tags"`}},
		{head + `"capabilities": {` + pa + `: true, ` + pa + `: false}}`, []string{`duplicate key capabilities[` + pa + `]`}},
		{head + `"runtimeConfig": {` + pa + `: {"pktmeta.dev/team": "a", "pktmeta.dev/team": "b"}}}`, []string{`duplicate key runtimeConfig[` + pa + `]["pktmeta.dev/team"]`}},
		{head + `"runtimeConfig": {` + pa + `: {}, ` + pa + `: {}}}`, []string{`duplicate key runtimeConfig[` + pa + `]`}},
		{head + `"runtimeConfig": {}, "runtimeConfig": {}}`, []string{`duplicate key "runtimeConfig"`}},
		{head + `"prevResult": {"cniVersion": "1.0.0", "ips": [], "ips": []}}`, []string{`duplicate key "prevResult.ips"`}},
		{head + `"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24", "address": "10.0.0.3/24"}]}}`, []string{`duplicate key "prevResult.ips[0].address"`}},
		{head + `"prevResult": {"cniVersion": "1.0.0", "x-vendor": {"a": {"b": 1, "b": 2}}}}`, []string{`duplicate key "prevResult.x-vendor.a.b"`}},
		{head + `"args": {"cni": {"labels": [{"key": "a", "key": "b"}]}}}`, []string{`duplicate key "args.cni.labels[0].key"`}},
		{head + `"ipam": {"type": "a", "type": "b"}}`, []string{`duplicate key "ipam.type"`}},
		{head + `"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0", "ifname": "eth1"}]}`, []string{`duplicate key ["cni.dev/valid-attachments"][0].ifname`}},
		{head + `"args": {"": 1, "": 2}}`, []string{`duplicate key args[""]`}},
		{head + `"": 1}`, []string{`unknown key [""]`}},
		// Not one JSON object.
		{`null`, []string{"want a JSON object, got null"}},
		{`[]`, []string{"want a JSON object, got an array"}},
		{`"x"`, []string{"want a JSON object, got a string"}},
		{``, []string{"no JSON object"}},
		{head + `"tags": {}} {"strictSource": false}`, []string{"after the object"}},
		{head + `"tags": {}}}`, []string{"after the object"}},
		{head + `"tags": {"a": "1",}}`, []string{`"tags"`}},
		{head + `"args": ` + strings.Repeat("[", 200) + strings.Repeat("]", 200) + `}`, []string{"deeper than 64"}},
		// Types are still the decoder's, by key.
		{head + `"maxConnections": 1e400}`, []string{`"maxConnections"`}},
		{head + `"maxConnections": 99999999999999999999999}`, []string{`"maxConnections"`}},
		{head + `"allowedPodTags": "team"}`, []string{`"allowedPodTags"`}},
		{head + `"allowedPodTags": ["team", "bad key"]}`, []string{`"allowedPodTags[1]"`}},
	} {
		_, err := ParseConfig([]byte(c.conf))
		wantConfigError(t, c.conf, err, c.want...)
	}
}

func TestParseConfigAcceptsWhatRuntimesSend(t *testing.T) {
	for _, conf := range []string{
		// Everything types.PluginConf and pktmeta know, exactly spelt.
		head + `"capabilities": {"io.kubernetes.cri.pod-annotations": true, "portMappings": false},
			"ipam": {"type": ""}, "dns": {"nameservers": ["10.96.0.10"], "domain": "cluster.local", "search": ["svc"], "options": ["ndots:5"]},
			"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"pktmeta.dev/team": "a", "Pktmeta.dev/team": "b"}},
			"args": {"cni": {"labels": [{"key": "a", "value": "b"}]}, "Cni": {}},
			"cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}], "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}],
			"tags": {"team": "a", "Team": "b"}, "allowedPodTags": ["app", "app"], "pinPath": "/sys/fs/bpf/x", "strictSource": false,
			"maxConnections": 1024, "logFile": "/tmp/x.log", "logLevel": "info", "attachMode": "auto",
			"prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "veth1", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1500, "socketPath": "", "pciID": ""},
				{"name": "eth0", "sandbox": "/run/netns/x"}], "ips": [{"interface": 1, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
				"routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1500, "advmss": 1460, "priority": 1, "table": 1, "scope": 0}],
				"dns": {"nameservers": ["10.96.0.10"]}, "x-vendor": {"Name": 1}}}`,
		// A 0.4.0 result carries "version" in ips.
		`{"cniVersion":"0.4.0","name":"n","type":"pktmeta","prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"veth1"}],"ips":[{"version":"4","address":"10.244.1.2/24"}]}}`,
		// Whitespace, escapes and an empty key in an opaque map.
		"{\n\t\"cniVersion\" : \"1.0.0\" ,\"name\":\"n\",\"type\":\"pktmeta\",\"tags\":{\"t\\u0065am\":\"a\"},\"args\":{\"\":1}}\n",
	} {
		if _, err := ParseConfig([]byte(conf)); err != nil {
			t.Errorf("%s: %v", conf, err)
		}
	}
}

// recordingExec stands in for plugin binaries under libcni: "ptp" answers
// as a primary plugin, "pktmeta" parses what libcni gives it with the real
// parser, exactly as the binary would.
type recordingExec struct {
	version.PluginDecoder
	seen map[string]int // CNI_COMMAND -> pktmeta invocations
}

const primaryResult = `{"cniVersion":"1.1.0","interfaces":[{"name":"veth1a2b3c","mac":"aa:bb:cc:dd:ee:01"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:02","sandbox":"/var/run/netns/cni-1"}],
	"ips":[{"address":"10.244.1.2/24","gateway":"10.244.1.1","interface":1},{"address":"fd00::2/64","interface":1}],
	"routes":[{"dst":"0.0.0.0/0","gw":"10.244.1.1"}],"dns":{"nameservers":["10.96.0.10"],"search":["default.svc.cluster.local"]}}`

func (e *recordingExec) ExecPlugin(_ context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	env := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	cmd := env["CNI_COMMAND"]
	if cmd == "VERSION" {
		return json.Marshal(Versions())
	}
	if filepath.Base(pluginPath) != "pktmeta" {
		if cmd == "ADD" {
			// A plugin answers in the config's version.
			var conf types.PluginConf
			if err := json.Unmarshal(stdin, &conf); err != nil {
				return nil, err
			}
			r, err := current.NewResult([]byte(primaryResult))
			if err != nil {
				return nil, err
			}
			if r, err = r.GetAsVersion(conf.CNIVersion); err != nil {
				return nil, err
			}
			return json.Marshal(r)
		}
		return nil, nil
	}
	e.seen[cmd]++
	conf, err := ParseConfig(stdin)
	if err != nil {
		return nil, fmt.Errorf("%s: pktmeta rejected what libcni sent: %w\n%s", cmd, err, stdin)
	}
	if cmd == "ADD" || cmd == "CHECK" || cmd == "DEL" {
		id, err := parseCNIArgs(env["CNI_ARGS"])
		if err != nil || id.Namespace != "shop" || id.Name != "web-0" || id.UID != "u-1" || env["CNI_CONTAINERID"] != "sandbox-1" {
			return nil, fmt.Errorf("%s: CNI_ARGS %q: %+v %v", cmd, env["CNI_ARGS"], id, err)
		}
	}
	switch cmd {
	case "ADD":
		if conf.PrevResult == nil {
			return nil, fmt.Errorf("ADD without prevResult")
		}
		tags, podTags, err := conf.podTags(nil)
		if err != nil || tags["cluster"] != "prod" || podTags["team"] != "payments" || len(podTags) != 1 {
			return nil, fmt.Errorf("tags %v, pod tags %v: %v", tags, podTags, err)
		}
		r, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
		if err != nil {
			return nil, err
		}
		return json.Marshal(r)
	case "GC":
		if len(conf.ValidAttachments) != 1 || conf.ValidAttachments[0].IfName != "eth0" {
			return nil, fmt.Errorf("GC attachments %+v", conf.ValidAttachments)
		}
	}
	return nil, nil
}

func (e *recordingExec) FindInPath(plugin string, _ []string) (string, error) {
	return "/opt/cni/bin/" + plugin, nil
}

// Whatever libcni builds from a conflist and a runtime's request, for
// every verb and spec version, pktmeta's parser accepts.
func TestLibcniConfigsParse(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			list, err := libcni.NetworkConfFromBytes([]byte(`{"cniVersion":"` + v + `","name":"k8s-pod-network","plugins":[
				{"type":"ptp","ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.1.0/24"}]]}},
				{"type":"pktmeta","pinPath":"/sys/fs/bpf/pktmeta","tags":{"cluster":"prod"},"allowedPodTags":["team"],"strictSource":true,
				 "maxConnections":262144,"attachMode":"auto","logFile":"/var/log/pktmeta-cni.log","logLevel":"info",
				 "capabilities":{"io.kubernetes.cri.pod-annotations":true}}]}`))
			if err != nil {
				t.Fatal(err)
			}
			exec := &recordingExec{seen: map[string]int{}}
			cni := libcni.NewCNIConfigWithCacheDir([]string{"/opt/cni/bin"}, t.TempDir(), exec)
			rt := &libcni.RuntimeConf{
				ContainerID: "sandbox-1",
				NetNS:       "/var/run/netns/cni-1",
				IfName:      "eth0",
				// containerd's order.
				Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "shop"}, {"K8S_POD_NAME", "web-0"},
					{"K8S_POD_INFRA_CONTAINER_ID", "sandbox-1"}, {"K8S_POD_UID", "u-1"}},
				CapabilityArgs: map[string]any{
					"io.kubernetes.cri.pod-annotations": map[string]string{"pktmeta.dev/team": "payments", "pktmeta.dev/other": "x", "kubernetes.io/config.seen": "now"},
					"portMappings":                      []map[string]any{{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}},
				},
			}
			ctx := context.Background()
			if _, err := cni.AddNetworkList(ctx, list, rt); err != nil {
				t.Fatal(err)
			}
			if v != "0.3.1" {
				if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
					t.Fatal(err)
				}
			}
			if err := cni.GCNetworkList(ctx, list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "sandbox-1", IfName: "eth0"}}}); err != nil {
				t.Fatal(err)
			}
			if err := cni.GetStatusNetworkList(ctx, list); err != nil {
				t.Fatal(err)
			}
			if err := cni.DelNetworkList(ctx, list, rt); err != nil {
				t.Fatal(err)
			}
			want := map[string]int{"ADD": 1, "CHECK": 1, "DEL": 1}
			if v == "0.3.1" {
				delete(want, "CHECK")
			}
			if v == "1.1.0" {
				want["GC"], want["STATUS"] = 1, 1
			}
			for verb, n := range want {
				if exec.seen[verb] != n {
					t.Errorf("pktmeta saw %d %s, want %d (all: %v)", exec.seen[verb], verb, n, exec.seen)
				}
			}
		})
	}
}

// The schema comes from Config's json tags: every key Config has is
// accepted exactly, its case variants are not, and the keys a runtime
// sends are among them.
func TestConfigSchemaKeys(t *testing.T) {
	for _, k := range []string{"cniVersion", "name", "type", "capabilities", "ipam", "dns", "prevResult",
		"cni.dev/valid-attachments", "cni.dev/attachments", "runtimeConfig", "args",
		"pinPath", "tags", "strictSource", "maxConnections", "logFile", "logLevel", "attachMode", "allowedPodTags"} {
		if _, ok := configSchema.fields[k]; !ok {
			t.Errorf("key %q missing from the schema", k)
		}
	}
	for k := range configSchema.fields {
		if err := checkKeys([]byte(`{"` + k + `": null}`)); err != nil {
			t.Errorf("%q: %v", k, err)
		}
		if up := strings.ToUpper(k); up != k {
			err := checkKeys([]byte(`{"` + up + `": null}`))
			wantConfigError(t, up, err, "did you mean")
		}
	}
	if rc := configSchema.fields["runtimeConfig"]; rc == nil || len(rc.fields) != 1 || rc.open {
		t.Errorf("runtimeConfig schema %+v", rc)
	}
	if va := configSchema.fields["cni.dev/valid-attachments"]; va == nil || va.elems == nil || len(va.elems.fields) != 2 {
		t.Errorf("valid-attachments schema %+v", va)
	}
}
