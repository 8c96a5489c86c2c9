package crihost

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"
)

// CommandError is a failed crictl or ctr run.
type CommandError struct {
	Args     []string
	ExitCode int // -1 when it did not run or was killed
	Stderr   string
	Err      error
}

func (e *CommandError) Error() string {
	return fmt.Sprintf("%s: %v: %s", strings.Join(e.Args, " "), e.Err, strings.TrimSpace(e.Stderr))
}

func (e *CommandError) Unwrap() error { return e.Err }

// Crictl runs crictl against this host and returns its stdout. The
// endpoints are given as flags as well as in the config file, so that
// neither /etc/crictl.yaml nor $CONTAINER_RUNTIME_ENDPOINT can redirect it
// to a system containerd.
func (h *Host) Crictl(ctx context.Context, args ...string) ([]byte, error) {
	ep := "unix://" + h.Socket
	full := append([]string{"--config", h.crictlConfig, "--runtime-endpoint", ep, "--image-endpoint", ep}, args...)
	return run(ctx, h.Tools.Crictl, full...)
}

// Ctr runs containerd's own client in the CRI's namespace (k8s.io).
func (h *Host) Ctr(ctx context.Context, args ...string) ([]byte, error) {
	return run(ctx, h.Tools.Ctr, append([]string{"--address", h.Socket, "--namespace", "k8s.io"}, args...)...)
}

func run(ctx context.Context, bin string, args ...string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		code := -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		return stdout.Bytes(), &CommandError{Args: append([]string{bin}, args...), ExitCode: code, Stderr: stderr.String(), Err: err}
	}
	return stdout.Bytes(), nil
}

// crictlJSON runs crictl's subcommand args[0] with `-o json` and decodes
// its output into v. crictl stops parsing flags at the first argument, so
// the flag goes right after the subcommand.
func (h *Host) crictlJSON(ctx context.Context, v any, args ...string) error {
	full := append([]string{args[0], "-o", "json"}, args[1:]...)
	out, err := h.Crictl(ctx, full...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("crictl %s: decode output: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// Condition is one of the CRI's status conditions (RuntimeReady,
// NetworkReady).
type Condition struct {
	Type    string `json:"type"`
	Status  bool   `json:"status"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

// Conditions returns the CRI's status conditions (`crictl info`).
func (h *Host) Conditions(ctx context.Context) (map[string]Condition, error) {
	var info struct {
		Status struct {
			Conditions []Condition `json:"conditions"`
		} `json:"status"`
	}
	if err := h.crictlJSON(ctx, &info, "info"); err != nil {
		return nil, err
	}
	out := map[string]Condition{}
	for _, c := range info.Status.Conditions {
		out[c.Type] = c
	}
	return out, nil
}

// WaitNetworkReady waits until the CRI reports NetworkReady: containerd
// has loaded a conflist from its conf_dir (it watches the directory, so
// one written after Start is picked up within moments).
func (h *Host) WaitNetworkReady(ctx context.Context, timeout time.Duration) error {
	return h.waitReady(ctx, timeout, true)
}

// waitReady polls `crictl info` until RuntimeReady (and NetworkReady when
// network is set) holds, containerd exits, or the timeout passes.
func (h *Host) waitReady(ctx context.Context, timeout time.Duration, network bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		if !h.running() {
			return fmt.Errorf("containerd exited (%v); log:\n%s", h.waitErr, h.logTail())
		}
		// containerd keeps running without its CRI plugin (a bad CRI
		// setting): RuntimeReady would never come.
		if tail := h.logTail(); strings.Contains(tail, `failed to load plugin io.containerd.grpc.v1.cri"`) {
			return fmt.Errorf("containerd started without its CRI plugin; log:\n%s", tail)
		}
		conds, err := h.Conditions(ctx)
		switch {
		case err != nil:
			last = err
		case !conds["RuntimeReady"].Status:
			last = fmt.Errorf("RuntimeReady: %+v", conds["RuntimeReady"])
		case network && !conds["NetworkReady"].Status:
			last = fmt.Errorf("NetworkReady: %+v", conds["NetworkReady"])
		default:
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("containerd at %s not ready after %s: %w; log:\n%s", h.Socket, timeout, last, h.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// ImportImage imports a docker-archive or OCI tarball into the CRI's
// image store (`ctr images import`), unpacked for our snapshotter, and
// waits until the CRI lists it: the CRI learns of imported images from
// containerd's events, a moment after ctr returns.
func (h *Host) ImportImage(ctx context.Context, tarPath string) error {
	out, err := h.Ctr(ctx, "images", "import", "--snapshotter", h.Snapshotter, tarPath)
	if err != nil {
		return fmt.Errorf("import %s: %w", tarPath, err)
	}
	// "unpacking pktmeta.test/pause:1 (sha256:...)...done"
	var refs []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "unpacking" {
			refs = append(refs, f[1])
		}
	}
	if len(refs) == 0 {
		return fmt.Errorf("import %s: no image in ctr's output: %s", tarPath, out)
	}
	for _, ref := range refs {
		if err := h.waitImage(ctx, ref); err != nil {
			return err
		}
	}
	return nil
}

func (h *Host) waitImage(ctx context.Context, ref string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := h.Crictl(ctx, "inspecti", ref)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("image %s imported but the CRI does not list it: %w", ref, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// PodIDs lists the ids of all pod sandboxes, ready or not.
func (h *Host) PodIDs(ctx context.Context) ([]string, error) {
	out, err := h.Crictl(ctx, "pods", "--quiet")
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

// ContainerIDs lists the ids of all containers of a pod ("" for all),
// running or not.
func (h *Host) ContainerIDs(ctx context.Context, podID string) ([]string, error) {
	args := []string{"ps", "--all", "--quiet"}
	if podID != "" {
		args = append(args, "--pod", podID)
	}
	out, err := h.Crictl(ctx, args...)
	if err != nil {
		return nil, err
	}
	return strings.Fields(string(out)), nil
}

// runCombined is run with stdout and stderr in one stream, in order.
func runCombined(ctx context.Context, bin string, args ...string) ([]byte, error) {
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	if err != nil {
		code := -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		}
		return out, &CommandError{Args: append([]string{bin}, args...), ExitCode: code, Stderr: string(out), Err: err}
	}
	return out, nil
}
