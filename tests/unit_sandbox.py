"""Run a command inside what deploy/facedb.service's sandbox does to a process, as far as a test can without
systemd as PID 1: its system-call filter (SystemCallFilter=, SystemCallErrorNumber=), built from systemd's own
group lists (``systemd-analyze syscall-filter``) and loaded through libseccomp, and its view of /proc
(ProtectProc=, ProcSubset=) in a mount and PID namespace (``unshare``). Used by tests/test_service_ops.py.

``python tests/unit_sandbox.py UNIT -- CMD ...``: reads the unit file, then execs ``CMD`` under its filter. The
caller puts it inside ``unshare`` when the unit changes /proc (see :func:`proc_options`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys
from pathlib import Path

ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000


def _errno_action(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


def settings(unit: Path, key: str) -> list[str]:
    """Every value of ``key=`` in the unit's [Service] section, in order."""
    out = []
    for line in unit.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            out.append(value.strip())
    return out


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group (``@system-service``), nested groups included, as this machine's
    systemd lists them."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    listed = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                            check=True).stdout
    calls: set[str] = set()
    for line in listed.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, seen) if item.startswith("@") else {item}
    return calls


def _names(value: str) -> set[str]:
    calls: set[str] = set()
    for item in value.lstrip("~").split():
        calls |= expand(item) if item.startswith("@") else {item}
    return calls


def allowed_calls(unit: Path) -> set[str]:
    """What the unit's SystemCallFilter= lines allow: an allow-list, then deny-lists (``~``) taken from it."""
    allowed: set[str] | None = None
    for value in settings(unit, "SystemCallFilter"):
        if value.startswith("~"):
            assert allowed is not None, "a deny-list before any allow-list is not emulated here"
            allowed -= _names(value)
        else:
            allowed = (allowed or set()) | _names(value)
    assert allowed is not None, f"{unit} has no SystemCallFilter="
    return allowed


def action(unit: Path) -> int:
    """What a call outside the filter does: SystemCallErrorNumber=, or systemd's default, killing the process."""
    number = settings(unit, "SystemCallErrorNumber")
    return _errno_action(getattr(errno, number[-1])) if number else KILL_PROCESS


def proc_options(unit: Path) -> str | None:
    """The /proc mount options ProtectProc= and ProcSubset= give (None: /proc as it is)."""
    opts = []
    protect = settings(unit, "ProtectProc")
    if protect and protect[-1] != "default":
        opts.append(f"hidepid={protect[-1]}")
    subset = settings(unit, "ProcSubset")
    if subset and subset[-1] == "pid":
        opts.append("subset=pid")
    return ",".join(opts) or None


def load_filter(unit: Path) -> None:
    """Load the unit's filter into this process (inherited by everything it runs)."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    # The unit runs as its own user; the tests run as root, and SQLite fchowns its journals only as root:
    # the chown calls (in @privileged) are left allowed so that the emulation does not fail where the unit
    # would not.
    calls = allowed_calls(unit) | {"chown", "chown32", "fchown", "fchown32", "fchownat", "lchown", "lchown32"}
    ctx = lib.seccomp_init(action(unit))
    assert ctx, "seccomp_init failed"
    for name in sorted(calls):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number >= 0:  # a call this architecture does not have
            assert lib.seccomp_rule_add(ctx, ALLOW, number, 0) == 0, name
    assert lib.seccomp_load(ctx) == 0, "seccomp_load failed"


def available() -> str | None:
    """Why the sandbox cannot be emulated here, or None."""
    import shutil

    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    if ctypes.util.find_library("seccomp") is None:
        return "libseccomp is not installed"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare cannot make namespaces here ({probe.stderr.decode().strip()})"
    return None


if __name__ == "__main__":
    unit_file, sep, *command = sys.argv[1:]
    assert sep == "--" and command, __doc__
    load_filter(Path(unit_file))
    os.execvp(command[0], command)
