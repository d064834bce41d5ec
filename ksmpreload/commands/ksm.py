"""`ksmpreload ksm`: start, stop and unmerge ksmd, and set its scan rate (needs root)."""

import click

from .. import kernel

RUN_STOP, RUN_MERGE, RUN_UNMERGE = 0, 1, 2


def change_knob(name, value):
    """Write a knob and say what changed, e.g. 'run: 0 -> 1'."""
    before = kernel.write_knob(name, value)
    click.echo(f"{name}: {before} -> {kernel.read_knob(name)}")


def scan_rate_hint():
    """A hint when ksmd would need more than about a minute per pass over all RAM."""
    knobs = kernel.read_knobs()
    if knobs.get("advisor_mode", "none") != "none":
        return None
    memory, sleep_ms = kernel.mem_total_bytes(), knobs["sleep_millisecs"]
    suggested = kernel.suggested_pages_to_scan(memory, sleep_ms)
    if knobs["pages_to_scan"] >= suggested:
        return None
    now = kernel.full_scan_seconds(memory, knobs["pages_to_scan"], sleep_ms)
    then = kernel.full_scan_seconds(memory, suggested, sleep_ms)
    return (
        f"hint: at pages_to_scan {knobs['pages_to_scan']} one pass over all RAM takes about "
        f"{now:.0f} s; `ksmpreload ksm tune --pages-to-scan {suggested}` makes it {then:.0f} s"
    )


@click.group()
def ksm():
    """Control ksmd through /sys/kernel/mm/ksm (needs root)."""


@ksm.command()
def on():
    """Start ksmd merging (run = 1)."""
    change_knob("run", RUN_MERGE)
    hint = scan_rate_hint()
    if hint:
        click.echo(hint)


@ksm.command()
def off():
    """Stop ksmd; merged pages stay merged (run = 0)."""
    change_knob("run", RUN_STOP)


@ksm.command()
def unmerge():
    """Stop ksmd and unmerge every KSM page (run = 2)."""
    change_knob("run", RUN_UNMERGE)


@ksm.command()
@click.option(
    "--pages-to-scan",
    type=click.IntRange(min=1),
    metavar="N",
    help="Pages ksmd scans per wake-up (kernel default 100).",
)
@click.option(
    "--sleep-ms",
    type=click.IntRange(min=1),
    metavar="N",
    help="Milliseconds ksmd sleeps between wake-ups (sleep_millisecs, default 20).",
)
def tune(pages_to_scan, sleep_ms):
    """Set ksmd's scan rate: give --pages-to-scan, --sleep-ms or both."""
    if pages_to_scan is None and sleep_ms is None:
        raise click.UsageError("give --pages-to-scan N, --sleep-ms N or both")
    if pages_to_scan is not None:
        change_knob("pages_to_scan", pages_to_scan)
    if sleep_ms is not None:
        change_knob("sleep_millisecs", sleep_ms)
