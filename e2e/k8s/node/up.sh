#!/usr/bin/env bash
# Brings up a single-node Kubernetes cluster on this machine, as host
# processes: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# Debian's containerd, kubelet and kube-proxy (nftables mode). run.sh calls
# it with the host lock held; down.sh undoes all of it, including every host
# setting changed here (recorded first in $RUN/host.env).
#
#   etcd            127.0.0.1:23790, data in $E2E_STATE/etcd
#   kube-apiserver  $NODE_IP:6443, Service CIDR 10.96.0.0/16
#   containerd      root and state under $E2E_STATE, socket /run/containerd/
#                   containerd.sock (the DaemonSet mounts /run/containerd)
#   kubelet         root dir $E2E_STATE/kubelet, node "pktmeta-e2e"
#   CNI             ptp + host-local (10.244.0.0/24) + portmap, in
#                   /etc/cni/net.d/10-e2e-k8s.conflist; plugins /opt/cni/bin
#
# Environment: KUBE_BIN, ETCD_BIN (build.sh), CNI_BIN (make cni-plugins),
# CRICTL, and IMAGES: docker-archive tarballs to import (space-separated).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=env.sh
source "$here/env.sh"
E2E_WHO=up
: "${KUBE_BIN:?}" "${ETCD_BIN:?}" "${CNI_BIN:?}" "${CRICTL:?}"
export PATH=$KUBE_BIN:$PATH

mkdir -p "$RUN" "$PIDS" "$LOGS" "$E2E_STATE/etc"

for b in "$ETCD_BIN/etcd" "$KUBE_BIN"/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kube-proxy,kubectl} "$CRICTL"; do
	[[ -x $b ]] || e2e_die "missing $b"
done
for p in "${CNI_PLUGINS_NEEDED[@]}"; do
	[[ -x $CNI_BIN/$p ]] || e2e_die "missing CNI plugin $CNI_BIN/$p"
done
for b in containerd containerd-shim-runc-v2 ctr runc nft openssl curl findmnt; do
	command -v "$b" >/dev/null || e2e_die "missing $b (make e2e-k8s installs it with apt: hack/deps.sh)"
done

# The node address: the source address of the default route (no packet is
# sent). Pods reach the API server there, through the kubernetes Service.
NODE_IP=$(ip -4 -o route get 1.0.0.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
[[ -n $NODE_IP ]] || e2e_die "no IPv4 default route: the node needs an address pods can reach the API server at"
echo "$NODE_IP" >"$RUN/node-ip"

# start NAME CMD...: CMD in its own session, output in $LOGS/NAME.log. It
# inherits the host lock's descriptor, so the lock stays held while any
# process of the cluster lives, even if run.sh is killed.
start() {
	local n=$1
	shift
	setsid "$@" >>"$LOGS/$n.log" 2>&1 </dev/null &
	echo $! >"$PIDS/$n.pid"
	e2e_log "started $n (pid $!)"
}
# put FILE: stdin to FILE, only when it differs (kube-proxy exits when its
# config file is rewritten, even with the same content).
put() {
	local tmp
	tmp=$(mktemp "$1.XXXXXX")
	cat >"$tmp"
	if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else
		chmod 0644 "$tmp"
		mv "$tmp" "$1"
	fi
}
# wait_for WHAT SECONDS CMD...: poll CMD until it succeeds; on timeout show
# the end of the logs of the process named like WHAT's first word.
wait_for() {
	local what=$1 t=$2
	shift 2
	local end=$((SECONDS + t))
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= end)); then
			local n=${what%% *}
			[[ -f $LOGS/$n.log ]] && tail -n 30 "$LOGS/$n.log" >&2
			e2e_die "timed out after ${t}s waiting for $what"
		fi
		sleep 1
	done
	e2e_log "$what: ok"
}

# ---- Host state down.sh restores ------------------------------------------
# Written once, before anything changes, so that a second up.sh (or one
# after a failed start) does not record our own changes as the original.
if [[ ! -f $RUN/host.env ]]; then
	{
		# kubelet sets the first four; ptp turns on forwarding.
		for s in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops \
			kernel/keys/root_maxkeys kernel/keys/root_maxbytes net/ipv4/ip_forward \
			net/ipv4/conf/all/forwarding net/ipv6/conf/all/forwarding; do
			[[ -e /proc/sys/$s ]] && echo "sysctl $s $(cat "/proc/sys/$s")"
		done
		for d in /etc/cni /etc/cni/net.d /opt/cni /opt/cni/bin /run/containerd /var/lib/cni \
			/run/pktmeta /var/lib/pktmeta /run/netns /var/lib/kubelet /sys/fs/bpf/pktmeta \
			/etc/kubernetes /var/log/containers /var/log/pods /usr/libexec/kubernetes; do
			[[ -e $d ]] || echo "created $d"
		done
		# pktmeta's too: the agent installs it, and an uninstall that could
		# not run (an agent that never started) leaves it behind.
		for p in "${CNI_PLUGINS_NEEDED[@]}" pktmeta; do
			[[ -e /opt/cni/bin/$p ]] || echo "created /opt/cni/bin/$p"
		done
		if findmnt -n -t bpf /sys/fs/bpf >/dev/null; then
			echo "bpffs-propagation $(findmnt -n -t bpf -o PROPAGATION /sys/fs/bpf)"
		else
			echo "bpffs-propagation none"
		fi
		if findmnt -n /run/netns >/dev/null; then echo "netns-mount existed"; else echo "netns-mount none"; fi
		nft list tables 2>/dev/null | sed 's/^/nft-table-existed /'
	} >"$RUN/host.env.tmp"
	mv "$RUN/host.env.tmp" "$RUN/host.env"
	e2e_log "saved host state in $RUN/host.env"
