#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The e2e-xen test proper, run in the Dom0 by dom0-init.sh: the vgpu daemon's
# Xen build, two HVM guests created with xl whose device model is the
# project's QEMU with the vhost-user-vgpu-pci and vgpu-stub devices, and the
# checks inside the guests (their /init is tests/e2e/guest-init.sh, driven
# through a serial console on a pipe chardev).
#
# Every result is one line on the console:
#   E2EX-RESULT PASS|FAIL <name> <detail>
# and at the end
#   E2EX-SUMMARY <passed> <failed>
# Files: /vgpu/bin (qemu-system-x86_64, vgpu-vhost-user, vgpu-admin),
# /vgpu/guest (vmlinuz, initrd.gz).
set -uo pipefail
export PATH=/usr/lib/xen-4.17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

V=/vgpu
W=/run/e2e
SOCK=/run/vgpu
BOOT_S=${BOOT_S:-900}
BUSY_MS=${BUSY_MS:-8000}
XL_T=180
mkdir -p "$W" "$SOCK"
PASSED=0 FAILED=0
DAEMON_PID=
declare -A DOMID VMFD CATPID
NEXT_ID=1

now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "E2EX-LOG $(now)s: $*"; }
record() { # PASS|FAIL name detail
	echo "E2EX-RESULT $1 $2 ${3:-}"
	if [[ $1 == PASS ]]; then PASSED=$((PASSED + 1)); else FAILED=$((FAILED + 1)); fi
}
finish() {
	local f
	for f in "$W"/daemon.log /var/log/xen/qemu-dm-vgpu-g1.log /var/log/xen/qemu-dm-vgpu-g2.log \
		 /var/log/xen/xl-vgpu-g1.log /var/log/xen/xl-vgpu-g2.log "$W"/xl-create-g1.log "$W"/xl-create-g2.log \
		 "$W"/g1.log "$W"/g2.log; do
		[[ -s $f ]] || continue
		tail -n 40 "$f" | tr -d '\r' | sed "s|^|E2EX-TAIL $(basename "$f"): |"
	done
	echo "E2EX-SUMMARY $PASSED $FAILED"
	exit 0
}

# --- the binaries --------------------------------------------------------------
QEMU=$V/bin/qemu-system-x86_64
if [[ -x $V/bin/qemu-system-i386 ]]; then
	# XCP-ng's QEMU 4.2 as the device model (run.sh VGPU_E2E_XEN_DM).
	QEMU=$V/bin/qemu-system-i386
	export LD_LIBRARY_PATH=$V/lib-dm
fi
if out=$("$QEMU" -accel help 2>&1) && grep -qx xen <<<"$out" &&
   "$QEMU" -device help 2>&1 | grep -q '"vhost-user-vgpu-pci"'; then
	record PASS qemu "$("$QEMU" --version | head -1); accelerators $(grep -v : <<<"$out" | tr '\n' ' ')"
else
	record FAIL qemu "device model does not run in Dom0: $(tr '\n' ' ' <<<"$out" | cut -c1-300)"
	finish
fi
log "xl info: $(timeout 60 xl info | grep -E '^(xen_version|virt_caps|free_memory)' | tr -s ' ' | tr '\n' ' ')"

# --- the daemon (Xen build), database mode ----------------------------------------
export VGPU_DB=$W/vgpu.db
"$V/bin/vgpu-admin" init >"$W/admin.log" 2>&1 &&
"$V/bin/vgpu-admin" register-vm 00000000-0000-0000-0000-0000000000a1 \
	--pool A --priority high --vm-id 1 --name g1 >>"$W/admin.log" 2>&1 &&
"$V/bin/vgpu-admin" register-vm 00000000-0000-0000-0000-0000000000a2 \
	--pool B --priority low --vm-id 2 --name g2 >>"$W/admin.log" 2>&1 ||
	{ record FAIL admin "$(tr '\n' ' ' <<<"$(cat "$W/admin.log")")"; finish; }
declare -A POOL=([1]=A [2]=B) PRIO=([1]=high [2]=low) PRIONUM=([1]=2 [2]=0)

RUST_LOG=${RUST_LOG:-info} "$V/bin/vgpu-vhost-user" --executor cpu --db "$VGPU_DB" \
	--socket-dir "$SOCK" >"$W/daemon.out" 2>"$W/daemon.log" &
DAEMON_PID=$!
for i in $(seq 100); do
	[[ -S $SOCK/vm1.sock && -S $SOCK/vm2.sock ]] && break
	sleep 0.2
done
if [[ -S $SOCK/vm1.sock && -S $SOCK/vm2.sock ]]; then
	record PASS daemon "Xen build (--features xen) listening on vm1.sock, vm2.sock"
