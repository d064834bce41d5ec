"""ksm-wrap: run an unmodified program with libksmpreload.so preloaded, so its memory merges.

The launcher execs the program itself: the pid stays the program's.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from collections.abc import Mapping
from typing import NoReturn

import click

from . import binary, kernel, shim_path
from .edge import run_cli
from .errors import EXIT_NOT_FOUND, KsmError, NeedsRoot
from .sizes import SizeParam

CANNOT_EXECUTE = 126  # as a shell says
SHIM_NAME = "libksmpreload.so"
MAX_THRESHOLD = 1 << 40  # the shim's bound (shim/config.c read_threshold)
# LD_PRELOAD splits at spaces and colons (glibc; musl at any blank too) and expands $LIB,
# $ORIGIN and $PLATFORM: a shim path holding one of these would not reach the program.
NOT_IN_PRELOAD = " \t\n\v\f\r:$"


def shown(text: str) -> str:
    """`text` with control and other unprintable characters escaped (\\x1b), for one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def say(message: str) -> None:
    click.echo(f"ksm-wrap: {message}", err=True)


def find_program(name: str) -> str:
    """The file `name` runs, as the shell would find it, or a KsmError with its exit code."""
    path = name if "/" in name else shutil.which(name)
    if not path or not os.path.exists(path):
        raise KsmError(f"command not found: {shown(name)}", EXIT_NOT_FOUND)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise KsmError(f"cannot execute {shown(path)}: not an executable file", CANNOT_EXECUTE)
    return path


def is_shim(entry: str, shim: str) -> bool:
    """An LD_PRELOAD entry that is the shim: the same file, or any file called libksmpreload.so."""
    try:
        return os.path.samefile(entry, shim) or os.path.basename(entry) == SHIM_NAME
    except OSError:
        return False  # no such file: the loader skips it


def preload_value(existing: str, shim: str) -> str:
    """The shim first, so its wrappers see every call and pass it to whatever allocator
    follows (a preloaded jemalloc included); what was already preloaded is kept as it is.
    Where that already names the shim (a nested ksm-wrap, a copy), nothing is added."""
    if any(is_shim(entry, shim) for entry in existing.replace(":", " ").split()):
        return existing
    if any(c in NOT_IN_PRELOAD for c in shim):
        raise KsmError(
            f"LD_PRELOAD cannot carry the shim's path {shown(shim)} (it splits at blanks and "
            "colons and expands $): copy the shim to a path without them and point "
            "KSMPRELOAD_SHIM at it"
        )
    return f"{shim} {existing}" if existing.strip() else shim


def shim_environment(
    environ: Mapping[str, str], strategy: str | None, threshold: int | None, align: bool | None, verbose: bool | None
) -> dict[str, str]:
    """The environment with the shim preloaded; a setting left None keeps the environment's."""
    shim = os.path.abspath(shim_path())  # a bare name in LD_PRELOAD is searched elsewhere
    if not os.path.isfile(shim):
        raise KsmError(f"the shim is missing ({shown(shim)}); reinstall ksmpreload")
    env = dict(environ)
    env["LD_PRELOAD"] = preload_value(environ.get("LD_PRELOAD", ""), shim)
    if strategy is not None:
        env["KSMPRELOAD_STRATEGY"] = strategy
    if threshold is not None:
        env["KSMPRELOAD_THRESHOLD"] = str(threshold)
    if align is not None:
        env["KSMPRELOAD_ALIGN"] = "1" if align else "0"
    if verbose:
        env["KSMPRELOAD_VERBOSE"] = "1"
    return env


def execute(program: str, args: list[str], env: Mapping[str, str]) -> NoReturn:
    """execve, and as POSIX execvp does, a file the kernel cannot run (ENOEXEC: a script without
    a #! line) runs with /bin/sh, in the same environment."""
    try:
        os.execve(program, args, env)
    except OSError as error:
        if error.errno != errno.ENOEXEC:
            raise
    os.execve("/bin/sh", ["/bin/sh", program, *args[1:]], env)


def turn_ksm_on() -> None:
    """Turn KSM on with a scan rate suited to this machine's memory; report what changed."""
    kernel.require_ksm()
    knobs = kernel.read_knobs()
    if knobs.get("run") == 1:
        say("KSM is already running; nothing changed")
        return
    changes = []
    suggested = kernel.suggested_pages_to_scan(kernel.mem_total_bytes(), knobs.get("sleep_millisecs", 20))
    if knobs.get("advisor_mode", "none") == "none" and knobs.get("pages_to_scan", 0) < suggested:
        kernel.write_knob("pages_to_scan", suggested)
        changes.append(f"pages_to_scan {knobs['pages_to_scan']} -> {suggested}")
    kernel.write_knob("run", 1)
    changes.append(f"run {knobs.get('run')} -> 1")
    say("changed " + ", ".join(changes))


