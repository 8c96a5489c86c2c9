package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/examples/origincount"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
)

// TestExampleConsumerReadsOriginInsideThePod: a third-party program on the
// receiving pod's own eth0 — the other side of the netns crossing, after
// DNAT — reads the right origin through pktmeta.h.
func TestExampleConsumerReadsOriginInsideThePod(t *testing.T) {
	requireConntrackKfuncs(t) // it counts connections through Services too
	tp := newTwoPods(t, envOptions{})
	c3 := tp.addPod("shop", "batch", nil)
	d := tp.open()
	wa, wc := tp.workloadOf(d, tp.a), tp.workloadOf(d, c3)

	counter, err := origincount.Load(tp.pin)
	if err != nil {
		t.Fatal(err)
	}
	defer counter.Close()
	var l io.Closer
	if err := tp.b.Do(func() error {
		ifc, err := net.InterfaceByName("eth0")
		if err != nil {
			return err
		}
		l, err = counter.Attach(ifc.Index)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	// a: direct TCP, TCP via the v4 Service, UDP via the v6 Service (many
	// packets, one connection); batch: one direct TCP connection.
	conns := []net.Conn{
		tp.dialTCP(tp.a, netip.AddrPortFrom(tp.b.IPv4, tcpPort)),
		tp.dialTCP(tp.a, netip.AddrPortFrom(vip4, 80)),
		tp.dialUDP(tp.a, netip.AddrPortFrom(vip6, 53)),
		tp.dialTCP(c3, netip.AddrPortFrom(tp.b.IPv6, tcpPort)),
	}
	for range 5 {
		if _, err := conns[2].Write([]byte("more")); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()

	eventually(t, "consumer counts", func() error {
		counts, err := counter.Counts()
		if err != nil {
			return err
		}
		if counts[wa.ID] != 3 || counts[wc.ID] != 1 || len(counts) != 2 {
			return &countsError{counts, wa.ID, wc.ID}
		}
		return nil
	})
	if n, _ := counter.Unknown(); n != 0 {
		t.Fatalf("consumer saw %d packets pktmeta knew nothing about", n)
	}
}

type countsError struct {
	got    map[uint32]uint64
	a, bat uint32
}

func (e *countsError) Error() string {
	b, _ := json.Marshal(e.got)
	return "counts " + string(b) + ", want 3 from frontend and 1 from batch"
}

// TestCLIConnsAndEvents: `pktmetactl conns -o json` and `events -o json`
// carry the documented fields.
func TestCLIConnsAndEvents(t *testing.T) {
	requireConntrackKfuncs(t) // it reads a Service connection's delivery
	tp := newTwoPods(t, envOptions{})

	// Follow events while making one connection through the Service.
	var evOut bytes.Buffer
	done := make(chan error, 1)
	cmd := exec.CommandContext(tp.ctx, filepath.Join(binDir, "pktmetactl"), "--pin-path", tp.pin, "--api-socket", "", "events", "-o", "json", "--count", "3", "--timeout", "10s")
	cmd.Stdout = &evOut
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	time.Sleep(300 * time.Millisecond) // the reader is attached

	dial := netip.AddrPortFrom(vip4, 80)
	conn := tp.dialTCP(tp.a, dial)
	origin := localTuple(conn, datapath.ProtoTCP, dial)

	var conns []view.Conn
	tp.ctlJSON(&conns, "conns")
	var found *view.Conn
	for i := range conns {
		if conns[i].Src == origin.Src.String() && conns[i].Dst == dial.String() {
			found = &conns[i]
		}
	}
	if found == nil {
		t.Fatalf("conns does not list %s: %+v", origin, conns)
	}
	if found.Proto != "tcp" || found.Origin.Namespace != "shop" || found.Origin.Pod != "frontend" || found.Origin.UID == "" ||
		found.Origin.ContainerID != tp.a.ContainerID || found.PodTags["app"] != "web" || found.Tags["app"] != "" || found.ConnID == 0 || !found.NAT ||
		found.Peer == nil || found.Peer.Pod != "db" || found.Seen == nil || found.Seen.Dst != netip.AddrPortFrom(tp.b.IPv4, tcpPort).String() {
		t.Fatalf("conns entry %+v", *found)
	}
	if _, err := time.Parse(time.RFC3339, found.FirstSeen); err != nil {
		t.Fatalf("firstSeen %q: %v", found.FirstSeen, err)
	}
	conn.Close()

	if err := <-done; err != nil {
		t.Fatalf("events: %v\n%s", err, evOut.String())
	}
	var kinds []string
	sc := bufio.NewScanner(&evOut)
	for sc.Scan() {
		var ev view.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("event line %q: %v", sc.Text(), err)
		}
		if ev.ConnID != found.ConnID || ev.Origin == nil || ev.Origin.Pod != "frontend" {
			t.Fatalf("event %+v", ev)
		}
		kinds = append(kinds, ev.Event)
	}
	if strings.Join(kinds, ",") != "opened,delivered,closed" {
		t.Fatalf("events %v, want opened, delivered, closed", kinds)
	}

	// Unknown tuples: exit status 1 and one line.
	out, code := tp.ctl("lookup", "--proto", "udp", "--src", "10.1.2.3:4", "--dst", "[fd00::1]:5")
	if code != 1 || strings.Count(strings.TrimSpace(out), "\n") != 0 || !strings.Contains(out, "no record") {
		t.Fatalf("lookup of an unknown tuple: exit %d, output %q", code, out)
	}
	if _, code := tp.ctl("lookup", "--proto", "sctp", "--src", "1.2.3.4:1", "--dst", "1.2.3.4:2"); code != 2 {
		t.Fatalf("bad --proto: exit %d, want 2", code)
	}

	// status from a network namespace other than the veths': it must say
	// so rather than report the hooks missing.
	st, err := exec.CommandContext(tp.ctx, filepath.Join(binDir, "pktmetactl"), "--pin-path", tp.pin, "--api-socket", "", "status").CombinedOutput()
	if err == nil || !strings.Contains(string(st), "network namespace") || strings.Contains(string(st), "hook missing") {
		t.Fatalf("status from the root netns (err %v):\n%s", err, st)
	}
}

// TestStrictSource: a pod that spoofs its source address is dropped at its
// veth; its own addresses pass and are tagged.
func TestStrictSource(t *testing.T) {
	tp := newTwoPods(t, envOptions{conf: map[string]any{"strictSource": true}})
	d := tp.open()
	conn := tp.dialTCP(tp.a, netip.AddrPortFrom(tp.b.IPv4, tcpPort))
	conn.Close()
	conn6 := tp.dialTCP(tp.a, netip.AddrPortFrom(tp.b.IPv6, tcpPort))
	conn6.Close()

	// Give pod a a second address that CNI did not assign, and send from it.
	spoof := netip.MustParseAddr("10.244.1.200")
	if _, err := tp.a.Run(tp.ctx, "ip", "addr", "add", spoof.String()+"/32", "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	before, _ := d.ReadStats()
	err := tp.a.Do(func() error {
		dialer := net.Dialer{LocalAddr: &net.TCPAddr{IP: spoof.AsSlice()}, Timeout: 500 * time.Millisecond}
		c, err := dialer.Dial("tcp", netip.AddrPortFrom(tp.b.IPv4, tcpPort).String())
		if err == nil {
			c.Close()
			return errAccepted
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	after, _ := d.ReadStats()
	if after.StrictDrops <= before.StrictDrops {
		t.Fatalf("strict drops %d -> %d", before.StrictDrops, after.StrictDrops)
	}
	recs, _ := d.Records()
	for _, r := range recs {
		if r.Tuple.Src.Addr() == spoof {
			t.Fatalf("spoofed connection tagged: %+v", r)
		}
	}
}

var errAccepted = &acceptedError{}

type acceptedError struct{}

func (*acceptedError) Error() string { return "a connection from a spoofed source got through" }
