#!/bin/bash
# make test-kernels: boots each kernel of matrix.tsv under qemu (TCG: no KVM
# here) with the host's userland as its root, runs the kernel suite
# (suite.tsv) inside, and prints one line per kernel: version, the attach
# mode auto chose, tests passed/failed/skipped, and why each skip skipped.
# The host's own kernel runs the same suite natively, first.
#
#   KERNELS="6.1 5.10"   which kernels of the matrix (default: all of them;
#                        KERNELS= runs the host's alone)
#   KERNEL_RUN=regexp    only the suite entries whose name matches
#   KERNEL_KEEP=1        keep the scratch directory (results, dmesg, logs)
#   KERNEL_SUITE=file    another suite (make bench: e2e/kernels/bench.tsv)
#   KERNEL_NATIVE=0      skip the host's own kernel
#   KERNEL_OUT=dir       copy each kernel's results/*.out.json there as
#                        kernel-NAME-*.json (make bench's figures)
#
# Fails when any kernel fails a test, does not finish, or the suite ran
# nothing.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
log() { printf '%s test-kernels: %s\n' "$(date +%T)" "$*" >&2; }
die() {
	log "FATAL: $*"
	exit 1
}
[[ $EUID -eq 0 ]] || die "run as root: the suite creates netns, veths and BPF programs"
# The guests see the host's / through 9p but mount a tmpfs of their own on
# /tmp (guest.sh): a checkout under /tmp is invisible to them, and their
# tests would fail on missing files rather than on the kernel.
case $(realpath "$repo")/ in
/tmp/*) die "$repo is under /tmp, which the guests cover with their own tmpfs: run from a checkout elsewhere (e.g. /var/tmp)" ;;
esac

need=()
for c in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio xz:xz-utils curl:curl; do
	command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if ((${#need[@]})); then
	log "apt-get install ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi

kernels=${KERNELS-$(grep -v '^#' "$here/matrix.tsv" | cut -f1 | xargs)}
# Each kernel's directory in the cache first: a download or a bad digest
# fails here, before anything is built.
declare -A kdir
for k in $kernels; do
	kdir[$k]=$("$here/prepare.sh" "$k")
done

scratch=$(mktemp -d /var/tmp/pktmeta-kernels.XXXXXX)
qemu_pid=
cleanup() {
	if [[ -n $qemu_pid ]]; then
		# qemu serves the scratch dir: gone before it is removed.
		kill "$qemu_pid" 2>/dev/null
		wait "$qemu_pid" 2>/dev/null
	fi
	if [[ ${KERNEL_KEEP:-} == 1 ]]; then
		log "kept $scratch"
	else
		rm -rf "$scratch"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The suite's test binaries, built once for every kernel. The guest runs
# them from the scratch dir with the host's CNI plugins and pktmeta builds.
log "building the suite"
mkdir -p "$scratch/bin"
suite=${KERNEL_SUITE:-$here/suite.tsv}
grep -v '^#' "$suite" | cut -f2,3 | sort -u | while IFS=$'\t' read -r bin pkg; do
	[[ -f $scratch/bin/$bin ]] && continue
	case "$bin" in
	*.test) go test -c -o "$scratch/bin/$bin" "$pkg" ;;
	*) go build -o "$scratch/bin/$bin" "$pkg" ;;
	esac
done
go build -o "$scratch/bin/test2json" cmd/test2json
go build -o "$scratch/bin/summary" ./e2e/kernels/summary
# The binaries under test, from this tree: never a stale bin/.
for cmd in pktmeta pktmetactl pktmeta-agent pktmeta-demo; do
	go build -trimpath -o "$scratch/bin/$cmd" "./cmd/$cmd"
done
[[ -x $repo/bin/cni/ptp ]] || die "no CNI reference plugins in bin/cni: run make cni-plugins (make test-kernels does)"

# The suite.tsv lines a kernel runs (its matrix entry's pick, and
# KERNEL_RUN's), as guest.sh reads them.
suite_for() {
	local pick=.
	[[ $1 == host ]] || pick=$(grep -v '^#' "$here/matrix.tsv" | awk -F'\t' -v n="$1" '$1 == n { print $6 }')
	grep -v '^#' "$suite" |
		awk -F'\t' -v pick="${pick:-.}" -v re="${KERNEL_RUN:-.}" '$1 ~ pick && $1 ~ re { print $1 "\t" $2 "\t" $4 }'
}

# One guest's run directory: suite, results, the dmesg, a work dir.
newrun() {
	local run=$scratch/$1
	mkdir -p "$run/results" "$run/work"
	ln -s ../bin "$run/bin"
	suite_for "$1" >"$run/suite.tsv"
	printf 'export PKTMETA_BIN=%q PKTMETA_CNI_BIN=%q\n' "$scratch/bin" "$repo/bin/cni" >"$run/env"
	echo "$run"
}

status=0
lines=()

if [[ ${KERNEL_NATIVE:-1} != 0 ]]; then
	run=$(newrun host)
	log "host kernel $(uname -r), natively"
	PKTMETA_GUEST_SCRATCH=$run PKTMETA_GUEST_NATIVE=1 timeout --kill-after=10 "${KERNEL_TIMEOUT:-1740}" \
		"$here/guest.sh" >"$run/console.log" 2>&1 || true
	if line=$("$scratch/bin/summary" -kernel "host $(uname -r)" "$run"); then
		lines+=("$line")
	else
		lines+=("$line")
		status=1
	fi
fi

for k in $kernels; do
	d=${kdir[$k]}
	run=$(newrun "$k")
	log "kernel $k ($(cat "$d/kver")) under qemu"
	start=$(date +%s)
	# TCG, one thread per vCPU: two vCPUs on a two-core host. The guest
	# powers itself off; the timeout is for a guest that hangs (the slowest
	# took 12 minutes here; suite.tsv's test timeouts add up to less,
	# so a hung test still dumps its goroutines first). qemu must not hold
	# the host lock's descriptor: a killed run would leave it held.
	timeout --kill-after=10 "${KERNEL_TIMEOUT:-1740}" qemu-system-x86_64 \
		-machine q35 -accel tcg,thread=multi -cpu max -smp 2 -m 4096 \
		-nographic -no-reboot -nic none \
		-kernel "$d/vmlinuz" -initrd "$d/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet loglevel=4 pktmeta.guest=$here/guest.sh pktmeta.scratch=$run" \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
		-virtfs "local,path=$d/lib/modules,mount_tag=modules,security_model=none,readonly=on" \
		-virtfs "local,path=$run,mount_tag=scratch,security_model=none" \
		</dev/null >"$run/console.log" 2>&1 9>&- &
	qemu_pid=$!
	wait "$qemu_pid" || true
	qemu_pid=
	echo "wall $(( $(date +%s) - start ))s" >>"$run/guest.info"
	if [[ -n ${KERNEL_OUT:-} ]]; then
		for f in "$run"/results/*.out.json; do
			[[ -f $f ]] && cp "$f" "$KERNEL_OUT/kernel-$k-$(basename "$f" .out.json).json"
		done
		for f in "$run"/results/*.log; do
			[[ -f $f ]] && { echo "== kernel $k: $(basename "$f" .log)"; cat "$f"; }
		done
	fi
	expect=$(grep -v '^#' "$here/matrix.tsv" | awk -F'\t' -v n="$k" '$1 == n { print $7 }')
	if [[ -n ${KERNEL_SUITE:-} ]]; then
		expect= # another suite (the bench) does not report features
	fi
	if line=$("$scratch/bin/summary" -kernel "$k $(cat "$d/kver")" -expect "$expect" "$run"); then
		lines+=("$line")
	else
		lines+=("$line")
		status=1
		tail -n 40 "$run/console.log" >&2
	fi
done

echo
for l in "${lines[@]}"; do echo "$l"; done
exit $status
