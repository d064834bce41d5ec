"""`ksmpreload compare`: one workload under several allocators and strategies, side by side."""

import click
from rich.progress import Progress

from .. import compare as comparing
from .. import kernel, render
from ..workloads.runner import WORKLOADS
from ..workloads.runner import check_options
from .workload_view import MEASURED_COLUMNS, measured_cells, refuse_without_workload, vanished_lines, workload_options
from ..sizes import MIB
from .options import FiniteRange

COLUMNS = [
    ("allocator", "left"),
    ("strategy", "left"),
    ("processes", "right"),
    ("RSS → after merging MiB", "right"),
    *MEASURED_COLUMNS,
    ("predicted MiB", "right"),
    ("throughput", "right"),
]


def csv_choice(known):
    def parse(ctx, param, value):
        names = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise click.BadParameter(f"{', '.join(unknown) or 'nothing'} is not one of {', '.join(known)}")
        return names

    return parse


def rows(results):
    def mib(count):
        return f"{count / MIB:,.1f}"

    table = []
    for arm in results:
        if arm["failure"]:
            table.append([arm["allocator"], arm["strategy"], arm["failure"]] + [""] * (len(COLUMNS) - 3))
            continue
        after = arm["resident_bytes"] - arm["saved_bytes"]
        table.append(
            [
                allocator(arm),
                arm["strategy"],
                arm["processes"],
                f"{mib(arm['resident_bytes'])} → {mib(after)}",
                *measured_cells(arm),
                "-" if arm["predicted_bytes"] is None else mib(arm["predicted_bytes"]),
                throughput(arm),
            ]
        )
    return table


def allocator(arm):
    loaded = arm["allocator_loaded"]
    if loaded is None or loaded == arm["processes"]:
        return arm["allocator"]
    return f"{arm['allocator']} (loaded in {loaded} of {arm['processes']})"


def throughput(arm):
    if arm["throughput"] is None:
        return "-"
    return f"{arm['throughput']:,.0f} {arm['throughput_unit'] or ''}".strip()


LINE_STYLES = ("-", "--", ":", "-.")


