// Package metrics exports what the datapath sees as Prometheus metrics.
//
// Datapath counters and map fill are read from the pinned maps at scrape
// time, so they are exact and cost nothing between scrapes. Connection
// counts by origin and destination come from the event stream and are
// labelled by namespace and workload, where a workload is the pod's owner
// (Deployment, StatefulSet, DaemonSet, Job name) rather than the pod: pods
// come and go, owners do not. The number of label sets is capped; beyond
// the cap, new ones are counted under workload="other".
package metrics

import (
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/version"
	"github.com/pktmeta/pktmeta/internal/view"
	"github.com/prometheus/client_golang/prometheus"
)

// DefaultMaxSeries caps the label sets of the per-workload counters.
const DefaultMaxSeries = 1000

// Metrics holds the agent's collectors.
type Metrics struct {
	Registry *prometheus.Registry

	opened    *prometheus.CounterVec
	remote    *prometheus.CounterVec
	delivered *prometheus.CounterVec
	closed    *prometheus.CounterVec
	events    *prometheus.CounterVec
	actions   *prometheus.CounterVec
	attachErr prometheus.Counter

	mu        sync.Mutex
	seen      map[string]bool
	maxSeries int
}

// New registers the collectors. d may be nil until the datapath is
// loaded; SetDatapath provides it.
func New(maxSeries int) *Metrics {
	if maxSeries <= 0 {
		maxSeries = DefaultMaxSeries
	}
	m := &Metrics{
		Registry:  prometheus.NewRegistry(),
		seen:      map[string]bool{},
		maxSeries: maxSeries,
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_connections_opened_total",
			Help: "Connections tagged at their origin, by origin namespace and workload.",
		}, []string{"origin_namespace", "origin_workload", "proto"}),
		remote: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_remote_connections_total",
			Help: "Connections pods on other nodes opened that arrived here with a trusted pktmeta option, by origin node, namespace and workload (origin_node is the node's name where this agent knows it, else node:<id>).",
		}, []string{"origin_node", "origin_namespace", "origin_workload", "proto"}),
		delivered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_connections_delivered_total",
			Help: "Connections whose origin was found at a destination pod on this node, by origin and destination namespace and workload; nat says whether it took a conntrack lookup (Service DNAT).",
		}, []string{"origin_namespace", "origin_workload", "peer_namespace", "peer_workload", "proto", "nat"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_connections_closed_total",
			Help: "TCP connections whose record was removed on FIN or RST.",
		}, []string{"reason"}),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_agent_events_total",
			Help: "Ring-buffer events the agent read, by type.",
		}, []string{"type"}),
		actions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pktmeta_agent_actions_total",
			Help: "Actions the agent took: install, repair (the CNI config lost our entry and got it back), backoff (another writer keeps rewriting it), uninstall, attach (an existing pod covered), gc (a gone pod removed), upgrade.",
		}, []string{"action"}),
		attachErr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "pktmeta_agent_attach_errors_total",
			Help: "Existing pods the agent failed to attach to.",
		}),
	}
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "pktmeta_build_info",
		Help:        "Always 1: the agent's build (version) and the BPF datapath release it loads.",
		ConstLabels: prometheus.Labels{"version": version.Version, "release": strconv.Itoa(datapath.Release)},
	})
	buildInfo.Set(1)
	m.Registry.MustRegister(m.opened, m.remote, m.delivered, m.closed, m.events, m.actions, m.attachErr, buildInfo)
	return m
}

// Action counts one agent action.
func (m *Metrics) Action(name string) { m.actions.WithLabelValues(name).Inc() }

// AttachError counts a failed attachment.
func (m *Metrics) AttachError() { m.attachErr.Inc() }

