// Command mkimage builds pktmeta's container image from binaries that are
// already built, with no Docker engine and no base image to pull: one layer
// on an empty base, written as a docker-archive tarball (what `docker save`
// writes, and what `ctr -n k8s.io images import`, `docker load` and
// `kind load image-archive` read).
//
// The image is reproducible: the same binaries, version, revision and
// SOURCE_DATE_EPOCH give the same image digest on any machine. Every entry
// has a fixed owner (0:0), mode and mtime, entries are sorted, the layer is
// gzipped here with fixed settings, and the config's timestamps are
// SOURCE_DATE_EPOCH.
//
// Layout (kept in step with the Dockerfile):
//
//	/usr/local/bin/pktmeta-agent   entrypoint, cmd ["run"]
//	/usr/local/bin/pktmetactl      the CLI (kubectl exec ... pktmetactl conns)
//	/opt/pktmeta/bin/pktmeta       the CNI plugin, copied to the host by the agent
//	/usr/local/bin/pktmeta         a symlink to it: `pktmeta-agent install` and
//	                               `uninstall` default to the plugin beside them
//	/etc/passwd, /etc/group        root and nobody only
//	/tmp                           1777, for tools that expect it
//
// Usage (see hack/image.mk):
//
//	go run ./hack/mkimage --agent bin/.../pktmeta-agent --ctl bin/.../pktmetactl \
//	    --plugin bin/.../pktmeta --arch amd64 --version dev --output bin/pktmeta-image.tar
package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Paths inside the image. The DaemonSet (deploy/daemonset.yaml) and the
// agent's --plugin-binary default depend on them.
const (
	AgentPath  = "/usr/local/bin/pktmeta-agent"
	CtlPath    = "/usr/local/bin/pktmetactl"
	PluginPath = "/opt/pktmeta/bin/pktmeta"
	// PluginLink is the plugin beside the agent (a symlink to PluginPath).
	PluginLink = "/usr/local/bin/pktmeta"
)

const (
	defaultRepository = "ghcr.io/pktmeta/pktmeta"
	defaultSource     = "https://github.com/pktmeta/pktmeta"
)

// Spec is everything the image is made from. Two equal Specs over files
// with equal contents give the same image digest.
type Spec struct {
	Agent, Ctl, Plugin string // binaries on this machine

	Arch     string // amd64 or arm64
	Version  string // image tag and org.opencontainers.image.version
	Revision string // git commit, "" when unknown
	Source   string // org.opencontainers.image.source
	Epoch    int64  // SOURCE_DATE_EPOCH: every timestamp in the image
}

// entry is one file or directory of the layer.
type entry struct {
	path string // relative, no leading slash; directories end in "/"
	mode int64
	data []byte
	dir  bool
	link string // a symlink to this target
}

var goarchToELF = map[string]elf.Machine{
	"amd64": elf.EM_X86_64,
	"arm64": elf.EM_AARCH64,
}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("mkimage", flag.ContinueOnError)
	var s Spec
	fs.StringVar(&s.Agent, "agent", "", "pktmeta-agent binary (static, linux/<arch>)")
	fs.StringVar(&s.Ctl, "ctl", "", "pktmetactl binary (static, linux/<arch>)")
	fs.StringVar(&s.Plugin, "plugin", "", "pktmeta CNI plugin binary (static, linux/<arch>)")
	fs.StringVar(&s.Arch, "arch", defaultArch(), "image architecture: amd64 or arm64 (default $GOARCH, else this machine's)")
	fs.StringVar(&s.Version, "version", "dev", "version: the image tag and org.opencontainers.image.version")
	fs.StringVar(&s.Source, "source", defaultSource, "org.opencontainers.image.source")
	repo := fs.String("repository", defaultRepository, "image repository; the tarball is tagged <repository>:<version>")
	revision := fs.String("revision", "auto", "org.opencontainers.image.revision (auto: git rev-parse HEAD, omitted outside git)")
	epoch := fs.String("source-date-epoch", "auto", "timestamp of every file and of the image, in Unix seconds (auto: $SOURCE_DATE_EPOCH, else the HEAD commit time, else 0)")
	output := fs.String("output", "bin/pktmeta-image.tar", "where to write the docker-archive tarball")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	for flagName, p := range map[string]string{"--agent": s.Agent, "--ctl": s.Ctl, "--plugin": s.Plugin} {
		if p == "" {
			return fmt.Errorf("%s is required", flagName)
		}
	}
	for _, p := range []string{s.Agent, s.Ctl, s.Plugin} {
		if err := CheckBinary(p, s.Arch); err != nil {
			return err
		}
	}
	s.Revision = *revision
	if s.Revision == "auto" {
		s.Revision = gitOutput("rev-parse", "HEAD")
	}
	var err error
	if s.Epoch, err = resolveEpoch(*epoch); err != nil {
		return err
	}
	tag, err := name.NewTag(*repo+":"+s.Version, name.StrictValidation)
	if err != nil {
		return fmt.Errorf("image tag: %w", err)
	}

	img, err := Build(s)
	if err != nil {
		return err
	}
	if err := WriteTarball(*output, tag, img); err != nil {
		return err
	}
	return report(stdout, *output, tag, s, img)
}

