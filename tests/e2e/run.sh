#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# End-to-end test: the vgpu daemon on the host, three Debian guests under QEMU
# with the guest module and client, sharing one GPU queue.
#
#   tests/e2e/run.sh
#
# Environment:
#   QEMU=/path          patched qemu-system-x86_64 (default: tests/e2e/build-qemu.sh)
#   VGPU_DAEMON=/path   vgpu-vhost-user binary (default: cargo build --release)
#   VGPU_ADMIN=/path    vgpu-admin, for the live config-change step (default:
#                       next to the daemon; the step is skipped without it)
#   VGPU_CUDA_LIB=/path the guest CUDA library libvgpucuda.so (default: next
#                       to the daemon, built with cargo when absent)
#   VGPU_CACHE=DIR      download/build cache (default $HOME/.cache/vgpu)
#   VGPU_E2E_KEEP=1     keep the work directory (logs) after the run
#   VGPU_E2E_BOOT_S=N   seconds to wait for a guest to boot (default 180)
#   VGPU_GUEST_KREL=R   Debian guest kernel release (default: linux-image-amd64's)
#   VGPU_E2E_STRESS=0   skip the unbind with 70 requests in flight (see below)
#   RUST_LOG            daemon log level (default info)
#
# The guests' /init (guest-init.sh) serves commands written to their serial
# console; this script decides when each step runs and reads the results from
# the serial logs. Exit status 0 only when every check passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
E2E=$REPO/tests/e2e
BOOT_S=${VGPU_E2E_BOOT_S:-180}
BUSY_MS=4000

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vgpu-e2e.XXXXXX")
DAEMON_PID=
declare -A QPID VMFD
declare -a RESULTS
FAILED=0
NEXT_ID=1
SUMMARY_DONE=0

# --- housekeeping -------------------------------------------------------------

log() { printf '[e2e %s] %s\n' "$(date +%T)" "$*" >&2; }

