#!/bin/bash
# prepare.sh NAME: makes one kernel of matrix.tsv bootable, once, in the
# cache: downloads its signed distribution packages (digests checked),
# unpacks the kernel image and modules, indexes the modules (depmod) and builds the
# initramfs that mounts the host's userland. Prints the cache directory.
# Idempotent: a complete directory (marked last) is reused as it is.
set -euo pipefail
shopt -s inherit_errexit

here=$(cd "$(dirname "$0")" && pwd)
cache=${PKTMETA_KERNEL_CACHE:-/var/cache/pktmeta-kernels}
name=$1

line=$(awk -F'\t' -v n="$name" '$1 == n' <(grep -v '^#' "$here/matrix.tsv"))
[[ -n "$line" ]] || { echo "prepare: no kernel $name in matrix.tsv" >&2; exit 1; }
IFS=$'\t' read -r _ archive version pools shas _ <<<"$line"
case "$archive" in
debian:*) base=http://deb.debian.org/debian ;;
ubuntu:*) base=http://archive.ubuntu.com/ubuntu ;;
*) echo "prepare: unknown archive $archive for kernel $name" >&2; exit 1 ;;
esac
IFS=, read -r -a pool <<<"$pools"
IFS=, read -r -a sha <<<"$shas"
((${#pool[@]} == ${#sha[@]})) || { echo "prepare: kernel $name has ${#pool[@]} packages but ${#sha[@]} digests" >&2; exit 1; }
# The directory is named after what goes into it: the kernel's version and
# this script with the initramfs's /init, so a change to either rebuilds.
dir=$cache/$name-$version-$(cat "$0" "$here/initramfs-init" | sha256sum | cut -c1-12)
if [[ -f $dir/complete ]]; then
	echo "$dir"
	exit 0
fi

mkdir -p "$cache"
debs=()
for i in "${!pool[@]}"; do
	deb=$cache/$(basename "${pool[$i]}")
	debs+=("$deb")
	echo "${sha[$i]}  $deb" | sha256sum -c --status 2>/dev/null && continue
	echo "prepare: downloading $(basename "$deb") from $archive" >&2
	if ! curl -fsS --retry 3 -m 1800 -o "$deb.part" "$base/${pool[$i]}"; then
		rm -f "$deb.part"
		echo "prepare: cannot download $base/${pool[$i]}: if the archive dropped this version, move the pin (matrix.tsv says how)" >&2
		exit 1
	fi
	if ! echo "${sha[$i]}  $deb.part" | sha256sum -c --status; then
		rm -f "$deb.part"
		echo "prepare: $(basename "$deb") does not have the pinned sha256 ${sha[$i]}" >&2
		exit 1
	fi
	mv "$deb.part" "$deb"
done

rm -rf "$dir.part" "$cache/$name-$version-"*
mkdir -p "$dir.part"
for deb in "${debs[@]}"; do
	dpkg-deb -x "$deb" "$dir.part/pkg"
done
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
	ko_name=$(basename "$ko")
	ko_name=${ko_name%.xz}
	ko_name=${ko_name%.zst}
	case "$ko" in
	*.xz) xz -dc "$ko" >"$init/mods/$ko_name" ;;
	*.zst) zstd -qdc "$ko" >"$init/mods/$ko_name" ;;
	*) cp "$ko" "$init/mods/$ko_name" ;;
	esac
	echo "$ko_name" >>"$init/modules.order"
done < <(modprobe -a -d "$dir.part" -S "$kver" --show-depends virtio_pci 9pnet_virtio 9p overlay |
	awk '$1 == "insmod" && !seen[$2]++')
(cd "$init" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$dir.part/initrd.gz"
rm -rf "$init"
touch "$dir.part/complete"
mv "$dir.part" "$dir"
echo "$dir"
