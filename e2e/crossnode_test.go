package e2e

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/cluster"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/pktmeta/pktmeta/internal/view"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Across nodes: a cluster of netns nodes (testbed.Cluster), each with its
// own pods, CNI chain, pin path, conntrack and nftables, routed natively or
// over VXLAN. Each node's pktmeta is given its id, the members and the
// cluster key by `pktmetactl node set` from a cluster file, as an operator
// outside Kubernetes would.

type clusterEnv struct {
	t           *testing.T
	ctx         context.Context
	c           *testbed.Cluster
	nodes       []*clusterNode
	clusterFile string
	keyFile     string
}

type clusterNode struct {
	*testbed.ClusterNode
	env     *clusterEnv
	name    string
	pin     string
	logFile string
}

func newClusterEnv(t *testing.T, vxlan bool, nodes int) *clusterEnv {
	t.Helper()
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	ce := &clusterEnv{t: t, ctx: ctx}
	pins := make([]string, nodes+1)
	logs := make([]string, nodes+1)
	for i := 1; i <= nodes; i++ {
		pins[i] = testutil.PinPath(t)
		logs[i] = filepath.Join(t.TempDir(), fmt.Sprintf("pktmeta-node%d.log", i))
	}
	c, err := testbed.NewCluster(testbed.ClusterConfig{
		Nodes: nodes,
		VXLAN: vxlan,
		Node:  testbed.Config{CNIPath: []string{cniBinDir, binDir}, NoDAD: true},
		Chain: func(i int) []map[string]any {
			return []map[string]any{{
				"type": "pktmeta", "pinPath": pins[i], "logFile": logs[i], "logLevel": "debug",
				"tags": map[string]any{"cluster": "e2e", "node": fmt.Sprintf("node-%d", i)},
			}}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ce.c = c
	// Registered after the pin paths' unmounts, so it runs first.
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
		if t.Failed() {
			for i := 1; i <= nodes; i++ {
				if b, err := os.ReadFile(logs[i]); err == nil {
					t.Logf("node %d pktmeta log:\n%s", i, b)
				}
			}
		}
	})
	f := cluster.File{Version: cluster.FileVersion}
	for _, n := range c.Nodes {
		cn := &clusterNode{ClusterNode: n, env: ce, name: fmt.Sprintf("node-%d", n.Index), pin: pins[n.Index], logFile: logs[n.Index]}
		ce.nodes = append(ce.nodes, cn)
		f.Nodes = append(f.Nodes, cluster.Node{
			ID: uint16(n.Index), Name: cn.name, Addresses: []netip.Addr{n.Addr4, n.Addr6},
			PodCIDRs: []netip.Prefix{n.PodCIDR4, n.PodCIDR6}, PinPath: cn.pin,
		})
	}
	dir := t.TempDir()
	ce.clusterFile = filepath.Join(dir, "cluster.json")
	raw, _ := json.MarshalIndent(f, "", "  ")
	if err := os.WriteFile(ce.clusterFile, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	key := make([]byte, datapath.KeySize)
	rand.Read(key)
	ce.keyFile = filepath.Join(dir, "cluster.key")
	if err := os.WriteFile(ce.keyFile, []byte(hex.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, n := range ce.nodes {
		args := []string{"node", "set", "--name", n.name, "--key-file", ce.keyFile, "--uplink", "eth0"}
		if vxlan {
			// The underlay NIC too: a SYN may arrive there unencapsulated.
			args = append(args, "--uplink", n.Uplink)
		}
		if out, code := n.ctl(t, args...); code != 0 {
			t.Fatalf("node %d: pktmetactl node set: exit %d: %s", n.Index, code, out)
		}
	}
	return ce
}

// ctl runs pktmetactl with the cluster file in the node's netns.
func (n *clusterNode) ctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return runCtl(n.env.ctx, t, n.Do, append([]string{"--pin-path", n.pin, "--api-socket", "", "--cluster", n.env.clusterFile}, args...)...)
}

func (n *clusterNode) ctlJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out, code := n.ctl(t, append(args, "-o", "json")...)
	if code != 0 {
		t.Fatalf("node %d: pktmetactl %s: exit %d: %s", n.Index, strings.Join(args, " "), code, out)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("pktmetactl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func (n *clusterNode) addPod(t *testing.T, ns, name string) *testbed.Pod {
	t.Helper()
	p, err := n.AddPod(n.env.ctx, testbed.PodSpec{Namespace: ns, Name: name})
	if err != nil {
		t.Fatalf("node %d: add pod %s/%s: %v", n.Index, ns, name, err)
	}
	return p
}

func (n *clusterNode) open(t *testing.T) *datapath.Datapath {
	t.Helper()
	d, err := datapath.OpenReader(n.pin)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func (n *clusterNode) remoteStats(t *testing.T) datapath.RemoteStats {
	t.Helper()
	d, err := datapath.OpenReader(n.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	s, err := d.ReadRemoteStats()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (n *clusterNode) lookup(t *testing.T, tp datapath.Tuple) (view.Conn, bool) {
	t.Helper()
	out, code := n.ctl(t, "lookup", "--proto", datapath.ProtoName(tp.Proto), "--src", tp.Src.String(), "--dst", tp.Dst.String(), "-o", "json")
	if code == 1 {
		return view.Conn{}, false
	}
	if code != 0 {
		t.Fatalf("lookup %s on node %d: exit %d: %s", tp, n.Index, code, out)
	}
	var c view.Conn
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatal(err)
	}
	return c, true
}

func dialEcho(t *testing.T, ctx context.Context, p *testbed.Pod, dst netip.AddrPort) net.Conn {
	t.Helper()
	c, err := p.DialTCP(ctx, dst)
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	t.Cleanup(func() { c.Close() })
	if err := testbed.EchoRoundTrip(c, []byte("ping"), 5*time.Second); err != nil {
		t.Fatalf("echo via %s: %v", dst, err)
	}
	return c
}

func serveEcho(t *testing.T, p *testbed.Pod, port int) {
	t.Helper()
	l, err := p.ListenTCP(port)
	if err != nil {
		t.Fatal(err)
	}
	s := testbed.ServeTCPEcho(l)
	t.Cleanup(func() { s.Close() })
}

// checkRemoteOrigin asserts that node dst holds a remote record for tp
// naming origin pod p on node src, with src's own conn id for it.
func checkRemoteOrigin(t *testing.T, dst, src *clusterNode, tp, originTuple datapath.Tuple, p *testbed.Pod) view.Conn {
	t.Helper()
	var c view.Conn
	eventually(t, "remote record on node "+dst.name, func() error {
		var ok bool
		if c, ok = dst.lookup(t, tp); !ok {
			return fmt.Errorf("no record for %s", tp)
		}
		return nil
	})
	o := c.Origin
	if o == nil || !o.Remote || o.Node != src.name || o.NodeID != uint16(src.Index) ||
		o.Namespace != p.Spec.Namespace || o.Pod != p.Spec.Name || o.UID == "" {
		t.Fatalf("origin on %s: %+v", dst.name, o)
	}
	if c.Tags["node"] != src.name || c.Tags["cluster"] != "e2e" {
		t.Fatalf("tags %v: want the origin node's", c.Tags)
	}
	local, ok := src.lookup(t, originTuple)
	if !ok {
		t.Fatalf("no record for %s on the origin node", originTuple)
	}
	if c.OriginConnID == 0 || c.OriginConnID != local.ConnID&datapath.ConnOriginMask {
		t.Fatalf("origin conn id %d, the origin node's record has %d", c.OriginConnID, local.ConnID)
	}
	return c
}

func tupleOf(c net.Conn) datapath.Tuple {
	l := netip.MustParseAddrPort(c.LocalAddr().String())
	r := netip.MustParseAddrPort(c.RemoteAddr().String())
	return datapath.Tuple{Proto: datapath.ProtoTCP, Src: netip.AddrPortFrom(l.Addr().Unmap(), l.Port()), Dst: netip.AddrPortFrom(r.Addr().Unmap(), r.Port())}
}

func TestCrossNode(t *testing.T) {
	for _, topo := range []struct {
		name  string
		vxlan bool
	}{{"routed", false}, {"vxlan", true}} {
		t.Run(topo.name, func(t *testing.T) {
			ce := newClusterEnv(t, topo.vxlan, 2)
			n1, n2 := ce.nodes[0], ce.nodes[1]
			a := n1.addPod(t, "team-a", "client")
			b := n2.addPod(t, "team-b", "server")
			serveEcho(t, b, 8080)
			serveEcho(t, a, 9090)

			for _, fam := range []struct {
				name string
				dst  netip.Addr
			}{{"v4", b.IPv4}, {"v6", b.IPv6}} {
				t.Run("pod to pod "+fam.name, func(t *testing.T) {
					dst := netip.AddrPortFrom(fam.dst, 8080)
					c := dialEcho(t, ce.ctx, a, dst)
					tp := tupleOf(c)
					got := checkRemoteOrigin(t, n2, n1, tp, tp, a)
					if got.Peer == nil || got.Peer.Pod != "server" || got.Peer.Remote {
						t.Fatalf("peer %+v: want the local server pod", got.Peer)
					}
				})
			}

			t.Run("through a Service on the origin node", func(t *testing.T) {
				// At node 1's uplink, conntrack tells the translated SYN's record.
				requireConntrackKfuncs(t)
				for _, svc := range []testbed.Service{
					{Proto: "tcp", VIP: netip.MustParseAddrPort("10.96.0.10:80"), Backend: netip.AddrPortFrom(b.IPv4, 8080)},
					{Proto: "tcp", VIP: netip.MustParseAddrPort("[fd00:10:96::10]:80"), Backend: netip.AddrPortFrom(b.IPv6, 8080)},
				} {
					if err := n1.AddService(svc); err != nil {
						t.Fatal(err)
					}
					c := dialEcho(t, ce.ctx, a, svc.VIP)
					viaVIP := tupleOf(c)
					// The destination sees the translated tuple; the origin
					// node keeps its record under the one the pod sent.
					seen := datapath.Tuple{Proto: datapath.ProtoTCP, Src: viaVIP.Src, Dst: svc.Backend}
					checkRemoteOrigin(t, n2, n1, seen, viaVIP, a)
				}
			})

			t.Run("masquerade on the origin node", func(t *testing.T) {
				// At node 1's uplink, conntrack tells the translated SYN's record.
				requireConntrackKfuncs(t)
				// kube-proxy's masquerade of pod traffic (here for v4 to
				// node 2's pods): node 2 sees node 1's address.
				rules := fmt.Sprintf("table ip masq-test {\n chain post {\n  type nat hook postrouting priority srcnat\n  ip saddr %s ip daddr %s masquerade\n }\n}\n", n1.PodCIDR4, n2.PodCIDR4)
				if out, err := runNft(ce.ctx, n1, rules); err != nil {
					t.Fatalf("nft: %v: %s", err, out)
				}
				defer runNft(ce.ctx, n1, "delete table ip masq-test\n")
				c := dialEcho(t, ce.ctx, b, netip.AddrPortFrom(a.IPv4, 9090)) // warm the reverse path
				c.Close()
				c = dialEcho(t, ce.ctx, a, netip.AddrPortFrom(b.IPv4, 8080))
				orig := tupleOf(c)
				// Masquerade picks the address of the interface the packet
				// leaves by: eth0's, or with VXLAN the device's .0.
				masq := n1.Addr4
				if topo.vxlan {
					masq = n1.PodCIDR4.Addr()
				}
				var conns []view.Conn
				eventually(t, "masqueraded record on node 2", func() error {
					n2.ctlJSON(t, &conns, "conns")
					for _, x := range conns {
						if strings.HasPrefix(x.Src, masq.String()+":") && x.Origin != nil && x.Origin.Pod == "client" && x.Origin.Node == n1.name {
							return nil
						}
					}
					return fmt.Errorf("no record from %s naming team-a/client@node-1 in %d conns", masq, len(conns))
				})
				if _, ok := n1.lookup(t, orig); !ok {
					t.Fatalf("origin node lost its record for %s", orig)
				}
			})

			t.Run("reverse direction", func(t *testing.T) {
				c := dialEcho(t, ce.ctx, b, netip.AddrPortFrom(a.IPv4, 9090))
				tp := tupleOf(c)
				checkRemoteOrigin(t, n1, n2, tp, tp, b)
			})

			t.Run("option stripped before the destination pod", func(t *testing.T) {
				for _, dst := range []netip.Addr{b.IPv4, b.IPv6} {
					cap := captureSYNs(t, b, 8080)
					c := dialEcho(t, ce.ctx, a, netip.AddrPortFrom(dst, 8080))
					tp := tupleOf(c)
					syn := cap.wait(t, tp.Src.Port())
					if opts := datapath.FindOption(syn); len(opts) != 0 {
						t.Fatalf("the server pod saw a pktmeta option: % x", syn)
					}
					if len(syn) != 20 {
						t.Fatalf("the server pod saw %d bytes of options (% x), want Linux's 20 as the client sent them", len(syn), syn)
					}
				}
				if s := n1.remoteStats(t); s.OptAdded == 0 {
					t.Fatalf("node 1 added no options: %+v", s)
				}
			})

			t.Run("a pod that forges the option", func(t *testing.T) {
				// Client pod a writes its own SYN claiming to be node 2's
				// server workload; node 1 overwrites it and puts the truth.
				f := newForger(t, a)
				before := n1.remoteStats(t).OptNeutralised
				// The pod's kernel would reset the answer to a SYN it did
				// not send, and the RST end both records: keep them.
				if out, err := nftIn(ce.ctx, a.NetnsPath, "table ip forger {\n chain out {\n  type filter hook output priority 0\n  tcp sport 45001 tcp flags rst drop\n }\n}\n"); err != nil {
					t.Fatalf("nft: %v: %s", err, out)
				}
				src := netip.AddrPortFrom(a.IPv4, 45001)
				dst := netip.AddrPortFrom(b.IPv4, 8080)
				forged := datapath.Option{Version: datapath.OptionVersion, ConnID: 1, Node: 2, Workload: 4242}.Encode()
				p := testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 100, TCPOptions: forged}
				f.send(p)
				tp := datapath.Tuple{Proto: datapath.ProtoTCP, Src: src, Dst: dst}
				got := checkRemoteOrigin(t, n2, n1, tp, tp, a)
				if got.Origin.ID == 4242 {
					t.Fatal("the forged workload id was honoured")
				}
				if n1.remoteStats(t).OptNeutralised != before+1 {
					t.Fatal("the forged option was not counted")
				}
			})

			t.Run("an option from outside the cluster", func(t *testing.T) {
				// The fabric itself plays a host outside the cluster: it
				// has an address no cluster file lists.
				stranger := netip.MustParseAddr("192.168.50.200")
				if err := ipIn(ce.ctx, ce.c.FabricNetnsPath, "addr", "add", stranger.String()+"/24", "dev", "br0"); err != nil {
					t.Fatal(err)
				}
				if err := ipIn(ce.ctx, ce.c.FabricNetnsPath, "route", "add", n2.PodCIDR4.String(), "via", n2.Addr4.String()); err != nil {
					t.Fatal(err)
				}
				before := n2.remoteStats(t)
				src := netip.AddrPortFrom(stranger, 40404)
				dst := netip.AddrPortFrom(b.IPv4, 8080)
				opt := datapath.Option{Version: datapath.OptionVersion, ConnID: 9, Node: 1, Workload: 1}.Encode()
				p := testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 5, TCPOptions: opt}
				cap := captureSYNs(t, b, 8080)
				if err := sendRawIPv4From(ce.c.FabricNetnsPath, p.Bytes()[14:], b.IPv4); err != nil {
					t.Fatal(err)
				}
				syn := cap.wait(t, 40404)
				if len(datapath.FindOption(syn)) != 0 {
					t.Fatalf("the option reached the pod: % x", syn)
				}
				after := n2.remoteStats(t)
				if after.Untrusted != before.Untrusted+1 {
					t.Fatalf("untrusted %d -> %d", before.Untrusted, after.Untrusted)
				}
				if _, ok := n2.lookup(t, datapath.Tuple{Proto: datapath.ProtoTCP, Src: src, Dst: dst}); ok {
					t.Fatal("a record was made from an outsider's option")
				}
			})

			t.Run("SYN with no room for the option", func(t *testing.T) {
				// An MPTCP client's SYN carries MP_CAPABLE besides Linux's 20
				// bytes: 16 are left. It goes as it is, counted, and the
				// connection works. (A SYN with data, TCP Fast Open, is the
				// other case; datapath.TestUplinkOutLeavesOtherSYNsAlone
				// covers both.)
				if _, err := os.Stat("/proc/sys/net/mptcp/enabled"); err != nil {
					t.Skipf("Linux %s has no MPTCP: %v", datapath.KernelRelease(), err)
				}
				before := n1.remoteStats(t).OptNoRoom
				l, err := listenMPTCP(b, 8282)
				if err != nil {
					t.Fatal(err)
				}
				s := testbed.ServeTCPEcho(l)
				defer s.Close()
				c, err := dialMPTCP(ce.ctx, a, netip.AddrPortFrom(b.IPv4, 8282))
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if err := testbed.EchoRoundTrip(c, []byte("ping"), 5*time.Second); err != nil {
					t.Fatalf("the connection without room failed: %v", err)
				}
				if got := n1.remoteStats(t).OptNoRoom; got != before+1 {
					t.Fatalf("no-room count %d -> %d", before, got)
				}
				if _, ok := n2.lookup(t, tupleOf(c)); ok {
					t.Fatal("node 2 has a record of a connection whose SYN carried no option")
				}
			})

			t.Run("events on the destination", func(t *testing.T) {
				// The ring buffer may hold earlier events: read until ours.
				type result struct {
					out string
					err error
				}
				done := make(chan result, 1)
				go func() {
					out, err := n2.ctlBackground("events", "-o", "json", "--timeout", "2s")
					done <- result{out, err}
				}()
				time.Sleep(300 * time.Millisecond)
				src := tupleOf(dialEcho(t, ce.ctx, a, netip.AddrPortFrom(b.IPv4, 8080))).Src.String()
				r := <-done
				for _, line := range strings.Split(strings.TrimSpace(r.out), "\n") {
					var ev view.Event
					if json.Unmarshal([]byte(line), &ev) != nil || ev.Src != src || ev.Event != "opened" {
						continue
					}
					if ev.Origin == nil || !ev.Origin.Remote || ev.Origin.Node != n1.name || ev.Origin.Pod != "client" || ev.OriginConnID == 0 {
						t.Fatalf("event %+v origin %+v", ev, ev.Origin)
					}
					return
				}
				t.Fatalf("no opened event for %s: %v\n%s", src, r.err, r.out)
			})

			t.Run("DEL on either node", func(t *testing.T) {
				c1 := n1.addPod(t, "team-a", "short-lived")
				d2 := n2.addPod(t, "team-b", "short-lived")
				serveEcho(t, d2, 7070)
				conn := dialEcho(t, ce.ctx, c1, netip.AddrPortFrom(d2.IPv4, 7070))
				tp := tupleOf(conn)
				checkRemoteOrigin(t, n2, n1, tp, tp, c1)
				// DEL of the origin: its node forgets it; the destination
				// keeps the record (the connection lives on) but can no
				// longer name the pod.
				if err := n1.DelPod(ce.ctx, c1); err != nil {
					t.Fatal(err)
				}
				if _, ok := n1.lookup(t, tp); ok {
					t.Fatal("origin node kept the record of a deleted pod")
				}
				got, ok := n2.lookup(t, tp)
				if !ok || !got.Origin.Unknown || got.Origin.Node != n1.name {
					t.Fatalf("after the origin's DEL: %v %+v", ok, got.Origin)
				}
				// DEL of the receiver removes the remote record.
				live := func() int64 {
					d := n2.open(t)
					st, err := d.Node()
					if err != nil {
						t.Fatal(err)
					}
					return st.LiveRemote
				}
				before := live()
				if err := n2.DelPod(ce.ctx, d2); err != nil {
					t.Fatal(err)
				}
				if _, ok := n2.lookup(t, tp); ok {
					t.Fatal("destination kept the remote record of a deleted receiver")
				}
				if after := live(); after != before-1 {
					t.Fatalf("live remote records %d -> %d", before, after)
				}
			})

			if topo.vxlan {
				t.Run("a pod that tunnels a forged SYN through VXLAN", func(t *testing.T) {
					// Any pod can send UDP to a node's VXLAN port: the inner
					// frame then enters node 2's vxlan0 as if node 1 had sent
					// it, from a member address. Only the MAC tells.
					before := n2.remoteStats(t).BadMAC
					src := netip.AddrPortFrom(a.IPv4, 45002)
					dst := netip.AddrPortFrom(b.IPv4, 8080)
					forged := datapath.Option{Version: datapath.OptionVersion, ConnID: 1, Node: 1, Workload: 4243, MAC: 0xdeadbeef}.Encode()
					inner := testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 7,
						TCPOptions: append(append([]byte(nil), testutil.LinuxSYNOptions...), forged...),
						SrcMAC:     mustMAC("02:00:00:00:42:01"), DstMAC: mustMAC("02:00:00:00:42:02")}
					vxlanHdr := []byte{0x08, 0, 0, 0, 0, 0, 42, 0} // flags: VNI valid; VNI 42
					c, err := a.DialUDP(netip.AddrPortFrom(n2.Addr4, 4789))
					if err != nil {
						t.Fatal(err)
					}
					defer c.Close()
					if _, err := c.Write(append(vxlanHdr, inner.Bytes()...)); err != nil {
						t.Fatal(err)
					}
					eventually(t, "bad MAC counted on node 2", func() error {
						if got := n2.remoteStats(t).BadMAC; got != before+1 {
							return fmt.Errorf("bad MAC %d -> %d", before, got)
						}
						return nil
					})
					if c, ok := n2.lookup(t, datapath.Tuple{Proto: datapath.ProtoTCP, Src: src, Dst: dst}); ok {
						t.Fatalf("a record from a tunnelled forgery: origin %+v", c.Origin)
					}
				})
			}

			t.Run("status", func(t *testing.T) {
				var st struct {
					Node struct {
						ID      uint16 `json:"id"`
						MAC     bool   `json:"mac"`
						Uplinks []struct {
							IfName string `json:"ifname"`
							Hooks  []struct {
								OK bool `json:"OK"`
							} `json:"hooks"`
						} `json:"uplinks"`
					} `json:"node"`
					Problems []string `json:"problems"`
				}
				// It exits 1 when it finds a problem (a kernel without tcx has
				// one); the JSON comes first either way.
				out, _ := n2.ctl(t, "status", "-o", "json")
				if err := json.NewDecoder(strings.NewReader(out)).Decode(&st); err != nil {
					t.Fatalf("%v\n%s", err, out)
				}
				if st.Node.ID != 2 || !st.Node.MAC || len(st.Node.Uplinks) == 0 {
					t.Fatalf("node status %+v", st.Node)
				}
				for _, u := range st.Node.Uplinks {
					for _, h := range u.Hooks {
						if !h.OK {
							t.Fatalf("uplink %s: a hook is not attached", u.IfName)
						}
					}
				}
				for _, p := range st.Problems {
					if strings.Contains(p, "uplink") || strings.Contains(p, "node id") {
						t.Fatalf("problem: %s", p)
					}
				}
			})
		})
	}
}

// ctlBackground is ctl for a goroutine: it reports failures in its result.
func (n *clusterNode) ctlBackground(args ...string) (string, error) {
	var out []byte
	var err error
	nsErr := n.Do(func() error {
		cmd := exec.CommandContext(n.env.ctx, filepath.Join(binDir, "pktmetactl"),
			append([]string{"--pin-path", n.pin, "--api-socket", "", "--cluster", n.env.clusterFile}, args...)...)
		out, err = cmd.Output()
		return nil
	})
	return string(out), errors.Join(nsErr, err)
}

// runNft runs an nft script in the node's netns.
func runNft(ctx context.Context, n *clusterNode, script string) ([]byte, error) {
	return nftIn(ctx, n.NetnsPath, script)
}

func nftIn(ctx context.Context, netnsPath, script string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "nsenter", "--net="+netnsPath, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	return cmd.CombinedOutput()
}

func ipIn(ctx context.Context, netnsPath string, args ...string) error {
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + netnsPath, "ip"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ip %v: %w: %s", args, err, out)
	}
	return nil
}

// sendRawIPv4From sends an IPv4 packet as written (IP_HDRINCL) from the
// network namespace at netnsPath.
func sendRawIPv4From(netnsPath string, pkt []byte, dst netip.Addr) error {
	errc := make(chan error, 1)
	go func() {
		ns, err := netns.GetFromPath(netnsPath)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		if err := testutil.EnterNetns(ns); err != nil {
			errc <- err
			return
		}
		fd, err := rawIPv4Socket()
		if err != nil {
			errc <- err
			return
		}
		defer closeFD(fd)
		errc <- sendRawIPv4(fd, pkt, dst)
	}()
	return <-errc
}

// synCapture reads the frames a pod receives on its interface.
type synCapture struct {
	fd   int
	port uint16
}

// captureSYNs opens a packet socket in p before traffic starts; wait
// returns the TCP options of the first SYN to port from srcPort.
func captureSYNs(t *testing.T, p *testbed.Pod, port uint16) *synCapture {
	t.Helper()
	c := &synCapture{port: port}
	err := p.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		tv := unix.Timeval{Sec: 1}
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		c.fd = fd
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(c.fd) })
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (c *synCapture) wait(t *testing.T, srcPort uint16) []byte {
	t.Helper()
	buf := make([]byte, 2048)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		n, from, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil {
			continue
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if opts, ok := synOptions(buf[:n], srcPort, c.port); ok {
			return opts
		}
	}
	t.Fatalf("no SYN from port %d to port %d reached the pod", srcPort, c.port)
	return nil
}

// synOptions returns the TCP options of an Ethernet frame carrying a SYN
// from srcPort to dstPort.
func synOptions(f []byte, srcPort, dstPort uint16) ([]byte, bool) {
	if len(f) < 14 {
		return nil, false
	}
	var l4 []byte
	switch binary.BigEndian.Uint16(f[12:]) {
	case 0x0800:
		ip := f[14:]
		if len(ip) < 20 || ip[9] != 6 {
			return nil, false
		}
		l4 = ip[int(ip[0]&0xf)*4:]
	case 0x86dd:
		ip := f[14:]
		if len(ip) < 40 || ip[6] != 6 {
			return nil, false
		}
		l4 = ip[40:]
	default:
		return nil, false
	}
	if len(l4) < 20 || binary.BigEndian.Uint16(l4[0:]) != srcPort || binary.BigEndian.Uint16(l4[2:]) != dstPort || l4[13]&0x12 != 0x02 {
		return nil, false
	}
	thlen := int(l4[12]>>4) * 4
	if thlen < 20 || thlen > len(l4) {
		return nil, false
	}
	return append([]byte(nil), l4[20:thlen]...), true
}

// listenMPTCP listens in p on an MPTCP socket.
func listenMPTCP(p *testbed.Pod, port int) (net.Listener, error) {
	var l net.Listener
	err := p.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(true)
		var err error
		l, err = lc.Listen(context.Background(), "tcp", fmt.Sprintf(":%d", port))
		return err
	})
	return l, err
}

