#!/usr/bin/env bash
# next-release.sh SRC DST VERSION TAR: builds, from a copy of the tree at
# SRC, the image a rolling update moves to: the same code with another
# version string and the next datapath release. A rolling update between
# two builds of one release is refused by design (internal/datapath: one
# pktmeta build per node), and one with an identical BPF object moves no
# program, so the e2e test needs a real next release: the copy's BPF
# object gains one read-only variable, is regenerated with the pinned
# clang, and Release and releaseObject are bumped as a maintainer would
# (TestReleaseNamesTheObject checks the pair). Prints the new release.
set -euo pipefail
src=${1:?usage: next-release.sh SRC DST VERSION TAR}
dst=${2:?}
version=${3:?}
tar=${4:?}

rm -rf "$dst"
mkdir -p "$dst"
(cd "$src" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$dst"
cd "$dst"

release=$(sed -n 's/^const Release = \([0-9][0-9]*\)$/\1/p' internal/datapath/release.go)
[[ -n $release ]] || { echo "next-release: no 'const Release = N' in internal/datapath/release.go" >&2; exit 1; }
next=$((release + 1))
cat >>bpf/pktmeta.c <<EOF

/* make e2e-k8s: this copy is the next release's datapath. */
volatile const __u32 pktmeta_e2e_release = $next;
EOF
go generate ./internal/datapath/ >&2
sum=$(sha256sum internal/datapath/bpf_bpfel.o | cut -d' ' -f1)
sed -i -e "s/^const Release = $release\$/const Release = $next/" \
	-e "s/^const releaseObject = \".*\"\$/const releaseObject = \"$sum\"/" internal/datapath/release.go
go test -count=1 -run 'TestReleaseNamesTheObject' ./internal/datapath/ >&2
make --no-print-directory image IMAGE_VERSION="$version" IMAGE_TAR="$tar" BIN="$dst/bin" >&2
echo "$next"
