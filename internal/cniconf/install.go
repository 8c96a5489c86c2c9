package cniconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

// Options say where things are and what to install. Install needs
// ConfDir, StateDir and Entry; Uninstall ConfDir and StateDir, and BinDir
// and BinarySource to remove the plugin binary. The tuning fields are for
// Watch; zero values select the defaults in parentheses.
type Options struct {
	// ConfDir is the CNI config directory, usually /etc/cni/net.d.
	ConfDir string
	// StateDir keeps the backups, in StateDir/cni-backup. It must survive
	// agent restarts (a hostPath, not an emptyDir) or Uninstall can no
	// longer restore files byte for byte.
	StateDir string
	// Entry is the pktmeta plugin entry, a JSON object with "type":
	// "pktmeta": a value json.Marshal renders as one (a map[string]any, a
	// struct), or the JSON itself as a json.RawMessage, []byte or string.
	Entry any

	// BinDir is the CNI bin directory, usually /opt/cni/bin.
	BinDir string
	// BinarySource is the plugin binary we ship; Uninstall removes
	// BinDir/pktmeta only when it has the same content.
	BinarySource string

	// Logger receives the logs; nil discards them.
	Logger *slog.Logger

	// Debounce is the quiet time after a change before Watch acts (200ms).
	// While changes keep coming, Watch acts 5×Debounce after the first.
	Debounce time.Duration
	// FightRepairs is how many repairs of one file within FightWindow are
	// still normal (5); one more means another writer is fighting us.
	FightRepairs int
	// FightWindow is the window of FightRepairs (60s).
	FightWindow time.Duration
	// MaxBackoff caps the delay between repairs during a fight (60s). The
	// first delay is 5×Debounce, doubled at every further repair.
	MaxBackoff time.Duration
	// Resync is how often Watch re-checks without any event (1m).
	Resync time.Duration
}

func (o *Options) logger() *slog.Logger { return orDiscard(o.Logger) }

func orDiscard(l *slog.Logger) *slog.Logger {
	if l == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l
}

func (o *Options) check(needEntry bool) error {
	if o.ConfDir == "" {
		return errors.New("no CNI config directory given")
	}
	if o.StateDir == "" {
		return errors.New("no state directory given")
	}
	if needEntry && o.Entry == nil {
		return errors.New("no plugin entry given")
	}
	return nil
}

// removeTemps removes the temporary files interrupted writes left in the
// dirs we write in (see files.go for why that is safe).
func (o *Options) removeTemps(log *slog.Logger) {
	removeTemps(o.ConfDir, log)
	removeTemps(backupDir(o.StateDir), log)
	if o.BinDir != "" {
		removeTemps(o.BinDir, log)
	}
}

// Result says what Install or Uninstall did.
type Result struct {
	// Primary is the highest-priority config file Install found.
	Primary string
	// Path is the file that holds our entry after Install: Primary, or the
	// .conflist a .conf or .json primary was converted into.
	Path string
	// Changed is true when a file was written, restored or removed.
	Changed bool
	// Files lists the files written, restored or removed, in the order
	// that happened.
	Files []string
	// BinaryRemoved: Uninstall removed the plugin binary.
	BinaryRemoved bool
}

// ErrNotInstalled: the highest-priority config does not end in the entry.
var ErrNotInstalled = errors.New("pktmeta entry not in the CNI config")

// Check reports, without writing anything, whether the highest-priority
// CNI config in opts.ConfDir ends in opts.Entry (in any pktmeta entry when
// opts.Entry is nil), as a readiness probe would. It returns that config's
// path, and an error wrapping ErrNoPrimary or ErrNotInstalled when not.
func Check(opts Options) (string, error) {
	var entry json.RawMessage
	if opts.Entry != nil {
		var err error
		if entry, err = normalizeEntry(opts.Entry); err != nil {
			return "", fmt.Errorf("check: %w", err)
		}
	}
	p, err := findPrimary(filepath.Clean(opts.ConfDir), opts.logger())
	if err != nil {
		return "", fmt.Errorf("check: %w", err)
	}
	var c *conflist
	if p.list {
		c, err = parseConflist(p.data)
	}
	switch {
	case err != nil:
		return p.path, fmt.Errorf("check %s: %w", p.path, err)
	case c == nil, entry != nil && !c.hasEntry(entry),
		entry == nil && (c.ours() != 1 || !isOurs(c.plugins[len(c.plugins)-1])):
		return p.path, fmt.Errorf("check %s: %w", p.path, ErrNotInstalled)
	}
	return p.path, nil
}

