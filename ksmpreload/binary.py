"""What a program file allows: LD_PRELOAD needs a dynamically linked ELF that the
loader does not run in secure mode (setuid, setgid, file capabilities)."""
import os
import stat
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile


@dataclass
class Binary:
    path: str
    is_elf: bool
    static: bool = False
    secure_reason: str = ""

    @property
    def preload_ignored_because(self):
        """Why LD_PRELOAD cannot act on this program, or '' when it can."""
        if self.static:
            return "is statically linked"
        return self.secure_reason


def _has_interpreter(path):
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return any(segment["p_type"] == "PT_INTERP" for segment in elf.iter_segments())


def _secure_reason(path):
    """The loader ignores LD_PRELOAD when exec gives the process other ids or capabilities."""
    info = os.stat(path)
    if info.st_mode & stat.S_ISUID and info.st_uid != os.geteuid():
        return f"is setuid (owner uid {info.st_uid}), so the loader ignores LD_PRELOAD"
    if info.st_mode & stat.S_ISGID and info.st_gid != os.getegid():
        return f"is setgid (group gid {info.st_gid}), so the loader ignores LD_PRELOAD"
    if os.geteuid() != 0 and _has_file_capabilities(path):
        return "has file capabilities, so the loader ignores LD_PRELOAD"
    return ""


def _has_file_capabilities(path):
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def inspect(path):
    """A Binary for `path`; scripts and other non-ELF files are `is_elf=False`."""
    try:
        static = not _has_interpreter(path)
    except (ELFError, OSError):
        return Binary(path, is_elf=False)
    return Binary(path, is_elf=True, static=static, secure_reason=_secure_reason(path))
