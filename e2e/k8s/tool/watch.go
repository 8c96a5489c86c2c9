package main

// The watches sample something as fast as they can while the test does
// something to the node (upgrade the plugin, rewrite a conflist, restart
// the agent), then summarise what they saw. A single moment without a
// program on a hook, or without the file, is what they exist to catch, so
// they keep counts rather than judging: the test decides.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// maxErrors is how many distinct error texts a summary keeps.
const maxErrors = 5

// errorList keeps the first maxErrors distinct errors.
type errorList []string

func (l *errorList) add(err error) {
	s := errString(err)
	if len(*l) >= maxErrors {
		return
	}
	for _, have := range *l {
		if have == s {
			return
		}
	}
	*l = append(*l, s)
}

// watchLoop samples until the stop file exists or ctx ends, sleeping
// every between samples. It announces itself after the first sample, so
// the caller knows the watch covers whatever it does next.
func watchLoop(ctx context.Context, e *env, stopFile string, every time.Duration, sample func()) {
	for n := 0; ; n++ {
		sample()
		if n == 0 {
			e.out.emit(obj{"event": "watching"})
		}
		if _, err := os.Stat(stopFile); err == nil || ctx.Err() != nil {
			return
		}
		if every > 0 && sleepCtx(ctx, every) != nil {
			return
		}
	}
}

// hookStats is one iface's share of a hook watch.
type hookStats struct {
	Samples      int              `json:"samples"`
	EmptyIngress int              `json:"emptyIngress"`
	EmptyEgress  int              `json:"emptyEgress"`
	IngressProgs []ebpf.ProgramID `json:"ingressProgs"`
	EgressProgs  []ebpf.ProgramID `json:"egressProgs"`
	IngressLinks []link.ID        `json:"ingressLinks"`
	EgressLinks  []link.ID        `json:"egressLinks"`

	// Whether emptiness counts: the hook had one of our programs when the
	// iface was first seen. An iface still being set up, or never ours,
	// is not "empty".
	trackIngress, trackEgress bool
}

// hookWatch accumulates samples of hookSampler.sample. Prog and link ids
// are only those of programs whose name has the prefix: programs other
// projects put on the same veths are none of the test's business.
type hookWatch struct {
	prefix       string
	Samples      int                   `json:"samples"`
	Ifaces       map[string]*hookStats `json:"ifaces"`
	SampleErrors int                   `json:"sampleErrors"`
	Errors       errorList             `json:"errors"`
}

func newHookWatch(prefix string) *hookWatch {
	return &hookWatch{prefix: prefix, Ifaces: map[string]*hookStats{}, Errors: errorList{}}
}

func (w *hookWatch) ours(progs []hookProgJSON) []hookProgJSON {
	var out []hookProgJSON
	for _, p := range progs {
		if strings.HasPrefix(p.Name, w.prefix) {
			out = append(out, p)
		}
	}
	return out
}

// observe adds one sample; an iface counts only in samples it is in.
func (w *hookWatch) observe(ifaces []ifaceHooksJSON, err error) {
	w.Samples++
	if err != nil {
		w.SampleErrors++
		w.Errors.add(err)
		return
	}
	for _, ih := range ifaces {
		in, eg := w.ours(ih.Ingress), w.ours(ih.Egress)
		st := w.Ifaces[ih.Name]
		if st == nil {
			st = &hookStats{
				IngressProgs: []ebpf.ProgramID{}, EgressProgs: []ebpf.ProgramID{},
				IngressLinks: []link.ID{}, EgressLinks: []link.ID{},
				trackIngress: len(in) > 0, trackEgress: len(eg) > 0,
			}
			w.Ifaces[ih.Name] = st
		}
		st.Samples++
		if st.trackIngress && len(in) == 0 {
			st.EmptyIngress++
		}
		if st.trackEgress && len(eg) == 0 {
			st.EmptyEgress++
		}
		for _, p := range in {
			st.IngressProgs = appendNew(st.IngressProgs, p.Prog)
			if p.Link != 0 {
				st.IngressLinks = appendNew(st.IngressLinks, p.Link)
			}
		}
		for _, p := range eg {
			st.EgressProgs = appendNew(st.EgressProgs, p.Prog)
			if p.Link != 0 {
				st.EgressLinks = appendNew(st.EgressLinks, p.Link)
			}
		}
	}
}

func appendNew[T comparable](s []T, v T) []T {
	for _, x := range s {
		if x == v {
			return s
		}
	}
	return append(s, v)
}