else
	record FAIL daemon "no sockets: $(tail -5 "$W/daemon.log" | tr '\n' ' ')"
	finish
fi

# --- guests ---------------------------------------------------------------------------
write_cfg() { # n
	local n=$1
	cat >"$W/g$n.cfg" <<EOF
name = "vgpu-g$n"
type = "hvm"
memory = 256
vcpus = 1
hap = 0
tsc_mode = "native"
kernel = "$V/guest/vmlinuz"
ramdisk = "$V/guest/initrd.gz"
extra = "console=ttyS0 panic=-1 quiet"
vga = "none"
vnc = 0
sdl = 0
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
device_model_version = "qemu-xen"
device_model_override = "$V/bin/qemu-dm"
device_model_args = [ "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
  "-chardev", "socket,id=vgpu$n,path=$SOCK/vm$n.sock",
  "-device", "vhost-user-vgpu-pci,chardev=vgpu$n",
  "-device", "vgpu-stub,pool_id=${POOL[$n]},priority=${PRIONUM[$n]},vm_id=$n",
  "-chardev", "pipe,id=ser0,path=$W/g$n",
  "-serial", "chardev:ser0",
  "-trace", "vhost_user_set_mem_table_xen" ]
EOF
}

dm_alive() { # n: the device model of guest n runs
	local d=${DOMID[$1]:-}
	[[ -n $d ]] || return 1
	pgrep -f -- "-xen-domid $d " >/dev/null
}

create_once() { # n
	local n=$1 i
	[[ -p $W/g$n.in ]] || mkfifo "$W/g$n.in"
	[[ -p $W/g$n.out ]] || mkfifo "$W/g$n.out"
	# Held open read-write so that neither side sees EOF or blocks.
	exec {fd}<>"$W/g$n.in"
	VMFD[$n]=$fd
	cat <"$W/g$n.out" >>"$W/g$n.log" &
	CATPID[$n]=$!
	for i in $(seq 50); do [[ -S $SOCK/vm$n.sock ]] && break; sleep 0.2; done
	log "g$n: xl create"
	if ! timeout "$XL_T" xl create "$W/g$n.cfg" >>"$W/xl-create-g$n.log" 2>&1; then
		log "g$n: xl create failed: $(tail -3 "$W/xl-create-g$n.log" | tr '\n' ' ')"
		return 1
	fi
	DOMID[$n]=$(timeout 30 xl domid "vgpu-g$n" 2>/dev/null)
	log "g$n: domid ${DOMID[$n]:-?}"
	sleep 3
	dm_alive "$n"
}

drop_guest() { # n
	local n=$1
	timeout 60 xl destroy "vgpu-g$n" >/dev/null 2>&1 || true
	kill "${CATPID[$n]:-}" 2>/dev/null || true
	local fd=${VMFD[$n]:-}
	[[ -n $fd ]] && exec {fd}>&-
	DOMID[$n]=
}

create_guest() { # n: one retry if the device model died, logged, never more
	local n=$1
	write_cfg "$n"
	create_once "$n" && return 0
	# The hypervisor refusing the domain is not the flakiness a retry is for.
	if grep -q 'libxl__domain_make: domain creation fail' "$W/xl-create-g$n.log"; then
		drop_guest "$n"
		return 1
	fi
	log "g$n: RETRY: device model died on create; qemu-dm log: $(tail -5 /var/log/xen/qemu-dm-vgpu-g$n.log 2>/dev/null | tr '\n' ' ')"
	echo "E2EX-RETRY g$n"
	drop_guest "$n"
	sleep 2
	create_once "$n"
}

glog() { tr -d '\r' <"$W/g$1.log"; }
# Time-based: under TCG every fork in the Dom0 is slow, so loop counts lie.
wait_line() { # n regex timeout_s
	local n=$1 re=$2 end=$((SECONDS + $3)) i=0
	while ((SECONDS < end)); do
		grep -Eq "$re" "$W/g$n.log" && return 0
		((i++ % 20 == 0)) && ! dm_alive "$n" && { grep -Eq "$re" "$W/g$n.log"; return; }
		sleep 0.5
	done
	return 1
}
# The last lines of a guest's console, for a failed step.
gtail() { glog "$1" | grep -v '^OUT ' | tail -n "${2:-8}" | sed "s/^/E2EX-LOG g$1 console: /"; }
send() { ID=$NEXT_ID; NEXT_ID=$((NEXT_ID + 1)); printf '%s %s\n' "$ID" "${*:2}" >&"${VMFD[$1]}"; }
wait_done() { # n id timeout -> RC
	RC=
	wait_line "$1" "^CMD-DONE $2 " "$3" || return 1
	RC=$(glog "$1" | sed -n "s/^CMD-DONE $2 \([0-9]*\).*/\1/p" | head -1)
}
out() { glog "$1" | sed -n "s/^OUT $2 //p"; }
guest() { # n timeout cmd...
	local n=$1 t=$2
	shift 2
	send "$n" "$@"
	if ! wait_done "$n" "$ID" "$t"; then
		OUTPUT=$(out "$n" "$ID")
		RC=timeout
		log "g$n: '$*' did not finish in $t s"
		gtail "$n"
		return 1
	fi
	OUTPUT=$(out "$n" "$ID")
	[[ $RC == 0 ]]
}
seq_of() { sed -n 's/.*resp op=[a-z-]* status=0 seq=\([0-9]*\).*/\1/p' | tail -1; }
flat() { tr '\n' ' ' | cut -c1-${1:-250}; }

