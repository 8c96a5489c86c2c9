package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/pktmeta/pktmeta/internal/testutil"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// hangGuard bounds every wait in these tests. It is not a timing
// assertion: only a test that would otherwise hang reaches it.
const hangGuard = 20 * time.Second

// runSync runs a subcommand to completion in-process.
func runSync(t *testing.T, stdin string, args ...string) (int, []obj, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(stdin), &stdout, &stderr)
	return code, decodeLines(t, stdout.Bytes()), stderr.String()
}

func decodeLines(t *testing.T, b []byte) []obj {
	t.Helper()
	var out []obj
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var m obj
		if err := json.Unmarshal(line, &m); err != nil {
			t.Fatalf("output line %q is not JSON: %v", line, err)
		}
		out = append(out, m)
	}
	return out
}

// running is a subcommand running in-process until cancelled.
type running struct {
	t      *testing.T
	cancel context.CancelFunc
	lines  chan obj
	code   chan int
	stderr testutil.SyncBuffer
}

func start(t *testing.T, args ...string) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	r := &running{t: t, cancel: cancel, lines: make(chan obj, 1000), code: make(chan int, 1)}
	go func() {
		code := run(ctx, args, strings.NewReader(""), pw, &r.stderr)
		pw.Close()
		r.code <- code
	}()
	go func() {
		defer close(r.lines)
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 4<<20)
		for sc.Scan() {
			var m obj
			if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
				t.Errorf("%v: output line %q is not JSON: %v", args, sc.Bytes(), err)
				continue
			}
			r.lines <- m
		}
	}()
	t.Cleanup(cancel)
	return r
}

// next returns the next line whose "event" is event, failing on an
// "error" event unless that is what was asked for.
func (r *running) next(event string) obj {
	r.t.Helper()
	timeout := time.After(hangGuard)
	for {
		select {
		case m, ok := <-r.lines:
			if !ok {
				r.t.Fatalf("output ended before a %q event; stderr: %s", event, r.stderr.String())
			}
			if m["event"] == event {
				return m
			}
			if m["event"] == "error" {
				r.t.Fatalf("unexpected error event %v", m)
			}
		case <-timeout:
			r.t.Fatalf("no %q event; stderr: %s", event, r.stderr.String())
		}
	}
}

// wait returns the exit status.
func (r *running) wait() int {
	r.t.Helper()
	select {
	case c := <-r.code:
		return c
	case <-time.After(hangGuard):
		r.t.Fatal("did not exit")
		return -1
	}
}

// stop cancels (SIGTERM, in the binary) and returns the exit status.
func (r *running) stop() int {
	r.cancel()
	return r.wait()
}

// --- forge ---