// maxRaces bounds how often Install starts over when the file changes
// under it.
const maxRaces = 3

// Install puts opts.Entry into the highest-priority CNI config, as the last
// plugin, converting a .conf into a .conflist, and saves a backup first. It
// writes nothing when the entry is already there (Changed is false then).
// With no usable config in the directory, the error is a *NoPrimaryError
// (errors.Is ErrNoPrimary) that names every file and why it is not used.
// Install first removes the temporary files that interrupted writes left in
// ConfDir, StateDir and BinDir.
func Install(opts Options) (Result, error) {
	if err := opts.check(true); err != nil {
		return Result{}, fmt.Errorf("install: %w", err)
	}
	entry, err := normalizeEntry(opts.Entry)
	if err != nil {
		return Result{}, fmt.Errorf("install: %w", err)
	}
	opts.ConfDir = filepath.Clean(opts.ConfDir)
	unlock, err := lockState(opts.StateDir)
	if err != nil {
		return Result{}, fmt.Errorf("install: %w", err)
	}
	defer unlock()

	log := opts.logger()
	opts.removeTemps(log)
	for race := 0; ; race++ {
		p, err := findPrimary(opts.ConfDir, log)
		if err != nil {
			return Result{}, fmt.Errorf("install: %w", err)
		}
		res, err := installInto(&opts, p, entry, log)
		if errors.Is(err, errRaced) && race < maxRaces {
			log.Debug("config changed while we wrote it; starting over", "file", p.path)
			continue
		}
		if err != nil {
			return res, fmt.Errorf("install into %s: %w", p.path, err)
		}
		return res, nil
	}
}

func installInto(opts *Options, p *primary, entry json.RawMessage, log *slog.Logger) (Result, error) {
	target := p.path
	if !p.list {
		target = strings.TrimSuffix(p.path, filepath.Ext(p.path)) + ".conflist"
	}
	res := Result{Primary: p.path, Path: target}
	if p.external > 0 {
		return res, fmt.Errorf("network %q has %d plugins in %s, which libcni runs after the list: pktmeta would not run last",
			p.name, p.external, filepath.Join(filepath.Dir(p.path), p.name, "*.conf"))
	}

	var out []byte
	if p.list {
		var changed bool
		var err error
		if out, changed, err = withEntry(p.data, entry); err != nil {
			return res, err
		}
		if !changed {
			return res, nil
		}
	} else {
		var err error
		if out, err = convert(p.data, entry); err != nil {
			return res, err
		}
	}

	if err := checkOutput(out); err != nil {
		return res, err
	}

	// The backup, before anything is modified.
	rec, err := loadRecord(opts.StateDir, filepath.Base(target))
	if err != nil {
		log.Warn("ignoring an unusable backup; taking a new one", "err", err)
		rec = nil
	}
	if rec != nil && rec.ConfDir != opts.ConfDir {
		log.Warn("replacing the backup of a file in another CNI config dir", "file", target, "otherDir", rec.ConfDir)
		rec = nil
	}
	if rec == nil || !p.list || p.symlink != "" || !rec.ours(sha256Hex(p.data)) {
		// First modification, or the primary rewrote its file: what it
		// wrote is what Uninstall must put back.
		if rec != nil {
			log.Info("CNI config was rewritten by someone else; its new content becomes the backup", "file", p.path)
		}
		nrec, err := newRecord(opts.ConfDir, p, target, rec)
		if err != nil {
			return res, fmt.Errorf("backup: %w", err)
		}
		rec = nrec
	}
	rec.wrote(sha256Hex(out))
	if err := saveRecord(opts.StateDir, rec); err != nil {
		return res, err
	}

	unchanged := func() error {
		cur, err := os.ReadFile(p.path)
		if err != nil || !bytes.Equal(cur, p.data) {
			return errRaced
		}
		return nil
	}
	if err := writeAtomic(target, out, p.meta, unchanged, log); err != nil {
		return res, err
	}
	res.Changed = true
	res.Files = append(res.Files, target)
	if !p.list {
		if err := removeFile(p.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return res, fmt.Errorf("remove the converted config: %w", err)
		}
		res.Files = append(res.Files, p.path)
		log.Info("converted CNI config into a conflist", "from", p.path, "to", target)
	}
	log.Info("pktmeta entry installed", "file", target)
	return res, nil
}

