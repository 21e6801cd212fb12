# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Tests of the XCP-ng integration in xen/: the qemu-wrapper module
(vgpu_dm_args.py), the wrapper patch, and the xapi hook, against stand-in
xe / xenstore-read / xenstore-write executables (tests/xen/standins) and
the real vgpu-admin. Run by tests/xen/run.sh; prints "N passed, M failed".

Environment: VGPU_ADMIN (required for the hook and vgpu-admin tests),
VGPU_DAEMON (vgpu-vhost-user, for the two-host test), VGPU_REPO."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
DAEMON = os.environ.get("VGPU_DAEMON", "")
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

def inventory(d, host_uuid):
    """An /etc/xensource-inventory that names this host (as XCP-ng's does)."""
    p = os.path.join(d, "xensource-inventory")
    with open(p, "w") as f:
        f.write("PRODUCT_BRAND='XCP-ng'\nINSTALLATION_UUID='%s'\nCONTROL_DOMAIN_UUID='%s'\n"
                % (host_uuid, DOM0))
    return p


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
        self.env["VGPU_XENSOURCE_INVENTORY"] = inventory(self.dir, HOST_UUID)
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
        assert r.returncode == 1 and r.stderr == (
            "The server failed to handle your request, due to an internal error. The given "
            "message may give details useful for debugging the problem.\n"
            "message: Failure: Key device-model-args not found in map\n"), r
        r = e.run(["xe", "vm-param-get", "uuid=00000000-0000-0000-0000-000000000000",
                   "param-name=platform"])
        assert r.returncode == 1 and r.stderr.startswith("The uuid you supplied was invalid."), r
        r = e.run(["xe", "vm-param-get", "uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e",
                   "param-name=platform"])
        assert r.stdout == "acpi: 1\n", r
        r = e.run(["xe", "vm-param-remove", "uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e",
                   "param-name=platform", "param-key=nope"])
        assert r.returncode == 1 and r.stderr.endswith("message: Failure: Key nope is not in map\n"), r
        r = e.run(["xe", "vm-list", "name-label=nobody", "params=uuid", "--minimal"])
        assert (r.returncode, r.stdout) == (0, "\n"), r
        r = e.run(["xe", "vm-list", "params=uuid,name-label"])
        assert r.stdout == ("uuid ( RO)          : 9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e\n"
                            "    name-label ( RW): web\n\n\n"), repr(r.stdout)
        r = e.run(["xe", "vm-list", "params=name-label", "--minimal"])
        assert r.stdout == "web\n", r
        r = e.run(["xe", "vm-param-get", "uuid=9b2c6f1e-4a7d-4c1b-8e3f-1d2a3b4c5d6e"])
        assert r.returncode == 1 and r.stderr == ("Error code: Missing parameter\n"
                                                  "Error parameters: param-name\n"), r
        r = e.run(["xe", "vm-frobnicate"])
        assert r.returncode == 1 and r.stderr == "Unknown command: vm-frobnicate\n", r
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
    e.admin("apply", UUID)  # on XCP-ng a VM is registered pool-wide through XAPI
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
        # apply (in hook_env) wrote it once; the hook's starts write nothing more.
        r = e.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 0
        assert 1 == sum(1 for c in e.load()["calls"] if c[:2] == ["xe", "vm-param-set"])
        # A change of the args (another socket directory here) is written by the hook.
        d = e.load()
        d["vms"][UUID]["platform"]["device-model-args"] = GOOD
        e.save(d)
        r = e.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 0, (r, e.hooklog())
        assert e.load()["vms"][UUID]["platform"]["device-model-args"] == args
        assert "device-model-args set to" in e.hooklog()
    finally:
        e.close()


@test
def hook_pre_start_other_vms():
    e = hook_env()
    try:
        r = e.hook("vm-pre-start", "-vmuuid", OTHER, "-reason", "start")
        assert r.returncode == 0, r
        assert not any(c[:3] == ["xe", "vm-param-set", "uuid=" + OTHER] for c in e.load()["calls"])
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


# --- vgpu-admin apply / unapply (XAPI through the stand-in xe) -----------------------------