fi

# ---- PKI -------------------------------------------------------------------
NODE_NAME=$NODE_NAME NODE_IP=$NODE_IP "$here/pki.sh" "$PKI"

# ---- Control plane -----------------------------------------------------------
e2e_alive etcd || start etcd "$ETCD_BIN/etcd" --name e2e --data-dir "$E2E_STATE/etcd" \
	--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
	--listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
	--initial-cluster e2e=http://127.0.0.1:23800 --listen-metrics-urls "" --log-level warn
wait_for etcd 60 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

e2e_alive kube-apiserver || start kube-apiserver "$KUBE_BIN/kube-apiserver" \
	--etcd-servers="http://127.0.0.1:$ETCD_PORT" \
	--advertise-address="$NODE_IP" --bind-address="$NODE_IP" --secure-port=6443 \
	--service-cluster-ip-range="$SVC_CIDR" \
	--client-ca-file="$PKI/ca.crt" \
	--tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
	--kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
	--kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
	--kubelet-certificate-authority="$PKI/ca.crt" \
	--kubelet-preferred-address-types=InternalIP \
	--service-account-issuer=https://kubernetes.default.svc.cluster.local \
	--service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
	--authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
	--allow-privileged=true --profiling=false --v=1
wait_for "kube-apiserver /readyz" 180 kubectl get --raw /readyz

e2e_alive kube-controller-manager || start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
	--kubeconfig="$PKI/controller-manager.kubeconfig" \
	--authentication-kubeconfig="$PKI/controller-manager.kubeconfig" \
	--authorization-kubeconfig="$PKI/controller-manager.kubeconfig" \
	--bind-address=127.0.0.1 --leader-elect=false \
	--cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
	--root-ca-file="$PKI/ca.crt" --service-account-private-key-file="$PKI/sa.key" \
	--use-service-account-credentials=true \
	--service-cluster-ip-range="$SVC_CIDR" --cluster-cidr="$CLUSTER_CIDR" --allocate-node-cidrs=false \
	--flex-volume-plugin-dir="$E2E_STATE/kcm-flexvolume" \
	--profiling=false --v=1
e2e_alive kube-scheduler || start kube-scheduler "$KUBE_BIN/kube-scheduler" \
	--kubeconfig="$PKI/scheduler.kubeconfig" \
	--authentication-kubeconfig="$PKI/scheduler.kubeconfig" \
	--authorization-kubeconfig="$PKI/scheduler.kubeconfig" \
	--bind-address=127.0.0.1 --leader-elect=false --profiling=false --v=1
wait_for "kube-controller-manager /healthz" 120 curl -fsSk https://127.0.0.1:10257/healthz
wait_for "kube-scheduler /healthz" 120 curl -fsSk https://127.0.0.1:10259/healthz

# ---- Mounts the DaemonSet's volumes need --------------------------------------
# containerd refuses a Bidirectional mount from a source that is not a
# shared mount, and a HostToContainer one from a private mount; / is private
# on hosts without systemd. bpffs must be shared (the agent's init container
# mounts it Bidirectional), and /run/netns a shared mount of its own, as
# `ip netns add` makes it.
# Where nothing mounted bpffs yet, mount it (down.sh unmounts it again).
findmnt -n -t bpf /sys/fs/bpf >/dev/null || mount -t bpf bpf /sys/fs/bpf
[[ $(findmnt -n -o PROPAGATION /sys/fs/bpf) == shared ]] || mount --make-shared /sys/fs/bpf
mkdir -p /run/netns
findmnt -n /run/netns >/dev/null || mount --bind /run/netns /run/netns
[[ $(findmnt -n -o PROPAGATION /run/netns) == shared ]] || mount --make-rshared /run/netns

# ---- CNI ---------------------------------------------------------------------
mkdir -p /opt/cni/bin /etc/cni/net.d "$E2E_STATE/ipam"
for p in "${CNI_PLUGINS_NEEDED[@]}"; do
	cmp -s "$CNI_BIN/$p" "/opt/cni/bin/$p" 2>/dev/null || install -m 0755 "$CNI_BIN/$p" /opt/cni/bin/
