"""Turn merging on (or off) in a process that is already running, from outside, by running one
system call inside it: prctl(PR_SET_MEMORY_MERGE, 1) acts only on the calling process, and
process_madvise refuses MADV_MERGEABLE, so no interface does it from outside.

How (docs/ATTACH.md): ptrace seizes the process's main thread and interrupts it; its registers
are saved; the thread is pointed at a `syscall` instruction that is already in its memory (the
one it is blocked behind, else one in the vDSO or a library's code) with the call's number and
arguments, and single-stepped over it; every register is then restored (orig_rax, which decides
whether an interrupted system call restarts, included), signals that arrived meanwhile are sent
again, and the thread is let go. No code or library is loaded into the process, and nothing is
allocated in it. x86-64 only for now.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import time
from dataclasses import dataclass

from . import kernel
from .errors import KsmError

PTRACE_CONT, PTRACE_SINGLESTEP, PTRACE_GETREGS, PTRACE_SETREGS, PTRACE_DETACH = 7, 9, 12, 13, 17
PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
USER64_CS = 0x33  # the code segment of 64-bit user code (0x23: 32-bit)
SYS_PRCTL = 157  # x86-64
PR_SET_MEMORY_MERGE = 67
SYSCALL_INSTRUCTION = b"\x0f\x05"  # x86-64 `syscall`
WAIT_ALL = 0x40000000  # __WALL
STOP_TIMEOUT = 10.0  # seconds a thread may take to stop for ptrace
SCAN_BYTES = 16 << 20  # how much executable memory is searched for a `syscall` instruction

REGISTERS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()


class Registers(ctypes.Structure):
    """struct user_regs_struct of x86-64 (sys/user.h)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in REGISTERS]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, address: int = 0, data: int = 0) -> int:
    result = _libc.ptrace(request, pid, ctypes.c_void_p(address), ctypes.c_void_p(data))
    if result == -1:
        code = ctypes.get_errno()
        if code:
            raise OSError(code, os.strerror(code))
    return result


@dataclass
class Attached:
    pid: int
    enabled: bool  # merging on (attach) or off (detach)
    previous: bool  # merge-any as it was before
    signals_resent: int  # signals that arrived while the thread was held, sent again


# ---- what must hold before anything is touched ------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    try:
        text = kernel.read_proc(pid, "status")
    except PermissionError as error:
        raise kernel.needs_root(error) from None
    if text is None:
        raise KsmError(f"no process {pid}")
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def check_target(pid: int, force: bool = False) -> None:
    """KsmError (one line, exit 1) when the process cannot or should not be attached; nothing is
    touched before this passes."""
    if platform.machine() != "x86_64":
        raise KsmError(f"attach runs system calls in the target on x86-64 only, and this is {platform.machine()}")
    if not kernel.prctl_merge_supported():
        raise KsmError("this kernel has no PR_SET_MEMORY_MERGE (6.4 or newer)")
    status = _status(pid)
    if kernel.thread_group(pid) != pid:
        raise KsmError(f"{pid} is a thread of process {kernel.thread_group(pid)}: attach that process")
    name, state = status.get("Name", "?").strip(), status.get("State", "?").strip()
    if "VmSize" not in status and not state.startswith("Z"):
        raise KsmError(f"{pid} ({name}) is a kernel thread: it has no memory to merge")
    if state.startswith("Z"):
        raise KsmError(f"{pid} ({name}) is a zombie, or its main thread has exited: attach stops that thread")
    if state.startswith("D"):
        raise KsmError(f"{pid} ({name}) waits in the kernel (state D, a vfork parent for one): try again later")
    tracer = int(status.get("TracerPid", "0").strip() or 0)
    if tracer:
        raise KsmError(f"{pid} is traced already (by {tracer}: a debugger or strace); a process has one tracer")
    if status.get("Seccomp", "0").strip() == "1":
        raise KsmError(f"{pid} runs in seccomp strict mode: any prctl would kill it")
    if status.get("Seccomp", "0").strip() == "2" and not force:
        raise KsmError(
            f"{pid} runs under a seccomp filter, which could kill it for a system call it does not expect; "
            "--force to attach anyway"
        )
    with contextlib.suppress(OSError), open("/proc/sys/kernel/yama/ptrace_scope") as yama:
        if yama.read().strip() == "3":
            raise KsmError("Yama's ptrace_scope is 3: no process may be traced until reboot")


# ---- running one system call inside the process -----------------------------------------------