DUP1 = "2a3b4c5d-6e7f-4a8b-9c0d-1e2f3a4b5c6d"
DUP2 = "3b4c5d6e-7f8a-4b9c-8d1e-2f3a4b5c6d7e"
DOM0 = "00000000-0000-0000-0000-000000000001"
HOST_UUID = "c0ffee00-0000-4000-8000-00000000000a"
HOST_B_UUID = "c0ffee00-0000-4000-8000-00000000000b"
XAPI_STANDIN = os.path.join(STANDINS, "xapi-jsonrpc")
WEIRD = "4c5d6e7f-8a9b-4c0d-9e1f-3a4b5c6d7e8f"
WEIRD_NAME = "$(touch /tmp/vgpu-pwned); `id` 'x' \"y\""


def xapi_env():
    """A pool of VMs in the stand-in XAPI and one host's empty database."""
    if not ADMIN:
        raise Skip("VGPU_ADMIN not set")
    e = Env()
    d = e.load()
    vm = lambda name, **kw: dict({"name-label": name, "platform": {"acpi": "1"},
                                  "other-config": {"folder": "/gpu"}}, **kw)
    d["vms"] = {UUID: vm("web"), OTHER: vm("plain"), DUP1: vm("dup"), DUP2: vm("dup"),
                WEIRD: vm(WEIRD_NAME),
                DOM0: vm("Control domain on host: xcp1", **{"is-control-domain": "true"})}
    e.save(d)
    e.admin("init")
    return e


def fails(e, args, why):
    """vgpu-admin ARGS must fail with one line naming `why`, XAPI and the
    database unchanged."""
    before_vms, before_db = e.load()["vms"], e.admin("list-vms", "--json")
    r = e.run([ADMIN] + args)
    assert r.returncode != 0, r
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vgpu-admin: error: "), r.stderr
    assert why in r.stderr, (why, r.stderr)
    assert e.load()["vms"] == before_vms, "XAPI changed"
    assert e.admin("list-vms", "--json") == before_db, "database changed"
    return r


def sets(e, uuid=None):
    return [c for c in e.load()["calls"] if c[:2] == ["xe", "vm-param-set"]
            and (uuid is None or c[2] == "uuid=" + uuid)]


@test
def apply_writes_dm_args_and_keys_by_name_or_uuid():
    e = xapi_env()
    try:
        e.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--name", "w")
        vm_id = json.loads(e.admin("show-vm", UUID, "--json"))["vm_id"]
        out = e.admin("apply", "web", "--dry-run")
        assert "would run xe vm-param-set uuid=" + UUID in out and sets(e) == [], out
        out = e.admin("apply", "web")
        assert "set platform:device-model-args" in out, out
        vm = e.load()["vms"][UUID]
        sd = e.env["VGPU_SOCKET_DIR"]
        want = ("-chardev socket,id=vgpu{0},path={1}/vm{0}.sock "
                "-device vhost-user-vgpu-pci,id=vgpu{0},chardev=vgpu{0} "
                "-device vgpu-stub,vgpu=vgpu{0},pool_id=B,priority=2,vm_id={0}").format(vm_id, sd)
        assert vm["platform"] == {"acpi": "1", "device-model-args": want}, vm
        assert vm["other-config"] == {"folder": "/gpu", "vgpu-pool": "B", "vgpu-priority": "high",
                                      "vgpu-vm-id": str(vm_id), "vgpu-max-queued": "64",
                                      "vgpu-gpu-mem-quota-mib": "4096"}, vm
        # One xe call, an argument vector: the value with its spaces is one argument.
        (call,) = sets(e)
        assert "platform:device-model-args=" + want in call, call
        # Again: nothing to write. By UUID (upper case too): the same VM.
        assert "already up to date" in e.admin("apply", UUID.upper())
        assert len(sets(e)) == 1
        e.admin("set-priority", UUID, "low")
        e.admin("apply", UUID)
        (_, call) = sets(e)
        assert "other-config:vgpu-priority=low" in call and len(call) == 5, call
        assert e.load()["vms"][UUID]["other-config"]["vgpu-priority"] == "low"
        # A name-label full of shell syntax is only ever an argument.
        e.admin("register-vm", WEIRD, "--pool", "A", "--priority", "low")
        e.admin("apply", WEIRD_NAME)
        assert not os.path.exists("/tmp/vgpu-pwned")
        assert e.load()["vms"][WEIRD]["other-config"]["vgpu-pool"] == "A"
        # --all: every registered VM, here already up to date.
        out = e.admin("apply", "--all")
        assert out.count("already up to date") == 2, out
    finally:
        e.close()


