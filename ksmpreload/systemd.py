"""Drop-ins that make a systemd service merge: the shim preloaded (as ksm-wrap does), or
systemd's own MemoryKSM=yes (prctl(PR_SET_MEMORY_MERGE) before exec, no alignment).

MemoryKSM= came in systemd 254 and failed with EINVAL there and in 255; 256 fixed it
(../shared/KSM-NOTES.md). A drop-in is the file UNIT.d/ksmpreload.conf in a unit directory:
systemd reads it on `systemctl daemon-reload`, and the service gets it when restarted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile

from . import shim_path
from .errors import KsmError
from .wrap import preload_value, shown

MEMORY_KSM_WORKS_FROM = 256
DROP_IN_NAME = "ksmpreload.conf"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service$")


def service_name(unit: str) -> str:
    """UNIT as a service name (".service" added when it has no suffix); KsmError if it is none."""
    name = unit if "." in unit else unit + ".service"
    if not UNIT_NAME.match(name) or name.startswith("@") or len(name) > 253:  # UNIT.d must fit a file name
        raise KsmError(f"{unit!r} is not a systemd service name (like redis-server or redis-server.service)", 2)
    return name


def systemd_version() -> int | None:
    """The major version of the installed systemd (systemd-analyze --version), or None."""
    tool = shutil.which("systemd-analyze") or shutil.which("systemctl")
    if not tool:
        return None
    try:
        first = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return int(first[1]) if len(first) > 1 and first[0] == "systemd" and first[1].isdigit() else None


def _quoted(value: str) -> str:
    """A value for Environment=, quoted for systemd (a path may hold % specifiers); KsmError for
    a character a unit file cannot carry on one line (a newline would start a directive)."""
    if not value.isprintable():
        raise KsmError(f"{value.encode('unicode_escape').decode()!r} cannot go into a unit file", 2)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _readable_by_everyone(path: str) -> bool:
    """Whether a service running as any user can open `path`: the file readable by others, and
    each directory above it searchable by others."""
    try:
        if not os.stat(path).st_mode & 0o004:
            return False
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent):
            if not os.stat(parent).st_mode & 0o001:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def preload_drop_in(unit: str, settings: dict[str, str]) -> tuple[str, list[str]]:
    """(a drop-in that preloads the shim into every process of `unit` with KSMPRELOAD_* `settings`,
    warnings). KsmError where the shim cannot be preloaded from where it is (as ksm-wrap says)."""
    shim = os.path.abspath(shim_path())
    if not os.path.isfile(shim):
        raise KsmError(f"the shim is missing ({shown(shim)}); reinstall ksmpreload")
    preload_value("", shim)  # KsmError for a path LD_PRELOAD splits (blanks, colons, $)
    warnings = [] if _readable_by_everyone(shim) else [
        f"{shown(shim)} is not readable by every user: a service with User= would run without "
        "the shim (install ksmpreload system-wide, or copy the shim to such a place and set KSMPRELOAD_SHIM)"
    ]  # fmt: skip
    lines = [
        f"# {unit}: run with libksmpreload.so preloaded, as `ksm-wrap` does (ksmpreload systemd)",
        "# Static or setuid programs ignore LD_PRELOAD: use `ksmpreload systemd --memory-ksm` for them.",
        "# This LD_PRELOAD replaces one the unit sets itself: add that library after the shim here.",
        "[Service]",
        f"Environment={_quoted('LD_PRELOAD=' + shim)}",
    ]
    lines += [f"Environment={_quoted(f'KSMPRELOAD_{name.upper()}={value}')}" for name, value in settings.items()]
    return "\n".join(lines) + "\n", warnings


def memory_ksm_drop_in(unit: str, version: int | None) -> str:
    """A drop-in that sets MemoryKSM=yes; KsmError where this systemd has no working MemoryKSM=."""
    if version is None or version < MEMORY_KSM_WORKS_FROM:
        found = "no systemd was found" if version is None else f"this is systemd {version}"
        raise KsmError(
            f"MemoryKSM= works from systemd {MEMORY_KSM_WORKS_FROM} on and {found}: "
            "use the default drop-in (the shim preloaded) instead"
        )
    return (
        f"# {unit}: merge its memory with prctl(PR_SET_MEMORY_MERGE), no alignment (ksmpreload systemd)\n"
        "[Service]\nMemoryKSM=yes\n"
    )


def install(unit: str, text: str, unit_dir: str = DEFAULT_UNIT_DIR) -> str:
    """Writes the drop-in for `unit` into `unit_dir` (which must exist: a mistyped directory is
    not made) and returns its path. Written to a new file of a random name first (O_EXCL: nothing
    planted there is followed) and renamed over the old drop-in, so an interrupted write leaves
    the old one or none. OSError names the path it failed on."""
    if not os.path.isdir(unit_dir):
        raise KsmError(f"{shown(unit_dir)} is not a directory (systemd reads /etc/systemd/system)")
    directory = os.path.join(unit_dir, unit + ".d")
    if not os.path.isdir(directory) or os.path.islink(directory):
        if os.path.lexists(directory):
            raise KsmError(f"{shown(directory)} exists and is not a directory")
        os.mkdir(directory, 0o755)
    handle, partial = tempfile.mkstemp(prefix=".ksmpreload.", suffix=".partial", dir=directory)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            os.fchmod(out.fileno(), 0o644)
        path = os.path.join(directory, DROP_IN_NAME)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return path
