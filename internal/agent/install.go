package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/pktmeta/pktmeta/internal/cniconf"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

func (c *Config) cniconfOptions(log *slog.Logger) (cniconf.Options, error) {
	entry, err := c.PluginEntry()
	if err != nil {
		return cniconf.Options{}, err
	}
	return cniconf.Options{
		ConfDir:      c.CNIConfDir,
		StateDir:     c.StateDir,
		Entry:        entry,
		BinDir:       c.CNIBinDir,
		BinarySource: c.PluginBinary,
		Logger:       log,
	}, nil
}

// installLoop copies the plugin, waits for the primary CNI's config, puts
// pktmeta into it, and keeps it there until ctx ends.
func (a *Agent) installLoop(ctx context.Context) {
	opts, err := a.cfg.cniconfOptions(a.log)
	if err != nil {
		a.log.Error("install", "err", err)
		return
	}
	for {
		changed, err := cniconf.InstallBinary(a.cfg.PluginBinary, a.cfg.CNIBinDir)
		if err == nil {
			if changed {
				a.log.Info("plugin installed", "dir", a.cfg.CNIBinDir)
			}
			break
		}
		a.log.Error("install plugin binary", "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
	err = cniconf.Watch(ctx, opts, func(ev cniconf.Event) {
		switch ev.Kind {
		case cniconf.EventInstalled:
			a.installed.Store(true)
			a.metrics.Action("install")
			a.log.Info("pktmeta is in the CNI chain", "file", ev.Path, "changed", ev.Result.Changed)
		case cniconf.EventRepaired:
			a.installed.Store(true)
			a.metrics.Action("repair")
			a.log.Info("put pktmeta back into the CNI config", "file", ev.Path, "repairsInWindow", ev.Repairs)
		case cniconf.EventBackoff:
			a.metrics.Action("backoff")
			a.log.Warn("another writer keeps rewriting the CNI config; backing off", "file", ev.Path, "repairs", ev.Repairs, "next", ev.Backoff)
		case cniconf.EventNoPrimary:
			a.log.Info("waiting for the primary CNI's config", "dir", a.cfg.CNIConfDir)
		case cniconf.EventError:
			a.log.Warn("CNI config", "err", ev.Err)
		}
	})
	if err != nil {
		a.log.Error("watch CNI config", "err", err)
	}
}

// Install is the one-shot install: plugin binary and conflist entry. It
// waits for the primary CNI's config to appear.
func Install(ctx context.Context, cfg Config, log *slog.Logger) error {
	opts, err := cfg.cniconfOptions(log)
	if err != nil {
		return err
	}
	if _, err := cniconf.InstallBinary(cfg.PluginBinary, cfg.CNIBinDir); err != nil {
		return err
	}
	for {
		res, err := cniconf.Install(opts)
		if errors.Is(err, cniconf.ErrNoPrimary) {
			log.Info("waiting for the primary CNI's config", "dir", cfg.CNIConfDir)
			if _, err := cniconf.WaitForPrimary(ctx, cfg.CNIConfDir); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		log.Info("installed", "file", res.Path, "changed", res.Changed)
		return nil
	}
}

// Uninstall removes pktmeta from the node: its conflist entry (the file
// restored byte for byte when nobody changed it since), its plugin binary,
// every attachment, and the pinned datapath.
func Uninstall(cfg Config, log *slog.Logger) error {
	opts, err := cfg.cniconfOptions(log)
	if err != nil {
		return err
	}
	var errs []error
	// The chain first, so no new pod gets attached while we detach.
	res, err := cniconf.Uninstall(opts)
	if err != nil {
		errs = append(errs, err)
	} else {
		log.Info("removed from the CNI config", "files", res.Files, "binaryRemoved", res.BinaryRemoved)
	}
	if err := removeDatapath(cfg.Plugin.PinPath, log); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeDatapath detaches every attachment and removes the pins.
func removeDatapath(pinPath string, log *slog.Logger) error {
	d, err := datapath.OpenMaps(pinPath)
	if errors.Is(err, datapath.ErrNotLoaded) || errors.Is(err, os.ErrNotExist) || errors.Is(err, datapath.ErrNotBPFFS) {
		return nil
	}
	if err != nil {
		return err
	}
	lock, err := datapath.LockPinPath(pinPath, true)
	if err != nil {
		d.Close()
		return err
	}
	defer lock.Unlock()
	all, err := d.Workloads()
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, w := range all {
		if err := d.RemoveAttachment(w, log); err != nil {
			errs = append(errs, err)
		}
	}
	d.Close()
	if err := datapath.Destroy(pinPath); err != nil {
		errs = append(errs, err)
	}
	log.Info("datapath removed", "pinPath", pinPath, "attachments", len(all))
	return errors.Join(errs...)
}

// shutdown runs after ctx ended: uninstall only when the DaemonSet is
// going (or configured to always); a rolling upgrade or reboot leaves the
// chain entry, the plugin and the datapath in place, so tagging goes on.
func (a *Agent) shutdown(d *datapath.Datapath) error {
	uninstall := false
	switch a.cfg.UninstallOnExit {
	case "always":
		uninstall = true
	case "auto":
		going, err := a.daemonSetGoing(context.Background())
		if err != nil {
			a.log.Info("not uninstalling: cannot tell whether the DaemonSet is being deleted", "err", err)
		}
		uninstall = going
	}
	if !uninstall {
		a.log.Info("stopping; pktmeta stays installed and the datapath keeps tagging")
		return nil
	}
	a.log.Info("uninstalling")
	a.metrics.Action("uninstall")
	if err := Uninstall(a.cfg, a.log); err != nil {
		return fmt.Errorf("uninstall: %w", err)
	}
	return nil
}
