package deploy

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/agent"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// The ConfigMap's config.yaml is one the agent itself loads and accepts,
// and what the flags leave of it is what the manifests mean.
func TestConfigLoadsInAgent(t *testing.T) {
	objs := manifests(t)
	cm := only[*corev1.ConfigMap](t, objs)
	p := filepath.Join(t.TempDir(), ConfigKey)
	if err := os.WriteFile(p, []byte(cm.Data[ConfigKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := agent.Defaults()
	if err := cfg.LoadFile(p); err != nil {
		t.Fatalf("pktmeta-agent refuses the ConfigMap: %v", err)
	}
	// What the DaemonSet adds: --node-name and POD_NAMESPACE.
	cfg.NodeName, cfg.PodNamespace = "node-1", Namespace
	if err := cfg.Validate(); err != nil {
		t.Fatalf("pktmeta-agent refuses the ConfigMap: %v", err)
	}
	want := agentConfig(t, objs)
	if cfg.MetricsAddr != want.MetricsAddr || cfg.MetricsAuth != want.MetricsAuth || cfg.Plugin.PinPath != want.Plugin.PinPath || cfg.CRISocket != want.CRISocket ||
		cfg.UninstallOnExit != want.UninstallOnExit || strings.Join(cfg.LabelTags, ",") != strings.Join(want.LabelTags, ",") ||
		strings.Join(cfg.NetnsDirs, ",") != strings.Join(want.NetnsDirs, ",") || cfg.Plugin.MaxConnections != want.Plugin.MaxConnections ||
		cfg.CrossNode.Mode != want.CrossNode.Mode || cfg.CrossNode.NoMAC != want.CrossNode.NoMAC {
		t.Errorf("the agent read %+v\nfrom %+v", cfg, want)
	}
}

// pktmeta-agent accepts the DaemonSet's command lines: every flag exists.
// Uses $PKTMETA_BIN/pktmeta-agent (make test builds it) or builds the
// agent; skipped when neither can be had.
func TestAgentAcceptsArgs(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bin := filepath.Join(os.Getenv("PKTMETA_BIN"), "pktmeta-agent")
	if os.Getenv("PKTMETA_BIN") == "" || !isFile(bin) {
		goBin, err := exec.LookPath("go")
		if err != nil {
			t.Skip("no pktmeta-agent in $PKTMETA_BIN and no go command")
		}
		// As the Makefile builds it, to share its build cache.
		bin = filepath.Join(dir, "pktmeta-agent")
		build := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", bin, "../cmd/pktmeta-agent")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build: %v\n%s", err, out)
		}
	}

	objs := manifests(t)
	cm := only[*corev1.ConfigMap](t, objs)
	cfgPath := filepath.Join(dir, ConfigKey)
	if err := os.WriteFile(cfgPath, []byte(cm.Data[ConfigKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	spec := only[*appsv1.DaemonSet](t, objs).Spec.Template.Spec
	for _, c := range append(spec.InitContainers, spec.Containers...) {
		var args []string
		for _, a := range c.Args {
			a = strings.ReplaceAll(a, "$(NODE_NAME)", "node-1")
			if strings.HasPrefix(a, "--config=") {
				a = "--config=" + cfgPath
			}
			args = append(args, a)
		}
		// -h last: the agent parses everything before it, then prints its
		// usage and exits 0; an unknown flag fails first.
		cmd := exec.CommandContext(ctx, bin, append(args, "-h")...)
		out, err := cmd.CombinedOutput()
		if err != nil || strings.Contains(string(out), "not defined") {
			t.Errorf("container %s: pktmeta-agent %s: %v\n%s", c.Name, strings.Join(args, " "), err, out)
		}
	}
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}
