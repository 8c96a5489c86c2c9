package cniconf

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// fixtures are the primary configs in testdata, and their plugin types.
var fixtures = []struct {
	name  string
	types []string
}{
	{"10-kindnet.conflist", []string{"ptp", "portmap"}},
	{"10-flannel.conflist", []string{"flannel", "portmap"}},
	{"10-calico.conflist", []string{"calico", "bandwidth", "portmap"}},
	{"10-aws.conflist", []string{"aws-cni", "egress-cni", "portmap"}},
	{"10-bridge.conf", []string{"bridge"}},
}

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func testEntry() map[string]any {
	return map[string]any{
		"type":           "pktmeta",
		"pinPath":        "/sys/fs/bpf/pktmeta",
		"tags":           map[string]any{"cluster": "prod-eu1", "team": "a&b <c>"},
		"maxConnections": 262144,
		"capabilities":   map[string]any{"io.kubernetes.cri.pod-annotations": true},
	}
}

// env is a CNI config dir and a state dir.
type env struct {
	t     *testing.T
	conf  string
	state string
	logs  *testutil.SyncBuffer
}

func newEnv(t *testing.T) *env {
	root := t.TempDir()
	e := &env{t: t, conf: filepath.Join(root, "net.d"), state: filepath.Join(root, "state"), logs: &testutil.SyncBuffer{}}
	if err := os.Mkdir(e.conf, 0o755); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) opts() Options {
	return Options{
		ConfDir:  e.conf,
		StateDir: e.state,
		Entry:    testEntry(),
		Logger:   slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

func (e *env) path(name string) string { return filepath.Join(e.conf, name) }

func (e *env) write(name string, data []byte, perm fs.FileMode) {
	e.t.Helper()
	p := e.path(name)
	if err := os.WriteFile(p, data, perm); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Chmod(p, perm); err != nil { // past the umask
		e.t.Fatal(err)
	}
}

// rewrite replaces a file the way kindnet does: a temporary file renamed
// over it.
func (e *env) rewrite(name string, data []byte) {
	e.t.Helper()
	tmp := e.path(name + ".temp")
	if err := os.WriteFile(tmp, data, 0o644); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, e.path(name)); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) read(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(e.path(name))
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

func (e *env) install() Result {
	e.t.Helper()
	res, err := Install(e.opts())
	if err != nil {
		e.t.Fatalf("Install: %v\nlogs:\n%s", err, e.logs)
	}
	return res
}

func (e *env) uninstall() Result {
	e.t.Helper()
	res, err := Uninstall(e.opts())
	if err != nil {
		e.t.Fatalf("Uninstall: %v\nlogs:\n%s", err, e.logs)
	}
	return res
}

// names lists the conf dir.
func (e *env) names() []string {
	e.t.Helper()
	ents, err := os.ReadDir(e.conf)
	if err != nil {
		e.t.Fatal(err)
	}
	var names []string
	for _, d := range ents {
		names = append(names, d.Name())
	}
	return names
}

func (e *env) noTemps() {
	e.t.Helper()
	for _, n := range e.names() {
		if strings.HasPrefix(n, tempPrefix) {
			e.t.Errorf("temporary file left behind: %s", n)
		}
	}
}

func (e *env) mode(name string) fs.FileMode {
	e.t.Helper()
	fi, err := os.Lstat(e.path(name))
	if err != nil {
		e.t.Fatal(err)
	}
	return fi.Mode()
}

// checkList parses a conflist with libcni and checks that our entry is its
// last plugin, once, with the test entry's settings. It returns the types.
func checkList(t *testing.T, b []byte) []string {
	t.Helper()
	list, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatalf("libcni: %v\n%s", err, b)
	}
	var types []string
	for _, p := range list.Plugins {
		types = append(types, p.Network.Type)
	}
	if n := len(types); n == 0 || types[n-1] != PluginType || slices.Index(types, PluginType) != n-1 {
		t.Fatalf("want one pktmeta entry, last; got %v", types)
	}
	var got map[string]any
	if err := json.Unmarshal(list.Plugins[len(list.Plugins)-1].Bytes, &got); err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(testEntry())
	var wantMap map[string]any
	json.Unmarshal(want, &wantMap)
	if !reflect.DeepEqual(got, wantMap) {
		t.Errorf("pktmeta entry: got %v, want %v", got, wantMap)
	}
	return types
}

func decode(t *testing.T, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func keys(t *testing.T, b []byte) []string {
	t.Helper()
	o, err := parseObject(b)
	if err != nil {
		t.Fatal(err)
	}
	var ks []string
	for _, m := range o {
		ks = append(ks, m.key)
	}
	return ks
}

func TestInstallUninstallFixtures(t *testing.T) {
	t.Parallel()
	for _, fx := range fixtures {
		for _, perm := range []fs.FileMode{0o644, 0o600} {
			t.Run(fx.name+"/"+perm.String(), func(t *testing.T) {
				e := newEnv(t)
				orig := fixture(t, fx.name)
				e.write(fx.name, orig, perm)
				// Something lower in priority that must not be touched.
				other := []byte(`{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"loopback"}]}`)
				e.write("99-other.conflist", other, 0o644)

				res := e.install()
				list := strings.TrimSuffix(fx.name, filepath.Ext(fx.name)) + ".conflist"
				if !res.Changed || res.Primary != e.path(fx.name) || res.Path != e.path(list) {
					t.Fatalf("Install = %+v", res)
				}
				got := e.read(list)
				types := checkList(t, got)
				if want := append(slices.Clone(fx.types), PluginType); !slices.Equal(types, want) {
					t.Errorf("plugins %v, want %v", types, want)
				}
				if m := e.mode(list); m != perm {
					t.Errorf("mode %v, want %v", m, perm)
				}

				// Everything else is as it was, keys in their order.
				gotMap, origMap := decode(t, got), decode(t, orig)
				plugins := gotMap["plugins"].([]any)
				gotMap["plugins"] = plugins[:len(plugins)-1]
				if filepath.Ext(fx.name) == ".conflist" {
					if !reflect.DeepEqual(gotMap, origMap) {
						t.Errorf("content changed:\n got %v\nwant %v", gotMap, origMap)
					}
					if k, ko := keys(t, got), keys(t, orig); !slices.Equal(k, ko) {
						t.Errorf("key order %v, want %v", k, ko)
					}
					if _, err := os.Stat(e.path(fx.name)); err != nil {
						t.Error(err)
					}
				} else {
					// .conf → .conflist: the .conf is gone, its content is
					// the first plugin.
					if _, err := os.Stat(e.path(fx.name)); !errors.Is(err, fs.ErrNotExist) {
						t.Errorf("%s still there: %v", fx.name, err)
					}
					plugin := plugins[0].(map[string]any)
					if gotMap["name"] != origMap["name"] || gotMap["cniVersion"] != origMap["cniVersion"] {
						t.Errorf("name, cniVersion: %v", gotMap)
					}
					delete(origMap, "name")
					delete(origMap, "cniVersion")
					if !reflect.DeepEqual(plugin, origMap) {
						t.Errorf("plugin %v, want %v", plugin, origMap)
					}
					if k := keys(t, got); !slices.Equal(k, []string{"cniVersion", "name", "plugins"}) {
						t.Errorf("keys %v", k)
					}
				}
				if p, err := FindPrimary(e.conf, nil); err != nil || p != e.path(list) {
					t.Errorf("FindPrimary = %q, %v", p, err)
				}
				e.noTemps()

				// Again: nothing to do, nothing touched.
				old := time.Now().Add(-time.Hour).Truncate(time.Second)
				if err := os.Chtimes(e.path(list), old, old); err != nil {
					t.Fatal(err)
				}
				if res := e.install(); res.Changed || len(res.Files) != 0 {
					t.Errorf("second Install = %+v", res)
				}
				if fi, _ := os.Stat(e.path(list)); !fi.ModTime().Equal(old) {
					t.Errorf("second Install touched the file: mtime %v", fi.ModTime())
				}
				if !bytes.Equal(e.read(list), got) {
					t.Error("second Install changed the file")
				}

				// Uninstall: byte for byte, mode included.
				if res := e.uninstall(); !res.Changed {
					t.Errorf("Uninstall = %+v", res)
				}
				if b := e.read(fx.name); !bytes.Equal(b, orig) {
					t.Errorf("after Uninstall:\n%s\nwant\n%s", b, orig)
				}
				if m := e.mode(fx.name); m != perm {
					t.Errorf("mode after Uninstall %v, want %v", m, perm)
				}
				if want := []string{fx.name, "99-other.conflist"}; !slices.Equal(e.names(), want) {
					t.Errorf("files %v, want %v", e.names(), want)
				}
				if !bytes.Equal(e.read("99-other.conflist"), other) {
					t.Error("lower-priority file modified")
				}
				if res := e.uninstall(); res.Changed {
					t.Errorf("second Uninstall = %+v", res)
				}
				if !bytes.Equal(e.read(fx.name), orig) {
					t.Error("second Uninstall changed the file")
				}
				e.noTemps()
			})
		}
	}
}

func TestReplaceNotDuplicate(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	orig := fixture(t, "10-kindnet.conflist")
	e.write("10-kindnet.conflist", orig, 0o644)

	o := e.opts()
	o.Entry = map[string]any{"type": "pktmeta", "tags": map[string]any{"cluster": "old"}}
	if _, err := Install(o); err != nil {
		t.Fatal(err)
	}
	res := e.install() // new settings
	if !res.Changed {
		t.Fatal("a changed entry was not written")
	}
	checkList(t, e.read("10-kindnet.conflist"))

	// The same entry spelt differently (key order, json.RawMessage) is
	// the same entry.
	o = e.opts()
	o.Entry = json.RawMessage(`{"capabilities":{"io.kubernetes.cri.pod-annotations":true},"maxConnections":262144,
		"tags":{"team":"a&b <c>","cluster":"prod-eu1"},"pinPath":"/sys/fs/bpf/pktmeta","type":"pktmeta"}`)
	if res, err := Install(o); err != nil || res.Changed {
		t.Fatalf("Install = %+v, %v", res, err)
	}
	if res := e.uninstall(); !res.Changed {
		t.Fatal("Uninstall did nothing")
	}
	if !bytes.Equal(e.read("10-kindnet.conflist"), orig) {
		t.Error("not restored byte for byte")
	}

	// Entries already there, hand-made and in the middle: one is left, last.
	e.write("10-kindnet.conflist", []byte(`{"cniVersion":"0.4.0","name":"kindnet","plugins":[
		{"type":"ptp","ipam":{"type":"host-local","subnet":"10.244.0.0/24"}},
		{"type":"pktmeta","tags":{"x":"y"}},
		{"type":"portmap","capabilities":{"portMappings":true}},
		{"type":"pktmeta"}]}`), 0o644)
	e.install()
	if types := checkList(t, e.read("10-kindnet.conflist")); !slices.Equal(types, []string{"ptp", "portmap", "pktmeta"}) {
		t.Errorf("plugins %v", types)
	}
	e.uninstall()
	list, err := libcni.ConfListFromBytes(e.read("10-kindnet.conflist"))
	if err != nil || len(list.Plugins) != 2 {
		t.Errorf("after Uninstall: %v, %v", list, err)
	}
}

func TestEntryChecked(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.write("10-kindnet.conflist", fixture(t, "10-kindnet.conflist"), 0o644)
	for _, entry := range []any{nil, map[string]any{"type": "bandwidth"}, json.RawMessage(`[1]`), "{"} {
		o := e.opts()
		o.Entry = entry
		if _, err := Install(o); err == nil {
			t.Errorf("Install accepted entry %v", entry)
		}
	}
	if !bytes.Equal(e.read("10-kindnet.conflist"), fixture(t, "10-kindnet.conflist")) {
		t.Error("a refused entry modified the config")
	}
}

func TestUninstallAfterPrimaryRewrite(t *testing.T) {
	t.Parallel()
	orig := fixture(t, "10-kindnet.conflist")
	// kindnet's config for a new pod CIDR.
	rewritten := bytes.ReplaceAll(orig, []byte("10.244.1.0/24"), []byte("10.244.7.0/24"))

	t.Run("repaired", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-kindnet.conflist", orig, 0o644)
		e.install()
		e.rewrite("10-kindnet.conflist", rewritten)
		if res := e.install(); !res.Changed {
			t.Fatal("rewritten file not repaired")
		}
		b := e.read("10-kindnet.conflist")
		checkList(t, b)
		if !bytes.Contains(b, []byte("10.244.7.0/24")) {
			t.Error("primary's new content lost")
		}
		e.uninstall()
		// The primary's new content is the backup now.
		if got := e.read("10-kindnet.conflist"); !bytes.Equal(got, rewritten) {
			t.Errorf("after Uninstall:\n%s\nwant\n%s", got, rewritten)
		}
	})

	t.Run("changed since", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-kindnet.conflist", orig, 0o600)
		e.install()
		// An operator adds a plugin and keeps ours.
		c, err := parseConflist(e.read("10-kindnet.conflist"))
		if err != nil {
			t.Fatal(err)
		}
		c.plugins = slices.Insert(c.plugins, 1, json.RawMessage(`{"type":"bandwidth","capabilities":{"bandwidth":true}}`))
		b, _ := c.format()
		if err := os.WriteFile(e.path("10-kindnet.conflist"), b, 0o600); err != nil {
			t.Fatal(err)
		}
		e.uninstall()
		got := e.read("10-kindnet.conflist")
		list, err := libcni.ConfListFromBytes(got)
		if err != nil {
			t.Fatal(err)
		}
		var types []string
		for _, p := range list.Plugins {
			types = append(types, p.Network.Type)
		}
		if !slices.Equal(types, []string{"ptp", "bandwidth", "portmap"}) {
			t.Errorf("after Uninstall: %v", types)
		}
		if m := e.mode("10-kindnet.conflist"); m != 0o600 {
			t.Errorf("mode %v", m)
		}
	})

	t.Run("conf rewritten", func(t *testing.T) {
		// A primary that writes a .conf, converted by us, writes it again.
		e := newEnv(t)
		conf := fixture(t, "10-bridge.conf")
		e.write("10-bridge.conf", conf, 0o644)
		e.install()
		conf2 := bytes.ReplaceAll(conf, []byte("10.88.0.0/16"), []byte("10.89.0.0/16"))
		e.write("10-bridge.conf", conf2, 0o600)
		if p, _ := FindPrimary(e.conf, nil); p != e.path("10-bridge.conf") {
			t.Fatalf("primary %s", p)
		}
		if res := e.install(); !res.Changed {
			t.Fatal("not converted again")
		}
		checkList(t, e.read("10-bridge.conflist"))
		if slices.Contains(e.names(), "10-bridge.conf") {
			t.Error(".conf not removed")
		}
		e.uninstall()
		if got := e.read("10-bridge.conf"); !bytes.Equal(got, conf2) || e.mode("10-bridge.conf") != 0o600 {
			t.Errorf("after Uninstall (%v):\n%s", e.mode("10-bridge.conf"), got)
		}
		if want := []string{"10-bridge.conf"}; !slices.Equal(e.names(), want) {
			t.Errorf("files %v", e.names())
		}
	})
}

