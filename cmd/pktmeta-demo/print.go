package main

import (
	"bytes"
	"errors"
	"fmt"
	"os/exec"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/view"
)

const width = 96 // of section rules; the output fits 100 columns

var sectionNo int

func (dm *demo) section(title string) {
	sectionNo++
	head := fmt.Sprintf("== %d. %s ", sectionNo, title)
	fmt.Fprintf(dm.out, "\n%s%s\n\n", head, strings.Repeat("=", max(3, width-len(head))))
}

func (dm *demo) header(o options) {
	var u unix.Utsname
	release := "?"
	if unix.Uname(&u) == nil {
		release = unix.ByteSliceToString(u.Release[:])
	}
	pin := dm.pin + "  (a private bpffs, unmounted at the end)"
	if o.pinPath != "" {
		pin = dm.pin + "  (--pin-path, removed at the end)"
	}
	fmt.Fprintln(dm.out, "pktmeta demo")
	fmt.Fprintln(dm.out, "  A throw-away node made of network namespaces. Pods are wired by the real CNI chain")
	fmt.Fprintln(dm.out, "  (ptp + host-local, then pktmeta) through libcni, as a container runtime does; Services")
	fmt.Fprintln(dm.out, "  are nftables DNAT, as kube-proxy does. Everything shown about connections is read back")
	fmt.Fprintln(dm.out, "  from pktmeta's pinned BPF maps.")
	fmt.Fprintln(dm.out)
	fmt.Fprintf(dm.out, "  kernel      %s\n", release)
	fmt.Fprintf(dm.out, "  pin path    %s\n", pin)
	fmt.Fprintf(dm.out, "  pktmetactl  %s\n", dm.ctl)
}

