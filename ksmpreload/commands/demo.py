"""`ksmpreload demo`: two workers holding the same data under ksm-wrap, merging shown live."""

import os
import sys
import time

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .. import kernel, saving, scanning
from ..errors import KsmError, NeedsRoot
from ..processes import ksm_wrap_command, start_workers, stop_workers
from ..render import check_output_path, console, human_bytes, print_json, print_rich, table, write_output
from ..workloads.runner import WORKLOADS, check_options, run
from . import workload_view
from .workload_view import workload_options


def start_demo_workers(count, mib):
    worker = [sys.executable, "-m", "ksmpreload.demo_worker", str(mib), "1"]
    workers = start_workers([[*ksm_wrap_command(), *worker] for _ in range(count)])
    for proc in workers:
        proc.held_bytes = proc.report["bytes"]
    return workers


def worker_stats(workers):
    return [kernel.process_ksm_stat(proc.pid) or {} for proc in workers]


def merged_pages(workers):
    return sum(stat.get("ksm_merging_pages", 0) for stat in worker_stats(workers))


def watch_merging(workers, timeout, quiet):
    """Show merged pages against the pages the workers hold until merging settles."""
    total = sum(proc.held_bytes for proc in workers) // kernel.page_size()
    columns = (
        TextColumn("merging"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} pages"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console(), disable=quiet, transient=False) as progress:
        task = progress.add_task("merge", total=total)
        scanning.wait_until_settled(
            lambda: merged_pages(workers),
            timeout=timeout,
            on_progress=lambda merged: progress.update(task, completed=min(merged, total)),
        )
    return total


def saved_bytes(workers, stats):
    """(bytes saved, whether it is an estimate): the workers' fair shares (saving.py) as root;
    without root (no page frames), the estimate from their ksm_stat."""
    try:
        return round(saving.saved_pages([proc.pid for proc in workers]) * kernel.page_size()), False
    except NeedsRoot:
        knobs = kernel.read_knobs()
        pages = sum(saving.estimated_saved_pages(stat, knobs) for stat in stats)
        return round(pages * kernel.page_size()), True


def summary(workers, total_pages, seconds):
    stats = worker_stats(workers)
    rows = [
        {
            "pid": proc.pid,
            "held_bytes": proc.held_bytes,
            "merging_pages": stat.get("ksm_merging_pages", 0),
            "profit_bytes": stat.get("ksm_process_profit", 0),
        }
        for proc, stat in zip(workers, stats)
    ]
    merged = sum(row["merging_pages"] for row in rows)
    saved, estimated = saved_bytes(workers, stats)
    return {
        "workers": rows,
        "held_bytes": total_pages * kernel.page_size(),
        "merged_pages": merged,
        "saved_bytes": saved,
        "saved_is_estimate": estimated,
        "seconds": round(seconds, 1),
    }


def show_summary(result):
    rows = [
        (w["pid"], human_bytes(w["held_bytes"]), w["merging_pages"], human_bytes(w["profit_bytes"]))
        for w in result["workers"]
    ]
    print_rich(
        table([("pid", "right"), ("holds", "right"), ("merging pages", "right"), ("ksm_process_profit", "right")], rows)
    )
    click.echo(
        f"{len(rows)} workers hold {human_bytes(result['held_bytes'])}; KSM merged "
        f"{result['merged_pages']} of their pages, saving {human_bytes(result['saved_bytes'])}"
        f"{' (estimated: page frames need root)' if result['saved_is_estimate'] else ''} in {result['seconds']} s."
    )


def run_demo(workers_count, mib, timeout, as_json):
    started = time.monotonic()
    workers = start_demo_workers(workers_count, mib)
    try:
        total = watch_merging(workers, timeout, quiet=as_json)
        result = summary(workers, total, time.monotonic() - started)
    finally:
        stop_workers(workers)
    print_json(result) if as_json else show_summary(result)


def run_workload(name, size, strategy, processes, method, as_json, markdown_path):
    if os.geteuid() != 0:
        raise NeedsRoot("running a workload (it sets the KSM knobs and reads page frames)")
    with Progress(TextColumn("{task.description}"), TimeElapsedColumn(), transient=True, disable=as_json) as progress:
        task = progress.add_task(f"{name}: starting", total=None)
        report = run(
            name,
            size,
            strategy,
            processes,
            method,
            on_run=lambda label: progress.update(task, description=f"{name}: {label}: loading"),
            on_sample=lambda pages: progress.update(task, description=f"{name}: {pages:,} pages merged"),
        )
    print_json(report) if as_json else workload_view.show(report)
    if markdown_path:
        write_output(markdown_path, lambda f: f.write(workload_view.markdown(report)))
    problems = workload_view.vanished_lines(report["runs"])
    if problems:
        raise KsmError("; ".join(problems))


def check_demo_options(workload, size, processes, method):
    """Usage errors before anything starts: the demo's own options with --workload, a workload's
    options without it, or options the workload cannot take."""
    if not workload:
        workload_view.refuse_without_workload(workload, "size", "strategy", "processes", "method", "markdown_path")
        return
    for name in ("workers", "mib", "timeout"):
        if workload_view.given(name):
            raise click.UsageError(f"{workload_view.flag(name)} is for the demo's own workers, not with --workload")
    check_options(workload, size, processes, method)


@click.command()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(2, 16), help="How many workers.")
@click.option("--mib", default=64, show_default=True, type=click.IntRange(1, 4096), help="MiB each worker holds.")
@click.option("--timeout", default=120, show_default=True, type=click.IntRange(5, 3600), help="Seconds to wait.")
@click.option(
    "--workload",
    type=click.Choice(list(WORKLOADS)),
    help="Instead of the demo's workers, run this workload (root): see below.",
)
@workload_options
@click.option(
    "--strategy",
    type=click.Choice(["auto", "prctl", "madvise", "none"]),
    default="auto",
    show_default=True,
    help="Workload: ksm-wrap --strategy, or none (without ksm-wrap).",
)
@click.option(
    "--markdown",
    "markdown_path",
    type=click.Path(dir_okay=False, writable=True),
    callback=check_output_path,
    metavar="FILE",
    help="Workload: also write the table as Markdown to FILE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def demo(workers, mib, timeout, workload, size, strategy, processes, method, markdown_path, as_json):
    """Run workers holding the same data under ksm-wrap and show KSM merging them.

    As root, KSM runs at a fast scan rate for the demo and every knob is put back after.

    \b
    With --workload NAME (root), run one of the workloads instead, loaded with data, merged at
    a fast scan rate and measured (saved, padding, net, time to 90%, rmap items, what page
    alignment should save, the duplicate potential left):

    \b
    [WORKLOADS]
    """
    check_demo_options(workload, size, processes, method)
    kernel.require_ksm()
    if workload:
        run_workload(workload, size, strategy, processes, method, as_json, markdown_path)
    elif os.geteuid() == 0:
        with scanning.fast_scanning():
            run_demo(workers, mib, timeout, as_json)
    elif kernel.read_knob("run") != 1:
        raise KsmError("KSM is off and only root can turn it on: run 'sudo ksmpreload demo'")
    else:
        run_demo(workers, mib, timeout, as_json)


demo.help = demo.help.replace(
    "[WORKLOADS]", "\n    ".join(f"{name:16} {description}" for name, (description, _) in WORKLOADS.items())
)
