package crihost

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Propagation of a host mount into a container, as in a Pod's
// volumeMounts[].mountPropagation.
type Propagation int

const (
	// PropagationNone: mounts made on the host later are not seen.
	PropagationNone Propagation = iota
	// PropagationHostToContainer: the container sees mounts the host makes
	// below the path later (new pod netns, a bpffs mounted afterwards).
	// The host path must be on a shared mount: Host.Dir, /run/netns.
	PropagationHostToContainer
	// PropagationBidirectional: the host also sees mounts the container
	// makes. Needs a privileged container.
	PropagationBidirectional
)

func (p Propagation) cri() runtimeapi.MountPropagation {
	switch p {
	case PropagationHostToContainer:
		return runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER
	case PropagationBidirectional:
		return runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL
	}
	return runtimeapi.MountPropagation_PROPAGATION_PRIVATE
}

// Mount is a host path bind-mounted into a container (a hostPath volume).
type Mount struct {
	HostPath      string
	ContainerPath string
	ReadOnly      bool
	Propagation   Propagation
}

// ContainerSpec is what kubelet would send as a ContainerConfig, reduced
// to what tests need.
type ContainerSpec struct {
	Name  string // required, unique in the pod
	Image string // a local image ref, e.g. NetutilImage
	// Command replaces the image's entrypoint, Args its cmd.
	Command    []string
	Args       []string
	Env        []string // "KEY=VALUE"
	WorkingDir string
	Mounts     []Mount
	Labels     map[string]string
	// Annotations of the container (not the pod's).
	Annotations map[string]string
	Privileged  bool
	// CapAdd and CapDrop are capability names without the CAP_ prefix
	// ("NET_ADMIN", "BPF"); "ALL" drops or adds everything.
	CapAdd         []string
	CapDrop        []string
	ReadOnlyRootfs bool
	RunAsUser      *int64
}

