"""Large blocks at the allocator's own speed: an aligned alloc/free loop reuses memory as the
allocator does without the shim, instead of a fresh mapping (and fresh page faults) per block.
Speed itself is measured by scripts/bench_large_churn.py, not here."""
import os
import shutil
import subprocess

import pytest

from conftest import JEMALLOC, require


def mapping_calls(command, env):
    """(mmap calls, munmap calls) the command made, counted by strace."""
    require(shutil.which("strace"), "strace is missing (apt-get install strace)")
    result = subprocess.run(["strace", "-f", "-qq", "-c", "-U", "calls,name", "-e", "trace=mmap,munmap", *command],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    calls = {fields[1]: int(fields[0]) for fields in map(str.split, result.stderr.splitlines())
             if len(fields) == 2 and fields[0].isdigit()}
    return calls.get("mmap", 0), calls.get("munmap", 0)


@pytest.mark.parametrize("preload_after", [pytest.param((), id="glibc"), pytest.param((JEMALLOC,), id="jemalloc")])
@pytest.mark.parametrize("size", [256 << 10, 4 << 20])
def test_aligned_alloc_free_loop_maps_no_block_of_its_own(c_programs, shim_env, size, preload_after):
    """2,000 rounds of malloc, touch, free: a handful of mmap calls, as many as the allocator
    makes alone (glibc's dynamic mmap threshold, jemalloc's extent reuse), not one a round."""
    if preload_after and not os.path.exists(JEMALLOC):
        pytest.skip("libjemalloc2 missing")
    command = [c_programs("guest_probe"), "churn", str(size), "2000"]
    alone = mapping_calls(command, dict(os.environ, LD_PRELOAD=" ".join(preload_after)))
    under_shim = mapping_calls(command, shim_env(preload_after))
    assert under_shim[0] <= alone[0] + 8 and under_shim[1] <= alone[1] + 8, (alone, under_shim)
