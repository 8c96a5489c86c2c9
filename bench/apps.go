package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"syscall"
	"time"
	"unsafe"

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
// them once attached), and what an answer costs the application that
// asks. A real node (netns, the CNI chain with pktmeta, a connection from
// one pod to another); each run measures the calls without the program
// (detached: the kernel's static key is off again) and then with it, so
// the pairs share the machine's state.
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

	root, err := datapath.CgroupRoot()
	if err != nil {
		return err
	}
	d, err := datapath.OpenExisting(pin, nil)
	if err != nil {
		return err
	}
	defer d.Close()

	knownFD, unknownFD := fdOf(known), fdOf(unknown)
	cases := []getsockoptCase{
		{name: "SO_RCVBUF (4 bytes)", fd: knownFD, level: unix.SOL_SOCKET, opt: unix.SO_RCVBUF, size: 4},
		{name: "TCP_INFO (232 bytes)", fd: knownFD, level: unix.IPPROTO_TCP, opt: unix.TCP_INFO, size: 232},
		{name: "SOL_PKTMETA, answered (1952 bytes)", fd: knownFD, level: 0x706d, opt: 1, size: pktmeta.RawOriginSize, withProgOnly: true},
		{name: "SOL_PKTMETA, unknown connection (ENOENT)", fd: unknownFD, level: 0x706d, opt: 1, size: pktmeta.RawOriginSize, wantErr: unix.ENOENT, withProgOnly: true},
	}
	if !datapath.HaveSockoptErrno() {
		cases[3].wantErr = unix.EOPNOTSUPP
	}
	calls := 200_000
	if cfg.quick {
		calls = 50_000
	}
	without := make([][]float64, len(cases))
	with := make([][]float64, len(cases))
	for range cfg.runs {
		if err := d.DetachApps(); err != nil {
			return err
		}
		for i, c := range cases {
			if c.withProgOnly {
				continue
			}
			ns, err := getsockoptLoop(c, calls, 0)
			if err != nil {
				return err
			}
			without[i] = append(without[i], ns)
		}
		if err := d.AttachApps(root); err != nil {
			return err
		}
		for i, c := range cases {
			ns, err := getsockoptLoop(c, calls, c.wantErr)
			if err != nil {
				return err
			}
			with[i] = append(with[i], ns)
		}
	}
	if err := d.DetachApps(); err != nil {
		return err
	}
	for i, c := range cases {
		r := summarize("getsockopt "+c.name+", pktmeta's program on the cgroup root", "ns/call", "apps", with[i])
		if c.withProgOnly {
			r.Note = "what an application pays to ask its socket"
			rep.add(r)
			continue
		}
		base := summarize("getsockopt "+c.name+", no getsockopt program", "ns/call", "apps", without[i])
		r.Baseline = base.Name
		diffs := make([]float64, len(with[i]))
		for j := range with[i] {
			diffs[j] = with[i][j] - without[i][j]
		}
		over := median(diffs)
		r.OverFloor = &over
		r.Note = "what every other getsockopt on the node pays: paired difference in overFloorNs"
		rep.add(base, r)
	}
	return nil
}

func fdOf(c net.Conn) int {
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return -1
	}
	var fd int
	raw.Control(func(f uintptr) { fd = int(f) })
	return fd
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
