// Package testutil holds helpers shared by tests that need root, bpffs and
// network namespaces.
package testutil

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// RequireRoot skips t when not running as root. CI runs as root, so these
// tests always run there.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (BPF, bpffs, network namespaces); CI runs it as root")
	}
}

// PinPath mounts a private bpffs instance in a temp dir and returns a pin
// path inside it. Unmounting at cleanup drops every pin the test made, so
// nothing outlives the test and a real /sys/fs/bpf/pktmeta is never touched.
func PinPath(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	dir := t.TempDir()
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs at %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs %s: %v", dir, err)
		}
	})
	return filepath.Join(dir, "pktmeta")
}
