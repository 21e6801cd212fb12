#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build XCP-ng 8.3's device model -- the QEMU of xcp-ng-rpms/qemu
# (SPECS/qemu.spec, XCP-ng's patch queue) -- with vgpu's Patch2001-2003, and
# print the absolute path of qemu-system-i386 as the last line of stdout:
#
#   QEMU42=$(xen/xcp-ng-qemu/build.sh | tail -1)
#
# What it builds is not byte-for-byte XCP-ng's package:
#
#  - The source is QEMU **4.2.0** (Ubuntu focal's qemu_4.2.orig.tar.xz), not
#    4.2.1: the spec's qemu-4.2.1.tar.gz is a Git LFS object that cannot be
#    had here. Two of XCP-ng's patches touch code that 4.2.1's stable fixes
#    changed; the parts that do not apply to 4.2.0 are listed in
#    COMPAT_420 below and in README.md.
#  - It is built with Debian's gcc, glib, Python and libxen-dev (Xen 4.17,
#    XCP-ng 8.3's Xen version), with ./configure --python=/usr/bin/python3
#    and --disable-vgt (Intel GVT-g needs XenServer's own libdrm); not in
#    XCP-ng's build root, not as an RPM.
#
# Steps, in the spec's order: unpack the tarball; apply every PatchN of the
# spec (qemu.spec.patch applied to it first, so the queue ends with
# 2001-2003 from patches/); put keycodemapdb at the spec's
# keycodemapdb_cset (the spec's Source2); configure with the spec's own
# ./configure line (read from the spec, so there is one source for the
# flags; --enable-vhost-user comes from qemu.spec.patch); make
# i386-softmmu/all. The binary is cached in
# ${VGPU_CACHE:-$HOME/.cache/vgpu}/xcpng-qemu-<hash>/, where <hash> covers
# this script, qemu.spec.patch, patches/, compat-4.2.0/, the two pinned
# commits and the tarball's checksum; a cached binary is reused.
#
# Environment:
#   VGPU_CACHE              cache root (default $HOME/.cache/vgpu)
#   VGPU_XCPNG_RPMS_GIT     git directory of github.com/xcp-ng-rpms/qemu
#                           (default: /work/.mirror/xcp-ng-rpms+qemu/repo if
#                           it exists, else a clone in the cache)
#   VGPU_KEYCODEMAPDB_GIT   git directory of keycodemapdb (default:
#                           /work/.mirror/qemu+keycodemapdb/repo, else a clone
#                           of github.com/qemu/keycodemapdb in the cache)
#   VGPU_QEMU42_TARBALL     use this qemu_4.2.orig.tar.xz, no download
#   VGPU_XCPNG_KEEP_BUILD   1: keep the build tree next to the binary
#   JOBS                    make parallelism (default 2: shared machine)
set -euo pipefail

# xcp-ng-rpms/qemu master of January 2026: 4.2.1-5.2.15.2 (CVE-2021-3929).
XCPNG_COMMIT=fdc77b61a5eda8019d31e25d7d6f870d4d8b8c88
TARBALL_NAME=qemu_4.2.orig.tar.xz
TARBALL_URL=http://archive.ubuntu.com/ubuntu/pool/main/q/qemu/$TARBALL_NAME
TARBALL_SHA256=d3481d4108ce211a053ef15be69af1bdd9dde1510fda80d92be0f6c3e98768f0
QEMU_DIR=qemu-4.2.0

# XCP-ng patches with a part that does not apply to 4.2.0 (it applies to
# 4.2.1, whose stable fixes changed the context): "PatchN file [compat]" --
# the file's part is left out of PatchN and, where given, compat-4.2.0/compat
# does the same change on 4.2.0's code.
COMPAT_420=(
    # iotest 283 came with a 4.2.1 stable backport; tests are not built.
    "9 tests/qemu-iotests/283"
    # 4.2.1 has "virtio-balloon: fix free page hinting without an iothread"
    # (realize fails without an iothread); 4.2.0 still tests s->iothread
    # around the same aio_bh_new() call that 1006 guards.
    "1006 hw/virtio/virtio-balloon.c 1006-virtio-balloon-4.2.0.patch"
)

