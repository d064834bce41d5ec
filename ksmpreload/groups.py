"""Processes grouped the way services are run: by cgroup, systemd unit, container or pod.

Everything comes from /proc/<pid>/cgroup, one line per hierarchy, "ID:CONTROLLERS:PATH":
- cgroup v2 has one line, "0::PATH"; cgroup v1 one per hierarchy ("4:memory:PATH",
  "1:name=systemd:PATH"); a hybrid machine has both (its v2 line often just "0::/").
- `cgroup`: the v2 path when it is not the root, else the v1 memory controller's, else the
  systemd hierarchy's ("/" when nothing is known). In a cgroup namespace (a container's) the
  paths are relative to the namespace's root (a process outside it shows as "/../x").
- `unit`: the systemd unit, from the path systemd manages (v2, else v1 name=systemd): its last
  component named *.service, *.scope, *.socket, *.mount or *.swap (a unit's own sub-cgroups
  stay with it; a user's units under user@UID.service are their own units); a process right
  in a slice, in no such unit, is grouped by its innermost slice.
- `container`: the last container id in any path: docker-ID.scope, /docker/ID, cri-containerd-ID
  .scope, crio-ID.scope, libpod-ID.scope, or a bare 64-hex component (kubepods' cgroupfs driver);
  named by its runtime and the first 12 hex digits, as `docker ps` shows them.
- `pod`: the Kubernetes pod UID, from kubepods paths: "pod<UID>" (cgroupfs driver) or
  "kubepods-<class>-pod<UID with _>.slice" (systemd driver).
A process outside every such group gets OUTSIDE.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from . import kernel

GROUPINGS = ("process", "cgroup", "unit", "container", "pod")
OUTSIDE = "-"
UNIT = re.compile(r"^(?P<name>.+\.(?:service|scope|socket|mount|swap))$")
CONTAINER = re.compile(r"^(?:(?P<runtime>docker|cri-containerd|crio|libpod)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$")
POD = re.compile(r"pod(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")
RUNTIME_NAMES = {"cri-containerd": "containerd", "libpod": "podman"}


def cgroup_paths(text: str) -> dict[str, str]:
    """{"v2": path, "memory": path, "systemd": path} from /proc/<pid>/cgroup, those present."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, controllers, path = parts
        if number == "0" and controllers == "":
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["memory"] = path
        elif controllers == "name=systemd":
            paths["systemd"] = path
    return paths


def _components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def cgroup_of(paths: dict[str, str]) -> str:
    if not paths:  # the process is gone (or /proc/PID/cgroup unreadable)
        return OUTSIDE
    if paths.get("v2", "/") != "/":
        return paths["v2"]
    return paths.get("memory") or paths.get("systemd") or "/"


def unit_of(paths: dict[str, str]) -> str:
    managed = paths["v2"] if paths.get("v2", "/") != "/" else paths.get("systemd", "")
    components = _components(managed)
    units = [match["name"] for match in map(UNIT.match, components) if match]
    units = [unit for unit in units if not CONTAINER.match(unit)]  # docker-ID.scope is a container
    if units:
        return units[-1]
    if any(CONTAINER.match(component) for component in components):
        return OUTSIDE  # a container's processes: grouped by container, not by the slice above it
    slices = [component for component in components if component.endswith(".slice")]
    return slices[-1] if slices else OUTSIDE


def container_of(paths: dict[str, str]) -> str:
    found = OUTSIDE
    for path in paths.values():
        parent = ""
        for component in _components(path):
            match = CONTAINER.match(component)
            if match:  # a bare id under /docker/ is docker's (its cgroupfs driver)
                runtime = match["runtime"] or ("docker" if parent == "docker" else "container")
                found = f"{RUNTIME_NAMES.get(runtime, runtime)}:{match['id'][:12]}"
            parent = component
    return found


def pod_of(paths: dict[str, str]) -> str:
    for path in paths.values():
        for component in reversed(_components(path)):
            match = POD.search(component) if "kubepods" in path else None
            if match:
                return match["uid"].replace("_", "-")
    return OUTSIDE


NAMERS = {"cgroup": cgroup_of, "unit": unit_of, "container": container_of, "pod": pod_of}


def group_of(text: str, by: str) -> str:
    """The group of a process whose /proc/<pid>/cgroup reads `text`, for grouping `by`."""
    return NAMERS[by](cgroup_paths(text))


def process_groups(pids: Iterable[int], by: str) -> dict[int, str]:
    """{pid: its group}; by "process", the pid itself. A process gone meanwhile: OUTSIDE."""
    if by == "process":
        return {pid: str(pid) for pid in pids}
    return every_grouping(pids, (by,))[by]


def every_grouping(pids: Iterable[int], groupings: Iterable[str] = tuple(NAMERS)) -> dict[str, dict[int, str]]:
    """{grouping: {pid: its group}}, each process's cgroup file read once."""
    found = {by: {} for by in groupings}
    for pid in pids:
        paths = cgroup_paths(kernel.read_proc(pid, "cgroup") or "")
        for by, names in found.items():
            names[pid] = NAMERS[by](paths)
    return found


OTHER = "other"  # the groups beyond a limit, summed


def group_totals(
    rows: Iterable[dict], groups: dict[int, str], fields: tuple[str, ...], limit: int | None = None
) -> list[dict]:
    """Per group: its processes (count and pids) and the sums of `fields` over its rows (each a
    dict with "pid"), largest fields[0] first; beyond `limit` groups, the rest summed as OTHER
    (a bound on how many groups a view or a metric shows)."""
    totals = {}
    for row in rows:
        name = groups.get(row["pid"], OUTSIDE)
        entry = totals.setdefault(name, {"group": name, "processes": 0, "pids": [], **dict.fromkeys(fields, 0)})
        entry["processes"] += 1
        entry["pids"].append(row["pid"])
        for name_of_field in fields:
            entry[name_of_field] += row.get(name_of_field) or 0
    ordered = sorted(totals.values(), key=lambda entry: (-entry[fields[0]], entry["group"]))
    if limit is None or len(ordered) <= limit:
        return ordered
    rest = ordered[limit:]
    other = {"group": OTHER, "processes": sum(entry["processes"] for entry in rest)}
    other["pids"] = [pid for entry in rest for pid in entry["pids"]]
    other.update({name: sum(entry[name] for entry in rest) for name in fields})
    return ordered[:limit] + [other]


def group_sharing(sharing: dict, groups: dict[int, str]) -> dict:
    """The KSM pages each pair of groups shares, from a sharing matrix of processes
    (SharingReport.to_dict()): its process pairs summed by group (a page three processes map
    counts once per pair of them), pairs inside one group and pages shared within one process
    in within_group."""
    pairs, within = {}, {}
    for pair in sharing["pairs"]:
        first, second = (groups.get(pid, OUTSIDE) for pid in pair["pids"])
        if first == second:
            within[first] = within.get(first, 0) + pair["pages"]
        else:
            key = tuple(sorted((first, second)))
            pairs[key] = pairs.get(key, 0) + pair["pages"]
    for entry in sharing["within_process"]:
        name = groups.get(entry["pid"], OUTSIDE)
        within[name] = within.get(name, 0) + entry["pages"]
    return {
        "pairs": [{"groups": list(key), "pages": pages} for key, pages in sorted(pairs.items(), key=lambda kv: -kv[1])],
        "within_group": [
            {"group": name, "pages": pages} for name, pages in sorted(within.items(), key=lambda kv: -kv[1])
        ],
    }
