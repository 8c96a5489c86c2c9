package cniconf

// These tests run the real `pktmeta-agent install` and `uninstall` (the
// commands an operator or an init container runs), built once with go
// build, against temporary dirs: killed at random moments, facing a config
// dir with nothing usable in it, and finding their plugin binary. They do
// not run in parallel with the others: they start many processes and write
// megabytes, which would only make the Watch tests' deadlines harder.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/pktmeta/pktmeta/plugin"
)

// agentBuild is the pktmeta-agent built for this test binary's run.
var agentBuild struct {
	once sync.Once
	dir  string // removed by TestMain
	path string
	err  error
	skip bool
}

func TestMain(m *testing.M) {
	code := m.Run()
	if agentBuild.dir != "" {
		os.RemoveAll(agentBuild.dir)
	}
	os.Exit(code)
}

// agentIn puts the agent into dir (a hard link, or a copy) and returns its
// path there.
func agentIn(t *testing.T, dir string) string {
	t.Helper()
	agentBuild.once.Do(func() {
		goBin, err := exec.LookPath("go")
		if err != nil {
			agentBuild.err, agentBuild.skip = err, true
			return
		}
		if agentBuild.dir, agentBuild.err = os.MkdirTemp("", "pktmeta-agent-build-"); agentBuild.err != nil {
			return
		}
		agentBuild.path = filepath.Join(agentBuild.dir, "pktmeta-agent")
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		// As the Makefile builds it, to share its build cache.
		build := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", agentBuild.path, "github.com/pktmeta/pktmeta/cmd/pktmeta-agent")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			agentBuild.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	switch {
	case agentBuild.skip:
		t.Skipf("cannot build pktmeta-agent: %v", agentBuild.err)
	case agentBuild.err != nil:
		t.Fatal(agentBuild.err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "pktmeta-agent")
	if err := os.Link(agentBuild.path, p); err != nil {
		b, err := os.ReadFile(agentBuild.path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// ptpConflist is a realistic primary config, as kindnet writes it: not
// indented the way we write files, so byte-for-byte restores mean something.
const ptpConflist = `{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp","ipMasq":false,"ipam":{"type":"host-local","dataDir":"/run/cni-ipam-state","routes":[{"dst":"0.0.0.0/0"},{"dst":"::/0"}],"ranges":[[{"subnet":"10.244.1.0/24"}],[{"subnet":"fd00:10:244:1::/64"}]]},"mtu":1500},{"type":"portmap","capabilities":{"portMappings":true}}]}
`

// node is a CNI config dir with a primary conflist, a CNI bin dir, a state
// dir, and a plugin binary to install.
type node struct {
	t                     *testing.T
	agent                 string
	conf, bin, state, pin string
	plugin                string // the binary to install
	pluginData            []byte
	primary               string
	original              []byte
}

func newNode(t *testing.T, agent string, pluginData []byte) *node {
	t.Helper()
	root := t.TempDir()
	n := &node{t: t, agent: agent, conf: filepath.Join(root, "net.d"), bin: filepath.Join(root, "bin"),
		state: filepath.Join(root, "state"), pin: filepath.Join(root, "no-bpffs", "pktmeta"),
		plugin: filepath.Join(root, "build", "pktmeta"), pluginData: pluginData, original: []byte(ptpConflist)}
	n.primary = filepath.Join(n.conf, "10-ptp.conflist")
	for _, d := range []string{n.conf, n.bin, filepath.Dir(n.plugin)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(n.plugin, pluginData, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(n.primary, n.original, 0o644); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n *node) args(cmd string, extra ...string) []string {
	return append([]string{cmd, "--cni-conf-dir", n.conf, "--cni-bin-dir", n.bin, "--state-dir", n.state,
		"--pin-path", n.pin, "--plugin-binary", n.plugin, "--log-level", "debug"}, extra...)
}

// command returns the agent's command line, bounded, and killed at the
// end of the test whatever happens.
func (n *node) command(args []string, env ...string) *exec.Cmd {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	n.t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, n.agent, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 10 * time.Second
	return cmd
}

// run runs the agent and returns its stderr and its exit code.
func (n *node) run(args ...string) (string, int) {
	n.t.Helper()
	cmd := n.command(args)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return stderr.String(), 0
	case errors.As(err, &ee) && ee.Exited():
		return stderr.String(), ee.ExitCode()
	}
	n.t.Fatalf("pktmeta-agent %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	return "", -1
}

// mustRun runs the agent and fails the test unless it succeeds.
func (n *node) mustRun(args ...string) string {
	n.t.Helper()
	out, code := n.run(args...)
	if code != 0 {
		n.t.Fatalf("pktmeta-agent %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

// temps lists our temporary files anywhere in the node's dirs.
func (n *node) temps() []string {
	var found []string
	for _, root := range []string{n.conf, n.bin, n.state, filepath.Dir(n.plugin)} {
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err == nil && isTemp(d.Name()) {
				found = append(found, p)
			}
			return nil
		})
	}
	return found
}

// checkPrimary checks that the conflist is the original, or the original
// with exactly one pktmeta entry, last, that the plugin accepts. It
// returns whether the entry is there, and the entry.
func (n *node) checkPrimary() (bool, map[string]any) {
	n.t.Helper()
	b, err := os.ReadFile(n.primary)
	if err != nil {
		n.t.Fatalf("primary conflist: %v", err)
	}
	if bytes.Equal(b, n.original) {
		return false, nil
	}
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		n.t.Fatalf("conflist neither original nor valid: %v\n%s", err, b)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if !slices.Equal(types, []string{"ptp", "portmap", PluginType}) || list.Name != "kindnet" || list.CNIVersion != "1.0.0" {
		n.t.Fatalf("conflist: %s %s %v, want kindnet 1.0.0 [ptp portmap pktmeta]\n%s", list.Name, list.CNIVersion, types, b)
	}
	// What libcni hands the plugin: the entry with the network's name and
	// version.
	var entry map[string]any
	if err := json.Unmarshal(list.Plugins[2].Bytes, &entry); err != nil {
		n.t.Fatal(err)
	}
	conf := map[string]any{"cniVersion": list.CNIVersion, "name": list.Name}
	for k, v := range entry {
		conf[k] = v
	}
	js, _ := json.Marshal(conf)
	if _, err := plugin.ParseConfig(js); err != nil {
		n.t.Fatalf("the plugin refuses its entry: %v\n%s", err, js)
	}
	if entry["pinPath"] != n.pin {
		n.t.Fatalf("entry %v, want pinPath %s", entry, n.pin)
	}
	return true, entry
}

// checkBinary checks that the installed plugin binary is absent or
// complete and executable, and returns whether it is there.
func (n *node) checkBinary() bool {
	n.t.Helper()
	p := filepath.Join(n.bin, PluginType)
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	if err != nil {
		n.t.Fatal(err)
	}
	fi, err := os.Stat(p)
	if err != nil {
		n.t.Fatal(err)
	}
	if !bytes.Equal(b, n.pluginData) || fi.Mode().Perm() != 0o755 {
		n.t.Fatalf("installed plugin binary: %d of %d bytes (equal: %v), mode %v", len(b), len(n.pluginData), bytes.Equal(b, n.pluginData), fi.Mode())
	}
	return true
}

// installUninstall runs install to the end, checks it (wantEntry, when not
// nil, is the entry, but for its pinPath), then uninstall, and checks that
// everything is as before install.
func (n *node) installUninstall(wantEntry map[string]any) {
	n.t.Helper()
	n.mustRun(n.args("install")...)
	if t := n.temps(); len(t) > 0 {
		n.t.Errorf("after install: temporary files left: %v", t)
	}
	has, entry := n.checkPrimary()
	if wantEntry != nil {
		wantEntry = maps.Clone(wantEntry)
		wantEntry["pinPath"] = n.pin
	}
	if !has || (wantEntry != nil && !reflect.DeepEqual(entry, wantEntry)) {
		n.t.Errorf("after install: entry %v, want %v", entry, wantEntry)
	}
	if !n.checkBinary() {
		n.t.Error("after install: no plugin binary")
	}
	n.mustRun(n.args("uninstall")...)
	if b, err := os.ReadFile(n.primary); err != nil || !bytes.Equal(b, n.original) {
		n.t.Errorf("after uninstall: not the original bytes (%v):\n%s", err, b)
	}
	if fi, err := os.Stat(n.primary); err != nil || fi.Mode().Perm() != 0o644 {
		n.t.Errorf("after uninstall: mode %v, %v", fi.Mode(), err)
	}
	if names := mustNames(n.t, n.conf); !slices.Equal(names, []string{"10-ptp.conflist"}) {
		n.t.Errorf("after uninstall: conf dir holds %v", names)
	}
	if n.checkBinary() {
		n.t.Error("after uninstall: plugin binary still there")
	}
	if t := n.temps(); len(t) > 0 {
		n.t.Errorf("after uninstall: temporary files left: %v", t)
	}
}

// killAtPoint starts install, waits until it pauses at point (the test
// hook PKTMETA_TEST_PAUSE_AT), and SIGKILLs it there.
func (n *node) killAtPoint(point string) {
	n.t.Helper()
	cmd := n.command(n.args("install"), testPauseEnv+"="+point)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		n.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	paused := make(chan struct{})
	out := &testutil.SyncBuffer{}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			out.Write([]byte(sc.Text() + "\n"))
			if strings.HasPrefix(sc.Text(), testPauseEnv+": paused at "+point) {
				close(paused)
				io.Copy(io.Discard, stderr)
				return
			}
		}
	}()
	select {
	case <-paused:
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		cmd.Wait()
		n.t.Fatalf("install never reached %s:\n%s", point, out.String())
	}
}

// killAfter starts install and SIGKILLs it after delay, whatever it is
// doing then (it may have finished).
func (n *node) killAfter(delay time.Duration) {
	n.t.Helper()
	cmd := n.command(n.args("install"))
	if err := cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	time.Sleep(delay)
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
}

// fakePlugin is a plugin binary of a few MB.
func fakePlugin(seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, 4<<20)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	copy(b, "\x7fELF")
	return b
}

func TestInstallKilled(t *testing.T) {
	agent := agentIn(t, t.TempDir())
	pluginData := fakePlugin(1)

	// One undisturbed run: the entry every complete install writes, and
	// how long it takes, to spread the random kills over.
	ref := newNode(t, agent, pluginData)
	start := time.Now()
	ref.mustRun(ref.args("install")...)
	took := time.Since(start)
	_, want := ref.checkPrimary()
	ref.mustRun(ref.args("uninstall")...)
	if want == nil {
		t.Fatal("no entry after install")
	}

	type try struct {
		point string        // kill when paused there
		delay time.Duration // or after this delay
	}
	var tries []try
	// Every moment where a write is half done, done but not in place, or in
	// place but not yet durable: the plugin binary, the backup record, the
	// conflist.
	for _, file := range []string{PluginType, "10-ptp.conflist.json", "10-ptp.conflist"} {
		first := "write"
		if file == PluginType {
			first = "copy"
		}
		for _, stage := range []string{first, "rename", "renamed"} {
			tries = append(tries, try{point: file + ":" + stage})
		}
	}
	seed := rand.Uint64()
	t.Logf("random kills: seed %d, over %v (an undisturbed install took %v)", seed, took*3/2, took)
	r := rand.New(rand.NewPCG(seed, 2))
	for range 16 {
		tries = append(tries, try{delay: time.Duration(r.Int64N(int64(took*3/2) + 1))})
	}

	outcomes := map[string]int{}
	for i, tr := range tries {
		name := fmt.Sprintf("%02d-%s", i, tr.point)
		if tr.point == "" {
			name = fmt.Sprintf("%02d-after-%v", i, tr.delay.Round(time.Microsecond))
		}
		t.Run(name, func(t *testing.T) {
			n := newNode(t, agent, pluginData)
			if tr.point != "" {
				n.killAtPoint(tr.point)
			} else {
				n.killAfter(tr.delay)
			}
			entry, _ := n.checkPrimary()
			binary := n.checkBinary()
			if entry && !binary {
				t.Error("pktmeta in the chain without its binary")
			}
			outcomes[fmt.Sprintf("entry=%v binary=%v temps=%v", entry, binary, len(n.temps()) > 0)]++
			n.installUninstall(want)
		})
	}
	t.Logf("after the kill: %v", outcomes)
}

func TestInstallNoUsablePrimary(t *testing.T) {
	agent := agentIn(t, t.TempDir())
	n := newNode(t, agent, []byte("\x7fELF"))
	os.Remove(n.primary)
	files := []struct{ name, content, reason string }{
		{"00-broken.conflist", `{"cniVersion":"1.0.0","name":`, "not JSON"},
		{"01-empty.conf", "", "empty file"},
		{"02-noplugins.conflist", `{"cniVersion":"1.0.0","name":"x","plugins":[]}`, "no plugins"},
		{"03-notype.conf", `{"cniVersion":"1.0.0","name":"x"}`, "missing 'type'"},
		{"05-old.conflist", `{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"ptp"}]}`, `cniVersion "0.2.0"`},
		{"10-ptp.conflist", ptpConflist, "shadowed by 05-old.conflist"},
		{"10-ptp.conflist.temp", ptpConflist, "not a config file name"},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(n.conf, f.name), []byte(f.content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	installErr := func(stderr string) string {
		t.Helper()
		for _, line := range strings.Split(stderr, "\n") {
			var rec struct{ Msg, Err string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == "install failed" {
				return rec.Err
			}
		}
		t.Fatalf("no error logged:\n%s", stderr)
		return ""
	}
	checkErr := func(msg string) {
		t.Helper()
		for _, f := range files {
			if !strings.Contains(msg, f.name+": "+f.reason) && !strings.Contains(msg, f.name+": not a valid network config: "+f.reason) {
				t.Errorf("error does not say %s: ...%s...:\n%s", f.name, f.reason, msg)
			}
		}
	}

	for _, wait := range []string{"300ms", "0"} {
		stderr, code := n.run(n.args("install", "--wait-for-primary", wait)...)
		if code == 0 {
			t.Fatalf("--wait-for-primary %s: install succeeded:\n%s", wait, stderr)
		}
		msg := installErr(stderr)
		checkErr(msg)
		if wait != "0" && !strings.Contains(msg, "gave up after waiting 300ms") {
			t.Errorf("error: %s", msg)
		}
		if wait != "0" && !strings.Contains(stderr, "waiting up to 300ms") {
			t.Errorf("did not say it waits:\n%s", stderr)
		}
	}
	for _, f := range files {
		if b, err := os.ReadFile(filepath.Join(n.conf, f.name)); err != nil || string(b) != f.content {
			t.Errorf("%s changed", f.name)
		}
	}

	// While it waits, the primary CNI writes its config: installed.
	cmd := n.command(n.args("install", "--wait-for-primary", "2m"))
	stderr := &testutil.SyncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, time.Minute, "install waiting", func() bool {
		return strings.Contains(stderr.String(), "waiting up to 2m0s")
	})
	if err := os.Rename(filepath.Join(n.conf, "10-ptp.conflist.temp"), filepath.Join(n.conf, "04-ptp.conflist")); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("install: %v\n%s", err, stderr)
	}
	n.primary = filepath.Join(n.conf, "04-ptp.conflist")
	if has, _ := n.checkPrimary(); !has {
		t.Error("not installed")
	}
}

func TestDefaultPluginBinary(t *testing.T) {
	root := t.TempDir()
	// dir/pktmeta-agent and dir/pktmeta, as `make build` leaves them; a
	// symlink to the agent elsewhere, beside a decoy.
	dir := filepath.Join(root, "bin")
	agent := agentIn(t, dir)
	beside := []byte("\x7fELF the plugin beside the agent")
	if err := os.WriteFile(filepath.Join(dir, "pktmeta"), beside, 0o755); err != nil {
		t.Fatal(err)
	}
	linkDir := filepath.Join(root, "usr-local-bin")
	os.Mkdir(linkDir, 0o755)
	link := filepath.Join(linkDir, "pktmeta-agent")
	if err := os.Symlink(agent, link); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(linkDir, "pktmeta"), []byte("decoy"), 0o755); err != nil {
		t.Fatal(err)
	}

	n := newNode(t, link, beside)
	noFlag := func(cmd string, extra ...string) []string {
		a := n.args(cmd, extra...)
		i := slices.Index(a, "--plugin-binary")
		return slices.Delete(a, i, i+2)
	}
	// Beside the agent, through the symlink.
	n.mustRun(noFlag("install")...)
	if !n.checkBinary() {
		t.Fatal("plugin not installed")
	}
	n.mustRun(noFlag("uninstall")...)
	if n.checkBinary() {
		t.Fatal("uninstall did not recognise the plugin beside the agent")
	}

	// An explicit flag wins.
	n.pluginData = []byte("\x7fELF built elsewhere")
	os.WriteFile(n.plugin, n.pluginData, 0o755)
	n.mustRun(n.args("install")...)
	if !n.checkBinary() {
		t.Fatal("plugin not installed")
	}
	n.mustRun(noFlag("uninstall")...) // not the one beside the agent: stays
	if !n.checkBinary() {
		t.Fatal("uninstall removed a plugin binary that is not the one given")
	}
	n.mustRun(n.args("uninstall")...)
	if n.checkBinary() {
		t.Fatal("plugin binary not removed")
	}

	// Missing: a clear error naming the path, and nothing changed.
	lone := agentIn(t, filepath.Join(root, "lone"))
	n.agent = lone
	for _, args := range [][]string{noFlag("install"), noFlag("uninstall"), n.args("install", "--plugin-binary", filepath.Join(root, "nope", "pktmeta"))} {
		want := filepath.Join(root, "lone", "pktmeta")
		if slices.Contains(args, filepath.Join(root, "nope", "pktmeta")) {
			want = filepath.Join(root, "nope", "pktmeta")
		}
		stderr, code := n.run(args...)
		if code == 0 || !strings.Contains(stderr, "plugin binary "+want+" does not exist") {
			t.Errorf("%s: exit %d:\n%s", args[0], code, stderr)
		}
	}
	if b, _ := os.ReadFile(n.primary); !bytes.Equal(b, n.original) || n.checkBinary() {
		t.Error("changed the node without a plugin binary")
	}
}
