// Command pktmeta-demo builds a throw-away node out of network namespaces,
// wires three pods into it with the real CNI chain (ptp + host-local, then
// pktmeta), opens TCP and UDP connections between them, directly and through
// nftables DNAT Services, and prints what the destination side finds in
// pktmeta's pinned BPF maps. Everything it shows about connections is read
// back from those maps; nothing is computed locally. It needs root, and
// removes everything it created when it ends, fails or is interrupted.
//
//	pktmeta-demo [--cni-path DIRS] [--pin-path DIR] [--keep]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

// The demo's topology.
var (
	vip4 = netip.MustParseAddr("10.96.0.10")
	vip6 = netip.MustParseAddr("fd00:10:96::10")
)

const (
	subnet6   = "fd00:10:244:1::/64"
	dbTCPPort = 5432
	dbUDPPort = 5353
	// closeWait bounds the wait for TCP records to go after close.
	closeWait = 3 * time.Second
	echoWait  = 5 * time.Second
)

type options struct {
	cniPath []string
	pinPath string // empty: a private bpffs mount in the temp dir
	keep    bool
}

func main() {
	exeDir := "."
	if exe, err := os.Executable(); err == nil {
		exeDir = filepath.Dir(exe)
	}
	cniPath := flag.String("cni-path", filepath.Join(exeDir, "cni")+string(os.PathListSeparator)+exeDir,
		"directories holding the CNI plugins (ptp, host-local) and pktmeta, separated by "+string(os.PathListSeparator))
	pinPath := flag.String("pin-path", "",
		"bpffs directory for pktmeta's pins; must not exist yet, removed at the end (default: <private bpffs mount in a temp dir>/pktmeta)")
	keep := flag.Bool("keep", false, "keep the node and its connections up until Ctrl-C, to inspect them with pktmetactl")
	verbose := flag.Bool("v", false, "debug logging on stderr")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "pktmeta-demo: unexpected argument %q\n", flag.Arg(0))
		flag.Usage()
		os.Exit(2)
	}
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelDebug
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))

	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "pktmeta-demo: must run as root: it creates network namespaces, mounts a bpffs,"+
			" loads BPF programs and runs CNI plugins (try: sudo "+strings.Join(os.Args, " ")+")")
		os.Exit(1)
	}

	var dirs []string
	for _, d := range filepath.SplitList(*cniPath) {
		if abs, err := filepath.Abs(d); err == nil {
			d = abs
		}
		dirs = append(dirs, d)
	}

	ctx, sig := withSignals()
	start := time.Now()
	err := run(ctx, sig, os.Stdout, options{cniPath: dirs, pinPath: *pinPath, keep: *keep})
	took := time.Since(start).Seconds()
	var ce cleanupError
	cleaned := "everything it created is removed"
	if errors.As(err, &ce) {
		cleaned = "cleanup reported errors, see below"
	}
	if ctx.Err() != nil {
		// Plugins killed by the same Ctrl-C fail in their own words:
		// report that as what was interrupted, not as a failure.
		fmt.Fprintf(os.Stderr, "\npktmeta-demo: %v after %.1fs; %s.\n", ctxErr(ctx), took, cleaned)
		if err != nil && !errors.Is(err, context.Cause(ctx)) {
			fmt.Fprintf(os.Stderr, "  what was in progress: %v\n", err)
		}
		os.Exit(130)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "\npktmeta-demo: FAILED after %.1fs (%s): %v\n", took, cleaned, err)
		os.Exit(1)
	}
	fmt.Printf("\nDone in %.1fs; everything the demo created is removed.\n", took)
}

// signals turns SIGINT and SIGTERM into a cancelled context, except while
// the demo is paused (--keep), when the first one resumes it. They stay
// caught until exit, so a second Ctrl-C cannot cut the cleanup short.
type signals struct {
	paused atomic.Bool
	resume chan struct{}
}

func withSignals() (context.Context, *signals) {
	ctx, cancel := context.WithCancelCause(context.Background())
	s := &signals{resume: make(chan struct{}, 1)}
	c := make(chan os.Signal, 1)
	signal.Notify(c, os.Interrupt, syscall.SIGTERM)
	go func() {
		for sig := range c {
			if s.paused.CompareAndSwap(true, false) {
				s.resume <- struct{}{}
				continue
			}
			if ctx.Err() != nil {
				fmt.Fprintln(os.Stderr, "pktmeta-demo: still cleaning up, please wait")
				continue
			}
			name := sig.String()
			if s, ok := sig.(syscall.Signal); ok {
				name = unix.SignalName(s)
			}
			fmt.Fprintf(os.Stderr, "\npktmeta-demo: %s: stopping and cleaning up\n", name)
			cancel(fmt.Errorf("interrupted (%s)", name))
		}
	}()
	return ctx, s
}

