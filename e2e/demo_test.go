package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDemo runs `make demo`'s program end to end: README command 1 must keep
// working, and its own read-back checks must pass.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "pktmeta-demo"), "--cni-path", cniBinDir+":"+binDir)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("pktmeta-demo: %v\n%s", err, out)
	}
	for _, want := range []string{"DNAT: yes", "shop/frontend", "app=payments", "The workload table is empty", "shop/frontend-remote@node-1", "origin conn id", "(getsockopt SOL_PKTMETA): shop/frontend"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("demo output lacks %q:\n%s", want, out)
		}
	}
}
