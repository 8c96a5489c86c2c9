package datapath

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// These tests run the programs on crafted packets with BPF_PROG_TEST_RUN,
// inside a private netns (the test run's skb->dev is its loopback, ifindex
// 1) and against a private bpffs.

const (
	retNext = 0xffffffff // TCX_NEXT / TC_ACT_UNSPEC (-1)
	retDrop = 2
	loIndex = 1
)

type progEnv struct {
	t *testing.T
	d *Datapath
}

func newProgEnv(t *testing.T) *progEnv {
	pin := testutil.PinPath(t)
	d, _, err := Ensure(Options{PinPath: pin, MaxConnections: 4096}, testLogger())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return &progEnv{t: t, d: d}
}

// skbCtx is the start of struct __sk_buff with ifindex set; test runs
// accept only a few fields and require the rest to be zero.
func skbCtx(ifindex uint32) []byte {
	ctx := make([]byte, 48)
	binary.NativeEndian.PutUint32(ctx[40:], ifindex)
	return ctx
}

func (e *progEnv) run(p *ebpf.Program, pkt []byte) uint32 {
	e.t.Helper()
	ret, err := p.Run(&ebpf.RunOptions{Data: pkt, Context: skbCtx(loIndex)})
	if err != nil {
		e.t.Fatalf("test run (%d bytes): %v", len(pkt), err)
	}
	return ret
}

func (e *progEnv) register(id uint32, strict bool, addrs ...netip.Addr) {
	e.t.Helper()
	if err := e.d.PutEndpoint(loIndex, Endpoint{Workload: id, Strict: strict, Addrs: addrs}); err != nil {
		e.t.Fatal(err)
	}
}

func (e *progEnv) stats() Stats {
	e.t.Helper()
	s, err := e.d.ReadStats()
	if err != nil {
		e.t.Fatal(err)
	}
	return s
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

var (
	podA  = netip.MustParseAddrPort("10.244.1.2:40000")
	podB  = netip.MustParseAddrPort("10.244.1.3:8080")
	podA6 = netip.MustParseAddrPort("[fd00:10:244:1::2]:40000")
	podB6 = netip.MustParseAddrPort("[fd00:10:244:1::3]:8080")
)

func syn(src, dst netip.AddrPort, seq uint32) testutil.Packet {
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: seq}
}

func tcpTuple(src, dst netip.AddrPort) Tuple { return Tuple{Proto: ProtoTCP, Src: src, Dst: dst} }
func udpTuple(src, dst netip.AddrPort) Tuple { return Tuple{Proto: ProtoUDP, Src: src, Dst: dst} }

func TestOriginTagsTCPSynOnce(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(42, false)
		start := time.Now()

		if ret := e.run(e.d.Origin, syn(podA, podB, 1000).Bytes()); ret != retNext {
			t.Fatalf("SYN returned %#x, want TCX_NEXT", ret)
		}
		r, ok := e.lookup(tcpTuple(podA, podB))
		if !ok {
			t.Fatal("SYN did not create a record")
		}
		if r.OriginWorkload != 42 || r.OriginIfindex != loIndex || r.ConnID == 0 || r.SynSeq != 1000 || r.Version != RecordVersion {
			t.Fatalf("record %+v", r)
		}
		if r.FirstSeen.Before(start.Add(-time.Second)) || r.FirstSeen.After(time.Now().Add(time.Second)) {
			t.Fatalf("first seen %v not around now %v", r.FirstSeen, start)
		}

		// A retransmitted SYN keeps the record and its connection id.
		e.run(e.d.Origin, syn(podA, podB, 1000).Bytes())
		r2, _ := e.lookup(tcpTuple(podA, podB))
		if r2.ConnID != r.ConnID {
			t.Fatalf("retransmit changed conn id %d -> %d", r.ConnID, r2.ConnID)
		}
		// Every other packet of the connection leaves the table alone.
		for _, flags := range []uint8{testutil.ACK, testutil.ACK | testutil.PSH, testutil.SYN | testutil.ACK} {
			pkt := testutil.Packet{Src: podA, Dst: podB, Proto: 6, TCPFlags: flags, Seq: 1001}
			e.run(e.d.Origin, pkt.Bytes())
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

		// A new SYN on the same tuple (new ISN) is a new connection.
		e.run(e.d.Origin, syn(podA, podB, 9000).Bytes())
		r3, _ := e.lookup(tcpTuple(podA, podB))
		if r3.ConnID == r.ConnID || r3.SynSeq != 9000 {
			t.Fatalf("reused tuple: record %+v, old conn id %d", r3, r.ConnID)
		}
	})
}