// Event accounts one decoded event.
func (m *Metrics) Event(ev view.Event) {
	m.events.WithLabelValues(ev.Event).Inc()
	switch ev.Event {
	case "opened":
		ns, wl := m.labels(ev.Origin)
		if ev.Origin != nil && ev.Origin.Remote {
			node := ev.Origin.Node
			if node == "" {
				node = "node:" + strconv.Itoa(int(ev.Origin.NodeID))
			}
			if !m.admit("r:" + node + "/" + ns + "/" + wl) {
				wl = "other"
			}
			m.remote.WithLabelValues(node, ns, wl, ev.Proto).Inc()
			return
		}
		if !m.admit("o:" + ns + "/" + wl) {
			wl = "other"
		}
		m.opened.WithLabelValues(ns, wl, ev.Proto).Inc()
	case "delivered":
		ons, owl := m.labels(ev.Origin)
		pns, pwl := m.labels(ev.Peer)
		key := ons + "/" + owl + ">" + pns + "/" + pwl
		if !m.admit("d:" + key) {
			owl, pwl = "other", "other"
		}
		m.delivered.WithLabelValues(ons, owl, pns, pwl, ev.Proto, strconv.FormatBool(ev.NAT)).Inc()
	case "closed":
		m.closed.WithLabelValues(ev.Reason).Inc()
	}
}

// admit reports whether a new label set fits under the cap.
func (m *Metrics) admit(key string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.seen[key] {
		return true
	}
	if len(m.seen) >= m.maxSeries {
		return false
	}
	m.seen[key] = true
	return true
}

func (m *Metrics) labels(w *view.Workload) (ns, workload string) {
	switch {
	case w == nil:
		return "", "none" // not a pod (the node, another node)
	case w.Unknown:
		return "", "unknown"
	case w.Pod == "":
		return w.Namespace, "unknown"
	}
	return w.Namespace, OwnerName(w.Pod)
}

var (
	// Deployment pods: <name>-<pod-template-hash>-<5 chars>.
	replicaSetPod = regexp.MustCompile(`^(.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$`)
	// DaemonSet/Job pods: <name>-<5 chars>; StatefulSet pods: <name>-<ordinal>.
	generatedPod = regexp.MustCompile(`^(.+)-([a-z0-9]{5}|[0-9]+)$`)
)

// OwnerName guesses a pod's workload from its generated name. With API
// access the agent can use owner references instead; this keeps metrics
// bounded without it.
func OwnerName(pod string) string {
	if m := replicaSetPod.FindStringSubmatch(pod); m != nil {
		return m[1]
	}
	if m := generatedPod.FindStringSubmatch(pod); m != nil {
		return m[1]
	}
	return pod
}

// DatapathCollector exports the datapath's counters and map fill, read at
// scrape time.
type DatapathCollector struct {
	mu sync.Mutex
	d  *datapath.Datapath
}

// SetDatapath points the collector at a datapath (nil: export nothing).
func (c *DatapathCollector) SetDatapath(d *datapath.Datapath) {
	c.mu.Lock()
	c.d = d
	c.mu.Unlock()
}

var (
	statDesc   = prometheus.NewDesc("pktmeta_datapath_total", "Datapath counters summed over CPUs (pktmeta_stats), by counter: "+statNames()+".", []string{"counter"}, nil)
	uplinkDesc = prometheus.NewDesc("pktmeta_uplink_total", "The uplink programs' counters (across nodes) summed over CPUs, by counter: "+fieldNames(datapath.RemoteStats{}.Fields())+".", []string{"counter"}, nil)
	fillDesc   = prometheus.NewDesc("pktmeta_map_entries", "Entries in a pinned map.", []string{"map"}, nil)
	maxDesc    = prometheus.NewDesc("pktmeta_map_max_entries", "Capacity of a pinned map.", []string{"map"}, nil)

	// Per pod: what the datapath counted against each pod on the node.
	// Labelled by pod, not owner, because these name a culprit; a node
	// has a bounded number of pods, and a pod's series go with it.
	podLabels      = []string{"namespace", "pod"}
	podRecordsDesc = prometheus.NewDesc("pktmeta_pod_records", "Records a pod opened that are in the connection table.", podLabels, nil)
	podBudgetDesc  = prometheus.NewDesc("pktmeta_pod_max_records", "Records a pod may hold at once (maxConnectionsPerPod).", podLabels, nil)
	podCounterDesc = prometheus.NewDesc("pktmeta_pod_refused_total", "What the datapath refused for a pod since it was added, by reason: spoofed (a source address not its own; never tagged), overBudget (first packets untagged at its budget), tableFull, notParty (changes to connections it is not a party to), eventsLimited (connections without events over eventsPerSecondPerPod).", append(podLabels, "reason"), nil)
)

