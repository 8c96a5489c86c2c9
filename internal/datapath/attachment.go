package datapath

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/vishvananda/netlink"
)

// AttachOptions describe one pod interface to put the datapath on.
type AttachOptions struct {
	Mode   attach.Mode
	Strict bool
	// Addrs are the pod's own addresses (from the primary plugin's
	// result): the only sources whose packets create, replace or close
	// records (all modes), and the only ones strict mode lets through.
	Addrs []netip.Addr
	// MaxConnections is how many records the pod may hold at once; 0 means
	// the table's size / PodShareOfTable.
	MaxConnections uint32
	// EventsPerSecond is how many connections a second the pod may open
	// with events; 0 means no limit.
	EventsPerSecond uint32
}

// Attach registers w, its endpoint, and attaches the programs to its host
// veth (w.HostIfindex), holding w's container lock. An earlier attachment
// with the same (container id, ifname), left by a retried ADD, is replaced,
// and so is another workload's attachment of the same veth (a stale one
// whose ifindex was reused, or the agent's cover of this very pod before
// its ADD got to pktmeta). On error nothing of w remains.
func (d *Datapath) Attach(w *Workload, opts AttachOptions) (err error) {
	if err := d.writable(); err != nil {
		return err
	}
	if len(opts.Addrs) > MaxAddrs {
		return fmt.Errorf("pod interface has %d addresses, at most %d are supported", len(opts.Addrs), MaxAddrs)
	}
	if _, err := w.encode(); err != nil {
		return err
	}
	cl, err := d.lockContainer(w.ContainerID)
	if err != nil {
		return err
	}
	defer func() { cl.unlock(err != nil && d.containerEmpty(w.ContainerID)) }()

	if old, ok, err := d.FindAttachment(w.Key()); err != nil {
		return err
	} else if ok {
		d.log.Info("replacing an earlier attachment of the same container and interface", "workload", old.ID)
		if err := d.removeAttachment(old); err != nil {
			return fmt.Errorf("remove earlier attachment: %w", err)
		}
	}
	if ep, ok, err := d.Endpoint(w.HostIfindex); err == nil && ok {
		if old, ok, _ := d.Workload(ep.Workload); ok && old.HostIfindex == w.HostIfindex && old.HostNetns == w.HostNetns {
			d.log.Info("replacing another attachment of the same veth", "workload", old.ID, "containerID", old.ContainerID)
			if err := d.removeAttachment(old); err != nil {
				return fmt.Errorf("remove the veth's earlier attachment: %w", err)
			}
		}
	}

	w.Strict = opts.Strict
	w.Legacy, w.NoEgress = false, false
	if _, err := d.registerWorkload(w); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			d.DeleteEndpoint(w.HostIfindex, w.ID)
			d.deleteWorkload(w.ID)
		}
	}()
	if w.NetnsCookie == 0 && w.Netns != "" {
		if c, err := NetnsCookieOf(w.Netns); err == nil {
			w.NetnsCookie = c
		} else {
			d.log.Warn("no netns cookie: the pod's sockets cannot ask who opened their connections", "netns", w.Netns, "err", err)
		}
	}
	// Never fails the ADD: without the entry the pod's sockets get
	// ENOENT, and tagging is unaffected.
	if err := d.putWorkloadNetns(w.ID, w.NetnsCookie); err != nil {
		d.log.Warn("the pod's sockets cannot ask who opened their connections", "err", err)
	}
	maxConns := opts.MaxConnections
	if maxConns == 0 {
		maxConns = max(1, d.Capacity()/PodShareOfTable)
	}
	ep := Endpoint{Workload: w.ID, Strict: opts.Strict, Addrs: opts.Addrs, MaxConnections: maxConns, EventsPerSecond: opts.EventsPerSecond}
	if err := d.putEndpoint(w.HostIfindex, ep); err != nil {
		return err
	}
	d.syncNetnsAddrs(w.NetnsCookie)
	progs, err := d.programs(*w)
	if err != nil {
		return err
	}
	linkDir := d.AttachmentLinkDir(w.Key())
	res, err := attach.Attach(int(w.HostIfindex), progs, opts.Mode, linkDir)
	if err != nil {
		return fmt.Errorf("attach to %s: %w", w.HostIfName, err)
	}
	defer func() {
		if err != nil {
			attach.Detach(int(w.HostIfindex), linkDir)
		}
	}()
	w.Legacy = res.Mode == attach.Legacy
	w.NoEgress = res.NoEgress
	if res.NoEgress {
		d.log.Warn("legacy attach beside an ingress qdisc: only the origin hook is attached; connections to this pod are not marked delivered",
			"hostIfname", w.HostIfName)
		if err := d.setEndpointNoEgress(w.HostIfindex, w.ID); err != nil {
			return err
		}
	}
	if res.Mode == attach.Legacy {
		if got, err := attach.Query(int(w.HostIfindex)); err == nil && len(got.ForeignBefore[attach.Ingress]) > 0 {
			d.log.Warn("foreign tc filters run before pktmeta's; packets they redirect or drop are not tagged (tcx avoids this)",
				"hostIfname", w.HostIfName, "priorities", got.ForeignBefore[attach.Ingress])
		}
	}
	return d.updateWorkload(w)
}

