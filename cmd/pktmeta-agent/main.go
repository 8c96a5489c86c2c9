// Command pktmeta-agent is pktmeta's node agent.
//
//	pktmeta-agent run          install into the CNI chain, keep it there, own the
//	                           datapath, cover existing pods, export events/metrics/API
//	pktmeta-agent install      one-shot: copy the plugin, insert the conflist entry
//	                           (waits up to --wait-for-primary for a usable primary config)
//	pktmeta-agent uninstall    one-shot: remove the entry and the plugin, detach, unpin
//	pktmeta-agent mount-bpffs  mount bpffs at --bpffs unless mounted (init container)
//
// install and uninstall take the plugin binary from --plugin-binary, by
// default the pktmeta file beside this executable (symlinks resolved).
//
// Events go to stdout as JSON lines; logs go to stderr.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/pktmeta/pktmeta/internal/agent"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/version"
)

const usage = `usage: pktmeta-agent <run|install|uninstall|mount-bpffs> [flags]

run flags (a --config file is read first, flags override it):
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	cmd, args := os.Args[1], os.Args[2:]
	cfg := agent.Defaults()
	oneShot := cmd == "install" || cmd == "uninstall"
	// The one-shot commands install the plugin that was built or shipped
	// with this agent. The config file, then an explicit flag, win.
	var besideErr error
	if oneShot {
		cfg.PluginBinary, besideErr = agent.PluginBesideAgent()
	}
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	configFile := fs.String("config", "", "YAML config file (the DaemonSet's ConfigMap)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	bpffs := fs.String("bpffs", "/sys/fs/bpf", "mount-bpffs: where to mount bpffs")
	fs.StringVar(&cfg.CNIConfDir, "cni-conf-dir", cfg.CNIConfDir, "the host's CNI config dir")
	fs.StringVar(&cfg.CNIBinDir, "cni-bin-dir", cfg.CNIBinDir, "the host's CNI plugin dir")
	fs.StringVar(&cfg.PluginBinary, "plugin-binary", cfg.PluginBinary, "the pktmeta plugin binary to install (install, uninstall: the pktmeta beside this executable)")
	waitForPrimary := fs.Duration("wait-for-primary", agent.DefaultWaitForPrimary, "install: how long to wait for a usable primary CNI config before failing (0: don't wait)")
	fs.StringVar(&cfg.Plugin.PinPath, "pin-path", cfg.Plugin.PinPath, "bpffs directory of the pinned datapath")
	fs.StringVar(&cfg.StateDir, "state-dir", cfg.StateDir, "where the CNI config backup is kept")
	fs.StringVar(&cfg.RunDir, "run-dir", cfg.RunDir, "where the API socket is")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", cfg.MetricsAddr, "address of /metrics, /healthz, /readyz")
	fs.DurationVar(&cfg.GCInterval.Duration, "gc-interval", cfg.GCInterval.Duration, "how often to cover existing pods and remove gone ones")
	fs.StringVar(&cfg.CRISocket, "cri-socket", cfg.CRISocket, "CRI runtime socket, to name existing pods (empty: don't)")
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (label tags)")
	fs.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig (in a cluster: the service account)")
	fs.StringVar(&cfg.UninstallOnExit, "uninstall-on-exit", cfg.UninstallOnExit, "auto (only when the DaemonSet is deleted), never, always")
	fs.StringVar(&cfg.HostCgroupDir, "host-cgroup-dir", cfg.HostCgroupDir, "the host's /sys/fs/cgroup as mounted here (application interface; empty: this mount namespace's cgroup v2 root)")
	netnsDirs := fs.String("netns-dirs", strings.Join(cfg.NetnsDirs, ","), "dirs of bind-mounted pod network namespaces")
	labelTags := fs.String("label-tags", "", "comma-separated pod label keys to copy into tags")
	fs.Usage = func() {
		fmt.Fprint(os.Stderr, usage)
		fs.PrintDefaults()
	}
	// The config file is applied first so that flags given explicitly win.
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			*configFile = v
		} else if (a == "--config" || a == "-config") && i+1 < len(args) {
			*configFile = args[i+1]
		}
	}
	if *configFile != "" {
		if err := cfg.LoadFile(*configFile); err != nil {
			fmt.Fprintln(os.Stderr, "pktmeta-agent:", err)
			os.Exit(2)
		}
	}
	fs.Parse(args)
	if *netnsDirs != "" {
		cfg.NetnsDirs = strings.Split(*netnsDirs, ",")
	}
	if *labelTags != "" {
		cfg.LabelTags = strings.Split(*labelTags, ",")
	}
	cfg.PodName, cfg.PodNamespace = os.Getenv("POD_NAME"), os.Getenv("POD_NAMESPACE")
	if *waitForPrimary < 0 {
		fmt.Fprintln(os.Stderr, "pktmeta-agent: --wait-for-primary: want a duration >= 0, got", *waitForPrimary)
		os.Exit(2)
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "pktmeta-agent: --log-level:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	log.Info("pktmeta-agent "+cmd, "version", version.Version, "datapathRelease", datapath.Release)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd {
	case "run":
		err = agent.New(cfg, log, os.Stdout).Run(ctx)
	case "install":
		if err = pluginBinaryGiven(cfg.PluginBinary, besideErr); err == nil {
			err = agent.Install(ctx, cfg, *waitForPrimary, log)
		}
	case "uninstall":
		if err = pluginBinaryGiven(cfg.PluginBinary, besideErr); err == nil {
			err = agent.Uninstall(cfg, log)
		}
	case "mount-bpffs":
		err = agent.EnsureBPFFS(*bpffs, log)
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Error(cmd+" failed", "err", err)
		os.Exit(1)
	}
}

// pluginBinaryGiven checks the plugin binary of install and uninstall
// before anything changes: uninstall needs it too, to tell whether the
// binary in the CNI bin dir is ours. besideErr says why there is no
// default.
func pluginBinaryGiven(path string, besideErr error) error {
	if path == "" && besideErr != nil {
		return fmt.Errorf("no plugin binary: give --plugin-binary (no default: %w)", besideErr)
	}
	return agent.CheckPluginBinary(path)
}
