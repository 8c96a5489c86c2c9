// Package kind checks the kind end-to-end test's files without running it
// (run.sh needs Docker): the cluster config decodes strictly and is the
// one-node cluster the e2e/k8s suite assumes, and run.sh skips cleanly
// where there is no Docker engine. The suite itself is e2e/k8s.
package kind

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/pktmeta/pktmeta/deploy"
)

// cluster is the part of kind's v1alpha4 Cluster that cluster.yaml uses.
type cluster struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Networking struct {
		DisableDefaultCNI bool   `json:"disableDefaultCNI"`
		IPFamily          string `json:"ipFamily"`
		KubeProxyMode     string `json:"kubeProxyMode"`
	} `json:"networking"`
	Nodes []struct {
		Role string `json:"role"`
	} `json:"nodes"`
}

func TestClusterConfig(t *testing.T) {
	b, err := os.ReadFile("cluster.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c cluster
	if err := deploy.StrictYAML(b, &c); err != nil {
		t.Fatal(err)
	}
	if c.Kind != "Cluster" || c.APIVersion != "kind.x-k8s.io/v1alpha4" {
		t.Errorf("kind/apiVersion %s/%s", c.Kind, c.APIVersion)
	}
	if c.Networking.DisableDefaultCNI {
		t.Error("kindnet disabled: pktmeta chains after it")
	}
	var roles []string
	for _, n := range c.Nodes {
		roles = append(roles, n.Role)
	}
	// e2e/k8s's node probe sees one node: every pod it checks runs there.
	if !reflect.DeepEqual(roles, []string{"control-plane"}) {
		t.Errorf("nodes %v, want one (e2e/k8s is a single-node suite)", roles)
	}
}

// Where there is no Docker, run.sh says so and succeeds, before building
// or creating anything.
func TestRunSkipsWithoutDocker(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("no bash")
	}
	// A PATH with nothing but what run.sh needs before its check: no
	// docker, no kind.
	bin := t.TempDir()
	for _, tool := range []string{"dirname"} {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Skipf("no %s", tool)
		}
		if err := os.Symlink(p, filepath.Join(bin, tool)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, "run.sh")
	cmd.Env = []string{"PATH=" + bin, "HOME=" + t.TempDir(), "MAKE=/nonexistent/make"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("run.sh without docker: %v\n%s", err, out)
	}
	if want := "kind e2e needs a Docker engine that can run kind; none here (no docker command): skipping\n"; string(out) != want {
		t.Errorf("output %q, want %q", out, want)
	}

	st, err := os.Stat("run.sh")
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode()&0o111 == 0 {
		t.Error("run.sh is not executable")
	}
}
