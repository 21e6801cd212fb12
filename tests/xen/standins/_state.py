# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Shared state of the stand-in xe / xenstore-read / xenstore-write tools.

The state is one JSON file ($VGPU_STANDIN_STATE):
  {"vms": {uuid: {"name-label": ..., "power-state": ..., "dom-id": "-1",
                  "platform": {key: value}, "other-config": {key: value}}},
   "xenstore": {path: value},
   "calls": [[tool, arg...], ...]}
Every invocation is appended to "calls" so that tests can see what ran."""
import fcntl
import json
import os
import sys


def path():
    p = os.environ.get("VGPU_STANDIN_STATE")
    if not p:
        sys.stderr.write("stand-in: VGPU_STANDIN_STATE is not set\n")
        sys.exit(99)
    return p


class State:
    def __enter__(self):
        self.f = open(path(), "r+")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        self.d = json.load(self.f)
        self.d.setdefault("calls", [])
        self.d.setdefault("vms", {})
        self.d.setdefault("xenstore", {})
        return self.d

    def __exit__(self, *exc):
        self.f.seek(0)
        self.f.truncate()
        json.dump(self.d, self.f, indent=1, sort_keys=True)
        self.f.close()
        return False
