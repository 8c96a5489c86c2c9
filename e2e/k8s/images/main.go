// Command images builds the images the Kubernetes end-to-end test runs,
// as docker-archive tarballs that `ctr -n k8s.io images import` and
// `kind load image-archive` read:
//
//	go run ./e2e/k8s/images --out DIR
//
// writes DIR/pause.tar (pktmeta.test/pause:1, the sandbox image) and
// DIR/e2e-tool.tar (pktmeta.test/e2e-tool:1: e2etool and pktmetactl) and
// prints "<ref> <path>" for each. Nothing is pulled from a registry, and
// the same sources give the same image digests: binaries are static,
// built with -trimpath and no build id, and every timestamp in the images
// is the epoch (internal/crihost.WriteImage).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/pktmeta/pktmeta/internal/crihost"
)

// ToolImage is the image the test's pods run; crihost.PauseImage is the
// sandbox image the node's containerd is configured with.
const ToolImage = "pktmeta.test/e2e-tool:1"

func main() {
	out := flag.String("out", "", "directory to write the tarballs to")
	flag.Parse()
	if *out == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "usage: go run ./e2e/k8s/images --out DIR")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := build(ctx, *out); err != nil {
		fmt.Fprintln(os.Stderr, "images:", err)
		os.Exit(1)
	}
}

func build(ctx context.Context, out string) error {
	root, err := repoRoot(ctx)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	bins, err := os.MkdirTemp("", "pktmeta-e2e-images-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bins)

	pause := filepath.Join(bins, "pause")
	if err := crihost.BuildStatic(ctx, filepath.Join(root, "internal/crihost/testdata/images/pause"), pause); err != nil {
		return err
	}
	tool := filepath.Join(bins, "e2etool")
	ctl := filepath.Join(bins, "pktmetactl")
	for _, b := range []struct{ pkg, out string }{{"./e2e/k8s/tool", tool}, {"./cmd/pktmetactl", ctl}} {
		if err := goBuild(ctx, root, b.pkg, b.out); err != nil {
			return err
		}
	}

	images := []struct {
		tar  string
		spec crihost.ImageSpec
	}{
		{"pause.tar", crihost.ImageSpec{
			Ref:        crihost.PauseImage,
			Files:      map[string]string{"/pause": pause},
			Entrypoint: []string{"/pause"},
		}},
		{"e2e-tool.tar", crihost.ImageSpec{
			Ref: ToolImage,
			Files: map[string]string{
				"/usr/local/bin/e2etool":    tool,
				"/usr/local/bin/pktmetactl": ctl,
			},
			Entrypoint: []string{"/usr/local/bin/e2etool"},
			Cmd:        []string{"sleep"},
			Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin"},
		}},
	}
	for _, im := range images {
		// The layer keeps each file's permission bits: make them the same
		// whatever the umask was when the binary was written.
		for _, f := range im.spec.Files {
			if err := os.Chmod(f, 0o755); err != nil {
				return err
			}
		}
		path := filepath.Join(out, im.tar)
		if err := crihost.WriteImage(im.spec, path); err != nil {
			return err
		}
		fmt.Println(im.spec.Ref, path)
	}
	return nil
}

// goBuild compiles a main package of this module, static and
// reproducible, for the architecture this command runs on (the node's).
func goBuild(ctx context.Context, root, pkg, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w -buildid=", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+runtime.GOARCH)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
	}
	return nil
}

// repoRoot is the directory of the module's go.mod, so the command works
// from any directory inside the repository.
func repoRoot(ctx context.Context) (string, error) {
	b, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(b))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside a Go module: run from the pktmeta repository")
	}
	return filepath.Dir(mod), nil
}
