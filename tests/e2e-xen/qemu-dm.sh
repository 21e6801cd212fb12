#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Device model of the e2e-xen guests (device_model_override): the project's
# QEMU, built without VNC (--without-default-features), so the "-vnc none"
# that libxl always passes is dropped here; everything else goes to QEMU
# unchanged. The command line is logged to stderr (xl's qemu-dm log).
set -euo pipefail
args=()
while [[ $# -gt 0 ]]; do
	if [[ $1 == -vnc && ${2:-} == none ]]; then
		shift 2
		continue
	fi
	args+=("$1")
	shift
done
if [[ -x /vgpu/bin/qemu-system-i386 ]]; then
	# XCP-ng's QEMU 4.2 (run.sh VGPU_E2E_XEN_DM). XCP-ng's queue removed
	# the XenStore "running" record (xenopsd waits on QMP instead), and libxl
	# waits for it: write it once QEMU's QMP socket (libxl's -chardev
	# socket,id=libxl-cmd,path=...) exists.
	domid= qmp=
	for ((i = 0; i < ${#args[@]}; i++)); do
		case ${args[i]} in
		-xen-domid) domid=${args[i + 1]} ;;
		socket,id=libxl-cmd,path=*) qmp=${args[i]#socket,id=libxl-cmd,path=}; qmp=${qmp%%,*} ;;
		esac
	done
	if [[ -n $domid && -n $qmp ]]; then
		(for _ in $(seq 600); do [[ -S $qmp ]] && break; sleep 0.1; done
		 xenstore-write "/local/domain/0/device-model/$domid/state" running) </dev/null >&2 &
	fi
	echo "qemu-dm: exec /vgpu/bin/qemu-system-i386 ${args[*]}" >&2
	LD_LIBRARY_PATH=/vgpu/lib-dm exec /vgpu/bin/qemu-system-i386 "${args[@]}"
fi
echo "qemu-dm: exec /vgpu/bin/qemu-system-x86_64 ${args[*]}" >&2
exec /vgpu/bin/qemu-system-x86_64 "${args[@]}"