def warn_if_ksm_idle() -> None:
    if not kernel.ksm_available():
        say("this kernel has no KSM: the program runs, but nothing will merge")
    elif kernel.read_knobs().get("run") != 1:
        say("KSM is not running (run != 1): nothing merges until it is; use --enable-ksm or 'ksmpreload ksm on'")


def may_merge_for(target: binary.Binary, euid: int) -> bool:
    """Whether ksm-wrap may make `target` mergeable through prctl, which it inherits across
    exec: not when exec gives it privileges the caller lacks (setuid, setgid, file
    capabilities), unless the caller is root: merging exposes its pages to timing by others."""
    return not target.secure_reason or euid == 0


def merge_without_preload(program: str, target: binary.Binary) -> None:
    """For static and secure programs: prctl here, kept across exec on Linux 6.7+ (no alignment)."""
    program, reason = shown(program), target.preload_ignored_because
    if not may_merge_for(target, os.geteuid()):
        say(
            f"{program} {target.secure_reason}; it runs with privileges you do not have, so its memory "
            "is left unmergeable (merging would expose its pages to timing by other processes: "
            "docs/SECURITY.md); run ksm-wrap as root to merge it anyway"
        )
        return
    if not kernel.prctl_merge_supported():
        say(
            f"{program} {reason}; this kernel has no prctl(PR_SET_MEMORY_MERGE) either, "
            "so its memory cannot be made mergeable; running it unchanged"
        )
        return
    from . import native

    try:
        native.set_memory_merge(True)
    except OSError as error:
        say(f"{program} {reason}; prctl(PR_SET_MEMORY_MERGE) failed ({error.strerror}); running it unchanged")
        return
    say(
        f"{program} {reason}: using prctl(PR_SET_MEMORY_MERGE), which the program inherits "
        "(whole-process merging, no alignment of its allocations)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False})
@click.option(
    "--strategy",
    type=click.Choice(["auto", "prctl", "madvise", "observe"]),
    default=None,
    help="How memory is made mergeable. auto: prctl(PR_SET_MEMORY_MERGE) where the kernel has it "
    "(6.4+), else madvise. prctl marks every mapping without splitting any; madvise marks "
    "only large allocations and mappings. observe: change nothing, only count the program's "
    "own madvise calls (what `ksmpreload doctor --as-is` uses). "
    "[default: $KSMPRELOAD_STRATEGY, else auto]",
)
@click.option(
    "--threshold",
    type=SizeParam(kernel.page_size(), MAX_THRESHOLD),
    default=None,
    help="Allocations and mappings at least this large are aligned and marked (like 16K or 2M), "
    "from one page to 1T. [default: $KSMPRELOAD_THRESHOLD, else 8K]",
)
@click.option(
    "--align/--no-align",
    default=None,
    help="Page-align large allocations, or leave them where the allocator puts them (identical "
    "buffers then rarely give identical pages). [default: $KSMPRELOAD_ALIGN (1 or 0), else align]",
)
@click.option(
    "--enable-ksm", is_flag=True, help="Turn KSM on (root) with a scan rate suited to this machine if it is off."
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No warning that KSM is not running (for a tool that turns it on once the program has loaded).",
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    default=None,
    help="The shim says what it chose, on stderr. [default: $KSMPRELOAD_VERBOSE (1 or 0), else quiet]",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def cli(
    strategy: str | None,
    threshold: int | None,
    align: bool | None,
    enable_ksm: bool,
    quiet: bool,
    verbose: bool | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with Kernel Samepage Merging working on its memory.

    Settings already in the environment (KSMPRELOAD_STRATEGY, _THRESHOLD, _ALIGN, _VERBOSE) are
    kept where the matching option is absent; the shim warns about invalid ones itself.

    \b
    Example:
      ksm-wrap redis-server --port 6380
      ksm-wrap --strategy madvise --threshold 64K python3 app.py
    """
    if enable_ksm and os.geteuid() != 0:
        raise NeedsRoot(f"--enable-ksm (writing {kernel.knob_path('run')})")
    program = find_program(command[0])
    target = binary.inspect(os.path.realpath(program))
    observe = (strategy or os.environ.get("KSMPRELOAD_STRATEGY")) == "observe"
    preload_ignored = target.is_elf and target.preload_ignored_because and not observe
    env = dict(os.environ) if preload_ignored else shim_environment(os.environ, strategy, threshold, align, verbose)
    if enable_ksm:
        turn_ksm_on()
    elif not quiet:
        warn_if_ksm_idle()
    if preload_ignored:
        merge_without_preload(program, target)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        execute(program, list(command), env)
    except OSError as error:
        raise KsmError(f"cannot execute {shown(program)}: {error.strerror}", CANNOT_EXECUTE)


def main() -> None:
    run_cli(cli, "ksm-wrap")


if __name__ == "__main__":
    main()
