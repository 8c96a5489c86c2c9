package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// These tests run the programs on crafted packets with BPF_PROG_TEST_RUN,
// inside a private netns and against a private bpffs. Each "pod" is a dummy
// interface there: a test run on its ifindex is a packet on that pod's
// host veth.

const (
	retNext = 0xffffffff // TCX_NEXT / TC_ACT_UNSPEC (-1)
	retDrop = 2
)

type progEnv struct {
	t *testing.T
	d *Datapath
	n int
}

// testPod is one registered endpoint.
type testPod struct {
	ifindex uint32
	id      uint32
	strict  bool
}

func newProgEnv(t *testing.T) *progEnv {
	return newProgEnvSized(t, 4096)
}

// newProgEnvSized hands out the package's shared datapath of that table
// size, emptied: loading one costs the verifier about a second, so the
// tests share a few instead of loading one each.
func newProgEnvSized(t *testing.T, maxConns uint32) *progEnv {
	t.Helper()
	d := sharedDatapath(t, maxConns)
	resetDatapath(t, d)
	return &progEnv{t: t, d: d}
}

// podOpts change how addPod registers a pod.
type podOpts struct {
	strict    bool
	maxConns  uint32 // 0: no practical limit
	eventRate uint32
}

// addPod makes a dummy interface and registers it as workload id with the
// given own addresses.
func (e *progEnv) addPod(id uint32, o podOpts, addrs ...netip.AddrPort) *testPod {
	e.t.Helper()
	e.n++
	// A veth pair stands for a pod's: the test runs on one end.
	l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("pod%d", e.n)}, PeerName: fmt.Sprintf("peer%d", e.n)}
	if err := netlink.LinkAdd(l); err != nil {
		e.t.Fatal(err)
	}
	got, err := netlink.LinkByName(l.Name)
	if err != nil {
		e.t.Fatal(err)
	}
	p := &testPod{ifindex: uint32(got.Attrs().Index), id: id, strict: o.strict}
	var own []netip.Addr
	for _, a := range addrs {
		own = append(own, a.Addr())
	}
	if o.maxConns == 0 {
		o.maxConns = 1 << 30
	}
	if err := e.d.PutEndpoint(p.ifindex, Endpoint{Workload: id, Strict: o.strict, Addrs: own, MaxConnections: o.maxConns, EventsPerSecond: o.eventRate}); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// skbCtx is the start of struct __sk_buff with ifindex set; test runs
// accept only a few fields and require the rest to be zero.
func skbCtx(ifindex uint32) []byte {
	ctx := make([]byte, 48)
	binary.NativeEndian.PutUint32(ctx[40:], ifindex)
	return ctx
}

func (e *progEnv) runOn(prog *ebpf.Program, ifindex uint32, pkt []byte) uint32 {
	e.t.Helper()
	ret, err := prog.Run(&ebpf.RunOptions{Data: pkt, Context: skbCtx(ifindex)})
	if err != nil {
		e.t.Fatalf("test run (%d bytes): %v", len(pkt), err)
	}
	return ret
}

// from runs a packet through the pod's origin hook (what it sends).
func (e *progEnv) from(p *testPod, pkt testutil.Packet) uint32 {
	e.t.Helper()
	prog := e.d.Origin
	if p.strict {
		prog = e.d.Strict
	}
	return e.runOn(prog, p.ifindex, pkt.Bytes())
}

// to runs a packet through the pod's delivery hook (what it receives).
func (e *progEnv) to(p *testPod, pkt testutil.Packet) uint32 {
	e.t.Helper()
	return e.runOn(e.d.Deliver, p.ifindex, pkt.Bytes())
}

func (e *progEnv) stats() Stats {
	e.t.Helper()
	s, err := e.d.ReadStats()
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

func (e *progEnv) endpoint(p *testPod) Endpoint {
	e.t.Helper()
	ep, ok, err := e.d.Endpoint(p.ifindex)
	if err != nil || !ok {
		e.t.Fatalf("endpoint %d: %v %v", p.ifindex, ok, err)
	}
	return ep
}

func (e *progEnv) records() []Record {
	e.t.Helper()
	r, err := e.d.Records()
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func (e *progEnv) lookup(t Tuple) (Record, bool) {
	e.t.Helper()
	r, err := e.d.Lookup(t)
	if errors.Is(err, ErrNoRecord) {
		return Record{}, false
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return r, true
}

// mustRecord returns the record of t, which must exist.
func (e *progEnv) mustRecord(t Tuple) Record {
	e.t.Helper()
	r, ok := e.lookup(t)
	if !ok {
		e.t.Fatalf("no record for %s", t)
	}
	return r
}

var (
	podA  = netip.MustParseAddrPort("10.244.1.2:40000")
	podB  = netip.MustParseAddrPort("10.244.1.3:8080")
	podC  = netip.MustParseAddrPort("10.244.1.4:6666")
	podA6 = netip.MustParseAddrPort("[fd00:10:244:1::2]:40000")
	podB6 = netip.MustParseAddrPort("[fd00:10:244:1::3]:8080")
	podC6 = netip.MustParseAddrPort("[fd00:10:244:1::4]:6666")
)

func syn(src, dst netip.AddrPort, seq uint32) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: seq}
}

func tcpFlags(src, dst netip.AddrPort, flags uint8, seq uint32) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: flags, Seq: seq}
}

func udp(src, dst netip.AddrPort) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 17, Payload: []byte("hello")}
}

func tcpTuple(src, dst netip.AddrPort) Tuple { return Tuple{Proto: ProtoTCP, Src: src, Dst: dst} }
func udpTuple(src, dst netip.AddrPort) Tuple { return Tuple{Proto: ProtoUDP, Src: src, Dst: dst} }

func TestOriginTagsTCPSynOnce(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(42, podOpts{}, podA)
		start := time.Now()

		if ret := e.from(a, syn(podA, podB, 1000)); ret != retNext {
			t.Fatalf("SYN returned %#x, want TCX_NEXT", ret)
		}
		r := e.mustRecord(tcpTuple(podA, podB))
		if r.OriginWorkload != 42 || r.OriginIfindex != a.ifindex || r.ConnID == 0 || r.SynSeq != 1000 || r.Version != RecordVersion {
			t.Fatalf("record %+v", r)
		}
		if r.FirstSeen.Before(start.Add(-time.Second)) || r.FirstSeen.After(time.Now().Add(time.Second)) {
			t.Fatalf("first seen %v not around now %v", r.FirstSeen, start)
		}

		// A retransmitted SYN keeps the record and its connection id.
		e.from(a, syn(podA, podB, 1000))
		if r2 := e.mustRecord(tcpTuple(podA, podB)); r2.ConnID != r.ConnID {
			t.Fatalf("retransmit changed conn id %d -> %d", r.ConnID, r2.ConnID)
		}
		// Every other packet of the connection leaves the table alone.
		for _, flags := range []uint8{testutil.ACK, testutil.ACK | testutil.PSH, testutil.SYN | testutil.ACK} {
			e.from(a, tcpFlags(podA, podB, flags, 1001))
		}
		// Plain segments (ACK, PSH|ACK) are not even counted: only the two
		// SYNs and the SYN-ACK are examined.
		s := e.stats()
		if s.Tagged != 1 || s.SynRetransmits != 1 || s.OriginPackets != 3 {
			t.Fatalf("stats %+v, want 1 tagged, 1 retransmit, 3 packets examined", s)
		}
		if n := len(e.records()); n != 1 {
			t.Fatalf("%d records, want 1", n)
		}
		if ep := e.endpoint(a); ep.Live != 1 {
			t.Fatalf("live records %d, want 1", ep.Live)
		}

		// A new SYN on the same tuple (new ISN) is a new connection.
		e.from(a, syn(podA, podB, 9000))
		r3 := e.mustRecord(tcpTuple(podA, podB))
		if r3.ConnID == r.ConnID || r3.SynSeq != 9000 {
			t.Fatalf("reused tuple: record %+v, old conn id %d", r3, r.ConnID)
		}
		if ep := e.endpoint(a); ep.Live != 1 {
			t.Fatalf("live records %d after reuse, want 1", ep.Live)
		}
	})
}

func TestOriginDistinctConnIDs(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(7, podOpts{}, podA)
		seen := map[uint64]bool{}
		for i := range 200 {
			src := netip.AddrPortFrom(podA.Addr(), uint16(20000+i))
			e.from(a, syn(src, podB, uint32(i)))
			r := e.mustRecord(tcpTuple(src, podB))
			if seen[r.ConnID] {
				t.Fatalf("conn id %d reused", r.ConnID)
			}
			seen[r.ConnID] = true
		}
	})
}

