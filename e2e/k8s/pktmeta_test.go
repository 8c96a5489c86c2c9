// Package k8s is pktmeta's end-to-end suite against a real Kubernetes
// cluster: deploy/ applied with kubectl apply -k, pods the kubelet creates,
// Services through kube-proxy, a rolling update, the agent killed, the
// primary CNI rewriting its config, and an uninstall. make e2e-k8s runs it
// against a single-node cluster it brings up on this machine
// (e2e/k8s/node), make e2e-kind against a kind cluster; without either it
// skips and says so.
//
// The steps share one cluster and run in the order of issue 8's list as
// the state they need allows: install first, uninstall last. Each is a
// subtest; a step that needs an installed pktmeta is skipped, with the
// reason, once the install failed.
package k8s

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/pktmeta/pktmeta/internal/kubenode"
	"github.com/pktmeta/pktmeta/internal/view"
)

type suite struct {
	c     *cluster
	probe *nodeProbe
	ns    string

	conflist         string // the primary CNI's config file (a probe path)
	originalConflist []byte // its bytes before pktmeta

	installed bool // the first install worked: later steps may rely on pktmeta
	web       *corev1.Pod
	webSvc    string // ClusterIP of the TCP Service to web:8080
	dnsSvc    string // ClusterIP of the UDP Service to web:5353
	victim    view.Conn
}

func TestPktmetaOnKubernetes(t *testing.T) {
	cfg := loadConfig(t)
	s := &suite{c: connect(t, cfg), ns: cfg.workloadNamespace}
	s.setup(t)
	t.Cleanup(func() { s.removeDaemonSet(t) })

	s.step(t, "1_install", false, s.install)
	s.step(t, "4_pods_from_before_the_install", true, s.existingPods)
	s.step(t, "2_identity_from_the_kubelet", true, s.identity)
	s.step(t, "3_services_through_kube-proxy", true, s.services)
	s.step(t, "10_across_nodes_from_the_API", true, s.acrossNodes)
	s.step(t, "9_nothing_readable_or_forgeable_from_a_pod", true, s.untrusted)
	s.step(t, "7_primary_CNI_rewrites_its_config", true, s.conflistRewritten)
	s.step(t, "6_agent_killed_or_gone", true, s.agentGone)
	s.step(t, "5_rolling_update_under_traffic", true, s.rollingUpdate)
	s.step(t, "8_uninstall_and_install_again", true, s.uninstall)
}

// step runs one numbered check as a subtest. A failed step's agent log is
// attached to the failure.
func (s *suite) step(t *testing.T, name string, needsInstall bool, f func(t *testing.T)) {
	t.Run(name, func(t *testing.T) {
		if needsInstall && !s.installed {
			t.Skip("pktmeta was never installed (step 1 failed): this step needs it")
		}
		defer func() {
			if t.Failed() {
				t.Logf("agent pods: %s", s.c.agentSummary())
				logs := s.c.agentLogs(t.Context())
				if len(logs) > 8000 {
					logs = "..." + logs[len(logs)-8000:]
				}
				t.Logf("agent log:\n%s", logs)
			}
		}()
		f(t)
	})
}

// setup: the node probe, the primary CNI's config as it is before pktmeta,
// and workloads that exist before the install (step 4 looks at them).
func (s *suite) setup(t *testing.T) {
	s.probe = startNodeProbe(t, s.c)
	s.c.ensureNamespace(t, s.ns)

	if s.probe.file(t, pluginPath).Exists {
		t.Fatalf("%s exists: the suite needs a node without pktmeta (uninstall it first)", pluginPath)
	}
	dir := s.probe.file(t, cniConfDir)
	var confs []string
	for _, e := range dir.Entries {
		if strings.HasSuffix(e, ".conflist") || strings.HasSuffix(e, ".conf") || strings.HasSuffix(e, ".json") {
			confs = append(confs, e)
		}
	}
	sort.Strings(confs)
	if len(confs) == 0 {
		t.Fatalf("no CNI config in %s: %v", cniConfDir, dir.Entries)
	}
	// The runtime uses the first file in lexical order; so does pktmeta.
	s.conflist = cniConfDir + "/" + confs[0]
	f := s.probe.file(t, s.conflist)
	if len(f.Content) == 0 || bytes.Contains(f.Content, []byte(`"pktmeta"`)) {
		t.Fatalf("%s: %q: want the primary CNI's config without pktmeta", s.conflist, f.Content)
	}
	s.originalConflist = f.Content

	web := s.c.runPod(t, s.ns, podSpec{name: "early-web", args: []string{"serve", "--tcp", ":8080"}})
	s.c.runPod(t, s.ns, podSpec{
		name:        "early-client",
		args:        []string{"dial", "--tcp", net.JoinHostPort(web.Status.PodIP, "8080"), "--every", "2s"},
		labels:      map[string]string{"app.kubernetes.io/name": "early-client"},
		annotations: map[string]string{"pktmeta.dev/team": "early"},
	})
}

