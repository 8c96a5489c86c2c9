package crihost

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// CrictlVersion is the cri-tools release EnsureTools builds. v1.37.0 talks
// CRI v1, which containerd 1.6 serves.
const CrictlVersion = "v1.37.0"

// Tools are the absolute paths of the programs a Host runs.
type Tools struct {
	Containerd string
	Ctr        string
	Shim       string // containerd-shim-runc-v2; containerd finds it on PATH
	Runc       string
	Crictl     string
}

// LookupTools finds the tools without installing anything: containerd, ctr,
// the runc shim and runc on PATH (plus /usr/sbin, where Debian puts runc),
// crictl in $CRICTL, <repo>/bin/tools or on PATH.
func LookupTools() (Tools, error) {
	var t Tools
	var missing []string
	for _, x := range []struct {
		name string
		dst  *string
	}{
		{"containerd", &t.Containerd},
		{"ctr", &t.Ctr},
		{"containerd-shim-runc-v2", &t.Shim},
		{"runc", &t.Runc},
	} {
		p, err := lookPath(x.name)
		if err != nil {
			missing = append(missing, x.name)
			continue
		}
		*x.dst = p
	}
	if p, err := crictlPath(); err == nil {
		t.Crictl = p
	} else {
		missing = append(missing, "crictl")
	}
	if len(missing) > 0 {
		return t, fmt.Errorf("%w: %s (run internal/crihost/install-tools.sh or EnsureTools)", errMissingTools, strings.Join(missing, ", "))
	}
	return t, nil
}

var errMissingTools = errors.New("missing tools")

// lookPath is exec.LookPath that also tries the sbin directories, which a
// non-login root shell may not have on PATH.
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

func crictlPath() (string, error) {
	if p := os.Getenv("CRICTL"); p != "" {
		return p, nil
	}
	if repo, err := repoRoot(); err == nil {
		p := filepath.Join(repo, "bin", "tools", "crictl")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return lookPath("crictl")
}

// repoRoot is the module root: two levels above this package's sources.
func repoRoot() (string, error) {
	dir, err := packageDir()
	if err != nil {
		return "", err
	}
	root := filepath.Dir(filepath.Dir(dir))
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		return "", fmt.Errorf("no go.mod at %s: %w", root, err)
	}
	return root, nil
}

// EnsureTools installs what is missing and returns the paths: containerd
// and runc with apt (Debian), crictl with `go install` into <repo>/bin/tools.
// It is what install-tools.sh does, callable from a test; installing needs
// root. A second call finds everything and installs nothing.
func EnsureTools(ctx context.Context) (Tools, error) {
	t, err := LookupTools()
	if err == nil {
		return t, nil
	}
	var pkgs []string
	if t.Containerd == "" || t.Ctr == "" || t.Shim == "" {
		pkgs = append(pkgs, "containerd")
	}
	if t.Runc == "" {
		pkgs = append(pkgs, "runc")
	}
	if len(pkgs) > 0 {
		if err := aptInstall(ctx, pkgs); err != nil {
			return t, err
		}
	}
	if t.Crictl == "" {
		if err := installCrictl(ctx); err != nil {
			return t, err
		}
	}
	return LookupTools()
}

func aptInstall(ctx context.Context, pkgs []string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("apt-get install %s: needs root", strings.Join(pkgs, " "))
	}
	install := func() ([]byte, error) {
		args := append([]string{"install", "-y", "--no-install-recommends"}, pkgs...)
		cmd := exec.CommandContext(ctx, "apt-get", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return cmd.CombinedOutput()
	}
	out, err := install()
	if err == nil {
		return nil
	}
	// A package list older than the mirror names .debs that are gone (404)
	// or does not know the package yet: refresh once and try again.
	if b, uerr := exec.CommandContext(ctx, "apt-get", "update").CombinedOutput(); uerr != nil {
		return fmt.Errorf("apt-get install %s: %w\n%s\napt-get update: %v\n%s", strings.Join(pkgs, " "), err, out, uerr, b)
	}
	if out, err = install(); err != nil {
		return fmt.Errorf("apt-get install %s (after apt-get update): %w\n%s", strings.Join(pkgs, " "), err, out)
	}
	return nil
}

func installCrictl(ctx context.Context) error {
	repo, err := repoRoot()
	if err != nil {
		return fmt.Errorf("install crictl: %w", err)
	}
	gobin := filepath.Join(repo, "bin", "tools")
	if err := os.MkdirAll(gobin, 0o755); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, "go", "install", "sigs.k8s.io/cri-tools/cmd/crictl@"+CrictlVersion)
	// Outside the repository's module: `go install pkg@version` ignores
	// go.mod anyway, and a temp dir keeps a go.work out of it.
	cmd.Dir = os.TempDir()
	cmd.Env = append(os.Environ(), "GOBIN="+gobin, "CGO_ENABLED=0", "GOWORK=off", "GOFLAGS=")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go install crictl@%s: %w\n%s", CrictlVersion, err, out.Bytes())
	}
	return nil
}