func TestOriginUDPFirstPacketOnly(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(9, podOpts{}, podA)
		e.from(a, udp(podA, podB))
		r := e.mustRecord(udpTuple(podA, podB))
		if r.Flags&FlagUDP == 0 {
			t.Fatalf("UDP first packet: record %+v", r)
		}
		for range 10 {
			e.from(a, udp(podA, podB))
		}
		if r2 := e.mustRecord(udpTuple(podA, podB)); r2.ConnID != r.ConnID {
			t.Fatal("later UDP packets re-tagged the flow")
		}
		if s := e.stats(); s.Tagged != 1 {
			t.Fatalf("tagged %d, want 1", s.Tagged)
		}
	})
}

func TestParseIPv4OptionsAndIPv6ExtensionHeaders(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(5, podOpts{}, podA, podA6)

		// IPv4 with 12 bytes of options (router alert + NOPs + timestamp-ish).
		p := syn(podA, podB, 1)
		p.IPv4Options = []byte{0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x01, 0x44, 0x04, 0x05, 0x00}
		e.from(a, p)
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Error("IPv4 SYN with options not tagged")
		}

		// IPv6 through hop-by-hop, routing, destination options, and a first fragment.
		p6 := syn(podA6, podB6, 2)
		p6.IPv6Ext = []uint8{0, 43, 60}
		p6.MoreFragments = true
		e.from(a, p6)
		if _, ok := e.lookup(tcpTuple(podA6, podB6)); !ok {
			t.Error("IPv6 SYN behind extension headers not tagged")
		}

		// UDP over IPv6 with a destination options header.
		u6 := testutil.Packet{Src: podA6, Dst: podB6, Proto: 17, IPv6Ext: []uint8{60}}
		e.from(a, u6)
		if _, ok := e.lookup(udpTuple(podA6, podB6)); !ok {
			t.Error("IPv6 UDP behind a destination options header not tagged")
		}

		before := e.stats().Tagged
		// Non-first fragments carry no L4 header: never tagged.
		f4 := syn(netip.AddrPortFrom(podA.Addr(), 1), podB, 3)
		f4.FragOffset = 100
		f6 := syn(netip.AddrPortFrom(podA6.Addr(), 1), podB6, 3)
		f6.FragOffset = 100
		// Longer extension chains than the datapath walks: left alone.
		long6 := syn(netip.AddrPortFrom(podA6.Addr(), 2), podB6, 3)
		long6.IPv6Ext = []uint8{0, 60, 60, 60, 60, 60, 60, 60, 60, 60}
		for _, pkt := range []testutil.Packet{f4, f6, long6} {
			if ret := e.from(a, pkt); ret != retNext {
				t.Errorf("returned %#x, want TCX_NEXT", ret)
			}
		}
		if s := e.stats(); s.Tagged != before {
			t.Errorf("fragments or over-long chains tagged: %d -> %d", before, s.Tagged)
		}
	})
}

// TestTruncatedAndGarbagePacketsPassUntouched is a differential fuzz: the
// datapath must tag exactly what an independent Go reading of the packet
// says it should, for truncated, malformed and mutated packets.
func TestTruncatedAndGarbagePacketsPassUntouched(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(5, podOpts{}, podA, podA6)
		own := map[netip.Addr]bool{podA.Addr(): true, podA6.Addr(): true}
		full := syn(podA, podB, 1).Bytes()
		full6 := syn(podA6, podB6, 1).Bytes()
		fullUDP := udp(podA, podB).Bytes()
		// Every truncation of a valid SYN passes and is not tagged. The
		// kernel refuses test runs whose IP header is cut short, so that
		// case is covered by header lengths that overrun the packet.
		for _, pkt := range [][]byte{full, full6} {
			l3 := 34
			if len(pkt) == len(full6) {
				l3 = 54
			}
			for n := l3; n < len(pkt); n++ {
				if ret := e.runOn(e.d.Origin, a.ifindex, pkt[:n]); ret != retNext {
					t.Fatalf("truncated to %d: returned %#x", n, ret)
				}
				if ret := e.runOn(e.d.Deliver, a.ifindex, pkt[:n]); ret != retNext {
					t.Fatalf("deliver, truncated to %d: returned %#x", n, ret)
				}
			}
		}
		// IHL claiming 60 bytes of options in a 40-byte IPv4 packet.
		overrun := append([]byte(nil), full[:54]...)
		overrun[14] = 0x4f
		// An IPv6 hop-by-hop header claiming 2 KiB.
		hbh := syn(podA6, podB6, 1)
		hbh.IPv6Ext = []uint8{0}
		overrun6 := hbh.Bytes()
		overrun6[55] = 0xff
		// IP lengths shorter than the headers that follow: what is beyond
		// them is padding, not a TCP/UDP header.
		short4 := append([]byte(nil), full...)
		binary.BigEndian.PutUint16(short4[16:], 20+19)
		short6 := append([]byte(nil), full6...)
		binary.BigEndian.PutUint16(short6[18:], 19)
		shortUDP := append([]byte(nil), fullUDP...)
		binary.BigEndian.PutUint16(shortUDP[16:], 20+7)
		// IPv6 carrying IPv4-mapped addresses would pose as IPv4 tuples.
		mapped := syn(netip.MustParseAddrPort("[::ffff:10.244.1.2]:40000"), netip.MustParseAddrPort("[::ffff:10.244.1.3]:8080"), 1).Bytes()
		mappedDst := syn(podA6, netip.MustParseAddrPort("[::ffff:10.244.1.3]:8080"), 1).Bytes()
		// SYN|FIN and SYN|RST are not openings.
		synfin := tcpFlags(podA, podB, testutil.SYN|testutil.FIN, 1).Bytes()
		synrst := tcpFlags(podA, podB, testutil.SYN|testutil.RST, 1).Bytes()
		for _, pkt := range [][]byte{overrun, overrun6, short4, short6, shortUDP, mapped, mappedDst, synfin, synrst} {
			if ret := e.runOn(e.d.Origin, a.ifindex, pkt); ret != retNext {
				t.Fatalf("malformed packet: returned %#x", ret)
			}
			if _, first := referenceParse(pkt, own); first {
				t.Fatalf("the reference parser tags a malformed packet: % x", pkt)
			}
		}
		if recs := e.records(); len(recs) != 0 {
			t.Fatalf("%d records from truncated or malformed packets: %+v", len(recs), recs)
		}
		// The bases themselves are first packets for both.
		for _, pkt := range [][]byte{full, full6, fullUDP} {
			if _, first := referenceParse(pkt, own); !first {
				t.Fatalf("reference parser misses a first packet: % x", pkt)
			}
		}

		// Random bytes, and valid headers with random mutations: whatever the
		// datapath tags must be exactly what a reference parser reads there.
		rng := newRand(1, 2)
		bases := [][]byte{full, full6, fullUDP, short4, mapped, synfin}
		for i := range 4000 {
			var pkt []byte
			if i%2 == 0 {
				pkt = make([]byte, 60+rng.IntN(80))
				for j := range pkt {
					pkt[j] = byte(rng.Uint32())
				}
				// Make some of them look like IP.
				if i%4 == 0 {
					pkt[12], pkt[13] = 0x08, 0x00
				} else if i%8 == 2 {
					pkt[12], pkt[13] = 0x86, 0xdd
				}
			} else {
				pkt = append([]byte(nil), bases[rng.IntN(len(bases))]...)
				for range 1 + rng.IntN(3) {
					// Mostly the fields that matter: lengths, flags, ports.
					pos := 14 + rng.IntN(len(pkt)-14)
					if rng.IntN(2) == 0 {
						pos = []int{16, 17, 18, 19, 20, 47, 14, 34, 35, 36, 37, 67}[rng.IntN(12)] % len(pkt)
					}
					pkt[pos] = byte(rng.Uint32())
				}
			}
			if ret := e.runOn(e.d.Origin, a.ifindex, pkt); ret != retNext {
				t.Fatalf("packet %d returned %#x: % x", i, ret, pkt)
			}
			recs := e.records()
			want, first := referenceParse(pkt, own)
			switch {
			case first && len(recs) != 1:
				t.Fatalf("packet %d: reference parser sees a first packet %s, datapath made %d records: % x", i, want, len(recs), pkt)
			case !first && len(recs) != 0:
				t.Fatalf("packet %d: datapath tagged %s, reference parser sees no first packet: % x", i, recs[0].Tuple, pkt)
			case first && recs[0].Tuple != want:
				t.Fatalf("packet %d: datapath tagged %s, reference parser reads %s", i, recs[0].Tuple, want)
			}
			if len(recs) > 0 {
				if _, err := e.d.Sweep(SweepOptions{Workload: a.id}); err != nil {
					t.Fatal(err)
				}
			}
		}
		if ep := e.endpoint(a); ep.Live != 0 {
			t.Fatalf("live count %d after every record was swept, want 0", ep.Live)
		}
	})
}

