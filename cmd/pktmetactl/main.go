// Command pktmetactl reads pktmeta's pinned state: live connections with
// their origin, lookups by tuple, the event stream, and the datapath's
// health. It needs no daemon; it opens the pins directly.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/pktmeta/pktmeta/internal/api"
	"github.com/pktmeta/pktmeta/internal/cluster"
	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/view"
)

const usage = `usage: pktmetactl [--pin-path DIR] <command> [flags]

commands:
  conns    [-o json]                                   live connections and who opened them
  lookup   --proto tcp|udp --src IP:PORT --dst IP:PORT [-o json]
                                                       the record of one connection, by either side's tuple
  events   [-o json] [--count N] [--timeout D]         follow opened/delivered/closed events
  status   [-o json]                                   programs, attachments, map fill, counters
  node     set|show|off                                this node's part in carrying origins across nodes

--pin-path defaults to ` + datapath.DefaultPinPath + `. conns, lookup and events go through the node
agent's API (--api-socket, default ` + api.DefaultSocket + `) when an agent answers there.
--cluster FILE names the other nodes (ids, addresses, pod CIDRs) outside Kubernetes; with it,
conns, lookup and events resolve origins on other nodes, and node set takes this node's
id and the cluster's members from it.
`

// exitError carries an exit status and a one-line message.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func main() {
	err := run(os.Args[1:], os.Stdout)
	if err == nil {
		return
	}
	var ee *exitError
	if errors.As(err, &ee) {
		fmt.Fprintln(os.Stderr, "pktmetactl:", ee.msg)
		os.Exit(ee.code)
	}
	fmt.Fprintln(os.Stderr, "pktmetactl:", err)
	os.Exit(2)
}

func run(args []string, out io.Writer) error {
	global := flag.NewFlagSet("pktmetactl", flag.ContinueOnError)
	global.SetOutput(io.Discard)
	pinPath := global.String("pin-path", datapath.DefaultPinPath, "bpffs directory of the pinned datapath")
	socket := global.String("api-socket", api.DefaultSocket, "the agent's API socket, used when an agent answers there (empty: read the pins)")
	clusterFile := global.String("cluster", "", "cluster file: the other nodes, to resolve remote origins")
	if err := global.Parse(args); err != nil {
		fmt.Fprint(os.Stderr, usage)
		return &exitError{2, err.Error()}
	}
	rest := global.Args()
	if len(rest) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return &exitError{2, "no command"}
	}
	cmd, cmdArgs := rest[0], rest[1:]
	var cf *cluster.File
	if *clusterFile != "" {
		f, err := cluster.Load(*clusterFile)
		if err != nil {
			return &exitError{2, err.Error()}
		}
		cf = f
	}
	g := globals{pinPath: *pinPath, socket: *socket, cluster: cf}
	switch cmd {
	case "conns":
		return cmdConns(g, cmdArgs, out)
	case "lookup":
		return cmdLookup(g, cmdArgs, out)
	case "events":
		return cmdEvents(g, cmdArgs, out)
	case "status":
		return cmdStatus(*pinPath, cmdArgs, out)
	case "node":
		return cmdNode(g, cmdArgs, out)
	case "help", "-h", "--help":
		fmt.Fprint(out, usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return &exitError{2, fmt.Sprintf("unknown command %q", cmd)}
}

// globals are the flags every command sees.
type globals struct {
	pinPath string
	socket  string
	cluster *cluster.File // nil without --cluster
}

// remote resolves remote origins from the cluster file, if there is one.
func (g globals) remote() view.Remote {
	if g.cluster == nil {
		return nil
	}
	return cluster.NewDirectory(g.cluster)
}

func newFlags(name string) (*flag.FlagSet, *string) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	output := fs.String("o", "text", "output format: text or json")
	return fs, output
}

