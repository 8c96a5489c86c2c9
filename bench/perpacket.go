package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

const (
	nameFloor       = "floor: empty tcx program"
	nameDataMeta    = "anchor: XDP data_meta reserve+write 104 B"
	nameTaskStorage = "anchor: task local storage create+delete"
	// nameFirstNoCheck is the first packet without source validation.
	nameFirstNoCheck = "origin, first packet: tcp4 SYN, source check skipped (bench build)"
	// nameOverBudget is a first packet refused at the pod's budget.
	nameOverBudget = "origin, first packet over budget (refused): source checked"
	retNext        = 0xffffffff
	loIfindex      = 1
	// Big enough that the first-packet runs never fill the table.
	benchConns = 1 << 21
)

var (
	podA  = netip.MustParseAddrPort("10.244.1.2:40000")
	podB  = netip.MustParseAddrPort("10.244.1.3:8080")
	vip   = netip.MustParseAddrPort("10.96.0.10:80")
	podA6 = netip.MustParseAddrPort("[fd00:10:244:1::2]:40000")
	podB6 = netip.MustParseAddrPort("[fd00:10:244:1::3]:8080")
)

func pkt(src, dst netip.AddrPort, proto, flags uint8) []byte {
	return testutil.Packet{Src: src, Dst: dst, Proto: proto, TCPFlags: flags, Seq: 1}.Bytes()
}

// packetBench is the per-packet section's state: a datapath in a private
// bpffs, the anchors, all used from one thread inside a private netns
// (test runs use that netns's loopback, ifindex 1, and its conntrack).
type packetBench struct {
	cfg     config
	pinRoot string
	d       *datapath.Datapath
	a       anchorsObjects
	log     *slog.Logger
}

func (b *packetBench) loadDatapath(sub string) error {
	// The one endpoint (the test runs' loopback) is both ends: origin of
	// what it sends and destination of what it receives.
	return b.loadDatapathWith(sub, false, []netip.Addr{podA.Addr(), podA6.Addr(), podB.Addr(), podB6.Addr()})
}

// loadDatapathWith loads a fresh datapath; noSourceCheck loads the bench
// build that skips source validation, and addrs are the pod's own
// addresses, in the order its endpoint holds them.
func (b *packetBench) loadDatapathWith(sub string, noSourceCheck bool, addrs []netip.Addr) error {
	if b.d != nil {
		b.d.Close()
		datapath.Destroy(b.d.PinPath, b.log)
	}
	d, _, err := datapath.Open(datapath.Options{PinPath: filepath.Join(b.pinRoot, sub), MaxConnections: benchConns, Log: b.log, BenchNoSourceCheck: noSourceCheck})
	if err != nil {
		return err
	}
	b.d = d
	// The veth the test runs come in on (loopback) belongs to workload 1.
	// No budget and no event limit: the figures are the datapath's own
	// cost, not a pod's limits.
	return d.PutEndpoint(loIfindex, datapath.Endpoint{Workload: 1, Strict: false, Addrs: addrs, MaxConnections: 1 << 30})
}

func (b *packetBench) setEvents(on bool) error {
	c, err := b.d.ReadConfig()
	if err != nil {
		return err
	}
	c.EventsOff = !on
	return b.d.WriteConfig(c)
}

// runs measures prog on data: runs test runs of repeat repetitions each;
// the kernel reports the mean time of a repetition.
func (b *packetBench) runs(prog *ebpf.Program, data []byte, want uint32, repeat, runs int) ([]float64, error) {
	var out []float64
	for range runs {
		ret, d, err := prog.Benchmark(data, repeat, nil)
		if err != nil {
			return nil, err
		}
		if ret != want {
			return nil, fmt.Errorf("program returned %#x, want %#x", ret, want)
		}
		// The kernel reports the mean of the repetitions in whole ns.
		out = append(out, float64(d.Nanoseconds()))
	}
	return out, nil
}

// measure runs prog cfg.runs times, each run after a run of the floor
// program, and summarizes against the floor.
func (b *packetBench) measure(name string, prog *ebpf.Program, data []byte, want uint32, repeat int, note string) (Result, error) {
	return b.paired(name, prog, want, repeat, b.cfg.runs, func(int) ([]byte, error) { return data, nil }, note)
}

