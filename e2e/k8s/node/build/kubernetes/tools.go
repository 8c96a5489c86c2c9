//go:build tools

// Package tools pins the Kubernetes commands make e2e-k8s builds: this
// module exists only to give them one go.mod (k8s.io/kubernetes needs its
// staging modules replaced by their published versions to build outside
// its own repository).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