T0=$(now)
for n in 1 2; do
	if create_guest "$n"; then
		record PASS "g$n create" "domid ${DOMID[$n]}, device model running ($(awk -v a="$T0" -v b="$(now)" 'BEGIN{printf "%.0f", b-a}') s since first create)"
	else
		record FAIL "g$n create" "$(tail -5 "$W/xl-create-g$n.log" | flat)"
	fi
done

# The device model's memory table: XEN_MMAP foreign regions of the guest's domain.
sleep 2
for n in 1 2; do
	[[ -n ${DOMID[$n]:-} ]] || continue
	if wait_line "$n" '^BOOTED' "$BOOT_S"; then
		log "g$n: guest kernel at /init at $(now)s"
	fi
done

check_guest() { # n
	local n=$1 want regions
	regions=$(grep -v 'qemu-dm: exec' "/var/log/xen/qemu-dm-vgpu-g$n.log" 2>/dev/null |
		grep 'vhost_user_set_mem_table_xen ' | sed 's/.*vhost_user_set_mem_table_xen //' | sort -u)
	if grep -q "xen mmap flags:0x1 domid:${DOMID[$n]}\$" <<<"$regions"; then
		record PASS "g$n XEN_MMAP memory table" "$(flat 300 <<<"$regions")"
	else
		record FAIL "g$n XEN_MMAP memory table" "no foreign region for domid ${DOMID[$n]}: $(flat 300 <<<"$regions")"
	fi
	if ! wait_line "$n" '^READY' "$BOOT_S"; then
		record FAIL "g$n boot" "no READY: $(glog "$n" | tail -5 | flat)"
		return 1
	fi
	glog "$n" | grep -E '^(BOOTED|MODULE-LOADED|INSMOD-FAIL|KMSG|DEVICE)' | cut -c1-300 | sed "s/^/E2EX-LOG g$n: /"
	if glog "$n" | grep -q '^MODULE-LOADED' && glog "$n" | grep -q '^KMSG .*vgpu0: probed'; then
		record PASS "g$n module probed" "$(glog "$n" | grep -m1 'vgpu0: probed' | sed 's/.*\] //')"
	else
		record FAIL "g$n module probed" "$(glog "$n" | grep -E 'INSMOD-FAIL|KMSG|DEVICE' | flat)"
	fi
	want="pool=${POOL[$n]} priority=${PRIONUM[$n]} priority_name=${PRIO[$n]} vm_id=$n"
	if guest "$n" 120 vgpu-client info && grep -qx "$want" <<<"$OUTPUT"; then
		record PASS "g$n config space" "$(flat 200 <<<"$OUTPUT")"
	else
		record FAIL "g$n config space" "want '$want', rc=$RC: $(flat <<<"$OUTPUT")"
	fi
	want="magic=0x55504756 version=0x00010000 pool=${POOL[$n]} priority=${PRIONUM[$n]} vm_id=$n"
	if guest "$n" 120 vgpu-client legacy-regs && grep -q " $want\$" <<<"$OUTPUT"; then
		record PASS "g$n legacy registers" "$want"
	else
		record FAIL "g$n legacy registers" "want '$want', rc=$RC: $(flat <<<"$OUTPUT")"
	fi
	if guest "$n" 120 vgpu-client add 100 200 && [[ $(head -1 <<<"$OUTPUT") == 300 ]]; then
		record PASS "g$n add 100 200" "$(flat <<<"$OUTPUT")"
	else
		record FAIL "g$n add 100 200" "rc=$RC: $(flat <<<"$OUTPUT")"
	fi
}

for n in 1 2; do
	[[ -n ${DOMID[$n]:-} ]] || continue
	check_guest "$n" || true
done
log "guests checked at $(now)s"