// paired makes runs test runs of prog, repeat repetitions each, every one
// after a run of the floor program on the same packet, and summarizes
// against the floor (the median of the paired differences). next prepares
// run i and returns its packet.
func (b *packetBench) paired(name string, prog *ebpf.Program, want uint32, repeat, runs int, next func(i int) ([]byte, error), note string) (Result, error) {
	var samples, over []float64
	for i := range runs {
		data, err := next(i)
		if err != nil {
			return Result{}, fmt.Errorf("%s: %w", name, err)
		}
		f, err := b.runs(b.a.FloorProg, data, retNext, repeat, 1)
		if err != nil {
			return Result{}, fmt.Errorf("floor: %w", err)
		}
		s, err := b.runs(prog, data, want, repeat, 1)
		if err != nil {
			return Result{}, fmt.Errorf("%s: %w", name, err)
		}
		samples = append(samples, s[0])
		over = append(over, s[0]-f[0])
	}
	r := summarize(name, "ns/pkt", "per-packet", samples)
	d := median(over)
	r.Baseline, r.Note, r.OverFloor = nameFloor, note, &d
	return r, nil
}

// firstPacket measures the origin program on packets that each start a new
// connection. The wrapper rewrites the tuple from a per-CPU counter before
// tail-calling the origin program, so every repetition inserts a genuinely
// new record; the same wrapper tail-calling the empty program is run
// alternately, and its time is subtracted (the floor is added back, so the
// figure compares with the floor like the others).
func (b *packetBench) firstPacket(wrapper *ebpf.Program, data []byte, repeat, runs int) (samples, over []float64, err error) {
	return b.wrapped(wrapper, b.a.Target, b.d.Origin, data, repeat, runs, nil)
}

// wrapped measures prog behind a wrapper that prepares every repetition
// and tail-calls target[0]: runs of the wrapper in front of prog,
// alternating with runs of the wrapper in front of the empty program,
// whose time is subtracted (the floor added back). check, if not nil, is
// called after every run in front of prog.
func (b *packetBench) wrapped(wrapper *ebpf.Program, target *ebpf.Map, prog *ebpf.Program, data []byte, repeat, runs int, check func() error) (samples, over []float64, err error) {
	for range runs {
		floor, err := b.runs(b.a.FloorProg, data, retNext, repeat, 1)
		if err != nil {
			return nil, nil, err
		}
		if err := target.Update(uint32(0), prog, ebpf.UpdateAny); err != nil {
			return nil, nil, err
		}
		with, err := b.runs(wrapper, data, retNext, repeat, 1)
		if err != nil {
			return nil, nil, fmt.Errorf("wrapper + program: %w", err)
		}
		if check != nil {
			if err := check(); err != nil {
				return nil, nil, err
			}
		}
		if err := target.Update(uint32(0), b.a.FloorProg, ebpf.UpdateAny); err != nil {
			return nil, nil, err
		}
		without, err := b.runs(wrapper, data, retNext, repeat, 1)
		if err != nil {
			return nil, nil, fmt.Errorf("wrapper + floor: %w", err)
		}
		samples = append(samples, with[0]-without[0]+floor[0])
		over = append(over, with[0]-without[0])
	}
	return samples, over, nil
}

// firstPacketResult runs firstPacket into a Result.
func (b *packetBench) firstPacketResult(name, section string, wrapper *ebpf.Program, data []byte, repeat, runs int) (Result, error) {
	s, over, err := b.firstPacket(wrapper, data, repeat, runs)
	if err != nil {
		return Result{}, fmt.Errorf("%s: %w", name, err)
	}
	r := summarize(name, "ns/pkt", section, s)
	d := median(over)
	r.OverFloor = &d
	return r, nil
}

// drainEvents empties the ring buffer.
func (b *packetBench) drainEvents() error {
	rd, err := b.d.NewEventReader()
	if err != nil {
		return err
	}
	defer rd.Close()
	for {
		rd.SetDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err := rd.Read(); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			return err
		}
	}
}

