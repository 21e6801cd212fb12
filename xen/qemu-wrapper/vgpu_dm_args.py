# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""vgpu device-model arguments for XCP-ng's qemu-wrapper.

xapi copies a VM's platform keys into XenStore at
/local/domain/<domid>/platform/<key>; the vgpu administrator stores the QEMU
arguments that attach the VM to the vgpu daemon as
``platform:device-model-args`` (``vgpu-admin qemu-args VM --xcp-ng``).
Stock qemu-wrapper ignores that key. This module reads it and turns it into
an argv list for QEMU, safely:

* never through a shell: the value is split on blanks into tokens, nothing
  is expanded, quoted or substituted;
* only the argument shapes vgpu needs are accepted, all or nothing:

    -chardev socket,id=vgpuN,path=<socket dir>/vmN.sock[,reconnect=S]
    -device vhost-user-vgpu-pci[,id=vgpuN],chardev=vgpuN[,vectors=V][,addr=0xSS]
    -device vgpu-stub[,vgpu=vgpuN],pool_id=X,priority=P,vm_id=N[,addr=0xSS]

  with N the same VM id everywhere, X one letter A-Z, P 0..2, the socket
  in one of SOCKET_DIRS, at most one vgpu per VM;
* anything else (another option or device, shell metacharacters, ``..``,
  options QEMU would also accept such as ``-monitor`` or ``-object``, a
  value longer than MAX_LEN) refuses the whole value: it is logged and QEMU
  starts without vgpu devices.

It also makes the daemon's socket reachable inside QEMU's chroot
(/var/xen/qemu/root-<domid>) at the same path, owned by QEMU's uid
(qemu_base + domid), so that a reconnect after QEMU chrooted still works.

Standalone use (for testing and for administrators):

    python3 vgpu_dm_args.py check 'VALUE'     argv, one per line; exit 2 if refused
    python3 vgpu_dm_args.py xenstore DOMID    read the key with xenstore-read
"""

import os
import re
import stat
import subprocess
import sys

KEY = "device-model-args"
# Where the daemon's sockets may be. VGPU_SOCKET_DIRS (colon-separated) in
# the wrapper's environment, which only root (xenopsd) sets, overrides it.
SOCKET_DIRS = tuple(d for d in os.environ.get("VGPU_SOCKET_DIRS", "").split(":") if d) \
    or ("/run/vgpu", "/var/run/vgpu")
MAX_LEN = 1024
MAX_VM_ID = 0xFFFFFFFF
# Characters a valid value can contain at all; checked before anything else.
_ALLOWED_CHARS = re.compile(r"^[A-Za-z0-9 ,=._/-]*$")
_NUM = r"(0|[1-9][0-9]{0,9})"


class Refused(ValueError):
    """The value is not one vgpu writes; the reason says why."""


def _options(text, what):
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; each key once, no empty parts."""
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise Refused("%s: '%s' is not key=value" % (what, part))
        k, v = part.split("=", 1)
        if not k or not v:
            raise Refused("%s: empty key or value in '%s'" % (what, part))
        if k in out:
            raise Refused("%s: '%s' given twice" % (what, k))
        out[k] = v
    return out


def _only(opts, allowed, what):
    extra = sorted(set(opts) - set(allowed))
    if extra:
        raise Refused("%s: option(s) %s not allowed" % (what, ", ".join(extra)))


def _number(v, lo, hi, what):
    if not re.fullmatch(_NUM, v) or not lo <= int(v) <= hi:
        raise Refused("%s: '%s' is not a number in %d..%d" % (what, v, lo, hi))
    return int(v)


def _slot(v, what):
    if not re.fullmatch(r"0x[0-9a-f]{1,2}", v) or not 3 <= int(v, 16) <= 0x1F:
        raise Refused("%s: addr '%s' is not a PCI slot 0x03..0x1f" % (what, v))