// Detach undoes Attach for one (container id, ifname), holding the
// container's lock: detaches, unpins, unregisters, and removes the records
// of connections the pod opened or received (its sockets died with its
// network namespace). Missing pieces are skipped, so it can run twice and
// after the veth is gone. It reports whether a workload was registered.
func (d *Datapath) Detach(key AttachmentKey) (bool, error) {
	if err := d.writable(); err != nil {
		return false, err
	}
	cl, err := d.lockContainer(key.ContainerID)
	if err != nil {
		return false, err
	}
	defer func() { cl.unlock(d.containerEmpty(key.ContainerID)) }()
	w, found, err := d.FindAttachment(key)
	if err != nil {
		return false, err
	}
	if !found {
		// Nothing registered; still drop stray pins a killed ADD left.
		return false, attach.Detach(0, d.AttachmentLinkDir(key))
	}
	return true, d.removeAttachment(w)
}

// containerEmpty reports whether no link pins are left for a container:
// its lock directory can go.
func (d *Datapath) containerEmpty(containerID string) bool {
	_, err := os.Stat(filepath.Join(d.LinksDir(), pinName(containerID)))
	return errors.Is(err, os.ErrNotExist)
}

// removeAttachment detaches and forgets w; the caller holds its container
// lock (or the node lock exclusively).
func (d *Datapath) removeAttachment(w Workload) error {
	var errs []error
	if err := attach.Detach(d.liveIfindex(w), d.AttachmentLinkDir(w.Key())); err != nil {
		errs = append(errs, err)
	}
	// The endpoint first: from here on the veth creates no records.
	if err := d.DeleteEndpoint(w.HostIfindex, w.ID); err != nil {
		errs = append(errs, err)
	}
	res, err := d.Sweep(SweepOptions{Workload: w.ID})
	switch {
	case errors.Is(err, errNoSweeper):
		// A datapath whose programs could not be completed: the records go
		// with the hygiene sweep, or the node's next load.
		d.log.Warn("no sweep program: the pod's records stay until a later sweep", "workload", w.ID)
	case err != nil:
		// Keep the workload, so that the retried DEL finds it and sweeps
		// its records: records must not outlive the workload they name.
		return errors.Join(append(errs, err)...)
	}
	if err := d.deleteWorkload(w.ID); err != nil {
		errs = append(errs, err)
	}
	d.log.Info("attachment removed", "workload", w.ID, "hostIfname", w.HostIfName, "records", res.RemovedWorkload)
	return errors.Join(errs...)
}

// liveIfindex is w's host ifindex if it still names w's veth in this
// network namespace, else 0: legacy filters are removed by ifindex only
// while it is ours, since ifindexes are reused once a veth is gone.
func (d *Datapath) liveIfindex(w Workload) int {
	if w.HostIfindex == 0 {
		return 0
	}
	own, err := CurrentNetns()
	if err != nil || (w.HostNetns != 0 && w.HostNetns != own) {
		return 0
	}
	if l, err := netlink.LinkByIndex(int(w.HostIfindex)); err == nil && l.Attrs().Name == w.HostIfName {
		return int(w.HostIfindex)
	}
	return 0
}

// Check verifies the attachment of key: it is registered, for the veth
// with hostIfindex, and every program of the hook table is on its hook.
func (d *Datapath) Check(key AttachmentKey, hostIfindex uint32) error {
	w, ok, err := d.FindAttachment(key)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no pktmeta attachment registered for container %s interface %s", key.ContainerID, key.IfName)
	}
	if w.HostIfindex != hostIfindex {
		return fmt.Errorf("pod's host veth has ifindex %d, pktmeta attached to ifindex %d (%s)", hostIfindex, w.HostIfindex, w.HostIfName)
	}
	// Without its endpoint the veth tags nothing (and strict mode drops
	// everything): the hooks alone are not enough.
	ep, ok, err := d.Endpoint(w.HostIfindex)
	if err != nil {
		return err
	}
	if !ok || ep.Workload != w.ID || ep.Strict != w.Strict {
		return fmt.Errorf("the endpoint of %s (ifindex %d) is missing or another pod's: %+v", w.HostIfName, w.HostIfindex, ep)
	}
	hooks, err := d.HookStatus(w)
	if err != nil {
		return err
	}
	for _, h := range hooks {
		if !h.OK {
			return errors.New(h.Problem)
		}
	}
	return nil
}