// Describe implements prometheus.Collector.
func (c *DatapathCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- statDesc
	ch <- uplinkDesc
	ch <- fillDesc
	ch <- maxDesc
	ch <- podRecordsDesc
	ch <- podBudgetDesc
	ch <- podCounterDesc
}

// Collect implements prometheus.Collector.
func (c *DatapathCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	d := c.d
	c.mu.Unlock()
	if d == nil {
		return
	}
	if s, err := d.ReadStats(); err == nil {
		for _, f := range s.Fields() {
			ch <- prometheus.MustNewConstMetric(statDesc, prometheus.CounterValue, float64(f.Value), f.Name)
		}
	}
	if s, err := d.ReadRemoteStats(); err == nil {
		for _, f := range s.Fields() {
			ch <- prometheus.MustNewConstMetric(uplinkDesc, prometheus.CounterValue, float64(f.Value), f.Name)
		}
	}
	for _, m := range d.MapFill() {
		ch <- prometheus.MustNewConstMetric(fillDesc, prometheus.GaugeValue, float64(m.Entries), m.Name)
		ch <- prometheus.MustNewConstMetric(maxDesc, prometheus.GaugeValue, float64(m.Max), m.Name)
	}
	collectPods(d, ch)
}

// collectPods exports each pod's counters from its endpoint. Two
// interfaces of one pod add up.
func collectPods(d *datapath.Datapath, ch chan<- prometheus.Metric) {
	eps, err := d.ListEndpoints()
	if err != nil {
		return
	}
	ws, err := d.Workloads()
	if err != nil {
		return
	}
	byID := make(map[uint32]datapath.Workload, len(ws))
	for _, w := range ws {
		byID[w.ID] = w
	}
	type key struct{ ns, pod string }
	type sums struct {
		live, max                                           float64
		spoofed, overBudget, tableFull, notParty, evLimited float64
	}
	agg := map[key]*sums{}
	for _, ep := range eps {
		w, ok := byID[ep.Workload]
		if !ok {
			continue
		}
		k := key{w.Namespace, w.Pod}
		if w.Pod == "" {
			k = key{"", "container:" + w.ContainerID}
		}
		s := agg[k]
		if s == nil {
			s = &sums{}
			agg[k] = s
		}
		s.live += float64(ep.Live)
		s.max += float64(ep.MaxConnections)
		s.spoofed += float64(ep.Spoofed)
		s.overBudget += float64(ep.OverBudget)
		s.tableFull += float64(ep.TableFull)
		s.notParty += float64(ep.NotParty)
		s.evLimited += float64(ep.EventsLimited)
	}
	for k, s := range agg {
		ch <- prometheus.MustNewConstMetric(podRecordsDesc, prometheus.GaugeValue, s.live, k.ns, k.pod)
		ch <- prometheus.MustNewConstMetric(podBudgetDesc, prometheus.GaugeValue, s.max, k.ns, k.pod)
		for _, r := range []struct {
			reason string
			v      float64
		}{{"spoofed", s.spoofed}, {"overBudget", s.overBudget}, {"tableFull", s.tableFull}, {"notParty", s.notParty}, {"eventsLimited", s.evLimited}} {
			ch <- prometheus.MustNewConstMetric(podCounterDesc, prometheus.CounterValue, r.v, k.ns, k.pod, r.reason)
		}
	}
}

// statNames lists the counters for the help text, from the same fields
// the collector exports, so that the two cannot disagree.
func statNames() string { return fieldNames(datapath.Stats{}.Fields()) }

func fieldNames(fs []datapath.StatField) string {
	var names []string
	for _, f := range fs {
		names = append(names, f.Name)
	}
	return strings.Join(names, ", ")
}