func (b *packetBench) run(ctx context.Context, rep *Report) error {
	if err := loadAnchorObjs(&b.a); err != nil {
		return err
	}
	defer b.a.Close()
	if err := b.loadDatapath("main"); err != nil {
		return err
	}
	defer func() { b.d.Close() }()
	repeat := b.cfg.repeat
	ack4, ack6 := pkt(podA, podB, 6, 0x10), pkt(podA6, podB6, 6, 0x10)
	syn4, syn6 := pkt(podA, podB, 6, 0x02), pkt(podA6, podB6, 6, 0x02)
	udp4, udp6 := pkt(podA, podB, 17, 0), pkt(podA6, podB6, 17, 0)

	type item struct {
		name   string
		prog   *ebpf.Program
		data   []byte
		want   uint32
		repeat int
		note   string
	}
	// A UDP flow nobody on the node opened (from off the node, untagged)
	// to the pod, as conntrack tracks it, and the pod's answer.
	offNode := netip.MustParseAddrPort("10.244.9.9:1111")
	udpIn, udpAnswer := pkt(offNode, podB, 17, 0), pkt(podB, offNode, 17, 0)
	if err := b.udpEntry(ctx, offNode, podB); err != nil {
		return err
	}
	if _, err := b.runs(b.d.Deliver, udpIn, retNext, 1, 1); err != nil {
		return err
	}
	// Known UDP flows, delivered records for the destination hit.
	for _, p := range [][]byte{udp4, udp6, syn4, udpAnswer} {
		if _, err := b.runs(b.d.Origin, p, retNext, 1, 1); err != nil {
			return err
		}
	}
	for _, p := range [][]byte{syn4, udp4} {
		if _, err := b.runs(b.d.Deliver, p, retNext, 1, 1); err != nil {
			return err
		}
	}
	// Service DNAT as conntrack knows it: a:p -> VIP:80 translated to b:8080.
	if err := b.natEntry(ctx); err != nil {
		return err
	}
	natSyn := pkt(netip.AddrPortFrom(podA.Addr(), 40001), podB, 6, 0x02)
	missSyn := pkt(netip.MustParseAddrPort("10.244.9.9:1111"), podB, 6, 0x02)

	items := []item{
		{name: nameFloor, prog: b.a.FloorProg, data: ack4, want: retNext, repeat: repeat},
		{name: "origin, not first: tcp4 established", prog: b.d.Origin, data: ack4, want: retNext, repeat: repeat},
		{name: "origin, not first: tcp6 established", prog: b.d.Origin, data: ack6, want: retNext, repeat: repeat},
		{name: "origin, not first: udp4 known flow", prog: b.d.Origin, data: udp4, want: retNext, repeat: repeat, note: "the per-CPU shortcut; the full path (one hash lookup) runs for a CPU's first datagram of the flow and once a second"},
		{name: "origin, not first: udp6 known flow", prog: b.d.Origin, data: udp6, want: retNext, repeat: repeat},
		{name: "origin strict, not first: tcp4", prog: b.d.Strict, data: ack4, want: retNext, repeat: repeat, note: "adds the endpoint lookup and source check"},
		{name: "destination, not first: udp4 delivered flow", prog: b.d.Deliver, data: udp4, want: retNext, repeat: repeat, note: "the per-CPU shortcut; the full path is one hash lookup"},
		{name: "destination, not first: udp4 flow nobody on the node opened", prog: b.d.Deliver, data: udpIn, want: retNext, repeat: repeat, note: "from off the node, untagged, tracked by conntrack: the per-CPU shortcut (release 7); the full path is three lookups, a conntrack lookup and the inbound table's"},
		{name: "origin, not first: udp4 answer to such a flow", prog: b.d.Origin, data: udpAnswer, want: retNext, repeat: repeat, note: "the pod answers it: the per-CPU shortcut (release 7); the full path is three lookups"},
		{name: "destination, first packet: record hit", prog: b.d.Deliver, data: syn4, want: retNext, repeat: repeat, note: "SYN of a known, delivered connection: one lookup"},
		{name: "destination, first packet: miss", prog: b.d.Deliver, data: missSyn, want: retNext, repeat: repeat, note: "no record: a lookup and a conntrack lookup that finds nothing"},
		{name: "destination, first packet: NAT resolved, already delivered (a retransmitted SYN)", prog: b.d.Deliver, data: natSyn, want: retNext, repeat: repeat, note: "lookup miss, conntrack lookup (reply direction), lookup of the original tuple, found delivered: the first repetition writes the alias and delivers the record, the others are retransmitted SYNs through the Service (the row \"" + nameNATFirst + "\" is the first delivery)"},
		{name: "anchor: skb->mark write", prog: b.a.MarkWrite, data: ack4, want: retNext, repeat: repeat},
		{name: nameDataMeta, prog: b.a.XdpMeta, data: ack4, want: 2, repeat: repeat, note: "XDP test run; adjust_meta(-104), write, adjust_meta(+104): the buffer is reused across repetitions"},
		{name: "anchor: socket local storage create+delete", prog: b.a.SkStorage, data: ack4, want: retNext, repeat: repeat / 10, note: "bpf_sk_storage_get(F_CREATE) on the test run's socket (allocates the storage and the element), then delete"},
		{name: nameTaskStorage, prog: b.a.TaskStorage, data: ack4, want: retNext, repeat: repeat / 10, note: "the same with task storage"},
		{name: "anchor: allocating hash insert+delete", prog: b.a.HashAlloc, data: ack4, want: retNext, repeat: repeat / 10, note: "BPF_F_NO_PREALLOC hash, fresh key, then delete"},
	}
	// Linux 6.1 allows at most 32 B of XDP metadata (xdp_metalen_invalid):
	// there the program aborts instead of reserving the record's 104 B.
	if ret, err := b.a.XdpMeta.Run(&ebpf.RunOptions{Data: ack4}); err == nil && ret != 2 {
		anchorsMissing[nameDataMeta] = "bpf_xdp_adjust_meta refuses 104 B on this kernel (Linux 6.1 allows 32 B of XDP metadata)"
	}
	for _, it := range items {
		if why, ok := anchorsMissing[it.name]; ok {
			fmt.Fprintf(os.Stderr, "bench: %s: not measured: %s\n", it.name, why)
			continue
		}
		r, err := b.measure(it.name, it.prog, it.data, it.want, it.repeat, it.note)
		if err != nil {
			return err
		}
		if it.name == nameFloor {
			r.Baseline = ""
		}
		rep.add(r)
	}
	// The NAT item really resolved through conntrack, not by accident.
	st, _ := b.d.ReadStats()
	if st.NATResolved == 0 {
		return errors.New("NAT benchmark did not resolve through conntrack")
	}
	// That item finds the record delivered from its second repetition
	// on: it measures a retransmitted SYN through the Service. The first
	// delivery itself, every repetition:
	if err := b.natFirst(rep, natSyn); err != nil {
		return err
	}

	// What source validation costs, without the noise of an insert: a SYN
	// from a pod at its budget of one record goes through the same checks
	// as any first packet and is refused before the insert. With and
	// without the check, and with the pod's own address last of 16.
	if err := b.sourceCheck(rep, syn4); err != nil {
		return err
	}

	// First packets. Events off: the ring buffer would fill within a few
	// thousand repetitions and every later reserve would fail fast.
	if err := b.setEvents(false); err != nil {
		return err
	}
	// The pod's own address last of 16: the longest source check.
	var sixteen []netip.Addr
	for i := range 15 {
		sixteen = append(sixteen, netip.AddrFrom4([4]byte{10, 244, 7, byte(i + 1)}))
	}
	sixteen = append(sixteen, podA.Addr())
	for i, f := range []struct {
		name    string
		wrapper *ebpf.Program
		data    []byte
		noCheck bool
		addrs   []netip.Addr
	}{
		{"origin, first packet: tcp4 SYN, new record", b.a.FreshV4, syn4, false, nil},
		{"origin, first packet: tcp6 SYN, new record", b.a.FreshV6, syn6, false, nil},
		{"origin, first packet: udp4, new record", b.a.FreshV4, udp4, false, nil},
		{nameFirstNoCheck, b.a.FreshV4, syn4, true, nil},
		{"origin, first packet: tcp4 SYN, the pod's 16th address", b.a.FreshV4, syn4, false, sixteen},
	} {
		// A fresh table each time: these runs insert hundreds of thousands
		// of records, and a full table would measure refused inserts
		// (growth does that on purpose).
		addrs := f.addrs
		if addrs == nil {
			addrs = []netip.Addr{podA.Addr(), podA6.Addr(), podB.Addr(), podB6.Addr()}
		}
		if err := b.loadDatapathWith(fmt.Sprintf("first%d", i), f.noCheck, addrs); err != nil {
			return err
		}
		if err := b.setEvents(false); err != nil {
			return err
		}
		r, err := b.firstPacketResult(f.name, "per-packet", f.wrapper, f.data, b.cfg.firstRepeat, b.cfg.runs)
		if err != nil {
			return err
		}
		r.Baseline = nameFloor
		r.Note = "each repetition a new tuple (wrapper rewrites source port and destination address, then tail-calls); wrapper cost subtracted; events off"
		if strings.Contains(f.name, "udp") {
			r.Note = "UDP: lookup miss, reverse lookup, conntrack lookup (no entry), insert; " + r.Note
		}
		if f.noCheck {
			r.Note = "the bench build without source validation, to show what the check costs; " + r.Note
		}
		if f.addrs != nil {
			r.Note = "source validation's worst case: the source is the last of the endpoint's 16 addresses; " + r.Note
		}
		rep.add(r)
	}
	// With events on, in runs short enough for the ring buffer (1000
	// events), drained between runs; each paired with a run of the same
	// length with events off, so the event's own cost shows. Both runs of
	// a pair follow a drain: the drain (a reader in this process) evicts
	// part of the caches the inserts use, and a pair where only one run
	// follows it charges that to the event (release 4's method did, and
	// reported +250 to +420 ns for an event whose ring write costs +30).
	var withEvents, overEvents, eventCost []float64
	for range b.cfg.runs * 3 {
		if err := b.setEvents(false); err != nil {
			return err
		}
		if err := b.drainEvents(); err != nil {
			return err
		}
		off, _, err := b.firstPacket(b.a.FreshV4, syn4, 1000, 1)
		if err != nil {
			return err
		}
		if err := b.setEvents(true); err != nil {
			return err
		}
		if err := b.drainEvents(); err != nil {
			return err
		}
		on, over, err := b.firstPacket(b.a.FreshV4, syn4, 1000, 1)
		if err != nil {
			return err
		}
		withEvents = append(withEvents, on...)
		overEvents = append(overEvents, over...)
		eventCost = append(eventCost, on[0]-off[0])
	}
	r := summarize("origin, first packet: tcp4 SYN, new record, event emitted", "ns/pkt", "per-packet", withEvents)
	d := median(overEvents)
	r.Baseline, r.OverFloor = nameFloor, &d
	r.Note = "as above, plus the OPENED event on the ring buffer (1000 repetitions a run, drained between runs)"
	rep.add(r)
	ev := summarize("the OPENED event alone", "ns/pkt", "per-packet", eventCost)
	ev.Note = "paired runs of 1000 first packets with events on and off; the difference"
	rep.add(ev)
	return b.ringWrites(rep, ack4)
}

