#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Drive the 4.2 device model's vgpu devices through QEMU's qtest protocol.

XCP-ng's QEMU is built --disable-tcg --disable-kvm: outside Xen it cannot
run a guest, but with -accel qtest the machine, its PCI bus and the devices
are real, and a test plays the guest's driver by reading and writing guest
physical memory, port I/O and PCI config space. This is what smoke.sh runs
against the real vgpu daemon (vgpu-vhost-user, memfd guest RAM):

  phase "initial":  find vgpu-stub (1af4:1111) and vhost-user-vgpu-pci
      (1af4:107f), map their BARs, check the stub registers and the virtio
      device config (both come from the daemon: VHOST_USER_GET_CONFIG);
      bring the virtio device up like a driver (features, queue 0, DRIVER_OK:
      SET_MEM_TABLE, rings, kick/call eventfds) and send SCALAR_ADD_I32
      100 + 200 on the queue, kick through the notify region, wait for the
      used ring and check the response (status OK, 300).
  phase "changed": after vgpu-admin moved the VM (smoke.sh), the stub
      registers and the virtio config show the new pool/priority and the
      config generation moved (the daemon's config-change message reached
      QEMU while the driver was up).

Usage: qtest-vgpu.py QEMU-ARGS... (QEMU is started here with -qtest stdio);
commands come on this script's stdin ("initial POOL PRIO VMID",
"changed POOL PRIO VMID", "quit"); results go to stdout as "PASS name: ..."
or "FAIL name: ...".
"""

import struct
import subprocess
import sys
import time

STUB_ID = 0x11111AF4
VGPU_ID = 0x107F1AF4
STUB_BAR = 0xFE000000
VIRTIO_BAR = 0xFD000000

# guest physical layout of the one queue and the request (256 MiB of RAM)
DESC, AVAIL, USED = 0x100000, 0x101000, 0x102000
REQ, RESP = 0x200000, 0x201000
QSIZE = 256


class Qtest:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv + ["-qtest", "stdio"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        while True:
            r = self.p.stdout.readline()
            if not r:
                raise RuntimeError(f"QEMU exited (on '{line}')")
            r = r.strip()
            if r.startswith("IRQ"):
                continue
            if not r.startswith("OK"):
                raise RuntimeError(f"'{line}': {r}")
            parts = r.split()
            return int(parts[1], 16) if len(parts) > 1 else None

    # PCI config space through 0xcf8/0xcfc
    def cfg_addr(self, slot, reg):
        self.cmd("outl 0xcf8 0x%x" % (0x80000000 | (slot << 11) | (reg & 0xFC)))

    def cfg_read(self, slot, reg, size=4):
        self.cfg_addr(slot, reg)
        op = {1: "inb", 2: "inw", 4: "inl"}[size]
        return self.cmd("%s 0x%x" % (op, 0xCFC + (reg & 3)))

    def cfg_write(self, slot, reg, val, size=4):
        self.cfg_addr(slot, reg)
        op = {1: "outb", 2: "outw", 4: "outl"}[size]
        self.cmd("%s 0x%x 0x%x" % (op, 0xCFC + (reg & 3), val))

    def rd(self, addr, size=4):
        return self.cmd("%s 0x%x" % ({1: "readb", 2: "readw", 4: "readl", 8: "readq"}[size], addr))

    def wr(self, addr, val, size=4):
        self.cmd("%s 0x%x 0x%x" % ({1: "writeb", 2: "writew", 4: "writel", 8: "writeq"}[size],
                                   addr, val))

    def write_bytes(self, addr, data):
        self.cmd("write 0x%x 0x%x 0x%s" % (addr, len(data), data.hex()))

    def read_bytes(self, addr, n):
        self.p.stdin.write("read 0x%x 0x%x\n" % (addr, n))
        self.p.stdin.flush()
        r = self.p.stdout.readline().split()
        while r and r[0] == "IRQ":
            r = self.p.stdout.readline().split()
        if len(r) < 2 or r[0] != "OK":
            raise RuntimeError(f"read: {r}")
        return bytes.fromhex(r[1][2:])


def report(ok, name, detail):
    print(("PASS " if ok else "FAIL ") + name + ": " + detail, flush=True)
    return ok


class Vgpu:
    def __init__(self, q):
        self.q = q
        self.stub = self.vgpu = None
        for slot in range(32):
            vd = q.cfg_read(slot, 0)
            if vd == STUB_ID:
                self.stub = slot
            elif vd == VGPU_ID:
                self.vgpu = slot
        self.caps = {}

    def map_stub(self):
        q, s = self.q, self.stub
        q.cfg_write(s, 0x10, STUB_BAR)
        q.cfg_write(s, 0x04, q.cfg_read(s, 0x04, 2) | 0x2, 2)

    def stub_regs(self):
        return [self.q.rd(STUB_BAR + off) for off in (0x0, 0x4, 0x8, 0xC, 0x10)]

    def map_virtio(self):
        q, s = self.q, self.vgpu
        ptr = q.cfg_read(s, 0x34, 1)
        bars = set()
        while ptr:
            if q.cfg_read(s, ptr, 1) == 0x09:  # vendor-specific: virtio_pci_cap
                cfg_type = q.cfg_read(s, ptr + 3, 1)
                bar = q.cfg_read(s, ptr + 4, 1)
                off = q.cfg_read(s, ptr + 8)
                extra = q.cfg_read(s, ptr + 16) if cfg_type == 2 else 0
                self.caps[cfg_type] = (bar, off, extra)
                if cfg_type != 5:  # PCI_CFG access window: no BAR of its own
                    bars.add(bar)
            ptr = q.cfg_read(s, ptr + 1, 1)
        if len(bars) != 1:
            raise RuntimeError(f"virtio capabilities in BARs {sorted(bars)}, expected one")
        bar = bars.pop()
        q.cfg_write(s, 0x10 + 4 * bar, VIRTIO_BAR)
        if q.cfg_read(s, 0x10 + 4 * bar) & 0x4:  # 64-bit BAR
            q.cfg_write(s, 0x14 + 4 * bar, 0)
        q.cfg_write(s, 0x04, q.cfg_read(s, 0x04, 2) | 0x6, 2)  # memory, bus master

    def addr(self, cfg_type, off=0):
        return VIRTIO_BAR + self.caps[cfg_type][1] + off

    def device_cfg(self):
        return [self.q.rd(self.addr(4, off)) for off in (0x0, 0x4, 0x8, 0xC, 0x10)]

    def generation(self):
        return self.q.rd(self.addr(1, 0x15), 1)

    def driver_up(self):
        q, c = self.q, lambda off: self.addr(1, off)
        q.wr(c(0x14), 0, 1)  # reset
        q.wr(c(0x14), 1 | 2, 1)  # ACKNOWLEDGE | DRIVER
        q.wr(c(0x00), 0)
        lo = q.rd(c(0x04))
        q.wr(c(0x00), 1)
        hi = q.rd(c(0x04))
        feats = (hi << 32) | lo
        if not feats & (1 << 32):
            raise RuntimeError("device does not offer VIRTIO_F_VERSION_1: 0x%x" % feats)
        q.wr(c(0x08), 0)
        q.wr(c(0x0C), 0)
        q.wr(c(0x08), 1)
        q.wr(c(0x0C), 1)  # VERSION_1 only
        q.wr(c(0x14), 1 | 2 | 8, 1)  # FEATURES_OK
        if not q.rd(c(0x14), 1) & 8:
            raise RuntimeError("FEATURES_OK not accepted")
        q.wr(c(0x16), 0, 2)
        size = q.rd(c(0x18), 2)
        if size != QSIZE:
            raise RuntimeError(f"queue 0 size {size}, expected {QSIZE}")
        for a in (DESC, AVAIL, USED):
            q.write_bytes(a, bytes(4096))
        q.wr(c(0x1A), 0xFFFF, 2)  # no MSI-X vector
        q.wr(c(0x20), DESC, 8)
        q.wr(c(0x28), AVAIL, 8)
        q.wr(c(0x30), USED, 8)
        q.wr(c(0x1C), 1, 2)
        self.notify_off = q.rd(c(0x1E), 2)
        q.wr(c(0x14), 1 | 2 | 8 | 4, 1)  # DRIVER_OK: vhost_dev_start
        return feats

    def scalar_add(self, a, b, tag=0x5EED):
        q = self.q
        hdr = struct.pack("<HHIQII", 1, 0x0100, 0, tag, 8, 0) + struct.pack("<ii", a, b)
        q.write_bytes(REQ, hdr)
        q.write_bytes(RESP, bytes(44))
        q.write_bytes(DESC, struct.pack("<QIHH", REQ, len(hdr), 1, 1) +
                      struct.pack("<QIHH", RESP, 44, 2, 0))
        q.wr(AVAIL + 4, 0, 2)  # ring[0] = head 0
        q.wr(AVAIL + 2, 1, 2)  # idx = 1
        bar, off, mult = self.caps[2]
        q.wr(VIRTIO_BAR + off + self.notify_off * mult, 0, 2)  # kick queue 0
        deadline = time.time() + 20
        while q.rd(USED + 2, 2) != 1:
            if time.time() > deadline:
                raise RuntimeError("no used-ring entry 20 s after the kick")
            time.sleep(0.05)
        uid, ulen = struct.unpack("<II", q.read_bytes(USED + 4, 8))
        resp = q.read_bytes(RESP, 44)
        status, out_len, rtag = struct.unpack("<IIQ", resp[:16])
        (val,) = struct.unpack("<i", resp[40:44])
        return uid, ulen, status, out_len, rtag, val


def expect_regs(name, got, pool, prio, vmid):
    want = [0x55504756, 0x00010000, ord(pool), prio, vmid]
    return report(got == want, name, " ".join("0x%x" % v for v in got) +
                  ("" if got == want else "  (want " + " ".join("0x%x" % v for v in want) + ")"))


def main():
    q = Qtest(sys.argv[1:])
    v = Vgpu(q)
    ok = report(v.stub is not None and v.vgpu is not None, "pci devices",
                f"vgpu-stub at slot {v.stub}, vhost-user-vgpu-pci at slot {v.vgpu}")
    if not ok:
        sys.exit(1)
    v.map_stub()
    v.map_virtio()
    gen0 = None
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        phase, pool, prio, vmid = words[0], words[1], int(words[2]), int(words[3])
        expect_regs(f"{phase} stub registers", v.stub_regs(), pool, prio, vmid)
        expect_regs(f"{phase} virtio config", v.device_cfg(), pool, prio, vmid)
        if phase == "initial":
            try:
                feats = v.driver_up()
                report(True, "driver up", "features 0x%x, DRIVER_OK" % feats)
                gen0 = v.generation()
                uid, ulen, status, out_len, rtag, val = v.scalar_add(100, 200)
                report(uid == 0 and ulen == 44 and status == 0 and out_len == 4 and
                       rtag == 0x5EED and val == 300, "request 100 + 200",
                       f"used id {uid} len {ulen}, status {status}, output_len {out_len}, "
                       f"tag 0x{rtag:x}, result {val}")
            except RuntimeError as e:
                report(False, "request 100 + 200", str(e))
        elif phase == "changed" and gen0 is not None:
            gen1 = v.generation()
            report(gen1 != gen0, "config generation", f"{gen0} -> {gen1}")
        print("DONE " + phase, flush=True)
    # QEMU does not quit when the qtest chardev closes (libqtest kills it too).
    q.p.stdin.close()
    q.p.terminate()
    q.p.wait(timeout=10)


if __name__ == "__main__":
    main()
