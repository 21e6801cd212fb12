#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build QEMU 10.0.2 (Debian's orig tarball) with the patches in qemu-patches/
# and print the absolute path of qemu-system-x86_64 as the last line of stdout.
# One binary has the KVM, TCG and Xen accelerators: the KVM/TCG end-to-end
# test (tests/e2e) and the Xen one (tests/e2e-xen, as the HVM device model in
# Dom0) use the same build.
#
#   QEMU=$(tests/e2e/build-qemu.sh | tail -1)
#
# Everything else goes to stderr. The binary is cached outside the repository
# in ${VGPU_CACHE:-$HOME/.cache/vgpu}/qemu-<hash>/, where <hash> covers the
# patches and this script; a cached binary is reused without building.
#
# Needs Debian bookworm (or later), root or sudo for apt-get, and access to
# the Debian archive on the first run. Run the result with
#   -L /usr/share/seabios -L /usr/share/qemu
# (the tarball ships no firmware; packages seabios and qemu-system-data do).
#
# Environment:
#   VGPU_CACHE           cache root (default $HOME/.cache/vgpu)
#   VGPU_QEMU_TARBALL    use this qemu_10.0.2+ds.orig.tar.xz, no download
#   VGPU_QEMU_KEEP_BUILD 1: keep the build tree next to the binary
#   JOBS                 ninja parallelism (default: nproc)
set -euo pipefail

QEMU_VERSION=10.0.2
TARBALL_NAME="qemu_${QEMU_VERSION}+ds.orig.tar.xz"

