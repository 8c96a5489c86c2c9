package main

import (
	"encoding/hex"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/cilium/ebpf"
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
}

type status struct {
	PinPath       string             `json:"pinPath"`
	LayoutVersion uint32             `json:"layoutVersion"`
	DatapathID    string             `json:"datapathID"`
	Current       bool               `json:"current"`
	UDPTimeout    string             `json:"udpTimeout"`
	Programs      []programStatus    `json:"programs"`
	Attachments   []attachmentStatus `json:"attachments"`
	Maps          []datapath.MapFill `json:"maps"`
	Counters      map[string]uint64  `json:"counters"`
	counterOrder  []string
	Problems      []string `json:"problems,omitempty"`
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
		DatapathID:    hex.EncodeToString(cfg.DatapathID[:8]),
		Current:       cfg.DatapathID == id,
		UDPTimeout:    cfg.UDPTimeout.String(),
		Counters:      map[string]uint64{},
	}
	if !st.Current {
		st.Problems = append(st.Problems, "pinned programs come from another build than this pktmetactl; the next CNI ADD upgrades them")
	}
	progIDs := map[string]ebpf.ProgramID{}
	if err := d.OpenPrograms(); err != nil {
		st.Problems = append(st.Problems, fmt.Sprintf("pinned programs: %v (the next CNI ADD loads them)", err))
	}
	for _, name := range []string{datapath.ProgOrigin, datapath.ProgStrict, datapath.ProgDeliver} {
		if d.Program(name) == nil {
			continue
		}
		info, err := d.Program(name).Info()
		if err != nil {
			return nil, fmt.Errorf("program %s: %w", name, err)
		}
		pid, _ := info.ID()
		progIDs[name] = pid
		ps := programStatus{Name: info.Name, ID: uint32(pid), Tag: info.Tag}
		// Non-zero only while kernel.bpf_stats_enabled=1.
		if s, err := d.Program(name).Stats(); err == nil && s.RunCount > 0 {
			ps.RunCount = s.RunCount
			ps.RunTime = s.Runtime.String()
		}
		st.Programs = append(st.Programs, ps)
	}

	workloads, err := d.Workloads()
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
			HostIfName: w.HostIfName, HostIfindex: w.HostIfindex, Mode: "tcx", Strict: w.Strict, Tags: w.Tags,
		}
		if w.Legacy {
			as.Mode = "legacy"
		}
		var got attach.Attached
		if w.HostNetns != 0 && w.HostNetns != ownNetns {
			err = fmt.Errorf("its veth is in network namespace %d and pktmetactl runs in %d: run it in the host's (nsenter --net=...)", w.HostNetns, ownNetns)
		} else {
			got, err = attach.Query(int(w.HostIfindex))
		}
		ingressWant := progIDs[datapath.ProgOrigin]
		if w.Strict {
			ingressWant = progIDs[datapath.ProgStrict]
		}
		hookState := func(h attach.Hook, want ebpf.ProgramID) string {
			switch {
			case err != nil:
				return "unknown: " + err.Error()
			case got.Has(h, want):
				return "ok"
			}
			return "missing"
		}
		as.Ingress = hookState(attach.Ingress, ingressWant)
		as.Egress = hookState(attach.Egress, progIDs[datapath.ProgDeliver])
		if prios := got.ForeignBefore[attach.Ingress]; as.Ingress == "ok" && len(prios) > 0 {
			as.Ingress = fmt.Sprintf("ok, after foreign filters at prio %v: packets they redirect are not seen", prios)
		}
		if w.NoEgress {
			as.Egress = "unavailable (ingress qdisc present, no clsact)"
		}
		for _, h := range []struct {
			name, state string
		}{{"ingress", as.Ingress}, {"egress", as.Egress}} {
			if !strings.HasPrefix(h.state, "ok") && !strings.HasPrefix(h.state, "unavailable") {
				st.Problems = append(st.Problems, fmt.Sprintf("%s (%s): %s hook %s", podName(w), w.HostIfName, h.name, h.state))
			}
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
	return st, nil
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
	fmt.Fprintf(tw, "datapath id\t%s (this build: %v)\n", st.DatapathID, st.Current)
	fmt.Fprintf(tw, "udp timeout\t%s\n", st.UDPTimeout)
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
	fmt.Fprintln(tw, "WORKLOAD\tPOD\tCONTAINER\tIFNAME\tHOST-VETH\tMODE\tINGRESS\tEGRESS\tTAGS")
	for _, a := range st.Attachments {
		pod := a.Namespace + "/" + a.Pod
		if a.Pod == "" {
			pod = "-"
		}
		mode := a.Mode
		if a.Strict {
			mode += ",strict"
		}
		fmt.Fprintf(tw, "%d\t%s\t%.12s\t%s\t%s(%d)\t%s\t%s\t%s\t%s\n", a.Workload, pod, a.ContainerID, a.IfName, a.HostIfName, a.HostIfindex, mode, a.Ingress, a.Egress, tagString(a.Tags))
	}
	tw.Flush()

	fmt.Fprintln(out, "\nMAPS")
	tw = tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tENTRIES\tMAX\tFILL")
	for _, m := range st.Maps {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%.1f%%\n", m.Name, m.Entries, m.Max, 100*float64(m.Entries)/float64(m.Max))
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
