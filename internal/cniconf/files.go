package cniconf

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// tempPrefix names our temporary files. libcni only reads names ending in
// .conf, .conflist or .json, and these never do.
const tempPrefix = ".pktmeta-tmp-"

// staleTemp is the age after which a temporary file of ours is a leftover
// of a crash and may be removed.
const staleTemp = time.Minute

// errRaced: the file changed between our read and our rename.
var errRaced = errors.New("changed by another writer while we were writing it")

// fileMeta is what we keep of a file besides its content.
type fileMeta struct {
	perm     fs.FileMode
	uid, gid int // -1: leave as created
}

func metaOf(fi fs.FileInfo) fileMeta {
	m := fileMeta{perm: fi.Mode().Perm(), uid: -1, gid: -1}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		m.uid, m.gid = int(st.Uid), int(st.Gid)
	}
	return m
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func sha256File(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// writeAtomic replaces path with data: a temporary file in the same
// directory, fsynced, given meta's owner and mode, renamed over path, and
// the directory fsynced. precheck, when set, runs just before the rename;
// its error abandons the write. Without the privilege to give the file
// its owner (CAP_CHOWN), the file is written anyway and log warned.
func writeAtomic(path string, data []byte, meta fileMeta, precheck func() error, log *slog.Logger) error {
	return replaceAtomic(path, meta, precheck, log, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
}

func replaceAtomic(path string, meta fileMeta, precheck func() error, log *slog.Logger, fill func(*os.File) error) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tempPrefix+"*")
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
	if err = fill(f); err != nil {
		return err
	}
	if err = chown(f, meta); errors.Is(err, fs.ErrPermission) {
		orDiscard(log).Warn("cannot keep the file's owner without CAP_CHOWN", "file", path, "uid", meta.uid, "gid", meta.gid, "err", err)
	} else if err != nil {
		return err
	}
	// After chown, which clears set-id bits.
	if err = f.Chmod(meta.perm); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if precheck != nil {
		if err = precheck(); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(dir)
}

// chown gives f meta's owner, when that is not already its owner.
func chown(f *os.File, meta fileMeta) error {
	if meta.uid < 0 || meta.gid < 0 {
		return nil
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) == meta.uid && int(st.Gid) == meta.gid {
		return nil
	}
	return f.Chown(meta.uid, meta.gid)
}

// symlinkAtomic replaces path with a symlink to target.
func symlinkAtomic(target, path string) error {
	dir := filepath.Dir(path)
	for range 10 {
		tmp := filepath.Join(dir, fmt.Sprintf("%s%d", tempPrefix, time.Now().UnixNano()))
		err := os.Symlink(target, tmp)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return err
		}
		if err := os.Rename(tmp, path); err != nil {
			os.Remove(tmp)
			return err
		}
		return syncDir(dir)
	}
	return fmt.Errorf("symlink %s: no free temporary name", path)
}

// removeFile removes path and makes that durable.
func removeFile(path string) error {
	if err := os.Remove(path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// removeStaleTemps removes temporary files we left behind in dir when a
// write was interrupted. Young ones may belong to a write in progress.
func removeStaleTemps(dir string, log *slog.Logger) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), tempPrefix) {
			continue
		}
		fi, err := e.Info()
		if err != nil || time.Since(fi.ModTime()) < staleTemp {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if err := os.Remove(p); err == nil {
			log.Info("removed a leftover temporary file", "file", p)
		}
	}
}

// lockState takes the exclusive lock that serialises Install and Uninstall
// between processes. The returned function releases it.
func lockState(stateDir string) (func(), error) {
	dir := backupDir(stateDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", f.Name(), err)
	}
	return func() { f.Close() }, nil
}
