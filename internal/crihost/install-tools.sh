#!/usr/bin/env bash
# Installs what internal/crihost needs to run a private containerd:
# containerd and runc from Debian (apt), crictl built from the Go module
# proxy into <repo>/bin/tools. Safe to run again: it installs only what is
# missing. EnsureTools in tools.go does the same from Go; keep them in step.
#
# Usage: internal/crihost/install-tools.sh   (as root; a Makefile target
# can call it:
#   cri-tools:
#   	./internal/crihost/install-tools.sh
# ). CRICTL_VERSION overrides the crictl release (keep it in step with
# CrictlVersion in tools.go).
set -euo pipefail

CRICTL_VERSION="${CRICTL_VERSION:-v1.37.0}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
tools="${repo}/bin/tools"

missing=()
for bin in containerd containerd-shim-runc-v2 ctr; do
	command -v "$bin" >/dev/null || { missing+=(containerd); break; }
done
command -v runc >/dev/null || missing+=(runc)

if ((${#missing[@]})); then
	if [[ $EUID -ne 0 ]]; then
		echo "install-tools: need root to apt-get install ${missing[*]}" >&2
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	# A stale package list gives 404s for superseded versions: update once
	# and retry.
	if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
		apt-get update
		apt-get install -y --no-install-recommends "${missing[@]}"
	fi
fi

if [[ ! -x "${tools}/crictl" ]]; then
	mkdir -p "$tools"
	# From a temp dir: `go install pkg@version` ignores go.mod anyway, and
	# this keeps a go.work out of it.
	(cd "${TMPDIR:-/tmp}" && CGO_ENABLED=0 GOWORK=off GOFLAGS= GOBIN="$tools" go install "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}")
fi

echo "install-tools: containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | awk 'NR==1{print $3}'), crictl ${tools}/crictl"