func cmdWatchHooks(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("watch-hooks", flag.ContinueOnError)
	stopFile := flags.String("stop-file", "", "stop once this file exists")
	every := flags.Duration("every", 5*time.Millisecond, "pause between samples")
	prefix := flags.String("prefix", "pktmeta_", "name prefix of the programs watched")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *stopFile == "" {
		return usagef("--stop-file is required")
	}
	var s hookSampler
	w := newHookWatch(*prefix)
	watchLoop(ctx, e, *stopFile, *every, func() { w.observe(s.sample(true)) })
	e.out.emit(w)
	return nil
}

// fileVersion is one distinct (content, inode) pair a file watch saw.
type fileVersion struct {
	SHA256 string `json:"sha256"`
	Inode  uint64 `json:"inode"`
	First  int    `json:"first"` // index of the first sample that saw it
	Count  int    `json:"count"`
}

// fileWatch samples one path: a missing file, a version never written
// whole (a partial write shows up as a sha256 nobody wrote), or a failing
// exec of the plugin is what a non-atomic replace looks like.
type fileWatch struct {
	path string
	exec bool

	Samples      int            `json:"samples"`
	Missing      int            `json:"missing"`
	ReadErrors   int            `json:"readErrors"`
	Errors       errorList      `json:"errors"`
	Versions     []*fileVersion `json:"versions"`
	Execs        int            `json:"execs"`
	ExecFailures int            `json:"execFailures"`
	ExecErrors   errorList      `json:"execErrors"`

	done atomic.Int64 // samples taken, readable while the watch runs (for tests)
}

func newFileWatch(path string, exec bool) *fileWatch {
	return &fileWatch{path: path, exec: exec, Errors: errorList{}, Versions: []*fileVersion{}, ExecErrors: errorList{}}
}

// sample reads the file once through one descriptor, so hash and inode
// describe the same file; then, with exec, runs it.
func (w *fileWatch) sample(ctx context.Context) {
	defer w.done.Add(1)
	idx := w.Samples
	w.Samples++
	sum, ino, err := hashFile(w.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		w.Missing++
		return
	case err != nil:
		w.ReadErrors++
		w.Errors.add(err)
		return
	}
	w.record(idx, sum, ino)
	if w.exec && ctx.Err() == nil {
		w.Execs++
		if err := cniVersion(ctx, w.path); err != nil {
			w.ExecFailures++
			w.ExecErrors.add(err)
		}
	}
}

func (w *fileWatch) record(idx int, sum string, ino uint64) {
	for _, v := range w.Versions {
		if v.SHA256 == sum && v.Inode == ino {
			v.Count++
			return
		}
	}
	w.Versions = append(w.Versions, &fileVersion{SHA256: sum, Inode: ino, First: idx, Count: 1})
}

func hashFile(path string) (sum string, ino uint64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), st.Sys().(*syscall.Stat_t).Ino, nil
}

// cniVersion runs path the way a runtime asks a plugin which versions it
// speaks: the cheapest call that proves the binary is whole and runs.
func cniVersion(ctx context.Context, path string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path)
	cmd.Env = []string{"CNI_COMMAND=VERSION", "PATH=/usr/local/bin:/usr/bin:/bin"}
	cmd.Stdin = strings.NewReader(`{"cniVersion":"1.0.0"}`)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%w: %s%s", err, clip(stderr.String()), clip(stdout.String()))
	}
	var v struct {
		CNIVersion        string   `json:"cniVersion"`
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(stdout.Bytes(), &v); err != nil || len(v.SupportedVersions) == 0 {
		return fmt.Errorf("not a CNI version result: %q", clip(stdout.String()))
	}
	return nil
}

func clip(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}

func cmdWatchFile(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("watch-file", flag.ContinueOnError)
	stopFile := flags.String("stop-file", "", "stop once this file exists")
	every := flags.Duration("every", 2*time.Millisecond, "pause between samples")
	doExec := flags.Bool("exec", false, "also run the file as a CNI plugin VERSION call each sample")
	pos, err := parseFlags(flags, args, 1)
	if err != nil {
		return err
	}
	if *stopFile == "" {
		return usagef("--stop-file is required")
	}
	w := newFileWatch(pos[0], *doExec)
	watchLoop(ctx, e, *stopFile, *every, func() { w.sample(ctx) })
	e.out.emit(w)
	return nil
}
