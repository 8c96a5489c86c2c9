package crihost

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"text/template"

	"golang.org/x/sys/unix"
)

// configTemplate is the containerd 1.6 configuration (version 2) of a
// private instance. Everything containerd would otherwise put in a
// system-wide place is moved under the host's directory, so it can run
// beside a system containerd and leaves nothing behind:
//
//   - root, state, the gRPC and ttrpc sockets, the opt plugin's directory
//     (default /opt/containerd) and runc's state root (default
//     /run/containerd/runc) are all ours;
//   - no debug socket, no metrics listener, no CRI TCP service; the CRI
//     streaming server (exec, attach) listens on 127.0.0.1 at a random port;
//   - pod network namespaces are bind-mounted under our state directory
//     (netns_mounts_under_state_dir) instead of /var/run/netns, unless
//     Options.SystemNetnsDir asks for the stock location;
//   - AppArmor is off: with it on, containerd would load its profile into
//     the kernel, a change to the host that outlives us.
//
// restrict_oom_score_adj: the sandbox has no CAP_SYS_RESOURCE, and without
// this containerd tries to lower OOM scores, which fails.
// max_conf_num = 1: containerd uses the first conflist in conf_dir, as a
// node with one pod network does.
const configTemplate = `# Written by internal/crihost for one private containerd 1.6.
version = 2
root = {{q .Root}}
state = {{q .State}}
oom_score = 0
# Snapshotters that need what a test machine lacks: skip them quietly.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = {{q .Socket}}

[ttrpc]
  address = {{q .TTRPCSocket}}

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {{q .Opt}}

  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = {{q .SandboxImage}}
    restrict_oom_score_adj = true
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    netns_mounts_under_state_dir = {{not .SystemNetnsDir}}
    enable_selinux = false
    disable_apparmor = true
    systemd_cgroup = false

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {{q .CNIBinDir}}
      conf_dir = {{q .CNIConfDir}}
      max_conf_num = 1
      conf_template = ""

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = {{q .Snapshotter}}
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = {{q .Runc}}
          Root = {{q .RuncRoot}}
          SystemdCgroup = false
`

// daemonConfig holds what configTemplate needs.
type daemonConfig struct {
	Root, State, Socket, TTRPCSocket, Opt string
	SandboxImage                          string
	SystemNetnsDir                        bool
	CNIBinDir, CNIConfDir                 string
	Snapshotter                           string
	Runc, RuncRoot                        string
}

func (c daemonConfig) render() ([]byte, error) {
	t, err := template.New("config.toml").Funcs(template.FuncMap{"q": tomlString}).Parse(configTemplate)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	if err := t.Execute(&b, c); err != nil {
		return nil, fmt.Errorf("render containerd config: %w", err)
	}
	return b.Bytes(), nil
}

// tomlString quotes s as a TOML basic string; JSON's string escapes are a
// subset of TOML's.
func tomlString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// crictlConfig points crictl at our socket, so that a person debugging a
// test can run `crictl --config <dir>/crictl.yaml ps` too. The timeout is
// generous: the first CNI ADD on a node loads the BPF datapath.
func crictlConfig(socket string) []byte {
	ep := "unix://" + socket
	return fmt.Appendf(nil, "runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 60\ndebug: false\npull-image-on-create: false\n", ep, ep)
}

// overlaySupported tries the mount containerd's overlayfs snapshotter
// needs, in dir. containerd itself only skips the plugin when its own probe
// fails and then fails every pod; probing first lets us choose "native".
func overlaySupported(dir string) error {
	probe := filepath.Join(dir, "overlay-probe")
	defer os.RemoveAll(probe)
	var paths [4]string
	for i, n := range []string{"lower", "upper", "work", "merged"} {
		paths[i] = filepath.Join(probe, n)
		if err := os.MkdirAll(paths[i], 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", paths[0], paths[1], paths[2])
	if err := unix.Mount("overlay", paths[3], "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay in %s: %w", dir, err)
	}
	if err := unix.Unmount(paths[3], 0); err != nil {
		return fmt.Errorf("unmount overlay probe %s: %w", paths[3], err)
	}
	return nil
}
