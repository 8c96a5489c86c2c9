package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/vishvananda/netns"
)

// trafficNode is a netns node with a client and a server pod, with or
// without pktmeta in its chain.
type trafficNode struct {
	name           string
	client, server *testbed.Pod
	closers        []io.Closer // the node or cluster last
	udpReceived    atomic.Uint64
	bulkReceived   atomic.Uint64
}

const (
	echoPort = 8080
	sinkPort = 8090
	udpPort  = 8081
)

func newTrafficNode(ctx context.Context, name string, cniPath []string, chain []map[string]any) (*trafficNode, error) {
	n, err := testbed.NewNode(testbed.Config{CNIPath: cniPath, NoDAD: true, Chain: chain, PluginStderr: io.Discard})
	if err != nil {
		return nil, err
	}
	t := &trafficNode{name: name, closers: []io.Closer{n}}
	if t.client, err = n.AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "client"}); err != nil {
		t.close()
		return nil, err
	}
	if t.server, err = n.AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "server"}); err != nil {
		t.close()
		return nil, err
	}
	if err := t.tuneClient(); err != nil {
		t.close()
		return nil, err
	}
	if err := t.serve(); err != nil {
		t.close()
		return nil, err
	}
	return t, nil
}

// tuneClient lets the client pod, which recycles ports fast in short
// connections, reuse TIME_WAIT tuples (timestamps make it safe) from a
// wide range.
func (t *trafficNode) tuneClient() error {
	if err := t.client.Do(func() error {
		if err := os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1"), 0o644); err != nil {
			return err
		}
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("10000 65000"), 0o644)
	}); err != nil {
		return fmt.Errorf("client sysctls: %w", err)
	}
	return nil
}

// close closes the servers, then the node or cluster (added first).
func (t *trafficNode) close() {
	for i := len(t.closers) - 1; i >= 0; i-- {
		t.closers[i].Close()
	}
}

// serve starts an echo server, a TCP sink and a UDP counter in the server pod.
func (t *trafficNode) serve() error {
	l, err := t.server.ListenTCP(echoPort)
	if err != nil {
		return err
	}
	t.closers = append(t.closers, testbed.ServeTCPEcho(l))
	sink, err := t.server.ListenTCP(sinkPort)
	if err != nil {
		return err
	}
	t.closers = append(t.closers, sink)
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 256<<10)
				for {
					n, err := c.Read(buf)
					t.bulkReceived.Add(uint64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	u, err := t.server.ListenUDP(udpPort)
	if err != nil {
		return err
	}
	u.SetReadBuffer(4 << 20)
	t.closers = append(t.closers, u)
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := u.ReadFromUDP(buf); err != nil {
				return
			}
			t.udpReceived.Add(1)
		}
	}()
	return nil
}

// inPod runs fn on a goroutine whose thread is in the pod's netns for the
// whole call, so that every socket fn makes is the pod's.
func inPod(p *testbed.Pod, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread stays locked and is discarded when the goroutine
		// ends: it never goes back to the pool in the pod's namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromPath(p.NetnsPath)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// shortConns counts connect + one 32-byte round trip + close, from
// `workers` client threads, for d.
func (t *trafficNode) shortConns(d time.Duration, workers int) (float64, error) {
	dst := netip.AddrPortFrom(t.server.IPv4, echoPort).String()
	var count atomic.Uint64
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- inPod(t.client, func() error {
				msg, buf := make([]byte, 32), make([]byte, 32)
				for time.Now().Before(deadline) {
					c, err := net.Dial("tcp", dst)
					if err != nil {
						return err
					}
					if _, err := c.Write(msg); err != nil {
						c.Close()
						return err
					}
					if _, err := io.ReadFull(c, buf); err != nil {
						c.Close()
						return err
					}
					c.Close()
					count.Add(1)
				}
				return nil
			})
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return 0, err
		}
	}
	return float64(count.Load()) / d.Seconds(), nil
}

