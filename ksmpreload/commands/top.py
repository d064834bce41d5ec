"""`ksmpreload top`: a live view of the processes KSM saves memory for, biggest first."""

import sys

import click
from rich.console import Group
from rich.text import Text

from .. import attached as attach_records, governor, groups, kernel, render, saving, shimstats
from ..sizes import MIB
from .options import FiniteRange, by_option

SORT_KEYS = {  # --sort choice -> (row key, largest first)
    "saved": ("net_saved", True),
    "merged": ("merged", True),
    "profit": ("profit", True),
    "zero": ("zero", True),
    "pid": ("pid", False),
    "command": ("command", False),
}
COLUMNS = [
    ("pid", "right"),
    ("command", "left"),
    ("shim", "left"),
    ("merged MiB", "right"),
    ("zero-page MiB", "right"),
    ("saved MiB (est.)", "right"),
    ("padding MiB", "right"),
    ("net saved MiB", "right"),
    ("profit MiB", "right"),
]
GLOBAL_COUNTERS = (
    "run",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "full_scans",
    "pages_to_scan",
    "sleep_millisecs",
)


def process_rows(name_filter, notes, knobs):
    """One row per KSM process; what could not be read goes to `notes`. saved: the estimate
    from ksm_stat and the machine's `knobs` (saving.estimated_saved_pages: no page frames read
    at every refresh)."""
    page = kernel.page_size()
    counters = shimstats.all_process_stats(prune=False, problems=notes)
    processes, unreadable = kernel.ksm_processes_and_unreadable()
    attached = attach_records.attached_processes()
    notes += kernel.unreadable_notes(unreadable)
    rows = []
    for process in processes:
        if name_filter and name_filter not in process["cmdline"]:
            continue
        shim = counters.get(process["pid"])
        merged = process.get("ksm_merging_pages", 0) * page
        saved = round(saving.estimated_saved_pages(process, knobs) * page)
        padding = shimstats.memory_cost_bytes(shim)
        rows.append(
            {
                "pid": process["pid"],
                "command": process["cmdline"],
                "shim": shim["strategy"] if shim else "-",
                "attached": attached[process["pid"]]["strategy"] if process["pid"] in attached else None,
                "merged": merged,
                "zero": process.get("ksm_zero_pages", 0) * page,
                "saved": saved,
                "padding": padding,
                "net_saved": saving.net_saved_bytes(saved, padding, process.get("ksm_rmap_items", 0)),
                "profit": process.get("ksm_process_profit", 0),
            }
        )
    return rows


SUMMED = ("net_saved", "saved", "merged", "zero", "padding", "profit")
GROUP_KEYS = {"pid": "group", "command": "processes"}  # what --sort pid and command order groups by


def group_rows(rows, by):
    """The rows totalled per group (groups.group_totals), with how many of its processes run the shim."""
    totals = groups.group_totals(rows, groups.process_groups([row["pid"] for row in rows], by), SUMMED)
    with_shim = {row["pid"] for row in rows if row["shim"] != "-"}
    attached = {row["pid"] for row in rows if row["attached"]}

    def how(pids):
        shim, by_attach = len(with_shim.intersection(pids)), len(attached.intersection(pids))
        return f"{shim} with shim" + (f", {by_attach} attached" if by_attach else "")

    return [{**entry, "shim": how(entry["pids"])} for entry in totals]


def snapshot(sort, name_filter, by="process"):
    key, largest_first = SORT_KEYS[sort]
    notes, knobs = [], kernel.read_knobs()
    rows = process_rows(name_filter, notes, knobs)
    if by != "process":
        rows, key = group_rows(rows, by), GROUP_KEYS.get(key, key)
    rows = sorted(rows, key=lambda row: row[key], reverse=largest_first)
    if knobs.get("run") != 1 and knobs.get("pages_sharing"):
        notes.append("ksmd is not running: pages_sharing, and the saving from it, are as of its last scan")
    totals = {
        name: sum(row[name] for row in rows) for name in ("merged", "zero", "saved", "padding", "net_saved", "profit")
    }
    return {
        "ksm": {name: knobs[name] for name in GLOBAL_COUNTERS if name in knobs},
        "saved_bytes": kernel.pages_saved(knobs) * kernel.page_size(),
        "by": by,
        "groups" if by != "process" else "processes": rows,
        "totals": totals,
        "governor": governor.read_state(),
        "notes": notes + ([] if governor.state_known() else [governor.STATE_UNKNOWN_NOTE]),
    }


def mib(count):
    return f"{count / MIB:.1f}"


def view(snap, limit):
    by = snap["by"]
    listed = snap["processes" if by == "process" else "groups"]
    header = Text(
        f"KSM saves {mib(snap['saved_bytes'])} MiB machine-wide   "
        + "   ".join(f"{name} {value}" for name, value in snap["ksm"].items())
        + ("" if snap["governor"] is None else f"   governor: {snap['governor']['decision']['mode']}")
    )
    rows = [
        [
            row["pid"] if by == "process" else row["group"],
            row["command"] if by == "process" else row["processes"],
            f"attach {row['attached']}" if row.get("attached") and row["shim"] == "-" else row["shim"],
            mib(row["merged"]),
            mib(row["zero"]),
            mib(row["saved"]),
            mib(row["padding"]),
            mib(row["net_saved"]),
            mib(row["profit"]),
        ]
        for row in listed[:limit]
    ]
    totals = snap["totals"]
    rows.append(
        [
            "",
            f"total ({len(listed)} {'processes' if by == 'process' else by + 's'})",
            "",
            mib(totals["merged"]),
            mib(totals["zero"]),
            mib(totals["saved"]),
            mib(totals["padding"]),
            mib(totals["net_saved"]),
            mib(totals["profit"]),
        ]
    )
    columns = COLUMNS if by == "process" else [(by, "left"), ("processes", "left"), *COLUMNS[2:]]
    return Group(header, render.table(columns, rows), *render.note_lines(snap["notes"]))


@click.command()
@click.option(
    "--sort",
    type=click.Choice(sorted(SORT_KEYS)),
    default="saved",
    show_default=True,
    help="Order of the rows (saved: net saved, the estimated saving less the shim's memory and rmap items).",
)
@click.option("--filter", "name_filter", metavar="TEXT", help="Only processes whose command line contains TEXT.")
@click.option(
    "--interval",
    type=FiniteRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Refresh period.",
)
@click.option("--limit", type=click.IntRange(min=1), default=30, show_default=True, help="Rows shown.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
@by_option("One row per cgroup, systemd unit, container or Kubernetes pod instead of per process.")
def top(sort, name_filter, interval, limit, as_json, by):
    """Live view of the processes with KSM-enabled memory, biggest saving first.

    One row per process: merged memory, zero pages, its saving estimated from ksm_stat (its
    merged pages times the machine's pages_sharing / (pages_sharing + pages_shared), plus
    zero pages: docs/SAVINGS.md; 'ksmpreload report' as root gives the exact share), the
    shim's memory, the net saving and the kernel's profit, with totals and KSM's global
    counters. Refreshes in
    place until Ctrl-C; when stdout is not a terminal (or with --json) prints one snapshot.
    """
    kernel.require_ksm()
    if as_json:
        render.print_json(snapshot(sort, name_filter, by))
        return
    if not sys.stdout.isatty():
        render.print_rich(view(snapshot(sort, name_filter, by), limit))
        return
    try:
        render.refresh_live(lambda: view(snapshot(sort, name_filter, by), limit), interval)
    except KeyboardInterrupt:
        pass
