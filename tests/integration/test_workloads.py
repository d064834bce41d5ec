"""The workloads (ksmpreload.workloads) in their small size, on the real kernel: each merges what
it should under ksm-wrap, and nothing without it."""

import importlib.util
import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from conftest import require, require_root_ksm
from ksmpreload import diagnosis, kernel
from ksmpreload.workloads import SIZES, data, memcached, pytorch, runner


@pytest.fixture(autouse=True)
def root_and_ksm():
    require_root_ksm()


def require_program(name):
    require(shutil.which(name) is not None, f"{name} is not installed")


def require_module(name):
    require(importlib.util.find_spec(name) is not None, f"the Python module {name} is not installed")


def saved_beyond_zero_pages(run):
    """At most what merging saved in pages that are not all zeros: the saving less every
    all-zero page, as if all of them had merged."""
    return run["saved_bytes"] - run["zero_bytes"]


def test_redis_servers_merge_their_large_values():
    require_program("redis-server")
    require_module("redis")
    same, duplicates = runner.run("redis")["runs"]
    for run in (same, duplicates):
        assert run["expected_saved_bytes"] > 4 << 20, run["label"]
        assert run["settled"], run["label"]
        assert saved_beyond_zero_pages(run) >= 0.8 * run["expected_saved_bytes"], without_samples(run)
        assert all(row["shim"] for row in run["per_process"]), run["per_process"]


def test_redis_without_ksm_wrap_merges_nothing():
    require_program("redis-server")
    require_module("redis")
    for run in runner.run("redis", strategy="none")["runs"]:
        assert not run["mergeable"] and run["merged_pages"] == 0, without_samples(run)
        assert run["saved_bytes"] == 0 and not any(row["shim"] for row in run["per_process"])


def test_memcached_servers_merge_equal_values_loaded_in_the_same_order():
    require_program("memcached")
    require_module("pymemcache")
    (run,) = runner.run("memcached")["runs"]
    assert run["processes"] == 3 and run["settled"]
    assert run["throughput_unit"] == "sets/s" and run["throughput"] > 100, without_samples(run)
    assert saved_beyond_zero_pages(run) >= 0.8 * run["expected_saved_bytes"], without_samples(run)


def test_memcached_slab_sizes_of_whole_pages_merge_whatever_the_order(tmp_path):
    """Default slab classes put an item at a page offset that depends on its slot: loaded in
    another order, equal values sit at other offsets and their pages differ."""
    require_program("memcached")
    require_module("pymemcache")
    sizes = data.value_sizes(SIZES["small"]["value_bytes"])
    runs = {}
    for name, options in (("default", []), ("pages", ["-o", diagnosis.memcached_page_slab_sizes()])):
        spec = memcached.run(sizes, 2, "auto", options, "shuffled", str(tmp_path))
        with spec.load() as loaded:
            runs[name] = runner.measure_run(spec, loaded, 60)
    expected = runs["default"].expected_saved_bytes
    assert runs["default"].saved_bytes - runs["default"].zero_bytes < 0.3 * expected, runs["default"]
    assert runs["pages"].saved_bytes - runs["pages"].zero_bytes >= 0.8 * expected, runs["pages"]


def torch_model_bytes():
    return pytorch.model_bytes(SIZES["small"]["torch_layers"], SIZES["small"]["torch_width"])


def without_samples(run):
    return {key: value for key, value in run.items() if key not in ("samples", "per_process")}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "madvise"])
def test_pytorch_workers_merge_the_weights(strategy):
    require_module("torch")
    (run,) = runner.run("pytorch", strategy=strategy)["runs"]
    assert [row["data_bytes"] for row in run["per_process"]] == [torch_model_bytes()] * 3
    assert run["expected_saved_bytes"] == 2 * torch_model_bytes()
    assert saved_beyond_zero_pages(run) >= 0.9 * run["expected_saved_bytes"], without_samples(run)


