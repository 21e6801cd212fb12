#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the guest that tests/cuda-apps/guest.sh boots: loads the virtio
# stack and virtio_vgpu.ko, then runs every program of /apps/list (one
# "name args..." a line, in /apps) through the guest CUDA library over
# /dev/vgpu0, and powers off. Output on the serial console, one line each:
#
#   GUEST <kernel> <device>    booted, module loaded
#   INFO <line>                vgpu-client info (the host's assignment)
#   BEGIN <name>               a program starts
#   OUT <name> <line>          its stdout, then "rc=<exit status>"
#   ERR <name> <line>          its stderr
#   END <name>
#   STATS <line>               the driver's counters at the end
#   ALL-DONE
#
# Kernel messages are kept off the console (dmesg -n 1) so that they cannot
# split these lines.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /tmp
dmesg -n 1

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
	 virtio_pci virtio_vgpu; do
	[ -e /lib/modules/$m.ko ] || continue
	insmod /lib/modules/$m.ko || echo "INSMOD-FAIL $m"
done
i=0
while [ ! -e /dev/vgpu0 ] && [ $i -lt 100 ]; do
	sleep 0.1
	i=$((i + 1))
done
echo "GUEST $(uname -r) $(ls /dev/vgpu0 2>&1)"
vgpu-client info 2>&1 | sed 's/^/INFO /'

cd /apps
while read -r name args; do
	[ -n "$name" ] || continue
	echo "BEGIN $name"
	# shellcheck disable=SC2086 # args are words
	LD_LIBRARY_PATH=/opt/vgpu timeout 120 ./$name $args </dev/null >/tmp/o 2>/tmp/e
	echo "rc=$?" >>/tmp/o
	sed "s/^/OUT $name /" /tmp/o
	sed "s/^/ERR $name /" /tmp/e
	echo "END $name"
done </apps/list
sed 's/^/STATS /' /sys/kernel/debug/virtio_vgpu/vgpu0/stats
dmesg | grep -E 'WARNING|BUG:|Oops|vgpu' | sed 's/^/KMSG /'
echo ALL-DONE
poweroff -f
