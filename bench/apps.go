package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/pktmeta/pktmeta"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"golang.org/x/sys/unix"
)

// getsockoptCase is one getsockopt call, made calls times in a row on a
// socket of the server pod.
type getsockoptCase struct {
	name         string
	fd           int
	level, opt   int
	size         int
	wantErr      syscall.Errno
	withProgOnly bool // only meaningful with pktmeta's program attached
}

// apps measures the application interface: what pktmeta's getsockopt
// program costs every other getsockopt on the node (it runs for all of
// them once attached), split into what the kernel's hook costs with any
// program (an empty one) and what pktmeta's adds to that, and what an
// answer costs the application that asks. A real node (netns, the CNI
// chain with pktmeta, a connection from one pod to another); each run
// measures the calls with no program (the kernel's static key off), with
// the empty one and with pktmeta's, so the differences are paired.
func apps(ctx context.Context, cfg config, rep *Report, pinRoot string) error {
	pin := filepath.Join(pinRoot, "apps")
	chain := []map[string]any{{"type": "pktmeta", "pinPath": pin, "tags": map[string]any{"bench": "apps"}}}
	n, err := testbed.NewNode(testbed.Config{CNIPath: cfg.cniPath, NoDAD: true, Chain: chain, PluginStderr: io.Discard})
	if err != nil {
		return err
	}
	defer n.Close()
	client, err := n.AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "client"})
	if err != nil {
		return err
	}
	server, err := n.AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: "server"})
	if err != nil {
		return err
	}
	l, err := server.ListenTCP(echoPort)
	if err != nil {
		return err
	}
	defer l.Close()
	dst := netip.AddrPortFrom(server.IPv4, echoPort)
	fromPod, err := client.DialTCP(ctx, dst)
	if err != nil {
		return err
	}
	defer fromPod.Close()
	known, err := l.Accept()
	if err != nil {
		return err
	}
	defer known.Close()
	var fromNode net.Conn
	if err := n.Do(func() error {
		fromNode, err = net.DialTimeout("tcp", dst.String(), 5*time.Second)
		return err
	}); err != nil {
		return err
	}
	defer fromNode.Close()
	unknown, err := l.Accept()
	if err != nil {
		return err
	}
	defer unknown.Close()
	if o, err := pktmeta.Origin(known); err != nil || o.Pod != "client" {
		return fmt.Errorf("the server's socket does not answer: %+v %v", o, err)
	}
	// An unconnected UDP server bound to the wildcard that received a
	// datagram from the client pod: asked about that datagram's flow.
	udpSrv, err := server.ListenUDP(echoPort)
	if err != nil {
		return err
	}
	defer udpSrv.Close()
	udpCl, err := client.DialUDP(netip.AddrPortFrom(server.IPv4, echoPort))
	if err != nil {
		return err
	}
	defer udpCl.Close()
	// A datagram from the client, received: after every attach of the
	// recvmsg programs, since what a socket remembered from before an
	// attach is not answered about.
	receiveFromClient := func() error {
		if _, err := udpCl.Write([]byte("who")); err != nil {
			return err
		}
		udpSrv.SetReadDeadline(time.Now().Add(5 * time.Second))
		defer udpSrv.SetReadDeadline(time.Time{})
		_, _, err := udpSrv.ReadFromUDPAddrPort(make([]byte, 16))
		return err
	}
	if err := receiveFromClient(); err != nil {
		return err
	}
	udpAnswered := false
	if o, err := pktmeta.Origin(udpSrv); err == nil && o.Pod == "client" {
		udpAnswered = true
	} else if !errors.Is(err, pktmeta.ErrNotConnected) && !errors.Is(err, pktmeta.ErrNotAvailable) {
		return fmt.Errorf("the unconnected UDP socket: %+v %v", o, err)
	}
	// recvfrom on a socket of the server pod, from a sender in the same
	// pod over loopback (delivered within the send, so the receives do
	// not wait).
	// An IPv4 socket, so that the recvmsg4 hook is the one that runs
	// (a dual-stack socket's receives run recvmsg6).
	var loopRcv *net.UDPConn
	if err := server.Do(func() error {
		loopRcv, err = net.ListenUDP("udp4", &net.UDPAddr{Port: echoPort + 1})
		return err
	}); err != nil {
		return err
	}
	defer loopRcv.Close()
	loopSnd, err := server.DialUDP(netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), echoPort+1))
	if err != nil {
		return err
	}
	defer loopSnd.Close()
	loopRcvFD, loopSndFD := fdOf(loopRcv), fdOf(loopSnd)

	root, err := datapath.CgroupRoot()
	if err != nil {
		return err
	}
	d, err := datapath.OpenExisting(pin, nil)
	if err != nil {
		return err
	}
	defer d.Close()

	knownFD, unknownFD := fdOf(known.(syscall.Conn)), fdOf(unknown.(syscall.Conn))
	cases := []getsockoptCase{
		{name: "SO_RCVBUF (4 bytes)", fd: knownFD, level: unix.SOL_SOCKET, opt: unix.SO_RCVBUF, size: 4},
		{name: "TCP_INFO (232 bytes)", fd: knownFD, level: unix.IPPROTO_TCP, opt: unix.TCP_INFO, size: 232},
		{name: "SOL_PKTMETA, answered (1952 bytes)", fd: knownFD, level: 0x706d, opt: 1, size: pktmeta.RawOriginSize, withProgOnly: true},
		{name: "SOL_PKTMETA, unknown connection (ENOENT)", fd: unknownFD, level: 0x706d, opt: 1, size: pktmeta.RawOriginSize, wantErr: unix.ENOENT, withProgOnly: true},
	}
	if !datapath.HaveSockoptErrno() {
		cases[3].wantErr = unix.EOPNOTSUPP
	}
	if udpAnswered {
		cases = append(cases, getsockoptCase{name: "SOL_PKTMETA, unconnected UDP after recvfrom, answered (1952 bytes)", fd: fdOf(udpSrv), level: 0x706d, opt: 1, size: pktmeta.RawOriginSize, withProgOnly: true})
	}
	var anchors anchorsObjects
	if err := loadAnchorObjs(&anchors); err != nil {
		return err
	}
	defer anchors.Close()
	calls := 200_000
	if cfg.quick {
		calls = 50_000
	}
	// Three states per run, in this order: no getsockopt program on the
	// node, an empty one (the kernel's hook alone), pktmeta's.
	const (
		none = iota
		empty
		ours
	)
	samples := make([][3][]float64, len(cases))
	var recvSamples [3][]float64
	measure := func(state int) error {
		ns, err := recvfromLoop(loopSndFD, loopRcvFD, calls)
		if err != nil {
			return err
		}
		recvSamples[state] = append(recvSamples[state], ns)
		for i, c := range cases {
			if c.withProgOnly && state != ours {
				continue
			}
			want := syscall.Errno(0)
			if state == ours {
				want = c.wantErr
			}
			ns, err := getsockoptLoop(c, calls, want)
			if err != nil {
				return err
			}
			samples[i][state] = append(samples[i][state], ns)
		}
		return nil
	}
	for range cfg.runs {
		if err := d.DetachApps(); err != nil {
			return err
		}
		if err := measure(none); err != nil {
			return err
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: ebpf.AttachCGroupGetsockopt, Program: anchors.GetsockoptEmpty})
		if err != nil {
			return fmt.Errorf("attach the empty getsockopt program: %w", err)
		}
		lr, err := link.AttachCgroup(link.CgroupOptions{Path: root, Attach: ebpf.AttachCGroupUDP4Recvmsg, Program: anchors.Recvmsg4Empty})
		if err != nil {
			l.Close()
			return fmt.Errorf("attach the empty recvmsg4 program: %w", err)
		}
		err = measure(empty)
		l.Close()
		lr.Close()
		if err != nil {
			return err
		}
		if err := d.AttachApps(root, true); err != nil {
			return err
		}
		if err := receiveFromClient(); err != nil {
			return err
		}
		if err := measure(ours); err != nil {
			return err
		}
	}
	if err := d.DetachApps(); err != nil {
		return err
	}
	if d.Recvmsg4 != nil {
		base := summarize("recvfrom, unconnected UDP socket, 64-byte datagram, no recvmsg program", "ns/call", "apps", recvSamples[none])
		hook := summarize("recvfrom, unconnected UDP socket, 64-byte datagram, an empty recvmsg4 program", "ns/call", "apps", recvSamples[empty])
		r := summarize("recvfrom, unconnected UDP socket, 64-byte datagram, pktmeta's recvmsg4 program", "ns/call", "apps", recvSamples[ours])
		hook.Baseline, r.Baseline = base.Name, base.Name
		hookOver, ownOver := pairedDiff(recvSamples[empty], recvSamples[none]), pairedDiff(recvSamples[ours], recvSamples[empty])
		hook.OverFloor, r.OverFloor = &hookOver, &ownOver
		hook.Note = "the kernel's cgroup recvmsg4 hook with any program on it; over floor: paired difference to no program"
		r.Note = "over floor: paired difference to the empty program, what remembering the source costs (one socket-storage write)"
		rep.add(base, hook, r)
	}
	for i, c := range cases {
		r := summarize("getsockopt "+c.name+", pktmeta's program", "ns/call", "apps", samples[i][ours])
		if c.withProgOnly {
			r.Note = "what an application pays to ask its socket"
			rep.add(r)
			continue
		}
		base := summarize("getsockopt "+c.name+", no getsockopt program", "ns/call", "apps", samples[i][none])
		hook := summarize("getsockopt "+c.name+", an empty getsockopt program", "ns/call", "apps", samples[i][empty])
		hook.Baseline, r.Baseline = base.Name, base.Name
		hookOver, ownOver := pairedDiff(samples[i][empty], samples[i][none]), pairedDiff(samples[i][ours], samples[i][empty])
		hook.OverFloor, r.OverFloor = &hookOver, &ownOver
		hook.Note = "the kernel's cgroup getsockopt hook with any program on it; over floor: paired difference to no program"
		r.Note = "over floor: paired difference to the empty program, what pktmeta's own test costs"
		rep.add(base, hook, r)
	}
	return nil
}

