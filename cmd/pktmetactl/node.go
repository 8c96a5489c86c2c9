package main

import (
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

const nodeUsage = `usage:
  pktmetactl [--cluster FILE] node set [--name NODE | --id N --member CIDR...] --key-file F | --no-mac
                                       [--uplink IF]... [--max-remote N] [--attach-mode M]
  pktmetactl node show [-o json]
  pktmetactl node off [--detach]

set gives this node its id and the cluster's members (with --cluster, from the file's
entry for --name), and puts the uplink programs on each --uplink (the NIC towards the
other nodes, or the VXLAN device of an overlay; give both with an overlay). SYNs carry a
MAC under the cluster key (--key-file: 32 hex digits, the same on every node) and only options with a valid one are honoured; --no-mac instead trusts any option
from a member address (see docs/SECURITY.md).
It loads the datapath if this node has none yet (give --max-connections as the plugin's
maxConnections then: the table keeps the size it was made with). off takes the node out
of the cluster: id 0, no members; its uplinks keep overwriting and stripping options, so
that nothing of a pod's is honoured elsewhere or reaches a pod here; --detach takes the
programs off them too.
`

// listFlag collects a repeated flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func cmdNode(g globals, args []string, out io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, nodeUsage)
		return &exitError{2, "node: no subcommand"}
	}
	switch args[0] {
	case "set":
		return nodeSet(g, args[1:], out)
	case "show":
		return nodeShow(g, args[1:], out)
	case "off":
		return nodeOff(g, args[1:], out)
	}
	fmt.Fprint(os.Stderr, nodeUsage)
	return &exitError{2, fmt.Sprintf("node: unknown subcommand %q", args[0])}
}

// readKey reads a cluster key file: 32 hex digits (16 bytes), as
// `head -c16 /dev/urandom | xxd -p` writes them. Hex only, so that a
// 16-character password is not taken for a key.
func readKey(path string) ([]byte, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("key file: %w", err)
	}
	if k, err := hex.DecodeString(strings.TrimSpace(string(raw))); err == nil && len(k) == datapath.KeySize {
		return k, nil
	}
	return nil, fmt.Errorf("key file %s: want %d hex digits (%d bytes of key)", path, 2*datapath.KeySize, datapath.KeySize)
}

