#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Packs what tests/cuda-apps/guest.sh needs on the GPU machine, which has no
# network, no apt and no cargo: the project's QEMU (tests/e2e/build-qemu.sh,
# stripped, with the shared libraries the GPU image lacks and the firmware
# it loads), the Debian guest kernel and its virtio modules, virtio_vgpu.ko,
# busybox, vgpu-client, the daemon and its CUDA worker, the guest CUDA
# library, the CUDA programs' sources and the scripts.
#
#   tests/cuda-apps/guest-pack.sh DEST      (e.g. /work/main/carry/guest)
#   then on the GPU machine: cd DEST && OUT=... ./guest.sh
#
# The binaries go into DEST/assets.tar.xz (QEMU alone is 26 MB; the folder
# must stay small to travel). Environment: QEMU, VGPU_BIN (directory with
# vgpu-vhost-user, vgpu-cuda-worker, libvgpucuda.so; default: cargo build
# --release of them).
set -euo pipefail

DEST=${1:?usage: guest-pack.sh DEST}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E=$REPO/tests/e2e
log() { echo "guest-pack: $*" >&2; }

QEMU=${QEMU:-$("$E2E/build-qemu.sh" | tail -1)}
eval "$("$E2E/guest-assets.sh")"
make -C "$REPO/guest-driver" module KDIR="$GUEST_KDIR" >&2
make -C "$REPO/guest-driver" client >&2
if [[ -z ${VGPU_BIN:-} ]]; then
	(cd "$REPO" && cargo build --release --bin vgpu-vhost-user --bin vgpu-cuda-worker \
		-p vgpu -p vgpu-cuda-guest >&2)
	VGPU_BIN=$REPO/target/release
fi

S=$(mktemp -d)
trap 'rm -rf "$S"' EXIT
mkdir -p "$S"/{qemu-lib,firmware,modules}
strip -o "$S/qemu-system-x86_64" "$QEMU"
# Every library QEMU links except glibc's own (the GPU machine's are newer).
ldd "$QEMU" | sed -n 's/^[[:space:]]*\([^ ]*\) => \(\/[^ ]*\) (0x.*/\1 \2/p' |
	while read -r name path; do
		case $name in libc.so.* | libm.so.* | ld-linux*) continue ;; esac
		cp -L "$path" "$S/qemu-lib/$name"
	done
# The firmware it asks for with -vga none (FIELD-NOTES: "A TCG guest runs on
# the GPU machine too").
cp /usr/share/seabios/bios-256k.bin "$S/firmware/"
for f in kvmvapic.bin linuxboot_dma.bin linuxboot.bin multiboot_dma.bin; do
	cp "/usr/share/qemu/$f" "$S/firmware/"
done
cp "$GUEST_VMLINUZ" "$S/vmlinuz"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci; do
	f=$(find "$GUEST_MODDIR" -name "$m.ko*" | head -1)
	[[ -n $f ]] || continue # built into the kernel
	case $f in
	*.ko) cp "$f" "$S/modules/$m.ko" ;;
	*.ko.xz) xz -dc "$f" >"$S/modules/$m.ko" ;;
	*.ko.zst) zstd -dcq "$f" >"$S/modules/$m.ko" ;;
	*.ko.gz) gzip -dc "$f" >"$S/modules/$m.ko" ;;
	esac
done
cp "$REPO/guest-driver/virtio_vgpu.ko" "$S/"
cp "$GUEST_BUSYBOX" "$S/busybox"
cp "$REPO/guest-driver/client/vgpu-client" "$S/"
for b in vgpu-vhost-user vgpu-cuda-worker libvgpucuda.so; do
	strip -o "$S/$b" "$VGPU_BIN/$b"
done
echo "$GUEST_KREL" >"$S/guest-kernel-release"

rm -rf "$DEST"
mkdir -p "$DEST/src" "$DEST/e2e"
tar -C "$S" -cJf "$DEST/assets.tar.xz" .
cp "$REPO/tests/cuda-apps/guest.sh" "$REPO/tests/cuda-apps/guest-init.sh" "$DEST/"
cp "$E2E/mkinitramfs.sh" "$E2E/guest-init.sh" "$DEST/e2e/"
cp "$REPO"/tests/cuda-apps/*.cu "$REPO"/tests/cuda-apps/*.c "$REPO"/tests/cuda-apps/*.h \
	"$E2E/cuda-probe.c" "$DEST/src/"
log "$(du -sh "$DEST" | cut -f1) in $DEST"
