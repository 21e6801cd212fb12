# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Tests of the XCP-ng integration in xen/: the qemu-wrapper module
(vgpu_dm_args.py), the wrapper patch, and the xapi hook, against stand-in
xe / xenstore-read / xenstore-write executables (tests/xen/standins) and
the real vgpu-admin. Run by tests/xen/run.sh; prints "N passed, M failed".

Environment: VGPU_ADMIN (required for the hook tests), VGPU_REPO."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback

REPO = os.environ.get("VGPU_REPO") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "xen", "qemu-wrapper"))
import vgpu_dm_args as m  # noqa: E402

STANDINS = os.path.join(REPO, "tests", "xen", "standins")
HOOK = os.path.join(REPO, "xen", "hooks", "vgpu-xapi-hook")
DM_ARGS_PY = os.path.join(REPO, "xen", "qemu-wrapper", "vgpu_dm_args.py")
WRAPPER_PATCH = os.path.join(
    REPO, "xen", "qemu-wrapper",
    "0001-qemu-wrapper-append-vgpu-devices-from-device-model-args.patch")
WRAPPER_ORIG = os.path.join(REPO, "xen", "qemu-wrapper", "qemu-wrapper.orig")
ADMIN = os.environ.get("VGPU_ADMIN", "")
IS_ROOT = os.geteuid() == 0

GOOD = ("-chardev socket,id=vgpu3,path=/run/vgpu/vm3.sock "
        "-device vhost-user-vgpu-pci,chardev=vgpu3 "
        "-device vgpu-stub,pool_id=B,priority=2,vm_id=3")

results = []


def test(fn):
    results.append(fn)
    return fn


def refused(value, why=None):
    try:
        out = m.parse(value)
    except m.Refused as e:
        if why is not None:
            assert why in str(e), "refused for '%s', expected '%s'" % (e, why)
        return
    raise AssertionError("accepted %r as %r" % (value, out))


# --- the argument rules ----------------------------------------------------------

@test
def accepts_vgpu_admin_output():
    assert m.parse(GOOD) == GOOD.split(), m.parse(GOOD)


@test
def accepts_optional_shapes():
    v = ("-chardev socket,id=vgpu7,path=/var/run/vgpu/vm7.sock,reconnect=5 "
         "-device vhost-user-vgpu-pci,chardev=vgpu7,vectors=2,addr=0x05 "
         "-device vgpu-stub,pool_id=A,priority=0,vm_id=7,addr=0x06")
    assert m.parse(v) == v.split()
    assert m.socket_paths(m.parse(v)) == ["/var/run/vgpu/vm7.sock"]


@test
def empty_and_blank_mean_nothing():
    assert m.parse("") == [] and m.parse("   ") == [] and m.parse(None) == []


@test
def refuses_shell_metacharacters():
    for bad in ("; rm -rf /", "$(reboot)", "`id`", "| nc 1.2.3.4 1", "&& id", "> /etc/passwd",
                "'quoted'", '"x"', "a\\b", "*", "~root", "\n-device e1000", "\t"):
        refused(GOOD + " " + bad)
    refused(GOOD.replace("vm3.sock", "vm3.sock;id"), "characters not allowed")
    refused(GOOD + " -device x$IFS", "characters not allowed")


@test
def refuses_extra_devices_and_options():
    refused(GOOD + " -device e1000,netdev=n0", "not a vgpu device")
    refused(GOOD + " -monitor tcp:0.0.0.0:4444,server,nowait", "not allowed")
    refused(GOOD + " -object memory-backend-file,id=m,mem-path=/etc,share=on", "not allowed")
    refused(GOOD + " -drive file=/dev/sda", "not allowed")
    refused(GOOD + " -netdev user,id=n0", "not allowed")
    refused(GOOD + " -set device.x.y=z", "not allowed")
    refused(GOOD + " -readconfig /etc/shadow", "not allowed")
    refused(GOOD + " -S", "odd number")
    refused("-device vhost-user-vgpu-pci,chardev=vgpu3 -device vhost-user-vgpu-pci,chardev=vgpu3 "
            "-chardev socket,id=vgpu3,path=/run/vgpu/vm3.sock", "one vgpu per VM")
    refused(GOOD + " -device vgpu-stub,pool_id=A,priority=1,vm_id=3", "one vgpu per VM")


