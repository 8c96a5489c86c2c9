// Package plugin is the pktmeta chained CNI plugin: on ADD it puts the
// pktmeta datapath on the host side of the pod's veth and registers who the
// pod is; on DEL it takes everything off again. The datapath is pinned in
// bpffs, so nothing keeps running after the plugin exits.
package plugin

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

// Funcs are the CNI verbs for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck, GC: cmdGC, Status: cmdStatus}
}

// Versions are the CNI spec versions pktmeta speaks.
func Versions() version.PluginInfo {
	return version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
}

// errNoPrevResult: pktmeta only makes sense after a primary plugin.
var errNoPrevResult = types.NewError(types.ErrInvalidNetworkConfig,
	"must be called as chained plugin",
	"pktmeta needs the primary plugin's result (prevResult); put it after the primary CNI in a conflist")

func withLogger(args *skel.CmdArgs, verb string, fn func(*Config, *slog.Logger) error) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		log, c := newLogger(nil, verb, args.ContainerID, args.IfName)
		log.Error("bad config", "err", err)
		c.Close()
		return err
	}
	log, c := newLogger(conf, verb, args.ContainerID, args.IfName)
	defer c.Close()
	start := time.Now()
	err = fn(conf, log)
	if err != nil {
		log.Error("failed", "err", err, "duration", time.Since(start))
	} else {
		log.Debug("done", "duration", time.Since(start))
	}
	return err
}

func cmdAdd(args *skel.CmdArgs) error {
	return withLogger(args, "ADD", func(conf *Config, log *slog.Logger) error {
		if conf.PrevResult == nil {
			return errNoPrevResult
		}
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return fmt.Errorf("convert prevResult: %w", err)
		}
		tags, err := conf.podTags(log)
		if err != nil {
			return err
		}
		netns, err := ns.GetNS(args.Netns)
		if err != nil {
			return fmt.Errorf("open netns %q: %w", args.Netns, err)
		}
		defer netns.Close()
		veth, err := hostVeth(netns, args.IfName, prev)
		if err != nil {
			return err
		}

		id := parseCNIArgs(args.Args, args.ContainerID)
		hostNetns, err := datapath.CurrentNetns()
		if err != nil {
			return err
		}
		w := &datapath.Workload{
			Namespace:   id.Namespace,
			Pod:         id.Name,
			UID:         id.UID,
			ContainerID: args.ContainerID,
			IfName:      args.IfName,
			HostIfName:  veth.Attrs().Name,
			HostIfindex: uint32(veth.Attrs().Index),
			HostNetns:   hostNetns,
			Netns:       args.Netns,
			Tags:        tags,
			Created:     time.Now(),
			Partial:     id.partial(),
		}
		if err := datapath.ValidateWorkload(w); err != nil {
			return configError("%v", err)
		}
		addrs := podAddrs(prev)
		if conf.StrictSource && len(addrs) == 0 {
			return configError("key \"strictSource\": prevResult has no IP addresses to allow")
		}

		d, res, err := datapath.Ensure(datapath.Options{PinPath: conf.PinPath, MaxConnections: conf.MaxConnections}, log)
		if err != nil {
			return datapathError(err)
		}
		defer d.Close()
		if res.Loaded {
			log.Info("datapath loaded", "created", res.Created, "upgraded", res.Upgraded)
		}

		lock, err := datapath.LockPinPath(conf.PinPath, false)
		if err != nil {
			return datapathError(err)
		}
		defer lock.Unlock()
		err = d.AddAttachment(w, datapath.AttachOptions{Mode: conf.mode, Strict: conf.StrictSource, Addrs: addrs}, log)
		if errors.Is(err, attach.ErrNoTCX) {
			return configError("key \"attachMode\": %v", err)
		}
		if err != nil {
			return err
		}
		log.Info("attached", "workload", w.ID, "pod", w.Namespace+"/"+w.Pod, "hostIfname", w.HostIfName, "legacy", w.Legacy)
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	})
}

