package datapath

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/vishvananda/netlink"
)

// AttachOptions describe one pod interface to put the datapath on.
type AttachOptions struct {
	Mode   attach.Mode
	Strict bool
	Addrs  []netip.Addr // the pod's addresses, for strict mode
}

// AddAttachment registers w, its endpoint, and attaches the programs to
// its host veth (w.HostIfindex). An earlier live attachment with the same
// (container id, ifname), left by a retried ADD, is replaced. On error
// nothing of w remains.
func (d *Datapath) AddAttachment(w *Workload, opts AttachOptions, log *slog.Logger) (err error) {
	if old, ok, err := d.FindAttachment(w.Key()); err != nil {
		return err
	} else if ok {
		log.Info("replacing an earlier attachment of the same container and interface", "workload", old.ID)
		if err := d.RemoveAttachment(old, log); err != nil {
			return fmt.Errorf("remove earlier attachment: %w", err)
		}
	}
	// An endpoint already registered for this ifindex belongs to another
	// workload: a stale one whose veth's ifindex was reused, or the agent's
	// cover of this very pod before its ADD got to pktmeta. Replace it.
	if ep, ok, err := d.Endpoint(w.HostIfindex); err == nil && ok {
		if old, ok, _ := d.Workload(ep.Workload); ok && old.HostIfindex == w.HostIfindex && old.HostNetns == w.HostNetns {
			log.Info("replacing another attachment of the same veth", "workload", old.ID, "containerID", old.ContainerID)
			if err := d.RemoveAttachment(old, log); err != nil {
				return fmt.Errorf("remove the veth's earlier attachment: %w", err)
			}
		}
	}
	if len(opts.Addrs) > MaxAddrs {
		return fmt.Errorf("pod has %d addresses, at most %d are supported", len(opts.Addrs), MaxAddrs)
	}
	w.Strict = opts.Strict
	if _, err := d.RegisterWorkload(w); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			d.DeleteEndpoint(w.HostIfindex, w.ID)
			d.DeleteWorkload(w.ID)
		}
	}()
	if err := d.PutEndpoint(w.HostIfindex, Endpoint{Workload: w.ID, Strict: opts.Strict, Addrs: opts.Addrs}); err != nil {
		return err
	}
	ingress := d.Origin
	if opts.Strict {
		ingress = d.Strict
	}
	linkDir := d.AttachmentLinkDir(w.Key())
	res, err := attach.Attach(int(w.HostIfindex), attach.Programs{Ingress: ingress, Egress: d.Deliver}, opts.Mode, linkDir)
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
		log.Warn("legacy attach beside an ingress qdisc: only the origin hook is attached; connections to this pod are not marked delivered",
			"hostIfname", w.HostIfName)
	}
	if res.Mode == attach.Legacy {
		if got, err := attach.Query(int(w.HostIfindex)); err == nil && len(got.ForeignBefore[attach.Ingress]) > 0 {
			log.Warn("foreign tc filters run before pktmeta's; packets they redirect or drop are not tagged (tcx avoids this)",
				"hostIfname", w.HostIfName, "priorities", got.ForeignBefore[attach.Ingress])
		}
	}
	if err := d.UpdateWorkload(w); err != nil {
		return err
	}
	return nil
}

