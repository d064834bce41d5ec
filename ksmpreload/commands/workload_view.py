"""What `ksmpreload demo --workload` and `compare` share: the workload options, the columns of a
measurement (measurement.py), and how demo shows a workload's report: a table row per run, and
the python-prefork workload's PSS and load figures."""

import click

from .. import render
from ..workloads import SIZES
from ..workloads.runner import METHODS
from ..sizes import MIB

MEASURED_COLUMNS = [
    ("saved MiB", "right"),
    ("% of RSS", "right"),
    ("padding MiB", "right"),
    ("net saved MiB", "right"),
    ("s to 90%", "right"),
    ("rmap items", "right"),
]
COLUMNS = [
    ("run", "left"),
    ("processes", "right"),
    ("data MiB", "right"),
    *MEASURED_COLUMNS,
    ("expected MiB", "right"),
    ("potential MiB", "right"),
    ("non-zero potential MiB", "right"),
    ("settled in s", "right"),
]


def mib(count):
    return "-" if count is None else f"{count / MIB:,.1f}"


def measured_cells(result):
    """The MEASURED_COLUMNS cells of a Measurement (as a dict)."""
    return [
        mib(result["saved_bytes"]),
        result["saved_percent"],
        mib(result["padding_bytes"]),
        mib(result["net_saved_bytes"]),
        "-" if result["seconds_to_90"] is None else result["seconds_to_90"],
        f"{result['rmap_items']:,}",
    ]


def given(name):
    """The option `name` was given on the command line (or by its environment variable)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, click.core.ParameterSource.DEFAULT)


def flag(name):
    """The option's first flag, as a user types it (--markdown for markdown_path)."""
    return next(param.opts[0] for param in click.get_current_context().command.params if param.name == name)


def refuse_without_workload(workload, *names):
    """A usage error for options of a workload given without --workload."""
    if workload:
        return
    stray = [flag(name) for name in names if given(name)]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} only with --workload")


def vanished_lines(results):
    """What to say of runs or arms measured after some of their processes had ended."""
    return [
        f"{result.get('label') or result['allocator'] + ', ' + result['strategy']}: "
        f"{len(result['vanished'])} of its processes ended before they were measured"
        for result in results
        if result.get("vanished")
    ]


def workload_options(command):
    """--size, --processes and --method, for the commands that take --workload."""
    options = [
        click.option(
            "--size", type=click.Choice(list(SIZES)), default="small", show_default=True, help="Workload size."
        ),
        click.option(
            "--processes", type=click.IntRange(1, 64), help="Workload: servers or workers (its default if not given)."
        ),
        click.option("--method", type=click.Choice(METHODS), help="Workload stress-ng: only this fill method."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def settled(run):
    if not run["mergeable"]:
        return "nothing mergeable"
    return f"{run['settle_seconds']:.0f}" + ("" if run["settled"] else " (timeout)")


def rows(report):
    return [
        [
            run["label"],
            run["processes"],
            mib(run["data_bytes"]),
            *measured_cells(run),
            mib(run["expected_saved_bytes"]),
            mib(run["potential_bytes"]),
            mib(run["nonzero_potential_bytes"]),
            settled(run),
        ]
        for run in report["runs"]
    ]


def load_line(name, load):
    return (
        f"{name}: {load['requests_per_s']:,.0f} requests/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, "
        f"{load['cow_ksm']:,} cow_ksm faults, {load['errors']} errors"
    )


def prefork_lines(run):
    """PSS at each point and the two load runs (workloads/prefork.py), where the run has them."""
    details = run["details"]
    if "pss_ready_bytes" not in details:
        return []
    pss = [f"{name} {mib(details[f'pss_{name}_bytes'])}" for name in ("ready", "before_merge", "after_merge")]
    lines = [f"{run['label']}: PSS MiB: " + ", ".join(pss) + f", after_load {mib(details.get('pss_after_load_bytes'))}"]
    lines.append(load_line("before merging", details["load_before_merge"]))
    if "load_after_merge" in details:
        lines.append(load_line("after merging", details["load_after_merge"]))
    return lines


def title(report):
    return f"workload {report['workload']}, size {report['size']}, strategy {report['strategy']}"


def show(report):
    render.print_rich(render.table(COLUMNS, rows(report), title=title(report)))
    for run in report["runs"]:
        for line in prefork_lines(run):
            render.console().print(line, highlight=False)


def markdown(report):
    lines = [render.markdown_table(COLUMNS, rows(report), title(report))]
    for run in report["runs"]:
        lines += [f"- {line}" for line in prefork_lines(run)]
    lines.append(f"\n{report['date_utc']}, {report['duration_s']} s")
    return "\n".join(lines) + "\n"