// ringWrites measures the events ring's write alone, at the size of each
// event layout, away from the first packet's own noise: runs of 1000
// writes into an emptied 256 KiB ring, over the floor of the same length.
func (b *packetBench) ringWrites(rep *Report, data []byte) error {
	rd, err := ringbuf.NewReader(b.a.EventsRing)
	if err != nil {
		return fmt.Errorf("events ring reader: %w", err)
	}
	defer rd.Close()
	drain := func() error {
		for {
			rd.SetDeadline(time.Now())
			if _, err := rd.Read(); err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					return nil
				}
				return err
			}
		}
	}
	for _, w := range []struct {
		name string
		prog *ebpf.Program
		note string
	}{
		{"events ring write, 120 B (pktmeta_event: IPv6, or before release 5)", b.a.EventFull, "query, reserve, 120 B written, submit without wakeup; 1000 a run, the ring emptied between runs"},
		{"events ring write, 64 B (pktmeta_event_v4: IPv4, release 5)", b.a.EventV4, "the same with the compact IPv4 layout"},
	} {
		r, err := b.paired(w.name, w.prog, retNext, 1000, b.cfg.runs*3, func(int) ([]byte, error) { return data, drain() }, w.note)
		if err != nil {
			return err
		}
		rep.add(r)
	}
	return drain()
}

