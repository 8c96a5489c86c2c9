package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

const (
	appTCPPort = 9090
	appUDPPort = 9091
)

var (
	appVIP4 = netip.MustParseAddr("10.96.0.20")
	appVIP6 = netip.MustParseAddr("fd00:10:96::20")
)

// answer is what the server in the receiving pod learnt from its socket.
type answer struct {
	o   *pktmeta.ConnOrigin
	err error
	// The socket as the server saw it, and unrelated options read on it.
	local, peer netip.AddrPort
	rcvbuf      int
	tcpState    uint8
	// UDP: what the socket said before it was connected, right after
	// recvfrom returned the datagram.
	unconnected *pktmeta.ConnOrigin
}

// appServer is an application in pod b: for every TCP connection it
// accepts, and every UDP datagram it receives (on a socket it then
// connects to the sender), it asks the socket who opened the connection.
type appServer struct {
	answers chan answer
	// udpUnconnected: the datapath answers unconnected UDP sockets
	// (KernelFeatures.AppsUDP).
	udpUnconnected bool
}

func startAppServer(t *testing.T, p *testbed.Pod, d *datapath.Datapath) *appServer {
	t.Helper()
	s := &appServer{answers: make(chan answer, 16), udpUnconnected: d.Recvmsg4 != nil}
	l, err := p.ListenTCP(appTCPPort)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			a := answer{local: addrPortOf(c.LocalAddr()), peer: addrPortOf(c.RemoteAddr())}
			a.o, a.err = pktmeta.Origin(c)
			if raw, err := c.(*net.TCPConn).SyscallConn(); err == nil {
				raw.Control(func(fd uintptr) {
					a.rcvbuf, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
					if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
						a.tcpState = info.State
					}
				})
			}
			s.answers <- a
			c.Write([]byte("ok"))
			c.Close()
		}
	}()
	return s
}

// udpOnce receives one datagram with recvfrom on a fresh socket in p
// (dual-stack, bound to the wildcard), asks it, connects it to the sender,
// asks it again, and answers the sender.
func (s *appServer) udpOnce(t *testing.T, p *testbed.Pod) {
	t.Helper()
	u, err := p.ListenUDP(appUDPPort)
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		defer u.Close()
		buf := make([]byte, 64)
		u.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			s.answers <- answer{err: err}
			return
		}
		a := answer{peer: from}
		if s.udpUnconnected {
			if a.unconnected, err = pktmeta.Origin(u); err != nil {
				a.err = fmt.Errorf("unconnected socket after recvfrom: %w", err)
				s.answers <- a
				return
			}
		} else {
			want := pktmeta.ErrNotConnected
			if !datapath.HaveSockoptErrno() {
				want = pktmeta.ErrNotAvailable
			}
			if _, err := pktmeta.Origin(u); !errors.Is(err, want) {
				a.err = fmt.Errorf("unconnected socket on a kernel without the recvmsg programs: %v, want not connected", err)
				s.answers <- a
				return
			}
		}
		raw, _ := u.SyscallConn()
		var cerr error
		raw.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sockaddr(from)) })
		if cerr != nil {
			a.err = cerr
			s.answers <- a
			return
		}
		a.local = addrPortOf(u.LocalAddr())
		a.o, a.err = pktmeta.Origin(u)
		s.answers <- a
		u.Write([]byte("ok"))
	}()
}

func (s *appServer) next(t *testing.T) answer {
	t.Helper()
	select {
	case a := <-s.answers:
		return a
	case <-time.After(15 * time.Second):
		t.Fatal("the server in the pod answered nothing")
	}
	return answer{}
}

// isUnknown: ENOENT, or where the kernel does not let pktmeta choose the
// errno (before 5.18), the kernel's own answer.
func isUnknown(err error) bool {
	if datapath.HaveSockoptErrno() {
		return errors.Is(err, pktmeta.ErrUnknown)
	}
	return errors.Is(err, pktmeta.ErrNotAvailable)
}