// sum16 is a deliberately naive Internet checksum, independent of the
// one under test: the one's-complement sum of 16-bit words.
func sum16(b []byte) uint16 {
	var s uint64
	for i := 0; i+1 < len(b); i += 2 {
		s += uint64(b[i])<<8 | uint64(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint64(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return ^uint16(s)
}

func TestChecksumKnownVector(t *testing.T) {
	// An IPv4 header whose checksum is 0xb861 (the usual worked example).
	hdr, _ := hex.DecodeString("450000730000400040110000c0a80001c0a800c7")
	if got := checksum(0, hdr); got != 0xb861 {
		t.Fatalf("checksum = %#x, want 0xb861", got)
	}
	if got := sum16(hdr); got != 0xb861 {
		t.Fatalf("reference checksum = %#x, want 0xb861", got)
	}
}

func TestForgeSegment(t *testing.T) {
	for kind, flags := range map[string]uint8{"syn": 0x02, "rst": 0x04, "fin": 0x11} {
		s, err := forgeSegment("10.244.1.7:40000", "10.244.2.9:8080", kind, 123456789, 42)
		if err != nil {
			t.Fatal(err)
		}
		s.id = 0xbeef
		b := s.bytes()
		if len(b) != 40 {
			t.Fatalf("%s: %d bytes", kind, len(b))
		}
		ip, tcp := b[:20], b[20:]
		check := func(what string, got, want uint64) {
			t.Helper()
			if got != want {
				t.Errorf("%s: %s = %#x, want %#x", kind, what, got, want)
			}
		}
		check("version/IHL", uint64(ip[0]), 0x45)
		check("total length", uint64(binary.BigEndian.Uint16(ip[2:])), 40)
		check("id", uint64(binary.BigEndian.Uint16(ip[4:])), 0xbeef)
		check("flags/fragment", uint64(binary.BigEndian.Uint16(ip[6:])), 0x4000)
		check("ttl", uint64(ip[8]), 64)
		check("protocol", uint64(ip[9]), 6)
		if net.IP(ip[12:16]).String() != "10.244.1.7" || net.IP(ip[16:20]).String() != "10.244.2.9" {
			t.Errorf("%s: addresses %v -> %v", kind, net.IP(ip[12:16]), net.IP(ip[16:20]))
		}
		// Recompute the IPv4 checksum with the field zeroed.
		ipz := append([]byte(nil), ip...)
		ipz[10], ipz[11] = 0, 0
		check("ip checksum", uint64(binary.BigEndian.Uint16(ip[10:])), uint64(sum16(ipz)))

		check("sport", uint64(binary.BigEndian.Uint16(tcp[0:])), 40000)
		check("dport", uint64(binary.BigEndian.Uint16(tcp[2:])), 8080)
		check("seq", uint64(binary.BigEndian.Uint32(tcp[4:])), 123456789)
		check("ack", uint64(binary.BigEndian.Uint32(tcp[8:])), 42)
		check("data offset", uint64(tcp[12]), 0x50)
		check("flags", uint64(tcp[13]), uint64(flags))
		check("window", uint64(binary.BigEndian.Uint16(tcp[14:])), 65535)
		check("urgent", uint64(binary.BigEndian.Uint16(tcp[18:])), 0)
		// Recompute the TCP checksum over the pseudo-header and segment.
		pseudo := append(append([]byte(nil), ip[12:20]...), 0, 6, 0, 20)
		tcpz := append([]byte(nil), tcp...)
		tcpz[16], tcpz[17] = 0, 0
		check("tcp checksum", uint64(binary.BigEndian.Uint16(tcp[16:])), uint64(sum16(append(pseudo, tcpz...))))
	}
}

func TestForgeFlags(t *testing.T) {
	for _, c := range [][]string{
		{"--src", "10.0.0.1:1", "--dst", "10.0.0.2:2", "--kind", "ack"},
		{"--src", "[fd00::1]:1", "--dst", "10.0.0.2:2", "--kind", "syn"},
		{"--src", "10.0.0.1", "--dst", "10.0.0.2:2", "--kind", "syn"},
		{"--src", "10.0.0.1:1", "--dst", "10.0.0.2:2", "--kind", "syn", "--seq", "4294967296"},
	} {
		if code, _, _ := runSync(t, "", append([]string{"forge"}, c...)...); code != 2 {
			t.Errorf("forge %v: exit %d, want 2", c, code)
		}
	}
	s, err := forgeSegment("10.0.0.1:1", "10.0.0.2:2", "syn", -1, 0)
	if err != nil || s.flags != tcpSYN {
		t.Fatalf("random seq: %v %+v", err, s)
	}
}

// TestForgeSend sends for real where a raw socket is allowed.
func TestForgeSend(t *testing.T) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
	if err != nil {
		t.Skipf("no raw socket: %v", err)
	}
	syscall.Close(fd)
	code, lines, stderr := runSync(t, "", "forge", "--src", "127.0.0.2:40000", "--dst", "127.0.0.1:9", "--kind", "rst", "--seq", "7", "--count", "2")
	if code != 0 || len(lines) != 2 {
		t.Fatalf("exit %d, %v, %s", code, lines, stderr)
	}
	if l := lines[0]; l["event"] != "forged" || l["kind"] != "rst" || l["src"] != "127.0.0.2:40000" || l["dst"] != "127.0.0.1:9" || l["seq"] != 7.0 {
		t.Fatalf("line %v", l)
	}
}

// --- files ---

func TestFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "10-x.conflist")
	content := []byte(`{"cniVersion":"1.0.0"}`)
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
	code, lines, stderr := runSync(t, "", "file", p)
	if code != 0 || len(lines) != 1 {
		t.Fatalf("exit %d, %v, %s", code, lines, stderr)
	}
	f := lines[0]
	sum := sha256.Sum256(content)
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	got, _ := base64.StdEncoding.DecodeString(f["content"].(string))
	if f["exists"] != true || f["dir"] != false || f["size"] != float64(len(content)) || f["mode"] != "0600" ||
		f["inode"] != float64(st.Ino) || f["sha256"] != hex.EncodeToString(sum[:]) || !bytes.Equal(got, content) {
		t.Fatalf("file: %v", f)
	}

	_, lines, _ = runSync(t, "", "file", dir)
	if d := lines[0]; d["exists"] != true || d["dir"] != true || fmt.Sprint(d["entries"]) != "[10-x.conflist]" {
		t.Fatalf("dir: %v", d)
	}
	code, lines, _ = runSync(t, "", "file", filepath.Join(dir, "missing"))
	if code != 0 || lines[0]["exists"] != false {
		t.Fatalf("missing: exit %d, %v", code, lines)
	}

	big := filepath.Join(dir, "big")
	if err := os.WriteFile(big, make([]byte, maxContent+1), 0o644); err != nil {
		t.Fatal(err)
	}
	_, lines, _ = runSync(t, "", "file", big)
	if _, has := lines[0]["content"]; has || lines[0]["sha256"] == "" {
		t.Fatalf("big file: %v", lines[0])
	}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "conf")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, 0o640); err != nil {
		t.Fatal(err)
	}
	before := inode(t, p)
	code, lines, stderr := runSync(t, "new content", "write", p)
	if code != 0 || len(lines) != 1 || lines[0]["event"] != "written" || lines[0]["size"] != 11.0 {
		t.Fatalf("exit %d, %v, %s", code, lines, stderr)
	}
	b, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if string(b) != "new content" || st.Mode().Perm() != 0o640 {
		t.Fatalf("after write: %q %v", b, st.Mode())
	}
	if inode(t, p) == before {
		t.Fatal("written in place, not replaced")
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Fatalf("left behind: %v", ents)
	}

	fresh := filepath.Join(dir, "fresh")
	if code, _, stderr := runSync(t, "x", "write", fresh); code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if st, _ := os.Stat(fresh); st.Mode().Perm() != 0o644 {
		t.Fatalf("new file mode %v", st.Mode())
	}
	if code, _, _ := runSync(t, "x", "write", filepath.Join(dir, "no", "such", "dir")); code != 1 {
		t.Fatalf("write into a missing directory: exit %d", code)
	}
}

