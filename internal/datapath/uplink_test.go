package datapath

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// The uplink programs on crafted packets: what leaves the node gets the
// option, what arrives loses it, and only what should be trusted is.

var (
	testKey     = []byte("0123456789abcdef")
	testMembers = []netip.Prefix{
		netip.MustParsePrefix("10.244.0.0/16"),
		netip.MustParsePrefix("192.168.50.0/24"),
		netip.MustParsePrefix("fd00:10:244::/48"),
	}
	remoteB  = netip.MustParseAddrPort("10.244.2.5:8080")
	remoteB6 = netip.MustParseAddrPort("[fd00:10:244:2::5]:8080")
	outside  = netip.MustParseAddrPort("203.0.113.9:443")
)

// uplinkEnv is a progEnv whose node has an id, members, maybe a key, and
// an uplink (a veth end) to run the uplink programs on.
type uplinkEnv struct {
	*progEnv
	uplink uint32
}

func newUplinkEnv(t *testing.T, id uint16, key []byte) *uplinkEnv {
	t.Helper()
	e := newProgEnv(t)
	up := e.addPod(0, podOpts{}) // only its ifindex: no endpoint is used
	if err := e.d.EndpointsMap.Delete(up.ifindex); err != nil {
		t.Fatal(err)
	}
	if err := e.d.SetNode(NodeConfig{ID: id, Members: testMembers, Key: key}); err != nil {
		t.Fatal(err)
	}
	return &uplinkEnv{progEnv: e, uplink: up.ifindex}
}

// withUplinkEnv runs f in a netns of its own (its veths' names repeat).
func withUplinkEnv(t *testing.T, id uint16, key []byte, f func(e *uplinkEnv)) {
	t.Helper()
	testutil.InNewNetns(t, func() { f(newUplinkEnv(t, id, key)) })
}

func (e *uplinkEnv) out(pkt testutil.Packet) (uint32, []byte) {
	e.t.Helper()
	return e.runOut(pkt.Bytes())
}

func (e *uplinkEnv) runOut(pkt []byte) (uint32, []byte) {
	e.t.Helper()
	out := make([]byte, len(pkt)+64)
	opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx(e.uplink)}
	ret, err := e.d.UplinkOut.Run(opts)
	if err != nil {
		e.t.Fatalf("test run: %v", err)
	}
	return ret, opts.DataOut
}

func (e *uplinkEnv) runIn(pkt []byte) (uint32, []byte) {
	e.t.Helper()
	out := make([]byte, len(pkt)+64)
	opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx(e.uplink)}
	ret, err := e.d.UplinkIn.Run(opts)
	if err != nil {
		e.t.Fatalf("test run: %v", err)
	}
	return ret, opts.DataOut
}

func (e *uplinkEnv) xstats() RemoteStats {
	e.t.Helper()
	s, err := e.d.ReadRemoteStats()
	if err != nil {
		e.t.Fatal(err)
	}
	return s
}

// tcpSeg is a parsed Ethernet + IPv4/IPv6 + TCP frame.
type tcpSeg struct {
	ipHdr, tcp []byte // tcp: header with options, then data
	opts       []byte
	src, dst   netip.Addr
}