@test
def apply_errors_write_nothing():
    e = xapi_env()
    try:
        e.admin("register-vm", UUID, "--pool", "B", "--priority", "high")
        fails(e, ["apply", "nobody"], "no VM named 'nobody' in XAPI")
        fails(e, ["apply", "dup"], "2 VMs are named 'dup'")
        fails(e, ["apply", "plain"], "is not registered with vgpu on this host")
        fails(e, ["apply", "5d6e7f8a-9b0c-4d1e-8f2a-4b5c6d7e8f9a"], "is not in XAPI")
        fails(e, ["apply", "Control domain on host: xcp1"], "no VM named")
        fails(e, ["apply", "a\nb"], "control characters")
        fails(e, ["apply"], "required")
        fails(e, ["apply", "web", "--all"], "cannot be used with")
        # --all checks every VM before it writes: one not in XAPI stops all.
        e.admin("register-vm", "5d6e7f8a-9b0c-4d1e-8f2a-4b5c6d7e8f9a", "--pool", "A",
                "--priority", "low")
        fails(e, ["apply", "--all"], "is not in XAPI")
        e.admin("remove-vm", "5d6e7f8a-9b0c-4d1e-8f2a-4b5c6d7e8f9a")
        # The vm_id is another VM's in the pool (applied from another host).
        vm_id = json.loads(e.admin("show-vm", UUID, "--json"))["vm_id"]
        d = e.load()
        d["vms"][OTHER]["other-config"].update({"vgpu-pool": "A", "vgpu-priority": "low",
                                                "vgpu-vm-id": str(vm_id)})
        e.save(d)
        fails(e, ["apply", "web"], "vm_id %d of VM %s is already used in the pool by VM %s"
              % (vm_id, UUID, OTHER))
        d["vms"][OTHER]["other-config"] = {}
        e.save(d)
        # xe failing, or not there at all.
        e.env["VGPU_STANDIN_XE_FAIL"] = "vm-list"
        r = fails(e, ["apply", "web"], "message: Failure: injected failure of vm-list")
        assert "`xe vm-list name-label=web" in r.stderr, r.stderr
        del e.env["VGPU_STANDIN_XE_FAIL"]
        path = e.env["PATH"]
        e.env["PATH"] = "/nonexistent"
        fails(e, ["apply", "web"], "xe not found on PATH")
        e.env["PATH"] = path
        assert sets(e) == []
    finally:
        e.close()


@test
def unapply_removes_only_vgpu_keys():
    e = xapi_env()
    try:
        e.admin("register-vm", UUID, "--pool", "B", "--priority", "high")
        e.admin("apply", UUID)
        out = e.admin("unapply", "web", "--dry-run")
        assert "would remove platform:device-model-args" in out
        assert "vgpu-vm-id" in e.load()["vms"][UUID]["other-config"]
        out = e.admin("unapply", "web")
        vm = e.load()["vms"][UUID]
        assert vm["platform"] == {"acpi": "1"} and vm["other-config"] == {"folder": "/gpu"}, vm
        # Nothing left to remove: fine, and no xe vm-param-remove of a missing key
        # (xapi answers that with an error).
        n = len(e.load()["calls"])
        assert "no vgpu keys in XAPI" in e.admin("unapply", "web")
        assert not any(c[:2] == ["xe", "vm-param-remove"] for c in e.load()["calls"][n:])
        # The local record stays (sync --from-xapi or remove-vm drops it).
        assert json.loads(e.admin("show-vm", UUID, "--json"))["uuid"] == UUID
        fails(e, ["unapply", "nobody"], "no VM named")
        e.admin("apply", UUID)
        out = e.admin("unapply", "--all")
        assert e.load()["vms"][UUID]["other-config"] == {"folder": "/gpu"}, out
    finally:
        e.close()


# --- pool-wide assignments: two hosts, one XAPI ---------------------------------------------