// 1. The DaemonSet becomes Ready; the conflist gains exactly one pktmeta
// entry, last; the plugin binary is installed.
func (s *suite) install(t *testing.T) {
	if out, err := s.c.kubectl(t.Context(), "apply", "-k", s.c.overlay(t, s.c.cfg.image)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	s.c.waitRolledOut(t, 3*time.Minute)
	poll(t, "pktmeta chained into "+s.conflist, time.Minute, func() error {
		return chainedOnce(s.originalConflist, s.probe.file(t, s.conflist).Content)
	})
	p := s.probe.file(t, pluginPath)
	if !p.Exists || p.SHA256 != s.c.cfg.pluginSHA || !executable(p.Mode) {
		t.Fatalf("plugin on the node: %+v, want the image's (sha256 %s), executable", p, s.c.cfg.pluginSHA)
	}
	if st := s.probe.status(t); !st.Current {
		t.Fatalf("datapath: %+v, want this build's", st)
	}
	s.installed = true
}

// chainedOnce checks that chained is original with exactly one pktmeta
// entry appended, everything else as it was.
func chainedOnce(original, chained []byte) error {
	var o, c map[string]any
	if err := json.Unmarshal(original, &o); err != nil {
		return fmt.Errorf("original config: %w", err)
	}
	if err := json.Unmarshal(chained, &c); err != nil {
		return fmt.Errorf("config now: %w: %q", err, chained)
	}
	op, _ := o["plugins"].([]any)
	cp, _ := c["plugins"].([]any)
	if len(cp) != len(op)+1 {
		return fmt.Errorf("%d plugins, want the %d of the primary and pktmeta: %s", len(cp), len(op), chained)
	}
	if !reflect.DeepEqual(cp[:len(op)], op) {
		return fmt.Errorf("the primary's plugins changed: %s", chained)
	}
	last, _ := cp[len(op)].(map[string]any)
	if last["type"] != "pktmeta" {
		return fmt.Errorf("last plugin is %v, want pktmeta", last["type"])
	}
	delete(o, "plugins")
	delete(c, "plugins")
	if !reflect.DeepEqual(o, c) {
		return fmt.Errorf("top-level keys changed: %v, was %v", c, o)
	}
	return nil
}

func executable(mode string) bool {
	m, err := strconv.ParseUint(mode, 8, 32)
	return err == nil && m&0o111 == 0o111
}

// 4. Pods that existed before the install are covered with their full
// identity: the agent attaches them, and their new connections are tagged.
func (s *suite) existingPods(t *testing.T) {
	client := s.pod(t, "early-client")
	web := s.pod(t, "early-web")
	sandbox := s.probe.sandboxID(t, client)
	poll(t, "a new connection of early-client tagged with its full identity", 3*time.Minute, func() error {
		lines := s.c.events(t, s.ns, "early-client", "connected")
		if len(lines) == 0 {
			return fmt.Errorf("early-client made no connection: %v", s.c.events(t, s.ns, "early-client", "error"))
		}
		local := lines[len(lines)-1]["local"].(string)
		c, ok := findConn(s.probe.conns(t), "tcp", local, net.JoinHostPort(web.Status.PodIP, "8080"))
		if !ok {
			return fmt.Errorf("no record of %s yet (the agent covers existing pods every gcInterval)", local)
		}
		if err := sameOrigin(c, client, sandbox); err != nil {
			return err
		}
		if c.Peer == nil || c.Peer.Pod != "early-web" {
			return fmt.Errorf("peer %s, want early-web", c.Peer.Name())
		}
		return nil
	})
}

// sameOrigin checks a record's origin against the pod and the sandbox id
// the runtime reports.
func sameOrigin(c view.Conn, pod *corev1.Pod, sandbox string) error {
	o := c.Origin
	if o == nil || o.Namespace != pod.Namespace || o.Pod != pod.Name || o.UID != string(pod.UID) || o.ContainerID != sandbox {
		return fmt.Errorf("origin %s, want %s/%s uid %s sandbox %s", describe(o), pod.Namespace, pod.Name, pod.UID, sandbox)
	}
	return nil
}

// 2. Pods the kubelet creates get their identity from its real CNI_ARGS
// (namespace, name, UID, sandbox id); annotation tags arrive through
// containerd's capability, label tags through the API server.
func (s *suite) identity(t *testing.T) {
	s.web = s.c.runPod(t, s.ns, podSpec{
		name:   "web",
		args:   []string{"serve", "--tcp", ":8080", "--udp", ":5353"},
		labels: map[string]string{"app.kubernetes.io/name": "web"},
	})
	client := s.c.runPod(t, s.ns, podSpec{
		name:        "client",
		args:        []string{"dial", "--tcp", s.webAddr(t, 8080), "--count", "1"},
		labels:      map[string]string{"app.kubernetes.io/name": "client", "app.kubernetes.io/component": "frontend"},
		annotations: map[string]string{"pktmeta.dev/team": "payments"},
	})
	local := s.c.waitEvent(t, s.ns, "client", "connected", 1)[0]["local"].(string)
	sandbox := s.probe.sandboxID(t, client)
	poll(t, "client's connection tagged with what the kubelet and the API server say", 2*time.Minute, func() error {
		c, ok := findConn(s.probe.conns(t), "tcp", local, s.webAddr(t, 8080))
		if !ok {
			return errNotYet
		}
		if err := sameOrigin(c, client, sandbox); err != nil {
			return err
		}
		want := map[string]string{"team": "payments", "app.kubernetes.io/name": "client", "app.kubernetes.io/component": "frontend"}
		if !reflect.DeepEqual(c.PodTags, want) {
			return fmt.Errorf("pod tags %v, want %v (annotation through containerd, labels through the API)", c.PodTags, want)
		}
		if len(c.Tags) != 0 {
			return fmt.Errorf("operator tags %v, want none (deploy/ sets none)", c.Tags)
		}
		if c.Peer == nil || c.Peer.Pod != "web" || c.Peer.UID != string(s.web.UID) || c.NAT {
			return fmt.Errorf("peer %s nat %v, want web without NAT", describe(c.Peer), c.NAT)
		}
		s.victim = c
		return nil
	})
	// And web itself, an ordinary process in its pod, asked its accepted
	// socket (getsockopt SOL_PKTMETA): the same answer.
	// Label tags come from the API through the agent, maybe after web
	// accepted: they may be missing from its answer, never wrong.
	s.wantAsked(t, "accept", local, client, map[string]string{"team": "payments", "app.kubernetes.io/name": "client", "app.kubernetes.io/component": "frontend"}, []string{"team"}, false)
}

// wantAsked finds web's event (accept: TCP; datagram: UDP, on its
// unconnected socket right after the receive) for the connection from
// remote and checks what web's socket said about who opened it: pod tags
// among podTags, the keys of must among them.
func (s *suite) wantAsked(t *testing.T, event, remote string, client *corev1.Pod, podTags map[string]string, must []string, nat bool) {
	t.Helper()
	var origin map[string]any
	poll(t, "web logging what its socket said of the "+event+" from "+remote, time.Minute, func() error {
		for _, ev := range s.c.events(t, s.ns, "web", event) {
			if ev["remote"] == remote {
				origin, _ = ev["origin"].(map[string]any)
				return nil
			}
		}
		return errNotYet
	})
	got := fmt.Sprintf("%v", origin)
	if origin["err"] != nil || origin["namespace"] != client.Namespace || origin["pod"] != client.Name || origin["uid"] != string(client.UID) || origin["nat"] != nat {
		t.Fatalf("web's socket said %s; want %s/%s uid %s nat %v", got, client.Namespace, client.Name, client.UID, nat)
	}
	tags := map[string]string{}
	if pt, ok := origin["podTags"].(map[string]any); ok {
		for k, v := range pt {
			tags[k], _ = v.(string)
		}
	}
	for k, v := range tags {
		if podTags[k] != v {
			t.Fatalf("web's socket said pod tags %v, want %v", tags, podTags)
		}
	}
	for _, k := range must {
		if tags[k] != podTags[k] {
			t.Fatalf("web's socket said pod tags %v, want %s=%s among them", tags, k, podTags[k])
		}
	}
}

// webAddr is the address of step 2's web pod; a step that needs it skips
// when step 2 failed to start it (step 2's failure fails the run).
func (s *suite) webAddr(t *testing.T, port int) string {
	t.Helper()
	if s.web == nil {
		t.Skip("step 2's web pod does not exist (step 2 failed): this step needs it")
	}
	return net.JoinHostPort(s.web.Status.PodIP, strconv.Itoa(port))
}

// 3. Through kube-proxy's Service DNAT: the record is found at the server
// with the client's identity and nat: true, for TCP and for a UDP
// (DNS-like) Service.
func (s *suite) services(t *testing.T) {
	s.webSvc = s.service(t, "web-tcp", corev1.ProtocolTCP, 80, 8080)
	s.dnsSvc = s.service(t, "web-dns", corev1.ProtocolUDP, 53, 5353)

	t.Run("tcp", func(t *testing.T) {
		pod := s.c.runPod(t, s.ns, podSpec{name: "svc-tcp", args: []string{"dial", "--tcp", net.JoinHostPort(s.webSvc, "80"), "--count", "1", "--every", "1s"}})
		local := s.c.waitEvent(t, s.ns, pod.Name, "connected", 1)[0]["local"].(string)
		s.wantNAT(t, "tcp", pod, local, net.JoinHostPort(s.webSvc, "80"), s.webAddr(t, 8080))
		s.wantAsked(t, "accept", local, pod, map[string]string{}, nil, true)
	})
	t.Run("udp", func(t *testing.T) {
		pod := s.c.runPod(t, s.ns, podSpec{name: "svc-udp", args: []string{"udp", "--addr", net.JoinHostPort(s.dnsSvc, "53"), "--count", "3", "--every", "1s", "--hold", "-1s"}})
		local := s.c.waitEvent(t, s.ns, pod.Name, "answered", 1)[0]["local"].(string)
		s.wantNAT(t, "udp", pod, local, net.JoinHostPort(s.dnsSvc, "53"), s.webAddr(t, 5353))
		s.wantAsked(t, "datagram", local, pod, map[string]string{}, nil, true)
	})
}

// service creates a ClusterIP Service to web and waits for its endpoint.
func (s *suite) service(t *testing.T, name string, proto corev1.Protocol, port, target int32) string {
	t.Helper()
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: s.ns},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"pktmeta.test/pod": "web"},
			Ports:    []corev1.ServicePort{{Protocol: proto, Port: port, TargetPort: intstr.FromInt32(target)}},
		},
	}
	got, err := s.c.client.CoreV1().Services(s.ns).Create(ctxT(t), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s: %v", name, err)
	}
	poll(t, "service "+name+" has a ready endpoint", time.Minute, func() error {
		l, err := s.c.client.DiscoveryV1().EndpointSlices(s.ns).List(ctxT(t), metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + name})
		if err != nil {
			return err
		}
		for _, sl := range l.Items {
			for _, e := range sl.Endpoints {
				if e.Conditions.Ready != nil && *e.Conditions.Ready {
					return nil
				}
			}
		}
		return errNotYet
	})
	return got.Spec.ClusterIP
}

