package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A run directory as guest.sh leaves it, with go test -json streams.
func writeRun(t *testing.T, info string, suite string, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "results"), 0o755)
	os.WriteFile(filepath.Join(dir, "guest.info"), []byte(info), 0o644)
	os.WriteFile(filepath.Join(dir, "suite.tsv"), []byte(suite), 0o644)
	for name, body := range files {
		os.WriteFile(filepath.Join(dir, "results", name), []byte(body), 0o644)
	}
	return dir
}

const stream = `{"Action":"start","Package":"e2e"}
{"Action":"run","Package":"e2e","Test":"TestKernelFeatures"}
{"Action":"output","Package":"e2e","Test":"TestKernelFeatures","Output":"    kernel_test.go:99: kernel features: attach=legacy tcx=no conntrack-kfuncs=yes\n"}
{"Action":"pass","Package":"e2e","Test":"TestKernelFeatures"}
{"Action":"run","Package":"e2e","Test":"TestUpgrade"}
{"Action":"run","Package":"e2e","Test":"TestUpgrade/tcx"}
{"Action":"output","Package":"e2e","Test":"TestUpgrade/tcx","Output":"    lifecycle_test.go:390: Linux 6.1 has no tcx (6.6): attach mode tcx cannot run here\n"}
{"Action":"output","Package":"e2e","Test":"TestUpgrade/tcx","Output":"--- SKIP: TestUpgrade/tcx (0.00s)\n"}
{"Action":"skip","Package":"e2e","Test":"TestUpgrade/tcx"}
{"Action":"run","Package":"e2e","Test":"TestUpgrade/legacy"}
{"Action":"pass","Package":"e2e","Test":"TestUpgrade/legacy"}
{"Action":"pass","Package":"e2e","Test":"TestUpgrade"}
{"Action":"pass","Package":"e2e"}
`

func TestSummaryCountsLeavesAndGivesSkipReasons(t *testing.T) {
	dir := writeRun(t, "kernel 6.1\ndone\n", "e2e\te2e.test\t-test.run=^(TestKernelFeatures|TestUpgrade)$\n", map[string]string{"e2e.json": stream})
	r, err := summarize(dir)
	if err != nil {
		t.Fatal(err)
	}
	line := r.line("6.1")
	for _, want := range []string{
		"PASS 6.1: attach=legacy tcx=no conntrack-kfuncs=yes; 2 passed, 0 failed, 1 skipped",
		"skipped, Linux 6.1 has no tcx (6.6): attach mode tcx cannot run here: TestUpgrade/tcx",
	} {
		if !strings.Contains(line, want) {
			t.Errorf("line %q lacks %q", line, want)
		}
	}
	if !r.ok() {
		t.Error("a run with passes, a skip and no failure is not ok")
	}
}

func TestSummaryFailsWhatDidNotFinish(t *testing.T) {
	failing := strings.Replace(stream, `{"Action":"pass","Package":"e2e","Test":"TestUpgrade/legacy"}`, `{"Action":"fail","Package":"e2e","Test":"TestUpgrade/legacy"}`, 1)
	failing = strings.Replace(failing, `{"Action":"pass","Package":"e2e","Test":"TestUpgrade"}`, `{"Action":"fail","Package":"e2e","Test":"TestUpgrade"}`, 1)
	failing = strings.Replace(failing, `{"Action":"pass","Package":"e2e"}`, `{"Action":"fail","Package":"e2e"}`, 1)
	truncated := stream[:strings.Index(stream, `{"Action":"pass","Package":"e2e"}`)]
	for _, c := range []struct {
		name, info, suite string
		files             map[string]string
		want              string
	}{
		{"a failed subtest", "done\n", "e2e\te2e.test\t\n", map[string]string{"e2e.json": failing}, "failed: TestUpgrade/legacy"},
		{"a binary that crashed", "done\n", "e2e\te2e.test\t\n", map[string]string{"e2e.json": truncated}, "did not finish"},
		{"an entry with no result", "done\n", "e2e\te2e.test\t\nx\tx.test\t\n", map[string]string{"e2e.json": stream}, "x: no result"},
		{"a guest that never finished", "kernel 6.1\n", "e2e\te2e.test\t\n", map[string]string{"e2e.json": stream}, "did not finish the suite"},
		{"a command that failed", "done\n", "bench\tbench\t\n", map[string]string{"bench.exit": "1\n"}, "bench (exit 1"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r, err := summarize(writeRun(t, c.info, c.suite, c.files))
			if err != nil {
				t.Fatal(err)
			}
			if line := r.line("k"); r.ok() || !strings.Contains(line, c.want) {
				t.Fatalf("ok %v, line %q, want a failure saying %q", r.ok(), line, c.want)
			}
		})
	}
}

// A kernel found with less than the matrix says it has fails, even when
// every test passed or skipped.
func TestSummaryChecksTheExpectedFeatures(t *testing.T) {
	dir := writeRun(t, "done\n", "e2e\te2e.test\t\n", map[string]string{"e2e.json": stream})
	r, err := summarize(dir)
	if err != nil {
		t.Fatal(err)
	}
	r.expect("attach=legacy tcx=no conntrack-kfuncs=yes")
	if !r.ok() {
		t.Fatalf("the expected features failed: %s", r.line("6.1"))
	}
	r.expect("attach=tcx")
	if line := r.line("6.1"); r.ok() || !strings.Contains(line, `the matrix expects "attach=tcx"`) {
		t.Fatalf("ok %v: %s", r.ok(), line)
	}
}

// A test suite.tsv names that no longer exists is a failure, not a
// quietly smaller suite.
func TestSummaryNeedsEveryNamedTest(t *testing.T) {
	for _, c := range []struct {
		args string
		ok   bool
	}{
		{"-test.run=^(TestKernelFeatures|TestUpgrade)$ -test.timeout=1m", true},
		{"-test.run=^TestKernelFeatures$", true},
		{"-test.run=^(TestKernelFeatures|TestRenamed)$", false},
		{"-test.run=Test.* -test.timeout=1m", true}, // a regexp: not checked by name
	} {
		r, err := summarize(writeRun(t, "done\n", "e2e\te2e.test\t"+c.args+"\n", map[string]string{"e2e.json": stream}))
		if err != nil {
			t.Fatal(err)
		}
		if line := r.line("k"); r.ok() != c.ok || (!c.ok && !strings.Contains(line, "TestRenamed did not run")) {
			t.Errorf("%s: ok %v, want %v: %s", c.args, r.ok(), c.ok, line)
		}
	}
}
