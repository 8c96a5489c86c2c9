package crihost

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Options configure Start. The zero value is usable: it runs a containerd
// with empty CNI directories of its own and no images.
type Options struct {
	// Tools are the binaries to run; zero means LookupTools().
	Tools Tools
	// CNIBinDir and CNIConfDir become the CRI plugin's CNI bin_dir and
	// conf_dir. Empty means directories inside the host's directory
	// (Host.CNIBinDir, Host.CNIConfDir), where a test, or a node agent
	// container with them mounted, installs plugins and a conflist.
	// containerd watches conf_dir, so a conflist may appear after Start.
	CNIBinDir  string
	CNIConfDir string
	// Images are docker-archive tarballs imported once containerd is up.
	// The sandbox image must be among them or imported before RunPod.
	Images []string
	// SandboxImage is the CRI sandbox ("pause") image; default PauseImage.
	SandboxImage string
	// Snapshotter: "overlayfs", "native", or "" to use overlayfs when an
	// overlay mount works here and native otherwise.
	Snapshotter string
	// SystemNetnsDir puts pod network namespaces in /var/run/netns (cni-*),
	// as a stock containerd does, instead of under the host's state
	// directory. Either way they are removed by Close.
	SystemNetnsDir bool
	// TempDir is where the host's directory is created; default
	// os.TempDir(), the only place CleanupStale looks. Keep it short: unix
	// socket paths are limited to 107 bytes.
	TempDir string
	// ReadyTimeout bounds the wait for the CRI to report RuntimeReady;
	// default 30s.
	ReadyTimeout time.Duration
}

// Host is one private containerd with its CRI plugin.
type Host struct {
	// ID is the base name of Dir ("pmcri-<pid>-<n>"): the prefix by which
	// everything the host creates is found again, and its cgroup parent.
	ID string
	// Dir holds the host's config, root, state, sockets, logs and pod log
	// directories. It is a shared bind mount of itself, so containers can
	// mount directories below it with HostToContainer propagation (CRI
	// refuses that on a private mount, which / is on this machine).
	Dir          string
	Socket       string // containerd gRPC (and CRI) socket
	Tools        Tools
	Snapshotter  string
	SandboxImage string
	// CgroupParent is every pod's cgroup parent unless PodSpec says
	// otherwise (cgroupfs driver, so a plain path).
	CgroupParent string

	cniBinDir, cniConfDir string
	crictlConfig          string

	reaper   *exec.Cmd
	exited   chan struct{} // closed when the reaper (and so containerd) exited
	waitErr  error         // the reaper's exit status, once exited is closed
	lock     *os.File      // flock on Dir/.lock: tells CleanupStale we are alive
	fp       footprint
	closeMu  sync.Mutex
	closed   bool
	closeErr error
}

// Start runs a private containerd and waits until its CRI is ready. It
// needs root. On error nothing is left behind.
func Start(ctx context.Context, o Options) (h *Host, err error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("crihost: needs root")
	}
	if o.Tools == (Tools{}) {
		if o.Tools, err = LookupTools(); err != nil {
			return nil, err
		}
	}
	h, err = newHost(o)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			if cerr := h.Close(); cerr != nil {
				err = fmt.Errorf("%w (and cleaning up: %v)", err, cerr)
			}
			h = nil
		}
	}()
	if err := h.prepare(ctx, o); err != nil {
		return h, err
	}
	if err := h.startDaemon(); err != nil {
		return h, err
	}
	readyTimeout := o.ReadyTimeout
	if readyTimeout == 0 {
		readyTimeout = 30 * time.Second
	}
	if err := h.waitReady(ctx, readyTimeout, false); err != nil {
		return h, err
	}
	for _, img := range o.Images {
		if err := h.ImportImage(ctx, img); err != nil {
			return h, err
		}
	}
	return h, nil
}