// bulk measures one TCP stream's throughput, in Gbit/s as received.
func (t *trafficNode) bulk(d time.Duration) (float64, error) {
	dst := netip.AddrPortFrom(t.server.IPv4, sinkPort).String()
	var c net.Conn
	if err := inPod(t.client, func() error {
		var err error
		c, err = net.Dial("tcp", dst)
		return err
	}); err != nil {
		return 0, err
	}
	defer c.Close()
	buf := make([]byte, 128<<10)
	// Warm up the connection before counting.
	c.Write(buf)
	time.Sleep(50 * time.Millisecond)
	start := t.bulkReceived.Load()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := c.Write(buf); err != nil {
			return 0, err
		}
	}
	got := t.bulkReceived.Load() - start
	return float64(got) * 8 / d.Seconds() / 1e9, nil
}

// udpRate sends 64-byte datagrams as fast as one thread can for d and
// returns what the server received per second.
func (t *trafficNode) udpRate(d time.Duration) (float64, error) {
	dst := netip.AddrPortFrom(t.server.IPv4, udpPort)
	var c *net.UDPConn
	if err := inPod(t.client, func() error {
		var err error
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		return 0, err
	}
	defer c.Close()
	msg := make([]byte, 64)
	start := t.udpReceived.Load()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := c.Write(msg); err != nil && !errors.Is(err, syscallENOBUFS) {
			return 0, err
		}
	}
	time.Sleep(20 * time.Millisecond) // let the last ones land
	return float64(t.udpReceived.Load()-start) / d.Seconds(), nil
}

// A sender outrunning the veth queue gets ENOBUFS; that is a drop, not a failure.
var syscallENOBUFS = syscall.ENOBUFS

// endToEnd measures the same workloads on a node without and with pktmeta,
// alternating which goes first.
func endToEnd(ctx context.Context, cfg config, rep *Report, pinRoot string) error {
	pktmeta := map[string]any{"type": "pktmeta", "pinPath": filepath.Join(pinRoot, "e2e"), "tags": map[string]any{"bench": "e2e"}}
	without, err := newTrafficNode(ctx, "without", cfg.cniPath, nil)
	if err != nil {
		return err
	}
	defer without.close()
	with, err := newTrafficNode(ctx, "with", cfg.cniPath, []map[string]any{pktmeta})
	if err != nil {
		return err
	}
	defer with.close()

	return compareTraffic(cfg, rep, without, with, "", []workload{
		{"short TCP connections (connect, 32 B request/response, close; 4 threads)", "conn/s", func(n *trafficNode) (float64, error) { return n.shortConns(cfg.e2eDuration, 4) }},
		{"TCP bulk throughput (one stream)", "Gbit/s", func(n *trafficNode) (float64, error) { return n.bulk(cfg.e2eDuration) }},
		{"UDP 64-byte packets received (one sender)", "pkt/s", func(n *trafficNode) (float64, error) { return n.udpRate(cfg.e2eDuration) }},
	})
}

// workload is one traffic pattern, measured on a trafficNode.
type workload struct {
	name, unit string
	run        func(*trafficNode) (float64, error)
}

// compareTraffic runs each workload cfg.e2eRuns times on both, alternating
// which goes first. label, if any, goes into the result names.
func compareTraffic(cfg config, rep *Report, without, with *trafficNode, label string, workloads []workload) error {
	if label != "" {
		label = ", " + label
	}
	for _, w := range workloads {
		samples := map[string][]float64{}
		for i := range cfg.e2eRuns {
			order := []*trafficNode{without, with}
			if i%2 == 1 {
				order = []*trafficNode{with, without}
			}
			for _, n := range order {
				v, err := w.run(n)
				if err != nil {
					return fmt.Errorf("%s%s on the node %s pktmeta: %w", w.name, label, n.name, err)
				}
				samples[n.name] = append(samples[n.name], v)
			}
		}
		base := summarize(w.name+label+", chain without pktmeta", w.unit, "end-to-end", samples["without"])
		r := summarize(w.name+label+", chain with pktmeta", w.unit, "end-to-end", samples["with"])
		r.Baseline = base.Name
		rep.add(base, r)
	}
	return nil
}
