package main

import (
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/pktmeta/pktmeta/internal/attach"
	"github.com/pktmeta/pktmeta/internal/datapath"
)

type programStatus struct {
	Name     string `json:"name"`
	ID       uint32 `json:"id"`
	Tag      string `json:"tag"`
	RunCount uint64 `json:"runCount,omitempty"`
	RunTime  string `json:"runTime,omitempty"`
}

type attachmentStatus struct {
	Workload    uint32            `json:"workload"`
	Namespace   string            `json:"namespace,omitempty"`
	Pod         string            `json:"pod,omitempty"`
	ContainerID string            `json:"containerID"`
	IfName      string            `json:"ifname"`
	HostIfName  string            `json:"hostIfname"`
	HostIfindex uint32            `json:"hostIfindex"`
	Mode        string            `json:"mode"`
	Strict      bool              `json:"strict,omitempty"`
	Ingress     string            `json:"ingress"`
	Egress      string            `json:"egress"`
	Tags        map[string]string `json:"tags,omitempty"`
	// PodTags are claimed by the pod itself (annotations, labels).
	PodTags map[string]string `json:"podTags,omitempty"`
	// What the datapath counts for this pod (see README, Trust).
	Addresses      []string `json:"addresses"`
	Live           int64    `json:"live"`
	MaxConnections uint32   `json:"maxConnections"`
	Spoofed        uint64   `json:"spoofed"`
	OverBudget     uint64   `json:"overBudget"`
	TableFull      uint64   `json:"tableFull"`
	NotParty       uint64   `json:"notParty"`
	EventsLimited  uint64   `json:"eventsLimited"`
}

// kernelStatus is what the running kernel lets the datapath do: tcx is
// probed now, the conntrack kfuncs are as the programs were loaded.
type kernelStatus struct {
	Release         string `json:"release"`
	TCX             bool   `json:"tcx"`
	ConntrackKfuncs bool   `json:"conntrackKfuncs"`
}

type status struct {
	PinPath       string             `json:"pinPath"`
	LayoutVersion uint32             `json:"layoutVersion"`
	Release       uint32             `json:"release"`
	DatapathID    string             `json:"datapathID"`
	Current       bool               `json:"current"`
	UDPTimeout    string             `json:"udpTimeout"`
	Kernel        kernelStatus       `json:"kernel"`
	Programs      []programStatus    `json:"programs"`
	Attachments   []attachmentStatus `json:"attachments"`
	Maps          []datapath.MapFill `json:"maps"`
	Counters      map[string]uint64  `json:"counters"`
	// Node is this node's part in carrying origins across nodes.
	Node nodeStatus `json:"node"`
	// Apps: whether applications can ask their sockets who opened their
	// connections (getsockopt SOL_PKTMETA).
	Apps         datapath.AppsState `json:"apps"`
	counterOrder []string
	Problems     []string `json:"problems,omitempty"`
}

func cmdStatus(pinPath string, args []string, out io.Writer) error {
	fs, output := newFlags("status")
	if err := parse(fs, output, args); err != nil {
		return err
	}
	d, err := open(pinPath)
	if err != nil {
		return err
	}
	defer d.Close()
	st, err := collectStatus(d)
	if err != nil {
		return err
	}
	if *output == "json" {
		if err := writeJSON(out, st); err != nil {
			return err
		}
	} else {
		printStatus(out, st)
	}
	if len(st.Problems) > 0 {
		return &exitError{1, fmt.Sprintf("%d problem(s) found", len(st.Problems))}
	}
	return nil
}