def _wait_stop(pid: int) -> tuple[int, bool]:
    """Waits (STOP_TIMEOUT seconds at most) for the thread's next stop: (the signal it stopped
    with, whether it is a ptrace event stop: PTRACE_INTERRUPT's, or a group stop). KsmError if
    the process ended or did not stop."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        try:
            found, status = os.waitpid(pid, WAIT_ALL | os.WNOHANG)
        except ChildProcessError:
            raise KsmError(f"{pid} is gone") from None
        if found and os.WIFSTOPPED(status):
            return os.WSTOPSIG(status), (status >> 16) == PTRACE_EVENT_STOP
        if found and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            raise KsmError(f"{pid} ended while attached")
        if time.monotonic() > deadline:
            raise KsmError(f"{pid} did not stop within {STOP_TIMEOUT:g} s (it waits in the kernel)")
        time.sleep(0.001)


def _syscall_address(pid: int, registers: Registers) -> int:
    """A `syscall` instruction in the process: the one before its instruction pointer (a thread
    blocked in a system call), else the first in its vDSO or executable mappings."""
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        try:
            memory.seek(registers.rip - 2)
            if memory.read(2) == SYSCALL_INSTRUCTION:
                return registers.rip - 2
        except OSError:
            pass
        regions = sorted(kernel.process_maps(pid) or [], key=lambda r: r["path"] != "[vdso]")
        for region in regions:
            if region["perms"][0] != "r" or region["perms"][2] != "x":
                continue
            try:
                memory.seek(region["start"])
                found = memory.read(min(region["end"] - region["start"], SCAN_BYTES)).find(SYSCALL_INSTRUCTION)
            except OSError:
                continue
            if found >= 0:
                return region["start"] + found
    raise KsmError(f"no syscall instruction found in {pid}'s memory")


def _run_syscall(pid: int, saved: Registers, held: list[int], number: int, *args: int) -> int:
    """The result of system call `number` run by the stopped thread; signals that arrive meanwhile
    are added to `held` (sent again once it is let go). The caller restores `saved` afterwards."""
    if saved.cs != USER64_CS:
        raise KsmError(f"{pid} runs 32-bit code: attach runs x86-64 system calls only")
    call = Registers.from_buffer_copy(saved)
    call.rip = _syscall_address(pid, saved)
    call.orig_rax = 2**64 - 1  # -1: no system call to restart on the way back to user space
    call.rax = number
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(call, name, value)
    _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(call))
    while True:
        _ptrace(PTRACE_SINGLESTEP, pid)
        stopped_by, event = _wait_stop(pid)
        if stopped_by == signal.SIGTRAP and not event:
            break
        if not event:  # a signal, taken from the thread by this stop: sent again at the end
            held.append(stopped_by)
    result = Registers()
    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(result))
    return result.rax - 2**64 if result.rax >= 2**63 else result.rax


def _interrupt(pid: int, held: list[int]) -> Registers:
    """Stops the seized thread (PTRACE_INTERRUPT) and returns its registers; signals reported
    before the interrupt's stop are added to `held`."""
    _ptrace(PTRACE_INTERRUPT, pid)
    while True:
        stopped_by, event = _wait_stop(pid)
        if event:
            break
        held.append(stopped_by)  # a signal reported before the interrupt's stop: sent again later
        _ptrace(PTRACE_CONT, pid)
    saved = Registers()
    _ptrace(PTRACE_GETREGS, pid, 0, ctypes.addressof(saved))
    return saved


def _let_go(pid: int, saved: Registers | None, held: list[int]) -> None:
    """Every register back as it was, the thread let go, the signals it was held over sent again.
    Each step is tried even when one before failed (the process may have ended)."""
    if saved is not None:
        with contextlib.suppress(OSError):
            _ptrace(PTRACE_SETREGS, pid, 0, ctypes.addressof(saved))
    with contextlib.suppress(OSError):
        _ptrace(PTRACE_DETACH, pid)
    for number in held:
        with contextlib.suppress(OSError):
            os.kill(pid, number)


def _merge_any(pid: int) -> bool:
    return bool((kernel.process_ksm_stat(pid) or {}).get("ksm_merge_any"))


def set_merging(pid: int, enabled: bool = True, force: bool = False) -> Attached:
    """prctl(PR_SET_MEMORY_MERGE, enabled) inside the running process `pid` (module docstring).
    The process is left as it was, and running, whatever happens; KsmError says why not."""
    check_target(pid, force)
    previous = _merge_any(pid)
    try:
        _ptrace(PTRACE_SEIZE, pid)
    except OSError as error:
        raise KsmError(
            f"cannot trace {pid}: {error.strerror} (root or CAP_SYS_PTRACE, and Yama's ptrace_scope)"
        ) from None
    saved, held = None, []
    try:
        saved = _interrupt(pid, held)
        result = _run_syscall(pid, saved, held, SYS_PRCTL, PR_SET_MEMORY_MERGE, int(enabled), 0, 0, 0)
    except ProcessLookupError:
        raise KsmError(f"{pid} ended while attached") from None
    finally:
        _let_go(pid, saved, held)
    if result < 0:
        raise KsmError(f"prctl(PR_SET_MEMORY_MERGE, {int(enabled)}) failed in {pid}: {os.strerror(-result)}")
    return Attached(pid, enabled, previous, len(held))
