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
	"time"

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
		// Everything that can be checked before touching the system is:
		// bad input fails here and leaves nothing behind.
		in, err := parseAddInput(conf, args, log)
		if err != nil {
			return err
		}
		netns, err := ns.GetNS(args.Netns)
		if err != nil {
			return fmt.Errorf("open netns %q: %w", args.Netns, err)
		}
		defer netns.Close()
		veth, err := hostVeth(netns, args.IfName, in.prev)
		if err != nil {
			return err
		}
		hostNetns, err := datapath.CurrentNetns()
		if err != nil {
			return err
		}
		w, addrs := in.workload, in.addrs
		w.HostIfName, w.HostIfindex, w.HostNetns = veth.Attrs().Name, uint32(veth.Attrs().Index), hostNetns
		if err := datapath.ValidateWorkload(w); err != nil {
			return configError("%v", err)
		}

		// The handle holds the node lock shared until the ADD is done: no
		// upgrade can replace the programs between opening and attaching.
		d, res, err := datapath.Open(datapath.Options{PinPath: conf.PinPath, MaxConnections: conf.MaxConnections, Log: log})
		if err != nil {
			return datapathError(err)
		}
		defer d.Close()
		if res.Loaded {
			log.Info("datapath loaded", "created", res.Created, "repaired", res.Repaired, "previous", res.Previous, "upgraded", res.Upgraded)
		}
		if len(addrs) == 0 {
			log.Warn("prevResult has no IP addresses: nothing this pod sends is tagged (only its own addresses may open connections)")
		}
		err = d.Attach(w, datapath.AttachOptions{
			Mode:            conf.mode,
			Strict:          conf.StrictSource,
			Addrs:           addrs,
			MaxConnections:  conf.MaxConnectionsPerPod,
			EventsPerSecond: conf.eventsPerSec,
		})
		if errors.Is(err, attach.ErrNoTCX) {
			return configError("key \"attachMode\": %v", err)
		}
		if err != nil {
			return err
		}
		log.Info("attached", "workload", w.ID, "pod", w.Namespace+"/"+w.Pod, "hostIfname", w.HostIfName, "legacy", w.Legacy)
		attachApps(d, conf, log)
		return types.PrintResult(conf.PrevResult, conf.CNIVersion)
	})
}

// attachApps makes sure applications can ask their sockets who opened
// their connections (getsockopt SOL_PKTMETA), on every ADD: a node whose
// first ADD came before a cgroup v2 mount, or whose link an operator
// removed, gets it back. It never fails the ADD: the pod's connections are
// tagged either way, and status reports the interface missing.
func attachApps(d *datapath.Datapath, conf *Config, log *slog.Logger) {
	dir := conf.ApplicationCgroup
	if dir == "none" {
		// Off means off: take it away if an earlier config put it on.
		if err := d.DetachApps(); err != nil {
			log.Warn("applicationCgroup none: could not take the application interface off", "err", err)
		}
		return
	}
	var err error
	if dir == "" {
		dir, err = datapath.CgroupRoot()
	}
	if err == nil {
		err = d.AttachApps(dir, conf.ApplicationUDP == nil || *conf.ApplicationUDP)
	}
	if err != nil {
		log.Warn("applications cannot ask their sockets who opened their connections (getsockopt SOL_PKTMETA)", "cgroup", dir, "err", err)
	}
}

// podAddrs are the pod interface's own addresses from the primary
// plugin's result: those of ifname inside the sandbox, or, where the result
// does not say which interface an address is on, all of them.
func podAddrs(prev *current.Result, ifname string) []netip.Addr {
	var out []netip.Addr
	for _, ipc := range prev.IPs {
		if i := ipc.Interface; i != nil && *i >= 0 && *i < len(prev.Interfaces) {
			iface := prev.Interfaces[*i]
			if iface.Sandbox == "" || iface.Name != ifname {
				continue // the host side, or another interface of the pod
			}
		}
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
		key := datapath.AttachmentKey{ContainerID: args.ContainerID, IfName: args.IfName}
		d, err := openExisting(conf, log)
		if errors.Is(err, datapath.ErrNewer) || errors.Is(err, datapath.ErrOlderLayout) {
			// Maps this build cannot read: take the pod's hooks off and let
			// the pktmeta that owns them clean up the rest. A DEL must not
			// fail for it.
			log.Warn("pinned datapath of another layout; detaching the pod's links only", "err", err)
			return datapath.DetachPinned(conf.PinPath, key)
		}
		if d == nil || err != nil {
			return err
		}
		defer d.Close()
		_, err = d.Detach(key)
		return err
	})
}

// openExisting opens the committed datapath for removals. A nil datapath
// and nil error: nothing is pinned, so there is nothing to remove.
func openExisting(conf *Config, log *slog.Logger) (*datapath.Datapath, error) {
	d, err := datapath.OpenExisting(conf.PinPath, log)
	if errors.Is(err, datapath.ErrNotLoaded) || errors.Is(err, datapath.ErrNotBPFFS) {
		log.Debug("no datapath, nothing to remove", "err", err)
		return nil, nil
	}
	return d, err
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
		d, err := datapath.OpenExisting(conf.PinPath, log)
		if err != nil {
			return fmt.Errorf("pktmeta datapath: %w", err)
		}
		defer d.Close()
		netns, err := ns.GetNS(args.Netns)
		if err != nil {
			return fmt.Errorf("open netns %q: %w", args.Netns, err)
		}
		defer netns.Close()
		veth, err := hostVeth(netns, args.IfName, prev)
		if err != nil {
			return err
		}
		return d.Check(datapath.AttachmentKey{ContainerID: args.ContainerID, IfName: args.IfName}, uint32(veth.Attrs().Index))
	})
}

func cmdGC(args *skel.CmdArgs) error {
	return withLogger(args, "GC", func(conf *Config, log *slog.Logger) error {
		d, err := openExisting(conf, log)
		if d == nil || err != nil {
			return err
		}
		defer d.Close()
		valid := map[datapath.AttachmentKey]bool{}
		for _, a := range conf.ValidAttachments {
			valid[datapath.AttachmentKey{ContainerID: a.ContainerID, IfName: a.IfName}] = true
		}
		// Only this network's attachments: another network (Multus, a
		// second conflist) has its own GC, and the agent judges its covers.
		res, err := d.CollectGarbage(func(w datapath.Workload) bool { return w.Network != conf.Name || valid[w.Key()] })
		log.Info("gc", "attachments", res.Attachments, "orphanLinks", res.OrphanLinks, "orphanEndpoints", res.OrphanEndpoints, "netnsAddrs", res.Netns,
			"records", res.Sweep.Removed(), "aliases", res.Sweep.Aliases)
		return err
	})
}

func cmdStatus(args *skel.CmdArgs) error {
	return withLogger(args, "STATUS", func(conf *Config, log *slog.Logger) error {
		if err := datapath.CheckBPFFS(conf.PinPath); err != nil {
			return types.NewError(types.ErrPluginNotAvailable, "pktmeta: bpffs not usable", err.Error())
		}
		d, err := datapath.OpenReader(conf.PinPath)
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
