// Command summary turns one test-kernels run directory (guest.info, the
// suite, and each entry's go test -json stream) into the one line per
// kernel that make test-kernels prints: the kernel, what the datapath
// found it can do, and the tests passed, failed and skipped, with the
// reason for every skip. It exits 1 when the run is not a pass: a failed
// test, an entry with no result, nothing passed, or a guest that did not
// finish.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

// event is the part of a test2json event the summary reads.
type event struct {
	Action  string
	Package string
	Test    string
	Output  string
}

// featuresMarker starts the line TestKernelFeatures logs: what the
// datapath probed on this kernel (attach mode, conntrack kfuncs, ...).
const featuresMarker = "kernel features: "

type result struct {
	passed, failed, skipped []string
	skips                   map[string]string // test -> reason
	features                string
	took                    string   // the guest's wall time, boot to power-off
	problems                []string // entries that did not finish
}

func main() {
	kernel := flag.String("kernel", "", "the kernel's name for the line")
	expect := flag.String("expect", "", "how TestKernelFeatures must find the kernel: the start of its features line")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: summary -kernel NAME RUN_DIR")
		os.Exit(2)
	}
	r, err := summarize(flag.Arg(0))
	if err != nil {
		fmt.Printf("%s: %v\n", *kernel, err)
		os.Exit(1)
	}
	r.expect(*expect)
	fmt.Println(r.line(*kernel))
	if !r.ok() {
		os.Exit(1)
	}
}

func (r *result) ok() bool {
	return len(r.failed) == 0 && len(r.problems) == 0 && len(r.passed) > 0
}

func (r *result) line(kernel string) string {
	var b strings.Builder
	verdict := "PASS"
	if !r.ok() {
		verdict = "FAIL"
	}
	fmt.Fprintf(&b, "%s %s: ", verdict, kernel)
	if r.features != "" {
		b.WriteString(r.features + "; ")
	}
	fmt.Fprintf(&b, "%d passed, %d failed, %d skipped", len(r.passed), len(r.failed), len(r.skipped))
	if r.took != "" {
		fmt.Fprintf(&b, " in %s", r.took)
	}
	if len(r.failed) > 0 {
		fmt.Fprintf(&b, "; failed: %s", strings.Join(r.failed, ", "))
	}
	for _, p := range r.problems {
		fmt.Fprintf(&b, "; %s", p)
	}
	if len(r.skipped) > 0 {
		// Grouped by reason: a kernel without a feature skips several
		// tests for the same one.
		var reasons []string
		byReason := map[string][]string{}
		for _, t := range r.skipped {
			why := r.skips[t]
			if byReason[why] == nil {
				reasons = append(reasons, why)
			}
			byReason[why] = append(byReason[why], t)
		}
		for _, why := range reasons {
			fmt.Fprintf(&b, "; skipped, %s: %s", why, strings.Join(byReason[why], ", "))
		}
	}
	return b.String()
}