// referenceParse is an independent reading of a packet: the tuple, and
// whether the origin program should tag it: a TCP SYN without ACK, FIN or
// RST, or UDP, from one of the pod's own addresses (not link-local), with
// IP lengths that cover the headers, and no IPv4-mapped IPv6 address.
func referenceParse(pkt []byte, own map[netip.Addr]bool) (Tuple, bool) {
	if len(pkt) < 14 {
		return Tuple{}, false
	}
	et := binary.BigEndian.Uint16(pkt[12:])
	b := pkt[14:]
	var (
		src, dst netip.Addr
		proto    uint8
		l4       []byte
		l4Len    = -1 // what the IP header says follows; -1 unknown
	)
	switch et {
	case 0x0800:
		if len(b) < 20 || b[0]>>4 != 4 || b[0]&0xf < 5 {
			return Tuple{}, false
		}
		ihl := int(b[0]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(b[2:]))
		if tot != 0 && tot < ihl || binary.BigEndian.Uint16(b[6:])&0x1fff != 0 || len(b) < ihl {
			return Tuple{}, false
		}
		if tot != 0 {
			l4Len = tot - ihl
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		proto, l4 = b[9], b[ihl:]
	case 0x86dd:
		if len(b) < 40 || b[0]>>4 != 6 {
			return Tuple{}, false
		}
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		if src.Is4In6() || dst.Is4In6() {
			return Tuple{}, false
		}
		payload := int(binary.BigEndian.Uint16(b[4:]))
		proto, l4 = b[6], b[40:]
		ext := 0
		for i := 0; ; i++ {
			isExt := proto == 0 || proto == 43 || proto == 44 || proto == 60 || proto == 51
			if !isExt {
				break
			}
			if i == 8 || len(l4) < 8 {
				return Tuple{}, false
			}
			next := l4[0]
			var n int
			switch proto {
			case 44:
				if binary.BigEndian.Uint16(l4[2:])&0xfff8 != 0 {
					return Tuple{}, false
				}
				n = 8
			case 51:
				n = (int(l4[1]) + 2) * 4
			default:
				n = (int(l4[1]) + 1) * 8
			}
			if len(l4) < n {
				// The datapath only bounds-checks the next header it reads.
				l4 = nil
			} else {
				l4 = l4[n:]
			}
			ext += n
			proto = next
		}
		if payload != 0 {
			if payload < ext {
				return Tuple{}, false
			}
			l4Len = payload - ext
		}
	default:
		return Tuple{}, false
	}
	var t Tuple
	first := false
	switch proto {
	case 6:
		if len(l4) < 20 || l4[12]>>4 < 5 || l4Len >= 0 && l4Len < int(l4[12]>>4)*4 {
			return Tuple{}, false
		}
		t = Tuple{Proto: 6, Src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4)), Dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))}
		first = l4[13]&(testutil.SYN|testutil.ACK|testutil.FIN|testutil.RST) == testutil.SYN
	case 17:
		if len(l4) < 8 || l4Len >= 0 && l4Len < 8 {
			return Tuple{}, false
		}
		t = Tuple{Proto: 17, Src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4)), Dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))}
		first = true
	default:
		return Tuple{}, false
	}
	if src.Is6() && (src.IsLinkLocalUnicast() || src.IsUnspecified()) || !own[src] {
		return t, false
	}
	return t, first
}

func TestDeliverMarksOnceAndCloseRemoves(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA, podA6)
		b := e.addPod(2, podOpts{}, podB, podB6)
		e.from(a, syn(podA, podB, 77))
		for range 3 {
			e.to(b, syn(podA, podB, 77))
		}
		r := e.mustRecord(tcpTuple(podA, podB))
		if !r.IsDelivered() || r.PeerWorkload != 2 || r.PeerIfindex != b.ifindex || r.PeerTuple != tcpTuple(podA, podB) || r.Flags&FlagNAT != 0 {
			t.Fatalf("after delivery: %+v", r)
		}
		if s := e.stats(); s.Deliveries != 1 {
			t.Fatalf("deliveries %d, want 1 (three SYNs)", s.Deliveries)
		}
		// The reply direction finds the same record.
		if r2, ok := e.lookup(tcpTuple(podB, podA)); !ok || r2.ConnID != r.ConnID {
			t.Fatal("lookup by reply tuple failed")
		}
		// The SYN-ACK reaching the origin completes the handshake.
		e.from(b, tcpFlags(podB, podA, testutil.SYN|testutil.ACK, 5))
		e.to(a, tcpFlags(podB, podA, testutil.SYN|testutil.ACK, 5))
		if r := e.mustRecord(tcpTuple(podA, podB)); r.Flags&FlagEstablished == 0 {
			t.Fatalf("SYN-ACK did not mark the record established: %+v", r)
		}

		// FIN from the origin alone does not close; the peer's FIN does.
		fin := tcpFlags(podA, podB, testutil.FIN|testutil.ACK, 78)
		e.from(a, fin)
		e.to(b, fin) // the same FIN on the receiver's veth
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Fatal("one FIN closed the record")
		}
		e.from(b, tcpFlags(podB, podA, testutil.FIN|testutil.ACK, 6))
		if _, ok := e.lookup(tcpTuple(podA, podB)); ok {
			t.Fatal("record survived both FINs")
		}

		// RST from a party closes at once.
		e.from(a, syn(podA6, podB6, 5))
		e.from(b, tcpFlags(podB6, podA6, testutil.RST|testutil.ACK, 0))
		if _, ok := e.lookup(tcpTuple(podA6, podB6)); ok {
			t.Fatal("record survived the peer's RST")
		}
		if s := e.stats(); s.Closed != 2 {
			t.Fatalf("closed %d, want 2", s.Closed)
		}
		for _, p := range []*testPod{a, b} {
			if ep := e.endpoint(p); ep.Live != 0 {
				t.Fatalf("pod %d: live %d after every connection closed", p.id, ep.Live)
			}
		}
	})
}

// The forgeries a pod can send with raw sockets, each against a live
// connection of two other pods (A -> B), in default and strict mode. The
// victim's record must stay exactly what it was.
func TestForgeriesChangeNoRecord(t *testing.T) {
	type forgery struct {
		name string
		// send sends the forged packets; c is the attacker, a the victim
		// and b its peer.
		send func(e *progEnv, a, b, c *testPod)
		// strictDrops: how many of its packets strict mode drops.
		strictDrops int
	}
	forgeries := []forgery{
		{"SYN with a new ISN on the live tuple", func(e *progEnv, a, b, c *testPod) {
			e.from(c, syn(podA, podB, 999999))
		}, 1},
		{"RST as the origin", func(e *progEnv, a, b, c *testPod) {
			e.from(c, tcpFlags(podA, podB, testutil.RST, 0))
		}, 1},
		{"RST as the peer", func(e *progEnv, a, b, c *testPod) {
			e.from(c, tcpFlags(podB, podA, testutil.RST|testutil.ACK, 0))
		}, 1},
		{"FIN pair", func(e *progEnv, a, b, c *testPod) {
			e.from(c, tcpFlags(podA, podB, testutil.FIN|testutil.ACK, 0))
			e.from(c, tcpFlags(podB, podA, testutil.FIN|testutil.ACK, 0))
		}, 2},
		{"RST and FIN pair at the delivery hooks", func(e *progEnv, a, b, c *testPod) {
			// What passed the attacker's hook untouched (default mode)
			// arrives at the parties' delivery hooks; conntrack knows
			// nothing of it.
			e.to(a, tcpFlags(podB, podA, testutil.RST|testutil.ACK, 12345))
			e.to(b, tcpFlags(podA, podB, testutil.RST, 12345))
			e.to(b, tcpFlags(podA, podB, testutil.FIN|testutil.ACK, 0))
			e.to(a, tcpFlags(podB, podA, testutil.FIN|testutil.ACK, 0))
		}, 0},
		{"the attacker's own SYN on the reverse tuple", func(e *progEnv, a, b, c *testPod) {
			// Not spoofed, not a party: a different tuple, its own record.
			e.from(c, syn(podC, podA, 1))
		}, 0},
		{"IPv4-mapped IPv6 posing as the origin", func(e *progEnv, a, b, c *testPod) {
			e.from(c, tcpFlags(netip.MustParseAddrPort("[::ffff:10.244.1.2]:40000"), netip.MustParseAddrPort("[::ffff:10.244.1.3]:8080"), testutil.RST, 0))
			e.from(c, syn(netip.MustParseAddrPort("[::ffff:10.244.1.2]:40000"), netip.MustParseAddrPort("[::ffff:10.244.1.3]:8080"), 5))
		}, 2},
	}
	for _, strict := range []bool{false, true} {
		for _, f := range forgeries {
			mode := "default"
			if strict {
				mode = "strict"
			}
			t.Run(mode+"/"+f.name, func(t *testing.T) {
				testutil.InNewNetns(t, func() {
					e := newProgEnv(t)
					a := e.addPod(1, podOpts{}, podA, podA6)
					b := e.addPod(2, podOpts{}, podB, podB6)
					c := e.addPod(3, podOpts{strict: strict}, podC, podC6)
					e.from(a, syn(podA, podB, 100))
					e.to(b, syn(podA, podB, 100))
					before := e.mustRecord(tcpTuple(podA, podB))

					f.send(e, a, b, c)

					after, ok := e.lookup(tcpTuple(podA, podB))
					if !ok {
						t.Fatal("the forgery removed the victim's record")
					}
					if after.ConnID != before.ConnID || after.OriginWorkload != 1 || after.PeerWorkload != 2 || after.Flags != before.Flags || after.SynSeq != 100 {
						t.Fatalf("the forgery changed the victim's record:\n before %+v\n after  %+v", before, after)
					}
					s := e.stats()
					if strict && s.StrictDrops != uint64(f.strictDrops) {
						t.Errorf("strict drops %d, want %d", s.StrictDrops, f.strictDrops)
					}
					if !strict && f.strictDrops > 0 && s.Spoofed == 0 {
						t.Error("spoofed packets were not counted")
					}
					if n := len(e.records()); n > 2 {
						t.Errorf("%d records: the forgery created records", n)
					}
				})
			})
		}
	}
}

