#!/usr/bin/env bash
# pktmeta end to end on a kind cluster (make e2e-kind):
#   1. builds the image (make image) and a kind cluster (kindnet, 1 control
#      plane + 2 workers), loads the image into the nodes;
#   2. installs deploy/ (through e2e/kind/overlay) and waits for the agents;
#      checks every node's CNI chain has pktmeta;
#   3. runs a client holding a connection to a server through a Service, on
#      one node, and checks with `pktmetactl conns` in that node's agent that
#      the destination saw who opened it: the client pod's identity, its
#      pktmeta.dev/team annotation as a tag, the static tag, the NAT;
#   4. deletes the DaemonSet and checks that every node's chain no longer has
#      pktmeta and that pods still start;
#   5. deletes the cluster (KEEP_CLUSTER=1 keeps it).
#
# Needs a Docker engine that can run kind, kind, kubectl, jq, Go and make,
# and access to registry.k8s.io. Without Docker or kind it says so and
# exits 0. Bash 3.2 (macOS) is enough.
#
# Environment: KIND_CLUSTER_NAME (pktmeta-e2e), KIND_NODE_IMAGE (kind's
# default), IMAGE_TAR (bin/pktmeta-image.tar), KEEP_CLUSTER (0), MAKE (make).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/e2e/kind
CLUSTER=${KIND_CLUSTER_NAME:-pktmeta-e2e}
IMAGE_TAR=${IMAGE_TAR:-$ROOT/bin/pktmeta-image.tar}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
MAKE=${MAKE:-make}
NS=pktmeta-system
APP_NS=pktmeta-e2e
AGENT_SELECTOR=app.kubernetes.io/name=pktmeta
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
for tool in kubectl jq; do
	command -v "$tool" >/dev/null 2>&1 || fail "kind e2e needs $tool in PATH"
done
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
	fail "a kind cluster named $CLUSTER exists already; delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi

# --- Image ----------------------------------------------------------------
log "building the image"
"$MAKE" -C "$ROOT" image IMAGE_VERSION=e2e IMAGE_TAR="$IMAGE_TAR"

# --- Cluster --------------------------------------------------------------
work=$(mktemp -d)
export KUBECONFIG=$work/kubeconfig

diagnose() {
	log "diagnostics"
	kubectl get nodes -o wide || true
	kubectl get pods -A -o wide || true
	kubectl -n "$NS" describe daemonset pktmeta || true
	kubectl -n "$NS" logs -l "$AGENT_SELECTOR" --all-containers --prefix --tail=200 || true
	local node
	for node in $(kind get nodes --name "$CLUSTER" 2>/dev/null); do
		echo "--- $node: /etc/cni/net.d"
		docker exec "$node" sh -c 'for f in /etc/cni/net.d/*; do echo "# $f"; cat "$f"; echo; done' || true
	done
}