// --- watch-file ---

// watchFileInProcess runs a fileWatch while change modifies the file;
// change gets a function that waits until the watch has taken n more
// samples, which makes every intermediate state certain to be seen
// without relying on timing.
func watchFileInProcess(t *testing.T, p string, change func(settle func(n int64))) *fileWatch {
	t.Helper()
	stop := filepath.Join(t.TempDir(), "stop")
	w := newFileWatch(p, false)
	done := make(chan struct{})
	e := &env{out: &emitter{w: io.Discard}}
	go func() {
		defer close(done)
		watchLoop(context.Background(), e, stop, 50*time.Microsecond, func() { w.sample(context.Background()) })
	}()
	settle := func(n int64) {
		t.Helper()
		want := w.done.Load() + n
		deadline := time.Now().Add(hangGuard)
		for w.done.Load() < want {
			if time.Now().After(deadline) {
				t.Fatal("watch stopped sampling")
			}
			time.Sleep(100 * time.Microsecond)
		}
	}
	settle(1)
	change(settle)
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	<-done
	return w
}

func shaHex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestWatchFileRename(t *testing.T) {
	p := filepath.Join(t.TempDir(), "conf")
	a, b := bytes.Repeat([]byte("a"), 64<<10), bytes.Repeat([]byte("b"), 64<<10)
	if err := os.WriteFile(p, a, 0o644); err != nil {
		t.Fatal(err)
	}
	w := watchFileInProcess(t, p, func(settle func(int64)) {
		for i := 0; i < 10; i++ {
			c := a
			if i%2 == 0 {
				c = b
			}
			if err := writeAtomic(p, c); err != nil {
				t.Fatal(err)
			}
			settle(2)
		}
	})
	if w.Missing != 0 || w.ReadErrors != 0 {
		t.Fatalf("atomic replace seen missing %d times, %d read errors %v", w.Missing, w.ReadErrors, w.Errors)
	}
	counted := 0
	shas := map[string]bool{}
	for _, v := range w.Versions {
		if v.SHA256 != shaHex(a) && v.SHA256 != shaHex(b) {
			t.Fatalf("saw content nobody wrote: %+v", *v)
		}
		shas[v.SHA256] = true
		counted += v.Count
	}
	// Both contents seen. (Not 11 versions: a file system may give a new
	// file the inode number of one deleted before, so versions with the
	// same content can share a key.)
	if len(shas) != 2 || counted != w.Samples {
		t.Fatalf("samples %d, versions %s", w.Samples, versionsString(w.Versions))
	}
}

