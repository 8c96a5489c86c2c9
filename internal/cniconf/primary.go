package cniconf

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/fsnotify/fsnotify"
)

// ErrNoPrimary: the config directory holds no valid network configuration
// yet, typically because the primary CNI has not started. Wait for one with
// [WaitForPrimary] or [Watch].
var ErrNoPrimary = errors.New("no CNI network configuration")

// Extensions are the config file extensions container runtimes read.
var extensions = []string{".conf", ".conflist", ".json"}

// primary is the highest-priority config, as read.
type primary struct {
	path string
	list bool // a .conflist; otherwise a single-plugin .conf or .json
	data []byte
	meta fileMeta
	// symlink is the link's target when path is a symlink.
	symlink string
	// name is the network's name; external counts the plugins libcni
	// loads from <dir>/<name>/*.conf and runs after the list's.
	name     string
	external int
}

// FindPrimary returns the path of the network configuration that container
// runtimes use: the first file of dir, by name, among those with a .conf,
// .conflist or .json extension that parses and is valid. Files that are not
// are skipped with a warning on log (which may be nil). When there is none,
// the error wraps ErrNoPrimary.
func FindPrimary(dir string, log *slog.Logger) (string, error) {
	p, err := findPrimary(dir, orDiscard(log))
	if err != nil {
		return "", err
	}
	return p.path, nil
}

func findPrimary(dir string, log *slog.Logger) (*primary, error) {
	files, err := libcni.ConfFiles(dir, extensions)
	if err != nil {
		return nil, fmt.Errorf("read CNI config dir: %w", err)
	}
	slices.Sort(files)
	for _, path := range files {
		p, err := readConfig(path)
		if err != nil {
			log.Warn("skipping CNI config", "file", path, "err", err)
			continue
		}
		return p, nil
	}
	return nil, fmt.Errorf("%w in %s", ErrNoPrimary, dir)
}

// readConfig reads and validates a config file the way kubelet and CRI-O
// do before they use it.
func readConfig(path string) (*primary, error) {
	p := &primary{path: path, list: filepath.Ext(path) == ".conflist"}
	lfi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if lfi.Mode()&fs.ModeSymlink != 0 {
		if p.symlink, err = os.Readlink(path); err != nil {
			return nil, err
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	p.meta = metaOf(fi)
	if p.data, err = io.ReadAll(f); err != nil {
		return nil, err
	}

	if p.list {
		list, err := libcni.ConfListFromBytes(p.data)
		if err != nil {
			return nil, err
		}
		n := len(list.Plugins)
		p.name = list.Name
		if !list.LoadOnlyInlinedPlugins {
			ext, err := libcni.NetworkPluginConfsFromFiles(filepath.Dir(path), list.Name)
			if err != nil {
				return nil, err
			}
			p.external = len(ext)
			n += len(ext)
		}
		if n == 0 {
			return nil, errors.New("no plugins")
		}
		return p, nil
	}
	conf, err := libcni.NetworkPluginConfFromBytes(p.data)
	if err != nil {
		return nil, err
	}
	// Runtimes (containerd's go-cni) still load .conf files through this.
	//lint:ignore SA1019 the same check a runtime applies to a .conf file
	if _, err := libcni.ConfListFromConf(conf); err != nil {
		return nil, err
	}
	return p, nil
}

// WaitForPrimary waits until dir holds a valid network configuration and
// returns its path. It watches dir with fsnotify (and re-checks every few
// seconds, which also covers a dir that does not exist yet). It returns
// ctx's error when ctx ends first.
func WaitForPrimary(ctx context.Context, dir string) (string, error) {
	dir = filepath.Clean(dir)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return "", fmt.Errorf("watch %s: %w", dir, err)
	}
	defer w.Close()
	watching := w.Add(dir) == nil

	log := orDiscard(nil)
	tick := time.NewTicker(waitPoll)
	defer tick.Stop()
	for {
		// Check after the watch is in place, so nothing is missed between.
		if p, err := findPrimary(dir, log); err == nil {
			return p.path, nil
		} else if !errors.Is(err, ErrNoPrimary) && !errors.Is(err, fs.ErrNotExist) {
			return "", err
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case ev, ok := <-w.Events:
			if !ok {
				return "", fmt.Errorf("watch %s: closed", dir)
			}
			if ev.Name == dir && ev.Has(fsnotify.Remove|fsnotify.Rename) {
				watching = false
			}
		case err, ok := <-w.Errors:
			if !ok {
				return "", fmt.Errorf("watch %s: closed", dir)
			}
			_ = err // a lost event: the check above covers it
		case <-tick.C:
			if !watching {
				watching = w.Add(dir) == nil
			}
		}
	}
}

// waitPoll is how often WaitForPrimary re-checks without events.
const waitPoll = 5 * time.Second
