package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// Result is one measurement: the median of several runs, with the spread.
type Result struct {
	Name   string  `json:"name"`
	Unit   string  `json:"unit"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	Runs   int     `json:"runs"`
	// Baseline names the measurement this one is compared with, and Ratio
	// is median / baseline median.
	Baseline string  `json:"baseline,omitempty"`
	Ratio    float64 `json:"ratio,omitempty"`
	// VsDataMeta is median / the XDP data_meta anchor's median (per-packet
	// measurements only).
	VsDataMeta float64 `json:"vsDataMeta,omitempty"`
	// OverFloor (per-packet) is the median of paired differences: every run
	// of this measurement is preceded by a run of the floor program, so
	// drift of the machine between runs cancels out.
	OverFloor *float64 `json:"overFloorNs,omitempty"`
	Section   string   `json:"section"`
	Note      string   `json:"note,omitempty"`
}

func summarize(name, unit, section string, samples []float64) Result {
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	return Result{Name: name, Unit: unit, Median: median(samples), Min: s[0], Max: s[len(s)-1], Runs: len(s), Section: section}
}

func median(samples []float64) float64 {
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// Report collects results and writes them out.
type Report struct {
	Machine Machine   `json:"machine"`
	Mode    string    `json:"mode"`
	Started time.Time `json:"started"`
	Took    string    `json:"took"`
	Results []Result  `json:"results"`
}

// Machine says where the numbers come from.
type Machine struct {
	Kernel string `json:"kernel"`
	CPUs   int    `json:"cpus"`
	CPU    string `json:"cpu"`
	Go     string `json:"go"`
}

func thisMachine() Machine {
	var u unix.Utsname
	unix.Uname(&u)
	m := Machine{Kernel: unix.ByteSliceToString(u.Release[:]), CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	return m
}

func (r *Report) add(res ...Result) { r.Results = append(r.Results, res...) }

func (r *Report) find(name string) *Result {
	for i := range r.Results {
		if r.Results[i].Name == name {
			return &r.Results[i]
		}
	}
	return nil
}

// compare fills Ratio (and VsDataMeta for per-packet results).
func (r *Report) compare() {
	meta := r.find(nameDataMeta)
	for i := range r.Results {
		res := &r.Results[i]
		if b := r.find(res.Baseline); b != nil && b.Median > 0 && res.Baseline != res.Name {
			res.Ratio = res.Median / b.Median
		}
		if res.Unit == "ns/pkt" && meta != nil && meta.Median > 0 {
			res.VsDataMeta = res.Median / meta.Median
		}
	}
}

// ratiosOnly turns every per-packet figure into its ratio to the floor of
// the same run and drops the nanoseconds: under emulation only how one
// program compares with another run beside it means anything.
func (r *Report) ratiosOnly() {
	floor := r.find(nameFloor)
	if floor == nil || floor.Median <= 0 {
		return
	}
	f := floor.Median
	for i := range r.Results {
		res := &r.Results[i]
		if res.Unit != "ns/pkt" {
			continue
		}
		res.Median, res.Min, res.Max = res.Median/f, res.Min/f, res.Max/f
		res.Unit, res.OverFloor, res.Ratio, res.Baseline = "x floor", nil, 0, ""
	}
}

func (r *Report) writeJSON(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func (r *Report) printSection(w io.Writer, section, title string) {
	if !slices.ContainsFunc(r.Results, func(res Result) bool { return res.Section == section }) {
		return // not run (--only, --emulated)
	}
	fmt.Fprintf(w, "\n== %s\n", title)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "measurement\tmedian\tmin\tmax\tunit\truns\tover floor\tvs baseline\tvs data_meta\t")
	for _, res := range r.Results {
		if res.Section != section {
			continue
		}
		ratio, meta, over := "", "", ""
		if res.OverFloor != nil {
			over = fmt.Sprintf("%+.0f ns", *res.OverFloor)
		}
		if res.Ratio != 0 {
			ratio = fmt.Sprintf("%.2fx %s", res.Ratio, res.Baseline)
		}
		if res.VsDataMeta != 0 {
			meta = fmt.Sprintf("%.2fx", res.VsDataMeta)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\t\n", res.Name, num(res.Median), num(res.Min), num(res.Max), res.Unit, res.Runs, over, ratio, meta)
	}
	tw.Flush()
	for _, res := range r.Results {
		if res.Section == section && res.Note != "" {
			fmt.Fprintf(w, "  %s: %s\n", res.Name, res.Note)
		}
	}
}

func num(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.3gM", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.0f", v)
	case v >= 100:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.2f", v)
}