@test
def refuses_other_chardevs_and_options():
    refused(GOOD.replace("socket,", "file,"), "not socket")
    refused(GOOD.replace("socket,id=vgpu3,", "socket,id=vgpu3,server=on,"), "not allowed")
    refused(GOOD.replace(",path=", ",logfile=/tmp/x,path="), "not allowed")
    refused(GOOD.replace("id=vgpu3", "id=mon0"), "not vgpuN")
    refused(GOOD.replace("chardev=vgpu3", "chardev=vgpu3,bootindex=1"), "not allowed")
    refused(GOOD.replace("vm_id=3", "vm_id=3,romfile=/etc/shadow"), "not allowed")
    refused(GOOD.replace("path=/run/vgpu/vm3.sock", "path=/run/vgpu/vm3.sock,path=/tmp/x"), "twice")
    refused(GOOD.replace(",,", ",").replace("id=vgpu3,", "id=vgpu3,,"), "")


@test
def refuses_path_traversal_and_foreign_sockets():
    for p in ("/run/vgpu/../vgpu/vm3.sock", "/run/vgpu/./vm3.sock", "/run//vgpu/vm3.sock",
              "run/vgpu/vm3.sock", "/tmp/vm3.sock", "/run/vgpu/sub/vm3.sock",
              "/run/vgpu/vm4.sock", "/run/vgpu/control.sock", "/run/vgpu/vm3.sock/",
              "/var/run/../../etc/vgpu/vm3.sock"):
        refused(GOOD.replace("/run/vgpu/vm3.sock", p))


@test
def refuses_inconsistent_or_bad_values():
    refused(GOOD.replace("vm_id=3", "vm_id=4"), "different VM ids")
    refused(GOOD.replace("chardev=vgpu3", "chardev=vgpu9"), "not a vgpu socket")
    refused(GOOD.replace("pool_id=B", "pool_id=AB"), "one letter")
    refused(GOOD.replace("pool_id=B", "pool_id=b"), "one letter")
    refused(GOOD.replace("priority=2", "priority=3"), "0..2")
    refused(GOOD.replace("priority=2", "priority=-1"), "0..2")
    refused(GOOD.replace("priority=2", "priority=01"), "0..2")
    refused(GOOD.replace("vm_id=3", "vm_id=99999999999"), "")
    refused(GOOD.replace("chardev=vgpu3", "chardev=vgpu3,addr=0x00"), "PCI slot")
    refused(GOOD.replace("chardev=vgpu3", "chardev=vgpu3,vectors=1000"), "")
    refused("-device vhost-user-vgpu-pci,chardev=vgpu3", "not a vgpu socket")
    refused("-chardev socket,id=vgpu3,path=/run/vgpu/vm3.sock", "needs its")


@test
def refuses_very_long_values():
    refused(GOOD + " " + " ".join(["-device", "vgpu-stub,pool_id=A,priority=1,vm_id=3"] * 60),
            "characters long")
    refused("-chardev socket,id=vgpu3,path=/run/vgpu/" + "a" * 5000 + ".sock", "characters long")
    refused("x" * (m.MAX_LEN + 1), "characters long")


@test
def cli_check():
    r = subprocess.run([sys.executable, DM_ARGS_PY, "check", GOOD], stdout=subprocess.PIPE,
                       universal_newlines=True)
    assert r.returncode == 0 and r.stdout.split("\n")[:6] == GOOD.split(), r
    r = subprocess.run([sys.executable, DM_ARGS_PY, "check", GOOD + " -monitor stdio"],
                       stdout=subprocess.PIPE, universal_newlines=True)
    assert r.returncode == 2 and r.stdout.startswith("refused: "), r


# --- reading XenStore through the stand-in tools ------------------------------------------