log() { printf 'build-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/../.." && pwd)
PATCH_DIR="$REPO/qemu-patches"
CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
JOBS=${JOBS:-$(nproc)}

# --- cache key: the patch files (names and contents) and this script -------
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob
[ ${#PATCHES[@]} -gt 0 ] || die "no patches in $PATCH_DIR"
KEY=$(cd "$REPO" && sha256sum qemu-patches/*.patch tests/e2e/build-qemu.sh \
      | sha256sum | cut -c1-12)
OUT="$CACHE/qemu-$KEY"
BIN="$OUT/qemu-system-x86_64"

if [ -x "$BIN" ]; then
    log "cached: $BIN"
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
# One build per key at a time; a second caller waits and then finds the cache.
exec 9>"$CACHE/qemu-$KEY.lock"
flock 9
if [ -x "$BIN" ]; then
    log "built by a concurrent run: $BIN"
    echo "$BIN"
    exit 0
fi

# --- packages -----------------------------------------------------------------
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo to install packages"
    SUDO=(sudo)
fi
apt_get() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >&2
}

# shellcheck disable=SC1091
. /etc/os-release
CODENAME=${VERSION_CODENAME:-}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

BASE_PKGS=(gcc libc6-dev make pkg-config ninja-build libglib2.0-dev libfdt-dev
           python3 python3-venv patch xz-utils binutils util-linux
           seabios qemu-system-data libxen-dev)
# libxen-dev: bookworm's is Xen 4.17, the Xen of the e2e-xen Dom0 and of
# XCP-ng 8.2/8.3; QEMU needs the Dom0's Xen version or a compatible one.
# QEMU 10.0 needs meson >= 1.5; bookworm has 1.0, bookworm-backports 1.7.
BPO_PKGS=(meson python3-pycotap)

apt_updated=0
apt_update() {
    if [ $apt_updated -eq 0 ]; then
        log "apt-get update"
        apt_get update -q
        apt_updated=1
    fi
}

BPO_SOURCE=/etc/apt/sources.list.d/vgpu-bookworm-backports.sources
if [ "$CODENAME" = bookworm ] &&
   ! grep -rqs -- 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    log "adding bookworm-backports (deb, deb-src) as $BPO_SOURCE"
    "${SUDO[@]}" tee "$BPO_SOURCE" >/dev/null <<'EOF'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt_update
fi

missing=()
for p in "${BASE_PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    log "installing ${missing[*]}"
    apt_get install -y -q --no-install-recommends "${missing[@]}"
fi

meson_ok() {
    command -v meson >/dev/null &&
        dpkg --compare-versions "$(meson --version)" ge 1.5.0 &&
        installed python3-pycotap
}
if ! meson_ok; then
    apt_update
    if [ "$CODENAME" = bookworm ]; then
        log "installing ${BPO_PKGS[*]} from bookworm-backports"
        apt_get install -y -q --no-install-recommends -t bookworm-backports "${BPO_PKGS[@]}"
    else
        log "installing ${BPO_PKGS[*]}"
        apt_get install -y -q --no-install-recommends "${BPO_PKGS[@]}"
    fi
    meson_ok || die "meson >= 1.5.0 and python3-pycotap are needed"
fi

# --- source tarball -------------------------------------------------------------
SRC_CACHE="$CACHE/src"
mkdir -p "$SRC_CACHE"
if [ -n "${VGPU_QEMU_TARBALL:-}" ]; then
    TARBALL=$(readlink -f "$VGPU_QEMU_TARBALL")
    [ -f "$TARBALL" ] || die "VGPU_QEMU_TARBALL=$VGPU_QEMU_TARBALL not found"
else
    TARBALL="$SRC_CACHE/$TARBALL_NAME"
    if [ ! -f "$TARBALL" ]; then
        if [ "$CODENAME" = bookworm ]; then
            SRC_SPEC=qemu/bookworm-backports
        else
            SRC_SPEC=qemu
        fi
        apt_update
        log "downloading $TARBALL_NAME (apt-get source --download-only $SRC_SPEC)"
        dl=$(mktemp -d "$SRC_CACHE/dl.XXXXXX")
        # The archive serves the orig tarball but not always the .dsc and the
        # Debian tarball, so apt-get may fail after getting what we need.
        (cd "$dl" && apt-get source --download-only "$SRC_SPEC" >&2) ||
            log "apt-get source reported errors; checking for the tarball"
        [ -f "$dl/$TARBALL_NAME" ] ||
            die "apt-get source did not give $TARBALL_NAME (got: $(ls "$dl"))"
        mv "$dl/$TARBALL_NAME" "$TARBALL"
        rm -rf "$dl"
    fi
fi

# --- unpack, patch, configure, build ---------------------------------------------
WORK="$CACHE/build-$KEY"
rm -rf "$WORK"
mkdir -p "$WORK"
log "unpacking $TARBALL into $WORK"
tar -C "$WORK" --no-same-owner -xf "$TARBALL"
SRC="$WORK/qemu-$QEMU_VERSION"
[ -d "$SRC" ] || die "tarball did not unpack to qemu-$QEMU_VERSION"

for p in "${PATCHES[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$SRC" -p1 --forward --batch --quiet <"$p" >&2 ||
        die "patch $(basename "$p") does not apply"
done

# The +ds tarball has no EDK2 firmware blobs; with bzip2 installed meson
# would try to unpack them. Firmware comes from seabios/qemu-system-data.
sed -i '1i unpack_edk2_blobs = false' "$SRC/pc-bios/meson.build"

mkdir -p "$SRC/build"
log "configure"
t0=$(date +%s)
(cd "$SRC/build" && ../configure \
    --target-list=x86_64-softmmu \
    --without-default-features \
    --enable-kvm --enable-tcg --enable-xen --enable-vhost-user \
    --disable-download --disable-install-blobs \
    --disable-xen-pci-passthrough \
    --python=/usr/bin/python3) >&2
t1=$(date +%s)
log "ninja -j$JOBS qemu-system-x86_64 (takes a few minutes)"
ninja -C "$SRC/build" -j"$JOBS" qemu-system-x86_64 >&2
t2=$(date +%s)
log "configure $((t1 - t0)) s, build $((t2 - t1)) s"

# --- install into the cache -----------------------------------------------------
mkdir -p "$OUT"
tmp="$OUT/.qemu-system-x86_64.tmp"
cp "$SRC/build/qemu-system-x86_64" "$tmp"
strip "$tmp" || log "strip failed; keeping the unstripped binary"
{
    echo "qemu $QEMU_VERSION from $TARBALL_NAME"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((t2 - t0)) s with -j$JOBS"
    echo "patches:"
    (cd "$REPO" && sha256sum qemu-patches/*.patch tests/e2e/build-qemu.sh)
} >"$OUT/BUILD-INFO"
"$tmp" --version >&2 || die "the built binary does not run"
for accel in kvm tcg xen; do
    "$tmp" -accel help | grep -qx "$accel" || die "the built binary lacks the $accel accelerator"
done
mv "$tmp" "$BIN"

if [ "${VGPU_QEMU_KEEP_BUILD:-0}" = 1 ]; then
    log "build tree kept in $WORK"
else
    rm -rf "$WORK"
fi

log "built $BIN"
echo "$BIN"