func summarize(dir string) (*result, error) {
	info, err := os.ReadFile(filepath.Join(dir, "guest.info"))
	if err != nil {
		return nil, fmt.Errorf("the guest never started the suite (%w); see %s", err, filepath.Join(dir, "console.log"))
	}
	r := &result{skips: map[string]string{}}
	for _, l := range strings.Split(string(info), "\n") {
		if w, ok := strings.CutPrefix(l, "wall "); ok {
			r.took = w
		}
	}
	if !slices.Contains(strings.Split(string(info), "\n"), "done") {
		r.problems = append(r.problems, "the guest did not finish the suite (timeout or crash; see console.log)")
	}
	suite, err := os.ReadFile(filepath.Join(dir, "suite.tsv"))
	if err != nil {
		return nil, err
	}
	for _, l := range strings.Split(strings.TrimSpace(string(suite)), "\n") {
		name, rest, _ := strings.Cut(l, "\t")
		if name == "" {
			continue
		}
		bin, args, _ := strings.Cut(rest, "\t")
		if !strings.HasSuffix(bin, ".test") {
			r.command(dir, name)
			continue
		}
		ran, err := r.read(filepath.Join(dir, "results", name+".json"))
		if err != nil {
			r.problems = append(r.problems, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		for _, t := range namedTests(args) {
			if !ran[t] {
				r.problems = append(r.problems, fmt.Sprintf("%s: %s did not run (renamed or gone? suite.tsv names it)", name, t))
			}
		}
	}
	sort.Strings(r.passed)
	sort.Strings(r.failed)
	sort.Strings(r.skipped)
	return r, nil
}

// read adds one entry's leaf tests: a test with subtests counts through
// its subtests only.
func (r *result) read(path string) (ran map[string]bool, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("no result: %w", err)
	}
	defer f.Close()
	final := map[string]string{}
	output := map[string][]string{}
	parents := map[string]bool{}
	pkgDone := ""
	dec := json.NewDecoder(bufio.NewReader(f))
	for {
		var e event
		if err := dec.Decode(&e); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, fmt.Errorf("reading %s: %w", path, err)
		}
		if e.Test == "" {
			if e.Action == "pass" || e.Action == "fail" {
				pkgDone = e.Action
			}
			if e.Action == "output" && strings.Contains(e.Output, featuresMarker) && r.features == "" {
				r.features = strings.TrimSpace(e.Output[strings.Index(e.Output, featuresMarker)+len(featuresMarker):])
			}
			continue
		}
		if i := strings.LastIndex(e.Test, "/"); i > 0 {
			parents[e.Test[:i]] = true
		}
		switch e.Action {
		case "output":
			if i := strings.Index(e.Output, featuresMarker); i >= 0 && r.features == "" {
				r.features = strings.TrimSpace(e.Output[i+len(featuresMarker):])
			}
			output[e.Test] = append(output[e.Test], e.Output)
		case "pass", "fail", "skip":
			final[e.Test] = e.Action
		}
	}
	for t, a := range final {
		if parents[t] && a != "fail" {
			continue
		}
		if parents[t] {
			// A parent fails when a subtest did; count it only when
			// no subtest carries the failure (it failed itself).
			if anySubFailed(final, t) {
				continue
			}
		}
		switch a {
		case "pass":
			r.passed = append(r.passed, t)
		case "fail":
			r.failed = append(r.failed, t)
		case "skip":
			r.skipped = append(r.skipped, t)
			r.skips[t] = skipReason(output[t])
		}
	}
	if pkgDone == "" {
		return nil, fmt.Errorf("the test binary did not finish")
	}
	if pkgDone == "fail" && len(r.failed) == 0 {
		return nil, fmt.Errorf("the test binary failed outside a test")
	}
	ran = map[string]bool{}
	for t := range final {
		ran[t] = true
	}
	return ran, nil
}

// namedTests are the top-level tests an entry's -test.run names when it
// is a plain list (^(TestA|TestB)$ or ^TestA$): each must have run.
func namedTests(args string) []string {
	for _, a := range strings.Fields(args) {
		re, ok := strings.CutPrefix(a, "-test.run=")
		if !ok {
			continue
		}
		re = strings.TrimSuffix(strings.TrimPrefix(re, "^"), "$")
		re = strings.TrimSuffix(strings.TrimPrefix(re, "("), ")")
		names := strings.Split(re, "|")
		for _, n := range names {
			if n == "" || strings.ContainsFunc(n, func(c rune) bool {
				return !(c == '_' || c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z')
			}) {
				return nil // a real regexp: nothing to check by name
			}
		}
		return names
	}
	return nil
}

// expect adds a problem when the kernel's features are not what the
// matrix says the kernel has.
func (r *result) expect(want string) {
	if want != "" && !strings.HasPrefix(r.features, want) {
		r.problems = append(r.problems, fmt.Sprintf("the matrix expects %q, the kernel was found %q", want, r.features))
	}
}

// command adds an entry that is a command, not a test binary: it passed
// when it exited 0.
func (r *result) command(dir, name string) {
	b, err := os.ReadFile(filepath.Join(dir, "results", name+".exit"))
	switch {
	case err != nil:
		r.problems = append(r.problems, fmt.Sprintf("%s: did not finish", name))
	case strings.TrimSpace(string(b)) == "0":
		r.passed = append(r.passed, name)
	default:
		r.failed = append(r.failed, fmt.Sprintf("%s (exit %s; see results/%s.log)", name, strings.TrimSpace(string(b)), name))
	}
}

func anySubFailed(final map[string]string, parent string) bool {
	for t, a := range final {
		if a == "fail" && strings.HasPrefix(t, parent+"/") {
			return true
		}
	}
	return false
}

// skipReason is the message t.Skip gave: the last output line of the test
// that is not the SKIP line itself.
func skipReason(lines []string) string {
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if l == "" || strings.HasPrefix(l, "--- SKIP") || strings.HasPrefix(l, "=== ") {
			continue
		}
		// "file_test.go:12: reason"
		if _, msg, ok := strings.Cut(l, ": "); ok && strings.Contains(l[:strings.Index(l, ": ")], ".go:") {
			return msg
		}
		return l
	}
	return "no reason given"
}