func TestOriginDistinctConnIDs(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(7, false)
		seen := map[uint64]bool{}
		for i := range 200 {
			src := netip.AddrPortFrom(podA.Addr(), uint16(20000+i))
			e.run(e.d.Origin, syn(src, podB, uint32(i)).Bytes())
			r, ok := e.lookup(tcpTuple(src, podB))
			if !ok {
				t.Fatalf("connection %d not tagged", i)
			}
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
		e.register(9, false)
		pkt := testutil.Packet{Src: podA, Dst: podB, Proto: 17, Payload: []byte("hello")}
		e.run(e.d.Origin, pkt.Bytes())
		r, ok := e.lookup(udpTuple(podA, podB))
		if !ok || r.Flags&FlagUDP == 0 {
			t.Fatalf("UDP first packet: record %+v found=%v", r, ok)
		}
		for range 10 {
			e.run(e.d.Origin, pkt.Bytes())
		}
		r2, _ := e.lookup(udpTuple(podA, podB))
		if r2.ConnID != r.ConnID {
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
		e.register(5, false)

		// IPv4 with 12 bytes of options (router alert + NOPs + timestamp-ish).
		p := syn(podA, podB, 1)
		p.IPv4Options = []byte{0x94, 0x04, 0, 0, 0x01, 0x01, 0x01, 0x01, 0x44, 0x04, 0x05, 0x00}
		e.run(e.d.Origin, p.Bytes())
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Error("IPv4 SYN with options not tagged")
		}

		// IPv6 through hop-by-hop, routing, destination options, and a first fragment.
		p6 := syn(podA6, podB6, 2)
		p6.IPv6Ext = []uint8{0, 43, 60}
		p6.MoreFragments = true
		e.run(e.d.Origin, p6.Bytes())
		if _, ok := e.lookup(tcpTuple(podA6, podB6)); !ok {
			t.Error("IPv6 SYN behind extension headers not tagged")
		}

		// UDP over IPv6 with a destination options header.
		u6 := testutil.Packet{Src: podA6, Dst: podB6, Proto: 17, IPv6Ext: []uint8{60}}
		e.run(e.d.Origin, u6.Bytes())
		if _, ok := e.lookup(udpTuple(podA6, podB6)); !ok {
			t.Error("IPv6 UDP behind a destination options header not tagged")
		}

		before := e.stats().Tagged
		// Non-first fragments carry no L4 header: never tagged.
		f4 := syn(netip.MustParseAddrPort("10.244.1.2:1"), podB, 3)
		f4.FragOffset = 100
		f6 := syn(netip.MustParseAddrPort("[fd00:10:244:1::2]:1"), podB6, 3)
		f6.FragOffset = 100
		// Longer extension chains than the datapath walks: left alone.
		long6 := syn(netip.MustParseAddrPort("[fd00:10:244:1::2]:2"), podB6, 3)
		long6.IPv6Ext = []uint8{0, 60, 60, 60, 60, 60, 60, 60, 60, 60}
		for _, pkt := range []testutil.Packet{f4, f6, long6} {
			if ret := e.run(e.d.Origin, pkt.Bytes()); ret != retNext {
				t.Errorf("returned %#x, want TCX_NEXT", ret)
			}
		}
		if s := e.stats(); s.Tagged != before {
			t.Errorf("fragments or over-long chains tagged: %d -> %d", before, s.Tagged)
		}
	})
}