def _socket_path(path, vm_id, socket_dirs):
    if not path.startswith("/") or os.path.normpath(path) != path or "//" in path:
        raise Refused("chardev: path '%s' is not a normal absolute path" % path)
    parent, name = os.path.split(path)
    if parent not in socket_dirs:
        raise Refused("chardev: path '%s' is not in %s" % (path, " or ".join(socket_dirs)))
    if name != "vm%d.sock" % vm_id:
        raise Refused("chardev: socket '%s' is not vm%d.sock" % (name, vm_id))


def parse(value, socket_dirs=SOCKET_DIRS):
    """The argv for QEMU that `value` stands for; raises Refused."""
    if value is None:
        return []
    if len(value) > MAX_LEN:
        raise Refused("value is %d characters long, more than %d" % (len(value), MAX_LEN))
    if not _ALLOWED_CHARS.match(value):
        bad = sorted(set(c for c in value if not _ALLOWED_CHARS.match(c)))
        raise Refused("characters not allowed: %s" % " ".join(repr(c) for c in bad))
    tokens = value.split()
    if not tokens:
        return []
    if len(tokens) % 2:
        raise Refused("odd number of words: every option needs one value")

    chardevs = {}  # id -> vm_id
    seen = {"chardev": 0, "vhost-user-vgpu-pci": 0, "vgpu-stub": 0}
    vm_ids = set()
    used_chardevs = []
    device_ids = []  # id= of vhost-user-vgpu-pci
    linked = []  # vgpu= of vgpu-stub
    argv = []
    for opt, val in zip(tokens[0::2], tokens[1::2]):
        if opt == "-chardev":
            backend, _, rest = val.partition(",")
            if backend != "socket":
                raise Refused("chardev: backend '%s' is not socket" % backend)
            opts = _options(rest, "chardev")
            _only(opts, ("id", "path", "reconnect"), "chardev")
            m = re.fullmatch(r"vgpu" + _NUM, opts.get("id", ""))
            if not m:
                raise Refused("chardev: id '%s' is not vgpuN" % opts.get("id", ""))
            n = _number(m.group(1), 0, MAX_VM_ID, "chardev id")
            if "path" not in opts:
                raise Refused("chardev: no path")
            _socket_path(opts["path"], n, socket_dirs)
            if "reconnect" in opts:
                _number(opts["reconnect"], 1, 60, "chardev reconnect")
            chardevs[opts["id"]] = n
            vm_ids.add(n)
            seen["chardev"] += 1
        elif opt == "-device":
            driver, _, rest = val.partition(",")
            opts = _options(rest, driver or "device") if rest else {}
            if driver == "vhost-user-vgpu-pci":
                _only(opts, ("id", "chardev", "vectors", "addr"), driver)
                if "chardev" not in opts:
                    raise Refused("%s: no chardev" % driver)
                used_chardevs.append(opts["chardev"])
                if "id" in opts:
                    # The stub links to the device by this id (vgpu=).
                    if opts["id"] != opts["chardev"]:
                        raise Refused("%s: id '%s' is not its chardev's" % (driver, opts["id"]))
                    device_ids.append(opts["id"])
                if "vectors" in opts:
                    _number(opts["vectors"], 1, 32, driver + " vectors")
                if "addr" in opts:
                    _slot(opts["addr"], driver)
            elif driver == "vgpu-stub":
                _only(opts, ("vgpu", "pool_id", "priority", "vm_id", "addr"), driver)
                if "vgpu" in opts:
                    linked.append(opts["vgpu"])
                for k in ("pool_id", "priority", "vm_id"):
                    if k not in opts:
                        raise Refused("%s: no %s" % (driver, k))
                if not re.fullmatch(r"[A-Z]", opts["pool_id"]):
                    raise Refused("%s: pool_id '%s' is not one letter A-Z" % (driver, opts["pool_id"]))
                _number(opts["priority"], 0, 2, driver + " priority")
                vm_ids.add(_number(opts["vm_id"], 0, MAX_VM_ID, driver + " vm_id"))
                if "addr" in opts:
                    _slot(opts["addr"], driver)
            else:
                raise Refused("device '%s' is not a vgpu device" % driver)
            seen[driver] += 1
        else:
            raise Refused("option '%s' is not allowed" % opt)
        argv += [opt, val]

    for what, count in seen.items():
        if count > 1:
            raise Refused("%s given %d times; one vgpu per VM" % (what, count))
    for d in linked:
        if d not in device_ids:
            raise Refused("vgpu-stub: vgpu '%s' is not a vhost-user-vgpu-pci id given here" % d)
    for c in used_chardevs:
        if c not in chardevs:
            raise Refused("vhost-user-vgpu-pci: chardev '%s' is not a vgpu socket defined here" % c)
    if seen["vhost-user-vgpu-pci"] != seen["chardev"]:
        raise Refused("a vgpu socket needs its vhost-user-vgpu-pci device and the reverse")
    if len(vm_ids) > 1:
        raise Refused("different VM ids: %s" % ", ".join(str(i) for i in sorted(vm_ids)))
    return argv


