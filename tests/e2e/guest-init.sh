#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# /init of the e2e test initramfs. Loads the virtio stack and virtio_vgpu.ko,
# then serves commands that the host writes to the serial console, one per
# line, so the host script decides the timing of every step:
#
#   <id> <shell command>      run it, then print its output and rc
#   <id> & <shell command>    the same, in the background
#
# Output, one line each, easy to grep on the host:
#
#   READY                     waiting for commands
#   OUT <id> <line>           the command's stdout+stderr, after it ended
#   CMD-DONE <id> <rc>        the command ended with exit status rc
#   MODULE-LOADED | INSMOD-FAIL <module>
#   KMSG <line>               kernel log lines about vgpu, after loading
#
# Kernel messages are kept off the console (dmesg -n 1) so that they cannot
# split these lines.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The driver's counters (virtio_vgpu/vgpuN/stats) live in debugfs.
mount -t debugfs debugfs /sys/kernel/debug
mkdir -p /tmp
dmesg -n 1
stty -echo 2>/dev/null

echo "BOOTED $(uname -r)"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
	 virtio_pci virtio_vgpu; do
	# Absent: built into this kernel (mkinitramfs.sh checked).
	[ -e "/lib/modules/$m.ko" ] || continue
	if ! insmod "/lib/modules/$m.ko"; then
		echo "INSMOD-FAIL $m"
	fi
done
# Probe runs from insmod for devices already present; give udev-less
# devtmpfs a moment to create the nodes.
i=0
while [ ! -e /dev/vgpu0 ] && [ $i -lt 20 ]; do
	sleep 0.1
	i=$((i + 1))
done
lsmod | grep -q '^virtio_vgpu' && echo "MODULE-LOADED"
dmesg | grep -i vgpu | sed 's/^/KMSG /'
for d in /dev/vgpu*; do
	[ -e "$d" ] && echo "DEVICE $d"
done

run() {
	id=$1
	shift
	sh -c "$*" >"/tmp/out.$id" 2>&1
	rc=$?
	sed "s/^/OUT $id /" "/tmp/out.$id"
	rm -f "/tmp/out.$id"
	echo "CMD-DONE $id $rc"
}

echo "READY"
while read -r id cmd; do
	[ -n "$id" ] || continue
	case "$cmd" in
	"& "*)
		run "$id" "${cmd#& }" &
		;;
	*)
		run "$id" "$cmd"
		;;
	esac
done
echo "CONSOLE-EOF"
poweroff -f
