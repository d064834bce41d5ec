"""`ksmpreload status`: KSM's knobs and counters, the pages it saves, the processes using it."""

import sys
import time

import click
from rich.console import Group
from rich.text import Text

from .. import attached as attach_records, governor, kernel, render
from ..sizes import MIB
from .options import FiniteRange

NOT_SHOWN = "-"  # a ksm_stat field this kernel does not have

PROCESS_COLUMNS = (  # (header, justify, ksm_stat field or key of the process entry)
    ("pid", "right", "pid"),
    ("command", "left", "cmdline"),
    ("merging pages", "right", "ksm_merging_pages"),
    ("zero pages", "right", "ksm_zero_pages"),
    ("profit", "right", "ksm_process_profit"),
    ("rmap items", "right", "ksm_rmap_items"),
    ("merge_any", "center", "ksm_merge_any"),
    ("mergeable", "center", "ksm_mergeable"),
    ("attached", "center", "attached"),
)


def snapshot():
    """Everything `status` shows, as one JSON-ready dict."""
    knobs = kernel.read_knobs()
    saved = kernel.pages_saved(knobs)
    processes, unreadable = kernel.ksm_processes_and_unreadable()
    attached = attach_records.attached_processes()
    for process in processes:
        process["attached"] = attached[process["pid"]]["strategy"] if process["pid"] in attached else None
    return {
        "ksm": knobs,
        "pages_saved": saved,
        "mib_saved": round(saved * kernel.page_size() / MIB, 2),
        "processes": processes,
        "governor": governor.read_state(),
        "notes": kernel.unreadable_notes(unreadable)
        + ([] if governor.state_known() else [governor.STATE_UNKNOWN_NOTE]),
    }


def cell(process, key):
    value = process.get(key, NOT_SHOWN)
    if value is None:
        return NOT_SHOWN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "ksm_process_profit" and value != NOT_SHOWN:
        return render.human_bytes(value)
    return value


def saved_pages(process):
    return process.get("ksm_merging_pages", 0) + process.get("ksm_zero_pages", 0)


def process_table(processes):
    rows = [
        [cell(process, key) for _, _, key in PROCESS_COLUMNS]
        for process in sorted(processes, key=saved_pages, reverse=True)
    ]
    columns = [(header, justify) for header, justify, _ in PROCESS_COLUMNS]
    return render.table(columns, rows, title="Processes with KSM-enabled memory")


def status_view(snap, compact=False):
    """The text form of a snapshot: one line per knob (in columns if `compact`, to fit a
    terminal), pages saved, the process table."""
    saved = Text(f"pages saved (pages_sharing + ksm_zero_pages): {snap['pages_saved']} pages, {snap['mib_saved']} MiB")
    processes = (
        process_table(snap["processes"])
        if snap["processes"]
        else Text(f"no {'readable ' if snap['notes'] else ''}process has KSM-enabled memory")
    )
    layout = render.key_value_columns if compact else render.key_value_lines
    return Group(
        layout(snap["ksm"].items()),
        Text(),
        saved,
        *([Text(line)] if (line := governor_line(snap["governor"])) else []),
        Text(),
        processes,
        *render.note_lines(snap["notes"]),
    )


def governor_line(state):
    """What the governor does, in one line ("no governor runs" without one); None when that is
    not known (without root: a note says so)."""
    if state is None and not governor.state_known():
        return None
    if state is None:
        return "governor: none runs (ksmpreload governor sets the scan rate from what is left to gain)"
    decision = state["decision"]
    how = "pinned: knobs left as they are" if state["pinned"] else f"{decision['pages_per_second']:g} pages/s"
    return f"governor: pid {state['pid']}, {decision['mode']}, {how}, because {decision['reasons'][0]}"


def show(snap, as_json, json_lines=False):
    if as_json:
        render.print_json(snap, compact=json_lines)
    else:
        render.print_rich(status_view(snap))


def watch_live(seconds):
    """Redraw in place on a terminal until Ctrl-C."""
    render.refresh_live(lambda: status_view(snapshot(), compact=True), seconds)


def watch_stream(seconds, as_json):
    """One snapshot per interval (JSON: one object per line) until Ctrl-C."""
    while True:
        show(snapshot(), as_json, json_lines=True)
        if not as_json:
            click.echo()
        sys.stdout.flush()
        time.sleep(seconds)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
@click.option(
    "--watch",
    type=FiniteRange(min=0, min_open=True),
    metavar="SECONDS",
    help="Refresh every SECONDS until Ctrl-C: in place on a terminal, else one "
    "snapshot per interval (with --json, one object per line).",
)
def status(as_json, watch):
    """Show KSM's knobs, pages saved and processes.

    Every value under /sys/kernel/mm/ksm, the pages KSM saves (pages_sharing +
    ksm_zero_pages) and each process with KSM-enabled memory, from /proc/<pid>/ksm_stat.
    """
    kernel.require_ksm()
    if watch is None:
        show(snapshot(), as_json)
        return
    try:
        if sys.stdout.isatty() and not as_json:
            watch_live(watch)
        else:
            watch_stream(watch, as_json)
    except KeyboardInterrupt:
        pass
