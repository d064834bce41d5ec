"""Savings by group on the real kernel (issue 16, item 2): two cgroups made for the test, each
holding merging processes; report --by cgroup adds their fair shares up, top and the exporter
show the same groups."""

import contextlib
import json
import os
import secrets
import subprocess

import pytest

from conftest import require, require_root_ksm
from ksmpreload import groups, kernel, scanning
from ksmpreload.processes import merged_pages
from mergeable_child import distinct_pages_process

V1_MEMORY = "/sys/fs/cgroup/memory"
V2 = "/sys/fs/cgroup"


def hierarchy():
    """Where a test may make cgroups: cgroup v1's memory controller, else a cgroup v2 root."""
    if os.path.exists(os.path.join(V1_MEMORY, "cgroup.procs")):
        return V1_MEMORY
    require(os.path.exists(os.path.join(V2, "cgroup.controllers")), "no cgroup v1 memory and no cgroup v2 mount")
    return V2


@contextlib.contextmanager
def cgroup(name):
    """A cgroup made for the test; yields (its path as /proc/PID/cgroup shows it, a function that
    moves a pid into it). Removed at the end, once its processes have ended."""
    root = hierarchy()
    directory = os.path.join(root, name)
    os.mkdir(directory)

    def move(pid):
        with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
            procs.write(str(pid))

    try:
        yield "/" + name, move
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def test_savings_by_cgroup_add_up_and_every_view_shows_the_groups():
    """A and B hold pages 0-199, C pages 0-99 of the same contents; A and B in one cgroup, C in
    another: the first saves 2 x (100 x 2/3 + 100 x 1/2) pages, the second 100 x 2/3, and the
    two share the 100 pages C holds with each of A and B."""
    require_root_ksm()
    token, tag = secrets.token_hex(8), f"ksmpreload-test-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        first, move_first = stack.enter_context(cgroup(f"{tag}-a"))
        second, move_second = stack.enter_context(cgroup(f"{tag}-b"))
        a, b, c = (stack.enter_context(distinct_pages_process(token, count)) for count in (200, 200, 100))
        for pid, move in ((a.pid, move_first), (b.pid, move_first), (c.pid, move_second)):
            move(pid)
        pids = [a.pid, b.pid, c.pid]
        with scanning.fast_scanning():
            scanning.wait_until_settled(lambda: merged_pages(pids), timeout=60)
            report = run_json(["ksmpreload", "report", "--json", "--by", "cgroup", *map(str, pids)])
            top = run_json(["ksmpreload", "top", "--json", "--by", "cgroup"])
            metrics = subprocess.run(["ksmpreload", "exporter", "--once"], capture_output=True, text=True, timeout=60)
    page = kernel.page_size()
    by_group = {entry["group"]: entry for entry in report["groups"]}
    assert sorted(by_group[first]["pids"]) == sorted([a.pid, b.pid]) and by_group[second]["pids"] == [c.pid]
    assert by_group[first]["saved_bytes"] == pytest.approx(2 * (100 * 2 / 3 + 50) * page, abs=2)
    assert by_group[second]["saved_bytes"] == pytest.approx(100 * 2 / 3 * page, abs=2)
    assert sum(entry["saved_bytes"] for entry in report["groups"]) == sum(p["saved_bytes"] for p in report["processes"])
    assert report["group_sharing"]["pairs"] == [{"groups": sorted([first, second]), "pages": 200}]
    assert {"group": first, "pages": 200} in report["group_sharing"]["within_group"]
    listed = {entry["group"]: entry for entry in top["groups"]}
    assert sorted(listed[first]["pids"]) == sorted([a.pid, b.pid]) and listed[second]["processes"] == 1
    assert metrics.returncode == 0, metrics.stderr
    assert f'ksmpreload_group_processes{{by="cgroup",group="{first}"}} 2.0' in metrics.stdout
    assert f'ksmpreload_group_processes{{by="cgroup",group="{second}"}} 1.0' in metrics.stdout


def run_json(command):
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_process_in_no_unit_container_or_pod_is_grouped_outside():
    names = groups.every_grouping([os.getpid()])
    assert names["container"][os.getpid()] == groups.OUTSIDE and names["pod"][os.getpid()] == groups.OUTSIDE
