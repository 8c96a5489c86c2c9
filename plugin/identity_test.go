package plugin

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

const k8sArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=u-1"

func TestParseCNIArgsDuplicates(t *testing.T) {
	for _, key := range []string{"K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_UID"} {
		for _, args := range []string{
			k8sArgs + ";" + key + "=other",
			key + "=other;" + k8sArgs,
			k8sArgs + ";" + key + "=",                               // an empty second value is still a second value
			strings.Replace(k8sArgs, key+"=", key+"=x;"+key+"=", 1), // twice in a row
		} {
			_, err := parseCNIArgs(args)
			wantConfigError(t, args, err, "CNI_ARGS", `"`+key+`"`, "duplicate")
		}
	}
	// A value CNI's own parser refuses.
	_, err := parseCNIArgs("K8S_POD_NAME=web=0")
	wantConfigError(t, "K8S_POD_NAME=web=0", err, `"K8S_POD_NAME"`)
}

func TestParseCNIArgsExactKeys(t *testing.T) {
	for _, c := range []struct {
		args string
		want podIdentity
	}{
		// Unknown keys, even repeated or malformed, are not ours.
		{k8sArgs + ";X=1;X=2;Y;;=z;W=a=b", podIdentity{"shop", "web-0", "u-1"}},
		// The sandbox id is CNI_CONTAINERID's; this key is not read, so
		// repeating it is not pktmeta's business.
		{k8sArgs + ";K8S_POD_INFRA_CONTAINER_ID=other", podIdentity{"shop", "web-0", "u-1"}},
		// Keys match exactly, as CNI's LoadArgs matches struct fields:
		// no trimming, no case folding. These are unknown keys.
		{"k8s_pod_name=a; K8S_POD_NAME=b;K8S_POD_NAME =c;K8S_POD_NAMESPACE\t=d", podIdentity{}},
		// Values are taken as they are (CNI does not trim them either).
		{"K8S_POD_NAMESPACE= shop ;K8S_POD_NAME=", podIdentity{Namespace: " shop "}},
		{"", podIdentity{}},
	} {
		id, err := parseCNIArgs(c.args)
		if err != nil || id != c.want {
			t.Errorf("%q: %+v %v, want %+v", c.args, id, err, c.want)
		}
	}
}

func TestMergeTags(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	static := map[string]string{"cluster": "prod", "team": "ops"}
	ann := map[string]string{
		"pktmeta.dev/team":    "attacker", // static wins
		"pktmeta.dev/app":     "web",
		"pktmeta.dev/tier":    "front",
		"pktmeta.dev/bad key": "x", // not allowed: ignored before validation
		"other.io/app":        "x",
	}
	tags, podTags, err := MergeTags(static, ann, []string{"app", "team"}, log)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(tags) != "map[cluster:prod team:ops]" || fmt.Sprint(podTags) != "map[app:web]" {
		t.Fatalf("tags %v, pod tags %v", tags, podTags)
	}
	for _, want := range []string{`annotation=pktmeta.dev/tier`, `annotation="pktmeta.dev/bad key"`, "allowedPodTags", "keeping the static tag"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("logs do not say %s:\n%s", want, logs.String())
		}
	}
	// The static tags are not changed by the merge.
	if len(static) != 2 {
		t.Fatalf("static tags changed: %v", static)
	}

	// No allow list: every pktmeta.dev/ key.
	tags, podTags, err = MergeTags(static, ann, nil, nil)
	if err == nil {
		t.Fatalf("an invalid annotation passed: %v %v", tags, podTags)
	}
	wantConfigError(t, "bad key", err, `"pktmeta.dev/bad key"`)
	delete(ann, "pktmeta.dev/bad key")
	_, podTags, err = MergeTags(static, ann, nil, nil)
	if err != nil || fmt.Sprint(podTags) != "map[app:web tier:front]" {
		t.Fatalf("pod tags %v: %v", podTags, err)
	}

	// At most MaxTags in both sets together.
	many := map[string]string{}
	for i := range datapath.MaxTags - len(static) {
		many[fmt.Sprintf("pktmeta.dev/k%d", i)] = "v"
	}
	if _, _, err := MergeTags(static, many, nil, nil); err != nil {
		t.Fatalf("%d tags in all: %v", datapath.MaxTags, err)
	}
	many["pktmeta.dev/one-more"] = "v"
	_, _, err = MergeTags(static, many, nil, nil)
	wantConfigError(t, "too many", err, fmt.Sprintf("%d tags", datapath.MaxTags+1))
	// A clash with a static tag does not count twice.
	delete(many, "pktmeta.dev/one-more")
	many["pktmeta.dev/team"] = "x"
	if _, _, err := MergeTags(static, many, nil, nil); err != nil {
		t.Fatalf("clash counted twice: %v", err)
	}
}