// newHost creates the directory, takes its lock and makes it a shared
// mount. From here on Close can undo everything.
func newHost(o Options) (*Host, error) {
	parent := o.TempDir
	if parent == "" {
		parent = os.TempDir()
	}
	dir, err := os.MkdirTemp(parent, fmt.Sprintf("%s%d-", namePrefix, os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("crihost: %w", err)
	}
	if dir, err = filepath.EvalSymlinks(dir); err != nil {
		return nil, err
	}
	h := &Host{
		ID:           filepath.Base(dir),
		Dir:          dir,
		Socket:       filepath.Join(dir, "containerd.sock"),
		Tools:        o.Tools,
		SandboxImage: o.SandboxImage,
		exited:       make(chan struct{}),
		fp:           newFootprint(dir),
	}
	h.CgroupParent = "/" + h.ID
	if h.SandboxImage == "" {
		h.SandboxImage = PauseImage
	}
	if len(h.Socket)+len(".ttrpc") > 107 {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("crihost: socket path %s is too long for a unix socket; set Options.TempDir", h.Socket)
	}
	if h.lock, err = lockDir(dir); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := makeSharedMount(dir); err != nil {
		h.lock.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	return h, nil
}

// namePrefix starts the name of every directory a Host creates in the temp
// dir; CleanupStale looks for it.
const namePrefix = "pmcri-"

func lockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}

// makeSharedMount bind-mounts dir onto itself and makes it a shared mount:
// the CRI plugin refuses HostToContainer and Bidirectional mounts from a
// private mount, and a node agent container needs them (for pod netns).
func makeSharedMount(dir string) error {
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind mount %s: %w", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		return fmt.Errorf("make %s a shared mount: %w", dir, err)
	}
	return nil
}