// parseTCP parses a frame and checks its IPv4 header checksum, its IP
// length and its TCP checksum: a program that changed the packet must
// leave all three right.
func parseTCP(t *testing.T, b []byte) tcpSeg {
	t.Helper()
	var s tcpSeg
	var pseudo []byte
	switch binary.BigEndian.Uint16(b[12:]) {
	case 0x0800:
		ihl := int(b[14]&0xf) * 4
		s.ipHdr = b[14 : 14+ihl]
		if testutil.Checksum(s.ipHdr) != 0 {
			t.Fatalf("bad IPv4 header checksum")
		}
		tot := int(binary.BigEndian.Uint16(s.ipHdr[2:]))
		if 14+tot != len(b) {
			t.Fatalf("IPv4 total length %d, frame carries %d", tot, len(b)-14)
		}
		s.tcp = b[14+ihl : 14+tot]
		s.src, _ = netip.AddrFromSlice(s.ipHdr[12:16])
		s.dst, _ = netip.AddrFromSlice(s.ipHdr[16:20])
		pseudo = append(append(pseudo, s.ipHdr[12:20]...), 0, 6, byte(len(s.tcp)>>8), byte(len(s.tcp)))
	case 0x86dd:
		s.ipHdr = b[14:54]
		pl := int(binary.BigEndian.Uint16(s.ipHdr[4:]))
		if 54+pl != len(b) {
			t.Fatalf("IPv6 payload length %d, frame carries %d", pl, len(b)-54)
		}
		s.tcp = b[54:]
		s.src, _ = netip.AddrFromSlice(s.ipHdr[8:24])
		s.dst, _ = netip.AddrFromSlice(s.ipHdr[24:40])
		pseudo = append(append(pseudo, s.ipHdr[8:40]...), 0, 0, byte(len(s.tcp)>>8), byte(len(s.tcp)), 0, 0, 0, 6)
	default:
		t.Fatalf("not IP")
	}
	if testutil.Checksum(append(pseudo, s.tcp...)) != 0 {
		t.Fatalf("bad TCP checksum")
	}
	s.opts = s.tcp[20 : int(s.tcp[12]>>4)*4]
	return s
}

func TestUplinkOutAddsTheOption(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		key      []byte
	}{
		{"v4", podA, remoteB, nil},
		{"v6", podA6, remoteB6, nil},
		{"v4 with MAC", podA, remoteB, testKey},
		{"v6 with MAC", podA6, remoteB6, testKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withUplinkEnv(t, 7, tc.key, func(e *uplinkEnv) {
				a := e.addPod(11, podOpts{}, tc.src)
				pkt := testutil.Packet{Src: tc.src, Dst: tc.dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 1000, TCPOptions: testutil.LinuxSYNOptions}
				e.from(a, pkt)
				rec := e.mustRecord(tcpTuple(tc.src, tc.dst))

				ret, b := e.out(pkt)
				if ret != retNext {
					t.Fatalf("verdict %d", ret)
				}
				seg := parseTCP(t, b)
				if len(seg.opts) != 40 || !bytes.Equal(seg.opts[:20], testutil.LinuxSYNOptions) {
					t.Fatalf("options % x: want Linux's 20 bytes, then ours", seg.opts)
				}
				opts := FindOption(seg.opts)
				if len(opts) != 1 {
					t.Fatalf("%d pktmeta options in % x", len(opts), seg.opts)
				}
				o := opts[0]
				want := Option{Version: OptionVersion, ConnID: rec.ConnID & ConnOriginMask, Node: 7, Workload: 11}
				if tc.key != nil {
					mac, err := OptionMAC(tc.key, tcpTuple(tc.src, tc.dst), 1000, want)
					if err != nil {
						t.Fatal(err)
					}
					want.MAC = mac
				}
				if o != want {
					t.Fatalf("option %+v, want %+v", o, want)
				}
				if s := e.xstats(); s.OptAdded != 1 || s.OutSYNs != 1 {
					t.Fatalf("counters %+v", s)
				}
				// A retransmit gets the same option; a plain segment nothing.
				if _, b2 := e.out(pkt); !bytes.Equal(b2, b) {
					t.Fatal("retransmitted SYN got another option")
				}
				ack := testutil.Packet{Src: tc.src, Dst: tc.dst, Proto: 6, TCPFlags: testutil.ACK, Seq: 1001}
				if _, b3 := e.out(ack); !bytes.Equal(b3, ack.Bytes()) {
					t.Fatal("a plain segment was changed")
				}
			})
		})
	}
}