// podAddrs are the pod's own addresses from the primary plugin's result.
func podAddrs(prev *current.Result) []netip.Addr {
	var out []netip.Addr
	for _, ipc := range prev.IPs {
		if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// datapathError maps problems with bpffs or loading to the CNI codes a
// runtime understands: "try again later" when bpffs is not there yet.
func datapathError(err error) error {
	if errors.Is(err, datapath.ErrNotBPFFS) {
		return types.NewError(types.ErrTryAgainLater, "pktmeta: bpffs not mounted", err.Error())
	}
	return err
}

func cmdDel(args *skel.CmdArgs) error {
	return withLogger(args, "DEL", func(conf *Config, log *slog.Logger) error {
		// DEL must succeed when anything is missing: no datapath, no
		// workload, no netns, no prevResult, a second DEL.
		d, unlock, err := openForRemoval(conf, log)
		if d == nil || err != nil {
			return err
		}
		defer unlock()

		key := datapath.AttachmentKey{ContainerID: args.ContainerID, IfName: args.IfName}
		w, ok, err := d.FindAttachment(key)
		if err != nil {
			return err
		}
		if !ok {
			// Nothing registered; still drop stray pins a crashed ADD left.
			return datapath.RemoveLinkDir(d.AttachmentLinkDir(key))
		}
		return d.RemoveAttachment(w, log)
	})
}

// openForRemoval opens the pinned maps (removing state needs no programs)
// and takes the shared lock. A nil datapath and nil error: nothing pinned,
// so nothing to remove.
func openForRemoval(conf *Config, log *slog.Logger) (*datapath.Datapath, func(), error) {
	d, err := datapath.OpenMaps(conf.PinPath)
	if errors.Is(err, datapath.ErrNotLoaded) || errors.Is(err, datapath.ErrNotBPFFS) || errors.Is(err, os.ErrNotExist) {
		log.Debug("no datapath, nothing to remove", "err", err)
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	lock, err := datapath.LockPinPath(conf.PinPath, false)
	if err != nil {
		d.Close()
		return nil, nil, err
	}
	return d, func() { lock.Unlock(); d.Close() }, nil
}

func cmdCheck(args *skel.CmdArgs) error {
	return withLogger(args, "CHECK", func(conf *Config, log *slog.Logger) error {
		if conf.PrevResult == nil {
			return errNoPrevResult
		}
		prev, err := current.NewResultFromResult(conf.PrevResult)
		if err != nil {
			return fmt.Errorf("convert prevResult: %w", err)
		}
		d, err := datapath.Open(conf.PinPath)
		if err != nil {
			return fmt.Errorf("pktmeta datapath: %w", err)
		}
		defer d.Close()
		key := datapath.AttachmentKey{ContainerID: args.ContainerID, IfName: args.IfName}
		w, ok, err := d.FindAttachment(key)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("no pktmeta attachment registered for container %s interface %s", args.ContainerID, args.IfName)
		}
		netns, err := ns.GetNS(args.Netns)
		if err != nil {
			return fmt.Errorf("open netns %q: %w", args.Netns, err)
		}
		defer netns.Close()
		veth, err := hostVeth(netns, args.IfName, prev)
		if err != nil {
			return err
		}
		if uint32(veth.Attrs().Index) != w.HostIfindex {
			return fmt.Errorf("pod's host veth is %s (ifindex %d), pktmeta attached to ifindex %d", veth.Attrs().Name, veth.Attrs().Index, w.HostIfindex)
		}
		return checkAttached(d, w)
	})
}

// checkAttached verifies our programs are on the veth's hooks right now.
func checkAttached(d *datapath.Datapath, w datapath.Workload) error {
	got, err := attach.Query(int(w.HostIfindex))
	if err != nil {
		return err
	}
	ingress := d.Origin
	if w.Strict {
		ingress = d.Strict
	}
	for _, h := range []struct {
		hook attach.Hook
		prog *ebpf.Program
	}{{attach.Ingress, ingress}, {attach.Egress, d.Deliver}} {
		if h.hook == attach.Egress && w.NoEgress {
			continue
		}
		info, err := h.prog.Info()
		if err != nil {
			return fmt.Errorf("program info: %w", err)
		}
		id, _ := info.ID()
		if !got.Has(h.hook, id) {
			return fmt.Errorf("pktmeta program %s (id %d) is not attached to %s %s", info.Name, id, w.HostIfName, h.hook)
		}
	}
	return nil
}

func cmdGC(args *skel.CmdArgs) error {
	return withLogger(args, "GC", func(conf *Config, log *slog.Logger) error {
		d, unlock, err := openForRemoval(conf, log)
		if d == nil || err != nil {
			return err
		}
		defer unlock()

		valid := map[datapath.AttachmentKey]bool{}
		for _, a := range conf.ValidAttachments {
			valid[datapath.AttachmentKey{ContainerID: a.ContainerID, IfName: a.IfName}] = true
		}
		all, err := d.Workloads()
		if err != nil {
			return err
		}
		var errs []error
		removed := 0
		for _, w := range all {
			if valid[w.Key()] {
				continue
			}
			if err := d.RemoveAttachment(w, log); err != nil {
				errs = append(errs, err)
				continue
			}
			removed++
		}
		if n, err := d.SweepRecords(nil); err != nil {
			errs = append(errs, err)
		} else {
			log.Info("gc: idle UDP records removed", "records", n)
		}
		orphans, err := d.OrphanLinkDirs()
		if err != nil {
			errs = append(errs, err)
		}
		for _, dir := range orphans {
			if err := datapath.RemoveLinkDir(dir); err != nil {
				errs = append(errs, err)
			}
		}
		log.Info("gc", "removed", removed, "orphanLinkDirs", len(orphans))
		return errors.Join(errs...)
	})
}

func cmdStatus(args *skel.CmdArgs) error {
	return withLogger(args, "STATUS", func(conf *Config, log *slog.Logger) error {
		if err := datapath.CheckBPFFS(conf.PinPath); err != nil {
			return types.NewError(types.ErrPluginNotAvailable, "pktmeta: bpffs not usable", err.Error())
		}
		d, err := datapath.Open(conf.PinPath)
		if errors.Is(err, datapath.ErrNotLoaded) {
			// The first ADD loads it.
			return nil
		}
		if err != nil {
			return types.NewError(types.ErrPluginNotAvailable, "pktmeta: pinned datapath not usable", err.Error())
		}
		defer d.Close()
		if _, err := d.ReadStats(); err != nil {
			return types.NewError(types.ErrPluginNotAvailable, "pktmeta: pinned datapath not usable", err.Error())
		}
		return nil
	})
}
