package datapath

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// appsEnv is a datapath whose application program is on the node's
// cgroup v2 root (as on a node: the test's own sockets are asked), with
// records written by hand, so that every decision of pktmeta_getsockopt
// can be set up exactly. The e2e tests ask sockets of connections the
// datapath tagged and delivered itself.
type appsEnv struct {
	d      *Datapath
	netns  uint64 // the test's own netns cookie
	origin Workload
}

func mustAttachApps(tb testing.TB) *appsEnv {
	tb.Helper()
	testutil.RequireRoot(tb)
	root, err := CgroupRoot()
	if err != nil {
		tb.Fatalf("cgroup v2: %v", err)
	}
	d, _ := mustOpen(tb, testutil.PinPath(tb), 4096)
	if err := d.AttachApps(root, true); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.DetachApps() })
	cookie, err := CurrentNetnsCookie()
	if err != nil {
		tb.Fatal(err)
	}
	e := &appsEnv{d: d, netns: cookie}
	e.origin = Workload{ContainerID: "client", IfName: "eth0", Namespace: "shop", Pod: "client-7d9f", UID: "0b6e-uid",
		Tags: map[string]string{"team": "payments"}, PodTags: map[string]string{"app": "client"}}
	if _, err := d.registerWorkload(&e.origin); err != nil {
		tb.Fatal(err)
	}
	return e
}

// receiver registers a workload for the receiving side in netns cookie.
func (e *appsEnv) receiver(tb testing.TB, name string, netns uint64) uint32 {
	tb.Helper()
	w := Workload{ContainerID: name, IfName: "eth0", Namespace: "shop", Pod: name}
	if _, err := e.d.registerWorkload(&w); err != nil {
		tb.Fatal(err)
	}
	if err := e.d.putWorkloadNetns(w.ID, netns); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.d.deleteWorkload(w.ID) })
	return w.ID
}

// podAt registers a receiving workload in netns cookie with an endpoint
// holding addrs, as an ADD would: its netns then has these addresses.
func (e *appsEnv) podAt(tb testing.TB, name string, netns uint64, ifindex uint32, addrs ...netip.Addr) uint32 {
	tb.Helper()
	w := Workload{ContainerID: name, IfName: "eth0", Namespace: "shop", Pod: name, HostIfindex: ifindex}
	if _, err := e.d.registerWorkload(&w); err != nil {
		tb.Fatal(err)
	}
	if err := e.d.putWorkloadNetns(w.ID, netns); err != nil {
		tb.Fatal(err)
	}
	if err := e.d.putEndpoint(ifindex, Endpoint{Workload: w.ID, Addrs: addrs}); err != nil {
		tb.Fatal(err)
	}
	e.d.syncNetnsAddrs(netns)
	tb.Cleanup(func() {
		e.d.DeleteEndpoint(ifindex, w.ID)
		e.d.deleteWorkload(w.ID)
	})
	return w.ID
}

func (e *appsEnv) putRecord(tb testing.TB, t Tuple, rec bpfPktmetaRecord) {
	tb.Helper()
	rec.Version = RecordVersion
	putRecord(tb, e.d, t, rec)
}

func (e *appsEnv) putAlias(tb testing.TB, seen, origin Tuple, connID uint64) {
	tb.Helper()
	k := seen.key()
	a := bpfPktmetaAlias{Version: RecordVersion, ConnId: connID, Origin: origin.key()}
	if err := e.d.AliasesMap.Update(&k, &a, ebpf.UpdateAny); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { e.d.AliasesMap.Delete(&k) })
}

// tcpPair returns both ends of a TCP connection over loopback.
func tcpPair(tb testing.TB, network, addr string) (client, server *net.TCPConn) {
	tb.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		tb.Skipf("no %s loopback here: %v", network, err)
	}
	defer ln.Close()
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	}
	panic("not an IP address")
}

// connTuple is the connection as the client opened it.
func connTuple(proto uint8, client net.Conn) Tuple {
	return Tuple{Proto: proto, Src: addrPort(client.LocalAddr()), Dst: addrPort(client.RemoteAddr())}
}

