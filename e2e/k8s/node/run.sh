#!/usr/bin/env bash
# make e2e-k8s: a real single-node Kubernetes on this machine, pktmeta's
# deploy/ applied to it as users apply it, and the Go e2e suite in e2e/k8s
# against it. Run through hack/hostlock.sh (the Makefile does), as root.
#
#   1. what the node needs: apt packages, the CNI plugins, crictl, and the
#      Kubernetes and etcd binaries (build.sh; cached in $E2E_CACHE)
#   2. images, built here and imported (no registry): pktmeta (make image),
#      pktmeta's next release (next-release.sh), pause and the e2e tool
#   3. up.sh, the tests, and down.sh on every exit: success, failure,
#      Ctrl-C or SIGTERM. down.sh restores every host setting up.sh changed.
#
# Environment: E2E_RUN (go test -run pattern), E2E_KEEP=1 (leave the cluster
# up after the tests, for debugging: e2e/k8s/node/down.sh removes it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
# shellcheck source=env.sh
source "$here/env.sh"
E2E_WHO=e2e-k8s
cd "$repo"
[[ $EUID -eq 0 ]] || e2e_die "run as root: the node's processes need it"
[[ -n ${PKTMETA_HOST_LOCKED:-} ]] || e2e_die "run through the Makefile (make e2e-k8s), which takes the host lock"
start=$SECONDS

