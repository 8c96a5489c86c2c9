package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// Across nodes: what the uplink programs cost per packet, and what a
// two-node cluster does end to end with and without pktmeta.

var (
	// remotePod is a pod on another node, inside the members below.
	remotePod    = netip.MustParseAddrPort("10.244.2.5:8080")
	benchMembers = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/48")}
	benchKey     = []byte("pktmeta-bench-k!")
)

// onePacketRuns is how many single-packet runs measure a program that
// changes the packet it is given.
const onePacketRuns = 3000

// once measures prog on one packet per test run (repeat 1: a repetition
// would see the packet the last one changed), each paired with a run of
// the floor on the same packet; gen makes run i's packet and state.
func (b *packetBench) once(name string, prog *ebpf.Program, runs int, gen func(i int) ([]byte, error), note string) (Result, error) {
	return b.paired(name, prog, retNext, 1, runs, gen, note)
}

func synWith(src, dst netip.AddrPort, opts []byte) []byte {
	o := append(append([]byte(nil), testutil.LinuxSYNOptions...), opts...)
	return testutil.Packet{Src: src, Dst: dst, Proto: 6, TCPFlags: 0x02, Seq: 1, TCPOptions: o}.Bytes()
}

// uplink measures the uplink programs: the segment every packet leaving or
// entering the node is (parse, leave), the leaving SYN that gets the
// option, and the arriving one that loses it and makes a remote record.
func (b *packetBench) uplink(rep *Report) error {
	if err := loadAnchorObjs(&b.a); err != nil {
		return err
	}
	defer b.a.Close()
	if err := b.loadDatapath("uplink"); err != nil {
		return err
	}
	if err := b.setEvents(false); err != nil {
		return err
	}
	ack := pkt(podA, remotePod, 6, 0x10)
	for _, it := range []struct {
		name string
		prog *ebpf.Program
	}{
		{"uplink out, not a SYN: tcp4 segment", b.d.UplinkOut},
		{"uplink in, not a SYN: tcp4 segment", b.d.UplinkIn},
	} {
		r, err := b.measure(it.name, it.prog, ack, retNext, b.cfg.repeat, "what every other packet through an uplink pays: the header parse")
		if err != nil {
			return err
		}
		rep.add(r)
	}
	port := uint16(10000)
	// Where a SYN's cost goes: the same program stopping earlier.
	if err := b.d.SetNode(datapath.NodeConfig{ID: 7, Members: benchMembers}); err != nil {
		return err
	}
	outside := netip.MustParseAddrPort("203.0.113.9:443")
	full := append(append([]byte(nil), testutil.LinuxSYNOptions...), 30, 18, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16)
	for _, step := range []struct {
		name, note string
		gen        func() []byte
	}{
		{"uplink out, leaving SYN: to outside the cluster (stops after the member lookup)", "parse, options read and scanned, member lookup (LPM trie)",
			func() []byte { port++; return synWith(netip.AddrPortFrom(podA.Addr(), port), outside, nil) }},
		{"uplink out, leaving SYN: no room (stops after the record lookup)", "the above, then the record lookup; the header has no 20 bytes left",
			func() []byte {
				port++
				o := testutil.Packet{Src: netip.AddrPortFrom(podA.Addr(), port), Dst: remotePod, Proto: 6, TCPFlags: 0x02, Seq: 1, TCPOptions: full}
				syn := o.Bytes()
				b.runs(b.d.Origin, syn, retNext, 1, 1)
				return syn
			}},
		{"uplink in, arriving SYN: from outside the cluster (stripped, not honoured)", "parse, options read and scanned, member lookup, option cut off; no record",
			func() []byte {
				port++
				o := datapath.Option{Version: datapath.OptionVersion, ConnID: 1, Node: 7, Workload: 11}
				return synWith(netip.AddrPortFrom(outside.Addr(), port), podB, o.Encode())
			}},
	} {
		prog := b.d.UplinkOut
		if strings.HasPrefix(step.name, "uplink in") {
			prog = b.d.UplinkIn
		}
		r, err := b.once(step.name, prog, onePacketRuns, func(int) ([]byte, error) { return step.gen(), nil }, step.note+"; one packet per run, paired with a floor run")
		if err != nil {
			return err
		}
		rep.add(r)
	}
	for _, mac := range []bool{false, true} {
		var key []byte
		label := "no MAC"
		if mac {
			key, label = benchKey, "MAC (SipHash-2-4)"
		}
		// Origin side: node 7, the pod's record made by the origin program.
		if err := b.d.SetNode(datapath.NodeConfig{ID: 7, Members: benchMembers, Key: key}); err != nil {
			return err
		}
		r, err := b.once("uplink out, leaving SYN: option added, "+label, b.d.UplinkOut, onePacketRuns, func(int) ([]byte, error) {
			port++
			syn := synWith(netip.AddrPortFrom(podA.Addr(), port), remotePod, nil)
			if _, err := b.runs(b.d.Origin, syn, retNext, 1, 1); err != nil {
				return nil, err
			}
			return syn, nil
		}, "a SYN with Linux's 20 bytes of options: record lookup, member lookup, option built, appended (bpf_skb_change_tail), checksums; one packet per run, paired with a floor run")
		if err != nil {
			return err
		}
		rep.add(r)
		// Destination side: node 9, an option from node 7.
		if err := b.d.SetNode(datapath.NodeConfig{ID: 9, Members: benchMembers, Key: key, MaxRemote: benchConns}); err != nil {
			return err
		}
		r, err = b.once("uplink in, arriving SYN: option verified, stripped, remote record, "+label, b.d.UplinkIn, onePacketRuns, func(int) ([]byte, error) {
			port++
			src := netip.AddrPortFrom(remotePod.Addr(), port)
			o := datapath.Option{Version: datapath.OptionVersion, ConnID: uint64(port), Node: 7, Workload: 11}
			if key != nil {
				var err error
				if o.MAC, err = datapath.OptionMAC(key, datapath.Tuple{Proto: datapath.ProtoTCP, Src: src, Dst: podB}, 1, o); err != nil {
					return nil, err
				}
			}
			return synWith(src, podB, o.Encode()), nil
		}, "option found, member lookup, MAC checked, option cut off (checksums, bpf_skb_change_tail), remote record inserted; one packet per run, paired with a floor run")
		if err != nil {
			return err
		}
		rep.add(r)
	}
	st, err := b.d.ReadRemoteStats()
	if err != nil {
		return err
	}
	if st.OptAdded != 2*onePacketRuns || st.RemoteTagged != 2*onePacketRuns {
		return fmt.Errorf("uplink bench did not take the path it names: %+v", st)
	}
	// The same-node first packet, measured the same way (one per run), so
	// the uplink figures have a neighbour measured alike.
	r, err := b.once("origin, first packet: tcp4 SYN, new record (one packet per run)", b.d.Origin, onePacketRuns, func(int) ([]byte, error) {
		port++
		return synWith(netip.AddrPortFrom(podA.Addr(), port), podB, nil), nil
	}, "the same-node first packet, measured like the uplink rows above")
	if err != nil {
		return err
	}
	rep.add(r)
	return nil
}