// checkOutput makes sure that what we are about to write is a conflist
// runtimes accept, ending in our entry, in a spec version the plugin speaks
// (otherwise every pod's ADD would fail).
func checkOutput(out []byte) error {
	list, err := libcni.ConfListFromBytes(out)
	if err != nil {
		return fmt.Errorf("refusing to write an invalid config: %w", err)
	}
	if n := len(list.Plugins); n == 0 || list.Plugins[n-1].Network.Type != PluginType {
		return errors.New("refusing to write a config where pktmeta is not the last plugin")
	}
	if err := checkVersion(list.CNIVersion); err != nil {
		return fmt.Errorf("refusing to write a network with %w", err)
	}
	return nil
}

// newRecord makes the backup of p, about to be replaced by target. old is
// the previous record of target, if any.
func newRecord(confDir string, p *primary, target string, old *record) (*record, error) {
	rec := &record{ConfDir: confDir, Target: filepath.Base(target)}
	if old != nil {
		rec.Written = old.Written
	}
	f, err := saveFileOf(filepath.Base(p.path), p.data, p.meta, p.list)
	if err != nil {
		return nil, err
	}
	if p.symlink != "" {
		f.Symlink, f.Content, f.SHA256, f.Stripped = p.symlink, nil, "", false
	}
	rec.Files = append(rec.Files, f)
	if p.list {
		return rec, nil
	}

	// A .conf becomes a .conflist. One may already be there, shadowed by
	// the .conf; unless it is ours, it is saved too.
	lfi, err := os.Lstat(target)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return rec, nil
	case err != nil:
		return nil, err
	}
	data, err := os.ReadFile(target)
	if err != nil && lfi.Mode()&fs.ModeSymlink == 0 {
		return nil, err
	}
	if old != nil && err == nil && old.ours(sha256Hex(data)) {
		if sf := old.file(rec.Target); sf != nil {
			rec.Files = append(rec.Files, *sf)
		}
		return rec, nil
	}
	var sf savedFile
	if lfi.Mode()&fs.ModeSymlink != 0 {
		link, err := os.Readlink(target)
		if err != nil {
			return nil, err
		}
		sf = savedFile{Name: rec.Target, Mode: "0777", UID: -1, GID: -1, Symlink: link}
	} else {
		if sf, err = saveFileOf(rec.Target, data, metaOf(lfi), true); err != nil {
			// Not a conflist we can parse: keep it as it is.
			sf, _ = saveFileOf(rec.Target, data, metaOf(lfi), false)
		}
	}
	rec.Files = append(rec.Files, sf)
	return rec, nil
}