done
# Another conflist would compete with ours (containerd takes the first).
for f in /etc/cni/net.d/*.conf /etc/cni/net.d/*.conflist /etc/cni/net.d/*.json; do
	[[ -e $f && $f != "$CNI_CONFLIST" ]] && e2e_die "$f exists: this node must be the only CNI config here (remove it, or run on a machine without another CNI)"
done
# Written as a primary CNI writes it; the tests compare it byte for byte
# after pktmeta's uninstall.
put "$CNI_CONFLIST" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "$CNI_NETWORK",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "dataDir": "$E2E_STATE/ipam",
        "ranges": [[{"subnet": "$POD_SUBNET"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "backend": "nftables", "capabilities": {"portMappings": true}}
  ]
}
EOF

# ---- containerd ---------------------------------------------------------------
# The overlay snapshotter where the state directory's filesystem allows it.
snap=overlayfs
probe=$E2E_STATE/overlay-probe
mkdir -p "$probe"/{l,u,w,m}
if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
	umount "$probe/m"
else
	snap=native
fi
rm -rf "$probe"
mkdir -p "$E2E_STATE/containerd" /run/containerd
put "$E2E_STATE/etc/containerd.toml" <<EOF
# make e2e-k8s's containerd 1.6: root and state in $E2E_STATE, the stock
# socket and netns directory (the DaemonSet mounts them).
version = 2
root = "$E2E_STATE/containerd/root"
state = "$E2E_STATE/containerd/state"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]
[grpc]
  address = "$CTR_SOCK"
[debug]
  address = ""
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$E2E_STATE/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    # No CAP_SYS_RESOURCE in some sandboxes: lowering OOM scores fails.
    restrict_oom_score_adj = true
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/opt/cni/bin"
      conf_dir = "/etc/cni/net.d"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "$snap"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          Root = "$E2E_STATE/containerd/runc"
          SystemdCgroup = false
EOF
e2e_alive containerd || start containerd containerd --config "$E2E_STATE/etc/containerd.toml"
wait_for "containerd" 60 ctr -a "$CTR_SOCK" version

have=$(ctr -a "$CTR_SOCK" -n k8s.io images ls -q)
for tar in ${IMAGES:-}; do
	ctr -a "$CTR_SOCK" -n k8s.io images import --all-platforms "$tar" >/dev/null
	e2e_log "imported $(basename "$tar")"
done
have=$(ctr -a "$CTR_SOCK" -n k8s.io images ls -q)
grep -qx "$PAUSE_IMAGE" <<<"$have" || e2e_die "the sandbox image $PAUSE_IMAGE was not imported"

# ---- kubelet ------------------------------------------------------------------
mkdir -p "$E2E_STATE/kubelet" "$E2E_STATE/pod-logs"
cgroup_v1=false
[[ $(stat -fc %T /sys/fs/cgroup) == cgroup2fs ]] || cgroup_v1=true
put "$E2E_STATE/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
containerRuntimeEndpoint: unix://$CTR_SOCK
cgroupDriver: cgroupfs
# Kubernetes 1.36 refuses cgroup v1 unless told otherwise.
failCgroupV1: $( [[ $cgroup_v1 == true ]] && echo false || echo true )
failSwapOn: false
# Without CAP_SYS_RESOURCE the kubelet cannot lower its own score.
oomScoreAdj: 0
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
podLogsDir: $E2E_STATE/pod-logs
volumePluginDir: $E2E_STATE/kubelet/volume-plugins
registerNode: true
serializeImagePulls: false
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
EOF
e2e_alive kubelet || start kubelet "$KUBE_BIN/kubelet" --config="$E2E_STATE/etc/kubelet.yaml" \
	--kubeconfig="$PKI/kubelet.kubeconfig" --root-dir="$E2E_STATE/kubelet" --cert-dir="$E2E_STATE/kubelet/pki" \
	--hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
wait_for "kubelet /healthz" 120 curl -fsS http://127.0.0.1:10248/healthz

# ---- kube-proxy ---------------------------------------------------------------
put "$E2E_STATE/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $PKI/kube-proxy.kubeconfig}
mode: nftables
hostnameOverride: $NODE_NAME
clusterCIDR: $CLUSTER_CIDR
bindAddress: $NODE_IP
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
nodePortAddresses: ["$NODE_IP/32"]
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}
EOF
e2e_alive kube-proxy || start kube-proxy "$KUBE_BIN/kube-proxy" --config="$E2E_STATE/etc/kube-proxy.yaml" --v=1
wait_for "kube-proxy /healthz" 120 curl -fsS http://127.0.0.1:10256/healthz

wait_for "node $NODE_NAME Ready" 180 kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
wait_for "default service account" 60 kubectl -n default get serviceaccount default
e2e_log "cluster up: KUBECONFIG=$KUBECONFIG"
