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
echo "qemu-dm: exec /vgpu/bin/qemu-system-x86_64 ${args[*]}" >&2
exec /vgpu/bin/qemu-system-x86_64 "${args[@]}"