def plot(results, path, title):
    """Saved MiB over time, a colour per allocator and a line style per strategy (a palette
    of ten colours would repeat past ten arms)."""
    page = kernel.page_size()
    allocators = list(dict.fromkeys(arm["allocator"] for arm in results))
    strategies = list(dict.fromkeys(arm["strategy"] for arm in results))
    series, styles = {}, {}
    for arm in results:
        if not arm["samples"]:
            continue
        label = f"{arm['allocator']}, {arm['strategy']}"
        series[label] = [(t, saved * page / MIB) for t, _, saved in arm["samples"]]
        styles[label] = {
            "color": f"C{allocators.index(arm['allocator']) % 10}",
            "linestyle": LINE_STYLES[strategies.index(arm["strategy"]) % len(LINE_STYLES)],
        }
    render.plot_lines(
        path,
        series,
        f"KSM: {title[:60]}",
        "seconds",
        "MiB saved (fair shares of the KSM pages, zero pages)",
        styles,
    )


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--allocators",
    default="glibc",
    show_default=True,
    callback=csv_choice(comparing.ALLOCATORS),
    help="Comma-separated: glibc (the program's own), jemalloc, mimalloc, tcmalloc (Debian's "
    "libjemalloc2, libmimalloc2.0, libtcmalloc-minimal4, preloaded).",
)
@click.option(
    "--strategies",
    default="none,prctl,madvise",
    show_default=True,
    callback=csv_choice(comparing.STRATEGIES),
    help="Comma-separated: none (no ksm-wrap), prctl, madvise, madvise-noalign.",
)
@click.option(
    "--timeout",
    type=FiniteRange(min=1),
    default=120,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait per arm for merging to settle.",
)
@click.option(
    "--warmup",
    type=FiniteRange(min=0),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Time the command gets to load its data before the measurement starts.",
)
@click.option(
    "--wait-ready", is_flag=True, help="COMMAND prints a JSON ready line once loaded (see below); measure from then on."
)
@click.option(
    "--load-timeout",
    type=FiniteRange(min=1),
    default=1800,
    show_default=True,
    metavar="SECONDS",
    help="Longest wait for the ready line, with --wait-ready.",
)
@click.option(
    "--workload",
    type=click.Choice(list(WORKLOADS)),
    help="Instead of COMMAND, a workload of ksmpreload (see 'ksmpreload demo --help'), with --wait-ready.",
)
@workload_options
@click.option("--json", "as_json", is_flag=True, help="The results as JSON on stdout.")
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False, writable=True),
    callback=render.check_output_path,
    metavar="FILE",
    help="Also write the table as Markdown to FILE.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    callback=render.check_output_path,
    metavar="FILE.png",
    help="Also plot MiB saved over time per arm to FILE.png.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def compare(
    allocators,
    strategies,
    timeout,
    warmup,
    wait_ready,
    load_timeout,
    workload,
    size,
    processes,
    method,
    as_json,
    markdown,
    plot_path,
    command,
):
    """Run COMMAND once per allocator and strategy and compare what KSM saves.

    \b
    ksmpreload compare --allocators glibc,jemalloc --strategies none,prctl,madvise -- python3 app.py

    COMMAND should keep running with its data loaded; if an arm's command ends early (or
    sends no ready line), the arm is shown as not measured and the exit status is 1. Arms
    run in turn, each with KSM unmerged before it (run=2: this unmerges every process on the
    machine) and the same fast scan rate (every knob is restored at the end). Per arm: MiB
    saved, % of resident memory, RSS before and after merging, the shim's alignment
    padding, net saving, seconds to 90% of the final saving, rmap items, throughput if
    COMMAND reports it. The none arm also predicts what the others save, as the doctor does
    (its 'predictions': ksm-wrap for prctl and madvise, as-is for madvise-noalign), shown
    beside them as predicted MiB; arms before the none arm have no prediction.

    \b
    With --wait-ready, COMMAND loads its data and then prints one line of JSON on stdout:
      {"ready": true, "pids": [4711, 4712], "throughput": 5300, "throughput_unit": "sets/s"}
    Only "ready" is required; without "pids" its whole process tree is measured. Times
    (s to 90%, the plot) then count from the ready line, not from the start.

    \b
    --workload NAME runs a workload of ksmpreload this way:
      ksmpreload compare --allocators glibc,jemalloc --workload memcached --size full
    """
    if bool(workload) == bool(command):
        raise click.UsageError("give either COMMAND or --workload NAME")
    refuse_without_workload(workload, "size", "processes", "method")
    cwd = None
    if workload:
        # from "/": started in a source checkout, -m would import the unbuilt package there
        check_options(workload, size, processes, method)
        command, wait_ready, cwd = comparing.workload_command(workload, size, processes, method), True, "/"
        label = f"--workload {workload} --size {size}"
    else:
        label = " ".join(command)
    kernel.require_ksm()
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task("starting", total=None)
        results = comparing.compare(
            list(command),
            allocators,
            strategies,
            timeout,
            warmup,
            on_arm=lambda allocator, strategy: progress.update(task, description=f"{allocator}, {strategy}"),
            on_sample=lambda arm, pages: progress.update(
                task, description=f"{arm.allocator}, {arm.strategy}: {pages} pages merged"
            ),
            wait_ready=load_timeout if wait_ready else None,
            cwd=cwd,
        )
    if as_json:
        render.print_json(results)
    else:
        render.print_rich(render.table(COLUMNS, rows(results), title=f"ksmpreload compare: {label}"))
    if markdown:
        table = render.markdown_table(COLUMNS, rows(results), f"ksmpreload compare: {label}")
        render.write_output(markdown, lambda f: f.write(table + "\n"))
    if plot_path:
        plot(results, plot_path, label)
    failed = [f"{arm['allocator']}, {arm['strategy']}" for arm in results if arm["failure"]]
    problems = [f"not measured: {'; '.join(failed)} (see the table)"] if failed else []
    problems += vanished_lines(results)
    if problems:
        raise click.ClickException("; ".join(problems))
