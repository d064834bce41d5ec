"""The shim must not multiply a process's mappings (the kernel caps them at vm.max_map_count):
one million mixed allocations and frees across the threshold, in four threads."""

import json
import subprocess

import pytest

ALLOWED_EXTRA_MAPPINGS = 32  # the shim's own library, its counters file, a few heap parts


def peak_mappings(program, env=None):
    result = subprocess.run([program, "250000", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["maps_peak"]


@pytest.mark.parametrize("strategy", ["prctl", "madvise"])
def test_mappings_stay_within_a_constant_of_no_shim(c_programs, shim_env, strategy):
    program = c_programs("vma_churn")
    without = peak_mappings(program)
    with_shim = peak_mappings(program, shim_env(strategy=strategy))
    assert with_shim <= without + ALLOWED_EXTRA_MAPPINGS, f"{with_shim} mappings against {without} without the shim"
