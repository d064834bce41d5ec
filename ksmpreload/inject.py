"""System calls run inside another process by ptrace: the machinery of `ksmpreload attach`
(docs/ATTACH.md). No interface turns merging on from outside (prctl(PR_SET_MEMORY_MERGE)
acts on its caller, process_madvise refuses MADV_MERGEABLE), so the process makes the call.

HeldThread seizes the main thread and interrupts it; its registers are saved; for each call it
is pointed at a system call instruction already in its memory with the call's number and
arguments, and single-stepped over it; on leaving, every register is restored, the thread let
go and the signals that arrived meanwhile sent again. No code or library is loaded into the
process, and nothing is allocated in it. What differs between processors (the registers, the
instruction, how the kernel restarts an interrupted call) is in X86_64 and Aarch64.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import signal
import time

from .errors import KsmError
from .kernel import process_exists, process_maps

PTRACE_CONT, PTRACE_SINGLESTEP, PTRACE_DETACH = 7, 9, 17
PTRACE_GETREGSET, PTRACE_SETREGSET, PTRACE_SEIZE, PTRACE_INTERRUPT = 0x4204, 0x4205, 0x4206, 0x4207
PTRACE_EVENT_STOP = 128
NT_PRSTATUS = 1  # the general registers, as GETREGSET names them
WAIT_ALL = 0x40000000  # __WALL
STOP_TIMEOUT = 10.0  # seconds a thread may take to stop for ptrace
SCAN_BYTES = 16 << 20  # how much of one executable mapping is searched for a system call instruction


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


class X86_64:
    name = "x86_64"
    numbers = {"prctl": 157, "madvise": 28, "kcmp": 312}
    instruction = b"\x0f\x05"  # syscall
    alignment = 1
    ARGUMENTS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")

    class Registers(ctypes.Structure):
        """struct user_regs_struct (sys/user.h)."""

        _fields_ = [
            (name, ctypes.c_ulonglong)
            for name in (
                "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
                "fs_base gs_base ds es fs gs"
            ).split()
        ]

    @staticmethod
    def is_64_bit(registers) -> bool:
        return registers.cs == 0x33  # the code segment of 64-bit user code (0x23: 32-bit)

    @staticmethod
    def blocked_call_address(registers) -> int | None:
        """The instruction of the call the thread is blocked in: the kernel leaves rip after it."""
        return registers.rip - 2

    @staticmethod
    def avoided_address(registers) -> int | None:
        return None

    @classmethod
    def call_registers(cls, saved, address: int, number: int, arguments) -> ctypes.Structure:
        call = cls.Registers.from_buffer_copy(saved)
        call.rip, call.rax = address, number
        call.orig_rax = 2**64 - 1  # -1: the kernel does not restart the interrupted call over ours
        for name, value in zip(cls.ARGUMENTS, arguments):
            setattr(call, name, value)
        return call

    @staticmethod
    def result(registers) -> int:
        return _signed(registers.rax)


class Aarch64:
    """Written to the kernel's arm64 signal code (arch/arm64/kernel/signal.c), not yet run on one.
    The kernel rewinds pc to the `svc` of an interrupted call before the ptrace stop, and sets up
    restart_syscall after it when pc is still there: the call is made at another `svc`, so that
    nothing turns it into restart_syscall. A call that would have restarted by restart_syscall
    (nanosleep, poll's timeout) therefore starts again from the beginning (docs/ATTACH.md)."""

    name = "aarch64"
    numbers = {"prctl": 167, "madvise": 233, "kcmp": 272}
    instruction = (0xD4000001).to_bytes(4, "little")  # svc #0
    alignment = 4
    PSR_MODE32 = 0x10  # pstate: the thread runs AArch32 code

    class Registers(ctypes.Structure):
        """struct user_pt_regs (asm/ptrace.h)."""

        _fields_ = [
            ("regs", ctypes.c_ulonglong * 31),
            ("sp", ctypes.c_ulonglong),
            ("pc", ctypes.c_ulonglong),
            ("pstate", ctypes.c_ulonglong),
        ]

    @classmethod
    def is_64_bit(cls, registers) -> bool:
        return not registers.pstate & cls.PSR_MODE32

    @staticmethod
    def blocked_call_address(registers) -> int | None:
        return None

    @staticmethod
    def avoided_address(registers) -> int | None:
        return registers.pc

    @classmethod
    def call_registers(cls, saved, address: int, number: int, arguments) -> ctypes.Structure:
        call = cls.Registers.from_buffer_copy(saved)
        call.pc, call.regs[8] = address, number
        for index, value in enumerate(arguments):
            call.regs[index] = value
        return call

    @staticmethod
    def result(registers) -> int:
        return _signed(registers.regs[0])


ARCHITECTURES = {arch.name: arch for arch in (X86_64, Aarch64)}


def this_architecture():
    """The processor's X86_64 or Aarch64; KsmError on any other."""
    machine = platform.machine()
    if machine not in ARCHITECTURES:
        raise KsmError(f"attach runs system calls on x86-64 and aarch64 only, and this is {machine}")
    return ARCHITECTURES[machine]


KCMP_VM = 1


def share_memory(pid: int, other: int) -> bool:
    """Whether two processes share one address space (kcmp KCMP_VM: a vfork child and its
    parent until the child execs); False where the kernel cannot say."""
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(this_architecture().numbers["kcmp"], pid, other, KCMP_VM, 0, 0) == 0


def find_instruction(data: bytes, instruction: bytes, alignment: int, base: int, avoid: int | None) -> int | None:
    """The address of the first aligned `instruction` in `data` (mapped at `base`) other than `avoid`."""
    found = data.find(instruction)
    while found >= 0:
        address = base + found
        if address % alignment == 0 and address != avoid:
            return address
        found = data.find(instruction, found + 1)
    return None


# ---- ptrace ------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _ptrace(request: int, pid: int, address: int = 0, data: int = 0) -> int:
    result = _libc.ptrace(request, pid, ctypes.c_void_p(address), ctypes.c_void_p(data))
    if result == -1:
        code = ctypes.get_errno()
        if code:
            raise OSError(code, os.strerror(code))
    return result


def _registers(request: int, pid: int, registers: ctypes.Structure) -> int:
    """GETREGSET or SETREGSET of the general registers; returns how many bytes the kernel took
    or gave (fewer than the structure holds: a 32-bit process)."""
    vector = _IoVec(ctypes.addressof(registers), ctypes.sizeof(registers))
    _ptrace(request, pid, NT_PRSTATUS, ctypes.addressof(vector))
    return vector.length


def _read(memory, address: int, size: int) -> bytes:
    """`size` bytes of a process's memory (its /proc/PID/mem) at `address`; b"" where unreadable."""
    try:
        memory.seek(address)
        return memory.read(size)
    except (OSError, ValueError, OverflowError):
        return b""


def _wait_stop(pid: int, timeout: float | None = STOP_TIMEOUT) -> tuple[int, bool]:
    """Waits (`timeout` seconds at most; None: as long as it takes) for the thread's next stop:
    (the signal it stopped with, whether it is a ptrace event stop: PTRACE_INTERRUPT's, or a
    group stop). KsmError if the process ended or ran exec, or did not stop in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            found, status = os.waitpid(pid, WAIT_ALL | os.WNOHANG)
        except ChildProcessError:
            raise KsmError(f"{pid} is gone") from None
        if found and os.WIFSTOPPED(status):
            return os.WSTOPSIG(status), (status >> 16) == PTRACE_EVENT_STOP
        if found and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            if process_exists(pid):  # another thread ran exec: it took over the pid, untraced
                raise KsmError(f"{pid} ran exec (in another thread) during the attach: attach the new program again")
            raise KsmError(f"{pid} ended while attached")
        if deadline is not None and time.monotonic() > deadline:
            raise KsmError(f"{pid} did not stop within {timeout:g} s (it waits in the kernel)")
        time.sleep(0.001)


class HeldThread:
    """`with HeldThread(pid) as thread: thread.call("prctl", ...)`: the main thread of `pid`
    held for system calls; on leaving, whatever happened, every register is put back, the thread
    is let go and the signals it was held over are sent again (each step tried even when one
    before failed: the process may have ended)."""

    def __init__(self, pid: int, arch=None) -> None:
        self.pid, self.arch = pid, arch or this_architecture()
        self.saved = None
        self.held: list[int] = []  # signals the stops took from the thread, to send again
        self._address = None

    def __enter__(self) -> HeldThread:
        try:
            _ptrace(PTRACE_SEIZE, self.pid)
        except OSError as error:
            raise KsmError(
                f"cannot trace {self.pid}: {error.strerror} (root or CAP_SYS_PTRACE, and Yama's ptrace_scope)"
            ) from None
        try:
            whole = self._interrupt()
            if not whole or not self.arch.is_64_bit(self.saved):
                raise KsmError(f"{self.pid} runs 32-bit code: attach runs 64-bit system calls only")
            self._address = self._instruction_address()
        except BaseException:
            self._let_go()
            raise
        return self

    def __exit__(self, *_) -> None:
        self._let_go()

    def call(self, name: str, *arguments: int) -> int:
        """The result of system call `name` run by the held thread (a negative errno on failure)."""
        call = self.arch.call_registers(self.saved, self._address, self.arch.numbers[name], arguments)
        try:
            _registers(PTRACE_SETREGSET, self.pid, call)
            while True:
                _ptrace(PTRACE_SINGLESTEP, self.pid)
                # no time limit: the thread runs the call put in it (an unmerge can take long),
                # and must not be let go before it stops with every register known
                stopped_by, event = _wait_stop(self.pid, timeout=None)
                if stopped_by == signal.SIGTRAP and not event:
                    break
                if not event:  # a signal, taken from the thread by this stop: sent again at the end
                    self.held.append(stopped_by)
            result = self.arch.Registers()
            _registers(PTRACE_GETREGSET, self.pid, result)
        except ProcessLookupError:
            raise KsmError(f"{self.pid} ended while attached") from None
        return self.arch.result(result)

    def _interrupt(self) -> bool:
        """Stops the seized thread and saves its registers (False: not all of them, a 32-bit
        process); signals reported before the interrupt's own stop are held."""
        _ptrace(PTRACE_INTERRUPT, self.pid)
        while True:
            stopped_by, event = _wait_stop(self.pid)
            if event:
                break
            self.held.append(stopped_by)
            _ptrace(PTRACE_CONT, self.pid)
        saved = self.arch.Registers()
        whole = _registers(PTRACE_GETREGSET, self.pid, saved) == ctypes.sizeof(saved)
        self.saved = saved
        return whole

    def _instruction_address(self) -> int:
        """A system call instruction in the process: the one the thread is blocked behind where
        the processor allows, else the first in its vDSO or executable mappings."""
        arch, avoid = self.arch, self.arch.avoided_address(self.saved)
        with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as memory:
            blocked = arch.blocked_call_address(self.saved)
            if blocked is not None and _read(memory, blocked, len(arch.instruction)) == arch.instruction:
                return blocked
            regions = sorted(process_maps(self.pid) or [], key=lambda r: r["path"] != "[vdso]")
            for region in regions:
                if region["perms"][0] != "r" or region["perms"][2] != "x":
                    continue
                data = _read(memory, region["start"], min(region["end"] - region["start"], SCAN_BYTES))
                found = find_instruction(data, arch.instruction, arch.alignment, region["start"], avoid)
                if found is not None:
                    return found
        raise KsmError(f"no system call instruction found in {self.pid}'s memory")

    def _let_go(self) -> None:
        if self.saved is not None:
            with contextlib.suppress(OSError):
                _registers(PTRACE_SETREGSET, self.pid, self.saved)
        with contextlib.suppress(OSError):
            _ptrace(PTRACE_DETACH, self.pid)
        for number in self.held:
            with contextlib.suppress(OSError):
                os.kill(self.pid, number)