if [[ -n ${DOMID[1]:-} ]] && guest 1 300 vgpu-client vector-add 4096 && grep -q '^OK n=4096$' <<<"$OUTPUT"; then
	record PASS "g1 vector-add 4096" "$(head -1 <<<"$OUTPUT")"
else
	record FAIL "g1 vector-add 4096" "rc=${RC:-}: $(flat <<<"${OUTPUT:-}")"
fi
if [[ -n ${DOMID[2]:-} ]] && guest 2 300 vgpu-client vector-add 100000 && grep -q '^OK n=100000$' <<<"$OUTPUT"; then
	record PASS "g2 vector-add 100000" "$(head -1 <<<"$OUTPUT")"
else
	record FAIL "g2 vector-add 100000" "rc=${RC:-}: $(flat <<<"${OUTPUT:-}")"
fi
# Kick/call round trips without KVM (QEMU's user-space ioeventfd dispatch
# and MSI injection through Xen): measured, not asserted beyond success.
if [[ -n ${DOMID[1]:-} ]] && guest 1 300 vgpu-client bench 20; then
	record PASS "g1 bench 20 pings" "$(grep '^bench' <<<"$OUTPUT" | flat)"
else
	record FAIL "g1 bench 20 pings" "rc=${RC:-}: $(flat <<<"${OUTPUT:-}")"
fi

# --- priority order between the two guests ---------------------------------------------
# g2 (low) holds the GPU with a BUSY_WAIT; then g2 submits an add (low), and
# only after it g1 submits one (high). Dispatch must be busy < high < low.
if [[ -n ${DOMID[1]:-} && -n ${DOMID[2]:-} ]]; then
	send 2 "& vgpu-client busy-wait $BUSY_MS"
	BUSY_ID=$ID
	sleep 2
	send 2 "vgpu-client add 2 1000"
	LOW_ID=$ID
	sleep 1
	send 1 "vgpu-client add 1 1000"
	HIGH_ID=$ID
	ok=1
	wait_done 1 "$HIGH_ID" 180 && [[ $RC == 0 && $(out 1 "$HIGH_ID" | head -1) == 1001 ]] || ok=0
	HSEQ=$(out 1 "$HIGH_ID" | seq_of)
	wait_done 2 "$LOW_ID" 180 && [[ $RC == 0 && $(out 2 "$LOW_ID" | head -1) == 1002 ]] || ok=0
	LSEQ=$(out 2 "$LOW_ID" | seq_of)
	wait_done 2 "$BUSY_ID" 180 && [[ $RC == 0 ]] || ok=0
	BSEQ=$(out 2 "$BUSY_ID" | seq_of)
	detail="dispatch_seq busy=${BSEQ:-?} high(g1)=${HSEQ:-?} low(g2)=${LSEQ:-?}"
	if ((ok)) && [[ -n $BSEQ && -n $HSEQ && -n $LSEQ ]] && ((BSEQ < HSEQ && HSEQ < LSEQ)); then
		record PASS "priority order" "$detail (low submitted first)"
	else
		record FAIL "priority order" "$detail, want busy < high < low"
	fi
else
	record FAIL "priority order" "needs both guests"
fi

# --- live priority change: vgpu-admin -> daemon -> QEMU -> guest ------------------------------
if [[ -n ${DOMID[2]:-} ]]; then
	if "$V/bin/vgpu-admin" --socket-dir "$SOCK" set-priority g2 medium >"$W/admin-set.log" 2>&1; then
		ok=0
		for i in $(seq 30); do
			guest 2 60 "cat /sys/class/misc/vgpu0/priority; dmesg | grep 'config changed' | tail -1" || break
			if [[ $(head -1 <<<"$OUTPUT") == 1 ]] &&
			   grep -q 'config changed: pool B priority 1 (medium) vm_id 2' <<<"$OUTPUT"; then
				ok=1
				break
			fi
			sleep 1
		done
		if ((ok)); then
			record PASS "g2 live priority change" "low -> medium: $(tail -1 <<<"$OUTPUT" | sed 's/.*\] //')"
		else
			record FAIL "g2 live priority change" "$(flat <<<"${OUTPUT:-}")"
		fi
	else
		record FAIL "g2 live priority change" "vgpu-admin: $(flat <"$W/admin-set.log")"
	fi
else
	record FAIL "g2 live priority change" "no guest"
fi

if kill -0 "$DAEMON_PID" 2>/dev/null && ! grep -q panicked "$W/daemon.log"; then
	record PASS "daemon alive" "no panics"
else
	record FAIL "daemon alive" "$(grep -m1 panicked "$W/daemon.log")"
fi
for n in 1 2; do
	[[ -n ${DOMID[$n]:-} ]] && { send "$n" "poweroff -f"; sleep 1; drop_guest "$n"; }
done
finish
