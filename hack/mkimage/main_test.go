package main

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

const testEpoch = 1700000000 // 2023-11-14T22:13:20Z

// wantDiffID is the digest of the uncompressed layer made from
// writeInputs' files at testEpoch: it depends only on the layout and the
// tar settings, so it is the same on every machine and Go version. If a
// deliberate layout change moves it, update it here (and the Dockerfile).
const wantDiffID = "sha256:3c41e4cd0e9e9ad7fc78b5d1606277a68092e7a8a1e741c05e220eceeae08727"

var testContents = map[string]string{
	"pktmeta-agent": "agent binary\x00\x01",
	"pktmetactl":    "ctl binary\x00\x02",
	"pktmeta":       "plugin binary\x00\x03",
}

// writeInputs writes the three "binaries" into dir with the given mode and
// mtime, which must not matter to the image.
func writeInputs(t *testing.T, dir string, mode os.FileMode, mtime time.Time) Spec {
	t.Helper()
	for n, c := range testContents {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, []byte(c), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, mtime, mtime); err != nil {
			t.Fatal(err)
		}
	}
	return Spec{
		Agent:    filepath.Join(dir, "pktmeta-agent"),
		Ctl:      filepath.Join(dir, "pktmetactl"),
		Plugin:   filepath.Join(dir, "pktmeta"),
		Arch:     "amd64",
		Version:  "1.2.3",
		Revision: "0123456789abcdef0123456789abcdef01234567",
		Source:   defaultSource,
		Epoch:    testEpoch,
	}
}

func mustDigest(t *testing.T, f func() (v1.Hash, error)) v1.Hash {
	t.Helper()
	h, err := f()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func onlyLayer(t *testing.T, img v1.Image) v1.Layer {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(ls) != 1 {
		t.Fatalf("%d layers, want 1", len(ls))
	}
	return ls[0]
}

func TestBuildTwiceSameDigest(t *testing.T) {
	s1 := writeInputs(t, t.TempDir(), 0o755, time.Now())
	s2 := writeInputs(t, t.TempDir(), 0o700, time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC))

	img1, err := Build(s1)
	if err != nil {
		t.Fatal(err)
	}
	img2, err := Build(s2)
	if err != nil {
		t.Fatal(err)
	}
	d1, d2 := mustDigest(t, img1.Digest), mustDigest(t, img2.Digest)
	if d1 != d2 {
		t.Fatalf("image digests differ: %s vs %s", d1, d2)
	}
	if c1, c2 := mustDigest(t, img1.ConfigName), mustDigest(t, img2.ConfigName); c1 != c2 {
		t.Fatalf("config digests differ: %s vs %s", c1, c2)
	}
	l1, l2 := onlyLayer(t, img1), onlyLayer(t, img2)
	if a, b := mustDigest(t, l1.Digest), mustDigest(t, l2.Digest); a != b {
		t.Fatalf("layer digests differ: %s vs %s", a, b)
	}
	if got := mustDigest(t, l1.DiffID).String(); got != wantDiffID {
		t.Errorf("layer diff id %s, want %s (the layer's bytes changed)", got, wantDiffID)
	}

	// The tarballs are byte-for-byte the same too.
	tag := name.MustParseReference("ghcr.io/pktmeta/pktmeta:1.2.3").(name.Tag)
	dir := t.TempDir()
	p1, p2 := filepath.Join(dir, "1.tar"), filepath.Join(dir, "2.tar")
	if err := WriteTarball(p1, tag, img1); err != nil {
		t.Fatal(err)
	}
	if err := WriteTarball(p2, tag, img2); err != nil {
		t.Fatal(err)
	}
	b1, _ := os.ReadFile(p1)
	b2, _ := os.ReadFile(p2)
	if len(b1) == 0 || !bytes.Equal(b1, b2) {
		t.Fatalf("tarballs differ (%d and %d bytes)", len(b1), len(b2))
	}
}

func TestInputsThatChangeTheDigest(t *testing.T) {
	base := writeInputs(t, t.TempDir(), 0o755, time.Now())
	img, err := Build(base)
	if err != nil {
		t.Fatal(err)
	}
	want := mustDigest(t, img.Digest)
	for label, mutate := range map[string]func(*Spec){
		"epoch":    func(s *Spec) { s.Epoch++ },
		"version":  func(s *Spec) { s.Version = "1.2.4" },
		"revision": func(s *Spec) { s.Revision = "" },
		"arch":     func(s *Spec) { s.Arch = "arm64" },
		"plugin": func(s *Spec) {
			p := filepath.Join(t.TempDir(), "other")
			if err := os.WriteFile(p, []byte("another plugin"), 0o755); err != nil {
				t.Fatal(err)
			}
			s.Plugin = p
		},
	} {
		s := base
		mutate(&s)
		img, err := Build(s)
		if err != nil {
			t.Fatalf("%s: %v", label, err)
		}
		if mustDigest(t, img.Digest) == want {
			t.Errorf("changing the %s did not change the digest", label)
		}
	}
}