def test_pytorch_workers_without_ksm_wrap_merge_nothing():
    require_module("torch")
    (run,) = runner.run("pytorch", strategy="none")["runs"]
    assert run["saved_bytes"] == 0 and run["merged_pages"] == 0, without_samples(run)
    assert run["nonzero_potential_bytes"] >= 0.9 * 2 * torch_model_bytes()  # the weights are there


def test_stress_ng_duplicate_fill_merges_and_random_fill_does_not():
    """The post's stress-ng: 12 million pages scanned, none merged. A random fill method
    (rand-set) leaves nothing to merge; zero-one's pages all hold the same bytes."""
    require_program("stress-ng")
    (duplicate,) = runner.run("stress-ng", method="zero-one")["runs"]
    (random_fill,) = runner.run("stress-ng", method="rand-set")["runs"]
    held = SIZES["small"]["vm_bytes"]
    assert duplicate["data_bytes"] == random_fill["data_bytes"] == held
    assert duplicate["saved_bytes"] >= 0.9 * held, duplicate["per_process"]
    assert random_fill["saved_bytes"] < 0.05 * held, without_samples(random_fill)


def test_python_prefork_workers_merge_their_copies_and_serve_requests():
    """gunicorn's workers copy the master's pages by collecting garbage; merged, the set takes
    far less memory (PSS), and requests that write reference counts then fault on merged pages."""
    require_module("gunicorn")
    (run,) = runner.run("python-prefork")["runs"]
    details = run["details"]
    assert run["processes"] == 5 and run["settled"], without_samples(run)
    assert details["pss_after_merge_bytes"] < 0.6 * details["pss_before_merge_bytes"], details
    for load in (details["load_before_merge"], details["load_after_merge"]):
        assert load["requests"] > 100 and load["errors"] == 0 and load["p99_ms"] >= load["p50_ms"] > 0, load
    assert details["load_after_merge"]["cow_ksm"] > 0, details


def test_compare_serves_a_workload_and_demo_shows_one(tmp_path):
    """The CLI ends: `compare --workload` on one arm, `demo --workload --json` and its Markdown."""
    require_program("stress-ng")
    common = ["--workload", "stress-ng", "--method", "zero-one", "--json"]
    done = subprocess.run(["ksmpreload", "compare", "--strategies", "prctl", *common], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (arm,) = json.loads(done.stdout)
    assert arm["processes"] == 5 and arm["saved_bytes"] >= 0.9 * SIZES["small"]["vm_bytes"], arm["per_process"]
    markdown = tmp_path / "stress-ng.md"
    done = subprocess.run(["ksmpreload", "demo", *common, "--markdown", str(markdown)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (run,) = json.loads(done.stdout)["runs"]
    assert run["label"] == "--vm-method zero-one" and run["saved_bytes"] >= 0.9 * SIZES["small"]["vm_bytes"]
    assert f"| --vm-method zero-one | 5 | {run['data_bytes'] / 2**20:,.1f} |" in markdown.read_text()


def test_sigterm_while_merging_stops_the_workload_and_puts_the_knobs_back():
    """As Ctrl-C does: a service manager's SIGTERM must not leave servers or a fast scan rate."""
    require_program("stress-ng")
    knobs = ("run", "pages_to_scan", "sleep_millisecs", "smart_scan")
    before = {name: kernel.read_knob(name) for name in knobs}
    command = ["ksmpreload", "demo", "--workload", "stress-ng", "--method", "zero-one", "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, started = time.monotonic() + 60, []
    while time.monotonic() < deadline and not (started and kernel.read_knob("run") == 1):
        started = [child for child in psutil.Process(proc.pid).children(recursive=True) if "stress-ng" in child.name()]
        time.sleep(0.1)
    assert started and kernel.read_knob("run") == 1, "the workload never reached its merging"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and err == "" and out == "", (proc.returncode, err)
    assert not [child for child in started if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert {name: kernel.read_knob(name) for name in knobs} == before