func TestApplicationsAskTheirSockets(t *testing.T) {
	e := mustAttachApps(t)
	now := monoNow(t)

	t.Run("receiver of a direct TCP connection, IPv4 and IPv6", func(t *testing.T) {
		rcv := e.receiver(t, "server-direct", e.netns)
		for _, net := range []struct{ network, addr string }{{"tcp4", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
			c, s := tcpPair(t, net.network, net.addr)
			e.putRecord(t, connTuple(ProtoTCP, c), bpfPktmetaRecord{Flags: FlagDelivered, ConnId: 4097, ConnGen: 4097,
				OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
			o, err := pktmeta.Origin(s)
			if err != nil {
				t.Fatalf("%s: %v", net.network, err)
			}
			if o.Namespace != "shop" || o.Pod != "client-7d9f" || o.UID != "0b6e-uid" || o.ConnID != 4097 || o.Self || o.NAT || o.Remote {
				t.Fatalf("%s: origin %+v", net.network, o)
			}
			if o.Tags["team"] != "payments" || o.PodTags["app"] != "client" || len(o.Tags) != 1 || len(o.PodTags) != 1 {
				t.Fatalf("%s: operator tags %v, pod tags %v: not told apart", net.network, o.Tags, o.PodTags)
			}
			if d := time.Since(o.FirstSeen); d < 0 || d > time.Minute {
				t.Fatalf("%s: first seen %v, %v ago", net.network, o.FirstSeen, d)
			}
		}
	})

	t.Run("the origin's own socket answers as Self", func(t *testing.T) {
		if err := e.d.putWorkloadNetns(e.origin.ID, e.netns); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.d.deleteWorkloadNetns(e.origin.ID) })
		c, _ := tcpPair(t, "tcp4", "127.0.0.1:0")
		e.putRecord(t, connTuple(ProtoTCP, c), bpfPktmetaRecord{ConnId: 4098, ConnGen: 4098, OriginWorkload: e.origin.ID, FirstSeenNs: now})
		o, err := pktmeta.Origin(c)
		if err != nil {
			t.Fatal(err)
		}
		if !o.Self || o.ConnID != 4098 || o.Pod != "client-7d9f" {
			t.Fatalf("origin %+v", o)
		}
	})

	t.Run("behind NAT through the alias", func(t *testing.T) {
		rcv := e.receiver(t, "server-nat", e.netns)
		c, s := tcpPair(t, "tcp4", "127.0.0.1:0")
		seen := connTuple(ProtoTCP, c)
		vip := Tuple{Proto: ProtoTCP, Src: seen.Src, Dst: netip.MustParseAddrPort("10.96.0.10:80")}
		e.putRecord(t, vip, bpfPktmetaRecord{Flags: FlagDelivered | FlagNAT, ConnId: 4099, ConnGen: 4099, OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
		e.putAlias(t, seen, vip, 4099)
		o, err := pktmeta.Origin(s)
		if err != nil {
			t.Fatal(err)
		}
		if !o.NAT || o.ConnID != 4099 || o.Pod != "client-7d9f" {
			t.Fatalf("origin %+v", o)
		}
		// An alias left by an older connection of that tuple says nothing.
		e.putAlias(t, seen, vip, 1234)
		wantUnknown(t, s)
	})

	t.Run("another pod's netns learns nothing", func(t *testing.T) {
		// Delivered to a pod in another netns: this socket carries the
		// same addresses (as a pod binding another's address would) but
		// is not that pod's.
		rcv := e.receiver(t, "server-elsewhere", e.netns+1)
		c, s := tcpPair(t, "tcp4", "127.0.0.1:0")
		e.putRecord(t, connTuple(ProtoTCP, c), bpfPktmetaRecord{Flags: FlagDelivered, ConnId: 4100, ConnGen: 4100, OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
		wantUnknown(t, s)
		// Not delivered yet: nobody's.
		rcv2 := e.receiver(t, "server-here", e.netns)
		e.putRecord(t, connTuple(ProtoTCP, c), bpfPktmetaRecord{ConnId: 4100, ConnGen: 4100, OriginWorkload: e.origin.ID, PeerWorkload: rcv2, FirstSeenNs: now})
		wantUnknown(t, s)
		// And the client's side is not the origin's netns either: not
		// without an entry, not with another pod's.
		wantUnknown(t, c)
		if err := e.d.putWorkloadNetns(e.origin.ID, e.netns+1); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.d.deleteWorkloadNetns(e.origin.ID) })
		wantUnknown(t, c)
	})

	t.Run("two datapaths on one cgroup: whichever knows answers", func(t *testing.T) {
		// A second pktmeta (its own pin path) with its program after
		// ours on the same cgroup. Each knows one connection.
		other := mustAttachApps(t)
		mine := e.receiver(t, "server-mine", e.netns)
		theirs := other.receiver(t, "server-theirs", other.netns)
		c1, s1 := tcpPair(t, "tcp4", "127.0.0.1:0")
		c2, s2 := tcpPair(t, "tcp4", "127.0.0.1:0")
		e.putRecord(t, connTuple(ProtoTCP, c1), bpfPktmetaRecord{Flags: FlagDelivered, ConnId: 5001, ConnGen: 5001, OriginWorkload: e.origin.ID, PeerWorkload: mine, FirstSeenNs: now})
		other.putRecord(t, connTuple(ProtoTCP, c2), bpfPktmetaRecord{Flags: FlagDelivered, ConnId: 5002, ConnGen: 5002, OriginWorkload: other.origin.ID, PeerWorkload: theirs, FirstSeenNs: now})
		for _, c := range []struct {
			s    net.Conn
			want uint64
		}{{s1, 5001}, {s2, 5002}} {
			o, err := pktmeta.Origin(c.s)
			if err != nil || o.ConnID != c.want {
				t.Fatalf("got %+v, %v; want connection %d", o, err, c.want)
			}
		}
	})

	t.Run("unknown connection", func(t *testing.T) {
		_, s := tcpPair(t, "tcp4", "127.0.0.1:0")
		wantUnknown(t, s)
	})

	t.Run("connected UDP", func(t *testing.T) {
		rcv := e.receiver(t, "server-udp", e.netns)
		srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		cl, err := net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		e.putRecord(t, connTuple(ProtoUDP, cl), bpfPktmetaRecord{Flags: FlagDelivered | FlagUDP, ConnId: 4101, ConnGen: 4101, OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
		// Unconnected and nothing received yet: no peer to ask about.
		if _, err := pktmeta.Origin(srv); !errors.Is(err, wantErr(pktmeta.ErrNotConnected)) {
			t.Fatalf("unconnected UDP before any datagram: %v, want %v", err, wantErr(pktmeta.ErrNotConnected))
		}
		// After recvfrom: the flow of the datagram it returned.
		if e.d.Recvmsg4 != nil {
			sendRecv(t, cl, srv)
			o, err := pktmeta.Origin(srv)
			if err != nil || !o.UDP || o.ConnID != 4101 {
				t.Fatalf("unconnected UDP after recvfrom: %+v, %v", o, err)
			}
		} else {
			t.Log("this kernel cannot run the recvmsg programs (KernelFeatures.AppsUDP): unconnected sockets are not answered")
		}
		// Connected to the peer recvmsg named, it answers.
		connectUDP(t, srv, cl.LocalAddr().(*net.UDPAddr))
		o, err := pktmeta.Origin(srv)
		if err != nil {
			t.Fatal(err)
		}
		if !o.UDP || o.ConnID != 4101 {
			t.Fatalf("origin %+v", o)
		}
	})

	t.Run("unconnected UDP bound to the wildcard: the datagram recvfrom returned", func(t *testing.T) {
		if e.d.Recvmsg4 == nil {
			t.Skip("this kernel cannot run the recvmsg programs (bpf_sk_storage_get for cgroup sock_addr programs)")
		}
		rcv := e.podAt(t, "server-wild", e.netns, 1<<30, netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1"))
		elsewhere := e.podAt(t, "server-elsewhere", e.netns+1, 1<<30+1, netip.MustParseAddr("127.0.0.1"))
		for _, c := range []struct {
			name       string
			listen     string // network of the server's wildcard socket
			dial, to   string
			connID     uint64
			podAddress bool // to is one of the pod's addresses
			elsewhere  bool // the flow was delivered to a pod in another netns
		}{
			{"IPv4 socket", "udp4", "udp4", "127.0.0.1", 4201, true, false},
			{"IPv6 socket", "udp6", "udp6", "::1", 4202, true, false},
			{"dual-stack socket, IPv4 datagram", "udp", "udp4", "127.0.0.1", 4203, true, false},
			{"to an address the pod does not have", "udp4", "udp4", "127.0.0.2", 4204, false, false},
			{"a flow delivered to another netns", "udp4", "udp4", "127.0.0.1", 4205, true, true},
		} {
			t.Run(c.name, func(t *testing.T) {
				srv, err := net.ListenUDP(c.listen, nil)
				if err != nil {
					t.Skipf("no %s here: %v", c.listen, err)
				}
				defer srv.Close()
				to := netip.AddrPortFrom(netip.MustParseAddr(c.to), uint16(srv.LocalAddr().(*net.UDPAddr).Port))
				cl, err := net.DialUDP(c.dial, nil, net.UDPAddrFromAddrPort(to))
				if err != nil {
					t.Skipf("no %s route here: %v", c.to, err)
				}
				defer cl.Close()
				peer := rcv
				if c.elsewhere {
					peer = elsewhere
				}
				e.putRecord(t, connTuple(ProtoUDP, cl), bpfPktmetaRecord{Flags: FlagDelivered | FlagUDP, ConnId: c.connID, ConnGen: uint32(c.connID),
					OriginWorkload: e.origin.ID, PeerWorkload: peer, FirstSeenNs: now})
				sendRecv(t, cl, srv)
				o, err := pktmeta.Origin(srv)
				if !c.podAddress || c.elsewhere {
					if !errors.Is(err, wantErr(pktmeta.ErrUnknown)) {
						t.Fatalf("got %+v, %v; want unknown: not this pod's address, or not this pod's flow", o, err)
					}
					return
				}
				if err != nil || o.ConnID != c.connID || !o.UDP || o.Pod != "client-7d9f" {
					t.Fatalf("got %+v, %v; want connection %d", o, err, c.connID)
				}
				// The next datagram is from a flow pktmeta does not know:
				// the answer follows the last recvfrom.
				other, err := net.DialUDP(c.dial, nil, net.UDPAddrFromAddrPort(to))
				if err != nil {
					t.Fatal(err)
				}
				defer other.Close()
				sendRecv(t, other, srv)
				if o, err := pktmeta.Origin(srv); !errors.Is(err, wantErr(pktmeta.ErrUnknown)) {
					t.Fatalf("after a datagram of an unknown flow: %+v, %v", o, err)
				}
			})
		}
	})

	t.Run("unconnected UDP: a peer with flows to two of the pod's addresses gets no answer", func(t *testing.T) {
		if e.d.Recvmsg4 == nil {
			t.Skip("this kernel cannot run the recvmsg programs (bpf_sk_storage_get for cgroup sock_addr programs)")
		}
		a1, a2 := netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("127.0.0.3")
		rcv := e.podAt(t, "server-two", e.netns, 1<<30+2, a1, a2)
		srv, err := net.ListenUDP("udp4", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		port := uint16(srv.LocalAddr().(*net.UDPAddr).Port)
		// One client socket, one source port, a datagram to each address.
		cl, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		src := addrPort(cl.LocalAddr())
		to1 := Tuple{Proto: ProtoUDP, Src: src, Dst: netip.AddrPortFrom(a1, port)}
		to2 := Tuple{Proto: ProtoUDP, Src: src, Dst: netip.AddrPortFrom(a2, port)}
		for i, tu := range []Tuple{to1, to2} {
			e.putRecord(t, tu, bpfPktmetaRecord{Flags: FlagDelivered | FlagUDP, ConnId: 4301 + uint64(i), ConnGen: 4301 + uint32(i),
				OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
		}
		recvFrom := func(to netip.AddrPort) {
			t.Helper()
			if _, err := cl.WriteToUDPAddrPort([]byte("who"), to); err != nil {
				t.Fatal(err)
			}
			srv.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, _, err := srv.ReadFromUDPAddrPort(make([]byte, 16)); err != nil {
				t.Fatal(err)
			}
		}
		recvFrom(to1.Dst)
		if o, err := pktmeta.Origin(srv); !errors.Is(err, wantErr(pktmeta.ErrUnknown)) {
			t.Fatalf("two flows of one peer port, one to each pod address: %+v, %v; want unknown", o, err)
		}
		// The other flow gone, the one left is the answer.
		dropRecord(t, e.d, to2)
		recvFrom(to1.Dst)
		if o, err := pktmeta.Origin(srv); err != nil || o.ConnID != 4301 {
			t.Fatalf("one flow left: %+v, %v; want connection 4301", o, err)
		}
		// A netns with more addresses than the table holds: no answer
		// (the datagram may have come to one left out).
		var raw bpfPktmetaNetnsAddrs
		if err := e.d.NetnsAddrsMap.Lookup(e.netns, &raw); err != nil {
			t.Fatal(err)
		}
		raw.Flags |= netnsAddrsTruncated
		if err := e.d.NetnsAddrsMap.Update(e.netns, &raw, ebpf.UpdateExist); err != nil {
			t.Fatal(err)
		}
		if o, err := pktmeta.Origin(srv); !errors.Is(err, wantErr(pktmeta.ErrUnknown)) {
			t.Fatalf("netns addresses truncated: %+v, %v; want unknown", o, err)
		}
		e.d.syncNetnsAddrs(e.netns)
	})

	t.Run("the pod addresses of a netns: its workloads' union, in one order, gone with the last, mended by GC", func(t *testing.T) {
		if e.d.NetnsAddrsMap == nil {
			t.Skip("this kernel cannot run the recvmsg programs: no netns addresses are kept")
		}
		cookie := e.netns + 100
		var first []netip.Addr
		for i := range 5 {
			first = append(first, netip.AddrFrom4([4]byte{10, 0, 1, byte(9 - i)}))
		}
		second := []netip.Addr{netip.MustParseAddr("fd00::2"), netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.2.1")}
		w1 := e.podAt(t, "multi-a", cookie, 1<<30+3, first...)
		want := slices.Concat(first, second)
		slices.SortFunc(want, netip.Addr.Compare)
		if want[len(want)-1] != netip.MustParseAddr("fd00::2") {
			t.Fatalf("IPv6 sorts after IPv4: %v", want)
		}
		w2 := e.podAt(t, "multi-b", cookie, 1<<30+4, second...)
		// 8 addresses, all kept: IPv4 first, by address, every time.
		if got, truncated := netnsAddrsFlagged(t, e.d, cookie); !slices.Equal(got, want) || truncated {
			t.Fatalf("two workloads: %v (truncated %v), want %v", got, truncated, want)
		}
		// One more address than fit: flagged, so that the program answers
		// no wildcard socket there (it cannot know the datagram did not
		// come to the address left out).
		w3 := e.podAt(t, "multi-c", cookie, 1<<30+6, netip.MustParseAddr("10.0.4.1"))
		if got, truncated := netnsAddrsFlagged(t, e.d, cookie); len(got) != 8 || !truncated {
			t.Fatalf("9 addresses: %v (truncated %v), want 8 kept and the flag", got, truncated)
		}
		e.d.DeleteEndpoint(1<<30+6, w3)
		e.d.deleteWorkload(w3)
		e.d.DeleteEndpoint(1<<30+3, w1)
		e.d.deleteWorkload(w1)
		want = slices.Clone(second)
		slices.SortFunc(want, netip.Addr.Compare)
		if got, truncated := netnsAddrsFlagged(t, e.d, cookie); !slices.Equal(got, want) || truncated {
			t.Fatalf("after two workloads' removal: %v (truncated %v), want %v", got, truncated, want)
		}
		e.d.DeleteEndpoint(1<<30+4, w2)
		e.d.deleteWorkload(w2)
		if got := netnsAddrs(t, e.d, cookie); got != nil {
			t.Fatalf("after the last workload's removal: %v, want no entry", got)
		}
		// What a crash between a workload's removal and the sync leaves (an
		// orphan), and what a sync losing a race may (a wrong entry):
		// garbage collection mends both.
		e.podAt(t, "multi-d", cookie+1, 1<<30+5, netip.MustParseAddr("10.0.3.1"))
		wrong := bpfPktmetaNetnsAddrs{N_addrs: 1}
		wrong.Addrs[0] = netip.MustParseAddr("10.9.9.9").As16()
		for _, c := range []uint64{cookie, cookie + 1} {
			if err := e.d.NetnsAddrsMap.Update(c, &wrong, ebpf.UpdateAny); err != nil {
				t.Fatal(err)
			}
		}
		if n := e.d.reconcileNetnsAddrs(); n != 2 {
			t.Fatalf("reconciled %d netns entries, want 2", n)
		}
		if got := netnsAddrs(t, e.d, cookie); got != nil {
			t.Fatalf("orphaned entry left: %v", got)
		}
		if got := netnsAddrs(t, e.d, cookie+1); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("10.0.3.1")}) {
			t.Fatalf("a live netns's entry: %v", got)
		}
		if n := e.d.reconcileNetnsAddrs(); n != 0 {
			t.Fatalf("reconciled %d netns entries a second time, want 0", n)
		}
	})

	t.Run("applicationUDP false: the recvmsg hooks off, the rest on, and nothing remembered from before answers", func(t *testing.T) {
		if e.d.Recvmsg4 == nil {
			t.Skip("this kernel cannot run the recvmsg programs (bpf_sk_storage_get for cgroup sock_addr programs)")
		}
		root, _ := CgroupRoot()
		rcv := e.receiver(t, "server-udp-off", e.netns)
		srv, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		cl, err := net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		e.putRecord(t, connTuple(ProtoUDP, cl), bpfPktmetaRecord{Flags: FlagDelivered | FlagUDP, ConnId: 4401, ConnGen: 4401, OriginWorkload: e.origin.ID, PeerWorkload: rcv, FirstSeenNs: now})
		// With the hooks on, the socket remembers the datagram and answers.
		sendRecv(t, cl, srv)
		if o, err := pktmeta.Origin(srv); err != nil || o.ConnID != 4401 {
			t.Fatalf("hooks on: %+v, %v", o, err)
		}
		fd := uint32(sysFD(t, srv))

		if err := e.d.AttachApps(root, false); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := e.d.AttachApps(root, true); err != nil {
				t.Errorf("attach the recvmsg hooks again: %v", err)
			}
		})
		if st := e.d.Apps(); !st.Attached || !st.Current || st.UDP {
			t.Fatalf("with udp false: %+v", st)
		}
		for _, p := range []string{ProgRecvmsg4, ProgRecvmsg6} {
			if _, err := os.Stat(e.d.appLinkPath(p)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("%s link still pinned: %v", p, err)
			}
		}
		// What pktmeta's program answers is ENOTCONN. Other pktmeta
		// datapaths on the cgroup root (test packages running beside this
		// one attach theirs) answer after it, and theirs may say ENOENT;
		// none may answer with the connection.
		notAnswered := func(when string) {
			t.Helper()
			o, err := pktmeta.Origin(srv)
			if !errors.Is(err, wantErr(pktmeta.ErrNotConnected)) && !errors.Is(err, wantErr(pktmeta.ErrUnknown)) {
				t.Fatalf("%s: %+v, %v; want not connected (or unknown, from another datapath)", when, o, err)
			}
		}
		// The peer the socket remembered from before is from an earlier
		// generation: not answered about, though the storage still holds it.
		notAnswered("hooks off, the datagram from before")
		var peer bpfPktmetaUdpPeer
		if err := e.d.UDPPeersMap.Lookup(fd, &peer); err != nil {
			t.Fatalf("the socket's storage: %v", err)
		}
		var gen uint32
		if err := e.d.UDPPeerGenMap.Lookup(uint32(0), &gen); err != nil || peer.Gen == gen {
			t.Fatalf("storage generation %d, current %d (%v): want them apart", peer.Gen, gen, err)
		}
		// A datagram now goes unseen by this datapath.
		sendRecv(t, cl, srv)
		var again bpfPktmetaUdpPeer
		if err := e.d.UDPPeersMap.Lookup(fd, &again); err != nil || again != peer {
			t.Fatalf("the socket's storage changed with the hooks off: %+v -> %+v (%v)", peer, again, err)
		}
		notAnswered("hooks off, a datagram since")

		// On again: still nothing from before, until the next datagram.
		if err := e.d.AttachApps(root, true); err != nil {
			t.Fatal(err)
		}
		if st := e.d.Apps(); !st.UDP || !st.Current {
			t.Fatalf("back on: %+v", st)
		}
		notAnswered("hooks on again, before a datagram")
		sendRecv(t, cl, srv)
		if o, err := pktmeta.Origin(srv); err != nil || o.ConnID != 4401 {
			t.Fatalf("hooks on again, after a datagram: %+v, %v", o, err)
		}
	})

	t.Run("errors", func(t *testing.T) {
		ln, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fd := sysFD(t, ln.(*net.TCPListener))
		if !HaveSockoptErrno() {
			t.Log("this kernel's getsockopt programs cannot choose the errno: the kernel's own answer stands")
		}
		for _, c := range []struct {
			name    string
			optname int
			size    int
			want    syscall.Errno
		}{
			{"listener", 1, pktmeta.RawOriginSize, unix.ENOTCONN},
			{"short buffer", 1, 100, unix.EINVAL},
			{"unknown option", 7, pktmeta.RawOriginSize, unix.ENOPROTOOPT},
		} {
			got := rawGetsockopt(fd, 0x706d, c.optname, make([]byte, c.size))
			want := c.want
			if !HaveSockoptErrno() {
				want = unix.EOPNOTSUPP
			}
			if got != want {
				t.Errorf("%s: errno %v, want %v", c.name, got, want)
			}
		}
	})

	t.Run("other options pass untouched", func(t *testing.T) {
		_, s := tcpPair(t, "tcp4", "127.0.0.1:0")
		fd := sysFD(t, s)
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 65536); err != nil {
			t.Fatal(err)
		}
		before := soRcvbuf(t, fd)
		info, err := unix.GetsockoptTCPInfo(fd, unix.IPPROTO_TCP, unix.TCP_INFO)
		if err != nil || info.State != 1 /* TCP_ESTABLISHED */ {
			t.Fatalf("TCP_INFO: %+v %v", info, err)
		}
		// A call the kernel fails: the caller's buffer and length stay as
		// they were (before 5.18 the kernel would copy the program's
		// view over them).
		buf := []byte{0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa}
		l := uint32(len(buf))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.IPPROTO_TCP, 9999,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if errno != unix.ENOPROTOOPT || l != 8 || buf[0] != 0xaa || buf[7] != 0xaa {
			t.Fatalf("failing getsockopt: errno %v, length %d, buffer %x: want ENOPROTOOPT and both untouched", errno, l, buf)
		}
		// A call that succeeds and reports more than the buffer holds.
		nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(nl)
		if err := unix.SetsockoptInt(nl, unix.SOL_NETLINK, unix.NETLINK_ADD_MEMBERSHIP, unix.RTNLGRP_LINK); err != nil {
			t.Fatal(err)
		}
		l = 0
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(nl), unix.SOL_NETLINK, unix.NETLINK_LIST_MEMBERSHIPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if errno != 0 || l < 4 {
			t.Fatalf("NETLINK_LIST_MEMBERSHIPS into 0 bytes: errno %v, length %d; want success and the length it needs", errno, l)
		}
		// Longer than the page the program sees: Linux before 6.5 failed
		// such calls with EFAULT when any getsockopt program was attached.
		big := make([]byte, 3*os.Getpagesize())
		if errno := rawGetsockopt(fd, unix.IPPROTO_TCP, unix.TCP_INFO, big); errno != 0 {
			t.Fatalf("TCP_INFO into %d bytes: %v", len(big), errno)
		}
		if big[0] != 1 {
			t.Fatalf("TCP_INFO into a big buffer: state %d", big[0])
		}
		root, _ := CgroupRoot()
		ours := map[string]ebpf.ProgramID{}
		for _, h := range appHooks {
			if p := e.d.Program(h.prog); p != nil {
				ours[h.prog] = progID(t, p)
			}
		}
		if progs, err := CgroupAppPrograms(root); err != nil {
			t.Fatal(err)
		} else {
			for h, id := range ours {
				if !slices.Contains(progs[h], id) {
					t.Fatalf("attached: %s programs %v, want %d among them", h, progs[h], id)
				}
			}
		}
		if err := e.d.DetachApps(); err != nil {
			t.Fatal(err)
		}
		if after := soRcvbuf(t, fd); after != before {
			t.Fatalf("SO_RCVBUF %d with the program, %d without", before, after)
		}
		// Detached: the program is off the cgroup (other tests' datapaths
		// may have theirs on it, so the level itself may still answer).
		if progs, err := CgroupAppPrograms(root); err != nil {
			t.Fatal(err)
		} else {
			for h, id := range ours {
				if slices.Contains(progs[h], id) {
					t.Fatalf("detached: %s programs %v, want %d gone", h, progs[h], id)
				}
			}
		}
		if st := e.d.Apps(); st.Attached {
			t.Fatalf("still attached: %+v", st)
		}
	})
}

func wantUnknown(tb testing.TB, c net.Conn) {
	tb.Helper()
	o, err := pktmeta.Origin(c)
	want := pktmeta.ErrUnknown
	if !HaveSockoptErrno() {
		want = pktmeta.ErrNotAvailable
	}
	if !errors.Is(err, want) {
		tb.Fatalf("got %+v, %v; want %v", o, err, want)
	}
}

// wantErr is what the client library says for err on this kernel: before
// 5.18 pktmeta cannot choose the errno.
func wantErr(err error) error {
	if !HaveSockoptErrno() {
		return pktmeta.ErrNotAvailable
	}
	return err
}

// sendRecv sends one datagram from cl and reads it at srv with recvfrom.
func sendRecv(tb testing.TB, cl, srv *net.UDPConn) {
	tb.Helper()
	if _, err := cl.Write([]byte("who")); err != nil {
		tb.Fatal(err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	if _, _, err := srv.ReadFromUDPAddrPort(buf); err != nil {
		tb.Fatal(err)
	}
}

func sysFD(tb testing.TB, c syscall.Conn) int {
	tb.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var fd int
	raw.Control(func(f uintptr) { fd = int(f) })
	return fd
}

func rawGetsockopt(fd, level, name int, buf []byte) syscall.Errno {
	l := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(name),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	return errno
}

func soRcvbuf(tb testing.TB, fd int) int {
	tb.Helper()
	v, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF)
	if err != nil {
		tb.Fatal(err)
	}
	return v
}

func connectUDP(tb testing.TB, c *net.UDPConn, to *net.UDPAddr) {
	tb.Helper()
	fd := sysFD(tb, c)
	sa := &unix.SockaddrInet4{Port: to.Port}
	copy(sa.Addr[:], to.IP.To4())
	if err := unix.Connect(fd, sa); err != nil {
		tb.Fatal(err)
	}
}

func monoNow(tb testing.TB) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		tb.Fatal(err)
	}
	return uint64(ts.Nano())
}

// A program the verifier rejects (here: it reads an uninitialised
// register) costs only the application interface, step by step; a
// rejected packet program still fails the load.
func TestVerifierRejectionLeavesOutOnlyTheApplicationInterface(t *testing.T) {
	testutil.RequireRoot(t)
	good := func() *ebpf.ProgramSpec {
		return &ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "GPL",
			Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}}
	}
	bad := func() *ebpf.ProgramSpec {
		return &ebpf.ProgramSpec{Type: ebpf.SocketFilter, License: "GPL",
			Instructions: asm.Instructions{asm.Mov.Reg(asm.R0, asm.R3), asm.Return()}}
	}
	for _, c := range []struct {
		name     string
		rejected []string // programs the verifier rejects
		want     []string // programs loaded; nil: the load fails
	}{
		{"a recvmsg program", []string{bpfProgPktmetaRecvmsg6}, []string{"packet", bpfProgPktmetaGetsockopt}},
		{"the getsockopt program", []string{bpfProgPktmetaGetsockopt}, []string{"packet"}},
		{"a packet program", []string{"packet"}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := &ebpf.CollectionSpec{Programs: map[string]*ebpf.ProgramSpec{}}
			for _, n := range []string{"packet", bpfProgPktmetaGetsockopt, bpfProgPktmetaRecvmsg4, bpfProgPktmetaRecvmsg6} {
				spec.Programs[n] = good()
				if slices.Contains(c.rejected, n) {
					spec.Programs[n] = bad()
				}
			}
			coll, err := loadCollection(spec, t.TempDir(), testLogger())
			if c.want == nil {
				var verr *ebpf.VerifierError
				if !errors.As(err, &verr) {
					t.Fatalf("got %v, want the verifier's error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer coll.Close()
			var got []string
			for n := range coll.Programs {
				got = append(got, n)
			}
			slices.Sort(got)
			slices.Sort(c.want)
			if !slices.Equal(got, c.want) {
				t.Fatalf("loaded %v, want %v", got, c.want)
			}
		})
	}
}

// netnsAddrs reads the addresses the application interface keeps for a
// netns cookie; nil without an entry.
func netnsAddrs(tb testing.TB, d *Datapath, cookie uint64) []netip.Addr {
	tb.Helper()
	addrs, _ := netnsAddrsFlagged(tb, d, cookie)
	return addrs
}

// netnsAddrsFlagged is netnsAddrs and whether the entry says it is
// truncated.
func netnsAddrsFlagged(tb testing.TB, d *Datapath, cookie uint64) ([]netip.Addr, bool) {
	tb.Helper()
	var raw bpfPktmetaNetnsAddrs
	err := d.NetnsAddrsMap.Lookup(cookie, &raw)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, false
	}
	if err != nil {
		tb.Fatal(err)
	}
	var addrs []netip.Addr
	for i := range min(int(raw.N_addrs), len(raw.Addrs)) {
		addrs = append(addrs, netip.AddrFrom16(raw.Addrs[i]).Unmap())
	}
	return addrs, raw.Flags&netnsAddrsTruncated != 0
}
