package testbed

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// PodAnnotationsCapability is the capability through which containerd and
// CRI-O hand pod annotations to plugins that declare it in their config:
// "capabilities": {"io.kubernetes.cri.pod-annotations": true}.
const PodAnnotationsCapability = "io.kubernetes.cri.pod-annotations"

// PodSpec is what the runtime knows about a pod sandbox when it calls CNI.
type PodSpec struct {
	// Namespace and Name are the Kubernetes identity; defaults "default"
	// and "pod<N>".
	Namespace, Name string
	// UID is the pod UID; a random UUID if empty.
	UID string
	// ContainerID is the sandbox (infra container) ID; 64 random hex
	// digits if empty.
	ContainerID string
	// IfName is the interface inside the pod; default "eth0".
	IfName string
	// Annotations are passed in runtimeConfig through the
	// io.kubernetes.cri.pod-annotations capability.
	Annotations map[string]string
	// Capabilities adds other capability args (e.g. "bandwidth"); libcni
	// passes each only to the plugins that declare it.
	Capabilities map[string]any
}

// Pod is a pod sandbox attached to a Node.
type Pod struct {
	Spec        PodSpec
	ContainerID string
	IfName      string
	// NetnsPath is the bind-mounted pod network namespace.
	NetnsPath string
	// IPv4 and IPv6 come from the CNI result; IPv6 is invalid without
	// Config.Subnet6.
	IPv4, IPv6 netip.Addr
	// HostVeth and HostIfindex name the host end of the pod's veth, in the
	// node namespace.
	HostVeth    string
	HostIfindex int
	// Result is the final result of the chain, converted to types/100.
	Result *current.Result

	node *Node
	conf *libcni.NetworkConfigList // the conflist of the ADD, reused for CHECK and DEL
}

// AddPod creates a pod namespace (lo up) and runs CNI ADD of the conflist
// through libcni from the node namespace, as a runtime does for a new
// sandbox. On error it runs CNI DEL and removes the namespace, as kubelet
// would after a failed sandbox.
func (n *Node) AddPod(ctx context.Context, spec PodSpec) (*Pod, error) {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil, ErrClosed
	}
	n.podSeq++
	seq, conf := n.podSeq, n.conf
	n.mu.Unlock()

	if spec.Namespace == "" {
		spec.Namespace = "default"
	}
	if spec.Name == "" {
		spec.Name = fmt.Sprintf("pod%d", seq)
	}
	if spec.UID == "" {
		spec.UID = randomUUID()
	}
	if spec.ContainerID == "" {
		spec.ContainerID = randomHex(32)
	}
	if spec.IfName == "" {
		spec.IfName = "eth0"
	}
	p := &Pod{
		Spec:        spec,
		ContainerID: spec.ContainerID,
		IfName:      spec.IfName,
		NetnsPath:   filepath.Join(netnsDir, fmt.Sprintf("%s-p%d-%s", n.ID, seq, sanitize(spec.Name))),
		node:        n,
		conf:        conf,
	}
	wrap := func(err error) error {
		return fmt.Errorf("add pod %s/%s: %w", spec.Namespace, spec.Name, err)
	}

	if err := newNetns(p.NetnsPath); err != nil {
		return nil, wrap(err)
	}
	err := p.Do(func() error {
		if err := linkUp("lo"); err != nil {
			return err
		}
		return n.setDAD()
	})
	if err != nil {
		return nil, wrap(errors.Join(err, removeNetns(p.NetnsPath)))
	}
	n.mu.Lock()
	switch {
	case n.closed:
		err = ErrClosed
	case n.pods[p.ContainerID] != nil:
		err = fmt.Errorf("container ID %s already in use", p.ContainerID)
	default:
		n.pods[p.ContainerID] = p
	}
	n.mu.Unlock()
	if err != nil {
		return nil, wrap(errors.Join(err, removeNetns(p.NetnsPath)))
	}

	err = p.add(ctx)
	if err == nil {
		return p, nil
	}
	// Clean up like kubelet after a failed sandbox: DEL, then drop the
	// namespace. A pod whose DEL failed stays known so that Close retries.
	err = wrap(err)
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	derr := n.delNetwork(cctx, p)
	if derr == nil {
		n.forget(p)
	} else {
		err = errors.Join(err, fmt.Errorf("cleanup: %w", derr))
	}
	if rerr := removeNetns(p.NetnsPath); rerr != nil {
		err = errors.Join(err, fmt.Errorf("cleanup: %w", rerr))
	}
	return nil, err
}

