"""The doctor's predictions against what the remedy then saves, on the workloads of the README
(issue 14): `ksmpreload compare` reads the processes of its none arm (as the doctor does) and
predicts what ksm-wrap saves; the prctl arm (ksm-wrap's default) then measures it; and
memcached's slab-class remedy. Each within 20%. The CPython and plain glibc cases are in
test_layout.py."""

import importlib.util
import json
import shutil
import subprocess

import pytest

from conftest import require, require_root_ksm
from ksmpreload import diagnosis, layout, potential
from ksmpreload.workloads import SIZES, data, memcached, runner

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


def test_memcached_slab_class_prediction_within_a_fifth_of_its_saving(tmp_path):
    """Two memcached servers with the default slab classes, the second loaded in another order:
    the doctor's prediction for slab classes of whole pages, against two servers started that way
    (under ksm-wrap) with the same data in the same orders."""
    require_root_ksm()
    require(shutil.which("memcached") is not None, "memcached is not installed")
    require(importlib.util.find_spec("pymemcache") is not None, "pymemcache is not installed")
    sizes = data.value_sizes(SIZES["small"]["value_bytes"])
    with memcached.run(sizes, 2, "none", [], "shuffled", str(tmp_path)).load() as loaded:
        pids = list(loaded.data_by_pid)
        found = diagnosis.predictions(potential.potential(pids), layout.duplicates_at_any_offset(pids))
    predicted = {entry["remedy"]: entry for entry in found}
    spec = memcached.run(sizes, 2, "auto", ["-o", diagnosis.memcached_page_slab_sizes()], "shuffled", str(tmp_path))
    with spec.load() as loaded:
        run = runner.measure_run(spec, loaded, 60)
    # the duplicates: whole-page classes also make zero pages (the rest of each item's slot), merged too
    measured = run.saved_bytes - run.zero_bytes
    assert measured > 8 << 20, run
    slabs = predicted["memcached-page-slabs"]["duplicate_bytes"]
    assert abs(slabs - measured) <= 0.2 * measured, (slabs, measured)
    assert predicted["ksm-wrap"]["saved_bytes"] == predicted["as-is"]["saved_bytes"], "the shim moves no item"