// pairedDiff is the median of the runs' differences a[i] - b[i].
func pairedDiff(a, b []float64) float64 {
	d := make([]float64, len(a))
	for i := range a {
		d[i] = a[i] - b[i]
	}
	return median(d)
}

func fdOf(c syscall.Conn) int {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	var fd int
	raw.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// recvfromLoop sends calls 64-byte datagrams from snd to rcv, a batch at
// a time, and returns the mean time of one recvfrom (with the source
// address, as servers ask) at rcv.
func recvfromLoop(snd, rcv, calls int) (float64, error) {
	const batch = 64
	payload := make([]byte, 64)
	buf := make([]byte, 128)
	var spent time.Duration
	for done := 0; done < calls; done += batch {
		for range batch {
			if _, err := unix.Write(snd, payload); err != nil {
				return 0, fmt.Errorf("send: %w", err)
			}
		}
		start := time.Now()
		for i := 0; i < batch; {
			_, _, err := unix.Recvfrom(rcv, buf, 0)
			if errors.Is(err, unix.EAGAIN) {
				continue // Go's sockets are non-blocking; loopback has not delivered yet
			}
			if err != nil {
				return 0, fmt.Errorf("recvfrom: %w", err)
			}
			i++
		}
		spent += time.Since(start)
	}
	return float64(spent.Nanoseconds()) / float64(calls/batch*batch), nil
}

// getsockoptLoop makes calls getsockopts of c and returns the mean time
// of one.
func getsockoptLoop(c getsockoptCase, calls int, wantErr syscall.Errno) (float64, error) {
	buf := make([]byte, c.size)
	start := time.Now()
	for range calls {
		l := uint32(len(buf))
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(c.fd), uintptr(c.level), uintptr(c.opt),
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
		if errno != wantErr {
			return 0, fmt.Errorf("getsockopt %s: errno %d (%v), want %d", c.name, errno, errno, wantErr)
		}
	}
	return float64(time.Since(start).Nanoseconds()) / float64(calls), nil
}
