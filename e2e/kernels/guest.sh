#!/bin/bash
# PID 1 of a test-kernels guest, started by the initramfs's /init after it
# switched to the host's userland (9p, read-only, under a tmpfs overlay).
# It sets up what a node has (proc, sys, bpffs, a module loader for the
# guest kernel's modules), runs the test binaries run.sh built into the
# shared scratch directory, writes their go test -json streams there, and
# powers the guest off. Nothing here reaches the host but the scratch dir.
set -u

if [[ ${PKTMETA_GUEST_NATIVE:-} == 1 ]]; then
	# make test-kernels runs the same suite on the host's own kernel.
	scratch=$PKTMETA_GUEST_SCRATCH
else
	mount -t proc proc /proc
	scratch=$(sed -n 's/.*pktmeta.scratch=\([^ ]*\).*/\1/p' /proc/cmdline)
	mount -t sysfs sys /sys
	mount -t tmpfs -o mode=0755 run /run
	mount -t tmpfs -o mode=1777 tmp /tmp
	mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs shm /dev/shm
	mount -t bpf bpf /sys/fs/bpf
	mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
	mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
	# cgroup2 for tools that look for one; the tests do not depend on it.
	mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null

	mkdir -p "$scratch"
	mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 scratch "$scratch"
	mkdir -p /lib/modules
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 modules /lib/modules

	poweroff() {
		sync
		echo o >/proc/sysrq-trigger
		sleep 30
	}
	trap poweroff EXIT

	export PATH=/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
	export HOME=/root
	# The kernel loads modules on demand (veth, sch_ingress, cls_bpf, nf_tables,
	# conntrack) through modprobe, from the guest kernel's tree mounted above.
	echo /usr/sbin/modprobe >/proc/sys/kernel/modprobe
	ip link set lo up
	hostname "pktmeta-$(uname -r)"
fi

cd "$scratch" || exit 1
# run.sh's environment for the tests (PKTMETA_BIN, PKTMETA_CNI_BIN).
# shellcheck source=/dev/null
source ./env
# run.sh writes the suite as lines "name<TAB>binary<TAB>args...".
{
	echo "kernel $(uname -r)"
	echo "nproc $(nproc)"
} >guest.info
while IFS=$'\t' read -r name bin args; do
	[[ -z "$name" || "$name" == \#* ]] && continue
	echo "== $name"
	start=$(date +%s)
	args=${args//@RESULTS@/$scratch/results}
	if [[ $bin == *.test ]]; then
		# shellcheck disable=SC2086 # args is a list of flags
		(cd "$scratch/work" && "$scratch/bin/$bin" -test.v=test2json $args) 2>&1 |
			"$scratch/bin/test2json" -t -p "$name" >"$scratch/results/$name.json"
	else
		# A command (the benchmark): its output, and its exit status.
		# shellcheck disable=SC2086
		(cd "$scratch/work" && "$scratch/bin/$bin" $args) >"$scratch/results/$name.log" 2>&1
		echo $? >"$scratch/results/$name.exit"
	fi
	echo "$name $(( $(date +%s) - start ))s" >>guest.info
done <suite.tsv
[[ ${PKTMETA_GUEST_NATIVE:-} == 1 ]] || dmesg >dmesg.txt
echo done >>guest.info
