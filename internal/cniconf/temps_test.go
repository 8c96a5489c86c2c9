package cniconf

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// leftovers puts, in dir, temporary files of ours (of every age, and a
// symlink, as interrupted writes leave them) and names that only look like
// ours. It returns the names that must survive a cleanup.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("half a file"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(tempPrefix + "123456")
	write(tempPrefix + "old")
	old := time.Now().Add(-time.Hour)
	os.Chtimes(filepath.Join(dir, tempPrefix+"old"), old, old)
	if err := os.Symlink("/nowhere", filepath.Join(dir, tempPrefix+"789")); err != nil {
		t.Fatal(err)
	}
	keep := []string{"pktmeta-tmp-1", ".pktmeta-tmp", "x" + tempPrefix + "1", "10-kindnet.conflist.temp"}
	for _, n := range keep {
		write(n)
	}
	// Never ours: we do not make directories with our prefix.
	if err := os.MkdirAll(filepath.Join(dir, tempPrefix+"dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	return append(keep, tempPrefix+"dir")
}

// onlyKept checks that dir holds exactly the names in keep besides want.
func onlyKept(t *testing.T, dir string, keep []string, want ...string) {
	t.Helper()
	got := mustNames(t, dir)
	want = append(slices.Clone(keep), want...)
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("%s holds %q, want %q", dir, got, want)
	}
}

func TestLeftoverTempsRemoved(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.write("10-kindnet.conflist", fixture(t, "10-kindnet.conflist"), 0o644)
	bin := t.TempDir()
	keepConf := leftovers(t, e.conf)
	keepBin := leftovers(t, bin)
	keepState := leftovers(t, backupDir(e.state))
	o := e.opts()
	o.BinDir = bin

	if _, err := Install(o); err != nil {
		t.Fatal(err)
	}
	onlyKept(t, e.conf, keepConf, "10-kindnet.conflist")
	onlyKept(t, bin, keepBin)
	onlyKept(t, backupDir(e.state), keepState, ".lock", "10-kindnet.conflist.json")

	// Uninstall and InstallBinary remove them too.
	leftovers(t, e.conf)
	leftovers(t, backupDir(e.state))
	if _, err := Uninstall(o); err != nil {
		t.Fatal(err)
	}
	onlyKept(t, e.conf, keepConf, "10-kindnet.conflist")
	onlyKept(t, backupDir(e.state), keepState, ".lock")
	leftovers(t, bin)
	src := filepath.Join(t.TempDir(), "pktmeta")
	os.WriteFile(src, []byte("\x7fELF"), 0o755)
	if _, err := InstallBinary(src, bin, nil); err != nil {
		t.Fatal(err)
	}
	onlyKept(t, bin, keepBin, "pktmeta")
	if !strings.Contains(e.logs.String(), "removed a leftover temporary file") {
		t.Errorf("removals not logged:\n%s", e.logs)
	}
}

func TestActiveWritersTempsKept(t *testing.T) {
	t.Parallel()
	// A writer in flight, in this process or another, holds its dir's
	// shared lock: its temporary file stays, and the install goes on.
	e := newEnv(t)
	e.write("10-kindnet.conflist", fixture(t, "10-kindnet.conflist"), 0o644)
	release, err := holdDir(e.conf)
	if err != nil {
		t.Fatal(err)
	}
	e.write(tempPrefix+"inflight", []byte("x"), 0o600)
	res := e.install()
	if !slices.Contains(e.names(), tempPrefix+"inflight") {
		t.Fatal("removed a temporary file of an active writer")
	}
	checkList(t, e.read(filepath.Base(res.Path)))
	release()
	e.uninstall()
	e.noTemps()
}

func TestConcurrentWritersAndCleaners(t *testing.T) {
	t.Parallel()
	// Cleaners run all the time while writers write: no write may lose
	// its temporary file, and nothing is left at the end.
	dir := t.TempDir()
	stop := make(chan struct{})
	var cleaners, writers sync.WaitGroup
	for range 2 {
		cleaners.Add(1)
		go func() {
			defer cleaners.Done()
			for {
				select {
				case <-stop:
					return
				default:
					removeTemps(dir, orDiscard(nil))
				}
			}
		}()
	}
	errs := make(chan error, 4*25)
	for w := range 4 {
		writers.Add(1)
		go func() {
			defer writers.Done()
			for i := range 25 {
				data := bytes.Repeat([]byte{byte(i)}, 64<<10)
				path := filepath.Join(dir, fmt.Sprintf("f%d.conflist", w))
				if err := writeAtomic(path, data, fileMeta{perm: 0o644, uid: -1, gid: -1}, nil, nil); err != nil {
					errs <- err
				}
			}
		}()
	}
	writers.Wait()
	close(stop)
	cleaners.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, n := range mustNames(t, dir) {
		if isTemp(n) {
			t.Errorf("left %s", n)
		}
	}
}

