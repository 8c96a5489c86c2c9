#!/usr/bin/env bash
# Stops everything up.sh started and puts the host back as up.sh found it
# ($RUN/host.env): pktmeta uninstalled from the node, every pod sandbox
# removed through the CRI (so CNI DEL runs), processes stopped, mounts,
# netns pins, cgroups, nftables tables, files and sysctls restored. Keeps
# the build cache ($E2E_CACHE) and the logs ($LOGS). Safe to run again, and
# after a failed or killed run:
#   e2e/k8s/node/down.sh
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
source "$here/env.sh"
E2E_WHO=down
repo=$(cd "$here/../../.." && pwd)

# up.sh writes host.env before it changes anything, and the last step
# here removes it: without it there is nothing of ours to undo.
if [[ ! -f $RUN/host.env ]]; then
	e2e_log "nothing to do: no cluster state in $E2E_STATE"
	exit 0
fi
KUBE_BIN=${KUBE_BIN:-$(ls -d "$E2E_CACHE"/bin/kubernetes-* 2>/dev/null | grep -v '\.tmp\.' | head -n1)}
CRICTL=${CRICTL:-$repo/bin/tools/crictl}
kubectl() { "$KUBE_BIN/kubectl" --request-timeout=20s "$@"; }

# stop NAME [SECONDS]: SIGTERM the recorded process, SIGKILL after SECONDS.
stop() {
	local n=$1 t=${2:-20} pid i
	[[ -f $PIDS/$n.pid ]] || return 0
	pid=$(cat "$PIDS/$n.pid")
	if kill -0 "$pid" 2>/dev/null; then
		kill -TERM "$pid"
		for ((i = 0; i < t * 5; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.2
		done
		if kill -0 "$pid" 2>/dev/null; then
			e2e_log "$n did not stop in ${t}s: SIGKILL"
			kill -KILL "$pid"
			sleep 0.5
		fi
		e2e_log "stopped $n (pid $pid)"
	fi
	rm -f "$PIDS/$n.pid"
}
hostenv() { [[ -f $RUN/host.env ]] && grep "^$1 " "$RUN/host.env" | cut -d' ' -f2-; }
created() { hostenv created | grep -qx "$1"; }

# ---- 1. Through the API while it still runs ---------------------------------
if [[ -x $KUBE_BIN/kubectl ]] && e2e_alive kube-apiserver && kubectl get --raw /readyz >/dev/null 2>&1; then
	# The DaemonSet first: with the kubelet still running, its agent
	# uninstalls pktmeta from the node as users would.
	if kubectl -n pktmeta-system get ds pktmeta >/dev/null 2>&1; then
		kubectl -n pktmeta-system delete ds pktmeta --wait --timeout=90s >/dev/null && e2e_log "deleted DaemonSet pktmeta"
	fi
	for ns in $(kubectl get ns -o name | cut -d/ -f2); do
		case $ns in default | kube-system | kube-public | kube-node-lease) ;;
		*) kubectl delete ns "$ns" --wait=false >/dev/null 2>&1 ;;
		esac
	done
	kubectl delete pods --all -A --grace-period=1 --wait --timeout=90s >/dev/null 2>&1 && e2e_log "deleted all pods"
fi

# ---- 2. The node: kubelet, kube-proxy, then every sandbox (CNI DEL) -------------
stop kubelet 30
stop kube-proxy 10
if [[ -x $KUBE_BIN/kube-proxy ]]; then
	"$KUBE_BIN/kube-proxy" --cleanup >/dev/null 2>&1 && e2e_log "kube-proxy --cleanup done"
fi
ids=()
if e2e_alive containerd && [[ -x $CRICTL ]]; then
	cri=("$CRICTL" -r "unix://$CTR_SOCK" -i "unix://$CTR_SOCK" -t 30s)
	mapfile -t ids < <(ctr -a "$CTR_SOCK" -n k8s.io containers ls -q 2>/dev/null)
	printf '%s\n' "${ids[@]}" >>"$RUN/container-ids"
	for s in $("${cri[@]}" pods -q 2>/dev/null); do
		"${cri[@]}" inspectp "$s" 2>/dev/null | sed -n 's/.*"path": "\(\/var\/run\/netns\/[^"]*\)".*/\1/p' | sort -u >>"$RUN/netns-paths"
		"${cri[@]}" stopp "$s" >/dev/null 2>&1
		"${cri[@]}" rmp -f "$s" >/dev/null 2>&1 && e2e_log "removed sandbox ${s:0:12}"
	done
fi

