package datapath

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// nodeLock is an flock on the pin directory: shared while attachments are
// changed, exclusive while the datapath is loaded, upgraded or destroyed.
// Destroy removes the directory while holding the lock, so a waiter checks
// that the path still names the directory it locked (as containerLock
// does); otherwise it and a process that made the directory again would
// both hold "the" lock.
type nodeLock struct {
	f *os.File
}

func lockNode(pinPath string, exclusive bool) (*nodeLock, error) {
	if err := CheckBPFFS(pinPath); err != nil {
		return nil, err
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for range 100 {
		if err := os.MkdirAll(pinPath, 0o700); err != nil {
			return nil, fmt.Errorf("create pin directory: %w", err)
		}
		f, err := os.Open(pinPath)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed between mkdir and open
		}
		if err != nil {
			return nil, fmt.Errorf("open pin directory: %w", err)
		}
		if err := flock(f, how); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", pinPath, err)
		}
		if sameFile(f, pinPath) {
			return &nodeLock{f: f}, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: it keeps being removed", pinPath)
}

// sameFile reports whether path still names the file f has open.
func sameFile(f *os.File, path string) bool {
	var held, now unix.Stat_t
	return unix.Fstat(int(f.Fd()), &held) == nil && unix.Stat(path, &now) == nil &&
		held.Ino == now.Ino && held.Dev == now.Dev
}

func flock(f *os.File, how int) error {
	for {
		err := unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			return err
		}
	}
}

func (l *nodeLock) unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last fd drops the flock
	l.f = nil
	return err
}

// containerLock serialises ADD, DEL and the agent's reconcile of one
// container. It is an flock on locks/<container id>, a directory (bpffs
// holds no regular files), removed by the last DEL. Since a waiter may get
// the lock on a directory that was just removed, it checks that the path
// still names the directory it locked, and otherwise starts again.
type containerLock struct {
	f    *os.File
	path string
}

func (d *Datapath) lockContainer(containerID string) (*containerLock, error) {
	return d.lockContainerPinName(pinName(containerID))
}

// lockContainerPinName locks a container by its escaped name (pinName).
func (d *Datapath) lockContainerPinName(name string) (*containerLock, error) {
	path := filepath.Join(d.locksDir(), name)
	for range 100 {
		if err := os.MkdirAll(path, 0o700); err != nil {
			return nil, fmt.Errorf("create lock %s: %w", path, err)
		}
		f, err := os.Open(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // removed between mkdir and open
		}
		if err != nil {
			return nil, fmt.Errorf("open lock %s: %w", path, err)
		}
		if err := flock(f, unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if sameFile(f, path) {
			return &containerLock{f: f, path: path}, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: it keeps being removed", path)
}

// unlock releases the lock; with remove, it first removes the lock
// directory (while still holding it, so a waiter notices).
func (l *containerLock) unlock(remove bool) {
	if remove {
		os.Remove(l.path)
	}
	l.f.Close()
}
