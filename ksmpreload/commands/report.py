"""`ksmpreload report`: who saves what, per process and per region, and who shares with whom."""

import click
from rich.console import Group
from rich.text import Text

from .. import attribution, kernel, render
from ..sizes import MIB


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
            p.shim["strategy"] if p.shim else "no shim",
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


def sections(report, region_limit):
    found = [process_section(report)]
    found += [region_section(process, region_limit) for process in report.processes]
    if report.sharing:
        found.append(sharing_section(report))
    found.append(unmerged_section(report))
    return found


def print_tables(report, region_limit):
    parts = []
    for title, columns, rows in sections(report, region_limit):
        parts += [render.table(columns, rows, title=title), Text()]
    parts += render.note_lines(report.notes)
    render.print_rich(Group(*parts))


def print_markdown(report, region_limit):
    parts = [render.markdown_table(columns, rows, title) for title, columns, rows in sections(report, region_limit)]
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
def report(pids, as_json, markdown, region_limit, no_sharing):
    """Where merged memory comes from: per process, per region, and between processes.

    PIDS default to every process with KSM-enabled memory. For each: merged MiB, the shim's
    alignment padding and the net saving; its regions by what made them (the shim's region
    records, glibc's heaps, stacks, files; the rest is 'unlabelled'); the KSM pages each pair
    of processes shares; and the biggest mergeable regions that hold nothing merged.
    """
    kernel.require_ksm()
    if as_json and markdown:
        raise click.UsageError("choose one of --json and --markdown")
    kernel.require_processes(pids)
    result = attribution.attribution(list(pids) or None, with_sharing=not no_sharing)
    attribution.require_read(pids, [process.pid for process in result.processes])
    if as_json:
        render.print_json(result.to_dict())
    elif markdown:
        print_markdown(result, region_limit)
    else:
        print_tables(result, region_limit)
