#!/bin/bash
# SPDX-License-Identifier: GPL-2.0
#
# Fetch the Debian guest kernel, its headers and a static busybox into a
# cache outside the repository, and print shell assignments describing them:
#
#   eval "$(tests/e2e/guest-assets.sh)"
#   -> GUEST_KABI GUEST_KREL GUEST_VMLINUZ GUEST_MODDIR GUEST_KDIR GUEST_BUSYBOX
#
# The ABI number moves with Debian's security updates, so it is resolved from
# the linux-image-amd64 metapackage rather than written down here.
set -euo pipefail

CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
log() { echo "guest-assets: $*" >&2; }

if [[ -n ${GUEST_KREL:-} ]]; then
	krel=$GUEST_KREL
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
# 6.1.0-56-amd64 -> base 6.1.0-56, kbuild series 6.1
kbase=${krel%-amd64}
kseries=$(echo "$kbase" | cut -d. -f1-2)

dir=$CACHE/debian/$krel
root=$dir/root
if [[ ! -e $dir/.complete ]]; then
	log "downloading kernel $krel into $dir"
	rm -rf "$dir"
	mkdir -p "$dir/debs" "$root"
	(cd "$dir/debs" && apt-get download \
		"linux-image-$krel" "linux-headers-$krel" \
		"linux-headers-$kbase-common" "linux-kbuild-$kseries" \
		busybox-static >&2)
	for d in "$dir"/debs/*.deb; do
		dpkg -x "$d" "$root"
	done
	# The arch headers' Makefile includes the -common tree by absolute
	# path; point it at the unpacked copy.
	hdr=$root/usr/src/linux-headers-$krel
	sed -i "s|/usr/src/linux-headers-$kbase-common|$root/usr/src/linux-headers-$kbase-common|g" \
		"$hdr/Makefile"
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
