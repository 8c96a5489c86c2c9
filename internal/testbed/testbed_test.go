package testbed

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	subnet4 = "10.244.1.0/24"
	subnet6 = "fd00:10:244:1::/64"
)

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		if err := CleanupStale(); err != nil {
			fmt.Fprintln(os.Stderr, "cleanup stale testbed leftovers:", err)
		}
	}
	os.Exit(m.Run())
}

// setup skips without root and fails (never skips) when the CNI plugins are
// missing, so that a CI run as root cannot silently test nothing.
func setup(t *testing.T) []string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("testbed needs root: it creates network namespaces, veths and nftables tables")
	}
	dir := os.Getenv("PKTMETA_CNI_BIN")
	if dir == "" {
		dir, _ = filepath.Abs("../../bin/cni")
	}
	for _, p := range []string{"ptp", "host-local", "bandwidth"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Fatalf("CNI plugin %s missing in %s (run `make cni-plugins` or set PKTMETA_CNI_BIN): %v", p, dir, err)
		}
	}
	return []string{dir}
}

func newNode(t *testing.T, cfg Config) *Node {
	t.Helper()
	cfg.PluginStderr = testWriter{t}
	n, err := NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	return n
}

func addPod(t *testing.T, ctx context.Context, n *Node, name string) *Pod {
	t.Helper()
	p, err := n.AddPod(ctx, PodSpec{Namespace: "testns", Name: name, Annotations: map[string]string{"example.com/x": "y"}})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestNode drives a dual-stack node with ptp + host-local only through pod
// traffic, services, DEL variants and Close.
func TestNode(t *testing.T) {
	cniPath := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	n := newNode(t, Config{CNIPath: cniPath, Subnet4: subnet4, Subnet6: subnet6})

	start := time.Now()
	a := addPod(t, ctx, n, "a")
	b := addPod(t, ctx, n, "b")
	t.Logf("two pods added in %v: a=%s,%s b=%s,%s", time.Since(start), a.IPv4, a.IPv6, b.IPv4, b.IPv6)

	t.Run("namespaces", func(t *testing.T) {
		// A program started from the node goes into the node netns but
		// stays in our mount namespace, where bpffs is mounted.
		out, err := n.Run(ctx, "sh", "-c", "readlink /proc/self/ns/net /proc/self/ns/mnt; stat -f -c %T /sys/fs/bpf")
		if err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Stat(n.NetnsPath, &st); err != nil {
			t.Fatal(err)
		}
		mnt, err := os.Readlink("/proc/self/ns/mnt")
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("net:[%d]\n%s\nbpf_fs\n", st.Ino, mnt); string(out) != want {
			t.Errorf("child of the node: got\n%swant\n%s", out, want)
		}
	})

	t.Run("pods", func(t *testing.T) {
		for _, p := range []*Pod{a, b} {
			if !netip.MustParsePrefix(subnet4).Contains(p.IPv4) || !netip.MustParsePrefix(subnet6).Contains(p.IPv6) {
				t.Errorf("pod %s: IPs %s %s outside %s %s", p.Spec.Name, p.IPv4, p.IPv6, subnet4, subnet6)
			}
			checkHostVeth(t, n, p)
			if err := n.CheckPod(ctx, p); err != nil {
				t.Error(err)
			}
			// The pod's eth0 carries both addresses.
			out, err := p.Run(ctx, "ip", "-o", "addr", "show", "dev", "eth0")
			if err != nil {
				t.Fatal(err)
			}
			for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
				if !strings.Contains(string(out), ip.String()+"/") {
					t.Errorf("pod %s eth0 lacks %s:\n%s", p.Spec.Name, ip, out)
				}
			}
		}
		if a.IPv4 == b.IPv4 || a.IPv6 == b.IPv6 || a.HostVeth == b.HostVeth {
			t.Errorf("pods share addresses or veths: %+v %+v", a, b)
		}
		if err := n.Status(ctx); err != nil {
			t.Error(err)
		}
	})

	tcp, err := b.ListenTCP(8080)
	if err != nil {
		t.Fatal(err)
	}
	defer ServeTCPEcho(tcp).Close()
	udp, err := b.ListenUDP(8080)
	if err != nil {
		t.Fatal(err)
	}
	defer ServeUDPEcho(udp).Close()

	t.Run("pod-to-pod", func(t *testing.T) {
		for _, ip := range []netip.Addr{b.IPv4, b.IPv6} {
			echoTCP(t, ctx, a, netip.AddrPortFrom(ip, 8080)).Close()
			echoUDP(t, a, netip.AddrPortFrom(ip, 8080)).Close()
		}
	})

	t.Run("services", func(t *testing.T) {
		vip4 := netip.MustParseAddr("10.96.0.10")
		vip6 := netip.MustParseAddr("fd00:10:96::10")
		for _, s := range []Service{
			{Proto: "tcp", VIP: netip.AddrPortFrom(vip4, 80), Backend: netip.AddrPortFrom(b.IPv4, 8080)},
			{Proto: "udp", VIP: netip.AddrPortFrom(vip4, 80), Backend: netip.AddrPortFrom(b.IPv4, 8080)},
			{Proto: "tcp", VIP: netip.AddrPortFrom(vip6, 80), Backend: netip.AddrPortFrom(b.IPv6, 8080)},
			{Proto: "udp", VIP: netip.AddrPortFrom(vip6, 80), Backend: netip.AddrPortFrom(b.IPv6, 8080)},
		} {
			if err := n.AddService(s); err != nil {
				t.Fatal(err)
			}
		}
		for _, vc := range []struct {
			vip     netip.Addr
			family  string
			src, be netip.Addr
		}{{vip4, "ipv4", a.IPv4, b.IPv4}, {vip6, "ipv6", a.IPv6, b.IPv6}} {
			vip := netip.AddrPortFrom(vc.vip, 80)
			tc := echoTCP(t, ctx, a, vip)
			uc := echoUDP(t, a, vip)
			// The reply tuple of a DNATed flow comes from the backend.
			for _, proto := range []string{"tcp", "udp"} {
				out, err := n.Run(ctx, "conntrack", "-L", "-f", vc.family, "-p", proto, "--orig-dst", vc.vip.String())
				if err != nil {
					t.Fatal(err)
				}
				want := fmt.Sprintf("src=%s dst=%s sport=8080", vc.be, vc.src)
				if !strings.Contains(string(out), want) {
					t.Errorf("no DNATed %s %s flow to %s (want %q) in node conntrack:\n%s", vc.family, proto, vip, want, out)
				}
			}
			tc.Close()
			uc.Close()
		}
		// The flows must be in the node namespace only.
		if out, err := exec.Command("conntrack", "-L", "--orig-dst", "10.96.0.10").CombinedOutput(); err == nil &&
			strings.Contains(string(out), "dst=10.96.0.10") {
			t.Errorf("service flow leaked into the root netns conntrack:\n%s", out)
		}

		s := Service{Proto: "tcp", VIP: netip.AddrPortFrom(vip4, 80), Backend: netip.AddrPortFrom(b.IPv4, 8080)}
		if err := n.DelService(s); err != nil {
			t.Fatal(err)
		}
		// Without the DNAT the node has no route to the VIP and says so at once.
		if c, err := a.DialTCP(ctx, s.VIP); err == nil {
			c.Close()
			t.Errorf("dial %s after DelService succeeded", s.VIP)
		}
		out, err := n.Run(ctx, "nft", "list", "table", "inet", n.ID)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Count(string(out), "dnat") != 2*3 { // 3 services left, 2 hooks
			t.Errorf("nft table after DelService:\n%s", out)
		}
	})

	t.Run("raw-plugin-exec", func(t *testing.T) {
		out, err := n.ExecPlugin(ctx, "ptp", "VERSION", nil, []byte(`{"cniVersion":"1.0.0"}`), nil)
		if err != nil || !strings.Contains(string(out), `"1.0.0"`) {
			t.Errorf("ptp VERSION: %s, %v", out, err)
		}
		_, err = n.ExecPlugin(ctx, "ptp", "ADD", a, []byte(`{"cniVersion":"1.0.0",`), nil)
		var cniErr *types.Error
		if !errors.As(err, &cniErr) || cniErr.Code == 0 {
			t.Fatalf("ptp ADD with broken JSON: want *types.Error with a code, got %v", err)
		}
		t.Logf("broken config: CNI error %d: %s", cniErr.Code, cniErr.Msg)
	})

	t.Run("del", func(t *testing.T) {
		// DEL removes the veth; DEL again succeeds.
		if err := n.DelPodNetwork(ctx, b); err != nil {
			t.Fatal(err)
		}
		checkNoLink(t, n, b.HostVeth)
		if err := n.DelPod(ctx, b); err != nil {
			t.Fatalf("second DEL: %v", err)
		}
		if _, err := os.Stat(b.NetnsPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("netns %s still there after DelPod: %v", b.NetnsPath, err)
		}

		// DEL after the runtime already removed the netns.
		c := addPod(t, ctx, n, "c")
		if err := n.RemovePodNetns(c); err != nil {
			t.Fatal(err)
		}
		if err := n.DelPod(ctx, c); err != nil {
			t.Fatalf("DEL with a gone netns: %v", err)
		}
		// The veth dies with the namespace, which the kernel frees asynchronously.
		eventually(t, 10*time.Second, func() error { return linkGone(n, c.HostVeth) })

		// GC deletes attachments the runtime no longer knows.
		d := addPod(t, ctx, n, "d")
		if err := n.GC(ctx, []*Pod{a}); err != nil {
			t.Fatal(err)
		}
		checkNoLink(t, n, d.HostVeth)
		checkHostVeth(t, n, a)
		// Its IP is free again: the next pod may get it.
		if err := n.DelPod(ctx, d); err != nil {
			t.Fatal(err)
		}
	})

	checkClose(t, n, []string{a.HostVeth, b.HostVeth})
}

