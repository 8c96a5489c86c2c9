package api

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

func newTestServer() *Server {
	return NewServer(nil, slog.New(slog.DiscardHandler))
}

// serve runs s.Serve on socket until the test ends or stop is called,
// and waits until a client connects.
func serve(t *testing.T, s *Server, socket string) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Serve(ctx, socket) }()
	var once sync.Once
	var err error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err = <-errc:
			case <-time.After(10 * time.Second):
				err = errors.New("Serve did not return after its context ended")
			}
		})
		return err
	}
	t.Cleanup(func() { stop() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		select {
		case err := <-errc:
			t.Fatalf("Serve: %v", err)
		default:
		}
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return stop
		}
		if time.Now().After(deadline) {
			t.Fatal("the API socket never answered")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type inotifyEvent struct {
	mask uint32
	name string
}

// watch reports what happens to dir's entries, read when the returned
// function is called (it closes the watch).
func watch(t *testing.T, dir string) func() []inotifyEvent {
	t.Helper()
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_MOVED_FROM|unix.IN_ATTRIB|unix.IN_DELETE); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	var closed atomic.Bool
	t.Cleanup(func() {
		if !closed.Load() {
			unix.Close(fd)
		}
	})
	return func() []inotifyEvent {
		defer func() { closed.Store(true); unix.Close(fd) }()
		var out []inotifyEvent
		buf := make([]byte, 64*1024)
		for {
			n, err := unix.Read(fd, buf)
			if err == unix.EAGAIN || n <= 0 {
				return out
			}
			if err != nil {
				t.Fatal(err)
			}
			for off := 0; off+unix.SizeofInotifyEvent <= n; {
				ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := buf[off+unix.SizeofInotifyEvent : off+unix.SizeofInotifyEvent+int(ev.Len)]
				out = append(out, inotifyEvent{mask: ev.Mask, name: string(bytes.TrimRight(name, "\x00"))})
				off += unix.SizeofInotifyEvent + int(ev.Len)
			}
		}
	}
}

// The socket is never reachable by anyone but root: at its final path it
// has mode 0600 from the moment it appears (a watcher stats it in a
// tight loop the whole time, and inotify shows it arrives by rename, not
// by bind), and no temporary directory stays behind.
func TestSocketNeverWorldAccessible(t *testing.T) {
	runDir := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(runDir, 0o755); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(runDir, SocketName)
	events := watch(t, runDir)

	var (
		seen    atomic.Int64
		badMode atomic.Uint32
		quit    = make(chan struct{})
		watcher = make(chan struct{})
	)
	go func() {
		defer close(watcher)
		for {
			select {
			case <-quit:
				return
			default:
			}
			var st unix.Stat_t
			if err := unix.Lstat(socket, &st); err == nil {
				seen.Add(1)
				if st.Mode&0o7777 != uint32(SocketMode) || st.Mode&unix.S_IFMT != unix.S_IFSOCK {
					badMode.Store(st.Mode)
				}
			}
		}
	}()
	stop := serve(t, newTestServer(), socket)
	// Keep watching a while after it appeared, then stop.
	for deadline := time.Now().Add(10 * time.Second); seen.Load() < 1000 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	close(quit)
	<-watcher
	if m := badMode.Load(); m != 0 {
		t.Errorf("the socket was seen at %s with mode %o, want a socket with %o", socket, m, SocketMode)
	}

	fi, err := os.Lstat(socket)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != SocketMode {
		t.Fatalf("socket %v %v, want mode %v", fi.Mode(), err, SocketMode)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); !ok || st.Uid != uint32(os.Geteuid()) {
		t.Errorf("socket owned by %+v, want uid %d", fi.Sys(), os.Geteuid())
	}
	entries, _ := os.ReadDir(runDir)
	if len(entries) != 1 || entries[0].Name() != SocketName {
		t.Errorf("run dir holds %v, want only %s", names(entries), SocketName)
	}

	var tmpDirs []string
	moved := false
	for _, ev := range events() {
		switch {
		case ev.name == SocketName && ev.mask&unix.IN_CREATE != 0:
			t.Errorf("the socket was created at its final path (inotify %#x), not moved there", ev.mask)
		case ev.name == SocketName && ev.mask&unix.IN_ATTRIB != 0:
			t.Errorf("the socket's mode changed at its final path (inotify %#x)", ev.mask)
		case ev.name == SocketName && ev.mask&unix.IN_MOVED_TO != 0:
			moved = true
		case ev.mask&unix.IN_CREATE != 0 && ev.mask&unix.IN_ISDIR != 0:
			tmpDirs = append(tmpDirs, ev.name)
		}
	}
	if !moved {
		t.Error("inotify saw no rename to the socket's path")
	}
	if len(tmpDirs) != 1 || !strings.HasPrefix(tmpDirs[0], "."+SocketName+"-") {
		t.Errorf("temporary directories %v, want one", tmpDirs)
	}

	if err := stop(); err != nil {
		t.Fatal(err)
	}
	if entries, _ := os.ReadDir(runDir); len(entries) != 0 {
		t.Errorf("after Serve, the run dir holds %v", names(entries))
	}
}

func names(es []os.DirEntry) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

// A crash leaves a socket file nobody answers on, and maybe a temporary
// directory: both are replaced, and the run dir is created if missing.
func TestStaleSocketReplaced(t *testing.T) {
	runDir := filepath.Join(t.TempDir(), "run")
	os.Mkdir(runDir, 0o755)
	socket := filepath.Join(runDir, SocketName)
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()
	os.Chmod(socket, 0o777)
	if err := os.Mkdir(filepath.Join(runDir, "."+SocketName+"-123"), 0o700); err != nil {
		t.Fatal(err)
	}

	stop := serve(t, newTestServer(), socket)
	fi, err := os.Lstat(socket)
	if err != nil || fi.Mode().Perm() != SocketMode {
		t.Fatalf("socket %v %v", fi, err)
	}
	if entries, _ := os.ReadDir(runDir); len(entries) != 1 {
		t.Errorf("run dir holds %v", names(entries))
	}
	if _, err := Dial(socket); err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}

	// A run dir that does not exist yet.
	socket = filepath.Join(t.TempDir(), "new", SocketName)
	serve(t, newTestServer(), socket)
	if fi, err := os.Lstat(socket); err != nil || fi.Mode().Perm() != SocketMode {
		t.Fatalf("socket in a new run dir %v %v", fi, err)
	}
}

