package metrics

import (
	"strings"
	"testing"

	"github.com/pktmeta/pktmeta/internal/view"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestOwnerName(t *testing.T) {
	for pod, want := range map[string]string{
		"web-7d9f8c6b5-x2x4k": "web",     // Deployment
		"db-0":                "db",      // StatefulSet
		"fluentd-8fzqk":       "fluentd", // DaemonSet
		"standalone":          "standalone",
		"api-server-v2-abcde": "api-server-v2",
	} {
		if got := OwnerName(pod); got != want {
			t.Errorf("OwnerName(%q) = %q, want %q", pod, got, want)
		}
	}
}

func TestEventLabelsAreCapped(t *testing.T) {
	m := New(3)
	for i := range 10 {
		m.Event(view.Event{Event: "opened", Proto: "tcp", Origin: &view.Workload{Namespace: "ns", Pod: "pod" + strings.Repeat("x", i)}})
	}
	if n := testutil.CollectAndCount(m.opened); n != 4 {
		t.Fatalf("%d series, want 3 admitted and one \"other\"", n)
	}
	if v := testutil.ToFloat64(m.opened.WithLabelValues("ns", "other", "tcp")); v != 7 {
		t.Fatalf("other = %v, want 7", v)
	}
	m.Event(view.Event{Event: "delivered", Proto: "udp", NAT: true, Origin: &view.Workload{Namespace: "a", Pod: "web-0"}})
	if v := testutil.ToFloat64(m.delivered.WithLabelValues("a", "other", "", "other", "udp", "true")); v != 1 {
		t.Fatalf("capped delivery not counted under other: %v", v)
	}
}

// A connection another node's pod opened counts under its node, not with
// this node's own openings, and the labels stay capped.
func TestRemoteOriginsCountByNode(t *testing.T) {
	m := New(2)
	m.Event(view.Event{Event: "opened", Proto: "tcp", Origin: &view.Workload{Remote: true, NodeID: 3, Node: "node-3", Namespace: "a", Pod: "web-7d9f8c6b5-x2x4k"}})
	m.Event(view.Event{Event: "opened", Proto: "tcp", Origin: &view.Workload{Remote: true, NodeID: 4, Unknown: true}})
	m.Event(view.Event{Event: "opened", Proto: "tcp", Origin: &view.Workload{Remote: true, NodeID: 5, Namespace: "b", Pod: "db-0"}})
	if v := testutil.ToFloat64(m.remote.WithLabelValues("node-3", "a", "web", "tcp")); v != 1 {
		t.Fatalf("node-3 = %v", v)
	}
	if v := testutil.ToFloat64(m.remote.WithLabelValues("node:4", "", "unknown", "tcp")); v != 1 {
		t.Fatalf("node:4 = %v", v)
	}
	if v := testutil.ToFloat64(m.remote.WithLabelValues("node:5", "b", "other", "tcp")); v != 1 {
		t.Fatalf("over the cap: %v", v)
	}
	if n := testutil.CollectAndCount(m.opened); n != 0 {
		t.Fatalf("remote origins counted as local openings: %d series", n)
	}
}