// dialMPTCP connects from p with an MPTCP socket.
func dialMPTCP(ctx context.Context, p *testbed.Pod, dst netip.AddrPort) (net.Conn, error) {
	var c net.Conn
	err := p.Do(func() error {
		var d net.Dialer
		d.SetMultipathTCP(true)
		var err error
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	return c, err
}

func mustMAC(s string) net.HardwareAddr {
	m, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return m
}

// node set checks what it is given before it touches anything.
func TestNodeSetRefusesBadInput(t *testing.T) {
	e := newEnv(t, envOptions{})
	dir := t.TempDir()
	short := filepath.Join(dir, "short.key")
	if err := os.WriteFile(short, []byte("12345"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good.key")
	if err := os.WriteFile(good, []byte("00112233445566778899aabbccddeeff\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no key", []string{"--id", "5", "--member", "10.244.0.0/16"}, "--key-file"},
		{"key and no-mac", []string{"--id", "5", "--member", "10.244.0.0/16", "--key-file", good, "--no-mac"}, "exclude"},
		{"short key", []string{"--id", "5", "--member", "10.244.0.0/16", "--key-file", short}, "32 hex digits"},
		{"whole Internet as a member", []string{"--id", "5", "--member", "0.0.0.0/0", "--no-mac"}, "too wide"},
		{"id 0", []string{"--id", "0", "--member", "10.244.0.0/16", "--no-mac"}, "1-65535"},
		{"no members", []string{"--id", "5", "--no-mac"}, "member"},
		{"bad member", []string{"--id", "5", "--member", "10.244.0.0/33", "--no-mac"}, "not a prefix"},
		{"no such uplink", []string{"--id", "5", "--member", "10.244.0.0/16", "--no-mac", "--uplink", "nosuch0"}, "nosuch0"},
		{"name without a cluster file", []string{"--name", "node-1", "--no-mac"}, "--cluster"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, code := e.ctl(append([]string{"node", "set"}, tc.args...)...)
			if code != 2 || !strings.Contains(out, tc.want) {
				t.Fatalf("exit %d: %s (want 2 and %q)", code, out, tc.want)
			}
			if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("a refused node set left %s behind (%v)", e.pin, err)
			}
		})
	}
	t.Run("an uplink without Ethernet headers", func(t *testing.T) {
		out, code := e.ctl("node", "set", "--id", "5", "--member", "10.244.0.0/16", "--no-mac", "--uplink", "lo")
		if code != 2 || !strings.Contains(out, "Ethernet") {
			t.Fatalf("exit %d: %s", code, out)
		}
		if _, err := os.Stat(e.pin); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("a refused node set left %s behind (%v)", e.pin, err)
		}
	})
	t.Run("set, show, off", func(t *testing.T) {
		// A veth stands for the node's NIC.
		if out, err := e.node.Run(e.ctx, "ip", "link", "add", "pmup0", "type", "veth", "peer", "name", "pmup1"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		if out, code := e.ctl("node", "set", "--id", "5", "--member", "10.244.0.0/16", "--member", "192.168.50.11", "--key-file", good, "--uplink", "pmup0"); code != 0 {
			t.Fatalf("exit %d: %s", code, out)
		}
		var st struct {
			ID      uint16   `json:"id"`
			MAC     bool     `json:"mac"`
			Members []string `json:"members"`
			Uplinks []struct {
				IfName string `json:"ifname"`
			} `json:"uplinks"`
		}
		e.ctlJSON(&st, "node", "show")
		if st.ID != 5 || !st.MAC || len(st.Members) != 2 || len(st.Uplinks) != 1 || st.Uplinks[0].IfName != "pmup0" {
			t.Fatalf("node show: %+v", st)
		}
		// Off: out of the cluster, but still guarding its uplinks.
		if out, code := e.ctl("node", "off"); code != 0 {
			t.Fatalf("node off: exit %d: %s", code, out)
		}
		e.ctlJSON(&st, "node", "show")
		if st.ID != 0 || len(st.Members) != 0 || len(st.Uplinks) != 1 {
			t.Fatalf("after node off: %+v", st)
		}
		if out, code := e.ctl("node", "off", "--detach"); code != 0 {
			t.Fatalf("node off --detach: exit %d: %s", code, out)
		}
		e.ctlJSON(&st, "node", "show")
		if len(st.Uplinks) != 0 {
			t.Fatalf("after node off --detach: %+v", st)
		}
	})
}

// Three nodes: a pod on node 1 reaches a NodePort on node 2 (DNAT to a pod
// on node 3, and masquerade, as kube-proxy does for traffic from outside
// the node). Node 2 forwards the origin it received; node 3
// names the pod on node 1, not node 2.
func TestCrossNodeForwardedThroughAThirdNode(t *testing.T) {
	// Node 2 finds what it received through conntrack, behind its DNAT.
	requireConntrackKfuncs(t)
	ce := newClusterEnv(t, false, 3)
	n1, n2, n3 := ce.nodes[0], ce.nodes[1], ce.nodes[2]
	a := n1.addPod(t, "team-a", "client")
	c := n3.addPod(t, "team-c", "backend")
	serveEcho(t, c, 8080)
	// A NodePort: node 2's own address, a member.
	vip := netip.AddrPortFrom(n2.Addr4, 30080)
	if err := n2.AddService(testbed.Service{Proto: "tcp", VIP: vip, Backend: netip.AddrPortFrom(c.IPv4, 8080)}); err != nil {
		t.Fatal(err)
	}
	masq := fmt.Sprintf("table ip nodeport {\n chain post {\n  type nat hook postrouting priority srcnat\n  ip daddr %s tcp dport 8080 masquerade\n }\n}\n", c.IPv4)
	if out, err := runNft(ce.ctx, n2, masq); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	conn := dialEcho(t, ce.ctx, a, vip)
	orig := tupleOf(conn)
	var got view.Conn
	eventually(t, "record on node 3", func() error {
		var conns []view.Conn
		n3.ctlJSON(t, &conns, "conns")
		for _, x := range conns {
			if strings.HasPrefix(x.Src, n2.Addr4.String()+":") && x.Dst == netip.AddrPortFrom(c.IPv4, 8080).String() {
				got = x
				return nil
			}
		}
		return fmt.Errorf("no record from node 2's address in %d conns", len(conns))
	})
	if got.Origin == nil || !got.Origin.Remote || got.Origin.Node != n1.name || got.Origin.Pod != "client" {
		t.Fatalf("node 3 names %+v, want team-a/client on node-1", got.Origin)
	}
	local, ok := n1.lookup(t, orig)
	if !ok || got.OriginConnID != local.ConnID&datapath.ConnOriginMask {
		t.Fatalf("origin conn id %d, node 1's record %+v (%v)", got.OriginConnID, local, ok)
	}
	// Node 2 passed it on: it received the option and added one.
	if s := n2.remoteStats(t); s.RemoteTagged == 0 || s.OptAdded == 0 {
		t.Fatalf("node 2 counters %+v", s)
	}
}

// A `pktmetactl node set` SIGKILLed at any moment (the node losing power)
// never leaves programs on an uplink that `node off --detach`, and so
// uninstall, cannot find: the uplink's record exists before anything is
// attached. Both mechanisms, since they record differently (tcx pins in the
// uplink's directory; legacy filters only by the directory's existence),
// and auto, which on a kernel without tcx (the kernel matrix) picks legacy.
func TestKilledNodeSetLeavesNoUntrackedUplink(t *testing.T) {
	for _, mode := range []attach.Mode{attach.TCX, attach.Legacy, attach.Auto} {
		t.Run(string(mode), func(t *testing.T) {
			if mode == attach.TCX && !attach.HaveTCX() {
				t.Skip("this kernel has no tcx (6.6)")
			}
			e := newEnv(t, envOptions{})
			if out, err := e.node.Run(e.ctx, "ip", "link", "add", "pmkill0", "type", "veth", "peer", "name", "pmkill1"); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			var ifindex int
			if err := e.node.Do(func() error {
				l, err := netlink.LinkByName("pmkill0")
				if err == nil {
					ifindex = l.Attrs().Index
				}
				return err
			}); err != nil {
				t.Fatal(err)
			}
			args := []string{"--pin-path", e.pin, "node", "set", "--id", "3", "--member", "10.244.0.0/16", "--no-mac", "--uplink", "pmkill0", "--attach-mode", string(mode)}
			// A whole run first makes the datapath (the kills below are
			// about the uplink, not the load); a second gives a run's
			// length.
			var full time.Duration
			for range 2 {
				if out, code := e.ctl("node", "off", "--detach"); code != 0 && full > 0 {
					t.Fatalf("node off --detach: exit %d: %s", code, out)
				}
				start := time.Now()
				if out, code := e.ctl(args[2:]...); code != 0 {
					t.Fatalf("node set: exit %d: %s", code, out)
				}
				full = time.Since(start)
			}
			leftOver := func() string {
				var a attach.Attached
				if err := e.node.Do(func() error {
					var err error
					a, err = attach.Query(ifindex)
					return err
				}); err != nil {
					t.Fatal(err)
				}
				if n := len(a.TCX[attach.Ingress]) + len(a.TCX[attach.Egress]) + len(a.Legacy); n > 0 {
					return fmt.Sprintf("%+v", a)
				}
				return ""
			}
			rng := mrand.New(mrand.NewPCG(uint64(time.Now().UnixNano()), 11))
			killed := 0
			for i := range 16 {
				if out, code := e.ctl("node", "off", "--detach"); code != 0 {
					t.Fatalf("node off --detach: exit %d: %s", code, out)
				}
				if left := leftOver(); left != "" {
					t.Fatalf("round %d: after node off --detach, pmkill0 still has %s", i, left)
				}
				after := time.Duration(rng.Int64N(int64(full)*3/2 + 1))
				var was bool
				e.node.Do(func() error {
					c := exec.Command(filepath.Join(binDir, "pktmetactl"), args...)
					if err := c.Start(); err != nil {
						t.Fatal(err)
					}
					done := make(chan error, 1)
					go func() { done <- c.Wait() }()
					select {
					case <-done:
					case <-time.After(after):
						c.Process.Signal(syscall.SIGKILL)
						<-done
						was = true
					}
					return nil
				})
				if was {
					killed++
				}
			}
			if out, code := e.ctl("node", "off", "--detach"); code != 0 {
				t.Fatalf("node off --detach: exit %d: %s", code, out)
			}
			if left := leftOver(); left != "" {
				t.Fatalf("after the last node off --detach, pmkill0 still has %s", left)
			}
			t.Logf("%d of 16 runs killed (a whole run took %s)", killed, full.Round(time.Millisecond))
		})
	}
}
