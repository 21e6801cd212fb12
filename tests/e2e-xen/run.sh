#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# End-to-end test on a real Xen: Debian's Xen 4.17 hypervisor with a PV Dom0
# booted under QEMU TCG; in the Dom0 the daemon's Xen build and two HVM guests
# whose device model is the project's Xen-enabled QEMU with vhost-user-vgpu-pci
# and vgpu-stub. The checks run inside the Dom0 (dom0-test.sh); this script
# builds and caches the pieces, boots Xen and reads the results:
#
#   tests/e2e-xen/run.sh          -> "e2e-xen: N passed, M failed"
#
# Environment:
#   QEMU=/path            the project's QEMU (default: tests/e2e/build-qemu.sh);
#                         it is both the outer TCG machine and the device model
#   VGPU_CACHE=DIR        cache (default $HOME/.cache/vgpu): the QEMU build, the
#                         Dom0 base tree (build-dom0.sh) and the Dom0 image,
#                         each keyed by its inputs
#   VGPU_E2E_XEN_TIMEOUT  seconds for the whole Xen run (default 2400)
#   VGPU_E2E_KEEP=1       keep the work directory (serial log) after the run
#   VGPU_E2E_XEN_CPU      outer CPU model (default qemu64,+svm,+npt: with -cpu max,
#                         Dom0 processes segfaulted at random under TCG)
#   VGPU_E2E_XEN_DM=/path a different device model for the HVM guests, QEMU= stays
#                         the outer machine: XCP-ng's QEMU 4.2
#                         (xen/xcp-ng-qemu/build.sh, qemu-system-i386); its shared
#                         libraries that the Dom0 lacks go into the image with it
# Needs root (mmdebstrap, mke2fs -d), the Debian archive on a cold cache.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$REPO/tests/e2e-xen
E2E=$REPO/tests/e2e
CACHE=${VGPU_CACHE:-$HOME/.cache/vgpu}
TIMEOUT=${VGPU_E2E_XEN_TIMEOUT:-2400}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-e2e-xen.XXXXXX")
T_START=$(date +%s)
PASSED=0
FAILED=0

