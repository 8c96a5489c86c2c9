package cniconf

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
)

// binaryPerm is the mode of the installed plugin binary.
const binaryPerm fs.FileMode = 0o755

// InstallBinary copies the plugin binary src to binDir/pktmeta (the name
// the CNI type requires) atomically: a temporary file in binDir, fsynced,
// chmod 0755, renamed into place. It writes nothing when the installed
// binary already has src's content (sha256) and mode, and reports whether
// it wrote. It first removes the temporary files an interrupted install
// left in binDir. log may be nil.
func InstallBinary(src, binDir string, log *slog.Logger) (bool, error) {
	dst := filepath.Join(binDir, PluginType)
	changed, err := installBinary(src, dst, orDiscard(log))
	if err != nil {
		return false, fmt.Errorf("install %s as %s: %w", src, dst, err)
	}
	return changed, nil
}

func installBinary(src, dst string, log *slog.Logger) (bool, error) {
	in, err := os.Open(src)
	if err != nil {
		return false, err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return false, err
	} else if !fi.Mode().IsRegular() {
		return false, errors.New("not a regular file")
	}
	want, err := sha256File(src)
	if err != nil {
		return false, err
	}
	removeTemps(filepath.Dir(dst), log)

	if fi, err := os.Lstat(dst); err == nil && fi.Mode().IsRegular() {
		if have, err := sha256File(dst); err == nil && have == want {
			if fi.Mode().Perm() == binaryPerm {
				return false, nil
			}
			if err := os.Chmod(dst, binaryPerm); err != nil {
				return false, err
			}
			return true, nil
		}
	}

	err = replaceAtomic(dst, fileMeta{perm: binaryPerm, uid: -1, gid: -1}, nil, log, func(f *os.File) error {
		if _, err := io.CopyN(f, in, fi.Size()/2); err != nil && err != io.EOF {
			return err
		}
		pauseAt(dst, "copy")
		_, err := io.Copy(f, in)
		return err
	})
	if err != nil {
		return false, err
	}
	// src may have changed while we copied it.
	if got, err := sha256File(dst); err != nil || got != want {
		return true, fmt.Errorf("%s changed while it was copied", src)
	}
	return true, nil
}

// removeBinary removes binDir/pktmeta when its content is src's.
func removeBinary(src, binDir string, log *slog.Logger) (bool, error) {
	dst := filepath.Join(binDir, PluginType)
	have, err := sha256File(dst)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("uninstall %s: %w", dst, err)
	}
	want, err := sha256File(src)
	if err != nil {
		return false, fmt.Errorf("uninstall %s: compare with %s: %w", dst, src, err)
	}
	if have != want {
		log.Warn("leaving the plugin binary: it is not the one we ship", "file", dst, "ours", src)
		return false, nil
	}
	if err := removeFile(dst); err != nil {
		return false, fmt.Errorf("uninstall %s: %w", dst, err)
	}
	log.Info("removed the plugin binary", "file", dst)
	return true, nil
}
