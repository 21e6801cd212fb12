#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Smoke test of the XCP-ng 4.2 device model (build.sh) with the real vgpu
# daemon, without Xen: the build has neither TCG nor KVM, so the machine runs
# under -accel qtest and qtest-vgpu.py plays the guest driver (PCI config,
# BARs, the virtqueue in guest memory). Guest RAM is a memfd (the daemon's
# default, non-Xen build), so this checks everything of Patch2001/2003 and the
# unchanged vhost-user paths of 2002 (XEN_MMAP is cleared without Xen); the
# Xen foreign-mapping path itself only runs under Xen.
#
#   xen/xcp-ng-qemu/smoke.sh      -> "xcpng-qemu smoke: N passed, M failed"
#
# Environment: QEMU42 (default: build.sh), VGPU_DAEMON, VGPU_ADMIN (default:
# target/release/, built with cargo if missing).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
log() { printf 'xcpng-smoke: %s\n' "$*" >&2; }

QEMU42=${QEMU42:-$("$HERE/build.sh" | tail -1)}
if [[ -z ${VGPU_DAEMON:-} ]]; then
	(cd "$REPO" && cargo build --release --bin vgpu-vhost-user --bin vgpu-admin >&2)
	VGPU_DAEMON=$REPO/target/release/vgpu-vhost-user
fi
VGPU_ADMIN=${VGPU_ADMIN:-$(dirname "$VGPU_DAEMON")/vgpu-admin}

W=$(mktemp -d "${TMPDIR:-/tmp}/xcpng-smoke.XXXXXX")
DPID= QPID=
cleanup() {
	[[ -n $QPID ]] && kill "$QPID" 2>/dev/null || true
	[[ -n $DPID ]] && kill "$DPID" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$W"
}
trap cleanup EXIT

PASSED=0 FAILED=0
record() { # PASS|FAIL name detail
	echo "$1 $2: $3"
	if [[ $1 == PASS ]]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}

# 1. the devices are in the binary
devs=$("$QEMU42" -device help 2>&1)
for d in vhost-user-vgpu-pci vgpu-stub; do
	if grep -q "name \"$d\"" <<<"$devs"; then
		record PASS "device $d" "$(grep "name \"$d\"" <<<"$devs")"
	else
		record FAIL "device $d" "not in -device help"
	fi
done

# 2. the daemon in database mode with one VM
export VGPU_DB=$W/vgpu.db
"$VGPU_ADMIN" init >&2
"$VGPU_ADMIN" register-vm 00000000-0000-0000-0000-0000000000c4 \
	--pool A --priority high --vm-id 4 --name smoke-vm4 >&2
RUST_LOG=${RUST_LOG:-info} "$VGPU_DAEMON" --executor cpu --db "$VGPU_DB" \
	--socket-dir "$W" >"$W/daemon.out" 2>"$W/daemon.log" &
DPID=$!
for _ in $(seq 100); do [[ -S $W/vm4.sock ]] && break; sleep 0.1; done
[[ -S $W/vm4.sock ]] || { cat "$W/daemon.log" >&2; echo "daemon did not listen"; exit 1; }

# 3. QEMU under qtest, the driver in qtest-vgpu.py. pit=off: outside Xen the
# pc machine creates the PIT and isa-pcspk, which XCP-ng's device list
# leaves out (under Xen the PIT is the hypervisor's and neither is created).
mkfifo "$W/cmd"
python3 "$HERE/qtest-vgpu.py" "$QEMU42" -machine pc,accel=qtest,pit=off -display none \
	-nodefaults -monitor none -serial none -m 256M -qtest-log /dev/null \
	-L /usr/share/seabios -L /usr/share/qemu \
	-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
	-chardev socket,id=vgpu4,path="$W/vm4.sock" \
	-device vhost-user-vgpu-pci,id=vgpu4,chardev=vgpu4 \
	-device vgpu-stub,vgpu=vgpu4 \
	<"$W/cmd" >"$W/qtest.out" 2>"$W/qemu.err" &
QPID=$!
exec 8>"$W/cmd"
wait_done() { # PHASE
	for _ in $(seq 600); do
		grep -q "^DONE $1" "$W/qtest.out" && return 0
		kill -0 "$QPID" 2>/dev/null || return 1
		sleep 0.1
	done
	return 1
}
echo "initial A 2 4" >&8
if wait_done initial; then
	"$VGPU_ADMIN" --socket-dir "$W" set-priority smoke-vm4 low >&2
	"$VGPU_ADMIN" --socket-dir "$W" set-pool smoke-vm4 B >&2
	sleep 1
	echo "changed B 0 4" >&8
	wait_done changed || record FAIL "changed phase" "did not finish"
	kill -0 "$QPID" 2>/dev/null && echo quit >&8
else
	record FAIL "initial phase" "did not finish"
fi
exec 8>&-
wait "$QPID" || true
QPID=

while read -r verdict rest; do
	case $verdict in
	PASS | FAIL) record "$verdict" "${rest%%:*}" "${rest#*: }" ;;
	esac
done <"$W/qtest.out"
if [[ -s $W/qemu.err ]]; then
	log "QEMU/driver stderr: $(tr '\n' ' ' <"$W/qemu.err" | cut -c1-1200)"
fi
grep -q . "$W/qtest.out" || log "no output from qtest-vgpu.py"
log "daemon log (tail): $(tail -5 "$W/daemon.log" | tr '\n' ' ' | cut -c1-800)"

echo "xcpng-qemu smoke: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 && $PASSED -gt 0 ]]