func versionsString(vs []*fileVersion) string {
	var parts []string
	for _, v := range vs {
		parts = append(parts, fmt.Sprintf("%+v", *v))
	}
	return strings.Join(parts, " ")
}

func TestWatchFileInPlace(t *testing.T) {
	p := filepath.Join(t.TempDir(), "conf")
	a, b := []byte("version a"), []byte("version b")
	if err := os.WriteFile(p, a, 0o644); err != nil {
		t.Fatal(err)
	}
	ino := inode(t, p)
	w := watchFileInProcess(t, p, func(settle func(int64)) {
		// What os.WriteFile does, slowed down between truncate and write,
		// and then a remove followed by a create. settle(3) after each
		// step: the first sample it counts may have begun before the step,
		// so two whole samples see each state.
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		settle(3)
		if _, err := f.Write(b); err != nil {
			t.Fatal(err)
		}
		f.Close()
		settle(3)
		os.Remove(p)
		settle(3)
		if err := os.WriteFile(p, a, 0o644); err != nil {
			t.Fatal(err)
		}
		settle(3)
	})
	if w.Missing < 2 {
		t.Fatalf("missing %d, want the samples while removed", w.Missing)
	}
	seen := map[string]uint64{}
	for _, v := range w.Versions {
		seen[v.SHA256] = v.Inode
	}
	if len(seen) != 3 || seen[shaHex(nil)] != ino || seen[shaHex(b)] != ino {
		t.Fatalf("want a, empty and b on inode %d, then a again; got %s", ino, versionsString(w.Versions))
	}
	if w.Samples != int(w.done.Load()) || w.Samples < 8 {
		t.Fatalf("samples %d (done %d)", w.Samples, w.done.Load())
	}
}

