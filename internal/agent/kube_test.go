package agent

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func agentWithKube(objs ...any) *Agent {
	cfg := Defaults()
	cfg.PodName, cfg.PodNamespace = "pktmeta-abcde", "pktmeta-system"
	a := New(cfg, quietLog(), io.Discard)
	var ros []any
	ros = append(ros, objs...)
	cs := fake.NewClientset()
	for _, o := range ros {
		switch v := o.(type) {
		case *corev1.Pod:
			cs.Tracker().Add(v)
		case *appsv1.DaemonSet:
			cs.Tracker().Add(v)
		}
	}
	a.kube = cs
	return a
}

func ownPod(_ string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: "pktmeta-abcde", Namespace: "pktmeta-system",
		OwnerReferences: []metav1.OwnerReference{{Kind: "DaemonSet", Name: "pktmeta", UID: "ds-1"}},
	}}
}

// Only a DaemonSet that is going away makes "auto" uninstall; a rolling
// update (DaemonSet still there) does not.
func TestDaemonSetGoing(t *testing.T) {
	ds := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "pktmeta", Namespace: "pktmeta-system", UID: "ds-1"}}
	if going, err := agentWithKube(ownPod("ds-1"), ds).daemonSetGoing(context.Background()); err != nil || going {
		t.Fatalf("DaemonSet present (rolling update): going=%v err=%v", going, err)
	}
	if going, err := agentWithKube(ownPod("ds-1")).daemonSetGoing(context.Background()); err != nil || !going {
		t.Fatalf("DaemonSet deleted: going=%v err=%v", going, err)
	}
	deleting := ds.DeepCopy()
	now := metav1.NewTime(time.Now())
	deleting.DeletionTimestamp = &now
	deleting.Finalizers = []string{"foregroundDeletion"}
	if going, err := agentWithKube(ownPod("ds-1"), deleting).daemonSetGoing(context.Background()); err != nil || !going {
		t.Fatalf("DaemonSet being deleted (foreground): going=%v err=%v", going, err)
	}
	recreated := ds.DeepCopy()
	recreated.UID = "ds-2"
	if going, err := agentWithKube(ownPod("ds-1"), recreated).daemonSetGoing(context.Background()); err != nil || !going {
		t.Fatalf("our DaemonSet replaced by another of the same name: going=%v err=%v", going, err)
	}
	a := New(Defaults(), quietLog(), io.Discard)
	if going, err := a.daemonSetGoing(context.Background()); err == nil || going {
		t.Fatal("without an API the agent must not decide to uninstall")
	}
}

// Pod labels named in labelTags become pod tags (claimed by whoever writes
// the pod, like annotations); static tags and annotations win over a label
// of the same key.
func TestApplyLabels(t *testing.T) {
	testutil.InNewNetns(t, func() {
		pin := testutil.PinPath(t)
		d, _, err := datapath.Open(datapath.Options{PinPath: pin, MaxConnections: 4096, Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "host0"}, PeerName: "pod0"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		l, err := netlink.LinkByName("host0")
		if err != nil {
			t.Fatal(err)
		}
		w := &datapath.Workload{Namespace: "shop", Pod: "web-0", UID: "u1", ContainerID: "c1", IfName: "eth0",
			HostIfName: "host0", HostIfindex: uint32(l.Attrs().Index),
			Tags: map[string]string{"cluster": "prod"}, PodTags: map[string]string{"team": "from-annotation"}}
		if err := d.Attach(w, datapath.AttachOptions{Mode: attach.Auto}); err != nil {
			t.Fatal(err)
		}
		d.Close() // applyLabels opens its own handle
		a := New(Defaults(), quietLog(), io.Discard)
		a.cfg.Plugin.Tags = map[string]string{"cluster": "prod"}
		a.cfg.LabelTags = []string{"app", "team", "tier"}
		a.applyLabels(pin, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-0", UID: "u1",
				Labels:      map[string]string{"app": "web", "team": "from-label", "unlisted": "x"},
				Annotations: map[string]string{"pktmeta.dev/team": "from-annotation"}},
		})
		r, err := datapath.OpenReader(pin)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		got, _, err := r.Workload(w.ID)
		if err != nil {
			t.Fatal(err)
		}
		if want := map[string]string{"cluster": "prod"}; !sameTags(got.Tags, want) {
			t.Fatalf("operator tags %v, want %v", got.Tags, want)
		}
		if want := map[string]string{"team": "from-annotation", "app": "web"}; !sameTags(got.PodTags, want) {
			t.Fatalf("pod tags %v, want %v", got.PodTags, want)
		}
		// Another pod of the same name (recreated, new UID) is not this workload.
		a.applyLabels(pin, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web-0", UID: "u2", Labels: map[string]string{"tier": "x"}}})
		got, _, _ = r.Workload(w.ID)
		if _, ok := got.PodTags["tier"]; ok {
			t.Fatal("labels of another pod with the same name applied")
		}
	})
}
