// Command bench measures what pktmeta costs, next to what it is compared
// with, in one run on one machine: per packet (BPF_PROG_TEST_RUN), as the
// connection table grows, in memory, end to end between two pods, and in
// CNI ADD/DEL latency. `make bench` runs it; `make bench-quick` runs a
// reduced version. It writes tables to stdout and the figures as JSON.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

type config struct {
	quick       bool
	runs        int
	repeat      int // repetitions of a test run
	firstRepeat int // repetitions of a first-packet test run (each inserts a record)
	growth      []int
	e2eRuns     int
	e2eDuration time.Duration
	cniPods     int
	cniPath     []string
	sections    map[string]bool
	emulated    string // how the machine is emulated; "" on real hardware
}

func main() {
	quick := flag.Bool("quick", false, "reduced runs, for a quick check (under two minutes)")
	out := flag.String("out", "bench/results/latest.json", "where the JSON results go")
	cniPath := flag.String("cni-path", "bin/cni:bin", "directories of the CNI plugins and pktmeta")
	only := flag.String("only", "per-packet,growth,memory,tables,access,end-to-end,cross-node,apps,cni", "sections to run")
	spin := flag.String("spin", "", "for profiling: run one per-packet case (first-tcp4, first-udp4, known-udp4, nat) for --spin-for, nothing else")
	spinFor := flag.Duration("spin-for", 10*time.Second, "how long --spin runs")
	emulated := flag.String("emulated", "", "the machine is emulated (say how, e.g. \"qemu TCG\"): per packet only, reduced runs, figures as ratios to the floor only")
	flag.Parse()
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "bench: needs root (BPF, bpffs, network namespaces)")
		os.Exit(2)
	}
	cfg := config{runs: 7, repeat: 1_000_000, firstRepeat: 100_000, growth: []int{1_000, 100_000, 1_000_000},
		e2eRuns: 10, e2eDuration: 3 * time.Second, cniPods: 200, sections: map[string]bool{}}
	if *quick {
		cfg = config{quick: true, runs: 3, repeat: 200_000, firstRepeat: 20_000, growth: []int{1_000, 100_000},
			e2eRuns: 2, e2eDuration: time.Second, cniPods: 48, sections: map[string]bool{}}
	}
	if *emulated != "" {
		// Under emulation a nanosecond means nothing; what one program
		// costs next to another, measured in the same run, still does.
		cfg.quick, cfg.runs, cfg.repeat, cfg.firstRepeat = true, 3, 100_000, 10_000
		*only = "per-packet"
	}
	for _, p := range strings.Split(*cniPath, ":") {
		abs, _ := filepath.Abs(p)
		cfg.cniPath = append(cfg.cniPath, abs)
	}
	for _, s := range strings.Split(*only, ",") {
		cfg.sections[s] = true
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *spin != "" {
		if err := spinCase(ctx, cfg, *spin, *spinFor); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	cfg.emulated = *emulated
	if err := run(ctx, cfg, *out); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, out string) error {
	testbed.CleanupStale()
	rep := &Report{Machine: thisMachine(), Mode: "full", Started: time.Now().UTC()}
	if cfg.quick {
		rep.Mode = "quick"
	}
	if cfg.emulated != "" {
		rep.Mode = "emulated (" + cfg.emulated + "): ratios to the floor only"
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))

	// A private bpffs: nothing here touches a real /sys/fs/bpf/pktmeta.
	tmp, err := os.MkdirTemp("", "pktmeta-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	pinRoot := filepath.Join(tmp, "bpffs")
	os.MkdirAll(pinRoot, 0o700)
	if err := unix.Mount("bpf", pinRoot, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	defer unix.Unmount(pinRoot, unix.MNT_DETACH)

	if cfg.sections["per-packet"] || cfg.sections["growth"] || cfg.sections["memory"] || cfg.sections["cross-node"] {
		fmt.Fprintln(os.Stderr, "bench: per packet (BPF_PROG_TEST_RUN) ...")
		if err := inPrivateNetns(func() error {
			b := &packetBench{cfg: cfg, pinRoot: pinRoot, log: log}
			if cfg.sections["per-packet"] {
				if err := b.run(ctx, rep); err != nil {
					return err
				}
			}
			if cfg.sections["cross-node"] {
				fmt.Fprintln(os.Stderr, "bench: uplink programs (across nodes) ...")
				if err := b.uplink(rep); err != nil {
					return fmt.Errorf("uplink: %w", err)
				}
			}
			if cfg.sections["growth"] {
				fmt.Fprintln(os.Stderr, "bench: growth ...")
				if err := b.growth(rep); err != nil {
					return err
				}
				b.d.Close()
			}
			if cfg.sections["memory"] {
				if err := b.memory(rep); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return err
		}
	}
	if cfg.sections["tables"] && cfg.emulated == "" {
		fmt.Fprintln(os.Stderr, "bench: table layouts for a first packet (design study) ...")
		if err := tableStudy(cfg, rep); err != nil {
			return err
		}
	}
	if cfg.sections["access"] && cfg.emulated == "" {
		fmt.Fprintln(os.Stderr, "bench: what a cold memory access costs, in the table's shapes ...")
		if err := coldAccess(cfg, rep); err != nil {
			return err
		}
	}
	if cfg.sections["end-to-end"] {
		fmt.Fprintln(os.Stderr, "bench: end to end between two pods ...")
		if err := endToEnd(ctx, cfg, rep, pinRoot); err != nil {
			return fmt.Errorf("end to end: %w", err)
		}
	}
	if cfg.sections["cross-node"] && cfg.emulated == "" {
		if err := synSpace(rep); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "bench: end to end across two netns nodes ...")
		if err := crossNodeEndToEnd(ctx, cfg, rep, pinRoot); err != nil {
			return fmt.Errorf("cross-node end to end: %w", err)
		}
	}
	if cfg.sections["apps"] && cfg.emulated == "" {
		fmt.Fprintln(os.Stderr, "bench: the application interface (getsockopt) ...")
		if err := apps(ctx, cfg, rep, pinRoot); err != nil {
			return fmt.Errorf("apps: %w", err)
		}
	}
	if cfg.sections["cni"] {
		fmt.Fprintln(os.Stderr, "bench: CNI ADD/DEL latency ...")
		if err := cniLatency(ctx, cfg, rep, pinRoot); err != nil {
			return fmt.Errorf("cni: %w", err)
		}
	}
	rep.Took = time.Since(rep.Started).Round(time.Second).String()
	rep.compare()
	if cfg.emulated != "" {
		rep.ratiosOnly()
	}
	fmt.Printf("pktmeta benchmarks (%s), %s, %d CPUs, %s, Linux %s, took %s\n", rep.Mode, rep.Machine.CPU, rep.Machine.CPUs, rep.Machine.Go, rep.Machine.Kernel, rep.Took)
	for _, s := range []struct{ id, title string }{
		{"per-packet", "Per packet (BPF_PROG_TEST_RUN, ns per packet, mean of each run's repetitions)"},
		{"growth", "Per packet as the connection table grows"},
		{"memory", "Memory (kernel accounting of the maps)"},
		{"tables", "Table layouts: a first packet's reverse lookup and insert (design study, bench/bpf/tables.c)"},
		{"access", "What a cold memory access costs, in the table's shapes (bench/bpf/access.c)"},
		{"end-to-end", "End to end between two pods on a netns node (real CNI chain)"},
		{"cross-node", "Across nodes: what a SYN leaves free for the 20-byte option"},
		{"apps", "Applications asking their sockets (getsockopt, ns per call)"},
		{"cni", "CNI latency added by pktmeta (its own ADD/DEL process)"},
	} {
		rep.printSection(os.Stdout, s.id, s.title)
	}
	if err := rep.writeJSON(out); err != nil {
		return err
	}
	fmt.Printf("\nwrote %s\n", out)
	return nil
}

// inPrivateNetns runs fn on a locked thread inside a new network
// namespace; the thread is discarded afterwards.
func inPrivateNetns(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if _, err := netns.New(); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	return <-errc
}
