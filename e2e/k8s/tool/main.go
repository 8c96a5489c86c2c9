// Command e2etool is the one binary the Kubernetes end-to-end test puts in
// its pods: as workloads (echo servers, clients that hold connections
// open, a packet forger) in ordinary pods, and as a probe of the node
// (files, BPF programs and hooks, CRI sandboxes, processes) in a
// privileged host-network pod.
//
// Every subcommand prints JSON, one object per line, so the test parses
// its output instead of scraping text. Each line is written with a single
// write, so a reader never sees half a line even when several goroutines
// report at once, and nothing waits in a buffer when the pod is killed.
// Errors go to stderr with exit status 1, usage errors exit 2, and SIGTERM
// or SIGINT ends a long-running subcommand with status 0: the test deletes
// workload pods, and that is not a failure.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
)

// env is what a subcommand may touch of the process: tests run
// subcommands in-process with their own streams.
type env struct {
	out    *emitter
	stdin  io.Reader
	stderr io.Writer
}

type command struct {
	run   func(ctx context.Context, e *env, args []string) error
	usage string
}

var commands = map[string]command{
	// Workloads.
	"serve":    {cmdServe, "serve [--tcp :8080] [--udp :5353]"},
	"dial":     {cmdDial, "dial --tcp HOST:PORT [--every 1s] [--count 0] [--timeout 5s]"},
	"stream":   {cmdStream, "stream --tcp HOST:PORT [--interval 100ms] [--timeout 5s]"},
	"udp":      {cmdUDP, "udp --addr HOST:PORT [--count 1] [--every 1s] [--timeout 3s] [--hold 0]"},
	"http-get": {cmdHTTPGet, "http-get URL [--timeout 3s] [--insecure] [--token-file F]"},
	"forge":    {cmdForge, "forge --src IP:PORT --dst IP:PORT --kind syn|rst|fin [--seq N] [--ack N] [--count 1]"},
	"sleep":    {cmdSleep, "sleep"},
	// Node probes.
	"file":        {cmdFile, "file PATH"},
	"write":       {cmdWrite, "write PATH < content"},
	"progs":       {cmdProgs, "progs"},
	"hooks":       {cmdHooks, "hooks"},
	"watch-hooks": {cmdWatchHooks, "watch-hooks --stop-file F [--every 5ms] [--prefix pktmeta_]"},
	"watch-file":  {cmdWatchFile, "watch-file PATH --stop-file F [--every 2ms] [--exec]"},
	"sandboxes":   {cmdSandboxes, "sandboxes [--cri /host/run/containerd/containerd.sock]"},
	"kill":        {cmdKill, "kill --cmdline-contains STR [--signal KILL]"},
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// run runs one subcommand and returns the exit status.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "e2etool: unknown subcommand %q\n", args[0])
		usage(stderr)
		return 2
	}
	err := c.run(ctx, &env{out: &emitter{w: stdout}, stdin: stdin, stderr: stderr}, args[1:])
	var ue usageError
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "e2etool %s: %v\nusage: e2etool %s\n", args[0], err, c.usage)
		return 2
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprintf(stderr, "usage: e2etool %s\n", c.usage)
		return 2
	case err != nil && ctx.Err() != nil:
		// Interrupted: whatever failed did so because we are stopping.
		return 0
	case err != nil:
		fmt.Fprintf(stderr, "e2etool %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	var names []string
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w, "usage:")
	for _, n := range names {
		fmt.Fprintf(w, "  e2etool %s\n", commands[n].usage)
	}
}

// usageError is a mistake on the command line: exit status 2.
type usageError struct{ error }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// emitter writes one JSON object per line.
type emitter struct {
	mu sync.Mutex
	w  io.Writer
}

func (e *emitter) emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		b, _ = json.Marshal(map[string]string{"event": "error", "err": "marshal: " + err.Error()})
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	_, _ = e.w.Write(append(b, '\n'))
}

// obj keeps field order out of the way of readability: the test decodes
// by name, so map key order (sorted by encoding/json) does not matter.
type obj = map[string]any

// parseFlags parses args with fs, allowing flags after positional
// arguments (`http-get URL --timeout 1s`), which package flag alone stops
// at. It returns the positional arguments and checks their number.
func parseFlags(fs *flag.FlagSet, args []string, positional int) ([]string, error) {
	fs.SetOutput(io.Discard) // run prints the usage line itself
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, usageError{err}
		}
		args = fs.Args()
		if len(args) == 0 {
			break
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
	if len(pos) != positional {
		return nil, usagef("want %d argument(s), got %d: %q", positional, len(pos), pos)
	}
	return pos, nil
}

// addrString prints a socket address as ip:port, with IPv4-mapped IPv6
// addresses (what a dual-stack socket reports for IPv4 peers) as plain
// IPv4, so the test can compare them with pod IPs.
func addrString(a net.Addr) string {
	switch a := a.(type) {
	case *net.TCPAddr:
		return unmapped(a.AddrPort())
	case *net.UDPAddr:
		return unmapped(a.AddrPort())
	case nil:
		return ""
	}
	return a.String()
}

func unmapped(ap netip.AddrPort) string {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String()
}

// errString is err's text, or "" for nil (the JSON field stays a string).
func errString(err error) string {
	if err == nil {
		return ""
	}
	return strings.TrimSpace(err.Error())
}
