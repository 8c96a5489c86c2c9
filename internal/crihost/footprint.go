package crihost

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// footprint is everything one private containerd can leave on the machine,
// derived from its directory alone, so that Close and CleanupStale (after
// a killed test) remove the same things:
//
//   - processes: containerd and the reaper (their command lines name the
//     directory), the runc shims (-address <dir>/containerd.sock), and the
//     container processes, all in cgroups below /<id> in every hierarchy;
//   - mounts under the directory: the directory's own shared bind mount,
//     overlay rootfs mounts, sandbox /dev/shm tmpfs, netns bind mounts;
//   - cgroup directories /sys/fs/cgroup/<hierarchy>/<id>;
//   - outside the directory: shim sockets /run/containerd/s/<sha256>,
//     libcni's result cache /var/lib/cni/results/<net>-<sandbox>-<if>,
//     pod netns in /var/run/netns (Options.SystemNetnsDir), and the parent
//     directories of these when this instance created them.
type footprint struct {
	dir string // the host's directory, e.g. /tmp/pmcri-1234-5678
	id  string // its base name: cgroup parent and path prefix
}

func newFootprint(dir string) footprint {
	return footprint{dir: dir, id: filepath.Base(dir)}
}

func (f footprint) socket() string      { return filepath.Join(f.dir, "containerd.sock") }
func (f footprint) podsFile() string    { return filepath.Join(f.dir, "sandboxes.jsonl") }
func (f footprint) outsideFile() string { return filepath.Join(f.dir, "outside.json") }
func (f footprint) sysctlFile() string  { return filepath.Join(f.dir, "sysctls.json") }

// forwardingSysctl is switched on by the ptp plugin in the host's network
// namespace for every pod (the host routes between pods).
const forwardingSysctl = "/proc/sys/net/ipv4/ip_forward"

// noteSysctls remembers the forwarding setting before any pod exists.
func (f footprint) noteSysctls() error {
	b, err := os.ReadFile(forwardingSysctl)
	if err != nil {
		return err
	}
	v, err := json.Marshal(map[string]string{forwardingSysctl: strings.TrimSpace(string(b))})
	if err != nil {
		return err
	}
	return os.WriteFile(f.sysctlFile(), v, 0o600)
}

// restoreSysctls puts the setting back, unless another instance still runs
// (its pods need forwarding; the last one to go restores it).
func (f footprint) restoreSysctls(othersAlive bool) error {
	b, err := os.ReadFile(f.sysctlFile())
	if err != nil || othersAlive {
		return nil
	}
	var saved map[string]string
	if err := json.Unmarshal(b, &saved); err != nil {
		return err
	}
	for p, v := range saved {
		cur, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(cur)) != v {
			if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
				return fmt.Errorf("restore %s to %s: %w", p, v, err)
			}
		}
	}
	return nil
}

// outsideDirs are the directories outside ours that containerd or libcni
// create on first use.
func outsideDirs() []string {
	return []string{"/run/containerd", "/run/containerd/s", "/var/lib/cni", "/var/lib/cni/results"}
}

// sandboxRecord is one line of sandboxes.jsonl, written as soon as a pod
// sandbox exists: what cleanup needs if the test dies before removing it.
type sandboxRecord struct {
	ID    string `json:"id"`
	Netns string `json:"netns,omitempty"`
}

func (f footprint) recordSandbox(r sandboxRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	fh, err := os.OpenFile(f.podsFile(), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer fh.Close()
	_, err = fh.Write(append(b, '\n'))
	return err
}

// sandboxes lists every sandbox this instance ran: the record file plus
// whatever containerd still has on disk.
func (f footprint) sandboxes() []sandboxRecord {
	seen := map[string]bool{}
	var out []sandboxRecord
	if b, err := os.ReadFile(f.podsFile()); err == nil {
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			var r sandboxRecord
			if json.Unmarshal(sc.Bytes(), &r) == nil && r.ID != "" && !seen[r.ID] {
				seen[r.ID] = true
				out = append(out, r)
			}
		}
	}
	for _, d := range []string{
		filepath.Join(f.dir, "root", "io.containerd.grpc.v1.cri", "sandboxes"),
		filepath.Join(f.dir, "state", "io.containerd.runtime.v2.task", "k8s.io"),
	} {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			if !seen[e.Name()] {
				seen[e.Name()] = true
				out = append(out, sandboxRecord{ID: e.Name()})
			}
		}
	}
	return out
}