// A pod cannot plant a record for a tuple another pod will use, nor make
// that pod's flow look like a reply.
func TestPrePlantedFlowsAreNotClaimed(t *testing.T) {
	for _, strict := range []bool{false, true} {
		t.Run(fmt.Sprint("strict=", strict), func(t *testing.T) {
			testutil.InNewNetns(t, func() {
				e := newProgEnv(t)
				a := e.addPod(1, podOpts{}, podA, podA6)
				c := e.addPod(3, podOpts{strict: strict}, podC, podC6)
				future := netip.AddrPortFrom(podA.Addr(), 45000)
				e.from(c, syn(future, podB, 7))
				e.from(c, udp(future, podB))
				e.from(c, udp(podB, future)) // posing as B opening a flow to A
				// Spoofed link-local sources never create records either.
				e.from(c, udp(netip.MustParseAddrPort("[fe80::1]:5353"), netip.MustParseAddrPort("[ff02::fb]:5353")))
				e.from(c, syn(netip.MustParseAddrPort("[fe80::1]:1"), podB6, 1))
				if recs := e.records(); len(recs) != 0 {
					t.Fatalf("the attacker planted records: %+v", recs)
				}
				e.from(a, syn(future, podB, 8))
				e.from(a, udp(future, podB))
				for _, tu := range []Tuple{tcpTuple(future, podB), udpTuple(future, podB)} {
					if r := e.mustRecord(tu); r.OriginWorkload != 1 {
						t.Fatalf("%s: origin %d, want the victim (1)", tu, r.OriginWorkload)
					}
				}
				if s := e.stats(); s.UDPReplies != 0 {
					t.Fatalf("the victim's flow was taken for a reply: %+v", s)
				}
			})
		})
	}
}

// Two pods that share an address (a misconfiguration, or an address
// reused while the old pod still exists): only the record's own origin may
// replace or close it.
func TestOnlyThePartiesChangeARecord(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		twin := e.addPod(4, podOpts{}, podA) // same address, another pod
		e.from(a, syn(podA, podB, 1))
		before := e.mustRecord(tcpTuple(podA, podB))
		e.from(twin, syn(podA, podB, 2))
		e.from(twin, tcpFlags(podA, podB, testutil.RST, 0))
		after := e.mustRecord(tcpTuple(podA, podB))
		if after.ConnID != before.ConnID || after.OriginWorkload != 1 {
			t.Fatalf("another pod changed the record: %+v -> %+v", before, after)
		}
		if s := e.stats(); s.NotParty != 2 {
			t.Fatalf("not-party refusals %d, want 2", s.NotParty)
		}
		if ep := e.endpoint(twin); ep.NotParty != 2 {
			t.Fatalf("per-pod not-party %d, want 2", ep.NotParty)
		}
	})
}

func TestSimultaneousOpenYieldsOneRecord(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		b := e.addPod(2, podOpts{}, podB)
		e.from(a, syn(podA, podB, 1))
		e.to(b, syn(podA, podB, 1))
		e.from(b, syn(podB, podA, 2))
		e.to(a, syn(podB, podA, 2))
		recs := e.records()
		if len(recs) != 1 || recs[0].OriginWorkload != 1 {
			t.Fatalf("records %+v, want one, opened by the first SYN", recs)
		}
		if s := e.stats(); s.SimultaneousOpens != 1 {
			t.Fatalf("simultaneous opens %d, want 1", s.SimultaneousOpens)
		}
		// Both FINs find the one record.
		e.from(a, tcpFlags(podA, podB, testutil.FIN|testutil.ACK, 3))
		e.from(b, tcpFlags(podB, podA, testutil.FIN|testutil.ACK, 4))
		if recs := e.records(); len(recs) != 0 {
			t.Fatalf("records left after both FINs: %+v", recs)
		}

		// SYNs that crossed before either was delivered: two records,
		// which the connection's FINs both end.
		a2 := netip.AddrPortFrom(podA.Addr(), 40001)
		e.from(a, syn(a2, podB, 5))
		e.from(b, syn(podB, a2, 6))
		e.to(b, syn(a2, podB, 5))
		e.to(a, syn(podB, a2, 6))
		if n := len(e.records()); n != 2 {
			t.Fatalf("%d records for SYNs that crossed, want 2", n)
		}
		e.from(a, tcpFlags(a2, podB, testutil.FIN|testutil.ACK, 7))
		e.from(b, tcpFlags(podB, a2, testutil.FIN|testutil.ACK, 8))
		if recs := e.records(); len(recs) != 0 {
			t.Fatalf("records left after both FINs: %+v", recs)
		}
		for _, p := range []*testPod{a, b} {
			if ep := e.endpoint(p); ep.Live != 0 {
				t.Fatalf("pod %d: live %d", p.id, ep.Live)
			}
		}
	})
}

// The receiving side cannot pre-empt a pod's future connection to it with
// a SYN or datagram of its own that never reached that pod (dropped on the
// way): only a reverse record the pod really received makes its packet an
// answer.
func TestReverseSquattingDoesNotPreempt(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		b := e.addPod(2, podOpts{}, podB)
		e.from(b, syn(podB, podA, 9)) // never delivered to a
		e.from(b, udp(podB, podA))    // neither
		e.from(a, syn(podA, podB, 1)) // a's own connection
		e.from(a, udp(podA, podB))    // and flow
		for _, tu := range []Tuple{tcpTuple(podA, podB), udpTuple(podA, podB)} {
			r, err := e.d.Lookup(tu)
			if err != nil || r.OriginWorkload != 1 || r.Tuple != tu {
				t.Fatalf("%s: %+v %v, want a's own record", tu, r, err)
			}
		}
		if s := e.stats(); s.SimultaneousOpens != 0 || s.UDPReplies != 0 {
			t.Fatalf("stats %+v: a's packets taken for answers", s)
		}
	})
}

// The same first UDP datagram on two CPUs at once makes one flow with one
// connection id.
func TestConcurrentFirstUDPPacketsYieldOneID(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		rd, err := e.d.NewEventReader()
		if err != nil {
			t.Fatal(err)
		}
		defer rd.Close()
		const flows = 300
		ns, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				// The test run resolves the context's ifindex in the
				// sender's namespace: it must be the pod's.
				if err := testutil.EnterNetns(ns); err != nil {
					errs <- err
					return
				}
				for i := range flows {
					pkt := udp(podA, netip.AddrPortFrom(podB.Addr(), uint16(1000+i))).Bytes()
					if _, err := e.d.Origin.Run(&ebpf.RunOptions{Data: pkt, Context: skbCtx(a.ifindex)}); err != nil {
						errs <- err
						return
					}
				}
				errs <- nil
			}()
		}
		for range 2 {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
		s := e.stats()
		if s.Tagged != flows || len(e.records()) != flows {
			t.Fatalf("%d tagged, %d records, want %d of each", s.Tagged, len(e.records()), flows)
		}
		opened := 0
		for {
			rd.SetDeadline(time.Now().Add(500 * time.Millisecond))
			if _, err := rd.Read(); err != nil {
				break
			}
			opened++
		}
		if opened != flows {
			t.Fatalf("%d opened events, want %d", opened, flows)
		}
		if ep := e.endpoint(a); ep.Live != flows {
			t.Fatalf("live %d, want %d", ep.Live, flows)
		}
	})
}