func TestUplinkOutLeavesOtherSYNsAlone(t *testing.T) {
	// Linux's 20 bytes and a 20-byte option of another kind fill the header.
	full := append(append([]byte(nil), testutil.LinuxSYNOptions...), 30, 18, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)
	for _, tc := range []struct {
		name    string
		pkt     testutil.Packet
		counter func(RemoteStats) uint64
	}{
		{"to outside the cluster", testutil.Packet{Src: podA, Dst: outside, Proto: 6, TCPFlags: testutil.SYN, Seq: 1, TCPOptions: testutil.LinuxSYNOptions},
			func(s RemoteStats) uint64 { return s.OutNotMember }},
		{"no room", testutil.Packet{Src: podA, Dst: remoteB, Proto: 6, TCPFlags: testutil.SYN, Seq: 2, TCPOptions: full},
			func(s RemoteStats) uint64 { return s.OptNoRoom }},
		{"data on the SYN", testutil.Packet{Src: podA, Dst: remoteB, Proto: 6, TCPFlags: testutil.SYN, Seq: 3, TCPOptions: testutil.LinuxSYNOptions, Payload: []byte("fast open")},
			func(s RemoteStats) uint64 { return s.OptNoRoom }},
		{"no record", testutil.Packet{Src: podC, Dst: remoteB, Proto: 6, TCPFlags: testutil.SYN, Seq: 4, TCPOptions: testutil.LinuxSYNOptions},
			func(s RemoteStats) uint64 { return s.OutNoRecord }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withUplinkEnv(t, 7, testKey, func(e *uplinkEnv) {
				a := e.addPod(11, podOpts{}, podA)
				if tc.pkt.Src == podA {
					e.from(a, tc.pkt)
				}
				ret, b := e.out(tc.pkt)
				if ret != retNext || !bytes.Equal(b, tc.pkt.Bytes()) {
					t.Fatalf("verdict %d, packet changed", ret)
				}
				if got := tc.counter(e.xstats()); got != 1 {
					t.Fatalf("counter %d, want 1: %+v", got, e.xstats())
				}
			})
		})
	}
}

// A pod (or the host) that puts a pktmeta option on its own SYN: whatever
// it says is overwritten before the SYN leaves, and the real one added.
func TestUplinkOutNeutralisesForgedOptions(t *testing.T) {
	forged := Option{Version: OptionVersion, ConnID: 42, Node: 3, Workload: 99}.Encode()
	for _, tc := range []struct {
		name string
		dst  netip.AddrPort
		opts []byte
		ours bool
	}{
		{"alone", remoteB, forged, true},
		{"first, then Linux's", remoteB, append(append([]byte(nil), forged...), testutil.LinuxSYNOptions...), false},
		{"to outside", outside, forged, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withUplinkEnv(t, 7, nil, func(e *uplinkEnv) {
				a := e.addPod(11, podOpts{}, podA)
				pkt := testutil.Packet{Src: podA, Dst: tc.dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 5, TCPOptions: tc.opts}
				e.from(a, pkt)
				ret, b := e.out(pkt)
				if ret != retNext {
					t.Fatalf("verdict %d", ret)
				}
				seg := parseTCP(t, b)
				got := FindOption(seg.opts)
				for _, o := range got {
					if o.Node == 3 || o.Workload == 99 {
						t.Fatalf("the forged option left the node: % x", seg.opts)
					}
				}
				if tc.ours != (len(got) == 1) {
					t.Fatalf("options % x: want ours %v", seg.opts, tc.ours)
				}
				if e.xstats().OptNeutralised != 1 {
					t.Fatalf("counters %+v", e.xstats())
				}
			})
		})
	}
}

// synWithOption is a SYN from another node's pod carrying opt last.
func synWithOption(src, dst netip.AddrPort, seq uint32, opt Option, key []byte) testutil.Packet {
	if key != nil {
		opt.MAC, _ = OptionMAC(key, tcpTuple(src, dst), seq, opt)
	}
	opts := append(append([]byte(nil), testutil.LinuxSYNOptions...), opt.Encode()...)
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: testutil.SYN, Seq: seq, TCPOptions: opts}
}