class Env:
    """A stand-in world: state file, PATH with the stand-ins, a temp root."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="vgpu-xen-test.")
        self.state = os.path.join(self.dir, "state.json")
        self.save({"vms": {}, "xenstore": {}, "calls": []})
        self.env = dict(os.environ)
        self.env["PATH"] = STANDINS + os.pathsep + self.env["PATH"]
        self.env["VGPU_STANDIN_STATE"] = self.state
        self.env["VGPU_DB"] = os.path.join(self.dir, "vgpu.db")
        self.env["VGPU_SOCKET_DIR"] = os.path.join(self.dir, "run", "vgpu")
        self.env["VGPU_SOCKET_DIRS"] = self.env["VGPU_SOCKET_DIR"]
        self.env["VGPU_QEMU_ROOT"] = os.path.join(self.dir, "var", "xen", "qemu")
        self.env["VGPU_HOOK_LOG"] = os.path.join(self.dir, "hook.log")
        self.env["VGPU_DM_ARGS_PY"] = DM_ARGS_PY
        self.env["VGPU_SOCKET_WAIT_S"] = "1"
        if ADMIN:
            self.env["VGPU_ADMIN"] = ADMIN
        os.makedirs(self.env["VGPU_SOCKET_DIR"])
        self.socks = []

    def load(self):
        with open(self.state) as f:
            return json.load(f)

    def save(self, d):
        with open(self.state, "w") as f:
            json.dump(d, f)

    def run(self, argv, **kw):
        return subprocess.run(argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, **kw)

    def admin(self, *args):
        r = self.run([ADMIN] + list(args))
        assert r.returncode == 0, r
        return r.stdout

    def listen(self, path):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        self.socks.append(s)
        return s

    def hook(self, name, *args):
        env = dict(self.env, VGPU_HOOK=name)
        return subprocess.run([HOOK] + list(args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)

    def hooklog(self):
        p = self.env["VGPU_HOOK_LOG"]
        return open(p).read() if os.path.exists(p) else ""

    def close(self):
        for s in self.socks:
            s.close()
        for root, dirs, files in os.walk(self.dir):
            for f in files:
                p = os.path.join(root, f)
                if m.is_mount_point(p):
                    subprocess.call(["umount", p])
        shutil.rmtree(self.dir, ignore_errors=True)


@test
def standin_formats():
    e = Env()
    try:
        d = e.load()
        d["xenstore"]["/local/domain/5/name"] = "web"
        d["vms"]["9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e"] = {"name-label": "web", "dom-id": "5",
                                                            "platform": {"acpi": "1"}}
        e.save(d)
        r = e.run(["xenstore-read", "/local/domain/5/name"])
        assert (r.returncode, r.stdout) == (0, "web\n"), r
        r = e.run(["xenstore-read", "/local/domain/5/nope"])
        assert r.returncode == 1 and r.stderr == "xenstore-read: couldn't read path /local/domain/5/nope\n", r
        r = e.run(["xe", "vm-param-get", "uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e",
                   "param-name=platform", "param-key=device-model-args"])
        assert r.returncode == 1 and r.stderr == "Error: Key device-model-args not found in map\n", r
        r = e.run(["xe", "vm-param-get", "uuid=00000000-0000-0000-0000-000000000000",
                   "param-name=platform"])
        assert r.returncode == 1 and r.stderr.startswith("The uuid you supplied was invalid."), r
        r = e.run(["xe", "vm-param-get", "uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e",
                   "param-name=platform"])
        assert r.stdout == "acpi: 1\n", r
    finally:
        e.close()


@test
def from_xenstore_reads_platform_key():
    e = Env()
    try:
        d = e.load()
        e.env.pop("VGPU_SOCKET_DIRS")  # the wrapper's default: /run/vgpu
        d["xenstore"]["/local/domain/7/platform/device-model-args"] = GOOD
        d["xenstore"]["/local/domain/8/platform/device-model-args"] = GOOD + " -monitor stdio"
        e.save(d)
        r = e.run([sys.executable, DM_ARGS_PY, "xenstore", "7"])
        assert r.returncode == 0 and r.stdout.split() == GOOD.split(), r
        assert "vgpu: appending" in r.stderr, r
        r = e.run([sys.executable, DM_ARGS_PY, "xenstore", "8"])
        assert r.returncode == 2 and r.stdout == "" and "vgpu: refusing" in r.stderr, r
        r = e.run([sys.executable, DM_ARGS_PY, "xenstore", "9"])
        assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
        calls = e.load()["calls"]
        assert ["xenstore-read", "/local/domain/7/platform/device-model-args"] in calls, calls
    finally:
        e.close()


@test
def prepare_chroot_bind_mounts_socket():
    if not IS_ROOT:
        raise Skip("needs root (bind mounts, chown)")
    e = Env()
    try:
        sock = os.path.join(e.env["VGPU_SOCKET_DIR"], "vm3.sock")
        e.listen(sock)
        root = os.path.join(e.env["VGPU_QEMU_ROOT"], "root-12")
        os.makedirs(root)
        made = m.prepare_chroot(root, [sock], 65548, 65548, log=lambda s: None)
        target = root + sock
        assert made == [target] and m.is_mount_point(target), made
        st = os.stat(target)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (65548, 65548, 0o600), st
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(target)  # through the bind mount, to the daemon's socket
        c.close()
        # Twice is fine (a restarted wrapper for the same domain).
        m.prepare_chroot(root, [sock], 65548, 65548, log=lambda s: None)
        try:
            m.prepare_chroot(root, [os.path.join(e.dir, "state.json")], 1, 1, log=lambda s: None)
            raise AssertionError("a regular file was accepted as a socket")
        except OSError as ex:
            assert "not a socket" in str(ex)
    finally:
        e.close()


@test
def wrapper_patch_applies_and_compiles():
    if not os.path.exists(WRAPPER_ORIG):
        raise AssertionError("missing %s" % WRAPPER_ORIG)
    d = tempfile.mkdtemp()
    try:
        os.makedirs(os.path.join(d, "ocaml/xenopsd/scripts"))
        w = os.path.join(d, "ocaml/xenopsd/scripts/qemu-wrapper")
        shutil.copy(WRAPPER_ORIG, w)
        r = subprocess.run(["patch", "-p1", "-s", "-i", WRAPPER_PATCH], cwd=d,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        assert r.returncode == 0, r.stdout
        src = open(w).read()
        compile(src, w, "exec")
        assert "vgpu_dm_args.from_xenstore(domid, xenstore_read)" in src
        assert "prepare_chroot" in src and "shell=True" not in src
    finally:
        shutil.rmtree(d)


# --- the xapi hook -------------------------------------------------------------------------

class Skip(Exception):
    pass


UUID = "9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e"
OTHER = "1f0e9d8c-7b6a-4a5b-9c8d-7e6f5a4b3c2d"


def hook_env():
    if not ADMIN:
        raise Skip("VGPU_ADMIN not set")
    e = Env()
    d = e.load()
    d["vms"][UUID] = {"name-label": "web", "power-state": "halted", "dom-id": "-1",
                      "platform": {}, "other-config": {}}
    d["vms"][OTHER] = {"name-label": "plain", "power-state": "halted", "dom-id": "-1",
                       "platform": {}, "other-config": {}}
    e.save(d)
    e.admin("init")
    e.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--name", "web")
    return e


@test
def hook_pre_start_sets_args_and_waits_for_socket():
    e = hook_env()
    try:
        vm_id = json.loads(e.admin("show-vm", UUID, "--json"))["vm_id"]
        # No daemon socket yet: the start is refused (exit 2).
        r = e.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 2, r
        assert "does not exist" in e.hooklog(), e.hooklog()
        e.listen(os.path.join(e.env["VGPU_SOCKET_DIR"], "vm%d.sock" % vm_id))
        r = e.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 0, (r, e.hooklog())
        args = e.load()["vms"][UUID]["platform"]["device-model-args"]
        sd = e.env["VGPU_SOCKET_DIR"]
        assert args == ("-chardev socket,id=vgpu{0},path={1}/vm{0}.sock "
                        "-device vhost-user-vgpu-pci,id=vgpu{0},chardev=vgpu{0} "
                        "-device vgpu-stub,vgpu=vgpu{0},pool_id=B,priority=2,vm_id={0}").format(vm_id, sd), args
        # Unchanged on the next start: no second vm-param-set.
        n = sum(1 for c in e.load()["calls"] if c[:2] == ["xe", "vm-param-set"])
        r = e.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 0
        assert n == 1 == sum(1 for c in e.load()["calls"] if c[:2] == ["xe", "vm-param-set"])
    finally:
        e.close()


@test
def hook_pre_start_other_vms():
    e = hook_env()
    try:
        r = e.hook("vm-pre-start", "-vmuuid", OTHER, "-reason", "start")
        assert r.returncode == 0, r
        assert not any(c[:2] == ["xe", "vm-param-set"] for c in e.load()["calls"])
        d = e.load()
        d["vms"][OTHER]["platform"]["device-model-args"] = GOOD
        e.save(d)
        r = e.hook("vm-pre-start", "-vmuuid", OTHER, "-reason", "start")
        assert r.returncode == 2 and "not registered" in e.hooklog(), (r, e.hooklog())
        r = e.hook("vm-pre-start", "-vmuuid", "$(reboot)", "-reason", "start")
        assert r.returncode == 1 and "no valid -vmuuid" in e.hooklog()
    finally:
        e.close()


@test
def hook_post_destroy_cleans_chroot():
    if not IS_ROOT:
        raise Skip("needs root (bind mounts)")
    e = hook_env()
    try:
        vm_id = json.loads(e.admin("show-vm", UUID, "--json"))["vm_id"]
        sock = os.path.join(e.env["VGPU_SOCKET_DIR"], "vm%d.sock" % vm_id)
        e.listen(sock)
        qroot = e.env["VGPU_QEMU_ROOT"]
        for domid in (12, 13):
            os.makedirs(os.path.join(qroot, "root-%d" % domid, "dev"))
            m.prepare_chroot(os.path.join(qroot, "root-%d" % domid), [sock], 65536 + domid,
                             65536 + domid, log=lambda s: None)
        d = e.load()
        d["xenstore"]["/local/domain/13/name"] = "web"  # domain 13 still runs
        e.save(d)
        r = e.hook("vm-post-destroy", "-vmuuid", UUID, "-reason", "destroy")
        assert r.returncode == 0, (r, e.hooklog())
        t12, t13 = (os.path.join(qroot, "root-%d" % i) + sock for i in (12, 13))
        assert not os.path.exists(t12) and not os.path.exists(os.path.dirname(t12)), t12
        assert os.path.exists(os.path.join(qroot, "root-12", "dev")), "removed too much"
        assert m.is_mount_point(t13), "removed the mount of a running domain"
        assert os.stat(sock).st_uid == 0
        # With -vmdomid the named domain goes even if XenStore still lists it.
        r = e.hook("vm-post-destroy", "-vmuuid", UUID, "-reason", "destroy", "-vmdomid", "13")
        assert r.returncode == 0 and not os.path.exists(t13), (r, e.hooklog())
    finally:
        e.close()


@test
def hook_pre_migrate_refuses_vgpu_vms():
    e = hook_env()
    try:
        r = e.hook("vm-pre-migrate", "-vmuuid", UUID, "-reason", "migrate")
        assert r.returncode == 2 and "not migratable" in e.hooklog(), r
        r = e.hook("vm-pre-migrate", "-vmuuid", OTHER, "-reason", "migrate")
        assert r.returncode == 0, r
    finally:
        e.close()


def main():
    passed = failed = skipped = 0
    for fn in results:
        try:
            fn()
        except Skip as s:
            skipped += 1
            print("SKIP %s: %s" % (fn.__name__, s))
            continue
        except Exception:
            failed += 1
            print("FAIL %s" % fn.__name__)
            traceback.print_exc(limit=3)
            continue
        passed += 1
        print("PASS %s" % fn.__name__)
    extra = ", %d skipped" % skipped if skipped else ""
    print("%d passed, %d failed%s" % (passed, failed, extra))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
