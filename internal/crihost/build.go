package crihost

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
)

// The programs the harness compiles: the two image binaries and the
// subreaper containerd runs under. They sit in testdata so that
// `go build ./...` and `go vet ./...` of the repository skip them, and are
// embedded so that building them needs no source checkout at run time.
//
//go:embed testdata/images/pause/main.go testdata/images/netutil/main.go testdata/reaper/main.go
var sources embed.FS

// BuildStatic compiles the main package in srcDir (standard library only)
// into a static, reproducible binary at out.
func BuildStatic(ctx context.Context, srcDir, out string) error {
	return buildFS(ctx, os.DirFS(srcDir), filepath.Base(srcDir), out)
}

// buildEmbedded builds one of the embedded programs ("testdata/reaper").
func buildEmbedded(ctx context.Context, dir, out string) error {
	sub, err := fs.Sub(sources, dir)
	if err != nil {
		return err
	}
	return buildFS(ctx, sub, path.Base(dir), out)
}

// buildPrefix names build directories; CleanupStale removes those whose
// process is gone.
const buildPrefix = namePrefix + "build-"

// buildFS copies the .go files of src into a throw-away module and builds
// it there, so the repository's go.mod (which other work may be changing
// at the same moment) plays no part. CGO is off, so the binary is static
// and runs in an image with nothing else in it; -trimpath and an empty
// build id make it reproducible.
func buildFS(ctx context.Context, src fs.FS, name, out string) error {
	tmp, err := os.MkdirTemp("", fmt.Sprintf("%s%d-", buildPrefix, os.Getpid()))
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	files, err := fs.Glob(src, "*.go")
	if err != nil || len(files) == 0 {
		return fmt.Errorf("build %s: no Go files (%v)", name, err)
	}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := fs.ReadFile(src, f)
		if err != nil {
			return fmt.Errorf("build %s: %w", name, err)
		}
		if err := os.WriteFile(filepath.Join(tmp, f), b, 0o644); err != nil {
			return err
		}
	}
	mod := fmt.Sprintf("module pktmeta.test/%s\n\ngo %s\n", name, goVersion())
	if err := os.WriteFile(filepath.Join(tmp, "go.mod"), []byte(mod), 0o644); err != nil {
		return err
	}
	abs, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w -buildid=", "-o", abs, ".")
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH, "GOWORK=off", "GOFLAGS=")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", name, err, b)
	}
	return nil
}

// goVersion is the language version for the throw-away go.mod: the one of
// the toolchain that built this package ("go1.26.8" → "1.26").
func goVersion() string {
	v := strings.TrimPrefix(runtime.Version(), "go")
	if parts := strings.SplitN(v, ".", 3); len(parts) >= 2 {
		return parts[0] + "." + parts[1]
	}
	return "1.21"
}

// packageDir is the source directory of this package.
func packageDir() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok || !filepath.IsAbs(file) {
		return "", fmt.Errorf("cannot locate the crihost sources (built with -trimpath?)")
	}
	return filepath.Dir(file), nil
}