func nodeSet(g globals, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("node set", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	name := fs.String("name", "", "this node's name in the cluster file")
	id := fs.Uint("id", 0, "this node's id, 1-65535 (without --cluster)")
	keyFile := fs.String("key-file", "", "the cluster key: options carry a MAC under it")
	noMAC := fs.Bool("no-mac", false, "no cluster key: honour options from member addresses without a MAC")
	maxRemote := fs.Uint("max-remote", 0, "records of other nodes' connections this node holds at once (0: a quarter of the table)")
	mode := fs.String("attach-mode", "auto", "auto, tcx or legacy")
	maxConns := fs.Uint("max-connections", 0, "the connection table's size if this makes the datapath (as the plugin's maxConnections; 0: its default)")
	var members, uplinks listFlag
	fs.Var(&members, "member", "a cluster member prefix (node addresses, pod CIDRs); repeat")
	fs.Var(&uplinks, "uplink", "an interface towards the other nodes; repeat")
	if err := fs.Parse(args); err != nil {
		return &exitError{2, err.Error()}
	}
	var cfg datapath.NodeConfig
	switch {
	case g.cluster != nil:
		if *name == "" || *id != 0 || len(members) > 0 {
			return &exitError{2, "node set: with --cluster, give --name (the id and members come from the file)"}
		}
		n, ok := g.cluster.ByName(*name)
		if !ok {
			return &exitError{2, fmt.Sprintf("node set: the cluster file has no node %q", *name)}
		}
		cfg.ID = n.ID
		cfg.Members = g.cluster.Members()
	default:
		if *name != "" {
			return &exitError{2, "node set: --name needs --cluster"}
		}
		if *id == 0 || *id > 65535 {
			return &exitError{2, "node set: --id must be 1-65535"}
		}
		cfg.ID = uint16(*id)
		for _, m := range members {
			p, err := netip.ParsePrefix(m)
			if err != nil {
				a, aerr := netip.ParseAddr(m)
				if aerr != nil {
					return &exitError{2, fmt.Sprintf("node set: --member %q is not a prefix or an address", m)}
				}
				p = netip.PrefixFrom(a, a.BitLen())
			}
			cfg.Members = append(cfg.Members, p)
		}
	}
	switch {
	case *keyFile != "" && *noMAC:
		return &exitError{2, "node set: --key-file and --no-mac exclude each other"}
	case *keyFile == "" && !*noMAC:
		return &exitError{2, "node set: give the cluster key (--key-file), or --no-mac to trust member addresses alone (see docs/SECURITY.md)"}
	case *keyFile != "":
		k, err := readKey(*keyFile)
		if err != nil {
			return &exitError{2, err.Error()}
		}
		cfg.Key = k
	}
	am, err := attach.ParseMode(*mode)
	if err != nil {
		return &exitError{2, err.Error()}
	}
	if err := cfg.Validate(); err != nil {
		return &exitError{2, "node set: " + err.Error()}
	}
	for _, u := range uplinks {
		if err := datapath.CheckUplink(u); err != nil {
			return &exitError{2, "node set: " + err.Error()}
		}
	}
	if *maxRemote > 1<<31 {
		return &exitError{2, "node set: --max-remote is too large"}
	}
	if *maxConns > datapath.MaxCapacity {
		return &exitError{2, fmt.Sprintf("node set: --max-connections is too large (at most %d)", datapath.MaxCapacity)}
	}
	d, _, err := datapath.Open(datapath.Options{PinPath: g.pinPath, MaxConnections: uint32(*maxConns)})
	if err != nil {
		return &exitError{3, fmt.Sprintf("open datapath: %v", err)}
	}
	defer d.Close()
	if *maxRemote > 0 {
		cfg.MaxRemote = uint32(*maxRemote)
	} else {
		cfg.MaxRemote = d.Capacity() / 4
	}
	// Uplinks first: until SetNode gives the node its id, the programs
	// only neutralise and strip options. What this call attached is taken
	// off again if anything fails.
	before, err := d.Uplinks()
	if err != nil {
		return err
	}
	var added []string
	undo := func(err error) error {
		for _, u := range added {
			if derr := d.DetachUplink(u); derr != nil {
				err = errors.Join(err, derr)
			}
		}
		return err
	}
	for _, u := range uplinks {
		had := slices.ContainsFunc(before, func(x datapath.Uplink) bool { return x.IfName == u })
		if _, err := d.AttachUplink(u, am); err != nil {
			return undo(err)
		}
		if !had {
			added = append(added, u)
		}
	}
	if err := d.SetNode(cfg); err != nil {
		return undo(err)
	}
	fmt.Fprintf(out, "node %d: %d member prefixes, MAC %v, uplinks %s\n", cfg.ID, len(cfg.Members), cfg.Key != nil, orDash(strings.Join(uplinks, ",")))
	return nil
}

type nodeStatus struct {
	datapath.NodeState
	Uplinks []datapath.Uplink    `json:"uplinks"`
	Stats   datapath.RemoteStats `json:"stats"`
}

func readNodeStatus(d *datapath.Datapath) (nodeStatus, error) {
	var st nodeStatus
	var err error
	if st.NodeState, err = d.Node(); err != nil {
		return st, err
	}
	if st.Uplinks, err = d.Uplinks(); err != nil {
		return st, err
	}
	st.Stats, err = d.ReadRemoteStats()
	return st, err
}

func nodeShow(g globals, args []string, out io.Writer) error {
	fs, output := newFlags("node show")
	if err := parse(fs, output, args); err != nil {
		return err
	}
	d, err := open(g.pinPath)
	if err != nil {
		return err
	}
	defer d.Close()
	st, err := readNodeStatus(d)
	if err != nil {
		return err
	}
	if *output == "json" {
		return writeJSON(out, st)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node id\t%d\n", st.ID)
	fmt.Fprintf(tw, "MAC\t%v\n", st.MAC)
	fmt.Fprintf(tw, "remote records\t%d (at most %d)\n", st.LiveRemote, st.MaxRemote)
	var ms []string
	for _, m := range st.Members {
		ms = append(ms, m.String())
	}
	fmt.Fprintf(tw, "members\t%s\n", orDash(strings.Join(ms, " ")))
	for _, u := range st.Uplinks {
		fmt.Fprintf(tw, "uplink\t%s (ifindex %d, %s)%s\n", u.IfName, u.Ifindex, u.Mode, hookProblems(u.Hooks))
	}
	for _, f := range st.Stats.Fields() {
		fmt.Fprintf(tw, "%s\t%d\n", f.Name, f.Value)
	}
	return tw.Flush()
}

func hookProblems(hs []datapath.HookStatus) string {
	var p []string
	for _, h := range hs {
		if !h.OK {
			p = append(p, h.Problem)
		}
	}
	if len(p) == 0 {
		return ""
	}
	return ": " + strings.Join(p, "; ")
}

func nodeOff(g globals, args []string, out io.Writer) error {
	fs := flag.NewFlagSet("node off", flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	detach := fs.Bool("detach", false, "also take the programs off the uplinks")
	if err := fs.Parse(args); err != nil {
		return &exitError{2, err.Error()}
	}
	if fs.NArg() > 0 {
		return &exitError{2, "node off takes no arguments"}
	}
	d, err := datapath.OpenExisting(g.pinPath, nil)
	if err != nil {
		return &exitError{3, fmt.Sprintf("open datapath: %v", err)}
	}
	defer d.Close()
	errs := []error{d.SetNode(datapath.NodeConfig{})}
	n := 0
	if *detach {
		ups, err := d.Uplinks()
		if err != nil {
			return err
		}
		for _, u := range ups {
			errs = append(errs, d.DetachUplink(u.IfName))
		}
		n = len(ups)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	fmt.Fprintf(out, "node off: id 0, no members; %d uplinks detached\n", n)
	return nil
}
