// Package agent is pktmeta's node agent. The datapath does not need it:
// tagging runs from pinned programs whether the agent runs or not. The
// agent installs the plugin into the node's CNI chain and keeps it there,
// owns loading and upgrading the datapath, covers pods that existed before
// pktmeta, removes what their deletion left, and exports what the datapath
// sees: events as JSON lines, Prometheus metrics, a lookup API.
package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pktmeta/pktmeta/internal/api"
	"github.com/pktmeta/pktmeta/internal/cluster"
	"github.com/pktmeta/pktmeta/internal/cniconf"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/kubenode"
	"github.com/pktmeta/pktmeta/internal/metrics"
	"github.com/pktmeta/pktmeta/internal/view"
	"k8s.io/client-go/kubernetes"
)

// Agent runs on one node.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	events io.Writer // JSON lines, one per datapath event

	metrics *metrics.Metrics
	dpStats *metrics.DatapathCollector

	mu   sync.Mutex
	d    *datapath.Datapath
	kube kubernetes.Interface // nil without API access

	// remote names remote origins (Config.ClusterFile); nil without one.
	remote view.Remote

	datapathReady atomic.Bool
	installed     atomic.Bool

	// unattached remembers pod veths seen without an attachment, by
	// ifindex (reconcileLoop's goroutine only).
	unattached map[int]sighting
}

// New returns an agent; Run starts it.
func New(cfg Config, log *slog.Logger, events io.Writer) *Agent {
	a := &Agent{cfg: cfg, log: log, events: events, metrics: metrics.New(cfg.MaxSeries), dpStats: &metrics.DatapathCollector{}, unattached: map[int]sighting{}}
	a.metrics.Registry.MustRegister(a.dpStats)
	return a
}

// Run runs until ctx ends, then decides whether to uninstall (see
// Config.UninstallOnExit).
func (a *Agent) Run(ctx context.Context) error {
	if err := a.cfg.Validate(); err != nil {
		return err
	}
	srvErr := make(chan error, 2)
	metricsSrv, err := a.serveMetrics(srvErr)
	if err != nil {
		return err
	}
	defer metricsSrv.Close()

	if err := EnsureBPFFS(filepath.Dir(a.cfg.Plugin.PinPath), a.log); err != nil {
		return err
	}
	// The new plugin binary first: once the datapath is upgraded, the old
	// binary's ADDs would be refused as a downgrade until installLoop got
	// to it. (installLoop repeats this and reports failures.)
	if a.cfg.PluginBinary != "" {
		if _, err := cniconf.InstallBinary(a.cfg.PluginBinary, a.cfg.CNIBinDir, a.log); err != nil {
			a.log.Warn("plugin binary not installed yet", "err", err)
		}
	}
	// Load or upgrade the datapath (completing whatever a killed process
	// left), then let go of the lock: the agent's long-lived handle is a
	// reader, and each reconcile pass takes the lock for itself, so the
	// agent never holds up an ADD or an upgrade.
	w, res, err := datapath.Open(datapath.Options{PinPath: a.cfg.Plugin.PinPath, MaxConnections: a.cfg.Plugin.MaxConnections, Log: a.log})
	if err != nil {
		return fmt.Errorf("datapath: %w", err)
	}
	a.attachApps(w)
	w.Close()
	if res.Loaded && !res.Created {
		a.metrics.Action("upgrade")
		a.log.Info("datapath upgraded", "attachments", res.Upgraded, "previous", res.Previous, "repaired", res.Repaired)
	}
	d, err := datapath.OpenReader(a.cfg.Plugin.PinPath)
	if err != nil {
		return fmt.Errorf("datapath: %w", err)
	}
	defer d.Close()
	a.mu.Lock()
	a.d = d
	a.mu.Unlock()
	a.dpStats.SetDatapath(d)
	a.datapathReady.Store(true)

	apiSrv := api.NewServer(d, a.log)
	var cross *crossNode
	a.mu.Lock()
	a.kube = a.kubeClient()
	a.mu.Unlock()
	switch {
	case a.cfg.CrossNode.Mode != CrossNodeKubernetes:
	case a.kube == nil:
		// Like label tags: the same-node datapath needs no API.
		a.log.Warn("crossNode.mode kubernetes without a Kubernetes API (in-cluster or kubeconfig): origins are not carried across nodes")
	default:
		cross = &crossNode{c: kubenode.New(a.kube, a.cfg.CrossNode.namespace(&a.cfg), a.cfg.NodeName, a.log)}
		a.remote = cross.c
		apiSrv.Remote = a.remote
	}
	if a.cfg.ClusterFile != "" {
		// Validate loaded it once already.
		f, err := cluster.Load(a.cfg.ClusterFile)
		if err != nil {
			return err
		}
		a.remote = cluster.NewDirectory(f)
		apiSrv.Remote = a.remote
	}
	var wg sync.WaitGroup
	runCtx, stop := context.WithCancel(ctx)
	defer func() {
		stop()
		wg.Wait()
	}()
	wg.Add(4)
	go func() {
		defer wg.Done()
		if err := apiSrv.Serve(runCtx, filepath.Join(a.cfg.RunDir, api.SocketName)); err != nil {
			srvErr <- fmt.Errorf("API: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		a.followEvents(runCtx, d, apiSrv)
	}()
	go func() {
		defer wg.Done()
		a.installLoop(runCtx)
	}()
	go func() {
		defer wg.Done()
		a.reconcileLoop(runCtx)
	}()
	if len(a.cfg.LabelTags) > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.kubeLoop(runCtx)
		}()
	}
	if cross != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.crossNodeLoop(runCtx, cross)
		}()
	}

	select {
	case <-ctx.Done():
	case err := <-srvErr:
		return err
	}
	stop()
	wg.Wait()
	return a.shutdown(d, cross)
}