// A pod at its budget gets no more records (counted), and cannot push out
// anyone else's: the table is never LRU.
func TestPodBudgetAndFullTable(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnvSized(t, 1024)
		victim := e.addPod(1, podOpts{}, podA)
		flood := e.addPod(2, podOpts{maxConns: 100}, podC)
		e.from(victim, syn(podA, podB, 1))
		for i := range 300 {
			e.from(flood, udp(podC, netip.AddrPortFrom(podB.Addr(), uint16(2000+i))))
		}
		ep := e.endpoint(flood)
		if ep.Live != 100 || ep.OverBudget != 200 {
			t.Fatalf("flooding pod: live %d over budget %d, want 100 and 200", ep.Live, ep.OverBudget)
		}
		if s := e.stats(); s.OverBudget != 200 {
			t.Fatalf("over budget %d, want 200", s.OverBudget)
		}
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Fatal("the victim's record is gone")
		}

		// Without a budget a pod fills the table; new records are refused
		// and counted, and nothing live is evicted for them. The table
		// holds at least the 1024 it was made for (it has more slots:
		// where it starts refusing depends on where tuples land).
		big := e.addPod(3, podOpts{}, podB)
		const flows = 3000
		for i := range flows {
			e.from(big, udp(podB, netip.AddrPortFrom(podC.Addr(), uint16(3000+i))))
		}
		epBig := e.endpoint(big)
		if epBig.TableFull == 0 || epBig.Live+100+1 < 1024 || epBig.Live+int64(epBig.TableFull) != flows {
			t.Fatalf("unbudgeted pod: live %d, table full %d; want at least 1024 records in all, refusals counted, and every flow one or the other", epBig.Live, epBig.TableFull)
		}
		if recs, err := e.d.Records(); err != nil || int64(len(recs)) != epBig.Live+100+1 {
			t.Fatalf("%d records in the table (%v), want %d", len(recs), err, epBig.Live+100+1)
		}
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Fatal("a full table evicted the victim's record")
		}
		if s := e.stats(); s.TableFull != epBig.TableFull {
			t.Fatalf("table full %d, per pod %d", s.TableFull, epBig.TableFull)
		}
	})
}

// Over its event rate a pod's connections are still recorded, without
// events, and the pod is counted.
func TestEventRatePerPod(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{eventRate: 5}, podA)
		b := e.addPod(2, podOpts{}, podB)
		rd, err := e.d.NewEventReader()
		if err != nil {
			t.Fatal(err)
		}
		defer rd.Close()
		for i := range 20 {
			src := netip.AddrPortFrom(podA.Addr(), uint16(100+i))
			e.from(a, syn(src, podB, 1))
			e.to(b, syn(src, podB, 1))
		}
		if n := len(e.records()); n != 20 {
			t.Fatalf("%d records, want 20", n)
		}
		types := map[uint8]int{}
		for {
			rd.SetDeadline(time.Now().Add(500 * time.Millisecond))
			ev, err := rd.Read()
			if err != nil {
				break
			}
			types[ev.Type]++
		}
		if types[EventOpened] != 5 || types[EventDelivered] != 5 {
			t.Fatalf("events %v, want 5 opened and 5 delivered", types)
		}
		if ep := e.endpoint(a); ep.EventsLimited != 15 {
			t.Fatalf("events limited %d, want 15", ep.EventsLimited)
		}
	})
}

func TestStrictSourceDropsSpoofedSources(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(3, podOpts{strict: true}, podA, podA6)
		for _, c := range []struct {
			pkt  testutil.Packet
			want uint32
		}{
			{syn(podA, podB, 1), retNext},
			{syn(podA6, podB6, 1), retNext},
			{syn(netip.MustParseAddrPort("10.244.1.99:1"), podB, 1), retDrop},
			{syn(netip.MustParseAddrPort("[fd00:10:244:1::99]:1"), podB6, 1), retDrop},
			{testutil.Packet{Src: netip.MustParseAddrPort("10.244.1.99:53"), Dst: podB, Proto: 17}, retDrop},
			// Link-local IPv6 (neighbour discovery) stays on the link: allowed.
			{syn(netip.MustParseAddrPort("[fe80::1]:1"), netip.MustParseAddrPort("[fe80::2]:2"), 1), retNext},
		} {
			if got := e.from(a, c.pkt); got != c.want {
				t.Errorf("%s -> %s: returned %#x, want %#x", c.pkt.Src, c.pkt.Dst, got, c.want)
			}
		}
		if s := e.stats(); s.StrictDrops != 3 {
			t.Fatalf("strict drops %d, want 3", s.StrictDrops)
		}
		if ep := e.endpoint(a); ep.Spoofed != 3 {
			t.Fatalf("per-pod spoofed %d, want 3", ep.Spoofed)
		}
		if recs := e.records(); len(recs) != 2 {
			t.Fatalf("records %+v, want only the pod's two own connections", recs)
		}
	})
}

// Without strictSource a spoofed packet passes but creates nothing, and is
// counted for the pod that sent it.
func TestDefaultModeCountsSpoofedSources(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(3, podOpts{}, podA)
		for _, pkt := range []testutil.Packet{
			syn(netip.MustParseAddrPort("10.244.1.99:1"), podB, 1),
			udp(netip.MustParseAddrPort("10.244.1.99:53"), podB),
		} {
			if got := e.from(a, pkt); got != retNext {
				t.Fatalf("returned %#x, want TCX_NEXT", got)
			}
		}
		if len(e.records()) != 0 {
			t.Fatal("a spoofed packet created a record")
		}
		if s, ep := e.stats(), e.endpoint(a); s.Spoofed != 2 || ep.Spoofed != 2 {
			t.Fatalf("spoofed %d (pod %d), want 2", s.Spoofed, ep.Spoofed)
		}
	})
}

func TestUnregisteredVethIsNotTagged(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.runOn(e.d.Origin, 1, syn(podA, podB, 1).Bytes())
		if s := e.stats(); s.Unregistered != 1 || s.Tagged != 0 {
			t.Fatalf("stats %+v", s)
		}
	})
}

func TestEventsForOpenDeliverClose(t *testing.T) {
	// IPv4 events travel in the compact layout (pktmeta_event_v4), IPv6
	// ones in the full one: both must decode to the same fields.
	for _, fam := range []struct {
		name        string
		client, srv netip.AddrPort
		size        int
	}{
		{"ipv4 compact", podA, podB, binary.Size(bpfPktmetaEventV4{})},
		{"ipv6 full", podA6, podB6, binary.Size(bpfPktmetaEvent{})},
	} {
		t.Run(fam.name, func(t *testing.T) {
			testutil.InNewNetns(t, func() {
				e := newProgEnv(t)
				// The raw ring, to see which layout each event took.
				rd, err := ringbuf.NewReader(e.d.EventsMap)
				if err != nil {
					t.Fatal(err)
				}
				defer rd.Close()
				clk := newMonoClock()
				a := e.addPod(11, podOpts{}, fam.client)
				b := e.addPod(12, podOpts{}, fam.srv)
				e.from(a, syn(fam.client, fam.srv, 1))
				e.to(b, syn(fam.client, fam.srv, 1))
				e.to(a, tcpFlags(fam.srv, fam.client, testutil.SYN|testutil.ACK, 1))
				e.from(a, tcpFlags(fam.client, fam.srv, testutil.RST, 0))
				want := []struct {
					typ     uint8
					ifindex uint32
					peer    uint32
					seen    Tuple
					reason  uint8
				}{
					{EventOpened, a.ifindex, 0, Tuple{}, 0},
					{EventDelivered, b.ifindex, 12, tcpTuple(fam.client, fam.srv), 0},
					{EventClosed, a.ifindex, 12, Tuple{}, CloseRST},
				}
				for i, w := range want {
					// The programs wake no reader for three events; the
					// reader looks at the ring when its deadline passes.
					rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
					raw, err := rd.Read()
					if err != nil {
						t.Fatalf("event %d: %v", i, err)
					}
					if len(raw.RawSample) != fam.size {
						t.Fatalf("event %d: %d bytes in the ring, want %d", i, len(raw.RawSample), fam.size)
					}
					ev, err := decodeEvent(raw.RawSample, clk)
					if err != nil {
						t.Fatalf("event %d: %v", i, err)
					}
					if ev.Type != w.typ || ev.Tuple != tcpTuple(fam.client, fam.srv) || ev.OriginWorkload != 11 || ev.ConnID == 0 ||
						ev.Ifindex != w.ifindex || ev.PeerWorkload != w.peer || ev.Seen != w.seen || ev.Reason != w.reason || ev.Time.IsZero() {
						t.Fatalf("event %d: %+v, want type %d on ifindex %d, peer %d, seen %v, reason %d", i, ev, w.typ, w.ifindex, w.peer, w.seen, w.reason)
					}
				}
			})
		})
	}
}