func TestPriority(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	kindnet := fixture(t, "10-kindnet.conflist")
	foo := []byte(`{"cniVersion":"1.0.0","name":"foo","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}]}`)
	e.write("10-kindnet.conflist", kindnet, 0o644)
	e.write("05-foo.conflist", foo, 0o644)
	invalid := map[string]string{
		"00-broken.conflist": `{"cniVersion":"1.0.0","name":"broken","plugins":[`,
		"01-empty.conflist":  `{"cniVersion":"1.0.0","name":"empty","plugins":[]}`,
		"02-notype.conf":     `{"cniVersion":"1.0.0","name":"notype"}`,
		"03-list.json":       string(foo), // a conflist in a .json is no valid .json config
		"04-noname.conflist": `{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}`,
	}
	for n, c := range invalid {
		e.write(n, []byte(c), 0o644)
	}
	// Ignored names, though valid and first by name.
	e.write(".pktmeta-tmp-123", foo, 0o644)
	e.write("00-kindnet.conflist.temp", foo, 0o644)
	e.write("00-foo.conflist.bak", foo, 0o644)
	if err := os.Mkdir(e.path("00-dir.conflist"), 0o755); err != nil {
		t.Fatal(err)
	}

	res := e.install()
	if res.Primary != e.path("05-foo.conflist") {
		t.Fatalf("installed into %s", res.Primary)
	}
	checkList(t, e.read("05-foo.conflist"))
	if !bytes.Equal(e.read("10-kindnet.conflist"), kindnet) {
		t.Error("10-kindnet.conflist modified")
	}
	for n, c := range invalid {
		if !bytes.Equal(e.read(n), []byte(c)) {
			t.Errorf("%s modified", n)
		}
		if !strings.Contains(e.logs.String(), n) {
			t.Errorf("no warning about %s", n)
		}
	}
	if !strings.Contains(e.logs.String(), "level=WARN") {
		t.Error("no warning logged")
	}

	// A new higher-priority file takes over; Uninstall cleans up both.
	e.write("01-bar.conflist", foo, 0o644)
	if res := e.install(); res.Primary != e.path("01-bar.conflist") {
		t.Fatalf("installed into %s", res.Primary)
	}
	e.uninstall()
	for n, c := range map[string][]byte{"01-bar.conflist": foo, "05-foo.conflist": foo, "10-kindnet.conflist": kindnet} {
		if !bytes.Equal(e.read(n), c) {
			t.Errorf("%s not restored: %s", n, e.read(n))
		}
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if _, err := Check(e.opts()); !errors.Is(err, ErrNoPrimary) {
		t.Errorf("empty dir: %v", err)
	}
	e.write("10-bridge.conf", fixture(t, "10-bridge.conf"), 0o644)
	if p, err := Check(e.opts()); !errors.Is(err, ErrNotInstalled) || p != e.path("10-bridge.conf") {
		t.Errorf("before Install: %q, %v", p, err)
	}
	e.install()
	if p, err := Check(e.opts()); err != nil || p != e.path("10-bridge.conflist") {
		t.Errorf("after Install: %q, %v", p, err)
	}
	o := e.opts()
	o.Entry = map[string]any{"type": "pktmeta", "tags": map[string]any{"other": "settings"}}
	if _, err := Check(o); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("other settings: %v", err)
	}
	o.Entry = nil
	if _, err := Check(o); err != nil {
		t.Errorf("any entry: %v", err)
	}
	e.uninstall()
	if _, err := Check(o); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("after Uninstall: %v", err)
	}
}