// pause blocks until a signal (or cancellation).
func (s *signals) pause(ctx context.Context) {
	s.paused.Store(true)
	defer s.paused.Store(false)
	select {
	case <-s.resume:
	case <-ctx.Done():
	}
}

// cleanupError marks errors of the cleanup, as opposed to the demo's own.
type cleanupError struct{ err error }

func (e cleanupError) Error() string { return "cleanup: " + e.err.Error() }
func (e cleanupError) Unwrap() error { return e.err }

// ctxErr is the reason ctx ended, for messages.
func ctxErr(ctx context.Context) error {
	if c := context.Cause(ctx); c != nil {
		return c
	}
	return ctx.Err()
}

// demo is the state of one run.
type demo struct {
	ctx  context.Context
	out  io.Writer
	pin  string
	ctl  string // pktmetactl binary
	node *testbed.Node
	d    *datapath.Datapath

	pods      []*testbed.Pod // in creation order
	workloads map[*testbed.Pod]datapath.Workload
	frontend  *testbed.Pod
	checkout  *testbed.Pod
	db        *testbed.Pod
	services  []testbed.Service
	srv       *server
	conns     []*conn
}

func run(ctx context.Context, sig *signals, out io.Writer, o options) (err error) {
	for _, p := range []string{"ptp", "host-local", "pktmeta"} {
		if _, err := invoke.FindInPath(p, o.cniPath); err != nil {
			return fmt.Errorf("CNI plugin %q not found in --cni-path %s (make build cni-plugins builds them)",
				p, strings.Join(o.cniPath, string(os.PathListSeparator)))
		}
	}
	ctl, err := findCtl(o.cniPath)
	if err != nil {
		return err
	}

	tmp, err := os.MkdirTemp("", "pktmeta-demo-")
	if err != nil {
		return fmt.Errorf("create temp dir: %w", err)
	}
	defer func() {
		if rerr := os.RemoveAll(tmp); rerr != nil {
			err = errors.Join(err, cleanupError{fmt.Errorf("remove temp dir: %w", rerr)})
		}
	}()
	pin, releasePin, err := preparePinPath(tmp, o.pinPath)
	if err != nil {
		return err
	}
	defer func() {
		if rerr := releasePin(); rerr != nil {
			err = errors.Join(err, cleanupError{rerr})
		}
	}()

	logFile := filepath.Join(tmp, "pktmeta.log")
	// Runs after the node is closed (its DELs log too), before tmp goes.
	defer func() {
		if err != nil && ctx.Err() == nil {
			dumpLog(logFile)
		}
	}()

	dm := &demo{ctx: ctx, out: out, pin: pin, ctl: ctl, workloads: map[*testbed.Pod]datapath.Workload{}}
	dm.header(o)

	dm.node, err = testbed.NewNode(testbed.Config{
		CNIPath: o.cniPath,
		Subnet6: subnet6,
		NoDAD:   true,
		Chain: []map[string]any{{
			"type":         "pktmeta",
			"pinPath":      pin,
			"tags":         map[string]string{"cluster": "demo"},
			"logFile":      logFile,
			"capabilities": map[string]bool{testbed.PodAnnotationsCapability: true},
		}},
	})
	if err != nil {
		return fmt.Errorf("build node: %w", err)
	}
	// Pods first (their DEL needs the pins), then sockets, namespaces, nft.
	defer func() {
		if cerr := dm.node.Close(); cerr != nil {
			err = errors.Join(err, cleanupError{cerr})
		}
	}()
	defer func() {
		if dm.srv != nil {
			dm.srv.Close()
		}
		if dm.d != nil {
			dm.d.Close()
		}
	}()

	if err := dm.buildPods(); err != nil {
		return err
	}
	if err := dm.openConns(); err != nil {
		return err
	}
	if err := dm.showConns(); err != nil {
		return err
	}
	if err := dm.showCounters(); err != nil {
		return err
	}
	if err := dm.showCLI(); err != nil {
		return err
	}
	if o.keep {
		dm.showKeep()
		sig.pause(ctx)
		if ctx.Err() == nil {
			fmt.Fprintln(out, "\nResuming: closing connections, deleting pods, cleaning up.")
		}
	}
	if ctx.Err() != nil {
		return ctxErr(ctx)
	}
	if err := dm.closeConns(); err != nil {
		return err
	}
	if err := dm.deletePods(); err != nil {
		return err
	}
	return dm.crossNode(o, tmp)
}