log() { printf '[e2e-xen %s] %s\n' "$(date +%T)" "$*" >&2; }
elapsed() { echo $(($(date +%s) - T_START)); }
summary() {
	echo "e2e-xen: $PASSED passed, $FAILED failed"
	[[ $FAILED -eq 0 && $PASSED -gt 0 ]]
}
fatal() {
	echo "E2EX-RESULT FAIL $1 $2"
	FAILED=$((FAILED + 1))
	summary || true
	exit 1
}
cleanup() {
	local rc=$?
	if [[ ${VGPU_E2E_KEEP:-0} == 1 || $rc -ne 0 ]]; then
		log "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT

# --- the pieces ------------------------------------------------------------------
t=$(date +%s)
if [[ -z ${QEMU:-} ]]; then
	log "QEMU (tests/e2e/build-qemu.sh: KVM, TCG and Xen accelerators)"
	QEMU=$("$E2E/build-qemu.sh" | tail -1)
fi
"$QEMU" -accel help | grep -qx xen || fatal qemu "$QEMU has no Xen accelerator"
log "QEMU $QEMU ($(($(date +%s) - t)) s)"

t=$(date +%s)
log "daemon, Xen build: cargo build --release --features xen"
XEN_TARGET=$REPO/target/xen
(cd "$REPO" && CARGO_TARGET_DIR=$XEN_TARGET cargo build --release --features xen \
	--bin vgpu-vhost-user --bin vgpu-admin >&2) || fatal daemon "Xen build failed"
DAEMON=$XEN_TARGET/release/vgpu-vhost-user
ADMIN=$XEN_TARGET/release/vgpu-admin
log "daemon built ($(($(date +%s) - t)) s)"

t=$(date +%s)
eval "$("$E2E/guest-assets.sh")"
make -C "$REPO/guest-driver" module KDIR="$GUEST_KDIR" >"$WORK/build.log" 2>&1 ||
	{ cat "$WORK/build.log" >&2; fatal build "module build failed"; }
make -C "$REPO/guest-driver" client >>"$WORK/build.log" 2>&1 ||
	{ cat "$WORK/build.log" >&2; fatal build "client build failed"; }
"$E2E/mkinitramfs.sh" "$WORK/initrd.gz" "$GUEST_BUSYBOX" "$GUEST_MODDIR" \
	"$REPO/guest-driver/virtio_vgpu.ko" "$REPO/guest-driver/client/vgpu-client"
log "guest kernel $GUEST_KREL, module, client, initramfs ($(($(date +%s) - t)) s)"

t=$(date +%s)
BASE=$("$HERE/build-dom0.sh" | tail -1)
log "Dom0 base tree $BASE ($(($(date +%s) - t)) s)"

# --- the Dom0 image, keyed by everything in it --------------------------------------
# The initramfs is packed anew each run (cpio mtimes), so key on its inputs.
t=$(date +%s)
KEY=$( {
	echo "$BASE"
	sha256sum "$QEMU" ${VGPU_E2E_XEN_DM:+"$VGPU_E2E_XEN_DM"} "$DAEMON" "$ADMIN" "$GUEST_VMLINUZ" \
		"$REPO/guest-driver/virtio_vgpu.ko" "$REPO/guest-driver/client/vgpu-client" \
		"$E2E/guest-init.sh" "$E2E/mkinitramfs.sh" \
		"$HERE/dom0-init.sh" "$HERE/dom0-test.sh" "$HERE/qemu-dm.sh" "$HERE/run.sh" | cut -d' ' -f1
} | sha256sum | cut -c1-12)
IMG=$CACHE/dom0-img-$KEY
if [[ ! -e $IMG/.complete ]]; then
	log "packing the Dom0 image $IMG"
	rm -rf "$IMG"
	mkdir -p "$IMG"
	stage=$WORK/stage
	cp -a "$BASE" "$stage"
	install -d "$stage/vgpu/bin" "$stage/vgpu/guest"
	install -m755 "$QEMU" "$DAEMON" "$ADMIN" "$stage/vgpu/bin/"
	install -m644 "$GUEST_VMLINUZ" "$stage/vgpu/guest/vmlinuz"
	install -m644 "$WORK/initrd.gz" "$stage/vgpu/guest/initrd.gz"
	install -m755 "$HERE/dom0-init.sh" "$HERE/dom0-test.sh" "$stage/vgpu/"
	install -m755 "$HERE/qemu-dm.sh" "$stage/vgpu/bin/qemu-dm"
	if [[ -n ${VGPU_E2E_XEN_DM:-} ]]; then
		# qemu-dm.sh runs this one when it is there.
		install -m755 "$VGPU_E2E_XEN_DM" "$stage/vgpu/bin/qemu-system-i386"
		install -d "$stage/vgpu/lib-dm"
		for lib in $(ldd "$VGPU_E2E_XEN_DM" | awk '$3 ~ /^\// { print $3 }'); do
			ls "$stage"/lib/x86_64-linux-gnu/"$(basename "$lib")" \
				"$stage"/usr/lib/x86_64-linux-gnu/"$(basename "$lib")" >/dev/null 2>&1 ||
				install -m644 "$lib" "$stage/vgpu/lib-dm/"
		done
		log "device model $VGPU_E2E_XEN_DM, with $(ls "$stage/vgpu/lib-dm" | tr '\n' ' ')"
	fi
	kver=$(basename "$(ls "$stage"/boot/vmlinuz-* | sort -V | tail -1)" | sed 's/^vmlinuz-//')
	cp "$stage/boot/vmlinuz-$kver" "$IMG/vmlinuz"
	cp "$stage/boot/initrd.img-$kver" "$IMG/initrd.img"
	zcat "$stage/boot/xen-4.17-amd64.gz" >"$IMG/xen"
	mke2fs -q -t ext4 -L dom0 -d "$stage" -F "$IMG/dom0.img" 3G >&2
	rm -rf "$stage"
	touch "$IMG/.complete"
fi
log "Dom0 image ready ($(($(date +%s) - t)) s)"

# --- boot Xen under TCG ------------------------------------------------------------
SERIAL=$WORK/serial.log
log "booting Xen 4.17 + Dom0 under QEMU TCG (timeout $TIMEOUT s)"
T_BOOT=$(date +%s)
set +e
timeout --foreground -k 10 "$TIMEOUT" "$QEMU" \
	-accel tcg,thread=multi -cpu "${VGPU_E2E_XEN_CPU:-qemu64,+svm,+npt}" -m 4G -smp 2 -machine pc \
	-display none -monitor none -nic none -no-reboot \
	-serial "file:$SERIAL" \
	-kernel "$IMG/xen" \
	-append "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M loglvl=all guest_loglvl=all" \
	-initrd "$IMG/vmlinuz root=/dev/vda rw console=hvc0 init=/vgpu/dom0-init.sh,$IMG/initrd.img" \
	-drive "file=$IMG/dom0.img,if=virtio,format=raw,cache=unsafe,snapshot=on" \
	-L /usr/share/seabios -L /usr/share/qemu >"$WORK/outer.out" 2>"$WORK/outer.err"
rc=$?
set -e
T_END=$(date +%s)
log "outer QEMU exited with $rc after $((T_END - T_BOOT)) s"

# Kernel messages may share a line with ours: cut anything before "E2EX-".
clean() { tr -d '\r' <"$SERIAL" | sed 's/^.*\(E2EX-[A-Z]*\)/\1/'; }
first_at() { # regex -> seconds since boot of the Dom0 log line, or "?"
	clean | grep -m1 -E "$1" | sed -n 's/.* \([0-9.]*\)s: .*/\1/p' | head -1
}
echo "---- timings (seconds): Dom0 userspace at $(first_at 'E2EX-LOG dom0 .*userspace up'), " \
	"first guest at /init at $(first_at 'guest kernel at /init'), Xen run $((T_END - T_BOOT)), whole script $(elapsed)"
grep -E 'E2EX-(LOG|RETRY)' <(clean) || true
while read -r _ verdict name detail; do
	echo "$verdict $name $detail"
	if [[ $verdict == PASS ]]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
done < <(clean | grep '^E2EX-RESULT ')
if ! clean | grep -q '^E2EX-SUMMARY '; then
	echo "FAIL dom0 the Dom0 test did not finish (rc $rc); serial log tail:"
	clean | grep -v '^E2EX-RESULT' | tail -n 60
	FAILED=$((FAILED + 1))
else
	clean | grep '^E2EX-TAIL' | tail -n 200 >"$WORK/tails.log"
	((FAILED == 0)) || cat "$WORK/tails.log"
fi
cp "$SERIAL" "$CACHE/e2e-xen-last-serial.log" 2>/dev/null || true
summary
