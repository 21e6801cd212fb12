#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Pack the e2e initramfs: busybox, the virtio modules of the Debian guest
# kernel, virtio_vgpu.ko, vgpu-client and guest-init.sh as /init, and any
# further files:
#
#   mkinitramfs.sh OUT.cpio.gz BUSYBOX MODDIR VGPU_KO CLIENT [DEST=SRC|DEST=@LINK]...
#
# DEST=SRC copies SRC to the absolute path DEST in the guest; DEST=@LINK makes
# DEST a symlink to LINK. Dynamically linked programs and libraries among
# them bring their shared libraries and the dynamic loader, as ldd on this
# machine resolves them, to the same paths in the guest (so the guest runs
# them on this machine's libc). libcuda.so*, libcudart.so* and libcublas*.so* are left out:
# in the guest they are the guest CUDA library, passed as files here.
# MODDIR is a kernel's module tree, or any directory with the virtio .ko files.
set -euo pipefail

out=$1 busybox=$2 moddir=$3 ko=$4 client=$5
shift 5
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
# Extra files, then the shared libraries of every ELF among them.
elfs=()
for spec in "$@"; do
	dest=${spec%%=*} src=${spec#*=}
	[[ $dest == /* && $dest != "$spec" ]] ||
		{ echo "mkinitramfs: want DEST=SRC, got $spec" >&2; exit 1; }
	mkdir -p "$stage$(dirname "$dest")"
	if [[ $src == @* ]]; then
		ln -sfn "${src#@}" "$stage$dest"
		continue
	fi
	cp -L "$src" "$stage$dest"
	chmod u+w "$stage$dest"
	if [[ $(head -c4 "$src" | od -An -c | tr -d ' ') == 177ELF ]]; then
		elfs+=("$src")
	fi
done
for f in ${elfs[@]+"${elfs[@]}"}; do
	# "name => /path (addr)" and the loader's "/lib64/ld-linux... (addr)";
	# "not found" (the CUDA library itself) and the vDSO have no path.
	# Not every ELF is a program or library (a CUDA cubin is an ELF too):
	# ldd fails on those, and they need nothing.
	{ ldd "$f" 2>/dev/null || true; } | sed -n 's/^[[:space:]]*\([^ ]* => \)\{0,1\}\(\/[^ ]*\) (0x.*/\2/p'
done | sort -u | while read -r lib; do
	case ${lib##*/} in libcuda.so* | libcudart.so* | libcublas.so* | libcublasLt.so*) continue ;; esac
	[[ -e $stage$lib ]] && continue
	mkdir -p "$stage$(dirname "$lib")"
	cp -L "$lib" "$stage$lib"
done
# No cpio tool on the host: busybox's applet packs newc archives. Without
# gzip (a bare image) the kernel takes the archive uncompressed.
zip=(gzip -9)
command -v gzip >/dev/null || zip=(cat)
(cd "$stage" && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) |
	"${zip[@]}" >"$out"