func TestWatchFileCommand(t *testing.T) {
	dir := t.TempDir()
	stop := filepath.Join(dir, "stop")
	if err := os.WriteFile(stop, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	good := filepath.Join(dir, "good")
	bad := filepath.Join(dir, "bad")
	if err := os.WriteFile(good, []byte("#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.4.0\",\"1.0.0\"]}'\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho broken >&2\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	// With the stop file already there, exactly one sample.
	code, lines, stderr := runSync(t, "", "watch-file", good, "--stop-file", stop, "--exec")
	if code != 0 || len(lines) != 2 || lines[0]["event"] != "watching" {
		t.Fatalf("exit %d, %v, %s", code, lines, stderr)
	}
	s := lines[1]
	if s["samples"] != 1.0 || s["missing"] != 0.0 || s["execs"] != 1.0 || s["execFailures"] != 0.0 || len(s["versions"].([]any)) != 1 {
		t.Fatalf("good plugin: %v", s)
	}
	_, lines, _ = runSync(t, "", "watch-file", bad, "--stop-file", stop, "--exec")
	s = lines[1]
	if s["execFailures"] != 1.0 || !strings.Contains(fmt.Sprint(s["execErrors"]), "broken") {
		t.Fatalf("bad plugin: %v", s)
	}
	_, lines, _ = runSync(t, "", "watch-file", filepath.Join(dir, "none"), "--stop-file", stop, "--exec")
	if s = lines[1]; s["missing"] != 1.0 || s["execs"] != 0.0 {
		t.Fatalf("missing plugin: %v", s)
	}
	if code, _, _ := runSync(t, "", "watch-file", good); code != 2 {
		t.Fatalf("without --stop-file: exit %d", code)
	}
}

// --- hooks ---

func hp(id ebpf.ProgramID, name string, l link.ID) hookProgJSON {
	return hookProgJSON{Prog: id, Name: name, Link: l}
}

func TestHookWatch(t *testing.T) {
	w := newHookWatch("pktmeta_")
	foreign := hp(9, "cil_from_conta", 90)
	// lxc1 starts with ours on both hooks; lxc2 is being set up (nothing
	// yet); lxc3 has only a foreign program.
	w.observe([]ifaceHooksJSON{
		{Name: "lxc1", Ingress: []hookProgJSON{hp(1, "pktmeta_origin", 10)}, Egress: []hookProgJSON{hp(2, "pktmeta_deliver", 20)}},
		{Name: "lxc2"},
		{Name: "lxc3", Ingress: []hookProgJSON{foreign}},
	}, nil)
	// An upgrade: lxc1's ingress program is replaced in place (same
	// link), egress is briefly empty; lxc2 gets its programs.
	w.observe([]ifaceHooksJSON{
		{Name: "lxc1", Ingress: []hookProgJSON{foreign, hp(3, "pktmeta_origin", 10)}},
		{Name: "lxc2", Ingress: []hookProgJSON{hp(1, "pktmeta_origin", 11)}},
		{Name: "lxc3", Ingress: []hookProgJSON{foreign}},
	}, nil)
	w.observe(nil, errors.New("netlink hiccup"))
	// lxc1 is deleted; lxc2 loses ingress (not tracked: it had none first).
	w.observe([]ifaceHooksJSON{{Name: "lxc2"}, {Name: "lxc4", Ingress: []hookProgJSON{hp(3, "pktmeta_origin", 12)}}}, nil)

	b, err := json.Marshal(w)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Samples      int
		SampleErrors int
		Errors       []string
		Ifaces       map[string]struct {
			Samples                                              int
			EmptyIngress, EmptyEgress                            int
			IngressProgs, EgressProgs, IngressLinks, EgressLinks []uint32
		}
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	if got.Samples != 4 || got.SampleErrors != 1 || len(got.Errors) != 1 || len(got.Ifaces) != 4 {
		t.Fatalf("summary %s", b)
	}
	l1, l2, l3 := got.Ifaces["lxc1"], got.Ifaces["lxc2"], got.Ifaces["lxc3"]
	if l1.Samples != 2 || l1.EmptyIngress != 0 || l1.EmptyEgress != 1 ||
		fmt.Sprint(l1.IngressProgs, l1.IngressLinks, l1.EgressProgs, l1.EgressLinks) != "[1 3] [10] [2] [20]" {
		t.Fatalf("lxc1 %+v", l1)
	}
	if l2.Samples != 3 || l2.EmptyIngress != 0 || fmt.Sprint(l2.IngressProgs, l2.IngressLinks) != "[1] [11]" {
		t.Fatalf("lxc2 %+v", l2)
	}
	if l3.Samples != 2 || l3.EmptyIngress != 0 || len(l3.IngressProgs) != 0 {
		t.Fatalf("lxc3 %+v", l3)
	}
	if !bytes.Contains(b, []byte(`"egressLinks":[]`)) {
		t.Fatalf("empty lists must be [] for the test's decoder: %s", b)
	}
}

// TestHooksNetns attaches a program named like ours to a veth in a
// network namespace of its own, where root may.
func TestHooksNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	errc := make(chan error, 1)
	go func() {
		// Never unlocked: the thread, left in the new namespace, ends with
		// this goroutine.
		runtime.LockOSThread()
		errc <- hooksInNewNetns(t)
	}()
	if err := <-errc; err != nil {
		if errors.Is(err, errSkip) {
			t.Skip(err)
		}
		t.Fatal(err)
	}
}

var errSkip = errors.New("skip")

func hooksInNewNetns(t *testing.T) error {
	ns, err := netns.New()
	if err != nil {
		return fmt.Errorf("%w: new netns: %v", errSkip, err)
	}
	defer ns.Close()
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "e2etool0"}, PeerName: "e2etool1"}); err != nil {
		return fmt.Errorf("%w: veth: %v", errSkip, err)
	}
	l0, err := netlink.LinkByName("e2etool0")
	if err != nil {
		return err
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name: "pktmeta_test", Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}, // TC_ACT_UNSPEC
	})
	if err != nil {
		return fmt.Errorf("%w: load program: %v", errSkip, err)
	}
	defer prog.Close()
	lnk, err := link.AttachTCX(link.TCXOptions{Interface: l0.Attrs().Index, Program: prog, Attach: ebpf.AttachTCXIngress})
	if err != nil {
		return fmt.Errorf("%w: tcx: %v", errSkip, err)
	}
	info, err := lnk.Info()
	if err != nil {
		return err
	}
	pinfo, _ := prog.Info()
	pid, _ := pinfo.ID()

	var s hookSampler
	ifaces, err := s.sample(true)
	if err != nil {
		return err
	}
	all, err := s.sample(false)
	if err != nil {
		return err
	}
	if len(all) != 3 {
		return fmt.Errorf("want lo and both veths, got %+v", all)
	}
	if len(ifaces) != 2 {
		return fmt.Errorf("want both veths, got %+v", ifaces)
	}
	for _, ih := range ifaces {
		switch ih.Name {
		case "e2etool0":
			if len(ih.Ingress) != 1 || len(ih.Egress) != 0 || ih.Ingress[0] != hp(pid, "pktmeta_test", info.ID) {
				return fmt.Errorf("e2etool0: %+v, want prog %d link %d", ih, pid, info.ID)
			}
		case "e2etool1":
			if len(ih.Ingress) != 0 || len(ih.Egress) != 0 {
				return fmt.Errorf("e2etool1: %+v", ih)
			}
		}
	}
	w := newHookWatch("pktmeta_")
	w.observe(ifaces, nil)
	lnk.Close()
	w.observe(s.sample(true))
	if st := w.Ifaces["e2etool0"]; st.Samples != 2 || st.EmptyIngress != 1 || st.EmptyEgress != 0 {
		return fmt.Errorf("watch after detach: %+v", st)
	}
	return nil
}