def socket_paths(argv):
    """The socket paths of the -chardev arguments of a parse() result."""
    out = []
    for opt, val in zip(argv[0::2], argv[1::2]):
        if opt == "-chardev":
            for part in val.split(",")[1:]:
                if part.startswith("path="):
                    out.append(part[len("path="):])
    return out


def from_xenstore(domid, read, log=print, socket_dirs=SOCKET_DIRS):
    """The vgpu argv of domain `domid`: [] if the key is absent or refused.

    `read(path)` returns the value or None (the wrapper's xenstore_read)."""
    path = "/local/domain/%d/platform/%s" % (domid, KEY)
    value = read(path)
    if value is None or value == "":
        return []
    try:
        argv = parse(value, socket_dirs)
    except Refused as e:
        log("vgpu: refusing %s of domain %d: %s" % (KEY, domid, e))
        return []
    log("vgpu: appending %s" % " ".join(argv))
    return argv


def is_mount_point(path):
    """True if `path` (a directory or a file) is a mount point of this
    process's mount namespace; os.path.ismount misses bind-mounted files."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4]
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mp)
            if mp == path:
                return True
    return False


def prepare_chroot(root_dir, paths, uid, gid, log=print, mount=None):
    """Make each socket in `paths` reachable at the same path inside the
    chroot `root_dir`, owned by uid:gid with mode 0600: a bind mount of the
    daemon's socket onto an empty file (the daemon's socket is on another
    file system, so a hard link cannot do). Returns the mount points made."""
    made = []
    for path in paths:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError("vgpu: %s is not a socket (is the daemon running?)" % path)
        target = os.path.join(root_dir, path.lstrip("/"))
        if os.path.realpath(target) != target:
            raise OSError("vgpu: %s resolves through a symbolic link" % target)
        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
        if not is_mount_point(target):
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            (mount or _bind_mount)(path, target)
        os.chown(path, uid, gid)
        os.chmod(path, 0o600)
        log("vgpu: %s -> %s (uid %d)" % (path, target, uid))
        made.append(target)
    return made


def _bind_mount(src, dst):
    subprocess.check_call(["mount", "--bind", src, dst])


def _xenstore_read_cli(path):
    r = subprocess.run(["xenstore-read", path], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, universal_newlines=True)
    if r.returncode != 0:
        return None
    return r.stdout.rstrip("\n")


def main(argv):
    if len(argv) == 3 and argv[1] == "check":
        try:
            out = parse(argv[2])
        except Refused as e:
            print("refused: %s" % e)
            return 2
        for a in out:
            print(a)
        return 0
    if len(argv) == 3 and argv[1] == "xenstore":
        domid = int(argv[2])
        msgs = []
        out = from_xenstore(domid, _xenstore_read_cli, log=msgs.append)
        for m in msgs:
            print(m, file=sys.stderr)
        for a in out:
            print(a)
        return 2 if any(m.startswith("vgpu: refusing") for m in msgs) else 0
    print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main(sys.argv))