class Host:
    """A second host of the pool: its own database and socket directory,
    the same stand-in XAPI state as `e`."""

    def __init__(self, e, name, host_uuid):
        self.e = e
        self.uuid = host_uuid
        self.dir = os.path.join(e.dir, name)
        os.makedirs(os.path.join(self.dir, "run"))
        self.env = dict(e.env, VGPU_DB=os.path.join(self.dir, "vgpu.db"),
                        VGPU_SOCKET_DIR=os.path.join(self.dir, "run"),
                        VGPU_SOCKET_DIRS=os.path.join(self.dir, "run"),
                        VGPU_HOOK_LOG=os.path.join(self.dir, "hook.log"),
                        VGPU_XENSOURCE_INVENTORY=inventory(self.dir, host_uuid))
        self.daemon = None
        self.xapi = None
        self.follower = None
        self.xapi_sock = os.path.join(self.dir, "xapi")

    def run(self, *args):
        return subprocess.run([ADMIN] + list(args), env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)

    def admin(self, *args):
        r = self.run(*args)
        assert r.returncode == 0, r
        return r.stdout

    def vms(self):
        return {v["uuid"]: v for v in json.loads(self.admin("list-vms", "--json"))}

    def hook(self, name, *args):
        env = dict(self.env, VGPU_HOOK=name)
        return subprocess.run([HOOK] + list(args), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True)

    def start_daemon(self):
        self.daemon = subprocess.Popen(
            [DAEMON, "--executor", "cpu", "--db", self.env["VGPU_DB"], "--socket-dir",
             self.env["VGPU_SOCKET_DIR"]], env=dict(self.env, RUST_LOG="warn"),
            stdin=subprocess.DEVNULL)

    def start_xapi(self):
        """This host's stand-in xapi (JSON-RPC on its local socket)."""
        if os.path.exists(self.xapi_sock):
            os.unlink(self.xapi_sock)
        self.xapi = subprocess.Popen([XAPI_STANDIN, self.xapi_sock, self.uuid], env=self.env,
                                     stdin=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.xapi_sock), "the stand-in xapi's socket")

    def stop_xapi(self):
        if self.xapi:
            self.xapi.kill()
            self.xapi.wait()
            self.xapi = None

    def start_follower(self):
        self.follow_log = open(os.path.join(self.dir, "follow.log"), "a")
        self.follower = subprocess.Popen(
            [ADMIN, "-v", "follow-xapi", "--xapi-socket", self.xapi_sock,
             "--event-timeout-s", "2"], env=self.env, stdin=subprocess.DEVNULL,
            stdout=self.follow_log, stderr=subprocess.STDOUT)

    def log(self):
        return open(os.path.join(self.dir, "follow.log")).read()

    def stop(self):
        for p in (self.follower, self.daemon, self.xapi):
            if p:
                p.terminate()
                p.wait()
        self.follower = self.daemon = self.xapi = None


def wait_for(cond, what, timeout=20):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.05)


def two_hosts():
    e = xapi_env()
    a, b = Host(e, "host-a", HOST_UUID), Host(e, "host-b", HOST_B_UUID)
    a.admin("init")
    b.admin("init")
    return e, a, b


def fields(v):
    return (v["vm_id"], v["pool"], v["priority"], v["max_queued"], v["gpu_mem_quota_mib"])