func (p *Pod) add(ctx context.Context) error {
	n := p.node
	var res types.Result
	err := n.Do(func() error {
		var err error
		res, err = n.cni.AddNetworkList(ctx, p.conf, p.runtimeConf())
		return err
	})
	if err != nil {
		return err
	}
	if p.Result, err = current.NewResultFromResult(res); err != nil {
		return fmt.Errorf("convert result: %w", err)
	}
	for _, ipc := range p.Result.IPs {
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		if a = a.Unmap(); a.Is4() && !p.IPv4.IsValid() {
			p.IPv4 = a
		} else if a.Is6() && !p.IPv6.IsValid() {
			p.IPv6 = a
		}
	}
	if !p.IPv4.IsValid() {
		return fmt.Errorf("no IPv4 address in result %v", p.Result)
	}
	// The host end is the result's sandbox-less veth; chained plugins may
	// add other sandbox-less interfaces (bandwidth adds its ifb).
	return n.Do(func() error {
		for _, iface := range p.Result.Interfaces {
			if iface.Sandbox != "" {
				continue
			}
			l, err := netlink.LinkByName(iface.Name)
			if err != nil {
				return fmt.Errorf("host interface %s from result not in node netns: %w", iface.Name, err)
			}
			if l.Type() == "veth" {
				p.HostVeth, p.HostIfindex = iface.Name, l.Attrs().Index
				// ptp waits for DAD on the pod side only. Until the
				// gateway address on the host side is usable the node
				// ignores the pod's neighbour solicitations for it, and
				// the pod's first IPv6 packets stall for a second or two.
				if !p.IPv6.IsValid() {
					return nil
				}
				return settleAddrs(ctx, l)
			}
		}
		return fmt.Errorf("no host veth in result %v", p.Result)
	})
}