// --- workloads ---

func TestServeDialStreamUDP(t *testing.T) {
	srv := start(t, "serve", "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0")
	tcpAddr := srv.next("listening")["local"].(string)
	udpAddr := srv.next("listening")["local"].(string)

	// dial: two connections, held, each reported by both ends.
	dial := start(t, "dial", "--tcp", tcpAddr, "--count", "2", "--every", "10ms")
	c1, c2 := dial.next("connected"), dial.next("connected")
	if c1["n"] != 1.0 || c2["n"] != 2.0 || c2["held"] != 2.0 || c1["remote"] != tcpAddr || c1["local"] == c2["local"] {
		t.Fatalf("dial: %v %v", c1, c2)
	}
	accepted := map[any]bool{}
	for i := 0; i < 2; i++ {
		a := srv.next("accept")
		accepted[a["remote"]] = true
		if a["local"] != tcpAddr || a["proto"] != "tcp" {
			t.Fatalf("accept %v", a)
		}
	}
	if !accepted[c1["local"]] || !accepted[c2["local"]] {
		t.Fatalf("server saw %v, clients %v %v", accepted, c1["local"], c2["local"])
	}
	if code := dial.stop(); code != 0 {
		t.Fatalf("dial exit %d", code)
	}

	// udp: two queries from one port.
	code, lines, stderr := runSync(t, "", "udp", "--addr", udpAddr, "--count", "2", "--every", "10ms")
	if code != 0 || len(lines) != 2 || lines[0]["event"] != "answered" || lines[1]["n"] != 2.0 || lines[0]["local"] != lines[1]["local"] {
		t.Fatalf("udp: exit %d, %v, %s", code, lines, stderr)
	}
	for i := 0; i < 2; i++ {
		if d := srv.next("datagram"); d["local"] != udpAddr || d["remote"] != lines[0]["local"] {
			t.Fatalf("datagram %v, want local %s (from IP_PKTINFO) remote %v", d, udpAddr, lines[0]["local"])
		}
	}

	// stream: a progress report, then the server goes away and the
	// stream fails rather than reconnecting.
	stream := start(t, "stream", "--tcp", tcpAddr, "--interval", "10ms")
	stream.next("connected")
	if p := stream.next("progress"); p["rounds"].(float64) < 1 || p["bytes"].(float64) < 8 {
		t.Fatalf("progress %v", p)
	}
	if code := srv.stop(); code != 0 {
		t.Fatalf("serve exit %d", code)
	}
	if e := stream.next("error"); e["bytes"].(float64) < 8 {
		t.Fatalf("stream error %v", e)
	}
	if code := stream.wait(); code != 1 {
		t.Fatalf("stream exit %d, want 1", code)
	}
}

