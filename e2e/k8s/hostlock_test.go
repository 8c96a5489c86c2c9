package k8s

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hostlock runs hack/hostlock.sh with its lock and the e2e state in temp
// paths, so that it never meets a real run's.
func hostlock(ctx context.Context, t *testing.T, lock, what string, env []string, cmd ...string) *exec.Cmd {
	t.Helper()
	script, err := filepath.Abs("../../hack/hostlock.sh")
	if err != nil {
		t.Fatal(err)
	}
	c := exec.CommandContext(ctx, script, append([]string{what}, cmd...)...)
	c.Env = append(os.Environ(), "PKTMETA_HOST_LOCK="+lock, "PKTMETA_E2E_STATE="+filepath.Join(filepath.Dir(lock), "state"))
	c.Env = append(c.Env, env...)
	return c
}

// make test and make e2e-k8s never share the host: the second refuses at
// once and names the first; a nested call (make test running e2e-k8s)
// runs; once the first is done, the lock is free again.
func TestHostLock(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	lock := filepath.Join(t.TempDir(), "host.lock")
	release := filepath.Join(filepath.Dir(lock), "release")

	first := hostlock(ctx, t, lock, "make test", nil, "sh", "-c", `echo held; while [ ! -e "$0" ]; do sleep 0.05; done`, release)
	out, err := first.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := first.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.WriteFile(release, nil, 0o644); first.Wait() })
	buf := make([]byte, 5)
	if _, err := out.Read(buf); err != nil || string(buf) != "held\n" {
		t.Fatalf("first run did not start: %q %v", buf, err)
	}

	got, err := hostlock(ctx, t, lock, "make e2e-k8s", nil, "true").CombinedOutput()
	if err == nil || !strings.Contains(string(got), "in use by: make test (pid ") {
		t.Fatalf("a second run while the first holds the host: %v\n%s", err, got)
	}
	if got, err := hostlock(ctx, t, lock, "make e2e-k8s", []string{"PKTMETA_HOST_LOCKED=" + lock}, "true").CombinedOutput(); err != nil {
		t.Fatalf("a nested run under the same lock: %v\n%s", err, got)
	}

	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := first.Wait(); err != nil {
		t.Fatal(err)
	}
	if got, err := hostlock(ctx, t, lock, "make e2e-k8s", nil, "true").CombinedOutput(); err != nil {
		t.Fatalf("after the first run ended: %v\n%s", err, got)
	}
}

// A run that died while something it started still holds the lock (a
// cluster it left behind): the next run says so, tries the teardown, and
// refuses while the holder lives.
func TestHostLockHolderOutlivesItsRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	lock := filepath.Join(t.TempDir(), "host.lock")
	// The run starts a holder in the background and exits at once.
	holder := hostlock(ctx, t, lock, "make e2e-k8s", nil, "sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!")
	pid, err := holder.Output()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { exec.Command("kill", strings.TrimSpace(string(pid))).Run() })

	got, err := hostlock(ctx, t, lock, "make test", nil, "true").CombinedOutput()
	if err == nil || !strings.Contains(string(got), "is gone but its cluster still holds the host") ||
		!strings.Contains(string(got), "cannot run at the same time") {
		t.Fatalf("with a leftover holder: %v\n%s", err, got)
	}
}