@test
def sync_carries_assignments_between_hosts():
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--vm-id", "7",
                "--gpu-mem-quota-mib", "1024", "--max-queued", "9", "--name", "web")
        a.admin("register-vm", OTHER, "--pool", "A", "--priority", "low")
        a.admin("apply", "--all")
        out = b.admin("sync", "--from-xapi", "--dry-run")
        assert "would add %s as vm_id 7" % UUID in out and b.vms() == {}, out
        out = b.admin("sync", "--from-xapi")
        assert "added %s as vm_id 7 (pool B, priority high)" % UUID in out, out
        va, vb = a.vms(), b.vms()
        assert {u: fields(v) for u, v in va.items()} == {u: fields(v) for u, v in vb.items()}
        assert vb[UUID]["name"] is None  # names are each host's own
        assert b.admin("sync", "--from-xapi") == "2 VMs unchanged\n"
        # A change on host A reaches host B through XAPI; B's local name stays.
        b.admin("update-vm", UUID, "--name", "web-b")
        a.admin("set-priority", "web", "low")
        a.admin("set-pool", "web", "A")
        a.admin("apply", "web")
        out = b.admin("sync", "--from-xapi")
        assert "updated %s (web-b): pool B -> A, priority high -> low" % UUID in out, out
        assert b.vms()[UUID]["name"] == "web-b"
        # vm_ids swapped on host A: B follows in one transaction.
        a.admin("set-vm-id", UUID, "100", "--yes")
        a.admin("set-vm-id", OTHER, "7", "--yes")
        a.admin("set-vm-id", UUID, str(va[OTHER]["vm_id"]), "--yes")
        a.admin("apply", "--all")
        b.admin("sync", "--from-xapi")
        assert {u: fields(v) for u, v in a.vms().items()} == \
            {u: fields(v) for u, v in b.vms().items()}
        # XAPI is the source of truth: a VM unapplied on A leaves B's database,
        # and so does a VM registered on B but never applied.
        b.admin("register-vm", DUP1, "--pool", "A", "--priority", "low")
        a.admin("unapply", "plain")
        out = b.admin("sync", "--from-xapi")
        assert "removed %s" % OTHER in out and "removed %s" % DUP1 in out, out
        assert list(b.vms()) == [UUID]
        # Absent optional keys take the defaults of config/vgpu.toml.
        d = e.load()
        d["vms"][DUP2]["other-config"].update({"vgpu-pool": "B", "vgpu-priority": "1",
                                               "vgpu-vm-id": "42"})
        e.save(d)
        b.admin("sync", "--from-xapi")
        assert fields(b.vms()[DUP2]) == (42, "B", 1, 64, 4096), b.vms()[DUP2]
    finally:
        e.close()


@test
def sync_errors_change_nothing():
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--vm-id", "3")
        a.admin("apply", UUID)
        b.admin("sync", "--from-xapi")
        before = b.vms()
        good = dict(e.load()["vms"][UUID]["other-config"])
        cases = [
            ({"vgpu-pool": "A", "vgpu-priority": "low", "vgpu-vm-id": "3"},
             "vm_id 3 is given to two VMs in the source"),
            ({"vgpu-pool": "Q", "vgpu-priority": "low", "vgpu-vm-id": "4"},
             "pool Q is not defined on this host"),
            ({"vgpu-pool": "A", "vgpu-priority": "urgent", "vgpu-vm-id": "4"},
             "other-config:vgpu-priority = 'urgent' is not valid"),
            ({"vgpu-pool": "A", "vgpu-vm-id": "4"}, "has vgpu keys but not vgpu-priority"),
            ({"vgpu-pool": "A", "vgpu-priority": "low", "vgpu-vm-id": "4",
              "vgpu-max-queued": "0"}, "vgpu-max-queued = '0' is not valid"),
        ]
        for keys, why in cases:
            d = e.load()
            d["vms"][OTHER]["other-config"] = dict(keys)
            e.save(d)
            r = b.run("sync", "--from-xapi")
            assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1, (keys, r)
            assert b.vms() == before, keys
        d = e.load()
        d["vms"][OTHER]["other-config"] = {}
        e.save(d)
        e.env["VGPU_STANDIN_XE_FAIL"] = "vm-list"
        b.env["VGPU_STANDIN_XE_FAIL"] = "vm-list"
        r = b.run("sync", "--from-xapi")
        assert r.returncode == 1 and "injected failure" in r.stderr, r
        assert b.vms() == before
        assert e.load()["vms"][UUID]["other-config"] == good
    finally:
        e.close()


@test
def sync_is_not_fooled_by_other_keys_values():
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "low", "--vm-id", "3")
        a.admin("apply", UUID)
        d = e.load()
        # Another key's value imitates a higher priority for the vgpu VM, and
        # the full vgpu keys of a VM that has none.
        d["vms"][UUID]["other-config"]["XenCenter.CustomFields.x"] = "y; vgpu-priority: high"
        d["vms"][OTHER]["other-config"]["note"] = (
            "x; vgpu-pool: A; vgpu-priority: high; vgpu-vm-id: 9")
        # A value with newlines that imitates a whole record (of the dom0).
        d["vms"][DUP1]["other-config"]["note"] = (
            "z\n\n\nuuid ( RO)            : %s\n    other-config (MRW): vgpu-pool: A; "
            "vgpu-priority: high; vgpu-vm-id: 5" % DOM0)
        e.save(d)
        r = b.run("sync", "--from-xapi")
        assert r.returncode == 0, r
        vms = b.vms()
        assert list(vms) == [UUID] and fields(vms[UUID])[:3] == (3, "B", 0), vms
        assert "ambiguous" in r.stderr, r.stderr
    finally:
        e.close()


