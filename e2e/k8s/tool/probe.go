package main

// The node-probe subcommands run in a privileged pod with the host's
// network and PID namespaces, the host's / at /host and bpffs mounted.
// They look at what the test cannot see through the API server: files
// the CNI plugin installed, BPF programs and their hooks, the runtime's
// sandboxes, processes.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pktmeta/pktmeta/internal/discover"
)

// maxContent is the largest file whose bytes `file` prints.
const maxContent = 1 << 20

func cmdFile(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("file", flag.ContinueOnError)
	pos, err := parseFlags(flags, args, 1)
	if err != nil {
		return err
	}
	res, err := describeFile(pos[0])
	if err != nil {
		return err
	}
	e.out.emit(res)
	return nil
}

// describeFile reads path once: size, mode, inode and hash all describe
// the same file even if it is replaced meanwhile, because they come from
// one open descriptor. Symbolic links are followed.
func describeFile(path string) (obj, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return obj{"path": path, "exists": false}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	sys := st.Sys().(*syscall.Stat_t)
	res := obj{"path": path, "exists": true, "dir": st.IsDir(), "size": st.Size(),
		"mode": fmt.Sprintf("%04o", sys.Mode&0o7777), "inode": sys.Ino}
	if st.IsDir() {
		ents, err := f.ReadDir(-1)
		if err != nil {
			return nil, err
		}
		names := []string{}
		for _, d := range ents {
			names = append(names, d.Name())
		}
		sort.Strings(names)
		res["entries"] = names
		return res, nil
	}
	h := sha256.New()
	var content capped
	if _, err := io.Copy(io.MultiWriter(h, &content), f); err != nil {
		return nil, err
	}
	res["sha256"] = hex.EncodeToString(h.Sum(nil))
	if !content.over {
		res["content"] = base64.StdEncoding.EncodeToString(content.buf.Bytes())
	}
	return res, nil
}

// capped keeps the first maxContent bytes written to it and notes if
// there were more.
type capped struct {
	buf  bytes.Buffer
	over bool
}

func (c *capped) Write(p []byte) (int, error) {
	if c.over || c.buf.Len()+len(p) > maxContent {
		c.over = true
		c.buf.Reset()
		return len(p), nil
	}
	return c.buf.Write(p)
}

// cmdWrite replaces a file the way a careful primary CNI rewrites its
// conflist: readers see the old file or the new one, never a partial or
// missing one.
func cmdWrite(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("write", flag.ContinueOnError)
	pos, err := parseFlags(flags, args, 1)
	if err != nil {
		return err
	}
	data, err := io.ReadAll(e.stdin)
	if err != nil {
		return fmt.Errorf("read stdin: %w", err)
	}
	if err := writeAtomic(pos[0], data); err != nil {
		return err
	}
	e.out.emit(obj{"event": "written", "path": pos[0], "size": len(data)})
	return nil
}

// writeAtomic writes a temporary file next to path, makes it durable and
// renames it over path, keeping path's mode and owner if it existed.
func writeAtomic(path string, data []byte) (err error) {
	mode := fs.FileMode(0o644)
	uid, gid := -1, -1
	if st, err := os.Stat(path); err == nil {
		mode = st.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(sys.Uid), int(sys.Gid)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".e2etool-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = f.Write(data); err != nil {
		return err
	}
	// Chmod, not the create mode, so that the umask plays no part.
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if uid >= 0 && os.Geteuid() == 0 {
		if err = f.Chown(uid, gid); err != nil {
			return err
		}
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	// The rename itself is durable once the directory is synced.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

type progJSON struct {
	ID   ebpf.ProgramID `json:"id"`
	Name string         `json:"name"`
	Type string         `json:"type"`
}

func cmdProgs(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("progs", flag.ContinueOnError)
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	progs := []progJSON{}
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if err != nil {
			return fmt.Errorf("list programs: %w", err)
		}
		id = next
		name, typ, err := progInfo(id)
		if errors.Is(err, os.ErrNotExist) {
			continue // unloaded since it was listed
		}
		if err != nil {
			return fmt.Errorf("program %d: %w", id, err)
		}
		progs = append(progs, progJSON{ID: id, Name: name, Type: typ})
	}
	e.out.emit(obj{"progs": progs})
	return nil
}

func progInfo(id ebpf.ProgramID) (name, typ string, err error) {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return "", "", err
	}
	defer p.Close()
	info, err := p.Info()
	if err != nil {
		return "", "", err
	}
	return info.Name, info.Type.String(), nil
}

