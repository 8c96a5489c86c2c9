# Sourced by run.sh, up.sh and down.sh: where the e2e-k8s node keeps its
# state, and the names and addresses it uses. Everything here is host-global
# (ports 6443, 10250, 10256, 9964, /etc/cni/net.d, /opt/cni/bin,
# /run/containerd, /sys/fs/bpf/pktmeta, /kubepods cgroups, sysctls), which
# is why make test and make e2e-k8s take the host lock (hack/hostlock.sh)
# and never run at the same time.

# Built binaries and Go caches: survive between runs (build.sh).
E2E_CACHE=${PKTMETA_E2E_CACHE:-/var/cache/pktmeta-e2e}
# One cluster's state: removed by down.sh.
E2E_STATE=${PKTMETA_E2E_STATE:-/var/tmp/pktmeta-e2e-k8s}

PKI=$E2E_STATE/pki
RUN=$E2E_STATE/run     # host state saved for down.sh
PIDS=$E2E_STATE/pids
LOGS=$E2E_STATE/logs
export KUBECONFIG=$PKI/admin.kubeconfig

NODE_NAME=pktmeta-e2e
CTR_SOCK=/run/containerd/containerd.sock
POD_SUBNET=10.244.0.0/24
CLUSTER_CIDR=10.244.0.0/16
SVC_CIDR=10.96.0.0/16
ETCD_PORT=23790
# The node's CNI config, as a primary CNI would write it.
CNI_CONFLIST=/etc/cni/net.d/10-e2e-k8s.conflist
CNI_NETWORK=e2e-k8s
CNI_PLUGINS_NEEDED=(ptp host-local portmap loopback)

# Images the node imports (never pulled: nothing is reachable).
PAUSE_IMAGE=pktmeta.test/pause:1

# Processes the node runs, in start order; down.sh stops them in reverse.
NODE_PROCESSES=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy)

e2e_log() { printf '%s %s: %s\n' "$(date +%T)" "${E2E_WHO:-e2e-k8s}" "$*" >&2; }
e2e_die() {
	e2e_log "FATAL: $*"
	exit 1
}
# e2e_alive NAME: the process recorded for NAME still runs.
e2e_alive() { [[ -f $PIDS/$1.pid ]] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