// followEvents is the ring buffer's one reader: it prints each event as a
// JSON line, counts it, and hands it to API clients.
func (a *Agent) followEvents(ctx context.Context, d *datapath.Datapath, apiSrv *api.Server) {
	enc := json.NewEncoder(a.events)
	err := view.FollowEvents(ctx, d, a.remote, func(v view.Event) bool {
		enc.Encode(v)
		a.metrics.Event(v)
		apiSrv.Publish(v)
		return true
	})
	if err != nil {
		a.log.Error("events", "err", err)
	}
}

// reconcileLoop covers pods without an attachment and removes attachments
// whose pod is gone, at start and every GCInterval.
func (a *Agent) reconcileLoop(ctx context.Context) {
	t := time.NewTicker(a.cfg.GCInterval.Duration)
	defer t.Stop()
	for {
		if err := a.reconcile(ctx, a.cfg.Plugin.PinPath); err != nil {
			a.log.Warn("reconcile", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// attachApps puts the application interface (getsockopt SOL_PKTMETA) on
// the host's cgroup v2 root, as every ADD does, so that pods from before
// the install have it without waiting for a new pod. Failing only warns:
// tagging works without it, and the next ADD tries again.
func (a *Agent) attachApps(d *datapath.Datapath) {
	switch a.cfg.Plugin.ApplicationCgroup {
	case "":
	case "none":
		if err := d.DetachApps(); err != nil {
			a.log.Warn("applicationCgroup none: could not take the application interface off", "err", err)
		}
		return
	default:
		// A cgroup path of the host's, which the plugin (running on
		// the host) resolves on the next ADD.
		return
	}
	var root string
	var err error
	if a.cfg.HostCgroupDir != "" {
		root, err = datapath.CgroupRootAt(a.cfg.HostCgroupDir)
	} else {
		root, err = datapath.CgroupRoot()
	}
	if err == nil {
		udp := a.cfg.Plugin.ApplicationUDP == nil || *a.cfg.Plugin.ApplicationUDP
		err = d.AttachApps(root, udp)
	}
	if err != nil {
		a.log.Warn("applications cannot ask their sockets who opened their connections until the next pod is added", "err", err)
		return
	}
	a.log.Info("application interface on the cgroup v2 root", "cgroup", root)
}