func TestUDPUnanswered(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close() // nobody listens: ICMP port unreachable
	code, lines, _ := runSync(t, "", "udp", "--addr", addr, "--timeout", "500ms")
	if code != 1 || len(lines) != 1 || lines[0]["event"] != "error" || lines[0]["n"] != 1.0 {
		t.Fatalf("exit %d, %v", code, lines)
	}
}

func TestDialErrorContinues(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	d := start(t, "dial", "--tcp", addr, "--every", "10ms")
	for want := 1.0; want <= 2; want++ {
		if e := d.next("error"); e["n"] != want {
			t.Fatalf("error %v, want n=%v", e, want)
		}
	}
	if code := d.stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
}

func TestHTTPGet(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "forbidden", http.StatusForbidden)
			return
		}
		fmt.Fprint(w, strings.Repeat("m", 5000))
	}))
	defer srv.Close()
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, lines, _ := runSync(t, "", "http-get", srv.URL+"/metrics", "--timeout", "2s")
	if h := lines[0]; code != 0 || h["ok"] != false || h["status"] != 403.0 || h["body"] != "forbidden\n" || h["url"] != srv.URL+"/metrics" {
		t.Fatalf("exit %d, %v", code, lines)
	}
	code, lines, _ = runSync(t, "", "http-get", "--token-file", tok, srv.URL)
	if h := lines[0]; code != 0 || h["ok"] != true || h["status"] != 200.0 || len(h["body"].(string)) != 5000 || h["truncated"] != false || h["err"] != "" {
		t.Fatalf("exit %d, %v", code, lines)
	}
	code, lines, _ = runSync(t, "", "http-get", "--token-file", tok, "--max-body", "4096", srv.URL)
	if h := lines[0]; code != 0 || h["ok"] != true || len(h["body"].(string)) != 4096 || h["truncated"] != true {
		t.Fatalf("exit %d, %v", code, lines)
	}
	code, lines, _ = runSync(t, "", "http-get", "http://127.0.0.1:1/")
	if h := lines[0]; code != 0 || h["ok"] != false || h["status"] != 0.0 || h["err"] == "" {
		t.Fatalf("exit %d, %v", code, lines)
	}
}

func TestKill(t *testing.T) {
	cmd := exec.Command("sleep", "987.654321")
	if err := cmd.Start(); err != nil {
		t.Skip(err)
	}
	defer cmd.Process.Kill()
	code, lines, stderr := runSync(t, "", "kill", "--cmdline-contains", "sleep 987.654321", "--signal", "TERM")
	if code != 0 || len(lines) != 1 || fmt.Sprint(lines[0]["pids"]) != fmt.Sprintf("[%d]", cmd.Process.Pid) {
		t.Fatalf("exit %d, %v, %s", code, lines, stderr)
	}
	err := cmd.Wait()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
		t.Fatalf("sleep ended with %v", err)
	}
	if code, _, _ := runSync(t, "", "kill", "--cmdline-contains", "sleep 987.654321"); code != 1 {
		t.Fatalf("nothing to kill: exit %d", code)
	}
	// Our own command line contains the pattern: never a match.
	if code, _, _ := runSync(t, "", "kill", "--cmdline-contains", os.Args[0]); code != 1 {
		t.Fatalf("matched itself: exit %d", code)
	}
	if _, err := parseSignal("NOPE"); err == nil {
		t.Fatal("NOPE is a signal?")
	}
	if s, _ := parseSignal("sigusr1"); s != syscall.SIGUSR1 {
		t.Fatalf("sigusr1 = %v", s)
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{
		{}, {"nope"}, {"dial"}, {"http-get"}, {"file"}, {"file", "a", "b"}, {"serve", "--bogus"}, {"kill", "--cmdline-contains", "x", "--signal", "NOPE"},
	} {
		if code, _, _ := runSync(t, "", args...); code != 2 {
			t.Errorf("%v: exit %d, want 2", args, code)
		}
	}
}

func TestSleepStops(t *testing.T) {
	if code := start(t, "sleep").stop(); code != 0 {
		t.Fatalf("exit %d", code)
	}
}
