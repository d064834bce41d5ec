"""Drop-ins that make a systemd service merge: the shim preloaded (as ksm-wrap does), or
systemd's own MemoryKSM=yes (prctl(PR_SET_MEMORY_MERGE) before exec, no alignment).

MemoryKSM= came in systemd 254 and failed with EINVAL there and in 255; 256 fixed it
(../shared/KSM-NOTES.md). A drop-in is the file UNIT.d/ksmpreload.conf in a unit directory:
systemd reads it on `systemctl daemon-reload`, and the service gets it when restarted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from . import shim_path
from .errors import KsmError

MEMORY_KSM_WORKS_FROM = 256
DROP_IN_NAME = "ksmpreload.conf"
DEFAULT_UNIT_DIR = "/etc/systemd/system"
UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\@-]+\.service$")


def service_name(unit: str) -> str:
    """UNIT as a service name (".service" added when it has no suffix); KsmError if it is none."""
    name = unit if "." in unit else unit + ".service"
    if not UNIT_NAME.match(name) or len(name) > 255:
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
    """A value for Environment=, quoted for systemd (a path may hold blanks or % specifiers)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def preload_drop_in(unit: str, settings: dict[str, str]) -> str:
    """A drop-in that preloads the shim into every process of `unit`, with KSMPRELOAD_* `settings`."""
    shim = os.path.abspath(shim_path())
    lines = [
        f"# {unit}: run with libksmpreload.so preloaded, as `ksm-wrap` does (ksmpreload systemd)",
        "# Static or setuid programs ignore LD_PRELOAD: use `ksmpreload systemd --memory-ksm` for them.",
        "[Service]",
        f"Environment={_quoted('LD_PRELOAD=' + shim)}",
    ]
    lines += [f"Environment={_quoted(f'KSMPRELOAD_{name.upper()}={value}')}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


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
    """Writes the drop-in for `unit` under `unit_dir`; returns its path. Written to a temporary
    file first and renamed, so an interrupted write leaves the old drop-in or none."""
    directory = os.path.join(unit_dir, unit + ".d")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, DROP_IN_NAME)
    partial = path + ".partial"
    with open(partial, "w") as out:
        out.write(text)
    os.chmod(partial, 0o644)
    os.replace(partial, path)
    return path