func TestTarballContents(t *testing.T) {
	s := writeInputs(t, t.TempDir(), 0o700, time.Now())
	img, err := Build(s)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag("ghcr.io/pktmeta/pktmeta:1.2.3", name.StrictValidation)
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "sub", "pktmeta-image.tar")
	if err := WriteTarball(out, tag, img); err != nil {
		t.Fatal(err)
	}
	if tmps, _ := filepath.Glob(filepath.Join(filepath.Dir(out), ".*")); len(tmps) != 0 {
		t.Errorf("temporary files left behind: %v", tmps)
	}

	// The docker-archive manifest names the tag (what ctr import and kind
	// load use to name the image).
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(out) })
	if err != nil {
		t.Fatal(err)
	}
	if len(m) != 1 || !reflect.DeepEqual(m[0].RepoTags, []string{"ghcr.io/pktmeta/pktmeta:1.2.3"}) {
		t.Fatalf("manifest.json: %+v", m)
	}

	got, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := mustDigest(t, got.Digest), mustDigest(t, img.Digest); a != b {
		t.Errorf("digest read back %s, built %s", a, b)
	}
	// Digests, sizes and diff ids all agree with the blobs.
	if err := validate.Image(got); err != nil {
		t.Errorf("image read back is inconsistent: %v", err)
	}
	if a, b := mustDigest(t, got.ConfigName), mustDigest(t, img.ConfigName); a != b {
		t.Errorf("config digest read back %s, built %s", a, b)
	}

	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	created := time.Unix(testEpoch, 0).UTC()
	if cf.OS != "linux" || cf.Architecture != "amd64" {
		t.Errorf("platform %s/%s", cf.OS, cf.Architecture)
	}
	if !cf.Created.Time.Equal(created) {
		t.Errorf("created %s, want %s", cf.Created.Time, created)
	}
	if !reflect.DeepEqual(cf.Config.Entrypoint, []string{"/usr/local/bin/pktmeta-agent"}) || !reflect.DeepEqual(cf.Config.Cmd, []string{"run"}) {
		t.Errorf("entrypoint %q cmd %q", cf.Config.Entrypoint, cf.Config.Cmd)
	}
	if cf.Config.User != "" {
		t.Errorf("user %q, want root (empty)", cf.Config.User)
	}
	wantLabels := map[string]string{
		"org.opencontainers.image.title":       "pktmeta",
		"org.opencontainers.image.description": "pktmeta node agent, pktmetactl and the pktmeta chained CNI plugin",
		"org.opencontainers.image.source":      "https://github.com/pktmeta/pktmeta",
		"org.opencontainers.image.version":     "1.2.3",
		"org.opencontainers.image.revision":    "0123456789abcdef0123456789abcdef01234567",
		"org.opencontainers.image.created":     "2023-11-14T22:13:20Z",
	}
	if !reflect.DeepEqual(cf.Config.Labels, wantLabels) {
		t.Errorf("labels %v\nwant %v", cf.Config.Labels, wantLabels)
	}
	if len(cf.History) != 1 || !cf.History[0].Created.Time.Equal(created) {
		t.Errorf("history %+v", cf.History)
	}

	layer := onlyLayer(t, got)
	if a, b := mustDigest(t, layer.Digest), mustDigest(t, onlyLayer(t, img).Digest); a != b {
		t.Errorf("layer digest read back %s, built %s", a, b)
	}
	if mt, err := layer.MediaType(); err != nil || mt != types.DockerLayer {
		t.Errorf("layer media type %s (%v)", mt, err)
	}
	rc, err := layer.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	type want struct {
		typ  byte
		mode int64
		data string
	}
	wantEntries := map[string]want{
		"etc/":                        {tar.TypeDir, 0o755, ""},
		"etc/group":                   {tar.TypeReg, 0o644, "root:x:0:\nnobody:x:65534:\n"},
		"etc/passwd":                  {tar.TypeReg, 0o644, "root:x:0:0:root:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"},
		"opt/":                        {tar.TypeDir, 0o755, ""},
		"opt/pktmeta/":                {tar.TypeDir, 0o755, ""},
		"opt/pktmeta/bin/":            {tar.TypeDir, 0o755, ""},
		"opt/pktmeta/bin/pktmeta":     {tar.TypeReg, 0o755, testContents["pktmeta"]},
		"tmp/":                        {tar.TypeDir, 0o1777, ""},
		"usr/":                        {tar.TypeDir, 0o755, ""},
		"usr/local/":                  {tar.TypeDir, 0o755, ""},
		"usr/local/bin/":              {tar.TypeDir, 0o755, ""},
		"usr/local/bin/pktmeta":       {tar.TypeSymlink, 0o777, ""},
		"usr/local/bin/pktmeta-agent": {tar.TypeReg, 0o755, testContents["pktmeta-agent"]},
		"usr/local/bin/pktmetactl":    {tar.TypeReg, 0o755, testContents["pktmetactl"]},
	}
	var names []string
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, hdr.Name)
		w, ok := wantEntries[hdr.Name]
		if !ok {
			t.Errorf("unexpected entry %s", hdr.Name)
			continue
		}
		data, _ := io.ReadAll(tr)
		if hdr.Typeflag == tar.TypeSymlink && hdr.Linkname != PluginPath {
			t.Errorf("%s: a link to %q, want %q", hdr.Name, hdr.Linkname, PluginPath)
		}
		if hdr.Typeflag != w.typ || hdr.Mode != w.mode || string(data) != w.data {
			t.Errorf("%s: type %c mode %#o data %q; want %c %#o %q", hdr.Name, hdr.Typeflag, hdr.Mode, data, w.typ, w.mode, w.data)
		}
		if hdr.Uid != 0 || hdr.Gid != 0 || hdr.Uname != "" || hdr.Gname != "" {
			t.Errorf("%s: owner %d:%d (%q:%q), want 0:0", hdr.Name, hdr.Uid, hdr.Gid, hdr.Uname, hdr.Gname)
		}
		if !hdr.ModTime.Equal(created) || !hdr.AccessTime.IsZero() || !hdr.ChangeTime.IsZero() {
			t.Errorf("%s: times %s %s %s, want mtime %s only", hdr.Name, hdr.ModTime, hdr.AccessTime, hdr.ChangeTime, created)
		}
	}
	if len(names) != len(wantEntries) {
		t.Errorf("entries %q, want %d", names, len(wantEntries))
	}
	for i := 1; i < len(names); i++ {
		if names[i-1] >= names[i] {
			t.Errorf("entries not sorted: %q before %q", names[i-1], names[i])
		}
	}
}