@test
def hook_on_another_host_imports_and_the_daemon_follows():
    if not DAEMON:
        raise Skip("VGPU_DAEMON not set")
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--vm-id", "5")
        a.admin("apply", UUID)
        b.start_daemon()
        sock = os.path.join(b.env["VGPU_SOCKET_DIR"], "vm5.sock")
        assert not os.path.exists(sock)
        # Host B's vm-pre-start: sync --from-xapi, the daemon (following its
        # database) opens the VM's socket, the hook waits for it.
        b.env["VGPU_SOCKET_WAIT_S"] = "10"
        r = b.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        log = open(b.env["VGPU_HOOK_LOG"]).read()
        assert r.returncode == 0, (r, log)
        assert "sync: added %s as vm_id 5" % UUID in log and "ready: %s" % sock in log, log
        assert os.path.exists(sock)
        # Host B's device-model-args name host B's socket directory.
        assert ("path=%s " % sock) in e.load()["vms"][UUID]["platform"]["device-model-args"]
        # Unapplied on host A: at the next start on B it is gone there too.
        a.admin("unapply", UUID)
        r = b.hook("vm-pre-start", "-vmuuid", UUID, "-reason", "start")
        assert r.returncode == 0 and b.vms() == {}, (r, open(b.env["VGPU_HOOK_LOG"]).read())
        deadline = time.time() + 10
        while os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(sock), "the daemon kept the removed VM's socket"
    finally:
        b.stop()
        e.close()


def forged_field(name, value):
    """A map value that, printed by xe, imitates one more field line."""
    return "x\n" + ("%s ( RO)" % name).rjust(22) + ": " + value


@test
def sync_leaves_vms_running_on_other_hosts():
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--vm-id", "5")
        a.admin("register-vm", OTHER, "--pool", "A", "--priority", "low", "--vm-id", "6")
        a.admin("apply", "--all")
        d = e.load()
        d["vms"][UUID]["resident-on"] = HOST_UUID
        d["vms"][UUID]["power-state"] = "running"
        e.save(d)
        b.admin("sync", "--from-xapi")
        a.admin("sync", "--from-xapi")
        assert sorted(b.vms()) == [OTHER] and sorted(a.vms()) == sorted([UUID, OTHER])
        # UUID halts: every host serves it again, ready for its next start.
        d = e.load()
        del d["vms"][UUID]["resident-on"]
        e.save(d)
        assert "added %s" % UUID in b.admin("sync", "--from-xapi")
        # Another key's value imitates a resident-on line for OTHER (which
        # runs nowhere): B is not fooled into dropping it.
        d = e.load()
        d["vms"][OTHER]["other-config"]["note"] = forged_field("resident-on", HOST_UUID)
        e.save(d)
        r = b.run("sync", "--from-xapi")
        assert r.returncode == 0 and "ambiguous" in r.stderr, r
        assert sorted(b.vms()) == sorted([UUID, OTHER]), b.vms()
        # No inventory: which host this is cannot be told, nothing changes.
        before = b.vms()
        b.env["VGPU_XENSOURCE_INVENTORY"] = os.path.join(b.dir, "missing")
        r = b.run("sync", "--from-xapi")
        assert r.returncode == 1 and "cannot tell which host this is" in r.stderr, r
        assert r.stderr.count("\n") == 1 and b.vms() == before
    finally:
        e.close()