// findCtl looks for pktmetactl next to this binary, then on the CNI path,
// then on $PATH.
func findCtl(cniPath []string) (string, error) {
	var dirs []string
	if exe, err := os.Executable(); err == nil {
		dirs = append(dirs, filepath.Dir(exe))
	}
	dirs = append(dirs, cniPath...)
	if p, err := invoke.FindInPath("pktmetactl", dirs); err == nil {
		return p, nil
	}
	if p, err := exec.LookPath("pktmetactl"); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("pktmetactl not found next to pktmeta-demo, on --cni-path (%s) or on $PATH (go build -o bin/pktmetactl ./cmd/pktmetactl)",
		strings.Join(cniPath, string(os.PathListSeparator)))
}

// preparePinPath returns the pin path and how to get rid of it: by default a
// fresh bpffs instance mounted in tmp, so nothing touches the node's real
// /sys/fs/bpf; with --pin-path, a directory that must not exist yet (so the
// demo can neither mix with nor destroy a live datapath), removed at the end.
func preparePinPath(tmp, chosen string) (string, func() error, error) {
	if chosen != "" {
		chosen = filepath.Clean(chosen)
		if !filepath.IsAbs(chosen) {
			return "", nil, fmt.Errorf("--pin-path %s: want an absolute path", chosen)
		}
		if _, err := os.Lstat(chosen); err == nil {
			return "", nil, fmt.Errorf("--pin-path %s already exists; the demo only uses a pin path it can create and remove", chosen)
		}
		if err := datapath.CheckBPFFS(chosen); err != nil {
			return "", nil, fmt.Errorf("--pin-path: %w", err)
		}
		return chosen, func() error {
			if err := os.RemoveAll(chosen); err != nil {
				return fmt.Errorf("remove pin path: %w", err)
			}
			return nil
		}, nil
	}
	mnt := filepath.Join(tmp, "bpffs")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		return "", nil, fmt.Errorf("create bpffs mount point: %w", err)
	}
	if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
		return "", nil, fmt.Errorf("mount a private bpffs at %s: %w", mnt, err)
	}
	return filepath.Join(mnt, "pktmeta"), func() error {
		// Pins die with the mount; the kernel frees the programs and maps
		// once the last link and fd are gone.
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount bpffs %s: %w", mnt, err)
		}
		slog.Debug("bpffs unmounted", "path", mnt)
		return nil
	}, nil
}

// dumpLog copies the end of pktmeta's log to stderr after a failure.
func dumpLog(path string) {
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 40 {
		lines = lines[len(lines)-40:]
	}
	fmt.Fprintf(os.Stderr, "\n--- last lines of the pktmeta plugin log (%s) ---\n%s\n---\n", path, strings.Join(lines, "\n"))
}