// fakeELF writes the smallest ELF64 little-endian executable header that
// debug/elf accepts: no sections, one PT_LOAD, and a PT_INTERP when
// dynamic.
func fakeELF(t *testing.T, machine elf.Machine, dynamic bool) string {
	t.Helper()
	progs := []elf.Prog64{{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_X), Align: 0x1000}}
	if dynamic {
		progs = append(progs, elf.Prog64{Type: uint32(elf.PT_INTERP), Flags: uint32(elf.PF_R), Align: 1})
	}
	var hdr elf.Header64
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	hdr.Type = uint16(elf.ET_EXEC)
	hdr.Machine = uint16(machine)
	hdr.Version = uint32(elf.EV_CURRENT)
	hdr.Phoff = 64
	hdr.Ehsize = 64
	hdr.Phentsize = 56
	hdr.Phnum = uint16(len(progs))
	hdr.Shentsize = 64
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.LittleEndian, hdr); err != nil {
		t.Fatal(err)
	}
	for _, p := range progs {
		if err := binary.Write(&buf, binary.LittleEndian, p); err != nil {
			t.Fatal(err)
		}
	}
	p := filepath.Join(t.TempDir(), "elf")
	if err := os.WriteFile(p, buf.Bytes(), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCheckBinary(t *testing.T) {
	amd64 := fakeELF(t, elf.EM_X86_64, false)
	arm64 := fakeELF(t, elf.EM_AARCH64, false)
	dynamic := fakeELF(t, elf.EM_X86_64, true)
	text := filepath.Join(t.TempDir(), "script")
	if err := os.WriteFile(text, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		file, arch, wantErr string
	}{
		{amd64, "amd64", ""},
		{arm64, "arm64", ""},
		{amd64, "arm64", "built for"},
		{arm64, "amd64", "built for"},
		{dynamic, "amd64", "dynamically linked"},
		{text, "amd64", "not an ELF"},
		{amd64, "riscv64", "want amd64 or arm64"},
		{filepath.Join(t.TempDir(), "missing"), "amd64", "not an ELF"},
	} {
		err := CheckBinary(tc.file, tc.arch)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s for %s: %v", filepath.Base(tc.file), tc.arch, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s for %s: error %v, want one containing %q", filepath.Base(tc.file), tc.arch, err, tc.wantErr)
		}
	}
}

