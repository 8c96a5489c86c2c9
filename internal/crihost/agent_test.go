package crihost

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestNodeAgentShape checks that the helpers can run what the node agent
// will need: a host-network container with a chosen capability set, a
// read-only root, the CNI directories mounted, and bpffs and the pods'
// netns directory mounted with HostToContainer propagation, so that a
// bpffs mounted and a pod created after the agent started are visible in
// it. A second, idle Host runs meanwhile: two private instances coexist.
func TestNodeAgentShape(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("crihost: needs root to run containerd, mount bpffs and create pod network namespaces; CI runs it as root")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tools, err := EnsureTools(ctx)
	if err != nil {
		t.Fatalf("containerd, runc and crictl are needed and could not be installed: %v", err)
	}
	tmp := t.TempDir()
	images, err := BuildTestImages(ctx, filepath.Join(tmp, "images"))
	if err != nil {
		t.Fatal(err)
	}
	cniBin := cniPlugins(t, filepath.Join(tmp, "cni-bin"))
	var hosts []*Host
	for range 2 {
		h, err := Start(ctx, Options{Tools: tools, CNIBinDir: cniBin, Images: images.All()})
		if err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
		t.Cleanup(func() {
			if t.Failed() {
				dumpLogs(t, h, "")
			}
			if err := h.Close(); err != nil {
				t.Errorf("close %s: %v", h.ID, err)
			}
			if left := h.Leftovers(); len(left) > 0 {
				t.Errorf("left behind by %s: %v", h.ID, left)
			}
		})
	}
	h := hosts[0]

	bpfDir, err := h.MkdirShared("bpf")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(h.NetnsDir(), 0o755); err != nil {
		t.Fatal(err)
	}
	agent, err := h.RunPod(ctx, PodSpec{Name: "pktmeta-agent-x1", Namespace: "kube-system", HostNetwork: true})
	if err != nil {
		t.Fatal(err)
	}
	if agent.Netns != "" || len(agent.IPs) != 0 {
		t.Errorf("host-network pod has netns %q, IPs %v", agent.Netns, agent.IPs)
	}
	caps := []string{"NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON"}
	id, err := h.RunContainer(ctx, agent, ContainerSpec{
		Name: "agent", Image: NetutilImage,
		Args: []string{"serve", "--tcp", "127.0.0.1:0"},
		Mounts: []Mount{
			{HostPath: h.CNIConfDir(), ContainerPath: "/host/etc/cni/net.d"},
			{HostPath: h.CNIBinDir(), ContainerPath: "/host/opt/cni/bin", ReadOnly: true},
			{HostPath: bpfDir, ContainerPath: "/sys/fs/bpf", Propagation: PropagationHostToContainer},
			{HostPath: h.NetnsDir(), ContainerPath: "/var/run/netns", Propagation: PropagationHostToContainer},
		},
		CapDrop:        []string{"ALL"},
		CapAdd:         caps,
		ReadOnlyRootfs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := h.InspectContainer(ctx, id)
	if err != nil || st.State != "CONTAINER_RUNNING" || st.Pid == 0 {
		t.Fatalf("agent container: %+v, %v", st, err)
	}
	proc := fmt.Sprintf("/proc/%d", st.Pid)

	if a, b := nsInode(t, proc+"/ns/net"), nsInode(t, "/proc/self/ns/net"); a != b {
		t.Errorf("agent netns %d, host %d: not host network", a, b)
	}
	if got, want := capEff(t, proc), capMask(caps); got != want {
		t.Errorf("agent CapEff %#x, want %#x (%v)", got, want, caps)
	}
	mi := mountinfo(t, proc)
	if f := strings.Fields(mi["/"]); len(f) < 6 || !strings.HasPrefix(f[5], "ro") {
		t.Errorf("root not read-only: %q", mi["/"])
	}
	for _, p := range []string{"/sys/fs/bpf", "/var/run/netns"} {
		if !strings.Contains(mi[p], "master:") {
			t.Errorf("%s not a slave mount (HostToContainer): %q", p, mi[p])
		}
	}
	for _, p := range []string{"/host/etc/cni/net.d", "/host/opt/cni/bin"} {
		if mi[p] == "" {
			t.Errorf("%s not mounted", p)
		}
	}

	// Mounted on the host after the agent started: seen inside.
	if err := unix.Mount("bpf", bpfDir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatal(err)
	}
	if m := mountinfo(t, proc)["/sys/fs/bpf"]; !strings.Contains(m, " - bpf ") {
		t.Errorf("bpffs mounted on the host later is not visible in the agent: %q", m)
	} else {
		t.Logf("agent: CapEff %#x; /sys/fs/bpf: %s", capEff(t, proc), m)
	}

	// A pod created after the agent started: its netns is visible inside.
	writeConflist(t, h.CNIConfDir(), filepath.Join(tmp, "ipam"))
	pod, err := h.RunPod(ctx, PodSpec{Name: "late", Namespace: "default"})
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(pod.Netns) != h.NetnsDir() {
		t.Fatalf("pod netns %s not in %s", pod.Netns, h.NetnsDir())
	}
	inside := filepath.Join(proc, "root", "var/run/netns", filepath.Base(pod.Netns))
	if a, b := nsInode(t, inside), nsInode(t, pod.Netns); a != b {
		t.Errorf("pod netns seen by the agent at %s is %d, on the host %d", inside, a, b)
	} else {
		t.Logf("agent sees the new pod's netns at /var/run/netns/%s", filepath.Base(pod.Netns))
	}
}

func nsInode(t *testing.T, p string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatalf("stat %s: %v", p, err)
	}
	return st.Ino
}

func capEff(t *testing.T, proc string) uint64 {
	t.Helper()
	b, err := os.ReadFile(proc + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no CapEff in %s/status", proc)
	return 0
}

func capMask(names []string) uint64 {
	bits := map[string]uint{"NET_ADMIN": unix.CAP_NET_ADMIN, "SYS_ADMIN": unix.CAP_SYS_ADMIN, "BPF": unix.CAP_BPF, "PERFMON": unix.CAP_PERFMON}
	var m uint64
	for _, n := range names {
		m |= 1 << bits[n]
	}
	return m
}

// mountinfo maps a process's mount points to their mountinfo lines (the
// last, topmost mount wins).
func mountinfo(t *testing.T, proc string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(proc + "/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 5 {
			out[unescapeMountinfo(f[4])] = l
		}
	}
	return out
}
