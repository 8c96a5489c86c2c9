#!/usr/bin/env bash
# Installs what building, testing and the demo need on a Debian 12 machine.
# Idempotent: installs only what is missing.
set -euo pipefail

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

for p in clang-19 llvm-19 libbpf-dev bpftool nftables conntrack iproute2 kmod util-linux; do
	pkg_installed "$p" || need_pkgs+=("$p")
done

if ((${#need_pkgs[@]})); then
	if [[ $(id -u) -ne 0 ]]; then
		echo "deps: need root to install: ${need_pkgs[*]}" >&2
		exit 1
	fi
	echo "deps: installing ${need_pkgs[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	# An old package index 404s on updated packages; refresh once and retry.
	apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null; }
fi

# bpffs: a node's datapath pins its state there. Tests and the demo mount
# private instances of their own; this is for using pktmeta on this host.
if [[ $(id -u) -eq 0 ]] && ! mountpoint -q /sys/fs/bpf; then
	mount -t bpf bpf /sys/fs/bpf
fi
