package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// spinCase runs one per-packet case over and over, so that a profiler
// (perf record -e cpu-clock -a -g, bpftool prog profile) can look at it.
func spinCase(ctx context.Context, cfg config, name string, d time.Duration) error {
	tmp, err := os.MkdirTemp("", "pktmeta-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	pinRoot := filepath.Join(tmp, "bpffs")
	os.MkdirAll(pinRoot, 0o700)
	if err := unix.Mount("bpf", pinRoot, "bpf", 0, "mode=0700"); err != nil {
		return err
	}
	defer unix.Unmount(pinRoot, unix.MNT_DETACH)
	return inPrivateNetns(func() error {
		b := &packetBench{cfg: cfg, pinRoot: pinRoot, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		if err := loadAnchorObjs(&b.a); err != nil {
			return err
		}
		defer b.a.Close()
		if err := b.loadDatapath("spin"); err != nil {
			return err
		}
		defer b.d.Close()
		b.setEvents(false)
		var prog *ebpf.Program
		var data []byte
		switch name {
		case "first-tcp4", "first-udp4":
			if err := b.a.Target.Update(uint32(0), b.d.Origin, ebpf.UpdateAny); err != nil {
				return err
			}
			prog = b.a.FreshV4
			data = pkt(podA, podB, 6, 0x02)
			if name == "first-udp4" {
				data = pkt(podA, podB, 17, 0)
			}
		case "known-udp4":
			prog, data = b.d.Origin, pkt(podA, podB, 17, 0)
		case "nat":
			if err := b.natEntry(ctx); err != nil {
				return err
			}
			prog = b.d.Deliver
			data = pkt(netip.AddrPortFrom(podA.Addr(), 40001), podB, 6, 0x02)
		default:
			return fmt.Errorf("unknown case %q", name)
		}
		deadline := time.Now().Add(d)
		n := 0
		for time.Now().Before(deadline) && ctx.Err() == nil {
			if _, _, err := prog.Benchmark(data, 100_000, nil); err != nil {
				return err
			}
			n++
		}
		fmt.Printf("ran %s: %d x 100k\n", name, n)
		return nil
	})
}