// crossNodeTraffic is a two-node cluster (native routing) with the client
// pod on node 1 and the server on node 2.
func newCrossNodeTraffic(ctx context.Context, name string, cniPath []string, pinRoot string, withPktmeta bool) (*trafficNode, error) {
	pins := map[int]string{}
	c, err := testbed.NewCluster(testbed.ClusterConfig{
		Node: testbed.Config{CNIPath: cniPath, NoDAD: true, PluginStderr: io.Discard},
		Chain: func(i int) []map[string]any {
			if !withPktmeta {
				return nil
			}
			pins[i] = filepath.Join(pinRoot, fmt.Sprintf("xnode%d", i))
			return []map[string]any{{"type": "pktmeta", "pinPath": pins[i], "tags": map[string]any{"bench": "cross-node"}}}
		},
	})
	if err != nil {
		return nil, err
	}
	t := &trafficNode{name: name, closers: []io.Closer{c}}
	fail := func(err error) (*trafficNode, error) {
		t.close()
		return nil, err
	}
	if withPktmeta {
		var members []netip.Prefix
		for _, n := range c.Nodes {
			members = append(members, netip.PrefixFrom(n.Addr4, 32), netip.PrefixFrom(n.Addr6, 128), n.PodCIDR4, n.PodCIDR6)
		}
		for _, n := range c.Nodes {
			err := n.Do(func() error {
				d, _, err := datapath.Open(datapath.Options{PinPath: pins[n.Index]})
				if err != nil {
					return err
				}
				defer d.Close()
				if err := d.SetNode(datapath.NodeConfig{ID: uint16(n.Index), Members: members, Key: benchKey}); err != nil {
					return err
				}
				_, err = d.AttachUplink(n.Uplink, attach.Auto)
				return err
			})
			if err != nil {
				return fail(fmt.Errorf("node %d: %w", n.Index, err))
			}
		}
	}
	if t.client, err = c.Nodes[0].AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "client"}); err != nil {
		return fail(err)
	}
	if t.server, err = c.Nodes[1].AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "server"}); err != nil {
		return fail(err)
	}
	if err := t.tuneClient(); err != nil {
		return fail(err)
	}
	if err := t.serve(); err != nil {
		return fail(err)
	}
	return t, nil
}

// crossNodeEndToEnd runs short connections and bulk across two nodes,
// with and without pktmeta, alternating which goes first.
func crossNodeEndToEnd(ctx context.Context, cfg config, rep *Report, pinRoot string) error {
	without, err := newCrossNodeTraffic(ctx, "without", cfg.cniPath, pinRoot, false)
	if err != nil {
		return err
	}
	defer without.close()
	with, err := newCrossNodeTraffic(ctx, "with", cfg.cniPath, pinRoot, true)
	if err != nil {
		return err
	}
	defer with.close()
	return compareTraffic(cfg, rep, without, with, "across two netns nodes", []workload{
		{"short TCP connections (connect, 32 B request/response, close; 4 threads)", "conn/s", func(n *trafficNode) (float64, error) { return n.shortConns(cfg.e2eDuration, 4) }},
		{"TCP bulk throughput (one stream)", "Gbit/s", func(n *trafficNode) (float64, error) { return n.bulk(cfg.e2eDuration) }},
	})
}