// A UDP flow idle past the timeout is a new flow on its next packet, and
// the sweep removes idle records.
func TestUDPIdleFlowAgesOut(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(9, podOpts{}, podA, podA6)
		cfg, err := e.d.ReadConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.UDPTimeout = 400 * time.Millisecond
		if err := e.d.WriteConfig(cfg); err != nil {
			t.Fatal(err)
		}
		e.from(a, udp(podA, podB))
		r1 := e.mustRecord(udpTuple(podA, podB))
		// A flow that keeps sending keeps its id past the timeout.
		for range 3 {
			time.Sleep(250 * time.Millisecond)
			e.from(a, udp(podA, podB))
			if r := e.mustRecord(udpTuple(podA, podB)); r.ConnID != r1.ConnID {
				t.Fatal("an active flow was re-tagged")
			}
		}
		time.Sleep(600 * time.Millisecond)
		e.from(a, udp(podA, podB))
		if r2 := e.mustRecord(udpTuple(podA, podB)); r2.ConnID == r1.ConnID {
			t.Fatal("an idle flow kept its old connection id")
		}

		other := udpTuple(podA6, podB6)
		e.from(a, udp(podA6, podB6))
		time.Sleep(250 * time.Millisecond)
		e.from(a, udp(podA, podB)) // keeps the first flow fresh
		time.Sleep(250 * time.Millisecond)
		res, err := e.d.Sweep(SweepOptions{Hygiene: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := e.lookup(other); ok || res.UDPIdle != 1 {
			t.Fatalf("sweep %+v, idle flow still there: %v", res, ok)
		}
		if _, ok := e.lookup(udpTuple(podA, podB)); !ok {
			t.Fatal("sweep removed an active flow")
		}
		if ep := e.endpoint(a); ep.Live != 1 {
			t.Fatalf("live %d, want 1", ep.Live)
		}
	})
}

// A TCP connection whose handshake never completed (the SYN went
// unanswered) is swept after the bound; an answered one is not.
func TestSweepRemovesHalfOpenTCP(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		answered := netip.AddrPortFrom(podA.Addr(), 1)
		e.from(a, syn(podA, podB, 1))
		e.from(a, syn(answered, podB, 1))
		e.to(a, tcpFlags(podB, answered, testutil.SYN|testutil.ACK, 9))
		time.Sleep(50 * time.Millisecond)
		res, err := e.d.Sweep(SweepOptions{Hygiene: true, TCPHandshakeTimeout: 20 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		if res.TCPPending != 1 {
			t.Fatalf("sweep %+v, want one half-open record removed", res)
		}
		if _, ok := e.lookup(tcpTuple(podA, podB)); ok {
			t.Fatal("the unanswered SYN's record survived")
		}
		if _, ok := e.lookup(tcpTuple(answered, podB)); !ok {
			t.Fatal("the established connection's record was swept")
		}
		if ep := e.endpoint(a); ep.Live != 1 {
			t.Fatalf("live %d, want 1", ep.Live)
		}
	})
}

// A UDP reply is not a new flow even where the node has no conntrack: the
// record of the flow it answers is enough.
func TestUDPReplyWithoutConntrackIsNotTagged(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		b := e.addPod(2, podOpts{}, podB)
		e.from(a, udp(podA, podB))
		e.to(b, udp(podA, podB))
		e.from(b, udp(podB, podA))
		if recs := e.records(); len(recs) != 1 || recs[0].OriginWorkload != 1 {
			t.Fatalf("records %+v: the reply must not be a flow opened by the server", recs)
		}
		if s := e.stats(); s.Tagged != 1 || s.UDPReplies != 1 {
			t.Fatalf("stats %+v, want 1 tagged and 1 UDP reply", s)
		}
	})
}

// DEL's sweep removes the records a pod opened and received, and gives
// the other party its budget back.
func TestSweepOfAWorkload(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		b := e.addPod(2, podOpts{}, podB)
		e.from(a, syn(podA, podB, 1))
		e.to(b, syn(podA, podB, 1))
		e.from(b, udp(podB, podC))
		res, err := e.d.Sweep(SweepOptions{Workload: b.id})
		if err != nil {
			t.Fatal(err)
		}
		if res.RemovedWorkload != 2 || len(e.records()) != 0 {
			t.Fatalf("sweep %+v, %d records left", res, len(e.records()))
		}
		if ep := e.endpoint(a); ep.Live != 0 {
			t.Fatalf("pod A live %d after its peer's DEL, want 0", ep.Live)
		}
	})
}

func newRand(a, b uint64) *rand.Rand { return rand.New(rand.NewPCG(a, b)) }

// The origin's own RST during the handshake does not end the record: its
// stack sends one when a forged SYN-ACK with a bad ACK reaches it, and
// carries on connecting. Once the handshake completed, it does.
func TestOriginRSTBeforeTheHandshake(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		e.from(a, syn(podA, podB, 1))
		e.from(a, tcpFlags(podA, podB, testutil.RST, 12345))
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Fatal("the origin's RST in SYN_SENT removed the record")
		}
		e.to(a, tcpFlags(podB, podA, testutil.SYN|testutil.ACK, 7))
		e.from(a, tcpFlags(podA, podB, testutil.RST, 2))
		if _, ok := e.lookup(tcpTuple(podA, podB)); ok {
			t.Fatal("the origin's RST after the handshake did not remove the record")
		}
	})
}

// A delivery hook delivers only what is addressed to its own pod: a bridge
// floods unknown unicast to every port.
func TestDeliveryOnlyToTheDestination(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		a := e.addPod(1, podOpts{}, podA)
		b := e.addPod(2, podOpts{}, podB)
		c := e.addPod(3, podOpts{}, podC)
		e.from(a, syn(podA, podB, 1))
		e.to(c, syn(podA, podB, 1)) // flooded to c's port
		if r := e.mustRecord(tcpTuple(podA, podB)); r.IsDelivered() {
			t.Fatalf("delivered to a pod the packet was not for: %+v", r)
		}
		if s := e.stats(); s.NotForPod != 1 {
			t.Fatalf("not-for-pod %d, want 1", s.NotForPod)
		}
		e.to(b, syn(podA, podB, 1))
		if r := e.mustRecord(tcpTuple(podA, podB)); !r.IsDelivered() || r.PeerWorkload != 2 {
			t.Fatalf("not delivered to its destination: %+v", r)
		}
	})
}

// Where conntrack does not tell (this test netns has none), a pod's answer
// to a datagram that reached it from off the node is still an answer.
func TestUDPAnswerToOffNodeWithoutConntrack(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		b := e.addPod(2, podOpts{}, podB)
		client := netip.MustParseAddrPort("192.0.2.7:5353")
		e.to(b, udp(client, podB))
		e.from(b, udp(podB, client))
		if recs := e.records(); len(recs) != 0 {
			t.Fatalf("the answer was recorded as a flow the pod opened: %+v", recs)
		}
		if s := e.stats(); s.UDPReplies != 1 {
			t.Fatalf("udp replies %d, want 1", s.UDPReplies)
		}
	})
}

// A UDP record belongs to its veth: a pod that got an old pod's address
// neither keeps the old record alive nor is counted in it while the old
// pod exists; once it is gone, its datagrams make a record of its own.
func TestUDPRecordOfAnotherVeth(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		old := e.addPod(1, podOpts{}, podA)
		e.from(old, udp(podA, podB))
		before := e.mustRecord(udpTuple(podA, podB))
		heir := e.addPod(4, podOpts{}, podA)
		e.from(heir, udp(podA, podB))
		if r := e.mustRecord(udpTuple(podA, podB)); r.ConnID != before.ConnID || r.OriginWorkload != 1 {
			t.Fatalf("record changed by another pod: %+v", r)
		}
		if s := e.stats(); s.NotParty != 1 {
			t.Fatalf("not-party %d, want 1", s.NotParty)
		}
		if err := e.d.DeleteEndpoint(old.ifindex, old.id); err != nil {
			t.Fatal(err)
		}
		e.from(heir, udp(podA, podB))
		if r := e.mustRecord(udpTuple(podA, podB)); r.OriginWorkload != 4 || r.ConnID == before.ConnID {
			t.Fatalf("after the old pod went: %+v, want a new record of the heir", r)
		}
		if ep := e.endpoint(heir); ep.Live != 1 {
			t.Fatalf("heir live %d, want 1", ep.Live)
		}
	})
}