// sourceCheck measures a first packet refused over budget, with and
// without source validation: the difference is the check's cost.
func (b *packetBench) sourceCheck(rep *Report, syn4 []byte) error {
	var sixteen []netip.Addr
	for i := range 15 {
		sixteen = append(sixteen, netip.AddrFrom4([4]byte{10, 244, 7, byte(i + 1)}))
	}
	sixteen = append(sixteen, podA.Addr())
	own := []netip.Addr{podA.Addr(), podA6.Addr()}
	for i, v := range []struct {
		name    string
		noCheck bool
		addrs   []netip.Addr
	}{
		{nameOverBudget, false, own},
		{"origin, first packet over budget (refused): source check skipped (bench build)", true, own},
		{"origin, first packet over budget (refused): the pod's 16th address", false, sixteen},
	} {
		if err := b.loadDatapathWith(fmt.Sprintf("check%d", i), v.noCheck, v.addrs); err != nil {
			return err
		}
		if err := b.d.PutEndpoint(loIfindex, datapath.Endpoint{Workload: 1, Addrs: v.addrs, MaxConnections: 1}); err != nil {
			return err
		}
		// The first repetition takes the one record; every later one, a
		// new tuple from the wrapper, is refused at the budget after the
		// source check.
		r, err := b.firstPacketResult(v.name, "per-packet", b.a.FreshV4, syn4, b.cfg.firstRepeat, b.cfg.runs)
		if err != nil {
			return err
		}
		r.Note = "SYN of a pod at its budget, a new tuple each: endpoint lookup, source check, reverse lookup, table lookup, refused before the insert; wrapper cost subtracted"
		if v.noCheck {
			r.Note = "the bench build without source validation; " + r.Note
		}
		r.Baseline = nameFloor
		if v.name != nameOverBudget {
			r.Baseline = nameOverBudget
		}
		rep.add(r)
		if st, _ := b.d.ReadStats(); st.OverBudget == 0 {
			return fmt.Errorf("%s: nothing was refused over budget", v.name)
		}
	}
	return b.loadDatapath("main-again")
}

