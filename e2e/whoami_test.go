package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/internal/testbed"
	"github.com/pktmeta/pktmeta/internal/testutil"
)

// TestWhoamiExamples: the three example servers of examples/whoami (Go
// HTTP, C, Python with the standard library alone), run as ordinary
// processes in the receiving pod, tell a client who it is.
func TestWhoamiExamples(t *testing.T) {
	tp := newTwoPods(t, envOptions{})
	dir := t.TempDir()
	build := func(t *testing.T, name string, args ...string) {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = repoDir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}

	t.Run("go http", func(t *testing.T) {
		bin := filepath.Join(dir, "whoami-go")
		build(t, "go", "build", "-o", bin, "./examples/whoami")
		logs := runInPod(t, tp.b, bin, "-listen", ":9300", "-udp", ":9303")
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return tp.a.DialTCP(ctx, netip.MustParseAddrPort(addr))
			},
		}}
		var got struct {
			Namespace, Pod string
			Tags, PodTags  map[string]string
		}
		eventually(t, "whoami answers", func() error {
			resp, err := client.Get(fmt.Sprintf("http://%s/", netip.AddrPortFrom(tp.b.IPv4, 9300)))
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			return json.NewDecoder(resp.Body).Decode(&got)
		})
		if got.Namespace != "shop" || got.Pod != "frontend" || got.Tags["cluster"] != "e2e" || got.PodTags["app"] != "web" {
			t.Fatalf("whoami answered %+v", got)
		}
		// The server logs before it answers, but its output reaches the
		// buffer through a pipe and a copying goroutine, so the line can
		// arrive after the answer does.
		eventually(t, "whoami logs the caller", func() error {
			if l := logs.String(); !strings.Contains(l, "caller=shop/frontend") || !strings.Contains(l, "map[cluster:e2e]") {
				return fmt.Errorf("whoami logged:\n%s", l)
			}
			return nil
		})

		// The same binary's unconnected UDP socket, over IPv4 and IPv6.
		d := tp.open()
		if d.Recvmsg4 == nil {
			t.Log("this kernel cannot run the recvmsg programs: the UDP answer is not checked")
			return
		}
		for _, dst := range []netip.Addr{tp.b.IPv4, tp.b.IPv6} {
			u, err := tp.a.DialUDP(netip.AddrPortFrom(dst, 9303))
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			got.Namespace, got.Pod, got.Tags, got.PodTags = "", "", nil, nil
			eventually(t, "whoami answers a datagram", func() error {
				if _, err := u.Write([]byte("who am i")); err != nil {
					return err
				}
				u.SetReadDeadline(time.Now().Add(time.Second))
				buf := make([]byte, 4096)
				n, err := u.Read(buf)
				if err != nil {
					return err
				}
				return json.Unmarshal(buf[:n], &got)
			})
			if got.Namespace != "shop" || got.Pod != "frontend" || got.PodTags["app"] != "web" {
				t.Fatalf("whoami answered a datagram to %s with %+v", dst, got)
			}
		}
	})

	for _, c := range []struct {
		name string
		cmd  func(t *testing.T) []string
	}{
		{"c", func(t *testing.T) []string {
			bin := filepath.Join(dir, "whoami-c")
			build(t, "cc", "-O2", "-Wall", "-Werror", "-I", "bpf/include", "-o", bin, "examples/whoami/c/whoami.c")
			return []string{bin, "9301"}
		}},
		{"python", func(t *testing.T) []string {
			return []string{"python3", filepath.Join(repoDir, "examples/whoami/python/whoami.py"), "9302"}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			argv := c.cmd(t)
			runInPod(t, tp.b, argv[0], argv[1:]...)
			port := uint16(9301)
			if c.name == "python" {
				port = 9302
			}
			for _, dst := range []netip.Addr{tp.b.IPv4, tp.b.IPv6} {
				var line string
				eventually(t, c.name+" whoami answers", func() error {
					conn, err := tp.a.DialTCP(tp.ctx, netip.AddrPortFrom(dst, port))
					if err != nil {
						return err
					}
					defer conn.Close()
					conn.SetReadDeadline(time.Now().Add(5 * time.Second))
					line, err = bufio.NewReader(conn).ReadString('\n')
					return err
				})
				if !strings.HasPrefix(line, "shop/frontend ") || !strings.Contains(line, "tags: cluster=e2e pod-claimed: app=web") {
					t.Fatalf("%s answered %q", dst, line)
				}
			}
		})
	}
}

// runInPod starts a program in p's network namespace until the test ends,
// and returns what it writes.
func runInPod(t *testing.T, p *testbed.Pod, name string, args ...string) *testutil.SyncBuffer {
	t.Helper()
	out := &testutil.SyncBuffer{}
	cmd := exec.Command("nsenter", append([]string{"--net=" + p.NetnsPath, name}, args...)...)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("%s in pod %s:\n%s", name, p.Spec.Name, out.String())
		}
	})
	return out
}