type hookProgJSON struct {
	Prog ebpf.ProgramID `json:"prog"`
	Name string         `json:"name"` // "" if the program went away before we could ask
	Link link.ID        `json:"link"` // 0 if not attached by a link
}

type ifaceHooksJSON struct {
	Name    string         `json:"name"`
	Ifindex int            `json:"ifindex"`
	Ingress []hookProgJSON `json:"ingress"`
	Egress  []hookProgJSON `json:"egress"`
}

func cmdHooks(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("hooks", flag.ContinueOnError)
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	var s hookSampler
	ifaces, err := s.sample(false)
	if err != nil {
		return err
	}
	e.out.emit(obj{"ifaces": ifaces})
	return nil
}

// hookSampler reads the tcx hooks of the namespace's veths. It remembers
// program names by id: ids are not reused (the kernel allocates them
// cyclically from 2^31), and a watch samples every few milliseconds.
type hookSampler struct {
	names map[ebpf.ProgramID]string
}

// sample lists every interface (or every veth), with or without
// programs: an iface whose hooks are empty is exactly what the test may be
// looking for. The hooks command lists all of them, uplinks included; a
// watch, which follows pods' host veths through a rolling update, only
// veths.
func (s *hookSampler) sample(vethsOnly bool) ([]ifaceHooksJSON, error) {
	links, err := listLinks()
	if err != nil {
		return nil, err
	}
	out := []ifaceHooksJSON{}
	for _, l := range links {
		if vethsOnly && l.Type() != "veth" {
			continue
		}
		a := l.Attrs()
		ih := ifaceHooksJSON{Name: a.Name, Ifindex: a.Index}
		var gone bool
		if ih.Ingress, gone, err = s.query(a.Index, ebpf.AttachTCXIngress); err != nil {
			return nil, fmt.Errorf("%s: %w", a.Name, err)
		}
		if !gone {
			ih.Egress, gone, err = s.query(a.Index, ebpf.AttachTCXEgress)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", a.Name, err)
			}
		}
		if gone {
			continue // deleted since the listing: as if never listed
		}
		out = append(out, ih)
	}
	return out, nil
}

// listLinks dumps the namespace's links. A dump that interfaces changed
// during is retried; after a few tries its possibly incomplete result is
// taken, which a sample treats like an iface not there at that moment.
func listLinks() ([]netlink.Link, error) {
	for try := 0; ; try++ {
		links, err := netlink.LinkList()
		if errors.Is(err, netlink.ErrDumpInterrupted) && try < 3 {
			continue
		}
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return nil, fmt.Errorf("list links: %w", err)
		}
		return links, nil
	}
}

// query lists the programs on one tcx hook. gone reports an interface
// deleted since it was listed.
func (s *hookSampler) query(ifindex int, typ ebpf.AttachType) (progs []hookProgJSON, gone bool, err error) {
	var res *link.QueryResult
	for try := 0; ; try++ {
		res, err = link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: typ})
		// ENOSPC: a program was added between the count and the fetch.
		if errors.Is(err, unix.ENOSPC) && try < 3 {
			continue
		}
		break
	}
	switch {
	case errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENXIO):
		return nil, true, nil
	case errors.Is(err, ebpf.ErrNotSupported):
		return []hookProgJSON{}, false, nil // no tcx in this kernel: nothing on it
	case err != nil:
		return nil, false, err
	}
	progs = []hookProgJSON{}
	for _, p := range res.Programs {
		lid, _ := p.LinkID()
		progs = append(progs, hookProgJSON{Prog: p.ID, Name: s.name(p.ID), Link: lid})
	}
	return progs, false, nil
}

func (s *hookSampler) name(id ebpf.ProgramID) string {
	if n, ok := s.names[id]; ok {
		return n
	}
	n, _, err := progInfo(id)
	if err != nil {
		return "" // not cached: a transient failure should not stick
	}
	if s.names == nil {
		s.names = map[ebpf.ProgramID]string{}
	}
	s.names[id] = n
	return n
}

