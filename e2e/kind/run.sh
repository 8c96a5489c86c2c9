#!/usr/bin/env bash
# make e2e-kind: the Go e2e suite of e2e/k8s (the one make e2e-k8s runs on
# a local single-node cluster) against a kind cluster:
#   1. builds the images: pktmeta (make image), its next release for the
#      rolling update (e2e/k8s/node/next-release.sh), the e2e tool
#      (e2e/k8s/images); creates a one-node kind cluster (kindnet) and
#      loads them into it;
#   2. runs go test ./e2e/k8s against the cluster's kubeconfig: install,
#      identity, Services, forgery, config rewrites, agent restarts, the
#      rolling update and the uninstall, each a subtest;
#   3. deletes the cluster (KEEP_CLUSTER=1 keeps it).
#
# Needs a Docker engine that can run kind, kind, kubectl, Go and make, and
# access to registry.k8s.io for the node image. Without Docker or kind it
# says so and exits 0.
#
# Environment: KIND_CLUSTER_NAME (pktmeta-e2e), KIND_NODE_IMAGE (kind's
# default), KEEP_CLUSTER (0), MAKE (make), E2E_RUN (go test -run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/e2e/kind
CLUSTER=${KIND_CLUSTER_NAME:-pktmeta-e2e}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
MAKE=${MAKE:-make}
TIMEOUT=180s

log() { printf '==> %s\n' "$*" >&2; }
fail() {
	printf 'FAIL: %s\n' "$*" >&2
	exit 1
}

# --- Can this machine run it at all? ------------------------------------
docker_info() {
	if command -v timeout >/dev/null 2>&1; then
		timeout 30 docker info >/dev/null 2>&1
	else
		docker info >/dev/null 2>&1
	fi
}
skip=""
if ! command -v docker >/dev/null 2>&1; then
	skip="no docker command"
elif ! docker_info; then
	skip="docker info fails: no Docker engine reachable"
elif ! command -v kind >/dev/null 2>&1; then
	skip="no kind command"
fi
if [[ -n $skip ]]; then
	echo "kind e2e needs a Docker engine that can run kind; none here ($skip): skipping"
	exit 0
fi
command -v kubectl >/dev/null 2>&1 || fail "kind e2e needs kubectl in PATH"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
	fail "a kind cluster named $CLUSTER exists already; delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi

# --- Images -----------------------------------------------------------------
work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig
log "building the images"
"$MAKE" -C "$ROOT" image IMAGE_VERSION=e2e IMAGE_TAR="$work/pktmeta.tar" >&2
next_release=$("$ROOT/e2e/k8s/node/next-release.sh" "$ROOT" "$work/next" e2e-next "$work/pktmeta-next.tar")
(cd "$ROOT" && go run ./e2e/k8s/images --out "$work") >&2
arch=$(go env GOARCH)
sha() {
	if command -v sha256sum >/dev/null; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}
plugin_sha=$(sha "$ROOT/bin/image-root/linux-$arch/pktmeta")
next_plugin_sha=$(sha "$work/next/bin/image-root/linux-$arch/pktmeta")

# --- Cluster --------------------------------------------------------------
cleanup() {
	local rc=$?
	trap - EXIT
	if [[ $KEEP_CLUSTER == 1 ]]; then
		log "keeping cluster $CLUSTER: export KUBECONFIG=$KUBECONFIG"
	else
		log "deleting cluster $CLUSTER"
		kind delete cluster --name "$CLUSTER" || true
		rm -rf "$work"
	fi
	exit "$rc"
}
trap cleanup EXIT

log "creating kind cluster $CLUSTER"
create=(kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml" --kubeconfig "$KUBECONFIG" --wait "$TIMEOUT")
if [[ -n ${KIND_NODE_IMAGE:-} ]]; then
	create+=(--image "$KIND_NODE_IMAGE")
fi
"${create[@]}"
for tar in pktmeta.tar pktmeta-next.tar e2e-tool.tar; do
	log "loading $tar"
	kind load image-archive "$work/$tar" --name "$CLUSTER"
done

# --- The suite ------------------------------------------------------------
cd "$ROOT"
PKTMETA_E2E_KUBECONFIG=$KUBECONFIG \
	PKTMETA_E2E_KUBECTL=$(command -v kubectl) \
	PKTMETA_E2E_IMAGE=ghcr.io/pktmeta/pktmeta:e2e \
	PKTMETA_E2E_NEXT_IMAGE=ghcr.io/pktmeta/pktmeta:e2e-next \
	PKTMETA_E2E_NEXT_VERSION=e2e-next \
	PKTMETA_E2E_NEXT_RELEASE=$next_release \
	PKTMETA_E2E_PLUGIN_SHA256=$plugin_sha \
	PKTMETA_E2E_NEXT_PLUGIN_SHA256=$next_plugin_sha \
	PKTMETA_E2E_TOOL_IMAGE=pktmeta.test/e2e-tool:1 \
	go test -count=1 -timeout 40m -v -run "${E2E_RUN:-.}" ./e2e/k8s/
log "PASS"