func TestNoPrimary(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	if _, err := Install(e.opts()); !errors.Is(err, ErrNoPrimary) {
		t.Errorf("empty dir: %v", err)
	}
	e.write("10-broken.conflist", []byte("{"), 0o644)
	if _, err := Install(e.opts()); !errors.Is(err, ErrNoPrimary) {
		t.Errorf("only invalid files: %v", err)
	}
	o := e.opts()
	o.ConfDir = filepath.Join(e.conf, "missing")
	if _, err := Install(o); !errors.Is(err, ErrNoPrimary) {
		t.Errorf("missing dir: %v", err)
	}
	if res, err := Uninstall(e.opts()); err != nil || res.Changed {
		t.Errorf("Uninstall without install = %+v, %v", res, err)
	}
}

func TestShadowedConflist(t *testing.T) {
	t.Parallel()
	// 10-x.conf sorts before 10-x.conflist, which runtimes never see. Our
	// conversion overwrites it; Uninstall brings both back.
	e := newEnv(t)
	conf := fixture(t, "10-bridge.conf")
	shadow := []byte("{ \"cniVersion\": \"0.3.1\", \"name\": \"old\", \"plugins\": [ {\"type\": \"bridge\"} ] }\n")
	e.write("10-bridge.conf", conf, 0o644)
	e.write("10-bridge.conflist", shadow, 0o600)
	res := e.install()
	if res.Path != e.path("10-bridge.conflist") {
		t.Fatalf("Install = %+v", res)
	}
	checkList(t, e.read("10-bridge.conflist"))
	e.uninstall()
	if !bytes.Equal(e.read("10-bridge.conf"), conf) || !bytes.Equal(e.read("10-bridge.conflist"), shadow) {
		t.Error("not restored")
	}
	if e.mode("10-bridge.conflist") != 0o600 {
		t.Errorf("mode %v", e.mode("10-bridge.conflist"))
	}
}