// cmdSandboxes lists what the CRI runtime reports. discover.Sandboxes
// leaves out sandboxes without a network namespace of their own
// (hostNetwork pods): pktmeta has nothing to do with those.
func cmdSandboxes(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("sandboxes", flag.ContinueOnError)
	socket := flags.String("cri", "/host/run/containerd/containerd.sock", "CRI socket")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	cri, err := discover.DialCRI(*socket)
	if err != nil {
		return err
	}
	defer cri.Close()
	sbs, err := cri.Sandboxes(ctx)
	if err != nil {
		return err
	}
	type sandboxJSON struct {
		ID        string   `json:"id"`
		Namespace string   `json:"namespace"`
		Name      string   `json:"name"`
		UID       string   `json:"uid"`
		IPs       []string `json:"ips"`
	}
	out := []sandboxJSON{}
	for _, s := range sbs {
		j := sandboxJSON{ID: s.ID, Namespace: s.Namespace, Name: s.Name, UID: s.UID, IPs: []string{}}
		for _, ip := range s.IPs {
			j.IPs = append(j.IPs, ip.String())
		}
		out = append(out, j)
	}
	e.out.emit(obj{"sandboxes": out})
	return nil
}

// cmdKill signals processes by command line, e.g. the CNI plugin or the
// agent, to crash them at a chosen moment. Our own process and its
// ancestors are never matched: they are how the command was started
// (`sh -c "e2etool kill --cmdline-contains X"` contains X too).
func cmdKill(_ context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("kill", flag.ContinueOnError)
	pattern := flags.String("cmdline-contains", "", "substring of the command line (arguments joined by spaces)")
	sigName := flags.String("signal", "KILL", "signal name (KILL, TERM, SIGUSR1...) or number")
	if _, err := parseFlags(flags, args, 0); err != nil {
		return err
	}
	if *pattern == "" {
		return usagef("--cmdline-contains is required")
	}
	sig, err := parseSignal(*sigName)
	if err != nil {
		return usageError{err}
	}
	procs, err := findProcs("/proc", *pattern, ancestors("/proc", os.Getpid()))
	if err != nil {
		return err
	}
	pids, cmdlines := []int{}, []string{}
	for _, p := range procs {
		if err := unix.Kill(p.pid, sig); err != nil {
			if errors.Is(err, unix.ESRCH) {
				continue // exited meanwhile
			}
			return fmt.Errorf("kill %d: %w", p.pid, err)
		}
		pids = append(pids, p.pid)
		cmdlines = append(cmdlines, p.cmdline)
	}
	if len(pids) == 0 {
		return fmt.Errorf("no process whose command line contains %q", *pattern)
	}
	e.out.emit(obj{"event": "killed", "signal": unix.SignalName(sig), "pids": pids, "cmdlines": cmdlines})
	return nil
}

func parseSignal(s string) (unix.Signal, error) {
	if n, err := strconv.Atoi(s); err == nil && n > 0 {
		return unix.Signal(n), nil
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	if sig := unix.SignalNum(name); sig != 0 {
		return sig, nil
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}

type proc struct {
	pid     int
	cmdline string
}

// findProcs lists the processes under procDir whose command line contains
// pattern, except those in skip. Kernel threads have an empty command
// line and never match.
func findProcs(procDir, pattern string, skip map[int]bool) ([]proc, error) {
	ents, err := os.ReadDir(procDir)
	if err != nil {
		return nil, err
	}
	var out []proc
	for _, d := range ents {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || skip[pid] {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procDir, d.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue // gone, or a kernel thread
		}
		cmdline := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if strings.Contains(cmdline, pattern) {
			out = append(out, proc{pid, cmdline})
		}
	}
	return out, nil
}

// ancestors is pid and its ancestors, from the PPid lines of
// /proc/PID/status.
func ancestors(procDir string, pid int) map[int]bool {
	out := map[int]bool{}
	for pid > 0 && !out[pid] {
		out[pid] = true
		b, err := os.ReadFile(filepath.Join(procDir, strconv.Itoa(pid), "status"))
		if err != nil {
			break
		}
		pid = 0
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "PPid:"); ok {
				pid, _ = strconv.Atoi(strings.TrimSpace(v))
				break
			}
		}
	}
	return out
}
