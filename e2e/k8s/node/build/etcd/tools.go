//go:build tools

// Package tools pins the etcd server make e2e-k8s builds.
package tools

import _ "go.etcd.io/etcd/server/v3"