// TestBandwidthChain chains the bandwidth plugin after ptp, first with
// static rates, then (SetChain) with rates the runtime passes as a
// capability arg. bandwidth ignores the capability when the config has
// static rates, hence two chains.
func TestBandwidthChain(t *testing.T) {
	cniPath := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newNode(t, Config{CNIPath: cniPath, Subnet4: subnet4, Subnet6: subnet6, NoDAD: true, Chain: []map[string]any{{
		"type":        "bandwidth",
		"ingressRate": 10_000_000, "ingressBurst": 1 << 20,
		"egressRate": 10_000_000, "egressBurst": 1 << 20,
	}}})
	if got := len(n.ConfList().Plugins); got != 2 {
		t.Fatalf("conflist has %d plugins, want ptp and bandwidth", got)
	}
	a := addPod(t, ctx, n, "a")

	err := n.SetChain([]map[string]any{{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.AddPod(ctx, PodSpec{Name: "b", Capabilities: map[string]any{"bandwidth": map[string]any{
		"ingressRate": 20_000_000, "ingressBurst": 1 << 20,
		"egressRate": 20_000_000, "egressBurst": 1 << 20,
	}}})
	if err != nil {
		t.Fatal(err)
	}

	var ifbs []string
	for _, c := range []struct {
		p    *Pod
		rate string
	}{{a, "10Mbit"}, {b, "20Mbit"}} {
		checkHostVeth(t, n, c.p)
		// Pod ingress is shaped on the host veth, pod egress on the ifb.
		ifb := ""
		for _, i := range c.p.Result.Interfaces {
			if strings.HasPrefix(i.Name, "bwp") {
				ifb = i.Name
			}
		}
		if ifb == "" {
			t.Fatalf("pod %s: no ifb in result %v", c.p.Spec.Name, c.p.Result)
		}
		ifbs = append(ifbs, ifb)
		for _, dev := range []string{c.p.HostVeth, ifb} {
			out, err := n.Run(ctx, "tc", "qdisc", "show", "dev", dev)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(out), "tbf") || !strings.Contains(string(out), "rate "+c.rate) {
				t.Errorf("pod %s: %s lacks tbf at %s:\n%s", c.p.Spec.Name, dev, c.rate, out)
			}
		}
		if err := n.CheckPod(ctx, c.p); err != nil {
			t.Error(err)
		}
	}

	l, err := b.ListenTCP(8080)
	if err != nil {
		t.Fatal(err)
	}
	defer ServeTCPEcho(l).Close()
	echoTCP(t, ctx, a, netip.AddrPortFrom(b.IPv4, 8080)).Close()
	echoTCP(t, ctx, a, netip.AddrPortFrom(b.IPv6, 8080)).Close()

	if err := n.DelPod(ctx, b); err != nil {
		t.Fatal(err)
	}
	checkNoLink(t, n, b.HostVeth)
	checkNoLink(t, n, ifbs[1])

	checkClose(t, n, append(ifbs, a.HostVeth, b.HostVeth))
}

// checkHostVeth verifies that the pod's host veth is in the node netns, as
// seen both from a locked thread and from a program forked there, and not in
// the root netns.
func checkHostVeth(t *testing.T, n *Node, p *Pod) {
	t.Helper()
	err := n.Do(func() error {
		l, err := netlink.LinkByIndex(p.HostIfindex)
		if err != nil {
			return err
		}
		if l.Attrs().Name != p.HostVeth || l.Type() != "veth" {
			return fmt.Errorf("ifindex %d is %s %s, want veth %s", p.HostIfindex, l.Type(), l.Attrs().Name, p.HostVeth)
		}
		return nil
	})
	if err != nil {
		t.Errorf("pod %s host veth in node netns: %v", p.Spec.Name, err)
	}
	if _, err := n.Run(context.Background(), "ip", "link", "show", "dev", p.HostVeth); err != nil {
		t.Errorf("pod %s host veth not seen by ip in node netns: %v", p.Spec.Name, err)
	}
	if err := exec.Command("ip", "link", "show", "dev", p.HostVeth).Run(); err == nil {
		t.Errorf("pod %s host veth %s is in the root netns", p.Spec.Name, p.HostVeth)
	}
}

func linkGone(n *Node, name string) error {
	return n.Do(func() error {
		_, err := netlink.LinkByName(name)
		if err == nil {
			return fmt.Errorf("link %s still in node netns", name)
		}
		if errors.As(err, &netlink.LinkNotFoundError{}) {
			return nil
		}
		return err
	})
}

func checkNoLink(t *testing.T, n *Node, name string) {
	t.Helper()
	if err := linkGone(n, name); err != nil {
		t.Error(err)
	}
}

// checkClose closes the node and verifies that nothing it created remains:
// no netns file, no temp dir, none of its interfaces in the root netns, no
// nftables table of its name there.
func checkClose(t *testing.T, n *Node, links []string) {
	t.Helper()
	start := time.Now()
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	t.Logf("close took %v", time.Since(start))
	if err := n.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	for _, pattern := range []string{
		filepath.Join(netnsDir, n.ID+"*"),
		filepath.Join(os.TempDir(), n.ID+"*"),
	} {
		if m, _ := filepath.Glob(pattern); len(m) > 0 {
			t.Errorf("left behind: %v", m)
		}
	}
	if out, err := exec.Command("findmnt", "-rn", "-o", "TARGET").Output(); err == nil && strings.Contains(string(out), n.ID) {
		t.Errorf("mounts left behind:\n%s", out)
	}
	out, err := exec.Command("ip", "-o", "link", "show").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range links {
		if strings.Contains(string(out), " "+l+":") || strings.Contains(string(out), " "+l+"@") {
			t.Errorf("interface %s in the root netns after Close:\n%s", l, out)
		}
	}
	if out, err := exec.Command("nft", "list", "tables").Output(); err == nil && strings.Contains(string(out), n.ID) {
		t.Errorf("nft table in the root netns:\n%s", out)
	}
	if _, err := n.AddPod(context.Background(), PodSpec{}); !errors.Is(err, ErrClosed) {
		t.Errorf("AddPod after Close: %v, want ErrClosed", err)
	}
}

func echoTCP(t *testing.T, ctx context.Context, from *Pod, to netip.AddrPort) interface{ Close() error } {
	t.Helper()
	c, err := from.DialTCP(ctx, to)
	if err != nil {
		t.Fatal(err)
	}
	if err := EchoRoundTrip(c, []byte("tcp hello "+to.String()), 5*time.Second); err != nil {
		t.Error(err)
	}
	return c
}

func echoUDP(t *testing.T, from *Pod, to netip.AddrPort) interface{ Close() error } {
	t.Helper()
	c, err := from.DialUDP(to)
	if err != nil {
		t.Fatal(err)
	}
	if err := EchoRoundTrip(c, []byte("udp hello "+to.String()), 5*time.Second); err != nil {
		t.Error(err)
	}
	return c
}

func eventually(t *testing.T, timeout time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// testWriter sends plugin stderr to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Logf("plugin stderr: %s", strings.TrimSpace(string(b)))
	return len(b), nil
}

// TestAddPodFailure makes ADD fail for real (host-local runs out of
// addresses) and checks that AddPod cleaned up after itself: no namespace,
// no reservation, and the node keeps working. It is also the IPv4-only case.
func TestAddPodFailure(t *testing.T) {
	cniPath := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// A /30 leaves host-local one pod address: .1 is the gateway.
	n := newNode(t, Config{CNIPath: cniPath, Subnet4: "10.244.9.0/30"})
	a := addPod(t, ctx, n, "a")
	if a.IPv6.IsValid() {
		t.Errorf("IPv4-only node gave pod a %s", a.IPv6)
	}

	_, err := n.AddPod(ctx, PodSpec{Name: "b"})
	var cniErr *types.Error
	if !errors.As(err, &cniErr) || !strings.Contains(err.Error(), "no IP addresses available") {
		t.Fatalf("AddPod in a full range: want a CNI error about addresses, got %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(netnsDir, n.ID+"-p*-b")); len(m) > 0 {
		t.Errorf("failed pod's netns left behind: %v", m)
	}

	if err := n.DelPod(ctx, a); err != nil {
		t.Fatal(err)
	}
	c := addPod(t, ctx, n, "c")
	if c.IPv4 != a.IPv4 {
		t.Errorf("pod c got %s, want the address %s that a released", c.IPv4, a.IPv4)
	}
	checkClose(t, n, []string{a.HostVeth, c.HostVeth})
}

// TestCNI110 runs STATUS and GC, which libcni only sends to plugins from
// cniVersion 1.1.0 on, against the real plugins; and adds and deletes pods
// concurrently, as kubelet does.
func TestCNI110(t *testing.T) {
	cniPath := setup(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := newNode(t, Config{CNIPath: cniPath, CNIVersion: "1.1.0", Subnet6: subnet6, NoDAD: true})
	if err := n.Status(ctx); err != nil {
		t.Fatal(err)
	}

	pods := make([]*Pod, 8)
	var g errgroup
	for i := range pods {
		g.Go(func() (err error) {
			pods[i], err = n.AddPod(ctx, PodSpec{Name: fmt.Sprintf("c%d", i)})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]bool{}
	for _, p := range pods {
		if seen[p.IPv4] || seen[p.IPv6] {
			t.Errorf("address of %s given twice", p.Spec.Name)
		}
		seen[p.IPv4], seen[p.IPv6] = true, true
	}

	// GC keeps pods[0]; libcni DELs the others from its cache, then
	// host-local's GC drops any reservation not kept.
	if err := n.GC(ctx, pods[:1]); err != nil {
		t.Fatal(err)
	}
	checkHostVeth(t, n, pods[0])
	for _, p := range pods[1:] {
		checkNoLink(t, n, p.HostVeth)
	}
	ipamDir := filepath.Join(n.tmpDir, "ipam", "pmtb")
	for _, p := range pods {
		_, err := os.Stat(filepath.Join(ipamDir, p.IPv4.String()))
		if kept := err == nil; kept != (p == pods[0]) {
			t.Errorf("host-local reservation of %s (%s): kept=%v after GC", p.Spec.Name, p.IPv4, kept)
		}
	}

	for _, p := range pods {
		g.Go(func() error { return n.DelPod(ctx, p) })
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
	checkClose(t, n, []string{pods[0].HostVeth})
}

// TestCleanupStale checks that leftovers of a dead process are removed and
// those of a live one are not.
func TestCleanupStale(t *testing.T) {
	cniPath := setup(t)
	n := newNode(t, Config{CNIPath: cniPath})

	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := fmt.Sprintf("%s%d-deadbeef", namePrefix, cmd.Process.Pid)
	nsPath := filepath.Join(netnsDir, dead+"-node")
	if err := newNetns(nsPath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = removeNetns(nsPath) })
	tmp, err := os.MkdirTemp("", dead+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(tmp) })

	if err := CleanupStale(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{nsPath, tmp} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("stale %s not removed: %v", p, err)
		}
	}
	for _, p := range []string{n.NetnsPath, n.tmpDir} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("live node's %s removed: %v", p, err)
		}
	}
}

// errgroup is the part of golang.org/x/sync/errgroup these tests need.
type errgroup struct {
	wg   sync.WaitGroup
	mu   sync.Mutex
	errs []error
}

func (g *errgroup) Go(fn func() error) {
	g.wg.Go(func() {
		if err := fn(); err != nil {
			g.mu.Lock()
			g.errs = append(g.errs, err)
			g.mu.Unlock()
		}
	})
}

func (g *errgroup) Wait() error {
	g.wg.Wait()
	return errors.Join(g.errs...)
}
