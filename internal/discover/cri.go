package discover

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// Sandbox is what the container runtime knows about a pod.
type Sandbox struct {
	ID          string // the sandbox container id: CNI_CONTAINERID of its CNI calls
	Namespace   string
	Name        string
	UID         string
	Annotations map[string]string
	Labels      map[string]string
	NetnsPath   string
	NetnsIno    uint64
	// IPs are the pod's addresses as the runtime recorded them from its
	// CNI result: not what the pod may since have put on its interface.
	IPs []netip.Addr
}

// CRI asks a CRI runtime (containerd, CRI-O) which pod owns a namespace.
type CRI struct {
	conn *grpc.ClientConn
	rt   runtimeapi.RuntimeServiceClient
}

// DialCRI connects to the runtime's CRI socket.
func DialCRI(socket string) (*CRI, error) {
	if _, err := os.Stat(socket); err != nil {
		return nil, fmt.Errorf("CRI socket: %w", err)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial CRI %s: %w", socket, err)
	}
	return &CRI{conn: conn, rt: runtimeapi.NewRuntimeServiceClient(conn)}, nil
}

// Close closes the connection.
func (c *CRI) Close() error { return c.conn.Close() }

// Sandboxes lists ready pod sandboxes with the path of their network
// namespace, from the runtime's verbose status (its OCI runtime spec).
func (c *CRI) Sandboxes(ctx context.Context) ([]Sandbox, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	list, err := c.rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{
		Filter: &runtimeapi.PodSandboxFilter{State: &runtimeapi.PodSandboxStateValue{State: runtimeapi.PodSandboxState_SANDBOX_READY}},
	})
	if err != nil {
		return nil, fmt.Errorf("list pod sandboxes: %w", err)
	}
	var out []Sandbox
	for _, s := range list.Items {
		st, err := c.rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: s.Id, Verbose: true})
		if err != nil {
			continue // gone meanwhile
		}
		sb := Sandbox{ID: s.Id, Annotations: s.Annotations, Labels: s.Labels}
		if m := s.Metadata; m != nil {
			sb.Namespace, sb.Name, sb.UID = m.Namespace, m.Name, m.Uid
		}
		if n := st.GetStatus().GetNetwork(); n != nil {
			for _, ip := range append([]string{n.GetIp()}, additionalIPs(n)...) {
				if a, err := netip.ParseAddr(ip); err == nil {
					sb.IPs = append(sb.IPs, a.Unmap())
				}
			}
		}
		sb.NetnsPath = netnsFromVerboseInfo(st.Info["info"])
		if sb.NetnsPath == "" {
			continue // host network, or a runtime that does not say
		}
		var fst unix.Stat_t
		if unix.Stat(sb.NetnsPath, &fst) == nil {
			sb.NetnsIno = fst.Ino
		}
		out = append(out, sb)
	}
	return out, nil
}

func additionalIPs(n *runtimeapi.PodSandboxNetworkStatus) []string {
	var out []string
	for _, a := range n.GetAdditionalIps() {
		out = append(out, a.GetIp())
	}
	return out
}

// netnsFromVerboseInfo digs the network namespace path out of the
// runtime's verbose sandbox info: {"runtimeSpec": {"linux": {"namespaces":
// [{"type": "network", "path": ...}]}}} for containerd and CRI-O.
func netnsFromVerboseInfo(info string) string {
	var v struct {
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	if json.Unmarshal([]byte(info), &v) != nil {
		return ""
	}
	for _, n := range v.RuntimeSpec.Linux.Namespaces {
		if n.Type == "network" {
			return n.Path
		}
	}
	return ""
}
