#!/usr/bin/env bash
# Builds what the e2e-k8s node runs, from the Go module proxy at pinned
# versions, into a cache that survives between runs on one machine:
#
#   kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler,
#               kubelet, kube-proxy, kubectl (wrapper module build/kubernetes)
#   etcd        the etcd server (wrapper module build/etcd)
#
# Each set lands in $CACHE/bin/<name>-<key>/, where the key covers the
# wrapper module (go.mod, go.sum), the Go toolchain and the ldflags: a
# changed pin rebuilds, an unchanged one costs a stat. A build from nothing
# took about 5 minutes on the 2-core machines here (README.md); GOCACHE and
# GOMODCACHE live in the cache too, so a rebuild after a pin change is
# quicker.
#
# Usage: build.sh CACHE   (prints the two bin directories, one a line:
#                          KUBE_BIN=... and ETCD_BIN=...)
set -euo pipefail
shopt -s inherit_errexit
cache=${1:?usage: build.sh CACHE}
here=$(cd "$(dirname "$0")" && pwd)

KUBE_VERSION=v1.36.3
ETCD_VERSION=v3.6.8

export GOMODCACHE=$cache/gomod GOCACHE=$cache/gocache CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false" GOTOOLCHAIN=local
mkdir -p "$cache/bin" "$GOMODCACHE" "$GOCACHE"

key() { # module dir, ldflags
	{ cat "$1/go.mod" "$1/go.sum"; go version; echo "$2"; } | sha256sum | cut -c1-12
}

# build NAME MODULE_DIR LDFLAGS PACKAGES...: one go build for all of them
# (they share most of their dependencies), into a fresh directory renamed
# into place, so that a killed build never leaves a half set behind.
build() {
	local name=$1 mod=$2 ld=$3
	shift 3
	local out=$cache/bin/$name-$(key "$mod" "$ld")
	if [[ -f $out/.complete ]]; then
		echo "$out"
		return
	fi
	local tmp=$out.tmp.$$
	rm -rf "$tmp"
	mkdir -p "$tmp"
	local start=$SECONDS
	echo "building $name (go build ${*##*/}); from nothing this takes many minutes" >&2
	# Explicit: build() runs in a command substitution, where bash turns
	# set -e off, and a failed build must never be cached as complete.
	(cd "$mod" && go build -ldflags "$ld" -o "$tmp/" "$@") >&2 || exit 1
	touch "$tmp/.complete"
	rm -rf "$out"
	mv "$tmp" "$out"
	echo "built $name in $((SECONDS - start)) s" >&2
	# Older builds of this set: superseded.
	for old in "$cache/bin/$name"-*; do
		[[ $old == "$out" || $old == *.tmp.* ]] || rm -rf "$old"
	done
	echo "$out"
}

# Without these the binaries report v0.0.0-master+$Format:%H$, which
# kubelet and kubectl refuse to compare versions with.
major=${KUBE_VERSION#v}; major=${major%%.*}
minor=${KUBE_VERSION#v*.}; minor=${minor%%.*}
kube_ld="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	kube_ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
	kube_ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

kube=$(build kubernetes-$KUBE_VERSION "$here/build/kubernetes" "$kube_ld" \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
	k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kubectl)
etcd=$(build etcd-$ETCD_VERSION "$here/build/etcd" "-s -w" go.etcd.io/etcd/server/v3)
# The etcd server's main package (go.etcd.io/etcd/server/v3) builds as
# "server".
[[ -x $etcd/etcd ]] || ln -sf server "$etcd/etcd"

echo "KUBE_BIN=$kube"
echo "ETCD_BIN=$etcd"