// RemoveAttachment undoes AddAttachment: detaches, unpins, unregisters,
// and removes the records of connections the pod opened or received (its
// sockets died with its network namespace). Missing pieces are skipped,
// so it can run twice and after the veth is gone.
func (d *Datapath) RemoveAttachment(w Workload, log *slog.Logger) error {
	var errs []error
	// Filters are removed by ifindex only while it still names our veth:
	// ifindexes are reused once a veth is gone.
	ifindex := 0
	if w.HostIfindex != 0 {
		if l, err := netlink.LinkByIndex(int(w.HostIfindex)); err == nil && l.Attrs().Name == w.HostIfName {
			ifindex = int(w.HostIfindex)
		}
	}
	if err := attach.Detach(ifindex, d.AttachmentLinkDir(w.Key())); err != nil {
		errs = append(errs, err)
	}
	if err := d.DeleteEndpoint(w.HostIfindex, w.ID); err != nil {
		errs = append(errs, err)
	}
	n, err := d.SweepRecords(map[uint32]bool{w.ID: true})
	if err != nil {
		errs = append(errs, err)
	}
	if err := d.DeleteWorkload(w.ID); err != nil {
		errs = append(errs, err)
	}
	log.Info("attachment removed", "workload", w.ID, "hostIfname", w.HostIfName, "records", n)
	return errors.Join(errs...)
}

// SweepRecords removes, with their aliases, the records whose origin or
// peer is one of the gone workloads, and UDP records idle past the UDP
// timeout (the datapath only notices those when the tuple is reused).
// Returns how many were removed. The pass runs in the kernel (the gc
// program, one bpf_for_each_map_elem per workload), so DEL does not copy
// the whole table out; without the program it falls back to reading it.
func (d *Datapath) SweepRecords(gone map[uint32]bool) (int, error) {
	cfg, err := d.ReadConfig()
	if err != nil {
		return 0, err
	}
	if d.GC == nil {
		// Opened with OpenMaps: the pinned program is still there.
		if p, err := ebpf.LoadPinnedProgram(filepath.Join(d.progsDir(), ProgGC), nil); err == nil {
			d.GC = p
		} else {
			return d.sweepInUserspace(gone, cfg.UDPTimeout)
		}
	}
	ids := make([]uint32, 0, len(gone)+1)
	for id := range gone {
		ids = append(ids, id)
	}
	if len(ids) == 0 {
		ids = append(ids, 0)
	}
	removed := 0
	for i, id := range ids {
		args := bpfPktmetaSweep{Workload: id}
		if i == 0 {
			args.UdpIdleNs = uint64(cfg.UDPTimeout)
		}
		if _, err := d.GC.Run(&ebpf.RunOptions{Context: &args, ContextOut: &args}); err != nil {
			return removed, fmt.Errorf("run gc program: %w", err)
		}
		removed += int(args.Removed)
	}
	return removed, nil
}

func (d *Datapath) sweepInUserspace(gone map[uint32]bool, udpTimeout time.Duration) (int, error) {
	recs, err := d.Records()
	if err != nil {
		return 0, err
	}
	idleBefore := time.Now().Add(-udpTimeout)
	n := 0
	var errs []error
	for _, r := range recs {
		idle := r.Flags&FlagUDP != 0 && udpTimeout > 0 && r.LastSeen.Before(idleBefore)
		if !gone[r.OriginWorkload] && !gone[r.PeerWorkload] && !idle {
			continue
		}
		if err := d.DeleteRecord(r); err != nil {
			errs = append(errs, err)
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// OrphanLinkDirs lists link pin directories no live workload owns: what a
// crash between attach and registration, or an old bug, left behind.
func (d *Datapath) OrphanLinkDirs() ([]string, error) {
	live := map[string]bool{}
	all, err := d.Workloads()
	if err != nil {
		return nil, err
	}
	for _, w := range all {
		live[d.AttachmentLinkDir(w.Key())] = true
	}
	var out []string
	containers, err := os.ReadDir(d.LinksDir())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", d.LinksDir(), err)
	}
	for _, c := range containers {
		ifaces, err := os.ReadDir(filepath.Join(d.LinksDir(), c.Name()))
		if err != nil {
			continue
		}
		for _, i := range ifaces {
			dir := filepath.Join(d.LinksDir(), c.Name(), i.Name())
			if !live[dir] {
				out = append(out, dir)
			}
		}
	}
	return out, nil
}

// RemoveLinkDir detaches and unpins whatever links are pinned in dir.
func RemoveLinkDir(dir string) error {
	return attach.Detach(0, dir)
}
