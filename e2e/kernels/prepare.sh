#!/bin/bash
# prepare.sh NAME: makes one kernel of matrix.tsv bootable, once, in the
# cache: downloads its signed Debian package (digest checked), unpacks the
# kernel image and modules, indexes the modules (depmod) and builds the
# initramfs that mounts the host's userland. Prints the cache directory.
# Idempotent: a complete directory (marked last) is reused as it is.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
cache=${PKTMETA_KERNEL_CACHE:-/var/cache/pktmeta-kernels}
name=$1

line=$(awk -F'\t' -v n="$name" '$1 == n' <(grep -v '^#' "$here/matrix.tsv"))
[[ -n "$line" ]] || { echo "prepare: no kernel $name in matrix.tsv" >&2; exit 1; }
IFS=$'\t' read -r _ suite version pool sha <<<"$line"
deb=$cache/$(basename "$pool")
dir=$cache/$name-$version
if [[ -f $dir/complete ]]; then
	echo "$dir"
	exit 0
fi

mkdir -p "$cache"
if ! echo "$sha  $deb" | sha256sum -c --status 2>/dev/null; then
	echo "prepare: downloading $suite's $(basename "$pool")" >&2
	curl -fsS --retry 3 -m 1800 -o "$deb.part" "http://deb.debian.org/debian/$pool"
	if ! echo "$sha  $deb.part" | sha256sum -c --status; then
		rm -f "$deb.part"
		echo "prepare: $(basename "$pool") does not have the pinned sha256 $sha" >&2
		exit 1
	fi
	mv "$deb.part" "$deb"
fi

rm -rf "$dir" "$dir.part"
mkdir -p "$dir.part"
dpkg-deb -x "$deb" "$dir.part/pkg"
# trixie ships modules under usr/lib (merged /usr), older suites under lib.
mods=$dir.part/pkg/lib/modules
[[ -d $mods ]] || mods=$dir.part/pkg/usr/lib/modules
kver=$(ls "$mods")
mv "$dir.part/pkg/boot/vmlinuz-$kver" "$dir.part/vmlinuz"
mv "$dir.part/pkg/boot/config-$kver" "$dir.part/config"
mkdir -p "$dir.part/lib/modules"
mv "$mods/$kver" "$dir.part/lib/modules/$kver"
rm -rf "$dir.part/pkg"
depmod -b "$dir.part" "$kver"
echo "$kver" >"$dir.part/kver"

# The initramfs: busybox, and the modules that reach the host's userland
# (virtio-pci, 9p, overlayfs), in dependency order, uncompressed (busybox's
# insmod does not decompress).
init=$dir.part/initramfs
mkdir -p "$init/bin" "$init/mods"
cp /bin/busybox "$init/bin/busybox"
cp "$here/initramfs-init" "$init/init"
chmod 0755 "$init/init"
: >"$init/modules.order"
while read -r _ ko; do
	base=$(basename "$ko")
	base=${base%.xz}
	base=${base%.zst}
	case "$ko" in
	*.xz) xz -dc "$ko" >"$init/mods/$base" ;;
	*.zst) zstd -qdc "$ko" >"$init/mods/$base" ;;
	*) cp "$ko" "$init/mods/$base" ;;
	esac
	echo "$base" >>"$init/modules.order"
done < <(modprobe -a -d "$dir.part" -S "$kver" --show-depends virtio_pci 9pnet_virtio 9p overlay |
	awk '$1 == "insmod" && !seen[$2]++')
(cd "$init" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$dir.part/initrd.gz"
rm -rf "$init"
touch "$dir.part/complete"
mv "$dir.part" "$dir"
echo "$dir"
