"""`ksmpreload report`: who saves what, per process and per region, and who shares with whom."""

import click
from rich.console import Group
from rich.text import Text

from .options import by_option
from .. import attribution, groups, kernel, render
from ..sizes import MIB

GROUP_FIELDS = ("saved_bytes", "net_saved_bytes", "merged_bytes", "padding_bytes")


def mib(count_bytes):
    return f"{count_bytes / MIB:.1f}"


def process_section(report):
    columns = [
        ("pid", "right"),
        ("command", "left"),
        ("strategy", "left"),
        ("merged MiB", "right"),
        ("saved MiB", "right"),
        ("padding MiB", "right"),
        ("net saved MiB", "right"),
        ("zero pages", "right"),
        ("profit MiB", "right"),
    ]
    rows = [
        [
            p.pid,
            p.comm,
            p.shim["strategy"] if p.shim else f"attach {p.attached}" if p.attached else "no shim",
            mib(p.merged_bytes),
            mib(p.saved_bytes) + ("*" if p.saved_is_estimate else ""),
            mib(p.padding_bytes),
            mib(p.net_saved_bytes),
            p.ksm_stat.get("ksm_zero_pages", "-"),
            mib(p.ksm_stat["ksm_process_profit"]) if "ksm_process_profit" in p.ksm_stat else "-",
        ]
        for p in sorted(report.processes, key=lambda p: -p.net_saved_bytes)
    ]
    title = "Processes (saved: fair share, docs/SAVINGS.md; * estimated without root; net = saved - shim - rmap items)"
    return title, columns, rows


def region_section(process, limit):
    columns = [
        ("made by", "left"),
        ("regions", "right"),
        ("anonymous MiB", "right"),
        ("KSM MiB", "right"),
        ("shared pages", "right"),
    ]
    rows = [
        [
            label,
            totals["regions"],
            mib(totals["anonymous_kib"] * 1024),
            mib(totals["ksm_kib"] * 1024),
            totals["shared_pages"],
        ]
        for label, totals in list(attribution.by_label(process).items())[:limit]
    ]
    return f"Regions of {process.pid} ({process.comm}), by what made them", columns, rows


def sharing_section(report):
    shared = report.sharing
    pids = [p["pid"] for p in shared["processes"]]
    pairs = {tuple(pair["pids"]): pair["pages"] for pair in shared["pairs"]}
    within = {entry["pid"]: entry["pages"] for entry in shared["within_process"]}

    def cell(a, b):
        if a == b:
            return f"({within.get(a, 0)})"
        return pairs.get((a, b), pairs.get((b, a), 0))

    columns = [("pid", "right")] + [(str(pid), "right") for pid in pids]
    rows = [[a] + [cell(a, b) for b in pids] for a in pids]
    return "KSM pages shared by pair ((n): only within one process)", columns, rows


def unmerged_section(report):
    columns = [
        ("pid", "right"),
        ("command", "left"),
        ("region", "left"),
        ("made by", "left"),
        ("unmerged MiB", "right"),
    ]
    rows = [[u.pid, u.comm, f"{u.start:x}-{u.end:x}", u.label, mib(u.unmerged_kib * 1024)] for u in report.unmerged]
    return "Biggest mergeable regions not merged", columns, rows


def group_rows(report, by):
    """(per group totals, group sharing or None) of the report's processes, grouped `by`."""
    names = groups.process_groups([p.pid for p in report.processes], by)
    rows = [{"pid": p.pid, **{name: getattr(p, name) or 0 for name in GROUP_FIELDS}} for p in report.processes]
    sharing = groups.group_sharing(report.sharing, names) if report.sharing else None
    return groups.group_totals(rows, names, GROUP_FIELDS), sharing


def group_sections(report, by):
    totals, sharing = group_rows(report, by)
    estimate = any(p.saved_is_estimate for p in report.processes)
    columns = [(by, "left"), ("processes", "right"), ("saved MiB", "right"), ("net saved MiB", "right"),
               ("merged MiB", "right"), ("padding MiB", "right")]  # fmt: skip
    rows = [
        [entry["group"], entry["processes"], mib(entry["saved_bytes"]) + ("*" if estimate else ""),
         mib(entry["net_saved_bytes"]), mib(entry["merged_bytes"]), mib(entry["padding_bytes"])]
        for entry in totals
    ]  # fmt: skip
    found = [(f"By {by} (the fair shares of its processes: they add up to the machine's saving)", columns, rows)]
    if sharing:
        pair_rows = [[" & ".join(pair["groups"]), pair["pages"]] for pair in sharing["pairs"]]
        pair_rows += [[f"within {entry['group']}", entry["pages"]] for entry in sharing["within_group"]]
        found.append((f"KSM pages shared between {by}s (per pair of processes)", [(by, "left"), ("pages", "right")],
                      pair_rows))  # fmt: skip
    return found


def sections(report, region_limit, by="process"):
    found = [process_section(report)] + (group_sections(report, by) if by != "process" else [])
    found += [region_section(process, region_limit) for process in report.processes]
    if report.sharing:
        found.append(sharing_section(report))
    found.append(unmerged_section(report))
    return found


def print_tables(report, region_limit, by):
    parts = []
    for title, columns, rows in sections(report, region_limit, by):
        parts += [render.table(columns, rows, title=title), Text()]
    parts += render.note_lines(report.notes)
    render.print_rich(Group(*parts))


def print_markdown(report, region_limit, by):
    parts = [render.markdown_table(columns, rows, title) for title, columns, rows in sections(report, region_limit, by)]
    parts += [f"Note: {note}" for note in report.notes]
    click.echo("\n\n".join(parts))


@click.command()
@click.argument("pids", nargs=-1, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="The whole report as one JSON object.")
@click.option("--markdown", is_flag=True, help="Markdown tables instead of terminal tables.")
@click.option(
    "--regions",
    "region_limit",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Region kinds listed per process.",
)
@click.option("--no-sharing", is_flag=True, help="Skip the sharing matrix (it reads page frames; root only).")
@by_option("Also total the processes by cgroup, systemd unit, container or Kubernetes pod (from /proc/PID/cgroup).")
def report(pids, as_json, markdown, region_limit, no_sharing, by):
    """Where merged memory comes from: per process, per region, and between processes.

    PIDS default to every process with KSM-enabled memory. For each: merged MiB, the shim's
    alignment padding and the net saving; its regions by what made them (the shim's region
    records, glibc's heaps, stacks, files; the rest is 'unlabelled'); the KSM pages each pair
    of processes shares; and the biggest mergeable regions that hold nothing merged. With --by,
    the same totalled per group and the pages each pair of groups shares.
    """
    kernel.require_ksm()
    if as_json and markdown:
        raise click.UsageError("choose one of --json and --markdown")
    kernel.require_processes(pids)
    result = attribution.attribution(list(pids) or None, with_sharing=not no_sharing)
    attribution.require_read(pids, [process.pid for process in result.processes])
    if as_json:
        totals, sharing = group_rows(result, by) if by != "process" else (None, None)
        extra = {"by": by, "groups": totals, "group_sharing": sharing} if by != "process" else {}
        render.print_json({**result.to_dict(), **extra})
    elif markdown:
        print_markdown(result, region_limit, by)
    else:
        print_tables(result, region_limit, by)