// wantNAT waits for the record of a connection to a Service: the origin's
// identity, delivered to web, the tuple web saw, nat: true.
func (s *suite) wantNAT(t *testing.T, proto string, pod *corev1.Pod, local, svc, backend string) {
	t.Helper()
	sandbox := s.probe.sandboxID(t, pod)
	poll(t, proto+" connection through the Service resolved at web", 2*time.Minute, func() error {
		c, ok := findConn(s.probe.conns(t), proto, local, svc)
		if !ok {
			return errNotYet
		}
		if err := sameOrigin(c, pod, sandbox); err != nil {
			return err
		}
		if !c.NAT || c.Seen == nil || c.Seen.Dst != backend || c.Peer == nil || c.Peer.Pod != "web" {
			return fmt.Errorf("record %s: want delivered to web at %s with nat: true", describe(c), backend)
		}
		return nil
	})
}

// 9. What a cluster can show of the trust guarantees: /metrics is not
// readable from an ordinary pod, and a pod's forged packets change nothing.
func (s *suite) untrusted(t *testing.T) {
	t.Run("metrics", func(t *testing.T) {
		onNode := s.c.httpGet(t, s.probe.ns, s.probe.name, metricsURL)
		if !onNode.OK || !strings.Contains(onNode.Body, "pktmeta_") {
			t.Fatalf("the node itself cannot read %s: %+v", metricsURL, onNode)
		}
		for _, url := range []string{"http://" + net.JoinHostPort(s.c.nodeIP(t), "9964") + "/metrics", metricsURL} {
			if r := s.c.httpGet(t, s.ns, "web", url); r.OK || r.Status != 0 {
				t.Errorf("an ordinary pod read %s: %+v", url, r)
			}
		}
	})
	t.Run("forgery", func(t *testing.T) {
		if s.victim.ConnID == 0 {
			t.Skip("no victim connection: step 2 failed")
		}
		attacker := s.c.runPod(t, s.ns, podSpec{name: "attacker", args: []string{"sleep"}})
		v := s.victim
		fresh := net.JoinHostPort(mustHost(t, v.Src), "40999") // a tuple the victim may use later
		for _, f := range []struct{ kind, src, dst string }{
			{"syn", v.Src, v.Dst}, // re-attribute: a new ISN on the live tuple
			{"rst", v.Src, v.Dst}, // delete it from the origin's side
			{"rst", v.Dst, v.Src}, // and from the server's
			{"fin", v.Src, v.Dst}, // a FIN pair
			{"fin", v.Dst, v.Src}, //
			{"syn", fresh, v.Dst}, // pre-plant the victim's next tuple
			{"rst", fresh, v.Dst}, //
			{"syn", v.Src, "10.96.0.1:443"},
		} {
			out, err := s.c.exec(ctxT(t), s.ns, attacker.Name, nil, "e2etool", "forge", "--kind", f.kind, "--src", f.src, "--dst", f.dst, "--count", "3")
			if err != nil {
				t.Fatalf("forge %s %s -> %s: %v %s", f.kind, f.src, f.dst, err, out)
			}
		}
		poll(t, "the attacker's forgeries counted against it", time.Minute, func() error {
			for _, a := range s.probe.status(t).Attachments {
				if a.Pod == "attacker" && a.Namespace == s.ns {
					if a.Spoofed == 0 {
						return fmt.Errorf("attacker's spoofed count is 0")
					}
					return nil
				}
			}
			return fmt.Errorf("no attachment for the attacker")
		})
		conns := s.probe.conns(t)
		c, ok := findConn(conns, "tcp", v.Src, v.Dst)
		if !ok || c.ConnID != v.ConnID || c.Origin == nil || c.Origin.Pod != "client" || c.Peer == nil || c.Peer.Pod != "web" {
			t.Fatalf("the victim's record after the forgeries: %s (found %v), want it unchanged: %s", describe(c), ok, describe(v))
		}
		if c, ok := findConn(conns, "tcp", fresh, v.Dst); ok {
			t.Fatalf("a forged SYN planted a record: %s", describe(c))
		}
		for _, c := range conns {
			if c.Origin != nil && c.Origin.Pod == "attacker" {
				t.Fatalf("a record names the attacker as origin: %s", describe(c))
			}
		}
	})
}