// defaultArch is $GOARCH when set (make image passes it on), else the
// architecture mkimage itself runs on.
func defaultArch() string {
	if a := os.Getenv("GOARCH"); a != "" {
		return a
	}
	return runtime.GOARCH
}

// resolveEpoch turns the --source-date-epoch value into seconds.
func resolveEpoch(v string) (int64, error) {
	if v == "auto" {
		v = os.Getenv("SOURCE_DATE_EPOCH")
		if v == "" {
			v = gitOutput("log", "-1", "--format=%ct")
		}
		if v == "" {
			return 0, nil
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("source date epoch %q: want Unix seconds >= 0", v)
	}
	return n, nil
}

// gitOutput runs git in the working directory; "" when that fails (no git,
// not a repository).
func gitOutput(args ...string) string {
	out, err := exec.Command("git", args...).Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

// CheckBinary refuses what cannot run on an empty base: a non-ELF file, an
// ELF for another architecture, or a dynamically linked executable (there
// is no libc and no loader in the image).
func CheckBinary(p, arch string) error {
	want, ok := goarchToELF[arch]
	if !ok {
		return fmt.Errorf("architecture %q: want amd64 or arm64", arch)
	}
	f, err := elf.Open(p)
	if err != nil {
		return fmt.Errorf("%s: not an ELF executable: %w", p, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != want {
		return fmt.Errorf("%s: built for %s/%s, the image is linux/%s (GOARCH=%s)", p, f.Class, f.Machine, arch, arch)
	}
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("%s: ELF type %s is not an executable", p, f.Type)
	}
	for _, prog := range f.Progs {
		if prog.Type == elf.PT_INTERP {
			return fmt.Errorf("%s: dynamically linked (has an ELF interpreter); the image has no libc: build with CGO_ENABLED=0", p)
		}
	}
	return nil
}

// Build makes the image described by s.
func Build(s Spec) (v1.Image, error) {
	if _, ok := goarchToELF[s.Arch]; !ok {
		return nil, fmt.Errorf("architecture %q: want amd64 or arm64", s.Arch)
	}
	created := time.Unix(s.Epoch, 0).UTC()
	entries, err := layout(s)
	if err != nil {
		return nil, err
	}
	blob, err := layerBlob(entries, created)
	if err != nil {
		return nil, err
	}
	// The blob is gzip already: LayerFromOpener detects that and keeps our
	// bytes as the compressed layer (its own gzip settings play no part).
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(blob)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.Append(empty.Image, mutate.Addendum{
		Layer: layer,
		History: v1.History{
			Created:   v1.Time{Time: created},
			CreatedBy: "hack/mkimage",
			Comment:   "pktmeta-agent, pktmetactl and the pktmeta CNI plugin",
		},
	})
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Created = v1.Time{Time: created}
	cf.OS = "linux"
	cf.Architecture = s.Arch
	labels := map[string]string{
		"org.opencontainers.image.title":       "pktmeta",
		"org.opencontainers.image.description": "pktmeta node agent, pktmetactl and the pktmeta chained CNI plugin",
		"org.opencontainers.image.source":      s.Source,
		"org.opencontainers.image.version":     s.Version,
		"org.opencontainers.image.created":     created.Format(time.RFC3339),
	}
	if s.Revision != "" {
		labels["org.opencontainers.image.revision"] = s.Revision
	}
	cf.Config = v1.Config{
		Entrypoint: []string{AgentPath},
		Cmd:        []string{"run"},
		Env:        []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
		WorkingDir: "/",
		Labels:     labels,
	}
	return mutate.ConfigFile(img, cf)
}

// layout lists the layer's entries, parents before children, sorted.
func layout(s Spec) ([]entry, error) {
	files := []entry{
		{path: AgentPath, mode: 0o755},
		{path: CtlPath, mode: 0o755},
		{path: PluginPath, mode: 0o755},
		{path: PluginLink, mode: 0o777, link: PluginPath},
		{path: "/etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n")},
		{path: "/etc/group", mode: 0o644, data: []byte("root:x:0:\nnobody:x:65534:\n")},
	}
	for i, src := range []string{s.Agent, s.Ctl, s.Plugin} {
		b, err := os.ReadFile(src)
		if err != nil {
			return nil, err
		}
		if len(b) == 0 {
			return nil, fmt.Errorf("%s: empty file", src)
		}
		files[i].data = b
	}
	dirs := map[string]int64{"/tmp": 0o1777}
	for _, f := range files {
		for d := path.Dir(f.path); d != "/"; d = path.Dir(d) {
			if _, ok := dirs[d]; !ok {
				dirs[d] = 0o755
			}
		}
	}
	var out []entry
	for d, mode := range dirs {
		out = append(out, entry{path: strings.TrimPrefix(d, "/") + "/", mode: mode, dir: true})
	}
	for _, f := range files {
		f.path = strings.TrimPrefix(f.path, "/")
		out = append(out, f)
	}
	// A directory "a/" sorts before everything under it, since it is a
	// prefix of those names.
	sort.Slice(out, func(i, j int) bool { return out[i].path < out[j].path })
	return out, nil
}

// layerBlob writes the entries as a tar and gzips it, both with fixed
// settings: owner 0:0, no user or group names, one mtime, no access or
// change times, no gzip name or time.
func layerBlob(entries []entry, mtime time.Time) ([]byte, error) {
	var tbuf bytes.Buffer
	tw := tar.NewWriter(&tbuf)
	for _, e := range entries {
		hdr := &tar.Header{
			Name:    e.path,
			Mode:    e.mode,
			ModTime: mtime,
			Format:  tar.FormatPAX,
		}
		switch {
		case e.dir:
			hdr.Typeflag = tar.TypeDir
		case e.link != "":
			hdr.Typeflag = tar.TypeSymlink
			hdr.Linkname = e.link
		default:
			hdr.Typeflag = tar.TypeReg
			hdr.Size = int64(len(e.data))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	var gbuf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&gbuf, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(tbuf.Bytes()); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return gbuf.Bytes(), nil
}

// WriteTarball writes img as a docker-archive tarball tagged tag, through a
// temporary file in the same directory, so out is either the old file or
// the complete new one.
func WriteTarball(out string, tag name.Tag, img v1.Image) error {
	dir := filepath.Dir(out)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(out)+".*")
	if err != nil {
		return err
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName) // no-op after the rename
	err = tarball.Write(tag, img, tmp)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	if err := os.Chmod(tmpName, 0o644); err != nil {
		return err
	}
	return os.Rename(tmpName, out)
}

func report(w io.Writer, out string, tag name.Tag, s Spec, img v1.Image) error {
	digest, err := img.Digest()
	if err != nil {
		return err
	}
	id, err := img.ConfigName()
	if err != nil {
		return err
	}
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	if len(layers) != 1 {
		return errors.New("expected exactly one layer")
	}
	ld, err := layers[0].Digest()
	if err != nil {
		return err
	}
	lsize, err := layers[0].Size()
	if err != nil {
		return err
	}
	st, err := os.Stat(out)
	if err != nil {
		return err
	}
	rev := s.Revision
	if rev == "" {
		rev = "(unknown)"
	}
	fmt.Fprintf(w, "image    %s (linux/%s)\n", tag, s.Arch)
	fmt.Fprintf(w, "digest   %s\n", digest)
	fmt.Fprintf(w, "id       %s (config digest: the image ID runtimes show after import)\n", id)
	fmt.Fprintf(w, "layer    %s (%d bytes)\n", ld, lsize)
	fmt.Fprintf(w, "revision %s, SOURCE_DATE_EPOCH %d (%s)\n", rev, s.Epoch, time.Unix(s.Epoch, 0).UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "wrote    %s (%d bytes)\n", out, st.Size())
	return nil
}