func TestTruncatedAndGarbagePacketsPassUntouched(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(5, false)
		full := syn(podA, podB, 1).Bytes()
		full6 := syn(podA6, podB6, 1).Bytes()
		// Every truncation of a valid SYN passes and is not tagged. The
		// kernel refuses test runs whose IP header is cut short, so that
		// case is covered by header lengths that overrun the packet.
		for _, pkt := range [][]byte{full, full6} {
			l3 := 34
			if len(pkt) == len(full6) {
				l3 = 54
			}
			for n := l3; n < len(pkt); n++ {
				if ret := e.run(e.d.Origin, pkt[:n]); ret != retNext {
					t.Fatalf("truncated to %d: returned %#x", n, ret)
				}
				if ret := e.run(e.d.Deliver, pkt[:n]); ret != retNext {
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
		for _, pkt := range [][]byte{overrun, overrun6} {
			if ret := e.run(e.d.Origin, pkt); ret != retNext {
				t.Fatalf("overrun header: returned %#x", ret)
			}
		}
		if n := len(e.records()); n != 0 {
			t.Fatalf("%d records from truncated packets", n)
		}

		// Random bytes, and valid headers with random mutations: whatever the
		// datapath tags must be exactly what a reference parser reads there.
		rng := rand.New(rand.NewPCG(1, 2))
		for i := range 3000 {
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
				base := full
				if i%4 == 3 {
					base = full6
				}
				pkt = append([]byte(nil), base...)
				for range 1 + rng.IntN(3) {
					pkt[14+rng.IntN(len(pkt)-14)] = byte(rng.Uint32())
				}
			}
			if ret := e.run(e.d.Origin, pkt); ret != retNext {
				t.Fatalf("packet %d returned %#x: % x", i, ret, pkt)
			}
			recs := e.records()
			want, isSyn := referenceParse(pkt)
			switch {
			case isSyn && len(recs) != 1:
				t.Fatalf("packet %d: reference parser sees a first packet %s, datapath made %d records: % x", i, want, len(recs), pkt)
			case !isSyn && len(recs) != 0:
				t.Fatalf("packet %d: datapath tagged %s, reference parser sees no first packet: % x", i, recs[0].Tuple, pkt)
			case isSyn && recs[0].Tuple != want:
				t.Fatalf("packet %d: datapath tagged %s, reference parser reads %s", i, recs[0].Tuple, want)
			}
			for _, r := range recs {
				e.d.DeleteRecord(r)
			}
		}
	})
}

// referenceParse is an independent reading of a packet: the tuple, and
// whether the origin program should tag it (TCP SYN without ACK, or UDP).
func referenceParse(pkt []byte) (Tuple, bool) {
	if len(pkt) < 14 {
		return Tuple{}, false
	}
	et := binary.BigEndian.Uint16(pkt[12:])
	b := pkt[14:]
	var (
		src, dst netip.Addr
		proto    uint8
		l4       []byte
	)
	switch et {
	case 0x0800:
		if len(b) < 20 || b[0]>>4 != 4 || b[0]&0xf < 5 {
			return Tuple{}, false
		}
		ihl := int(b[0]&0xf) * 4
		if int(binary.BigEndian.Uint16(b[2:])) < ihl || binary.BigEndian.Uint16(b[6:])&0x1fff != 0 || len(b) < ihl {
			return Tuple{}, false
		}
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
		proto, l4 = b[9], b[ihl:]
	case 0x86dd:
		if len(b) < 40 || b[0]>>4 != 6 {
			return Tuple{}, false
		}
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
		proto, l4 = b[6], b[40:]
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
			proto = next
		}
	default:
		return Tuple{}, false
	}
	switch proto {
	case 6:
		if len(l4) < 20 || l4[12]>>4 < 5 {
			return Tuple{}, false
		}
		t := Tuple{Proto: 6, Src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4)), Dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))}
		return t, l4[13]&(testutil.SYN|testutil.ACK) == testutil.SYN
	case 17:
		if len(l4) < 8 {
			return Tuple{}, false
		}
		t := Tuple{Proto: 17, Src: netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4)), Dst: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))}
		return t, true
	}
	return Tuple{}, false
}

