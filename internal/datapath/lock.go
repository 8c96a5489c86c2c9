package datapath

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Lock is an flock on the pin directory. Attach and detach of different
// pods take it shared and run in parallel; loading and upgrading the
// datapath take it exclusive.
type Lock struct {
	f *os.File
}

// LockPinPath creates the pin directory if needed and locks it.
func LockPinPath(pinPath string, exclusive bool) (*Lock, error) {
	if err := CheckBPFFS(pinPath); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(pinPath, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory: %w", err)
	}
	f, err := os.Open(pinPath)
	if err != nil {
		return nil, fmt.Errorf("open pin directory: %w", err)
	}
	how := unix.LOCK_SH
	if exclusive {
		how = unix.LOCK_EX
	}
	for {
		err = unix.Flock(int(f.Fd()), how)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", pinPath, err)
	}
	return &Lock{f: f}, nil
}

// Unlock releases the lock.
func (l *Lock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close() // closing the last fd drops the flock
	l.f = nil
	return err
}
