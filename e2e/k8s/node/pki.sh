#!/usr/bin/env bash
# The e2e-k8s cluster's PKI, with openssl, under $1: a CA, the service
# account key pair, serving certificates for the API server and the
# kubelet, client certificates and kubeconfigs for every component and for
# the tests (admin). Keeps what exists, so a second up.sh reuses it.
# NODE_NAME and NODE_IP must be set. Valid for 30 days: a cluster lives
# for one test run.
set -euo pipefail
: "${1:?usage: pki.sh DIR}" "${NODE_NAME:?}" "${NODE_IP:?}"
mkdir -p "$1"
cd "$1"
d=$(pwd)
umask 077

[[ -f ca.key ]] || openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 30 \
	-subj /CN=pktmeta-e2e-ca 2>/dev/null
[[ -f sa.key ]] || {
	openssl genrsa -out sa.key 2048 2>/dev/null
	openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
}

# cert NAME SUBJECT [SAN] [EKU]
cert() {
	local n=$1 subj=$2 san=${3:-} eku=${4:-clientAuth}
	[[ -f $n.crt ]] && return 0
	openssl req -newkey rsa:2048 -nodes -keyout "$n.key" -out "$n.csr" -subj "$subj" 2>/dev/null
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=$eku"
		[[ -n $san ]] && echo "subjectAltName=$san"
	} >"$n.ext"
	openssl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$n.crt" -days 30 \
		-extfile "$n.ext" 2>/dev/null
	rm -f "$n.csr" "$n.ext"
}
cert apiserver /CN=kube-apiserver \
	"DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP" \
	serverAuth
cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
cert admin "/O=system:masters/CN=pktmeta-e2e-admin"
cert controller-manager /CN=system:kube-controller-manager
cert scheduler /CN=system:kube-scheduler
cert kube-proxy /CN=system:kube-proxy
cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
cert kubelet-serving "/CN=$NODE_NAME" "DNS:$NODE_NAME,DNS:localhost,IP:127.0.0.1,IP:$NODE_IP" serverAuth

# kubeconfig NAME CERT
kubeconfig() {
	cat >"$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://$NODE_IP:6443
    certificate-authority: $d/ca.crt
users:
- name: $1
  user:
    client-certificate: $d/$2.crt
    client-key: $d/$2.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $1}
current-context: e2e
EOF
}
for c in admin controller-manager scheduler kube-proxy kubelet; do
	kubeconfig "$c" "$c"
done
# Readable by the CA's owner only; certificates may be read by anyone.
chmod 0644 ./*.crt sa.pub