func (dm *demo) printBuilt() {
	dm.section("Node, pods and Services")
	fmt.Fprintf(dm.out, "  node netns   %s\n", dm.node.NetnsPath)
	fmt.Fprintf(dm.out, "  pod subnets  10.244.1.0/24 and %s (host-local)\n", subnet6)
	fmt.Fprintln(dm.out, "  pktmeta      pinPath above, tags {\"cluster\": \"demo\"}, pod annotations pktmeta.dev/* as tags")
	fmt.Fprintln(dm.out)
	fmt.Fprintln(dm.out, "  Pods (CNI ADD). IPs and host veths come from the CNI result; HOOK and TAGS are read back")
	fmt.Fprintln(dm.out, "  from pktmeta's workload map. TAGS are the operator's; POD TAGS the pod claimed itself.")
	fmt.Fprintln(dm.out)
	tw := tabwriter.NewWriter(dm.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  POD\tIPv4\tIPv6\tHOST VETH\tHOOK\tTAGS\tPOD TAGS")
	for _, p := range dm.pods {
		w := dm.workloads[p]
		hook := "tcx"
		if w.Legacy {
			hook = "tc"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\n", podName(p), p.IPv4, p.IPv6, p.HostVeth, hook, tagString(w.Tags), tagString(w.PodTags))
	}
	tw.Flush()
	fmt.Fprintln(dm.out)
	fmt.Fprintln(dm.out, "  Services (nftables DNAT in the node netns, no masquerade):")
	fmt.Fprintln(dm.out)
	tw = tabwriter.NewWriter(dm.out, 0, 4, 2, ' ', 0)
	for _, s := range dm.services {
		fmt.Fprintf(tw, "    %s\t%s\t->  %s\t%s\n", s.Proto, s.VIP, s.Backend, podName(dm.db))
	}
	tw.Flush()
	fmt.Fprintf(dm.out, "\n  shop/db runs a TCP echo server on port %d and a UDP echo server on port %d.\n", dbTCPPort, dbUDPPort)
}

// showConns looks every connection up by the tuple db's socket saw and
// prints the record the datapath returns. Any discrepancy is a failure.
func (dm *demo) showConns() error {
	dm.section("Connections (kept open) and what the receiver finds")
	fmt.Fprintln(dm.out, "  Each connection completed one echo round trip and is still open. Each is looked up")
	fmt.Fprintln(dm.out, "  with datapath.Lookup by the tuple db's socket saw (after DNAT), as a BPF program at")
	fmt.Fprintln(dm.out, "  the receiver does with pktmeta_lookup(). Every field below comes from the record it")
	fmt.Fprintln(dm.out, "  returns; identities and tags from the workload map.")
	res, err := view.NewResolver(dm.d)
	if err != nil {
		return fmt.Errorf("read the workload table: %w", err)
	}
	var problems []string
	for i, c := range dm.conns {
		fam := "IPv4"
		if c.dial.Addr().Is6() {
			fam = "IPv6"
		}
		fmt.Fprintf(dm.out, "\n  [%d] %s/%s  %s\n", i+1, strings.ToUpper(datapath.ProtoName(c.proto)), fam, c.what)
		rec, err := dm.d.Lookup(c.seen)
		if errors.Is(err, datapath.ErrNoRecord) {
			p := fmt.Sprintf("[%d] no record for %s, the tuple db saw: pktmeta lost this connection", i+1, c.seen)
			fmt.Fprintf(dm.out, "      !! NO RECORD for %s\n", c.seen)
			problems = append(problems, p)
			continue
		}
		if err != nil {
			return err
		}
		dm.printRecord(res, rec)
		if c.proto == datapath.ProtoTCP {
			got := dm.srv.answer(c.seen.Src)
			fmt.Fprintf(dm.out, "      db asked      its accepted socket (getsockopt SOL_PKTMETA): %s\n", got)
			if want := c.from.Spec.Namespace + "/" + c.from.Spec.Name; got != want {
				p := fmt.Sprintf("db's socket said %q, want %s", got, want)
				fmt.Fprintf(dm.out, "      !! %s\n", p)
				problems = append(problems, fmt.Sprintf("[%d] %s", i+1, p))
			}
		}
		for _, p := range dm.check(c, rec) {
			fmt.Fprintf(dm.out, "      !! %s\n", p)
			problems = append(problems, fmt.Sprintf("[%d] %s", i+1, p))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("pktmeta failure: the pinned maps do not describe these connections correctly:\n  %s",
			strings.Join(problems, "\n  "))
	}
	return nil
}

func (dm *demo) printRecord(res *view.Resolver, rec datapath.Record) {
	v := res.ConnFromRecord(rec)
	nat := "no"
	if v.NAT {
		nat = "yes"
	}
	fmt.Fprintf(dm.out, "      origin sent   %s -> %s\n", v.Src, v.Dst)
	if v.Seen != nil {
		fmt.Fprintf(dm.out, "      receiver saw  %-54s DNAT: %s\n", v.Seen.Src+" -> "+v.Seen.Dst, nat)
	} else {
		fmt.Fprintln(dm.out, "      receiver saw  - (not delivered to a pod on this node)")
	}
	fmt.Fprintf(dm.out, "      origin        %s, tags %s, pod tags %s\n", v.Origin.Name(), tagString(v.Tags), tagString(v.PodTags))
	fmt.Fprintf(dm.out, "                    uid %s  container %s\n", orDash(v.Origin.UID), orDash(shortID(v.Origin.ContainerID)))
	line := fmt.Sprintf("      conn id       %d   first seen %s", v.ConnID, rec.FirstSeen.UTC().Format("15:04:05.000000 UTC"))
	if v.Seen != nil {
		line += fmt.Sprintf("   delivered to %s %s later", v.Peer.Name(), fmtDur(rec.Delivered.Sub(rec.FirstSeen)))
	}
	fmt.Fprintln(dm.out, line)
}

// check compares a record with what the sockets on both ends say.
func (dm *demo) check(c *conn, rec datapath.Record) []string {
	var p []string
	from, db := dm.workloads[c.from], dm.workloads[dm.db]
	if rec.Version != datapath.RecordVersion {
		p = append(p, fmt.Sprintf("record version %d, want %d", rec.Version, datapath.RecordVersion))
	}
	if rec.Tuple != c.origin {
		p = append(p, fmt.Sprintf("record keyed by %s, but the client socket sent %s", rec.Tuple, c.origin))
	}
	if rec.OriginWorkload != from.ID || rec.OriginIfindex != from.HostIfindex {
		p = append(p, fmt.Sprintf("origin workload %d on ifindex %d, want %d (%s) on %d",
			rec.OriginWorkload, rec.OriginIfindex, from.ID, c.from.Spec.Name, from.HostIfindex))
	}
	if !rec.IsDelivered() {
		return append(p, "record not marked delivered although db received the connection")
	}
	if rec.PeerTuple != c.seen {
		p = append(p, fmt.Sprintf("receiver tuple in the record is %s, db's socket saw %s", rec.PeerTuple, c.seen))
	}
	if rec.PeerWorkload != db.ID || rec.PeerIfindex != db.HostIfindex {
		p = append(p, fmt.Sprintf("delivered to workload %d on ifindex %d, want %d (db) on %d",
			rec.PeerWorkload, rec.PeerIfindex, db.ID, db.HostIfindex))
	}
	if nat := rec.Flags&datapath.FlagNAT != 0; nat != c.viaVIP {
		p = append(p, fmt.Sprintf("DNAT flag %v, but the connection went %s", nat, map[bool]string{true: "through a Service VIP", false: "directly"}[c.viaVIP]))
	}
	return p
}

func (dm *demo) showCounters() error {
	dm.section("Datapath counters (pktmeta_stats, summed over CPUs)")
	st, err := dm.d.ReadStats()
	if err != nil {
		return err
	}
	fields := st.Fields()
	for i := 0; i < len(fields); i += 3 {
		cells := make([]string, 0, 3)
		for _, f := range fields[i:min(i+3, len(fields))] {
			cells = append(cells, fmt.Sprintf("%-15s %6d", f.Name, f.Value))
		}
		fmt.Fprintf(dm.out, "  %s\n", strings.Join(cells, "     "))
	}
	fmt.Fprintln(dm.out)
	fmt.Fprintln(dm.out, "  tagged: first packets that created a record; deliveries: records marked delivered at")
	fmt.Fprintln(dm.out, "  the receiver; natResolved: of those, found through conntrack (DNAT); notParsed: packets")
	fmt.Fprintln(dm.out, "  that are not TCP/UDP (IPv6 neighbour discovery, ...). The pin path is this run's alone.")
	return nil
}

func (dm *demo) showCLI() error {
	dm.section("The same, from the CLI")
	args := []string{"--pin-path", dm.pin, "conns"}
	fmt.Fprintf(dm.out, "$ %s %s\n", dm.ctl, strings.Join(args, " "))
	cmd := exec.CommandContext(dm.ctx, dm.ctl, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	dm.out.Write(out)
	if err != nil {
		return fmt.Errorf("%s conns: %w: %s", dm.ctl, err, strings.TrimSpace(stderr.String()))
	}
	return nil
}

func (dm *demo) showKeep() {
	dm.section("--keep: the node stays up until Ctrl-C")
	ctl := dm.ctl + " --pin-path " + dm.pin
	c := dm.conns[1] // through the IPv4 VIP
	node := strings.TrimPrefix(dm.node.NetnsPath, "/run/netns/")
	fmt.Fprintln(dm.out, "  The connections above stay open. From another terminal, as root:")
	fmt.Fprintln(dm.out)
	fmt.Fprintf(dm.out, "  %s conns\n", ctl)
	fmt.Fprintf(dm.out, "  %s lookup --proto tcp --src %s --dst %s\n", ctl, c.seen.Src, c.seen.Dst)
	fmt.Fprintf(dm.out, "  %s events\n", ctl)
	fmt.Fprintln(dm.out, "  # status checks the hooks by ifindex, so run it where the host veths are:")
	fmt.Fprintf(dm.out, "  ip netns exec %s %s status\n", node, ctl)
	fmt.Fprintf(dm.out, "  ip -n %s link show\n", node)
	fmt.Fprintf(dm.out, "  ip netns exec %s conntrack -L\n", node)
	fmt.Fprintln(dm.out)
	fmt.Fprintln(dm.out, "  Press Ctrl-C here to close the connections, delete the pods and clean up.")
}

func tagString(tags map[string]string) string {
	if len(tags) == 0 {
		return "-"
	}
	kv := make([]string, 0, len(tags))
	for k, v := range tags {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func fmtDur(d time.Duration) string {
	if d < time.Millisecond {
		return d.Round(time.Microsecond).String()
	}
	return d.Round(10 * time.Microsecond).String()
}

// podName is namespace/name.
func podName(p *testbed.Pod) string { return p.Spec.Namespace + "/" + p.Spec.Name }