// Uninstall takes pktmeta out of the CNI configuration: every file we
// modified is restored from its backup when it still holds exactly what we
// wrote, and otherwise loses our entry only; any other pktmeta entry in the
// directory is removed too. Then BinDir/pktmeta is removed when it is ours
// (the same content as BinarySource). A second Uninstall changes nothing.
// Like Install, it first removes leftover temporary files. Stop Watch
// first, or it puts the entry back.
func Uninstall(opts Options) (Result, error) {
	if err := opts.check(false); err != nil {
		return Result{}, fmt.Errorf("uninstall: %w", err)
	}
	opts.ConfDir = filepath.Clean(opts.ConfDir)
	unlock, err := lockState(opts.StateDir)
	if err != nil {
		return Result{}, fmt.Errorf("uninstall: %w", err)
	}
	defer unlock()
	log := opts.logger()
	opts.removeTemps(log)

	var res Result
	var errs []error
	paths, err := recordPaths(opts.StateDir)
	if err != nil {
		return res, fmt.Errorf("uninstall: %w", err)
	}
	for _, rp := range paths {
		rec, err := readRecord(rp)
		if err != nil {
			log.Warn("unusable backup; removing only our entry", "err", err)
			if err := removeFile(rp); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if rec.ConfDir != opts.ConfDir {
			log.Warn("leaving the backup of another CNI config dir", "backup", rp, "dir", rec.ConfDir)
			continue
		}
		files, err := restore(opts.ConfDir, rec, log)
		res.Files = append(res.Files, files...)
		if err != nil {
			errs = append(errs, fmt.Errorf("uninstall from %s: %w", filepath.Join(opts.ConfDir, rec.Target), err))
			continue
		}
		if err := removeFile(rp); err != nil {
			errs = append(errs, err)
		}
	}

	// Entries we have no backup for: a file that was primary before
	// another took over, a lost state dir, a hand-made config.
	files, err := stripAll(opts.ConfDir, log)
	res.Files = append(res.Files, files...)
	if err != nil {
		errs = append(errs, err)
	}

	if len(errs) == 0 && opts.BinDir != "" && opts.BinarySource != "" {
		removed, err := removeBinary(opts.BinarySource, opts.BinDir, log)
		if err != nil {
			errs = append(errs, err)
		}
		res.BinaryRemoved = removed
	}
	res.Changed = len(res.Files) > 0 || res.BinaryRemoved
	return res, errors.Join(errs...)
}

// restore undoes what we did to rec's target.
func restore(confDir string, rec *record, log *slog.Logger) ([]string, error) {
	target := filepath.Join(confDir, rec.Target)
	data, err := os.ReadFile(target)
	if errors.Is(err, fs.ErrNotExist) {
		log.Info("CNI config we modified is gone; nothing to restore", "file", target)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	lfi, err := os.Lstat(target)
	if err != nil {
		return nil, err
	}
	sum := sha256Hex(data)
	same := func() error {
		cur, err := os.ReadFile(target)
		if err != nil || sha256Hex(cur) != sum {
			return errRaced
		}
		return nil
	}

	if lfi.Mode()&fs.ModeSymlink != 0 || !rec.ours(sum) {
		// Changed since we wrote it: keep the change, drop our entry.
		out, had, err := withoutEntry(data)
		if err != nil || !had {
			return nil, err
		}
		fi, err := os.Stat(target)
		if err != nil {
			return nil, err
		}
		if err := writeAtomic(target, out, metaOf(fi), same, log); err != nil {
			return nil, err
		}
		log.Info("removed the pktmeta entry; the rest was changed by someone else and stays", "file", target)
		return []string{target}, nil
	}

	// Still what we wrote: put the files back as they were. The others
	// (a converted .conf) first, so there is always a config in place.
	var done []string
	var targetSaved *savedFile
	for i := range rec.Files {
		f := &rec.Files[i]
		if f.Name == rec.Target {
			targetSaved = f
			continue
		}
		p := filepath.Join(confDir, f.Name)
		if _, err := os.Lstat(p); err == nil {
			log.Info("not restoring the backup: the file was written again since", "file", p)
			continue
		}
		if err := restoreFile(p, f, nil, log); err != nil {
			return done, err
		}
		done = append(done, p)
	}
	if targetSaved != nil {
		if err := restoreFile(target, targetSaved, same, log); err != nil {
			return done, err
		}
	} else if err := removeFile(target); err != nil {
		return done, err
	}
	done = append(done, target)
	log.Info("CNI config restored from backup", "file", target)
	return done, nil
}

func restoreFile(path string, f *savedFile, precheck func() error, log *slog.Logger) error {
	if f.Symlink != "" {
		if precheck != nil {
			if err := precheck(); err != nil {
				return err
			}
		}
		return symlinkAtomic(f.Symlink, path)
	}
	meta, err := f.meta()
	if err != nil {
		return err
	}
	return writeAtomic(path, f.Content, meta, precheck, log)
}

// stripAll removes our entry from every config in dir.
func stripAll(dir string, log *slog.Logger) ([]string, error) {
	files, err := libcni.ConfFiles(dir, extensions)
	if err != nil {
		return nil, err
	}
	slices.Sort(files)
	var done []string
	var errs []error
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		if filepath.Ext(path) != ".conflist" {
			if isOurs(data) {
				log.Warn("a single-plugin config of type pktmeta; leaving it", "file", path)
			}
			continue
		}
		out, had, err := withoutEntry(data)
		if err != nil {
			if _, perr := parseConflist(data); perr == nil {
				log.Warn("leaving a pktmeta entry", "file", path, "err", err)
			}
			continue
		}
		if !had {
			continue
		}
		fi, err := os.Stat(path)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		unchanged := func() error {
			cur, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(cur, data) {
				return errRaced
			}
			return nil
		}
		if err := writeAtomic(path, out, metaOf(fi), unchanged, log); err != nil {
			errs = append(errs, fmt.Errorf("uninstall from %s: %w", path, err))
			continue
		}
		log.Info("removed the pktmeta entry", "file", path)
		done = append(done, path)
	}
	return done, errors.Join(errs...)
}
