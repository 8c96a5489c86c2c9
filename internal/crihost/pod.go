package crihost

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// PodSpec is what kubelet would send as a PodSandboxConfig, reduced to
// what tests need.
type PodSpec struct {
	Name      string
	Namespace string // default "default"
	UID       string // default a random UUID
	Attempt   uint32
	// Hostname defaults to Name (host-network pods use the node's).
	Hostname    string
	Labels      map[string]string
	Annotations map[string]string
	// HostNetwork, HostPID and HostIPC share the node's namespace, as the
	// Pod fields of the same name do.
	HostNetwork bool
	HostPID     bool
	HostIPC     bool
	// Privileged must be set for a pod any of whose containers is
	// privileged: the CRI plugin refuses them otherwise.
	Privileged bool
	Sysctls    map[string]string
	// CgroupParent defaults to Host.CgroupParent, so cleanup finds the
	// pod's processes.
	CgroupParent string
}

// Pod is a running pod sandbox.
type Pod struct {
	ID   string // sandbox id (also the CNI container id)
	Spec PodSpec
	// IPs are the pod's addresses from the CNI result; the first is the
	// CRI's primary IP. Empty for host-network pods.
	IPs []netip.Addr
	// Netns is the network namespace path given to CNI; "" for host network.
	Netns string
	// Pid is the sandbox (pause) process, on the host.
	Pid int
	// configPath is the sandbox config crictl create needs again.
	configPath string
}

// IP is the pod's primary address (the zero Addr for host network).
func (p *Pod) IP() netip.Addr {
	if len(p.IPs) == 0 {
		return netip.Addr{}
	}
	return p.IPs[0]
}

// Labels kubelet puts on sandboxes and containers; crictl's pod and
// namespace columns, and node agents that list containers through the CRI,
// read them.
const (
	LabelPodName       = "io.kubernetes.pod.name"
	LabelPodNamespace  = "io.kubernetes.pod.namespace"
	LabelPodUID        = "io.kubernetes.pod.uid"
	LabelContainerName = "io.kubernetes.container.name"
)

// RunPod creates and starts a pod sandbox (`crictl runp`): the CRI plugin
// creates its network namespace and runs the CNI chain (ADD) for it unless
// it uses the host network.
func (h *Host) RunPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	if spec.Name == "" {
		return nil, fmt.Errorf("RunPod: PodSpec.Name is required")
	}
	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.UID == "" {
		spec.UID = newUUID()
	}
	if spec.CgroupParent == "" {
		spec.CgroupParent = h.CgroupParent
	}
	if !spec.HostNetwork {
		// A conflist written just now may not have been loaded yet; without
		// one, RunPodSandbox fails at once.
		if err := h.WaitNetworkReady(ctx, 15*time.Second); err != nil {
			return nil, fmt.Errorf("run pod %s/%s: %w", spec.Namespace, spec.Name, err)
		}
	}
	cfg := h.sandboxConfig(spec)
	if err := os.MkdirAll(cfg.LogDirectory, 0o755); err != nil {
		return nil, err
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	p := &Pod{Spec: spec, configPath: filepath.Join(cfg.LogDirectory, "sandbox.json")}
	if err := os.WriteFile(p.configPath, b, 0o644); err != nil {
		return nil, err
	}
	out, err := h.Crictl(ctx, "runp", p.configPath)
	if err != nil {
		return nil, fmt.Errorf("run pod %s/%s: %w", spec.Namespace, spec.Name, err)
	}
	p.ID = strings.TrimSpace(string(out))
	st, err := h.InspectPod(ctx, p.ID)
	if err != nil {
		return p, err
	}
	p.IPs, p.Netns, p.Pid = st.IPs, st.Netns, st.Pid
	// For cleanup after a crash: the shim socket and libcni cache entries
	// outside our directory are named after the sandbox id.
	if err := h.fp.recordSandbox(sandboxRecord{ID: p.ID, Netns: p.Netns}); err != nil {
		return p, err
	}
	return p, nil
}