func TestUplinkInMakesTheRemoteRecordAndStrips(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		key      []byte
	}{
		{"v4", remoteB, podB, nil},
		{"v6", remoteB6, podB6, nil},
		{"v4 with MAC", remoteB, podB, testKey},
		{"v6 with MAC", remoteB6, podB6, testKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			withUplinkEnv(t, 9, tc.key, func(e *uplinkEnv) {
				b := e.addPod(22, podOpts{}, tc.dst)
				opt := Option{Version: OptionVersion, ConnID: 0xabc_1234_5678, Node: 7, Workload: 11}
				pkt := synWithOption(tc.src, tc.dst, 777, opt, tc.key)
				ret, out := e.runIn(pkt.Bytes())
				if ret != retNext {
					t.Fatalf("verdict %d", ret)
				}
				// Exactly the SYN the origin pod sent, option cut off.
				plain := testutil.Packet{Src: tc.src, Dst: tc.dst, Proto: 6, TCPFlags: testutil.SYN, Seq: 777, TCPOptions: testutil.LinuxSYNOptions}
				parseTCP(t, out)
				if !bytes.Equal(out, plain.Bytes()) {
					t.Fatalf("stripped SYN\n% x\nwant\n% x", out, plain.Bytes())
				}
				r := e.mustRecord(tcpTuple(tc.src, tc.dst))
				if !r.IsRemote() || r.OriginNode != 7 || r.OriginWorkload != 11 || r.OriginConnID() != opt.ConnID || r.OriginIfindex != e.uplink {
					t.Fatalf("record %+v", r)
				}
				if s := e.xstats(); s.RemoteTagged != 1 || s.InOptions != 1 {
					t.Fatalf("counters %+v", s)
				}
				// The retransmit finds it; delivery, the answer and the
				// close work as for a local record.
				e.runIn(pkt.Bytes())
				if s := e.xstats(); s.RemoteRetransmits != 1 || s.RemoteTagged != 1 {
					t.Fatalf("retransmit: %+v", s)
				}
				e.to(b, plain)
				e.from(b, tcpFlags(tc.dst, tc.src, testutil.SYN|testutil.ACK, 5))
				r = e.mustRecord(tcpTuple(tc.src, tc.dst))
				if !r.IsDelivered() || r.PeerWorkload != 22 || r.Flags&FlagEstablished == 0 {
					t.Fatalf("after delivery and SYN-ACK: %+v", r)
				}
				node, err := e.d.Node()
				if err != nil || node.LiveRemote != 1 {
					t.Fatalf("node %+v %v", node, err)
				}
				e.from(b, tcpFlags(tc.dst, tc.src, testutil.RST, 6))
				if _, ok := e.lookup(tcpTuple(tc.src, tc.dst)); ok {
					t.Fatal("RST from the receiver left the record")
				}
				if node, _ := e.d.Node(); node.LiveRemote != 0 {
					t.Fatalf("live remote %d after the close", node.LiveRemote)
				}
			})
		})
	}
}

// What must never become a record: each is stripped, counted, and leaves
// nothing behind.
func TestUplinkInTrustsOnlyMembersWithTheKey(t *testing.T) {
	good := Option{Version: OptionVersion, ConnID: 5, Node: 7, Workload: 11}
	stranger := netip.MustParseAddrPort("198.51.100.7:5555")
	cases := []struct {
		name    string
		key     []byte // the receiving node's
		pkt     testutil.Packet
		counter func(RemoteStats) uint64
	}{
		{"source outside the cluster", nil, synWithOption(stranger, podB, 1, good, nil),
			func(s RemoteStats) uint64 { return s.Untrusted }},
		{"no MAC where the node has a key", testKey, synWithOption(remoteB, podB, 2, good, nil),
			func(s RemoteStats) uint64 { return s.BadMAC }},
		{"another key's MAC", testKey, synWithOption(remoteB, podB, 3, good, []byte("fedcba9876543210")),
			func(s RemoteStats) uint64 { return s.BadMAC }},
		{"MAC of another tuple", testKey, func() testutil.Packet {
			p := synWithOption(remoteB, podB, 4, good, testKey)
			p.Src = netip.AddrPortFrom(p.Src.Addr(), p.Src.Port()+1)
			return p
		}(), func(s RemoteStats) uint64 { return s.BadMAC }},
		{"unknown version", nil, synWithOption(remoteB, podB, 5, Option{Version: 2, ConnID: 5, Node: 7, Workload: 11}, nil),
			func(s RemoteStats) uint64 { return s.Malformed }},
		{"node 0", nil, synWithOption(remoteB, podB, 6, Option{Version: OptionVersion, ConnID: 5, Workload: 11}, nil),
			func(s RemoteStats) uint64 { return s.Malformed }},
		{"two options", nil, func() testutil.Packet {
			o := good.Encode()
			return testutil.Packet{Src: remoteB, Dst: podB, Proto: 6, TCPFlags: testutil.SYN, Seq: 8, TCPOptions: append(append([]byte(nil), o...), o...)}
		}(), func(s RemoteStats) uint64 { return s.Malformed }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			withUplinkEnv(t, 9, tc.key, func(e *uplinkEnv) {
				ret, out := e.runIn(tc.pkt.Bytes())
				if ret != retNext {
					t.Fatalf("verdict %d", ret)
				}
				seg := parseTCP(t, out)
				if len(FindOption(seg.opts)) != 0 {
					t.Fatalf("an option reached the node: % x", seg.opts)
				}
				if n := len(e.records()); n != 0 {
					t.Fatalf("%d records", n)
				}
				if tc.counter(e.xstats()) != 1 {
					t.Fatalf("counters %+v", e.xstats())
				}
			})
		})
	}
	t.Run("node without an id", func(t *testing.T) {
		withUplinkEnv(t, 0, nil, func(e *uplinkEnv) {
			if err := e.d.SetNode(NodeConfig{}); err != nil {
				t.Fatal(err)
			}
			_, out := e.runIn(synWithOption(remoteB, podB, 9, good, nil).Bytes())
			if len(FindOption(parseTCP(t, out).opts)) != 0 || len(e.records()) != 0 || e.xstats().NodeOff != 1 {
				t.Fatalf("counters %+v", e.xstats())
			}
		})
	})
}