// udpEntry puts an untranslated UDP flow src -> dst into this netns's
// conntrack, as every flow that crossed the node's stack is.
func (b *packetBench) udpEntry(ctx context.Context, src, dst netip.AddrPort) error {
	out, err := exec.CommandContext(ctx, "conntrack", "-I", "-p", "udp", "-t", "3600",
		"-s", src.Addr().String(), "-d", dst.Addr().String(), "--sport", strconv.Itoa(int(src.Port())), "--dport", strconv.Itoa(int(dst.Port())),
		"-r", dst.Addr().String(), "-q", src.Addr().String(), "--reply-port-src", strconv.Itoa(int(dst.Port())), "--reply-port-dst", strconv.Itoa(int(src.Port()))).CombinedOutput()
	if err != nil {
		return fmt.Errorf("conntrack -I: %v: %s", err, out)
	}
	return nil
}

// nameNATFirst is the destination's first packet through Service DNAT,
// measured as it happens once per connection.
const nameNATFirst = "destination, first packet: NAT resolved for the first time (alias inserted, record delivered)"

// natFirst measures the destination's first packet of a connection that
// came through Service DNAT as it happens once per connection: the
// conntrack lookup, the alias insert, the record claimed and replaced with
// the peer fields. A wrapper (bench/bpf/natfirst.c) undoes the delivery
// before every repetition, and the same wrapper in front of the empty
// program is subtracted. Every run must resolve once per repetition.
// Events off, as for the origin's first packets.
func (b *packetBench) natFirst(rep *Report, natSyn []byte) error {
	spec, err := loadNatfirst()
	if err != nil {
		return fmt.Errorf("natfirst spec: %w", err)
	}
	tables := map[string]*ebpf.Map{"pktmeta_table": b.d.TableMap, "pktmeta_chunks": b.d.ChunksMap, "pktmeta_slots": b.d.SlotsMap, "pktmeta_aliases": b.d.AliasesMap}
	for name, m := range tables {
		// The header's placeholders take the datapath's own sizes.
		spec.Maps[name].MaxEntries, spec.Maps[name].Flags, spec.Maps[name].Pinning = m.MaxEntries(), m.Flags(), ebpf.PinNone
	}
	var objs natfirstObjects
	if err := spec.LoadAndAssign(&objs, &ebpf.CollectionOptions{MapReplacements: tables}); err != nil {
		return fmt.Errorf("load natfirst: %w", err)
	}
	defer objs.Close()
	origin := netip.AddrPortFrom(podA.Addr(), 40001)
	keys := natfirstNatFirstKeys{Origin: benchTuple(origin, vip, 6), Seen: benchTuple(origin, podB, 6)}
	if err := objs.NatKeys.Update(uint32(0), &keys, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("natfirst keys: %w", err)
	}
	if err := b.setEvents(false); err != nil {
		return fmt.Errorf("events off: %w", err)
	}
	repeat := b.cfg.firstRepeat
	resolved := func() (uint64, error) {
		st, err := b.d.ReadStats()
		if err != nil {
			return 0, fmt.Errorf("read the datapath's counters: %w", err)
		}
		return st.NATResolved, nil
	}
	before, err := resolved()
	if err != nil {
		return err
	}
	check := func() error {
		after, err := resolved()
		if err != nil {
			return err
		}
		// At least repeat: a test run a signal interrupts is run again
		// whole (EINTR), and every run resolves again.
		if after-before < uint64(repeat) {
			return fmt.Errorf("%s: %d of %d repetitions resolved through conntrack", nameNATFirst, after-before, repeat)
		}
		before = after
		return nil
	}
	s, over, err := b.wrapped(objs.NatFirst, objs.NatTarget, b.d.Deliver, natSyn, repeat, b.cfg.runs, check)
	if err != nil {
		return fmt.Errorf("%s: %w", nameNATFirst, err)
	}
	r := summarize(nameNATFirst, "ns/pkt", "per-packet", s)
	d := median(over)
	r.OverFloor, r.Baseline = &d, nameFloor
	r.Note = "lookup miss, conntrack lookup (reply direction), snapshot of the original record, alias insert, the record claimed (compare-and-swap) and replaced whole with the peer fields; a wrapper undoes the delivery before each repetition (its cost subtracted); events off; warm caches: one connection, resolved again and again"
	rep.add(r)
	// The rest of the per-packet section runs with events on again.
	if err := b.setEvents(true); err != nil {
		return fmt.Errorf("events on: %w", err)
	}
	return nil
}