// sandboxConfig builds the CRI PodSandboxConfig the way kubelet does for
// the same pod: kubelet's labels, log directory /<pods>/<ns>_<name>_<uid>,
// namespace modes from the host* fields.
func (h *Host) sandboxConfig(spec PodSpec) *runtimeapi.PodSandboxConfig {
	labels := map[string]string{
		LabelPodName:      spec.Name,
		LabelPodNamespace: spec.Namespace,
		LabelPodUID:       spec.UID,
	}
	for k, v := range spec.Labels {
		labels[k] = v
	}
	hostname := spec.Hostname
	if hostname == "" && !spec.HostNetwork {
		hostname = spec.Name
	}
	return &runtimeapi.PodSandboxConfig{
		Metadata: &runtimeapi.PodSandboxMetadata{
			Name:      spec.Name,
			Uid:       spec.UID,
			Namespace: spec.Namespace,
			Attempt:   spec.Attempt,
		},
		Hostname:     hostname,
		LogDirectory: h.path("pods", fmt.Sprintf("%s_%s_%s", spec.Namespace, spec.Name, spec.UID)),
		Labels:       labels,
		Annotations:  spec.Annotations,
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: spec.CgroupParent,
			Sysctls:      spec.Sysctls,
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: nsMode(spec.HostNetwork, runtimeapi.NamespaceMode_POD),
					Pid:     nsMode(spec.HostPID, runtimeapi.NamespaceMode_POD),
					Ipc:     nsMode(spec.HostIPC, runtimeapi.NamespaceMode_POD),
				},
				Privileged: spec.Privileged,
			},
		},
	}
}

func nsMode(host bool, otherwise runtimeapi.NamespaceMode) runtimeapi.NamespaceMode {
	if host {
		return runtimeapi.NamespaceMode_NODE
	}
	return otherwise
}

// PodStatus is what InspectPod reads from `crictl inspectp`.
type PodStatus struct {
	ID          string
	State       string // SANDBOX_READY or SANDBOX_NOTREADY
	IPs         []netip.Addr
	Netns       string
	Pid         int
	Annotations map[string]string
}

// InspectPod reads a sandbox's state, addresses, netns path and pid.
func (h *Host) InspectPod(ctx context.Context, id string) (PodStatus, error) {
	var raw struct {
		Status struct {
			ID          string            `json:"id"`
			State       string            `json:"state"`
			Annotations map[string]string `json:"annotations"`
			Network     struct {
				IP            string `json:"ip"`
				AdditionalIPs []struct {
					IP string `json:"ip"`
				} `json:"additionalIps"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			Pid         int `json:"pid"`
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct {
						Type string `json:"type"`
						Path string `json:"path"`
					} `json:"namespaces"`
				} `json:"linux"`
			} `json:"runtimeSpec"`
		} `json:"info"`
	}
	if err := h.crictlJSON(ctx, &raw, "inspectp", id); err != nil {
		return PodStatus{}, err
	}
	st := PodStatus{ID: raw.Status.ID, State: raw.Status.State, Pid: raw.Info.Pid, Annotations: raw.Status.Annotations}
	ips := []string{raw.Status.Network.IP}
	for _, a := range raw.Status.Network.AdditionalIPs {
		ips = append(ips, a.IP)
	}
	for _, s := range ips {
		if s == "" {
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return st, fmt.Errorf("pod %s: address %q: %w", id, s, err)
		}
		st.IPs = append(st.IPs, a)
	}
	// A network namespace with a path is the pod's own; without one (host
	// network) the sandbox has no network entry or an empty path.
	for _, ns := range raw.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			st.Netns = ns.Path
		}
	}
	return st, nil
}

// StopPod stops a pod's containers and its sandbox and tears down its
// network (CNI DEL). The netns is gone afterwards; the sandbox remains
// until RemovePod.
func (h *Host) StopPod(ctx context.Context, p *Pod) error {
	if _, err := h.Crictl(ctx, "stopp", p.ID); err != nil {
		return fmt.Errorf("stop pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	return nil
}

// RemovePod removes a pod and its containers, stopping them first if
// needed.
func (h *Host) RemovePod(ctx context.Context, p *Pod) error {
	if _, err := h.Crictl(ctx, "rmp", "--force", p.ID); err != nil {
		return fmt.Errorf("remove pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	return nil
}

// newUUID returns a random (version 4) UUID, like a Pod's metadata.uid.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