func TestConvertLikeLibcni(t *testing.T) {
	t.Parallel()
	// A .conf needs no name; a conflist does. The conversion adds one, as
	// libcni's ConfListFromConf does.
	e := newEnv(t)
	conf := []byte(`{"cniVersion":"1.0.0","type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}`)
	e.write("10-ptp.json", conf, 0o644)
	res := e.install()
	if res.Path != e.path("10-ptp.conflist") {
		t.Fatalf("Install = %+v", res)
	}
	checkList(t, e.read("10-ptp.conflist"))
	e.uninstall()
	if !bytes.Equal(e.read("10-ptp.json"), conf) || !slices.Equal(e.names(), []string{"10-ptp.json"}) {
		t.Errorf("not restored: %v", e.names())
	}
}

func TestUnsupportedVersionRefused(t *testing.T) {
	t.Parallel()
	// libcni would hand pktmeta a version it does not speak, and every
	// pod's ADD would fail.
	for name, c := range map[string]string{
		"10-old.conflist":   `{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"ptp"}]}`,
		"10-noversion.conf": `{"name":"nov","type":"bridge"}`,
	} {
		e := newEnv(t)
		e.write(name, []byte(c), 0o644)
		if _, err := Install(e.opts()); err == nil || !strings.Contains(err.Error(), "cniVersion") {
			t.Errorf("%s: Install = %v", name, err)
		}
		if !bytes.Equal(e.read(name), []byte(c)) || len(e.names()) != 1 {
			t.Errorf("%s: modified: %v", name, e.names())
		}
	}
}

