package crihost

// Finding and removing an instance's processes, mounts and cgroups.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// processes finds the pids that belong to this instance: in its cgroups, or
// with its directory on the command line. Our own process is never one.
func (f footprint) processes() []int {
	pids := map[int]bool{}
	for _, cg := range f.cgroupDirs() {
		_ = filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			for _, l := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(l); err == nil {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		// dir+"/": every reference is to a file inside, and another
		// instance's directory may have ours as a prefix (pmcri-1-2, pmcri-1-23).
		if err == nil && bytes.Contains(cmdline, []byte(f.dir+"/")) {
			pids[pid] = true
		}
	}
	delete(pids, os.Getpid())
	out := make([]int, 0, len(pids))
	for pid := range pids {
		// A zombie has already exited; its parent (the reaper) collects it.
		if !isZombie(pid) {
			out = append(out, pid)
		}
	}
	sort.Ints(out)
	return out
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// Field 3, after the parenthesised command name (which may hold spaces).
	if i := bytes.LastIndexByte(b, ')'); i >= 0 && len(b) > i+2 {
		return b[i+2] == 'Z'
	}
	return false
}

// killAll SIGKILLs the instance's processes until none is left: first
// everything but the reaper (container processes, shims, containerd), and
// the reaper only once those are gone, so that it collects them rather
// than leaving zombies to PID 1. Usually the reaper has exited by itself
// by then.
func (f footprint) killAll(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		pids := f.processes()
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes of %s still alive after %s: %v", f.dir, timeout, describePids(pids))
		}
		others, reapers := f.splitReapers(pids)
		if len(others) == 0 {
			others = reapers
		}
		for _, pid := range others {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// splitReapers separates the reaper (whose command line starts with our
// bin/reaper) from the other processes.
func (f footprint) splitReapers(pids []int) (others, reapers []int) {
	reaper := []byte(filepath.Join(f.dir, "bin", "reaper") + "\x00")
	for _, pid := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if bytes.HasPrefix(b, reaper) {
			reapers = append(reapers, pid)
		} else {
			others = append(others, pid)
		}
	}
	return others, reapers
}

func describePids(pids []int) []string {
	var out []string
	for _, pid := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("%d(%s)", pid, strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")))
	}
	return out
}

// mounts lists mount points at or under the directory, deepest first.
func (f footprint) mounts() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		fields := strings.Fields(l)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == f.dir || strings.HasPrefix(mp, f.dir+"/") {
			out = append(out, mp)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// unescapeMountinfo undoes the octal escapes (\040 for space) of
// /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// unmountAll unmounts everything under the directory, deepest first, and
// the directory's own bind mount last. A busy mount is detached lazily.
func (f footprint) unmountAll() error {
	for range 10 {
		mps, err := f.mounts()
		if err != nil {
			return err
		}
		if len(mps) == 0 {
			return nil
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
	}
	mps, _ := f.mounts()
	return fmt.Errorf("mounts left under %s: %v", f.dir, mps)
}

// cgroupDirs lists /<id> in every mounted cgroup hierarchy (v1
// controllers, name=systemd, and the v2 "unified" tree of a hybrid setup).
func (f footprint) cgroupDirs() []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(l, " - ", 2)
		fields := strings.Fields(parts[0])
		if len(parts) != 2 || len(fields) < 5 {
			continue
		}
		if fs := strings.Fields(parts[1]); len(fs) == 0 || (fs[0] != "cgroup" && fs[0] != "cgroup2") {
			continue
		}
		d := filepath.Join(unescapeMountinfo(fields[4]), f.id)
		if _, err := os.Stat(d); err == nil {
			out = append(out, d)
		}
	}
	return out
}

// removeCgroups removes the cgroup trees below /<id>, children first. runc
// deletes a container's own cgroup; the parent we named is left to us.
func (f footprint) removeCgroups() error {
	var errs []error
	for _, root := range f.cgroupDirs() {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := unix.Rmdir(dirs[i]); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dirs[i], err))
			}
		}
	}
	return errors.Join(errs...)
}
