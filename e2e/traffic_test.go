package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/view"
)

// trafficCase is one connection to make and what the destination must see.
type trafficCase struct {
	name  string
	proto uint8
	v6    bool
	vip   bool
}

var trafficCases = []trafficCase{
	{"tcp4", datapath.ProtoTCP, false, false},
	{"udp4", datapath.ProtoUDP, false, false},
	{"tcp6", datapath.ProtoTCP, true, false},
	{"udp6", datapath.ProtoUDP, true, false},
	{"tcp4-service", datapath.ProtoTCP, false, true},
	{"udp4-service", datapath.ProtoUDP, false, true},
	{"tcp6-service", datapath.ProtoTCP, true, true},
	{"udp6-service", datapath.ProtoUDP, true, true},
}

const (
	tcpPort = 8080
	udpPort = 8081
)

var (
	vip4 = netip.MustParseAddr("10.96.0.10")
	vip6 = netip.MustParseAddr("fd00:10:96::10")
)

// twoPods is the common topology: client pod a (with an annotation tag),
// server pod b behind Services on both families and protocols.
type twoPods struct {
	*env
	a, b *testbed.Pod
}

func newTwoPods(t *testing.T, o envOptions) *twoPods {
	e := newEnv(t, o)
	tp := &twoPods{env: e}
	tp.a = e.addPod("shop", "frontend", map[string]string{"pktmeta.dev/app": "web", "unrelated": "x"})
	tp.b = e.addPod("shop", "db", nil)
	e.server(tp.b, tcpPort, udpPort)
	for _, svc := range []testbed.Service{
		{Proto: "tcp", VIP: netip.AddrPortFrom(vip4, 80), Backend: netip.AddrPortFrom(tp.b.IPv4, tcpPort)},
		{Proto: "udp", VIP: netip.AddrPortFrom(vip4, 53), Backend: netip.AddrPortFrom(tp.b.IPv4, udpPort)},
		{Proto: "tcp", VIP: netip.AddrPortFrom(vip6, 80), Backend: netip.AddrPortFrom(tp.b.IPv6, tcpPort)},
		{Proto: "udp", VIP: netip.AddrPortFrom(vip6, 53), Backend: netip.AddrPortFrom(tp.b.IPv6, udpPort)},
	} {
		if err := e.node.AddService(svc); err != nil {
			t.Fatal(err)
		}
	}
	return tp
}

// targets returns where a case dials and where the server really is.
func (tp *twoPods) targets(c trafficCase) (dial, backend netip.AddrPort) {
	ip := tp.b.IPv4
	vip := vip4
	if c.v6 {
		ip, vip = tp.b.IPv6, vip6
	}
	port, vport := uint16(tcpPort), uint16(80)
	if c.proto == datapath.ProtoUDP {
		port, vport = udpPort, 53
	}
	backend = netip.AddrPortFrom(ip, port)
	if c.vip {
		return netip.AddrPortFrom(vip, vport), backend
	}
	return backend, backend
}

// connect opens connection c from pod a and completes one echo round trip.
// It returns the tuple a sent and the tuple b saw; the caller closes conn.
func (tp *twoPods) connect(c trafficCase) (origin, seen datapath.Tuple, conn net.Conn) {
	tp.t.Helper()
	dial, backend := tp.targets(c)
	if c.proto == datapath.ProtoTCP {
		conn = tp.dialTCP(tp.a, dial)
	} else {
		conn = tp.dialUDP(tp.a, dial)
	}
	origin = localTuple(conn, c.proto, dial)
	return origin, datapath.Tuple{Proto: c.proto, Src: origin.Src, Dst: backend}, conn
}