func TestNoPrimaryReasons(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	files := []struct{ name, content, reason string }{
		{tempPrefix + "123", "{", "our own temporary file"},
		{"00-empty.conflist", "", "empty file"},
		{"01-broken.conflist", `{"cniVersion":"1.0.0",`, "not JSON"},
		{"02-array.json", `[{"type":"ptp"}]`, "not a JSON object"},
		{"03-noname.conflist", `{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}`, "no name"},
		{"04-noplugins.conflist", `{"cniVersion":"1.0.0","name":"x","plugins":[]}`, "no plugins"},
		{"05-notype.conf", `{"cniVersion":"1.0.0","name":"x"}`, "missing 'type'"},
		{"06-dir.conf", "", "a directory"},
		{"07-old.conflist", `{"cniVersion":"0.2.0","name":"old","plugins":[{"type":"ptp"}]}`, `cniVersion "0.2.0", which pktmeta does not speak`},
		{"10-ptp.conflist", `{"cniVersion":"1.0.0","name":"ptp","plugins":[{"type":"ptp"}]}`, "shadowed by 07-old.conflist"},
		{"10-ptp.conflist.temp", "{}", "not a config file name"},
		{"README", "hello", "not a config file name"},
	}
	for _, f := range files {
		if f.reason == "a directory" {
			os.Mkdir(e.path(f.name), 0o755)
			continue
		}
		e.write(f.name, []byte(f.content), 0o644)
	}
	_, err := FindPrimary(e.conf, nil)
	var np *NoPrimaryError
	if !errors.As(err, &np) || !errors.Is(err, ErrNoPrimary) {
		t.Fatalf("FindPrimary: %v", err)
	}
	if len(np.Skipped) != len(files) {
		t.Errorf("skipped %d files, want %d: %v", len(np.Skipped), len(files), np.Files())
	}
	for i, f := range files {
		if i >= len(np.Skipped) {
			break
		}
		if s := np.Skipped[i]; s.Name != f.name || !strings.Contains(s.Reason, f.reason) {
			t.Errorf("skipped %q: %q; want %q: ...%s...", s.Name, s.Reason, f.name, f.reason)
		}
		if !strings.Contains(err.Error(), f.name+": ") {
			t.Errorf("error does not name %s: %v", f.name, err)
		}
	}

	// Install says the same, less the temporary file it removed.
	_, err = Install(e.opts())
	if !errors.As(err, &np) || len(np.Skipped) != len(files)-1 || np.Skipped[0].Name != files[1].name {
		t.Errorf("Install: %v", err)
	}
	if !strings.Contains(err.Error(), "cniVersion") {
		t.Errorf("Install: %v", err)
	}

	for name, c := range map[string]struct {
		dir  string
		want string
	}{
		"empty":   {t.TempDir(), "the directory is empty"},
		"missing": {filepath.Join(t.TempDir(), "nope"), "the directory does not exist"},
	} {
		_, err := FindPrimary(c.dir, nil)
		if !errors.Is(err, ErrNoPrimary) || !strings.HasSuffix(err.Error(), c.want) {
			t.Errorf("%s: %v", name, err)
		}
	}

	// A file runtimes skip ahead of a usable one: the usable one, and a
	// warning naming the other.
	e.rewrite("07-old.conflist", []byte(`{"cniVersion":"0.4.0","name":"old","plugins":[{"type":"ptp"}]}`))
	if p, err := FindPrimary(e.conf, e.opts().Logger); err != nil || p != e.path("07-old.conflist") {
		t.Errorf("FindPrimary = %q, %v", p, err)
	}
	if !strings.Contains(e.logs.String(), "01-broken.conflist") {
		t.Errorf("no warning about the broken file:\n%s", e.logs)
	}
}

func TestWatchLogsWhyNoPrimary(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.write("10-broken.conflist", []byte("{"), 0o644)
	o := e.opts()
	o.Debounce = 10 * time.Millisecond
	w := startWatch(t, o)
	waitFor(t, 10*time.Second, "EventNoPrimary", func() bool { return w.count(EventNoPrimary) == 1 })
	var np *NoPrimaryError
	if ev := w.all()[0]; ev.Kind != EventNoPrimary || !errors.As(ev.Err, &np) || np.Skipped[0].Name != "10-broken.conflist" {
		t.Errorf("event %+v", ev)
	}
	waitFor(t, 10*time.Second, "the reason logged", func() bool {
		return strings.Contains(e.logs.String(), "10-broken.conflist: not JSON")
	})
	// Another unusable file: logged again, not reported again.
	e.write("20-old.conf", []byte(`{"cniVersion":"0.1.0","name":"n","type":"bridge"}`), 0o644)
	waitFor(t, 10*time.Second, "the new reason logged", func() bool {
		return strings.Contains(e.logs.String(), "20-old.conf: cniVersion")
	})
	e.rewrite("30-kindnet.conflist", fixture(t, "10-kindnet.conflist"))
	// Shadowed by 20-old.conf: still nothing to do.
	waitFor(t, 10*time.Second, "the shadowed file logged", func() bool {
		return strings.Contains(e.logs.String(), "30-kindnet.conflist: shadowed by 20-old.conf")
	})
	if err := os.Remove(e.path("20-old.conf")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "EventInstalled", func() bool { return w.count(EventInstalled) == 1 })
	if n := w.count(EventNoPrimary); n != 1 {
		t.Errorf("EventNoPrimary %d times", n)
	}
	checkList(t, e.read("30-kindnet.conflist"))
}