// writeJSON prints v as indented JSON.
func writeJSON(out io.Writer, v any) error {
	enc := json.NewEncoder(out)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parse parses a command's flags and checks -o.
func parse(fs *flag.FlagSet, output *string, args []string) error {
	if err := fs.Parse(args); err != nil {
		return &exitError{2, err.Error()}
	}
	if *output != "text" && *output != "json" {
		return &exitError{2, fmt.Sprintf("-o %q: want text or json", *output)}
	}
	return nil
}

func open(pinPath string) (*datapath.Datapath, error) {
	d, err := datapath.OpenReader(pinPath)
	if err != nil {
		return nil, &exitError{3, fmt.Sprintf("open pinned datapath: %v", err)}
	}
	return d, nil
}

func cmdConns(g globals, args []string, out io.Writer) error {
	fs, output := newFlags("conns")
	if err := parse(fs, output, args); err != nil {
		return err
	}
	src, err := openSource(g)
	if err != nil {
		return err
	}
	defer src.Close()
	conns, err := src.Conns(context.Background())
	if err != nil {
		return err
	}
	if *output == "json" {
		return writeJSON(out, conns)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PROTO\tSRC\tDST\tORIGIN\tTAGS\tCONN-ID\tFIRST-SEEN\tPEER\tPEER-SAW")
	for _, c := range conns {
		peer, saw := "-", "-"
		if c.Seen != nil {
			peer = c.Peer.Name()
			saw = c.Seen.Src + " -> " + c.Seen.Dst
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", c.Proto, c.Src, c.Dst, c.Origin.Name(), allTags(c.Tags, c.PodTags), c.ConnID, c.FirstSeen, peer, saw)
	}
	return tw.Flush()
}

// allTags shows the operator's tags as key=value and the ones the pod
// claimed itself as pod:key=value, so that nobody takes one for the other.
func allTags(tags, podTags map[string]string) string {
	var parts []string
	if len(tags) > 0 {
		parts = append(parts, tagString(tags))
	}
	if len(podTags) > 0 {
		for _, kv := range strings.Split(tagString(podTags), ",") {
			parts = append(parts, "pod:"+kv)
		}
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ",")
}

func tagString(tags map[string]string) string {
	if len(tags) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = k + "=" + tags[k]
	}
	return strings.Join(parts, ",")
}

func cmdLookup(g globals, args []string, out io.Writer) error {
	fs, output := newFlags("lookup")
	proto := fs.String("proto", "tcp", "tcp or udp")
	srcAddr := fs.String("src", "", "source IP:PORT ([IPv6]:PORT)")
	dstAddr := fs.String("dst", "", "destination IP:PORT ([IPv6]:PORT)")
	if err := parse(fs, output, args); err != nil {
		return err
	}
	t, err := api.ParseTuple(*proto, *srcAddr, *dstAddr)
	if err != nil {
		return &exitError{2, "--" + err.Error()}
	}
	src, err := openSource(g)
	if err != nil {
		return err
	}
	defer src.Close()
	c, err := src.Lookup(context.Background(), t)
	if errors.Is(err, errNoRecord) {
		return &exitError{1, fmt.Sprintf("no record for %s", t)}
	}
	if err != nil {
		return err
	}

	if *output == "json" {
		return writeJSON(out, c)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "connection\t%s %s -> %s\n", c.Proto, c.Src, c.Dst)
	fmt.Fprintf(tw, "conn id\t%d\n", c.ConnID)
	if c.Origin != nil && c.Origin.Remote {
		fmt.Fprintf(tw, "origin node\t%s (id %d)\n", orDash(c.Origin.Node), c.Origin.NodeID)
		fmt.Fprintf(tw, "origin conn id\t%d (on its node)\n", c.OriginConnID)
	}
	fmt.Fprintf(tw, "first seen\t%s\n", c.FirstSeen)
	fmt.Fprintf(tw, "origin\t%s\n", c.Origin.Name())
	if c.Origin.UID != "" {
		fmt.Fprintf(tw, "origin uid\t%s\n", c.Origin.UID)
	}
	if c.Origin.ContainerID != "" {
		fmt.Fprintf(tw, "origin container\t%s\n", c.Origin.ContainerID)
	}
	fmt.Fprintf(tw, "tags\t%s\n", tagString(c.Tags))
	fmt.Fprintf(tw, "pod tags\t%s (claimed by the pod itself)\n", tagString(c.PodTags))
	if c.Seen != nil {
		fmt.Fprintf(tw, "delivered to\t%s at %s\n", c.Peer.Name(), c.Delivered)
		fmt.Fprintf(tw, "receiver saw\t%s -> %s (nat: %v)\n", c.Seen.Src, c.Seen.Dst, c.NAT)
	} else {
		fmt.Fprintf(tw, "delivered to\t- (not to a pod on this node)\n")
	}
	return tw.Flush()
}

func cmdEvents(g globals, args []string, out io.Writer) error {
	fs, output := newFlags("events")
	count := fs.Int("count", 0, "exit after this many events (0: follow forever)")
	timeout := fs.Duration("timeout", 0, "exit with status 1 after this long without an event (0: never)")
	if err := parse(fs, output, args); err != nil {
		return err
	}
	src, err := openSource(g)
	if err != nil {
		return err
	}
	defer src.Close()
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	idle := newIdleTimer(*timeout, cancel)
	enc := json.NewEncoder(out)
	n := 0
	var writeErr error
	err = src.Events(ctx, func(v view.Event) bool {
		idle.reset()
		if *output == "json" {
			writeErr = enc.Encode(v)
		} else {
			line := fmt.Sprintf("%s %-9s %s %s -> %s conn=%d origin=%s tags=%s", v.Time, v.Event, v.Proto, v.Src, v.Dst, v.ConnID, v.Origin.Name(), allTags(v.Tags, v.PodTags))
			if v.Seen != nil {
				line += fmt.Sprintf(" peer=%s saw=%s->%s nat=%v", v.Peer.Name(), v.Seen.Src, v.Seen.Dst, v.NAT)
			}
			if v.Reason != "" {
				line += " reason=" + v.Reason
			}
			_, writeErr = fmt.Fprintln(out, line)
		}
		n++
		return writeErr == nil && (*count == 0 || n < *count)
	})
	if writeErr != nil {
		return writeErr
	}
	if idle.expired() {
		return &exitError{1, fmt.Sprintf("no event within %s", *timeout)}
	}
	return err
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
