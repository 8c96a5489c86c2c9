package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"golang.org/x/sys/unix"
)

// These tests attack pktmeta the way a tenant can from inside an ordinary
// pod: pods have CAP_NET_RAW by default, so a pod can put any frame, with
// any source address, on its own interface.

// forger writes raw frames from a pod to its host veth, which routes them.
type forger struct {
	t        *testing.T
	pod      *testbed.Pod
	src, dst net.HardwareAddr
}

func newForger(t *testing.T, p *testbed.Pod) *forger {
	t.Helper()
	src, err := p.MAC()
	if err != nil {
		t.Fatal(err)
	}
	dst, err := p.HostVethMAC()
	if err != nil {
		t.Fatal(err)
	}
	return &forger{t: t, pod: p, src: src, dst: dst}
}

func (f *forger) send(pkts ...testutil.Packet) {
	f.t.Helper()
	var frames [][]byte
	for _, p := range pkts {
		p.SrcMAC, p.DstMAC = f.src, f.dst
		frames = append(frames, p.Bytes())
	}
	if err := f.pod.SendFrames(frames...); err != nil {
		f.t.Fatal(err)
	}
}

func tcpPkt(src, dst netip.AddrPort, flags uint8, seq, ack uint32) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: flags, Seq: seq, Ack: ack}
}

func udpPkt(src, dst netip.AddrPort) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 17, Payload: []byte("forged")}
}

// attachmentOf returns the status line of one pod.
type podStatus struct {
	Workload      uint32            `json:"workload"`
	Pod           string            `json:"pod"`
	Ingress       string            `json:"ingress"`
	Egress        string            `json:"egress"`
	Live          int64             `json:"live"`
	Spoofed       uint64            `json:"spoofed"`
	OverBudget    uint64            `json:"overBudget"`
	EventsLimited uint64            `json:"eventsLimited"`
	PodTags       map[string]string `json:"podTags"`
}

type statusJSON struct {
	Attachments []podStatus       `json:"attachments"`
	Counters    map[string]uint64 `json:"counters"`
	Problems    []string          `json:"problems"`
}

// status runs pktmetactl status -o json; problems make it exit 1, which is
// fine here: the tests look at them.
func (e *env) status() statusJSON {
	e.t.Helper()
	out, code := e.ctl("status", "-o", "json")
	if code > 1 {
		e.t.Fatalf("pktmetactl status: exit %d: %s", code, out)
	}
	var st statusJSON
	if i := strings.LastIndex(out, "}"); i >= 0 {
		out = out[:i+1]
	}
	if err := jsonUnmarshal(out, &st); err != nil {
		e.t.Fatalf("status: %v\n%s", err, out)
	}
	return st
}

func (st statusJSON) pod(name string) podStatus {
	for _, a := range st.Attachments {
		if a.Pod == name {
			return a
		}
	}
	return podStatus{}
}