func TestInterruptedWrite(t *testing.T) {
	t.Parallel()
	// The record is saved before the file is written. Had we crashed in
	// between, the file still holds what we wrote before, which is ours.
	e := newEnv(t)
	orig := fixture(t, "10-calico.conflist")
	e.write("10-calico.conflist", orig, 0o644)
	e.install()
	rec, err := loadRecord(e.state, "10-calico.conflist")
	if err != nil || rec == nil {
		t.Fatal(rec, err)
	}
	rec.wrote(sha256Hex([]byte("never written")))
	if err := saveRecord(e.state, rec); err != nil {
		t.Fatal(err)
	}
	if res := e.install(); res.Changed {
		t.Errorf("Install = %+v", res)
	}
	e.uninstall()
	if !bytes.Equal(e.read("10-calico.conflist"), orig) {
		t.Error("not restored byte for byte")
	}
}

func TestConcurrentInstalls(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	orig := fixture(t, "10-aws.conflist")
	e.write("10-aws.conflist", orig, 0o644)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := Install(e.opts())
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	checkList(t, e.read("10-aws.conflist"))
	e.uninstall()
	if !bytes.Equal(e.read("10-aws.conflist"), orig) {
		t.Error("not restored byte for byte")
	}
}

func TestOwnerKept(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("needs root to give files another owner")
	}
	e := newEnv(t)
	orig := fixture(t, "10-bridge.conf")
	e.write("10-bridge.conf", orig, 0o640)
	if err := os.Chown(e.path("10-bridge.conf"), 1234, 5678); err != nil {
		t.Fatal(err)
	}
	owner := func(name string) [2]int {
		fi, err := os.Stat(e.path(name))
		if err != nil {
			t.Fatal(err)
		}
		m := metaOf(fi)
		return [2]int{m.uid, m.gid}
	}
	e.install()
	if o := owner("10-bridge.conflist"); o != [2]int{1234, 5678} || e.mode("10-bridge.conflist") != 0o640 {
		t.Errorf("conflist owner %v, mode %v", o, e.mode("10-bridge.conflist"))
	}
	e.uninstall()
	if o := owner("10-bridge.conf"); o != [2]int{1234, 5678} || !bytes.Equal(e.read("10-bridge.conf"), orig) {
		t.Errorf("restored owner %v", o)
	}
}

