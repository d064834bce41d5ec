"""The blog post's four workloads (scripts/scenarios.py) in their small size, on the real kernel:
each merges what it should under ksm-wrap, and nothing without it."""

import importlib.util
import os
import shutil
import sys

import pytest

from conftest import REPO, require, require_root_ksm

sys.path.insert(0, os.path.join(REPO, "scripts"))
import scenarios  # noqa: E402


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
    return run["total"]["saved_bytes"] - run["zero_bytes"]


def test_redis_servers_merge_their_large_values():
    require_program("redis-server")
    require_module("redis")
    same, duplicates = scenarios.redis("small")["runs"]
    for run in (same, duplicates):
        assert run["expected_saved_bytes"] > 4 << 20, run["label"]
        assert run["settled"], run["label"]
        assert saved_beyond_zero_pages(run) >= 0.8 * run["expected_saved_bytes"], (run["label"], run["total"])
        assert all(row["shim"] for row in run["processes"]), run["processes"]


def test_redis_without_ksm_wrap_merges_nothing():
    require_program("redis-server")
    require_module("redis")
    for run in scenarios.redis("small", strategy="none")["runs"]:
        assert not run["mergeable"] and run["total"]["ksm_merging_pages"] == 0, run["total"]
        assert run["total"]["saved_bytes"] == 0 and not any(row["shim"] for row in run["processes"])


def test_memcached_servers_merge_equal_values_loaded_in_the_same_order():
    require_program("memcached")
    require_module("pymemcache")
    (run,) = scenarios.memcached("small")["runs"]
    assert len(run["processes"]) == 3 and run["settled"]
    assert saved_beyond_zero_pages(run) >= 0.8 * run["expected_saved_bytes"], run["total"]


def test_memcached_slab_sizes_of_whole_pages_merge_whatever_the_order(tmp_path):
    """Default slab classes put an item at a page offset that depends on its slot: loaded in
    another order, equal values sit at other offsets and their pages differ."""
    require_program("memcached")
    require_module("pymemcache")
    sizes = scenarios.value_sizes(scenarios.SIZES["small"]["value_bytes"])
    runs = {
        name: scenarios.memcached_run(sizes, 2, "auto", options, "shuffled", 60, str(tmp_path))
        for name, options in (("default", []), ("pages", ["-o", scenarios.PAGE_MULTIPLE_SLAB_SIZES]))
    }
    expected = runs["default"]["expected_saved_bytes"]
    assert saved_beyond_zero_pages(runs["default"]) < 0.3 * expected, runs["default"]["total"]
    assert saved_beyond_zero_pages(runs["pages"]) >= 0.8 * expected, runs["pages"]["total"]


def torch_model_bytes():
    settings = scenarios.SIZES["small"]
    return settings["torch_layers"] * (settings["torch_width"] + 1) * settings["torch_width"] * 4


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["auto", "madvise"])
def test_pytorch_workers_merge_the_weights(strategy):
    require_module("torch")
    (run,) = scenarios.pytorch("small", strategy=strategy)["runs"]
    assert [row["data_bytes"] for row in run["processes"]] == [torch_model_bytes()] * 3
    assert saved_beyond_zero_pages(run) >= 0.9 * 2 * torch_model_bytes(), run["total"]


def test_pytorch_workers_without_ksm_wrap_merge_nothing():
    require_module("torch")
    (run,) = scenarios.pytorch("small", strategy="none")["runs"]
    assert run["total"]["saved_bytes"] == 0 and run["total"]["ksm_merging_pages"] == 0, run["total"]
    assert run["nonzero_potential_bytes"] >= 0.9 * 2 * torch_model_bytes()  # the weights are there


def test_stress_ng_duplicate_fill_merges_and_random_fill_does_not():
    """The post's stress-ng: 12 million pages scanned, none merged. A random fill method
    (rand-set) leaves nothing to merge; zero-one's pages all hold the same bytes."""
    require_program("stress-ng")
    duplicate, random_fill = scenarios.stress_ng("small", methods=("zero-one", "rand-set"))["runs"]
    data = scenarios.SIZES["small"]["vm_bytes"]
    assert duplicate["total"]["data_bytes"] == random_fill["total"]["data_bytes"] == data
    assert duplicate["total"]["saved_bytes"] >= 0.9 * data, duplicate["processes"]
    assert random_fill["total"]["saved_bytes"] < 0.05 * data, random_fill["total"]