// GCResult says what CollectGarbage removed.
type GCResult struct {
	Attachments     int // workloads not kept
	OrphanLinks     int // link pin directories no workload owns
	OrphanEndpoints int // endpoints whose workload is gone
	Netns           int // netns address entries rewritten or removed
	Sweep           SweepResult
}

// CollectGarbage removes what no longer belongs to a live pod: the
// attachments keep rejects (CNI GC: not in valid-attachments; the agent:
// the veth is gone), link pins and endpoints that no workload owns
// (what a killed ADD left), netns addresses that differ from the
// workloads' (a killed DEL, a sync that lost a race), and, in one sweep, idle
// UDP records, TCP records whose connection is over and aliases whose
// record is gone. CNI GC, the agent and uninstall all go through it.
func (d *Datapath) CollectGarbage(keep func(Workload) bool) (GCResult, error) {
	var res GCResult
	if err := d.writable(); err != nil {
		return res, err
	}
	var errs []error
	all, err := d.Workloads()
	if err != nil {
		return res, err
	}
	for _, w := range all {
		if keep(w) {
			continue
		}
		found, err := d.Detach(w.Key())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if found {
			res.Attachments++
		}
	}
	n, err := d.removeOrphanLinks()
	res.OrphanLinks = n
	errs = append(errs, err)
	n, err = d.removeOrphanEndpoints()
	res.OrphanEndpoints = n
	errs = append(errs, err)
	res.Netns = d.reconcileNetnsAddrs()
	sw, err := d.Sweep(SweepOptions{Hygiene: true})
	res.Sweep = sw
	errs = append(errs, err)
	return res, errors.Join(errs...)
}

// removeOrphanLinks removes link pin directories no workload owns, each
// under its container's lock (an ADD registers the workload before it
// pins links, so a directory seen without one under the lock is orphaned).
func (d *Datapath) removeOrphanLinks() (int, error) {
	containers, err := os.ReadDir(d.LinksDir())
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("list %s: %w", d.LinksDir(), err)
	}
	n := 0
	var errs []error
	for _, c := range containers {
		cl, err := d.lockContainerPinName(c.Name())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		live := map[string]bool{}
		if all, err := d.Workloads(); err == nil {
			for _, w := range all {
				live[d.AttachmentLinkDir(w.Key())] = true
			}
		} else {
			errs = append(errs, err)
			cl.unlock(false)
			continue
		}
		ifaces, _ := os.ReadDir(filepath.Join(d.LinksDir(), c.Name()))
		for _, i := range ifaces {
			dir := filepath.Join(d.LinksDir(), c.Name(), i.Name())
			if live[dir] {
				continue
			}
			if err := attach.Detach(0, dir); err != nil {
				errs = append(errs, err)
				continue
			}
			n++
		}
		_, statErr := os.Stat(filepath.Join(d.LinksDir(), c.Name()))
		cl.unlock(errors.Is(statErr, os.ErrNotExist))
	}
	return n, errors.Join(errs...)
}

// removeOrphanEndpoints removes endpoints whose workload is not registered:
// an ADD registers the workload first and DEL removes it last, so only a
// killed process leaves one.
func (d *Datapath) removeOrphanEndpoints() (int, error) {
	eps, err := d.ListEndpoints()
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for ifindex, ep := range eps {
		if _, ok, err := d.Workload(ep.Workload); err != nil || ok {
			errs = append(errs, err)
			continue
		}
		if err := d.DeleteEndpoint(ifindex, ep.Workload); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// AttachmentLinkDir is where an attachment's tcx links are pinned.
func (d *Datapath) AttachmentLinkDir(k AttachmentKey) string {
	return filepath.Join(d.LinksDir(), pinName(k.ContainerID), pinName(k.IfName))
}

// pinName escapes s for bpffs, which refuses names containing a dot
// (CNI allows dots in container ids and interface names).
func pinName(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '.' || c == '%' || c == '/' || c < 0x20 || c >= 0x7f {
			b = fmt.Appendf(b, "%%%02x", c)
			continue
		}
		b = append(b, c)
	}
	return string(b)
}

// unpinName undoes pinName.
func unpinName(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+3], "%02x", &c); err == nil {
				b = append(b, c)
				i += 2
				continue
			}
		}
		b = append(b, s[i])
	}
	return string(b)
}

// LinkPins lists the link pin directories (container/ifname), for leak
// checks and status.
func (d *Datapath) LinkPins() ([]string, error) {
	var out []string
	containers, err := os.ReadDir(d.LinksDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	for _, c := range containers {
		ifaces, _ := os.ReadDir(filepath.Join(d.LinksDir(), c.Name()))
		for _, i := range ifaces {
			out = append(out, filepath.Join(c.Name(), i.Name()))
		}
	}
	return out, nil
}