# ---- 1. What the node needs ------------------------------------------------------
need=()
for c in containerd:containerd runc:runc nft:nftables openssl:openssl curl:curl findmnt:util-linux; do
	command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if ((${#need[@]})); then
	e2e_log "apt-get install ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
make --no-print-directory deps build cni-plugins cri-tools >&2
# An assignment, so that a failed build stops the run here (set -e).
bins=$("$here/build.sh" "$E2E_CACHE")
eval "$(grep -E '^(KUBE|ETCD)_BIN=' <<<"$bins")"
export KUBE_BIN ETCD_BIN CNI_BIN=$repo/bin/cni CRICTL=$repo/bin/tools/crictl
e2e_log "binaries ready after $((SECONDS - start)) s"

# host_state prints what a run must leave as it found it: the files and
# directories the node uses, sysctls, mount propagation, nftables tables,
# cgroups, veths and network namespaces.
host_state() {
	local p
	for p in /etc/cni /etc/cni/net.d /opt/cni /opt/cni/bin /run/containerd /var/lib/cni \
		/run/pktmeta /var/lib/pktmeta /run/netns /var/lib/kubelet /sys/fs/bpf/pktmeta \
		/etc/kubernetes /var/log/containers /var/log/pods /usr/libexec/kubernetes /sys/fs/cgroup/cpu/kubepods \
		/sys/fs/cgroup/memory/kubepods /sys/fs/cgroup/kubepods; do
		[[ -e $p ]] && echo "exists $p $(ls -A "$p" 2>/dev/null | LC_ALL=C sort | tr '\n' ' ')"
	done
	for p in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
		kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward \
		net/ipv4/conf/all/forwarding net/ipv6/conf/all/forwarding; do
		[[ -e /proc/sys/$p ]] && echo "sysctl $p $(cat "/proc/sys/$p")"
	done
	echo "bpffs /sys/fs/bpf $(findmnt -n -t bpf -o PROPAGATION /sys/fs/bpf || echo none)"
	echo "mount /run/netns $(findmnt -n -o PROPAGATION /run/netns || echo none)"
	nft list tables 2>/dev/null | LC_ALL=C sort | sed 's/^/nft /'
	ip -o link show type veth 2>/dev/null | awk -F': ' '{print "veth " $2}' | LC_ALL=C sort
}

# A cluster a killed run left behind goes first (down.sh empties the state
# directory, where the images are built next). Logs of the previous run go
# too; this run's stay after its down.sh, for a failure.
"$here/down.sh"
rm -rf "$LOGS"
before=$(host_state)

# ---- 2. Images --------------------------------------------------------------------------
work=$E2E_STATE/build
rm -rf "$work"
mkdir -p "$work"
make --no-print-directory image IMAGE_VERSION=e2e IMAGE_TAR="$work/pktmeta.tar" >&2
next_release=$("$here/next-release.sh" "$repo" "$work/next" e2e-next "$work/pktmeta-next.tar")
go run ./e2e/k8s/images --out "$work" >&2
sha() { sha256sum "$1" | cut -d' ' -f1; }
plugin_sha=$(sha "$repo/bin/image-root/linux-$(go env GOARCH)/pktmeta")
next_plugin_sha=$(sha "$work/next/bin/image-root/linux-$(go env GOARCH)/pktmeta")
rm -rf "$work/next"
e2e_log "images ready after $((SECONDS - start)) s"

# ---- 3. The cluster and the tests ----------------------------------------------------------
# Long steps run in the background and are waited for: bash runs a trap
# only between commands, and `wait` is the one it interrupts. So a SIGTERM
# (a CI timeout) or Ctrl-C reaches teardown at once, which stops the step
# and tears the cluster down.
child=""
kill_tree() {
	local p
	for p in $(pgrep -P "$1"); do kill_tree "$p"; done
	kill -TERM "$1" 2>/dev/null
}
run_step() {
	"$@" &
	child=$!
	wait "$child"
	child=""
}
teardown() {
	local rc=$?
	trap - EXIT INT TERM
	# Everything below runs whatever fails: a step that already exited, a
	# teardown command that finds nothing to do.
	set +e
	if [[ -n $child ]] && kill -0 "$child" 2>/dev/null; then
		e2e_log "stopping the running step (pid $child) and what it started"
		kill_tree "$child"
		wait "$child" 2>/dev/null
	fi
	if ((rc != 0)); then
		e2e_log "failed (status $rc); the last lines of each node process's log:"
		for f in "$LOGS"/*.log; do
			[[ -f $f ]] || continue
			echo "==== $f" >&2
			tail -n 15 "$f" >&2
		done
	fi
	if [[ ${E2E_KEEP:-} == 1 ]]; then
		e2e_log "E2E_KEEP=1: the cluster stays up (KUBECONFIG=$KUBECONFIG); e2e/k8s/node/down.sh removes it"
	else
		"$here/down.sh"
		# The host as it was: anything else fails the run, named.
		local after
		after=$(host_state)
		if [[ $after != "$before" ]]; then
			e2e_log "the host is not as this run found it (< before, > after):"
			diff <(echo "$before") <(echo "$after") >&2 || true
			((rc != 0)) || rc=1
		fi
	fi
	e2e_log "done after $((SECONDS - start)) s, status $rc"
	exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
IMAGES="$work/pause.tar $work/e2e-tool.tar $work/pktmeta.tar $work/pktmeta-next.tar" run_step "$here/up.sh"
e2e_log "cluster up after $((SECONDS - start)) s"

PKTMETA_E2E_KUBECONFIG=$KUBECONFIG \
	PKTMETA_E2E_KUBECTL=$KUBE_BIN/kubectl \
	PKTMETA_E2E_IMAGE=ghcr.io/pktmeta/pktmeta:e2e \
	PKTMETA_E2E_NEXT_IMAGE=ghcr.io/pktmeta/pktmeta:e2e-next \
	PKTMETA_E2E_NEXT_VERSION=e2e-next \
	PKTMETA_E2E_NEXT_RELEASE=$next_release \
	PKTMETA_E2E_PLUGIN_SHA256=$plugin_sha \
	PKTMETA_E2E_NEXT_PLUGIN_SHA256=$next_plugin_sha \
	PKTMETA_E2E_TOOL_IMAGE=pktmeta.test/e2e-tool:1 \
	run_step go test -count=1 -timeout 40m -v -run "${E2E_RUN:-.}" ./e2e/k8s/