// settleAddrs waits until no IPv6 address of l is tentative.
func settleAddrs(ctx context.Context, l netlink.Link) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		addrs, err := netlink.AddrList(l, netlink.FAMILY_V6)
		if err != nil {
			return fmt.Errorf("list addresses of %s: %w", l.Attrs().Name, err)
		}
		tentative := false
		for _, a := range addrs {
			if a.Flags&unix.IFA_F_DADFAILED != 0 {
				return fmt.Errorf("%s: DAD failed for %s", l.Attrs().Name, a.IPNet)
			}
			tentative = tentative || a.Flags&unix.IFA_F_TENTATIVE != 0
		}
		if !tentative {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: addresses still tentative: %w", l.Attrs().Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// runtimeConf is what kubelet's runtime (containerd, CRI-O) passes to libcni
// for this sandbox.
func (p *Pod) runtimeConf() *libcni.RuntimeConf {
	annotations := p.Spec.Annotations
	if annotations == nil {
		annotations = map[string]string{}
	}
	capArgs := map[string]any{PodAnnotationsCapability: annotations}
	for k, v := range p.Spec.Capabilities {
		capArgs[k] = v
	}
	return &libcni.RuntimeConf{
		ContainerID:    p.ContainerID,
		NetNS:          p.NetnsPath,
		IfName:         p.IfName,
		Args:           p.cniArgs(),
		CapabilityArgs: capArgs,
	}
}

// cniArgs is CNI_ARGS in the order containerd writes it.
func (p *Pod) cniArgs() [][2]string {
	return [][2]string{
		{"IgnoreUnknown", "1"},
		{"K8S_POD_NAMESPACE", p.Spec.Namespace},
		{"K8S_POD_NAME", p.Spec.Name},
		{"K8S_POD_INFRA_CONTAINER_ID", p.ContainerID},
		{"K8S_POD_UID", p.Spec.UID},
	}
}

// DelPod runs CNI DEL for the pod and then removes its namespace. If DEL
// fails, the namespace stays and Close tries DEL again. Calling it again,
// or after RemovePodNetns, is fine: DEL must be idempotent.
func (n *Node) DelPod(ctx context.Context, p *Pod) error {
	if err := n.delNetwork(ctx, p); err != nil {
		return fmt.Errorf("del pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	if err := removeNetns(p.NetnsPath); err != nil {
		return fmt.Errorf("del pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	n.forget(p)
	return nil
}

// DelPodNetwork runs CNI DEL only; the namespace stays, and Close will
// delete it (running DEL once more).
func (n *Node) DelPodNetwork(ctx context.Context, p *Pod) error {
	if err := n.delNetwork(ctx, p); err != nil {
		return fmt.Errorf("del pod network %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	return nil
}

// RemovePodNetns removes the pod's namespace without CNI DEL, as a runtime
// that lost the sandbox does; a DEL afterwards gets a netns path that no
// longer exists. The namespace (and the pod end of its veth, and so the
// host end) goes away once no socket holds it any more.
func (n *Node) RemovePodNetns(p *Pod) error {
	if err := removeNetns(p.NetnsPath); err != nil {
		return fmt.Errorf("remove pod netns %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	return nil
}

// CheckPod runs CNI CHECK for the pod.
func (n *Node) CheckPod(ctx context.Context, p *Pod) error {
	err := n.Do(func() error { return n.cni.CheckNetworkList(ctx, p.conf, p.runtimeConf()) })
	if err != nil {
		return fmt.Errorf("check pod %s/%s: %w", p.Spec.Namespace, p.Spec.Name, err)
	}
	return nil
}

// GC runs CNI GC with cni.dev/valid-attachments set to keep: libcni first
// DELs every cached attachment of the network not in keep, then (for
// cniVersion >= 1.1.0 only) sends GC to each plugin.
func (n *Node) GC(ctx context.Context, keep []*Pod) error {
	args := &libcni.GCArgs{ValidAttachments: []types.GCAttachment{}}
	for _, p := range keep {
		args.ValidAttachments = append(args.ValidAttachments,
			types.GCAttachment{ContainerID: p.ContainerID, IfName: p.IfName})
	}
	conf := n.ConfList()
	if err := n.Do(func() error { return n.cni.GCNetworkList(ctx, conf, args) }); err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	return nil
}

// Status runs CNI STATUS (a no-op in libcni below cniVersion 1.1.0).
func (n *Node) Status(ctx context.Context) error {
	conf := n.ConfList()
	if err := n.Do(func() error { return n.cni.GetStatusNetworkList(ctx, conf) }); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	return nil
}

// ExecPlugin runs one plugin binary directly, bypassing libcni, from the
// node namespace: CNI_COMMAND=command with stdin as its config. With a pod,
// CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME and CNI_ARGS are those of the pod.
// extraEnv is appended last and so overrides any of them. A failing plugin
// yields a *types.Error carrying its CNI error code and message.
func (n *Node) ExecPlugin(ctx context.Context, plugin, command string, p *Pod, stdin []byte, extraEnv []string) ([]byte, error) {
	path, err := invoke.FindInPath(plugin, n.cfg.CNIPath)
	if err != nil {
		return nil, fmt.Errorf("exec plugin %s %s: %w", plugin, command, err)
	}
	env := append(os.Environ(),
		"CNI_COMMAND="+command,
		"CNI_PATH="+strings.Join(n.cfg.CNIPath, string(os.PathListSeparator)))
	if p != nil {
		kv := make([]string, 0, 5)
		for _, a := range p.cniArgs() {
			kv = append(kv, a[0]+"="+a[1])
		}
		env = append(env,
			"CNI_CONTAINERID="+p.ContainerID,
			"CNI_NETNS="+p.NetnsPath,
			"CNI_IFNAME="+p.IfName,
			"CNI_ARGS="+strings.Join(kv, ";"))
	}
	env = append(env, extraEnv...)

	var out []byte
	err = n.Do(func() error {
		var err error
		out, err = (&invoke.RawExec{Stderr: n.cfg.PluginStderr}).ExecPlugin(ctx, path, stdin, env)
		return err
	})
	if err != nil {
		return out, fmt.Errorf("exec plugin %s %s: %w", plugin, command, err)
	}
	return out, nil
}

func (n *Node) delNetwork(ctx context.Context, p *Pod) error {
	return n.Do(func() error { return n.cni.DelNetworkList(ctx, p.conf, p.runtimeConf()) })
}

func (n *Node) forget(p *Pod) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.pods[p.ContainerID] == p {
		delete(n.pods, p.ContainerID)
	}
}

// sanitize keeps a pod name readable in a netns file name.
func sanitize(s string) string {
	s = strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '.':
			return r
		}
		return '_'
	}, s)
	if len(s) > 40 {
		s = s[:40]
	}
	return s
}

func randomHex(nbytes int) string {
	b := make([]byte, nbytes)
	_, _ = rand.Read(b) // never fails on Linux
	return hex.EncodeToString(b)
}

func randomUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