func TestResolveEpoch(t *testing.T) {
	t.Setenv("SOURCE_DATE_EPOCH", "1234")
	if n, err := resolveEpoch("auto"); err != nil || n != 1234 {
		t.Errorf("auto with SOURCE_DATE_EPOCH=1234: %d, %v", n, err)
	}
	if n, err := resolveEpoch("42"); err != nil || n != 42 {
		t.Errorf("42: %d, %v", n, err)
	}
	for _, bad := range []string{"-1", "yesterday", "1.5"} {
		if _, err := resolveEpoch(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	agent := fakeELF(t, elf.EM_AARCH64, false)
	ctl := fakeELF(t, elf.EM_AARCH64, false)
	out := filepath.Join(dir, "image.tar")
	args := []string{"--agent", agent, "--ctl", ctl, "--plugin", agent, "--arch", "arm64",
		"--version", "v0.1.0", "--revision", "abc", "--source-date-epoch", "0", "--output", out}
	var stdout bytes.Buffer
	if err := run(args, &stdout); err != nil {
		t.Fatal(err)
	}
	tag := name.MustParseReference("ghcr.io/pktmeta/pktmeta:v0.1.0").(name.Tag)
	img, err := tarball.ImageFromPath(out, &tag)
	if err != nil {
		t.Fatal(err)
	}
	d := mustDigest(t, img.Digest)
	if !strings.Contains(stdout.String(), "digest   "+d.String()) {
		t.Errorf("output does not name the digest %s:\n%s", d, stdout.String())
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Architecture != "arm64" || cf.Config.Labels["org.opencontainers.image.revision"] != "abc" || cf.Created.Unix() != 0 {
		t.Errorf("config: arch %s labels %v created %s", cf.Architecture, cf.Config.Labels, cf.Created)
	}

	// What cannot run on an empty base is refused before anything is written.
	bad := append([]string{}, args...)
	bad[1] = fakeELF(t, elf.EM_AARCH64, true)
	bad[len(bad)-1] = filepath.Join(dir, "never.tar")
	if err := run(bad, io.Discard); err == nil || !strings.Contains(err.Error(), "dynamically linked") {
		t.Errorf("dynamic agent: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "never.tar")); !os.IsNotExist(err) {
		t.Errorf("tarball written for a refused binary: %v", err)
	}
	if err := run([]string{"--agent", agent}, io.Discard); err == nil {
		t.Error("missing --ctl and --plugin accepted")
	}
	if err := run(append(append([]string{}, args[:len(args)-2]...), "--version", "not a tag", "--output", out), io.Discard); err == nil {
		t.Error("invalid version accepted")
	}
}

// The Dockerfile builds the same layout for people with Docker; keep the
// two in step.
func TestDockerfileMatchesLayout(t *testing.T) {
	b, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	entries, err := layout(writeInputs(t, t.TempDir(), 0o755, time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		`ENTRYPOINT ["` + AgentPath + `"]`,
		`CMD ["run"]`,
		"for c in pktmeta-agent pktmetactl; do",
		"-o /out" + path.Dir(AgentPath) + "/$c ./cmd/$c",
		"-o /out" + PluginPath + " ./cmd/pktmeta",
		"chmod 1777 /out/tmp",
		"ln -s " + PluginPath + " /out" + PluginLink,
		"FROM scratch",
		"ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	}
	if path.Dir(CtlPath) != path.Dir(AgentPath) {
		t.Fatal("the Dockerfile builds the agent and the CLI into one directory")
	}
	for _, e := range entries {
		if e.path == "etc/passwd" || e.path == "etc/group" {
			want = append(want, "printf '"+strings.ReplaceAll(string(e.data), "\n", `\n`)+"' >/out/"+e.path)
		}
	}
	for _, w := range want {
		if !strings.Contains(df, w) {
			t.Errorf("Dockerfile lacks %q", w)
		}
	}
}