@test
def follower_keeps_the_database_to_what_this_host_serves():
    if not DAEMON:
        raise Skip("VGPU_DAEMON not set")
    e, a, b = two_hosts()
    try:
        a.admin("register-vm", UUID, "--pool", "B", "--priority", "high", "--vm-id", "5")
        a.admin("register-vm", OTHER, "--pool", "A", "--priority", "low", "--vm-id", "6")
        a.admin("apply", "--all")
        d = e.load()
        d["vms"][UUID].update({"resident-on": HOST_UUID, "power-state": "running"})
        e.save(d)
        sock5 = os.path.join(b.env["VGPU_SOCKET_DIR"], "vm5.sock")
        sock6 = os.path.join(b.env["VGPU_SOCKET_DIR"], "vm6.sock")
        b.start_daemon()
        b.start_xapi()
        b.start_follower()
        # Host B serves OTHER (halted) and not UUID (running on host A).
        wait_for(lambda: sorted(b.vms()) == [OTHER] and os.path.exists(sock6), "B's first sync")
        assert not os.path.exists(sock5)

        def live_priority(vm_id):
            st = json.loads(b.admin("status", "--json"))
            for v in st.get("vms", []):
                if v.get("vm_id") == vm_id:
                    return (v.get("live") or {}).get("priority")
            return None

        # A priority set on host A reaches host B's database and daemon, live.
        a.admin("set-priority", OTHER, "high")
        a.admin("apply", OTHER)
        wait_for(lambda: b.vms()[OTHER]["priority"] == 2, "the priority change on B")
        wait_for(lambda: live_priority(6) == "high", "B's daemon to take the change")
        assert "updated %s: priority low -> high" % OTHER in b.log(), b.log()
        # UUID halts on A: B serves it; OTHER starts on A: B lets it go.
        d = e.load()
        del d["vms"][UUID]["resident-on"]
        d["vms"][OTHER].update({"resident-on": HOST_UUID, "power-state": "running"})
        e.save(d)
        wait_for(lambda: sorted(b.vms()) == [UUID] and os.path.exists(sock5)
                 and not os.path.exists(sock6), "UUID in, OTHER out")
        # A malformed key changes nothing and is said once; the fix lands.
        before = b.vms()
        d = e.load()
        d["vms"][UUID]["other-config"]["vgpu-priority"] = "urgent"
        e.save(d)
        wait_for(lambda: "vgpu-priority = 'urgent' is not valid" in b.log(), "the error logged")
        time.sleep(0.3)
        assert b.vms() == before and b.log().count("'urgent'") == 1, b.log()
        d = e.load()
        d["vms"][UUID]["other-config"]["vgpu-priority"] = "low"
        e.save(d)
        wait_for(lambda: b.vms()[UUID]["priority"] == 0, "the fixed key")
        # xapi goes away (a toolstack restart): the change made meanwhile
        # lands once it is back.
        b.stop_xapi()
        d = e.load()
        d["vms"][UUID]["other-config"]["vgpu-priority"] = "medium"
        e.save(d)
        time.sleep(0.5)
        b.start_xapi()
        wait_for(lambda: b.vms()[UUID]["priority"] == 1, "the change after xapi's restart")
        assert "again in" in b.log(), b.log()
        # Unapplied on A: B's database and daemon drop it.
        a.admin("unapply", UUID)
        wait_for(lambda: b.vms() == {} and not os.path.exists(sock5), "UUID unapplied")
        assert b.follower.poll() is None, "the follower exited"
        # --once: one listing, its error is the exit status.
        r = b.run("follow-xapi", "--xapi-socket", b.xapi_sock, "--once")
        assert r.returncode == 0, r
        r = b.run("follow-xapi", "--xapi-socket", os.path.join(b.dir, "none"), "--once")
        assert r.returncode == 1 and "cannot reach xapi" in r.stderr, r
        assert r.stderr.count("\n") == 1, r.stderr
    finally:
        a.stop()
        b.stop()
        e.close()


@test
def systemd_units_start_what_exists():
    """The units' ExecStart lines parse with the real programs (clap
    refuses an unknown option or subcommand before --help is looked at)."""
    if not (ADMIN and DAEMON):
        raise Skip("VGPU_ADMIN or VGPU_DAEMON not set")
    progs = {"/usr/bin/vgpu-admin": ADMIN, "/usr/bin/vgpu-vhost-user": DAEMON}
    for unit in ("vgpu-vhost-user.service", "vgpu-xapi-follow.service"):
        text = open(os.path.join(REPO, "xen", "systemd", unit)).read()
        for line in text.splitlines():
            if line.startswith(("ExecStart=", "ExecReload=")):
                argv = line.split("=", 1)[1].split()
                assert argv[0] in progs, (unit, line)
                if line.startswith("ExecReload="):
                    argv = argv[:-1]  # the subcommand would talk to a daemon
                r = subprocess.run([progs[argv[0]]] + argv[1:] + ["--help"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True)
                assert r.returncode == 0, (unit, line, r.stderr)


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
