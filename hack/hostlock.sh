#!/usr/bin/env bash
# hostlock.sh WHAT CMD...: runs CMD holding the host lock, or refuses at
# once, naming who holds it. make test and make e2e-k8s both use
# host-global resources (/run/containerd, /etc/cni/net.d, /opt/cni/bin,
# /var/lib/cni, /var/lib/pktmeta, ports 6443/10250/9964, sysctls), so they
# must never run at the same time.
#
# The lock is an flock on $PKTMETA_HOST_LOCK (default /run/lock/pktmeta-host.lock)
# held through descriptor 9, which CMD's children inherit: a cluster that
# make e2e-k8s started keeps the lock while any of its processes lives, even
# if the run itself was killed. When the run that took the lock is gone but
# its cluster still holds it, the cluster is a leftover: it is torn down
# (e2e/k8s/node/down.sh, which restores the host) and the lock taken. Nested
# calls (make test running make e2e-k8s) see PKTMETA_HOST_LOCKED and just run.
set -euo pipefail
what=${1:?usage: hostlock.sh WHAT CMD...}
shift
lock=${PKTMETA_HOST_LOCK:-/run/lock/pktmeta-host.lock}

if [[ ${PKTMETA_HOST_LOCKED:-} == "$lock" ]]; then
	exec "$@"
fi
mkdir -p "$(dirname "$lock")"
exec 9<>"$lock"
if ! flock -n 9; then
	owner=$(cat "$lock.owner" 2>/dev/null || echo "unknown")
	pid=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' "$lock.owner" 2>/dev/null || true)
	if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
		echo "$what: $owner is gone but its cluster still holds the host: tearing it down" >&2
		"$(cd "$(dirname "$0")/.." && pwd)/e2e/k8s/node/down.sh" >&2 || true
	fi
	if ! flock -n 9; then
		echo "$what: the host's shared resources are in use by: $owner" >&2
		echo "$what: make test and make e2e-k8s cannot run at the same time on one machine: wait for it to end" >&2
		exit 1
	fi
fi
printf '%s (pid %d, since %s, in %s)\n' "$what" $$ "$(date -u +%FT%TZ)" "$PWD" >"$lock.owner"
export PKTMETA_HOST_LOCKED=$lock
# exec: the lock's descriptor stays open in CMD, the owner's pid is CMD's,
# and a signal meant for this run reaches CMD.
exec "$@"
