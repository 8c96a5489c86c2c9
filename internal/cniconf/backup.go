package cniconf

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// BackupDir is the directory, below the caller's state directory, that
// holds the backups.
const BackupDir = "cni-backup"

func backupDir(stateDir string) string { return filepath.Join(stateDir, BackupDir) }

// recordSuffix ends the name of a backup record: <target>.json.
const recordSuffix = ".json"

// record is what we know about one config file we wrote (the target): what
// to put back on uninstall, and how to recognise our own writes.
type record struct {
	// ConfDir is the CNI config directory the files are in.
	ConfDir string `json:"confDir"`
	// Target is the base name of the file that holds our entry.
	Target string `json:"target"`
	// Written holds the sha256 of the last content we wrote to Target, and
	// of the one before it: a crash between saving this record and the
	// rename leaves either in place, and both are ours.
	Written []string `json:"writtenSHA256"`
	// Files are the files as they were before we first modified them:
	// Target itself, or the .conf we converted (and a .conflist of the same
	// name that the .conf was shadowing, if there was one).
	Files []savedFile `json:"files"`
}

// savedFile is one file of a backup.
type savedFile struct {
	Name string `json:"name"`
	// Mode is the permission bits, in octal.
	Mode string `json:"mode"`
	UID  int    `json:"uid"`
	GID  int    `json:"gid"`
	// Symlink, when set, is what the file was: a symlink with this target.
	Symlink string `json:"symlink,omitempty"`
	// Stripped: the file already had a pktmeta entry, and Content is the
	// file without it.
	Stripped bool   `json:"stripped,omitempty"`
	SHA256   string `json:"sha256,omitempty"`
	Content  []byte `json:"content,omitempty"`
}

func (f *savedFile) meta() (fileMeta, error) {
	perm, err := strconv.ParseUint(f.Mode, 8, 32)
	if err != nil || perm&^0o777 != 0 {
		return fileMeta{}, fmt.Errorf("backup of %s: bad mode %q", f.Name, f.Mode)
	}
	return fileMeta{perm: fs.FileMode(perm), uid: f.UID, gid: f.GID}, nil
}

func (r *record) ours(sum string) bool { return slices.Contains(r.Written, sum) }

// wrote records sum as what we wrote last.
func (r *record) wrote(sum string) {
	prev := r.Written
	r.Written = []string{sum}
	if len(prev) > 0 && prev[0] != sum {
		r.Written = append(r.Written, prev[0])
	}
}

func (r *record) file(name string) *savedFile {
	for i := range r.Files {
		if r.Files[i].Name == name {
			return &r.Files[i]
		}
	}
	return nil
}

func (r *record) check() error {
	if r.Target == "" || strings.ContainsRune(r.Target, '/') || len(r.Files) == 0 {
		return errors.New("incomplete record")
	}
	for i := range r.Files {
		f := &r.Files[i]
		if f.Name == "" || strings.ContainsRune(f.Name, '/') {
			return fmt.Errorf("bad file name %q", f.Name)
		}
		if _, err := f.meta(); err != nil {
			return err
		}
		if f.Symlink == "" && sha256Hex(f.Content) != f.SHA256 {
			return fmt.Errorf("backup of %s does not match its sha256", f.Name)
		}
	}
	return nil
}

func recordPath(stateDir, target string) string {
	return filepath.Join(backupDir(stateDir), target+recordSuffix)
}

// loadRecord reads the record of target; nil when there is none.
func loadRecord(stateDir, target string) (*record, error) {
	return readRecord(recordPath(stateDir, target))
}

func readRecord(path string) (*record, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	r := &record{}
	if err := json.Unmarshal(b, r); err != nil {
		return nil, fmt.Errorf("backup %s: %w", path, err)
	}
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("backup %s: %w", path, err)
	}
	return r, nil
}

// recordPaths lists the records in the state directory.
func recordPaths(stateDir string) ([]string, error) {
	entries, err := os.ReadDir(backupDir(stateDir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var paths []string
	for _, e := range entries {
		if e.Type().IsRegular() && strings.HasSuffix(e.Name(), recordSuffix) {
			paths = append(paths, filepath.Join(backupDir(stateDir), e.Name()))
		}
	}
	return paths, nil
}

func saveRecord(stateDir string, r *record) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	path := recordPath(stateDir, r.Target)
	if err := writeAtomic(path, b, fileMeta{perm: 0o600, uid: -1, gid: -1}, nil, nil); err != nil {
		return fmt.Errorf("save backup %s: %w", path, err)
	}
	return nil
}

// saveFileOf makes the backup of a config file: its bytes, or, when it
// already has an entry of ours, its bytes without it.
func saveFileOf(name string, data []byte, meta fileMeta, list bool) (savedFile, error) {
	f := savedFile{Name: name, Mode: fmt.Sprintf("%04o", meta.perm), UID: meta.uid, GID: meta.gid}
	if list {
		out, had, err := withoutEntry(data)
		if err != nil {
			return f, err
		}
		if had {
			data, f.Stripped = out, true
		}
	}
	f.Content = data
	f.SHA256 = sha256Hex(data)
	return f, nil
}
