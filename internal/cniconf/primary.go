package cniconf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/fsnotify/fsnotify"
	"github.com/pktmeta/pktmeta/plugin"
)

// ErrNoPrimary: the config directory holds no usable network
// configuration, typically because the primary CNI has not started yet.
// The error is a [*NoPrimaryError], which says why for every file. Wait for
// one with [WaitForPrimary] or [Watch].
var ErrNoPrimary = errors.New("no usable CNI network config")

// NoPrimaryError says why a directory has no usable network configuration:
// every entry of it, and why it is not one. errors.Is(err, ErrNoPrimary)
// holds for it.
type NoPrimaryError struct {
	Dir string
	// Missing: Dir does not exist.
	Missing bool
	// Skipped lists every entry of Dir, by name.
	Skipped []Skipped
}

// Skipped is a directory entry that is not a usable network configuration.
type Skipped struct {
	Name   string
	Reason string
}

func (e *NoPrimaryError) Error() string {
	what := strings.Join(e.Files(), "; ")
	switch {
	case e.Missing:
		what = "the directory does not exist"
	case len(e.Skipped) == 0:
		what = "the directory is empty"
	}
	return fmt.Sprintf("%s in %s: %s", ErrNoPrimary, e.Dir, what)
}

// Unwrap returns ErrNoPrimary.
func (e *NoPrimaryError) Unwrap() error { return ErrNoPrimary }

// Files lists the skipped entries as "name: reason".
func (e *NoPrimaryError) Files() []string {
	out := make([]string, 0, len(e.Skipped))
	for _, s := range e.Skipped {
		out = append(out, s.Name+": "+s.Reason)
	}
	return out
}

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
	// version is the network's cniVersion, as libcni reads it.
	version string
}

// FindPrimary returns the path of the network configuration that container
// runtimes use: the first file of dir, by name, among those with a .conf,
// .conflist or .json extension that parses and is valid, provided pktmeta
// can join it (its cniVersion is one the plugin speaks). Invalid files
// before it are skipped with a warning on log (which may be nil). When
// there is none, or the runtimes' choice has a cniVersion pktmeta does not
// speak, the error is a [*NoPrimaryError] naming every entry of dir and why
// it is not usable.
func FindPrimary(dir string, log *slog.Logger) (string, error) {
	p, err := findPrimary(dir, orDiscard(log))
	if err != nil {
		return "", err
	}
	return p.path, nil
}

func findPrimary(dir string, log *slog.Logger) (*primary, error) {
	// Sorted by name, as libcni.ConfFiles and then the runtimes sort them.
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, &NoPrimaryError{Dir: dir, Missing: true}
	}
	if err != nil {
		return nil, fmt.Errorf("read CNI config dir: %w", err)
	}
	np := &NoPrimaryError{Dir: dir}
	skip := func(name, reason string) { np.Skipped = append(np.Skipped, Skipped{name, reason}) }
	// chosen is the file runtimes use when pktmeta cannot use it.
	chosen := ""
	for _, e := range entries {
		name := e.Name()
		switch {
		case isTemp(name):
			skip(name, "our own temporary file (a write in progress, or left by an interrupted one)")
			continue
		case !slices.Contains(extensions, filepath.Ext(name)):
			skip(name, "not a config file name (runtimes read only *.conf, *.conflist and *.json)")
			continue
		case e.IsDir():
			skip(name, "a directory")
			continue
		case chosen != "":
			skip(name, fmt.Sprintf("shadowed by %s, which runtimes use first", chosen))
			continue
		}
		path := filepath.Join(dir, name)
		p, err := readConfig(path)
		if err != nil {
			skip(name, err.Error())
			continue
		}
		if err := checkVersion(p.version); err != nil {
			// Runtimes use this one; the files after it do not matter.
			chosen = name
			skip(name, err.Error()+"; runtimes use this file")
			continue
		}
		for _, s := range np.Skipped {
			if slices.Contains(extensions, filepath.Ext(s.Name)) {
				log.Warn("skipping CNI config", "file", filepath.Join(dir, s.Name), "err", s.Reason)
			}
		}
		return p, nil
	}
	return nil, np
}

// checkVersion: the plugin speaks version v of the spec.
func checkVersion(v string) error {
	vs := plugin.Versions().SupportedVersions()
	switch {
	case slices.Contains(vs, v):
		return nil
	case v == "":
		return fmt.Errorf("no cniVersion (pktmeta speaks %s)", strings.Join(vs, ", "))
	}
	return fmt.Errorf("cniVersion %q, which pktmeta does not speak (it speaks %s)", v, strings.Join(vs, ", "))
}

// readConfig reads and validates a config file the way kubelet and CRI-O
// do before they use it. Its errors say what is wrong with the file, for
// NoPrimaryError.
func readConfig(path string) (*primary, error) {
	p := &primary{path: path, list: filepath.Ext(path) == ".conflist"}
	lfi, err := os.Lstat(path)
	if err != nil {
		return nil, unreadable(err)
	}
	if lfi.Mode()&fs.ModeSymlink != 0 {
		if p.symlink, err = os.Readlink(path); err != nil {
			return nil, unreadable(err)
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, unreadable(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, unreadable(err)
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	p.meta = metaOf(fi)
	if p.data, err = io.ReadAll(f); err != nil {
		return nil, unreadable(err)
	}
	if len(bytes.TrimSpace(p.data)) == 0 {
		return nil, errors.New("empty file")
	}
	var v any
	if err := json.Unmarshal(p.data, &v); err != nil {
		return nil, fmt.Errorf("not JSON: %v", err)
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, errors.New("not a JSON object")
	}

	if p.list {
		list, err := libcni.ConfListFromBytes(p.data)
		if err != nil {
			return nil, invalid(err)
		}
		n := len(list.Plugins)
		p.name, p.version = list.Name, list.CNIVersion
		if !list.LoadOnlyInlinedPlugins {
			ext, err := libcni.NetworkPluginConfsFromFiles(filepath.Dir(path), list.Name)
			if err != nil {
				return nil, fmt.Errorf("plugins in %s: %w", filepath.Join(filepath.Dir(path), list.Name), err)
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
		return nil, invalid(err)
	}
	// Runtimes (containerd's go-cni) still load .conf files through this.
	//lint:ignore SA1019 the same check a runtime applies to a .conf file
	list, err := libcni.ConfListFromConf(conf)
	if err != nil {
		return nil, invalid(err)
	}
	p.version = list.CNIVersion
	return p, nil
}

// unreadable shortens an os error to what is wrong (the caller names the
// file).
func unreadable(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return fmt.Errorf("cannot read it: %w", err)
}

// invalid rephrases libcni's parse errors.
func invalid(err error) error {
	msg := err.Error()
	for _, p := range []string{"error parsing configuration list: ", "error parsing configuration: "} {
		msg = strings.TrimPrefix(msg, p)
	}
	if msg == "no plugins in list" {
		return errors.New("no plugins")
	}
	return fmt.Errorf("not a valid network config: %s", msg)
}

// WaitForPrimary waits until dir holds a usable network configuration (see
// [FindPrimary]) and returns its path. It watches dir with fsnotify (and re-checks every few
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