// buildPods adds the pods and services and prints what was built.
func (dm *demo) buildPods() error {
	specs := []testbed.PodSpec{
		{Namespace: "shop", Name: "frontend", Annotations: map[string]string{"pktmeta.dev/app": "web"}},
		{Namespace: "shop", Name: "checkout", Annotations: map[string]string{"pktmeta.dev/app": "payments"}},
		{Namespace: "shop", Name: "db"},
	}
	for _, s := range specs {
		p, err := dm.node.AddPod(dm.ctx, s)
		if err != nil {
			return fmt.Errorf("CNI ADD of %s/%s: %w", s.Namespace, s.Name, err)
		}
		slog.Debug("pod added", "pod", podName(p), "ipv4", p.IPv4, "ipv6", p.IPv6, "hostVeth", p.HostVeth)
		dm.pods = append(dm.pods, p)
	}
	dm.frontend, dm.checkout, dm.db = dm.pods[0], dm.pods[1], dm.pods[2]

	d, err := datapath.OpenReader(dm.pin)
	if err != nil {
		return fmt.Errorf("open the datapath the plugin pinned at %s: %w", dm.pin, err)
	}
	dm.d = d
	for _, p := range dm.pods {
		w, ok, err := d.FindAttachment(datapath.AttachmentKey{ContainerID: p.ContainerID, IfName: p.IfName})
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("pktmeta bug: CNI ADD of %s/%s succeeded but its workload is not in the pinned workload table", p.Spec.Namespace, p.Spec.Name)
		}
		if w.HostIfName != p.HostVeth || w.HostIfindex != uint32(p.HostIfindex) {
			return fmt.Errorf("pktmeta bug: workload of %s/%s is on %s (ifindex %d), the pod's host veth is %s (ifindex %d)",
				p.Spec.Namespace, p.Spec.Name, w.HostIfName, w.HostIfindex, p.HostVeth, p.HostIfindex)
		}
		dm.workloads[p] = w
	}

	db := dm.db
	dm.services = []testbed.Service{
		{Proto: "tcp", VIP: netip.AddrPortFrom(vip4, dbTCPPort), Backend: netip.AddrPortFrom(db.IPv4, dbTCPPort)},
		{Proto: "udp", VIP: netip.AddrPortFrom(vip4, 53), Backend: netip.AddrPortFrom(db.IPv4, dbUDPPort)},
		{Proto: "tcp", VIP: netip.AddrPortFrom(vip6, dbTCPPort), Backend: netip.AddrPortFrom(db.IPv6, dbTCPPort)},
	}
	for _, s := range dm.services {
		if err := dm.node.AddService(s); err != nil {
			return fmt.Errorf("add service: %w", err)
		}
	}
	dm.srv, err = startServer(db, dbTCPPort, dbUDPPort)
	if err != nil {
		return err
	}
	dm.printBuilt()
	return nil
}

// conn is one client connection of the demo.
type conn struct {
	what   string // for people
	from   *testbed.Pod
	proto  uint8
	dial   netip.AddrPort // what the client connects to
	viaVIP bool

	c      net.Conn
	origin datapath.Tuple // the client socket's view
	seen   datapath.Tuple // db's socket's view
}

func (dm *demo) openConns() error {
	fe, co, db := dm.frontend, dm.checkout, dm.db
	dm.conns = []*conn{
		{what: "frontend -> db, direct", from: fe, proto: datapath.ProtoTCP, dial: netip.AddrPortFrom(db.IPv4, dbTCPPort)},
		{what: "frontend -> Service VIP", from: fe, proto: datapath.ProtoTCP, dial: dm.services[0].VIP, viaVIP: true},
		{what: "checkout -> Service VIP", from: co, proto: datapath.ProtoUDP, dial: dm.services[1].VIP, viaVIP: true},
		{what: "checkout -> Service VIP", from: co, proto: datapath.ProtoTCP, dial: dm.services[2].VIP, viaVIP: true},
		{what: "frontend -> db, direct", from: fe, proto: datapath.ProtoUDP, dial: netip.AddrPortFrom(db.IPv6, dbUDPPort)},
	}
	for _, c := range dm.conns {
		if err := c.open(dm.ctx, dm.srv); err != nil {
			return err
		}
	}
	return nil
}

func (c *conn) open(ctx context.Context, srv *server) error {
	var err error
	if c.proto == datapath.ProtoTCP {
		c.c, err = c.from.DialTCP(ctx, c.dial)
	} else {
		c.c, err = c.from.DialUDP(c.dial)
	}
	if err != nil {
		return fmt.Errorf("%s (%s): %w", c.what, datapath.ProtoName(c.proto), err)
	}
	payload := []byte("hello from " + c.from.Spec.Name)
	if err := testbed.EchoRoundTrip(c.c, payload, echoWait); err != nil {
		return fmt.Errorf("%s: no echo from db (is the node's network broken?): %w", c.what, err)
	}
	local, err := netip.ParseAddrPort(c.c.LocalAddr().String())
	if err != nil {
		return fmt.Errorf("client address %s: %w", c.c.LocalAddr(), err)
	}
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	c.origin = datapath.Tuple{Proto: c.proto, Src: local, Dst: c.dial}
	seen, ok := srv.seen(c.proto, local)
	if !ok {
		return fmt.Errorf("%s: db echoed but its sockets have no connection from %s", c.what, local)
	}
	c.seen = seen
	slog.Debug("connection open", "what", c.what, "origin", c.origin, "seen", seen)
	return nil
}