func collectStatus(d *datapath.Datapath) (*status, error) {
	cfg, err := d.ReadConfig()
	if err != nil {
		return nil, err
	}
	id := datapath.ID()
	st := &status{
		PinPath:       d.PinPath,
		LayoutVersion: cfg.LayoutVersion,
		Release:       cfg.Release,
		DatapathID:    hex.EncodeToString(cfg.DatapathID[:8]),
		Current:       cfg.DatapathID == id && cfg.Release == datapath.Release,
		UDPTimeout:    cfg.UDPTimeout.String(),
		Counters:      map[string]uint64{},
	}
	kf := datapath.KernelFeatures{TCX: attach.HaveTCX(), ConntrackKfuncs: !cfg.NoConntrack, Apps: d.Getsockopt != nil, AppsUDP: d.Recvmsg4 != nil && d.Recvmsg6 != nil}
	st.Kernel = kernelStatus{Release: datapath.KernelRelease(), TCX: kf.TCX, ConntrackKfuncs: kf.ConntrackKfuncs}
	for _, m := range kf.Missing() {
		st.Problems = append(st.Problems, "the datapath was loaded with "+m)
	}
	switch {
	case cfg.Release > datapath.Release:
		st.Problems = append(st.Problems, fmt.Sprintf("pinned datapath is release %d, newer than this pktmetactl (%d): use the pktmetactl of the installed release", cfg.Release, datapath.Release))
	case !st.Current:
		st.Problems = append(st.Problems, fmt.Sprintf("pinned programs are release %d, another build than this pktmetactl (release %d); the next CNI ADD, or the agent at start, upgrades an older one", cfg.Release, datapath.Release))
	}
	st.Apps = d.Apps()
	if st.Apps.Attached && !st.Apps.Current {
		st.Problems = append(st.Problems, "application interface: "+st.Apps.Problem+" (the next CNI ADD moves it)")
	}
	for _, name := range []string{datapath.ProgOrigin, datapath.ProgStrict, datapath.ProgDeliver, datapath.ProgSweep, datapath.ProgGetsockopt, datapath.ProgRecvmsg4, datapath.ProgRecvmsg6} {
		p := d.Program(name)
		if p == nil && (name == datapath.ProgGetsockopt || name == datapath.ProgRecvmsg4 || name == datapath.ProgRecvmsg6) {
			continue // said above, with the kernel feature it lacks
		}
		if p == nil {
			st.Problems = append(st.Problems, fmt.Sprintf("program %s is not pinned (the next CNI ADD, or the agent at start, completes the datapath)", name))
			continue
		}
		info, err := p.Info()
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", name, err)
		}
		pid, _ := info.ID()
		ps := programStatus{Name: info.Name, ID: uint32(pid), Tag: info.Tag}
		// Non-zero only while kernel.bpf_stats_enabled=1.
		if s, err := p.Stats(); err == nil && s.RunCount > 0 {
			ps.RunCount = s.RunCount
			ps.RunTime = s.Runtime.String()
		}
		st.Programs = append(st.Programs, ps)
	}

	workloads, err := d.Workloads()
	if err != nil {
		return nil, err
	}
	eps, err := d.ListEndpoints()
	if err != nil {
		return nil, err
	}
	ownNetns, err := datapath.CurrentNetns()
	if err != nil {
		return nil, err
	}
	for _, w := range workloads {
		as := attachmentStatus{
			Workload: w.ID, Namespace: w.Namespace, Pod: w.Pod, ContainerID: w.ContainerID, IfName: w.IfName,
			HostIfName: w.HostIfName, HostIfindex: w.HostIfindex, Mode: "tcx", Strict: w.Strict, Tags: w.Tags, PodTags: w.PodTags,
			Ingress: "-", Egress: "-", Addresses: []string{},
		}
		if w.Legacy {
			as.Mode = "legacy"
		}
		if w.NoEgress {
			as.Egress = "unavailable (ingress qdisc present, no clsact)"
		}
		if err := hookStates(d, w, ownNetns, &as); err != nil {
			as.Ingress, as.Egress = "unknown: "+err.Error(), "unknown: "+err.Error()
		}
		for _, h := range []struct {
			name, state string
		}{{"ingress", as.Ingress}, {"egress", as.Egress}} {
			if !strings.HasPrefix(h.state, "ok") && !strings.HasPrefix(h.state, "unavailable") {
				st.Problems = append(st.Problems, fmt.Sprintf("%s (%s): %s hook %s", podName(w), w.HostIfName, h.name, h.state))
			}
		}
		if ep, ok := eps[w.HostIfindex]; ok && ep.Workload == w.ID {
			for _, a := range ep.Addrs {
				as.Addresses = append(as.Addresses, a.String())
			}
			as.Live, as.MaxConnections = ep.Live, ep.MaxConnections
			as.Spoofed, as.OverBudget, as.TableFull, as.NotParty, as.EventsLimited = ep.Spoofed, ep.OverBudget, ep.TableFull, ep.NotParty, ep.EventsLimited
			st.Problems = append(st.Problems, podProblems(w, ep)...)
		} else {
			st.Problems = append(st.Problems, fmt.Sprintf("%s (%s): registered, but no endpoint: its veth creates no records", podName(w), w.HostIfName))
		}
		st.Attachments = append(st.Attachments, as)
	}

	st.Maps = d.MapFill()

	stats, err := d.ReadStats()
	if err != nil {
		return nil, err
	}
	for _, f := range stats.Fields() {
		st.Counters[f.Name] = f.Value
		st.counterOrder = append(st.counterOrder, f.Name)
	}
	if stats.TableFull > 0 {
		st.Problems = append(st.Problems, fmt.Sprintf("the connection table was full %d times: those connections were not tagged (raise maxConnections, or lower maxConnectionsPerPod)", stats.TableFull))
	}
	if stats.TableBusy > 0 {
		st.Problems = append(st.Problems, fmt.Sprintf("%d changes to the connection table were given up: other CPUs held the connection's chunk too long (tableBusy; see docs/ARCHITECTURE.md)", stats.TableBusy))
	}
	if stats.AliasesFull > 0 {
		st.Problems = append(st.Problems, fmt.Sprintf("the alias table was full %d times: those connections behind Service NAT were not delivered", stats.AliasesFull))
	}
	if stats.EventsDropped > 0 {
		st.Problems = append(st.Problems, fmt.Sprintf("%d events were dropped: the ring buffer was full (no reader, or a slow one; the agent is its reader)", stats.EventsDropped))
	}
	if st.Node, err = readNodeStatus(d); err != nil {
		return nil, err
	}
	for _, u := range st.Node.Uplinks {
		if p := hookProblems(u.Hooks); p != "" {
			st.Problems = append(st.Problems, "uplink "+u.IfName+p)
		}
	}
	if st.Node.ID != 0 && len(st.Node.Uplinks) == 0 {
		st.Problems = append(st.Problems, fmt.Sprintf("node id %d is set but no uplink carries the programs: nothing leaves or arrives with an origin (pktmetactl node set --uplink IF)", st.Node.ID))
	}
	return st, nil
}

