package plugin

import (
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

const prev = `"prevResult": {"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"address":"10.244.1.2/24","interface":1}]}`

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"net","type":"pktmeta",` + prev + `}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.PinPath != datapath.DefaultPinPath || c.MaxConnections != datapath.DefaultMaxConnections || c.mode != attach.Auto || c.logLevel != slog.LevelWarn {
		t.Fatalf("defaults: %+v", c)
	}
	if c.PrevResult == nil {
		t.Fatal("prevResult not parsed")
	}
}

func TestParseConfigAllKeys(t *testing.T) {
	c, err := ParseConfig([]byte(`{
		"cniVersion":"1.1.0","name":"net","type":"pktmeta",
		"pinPath":"/sys/fs/bpf/x/","tags":{"team":"payments","env":"prod"},
		"strictSource":true,"maxConnections":65536,"logFile":"/var/log/pktmeta.log",
		"logLevel":"debug","attachMode":"legacy",
		"applicationCgroup":"/sys/fs/cgroup/kubepods.slice","applicationUDP":false,
		"capabilities":{"io.kubernetes.cri.pod-annotations":true},
		"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"pktmeta.dev/app":"web","other":"x"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.PinPath != "/sys/fs/bpf/x" || !c.StrictSource || c.MaxConnections != 65536 || c.mode != attach.Legacy || c.logLevel != slog.LevelDebug ||
		c.ApplicationCgroup != "/sys/fs/cgroup/kubepods.slice" || c.ApplicationUDP == nil || *c.ApplicationUDP {
		t.Fatalf("parsed: %+v", c)
	}
	tags, podTags, err := c.podTags(slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if len(tags) != 2 || tags["team"] != "payments" || len(podTags) != 1 || podTags["app"] != "web" {
		t.Fatalf("tags %v, pod tags %v", tags, podTags)
	}
}

func TestStaticTagsWinOverAnnotations(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"pktmeta","tags":{"team":"ops"},
		"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"pktmeta.dev/team":"attacker"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	tags, podTags, err := c.podTags(slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if tags["team"] != "ops" {
		t.Fatalf("annotation overrode a static tag: %v", tags)
	}
	if _, ok := podTags["team"]; ok {
		t.Fatalf("a key the static tags hold is also a pod tag: %v", podTags)
	}
}

func TestParseConfigErrorsNameTheKey(t *testing.T) {
	for _, c := range []struct{ conf, want string }{
		{`{"maxConnections": 5}`, `"maxConnections"`},
		{`{"maxConnections": "many"}`, `"maxConnections"`},
		{`{"attachMode": "xdp"}`, `"attachMode"`},
		{`{"logLevel": "loud"}`, `"logLevel"`},
		{`{"logFile": "relative.log"}`, `"logFile"`},
		{`{"pinPath": "relative"}`, `"pinPath"`},
		{`{"pinPath": "/"}`, `"pinPath"`},
		{`{"tags": {"bad key": "v"}}`, `"tags"`},
		{`{"tags": {"k": "` + strings.Repeat("v", 200) + `"}}`, `"tags"`},
		{`{"tags": {"a":"1","b":"2","c":"3","d":"4","e":"5","f":"6","g":"7","h":"8","i":"9"}}`, `"tags"`},
		{`{"strictSource": "yes"}`, `"strictSource"`},
		{`{"tag": {"k": "v"}}`, `"tag"`},
		{`{"prevResult": {"cniVersion":"1.0.0","ips":[{"address":"nonsense"}]}}`, `"prevResult"`},
	} {
		conf := strings.Replace(c.conf, "{", `{"cniVersion":"1.0.0","name":"n","type":"pktmeta",`, 1)
		_, err := ParseConfig([]byte(conf))
		var e *types.Error
		if !errors.As(err, &e) {
			t.Errorf("%s: error %v, want a CNI error", c.conf, err)
			continue
		}
		if e.Code != types.ErrInvalidNetworkConfig {
			t.Errorf("%s: code %d, want 7", c.conf, e.Code)
		}
		if !strings.Contains(e.Details, c.want) {
			t.Errorf("%s: %q does not name %s", c.conf, e.Details, c.want)
		}
	}
	if _, err := ParseConfig([]byte(`{not json`)); err == nil {
		t.Error("malformed JSON accepted")
	}
}

func TestBadAnnotationTag(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"pktmeta",
		"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"pktmeta.dev/a b":"x"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.podTags(slog.New(slog.NewTextHandler(io.Discard, nil)))
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrInvalidNetworkConfig || !strings.Contains(e.Details, "pktmeta.dev/a b") {
		t.Fatalf("bad annotation: %v", err)
	}
}

func TestParseCNIArgs(t *testing.T) {
	id, err := parseCNIArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1;X=y")
	if err != nil || id.Namespace != "shop" || id.Name != "web-0" || id.UID != "u-1" || id.partial() {
		t.Fatalf("%+v %v", id, err)
	}
	id, err = parseCNIArgs("")
	if err != nil || !id.partial() {
		t.Fatalf("%+v %v", id, err)
	}
}

// The example conflist shipped in deploy/ must be one libcni and pktmeta accept.
func TestDeployConflistParses(t *testing.T) {
	list, err := libcni.ConfListFromFile("../deploy/10-ptp-pktmeta.conflist")
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, p := range list.Plugins {
		if p.Network.Type != "pktmeta" {
			continue
		}
		found = true
		if _, err := ParseConfig(p.Bytes); err != nil {
			t.Fatalf("pktmeta entry: %v", err)
		}
	}
	if !found {
		t.Fatal("no pktmeta entry")
	}
}
