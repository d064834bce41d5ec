"""What a program file allows: LD_PRELOAD needs a dynamically linked ELF that the
loader does not run in secure mode (setuid, setgid, file capabilities)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
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
    def preload_ignored_because(self) -> str:
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


def inspect(path: str) -> Binary:
    """A Binary for `path`; scripts and other non-ELF files are `is_elf=False`."""
    try:
        static = not _has_interpreter(path)
    except (ELFError, OSError):
        return Binary(path, is_elf=False)
    return Binary(path, is_elf=True, static=static, secure_reason=_secure_reason(path))


# ---- which allocator a program carries, and whether it bypasses libc's mmap -------------------

ALLOCATOR_LIBRARIES = (
    ("libjemalloc", "jemalloc (shared library)"),
    ("libtcmalloc", "tcmalloc (shared library)"),
    ("libmimalloc", "mimalloc (shared library)"),
)
# Defined (not imported) symbols that give away an allocator linked into the program itself.
ALLOCATOR_SYMBOLS = (
    ("je_mallctl", "jemalloc (linked in, je_ prefix)"),
    ("mallctl", "jemalloc (linked in)"),
    ("tc_malloc", "tcmalloc (linked in)"),
    ("mi_malloc", "mimalloc (linked in)"),
)
RAW_SYSCALL_RUNTIMES = ((".gopclntab", "Go"), (".go.buildinfo", "Go"))


def _defined_symbols(elf):
    names = set()
    for section_name in (".symtab", ".dynsym"):
        section = elf.get_section_by_name(section_name)
        if section is None:
            continue
        names.update(
            symbol.name for symbol in section.iter_symbols() if symbol["st_shndx"] != "SHN_UNDEF" and symbol.name
        )
    return names


def _needed_libraries(elf):
    dynamic = elf.get_section_by_name(".dynamic")
    if dynamic is None:
        return []
    return [tag.needed for tag in dynamic.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def allocators(path: str, loaded_libraries: Iterable[str] = ()) -> tuple[list[str], str]:
    """The allocators other than glibc's that `path` links or carries (names for people), and
    the runtime that maps memory with raw system calls, if any: (allocators, runtime or '')."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            needed = _needed_libraries(elf) + [os.path.basename(lib) for lib in loaded_libraries]
            symbols = _defined_symbols(elf)
            runtime = next((name for section, name in RAW_SYSCALL_RUNTIMES if elf.get_section_by_name(section)), "")
    except (ELFError, OSError):
        return [], ""
    found = [name for prefix, name in ALLOCATOR_LIBRARIES if any(lib.startswith(prefix) for lib in needed)]
    found += [name for symbol, name in ALLOCATOR_SYMBOLS if symbol in symbols]
    return list(dict.fromkeys(found)), runtime
