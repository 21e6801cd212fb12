#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Fetch the Debian guest kernel, its headers and a static busybox into a
# cache outside the repository, and print shell assignments describing them:
#
#   eval "$(tests/e2e/guest-assets.sh)"
#   -> GUEST_KABI GUEST_KREL GUEST_VMLINUZ GUEST_MODDIR GUEST_KDIR GUEST_BUSYBOX
#
# The ABI number moves with Debian's security updates, so it is resolved from
# the linux-image-amd64 metapackage rather than written down here.
# VGPU_GUEST_KREL=<release> picks another Debian kernel (e.g. a backport).
set -euo pipefail

CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
log() { echo "guest-assets: $*" >&2; }

if [[ -n ${VGPU_GUEST_KREL:-} ]]; then
	# e.g. VGPU_GUEST_KREL=6.12.95+deb12-amd64 (bookworm-backports)
	krel=$VGPU_GUEST_KREL
else
	krel=$(apt-cache depends linux-image-amd64 2>/dev/null |
		sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -1)
	if [[ -z $krel ]]; then
		log "running apt-get update to resolve linux-image-amd64"
		apt-get update >&2
		krel=$(apt-cache depends linux-image-amd64 |
			sed -n 's/^ *Depends: linux-image-\(.*\)$/\1/p' | head -1)
	fi
fi
[[ -n $krel ]] || { log "cannot resolve the kernel ABI"; exit 1; }
# The -common headers and the kbuild package are named differently in
# bookworm (linux-kbuild-6.1) and backports (linux-kbuild-6.12.95+deb12):
# take both from the arch headers' Depends.
hdeps=$(apt-cache depends "linux-headers-$krel" 2>/dev/null |
	sed -n 's/^ *Depends: \(linux-\(headers\|kbuild\)-[^ ]*\)$/\1/p')
common=$(grep -- '-common$' <<<"$hdeps" | head -1 || true)
kbuild=$(grep '^linux-kbuild-' <<<"$hdeps" | head -1 || true)
[[ -n $common && -n $kbuild ]] ||
	{ log "cannot resolve headers packages of linux-headers-$krel"; exit 1; }

dir=$CACHE/debian/$krel
root=$dir/root
if [[ ! -e $dir/.complete ]]; then
	log "downloading kernel $krel into $dir"
	rm -rf "$dir"
	mkdir -p "$dir/debs" "$root"
	# Sandbox user root: _apt may not write into $HOME's cache.
	(cd "$dir/debs" && apt-get download -o APT::Sandbox::User=root \
		"linux-image-$krel" "linux-headers-$krel" "$common" "$kbuild" \
		busybox-static >&2)
	for d in "$dir"/debs/*.deb; do
		dpkg -x "$d" "$root"
	done
	# The arch headers' Makefile includes the -common tree by absolute
	# path; point it at the unpacked copy.
	hdr=$root/usr/src/linux-headers-$krel
	sed -i "s|/usr/src/$common|$root/usr/src/$common|g" "$hdr/Makefile"
	# scripts/ and tools/ are symlinks into /usr/lib/linux-kbuild-*;
	# repoint absolute links into the unpacked root.
	find "$root/usr/src" -type l | while read -r l; do
		t=$(readlink "$l")
		if [[ $t == /* ]]; then
			ln -sfn "$root$t" "$l"
		fi
	done
	touch "$dir/.complete"
fi

echo "GUEST_KREL=$krel"
echo "GUEST_VMLINUZ=$root/boot/vmlinuz-$krel"
echo "GUEST_MODDIR=$root/lib/modules/$krel"
echo "GUEST_KDIR=$root/usr/src/linux-headers-$krel"
echo "GUEST_BUSYBOX=$root/bin/busybox"