// onOneCPU keeps the calling (locked) thread on one CPU, so that test runs
// meet the per-CPU UDP shortcut the previous run left. Call the returned
// function before the thread is unlocked (defer it inside InNewNetns).
func onOneCPU(t *testing.T) (restore func()) {
	t.Helper()
	var was, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &was); err != nil {
		t.Fatal(err)
	}
	c := -1
	for i := range 1024 {
		if was.IsSet(i) {
			c = i
			break
		}
	}
	if c < 0 {
		t.Fatal("no CPU in this thread's affinity")
	}
	one.Set(c)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := unix.SchedSetaffinity(0, &was); err != nil {
			t.Errorf("restore affinity: %v", err)
		}
	}
}

// conntrackUDP inserts (op "-I") or deletes ("-D") a UDP entry src -> dst
// in the calling thread's netns, as if the flow had crossed conntrack.
func conntrackUDP(t *testing.T, op string, src, dst netip.AddrPort) {
	t.Helper()
	args := []string{op, "-p", "udp", "-s", src.Addr().String(), "-d", dst.Addr().String(),
		"--sport", strconv.Itoa(int(src.Port())), "--dport", strconv.Itoa(int(dst.Port()))}
	if op == "-I" {
		args = append(args, "-t", "60", "-r", dst.Addr().String(), "-q", src.Addr().String(),
			"--reply-port-src", strconv.Itoa(int(dst.Port())), "--reply-port-dst", strconv.Itoa(int(src.Port())))
	}
	if out, err := exec.Command("conntrack", args...).CombinedOutput(); err != nil {
		t.Fatalf("conntrack %v: %v: %s", args, err, out)
	}
}

// udpSlot mirrors udp_hit_slot() in bpf/pktmeta.c (the origin side).
func udpSlot(ifindex uint32, t Tuple) uint32 {
	k := t.key()
	h := ifindex ^ uint32(k.Sport) ^ uint32(k.Dport) ^ binary.NativeEndian.Uint32(k.Saddr[12:]) ^ binary.NativeEndian.Uint32(k.Daddr[12:])
	return (h ^ h>>16 ^ h>>8) & 15
}

