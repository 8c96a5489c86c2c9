package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/pktmeta/pktmeta/internal/datapath"
	"golang.org/x/sys/unix"
)

// EnsureBPFFS mounts a bpf filesystem at dir unless one is there. In a
// container the mount is only seen by the host with bidirectional mount
// propagation, which Kubernetes grants privileged containers alone: the
// DaemonSet's init container runs `pktmeta-agent mount-bpffs` for that,
// and the agent itself then finds bpffs already mounted.
func EnsureBPFFS(dir string, log *slog.Logger) error {
	err := datapath.CheckBPFFS(dir)
	if err == nil {
		return nil
	}
	if !errors.Is(err, datapath.ErrNotBPFFS) && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	log.Info("mounted bpffs", "path", dir)
	return datapath.CheckBPFFS(dir)
}
