package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
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
		changed, err := cniconf.InstallBinary(a.cfg.PluginBinary, a.cfg.CNIBinDir, a.log)
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
			// Watch has logged why, file by file, and does again whenever
			// that changes; readiness says we wait.
		case cniconf.EventError:
			a.log.Warn("CNI config", "err", ev.Err)
		}
	})
	if err != nil {
		a.log.Error("watch CNI config", "err", err)
	}
}

// DefaultWaitForPrimary is how long the one-shot Install waits for a
// usable primary CNI config by default.
const DefaultWaitForPrimary = time.Minute

// Install is the one-shot install: plugin binary and conflist entry. When
// the config dir has no usable primary CNI config (empty, or only files
// that are not valid or that pktmeta cannot join), it waits up to
// waitForPrimary for one (0: not at all), then fails with an error naming
// every file it skipped and why. Interrupted (ctx), it fails too: nothing
// was installed into the chain.
func Install(ctx context.Context, cfg Config, waitForPrimary time.Duration, log *slog.Logger) error {
	if err := CheckPluginBinary(cfg.PluginBinary); err != nil {
		return err
	}
	opts, err := cfg.cniconfOptions(log)
	if err != nil {
		return err
	}
	if _, err := cniconf.InstallBinary(cfg.PluginBinary, cfg.CNIBinDir, log); err != nil {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, max(waitForPrimary, 0))
	defer cancel()
	logged := ""
	for {
		res, err := cniconf.Install(opts)
		if errors.Is(err, cniconf.ErrNoPrimary) {
			switch {
			case ctx.Err() != nil:
				return fmt.Errorf("interrupted while waiting for the primary CNI: %w", err)
			case waitForPrimary <= 0:
				return fmt.Errorf("%w (not waiting for one: --wait-for-primary is 0)", err)
			case waitCtx.Err() != nil:
				return fmt.Errorf("gave up after waiting %s (--wait-for-primary): %w", waitForPrimary, err)
			}
			if msg := err.Error(); msg != logged {
				logged = msg
				cniconf.LogNoPrimary(log, err, fmt.Sprintf("waiting up to %s for the primary CNI", waitForPrimary))
			}
			// At the deadline, once more round the loop: the error then
			// says what the dir holds at that moment.
			if _, err := cniconf.WaitForPrimary(waitCtx, cfg.CNIConfDir); err != nil && waitCtx.Err() == nil {
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

// CheckPluginBinary makes sure that path, the plugin binary to install (or,
// for uninstall, the one to recognise), is there. Its errors name the path.
func CheckPluginBinary(path string) error {
	if path == "" {
		return errors.New("no plugin binary given (--plugin-binary)")
	}
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("plugin binary %s does not exist (give the pktmeta CNI plugin's path with --plugin-binary)", path)
	case err != nil:
		return fmt.Errorf("plugin binary %s: %w", path, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("plugin binary %s is not a regular file", path)
	}
	return nil
}

// PluginBesideAgent is the plugin binary that the one-shot install and
// uninstall use by default: the file named pktmeta in the directory of the
// agent's own executable, symlinks resolved (a link to bin/pktmeta-agent
// finds bin/pktmeta). `make build` puts the two side by side.
func PluginBesideAgent() (string, error) {
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("the agent's own executable: %w", err)
	}
	if real, err := filepath.EvalSymlinks(exe); err == nil {
		exe = real
	}
	return filepath.Join(filepath.Dir(exe), cniconf.PluginType), nil
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
	err := datapath.Destroy(pinPath, log)
	if errors.Is(err, datapath.ErrNotBPFFS) {
		return nil
	}
	if err == nil {
		log.Info("datapath removed", "pinPath", pinPath)
	}
	return err
}

// shutdown runs after ctx ended: uninstall only when the DaemonSet is
// going (or configured to always); a rolling upgrade or reboot leaves the
// chain entry, the plugin and the datapath in place, so tagging goes on.
func (a *Agent) shutdown(d *datapath.Datapath, cross *crossNode) error {
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
	if cross != nil {
		// A node without pktmeta holds no id and names nothing. pktmeta's
		// namespace may be going away with the install (kubectl delete
		// -k): then there is nothing left to remove.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		cross.mu.Lock()
		id := cross.id
		cross.mu.Unlock()
		if err := cross.c.Unpublish(ctx, id); err != nil {
			a.log.Warn("uninstall", "err", err)
		}
	}
	return nil
}