// CreateContainer creates a container in a pod (`crictl create`) and
// returns its id. It does not start it.
func (h *Host) CreateContainer(ctx context.Context, p *Pod, spec ContainerSpec) (string, error) {
	if spec.Name == "" || spec.Image == "" {
		return "", fmt.Errorf("CreateContainer: Name and Image are required")
	}
	cfg, err := containerConfig(p, spec)
	if err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return "", err
	}
	path := filepath.Join(filepath.Dir(p.configPath), spec.Name+".container.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return "", err
	}
	out, err := h.Crictl(ctx, "create", p.ID, path, p.configPath)
	if err != nil {
		return "", fmt.Errorf("create container %s in %s/%s: %w", spec.Name, p.Spec.Namespace, p.Spec.Name, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// containerConfig builds the CRI ContainerConfig as kubelet would: its
// labels, a log file <name>.log in the pod's log directory, and the pod's
// namespace modes (each container gets its own PID namespace unless the
// pod uses the host's).
func containerConfig(p *Pod, spec ContainerSpec) (*runtimeapi.ContainerConfig, error) {
	labels := map[string]string{
		LabelContainerName: spec.Name,
		LabelPodName:       p.Spec.Name,
		LabelPodNamespace:  p.Spec.Namespace,
		LabelPodUID:        p.Spec.UID,
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	var envs []*runtimeapi.KeyValue
	for _, e := range spec.Env {
		k, v, ok := strings.Cut(e, "=")
		if !ok {
			return nil, fmt.Errorf("container %s: env %q is not KEY=VALUE", spec.Name, e)
		}
		// cri-api v0.37 made the value bytes (base64 in crictl's JSON); on
		// the wire it is the same as the string containerd 1.6 expects.
		envs = append(envs, &runtimeapi.KeyValue{Key: k, Value: []byte(v)})
	}
	var mounts []*runtimeapi.Mount
	for _, m := range spec.Mounts {
		mounts = append(mounts, &runtimeapi.Mount{
			ContainerPath: m.ContainerPath,
			HostPath:      m.HostPath,
			Readonly:      m.ReadOnly,
			Propagation:   m.Propagation.cri(),
		})
	}
	sc := &runtimeapi.LinuxContainerSecurityContext{
		Privileged:     spec.Privileged,
		ReadonlyRootfs: spec.ReadOnlyRootfs,
		NamespaceOptions: &runtimeapi.NamespaceOption{
			Network: nsMode(p.Spec.HostNetwork, runtimeapi.NamespaceMode_POD),
			Pid:     nsMode(p.Spec.HostPID, runtimeapi.NamespaceMode_CONTAINER),
			Ipc:     nsMode(p.Spec.HostIPC, runtimeapi.NamespaceMode_POD),
		},
	}
	if len(spec.CapAdd) > 0 || len(spec.CapDrop) > 0 {
		sc.Capabilities = &runtimeapi.Capability{AddCapabilities: spec.CapAdd, DropCapabilities: spec.CapDrop}
	}
	if spec.RunAsUser != nil {
		sc.RunAsUser = &runtimeapi.Int64Value{Value: *spec.RunAsUser}
	}
	return &runtimeapi.ContainerConfig{
		Metadata:    &runtimeapi.ContainerMetadata{Name: spec.Name},
		Image:       &runtimeapi.ImageSpec{Image: spec.Image},
		Command:     spec.Command,
		Args:        spec.Args,
		WorkingDir:  spec.WorkingDir,
		Envs:        envs,
		Mounts:      mounts,
		Labels:      labels,
		Annotations: spec.Annotations,
		LogPath:     spec.Name + ".log",
		Linux:       &runtimeapi.LinuxContainerConfig{SecurityContext: sc},
	}, nil
}

// StartContainer starts a created container.
func (h *Host) StartContainer(ctx context.Context, id string) error {
	_, err := h.Crictl(ctx, "start", id)
	return err
}

// RunContainer creates and starts a container, returning its id.
func (h *Host) RunContainer(ctx context.Context, p *Pod, spec ContainerSpec) (string, error) {
	id, err := h.CreateContainer(ctx, p, spec)
	if err != nil {
		return "", err
	}
	if err := h.StartContainer(ctx, id); err != nil {
		return id, fmt.Errorf("start container %s: %w", spec.Name, err)
	}
	return id, nil
}

// StopContainer stops a container: SIGTERM, then SIGKILL after timeout.
func (h *Host) StopContainer(ctx context.Context, id string, timeout time.Duration) error {
	_, err := h.Crictl(ctx, "stop", "--timeout", strconv.Itoa(int(timeout.Seconds())), id)
	return err
}

// RemoveContainer removes a container, stopping it first if needed.
func (h *Host) RemoveContainer(ctx context.Context, id string) error {
	_, err := h.Crictl(ctx, "rm", "--force", id)
	return err
}

// Logs returns what the container wrote to stdout and stderr so far,
// interleaved as it was written (`crictl logs`).
func (h *Host) Logs(ctx context.Context, id string) (string, error) {
	ep := "unix://" + h.Socket
	out, err := runCombined(ctx, h.Tools.Crictl, "--config", h.crictlConfig, "--runtime-endpoint", ep, "logs", id)
	return string(out), err
}

// ExecResult is the outcome of a command run in a container.
type ExecResult struct {
	Stdout   string
	Stderr   string
	ExitCode int
}

// Exec runs a command in a running container and waits for it
// (`crictl exec --sync`). A non-zero exit of the command is not an error:
// it is in ExitCode, and Stderr then holds crictl's message, which quotes
// the command's stderr. A command that could not run at all is an error.
func (h *Host) Exec(ctx context.Context, id string, cmd ...string) (ExecResult, error) {
	out, err := h.Crictl(ctx, append([]string{"exec", "--sync", id}, cmd...)...)
	res := ExecResult{Stdout: string(out)}
	var ce *CommandError
	if errors.As(err, &ce) && ce.ExitCode > 0 && commandExited(ce.Stderr) {
		res.ExitCode, res.Stderr = ce.ExitCode, ce.Stderr
		return res, nil
	}
	if err != nil {
		return res, fmt.Errorf("exec %v in %s: %w", cmd, id, err)
	}
	return res, nil
}

// commandExited tells crictl 1.37's report of a command that ran and
// exited non-zero ("... synchronously: command '...' exited with 2: ...",
// crictl then exits 2) from a failure to run it (an rpc error, crictl
// exits 1).
func commandExited(stderr string) bool {
	return strings.Contains(stderr, "' exited with ") && !strings.Contains(stderr, "rpc error")
}

// ContainerStatus is what InspectContainer reads from `crictl inspect`.
type ContainerStatus struct {
	ID       string
	Name     string
	State    string // CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED
	ExitCode int
	Pid      int // on the host; 0 unless running
	LogPath  string
}

// InspectContainer reads a container's state.
func (h *Host) InspectContainer(ctx context.Context, id string) (ContainerStatus, error) {
	var raw struct {
		Status struct {
			ID       string `json:"id"`
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
			LogPath  string `json:"logPath"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
		} `json:"status"`
		Info struct {
			Pid int `json:"pid"`
		} `json:"info"`
	}
	if err := h.crictlJSON(ctx, &raw, "inspect", id); err != nil {
		return ContainerStatus{}, err
	}
	return ContainerStatus{
		ID: raw.Status.ID, Name: raw.Status.Metadata.Name, State: raw.Status.State,
		ExitCode: raw.Status.ExitCode, Pid: raw.Info.Pid, LogPath: raw.Status.LogPath,
	}, nil
}

// WaitContainerExit polls until the container has exited and returns its
// exit code.
func (h *Host) WaitContainerExit(ctx context.Context, id string) (int, error) {
	for {
		st, err := h.InspectContainer(ctx, id)
		if err != nil {
			return -1, err
		}
		if st.State == "CONTAINER_EXITED" {
			return st.ExitCode, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("container %s still %s: %w", id, st.State, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WaitLog polls the container's log until it contains substr and returns
// the log.
func (h *Host) WaitLog(ctx context.Context, id, substr string) (string, error) {
	for {
		logs, err := h.Logs(ctx, id)
		if err == nil && strings.Contains(logs, substr) {
			return logs, nil
		}
		select {
		case <-ctx.Done():
			return logs, fmt.Errorf("container %s: %q not in its log (%v): %w\n%s", id, substr, err, ctx.Err(), logs)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