// hookStates fills the hook columns from the hook table, which says what
// must be on each hook of the veth (the same table attach and CHECK use).
func hookStates(d *datapath.Datapath, w datapath.Workload, ownNetns uint64, as *attachmentStatus) error {
	if w.HostNetns != 0 && w.HostNetns != ownNetns {
		return fmt.Errorf("its veth is in network namespace %d and pktmetactl runs in %d: run it in the host's (nsenter --net=...)", w.HostNetns, ownNetns)
	}
	hooks, err := d.HookStatus(w)
	if err != nil {
		return err
	}
	got, err := attach.Query(int(w.HostIfindex))
	if err != nil {
		return err
	}
	for _, h := range hooks {
		state := "missing"
		if h.OK {
			state = "ok"
			if prios := got.ForeignBefore[h.Hook]; len(prios) > 0 {
				state = fmt.Sprintf("ok, after foreign filters at prio %v: packets they redirect are not seen", prios)
			}
		} else if h.ProgramID == 0 {
			state = "missing: " + h.Problem
		}
		switch h.Hook {
		case attach.Ingress:
			as.Ingress = state
		case attach.Egress:
			as.Egress = state
		}
	}
	return nil
}

// podProblems are what the datapath counted against one pod.
func podProblems(w datapath.Workload, ep datapath.Endpoint) []string {
	var out []string
	name := fmt.Sprintf("%s (%s)", podName(w), w.HostIfName)
	if len(ep.Addrs) == 0 {
		out = append(out, name+": no addresses from the primary plugin: nothing it sends is tagged")
	}
	if ep.Spoofed > 0 {
		out = append(out, fmt.Sprintf("%s: sent %d packets with a source address that is not its own (%v); none was tagged", name, ep.Spoofed, ep.Addrs))
	}
	if ep.OverBudget > 0 {
		out = append(out, fmt.Sprintf("%s: %d connections went untagged over its budget of %d records (maxConnectionsPerPod)", name, ep.OverBudget, ep.MaxConnections))
	}
	if ep.TableFull > 0 {
		out = append(out, fmt.Sprintf("%s: %d connections went untagged: the table was full", name, ep.TableFull))
	}
	if ep.NotParty > 0 {
		out = append(out, fmt.Sprintf("%s: tried %d times to change a connection it is not a party to (another pod with its address?)", name, ep.NotParty))
	}
	return out
}

