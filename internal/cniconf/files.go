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

// Temporary files, and why removing leftovers is safe.
//
// Every file we write (a config, a backup record, the plugin binary, a
// restored symlink) is first created as tempPrefix+<random> in the target's
// directory and then renamed into place. A process killed in between (an
// init container's deadline, the OOM killer, SIGKILL) leaves the temporary
// file behind: up to a whole plugin binary in the CNI bin dir. The next
// Install, Uninstall or InstallBinary removes such leftovers from the dirs
// we write in (ConfDir, StateDir/cni-backup, BinDir), whatever their age,
// and nothing whose name does not start with tempPrefix.
//
// Another installer may be writing in the same dir at that moment: a second
// agent, an init container or an operator's one-shot install, each in its
// own pid namespace and maybe with its own state dir. So every writer holds
// a shared flock on the directory itself from before it creates its
// temporary file until after the rename (holdDir), and the cleaner removes
// temporary files only while it holds the exclusive flock on the directory
// (removeTemps). Holding that lock proves that no writer of ours, in any
// process, is between create and rename; the kernel drops the locks of a
// dead process, so whatever matches tempPrefix then is a leftover. The
// cleaner does not wait long for the lock: when writers keep it busy, the
// files stay until a later run.
//
// The alternatives were worse: a pid in the name cannot be checked across
// pid namespaces (every container has its own pid 1); an age rule keeps
// leftovers for a while and removes a slow writer's file; a flock on each
// temporary file needs a second, read-only descriptor (a writable one still
// open at the rename makes exec of the new plugin binary fail with ETXTBSY)
// and cannot cover temporary symlinks. A flock on the directory leaves
// nothing on disk (no lock file in /etc/cni/net.d or /opt/cni/bin), is
// released by the kernel on any death, and works across the hostPath
// mounts of several containers, which share the directory's inode. It is
// advisory: pktmeta versions from before it do not take it, so during an
// upgrade an older writer's rename may fail once and be retried.

// dirLockWait bounds how long a writer waits for a cleaner to finish (it
// holds the lock for the time of a few unlinks).
const dirLockWait = 30 * time.Second

// cleanWait bounds how long a cleaner waits for writers to finish before it
// leaves the leftovers to a later run.
const cleanWait = time.Second

// lockPoll is how often a waiting holdDir or removeTemps retries.
const lockPoll = 5 * time.Millisecond

// flockDir opens dir and takes a flock on it, polling until deadline.
func flockDir(dir string, how int, wait time.Duration) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(wait)
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		if !time.Now().Before(deadline) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, errDirBusy)
		}
		time.Sleep(lockPoll)
	}
}

var errDirBusy = errors.New("held by another process")

// holdDir takes a writer's shared lock on dir; the returned function
// releases it. Hold it from before creating a temporary file in dir until
// the file is renamed or removed.
func holdDir(dir string) (func(), error) {
	f, err := flockDir(dir, unix.LOCK_SH, dirLockWait)
	if err != nil {
		return nil, err
	}
	return func() { f.Close() }, nil
}

// isTemp: name is one of our temporary files.
func isTemp(name string) bool { return strings.HasPrefix(name, tempPrefix) }

// removeTemps removes the temporary files that interrupted writes left in
// dir, whatever their age, while no writer is active there (see above). It
// removes regular files and symlinks whose names start with tempPrefix,
// nothing else, and reports how many it removed.
func removeTemps(dir string, log *slog.Logger) int {
	f, err := flockDir(dir, unix.LOCK_EX, cleanWait)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			log.Debug("not removing leftover temporary files now", "dir", dir, "err", err)
		}
		return 0
	}
	defer f.Close()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		if !isTemp(e.Name()) || !(e.Type().IsRegular() || e.Type()&fs.ModeSymlink != 0) {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if err := os.Remove(p); err != nil {
			log.Warn("cannot remove a leftover temporary file", "file", p, "err", err)
			continue
		}
		log.Info("removed a leftover temporary file", "file", p)
		n++
	}
	if n > 0 {
		if err := syncDir(dir); err != nil {
			log.Debug("removed leftover temporary files", "dir", dir, "err", err)
		}
	}
	return n
}

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
		half := len(data) / 2
		if _, err := f.Write(data[:half]); err != nil {
			return err
		}
		pauseAt(path, "write")
		_, err := f.Write(data[half:])
		return err
	})
}

func replaceAtomic(path string, meta fileMeta, precheck func() error, log *slog.Logger, fill func(*os.File) error) (err error) {
	dir := filepath.Dir(path)
	release, err := holdDir(dir)
	if err != nil {
		return err
	}
	defer release()
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
	pauseAt(path, "rename")
	if precheck != nil {
		if err = precheck(); err != nil {
			return err
		}
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	pauseAt(path, "renamed")
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
	release, err := holdDir(dir)
	if err != nil {
		return err
	}
	defer release()
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

// testPauseEnv is a test hook: when it is set to "<base name>:<point>",
// the process stops at that point of writing the file of that base name
// (write: half of it written; rename: written and synced, not renamed yet;
// renamed: renamed, the directory not synced yet; copy: for the plugin
// binary, half of it copied) and says so on stderr, until it is killed.
// The crash tests use it to SIGKILL an install at a chosen moment. Never
// set it otherwise.
const testPauseEnv = "PKTMETA_TEST_PAUSE_AT"

func pauseAt(path, point string) {
	v := os.Getenv(testPauseEnv)
	if v == "" || v != filepath.Base(path)+":"+point {
		return
	}
	fmt.Fprintf(os.Stderr, "%s: paused at %s\n", testPauseEnv, v)
	for {
		time.Sleep(time.Hour)
	}
}
