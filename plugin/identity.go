package plugin

import (
	"strings"
)

// podIdentity is what the runtime tells us about the pod, through CNI_ARGS
// (kubelet/containerd: IgnoreUnknown=1;K8S_POD_NAMESPACE=...;...).
type podIdentity struct {
	Namespace   string
	Name        string
	UID         string
	ContainerID string // the sandbox (infra) container
}

// parseCNIArgs reads the K8S_* keys and ignores the rest, whatever
// IgnoreUnknown says: identity is optional, the attachment is not.
func parseCNIArgs(args, containerID string) podIdentity {
	id := podIdentity{ContainerID: containerID}
	for _, kv := range strings.Split(args, ";") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		switch strings.TrimSpace(k) {
		case "K8S_POD_NAMESPACE":
			id.Namespace = v
		case "K8S_POD_NAME":
			id.Name = v
		case "K8S_POD_UID":
			id.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			if v != "" {
				id.ContainerID = v
			}
		}
	}
	return id
}

// partial: without a pod name the workload is known only by its container.
func (p podIdentity) partial() bool { return p.Namespace == "" || p.Name == "" }