// An option that is not last (a middlebox moved it) cannot be cut off; it
// becomes NOPs, and is still honoured.
func TestUplinkInOptionNotLast(t *testing.T) {
	withUplinkEnv(t, 9, nil, func(e *uplinkEnv) {
		o := Option{Version: OptionVersion, ConnID: 5, Node: 7, Workload: 11}.Encode()
		pkt := testutil.Packet{Src: remoteB, Dst: podB, Proto: 6, TCPFlags: testutil.SYN, Seq: 1,
			TCPOptions: append(append([]byte(nil), o...), testutil.LinuxSYNOptions...)}
		_, out := e.runIn(pkt.Bytes())
		seg := parseTCP(t, out)
		if !bytes.Equal(seg.opts[:20], bytes.Repeat([]byte{1}, 20)) || !bytes.Equal(seg.opts[20:], testutil.LinuxSYNOptions) {
			t.Fatalf("options % x", seg.opts)
		}
		if s := e.xstats(); s.StrippedNOP != 1 || s.RemoteTagged != 1 {
			t.Fatalf("counters %+v", s)
		}
	})
}

// A node holds at most maxRemote records of other nodes' connections.
func TestUplinkInRemoteBudget(t *testing.T) {
	withUplinkEnv(t, 9, nil, func(e *uplinkEnv) {
		if err := e.d.SetNode(NodeConfig{ID: 9, Members: testMembers, MaxRemote: 2}); err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			o := Option{Version: OptionVersion, ConnID: uint64(i + 1), Node: 7, Workload: 11}
			e.runIn(synWithOption(netip.AddrPortFrom(remoteB.Addr(), uint16(1000+i)), podB, 1, o, nil).Bytes())
		}
		if n := len(e.records()); n != 2 {
			t.Fatalf("%d records, want 2", n)
		}
		if s := e.xstats(); s.RemoteOverBudget != 1 {
			t.Fatalf("counters %+v", s)
		}
	})
}

// A node that forwards a connection another node opened (a NodePort to a
// pod elsewhere) passes the origin on, not itself.
func TestUplinkForwardsARemoteOrigin(t *testing.T) {
	withUplinkEnv(t, 9, testKey, func(e *uplinkEnv) {
		in := Option{Version: OptionVersion, ConnID: 77, Node: 7, Workload: 11}
		pkt := synWithOption(remoteB, netip.MustParseAddrPort("10.244.3.8:80"), 1, in, testKey)
		_, stripped := e.runIn(pkt.Bytes())
		_, out := e.runOut(stripped)
		got := FindOption(parseTCP(t, out).opts)
		if len(got) != 1 {
			t.Fatalf("%d options", len(got))
		}
		mac, _ := OptionMAC(testKey, tcpTuple(pkt.Src, pkt.Dst), 1, in)
		want := in
		want.MAC = mac
		if got[0] != want {
			t.Fatalf("forwarded %+v, want %+v", got[0], want)
		}
	})
}

