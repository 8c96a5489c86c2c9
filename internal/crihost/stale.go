package crihost

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// CleanupStale removes what hosts of killed test processes left behind:
// every pmcri-* directory in the temp dir whose lock nobody holds, with
// its processes, mounts, cgroups and outside files. Hosts that are alive
// (in this process or another) hold their lock and are skipped.
func CleanupStale() error {
	dirs, err := filepath.Glob(filepath.Join(os.TempDir(), namePrefix+"*"))
	if err != nil {
		return err
	}
	var errs []error
	for _, dir := range dirs {
		if strings.HasPrefix(filepath.Base(dir), buildPrefix) {
			if buildDirStale(dir) {
				errs = append(errs, os.RemoveAll(dir))
			}
			continue
		}
		st, err := os.Lstat(dir)
		if err != nil || !st.IsDir() {
			continue
		}
		if !dirStale(dir) {
			continue
		}
		if err := newFootprint(dir).remove(othersAlive(dir)); err != nil {
			errs = append(errs, fmt.Errorf("stale %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// othersAlive reports whether a host other than the one in dir is running
// (in any process).
func othersAlive(dir string) bool {
	dirs, _ := filepath.Glob(filepath.Join(filepath.Dir(dir), namePrefix+"*"))
	for _, d := range dirs {
		if d != dir && !strings.HasPrefix(filepath.Base(d), buildPrefix) && !dirStale(d) {
			return true
		}
	}
	return false
}

// dirStale: nobody holds the directory's lock. A directory without a lock
// file died between MkdirTemp and lockDir; its pid tells.
func dirStale(dir string) bool {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR, 0)
	if err != nil {
		return !pidAlive(pidOf(filepath.Base(dir), namePrefix))
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		return false
	}
	return true
}

func buildDirStale(dir string) bool {
	return !pidAlive(pidOf(filepath.Base(dir), buildPrefix))
}

// pidOf parses the pid from "<prefix><pid>-<random>"; 0 if there is none.
func pidOf(name, prefix string) int {
	var pid int
	rest, _, _ := strings.Cut(strings.TrimPrefix(name, prefix), "-")
	fmt.Sscanf(rest, "%d", &pid)
	return pid
}

func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}