func TestDeliverMarksOnceAndCloseRemoves(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(1, false)
		e.run(e.d.Origin, syn(podA, podB, 77).Bytes())

		// The same SYN reaching the receiver's veth (here the same ifindex,
		// re-registered as the receiving workload).
		e.register(2, false)
		for range 3 {
			e.run(e.d.Deliver, syn(podA, podB, 77).Bytes())
		}
		r, _ := e.lookup(tcpTuple(podA, podB))
		if !r.IsDelivered() || r.PeerWorkload != 2 || r.PeerTuple != tcpTuple(podA, podB) || r.Flags&FlagNAT != 0 {
			t.Fatalf("after delivery: %+v", r)
		}
		if s := e.stats(); s.Deliveries != 1 {
			t.Fatalf("deliveries %d, want 1 (three SYNs)", s.Deliveries)
		}
		// The reply direction finds the same record.
		if r2, ok := e.lookup(tcpTuple(podB, podA)); !ok || r2.ConnID != r.ConnID {
			t.Fatal("lookup by reply tuple failed")
		}

		// FIN from the origin alone does not close; the peer's FIN does.
		fin := testutil.Packet{Src: podA, Dst: podB, Proto: 6, TCPFlags: testutil.FIN | testutil.ACK}
		e.run(e.d.Origin, fin.Bytes())
		e.run(e.d.Deliver, fin.Bytes()) // the same FIN on the receiver's veth
		if _, ok := e.lookup(tcpTuple(podA, podB)); !ok {
			t.Fatal("one FIN closed the record")
		}
		finBack := testutil.Packet{Src: podB, Dst: podA, Proto: 6, TCPFlags: testutil.FIN | testutil.ACK}
		e.run(e.d.Origin, finBack.Bytes())
		if _, ok := e.lookup(tcpTuple(podA, podB)); ok {
			t.Fatal("record survived both FINs")
		}

		// RST closes at once, from either side.
		e.run(e.d.Origin, syn(podA6, podB6, 5).Bytes())
		rst := testutil.Packet{Src: podB6, Dst: podA6, Proto: 6, TCPFlags: testutil.RST | testutil.ACK}
		e.run(e.d.Deliver, rst.Bytes())
		if _, ok := e.lookup(tcpTuple(podA6, podB6)); ok {
			t.Fatal("record survived RST")
		}
		if s := e.stats(); s.Closed != 2 {
			t.Fatalf("closed %d, want 2", s.Closed)
		}
	})
}

func TestStrictSourceDropsSpoofedSources(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(3, true, podA.Addr(), podA6.Addr())
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
			if got := e.run(e.d.Strict, c.pkt.Bytes()); got != c.want {
				t.Errorf("%s -> %s: returned %#x, want %#x", c.pkt.Src, c.pkt.Dst, got, c.want)
			}
		}
		if s := e.stats(); s.StrictDrops != 3 {
			t.Fatalf("strict drops %d, want 3", s.StrictDrops)
		}
		if _, ok := e.lookup(tcpTuple(netip.MustParseAddrPort("10.244.1.99:1"), podB)); ok {
			t.Fatal("a spoofed SYN was tagged")
		}
	})
}

func TestUnregisteredVethIsNotTagged(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.run(e.d.Origin, syn(podA, podB, 1).Bytes())
		if s := e.stats(); s.Unregistered != 1 || s.Tagged != 0 {
			t.Fatalf("stats %+v", s)
		}
	})
}