func mustHost(t *testing.T, hostport string) string {
	t.Helper()
	h, _, err := net.SplitHostPort(hostport)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// 7. The primary CNI rewrites its config without pktmeta (as kindnet
// rewrites its own file): the agent puts the entry back, and new pods are
// tagged.
func (s *suite) conflistRewritten(t *testing.T) {
	s.probe.write(t, s.conflist, s.originalConflist)
	poll(t, "pktmeta back in "+s.conflist, 2*time.Minute, func() error {
		return chainedOnce(s.originalConflist, s.probe.file(t, s.conflist).Content)
	})
	s.newPodTagged(t, "after-rewrite")
}

// newPodTagged starts a pod that connects to web once and waits until that
// connection's record names it.
func (s *suite) newPodTagged(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	pod := s.c.runPod(t, s.ns, podSpec{name: name, args: []string{"dial", "--tcp", s.webAddr(t, 8080), "--count", "1"}})
	local := s.c.waitEvent(t, s.ns, name, "connected", 1)[0]["local"].(string)
	sandbox := s.probe.sandboxID(t, pod)
	poll(t, name+"'s connection tagged", 2*time.Minute, func() error {
		c, ok := findConn(s.probe.conns(t), "tcp", local, s.webAddr(t, 8080))
		if !ok {
			return errNotYet
		}
		return sameOrigin(c, pod, sandbox)
	})
	return pod
}

// nodeState is what an agent restart must leave alone.
type nodeState struct {
	conflist    []byte
	pluginInode uint64
	pluginSHA   string
	hooks       map[string][2]uint32 // iface -> pktmeta program on ingress, egress
	idLeases    []string             // the node id Leases the node holds
}

func (s *suite) nodeState(t *testing.T) nodeState {
	t.Helper()
	p := s.probe.file(t, pluginPath)
	st := nodeState{conflist: s.probe.file(t, s.conflist).Content, pluginInode: p.Inode, pluginSHA: p.SHA256, hooks: map[string][2]uint32{},
		idLeases: s.nodeLeases(t, s.nodeName(t))}
	for name, h := range s.probe.hooks(t) {
		in, okIn := pktmetaHook(h.Ingress)
		eg, okEg := pktmetaHook(h.Egress)
		if okIn || okEg {
			st.hooks[name] = [2]uint32{in.Prog, eg.Prog}
		}
	}
	return st
}

// sameNode checks that a restarted agent reinstalled, reloaded and
// re-attached nothing: same config bytes, same plugin file, same programs
// on every hook that still exists.
func (s *suite) sameNode(t *testing.T, before nodeState) {
	t.Helper()
	after := s.nodeState(t)
	if !bytes.Equal(after.conflist, before.conflist) {
		t.Errorf("the CNI config changed across the agent restart:\n%s\nwas\n%s", after.conflist, before.conflist)
	}
	if after.pluginInode != before.pluginInode || after.pluginSHA != before.pluginSHA {
		t.Errorf("the plugin binary was replaced across the restart: inode %d sha %s, was %d %s", after.pluginInode, after.pluginSHA, before.pluginInode, before.pluginSHA)
	}
	for name, h := range before.hooks {
		if a, ok := after.hooks[name]; ok && a != h {
			t.Errorf("%s: programs %v, were %v: the restart moved them", name, a, h)
		}
	}
	// The node keeps its id: a restarted agent finds its Lease and
	// claims no other.
	if !slices.Equal(after.idLeases, before.idLeases) || len(before.idLeases) != 1 {
		t.Errorf("node id Leases %v, were %v: want the one id kept across the restart", after.idLeases, before.idLeases)
	}
}

// 6. The agent killed with SIGKILL, deleted, or gone from the node:
// tagging of new pods and connections goes on without it, and its
// replacement picks up where it stopped.
func (s *suite) agentGone(t *testing.T) {
	t.Run("SIGKILL", func(t *testing.T) {
		before := s.nodeState(t)
		agent := s.onlyAgent(t)
		restarts := containerRestarts(agent, "agent")
		var out struct {
			Pids []int `json:"pids"`
		}
		s.probe.run(t, &out, nil, "kill", "--cmdline-contains", "pktmeta-agent run", "--signal", "KILL")
		s.newPodTagged(t, "sigkill")
		poll(t, "the agent container restarted and ready", 3*time.Minute, func() error {
			p, err := s.c.client.CoreV1().Pods(agent.Namespace).Get(t.Context(), agent.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if containerRestarts(p, "agent") <= restarts || !podReady(p) {
				return fmt.Errorf("restarts %d (was %d), ready %v", containerRestarts(p, "agent"), restarts, podReady(p))
			}
			return nil
		})
		s.sameNode(t, before)
		s.agentCounts(t, "sigkill")
	})
	t.Run("deleted", func(t *testing.T) {
		before := s.nodeState(t)
		agent := s.onlyAgent(t)
		if err := s.c.client.CoreV1().Pods(agent.Namespace).Delete(t.Context(), agent.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// Once it is gone, so that it cannot have read the new pod's event.
		poll(t, "the deleted agent gone", 2*time.Minute, func() error {
			_, err := s.c.client.CoreV1().Pods(agent.Namespace).Get(t.Context(), agent.Name, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return nil
			}
			return fmt.Errorf("still there (%v)", err)
		})
		s.newPodTagged(t, "deleted")
		s.c.waitRolledOut(t, 3*time.Minute)
		if a := s.onlyAgent(t); a.UID == agent.UID {
			t.Fatalf("agent pod %s was not replaced", a.Name)
		}
		s.sameNode(t, before)
		s.agentCounts(t, "deleted")
	})
	t.Run("none_on_the_node", func(t *testing.T) {
		// A node selector nothing matches: the DaemonSet removes its pod
		// (SIGTERM, a deletion that is not the DaemonSet's own, so the
		// agent leaves pktmeta installed), and no agent runs.
		before := s.nodeState(t)
		s.patchDaemonSet(t, `{"spec":{"template":{"spec":{"nodeSelector":{"pktmeta.test/no-agent":"true"}}}}}`)
		poll(t, "no agent pod", 2*time.Minute, func() error {
			pods, err := s.c.agentPods(t.Context())
			if err != nil || len(pods) != 0 {
				return fmt.Errorf("%d agent pods (%v)", len(pods), err)
			}
			return nil
		})
		if err := chainedOnce(s.originalConflist, s.probe.file(t, s.conflist).Content); err != nil {
			t.Fatalf("an agent stopped by the DaemonSet (not deleted with it) uninstalled pktmeta: %v", err)
		}
		s.newPodTagged(t, "agentless")
		s.patchDaemonSet(t, `{"spec":{"template":{"spec":{"nodeSelector":{"pktmeta.test/no-agent":null}}}}}`)
		s.c.waitRolledOut(t, 3*time.Minute)
		s.sameNode(t, before)
		// The agent it left behind covers what happened meanwhile: the
		// pod created without an agent is in its view, with its identity.
		s.agentCounts(t, "agentless")
	})
}

func (s *suite) patchDaemonSet(t *testing.T, patch string) {
	t.Helper()
	_, err := s.c.client.AppsV1().DaemonSets(s.c.cfg.systemNamespace).Patch(t.Context(), "pktmeta", types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		t.Fatalf("patch DaemonSet %s: %v", patch, err)
	}
}

// agentCounts waits until the running agent's metrics count the
// connection the pod opened. The agent counts what it reads from the
// pinned ring buffer, and the pod connected after the previous agent
// stopped reading: either the new agent read it live, or it read the
// backlog the old one left, which is what picking up where it stopped
// means.
func (s *suite) agentCounts(t *testing.T, pod string) {
	t.Helper()
	want := fmt.Sprintf(`origin_namespace=%q,origin_workload=%q`, s.ns, pod)
	poll(t, "the agent's metrics count "+pod+"'s connection", 2*time.Minute, func() error {
		r := s.c.httpGet(t, s.probe.ns, s.probe.name, metricsURL)
		if !r.OK {
			return fmt.Errorf("metrics: %+v", r)
		}
		for _, l := range strings.Split(r.Body, "\n") {
			if strings.HasPrefix(l, "pktmeta_connections_opened_total{") && strings.Contains(l, want) {
				return nil
			}
		}
		return fmt.Errorf("no pktmeta_connections_opened_total{%s} yet", want)
	})
}

func (s *suite) onlyAgent(t *testing.T) *corev1.Pod {
	t.Helper()
	pods, err := s.c.agentPods(t.Context())
	if err != nil || len(pods) != 1 {
		t.Fatalf("want one agent pod, have %d (%v): %s", len(pods), err, s.c.agentSummary())
	}
	return &pods[0]
}

func containerRestarts(p *corev1.Pod, name string) int32 {
	for _, s := range p.Status.ContainerStatuses {
		if s.Name == name {
			return s.RestartCount
		}
	}
	return -1
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// 5. A rolling update to the next build (another version, the next
// datapath release) under traffic: a long-lived connection sending
// throughout and a new connection every second. No new connection goes
// untagged, the long-lived record survives, every hook keeps a pktmeta
// program at every sample (the links are updated in place), and the plugin
// binary is replaced atomically.
func (s *suite) rollingUpdate(t *testing.T) {
	if s.webSvc == "" {
		t.Skip("no Service: step 3 failed")
	}
	svc := net.JoinHostPort(s.webSvc, "80")
	stream := s.c.runPod(t, s.ns, podSpec{name: "stream", args: []string{"stream", "--tcp", svc, "--interval", "100ms"}})
	streamLocal := s.c.waitEvent(t, s.ns, stream.Name, "connected", 1)[0]["local"].(string)
	var long view.Conn
	poll(t, "the long-lived connection tagged", 2*time.Minute, func() error {
		c, ok := findConn(s.probe.conns(t), "tcp", streamLocal, svc)
		if !ok || c.Seen == nil {
			return errNotYet
		}
		long = c
		return nil
	})
	ticker := s.c.runPod(t, s.ns, podSpec{name: "ticker", args: []string{"dial", "--tcp", svc, "--every", "1s"}})
	s.c.waitEvent(t, s.ns, ticker.Name, "connected", 2)

	hooks := s.probe.startWatch(t, "hooks", "watch-hooks", "--every", "5ms")
	plugin := s.probe.startWatch(t, "plugin", "watch-file", pluginPath, "--exec", "--every", "2ms")
	if out, err := s.c.kubectl(t.Context(), "apply", "-k", s.c.overlay(t, s.c.cfg.nextImage)); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	s.c.waitRolledOut(t, 5*time.Minute)
	poll(t, "the next release's datapath and agent running", 2*time.Minute, func() error {
		st := s.probe.status(t)
		if strconv.Itoa(int(st.Release)) != s.c.cfg.nextRelease {
			return fmt.Errorf("datapath release %d, want %s", st.Release, s.c.cfg.nextRelease)
		}
		r := s.c.httpGet(t, s.probe.ns, s.probe.name, metricsURL)
		if want := fmt.Sprintf(`version=%q`, s.c.cfg.nextVersion); !strings.Contains(r.Body, want) {
			return fmt.Errorf("pktmeta_build_info has no %s yet", want)
		}
		return nil
	})
	rolledOut := len(s.c.events(t, s.ns, ticker.Name, "connected"))
	s.c.waitEvent(t, s.ns, ticker.Name, "connected", rolledOut+3) // traffic after the update too

	var hs struct {
		Samples int `json:"samples"`
		Ifaces  map[string]struct {
			Samples      int      `json:"samples"`
			EmptyIngress int      `json:"emptyIngress"`
			EmptyEgress  int      `json:"emptyEgress"`
			IngressProgs []uint32 `json:"ingressProgs"`
			EgressProgs  []uint32 `json:"egressProgs"`
			IngressLinks []uint32 `json:"ingressLinks"`
			EgressLinks  []uint32 `json:"egressLinks"`
		} `json:"ifaces"`
	}
	hooks.stop(t, &hs)
	var fs struct {
		Samples  int `json:"samples"`
		Missing  int `json:"missing"`
		Versions []struct {
			SHA256 string `json:"sha256"`
			Inode  uint64 `json:"inode"`
			Count  int    `json:"count"`
		} `json:"versions"`
		ExecFailures int      `json:"execFailures"`
		ExecErrors   []string `json:"execErrors"`
	}
	plugin.stop(t, &fs)

	t.Run("hooks_never_empty", func(t *testing.T) {
		moved := 0
		for name, h := range hs.Ifaces {
			if h.EmptyIngress != 0 || h.EmptyEgress != 0 {
				t.Errorf("%s: %d of %d samples without pktmeta on ingress, %d on egress", name, h.EmptyIngress, h.Samples, h.EmptyEgress)
			}
			if len(h.IngressLinks) > 1 || len(h.EgressLinks) > 1 {
				t.Errorf("%s: links %v / %v: the update replaced a link instead of updating it", name, h.IngressLinks, h.EgressLinks)
			}
			if len(h.IngressProgs) > 1 && len(h.EgressProgs) > 1 {
				moved++
			}
		}
		if moved < 3 {
			t.Errorf("programs moved on %d veths, want every pod's (>= 3): %s", moved, describe(hs))
		}
		t.Logf("%d samples of %d veths; programs moved on %d", hs.Samples, len(hs.Ifaces), moved)
	})
	t.Run("plugin_replaced_atomically", func(t *testing.T) {
		seen := map[string]bool{}
		for _, v := range fs.Versions {
			if v.SHA256 != s.c.cfg.pluginSHA && v.SHA256 != s.c.cfg.nextSHA {
				t.Errorf("a reader saw a plugin file that is neither build: %+v", v)
			}
			seen[v.SHA256] = true
		}
		if fs.Missing != 0 || fs.ExecFailures != 0 {
			t.Errorf("%d of %d samples found no plugin, %d runs failed: %v", fs.Missing, fs.Samples, fs.ExecFailures, fs.ExecErrors)
		}
		if !seen[s.c.cfg.pluginSHA] || !seen[s.c.cfg.nextSHA] || fs.Versions[len(fs.Versions)-1].SHA256 != s.c.cfg.nextSHA {
			t.Errorf("versions seen %+v: want the old, then the new", fs.Versions)
		}
		t.Logf("%d samples: %+v", fs.Samples, fs.Versions)
	})
	t.Run("long-lived_connection_survived", func(t *testing.T) {
		if errs := s.c.events(t, s.ns, stream.Name, "error"); len(errs) > 0 {
			t.Fatalf("the long-lived connection failed: %v", errs)
		}
		c, ok := findConn(s.probe.conns(t), "tcp", streamLocal, svc)
		if !ok || c.ConnID != long.ConnID || c.Peer == nil || c.Peer.Pod != "web" {
			t.Fatalf("its record after the update: %s (found %v), was %s", describe(c), ok, describe(long))
		}
	})
	t.Run("no_connection_untagged", func(t *testing.T) {
		if errs := s.c.events(t, s.ns, ticker.Name, "error"); len(errs) > 0 {
			t.Errorf("connections failed during the update: %v", errs)
		}
		conns := s.probe.conns(t)
		lines := s.c.events(t, s.ns, ticker.Name, "connected")
		for _, l := range lines {
			local := l["local"].(string)
			c, ok := findConn(conns, "tcp", local, svc)
			if !ok || c.Origin == nil || c.Origin.Pod != "ticker" || !c.NAT || c.Peer == nil || c.Peer.Pod != "web" {
				t.Errorf("connection %v from %s: record %s (found %v)", l["n"], local, describe(c), ok)
			}
		}
		t.Logf("%d connections checked, %d of them after the rollout", len(lines), len(lines)-rolledOut)
	})
	s.newPodTagged(t, "after-update")
}

// 8. Deleting the DaemonSet uninstalls pktmeta: the CNI config byte for
// byte as it was, no plugin binary, no pins, no programs; new pods still
// start and talk. Installing again afterwards works.
func (s *suite) uninstall(t *testing.T) {
	if _, err := s.c.kubectl(t.Context(), "-n", s.c.cfg.systemNamespace, "delete", "daemonset", "pktmeta", "--wait", "--timeout=2m"); err != nil {
		t.Fatal(err)
	}
	poll(t, "no agent pod", 2*time.Minute, func() error {
		pods, err := s.c.agentPods(t.Context())
		if err != nil || len(pods) != 0 {
			return fmt.Errorf("%d agent pods (%v)", len(pods), err)
		}
		return nil
	})
	if got := s.probe.file(t, s.conflist).Content; !bytes.Equal(got, s.originalConflist) {
		t.Errorf("CNI config after uninstall:\n%s\nwant byte for byte:\n%s", got, s.originalConflist)
	}
	if f := s.probe.file(t, pluginPath); f.Exists {
		t.Errorf("plugin binary left behind: %+v", f)
	}
	if f := s.probe.file(t, pinPathNode); f.Exists {
		t.Errorf("pins left behind in %s: %v", pinPathNode, f.Entries)
	}
	for _, p := range s.probe.progs(t) {
		if strings.HasPrefix(p.Name, "pktmeta_") {
			t.Errorf("program left loaded: %+v", p)
		}
	}
	// The uplink too.
	for name, h := range s.probe.hooks(t) {
		if _, ok := pktmetaHook(h.Ingress); ok {
			t.Errorf("%s still has pktmeta on ingress", name)
		}
		if _, ok := pktmetaHook(h.Egress); ok {
			t.Errorf("%s still has pktmeta on egress", name)
		}
	}
	// A node without pktmeta holds no node id. The cluster key stays (it
	// is the cluster's, not the node's): the next install uses it again.
	node := s.nodeName(t)
	if ls := s.nodeLeases(t, node); len(ls) > 0 {
		t.Errorf("node id Leases %v still held by %s", ls, node)
	}
	key, err := s.c.client.CoreV1().Secrets(s.c.cfg.systemNamespace).Get(t.Context(), kubenode.KeySecret, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the cluster key after uninstall: %v", err)
	}
	// New pods start and talk without pktmeta.
	plain := s.c.runPod(t, s.ns, podSpec{name: "plain", args: []string{"dial", "--tcp", s.webAddr(t, 8080), "--count", "1"}})
	s.c.waitEvent(t, s.ns, plain.Name, "connected", 1)

	t.Run("install_again", func(t *testing.T) {
		if out, err := s.c.kubectl(t.Context(), "apply", "-k", s.c.overlay(t, s.c.cfg.nextImage)); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		s.c.waitRolledOut(t, 3*time.Minute)
		poll(t, "pktmeta chained again", time.Minute, func() error {
			return chainedOnce(s.originalConflist, s.probe.file(t, s.conflist).Content)
		})
		s.newPodTagged(t, "reinstalled")
		poll(t, "a node id again", time.Minute, func() error {
			if ls := s.nodeLeases(t, node); len(ls) != 1 {
				return fmt.Errorf("node id Leases %v", ls)
			}
			return nil
		})
		// The key was made once, by the first install, and kept.
		again, err := s.c.client.CoreV1().Secrets(s.c.cfg.systemNamespace).Get(t.Context(), kubenode.KeySecret, metav1.GetOptions{})
		if err != nil || again.UID != key.UID || !bytes.Equal(again.Data[kubenode.KeySecretField], key.Data[kubenode.KeySecretField]) {
			t.Errorf("the cluster key changed across the reinstall (%v)", err)
		}
	})
}

// removeDaemonSet uninstalls pktmeta at the end, whatever happened.
func (s *suite) removeDaemonSet(t *testing.T) {
	if _, err := s.c.daemonSet(t.Context()); err != nil {
		return
	}
	if out, err := s.c.kubectl(t.Context(), "-n", s.c.cfg.systemNamespace, "delete", "daemonset", "pktmeta", "--wait", "--timeout=2m"); err != nil {
		t.Logf("remove the DaemonSet: %v %s", err, out)
	}
}

func (s *suite) pod(t *testing.T, name string) *corev1.Pod {
	t.Helper()
	p, err := s.c.client.CoreV1().Pods(s.ns).Get(t.Context(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// findConn finds the record of a connection by the tuple its origin sent.
func findConn(conns []view.Conn, proto, src, dst string) (view.Conn, bool) {
	for _, c := range conns {
		if c.Proto == proto && c.Src == src && c.Dst == dst {
			return c, true
		}
	}
	return view.Conn{}, false
}
