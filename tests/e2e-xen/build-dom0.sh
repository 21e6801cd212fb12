#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build the root filesystem of the e2e-xen Dom0 from Debian packages and
# print its directory as the last line of stdout:
#
#   BASE=$(tests/e2e-xen/build-dom0.sh | tail -1)
#
# The tree holds Debian bookworm with the Xen 4.17 hypervisor and tools, the
# Dom0 kernel, busybox and the libraries the project's QEMU needs. It is
# cached in ${VGPU_CACHE:-$HOME/.cache/vgpu}/dom0-base-<hash>/, the hash
# covering this script (and so the package list and the recipe). run.sh
# adds the project's binaries and packs the image.
#
# Needs root (mmdebstrap runs dpkg) and the Debian archive.
set -euo pipefail

log() { printf 'build-dom0: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
SUITE=bookworm
MIRROR=${VGPU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${VGPU_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}

# Xen and its tools; the kernel; tools the Dom0 init uses; the shared
# libraries of the project's QEMU (glib, fdt; the libxen* come with
# xen-utils) and its firmware (seabios, qemu-system-data for linuxboot).
PACKAGES=(
	linux-image-amd64 xen-system-amd64 xen-utils-4.17 xen-utils-common
	busybox-static kmod udev procps iproute2
	libglib2.0-0 libfdt1 seabios qemu-system-data
)

KEY=$(sha256sum "$SCRIPT" | cut -c1-12)
OUT=$CACHE/dom0-base-$KEY
if [[ -e $OUT/.complete ]]; then
	log "cached: $OUT"
	echo "$OUT"
	exit 0
fi
[[ $(id -u) -eq 0 ]] || die "needs root (mmdebstrap, dpkg)"
mkdir -p "$CACHE"
exec 9>"$CACHE/dom0-base-$KEY.lock"
flock 9
if [[ -e $OUT/.complete ]]; then
	echo "$OUT"
	exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
	log "installing mmdebstrap"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		mmdebstrap >&2
fi

rm -rf "$OUT" "$OUT.tmp"
log "mmdebstrap --variant=apt $SUITE (${PACKAGES[*]}), a few minutes"
t0=$(date +%s)
pkgs=$(IFS=,; echo "${PACKAGES[*]}")
mmdebstrap --variant=apt --include="$pkgs" \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	"$SUITE" "$OUT.tmp" \
	"deb $MIRROR $SUITE main" \
	"deb $MIRROR $SUITE-updates main" \
	"deb $SECURITY $SUITE-security main" >&2
t1=$(date +%s)

# Sanity: what the Dom0 init and the test need.
for f in boot/xen-4.17-amd64.gz usr/sbin/xl usr/lib/xen-4.17/boot/hvmloader \
	 bin/busybox usr/bin/timeout; do
	ls "$OUT.tmp"/$f >/dev/null 2>&1 || die "the Dom0 tree lacks /$f"
done
ls "$OUT.tmp"/boot/vmlinuz-* >/dev/null || die "no Dom0 kernel"
# Under TCG an HVM guest must use shadow paging (hap=0, see FIELD-NOTES), and
# Debian's Xen security update 4.17.7 is built without CONFIG_SHADOW_PAGING
# ("domain creation fail: Operation not supported"). Put in the newest
# xen-hypervisor-4.17-amd64 build that has it (bookworm's 4.17.5 does); the
# tools stay those of the tree (same 4.17 hypercall interfaces).
if ! grep -qx 'CONFIG_SHADOW_PAGING=y' "$OUT.tmp/boot/xen-4.17-amd64.config"; then
	hv=$OUT.tmp.hv
	rm -rf "$hv"
	mkdir -p "$hv"
	found=
	for v in $(apt-cache madison xen-hypervisor-4.17-amd64 | awk -F'|' '{gsub(/ /,"",$2); print $2}'); do
		(cd "$hv" && apt-get download -o APT::Sandbox::User=root \
			"xen-hypervisor-4.17-amd64=$v" >&2) || continue
		dpkg -x "$hv"/xen-hypervisor-4.17-amd64_*.deb "$hv/x"
		if grep -qx 'CONFIG_SHADOW_PAGING=y' "$hv"/x/boot/xen-4.17-amd64.config; then
			found=$v
			break
		fi
		rm -rf "$hv"/x "$hv"/*.deb
	done
	[[ -n $found ]] || die "no xen-hypervisor-4.17-amd64 with shadow paging in the archive"
	log "hypervisor: xen-hypervisor-4.17-amd64 $found (has CONFIG_SHADOW_PAGING)"
	cp "$hv"/x/boot/xen-4.17-amd64.gz "$hv"/x/boot/xen-4.17-amd64.config "$OUT.tmp/boot/"
	echo "$found" >"$OUT.tmp/boot/xen-4.17-amd64.version"
	rm -rf "$hv"
fi
# Keep the image small: apt lists and caches are not needed at run time.
rm -rf "$OUT.tmp"/var/lib/apt/lists/* "$OUT.tmp"/var/cache/apt/*
echo "dom0 base: mmdebstrap $SUITE in $((t1 - t0)) s; ${PACKAGES[*]}" >"$OUT.tmp/.vgpu-dom0-base"
touch "$OUT.tmp/.complete"
mv "$OUT.tmp" "$OUT"
log "built $OUT in $((t1 - t0)) s ($(du -sh "$OUT" | cut -f1))"
echo "$OUT"
