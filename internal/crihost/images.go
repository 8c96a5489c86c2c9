package crihost

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Image references of the images BuildTestImages makes. "pktmeta.test" is
// not a registry anyone can reach: containerd must find them locally (a
// pull would fail, which is what we want to notice).
const (
	PauseImage   = "pktmeta.test/pause:1"
	NetutilImage = "pktmeta.test/netutil:1"
)

// epoch is every timestamp in the images we build, so that the same
// binaries always give the same image digest.
func epoch() time.Time { return time.Unix(0, 0).UTC() }

// ImageSpec describes a single-layer image made from host files, typically
// static binaries.
type ImageSpec struct {
	Ref string // e.g. "pktmeta.test/netutil:1"
	// Files maps an absolute path in the image to a file on the host. The
	// file's permission bits are kept; owner is root.
	Files      map[string]string
	Entrypoint []string
	Cmd        []string
	Env        []string
}

// WriteImage writes spec as a docker-archive tarball (what `docker save`
// writes, and `ctr images import` reads) to tarPath. The result depends only
// on the spec and the files' contents and modes.
func WriteImage(spec ImageSpec, tarPath string) error {
	tag, err := name.NewTag(spec.Ref, name.StrictValidation)
	if err != nil {
		return fmt.Errorf("image ref %q: %w", spec.Ref, err)
	}
	layerTar, err := layerFromFiles(spec.Files)
	if err != nil {
		return fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("image %s: layer: %w", spec.Ref, err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("image %s: %w", spec.Ref, err)
	}
	cf = cf.DeepCopy()
	cf.OS = "linux"
	cf.Architecture = runtime.GOARCH
	cf.Created = v1.Time{Time: epoch()}
	cf.Config.Entrypoint = spec.Entrypoint
	cf.Config.Cmd = spec.Cmd
	cf.Config.Env = spec.Env
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return fmt.Errorf("image %s: config: %w", spec.Ref, err)
	}
	if err := tarball.WriteToFile(tarPath, tag, img); err != nil {
		return fmt.Errorf("image %s: write %s: %w", spec.Ref, tarPath, err)
	}
	return nil
}

// layerFromFiles makes an uncompressed layer tar holding the files and
// their parent directories, in a fixed order with fixed times.
func layerFromFiles(files map[string]string) ([]byte, error) {
	dirs := map[string]bool{"/tmp": true, "/etc": true}
	var paths []string
	for p := range files {
		if !path.IsAbs(p) {
			return nil, fmt.Errorf("image path %q is not absolute", p)
		}
		paths = append(paths, p)
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			dirs[d] = true
		}
	}
	var dirList []string
	for d := range dirs {
		dirList = append(dirList, d)
	}
	sort.Strings(dirList) // parents sort before children
	sort.Strings(paths)

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, d := range dirList {
		mode := int64(0o755)
		if d == "/tmp" {
			mode = 0o1777
		}
		hdr := &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(d, "/") + "/", Mode: mode, ModTime: epoch(), Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
	}
	for _, p := range paths {
		b, err := os.ReadFile(files[p])
		if err != nil {
			return nil, err
		}
		st, err := os.Stat(files[p])
		if err != nil {
			return nil, err
		}
		hdr := &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: int64(st.Mode().Perm()), Size: int64(len(b)), ModTime: epoch(), Format: tar.FormatPAX}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(b); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// TestImages are the image tarballs BuildTestImages wrote.
type TestImages struct {
	Pause   string // tarball of PauseImage
	Netutil string // tarball of NetutilImage
}

// All lists the tarballs, for Options.Images or ImportImage.
func (t TestImages) All() []string { return []string{t.Pause, t.Netutil} }

// BuildTestImages compiles the pause and netutil programs (their sources
// are embedded from testdata/images) and writes both images as tarballs
// into dir.
func BuildTestImages(ctx context.Context, dir string) (TestImages, error) {
	bins := filepath.Join(dir, "bin")
	if err := os.MkdirAll(bins, 0o755); err != nil {
		return TestImages{}, err
	}
	out := TestImages{Pause: filepath.Join(dir, "pause.tar"), Netutil: filepath.Join(dir, "netutil.tar")}
	images := []struct {
		prog, tar string
		spec      ImageSpec
	}{
		{"pause", out.Pause, ImageSpec{Ref: PauseImage, Entrypoint: []string{"/pause"}}},
		{"netutil", out.Netutil, ImageSpec{Ref: NetutilImage, Entrypoint: []string{"/netutil"}}},
	}
	for _, im := range images {
		bin := filepath.Join(bins, im.prog)
		if err := buildEmbedded(ctx, "testdata/images/"+im.prog, bin); err != nil {
			return TestImages{}, err
		}
		im.spec.Files = map[string]string{"/" + im.prog: bin}
		if err := WriteImage(im.spec, im.tar); err != nil {
			return TestImages{}, err
		}
	}
	return out, nil
}