// benchTuple is a table key (struct pktmeta_tuple): addresses as IPv6
// (IPv4-mapped), ports in network order.
func benchTuple(src, dst netip.AddrPort, proto uint8) natfirstPktmetaTuple {
	var t natfirstPktmetaTuple
	t.Saddr, t.Daddr = src.Addr().As16(), dst.Addr().As16()
	t.Sport = binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, src.Port()))
	t.Dport = binary.NativeEndian.Uint16(binary.BigEndian.AppendUint16(nil, dst.Port()))
	t.Proto = proto
	return t
}

// natEntry puts a Service DNAT entry into this netns's conntrack:
// original a:40001 -> VIP:80, reply b:8080 -> a:40001.
func (b *packetBench) natEntry(ctx context.Context) error {
	out, err := exec.CommandContext(ctx, "conntrack", "-I", "-p", "tcp", "-t", "3600", "--state", "ESTABLISHED", "-u", "SEEN_REPLY,ASSURED",
		"-s", podA.Addr().String(), "-d", vip.Addr().String(), "--sport", "40001", "--dport", "80",
		"-r", podB.Addr().String(), "-q", podA.Addr().String(), "--reply-port-src", "8080", "--reply-port-dst", "40001").CombinedOutput()
	if err != nil {
		return fmt.Errorf("conntrack -I: %v: %s", err, out)
	}
	// The origin record for that connection.
	_, err = b.runs(b.d.Origin, pkt(netip.AddrPortFrom(podA.Addr(), 40001), vip, 6, 0x02), retNext, 1, 1)
	return err
}

// growth repeats the headline per-packet figures with the connection table
// already holding n records.
func (b *packetBench) growth(rep *Report) error {
	if err := loadAnchorObjs(&b.a); err != nil {
		return err
	}
	defer b.a.Close()
	syn4, udp4 := pkt(podA, podB, 6, 0x02), pkt(podA, podB, 17, 0)
	for _, n := range b.cfg.growth {
		if err := b.loadDatapath(fmt.Sprintf("growth%d", n)); err != nil {
			return err
		}
		if err := b.setEvents(false); err != nil {
			return err
		}
		if err := prefill(b.d, n); err != nil {
			return err
		}
		for _, p := range [][]byte{udp4, syn4} {
			if _, err := b.runs(b.d.Origin, p, retNext, 1, 1); err != nil {
				return err
			}
		}
		b.runs(b.d.Deliver, syn4, retNext, 1, 1)
		label := countLabel(n)
		r, err := b.firstPacketResult("origin, first packet, tcp4, table holding "+label, "growth", b.a.FreshV4, syn4, b.cfg.firstRepeat, b.cfg.runs)
		if err != nil {
			return err
		}
		rep.add(r)
		for _, m := range []struct {
			name string
			prog *ebpf.Program
			data []byte
		}{
			{"origin, udp4 known flow, table holding " + label, b.d.Origin, udp4},
			{"destination hit, table holding " + label, b.d.Deliver, syn4},
		} {
			s, err := b.runs(m.prog, m.data, retNext, b.cfg.repeat, b.cfg.runs)
			if err != nil {
				return err
			}
			rep.add(summarize(m.name, "ns/pkt", "growth", s))
		}
	}
	// A full table: every insert is refused (the table is not LRU; nothing
	// live is evicted).
	if err := b.loadDatapath("full"); err != nil {
		return err
	}
	if err := b.setEvents(false); err != nil {
		return err
	}
	held, err := fillUp(b.d)
	if err != nil {
		return err
	}
	r, err := b.firstPacketResult("origin, first packet, tcp4, table full (insert refused)", "growth", b.a.FreshV4, syn4, b.cfg.firstRepeat, b.cfg.runs)
	if err != nil {
		return err
	}
	r.Baseline = "origin, first packet, tcp4, table holding " + countLabel(b.cfg.growth[0])
	r.Note = fmt.Sprintf("table made for %d records (%d slots) filled until %d inserts in a row were refused: it held %d", b.d.Capacity(), b.d.SlotsMap.MaxEntries(), fullRun, held)
	rep.add(r)

	// Baselines: every size compared with the smallest.
	small := countLabel(b.cfg.growth[0])
	for i := range rep.Results {
		res := &rep.Results[i]
		if res.Section != "growth" {
			continue
		}
		for _, prefix := range []string{"origin, first packet, tcp4, table holding ", "origin, udp4 known flow, table holding ", "destination hit, table holding "} {
			if strings.HasPrefix(res.Name, prefix) {
				res.Baseline = prefix + small
			}
		}
	}
	return nil
}

func countLabel(n int) string {
	switch {
	case n >= 1_000_000:
		return fmt.Sprintf("%dM", n/1_000_000)
	case n >= 1000:
		return fmt.Sprintf("%dk", n/1000)
	}
	return strconv.Itoa(n)
}