func podName(w datapath.Workload) string {
	if w.Pod != "" {
		return w.Namespace + "/" + w.Pod
	}
	return "container " + w.ContainerID
}

func printStatus(out io.Writer, st *status) {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "pin path\t%s\n", st.PinPath)
	fmt.Fprintf(tw, "layout version\t%d\n", st.LayoutVersion)
	fmt.Fprintf(tw, "release\t%d\n", st.Release)
	fmt.Fprintf(tw, "datapath id\t%s (this build: %v)\n", st.DatapathID, st.Current)
	fmt.Fprintf(tw, "udp timeout\t%s\n", st.UDPTimeout)
	fmt.Fprintf(tw, "kernel\t%s (tcx: %s, conntrack kfuncs: %s)\n", st.Kernel.Release, yesNo(st.Kernel.TCX), yesNo(st.Kernel.ConntrackKfuncs))
	apps := "not attached: getsockopt(SOL_PKTMETA) is not answered (plugin applicationCgroup \"none\", or no cgroup v2 mount; the next ADD tries again)"
	if st.Apps.Attached {
		apps = fmt.Sprintf("getsockopt(SOL_PKTMETA) answered on cgroup id %d", st.Apps.CgroupID)
		if !st.Apps.UDP {
			apps += " (not for unconnected UDP sockets)"
		}
		if !st.Apps.Current {
			apps += ", " + st.Apps.Problem
		}
	}
	fmt.Fprintf(tw, "applications\t%s\n", apps)
	tw.Flush()

	fmt.Fprintln(out, "\nPROGRAMS")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tID\tTAG\tRUNS\tRUN-TIME")
	for _, p := range st.Programs {
		runs, rt := "-", "-"
		if p.RunCount > 0 {
			runs, rt = strconv.FormatUint(p.RunCount, 10), p.RunTime
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", p.Name, p.ID, p.Tag, runs, rt)
	}
	tw.Flush()

	fmt.Fprintln(out, "\nATTACHMENTS")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WORKLOAD\tPOD\tCONTAINER\tIFNAME\tHOST-VETH\tMODE\tINGRESS\tEGRESS\tLIVE/MAX\tSPOOFED\tOVER-BUDGET\tTAGS\tPOD-TAGS")
	for _, a := range st.Attachments {
		pod := a.Namespace + "/" + a.Pod
		if a.Pod == "" {
			pod = "-"
		}
		mode := a.Mode
		if a.Strict {
			mode += ",strict"
		}
		fmt.Fprintf(tw, "%d\t%s\t%.12s\t%s\t%s(%d)\t%s\t%s\t%s\t%d/%d\t%d\t%d\t%s\t%s\n", a.Workload, pod, a.ContainerID, a.IfName, a.HostIfName, a.HostIfindex, mode,
			a.Ingress, a.Egress, a.Live, a.MaxConnections, a.Spoofed, a.OverBudget, tagString(a.Tags), tagString(a.PodTags))
	}
	tw.Flush()

	fmt.Fprintln(out, "\nMAPS")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tENTRIES\tMAX\tFILL")
	for _, m := range st.Maps {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f%%\n", m.Name, m.Entries, m.Max, 100*float64(m.Entries)/float64(m.Max))
	}
	tw.Flush()

	fmt.Fprintln(out, "\nACROSS NODES")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node id\t%d (MAC: %s, remote records %d of at most %d, %d member prefixes)\n", st.Node.ID, yesNo(st.Node.MAC), st.Node.LiveRemote, st.Node.MaxRemote, len(st.Node.Members))
	for _, u := range st.Node.Uplinks {
		fmt.Fprintf(tw, "uplink\t%s (ifindex %d, %s)%s\n", u.IfName, u.Ifindex, u.Mode, hookProblems(u.Hooks))
	}
	for _, f := range st.Node.Stats.Fields() {
		if f.Value > 0 {
			fmt.Fprintf(tw, "%s\t%d\n", f.Name, f.Value)
		}
	}
	tw.Flush()

	fmt.Fprintln(out, "\nCOUNTERS")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	for _, name := range st.counterOrder {
		fmt.Fprintf(tw, "%s\t%d\n", name, st.Counters[name])
	}
	tw.Flush()

	if len(st.Problems) > 0 {
		fmt.Fprintln(out, "\nPROBLEMS")
		for _, p := range st.Problems {
			fmt.Fprintln(out, "  "+p)
		}
	}
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