// A socket another process answers on is not taken over, and what is not
// ours is not removed at shutdown.
func TestLiveSocketLeftAlone(t *testing.T) {
	runDir := t.TempDir()
	socket := filepath.Join(runDir, SocketName)
	live, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	err = newTestServer().Serve(context.Background(), socket)
	if err == nil || !strings.Contains(err.Error(), "already serves") {
		t.Fatalf("Serve next to a live socket: %v", err)
	}
	if c, err := net.Dial("unix", socket); err != nil {
		t.Fatalf("the live socket is gone: %v", err)
	} else {
		c.Close()
	}
	if entries, _ := os.ReadDir(runDir); len(entries) != 1 {
		t.Errorf("run dir holds %v", names(entries))
	}
	live.Close()

	// Ours is replaced behind our back (a newer agent): shutdown leaves
	// the newer one.
	stop := serve(t, newTestServer(), socket)
	other := filepath.Join(t.TempDir(), "other.sock")
	l2, err := net.ListenUnix("unix", &net.UnixAddr{Name: other, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l2.SetUnlinkOnClose(false)
	defer l2.Close()
	if err := os.Rename(other, socket); err != nil {
		t.Fatal(err)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatalf("shutdown removed the newer socket: %v", err)
	}
	c.Close()
}

// A path that fits a socket but not with the temporary directory is an
// error that says so, and leaves nothing behind.
func TestSocketPathTooLong(t *testing.T) {
	base := t.TempDir()
	if len(base) > 90 {
		t.Skipf("temp dir %s too long for this test", base)
	}
	dir := filepath.Join(base, strings.Repeat("d", 94-len(base)))
	socket := filepath.Join(dir, SocketName)
	if len(socket) > maxSocketPath {
		t.Fatalf("%d bytes: the socket's own path must fit", len(socket))
	}
	err := newTestServer().Serve(context.Background(), socket)
	if err == nil || !strings.Contains(err.Error(), "too long") {
		t.Errorf("Serve on a long path: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("left %v", names(entries))
	}
}