func TestAllowedPodTagsConfig(t *testing.T) {
	c, err := ParseConfig([]byte(head + `"allowedPodTags": ["team", "app.kubernetes.io/name"],
		"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"pktmeta.dev/team": "a", "pktmeta.dev/app.kubernetes.io/name": "b", "pktmeta.dev/env": "c"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	_, podTags, err := c.podTags(nil)
	if err != nil || fmt.Sprint(podTags) != "map[app.kubernetes.io/name:b team:a]" {
		t.Fatalf("pod tags %v: %v", podTags, err)
	}
	for _, bad := range []string{`[""]`, `["-x"]`, `["` + strings.Repeat("k", 64) + `"]`, `[1]`, `{"team": true}`} {
		_, err := ParseConfig([]byte(head + `"allowedPodTags": ` + bad + `}`))
		wantConfigError(t, bad, err, "allowedPodTags")
	}
}

// parseAddInput fails before any side effect, with the codes skel and the
// spec use.
func TestParseAddInput(t *testing.T) {
	conf, err := ParseConfig([]byte(head + prev + `, "strictSource": true, "tags": {"cluster": "prod"},
		"runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"pktmeta.dev/team": "a"}}}`))
	if err != nil {
		t.Fatal(err)
	}
	args := &skel.CmdArgs{ContainerID: "cid", IfName: "eth0", Netns: "/var/run/netns/x", Args: k8sArgs}
	in, err := parseAddInput(conf, args, nil)
	if err != nil {
		t.Fatal(err)
	}
	w := in.workload
	if w.Namespace != "shop" || w.Pod != "web-0" || w.UID != "u-1" || w.ContainerID != "cid" || w.Partial ||
		w.Tags["cluster"] != "prod" || w.PodTags["team"] != "a" || len(in.addrs) != 1 || in.addrs[0].String() != "10.244.1.2" {
		t.Fatalf("%+v %+v", in, w)
	}
	for _, c := range []struct {
		mod  func(*skel.CmdArgs)
		code uint
	}{
		{func(a *skel.CmdArgs) { a.ContainerID = "" }, types.ErrUnknownContainer},
		{func(a *skel.CmdArgs) { a.ContainerID = "a/b" }, types.ErrInvalidEnvironmentVariables},
		{func(a *skel.CmdArgs) { a.IfName = "a-much-too-long-ifname" }, types.ErrInvalidEnvironmentVariables},
		{func(a *skel.CmdArgs) { a.Netns = "" }, types.ErrInvalidEnvironmentVariables},
		{func(a *skel.CmdArgs) { a.Args += ";K8S_POD_NAME=x" }, types.ErrInvalidNetworkConfig},
		{func(a *skel.CmdArgs) { a.Netns = "/" + strings.Repeat("n", 300) }, types.ErrInvalidNetworkConfig},
		{func(a *skel.CmdArgs) { a.Args = "K8S_POD_UID=" + strings.Repeat("u", 300) }, types.ErrInvalidNetworkConfig},
	} {
		a := *args
		c.mod(&a)
		_, err := parseAddInput(conf, &a, nil)
		var e *types.Error
		if !errors.As(err, &e) || e.Code != c.code {
			t.Errorf("%+v: %v, want code %d", a, err, c.code)
		}
	}
	noPrev, err := ParseConfig([]byte(head + `"tags": {}}`))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := parseAddInput(noPrev, args, nil); err != errNoPrevResult {
		t.Errorf("no prevResult: %v", err)
	}
	noAddrs, err := ParseConfig([]byte(head + `"strictSource": true, "prevResult": {"cniVersion": "1.0.0", "interfaces": [{"name": "veth1"}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = parseAddInput(noAddrs, args, nil)
	wantConfigError(t, "strict without addresses", err, `"strictSource"`)
}