// TestForgeriesFromAPod: pod C forges every packet that could re-attribute,
// close or pre-claim the connections of pods A and B. In default and strict
// mode the victims' records stay exactly what they were, their connections
// keep working, and the forger is counted.
func TestForgeriesFromAPod(t *testing.T) {
	for _, strict := range []bool{false, true} {
		name := "default"
		if strict {
			name = "strict"
		}
		t.Run(name, func(t *testing.T) {
			tp := newTwoPods(t, envOptions{conf: map[string]any{"strictSource": strict}})
			evil := tp.addPod("evil", "attacker", nil)
			d := tp.open()

			direct := netip.AddrPortFrom(tp.b.IPv4, tcpPort)
			viaVIP := netip.AddrPortFrom(vip4, 80)
			c1 := tp.dialTCP(tp.a, direct)
			defer c1.Close()
			c2 := tp.dialTCP(tp.a, viaVIP)
			defer c2.Close()
			t1, t2 := localTuple(c1, datapath.ProtoTCP, direct), localTuple(c2, datapath.ProtoTCP, viaVIP)
			before := map[datapath.Tuple]datapath.Record{}
			for _, tu := range []datapath.Tuple{t1, t2} {
				r, err := d.Lookup(tu)
				if err != nil {
					t.Fatalf("%s: %v", tu, err)
				}
				before[tu] = r
			}

			// Tuples the victim will use later.
			futureTCP := netip.AddrPortFrom(tp.a.IPv4, 45001)
			futureUDP := netip.AddrPortFrom(tp.a.IPv4, 45002)
			futureReply := netip.AddrPortFrom(tp.a.IPv4, 45003)
			udpDst := netip.AddrPortFrom(tp.b.IPv4, udpPort)

			f := newForger(t, evil)
			const (
				syn = testutil.SYN
				ack = testutil.ACK
				rst = testutil.RST
				fin = testutil.FIN
			)
			backend2 := netip.AddrPortFrom(tp.b.IPv4, tcpPort)
			forgeries := []struct {
				what string
				pkts []testutil.Packet
			}{
				{"SYN with a new ISN on live tuples", []testutil.Packet{
					tcpPkt(t1.Src, t1.Dst, syn, 123456, 0), tcpPkt(t2.Src, t2.Dst, syn, 123456, 0)}},
				{"RST as the origin and as the peer", []testutil.Packet{
					tcpPkt(t1.Src, t1.Dst, rst, 0, 0), tcpPkt(t1.Dst, t1.Src, rst|ack, 0, 0),
					tcpPkt(t2.Src, t2.Dst, rst, 0, 0), tcpPkt(t2.Dst, t2.Src, rst|ack, 0, 0),
					tcpPkt(backend2, t2.Src, rst|ack, 0, 0)}},
				{"FIN pairs", []testutil.Packet{
					tcpPkt(t1.Src, t1.Dst, fin|ack, 1, 1), tcpPkt(t1.Dst, t1.Src, fin|ack, 1, 1),
					tcpPkt(t2.Src, t2.Dst, fin|ack, 1, 1), tcpPkt(t2.Dst, t2.Src, fin|ack, 1, 1)}},
				{"pre-planted SYN and datagrams for the victim's future tuples", []testutil.Packet{
					tcpPkt(futureTCP, direct, syn, 77, 0), udpPkt(futureUDP, udpDst),
					// Posing as B opening a flow to A: A's later datagram must
					// not pass for a reply.
					udpPkt(udpDst, futureReply)}},
				{"link-local and IPv4-mapped sources", []testutil.Packet{
					udpPkt(netip.MustParseAddrPort("[fe80::bad]:5353"), netip.AddrPortFrom(tp.b.IPv6, udpPort)),
					tcpPkt(netip.MustParseAddrPort("[fe80::bad]:1"), netip.AddrPortFrom(tp.b.IPv6, tcpPort), syn, 1, 0),
					tcpPkt(netip.AddrPortFrom(netip.AddrFrom16(tp.a.IPv4.As16()), t1.Src.Port()), netip.AddrPortFrom(netip.AddrFrom16(tp.b.IPv4.As16()), tcpPort), rst, 0, 0)}},
			}
			for _, fg := range forgeries {
				f.send(fg.pkts...)
			}
			// Let everything the forgeries set off arrive.
			time.Sleep(200 * time.Millisecond)

			for tu, want := range before {
				got, err := d.Lookup(tu)
				if err != nil {
					t.Fatalf("%s: the forgeries removed the victim's record: %v", tu, err)
				}
				if got.ConnID != want.ConnID || got.OriginWorkload != want.OriginWorkload || got.PeerWorkload != want.PeerWorkload || got.Flags != want.Flags || got.SynSeq != want.SynSeq {
					t.Fatalf("%s: the forgeries changed the victim's record:\n before %+v\n after  %+v", tu, want, got)
				}
			}
			for _, c := range []net.Conn{c1, c2} {
				if err := testbed.EchoRoundTrip(c, []byte("still here"), 5*time.Second); err != nil {
					t.Fatalf("the victim's connection broke: %v", err)
				}
			}

			// The victim now uses the tuples the forger tried to claim.
			wa := tp.workloadOf(d, tp.a)
			tc, err := tp.a.DialTCPFrom(tp.ctx, futureTCP, direct)
			if err != nil {
				t.Fatal(err)
			}
			defer tc.Close()
			uc, err := tp.a.DialUDPFrom(futureUDP, udpDst)
			if err != nil {
				t.Fatal(err)
			}
			defer uc.Close()
			rc, err := tp.a.DialUDPFrom(futureReply, udpDst)
			if err != nil {
				t.Fatal(err)
			}
			defer rc.Close()
			for _, c := range []net.Conn{tc, uc, rc} {
				if err := testbed.EchoRoundTrip(c, []byte("mine"), 5*time.Second); err != nil {
					t.Fatal(err)
				}
			}
			tu := datapath.Tuple{Proto: datapath.ProtoTCP, Src: futureTCP, Dst: direct}
			r, err := d.Lookup(tu)
			if err != nil {
				t.Fatalf("%s: the victim's own connection is not tagged: %v", tu, err)
			}
			if r.OriginWorkload != wa.ID {
				t.Fatalf("%s: origin %d, want the victim %d", tu, r.OriginWorkload, wa.ID)
			}
			// A forged datagram leaves a conntrack entry behind, and the
			// flow it posed as then began before pktmeta could see who
			// opened it. Without strictSource such a flow goes untagged
			// (docs/SECURITY.md), whichever end sends next; it is never
			// attributed to anyone else. Strict mode dropped the
			// forgeries, so the flows are the victim's.
			for _, tu := range []datapath.Tuple{
				{Proto: datapath.ProtoUDP, Src: futureUDP, Dst: udpDst},
				{Proto: datapath.ProtoUDP, Src: futureReply, Dst: udpDst},
			} {
				r, err := d.Lookup(tu)
				switch {
				case strict && err != nil:
					t.Fatalf("%s: strict mode, the victim's flow is not tagged: %v", tu, err)
				case err == nil && r.OriginWorkload != wa.ID:
					t.Fatalf("%s: attributed to workload %d, not the victim %d", tu, r.OriginWorkload, wa.ID)
				case err != nil && !errors.Is(err, datapath.ErrNoRecord):
					t.Fatal(err)
				}
			}
			// Nothing records the forger as the origin of anything.
			we := tp.workloadOf(d, evil)
			recs, err := d.Records()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range recs {
				if r.OriginWorkload == we.ID {
					t.Fatalf("a forged packet created a record: %+v", r)
				}
			}

			st := tp.status()
			if ps := st.pod("attacker"); ps.Spoofed == 0 {
				t.Fatalf("the forger is not counted: %+v", ps)
			}
			if strict && st.Counters["strictDrops"] == 0 {
				t.Fatal("strict mode dropped nothing")
			}
			found := false
			for _, p := range st.Problems {
				if strings.Contains(p, "evil/attacker") && strings.Contains(p, "not its own") {
					found = true
				}
			}
			if !found {
				t.Fatalf("status does not name the forger: %v", st.Problems)
			}
		})
	}
}

