#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Pack the e2e initramfs: busybox, the virtio modules of the Debian guest
# kernel, virtio_vgpu.ko, vgpu-client and guest-init.sh as /init.
#
#   mkinitramfs.sh OUT.cpio.gz BUSYBOX MODDIR VGPU_KO CLIENT
set -euo pipefail

out=$1 busybox=$2 moddir=$3 ko=$4 client=$5
here=$(cd "$(dirname "$0")" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

mkdir -p "$stage"/{bin,dev,proc,sys,tmp,lib/modules}
install -m755 "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m755 "$here/guest-init.sh" "$stage/init"
install -m755 "$client" "$stage/bin/vgpu-client"
install -m644 "$ko" "$stage/lib/modules/virtio_vgpu.ko"
# Order matters at load time (guest-init.sh); here we only collect them.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci; do
	f=$(find "$moddir" -name "$m.ko*" | head -1)
	if [[ -z $f ]]; then
		# Newer Debian kernels build the virtio core in.
		grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null && continue
		echo "mkinitramfs: $m not found in $moddir" >&2
		exit 1
	fi
	case $f in
	*.ko) install -m644 "$f" "$stage/lib/modules/$m.ko" ;;
	*.ko.xz) xz -dc "$f" >"$stage/lib/modules/$m.ko" ;;
	*.ko.zst) zstd -dcq "$f" >"$stage/lib/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$stage/lib/modules/$m.ko" ;;
	*) echo "mkinitramfs: unknown module format $f" >&2; exit 1 ;;
	esac
done
# No cpio tool on the host: busybox's applet packs newc archives.
(cd "$stage" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) |
	gzip -9 >"$out"