// prepare lays out the directory and writes the configs.
func (h *Host) prepare(ctx context.Context, o Options) error {
	h.cniBinDir, h.cniConfDir = o.CNIBinDir, o.CNIConfDir
	if h.cniBinDir == "" {
		h.cniBinDir = filepath.Join(h.Dir, "cni", "bin")
	}
	if h.cniConfDir == "" {
		h.cniConfDir = filepath.Join(h.Dir, "cni", "net.d")
	}
	for _, d := range []string{h.cniBinDir, h.cniConfDir, h.path("bin"), h.path("logs"), h.path("pods"), h.path("runc")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := h.fp.noteOutsideDirs(); err != nil {
		return err
	}
	if err := h.fp.noteSysctls(); err != nil {
		return err
	}
	h.Snapshotter = o.Snapshotter
	if h.Snapshotter == "" {
		h.Snapshotter = "overlayfs"
		if err := overlaySupported(h.Dir); err != nil {
			h.Snapshotter = "native"
		}
	}
	// containerd's shims outlive their parent; see testdata/reaper.
	if err := buildEmbedded(ctx, "testdata/reaper", h.path("bin", "reaper")); err != nil {
		return err
	}
	cfg, err := daemonConfig{
		Root:           h.path("root"),
		State:          h.path("state"),
		Socket:         h.Socket,
		TTRPCSocket:    h.Socket + ".ttrpc",
		Opt:            h.path("opt"),
		SandboxImage:   h.SandboxImage,
		SystemNetnsDir: o.SystemNetnsDir,
		CNIBinDir:      h.cniBinDir,
		CNIConfDir:     h.cniConfDir,
		Snapshotter:    h.Snapshotter,
		Runc:           h.Tools.Runc,
		RuncRoot:       h.path("runc"),
	}.render()
	if err != nil {
		return err
	}
	if err := os.WriteFile(h.ConfigPath(), cfg, 0o644); err != nil {
		return err
	}
	h.crictlConfig = h.path("crictl.yaml")
	return os.WriteFile(h.crictlConfig, crictlConfig(h.Socket), 0o644)
}

func (h *Host) path(elem ...string) string {
	return filepath.Join(append([]string{h.Dir}, elem...)...)
}

// ConfigPath is containerd's config.toml.
func (h *Host) ConfigPath() string { return h.path("config.toml") }

// LogPath is containerd's log (stdout and stderr).
func (h *Host) LogPath() string { return h.path("logs", "containerd.log") }

// CNIBinDir is the CRI plugin's CNI bin_dir.
func (h *Host) CNIBinDir() string { return h.cniBinDir }

// CNIConfDir is the CRI plugin's CNI conf_dir.
func (h *Host) CNIConfDir() string { return h.cniConfDir }

// CrictlConfig is a crictl.yaml for this host (`crictl --config`).
func (h *Host) CrictlConfig() string { return h.crictlConfig }

// NetnsDir is where the CRI plugin mounts pod network namespaces, when not
// Options.SystemNetnsDir. A node agent container that needs the pods' netns
// mounts this with HostToContainer propagation.
func (h *Host) NetnsDir() string {
	return h.path("state", "io.containerd.grpc.v1.cri", "netns")
}

// MkdirShared makes a directory inside Dir, on its shared mount, for a
// host path a container mounts with HostToContainer or Bidirectional
// propagation. Close removes it with everything else.
func (h *Host) MkdirShared(name string) (string, error) {
	p := h.path("shared", name)
	return p, os.MkdirAll(p, 0o755)
}

// startDaemon runs `reaper containerd --config ...` in its own process
// group (a ^C meant for `go test` must not kill containerd before Close
// runs), with the shim's directory first on PATH.
func (h *Host) startDaemon() error {
	logf, err := os.OpenFile(h.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(h.path("bin", "reaper"), h.Tools.Containerd, "--config", h.ConfigPath())
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = h.Dir
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(h.Tools.Shim)+":"+os.Getenv("PATH"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start containerd: %w", err)
	}
	h.reaper = cmd
	go func() {
		h.waitErr = cmd.Wait()
		close(h.exited)
	}()
	return nil
}

// running reports whether containerd (its reaper) is still up.
func (h *Host) running() bool {
	if h.reaper == nil {
		return false
	}
	select {
	case <-h.exited:
		return false
	default:
		return true
	}
}

// logTail is the end of containerd's log, for error messages.
func (h *Host) logTail() string {
	b, err := os.ReadFile(h.LogPath())
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 20 {
		lines = lines[len(lines)-20:]
	}
	return strings.Join(lines, "\n")
}

// Close removes every pod, stops containerd and removes everything the host
// created: processes, mounts, cgroups, netns, shim sockets, libcni cache
// entries and the directory. It is idempotent and collects all errors;
// whatever a graceful step misses is killed and removed by force.
func (h *Host) Close() error {
	h.closeMu.Lock()
	defer h.closeMu.Unlock()
	if h.closed {
		return h.closeErr
	}
	h.closed = true
	var errs []error
	if h.responding() {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		if err := h.removeAllPods(ctx); err != nil {
			errs = append(errs, err)
		}
		cancel()
		// With the pods gone the shims exit, and then the reaper.
		h.stopDaemon(15 * time.Second)
	} else if h.running() {
		// containerd is gone or hung: nothing graceful is left to wait for.
		h.stopDaemon(time.Second)
	}
	if err := h.fp.remove(othersAlive(h.Dir)); err != nil {
		errs = append(errs, err)
	}
	if h.reaper != nil {
		// fp.remove killed whatever the reaper waited for; collect it, so
		// that it is not a zombie of ours.
		select {
		case <-h.exited:
		case <-time.After(5 * time.Second):
			errs = append(errs, fmt.Errorf("reaper %d did not exit", h.reaper.Process.Pid))
		}
	}
	if h.lock != nil {
		h.lock.Close()
	}
	h.closeErr = errors.Join(errs...)
	return h.closeErr
}

// responding reports whether containerd answers the CRI within moments.
func (h *Host) responding() bool {
	if !h.running() {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err := h.Crictl(ctx, "version")
	return err == nil
}

// removeAllPods stops and removes every sandbox, which runs CNI DEL for
// each and lets the shims exit.
func (h *Host) removeAllPods(ctx context.Context) error {
	ids, err := h.PodIDs(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, id := range ids {
		// --force stops the sandbox first (StopPodSandbox: CNI DEL).
		if _, err := h.Crictl(ctx, "rmp", "--force", id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stopDaemon asks containerd to exit (SIGTERM, forwarded by the reaper)
// and waits for the reaper, which exits once containerd and the shims it
// adopted are gone. Past the timeout, footprint.remove kills what is left.
func (h *Host) stopDaemon(timeout time.Duration) {
	_ = h.reaper.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
	case <-time.After(timeout):
	}
}

// Leftovers describes anything of this host that still exists; after
// Close it should be empty.
func (h *Host) Leftovers() []string { return h.fp.leftovers() }