log() { printf 'xcpng-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SCRIPT")
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
JOBS=${JOBS:-2}

# --- cache key -----------------------------------------------------------------
KEY=$( {
    cd "$REPO"
    sha256sum xen/xcp-ng-qemu/build.sh xen/xcp-ng-qemu/qemu.spec.patch \
        xen/xcp-ng-qemu/patches/*.patch xen/xcp-ng-qemu/compat-4.2.0/*.patch
    echo "$XCPNG_COMMIT $TARBALL_SHA256"
} | sha256sum | cut -c1-12)
OUT="$CACHE/xcpng-qemu-$KEY"
BIN="$OUT/qemu-system-i386"

if [ -x "$BIN" ]; then
    log "cached: $BIN"
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/xcpng-qemu-$KEY.lock"
flock 9
if [ -x "$BIN" ]; then
    log "built by a concurrent run: $BIN"
    echo "$BIN"
    exit 0
fi

# --- packages: the spec's BuildRequires, as Debian 12 packages -------------------
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo to install packages"
    SUDO=(sudo)
fi
installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}
# python3-devel -> python3; libaio-devel glib2-devel libjpeg-devel
# libpng-devel pixman-devel xenserver-libdrm-devel (gvt-g.patch: libdrm,
# libdrm_intel) xen-dom0-libs-devel xen-libs-devel (libxen-dev: Xen 4.17)
# libusbx-devel libseccomp-devel jemalloc-devel gcc.
PKGS=(gcc libc6-dev make pkg-config python3 patch xz-utils binutils git curl
      libaio-dev libglib2.0-dev libjpeg-dev libpng-dev libpixman-1-dev
      libdrm-dev libxen-dev libusb-1.0-0-dev libseccomp-dev libjemalloc-dev
      zlib1g-dev)
missing=()
for p in "${PKGS[@]}"; do
    installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# --- sources ---------------------------------------------------------------------
git_dir() { # NAME DEFAULT URL -> a git directory holding the repository
    local var=$1 default=$2 url=$3 clone
    if [ -n "${!var:-}" ]; then
        echo "${!var}"
    elif [ -d "$default" ]; then
        echo "$default"
    else
        clone="$CACHE/src/$(basename "$url").git"
        [ -d "$clone" ] || git clone -q --bare "$url" "$clone" >&2 ||
            die "cannot clone $url (set $var)"
        echo "$clone"
    fi
}
RPMS_GIT=$(git_dir VGPU_XCPNG_RPMS_GIT /work/.mirror/xcp-ng-rpms+qemu/repo \
    https://github.com/xcp-ng-rpms/qemu)
KCM_GIT=$(git_dir VGPU_KEYCODEMAPDB_GIT /work/.mirror/qemu+keycodemapdb/repo \
    https://github.com/qemu/keycodemapdb)
git --git-dir="$RPMS_GIT" cat-file -e "$XCPNG_COMMIT^{commit}" 2>/dev/null ||
    die "$RPMS_GIT lacks xcp-ng-rpms/qemu commit $XCPNG_COMMIT"

mkdir -p "$CACHE/src"
if [ -n "${VGPU_QEMU42_TARBALL:-}" ]; then
    TARBALL=$(readlink -f "$VGPU_QEMU42_TARBALL")
else
    TARBALL="$CACHE/src/$TARBALL_NAME"
    if [ ! -f "$TARBALL" ]; then
        log "downloading $TARBALL_URL"
        curl -fsS -o "$TARBALL.part" "$TARBALL_URL" || die "download failed"
        mv "$TARBALL.part" "$TARBALL"
    fi
fi
echo "$TARBALL_SHA256  $TARBALL" | sha256sum -c --quiet - >&2 ||
    die "$TARBALL is not the expected $TARBALL_NAME"

# --- the spec and its patch queue ------------------------------------------------
WORK="$CACHE/xcpng-qemu-build-$KEY"
rm -rf "$WORK"
mkdir -p "$WORK/rpm"
git --git-dir="$RPMS_GIT" archive "$XCPNG_COMMIT" SPECS SOURCES | tar -x -C "$WORK/rpm"
SPEC="$WORK/rpm/SPECS/qemu.spec"
patch -s -d "$WORK/rpm" -p1 --batch --forward <"$HERE/qemu.spec.patch" ||
    die "qemu.spec.patch does not apply to xcp-ng-rpms/qemu $XCPNG_COMMIT"
cp "$HERE"/patches/*.patch "$WORK/rpm/SOURCES/"
KCM_COMMIT=$(sed -n 's/^%define keycodemapdb_cset \([0-9a-f]\{40\}\)$/\1/p' "$SPEC")
[ -n "$KCM_COMMIT" ] || die "no keycodemapdb_cset in the spec"

log "unpacking $TARBALL_NAME"
tar -C "$WORK" --no-same-owner -xf "$TARBALL"
SRC="$WORK/$QEMU_DIR"
[ -d "$SRC" ] || die "tarball did not unpack to $QEMU_DIR"

# Drop FILE's part from a git-format patch (sections start at "diff --git").
drop_file() { # PATCH FILE
    awk -v f="$2" '
        /^diff --git / { skip = ($3 == "a/" f) }
        !skip' "$1"
}

n_applied=0
while read -r tag name; do
    num=${tag#Patch}
    num=${num%:}
    file="$WORK/rpm/SOURCES/$name"
    [ -f "$file" ] || die "Patch$num: $name missing"
    input=$file
    compat=()
    for c in "${COMPAT_420[@]}"; do
        read -r cnum cfile cpatch <<<"$c"
        [ "$cnum" = "$num" ] || continue
        log "Patch$num $name: leaving out $cfile (4.2.1 context)"
        drop_file "$input" "$cfile" >"$WORK/patch-$num.tmp"
        input="$WORK/patch-$num.tmp"
        [ -z "${cpatch:-}" ] || compat+=("$HERE/compat-4.2.0/$cpatch")
    done
    # GNU patch's default fuzz (2): one XCP-ng backport (Patch1000, CVE-2023-3354)
    # needs fuzz 1 on the upstream tree.
    patch -d "$SRC" -p1 --batch --forward --no-backup-if-mismatch --quiet \
        <"$input" >&2 || die "Patch$num $name does not apply"
    for cp in "${compat[@]}"; do
        log "  + compat-4.2.0/$(basename "$cp")"
        patch -d "$SRC" -p1 --batch --forward --no-backup-if-mismatch --quiet \
            <"$cp" >&2 || die "$(basename "$cp") does not apply"
    done
    n_applied=$((n_applied + 1))
done < <(grep -E '^Patch[0-9]+:' "$SPEC")
log "applied $n_applied patches of the spec (XCP-ng's queue and vgpu's 2001-2003)"

# The spec's Source2: keycodemapdb at keycodemapdb_cset (Patch25 needs its CLI).
rm -rf "$SRC/ui/keycodemapdb"
mkdir -p "$SRC/ui/keycodemapdb"
git --git-dir="$KCM_GIT" archive "$KCM_COMMIT" | tar -x -C "$SRC/ui/keycodemapdb" ||
    die "keycodemapdb $KCM_COMMIT not in $KCM_GIT"

# --- configure with the spec's flags -----------------------------------------------
# The spec's "./configure ..." command up to its last continuation line;
# path options (rpm macros) are dropped, the extra_configure_argument array is
# what the spec puts in it without ASan (--enable-jemalloc).
mapfile -t CONF < <(awk '
    /^\.\/configure / { on = 1 }
    on { line = $0; more = sub(/\\$/, "", line); print line; if (!more) exit }
' "$SPEC" | tr ' \t' '\n\n' | grep -v '^$' | grep -v '^\./configure$' |
    grep -v '%{' | sed 's/^"\${extra_configure_argument\[@\]}"$/--enable-jemalloc/')
[ ${#CONF[@]} -gt 20 ] || die "could not read the configure line of the spec"
printf '%s\n' "${CONF[@]}" | grep -qx -- --enable-vhost-user ||
    die "the spec does not configure --enable-vhost-user"
# Two additions, both for this build machine, not for XCP-ng's build root:
#  --python=/usr/bin/python3  Debian's Python 3.11 (configure would take the
#                             first python3 on PATH);
#  --disable-vgt              gvt-g.patch (Intel GVT-g display) needs
#                             XenServer's libdrm (xenserver-libdrm-devel: the
#                             i915 vgtbuffer ioctl), which Debian's libdrm does
#                             not have; vgt-stub.c takes its place.
CONF+=(--python=/usr/bin/python3 --disable-vgt)
log "configure ${CONF[*]}"
t0=$(date +%s)
(cd "$SRC" && ./configure "${CONF[@]}") >"$WORK/configure.log" 2>&1 ||
    { tail -20 "$WORK/configure.log" >&2; die "configure failed ($WORK/configure.log)"; }
t1=$(date +%s)
log "make -j$JOBS i386-softmmu/all (takes a while on a shared machine)"
make -C "$SRC" -j"$JOBS" i386-softmmu/all >"$WORK/make.log" 2>&1 ||
    { grep -E 'error|Error' "$WORK/make.log" | head -20 >&2; die "make failed ($WORK/make.log)"; }
t2=$(date +%s)
log "configure $((t1 - t0)) s, make $((t2 - t1)) s"

# --- check and install -------------------------------------------------------------
mkdir -p "$OUT"
tmp="$OUT/.qemu-system-i386.tmp"
cp "$SRC/i386-softmmu/qemu-system-i386" "$tmp"
strip "$tmp" || log "strip failed; keeping the unstripped binary"
"$tmp" --version >&2 || die "the built binary does not run"
devices=$("$tmp" -device help 2>&1)
for d in vhost-user-vgpu-pci vgpu-stub; do
    grep -q "name \"$d\"" <<<"$devices" || die "the built binary lacks $d"
done
{
    echo "XCP-ng 8.3 QEMU (xcp-ng-rpms/qemu $XCPNG_COMMIT) on $TARBALL_NAME (QEMU 4.2.0)"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((t2 - t0)) s with make -j$JOBS, $(gcc --version | head -1)"
    echo "configure: ${CONF[*]}"
    echo "patches: $n_applied of the spec; 4.2.0 compatibility: ${COMPAT_420[*]}"
    (cd "$REPO" && sha256sum xen/xcp-ng-qemu/build.sh xen/xcp-ng-qemu/qemu.spec.patch \
        xen/xcp-ng-qemu/patches/*.patch xen/xcp-ng-qemu/compat-4.2.0/*.patch)
} >"$OUT/BUILD-INFO"
mv "$tmp" "$BIN"

if [ "${VGPU_XCPNG_KEEP_BUILD:-0}" = 1 ]; then
    log "build tree kept in $WORK"
else
    rm -rf "$WORK"
fi
log "built $BIN"
echo "$BIN"