func addrPortOf(a net.Addr) netip.AddrPort {
	ap := netip.MustParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func sockaddr(ap netip.AddrPort) unix.Sockaddr {
	if ap.Addr().Unmap().Is4() {
		return &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	}
	return &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
}

// TestApplicationsAskWhoOpened: an ordinary server in the receiving pod,
// with one getsockopt on its own socket, learns who opened the connection:
// TCP and UDP, IPv4 and IPv6, directly and through a Service. Nobody else
// learns it: a host connection, and a pod holding a socket with another
// connection's addresses, get ENOENT. Other options are untouched, and
// the interface goes with the datapath.
func TestApplicationsAskWhoOpened(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	srv := startAppServer(t, tp.b, d)
	for _, svc := range []testbed.Service{
		{Proto: "tcp", VIP: netip.AddrPortFrom(appVIP4, 90), Backend: netip.AddrPortFrom(tp.b.IPv4, appTCPPort)},
		{Proto: "udp", VIP: netip.AddrPortFrom(appVIP4, 91), Backend: netip.AddrPortFrom(tp.b.IPv4, appUDPPort)},
		{Proto: "tcp", VIP: netip.AddrPortFrom(appVIP6, 90), Backend: netip.AddrPortFrom(tp.b.IPv6, appTCPPort)},
		{Proto: "udp", VIP: netip.AddrPortFrom(appVIP6, 91), Backend: netip.AddrPortFrom(tp.b.IPv6, appUDPPort)},
	} {
		if err := tp.node.AddService(svc); err != nil {
			t.Fatal(err)
		}
	}
	if st := d.Apps(); !st.Attached || !st.Current {
		t.Fatalf("application interface after ADD: %+v", st)
	}

	for _, c := range trafficCases {
		t.Run(c.name, func(t *testing.T) {
			if c.vip {
				requireConntrackKfuncs(t)
			}
			ip, vip := tp.b.IPv4, appVIP4
			if c.v6 {
				ip, vip = tp.b.IPv6, appVIP6
			}
			port, vport := uint16(appTCPPort), uint16(90)
			if c.proto == datapath.ProtoUDP {
				port, vport = appUDPPort, 91
			}
			dial := netip.AddrPortFrom(ip, port)
			if c.vip {
				dial = netip.AddrPortFrom(vip, vport)
			}
			var conn net.Conn
			var err error
			if c.proto == datapath.ProtoTCP {
				conn, err = tp.a.DialTCP(tp.ctx, dial)
			} else {
				srv.udpOnce(t, tp.b)
				conn, err = tp.a.DialUDP(dial)
				if err == nil {
					_, err = conn.Write([]byte("who am i"))
				}
			}
			if err != nil {
				t.Fatalf("dial %s: %v", dial, err)
			}
			defer conn.Close()
			a := srv.next(t)
			if a.err != nil {
				t.Fatalf("server in pod b asked its socket: %v", a.err)
			}
			rec, err := d.Lookup(localTuple(conn, c.proto, dial))
			if err != nil {
				t.Fatal(err)
			}
			o := a.o
			if o.Namespace != "shop" || o.Pod != "frontend" || o.UID != tp.a.Spec.UID || o.ConnID != rec.ConnID || o.Self || o.Remote {
				t.Fatalf("origin %+v, want shop/frontend uid %s conn %d", o, tp.a.Spec.UID, rec.ConnID)
			}
			if o.Tags["cluster"] != "e2e" || len(o.Tags) != 1 || o.PodTags["app"] != "web" || len(o.PodTags) != 1 {
				t.Fatalf("tags %v, pod tags %v: want cluster=e2e (config) and, claimed by the pod, app=web", o.Tags, o.PodTags)
			}
			if o.NAT != c.vip || o.UDP != (c.proto == datapath.ProtoUDP) {
				t.Fatalf("origin %+v: NAT %v UDP %v", o, c.vip, c.proto == datapath.ProtoUDP)
			}
			if since := time.Since(o.FirstSeen); since < 0 || since > time.Minute {
				t.Fatalf("first seen %v (%v ago)", o.FirstSeen, since)
			}
			if u := a.unconnected; u != nil && (u.ConnID != o.ConnID || u.Pod != o.Pod || u.NAT != o.NAT || !u.UDP) {
				t.Fatalf("unconnected socket after recvfrom said %+v, connected %+v", u, o)
			}
			if c.proto == datapath.ProtoUDP && a.unconnected == nil {
				t.Log("this kernel cannot run the recvmsg programs: the unconnected socket was not answered")
			}
			if c.proto == datapath.ProtoTCP && (a.rcvbuf <= 0 || a.tcpState != 1) {
				t.Fatalf("unrelated options on the same socket: SO_RCVBUF %d, TCP_INFO state %d", a.rcvbuf, a.tcpState)
			}
		})
	}

	t.Run("a connection from the node is nobody's", func(t *testing.T) {
		err := tp.node.Do(func() error {
			c, err := net.DialTimeout("tcp", netip.AddrPortFrom(tp.b.IPv4, appTCPPort).String(), 5*time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if a := srv.next(t); !isUnknown(a.err) {
			t.Fatalf("host connection: %+v, %v; want ENOENT", a.o, a.err)
		}
	})

	t.Run("a pod holding another connection's addresses learns nothing", func(t *testing.T) {
		// Pod c binds b's address and connects to a's end of a live UDP
		// flow: its socket has exactly the tuple b's does. IP_TRANSPARENT
		// (so that a connect from an address not its own is routed) needs
		// only CAP_NET_RAW, which pods have by default.
		mallory := tp.addPod("shop", "mallory", nil)
		srv.udpOnce(t, tp.b)
		dial := netip.AddrPortFrom(tp.b.IPv4, appUDPPort)
		conn, err := tp.a.DialUDP(dial)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.Write([]byte("hello"))
		if a := srv.next(t); a.err != nil || a.o.Pod != "frontend" {
			t.Fatalf("b's own answer: %+v %v", a.o, a.err)
		}
		var got error
		err = mallory.Do(func() error {
			lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				rc.Control(func(fd uintptr) {
					serr = errors.Join(unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1),
						unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TRANSPARENT, 1))
				})
				return serr
			}}
			pc, err := lc.ListenPacket(context.Background(), "udp4", dial.String())
			if err != nil {
				return err
			}
			u := pc.(*net.UDPConn)
			defer u.Close()
			raw, _ := u.SyscallConn()
			var cerr error
			raw.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sockaddr(addrPortOf(conn.LocalAddr()))) })
			if cerr != nil {
				return cerr
			}
			if got := addrPortOf(u.LocalAddr()); got != dial {
				return fmt.Errorf("mallory's socket is %s, not %s", got, dial)
			}
			_, got = pktmeta.Origin(u)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !isUnknown(got) {
			t.Fatalf("mallory asked a socket with b's tuple: %v, want ENOENT", got)
		}
	})

	t.Run("uninstalled, the programs are off the cgroup", func(t *testing.T) {
		root, err := datapath.CgroupRoot()
		if err != nil {
			t.Fatal(err)
		}
		w, err := datapath.OpenReader(tp.pin)
		if err != nil {
			t.Fatal(err)
		}
		ours := map[string]ebpf.ProgramID{}
		for name, p := range map[string]*ebpf.Program{datapath.ProgGetsockopt: w.Getsockopt, datapath.ProgRecvmsg4: w.Recvmsg4, datapath.ProgRecvmsg6: w.Recvmsg6} {
			if p == nil {
				continue // a kernel that cannot run it
			}
			info, err := p.Info()
			if err != nil {
				t.Fatal(err)
			}
			ours[name], _ = info.ID()
		}
		w.Close()
		attached := func() map[string][]ebpf.ProgramID {
			progs, err := datapath.CgroupAppPrograms(root)
			if err != nil {
				t.Fatal(err)
			}
			return progs
		}
		before := attached()
		for h, id := range ours {
			if !slices.Contains(before[h], id) {
				t.Fatalf("before uninstall: %s programs %v, want %d among them", h, before[h], id)
			}
		}
		if err := datapath.Destroy(tp.pin, nil); err != nil {
			t.Fatal(err)
		}
		after := attached()
		for h, id := range ours {
			if slices.Contains(after[h], id) {
				t.Fatalf("after uninstall: %s programs %v, want %d gone", h, after[h], id)
			}
		}
	})
}
