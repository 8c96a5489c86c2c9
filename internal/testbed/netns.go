package testbed

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

const (
	// netnsDir is where `ip netns add` pins namespaces, so `ip -n <name>`
	// and `ip netns list` work on ours while debugging a test.
	netnsDir = "/run/netns"
	// namePrefix starts every name the testbed gives to a namespace, temp
	// dir or nftables table.
	namePrefix = "pmtb-"
)

// newID returns "pmtb-<pid>-<random>". The pid lets CleanupStale tell the
// leftovers of a dead test process from those of a running one.
func newID() (string, error) {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random id: %w", err)
	}
	return fmt.Sprintf("%s%d-%s", namePrefix, os.Getpid(), hex.EncodeToString(b)), nil
}

// newNetns creates a network namespace and pins it by bind-mounting its nsfs
// inode on path, as `ip netns add` does. The mount namespace is untouched.
func newNetns(path string) (err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	f.Close()
	defer func() {
		if err != nil {
			os.Remove(path)
		}
	}()

	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread dies with this goroutine, so the
		// runtime cannot hand a thread in the new namespace to anyone else.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount %s: %w", self, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		return fmt.Errorf("create netns %s: %w", path, err)
	}
	return nil
}

// removeNetns unpins a namespace created by newNetns. The kernel destroys
// the namespace, and with it its veths, once nothing else references it
// (open sockets do). A path that is already gone is not an error.
func removeNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove netns %s: unmount: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", path, err)
	}
	return nil
}

// inNetns runs fn on a locked OS thread switched into the network namespace
// at path, and switches it back afterwards (the thread is discarded if that
// fails). Only the network namespace changes.
func inNetns(path string, fn func() error) error {
	return ns.WithNetNSPath(path, func(ns.NetNS) error { return fn() })
}

// runIn runs a program with its network namespace being the one at path:
// it is forked from a thread that inNetns switched there.
func runIn(ctx context.Context, path string, stdin []byte, name string, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	err := inNetns(path, func() error {
		cmd := exec.CommandContext(ctx, name, args...)
		if stdin != nil {
			cmd.Stdin = bytes.NewReader(stdin)
		}
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		return cmd.Run()
	})
	if err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "),
			err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// writeSysctl sets a sysctl such as "net/ipv4/ip_forward". Call it from
// inside inNetns: /proc/sys/net resolves to the opening thread's namespace.
func writeSysctl(name, value string) error {
	if err := os.WriteFile(filepath.Join("/proc/sys", name), []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// CleanupStale removes the namespaces and temp dirs left behind by testbed
// nodes of processes that no longer exist (a test binary killed by a timeout
// never runs its cleanups). Leftovers of live processes are not touched, so
// it is safe to call while other test binaries use the testbed.
func CleanupStale() error {
	var errs []error
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if staleName(e.Name()) {
				errs = append(errs, removeNetns(filepath.Join(netnsDir, e.Name())))
			}
		}
	}
	if ents, err := os.ReadDir(os.TempDir()); err == nil {
		for _, e := range ents {
			if e.IsDir() && staleName(e.Name()) {
				errs = append(errs, os.RemoveAll(filepath.Join(os.TempDir(), e.Name())))
			}
		}
	}
	return errors.Join(errs...)
}

// staleName reports whether name is "pmtb-<pid>-..." for a pid that is gone.
func staleName(name string) bool {
	rest, ok := strings.CutPrefix(name, namePrefix)
	if !ok {
		return false
	}
	pidStr, _, ok := strings.Cut(rest, "-")
	if !ok {
		return false
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid <= 0 {
		return false
	}
	return errors.Is(unix.Kill(pid, 0), unix.ESRCH)
}