cleanup() {
	local rc=$?
	trap - EXIT
	if ((rc != 0)); then
		diagnose
	fi
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
node_list=$(kind get nodes --name "$CLUSTER")
read -r -a nodes <<<"${node_list//$'\n'/ }"
((${#nodes[@]} == 3)) || fail "want 3 nodes, have ${#nodes[@]}: ${nodes[*]}"

log "loading $IMAGE_TAR into the nodes"
kind load image-archive "$IMAGE_TAR" --name "$CLUSTER"

# primary_conflist NODE prints the node's highest-priority CNI config (the
# one the runtime uses: first in lexical order).
primary_conflist() {
	local f
	f=$(docker exec "$1" sh -c 'ls /etc/cni/net.d/ | grep -E "\.(conflist|conf|json)$" | LC_ALL=C sort | head -n1')
	[[ -n $f ]] || fail "$1: no CNI config in /etc/cni/net.d"
	docker exec "$1" cat "/etc/cni/net.d/$f"
}

# --- Install --------------------------------------------------------------
log "installing pktmeta (kubectl apply -k e2e/kind/overlay)"
kubectl apply -k "$HERE/overlay"
kubectl -n "$NS" rollout status daemonset/pktmeta --timeout="$TIMEOUT"

for node in "${nodes[@]}"; do
	conf=$(primary_conflist "$node")
	jq -e '[.plugins[].type] | (.[0] != "pktmeta") and (index("pktmeta") != null)' <<<"$conf" >/dev/null ||
		fail "$node: pktmeta is not chained after the primary plugin: $conf"
	docker exec "$node" test -x /opt/cni/bin/pktmeta || fail "$node: /opt/cni/bin/pktmeta missing"
	log "$node: pktmeta in the CNI chain"
done

# --- Traffic --------------------------------------------------------------
log "starting client and server"
kubectl apply -f "$HERE/workloads.yaml"
kubectl -n "$APP_NS" rollout status deployment/e2e-server --timeout="$TIMEOUT"
kubectl -n "$APP_NS" rollout status deployment/e2e-client --timeout="$TIMEOUT"

pod_of() {
	kubectl -n "$APP_NS" get pod -l "app.kubernetes.io/name=$1" --field-selector=status.phase=Running \
		-o jsonpath='{.items[0].metadata.name} {.items[0].spec.nodeName}'
}
out=$(pod_of e2e-server)
read -r server server_node <<<"$out"
out=$(pod_of e2e-client)
read -r client client_node <<<"$out"
[[ -n $server && -n $client ]] || fail "client or server pod not running"
[[ $server_node == "$client_node" ]] || fail "client on $client_node, server on $server_node: want one node"
agent=$(kubectl -n "$NS" get pod -l "$AGENT_SELECTOR" --field-selector="spec.nodeName=$server_node" -o jsonpath='{.items[0].metadata.name}')
[[ -n $agent ]] || fail "no agent pod on $server_node"
log "client $client and server $server on $server_node; agent $agent"

# A connection through the Service works at all.
kubectl -n "$APP_NS" exec "$client" -- /agnhost connect e2e-server:80 --timeout=5s

# The long-lived connection, as the destination's node saw it ($ns,
# $client and $server are jq variables).
# shellcheck disable=SC2016
query='[(. // [])[] | select(.origin.namespace == $ns and .origin.pod == $client and (.peer.pod // "") == $server)]'
found=""
for _ in $(seq 60); do
	conns=$(kubectl -n "$NS" exec "$agent" -c agent -- pktmetactl conns -o json) || conns='[]'
	found=$(jq -c --arg ns "$APP_NS" --arg client "$client" --arg server "$server" "$query | .[0] // empty" <<<"$conns") || found=""
	[[ -n $found ]] && break
	sleep 2
done
[[ -n $found ]] || fail "no delivered connection from $APP_NS/$client to $server in pktmetactl conns on $server_node: $conns"
log "seen at the destination: $found"
jq -e '.proto == "tcp"' <<<"$found" >/dev/null || fail "not TCP"
jq -e '(.delivered // "") != ""' <<<"$found" >/dev/null || fail "not marked delivered"
jq -e '.tags.team == "e2e"' <<<"$found" >/dev/null || fail "the pktmeta.dev/team annotation is not a tag"
jq -e '.tags.cluster == "kind-e2e"' <<<"$found" >/dev/null || fail "the static tag cluster=kind-e2e is missing"
jq -e '.nat == true' <<<"$found" >/dev/null || fail "the Service's DNAT was not resolved"
uid=$(kubectl -n "$APP_NS" get pod "$client" -o jsonpath='{.metadata.uid}')
jq -e --arg uid "$uid" '.origin.uid == $uid' <<<"$found" >/dev/null ||
	fail "origin UID is not the client pod's ($uid)"
if ! jq -e '.tags["app.kubernetes.io/name"] == "e2e-client"' <<<"$found" >/dev/null; then
	log "warning: label tag app.kubernetes.io/name not (yet) applied"
fi

# --- Uninstall ------------------------------------------------------------
log "deleting the DaemonSet: the agents take pktmeta out of the chain"
kubectl -n "$NS" delete daemonset pktmeta --wait=true --timeout="$TIMEOUT"
kubectl -n "$NS" wait --for=delete pod -l "$AGENT_SELECTOR" --timeout="$TIMEOUT"
for node in "${nodes[@]}"; do
	conf=$(primary_conflist "$node")
	jq -e '.plugins | length > 0 and all(.type != "pktmeta")' <<<"$conf" >/dev/null ||
		fail "$node: pktmeta is still in the CNI chain after uninstall: $conf"
	log "$node: pktmeta gone from the CNI chain"
done

log "pods still start without pktmeta"
kubectl -n "$APP_NS" rollout restart deployment/e2e-server
kubectl -n "$APP_NS" rollout status deployment/e2e-server --timeout="$TIMEOUT"
kubectl -n "$APP_NS" exec "$client" -- /agnhost connect e2e-server:80 --timeout=5s

log "PASS"