func TestSymlinkedConfig(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	real := filepath.Join(t.TempDir(), "kindnet.conflist")
	orig := fixture(t, "10-kindnet.conflist")
	if err := os.WriteFile(real, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(real, e.path("10-kindnet.conflist")); err != nil {
		t.Fatal(err)
	}
	e.install()
	if e.mode("10-kindnet.conflist")&fs.ModeSymlink != 0 {
		t.Fatal("still a symlink")
	}
	checkList(t, e.read("10-kindnet.conflist"))
	if b, _ := os.ReadFile(real); !bytes.Equal(b, orig) {
		t.Error("the link's target was modified")
	}
	e.uninstall()
	if l, err := os.Readlink(e.path("10-kindnet.conflist")); err != nil || l != real {
		t.Errorf("symlink not restored: %q, %v", l, err)
	}
}

func TestExternalPluginsRefused(t *testing.T) {
	t.Parallel()
	// libcni appends <dir>/<name>/*.conf after the list: we would not be
	// last.
	e := newEnv(t)
	e.write("10-net.conflist", []byte(`{"cniVersion":"1.1.0","name":"net","plugins":[{"type":"ptp"}]}`), 0o644)
	if err := os.Mkdir(e.path("net"), 0o755); err != nil {
		t.Fatal(err)
	}
	e.write("net/20-portmap.conf", []byte(`{"type":"portmap"}`), 0o644)
	if _, err := Install(e.opts()); err == nil || !strings.Contains(err.Error(), "would not run last") {
		t.Errorf("Install: %v", err)
	}
}

func TestInstallBinary(t *testing.T) {
	t.Parallel()
	src := filepath.Join(t.TempDir(), "pktmeta-build")
	bin := t.TempDir()
	dst := filepath.Join(bin, "pktmeta")
	if err := os.WriteFile(src, []byte("\x7fELF v1"), 0o700); err != nil {
		t.Fatal(err)
	}
	check := func(wantChanged bool) {
		t.Helper()
		changed, err := InstallBinary(src, bin, nil)
		if err != nil || changed != wantChanged {
			t.Fatalf("InstallBinary = %v, %v; want %v", changed, err, wantChanged)
		}
		b, _ := os.ReadFile(dst)
		s, _ := os.ReadFile(src)
		fi, err := os.Stat(dst)
		if err != nil || !bytes.Equal(b, s) || fi.Mode() != 0o755 {
			t.Fatalf("installed %q %v, %v", b, fi.Mode(), err)
		}
		for _, n := range mustNames(t, bin) {
			if strings.HasPrefix(n, tempPrefix) {
				t.Errorf("temporary file left: %s", n)
			}
		}
	}
	check(true)
	fi1, _ := os.Stat(dst)
	check(false)
	if fi2, _ := os.Stat(dst); !os.SameFile(fi1, fi2) {
		t.Error("unchanged binary replaced")
	}
	os.Chmod(dst, 0o644)
	check(true)
	os.WriteFile(src, []byte("\x7fELF v2"), 0o700)
	check(true)

	// Uninstall removes it only when it is ours.
	e := newEnv(t)
	o := e.opts()
	o.BinDir, o.BinarySource = bin, src
	os.WriteFile(dst, []byte("someone else's"), 0o755)
	if res, err := Uninstall(o); err != nil || res.BinaryRemoved {
		t.Errorf("Uninstall = %+v, %v", res, err)
	}
	if _, err := os.Stat(dst); err != nil {
		t.Error("foreign binary removed")
	}
	check(true)
	if res, err := Uninstall(o); err != nil || !res.BinaryRemoved || !res.Changed {
		t.Errorf("Uninstall = %+v, %v", res, err)
	}
	if _, err := os.Stat(dst); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("binary still there: %v", err)
	}
	if res, err := Uninstall(o); err != nil || res.Changed {
		t.Errorf("second Uninstall = %+v, %v", res, err)
	}
}

func mustNames(t *testing.T, dir string) []string {
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n []string
	for _, e := range ents {
		n = append(n, e.Name())
	}
	return n
}

func TestWaitForPrimary(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.write("00-broken.conflist", []byte("{"), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type ret struct {
		path string
		err  error
	}
	done := make(chan ret, 1)
	go func() {
		p, err := WaitForPrimary(ctx, e.conf)
		done <- ret{p, err}
	}()
	time.Sleep(100 * time.Millisecond)
	select {
	case r := <-done:
		t.Fatalf("returned early: %+v", r)
	default:
	}
	start := time.Now()
	e.rewrite("10-kindnet.conflist", fixture(t, "10-kindnet.conflist"))
	r := <-done
	if r.err != nil || r.path != e.path("10-kindnet.conflist") {
		t.Fatalf("WaitForPrimary = %+v", r)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("took %v: not woken by fsnotify", d)
	}

	// Already there: at once. Cancelled: ctx's error.
	if p, err := WaitForPrimary(ctx, e.conf); err != nil || p != e.path("10-kindnet.conflist") {
		t.Errorf("WaitForPrimary = %q, %v", p, err)
	}
	c2, cancel2 := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel2()
	if _, err := WaitForPrimary(c2, t.TempDir()); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitForPrimary on an empty dir: %v", err)
	}
}

