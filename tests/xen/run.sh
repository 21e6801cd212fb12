#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Tests of xen/ (qemu-wrapper module and patch, xapi hook) against stand-in
# xe / xenstore-read / xenstore-write (tests/xen/standins) and the real
# vgpu-admin. Prints "N passed, M failed"; exit status 1 if any failed.
#
#   tests/xen/run.sh                       (builds vgpu-admin and the daemon if needed)
#   VGPU_ADMIN=/path/to/vgpu-admin VGPU_DAEMON=/path/to/vgpu-vhost-user tests/xen/run.sh
#
# As root the bind-mount tests run too (CI runs as root); otherwise they are
# reported as skipped.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ -z ${VGPU_ADMIN:-} || -z ${VGPU_DAEMON:-} ]]; then
	(cd "$REPO" && cargo build --release --bin vgpu-admin --bin vgpu-vhost-user >&2)
	VGPU_ADMIN=${VGPU_ADMIN:-$REPO/target/release/vgpu-admin}
	VGPU_DAEMON=${VGPU_DAEMON:-$REPO/target/release/vgpu-vhost-user}
fi
export VGPU_ADMIN VGPU_DAEMON VGPU_REPO=$REPO
exec python3 "$REPO/tests/xen/test_xen.py"
