"""`ksmpreload governor`: ksmd's scan rate set from what is left to gain, until stopped."""

import contextlib

import click

from .. import governor as governing
from .. import render
from ..idle import IDLE_SECONDS
from .options import FiniteRange


def decision_lines(decision, tracker=None):
    lines = [
        f"mode: {decision.mode}",
        f"rate: {decision.pages_per_second:g} pages/s "
        f"(pages_to_scan {decision.pages_to_scan}, sleep_millisecs {decision.sleep_millisecs})",
        *(f"because {reason}" for reason in decision.reasons),
    ]
    if tracker is not None:
        lines.append(f"ksmd: {100 * tracker.cpu_share:.1f}% of a core over the last second")
    return lines


def _say(line):
    """A line on the governor's output; a closed output (a pipe whose reader went) loses the line, not the governor."""
    with contextlib.suppress(OSError):
        click.echo(line)


@click.command()
@click.option(
    "--max-cpu",
    type=FiniteRange(0.1, 100),
    default=governing.Settings.max_cpu,
    show_default=True,
    help="The most of one core ksmd may use, in percent (measured from its CPU time).",
)
@click.option(
    "--target-seconds",
    type=FiniteRange(1, 86400),
    default=governing.Settings.target_seconds,
    show_default=True,
    help="How long one full scan takes while scans still merge or new memory waits.",
)
@click.option(
    "--settled-seconds",
    type=FiniteRange(1, 86400),
    default=governing.Settings.settled_seconds,
    show_default=True,
    help="How long one full scan takes once full scans stop gaining (a trickle).",
)
@click.option(
    "--unmark-idle",
    is_flag=True,
    help="Turn merging off (as detach does) in processes where ksmpreload turned it on (ksm-wrap, attach) "
    "and KSM has merged nothing for --idle-seconds and 3 full scans; their rmap items cost memory and "
    "their scans CPU.",
)
@click.option(
    "--idle-seconds",
    type=FiniteRange(1, 10**7),
    help=f"With --unmark-idle: how long a process merges nothing before its merging is turned off "
    f"[default: {IDLE_SECONDS}].",
)
@click.option(
    "--tick",
    type=FiniteRange(0.1, 60),
    default=governing.Settings.tick,
    show_default=True,
    help="Seconds between two looks.",
)
@click.option(
    "--pin-file",
    default=governing.PIN_FILE,
    show_default=True,
    help="While this file exists (owned by root), the governor changes no knob.",
)
@click.option("--once", is_flag=True, help="Print the decision it would take now, with its reasons; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="With --once: the decision as JSON.")
def governor(max_cpu, target_seconds, settled_seconds, unmark_idle, idle_seconds, tick, pin_file, once, as_json):
    """Set ksmd's scan rate from what is left to gain (root; runs until Ctrl-C or SIGTERM).

    Fast while there is memory ksmd has not looked at (a new process, an attach, a load) or
    full scans still merge; a trickle once they stop gaining; never above --max-cpu. It turns
    KSM on when mergeable memory appears, turns the kernel's advisor off while it runs, leaves
    alone any knob someone else changes, and puts back every knob it changed when it stops.
    One per machine. `ksmpreload status` and the exporter show its decisions (docs/GOVERNOR.md).
    """
    if idle_seconds is not None and not unmark_idle:
        raise click.UsageError("--idle-seconds goes with --unmark-idle")
    if once and unmark_idle:
        raise click.UsageError("--once decides the scan rate only; --unmark-idle needs a governor that runs")
    if settled_seconds < target_seconds:
        raise click.UsageError("--settled-seconds is shorter than --target-seconds: settled would scan faster")
    if as_json and not once:
        raise click.UsageError("--json goes with --once (the running governor's state is in status --json)")
    settings = governing.Settings(
        max_cpu=max_cpu,
        target_seconds=target_seconds,
        settled_seconds=settled_seconds,
        unmark_idle_seconds=(idle_seconds or IDLE_SECONDS) if unmark_idle else None,
        tick=tick,
    )
    if once:
        decision, tracker = governing.decide_once(settings)
        if as_json:
            render.print_json({**vars(decision), "ksmd_cpu_percent": round(100 * tracker.cpu_share, 2)})
        else:
            click.echo("\n".join(decision_lines(decision, tracker)))
        return
    governing.Governor(settings, pin_file, say=_say).run()