// watchRun runs Watch in the background and collects its events.
type watchRun struct {
	t      *testing.T
	cancel context.CancelFunc
	done   chan error
	mu     sync.Mutex
	events []Event
	notify chan struct{}
}

func startWatch(t *testing.T, o Options) *watchRun {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchRun{t: t, cancel: cancel, done: make(chan error, 1), notify: make(chan struct{}, 1)}
	go func() {
		w.done <- Watch(ctx, o, func(ev Event) {
			w.mu.Lock()
			w.events = append(w.events, ev)
			w.mu.Unlock()
			select {
			case w.notify <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(w.stop)
	return w
}

func (w *watchRun) stop() {
	w.cancel()
	select {
	case err := <-w.done:
		if err != nil {
			w.t.Errorf("Watch: %v", err)
		}
	case <-time.After(2 * time.Second):
		w.t.Error("Watch did not stop on cancel")
	}
	w.done <- nil // for a second stop
}

func (w *watchRun) count(k EventKind) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, ev := range w.events {
		if ev.Kind == k {
			n++
		}
	}
	return n
}

func (w *watchRun) all() []Event {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.events)
}

// waitFor waits until cond holds.
func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %v: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// hasEntry: the file is a conflist ending in our entry.
func hasEntry(path string) bool {
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	c, err := parseConflist(b)
	if err != nil {
		return false
	}
	entry, _ := normalizeEntry(testEntry())
	return c.hasEntry(entry)
}

func TestWatchRepairs(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	w := startWatch(t, e.opts())
	waitFor(t, 2*time.Second, "EventNoPrimary", func() bool { return w.count(EventNoPrimary) == 1 })

	// The primary appears.
	orig := fixture(t, "10-kindnet.conflist")
	e.rewrite("10-kindnet.conflist", orig)
	kindnet := e.path("10-kindnet.conflist")
	waitFor(t, 2*time.Second, "installed", func() bool { return hasEntry(kindnet) && w.count(EventInstalled) == 1 })

	// kindnet writes its file again, without our entry.
	for i := range 3 {
		e.rewrite("10-kindnet.conflist", orig)
		start := time.Now()
		waitFor(t, 2*time.Second, "entry back after kindnet's rewrite", func() bool { return hasEntry(kindnet) })
		t.Logf("repair %d after %v", i, time.Since(start))
		waitFor(t, time.Second, "EventRepaired", func() bool { return w.count(EventRepaired) == i+1 })
	}

	// A higher-priority config appears.
	e.rewrite("05-foo.conflist", []byte(`{"cniVersion":"1.0.0","name":"foo","plugins":[{"type":"ptp"}]}`))
	waitFor(t, 2*time.Second, "entry in the new primary", func() bool { return hasEntry(e.path("05-foo.conflist")) })

	// It is removed: the previous one is primary again, and still has it.
	os.Remove(e.path("05-foo.conflist"))
	time.Sleep(500 * time.Millisecond)
	if !hasEntry(kindnet) {
		t.Error("entry lost")
	}

	// kindnet's file removed and a .conf written instead: converted.
	os.Remove(kindnet)
	e.rewrite("10-bridge.conf", fixture(t, "10-bridge.conf"))
	waitFor(t, 2*time.Second, ".conf converted", func() bool {
		return hasEntry(e.path("10-bridge.conflist")) && !slices.Contains(e.names(), "10-bridge.conf")
	})
	for _, ev := range w.all() {
		if ev.Kind == EventError || ev.Kind == EventBackoff {
			t.Errorf("unexpected event %+v", ev)
		}
	}
	e.noTemps()
	w.stop()

	// Stopped: nothing is repaired any more.
	e.rewrite("10-bridge.conflist", orig)
	time.Sleep(400 * time.Millisecond)
	if hasEntry(e.path("10-bridge.conflist")) {
		t.Error("repaired after Watch stopped")
	}
}

func TestWatchMissingDir(t *testing.T) {
	t.Parallel()
	// The dir does not exist yet: Watch checks every second until it does.
	e := newEnv(t)
	o := e.opts()
	o.ConfDir = filepath.Join(e.conf, "later")
	w := startWatch(t, o)
	waitFor(t, 2*time.Second, "EventNoPrimary", func() bool { return w.count(EventNoPrimary) == 1 })
	if err := os.Mkdir(o.ConfDir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.rewrite("later/10-flannel.conflist", fixture(t, "10-flannel.conflist"))
	waitFor(t, 3*time.Second, "installed", func() bool { return hasEntry(filepath.Join(o.ConfDir, "10-flannel.conflist")) })

	// Watched now: a rewrite is repaired promptly.
	e.rewrite("later/10-flannel.conflist", fixture(t, "10-flannel.conflist"))
	start := time.Now()
	waitFor(t, 2*time.Second, "repaired", func() bool { return hasEntry(filepath.Join(o.ConfDir, "10-flannel.conflist")) })
	t.Logf("repaired after %v", time.Since(start))
}

func TestWatchRestart(t *testing.T) {
	// An agent restart: the entry is in place; Watch says so, writes nothing.
	t.Parallel()
	e := newEnv(t)
	e.write("10-calico.conflist", fixture(t, "10-calico.conflist"), 0o644)
	e.install()
	fi1, _ := os.Stat(e.path("10-calico.conflist"))
	w := startWatch(t, e.opts())
	waitFor(t, 2*time.Second, "EventInstalled", func() bool { return w.count(EventInstalled) == 1 })
	if ev := w.all()[0]; ev.Kind != EventInstalled || ev.Result.Changed || ev.Path != e.path("10-calico.conflist") {
		t.Errorf("event %+v", ev)
	}
	if fi2, _ := os.Stat(e.path("10-calico.conflist")); !os.SameFile(fi1, fi2) {
		t.Error("file rewritten")
	}
}

func TestWatchFight(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	orig := fixture(t, "10-kindnet.conflist")
	e.write("10-kindnet.conflist", orig, 0o644)
	kindnet := e.path("10-kindnet.conflist")
	o := e.opts()
	o.Debounce = 20 * time.Millisecond // acts within 100ms while writes keep coming
	o.FightRepairs = 3
	o.FightWindow = time.Second
	o.MaxBackoff = 400 * time.Millisecond
	w := startWatch(t, o)
	waitFor(t, 2*time.Second, "installed", func() bool { return w.count(EventInstalled) == 1 })

	// Another writer keeps putting its version back.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			// Not e.read and e.rewrite: no t.Fatal off the test goroutine.
			if b, err := os.ReadFile(kindnet); err == nil && !bytes.Equal(b, orig) {
				tmp := kindnet + ".temp"
				if os.WriteFile(tmp, orig, 0o644) == nil {
					os.Rename(tmp, kindnet)
				}
			}
		}
	}()
	const fight = 3 * time.Second
	time.Sleep(fight)
	close(stop)
	wg.Wait()

	repairs, backoffs := w.count(EventRepaired), w.count(EventBackoff)
	t.Logf("%d repairs, %d backoff events in %v", repairs, backoffs, fight)
	if backoffs == 0 {
		t.Fatal("no backoff")
	}
	// Without backoff: one repair per 100ms, 30. With it: 4 quick ones,
	// then at most one per 100, 200, 400, 400... ms.
	if repairs > 20 {
		t.Errorf("%d repairs in %v: the loop spins", repairs, fight)
	}
	var last time.Duration
	for _, ev := range w.all() {
		if ev.Kind == EventBackoff {
			if ev.Backoff < last || ev.Backoff > o.MaxBackoff || ev.Path != kindnet {
				t.Errorf("backoff event %+v after %v", ev, last)
			}
			last = ev.Backoff
		}
	}
	if last != o.MaxBackoff {
		t.Errorf("backoff reached %v, want the cap %v", last, o.MaxBackoff)
	}
	if !strings.Contains(e.logs.String(), "level=WARN") || !strings.Contains(e.logs.String(), kindnet) {
		t.Errorf("no warning naming the file:\n%s", e.logs)
	}

	// The writer stopped: the entry comes back and the fight is over.
	waitFor(t, 2*time.Second, "entry back", func() bool { return hasEntry(kindnet) })
	waitFor(t, 3*time.Second, "EventCalm", func() bool { return w.count(EventCalm) == 1 })
	// Prompt again.
	n := w.count(EventRepaired)
	e.rewrite("10-kindnet.conflist", orig)
	start := time.Now()
	waitFor(t, time.Second, "prompt repair", func() bool { return hasEntry(kindnet) && w.count(EventRepaired) == n+1 })
	t.Logf("repaired %v after the fight", time.Since(start))
}

func TestWatchCancel(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.write("10-kindnet.conflist", fixture(t, "10-kindnet.conflist"), 0o644)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	events := make(chan Event, 16)
	go func() { done <- Watch(ctx, e.opts(), func(ev Event) { events <- ev }) }()
	select {
	case ev := <-events:
		if ev.Kind != EventInstalled || !ev.Result.Changed {
			t.Errorf("first event %+v", ev)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("no event")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch = %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("Watch did not stop")
	}

	// Bad options fail at once.
	o := e.opts()
	o.Entry = map[string]any{"type": "ptp"}
	if err := Watch(context.Background(), o, nil); err == nil {
		t.Error("Watch accepted a bad entry")
	}
}

func TestEventKindString(t *testing.T) {
	t.Parallel()
	for k := EventInstalled; k <= EventError; k++ {
		if s := k.String(); s == "" || strings.HasPrefix(s, "EventKind(") {
			t.Errorf("%d: %q", k, s)
		}
	}
}