// closeConns closes the client sockets and waits for the datapath to drop
// the TCP records (both FINs seen).
func (dm *demo) closeConns() error {
	dm.section("Close the connections")
	for _, c := range dm.conns {
		c.c.Close()
	}
	fmt.Fprintf(dm.out, "  Closed %d client sockets; db closes its TCP ends on EOF. The datapath removes a TCP\n", len(dm.conns))
	fmt.Fprintf(dm.out, "  record (and its alias) when it has seen FIN both ways. Polling the maps for %s...\n", closeWait)

	start := time.Now()
	var left []datapath.Record
	var aliases []datapath.Alias
	for {
		var err error
		if left, err = dm.d.Records(); err != nil {
			return err
		}
		if aliases, err = dm.d.Aliases(); err != nil {
			return err
		}
		if countProto(left, datapath.ProtoTCP) == 0 || time.Since(start) > closeWait {
			break
		}
		select {
		case <-dm.ctx.Done():
			return ctxErr(dm.ctx)
		case <-time.After(20 * time.Millisecond):
		}
	}
	elapsed := time.Since(start).Round(time.Millisecond)
	st, err := dm.d.ReadStats()
	if err != nil {
		return err
	}
	cfg, err := dm.d.ReadConfig()
	if err != nil {
		return err
	}
	tcp, udp := countProto(left, datapath.ProtoTCP), countProto(left, datapath.ProtoUDP)
	fmt.Fprintf(dm.out, "  after %s: records left: %d (tcp %d, udp %d), aliases left: %d, counter closed: %d\n",
		elapsed, len(left), tcp, udp, len(aliases), st.Closed)
	for _, r := range left {
		fmt.Fprintf(dm.out, "    record  %s  conn %d\n", r.Tuple, r.ConnID)
	}
	for _, a := range aliases {
		fmt.Fprintf(dm.out, "    alias   %s  -> conn %d\n", a.Seen, a.ConnID)
	}
	if closes, err := dm.closeEvents(); err != nil {
		return err
	} else if len(closes) > 0 {
		fmt.Fprintf(dm.out, "  closed events in the ring buffer: %s\n", strings.Join(closes, ", "))
	}
	if udp > 0 {
		fmt.Fprintf(dm.out, "  UDP has no end of connection: its records stay until idle for %s (udpTimeout in\n", cfg.UDPTimeout)
		fmt.Fprintln(dm.out, "  pktmeta_cfg) and a new packet starts a new flow, or until their pod is deleted.")
	}
	if tcp > 0 {
		return fmt.Errorf("pktmeta failure: %d TCP record(s) still in the connection table %s after the connections were closed", tcp, closeWait)
	}
	return nil
}

// closeEvents drains the events ring buffer (nobody else reads it here)
// and returns its "closed" events as "conn <id> <reason>".
func (dm *demo) closeEvents() ([]string, error) {
	rd, err := dm.d.NewEventReader()
	if err != nil {
		return nil, err
	}
	defer rd.Close()
	var out []string
	rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
	for {
		ev, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read events: %w", err)
		}
		if ev.Type == datapath.EventClosed {
			out = append(out, fmt.Sprintf("conn %d %s", ev.ConnID, ev.ReasonName()))
		}
	}
}

func countProto(recs []datapath.Record, proto uint8) int {
	n := 0
	for _, r := range recs {
		if r.Tuple.Proto == proto {
			n++
		}
	}
	return n
}

// deletePods runs CNI DEL for every pod and shows that pktmeta's tables
// are empty afterwards.
func (dm *demo) deletePods() error {
	dm.section("Delete the pods (CNI DEL through libcni)")
	// Open sockets would keep db's namespace alive.
	dm.srv.Close()
	// Not cancelled by Ctrl-C: a DEL killed halfway helps nobody.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(dm.ctx), 30*time.Second)
	defer cancel()
	for _, p := range dm.pods {
		if err := dm.node.DelPod(ctx, p); err != nil {
			return fmt.Errorf("CNI DEL: %w", err)
		}
		fmt.Fprintf(dm.out, "  CNI DEL %s: ok\n", podName(p))
	}
	if dm.ctx.Err() != nil {
		return ctxErr(dm.ctx)
	}
	ws, err := dm.d.Workloads()
	if err != nil {
		return err
	}
	eps, err := dm.d.ListEndpoints()
	if err != nil {
		return err
	}
	recs, err := dm.d.Records()
	if err != nil {
		return err
	}
	aliases, err := dm.d.Aliases()
	if err != nil {
		return err
	}
	links, err := os.ReadDir(dm.d.LinksDir())
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("list pinned links: %w", err)
	}
	fmt.Fprintf(dm.out, "  Read back: workloads %d, endpoints %d, records %d, aliases %d, pinned link dirs %d\n",
		len(ws), len(eps), len(recs), len(aliases), len(links))
	if n := len(ws) + len(eps) + len(recs) + len(aliases) + len(links); n != 0 {
		return fmt.Errorf("pktmeta failure: CNI DEL of every pod left %d entries in the pinned state", n)
	}
	fmt.Fprintln(dm.out, "  The workload table is empty: nothing of the pods is left in pktmeta's pinned state.")
	return nil
}

