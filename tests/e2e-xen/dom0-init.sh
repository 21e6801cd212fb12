#!/bin/bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# PID 1 of the e2e-xen Dom0 (kernel command line init=/vgpu/dom0-init.sh).
# Mounts what Xen's tools need, loads the Xen device modules, starts
# xenstored and xenconsoled, runs /vgpu/dom0-test.sh and powers the machine
# off (Xen then shuts down and the outer QEMU exits: -no-reboot).
#
# Everything is printed on hvc0, the Xen console, which the outer QEMU writes
# to its serial log; lines that start with "E2EX" are read by run.sh.
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/console >/dev/console 2>&1

say() { echo "E2EX-LOG dom0 $(cut -d' ' -f1 /proc/uptime 2>/dev/null)s: $*"; }
bb=/bin/busybox

$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null || true
$bb mkdir -p /dev/pts /dev/shm
$bb mount -t devpts devpts /dev/pts
$bb mount -t tmpfs tmpfs /run
$bb mount -t tmpfs tmpfs /tmp
$bb mount -o remount,rw /
dmesg -n 1
mkdir -p /run/xen /run/xenstored /var/log/xen /var/lib/xen /var/lib/xenstored /run/lock
say "userspace up, kernel $(uname -r)"

for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd; do
	modprobe "$m" || say "modprobe $m failed"
done
$bb mount -t xenfs xenfs /proc/xen || say "mount xenfs failed"
udevd=$(command -v udevd || echo /lib/systemd/systemd-udevd)
if [[ -x $udevd ]]; then
	"$udevd" --daemon && udevadm trigger --action=add && udevadm settle --timeout=20
fi
ls -l /dev/xen || true

XENBIN=/usr/lib/xen-4.17/bin
PATH=$XENBIN:$PATH
XENSTORED_ROOTDIR=/run/xenstored xenstored --pid-file /run/xenstored.pid || say "xenstored failed"
for i in $(seq 50); do
	xenstore-read /local/domain/0/name >/dev/null 2>&1 && break
	xenstore-write /local/domain/0/name Domain-0 >/dev/null 2>&1 && break
	sleep 0.2
done
xen-init-dom0 || say "xen-init-dom0 failed"
mkdir -p /var/log/xen/console
xenconsoled --pid-file=/run/xenconsoled.pid || say "xenconsoled failed"
say "xen tools up: $(timeout 60 xl info 2>/dev/null | grep -E '^(xen_version|virt_caps)' | tr -s ' ' | tr '\n' ' ')"

bash /vgpu/dom0-test.sh
say "dom0-test.sh exited $?"
sync
echo o >/proc/sysrq-trigger
sleep 30
$bb poweroff -f