# ---- 3. Control plane and containerd --------------------------------------------
for ((i = ${#NODE_PROCESSES[@]} - 1; i >= 0; i--)); do
	stop "${NODE_PROCESSES[i]}" 20
done
# Shims of our containerd's CRI (they name its socket and the k8s.io
# namespace: Docker on the same socket uses "moby", and its containers are
# left alone) and container processes (in the /kubepods cgroups) outlive it.
for d in /proc/[0-9]*; do
	c=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || continue
	[[ $c == *containerd-shim-runc-v2\ * && $c == *"-namespace k8s.io "* && $c == *"-address $CTR_SOCK "* ]] || continue
	e2e_log "killing leftover shim ${d#/proc/}"
	kill -KILL "${d#/proc/}" 2>/dev/null
done
for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
	[[ -d $h ]] || continue
	while read -r f; do
		while read -r pid; do
			[[ -n $pid ]] || continue
			e2e_log "killing leftover container process $pid"
			kill -KILL "$pid" 2>/dev/null
		done <"$f"
	done < <(find "$h" -name cgroup.procs)
done
sleep 1

# ---- 4. Mounts, netns pins, cgroups -----------------------------------------------
# Everything mounted below the state directory (the kubelet's root dir, pod
# volumes, rootfs overlays, sandbox shm), deepest first.
for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$E2E_STATE/" | sort -r); do
	umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
done
if [[ -f $RUN/netns-paths ]]; then
	for n in $(sort -u "$RUN/netns-paths"); do
		[[ -e $n ]] || continue
		umount "$n" 2>/dev/null
		rm -f "$n" && e2e_log "removed $n"
	done
fi
for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
	[[ -d $h ]] || continue
	find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
	if [[ -d $h ]]; then e2e_log "could not remove cgroup $h"; fi
done

# ---- 5. pktmeta, if a test left it installed --------------------------------------
# The DaemonSet's deletion above uninstalls it; this covers an API server
# that was already gone, or an agent that never started. Pods are gone, so
# only files and pins are left (a plugin binary of another build than
# bin/pktmeta-agent's is left by it, and removed below as a file up.sh
# found missing).
if [[ -e /sys/fs/bpf/pktmeta || -e /opt/cni/bin/pktmeta ]] && [[ -x $repo/bin/pktmeta-agent ]]; then
	"$repo/bin/pktmeta-agent" uninstall --cni-conf-dir=/etc/cni/net.d --cni-bin-dir=/opt/cni/bin \
		--pin-path=/sys/fs/bpf/pktmeta --state-dir=/var/lib/pktmeta >/dev/null 2>&1 &&
		e2e_log "uninstalled a leftover pktmeta"
fi

# ---- 6. Files outside the state directory -------------------------------------------
rm -f "$CNI_CONFLIST"
for p in "${CNI_PLUGINS_NEEDED[@]}" pktmeta; do
	created "/opt/cni/bin/$p" && rm -f "/opt/cni/bin/$p"
done
for d in /etc/cni/net.d /opt/cni/bin /etc/cni /opt/cni; do
	created "$d" && rmdir "$d" 2>/dev/null && e2e_log "removed $d"
done
# containerd 1.6 puts shim sockets in /run/containerd/s/<sha256(socket/ns/id)>,
# libcni its cache in /var/lib/cni/results/<network>-<id>-<ifname>.
for id in "${ids[@]}"; do
	[[ -n $id ]] || continue
	h=$(printf '%s' "$CTR_SOCK/k8s.io/$id" | sha256sum | cut -d' ' -f1)
	rm -f "/run/containerd/s/$h"
	rm -f /var/lib/cni/results/"$CNI_NETWORK-$id"-* /var/lib/cni/results/cni-loopback-"$id"-*
done
rm -f "$CTR_SOCK" "$CTR_SOCK.ttrpc"
for d in /run/containerd/s /run/containerd /var/lib/cni/results /var/lib/cni/networks /var/lib/cni; do
	base=$d
	[[ $d == */s || $d == */results || $d == */networks ]] && base=${d%/*}
	created "$base" && rmdir "$d" 2>/dev/null
done
for d in /run/pktmeta /var/lib/pktmeta /sys/fs/bpf/pktmeta /var/lib/kubelet /etc/kubernetes \
	/var/log/containers /var/log/pods /usr/libexec/kubernetes; do
	[[ -e $d ]] && created "$d" && rm -rf "$d" && e2e_log "removed $d"
done
# nftables tables that were not there before (kube-proxy's, portmap's).
if [[ -f $RUN/host.env ]]; then
	while read -r fam name; do
		[[ -n $name ]] || continue
		hostenv nft-table-existed | grep -qx "table $fam $name" && continue
		nft delete table "$fam" "$name" 2>/dev/null && e2e_log "removed nftables table $fam $name"
	done < <(nft list tables 2>/dev/null | awk '{print $2, $3}')
fi

# ---- 7. Host settings ------------------------------------------------------------------
if [[ -f $RUN/host.env ]]; then
	while read -r k s v; do
		[[ $k == sysctl ]] || continue
		cur=$(cat "/proc/sys/$s")
		[[ $cur == "$v" ]] && continue
		echo "$v" >"/proc/sys/$s" && e2e_log "restored $s: $cur -> $v"
	done <"$RUN/host.env"
	case $(hostenv bpffs-propagation) in
	none)
		findmnt -n -t bpf /sys/fs/bpf >/dev/null && umount /sys/fs/bpf && e2e_log "unmounted the bpffs up.sh mounted"
		;;
	private)
		if [[ $(findmnt -n -t bpf -o PROPAGATION /sys/fs/bpf) != private ]]; then
			mount --make-private /sys/fs/bpf && e2e_log "/sys/fs/bpf private again"
		fi
		;;
	esac
	if [[ $(hostenv netns-mount) == none ]] && findmnt -n /run/netns >/dev/null; then
		if ! awk '{print $5}' /proc/self/mountinfo | grep -q '^/run/netns/'; then
			umount /run/netns && e2e_log "removed the /run/netns bind mount"
		else
			e2e_log "left /run/netns mounted: it holds network namespaces"
		fi
	fi
	created /run/netns && rmdir /run/netns 2>/dev/null
fi

# ---- 8. State ---------------------------------------------------------------------------
find "$E2E_STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} + 2>/dev/null
e2e_log "done (logs kept in $LOGS)"
