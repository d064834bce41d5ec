"""The doctor's predictions against what the remedy then saves, on the workloads of the README
(issue 14): `ksmpreload compare` reads the processes of its none arm (as the doctor does) and
predicts what ksm-wrap saves; the prctl arm (ksm-wrap's default) then measures it. Each within
20%. The CPython and plain glibc cases are in test_layout.py."""

import importlib.util
import json
import shutil
import subprocess

import pytest

from conftest import require, require_root_ksm

NEEDS = {"redis": "redis-server", "memcached": "memcached", "pytorch": None}  # the program each runs
MODULES = {"redis": "redis", "memcached": "pymemcache", "pytorch": "torch"}  # and its Python client


@pytest.mark.parametrize("workload", list(NEEDS))
def test_prediction_of_ksm_wrap_within_a_fifth_of_its_saving(workload):
    require_root_ksm()
    program = NEEDS[workload]
    require(program is None or shutil.which(program) is not None, f"{program} is not installed")
    require(importlib.util.find_spec(MODULES[workload]) is not None, f"{MODULES[workload]} is not installed")
    done = subprocess.run(
        ["ksmpreload", "compare", "--strategies", "none,prctl", "--timeout", "90", "--json",
         "--workload", workload, "--size", "small"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    arms = {arm["strategy"]: arm for arm in json.loads(done.stdout)}
    saved, predicted = arms["prctl"]["saved_bytes"], arms["prctl"]["predicted_bytes"]
    assert saved > 8 << 20, arms["prctl"]
    assert abs(predicted - saved) <= 0.2 * saved, (workload, predicted, saved)