// prefill inserts n records under random tuples.
func prefill(d *datapath.Datapath, n int) error {
	for i := range n {
		if err := d.InsertRecord(randomTuple(), uint64(i+1)); err != nil {
			return fmt.Errorf("prefill: %w", err)
		}
	}
	return nil
}

// fullRun is how many inserts in a row fillUp needs refused before it
// calls the table full.
const fullRun = 1000

// fillUp inserts records under random tuples until fullRun inserts in a
// row are refused, and returns how many it made. The table has more slots
// than its capacity, and where it starts refusing depends on where tuples
// land: the first refusals come before the capacity is reached.
func fillUp(d *datapath.Datapath) (int, error) {
	made := 0
	for id, refused := uint64(1), 0; refused < fullRun; id++ {
		err := d.InsertRecord(randomTuple(), id)
		switch {
		case errors.Is(err, datapath.ErrTableFull):
			refused++
		case err != nil:
			return made, fmt.Errorf("fill up: %w", err)
		default:
			made++
			refused = 0
		}
	}
	return made, nil
}

// randomTuple is a TCP/IPv4 tuple with random addresses and ports.
func randomTuple() datapath.Tuple {
	var b [12]byte
	rand.Read(b[:])
	return datapath.Tuple{
		Proto: datapath.ProtoTCP,
		Src:   netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[0:4])), binary.NativeEndian.Uint16(b[8:])),
		Dst:   netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.NativeEndian.Uint16(b[10:])),
	}
}

// memory reports what the kernel accounts for the maps: the memlock line
// of each map's fdinfo, divided by its capacity (hash, LRU and array maps are
// preallocated: they cost that much empty or full).
func (b *packetBench) memory(rep *Report) error {
	for _, size := range []int{131072, benchConns} {
		d, _, err := datapath.Open(datapath.Options{PinPath: filepath.Join(b.pinRoot, fmt.Sprintf("mem%d", size)), MaxConnections: uint32(size), Log: b.log})
		if err != nil {
			return err
		}
		// The table: its three maps, per connection of the capacity it
		// was made for.
		var table int64
		for _, m := range []*ebpf.Map{d.TableMap, d.ChunksMap, d.SlotsMap} {
			memlock, err := fdinfoMemlock(m)
			if err != nil {
				d.Close()
				return err
			}
			table += memlock
		}
		per := float64(table) / float64(d.Capacity())
		rep.add(Result{Name: fmt.Sprintf("connection table bytes per connection (maxConnections %s)", countLabel(size)), Unit: "bytes", Median: per, Min: per, Max: per, Runs: 1, Section: "memory",
			Note: fmt.Sprintf("fdinfo memlock %d bytes of pktmeta_table, pktmeta_chunks and pktmeta_slots (%d slots) for %d connections", table, d.SlotsMap.MaxEntries(), d.Capacity())})
		memlock, err := fdinfoMemlock(d.AliasesMap)
		if err != nil {
			d.Close()
			return err
		}
		per = float64(memlock) / float64(d.AliasesMap.MaxEntries())
		rep.add(Result{Name: fmt.Sprintf("pktmeta_aliases bytes per entry (max_entries %s)", countLabel(size)), Unit: "bytes", Median: per, Min: per, Max: per, Runs: 1, Section: "memory",
			Note: fmt.Sprintf("fdinfo memlock %d bytes for %d entries", memlock, d.AliasesMap.MaxEntries())})
		d.Close()
		datapath.Destroy(filepath.Join(b.pinRoot, fmt.Sprintf("mem%d", size)), b.log)
	}
	return nil
}

func fdinfoMemlock(m *ebpf.Map) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/self/fdinfo/%d", m.FD()))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "memlock:"); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, errors.New("no memlock in fdinfo")
}

// anchorsMissing names the anchors this kernel cannot run, and why: their
// programs are loaded as stubs and not measured.
var anchorsMissing = map[string]string{}

func loadAnchorObjs(objs *anchorsObjects) error {
	spec, err := loadAnchors()
	if err != nil {
		return err
	}
	// bpf_task_storage_get from a TC program came in Linux 6.2.
	if err := features.HaveProgramHelper(ebpf.SchedCLS, asm.FnTaskStorageGet); errors.Is(err, ebpf.ErrNotSupported) {
		spec.Programs["task_storage"].Instructions = asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}
		anchorsMissing[nameTaskStorage] = "this kernel has no bpf_task_storage_get for TC programs (Linux 6.2)"
	}
	if err := spec.LoadAndAssign(objs, nil); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return fmt.Errorf("load anchors: %+v", ve)
		}
		return fmt.Errorf("load anchors: %w", err)
	}
	return nil
}