func TestSipHashVector(t *testing.T) {
	// The reference vector of the SipHash paper (appendix A).
	key := make([]byte, 16)
	msg := make([]byte, 15)
	for i := range key {
		key[i] = byte(i)
	}
	for i := range msg {
		msg[i] = byte(i)
	}
	if got := SipHash24(key, msg); got != 0xa129ca6149be45e5 {
		t.Fatalf("SipHash-2-4 = %#x", got)
	}
}

// A pod of this node that reached a pod of this node through another
// node's NodePort comes back with this node's own id: a remote record
// like any other.
func TestUplinkInHairpinOfOurOwnNode(t *testing.T) {
	withUplinkEnv(t, 9, testKey, func(e *uplinkEnv) {
		o := Option{Version: OptionVersion, ConnID: 5, Node: 9, Workload: 11}
		e.runIn(synWithOption(netip.MustParseAddrPort("192.168.50.12:40000"), podB, 3, o, testKey).Bytes())
		r := e.mustRecord(tcpTuple(netip.MustParseAddrPort("192.168.50.12:40000"), podB))
		if !r.IsRemote() || r.OriginNode != 9 || r.OriginWorkload != 11 {
			t.Fatalf("record %+v", r)
		}
	})
}

// An option list that ends early (EOL, or a length past its end) is where
// the receiver stops reading: nothing is appended after it.
func TestUplinkOutNotAfterTheEndOfTheList(t *testing.T) {
	withUplinkEnv(t, 7, nil, func(e *uplinkEnv) {
		a := e.addPod(11, podOpts{}, podA)
		pkt := testutil.Packet{Src: podA, Dst: remoteB, Proto: 6, TCPFlags: testutil.SYN, Seq: 9, TCPOptions: []byte{2, 4, 5, 0xb4, 0, 0, 0, 0}}
		e.from(a, pkt)
		ret, b := e.out(pkt)
		if ret != retNext || !bytes.Equal(b, pkt.Bytes()) {
			t.Fatalf("verdict %d, packet changed", ret)
		}
		if s := e.xstats(); s.OutListCut != 1 || s.OptAdded != 0 {
			t.Fatalf("counters %+v", s)
		}
	})
}

// The same origin connection's SYN again, even while the connection
// closes, is a retransmit or a replay: it never replaces the record.
func TestUplinkInReplayDoesNotReplace(t *testing.T) {
	withUplinkEnv(t, 9, testKey, func(e *uplinkEnv) {
		b := e.addPod(22, podOpts{}, podB)
		o := Option{Version: OptionVersion, ConnID: 77, Node: 7, Workload: 11}
		syn := synWithOption(remoteB, podB, 5, o, testKey)
		e.runIn(syn.Bytes())
		e.to(b, testutil.Packet{Src: remoteB, Dst: podB, Proto: 6, TCPFlags: testutil.SYN, Seq: 5, TCPOptions: testutil.LinuxSYNOptions})
		e.from(b, tcpFlags(podB, remoteB, testutil.FIN|testutil.ACK, 6))
		before := e.mustRecord(tcpTuple(remoteB, podB))
		if before.Flags&FlagFINReply == 0 {
			t.Fatalf("no FIN recorded: %+v", before)
		}
		e.runIn(syn.Bytes())
		after := e.mustRecord(tcpTuple(remoteB, podB))
		// (Wall times are converted per read: compare what the datapath wrote.)
		if after.Flags != before.Flags || after.PeerWorkload != before.PeerWorkload || after.FirstSeen.Sub(before.FirstSeen).Abs() > time.Millisecond {
			t.Fatalf("a replayed SYN changed the record: %+v -> %+v", before, after)
		}
		if s := e.xstats(); s.RemoteRetransmits != 1 || s.RemoteTagged != 1 {
			t.Fatalf("counters %+v", s)
		}
	})
}
