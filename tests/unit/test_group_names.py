"""Groups from /proc/<pid>/cgroup (ksmpreload/groups.py): cgroup v1 and v2, systemd units,
container runtimes and Kubernetes pods, as each names its cgroups; totals and sharing by group."""

import pytest

from ksmpreload import groups

DOCKER_ID = "4f1c2b3a" * 8
POD_UID = "0b3c8f2e-6d1a-4c5b-9e7f-1a2b3c4d5e6f"

CASES = {
    # a hybrid machine (this one): v1 controllers, an empty v2 line
    "v1 memory": (
        "9:name=systemd:/\n4:memory:/process_api/e71a\n1:cpu:/\n0::/\n",
        {"cgroup": "/process_api/e71a", "unit": "-", "container": "-", "pod": "-"},
    ),
    "v2 systemd service": (
        "0::/system.slice/redis-server.service\n",
        {"cgroup": "/system.slice/redis-server.service", "unit": "redis-server.service", "container": "-", "pod": "-"},
    ),
    "v2 a unit's own sub-cgroup": (
        "0::/system.slice/gunicorn.service/workers\n",
        {"unit": "gunicorn.service"},
    ),
    "v2 user unit": (
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/jupyter.service\n",
        {"unit": "jupyter.service"},
    ),
    "a process right in a slice": ("0::/system.slice/machine.slice\n", {"unit": "machine.slice"}),
    "v1 systemd hierarchy": (
        "4:memory:/system.slice/memcached.service\n1:name=systemd:/system.slice/memcached.service\n",
        {"cgroup": "/system.slice/memcached.service", "unit": "memcached.service"},
    ),
    "docker, systemd driver": (
        f"0::/system.slice/docker-{DOCKER_ID}.scope\n",
        {"unit": "-", "container": f"docker:{DOCKER_ID[:12]}", "pod": "-"},
    ),
    "docker, cgroupfs driver": (f"0::/docker/{DOCKER_ID}\n", {"container": f"docker:{DOCKER_ID[:12]}"}),
    "podman": (f"0::/machine.slice/libpod-{DOCKER_ID}.scope/container\n", {"container": f"podman:{DOCKER_ID[:12]}"}),
    "kubernetes, systemd driver, containerd": (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        + POD_UID.replace("-", "_")
        + f".slice/cri-containerd-{DOCKER_ID}.scope\n",
        {"container": f"containerd:{DOCKER_ID[:12]}", "pod": POD_UID, "unit": "-"},
    ),
    "kubernetes, cgroupfs driver, cri-o": (
        f"0::/kubepods/besteffort/pod{POD_UID}/crio-{DOCKER_ID}.scope\n",
        {"container": f"crio:{DOCKER_ID[:12]}", "pod": POD_UID},
    ),
    "kubernetes, cgroupfs driver, bare id": (
        f"4:memory:/kubepods/pod{POD_UID}/{DOCKER_ID}\n",
        {"container": f"container:{DOCKER_ID[:12]}", "pod": POD_UID, "cgroup": f"/kubepods/pod{POD_UID}/{DOCKER_ID}"},
    ),
    "empty (a process gone)": ("", {"cgroup": "-", "unit": "-", "container": "-", "pod": "-"}),
    "garbage": ("no colons here\n::\n", {"cgroup": "-", "unit": "-", "container": "-", "pod": "-"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_grouping_names_the_group_as_its_tools_do(case):
    text, expected = CASES[case]
    for by, name in expected.items():
        assert groups.group_of(text, by) == name, (case, by)


def test_a_pod_needs_a_kubepods_path():
    assert groups.group_of(f"0::/system.slice/pod{POD_UID}.slice\n", "pod") == "-"


def test_totals_add_up_and_a_limit_sums_the_rest_as_other():
    rows = [{"pid": pid, "saved_bytes": pid * 10, "padding_bytes": 1} for pid in range(1, 7)]
    names = {1: "a", 2: "a", 3: "b", 4: "c", 5: "d", 6: "d"}
    totals = groups.group_totals(rows, names, ("saved_bytes", "padding_bytes"))
    assert [(t["group"], t["processes"], t["saved_bytes"]) for t in totals] == [
        ("d", 2, 110),
        ("c", 1, 40),
        ("a", 2, 30),
        ("b", 1, 30),
    ]
    limited = groups.group_totals(rows, names, ("saved_bytes", "padding_bytes"), limit=2)
    assert [t["group"] for t in limited] == ["d", "c", "other"]
    assert limited[-1]["saved_bytes"] == 60 and sorted(limited[-1]["pids"]) == [1, 2, 3]
    assert sum(t["saved_bytes"] for t in limited) == sum(row["saved_bytes"] for row in rows)
    assert sum(t["padding_bytes"] for t in limited) == 6


def test_sharing_between_groups_sums_process_pairs_and_keeps_pairs_inside_a_group_apart():
    sharing = {
        "pairs": [{"pids": [1, 2], "pages": 5}, {"pids": [1, 3], "pages": 7}, {"pids": [2, 3], "pages": 1}],
        "within_process": [{"pid": 3, "pages": 4}],
    }
    found = groups.group_sharing(sharing, {1: "a", 2: "a", 3: "b"})
    assert found["pairs"] == [{"groups": ["a", "b"], "pages": 8}]
    assert found["within_group"] == [{"group": "a", "pages": 5}, {"group": "b", "pages": 4}]


def test_names_from_other_processes_reach_a_terminal_escaped():
    """A cgroup (or command) named with escape sequences is shown escaped in tables and Markdown."""
    from rich.console import Console

    from ksmpreload import render

    name = "/evil\x1b]0;PWNED\x07\x1b[31m"
    console = Console(record=True, width=200, force_terminal=False)
    console.print(render.table([("cgroup", "left")], [[name]]))
    shown = console.export_text()
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b]0;PWNED" in shown
    markdown = render.markdown_table([("cgroup", "left")], [[name]])
    assert "\x1b" not in markdown and "\\x1b[31m" in markdown