// TestConnectionsCarryOriginToDestination is the core promise: for every
// connection a pod opens — TCP and UDP, IPv4 and IPv6, directly and through
// a DNATed Service — the destination side finds who opened it.
func TestConnectionsCarryOriginToDestination(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	wa, wb := tp.workloadOf(d, tp.a), tp.workloadOf(d, tp.b)

	for _, c := range trafficCases {
		t.Run(c.name, func(t *testing.T) {
			if c.vip {
				requireConntrackKfuncs(t)
			}
			dial, backend := tp.targets(c)
			origin, seen, conn := tp.connect(c)
			defer conn.Close()

			// By the tuple the origin sent, and by the one the receiver saw.
			for _, q := range []datapath.Tuple{origin, seen, seen.Reverse()} {
				rec, err := d.Lookup(q)
				if err != nil {
					t.Fatalf("lookup %s: %v", q, err)
				}
				if rec.Tuple != origin {
					t.Fatalf("lookup %s: record keyed %s, want %s", q, rec.Tuple, origin)
				}
				if rec.OriginWorkload != wa.ID || rec.OriginIfindex != uint32(tp.a.HostIfindex) {
					t.Fatalf("origin workload %d ifindex %d, want %d %d", rec.OriginWorkload, rec.OriginIfindex, wa.ID, tp.a.HostIfindex)
				}
				if !rec.IsDelivered() || rec.PeerWorkload != wb.ID || rec.PeerTuple != seen {
					t.Fatalf("delivery: delivered=%v peer=%d (want %d) saw %s (want %s)", rec.IsDelivered(), rec.PeerWorkload, wb.ID, rec.PeerTuple, seen)
				}
				if nat := rec.Flags&datapath.FlagNAT != 0; nat != c.vip {
					t.Fatalf("NAT flag %v, want %v", nat, c.vip)
				}
			}

			// What a user reads: identity and tags through pktmetactl.
			var got view.Conn
			tp.ctlJSON(&got, "lookup", "--proto", datapath.ProtoName(c.proto), "--src", seen.Src.String(), "--dst", seen.Dst.String())
			want := view.Workload{ID: wa.ID, Namespace: "shop", Pod: "frontend", UID: tp.a.Spec.UID, ContainerID: tp.a.ContainerID}
			if *got.Origin != want {
				t.Fatalf("origin %+v, want %+v", *got.Origin, want)
			}
			// The operator's tags and the ones the pod claimed are kept apart.
			if got.Tags["cluster"] != "e2e" || len(got.Tags) != 1 || got.PodTags["app"] != "web" || len(got.PodTags) != 1 {
				t.Fatalf("tags %v, pod tags %v: want cluster=e2e (config) and, claimed by the pod, app=web (annotation)", got.Tags, got.PodTags)
			}
			if got.Peer == nil || got.Peer.Pod != "db" || got.Seen == nil || got.Seen.Dst != backend.String() {
				t.Fatalf("peer %+v seen %+v", got.Peer, got.Seen)
			}
			if got.Src != origin.Src.String() || got.Dst != dial.String() || got.FirstSeen == "" || got.ConnID == 0 {
				t.Fatalf("conn %+v", got)
			}
		})
	}

	stats, err := d.ReadStats()
	if err != nil {
		t.Fatal(err)
	}
	// Four direct cases, and four through a Service where the kernel has
	// the conntrack kfuncs to resolve them.
	conns, nat := uint64(8), uint64(4)
	if !haveConntrackKfuncs(t) {
		conns, nat = 4, 0
	}
	if stats.NATResolved < nat || stats.Deliveries < conns || stats.Tagged < conns {
		t.Fatalf("counters %+v: want >= %d tagged and delivered, >= %d NAT resolutions", stats, conns, nat)
	}
}

// TestTCPCloseRemovesRecordAndAlias: records live as long as connections.
func TestTCPCloseRemovesRecordAndAlias(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	for _, c := range []trafficCase{{"direct", datapath.ProtoTCP, false, false}, {"service", datapath.ProtoTCP, true, true}} {
		t.Run(c.name, func(t *testing.T) {
			if c.vip {
				requireConntrackKfuncs(t)
			}
			dial, backend := tp.targets(c)
			nc := tp.dialTCP(tp.a, dial)
			origin := localTuple(nc, datapath.ProtoTCP, dial)
			seen := datapath.Tuple{Proto: datapath.ProtoTCP, Src: origin.Src, Dst: backend}
			if _, err := d.Lookup(seen); err != nil {
				t.Fatal(err)
			}
			nc.Close()
			eventually(t, "record removed after close", func() error {
				for _, q := range []datapath.Tuple{origin, seen} {
					if _, err := d.Lookup(q); !errors.Is(err, datapath.ErrNoRecord) {
						return fmt.Errorf("%s still resolves (err %v)", q, err)
					}
				}
				aliases, err := d.Aliases()
				if err != nil {
					return err
				}
				for _, a := range aliases {
					if a.Seen == seen {
						return fmt.Errorf("alias %s left", seen)
					}
				}
				return nil
			})
		})
	}
}

// TestDistinctConnectionIDs: two connections from the same pod to the same
// server are two records with two ids.
func TestDistinctConnectionIDs(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	d := tp.open()
	dst := netip.AddrPortFrom(tp.b.IPv4, tcpPort)
	c1 := tp.dialTCP(tp.a, dst)
	defer c1.Close()
	c2 := tp.dialTCP(tp.a, dst)
	defer c2.Close()
	r1, err := d.Lookup(localTuple(c1, datapath.ProtoTCP, dst))
	if err != nil {
		t.Fatal(err)
	}
	r2, err := d.Lookup(localTuple(c2, datapath.ProtoTCP, dst))
	if err != nil {
		t.Fatal(err)
	}
	if r1.ConnID == r2.ConnID || r1.ConnID == 0 {
		t.Fatalf("connection ids %d and %d", r1.ConnID, r2.ConnID)
	}
}