// server is db's echo service. It remembers the tuple its sockets saw for
// every client, which is what the demo looks records up by.
type server struct {
	mu     sync.Mutex
	tuples map[string]datapath.Tuple // by proto and client address
	// What db's accepted TCP sockets said when asked who opened them
	// (getsockopt SOL_PKTMETA), by client address.
	asked   map[string]string
	closers []io.Closer
	closed  bool
	wg      sync.WaitGroup
}

func startServer(p *testbed.Pod, tcpPort, udpPort int) (*server, error) {
	s := &server{tuples: map[string]datapath.Tuple{}, asked: map[string]string{}}
	l, err := p.ListenTCP(tcpPort)
	if err != nil {
		return nil, err
	}
	u, err := p.ListenUDP(udpPort)
	if err != nil {
		l.Close()
		return nil, err
	}
	s.closers = append(s.closers, l, u)
	s.wg.Add(2)
	go s.serveTCP(l)
	go s.serveUDP(u, p)
	return s, nil
}

func seenKey(proto uint8, client netip.AddrPort) string {
	return datapath.ProtoName(proto) + " " + client.String()
}

func (s *server) seen(proto uint8, client netip.AddrPort) (datapath.Tuple, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.tuples[seenKey(proto, client)]
	return t, ok
}

// answer is what db's socket said of the TCP connection from client.
func (s *server) answer(client netip.AddrPort) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.asked[client.String()]
}

func (s *server) record(t datapath.Tuple, c io.Closer) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.tuples[seenKey(t.Proto, t.Src)] = t
	if c != nil {
		s.closers = append(s.closers, c)
	}
	return true
}

func unmapped(a net.Addr) netip.AddrPort {
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func (s *server) serveTCP(l net.Listener) {
	defer s.wg.Done()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		// The accepted socket's own addresses: the tuple after DNAT.
		t := datapath.Tuple{Proto: datapath.ProtoTCP, Src: unmapped(c.RemoteAddr()), Dst: unmapped(c.LocalAddr())}
		// And what an application gets from asking the socket itself.
		answer := ""
		if o, err := pktmeta.Origin(c); err != nil {
			answer = "error: " + err.Error()
		} else {
			answer = o.Namespace + "/" + o.Pod
		}
		s.mu.Lock()
		s.asked[t.Src.String()] = answer
		s.mu.Unlock()
		if !s.record(t, c) {
			c.Close()
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			_, _ = io.Copy(c, c)
			c.Close() // our FIN, once the client sent its own
		}()
	}
}

func (s *server) serveUDP(u *net.UDPConn, p *testbed.Pod) {
	defer s.wg.Done()
	buf := make([]byte, 64<<10)
	port := uint16(unmapped(u.LocalAddr()).Port())
	for {
		n, from, err := u.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		// The socket is bound to the wildcard, so the kernel gives the
		// source only; the destination is db's address of that family.
		src := netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		dst := netip.AddrPortFrom(p.IPv6, port)
		if src.Addr().Is4() {
			dst = netip.AddrPortFrom(p.IPv4, port)
		}
		if !s.record(datapath.Tuple{Proto: datapath.ProtoUDP, Src: src, Dst: dst}, nil) {
			return
		}
		_, _ = u.WriteToUDPAddrPort(buf[:n], from)
	}
}

// Close closes the listeners and every accepted connection, and waits.
func (s *server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	closers := s.closers
	s.mu.Unlock()
	for _, c := range closers {
		c.Close()
	}
	s.wg.Wait()
}
