package api

import (
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// SocketMode is the API socket's mode: read-write for its owner, root
// (pktmetactl as root on the node, or in the agent's container through
// `kubectl exec`, which runs as the agent's uid 0 without
// CAP_DAC_OVERRIDE and so needs the owner's bits), nothing for anyone
// else.
const SocketMode fs.FileMode = 0o600

// maxSocketPath is the longest path a unix socket can be bound at
// (sun_path is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// socketListener is a unix socket listener at path.
type socketListener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo // the socket file as created, to remove only ours
}

// listenUnix listens on a unix socket at path that no one but its owner
// can connect to at any moment: bind(2) creates the socket file with the
// process's umask, so it is made in a fresh directory of mode 0700 beside
// path (only root can reach into it), chmod-ed to SocketMode there, and
// renamed into place. rename(2) also replaces a stale socket from a
// crashed agent in one step, so the path never holds a socket of another
// mode, or none for a moment. A socket that a live process still answers
// on is left alone: two agents on one node would fight over the CNI
// config as well.
//
// The kernel keeps the temporary path as the socket's bound name (what
// `ss -x` shows); connecting goes by the file, wherever it is now.
func listenUnix(path string) (*socketListener, error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create run dir: %w", err)
	}
	prefix := "." + base + "-"
	removeStaleTemp(dir, prefix)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("%s: a process already serves on it (another agent?)", path)
	}

	tmp, err := os.MkdirTemp(dir, prefix) // mode 0700
	if err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	defer os.RemoveAll(tmp)
	tmpSock := filepath.Join(tmp, "s")
	if len(tmpSock) > maxSocketPath {
		return nil, fmt.Errorf("%s: path too long for a unix socket (%d bytes with its temporary directory, at most %d)", path, len(tmpSock), maxSocketPath)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmpSock, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	// The file moves away from the bound name; removal is ours (remove).
	l.SetUnlinkOnClose(false)
	fail := func(err error) (*socketListener, error) {
		l.Close()
		return nil, err
	}
	if err := os.Chmod(tmpSock, SocketMode); err != nil {
		return fail(fmt.Errorf("chmod %s: %w", tmpSock, err))
	}
	if err := os.Rename(tmpSock, path); err != nil {
		return fail(fmt.Errorf("move socket to %s: %w", path, err))
	}
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &socketListener{UnixListener: l, path: path, fi: fi}, nil
}

// remove removes the socket file if it is still the one this listener
// made: a newer agent's socket at the same path stays.
func (l *socketListener) remove() {
	if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.fi) {
		os.Remove(l.path)
	}
}

// removeStaleTemp removes temporary socket directories that an agent
// killed between mkdir and rename left in dir.
func removeStaleTemp(dir, prefix string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}