// The per-CPU UDP shortcut (pktmeta_udp_hits): the next datagrams of a
// fresh flow skip the table, but never past anything that changes the
// answer: a record or alias that goes, an endpoint that changes, a refresh
// that is due, another veth.
func TestUDPShortcut(t *testing.T) {
	flow := udpTuple(podA, podB)
	// Each case in its own netns, on one CPU, with the shared datapath
	// emptied (and every slot voided).
	onOneCPUIn := func(t *testing.T, fn func(e *progEnv)) {
		testutil.InNewNetns(t, func() {
			defer onOneCPU(t)()
			fn(newProgEnv(t))
		})
	}
	t.Run("a fresh flow's datagrams skip the table", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			e.from(a, udp(podA, podB)) // first: the record
			e.from(a, udp(podA, podB)) // known and fresh: remembered
			// Behind the programs' back (nothing in pktmeta does this):
			// the full path would tag the next datagram again, the
			// shortcut does not look.
			dropRecord(t, e.d, flow)
			e.from(a, udp(podA, podB))
			if _, ok := e.lookup(flow); ok {
				t.Fatal("the datagram after the remembered one went the full path: no shortcut taken")
			}
			if err := e.d.ForgetUDPShortcuts(); err != nil {
				t.Fatal(err)
			}
			e.from(a, udp(podA, podB))
			e.mustRecord(flow)
		})
	})
	t.Run("a sweep voids it", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			b := e.addPod(2, podOpts{}, podB)
			e.from(a, udp(podA, podB))
			e.from(a, udp(podA, podB))
			e.to(b, udp(podA, podB))
			e.to(b, udp(podA, podB)) // delivered: remembered at the destination
			before := e.mustRecord(flow)
			if !before.IsDelivered() {
				t.Fatalf("not delivered: %+v", before)
			}
			if _, err := e.d.Sweep(SweepOptions{Workload: a.id}); err != nil {
				t.Fatal(err)
			}
			e.from(a, udp(podA, podB))
			after := e.mustRecord(flow)
			if after.ConnID == before.ConnID || after.IsDelivered() {
				t.Fatalf("after the sweep: %+v, want a new, undelivered record", after)
			}
			e.to(b, udp(podA, podB))
			if r := e.mustRecord(flow); !r.IsDelivered() {
				t.Fatal("the new record's first datagram at the destination took the old record's shortcut")
			}
		})
	})
	t.Run("an endpoint change voids it", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			e.from(a, udp(podA, podB))
			e.from(a, udp(podA, podB))
			dropRecord(t, e.d, flow)
			if err := e.d.PutEndpoint(a.ifindex, Endpoint{Workload: 7, Addrs: []netip.Addr{podA.Addr()}, MaxConnections: 10}); err != nil {
				t.Fatal(err)
			}
			e.from(a, udp(podA, podB))
			if r := e.mustRecord(flow); r.OriginWorkload != 7 {
				t.Fatalf("record %+v, want the new endpoint's", r)
			}
		})
	})
	t.Run("another veth is not a hit", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			// Another veth whose datagrams on this tuple land in a's
			// slot, registered before a's flow is remembered (a
			// registration voids every slot).
			var other *testPod
			for i := range 64 {
				p := e.addPod(uint32(10+i), podOpts{}, podA)
				if udpSlot(p.ifindex, flow) == udpSlot(a.ifindex, flow) {
					other = p
					break
				}
			}
			if other == nil {
				t.Fatal("no veth of 64 shares a's slot")
			}
			e.from(a, udp(podA, podB))
			e.from(a, udp(podA, podB)) // remembered in the shared slot
			e.from(other, udp(podA, podB))
			if s := e.stats(); s.NotParty != 1 {
				t.Fatalf("not-party %d, want 1: the other veth's datagram must go the full path", s.NotParty)
			}
		})
	})
	t.Run("a deleted endpoint voids it", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			e.from(a, udp(podA, podB))
			e.from(a, udp(podA, podB))
			if err := e.d.DeleteEndpoint(a.ifindex, a.id); err != nil {
				t.Fatal(err)
			}
			dropRecord(t, e.d, flow)
			e.from(a, udp(podA, podB))
			if s := e.stats(); s.Unregistered != 1 {
				t.Fatalf("unregistered %d, want 1: the datagram after the DEL must go the full path", s.Unregistered)
			}
		})
	})
	t.Run("the destination's delivered flow skips the table", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			b := e.addPod(2, podOpts{}, podB)
			e.from(a, udp(podA, podB))
			e.to(b, udp(podA, podB)) // delivered
			e.to(b, udp(podA, podB)) // delivered already: remembered
			seen := e.stats().DeliverPackets
			e.to(b, udp(podA, podB))
			if got := e.stats().DeliverPackets; got != seen {
				t.Fatalf("delivery packets %d then %d: the remembered flow went the full path", seen, got)
			}
		})
	})
	// IPv4 without options is judged from the headers before the parse
	// (udp4_known); everything else by the parsed tuple (udp_shortcut).
	// Slots are written from the parsed tuple either way. A miss in
	// udp4_known asks udp_shortcut on the same slot, so these cases show
	// that a hit is a hit whichever way the datagram asks, not which of
	// the two answered: that the header path answers shows in the bench
	// (a known flow's figure); that it never answers wrongly, below.
	withOptions := func(src, dst netip.AddrPort) testutil.Packet {
		p := udp(src, dst)
		p.IPv4Options = []byte{1, 1, 1, 1} // four NOPs: a 24-byte header
		return p
	}
	originPackets := func(e *progEnv) uint64 { return e.stats().OriginPackets }
	t.Run("both ways of asking share the slot", func(t *testing.T) {
		for _, c := range []struct {
			name          string
			remember, ask testutil.Packet
		}{
			{"remembered from an IP-options datagram, asked by a plain one", withOptions(podA, podB), udp(podA, podB)},
			{"remembered from a plain datagram, asked by an IP-options one", udp(podA, podB), withOptions(podA, podB)},
			{"IP options both times", withOptions(podA, podB), withOptions(podA, podB)},
		} {
			t.Run(c.name, func(t *testing.T) {
				onOneCPUIn(t, func(e *progEnv) {
					a := e.addPod(1, podOpts{}, podA)
					e.from(a, c.remember) // the record
					e.from(a, c.remember) // fresh: remembered
					seen := originPackets(e)
					e.from(a, c.ask)
					if got := originPackets(e); got != seen {
						t.Fatalf("origin packets %d then %d: the remembered flow went the full path", seen, got)
					}
				})
			})
		}
	})
	t.Run("an IPv6 flow never answers an IPv4 datagram", func(t *testing.T) {
		// The same low address words, the same ports, the same bytes
		// 8-11 (00 00 ff ff) as the IPv4-mapped form: the same slot, and
		// only the addresses' first eight bytes tell the tuples apart.
		lookalikeA := netip.MustParseAddrPort("[2001:db8::ffff:10.244.1.2]:40000")
		lookalikeB := netip.MustParseAddrPort("[2001:db8::ffff:10.244.1.3]:8080")
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA, lookalikeA)
			e.from(a, udp(lookalikeA, lookalikeB))
			e.from(a, udp(lookalikeA, lookalikeB)) // remembered
			e.mustRecord(udpTuple(lookalikeA, lookalikeB))
			e.from(a, udp(podA, podB))
			e.mustRecord(flow)
		})
	})
	t.Run("what the parser would not take is never a hit", func(t *testing.T) {
		// A non-first fragment whose payload reads like the flow's ports,
		// and a datagram whose IP length leaves no room for a UDP header:
		// neither is a datagram of the flow, and neither may leave as
		// one. The full path counts them as not parsed.
		fragment := udp(podA, podB)
		fragment.FragOffset = 8
		short := udp(podA, podB).Bytes()
		binary.BigEndian.PutUint16(short[14+2:], 20+4) // total length: IP header + 4
		for _, c := range []struct {
			name string
			pkt  []byte
		}{
			{"a non-first fragment", fragment.Bytes()},
			{"an IP length shorter than a UDP header", short},
		} {
			t.Run(c.name, func(t *testing.T) {
				onOneCPUIn(t, func(e *progEnv) {
					a := e.addPod(1, podOpts{}, podA)
					e.from(a, udp(podA, podB))
					e.from(a, udp(podA, podB)) // remembered
					before := e.stats().NotParsed
					e.runOn(e.d.Origin, a.ifindex, c.pkt)
					if got := e.stats().NotParsed; got != before+1 {
						t.Fatalf("not parsed %d then %d: the packet was taken for the remembered flow", before, got)
					}
				})
			})
		}
	})
	// Datagrams that need nothing because no record or alias is under
	// their tuple are remembered too, until one is made (births).
	t.Run("a pod's replies to a flow it received skip the table", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			b := e.addPod(2, podOpts{}, podB)
			e.from(a, udp(podA, podB))
			e.to(b, udp(podA, podB))   // delivered to b
			e.from(b, udp(podB, podA)) // b's reply: the full path
			seen := originPackets(e)
			e.from(b, udp(podB, podA))
			if got := originPackets(e); got != seen {
				t.Fatalf("origin packets %d then %d: the reply went the full path", seen, got)
			}
			if recs := e.records(); len(recs) != 1 || recs[0].OriginWorkload != a.id {
				t.Fatalf("records %+v: the reply was tagged as a flow of its own", recs)
			}
			// The flow answered goes: the reply is judged again (and, with
			// nothing left to answer, is a flow of b's own).
			if _, err := e.d.Sweep(SweepOptions{Workload: a.id}); err != nil {
				t.Fatal(err)
			}
			e.from(b, udp(podB, podA))
			if recs := e.records(); len(recs) != 1 || recs[0].OriginWorkload != b.id {
				t.Fatalf("records %+v: after a's record went, b's datagram was still taken for a reply", recs)
			}
		})
	})
	t.Run("a datagram nobody here opened is remembered until a record is made", func(t *testing.T) {
		if !probeConntrackKfuncs(slog.New(slog.DiscardHandler)) {
			t.Skip("no conntrack kfuncs on this kernel: the programs cannot ask conntrack, and a datagram nobody opened is never remembered (the next case checks that)")
		}
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			b := e.addPod(2, podOpts{}, podB)
			// Reaches b without passing a's hook (from off the node, with
			// a's address), through conntrack: no record behind it.
			conntrackUDP(t, "-I", podA, podB)
			e.to(b, udp(podA, podB))
			e.to(b, udp(podA, podB)) // needs nothing: remembered
			seen := e.stats().DeliverPackets
			e.to(b, udp(podA, podB))
			if got := e.stats().DeliverPackets; got != seen {
				t.Fatalf("delivery packets %d then %d: the datagram went the full path", seen, got)
			}
			// The conntrack entry goes and a opens the flow: its record is
			// made, and the next datagram at b must find it.
			conntrackUDP(t, "-D", podA, podB)
			e.from(a, udp(podA, podB))
			e.mustRecord(flow)
			e.to(b, udp(podA, podB))
			if r := e.mustRecord(flow); !r.IsDelivered() {
				t.Fatalf("%+v: the record made after the datagram was remembered was never delivered", r)
			}
		})
	})
	t.Run("an answer conntrack vouches for is remembered", func(t *testing.T) {
		// A flow that came in through the node's stack (a Service's, say)
		// without reaching b's delivery hook here: only conntrack knows
		// b's datagram answers it.
		if !probeConntrackKfuncs(slog.New(slog.DiscardHandler)) {
			t.Skip("no conntrack kfuncs on this kernel: the programs cannot ask conntrack")
		}
		onOneCPUIn(t, func(e *progEnv) {
			b := e.addPod(2, podOpts{}, podB)
			conntrackUDP(t, "-I", podA, podB)
			e.from(b, udp(podB, podA)) // the full path: conntrack's answer
			seen := originPackets(e)
			e.from(b, udp(podB, podA))
			if got := originPackets(e); got != seen {
				t.Fatalf("origin packets %d then %d: the answer went the full path", seen, got)
			}
			if recs := e.records(); len(recs) != 0 {
				t.Fatalf("records %+v: b's answer was taken for a flow of its own", recs)
			}
			if s := e.stats(); s.UDPReplies != 1 {
				t.Fatalf("udp replies %d, want 1 (the full path once)", s.UDPReplies)
			}
		})
	})
	t.Run("without conntrack, a datagram nobody here opened keeps its inbound entry", func(t *testing.T) {
		// Where conntrack does not track the flow, pktmeta_inbound (an
		// LRU) is all that tells b's answers from flows b opens: every
		// datagram must write it back, so none is remembered.
		onOneCPUIn(t, func(e *progEnv) {
			e.addPod(1, podOpts{}, podA)
			b := e.addPod(2, podOpts{}, podB)
			e.to(b, udp(podA, podB))
			e.to(b, udp(podA, podB))
			answer := udpTuple(podB, podA).key()
			if err := e.d.InboundMap.Delete(answer); err != nil {
				t.Fatalf("no inbound entry for b's answers: %v", err)
			}
			seen := e.stats().DeliverPackets
			e.to(b, udp(podA, podB))
			if got := e.stats().DeliverPackets; got != seen+1 {
				t.Fatalf("delivery packets %d then %d: the datagram was remembered", seen, got)
			}
			var in bpfPktmetaInboundFlow
			if err := e.d.InboundMap.Lookup(answer, &in); err != nil || in.Ifindex != b.ifindex {
				t.Fatalf("the inbound entry was not written back (%v, %+v)", err, in)
			}
			e.from(b, udp(podB, podA))
			if recs := e.records(); len(recs) != 0 {
				t.Fatalf("records %+v: b's answer was taken for a flow of its own", recs)
			}
		})
	})
	t.Run("the refresh still happens", func(t *testing.T) {
		onOneCPUIn(t, func(e *progEnv) {
			a := e.addPod(1, podOpts{}, podA)
			cfg, err := e.d.ReadConfig()
			if err != nil {
				t.Fatal(err)
			}
			cfg.UDPTimeout = 2 * time.Second // the refresh is due after one
			if err := e.d.WriteConfig(cfg); err != nil {
				t.Fatal(err)
			}
			e.from(a, udp(podA, podB))
			e.from(a, udp(podA, podB))
			first := e.mustRecord(flow)
			time.Sleep(1200 * time.Millisecond)
			e.from(a, udp(podA, podB))
			r := e.mustRecord(flow)
			if r.ConnID != first.ConnID || !r.LastSeen.After(first.LastSeen) {
				t.Fatalf("last seen %v then %v (ids %d %d): the refresh was skipped", first.LastSeen, r.LastSeen, first.ConnID, r.ConnID)
			}
		})
	})
}