// TestFloodStaysInItsBudget: one pod opens far more flows than its budget;
// another pod's live connection keeps its record, a third pod can still
// open connections, and the counters say what happened.
func TestFloodStaysInItsBudget(t *testing.T) {
	tp := newTwoPods(t, envOptions{conf: map[string]any{
		"maxConnections": 1024, "maxConnectionsPerPod": 64, "eventsPerSecondPerPod": 20,
	}})
	flood := tp.addPod("evil", "flood", nil)
	d := tp.open()
	victim := tp.dialTCP(tp.a, netip.AddrPortFrom(tp.b.IPv4, tcpPort))
	defer victim.Close()
	vt := localTuple(victim, datapath.ProtoTCP, netip.AddrPortFrom(tp.b.IPv4, tcpPort))

	const flows = 2000
	err := flood.Do(func() error {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: flood.IPv4.AsSlice()})
		if err != nil {
			return err
		}
		defer c.Close()
		for i := range flows {
			dst := &net.UDPAddr{IP: tp.b.IPv4.AsSlice(), Port: 20000 + i}
			if _, err := c.WriteToUDP([]byte("x"), dst); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Lookup(vt); err != nil {
		t.Fatalf("the flood pushed out another pod's record: %v", err)
	}
	later := tp.addPod("shop", "later", nil)
	lc := tp.dialTCP(later, netip.AddrPortFrom(tp.b.IPv4, tcpPort))
	defer lc.Close()
	if _, err := d.Lookup(localTuple(lc, datapath.ProtoTCP, netip.AddrPortFrom(tp.b.IPv4, tcpPort))); err != nil {
		t.Fatalf("after the flood another pod's new connection is not tagged: %v", err)
	}

	st := tp.status()
	ps := st.pod("flood")
	if ps.Live != 64 || ps.OverBudget < flows-64 {
		t.Fatalf("flooding pod: live %d, over budget %d; want 64 and at least %d", ps.Live, ps.OverBudget, flows-64)
	}
	if ps.EventsLimited == 0 {
		t.Fatal("the flood's events were not limited")
	}
	if st.Counters["tableFull"] != 0 {
		t.Fatalf("the table filled up (%d refusals): the budget did not hold", st.Counters["tableFull"])
	}
	found := false
	for _, p := range st.Problems {
		if strings.Contains(p, "evil/flood") && strings.Contains(p, "budget") {
			found = true
		}
	}
	if !found {
		t.Fatalf("status does not name the pod over budget: %v", st.Problems)
	}
}

// hostListener listens on the node namespace's side of the pods' gateway:
// the host stands in for a peer off the node, whose packets reach a pod
// through its delivery hook only.
func (e *env) hostListener(p *testbed.Pod) (net.Listener, netip.AddrPort) {
	e.t.Helper()
	gw := p.Result.IPs[0].Gateway
	addr, _ := netip.AddrFromSlice(gw)
	addr = addr.Unmap()
	var l net.Listener
	err := e.node.Do(func() error {
		var err error
		l, err = net.Listen("tcp4", netip.AddrPortFrom(addr, 0).String())
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { l.Close() })
	return l, netip.MustParseAddrPort(l.Addr().String())
}

// withConntrack makes the node's conntrack track its traffic, as
// kube-proxy's rules do on a real node: a Service (nftables DNAT) is enough.
func (e *env) withConntrack() {
	e.t.Helper()
	err := e.node.AddService(testbed.Service{Proto: "tcp", VIP: netip.MustParseAddrPort("10.96.255.1:9"), Backend: netip.MustParseAddrPort("10.244.1.254:9")})
	if err != nil {
		e.t.Fatal(err)
	}
}

// TestDeliverySideClosesNeedConntrack: a FIN or RST that reaches a pod from
// outside the node counts only once conntrack accepted it. A forged RST
// with a wrong sequence number leaves the record; the peer's real RST
// removes it.
func TestDeliverySideClosesNeedConntrack(t *testing.T) {
	requireConntrackKfuncs(t)
	e := newEnv(t, envOptions{})
	e.withConntrack()
	a := e.addPod("shop", "client", nil)
	d := e.open()
	l, addr := e.hostListener(a)
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := a.DialTCP(e.ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv := <-accepted
	defer srv.Close()
	tu := localTuple(c, datapath.ProtoTCP, addr)
	if _, err := d.Lookup(tu); err != nil {
		t.Fatal(err)
	}

	// An off-node forger: a raw RST from the node with a sequence number
	// far outside the window.
	rst := tcpPkt(addr, tu.Src, testutil.RST|testutil.ACK, 12345, 0)
	raw := rst.Bytes()[14:] // the IPv4 packet
	err = e.node.Do(func() error {
		fd, err := rawIPv4Socket()
		if err != nil {
			return err
		}
		defer closeFD(fd)
		return sendRawIPv4(fd, raw, tu.Src.Addr())
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	if _, err := d.Lookup(tu); err != nil {
		t.Fatalf("a forged RST removed the record: %v", err)
	}
	// The host does not answer: a read times out, unless the connection
	// was reset.
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatalf("write after the forged RST: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); err == nil || !isTimeout(err) {
		t.Fatalf("read after the forged RST: %v, want a timeout", err)
	}
	st := e.status()
	if st.Counters["unverifiedCloses"] == 0 {
		t.Fatal("the unverified RST was not counted")
	}

	// The peer's real RST: conntrack accepts it, the record goes.
	srv.(*net.TCPConn).SetLinger(0)
	srv.Close()
	eventually(t, "record removed after the peer's RST", func() error {
		if _, err := d.Lookup(tu); err == nil {
			return fmt.Errorf("record of %s still there", tu)
		}
		return nil
	})
}

// TestSweepAsksConntrack: a TCP connection that ended without a FIN or RST
// pktmeta could see (here: conntrack forgot it) is removed by the sweep
// once conntrack no longer has it; a live one is kept.
func TestSweepAsksConntrack(t *testing.T) {
	requireConntrackKfuncs(t)
	e := newEnv(t, envOptions{})
	e.withConntrack()
	a := e.addPod("shop", "client", nil)
	l, addr := e.hostListener(a)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	live, err := a.DialTCP(e.ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	gone, err := a.DialTCP(e.ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer gone.Close()
	tLive, tGone := localTuple(live, datapath.ProtoTCP, addr), localTuple(gone, datapath.ProtoTCP, addr)

	sweep := func() datapath.SweepResult {
		var res datapath.SweepResult
		err := e.node.Do(func() error {
			d, err := datapath.OpenExisting(e.pin, nil)
			if err != nil {
				return err
			}
			defer d.Close()
			res, err = d.Sweep(datapath.SweepOptions{Hygiene: true, ConntrackMinAge: time.Nanosecond})
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	res := sweep()
	if res.CTUnavailable || res.CTChecked < 2 || res.Removed() != 0 {
		t.Fatalf("first sweep %+v: want both connections checked in conntrack and kept", res)
	}
	// Conntrack forgets one (as after a silent death and its timeout).
	out, err := e.node.Run(context.Background(), "conntrack", "-D", "-p", "tcp", "-s", tGone.Src.Addr().String(), "--sport", fmt.Sprint(tGone.Src.Port()))
	if err != nil {
		t.Fatalf("conntrack -D: %v %s", err, out)
	}
	res = sweep()
	if res.TCPOver != 1 {
		t.Fatalf("second sweep %+v: want the forgotten connection removed", res)
	}
	d := e.open()
	if _, err := d.Lookup(tGone); err == nil {
		t.Fatal("the record of a connection conntrack forgot is still there")
	}
	if _, err := d.Lookup(tLive); err != nil {
		t.Fatalf("the live connection's record was swept: %v", err)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// rawIPv4Socket is a raw socket that sends whole IPv4 packets as given
// (IPPROTO_RAW implies IP_HDRINCL), any source address included.
func rawIPv4Socket() (int, error) {
	return unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_RAW)
}

func closeFD(fd int) { unix.Close(fd) }

func sendRawIPv4(fd int, pkt []byte, dst netip.Addr) error {
	return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet4{Addr: dst.As4()})
}