func TestEventsForOpenDeliverClose(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		rd, err := e.d.NewEventReader()
		if err != nil {
			t.Fatal(err)
		}
		defer rd.Close()
		e.register(11, false)
		e.run(e.d.Origin, syn(podA, podB, 1).Bytes())
		e.run(e.d.Deliver, syn(podA, podB, 1).Bytes())
		e.run(e.d.Origin, testutil.Packet{Src: podA, Dst: podB, Proto: 6, TCPFlags: testutil.RST}.Bytes())
		var types []uint8
		for range 3 {
			rd.SetDeadline(time.Now().Add(2 * time.Second))
			ev, err := rd.Read()
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if ev.Tuple != tcpTuple(podA, podB) || ev.OriginWorkload != 11 || ev.ConnID == 0 {
				t.Fatalf("event %+v", ev)
			}
			types = append(types, ev.Type)
		}
		if len(types) != 3 || types[0] != EventOpened || types[1] != EventDelivered || types[2] != EventClosed {
			t.Fatalf("event types %v, want opened, delivered, closed", types)
		}
	})
}

// A UDP flow idle past the timeout is a new flow on its next packet, and
// the userspace sweep (DEL, GC) removes idle records.
func TestUDPIdleFlowAgesOut(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(9, false)
		cfg, err := e.d.ReadConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.UDPTimeout = 400 * time.Millisecond
		if err := e.d.WriteConfig(cfg); err != nil {
			t.Fatal(err)
		}
		pkt := testutil.Packet{Src: podA, Dst: podB, Proto: 17}
		e.run(e.d.Origin, pkt.Bytes())
		r1, _ := e.lookup(udpTuple(podA, podB))
		// A flow that keeps sending keeps its id past the timeout.
		for range 3 {
			time.Sleep(250 * time.Millisecond)
			e.run(e.d.Origin, pkt.Bytes())
			if r, _ := e.lookup(udpTuple(podA, podB)); r.ConnID != r1.ConnID {
				t.Fatal("an active flow was re-tagged")
			}
		}
		time.Sleep(600 * time.Millisecond)
		e.run(e.d.Origin, pkt.Bytes())
		r2, _ := e.lookup(udpTuple(podA, podB))
		if r2.ConnID == r1.ConnID {
			t.Fatal("an idle flow kept its old connection id")
		}

		other := udpTuple(podA6, podB6)
		e.run(e.d.Origin, testutil.Packet{Src: podA6, Dst: podB6, Proto: 17}.Bytes())
		time.Sleep(250 * time.Millisecond)
		e.run(e.d.Origin, pkt.Bytes()) // keeps the first flow fresh
		time.Sleep(250 * time.Millisecond)
		n, err := e.d.SweepRecords(nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := e.lookup(other); ok || n != 1 {
			t.Fatalf("sweep removed %d records, idle flow still there: %v", n, ok)
		}
		if _, ok := e.lookup(udpTuple(podA, podB)); !ok {
			t.Fatal("sweep removed an active flow")
		}
	})
}

// A UDP reply is not a new flow even where the node has no conntrack: the
// record of the flow it answers is enough.
func TestUDPReplyWithoutConntrackIsNotTagged(t *testing.T) {
	testutil.InNewNetns(t, func() {
		e := newProgEnv(t)
		e.register(1, false)
		e.run(e.d.Origin, testutil.Packet{Src: podA, Dst: podB, Proto: 17}.Bytes())
		e.register(2, false)
		e.run(e.d.Origin, testutil.Packet{Src: podB, Dst: podA, Proto: 17}.Bytes())
		if recs := e.records(); len(recs) != 1 || recs[0].OriginWorkload != 1 {
			t.Fatalf("records %+v: the reply must not be a flow opened by the server", recs)
		}
		if s := e.stats(); s.Tagged != 1 || s.UDPReplies != 1 {
			t.Fatalf("stats %+v, want 1 tagged and 1 UDP reply", s)
		}
	})
}
