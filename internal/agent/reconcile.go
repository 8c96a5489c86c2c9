package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/discover"
	"github.com/pktmeta/pktmeta/plugin"
	"github.com/vishvananda/netlink"
)

// reconcile makes the attachments match the pods on the node: it attaches
// to pod veths that have none (pods from before install, or created while
// another writer had dropped pktmeta from the CNI config), removes
// attachments whose veth is gone (a DEL that never came), and runs
// CollectGarbage: the whole record sweep (idle UDP; closed, forgotten or
// half-open TCP; aliases) and orphaned link pins and endpoints.
func (a *Agent) reconcile(ctx context.Context, pinPath string) error {
	d, err := datapath.OpenExisting(pinPath, a.log)
	if err != nil {
		return err
	}
	defer d.Close()
	own, err := datapath.CurrentNetns()
	if err != nil {
		return err
	}
	var errs []error
	res, err := d.CollectGarbage(func(w datapath.Workload) bool { return a.vethAlive(w, own) })
	errs = append(errs, err)
	for range res.Attachments {
		a.metrics.Action("gc")
	}
	if res.Attachments+res.OrphanLinks+res.OrphanEndpoints+res.Netns+res.Sweep.Removed() > 0 {
		a.log.Info("reconcile removed", "attachments", res.Attachments, "orphanLinks", res.OrphanLinks,
			"orphanEndpoints", res.OrphanEndpoints, "netnsAddrs", res.Netns, "records", res.Sweep.Removed(), "aliases", res.Sweep.Aliases)
	}
	if res.Sweep.CTUnavailable {
		a.log.Debug("no conntrack kfuncs: TCP records are swept by age and handshake only")
	}
	if err := a.coverExisting(ctx, d); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// vethAlive reports whether w's host veth still exists. Workloads of
// another network namespace (a test node) are not ours to judge.
func (a *Agent) vethAlive(w datapath.Workload, own uint64) bool {
	if w.HostNetns != own {
		return true
	}
	if l, err := netlink.LinkByIndex(int(w.HostIfindex)); err == nil && l.Attrs().Name == w.HostIfName {
		return true
	}
	a.log.Info("pod veth gone without a CNI DEL; removing its attachment", "workload", w.ID, "pod", w.Namespace+"/"+w.Pod, "hostIfname", w.HostIfName)
	return false
}

// coverExisting attaches to pod veths that have no attachment.
func (a *Agent) coverExisting(ctx context.Context, d *datapath.Datapath) error {
	eps, err := d.ListEndpoints()
	if err != nil {
		return err
	}
	found, err := discover.Veths(discover.Options{NetnsDirs: a.cfg.NetnsDirs, ProcDir: a.cfg.ProcDir}, func(ifindex int) bool {
		_, ok := eps[uint32(ifindex)]
		return ok
	})
	if err != nil {
		return err
	}
	// A veth is only covered once it has stayed unattached for a whole
	// pass: a pod whose CNI ADD is still running (primary plugin done,
	// pktmeta next) must not be taken for an existing one.
	now := time.Now()
	seen := map[int]time.Time{}
	var pods []discover.PodInterface
	for _, p := range found {
		first, ok := a.unattached[p.HostIfindex]
		if !ok || first.name != p.HostIfName {
			first = sighting{name: p.HostIfName, at: now}
		}
		seen[p.HostIfindex] = first.at
		a.unattached[p.HostIfindex] = first
		if now.Sub(first.at) >= a.cfg.GCInterval.Duration {
			pods = append(pods, p)
		}
	}
	for ifindex := range a.unattached {
		if _, ok := seen[ifindex]; !ok {
			delete(a.unattached, ifindex)
		}
	}
	if len(pods) == 0 {
		return nil
	}
	sandboxes := a.sandboxes(ctx)
	own, err := datapath.CurrentNetns()
	if err != nil {
		return err
	}
	mode, _ := attach.ParseMode(a.cfg.Plugin.AttachMode)
	pc, err := a.cfg.Plugin.parsed()
	if err != nil {
		return err
	}
	// Addresses other pods already own: a pod cannot claim one of them.
	taken := map[netip.Addr]bool{}
	for _, ep := range eps {
		for _, addr := range ep.Addrs {
			taken[addr] = true
		}
	}
	var errs []error
	for _, p := range pods {
		w, sb, err := a.workloadFor(p, sandboxes, own)
		if err != nil {
			a.metrics.AttachError()
			errs = append(errs, err)
			continue
		}
		addrs := a.trustedAddrs(p, sb, taken)
		for _, addr := range addrs {
			taken[addr] = true
		}
		opts := datapath.AttachOptions{
			Mode:            mode,
			Strict:          pc.StrictSource,
			Addrs:           addrs,
			MaxConnections:  pc.MaxConnectionsPerPod,
			EventsPerSecond: pc.EventsPerSecond(),
		}
		if err := d.Attach(w, opts); err != nil {
			a.metrics.AttachError()
			errs = append(errs, fmt.Errorf("attach existing pod veth %s: %w", p.HostIfName, err))
			continue
		}
		a.metrics.Action("attach")
		a.log.Info("covered an existing pod", "workload", w.ID, "pod", w.Namespace+"/"+w.Pod, "hostIfname", w.HostIfName, "partial", w.Partial)
	}
	return errors.Join(errs...)
}

// workloadFor builds the identity of an existing pod: complete when the
// container runtime names the sandbox that owns the namespace, partial
// (known by its namespace file only) when it cannot.
func (a *Agent) workloadFor(p discover.PodInterface, sandboxes []discover.Sandbox, hostNetns uint64) (*datapath.Workload, *discover.Sandbox, error) {
	w := &datapath.Workload{
		IfName:      p.IfName,
		HostIfName:  p.HostIfName,
		HostIfindex: uint32(p.HostIfindex),
		HostNetns:   hostNetns,
		Netns:       p.NetnsPath,
		Created:     time.Now(),
	}
	var annotations map[string]string
	var sb *discover.Sandbox
	for i, s := range sandboxes {
		if s.NetnsIno != 0 && s.NetnsIno == p.NetnsIno {
			sb = &sandboxes[i]
			w.ContainerID, w.Namespace, w.Pod, w.UID = s.ID, s.Namespace, s.Name, s.UID
			annotations = s.Annotations
			if s.NetnsPath != "" {
				w.Netns = s.NetnsPath
			}
			break
		}
	}
	if w.ContainerID == "" {
		// Never a real CNI container id, so no CNI DEL will ever name it:
		// the agent's gc removes it when the veth goes.
		w.ContainerID = "netns-" + filepath.Base(p.NetnsPath)
		w.Partial = true
		if len(sandboxes) > 0 {
			a.log.Warn("the CRI runtime knows pods but none owns this namespace; is its netns dir mounted where the runtime says (netnsDirs)?",
				"netns", p.NetnsPath, "hostIfname", p.HostIfName)
		}
	}
	tags, podTags, err := plugin.MergeTags(a.cfg.Plugin.Tags, annotations, a.cfg.Plugin.AllowedPodTags, a.log)
	if err != nil {
		return nil, nil, fmt.Errorf("pod %s/%s: %w", w.Namespace, w.Pod, err)
	}
	w.Tags, w.PodTags = tags, podTags
	if err := datapath.ValidateWorkload(w); err != nil {
		return nil, nil, err
	}
	return w, sb, nil
}

// trustedAddrs are the addresses an existing pod may open connections
// from. Not simply what is on its interface: a pod with CAP_NET_ADMIN can
// add another pod's address there. The runtime's record of the pod's CNI
// result is authoritative; without it, an address counts only if the host
// routes it to this pod's veth (ptp-style primaries do; bridge ones route
// to the bridge, so such pods stay untagged). Addresses another pod
// already owns never count.
func (a *Agent) trustedAddrs(p discover.PodInterface, sb *discover.Sandbox, taken map[netip.Addr]bool) []netip.Addr {
	var out []netip.Addr
	for _, addr := range p.Addrs {
		why := ""
		switch {
		case taken[addr]:
			why = "another pod owns it"
		case sb != nil && len(sb.IPs) > 0:
			if !slices.Contains(sb.IPs, addr) {
				why = "not among the addresses the runtime gave the pod"
			}
		default:
			if !routedTo(addr, p.HostIfindex) {
				why = "the host does not route it to the pod's veth"
			}
		}
		if why != "" {
			a.log.Warn("address on an existing pod's interface not trusted: its connections from it are not tagged",
				"hostIfname", p.HostIfName, "addr", addr, "why", why)
			continue
		}
		out = append(out, addr)
	}
	return out
}

// routedTo reports whether the host's route to addr goes out of ifindex.
func routedTo(addr netip.Addr, ifindex int) bool {
	routes, err := netlink.RouteGet(addr.AsSlice())
	return err == nil && len(routes) > 0 && routes[0].LinkIndex == ifindex
}

// sandboxes asks the CRI runtime, if reachable, which pods exist.
func (a *Agent) sandboxes(ctx context.Context) []discover.Sandbox {
	if a.cfg.CRISocket == "" {
		return nil
	}
	cri, err := discover.DialCRI(a.cfg.CRISocket)
	if err != nil {
		a.log.Debug("no CRI runtime to name existing pods", "socket", a.cfg.CRISocket, "err", err)
		return nil
	}
	defer cri.Close()
	sbs, err := cri.Sandboxes(ctx)
	if err != nil {
		a.log.Warn("CRI runtime did not list pods; existing pods get a partial identity", "err", err)
		return nil
	}
	return sbs
}

// sighting is when a veth was first seen without an attachment.
type sighting struct {
	name string
	at   time.Time
}

var _ = slog.Default