// noteOutsideDirs records which of outsideDirs do not exist yet: those we
// may remove again (when empty).
func (f footprint) noteOutsideDirs() error {
	var created []string
	for _, d := range outsideDirs() {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			created = append(created, d)
		}
	}
	b, err := json.Marshal(created)
	if err != nil {
		return err
	}
	return os.WriteFile(f.outsideFile(), b, 0o600)
}

// shimSocket is where containerd 1.6 puts the socket of the shim that runs
// a sandbox (the shim is shared by the pod's containers): a hash of our
// socket path, the namespace and the sandbox id, in /run/containerd/s no
// matter what state directory is configured.
func (f footprint) shimSocket(sandboxID string) string {
	sum := sha256.Sum256([]byte(filepath.Join(f.socket(), "k8s.io", sandboxID)))
	return fmt.Sprintf("/run/containerd/s/%x", sum)
}

// outside lists the files outside the directory that may still be ours.
func (f footprint) outside() []string {
	var out []string
	for _, sb := range f.sandboxes() {
		out = append(out, f.shimSocket(sb.ID))
		if sb.Netns != "" && !strings.HasPrefix(sb.Netns, f.dir+"/") {
			out = append(out, sb.Netns)
		}
		// libcni caches each attachment's result; containerd 1.6 cannot
		// move that cache, so it is /var/lib/cni/results for everyone.
		m, _ := filepath.Glob("/var/lib/cni/results/*-" + sb.ID + "-*")
		out = append(out, m...)
	}
	return out
}

// removeOutside removes those files (unmounting netns bind mounts first),
// then the outside directories this instance created if they are empty.
func (f footprint) removeOutside() error {
	var errs []error
	for _, p := range f.outside() {
		_ = unix.Unmount(p, unix.MNT_DETACH)
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	var created []string
	if b, err := os.ReadFile(f.outsideFile()); err == nil {
		_ = json.Unmarshal(b, &created)
	}
	// Children before parents; a directory someone else now uses is not
	// empty and stays.
	sort.Sort(sort.Reverse(sort.StringSlice(created)))
	for _, d := range created {
		_ = unix.Rmdir(d)
	}
	return errors.Join(errs...)
}

// leftovers describes whatever of the footprint still exists.
func (f footprint) leftovers() []string {
	var out []string
	if pids := f.processes(); len(pids) > 0 {
		out = append(out, fmt.Sprintf("processes: %v", describePids(pids)))
	}
	if mps, _ := f.mounts(); len(mps) > 0 {
		out = append(out, fmt.Sprintf("mounts: %v", mps))
	}
	if cgs := f.cgroupDirs(); len(cgs) > 0 {
		out = append(out, fmt.Sprintf("cgroups: %v", cgs))
	}
	for _, p := range f.outside() {
		if _, err := os.Lstat(p); err == nil {
			out = append(out, "file: "+p)
		}
	}
	if _, err := os.Stat(f.dir); err == nil {
		out = append(out, "directory: "+f.dir)
	}
	return out
}

// remove tears down what is left of the footprint (processes are killed,
// not stopped: by now containerd had its chance) and finally the directory.
// othersAlive says whether other instances still run.
func (f footprint) remove(othersAlive bool) error {
	var errs []error
	if err := f.killAll(10 * time.Second); err != nil {
		errs = append(errs, err)
	}
	// Outside files first: the sandbox records live in the directory.
	if err := f.removeOutside(); err != nil {
		errs = append(errs, err)
	}
	if err := f.unmountAll(); err != nil {
		errs = append(errs, err)
	}
	if err := f.removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	if err := f.restoreSysctls(othersAlive); err != nil {
		errs = append(errs, err)
	}
	if mps, _ := f.mounts(); len(mps) == 0 {
		// Never RemoveAll through a live mount: it would delete what the
		// mount shows (an image's layers, a bpffs), not our copy.
		if err := os.RemoveAll(f.dir); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", f.dir, err))
		}
	}
	return errors.Join(errs...)
}
