package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
)

// cniLatency times pktmeta's own ADD and DEL, invoked the way a runtime
// does (a process with the CNI environment and the primary's prevResult on
// stdin), for pods that ptp + host-local wired: the latency pktmeta adds to
// pod creation and deletion.
func cniLatency(ctx context.Context, cfg config, rep *Report, pinRoot string) error {
	n, err := testbed.NewNode(testbed.Config{CNIPath: cfg.cniPath, NoDAD: true, CNIVersion: "1.0.0", PluginStderr: io.Discard, Subnet4: "10.244.0.0/16"})
	if err != nil {
		return err
	}
	defer n.Close()
	pin := filepath.Join(pinRoot, "cni")
	pods := make([]*testbed.Pod, cfg.cniPods+1)
	for i := range pods {
		if pods[i], err = n.AddPod(ctx, testbed.PodSpec{Namespace: "bench", Name: fmt.Sprintf("p%d", i)}); err != nil {
			return err
		}
	}
	mode := "auto"
	conf := func(p *testbed.Pod) ([]byte, error) {
		prev, err := json.Marshal(p.Result)
		if err != nil {
			return nil, err
		}
		var prevMap map[string]any
		json.Unmarshal(prev, &prevMap)
		return json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "pmtb", "type": "pktmeta", "pinPath": pin, "attachMode": mode, "prevResult": prevMap})
	}
	call := func(cmd string, p *testbed.Pod) (time.Duration, error) {
		stdin, err := conf(p)
		if err != nil {
			return 0, err
		}
		start := time.Now()
		_, err = n.ExecPlugin(ctx, "pktmeta", cmd, p, stdin, nil)
		return time.Since(start), err
	}

	// What any plugin pays here before doing anything: the harness enters
	// the node netns, forks and execs the binary, which starts and exits.
	var version []float64
	for range 50 {
		start := time.Now()
		if _, err := n.ExecPlugin(ctx, "pktmeta", "VERSION", nil, []byte(`{"cniVersion":"1.0.0"}`), nil); err != nil {
			return fmt.Errorf("VERSION: %w", err)
		}
		version = append(version, ms(time.Since(start)))
	}
	rep.add(percentiles("pktmeta VERSION (exec, start, exit: the floor of any plugin call)", version)...)

	// The node's first ADD loads and verifies the datapath.
	first, err := call("ADD", pods[0])
	if err != nil {
		return fmt.Errorf("first ADD: %w", err)
	}
	rep.add(Result{Name: "pktmeta ADD, first on the node (loads the datapath)", Unit: "ms", Median: ms(first), Min: ms(first), Max: ms(first), Runs: 1, Section: "cni"})

	seqAdd, seqDel := make([]float64, 0, cfg.cniPods), make([]float64, 0, cfg.cniPods)
	for _, p := range pods[1:] {
		d, err := call("ADD", p)
		if err != nil {
			return err
		}
		seqAdd = append(seqAdd, ms(d))
	}
	for _, p := range pods[1:] {
		d, err := call("DEL", p)
		if err != nil {
			return err
		}
		seqDel = append(seqDel, ms(d))
	}
	parAdd, err := parallel(pods[1:], 16, func(p *testbed.Pod) (time.Duration, error) { return call("ADD", p) })
	if err != nil {
		return err
	}
	parDel, err := parallel(pods[1:], 16, func(p *testbed.Pod) (time.Duration, error) { return call("DEL", p) })
	if err != nil {
		return err
	}
	// DEL reads the whole connection table (it removes the pod's records):
	// time it with a big one.
	d, err := datapath.OpenExisting(pin, nil)
	if err != nil {
		return err
	}
	if err := prefill(d, 100_000); err != nil {
		d.Close()
		return err
	}
	d.Close()
	var bigDel []float64
	for _, p := range pods[1 : 1+min(len(pods)-1, 20)] {
		if _, err := call("ADD", p); err != nil {
			return err
		}
		dd, err := call("DEL", p)
		if err != nil {
			return err
		}
		bigDel = append(bigDel, ms(dd))
	}

	// The same with the legacy attach path, for comparison: tcx attach and
	// detach each wait for an RCU grace period under RTNL, cls_bpf does not.
	mode = "legacy"
	legAdd, legDel := make([]float64, 0, cfg.cniPods), make([]float64, 0, cfg.cniPods)
	for _, p := range pods[1:] {
		d, err := call("ADD", p)
		if err != nil {
			return err
		}
		legAdd = append(legAdd, ms(d))
	}
	for _, p := range pods[1:] {
		d, err := call("DEL", p)
		if err != nil {
			return err
		}
		legDel = append(legDel, ms(d))
	}
	// tcx again, with the host's RCU grace periods expedited: what an
	// operator who accepts that host-wide trade gets (see BENCHMARKS.md).
	mode = "auto"
	expAdd, expPar, err := withExpeditedRCU(func() ([]float64, []float64, error) {
		var seq []float64
		for _, p := range pods[1:] {
			d, err := call("ADD", p)
			if err != nil {
				return nil, nil, err
			}
			seq = append(seq, ms(d))
		}
		for _, p := range pods[1:] {
			if _, err := call("DEL", p); err != nil {
				return nil, nil, err
			}
		}
		par, err := parallel(pods[1:], 16, func(p *testbed.Pod) (time.Duration, error) { return call("ADD", p) })
		if err != nil {
			return nil, nil, err
		}
		_, err = parallel(pods[1:], 16, func(p *testbed.Pod) (time.Duration, error) { return call("DEL", p) })
		return seq, par, err
	})
	if err != nil {
		return err
	}
	for _, s := range []struct {
		name    string
		samples []float64
	}{
		{"pktmeta ADD, sequential", seqAdd},
		{"pktmeta DEL, sequential", seqDel},
		{"pktmeta ADD, 16 in parallel", parAdd},
		{"pktmeta DEL, 16 in parallel", parDel},
		{"pktmeta DEL, sequential, 100k records in the table", bigDel},
		{"pktmeta ADD, sequential, attachMode legacy", legAdd},
		{"pktmeta DEL, sequential, attachMode legacy", legDel},
		{"pktmeta ADD, sequential, tcx, host rcu_expedited=1", expAdd},
		{"pktmeta ADD, 16 in parallel, tcx, host rcu_expedited=1", expPar},
	} {
		if len(s.samples) == 0 {
			continue
		}
		rep.add(percentiles(s.name, s.samples)...)
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// rcuExpedited is the host-wide switch that makes synchronize_rcu() use
// expedited grace periods (IPIs to every CPU instead of waiting for them).
const rcuExpedited = "/sys/kernel/rcu_expedited"

// withExpeditedRCU runs fn with rcu_expedited set to 1 and puts the host's
// own value back afterwards, whatever fn did. A kernel without the switch
// runs nothing and reports no samples.
func withExpeditedRCU(fn func() ([]float64, []float64, error)) ([]float64, []float64, error) {
	was, err := os.ReadFile(rcuExpedited)
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: ADD with expedited RCU not measured: %v\n", err)
		return nil, nil, nil
	}
	if err := os.WriteFile(rcuExpedited, []byte("1"), 0o644); err != nil {
		return nil, nil, fmt.Errorf("set %s: %w", rcuExpedited, err)
	}
	defer func() {
		if err := os.WriteFile(rcuExpedited, was, 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "bench: restoring %s to %q: %v\n", rcuExpedited, strings.TrimSpace(string(was)), err)
		}
	}()
	return fn()
}

// parallel runs fn for every pod with at most width at once and returns
// each call's latency in ms.
func parallel(pods []*testbed.Pod, width int, fn func(*testbed.Pod) (time.Duration, error)) ([]float64, error) {
	var (
		mu  sync.Mutex
		out []float64
		wg  sync.WaitGroup
		err error
	)
	sem := make(chan struct{}, width)
	for _, p := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			d, e := fn(p)
			mu.Lock()
			defer mu.Unlock()
			if e != nil && err == nil {
				err = e
			}
			out = append(out, ms(d))
		}()
	}
	wg.Wait()
	return out, err
}

// percentiles renders a latency distribution as p50 (median, with min and
// max) and p99 results.
func percentiles(name string, samples []float64) []Result {
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	p := func(q float64) float64 { return s[min(len(s)-1, int(q*float64(len(s))))] }
	p50 := Result{Name: name + ", p50", Unit: "ms", Median: p(0.5), Min: s[0], Max: s[len(s)-1], Runs: len(s), Section: "cni"}
	p99 := Result{Name: name + ", p99", Unit: "ms", Median: p(0.99), Min: s[0], Max: s[len(s)-1], Runs: len(s), Section: "cni"}
	return []Result{p50, p99}
}