stop_pid() {
	local pid=$1 i
	kill -0 "$pid" 2>/dev/null || return 0
	kill "$pid" 2>/dev/null || true
	for i in $(seq 50); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local rc=$? n
	trap - EXIT INT TERM
	if ((!SUMMARY_DONE)); then
		# set -e or a signal ended the script early: still say so clearly.
		record FAIL "script" "stopped early (exit status $rc)"
		summary || true
		((rc)) || rc=1
	fi
	for n in "${!QPID[@]}"; do
		stop_pid "${QPID[$n]}"
	done
	[[ -n $DAEMON_PID ]] && stop_pid "$DAEMON_PID"
	if [[ ${VGPU_E2E_KEEP:-0} == 1 || $rc -ne 0 ]] && [[ -d $WORK ]]; then
		if [[ ${VGPU_E2E_KEEP:-0} == 1 ]]; then
			log "logs kept in $WORK"
		else
			# Show what failed, then clean up anyway.
			for f in "$WORK"/daemon.log "$WORK"/vm*.log "$WORK"/vm*.err; do
				[[ -s $f ]] || continue
				echo "----- tail $f" >&2
				tail -n 25 "$f" | tr -d '\r' >&2
			done
			rm -rf "$WORK"
		fi
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

record() { # PASS|FAIL|SKIP name detail
	RESULTS+=("$(printf '%-4s %-28s %s' "$1" "$2" "${3:-}")")
	[[ $1 == FAIL ]] && FAILED=$((FAILED + 1))
	log "$1 $2 ${3:-}"
}

check() { # name detail command...
	local name=$1 detail=$2
	shift 2
	if "$@"; then
		record PASS "$name" "$detail"
	else
		record FAIL "$name" "$detail"
	fi
}

summary() {
	local r
	SUMMARY_DONE=1
	echo
	echo "==================== vgpu e2e summary ===================="
	for r in "${RESULTS[@]}"; do
		echo "$r"
	done
	echo "==========================================================="
	if ((FAILED == 0 && ${#RESULTS[@]} > 0)); then
		local skipped
		skipped=$(printf '%s\n' "${RESULTS[@]}" | grep -c '^SKIP' || true)
		echo "E2E PASS (${#RESULTS[@]} checks, $skipped skipped)"
		echo "e2e: $((${#RESULTS[@]} - skipped)) passed, 0 failed, $skipped skipped"
		return 0
	fi
	echo "E2E FAIL ($FAILED of ${#RESULTS[@]} checks failed)"
	echo "e2e: $((${#RESULTS[@]} - FAILED)) passed, $FAILED failed"
	return 1
}

fatal() {
	record FAIL "$1" "$2"
	summary || true
	exit 1
}

# --- build everything ----------------------------------------------------------

if [[ -z ${QEMU:-} ]]; then
	[[ -x $E2E/build-qemu.sh ]] ||
		fatal qemu "tests/e2e/build-qemu.sh missing; set QEMU=/path"
	log "building QEMU (tests/e2e/build-qemu.sh)"
	QEMU=$("$E2E/build-qemu.sh" | tail -1)
fi
[[ -x $QEMU ]] || fatal qemu "not executable: $QEMU"
for dev in vhost-user-vgpu-pci vgpu-stub; do
	"$QEMU" -device help 2>/dev/null | grep -q "\"$dev\"" ||
		fatal qemu "$QEMU has no device $dev"
done
log "QEMU: $QEMU"

if [[ -z ${VGPU_DAEMON:-} ]]; then
	log "cargo build --release"
	(cd "$REPO" && cargo build --release >&2)
	VGPU_DAEMON=$REPO/target/release/vgpu-vhost-user
fi
# vgpu-admin drives the live config-change step; optional.
VGPU_ADMIN=${VGPU_ADMIN:-$(dirname "$VGPU_DAEMON")/vgpu-admin}
[[ -x $VGPU_DAEMON ]] || fatal daemon "not executable: $VGPU_DAEMON"
VGPU_CUDA_LIB=${VGPU_CUDA_LIB:-$(dirname "$VGPU_DAEMON")/libvgpucuda.so}
if [[ ! -e $VGPU_CUDA_LIB ]]; then
	log "cargo build --release -p vgpu-cuda-guest"
	(cd "$REPO" && cargo build --release -p vgpu-cuda-guest >&2)
	VGPU_CUDA_LIB=$REPO/target/release/libvgpucuda.so
fi

log "guest kernel, headers, busybox"
eval "$("$E2E/guest-assets.sh")"
log "guest kernel $GUEST_KREL"

log "building virtio_vgpu.ko and vgpu-client"
make -C "$REPO/guest-driver" module KDIR="$GUEST_KDIR" W=1 >"$WORK/build.log" 2>&1 ||
	{ cat "$WORK/build.log" >&2; fatal build "module build failed"; }
make -C "$REPO/guest-driver" client >>"$WORK/build.log" 2>&1 ||
	{ cat "$WORK/build.log" >&2; fatal build "client build failed"; }
if grep -q 'warning:' "$WORK/build.log"; then
	grep 'warning:' "$WORK/build.log" >&2
	record FAIL build "compiler warnings"
else
	record PASS build "virtio_vgpu.ko (Linux $GUEST_KREL) and static vgpu-client"
fi

# A CUDA program as programs are built: dynamically linked against
# libcudart.so.13 and libcuda.so.1 (both the guest library, as install.sh
# lays it out), so the guest gets this machine's loader and libc with it.
mkdir -p "$WORK/cudalib"
ln -s "$VGPU_CUDA_LIB" "$WORK/cudalib/libcudart.so.13"
ln -s "$VGPU_CUDA_LIB" "$WORK/cudalib/libcuda.so.1"
gcc -Wall -Wextra -Werror -O2 -o "$WORK/cuda-probe" "$E2E/cuda-probe.c" \
	-L"$WORK/cudalib" -Wl,--no-as-needed -l:libcudart.so.13 -l:libcuda.so.1 \
	>>"$WORK/build.log" 2>&1 ||
	{ cat "$WORK/build.log" >&2; fatal build "cuda-probe build failed"; }

"$E2E/mkinitramfs.sh" "$WORK/initrd.gz" "$GUEST_BUSYBOX" "$GUEST_MODDIR" \
	"$REPO/guest-driver/virtio_vgpu.ko" "$REPO/guest-driver/client/vgpu-client" \
	"/opt/vgpu/libvgpucuda.so=$VGPU_CUDA_LIB" \
	/opt/vgpu/libcudart.so.13=@libvgpucuda.so /opt/vgpu/libcuda.so.1=@libvgpucuda.so \
	"/bin/cuda-probe=$WORK/cuda-probe"

# --- the daemon ------------------------------------------------------------------

# VM table: id, pool, priority name, priority number
declare -A POOL=([1]=A [2]=B [3]=A)
declare -A PRIO=([1]=high [2]=medium [3]=low)
declare -A PRIONUM=([1]=2 [2]=1 [3]=0)
# vgpu-stub linked to the VM's vhost-user-vgpu-pci (vgpu=, live values from
# the daemon) or not (0: an old setup, the static properties only).
declare -A STUBLINK=([1]=1 [2]=0 [3]=1)

log "starting the daemon"
RUST_LOG=${RUST_LOG:-info} "$VGPU_DAEMON" --executor cpu \
	--vm "id=1,pool=A,priority=high,socket=$WORK/vm1.sock" \
	--vm "id=2,pool=B,priority=medium,socket=$WORK/vm2.sock" \
	--vm "id=3,pool=A,priority=low,socket=$WORK/vm3.sock" \
	>"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
for i in $(seq 200); do
	[[ -S $WORK/vm1.sock && -S $WORK/vm2.sock && -S $WORK/vm3.sock ]] && break
	kill -0 "$DAEMON_PID" 2>/dev/null || break
	sleep 0.1
done
[[ -S $WORK/vm1.sock && -S $WORK/vm2.sock && -S $WORK/vm3.sock ]] ||
	fatal daemon "no listening sockets (see daemon.log)"
record PASS daemon "listening on 3 sockets"

# --- guests ------------------------------------------------------------------------

if grep -Eqw 'vmx|svm' /proc/cpuinfo && [[ -w /dev/kvm ]]; then
	ACCEL=(-accel kvm -cpu host)
else
	# PVM or no KVM: guests cannot run on /dev/kvm here.
	ACCEL=(-accel tcg)
fi
log "accelerator: ${ACCEL[*]}"

start_vm() { # n
	local n=$1 fd i stub
	# After a frontend disconnects, the daemon listens again on a new
	# socket; QEMU must not start before it exists.
	for ((i = 0; i < 150; i++)); do
		[[ -S $WORK/vm$n.sock ]] && break
		sleep 0.1
	done
	[[ -S $WORK/vm$n.sock ]] || log "vm$n: $WORK/vm$n.sock does not exist"
	[[ -p $WORK/vm$n.in ]] || mkfifo "$WORK/vm$n.in"
	# Held open read-write so that neither side ever sees EOF or blocks.
	exec {fd}<>"$WORK/vm$n.in"
	VMFD[$n]=$fd
	[[ -e $WORK/vm$n.log ]] && mv "$WORK/vm$n.log" "$WORK/vm$n.prev.log"
	stub="vgpu-stub,pool_id=${POOL[$n]},priority=${PRIONUM[$n]},vm_id=$n"
	[[ ${STUBLINK[$n]:-1} == 1 ]] && stub="vgpu-stub,vgpu=vgpu0,${stub#vgpu-stub,}"
	"$QEMU" "${ACCEL[@]}" -m 256M -smp 1 \
		-object memory-backend-memfd,id=mem,size=256M,share=on \
		-machine q35,memory-backend=mem \
		-chardev "socket,id=vgpu0,path=$WORK/vm$n.sock" \
		-device vhost-user-vgpu-pci,id=vgpu0,chardev=vgpu0 \
		-device "$stub" \
		-nic none -display none -monitor none -no-reboot \
		-chardev stdio,id=ser0,signal=off -serial chardev:ser0 \
		-kernel "$GUEST_VMLINUZ" -initrd "$WORK/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet" \
		-L /usr/share/seabios -L /usr/share/qemu \
		<"$WORK/vm$n.in" >"$WORK/vm$n.log" 2>"$WORK/vm$n.err" &
	QPID[$n]=$!
	log "vm$n: qemu pid ${QPID[$n]}"
}

vmlog() { tr -d '\r' <"$WORK/vm$1.log"; }

vm_alive() { kill -0 "${QPID[$1]}" 2>/dev/null; }

wait_line() { # n regex timeout_s
	local n=$1 re=$2 t=$3 i
	for ((i = 0; i < t * 5; i++)); do
		vmlog "$n" | grep -Eq "$re" && return 0
		vm_alive "$n" || { vmlog "$n" | grep -Eq "$re"; return; }
		sleep 0.2
	done
	return 1
}

send() { # n command... ; sets ID
	local n=$1
	shift
	ID=$NEXT_ID
	NEXT_ID=$((NEXT_ID + 1))
	printf '%s %s\n' "$ID" "$*" >&"${VMFD[$n]}"
}

wait_done() { # n id timeout_s ; sets RC
	RC=
	wait_line "$1" "^CMD-DONE $2 " "$3" || return 1
	RC=$(vmlog "$1" | sed -n "s/^CMD-DONE $2 \([0-9]*\).*/\1/p" | head -1)
}

out() { # n id -> the command's output lines
	vmlog "$1" | sed -n "s/^OUT $2 //p"
}

# Run a command in guest n and wait for it; OUTPUT and RC are set.
guest() { # n timeout_s command...
	local n=$1 t=$2
	shift 2
	send "$n" "$@"
	if ! wait_done "$n" "$ID" "$t"; then
		OUTPUT=$(out "$n" "$ID")
		RC=timeout
		return 1
	fi
	OUTPUT=$(out "$n" "$ID")
	[[ $RC == 0 ]]
}

seq_of() { sed -n 's/.*resp op=[a-z-]* status=0 seq=\([0-9]*\).*/\1/p' | tail -1; }

# Module probed, sysfs and legacy registers equal to the host's assignment.
check_guest() { # n
	local n=$1 want
	if ! wait_line "$n" '^READY' "$BOOT_S"; then
		record FAIL "vm$n boot" "no READY (see vm$n.log, vm$n.err)"
		return 1
	fi
	if vmlog "$n" | grep -q '^MODULE-LOADED' &&
	   vmlog "$n" | grep -q '^DEVICE /dev/vgpu0' &&
	   vmlog "$n" | grep -q '^KMSG .*vgpu0: probed'; then
		record PASS "vm$n module" "$(vmlog "$n" | grep -m1 'vgpu0: probed' | sed 's/.*\] //')"
	else
		record FAIL "vm$n module" "$(vmlog "$n" | grep -E 'INSMOD-FAIL|KMSG' | tr '\n' ' ')"
		return 1
	fi

	want="pool=${POOL[$n]} priority=${PRIONUM[$n]} priority_name=${PRIO[$n]} vm_id=$n"
	if guest "$n" 60 vgpu-client info && grep -qx "$want" <<<"$OUTPUT"; then
		record PASS "vm$n sysfs+GET_INFO" "$(tr '\n' ' ' <<<"$OUTPUT" | cut -c1-150)"
	else
		record FAIL "vm$n sysfs+GET_INFO" "want '$want', rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
	fi

	want="magic=0x55504756 version=0x00010000 pool=${POOL[$n]} priority=${PRIONUM[$n]} vm_id=$n"
	if guest "$n" 60 vgpu-client legacy-regs && grep -q " $want\$" <<<"$OUTPUT"; then
		record PASS "vm$n legacy registers" "$want ($( ((${STUBLINK[$n]:-1})) && echo 'vgpu=, from the daemon' || echo 'static properties'))"
	else
		record FAIL "vm$n legacy registers" "want '$want', rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
	fi

	if guest "$n" 60 vgpu-client add 100 200 && [[ $(head -1 <<<"$OUTPUT") == 300 ]]; then
		record PASS "vm$n add 100 200" "$(tr '\n' ' ' <<<"$OUTPUT")"
	else
		record FAIL "vm$n add 100 200" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
	fi
}

log "booting three guests"
for n in 1 2 3; do
	start_vm "$n"
done
for n in 1 2 3; do
	check_guest "$n" || true
done

# The guest CUDA library over /dev/vgpu0 (VGPU_IOC_SUBMIT): the CPU executor
# has no CUDA device, so the runtime and the driver API answer the documented
# "no device" (docs/protocol.md, "CUDA API"): cudaErrorNoDevice /
# CUDA_ERROR_NO_DEVICE (100) and a count of 0. The library answers that too
# when it cannot reach a device, so the driver's counters must show the one
# CU_DEVICE_INFO request it sent, and a missing device node must be told
# apart (submitted unchanged).
cuda_cmd="s=/sys/kernel/debug/virtio_vgpu/vgpu0/stats; cat \$s; \
LD_LIBRARY_PATH=/opt/vgpu cuda-probe; echo probe_rc=\$?; cat \$s; \
VGPU_DEVICE=/dev/vgpu9 LD_LIBRARY_PATH=/opt/vgpu cuda-probe | sed 's/^/nodev /'; cat \$s"
want_probe="cudaGetDeviceCount count=0 error=100 cudaErrorNoDevice
cuInit error=100 CUDA_ERROR_NO_DEVICE
cuDeviceGetCount count=0 error=100 CUDA_ERROR_NO_DEVICE"
if guest 1 120 "$cuda_cmd" && grep -qx probe_rc=0 <<<"$OUTPUT" &&
   [[ $(grep -E '^cu' <<<"$OUTPUT") == "$want_probe" ]] &&
   [[ $(grep -c '^nodev .*error=100' <<<"$OUTPUT") == 3 ]]; then
	mapfile -t subs < <(grep -o 'submitted=[0-9]*' <<<"$OUTPUT" | cut -d= -f2)
	if ((${#subs[@]} == 3 && subs[1] - subs[0] == 1 && subs[2] == subs[1])); then
		record PASS "vm1 CUDA library /dev/vgpu0" "cudaGetDeviceCount/cuInit/cuDeviceGetCount: 0 devices, 100 (no device); 1 ioctl"
	else
		record FAIL "vm1 CUDA library /dev/vgpu0" "submitted counts ${subs[*]:-?}, want +1 then +0"
	fi
else
	record FAIL "vm1 CUDA library /dev/vgpu0" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT" | cut -c1-400)"
fi

if guest 1 120 vgpu-client vector-add 4096 && grep -q '^OK n=4096$' <<<"$OUTPUT"; then
	record PASS "vm1 vector-add 4096" "$(head -1 <<<"$OUTPUT")"
else
	record FAIL "vm1 vector-add 4096" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi
if guest 2 120 vgpu-client vector-add 100000 && grep -q '^OK n=100000$' <<<"$OUTPUT"; then
	record PASS "vm2 vector-add 100000" "$(head -1 <<<"$OUTPUT")"
else
	record FAIL "vm2 vector-add 100000" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi
# 32 MiB in, 16 MiB out: bounce buffers in 2 MiB chunks, indirect descriptors.
if guest 3 180 vgpu-client vector-add 4194304 && grep -q '^OK n=4194304$' <<<"$OUTPUT"; then
	record PASS "vm3 vector-add 4Mi (32 MiB)" "$(tr '\n' ' ' <<<"$OUTPUT")"
else
	record FAIL "vm3 vector-add 4Mi (32 MiB)" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi
if guest 1 120 vgpu-client bench 200; then
	record PASS "vm1 bench 200 pings" "$(grep '^bench' <<<"$OUTPUT")"
else
	record FAIL "vm1 bench 200 pings" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi

# Many processes with requests outstanding at once on one device.
conc_cmd="for i in \$(seq 40); do (vgpu-client -q add \$i 1000 >/tmp/c.\$i 2>&1; echo rc=\$? >>/tmp/c.\$i) & done; wait; \
for i in \$(seq 40); do grep -qx \$((i + 1000)) /tmp/c.\$i && grep -qx rc=0 /tmp/c.\$i && echo good || \
{ echo bad \$i; cat /tmp/c.\$i; }; done; rm -f /tmp/c.*"
if guest 2 120 "$conc_cmd" && [[ $(grep -cx good <<<"$OUTPUT") == 40 ]]; then
	record PASS "vm2 40 concurrent adds" "all 40 correct"
else
	record FAIL "vm2 40 concurrent adds" "rc=$RC: $(grep -v '^good$' <<<"$OUTPUT" | tr '\n' ' ' | cut -c1-300)"
fi

# More requests than fit: while a BUSY_WAIT holds the GPU, 400 threads submit
# a PING each. The daemon takes up to 64 (max_queued), the ring holds 256
# (indirect descriptors), the rest must wait in the driver for ring space.
flood_cmd="s=/sys/kernel/debug/virtio_vgpu/vgpu0/stats; vgpu-client busy-wait 1500 >/dev/null & sleep 0.3; \
vgpu-client -t 60000 flood 400; echo flood_rc=\$?; wait; cat \$s"
if guest 2 180 "$flood_cmd" && grep -q '^flood n=400 ok=400 failed=0$' <<<"$OUTPUT" &&
   grep -q '^flood_rc=0$' <<<"$OUTPUT"; then
	record PASS "vm2 flood 400" "$(grep '^submitted=' <<<"$OUTPUT")"
else
	record FAIL "vm2 flood 400" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT" | cut -c1-300)"
fi

# --- contention: priority order on a held GPU ---------------------------------------
#
# vm2 holds the GPU with a long BUSY_WAIT. While it runs, low, medium and high
# (in that arrival order, the reverse of priority) each submit one request;
# they must be dispatched high < medium < low.

log "contention: vm2 holds the GPU for $BUSY_MS ms"
send 2 "& vgpu-client busy-wait $BUSY_MS"
BUSY_ID=$ID
sleep 1.5
declare -A CID
for n in 3 2 1; do
	send "$n" "vgpu-client add $n 1000"
	CID[$n]=$ID
	sleep 0.3
done
declare -A CSEQ
ok=1
for n in 3 2 1; do
	if wait_done "$n" "${CID[$n]}" 60 && [[ $RC == 0 ]] &&
	   [[ $(out "$n" "${CID[$n]}" | head -1) == $((n + 1000)) ]]; then
		CSEQ[$n]=$(out "$n" "${CID[$n]}" | seq_of)
	else
		ok=0
		CSEQ[$n]=
		log "vm$n: contention request failed: $(out "$n" "${CID[$n]}" | tr '\n' ' ')"
	fi
done
if wait_done 2 "$BUSY_ID" 60 && [[ $RC == 0 ]]; then
	BSEQ=$(out 2 "$BUSY_ID" | seq_of)
else
	ok=0
	BSEQ=
fi
detail="busy=${BSEQ:-?} high=${CSEQ[1]:-?} medium=${CSEQ[2]:-?} low=${CSEQ[3]:-?}"
if ((ok)) && [[ -n $BSEQ && -n ${CSEQ[1]} && -n ${CSEQ[2]} && -n ${CSEQ[3]} ]] &&
   ((BSEQ < ${CSEQ[1]} && ${CSEQ[1]} < ${CSEQ[2]} && ${CSEQ[2]} < ${CSEQ[3]})); then
	record PASS "priority order" "dispatch_seq $detail"
else
	record FAIL "priority order" "dispatch_seq $detail (want busy < high < medium < low)"
fi

# --- a guest dies mid-request; the others keep working; it comes back -------------------

log "killing vm3 while it has a request in flight"
send 3 "& vgpu-client busy-wait 1500"
sleep 0.7
kill -9 "${QPID[3]}" 2>/dev/null || true
wait "${QPID[3]}" 2>/dev/null || true
sleep 0.5
check "daemon survives" "pid $DAEMON_PID after vm3 was killed" kill -0 "$DAEMON_PID"
for n in 1 2; do
	if guest "$n" 60 vgpu-client add 7 "$n" && [[ $(head -1 <<<"$OUTPUT") == $((7 + n)) ]]; then
		record PASS "vm$n after vm3 killed" "$(tr '\n' ' ' <<<"$OUTPUT")"
	else
		record FAIL "vm$n after vm3 killed" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
	fi
done

log "restarting vm3"
fd=${VMFD[3]}
exec {fd}>&-
start_vm 3
check_guest 3 || true
if guest 3 60 vgpu-client ping; then
	record PASS "vm3 after restart" "$(tr '\n' ' ' <<<"$OUTPUT")"
else
	record FAIL "vm3 after restart" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi

# --- driver robustness in vm1: timeouts, unbind and rmmod with requests in flight ---

# A wait that times out, or a waiter killed by a signal, leaves the request
# to the device (abandoned, freed when it comes back); the next one works.
abandon_cmd="s=/sys/kernel/debug/virtio_vgpu/vgpu0/stats; cat \$s; \
vgpu-client -t 300 busy-wait 1500; echo client_rc=\$?; \
vgpu-client busy-wait 1500 & p=\$!; sleep 0.5; kill \$p; wait \$p; echo killed_rc=\$?; \
vgpu-client add 1 1; cat \$s"
if guest 1 60 "$abandon_cmd" && grep -q 'timed out' <<<"$OUTPUT" &&
   grep -q '^client_rc=1$' <<<"$OUTPUT" && grep -q '^killed_rc=143$' <<<"$OUTPUT" &&
   grep -qx 2 <<<"$OUTPUT"; then
	before=$(grep -m1 -o 'abandoned=[0-9]*' <<<"$OUTPUT" | cut -d= -f2)
	after=$(grep -o 'abandoned=[0-9]*' <<<"$OUTPUT" | tail -1 | cut -d= -f2)
	if ((after - before == 2)); then
		record PASS "vm1 timeout/kill then reuse" "ETIMEDOUT after 300 ms, killed waiter; abandoned +2; next request OK"
	else
		record FAIL "vm1 timeout/kill then reuse" "abandoned $before -> $after, want +2"
	fi
else
	record FAIL "vm1 timeout/kill then reuse" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi

# Unbind with N requests in flight. Remove resets the device: the daemon
# finishes the running request and cancels what it had queued (CANCELLED);
# the driver fails chains still in the ring with ENODEV. No waiter may hang,
# and the device works again after bind.
drv=/sys/bus/virtio/drivers/virtio_vgpu
unbind_test() { # vm nreq name timeout_s
	local n=$1 k=$2 name=$3 t=$4 cmd
	cmd="d=\$(basename \$(readlink /sys/class/misc/vgpu0/device)); \
for i in \$(seq $k); do (vgpu-client busy-wait 1000 >/tmp/u.\$i 2>&1; echo rc=\$? >>/tmp/u.\$i) & done; \
sleep 1.5; echo \$d > $drv/unbind; wait; cat /tmp/u.*; rm -f /tmp/u.*; echo unbound; \
echo \$d > $drv/bind; sleep 0.5; vgpu-client add 2 2"
	if guest "$n" "$t" "$cmd" && [[ $(grep -c '^rc=[01]$' <<<"$OUTPUT") == "$k" ]] &&
	   grep -qx 4 <<<"$OUTPUT"; then
		record PASS "$name" "$(grep -c 'No such device' <<<"$OUTPUT") ENODEV, $(grep -c 'CANCELLED' <<<"$OUTPUT") CANCELLED, $(grep -c '^busy-wait done' <<<"$OUTPUT") completed; rebound device works"
	else
		record FAIL "$name" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT" | cut -c1-400)"
	fi
}
unbind_test 1 3 "vm1 unbind, 3 in flight" 60

# With no file open, the module unloads (remove path) and loads again.
if guest 1 60 "rmmod virtio_vgpu && insmod /lib/modules/virtio_vgpu.ko && sleep 0.5 && vgpu-client ping"; then
	record PASS "vm1 rmmod/insmod" "$(head -1 <<<"$OUTPUT")"
else
	record FAIL "vm1 rmmod/insmod" "rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT")"
fi

kernel_log_check() { # vm name
	local bad
	if guest "$1" 30 "dmesg | grep -v 'module verification failed' | grep -E 'WARNING|BUG:|Oops|Call Trace|virtio_vgpu.*(error|fail)'; echo dmesg-checked"; then
		bad=$(grep -v '^dmesg-checked$' <<<"$OUTPUT" || true)
		if [[ -z $bad ]]; then
			record PASS "$2" "no warnings"
		else
			record FAIL "$2" "$(tr '\n' ' ' <<<"$bad" | cut -c1-300)"
		fi
	else
		record FAIL "$2" "guest did not answer (rc=$RC)"
	fi
}
for n in 1 2 3; do
	kernel_log_check "$n" "vm$n kernel log"
done

# More requests than the daemon queues per VM (max_queued 64), so that some
# are still in the ring at reset (GET_VRING_BASE must still be answered).
if [[ ${VGPU_E2E_STRESS:-1} == 1 ]]; then
	unbind_test 2 70 "vm2 unbind, 70 in flight" 90
fi

check "daemon alive" "after all guest steps" kill -0 "$DAEMON_PID"
if grep -Eq 'panicked|RUST_BACKTRACE' "$WORK/daemon.log"; then
	record FAIL "daemon log" "$(grep -m1 -E 'panicked' "$WORK/daemon.log")"
else
	record PASS "daemon log" "no panics"
fi

# --- the backend vanishes with requests in flight ----------------------------------
#
# With the daemon killed nothing will ever complete vm1's requests; unbinding
# must still fail every waiter with ENODEV (the driver's detach path) and
# leave no warning in the kernel log.

log "killing the daemon while vm1 has requests in flight"
send 1 "& for i in 1 2 3 4 5; do (vgpu-client busy-wait 3000 >/tmp/g.\$i 2>&1; echo rc=\$? >>/tmp/g.\$i) & done; wait; cat /tmp/g.*; rm -f /tmp/g.*"
GONE_ID=$ID
sleep 1.5
kill -9 "$DAEMON_PID" 2>/dev/null || true
wait "$DAEMON_PID" 2>/dev/null || true
DAEMON_PID=
sleep 0.5
if guest 1 60 "echo \$(basename \$(readlink /sys/class/misc/vgpu0/device)) > $drv/unbind; echo unbound" &&
   wait_done 1 "$GONE_ID" 30 && [[ $(out 1 "$GONE_ID" | grep -c 'No such device') == 5 ]]; then
	record PASS "vm1 unbind, backend gone" "5 waiters got ENODEV"
else
	record FAIL "vm1 unbind, backend gone" "rc=$RC: $(out 1 "$GONE_ID" | tr '\n' ' ' | cut -c1-300)"
fi
kernel_log_check 1 "vm1 kernel log at end"

# --- shut down the three guests ------------------------------------------------

for n in 1 2 3; do
	vm_alive "$n" && send "$n" "poweroff -f"
done
for n in 1 2 3; do
	for i in $(seq 50); do
		vm_alive "$n" || break
		sleep 0.2
	done
	stop_pid "${QPID[$n]}"
done

# --- live config change: admin -> daemon -> QEMU -> guest .config_changed -------
#
# The daemon in database mode, one guest; vgpu-admin moves the VM to another
# pool and priority; the guest must log the change and show it in sysfs
# without a reboot, and the legacy vgpu-stub registers (linked with vgpu=)
# must show the new values too.

if [[ -x $VGPU_ADMIN ]]; then
	log "config change: daemon in database mode, vm4"
	export VGPU_DB=$WORK/vgpu.db
	"$VGPU_ADMIN" init >&2
	"$VGPU_ADMIN" register-vm 00000000-0000-0000-0000-0000000000e4 \
		--pool A --priority high --vm-id 4 --name e2e-vm4 >&2
	RUST_LOG=${RUST_LOG:-info} "$VGPU_DAEMON" --executor cpu --db "$VGPU_DB" \
		--socket-dir "$WORK" >"$WORK/daemon-db.out" 2>"$WORK/daemon-db.log" &
	DAEMON_PID=$!
	POOL[4]=A PRIO[4]=high PRIONUM[4]=2
	start_vm 4
	legacy_before=
	if wait_line 4 '^READY' "$BOOT_S" &&
	   guest 4 60 "cat /sys/class/misc/vgpu0/pool_id /sys/class/misc/vgpu0/priority" &&
	   [[ $(tr '\n' ' ' <<<"$OUTPUT") == "A 2 " ]]; then
		guest 4 60 vgpu-client legacy-regs || true
		legacy_before=$(grep '^legacy ' <<<"$OUTPUT" || true)
		"$VGPU_ADMIN" --socket-dir "$WORK" set-priority e2e-vm4 low >&2
		"$VGPU_ADMIN" --socket-dir "$WORK" set-pool e2e-vm4 B >&2
		ok=0
		for i in $(seq 20); do
			guest 4 30 "cat /sys/class/misc/vgpu0/pool_id /sys/class/misc/vgpu0/priority; dmesg | grep 'config changed' | tail -1" || break
			if [[ $(head -2 <<<"$OUTPUT" | tr '\n' ' ') == "B 0 " ]] &&
			   grep -q 'config changed: pool B priority 0 (low) vm_id 4' <<<"$OUTPUT"; then
				ok=1
				break
			fi
			sleep 0.5
		done
		if ((ok)); then
			record PASS "vm4 live config change" "A/high -> B/low: $(tail -1 <<<"$OUTPUT" | sed 's/.*\] //')"
		else
			record FAIL "vm4 live config change" "$(tr '\n' ' ' <<<"$OUTPUT")"
		fi
		# The same change in the legacy registers, which showed A/high
		# before it.
		before="magic=0x55504756 version=0x00010000 pool=A priority=2 vm_id=4"
		want="magic=0x55504756 version=0x00010000 pool=B priority=0 vm_id=4"
		if [[ $legacy_before == *" $before" ]] &&
		   guest 4 60 vgpu-client legacy-regs && grep -q " $want\$" <<<"$OUTPUT"; then
			record PASS "vm4 live legacy registers" "A/high -> B/low: $want"
		else
			record FAIL "vm4 live legacy registers" "before '${legacy_before:-?}' (want '$before'), after rc=$RC: $(tr '\n' ' ' <<<"$OUTPUT") (want '$want')"
		fi
	else
		record FAIL "vm4 live config change" "guest not ready or wrong initial values: $(tr '\n' ' ' <<<"${OUTPUT:-}")"
		record FAIL "vm4 live legacy registers" "not run: the guest was not ready"
	fi
	vm_alive 4 && send 4 "poweroff -f"
else
	record SKIP "vm4 live config change" "no vgpu-admin next to the daemon (set VGPU_ADMIN)"
	record SKIP "vm4 live legacy registers" "no vgpu-admin next to the daemon (set VGPU_ADMIN)"
fi

summary
