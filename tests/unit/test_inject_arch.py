"""What attach does per processor that can be checked on any machine: register layouts, the
registers of an injected call, its result, and where the system call instruction is taken."""

import ctypes

from ksmpreload.inject import Aarch64, X86_64, find_instruction


def test_register_layouts_are_the_kernels():
    assert ctypes.sizeof(X86_64.Registers) == 27 * 8  # struct user_regs_struct
    assert X86_64.Registers.orig_rax.offset == 15 * 8 and X86_64.Registers.cs.offset == 17 * 8
    assert ctypes.sizeof(Aarch64.Registers) == 34 * 8  # struct user_pt_regs: x0-x30, sp, pc, pstate
    assert Aarch64.Registers.pc.offset == 32 * 8


def test_an_x86_64_call_sets_number_arguments_and_no_restart():
    saved = X86_64.Registers(rip=0x1002, rax=2**64 - 512, orig_rax=0, rdi=7, cs=0x33)
    call = X86_64.call_registers(saved, 0x5000, 28, (0x10000, 4096, 12))
    assert (call.rip, call.rax, call.rdi, call.rsi, call.rdx) == (0x5000, 28, 0x10000, 4096, 12)
    assert call.orig_rax == 2**64 - 1, "-1: the interrupted call is not restarted over ours"
    assert (saved.rip, saved.rdi) == (0x1002, 7), "the saved registers are left as they were"
    assert X86_64.blocked_call_address(saved) == 0x1000
    assert X86_64.is_64_bit(saved) and not X86_64.is_64_bit(X86_64.Registers(cs=0x23))


def test_an_aarch64_call_uses_x8_and_x0_to_x5_and_avoids_the_rewound_svc():
    saved = Aarch64.Registers(pc=0x4000, pstate=0)
    saved.regs[0], saved.regs[8] = 3, 63  # a read() it was blocked in
    call = Aarch64.call_registers(saved, 0x7000, 167, (67, 1, 0, 0, 0))
    assert (call.pc, call.regs[8], call.regs[0], call.regs[1]) == (0x7000, 167, 67, 1)
    assert (saved.regs[0], saved.regs[8]) == (3, 63)
    assert Aarch64.blocked_call_address(saved) is None and Aarch64.avoided_address(saved) == 0x4000
    assert Aarch64.is_64_bit(saved) and not Aarch64.is_64_bit(Aarch64.Registers(pstate=0x10))


def test_results_are_signed():
    aarch64 = Aarch64.Registers()
    aarch64.regs[0] = 2**64 - 22
    assert X86_64.result(X86_64.Registers(rax=2**64 - 22)) == Aarch64.result(aarch64) == -22


def test_the_instruction_is_found_aligned_and_not_at_the_avoided_address():
    svc = Aarch64.instruction
    data = b"\x00\x00" + svc + b"\x00\x00" + svc + svc  # one misaligned, then two aligned
    assert find_instruction(data, svc, 4, 0x1000, None) == 0x1008
    assert find_instruction(data, svc, 4, 0x1000, 0x1008) == 0x100C
    assert find_instruction(data, svc, 4, 0x1000, 0x100C) == 0x1008
    assert find_instruction(b"\x00" * 16, svc, 4, 0x1000, None) is None
    assert find_instruction(b"\x90\x0f\x05", X86_64.instruction, 1, 0x10, None) == 0x11
