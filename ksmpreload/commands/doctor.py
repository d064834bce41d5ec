"""`ksmpreload doctor`: why KSM is not merging, what it costs, and the fix."""

import shutil
import signal
import subprocess
import sys
import time

import click
from rich.console import Group
from rich.progress import Progress
from rich.text import Text

from .. import attribution, diagnosis, kernel, render, scanning
from ..errors import EXIT_NOT_FOUND, KsmError
from ..processes import ksm_wrap_command, merged_pages, process_tree
from ..sizes import MIB
from .options import FiniteRange

START_SECONDS = 1.0  # a started command gets this long to allocate before the wait for merging


def start_wrapped(command, as_is):
    """The command under ksm-wrap (as_is: in observe mode), its stdin closed and stdout dropped."""
    options = ["--strategy", "observe"] if as_is else []
    try:
        return subprocess.Popen(
            [*ksm_wrap_command(), *options, *command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
    except OSError as error:
        raise KsmError(f"cannot start {command[0]}: {error.strerror}", EXIT_NOT_FOUND) from error


def wait_for_merging(pid, timeout, quiet):
    """Until the merged pages of the process and its children stop changing over several full
    scans, or `timeout`."""

    def merged():
        return merged_pages(process_tree(pid))

    if kernel.read_knob("run") != 1:
        return
    if quiet or not sys.stderr.isatty():
        scanning.wait_until_settled(merged, timeout=timeout)
        return
    with Progress(transient=True) as progress:
        task = progress.add_task("waiting for KSM to settle", total=None)
        scanning.wait_until_settled(
            merged,
            timeout=timeout,
            on_progress=lambda pages: progress.update(
                task, description=(f"waiting for KSM to settle: {pages} pages merged")
            ),
        )


def diagnose_command(command, timeout, quiet, as_is):
    """Starts the command under ksm-wrap and diagnoses it once merging settles; a command that
    ends first still gets the system and its file diagnosed."""
    program = shutil.which(command[0])
    if program is None:
        raise KsmError(f"{command[0]}: command not found", EXIT_NOT_FOUND)
    proc = start_wrapped(command, as_is)
    try:
        time.sleep(START_SECONDS)
        if proc.poll() is not None:
            report = diagnosis.diagnose([], program=program)
            report["notes"].insert(
                0,
                f"{command[0]} exited with {proc.returncode} within {START_SECONDS:g} s: "
                "only the system and its file were diagnosed",
            )
            return report
        wait_for_merging(proc.pid, timeout, quiet)
        return diagnosis.diagnose(process_tree(proc.pid), program=program)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def finding_text(number, finding):
    cost = f" ({finding['cost_bytes'] / MIB:.1f} MiB)" if finding["cost_bytes"] else ""
    who = f" [pid {finding['pid']}]" if finding["pid"] else ""
    evidence = ", ".join(f"{key} {value}" for key, value in finding["evidence"].items() if key != "regions")
    lines = [f"{number}. {finding['title']}{cost}{who}", f"   why: {finding['cause']}", f"   fix: {finding['fix']}"]
    if evidence:
        lines.append(f"   evidence: {evidence}")
    for region in finding["evidence"].get("regions", []):
        kib = region["anonymous_kib"] if "anonymous_kib" in region else region["other_offset_bytes"] // 1024
        who = f"pid {region['pid']} " if "pid" in region else ""
        lines.append(f"     {who}{region['start']}-{region['end']} {region['made_by']}: {kib} KiB")
    return Text("\n".join(lines))


def any_offset_lines(any_offset):
    """The any-offset analysis: its total, each process's share, the pairs that share most."""
    lines = [
        f"duplicate content at any offset: {any_offset['duplicate_bytes'] / MIB:.1f} MiB "
        f"({any_offset['duplicate_bytes_across'] / MIB:.1f} MiB across processes)"
    ]
    for process in any_offset.get("processes", []):
        allocator = ", ".join(any_offset["allocators"].get(str(process["pid"])) or ["glibc"])
        lines.append(
            f"- pid {process['pid']} ({allocator}): {process['duplicate_bytes'] / MIB:.1f} MiB its share, "
            f"{process['other_offset_bytes'] / MIB:.1f} MiB of it at other offsets in its pages"
        )
    for pair in [pair for pair in any_offset.get("pairs", []) if pair["shared_bytes"] >= MIB // 10][:5]:
        lines.append(f"- pids {pair['pids'][0]} and {pair['pids'][1]} both hold {pair['shared_bytes'] / MIB:.1f} MiB")
    return [Text(line) for line in lines]


def print_report(report):
    parts = [finding_text(number, finding) for number, finding in enumerate(report["findings"], 1)]
    if not parts:
        parts = [Text("no finding: KSM is running, scanning fast enough, and the memory looked at is mergeable")]
    potential = report.get("potential")
    if potential:
        merged = "unknown" if potential["merged_bytes"] is None else f"{potential['merged_bytes'] / MIB:.1f} MiB"
        parts += [
            Text(""),
            Text(f"duplicate potential: {potential['potential_bytes'] / MIB:.1f} MiB could merge, {merged} has"),
        ]
        any_offset = potential.get("any_offset")
        if any_offset:
            parts += any_offset_lines(any_offset)
    if report.get("predictions"):
        parts += [Text(""), Text("predicted saving by remedy (see --json for each model):")]
        for entry in report["predictions"]:
            net = f", {entry['net_saved_bytes'] / MIB:.1f} MiB net of padding" if "net_saved_bytes" in entry else ""
            parts.append(Text(f"- {entry['remedy']}: {entry['saved_bytes'] / MIB:.1f} MiB{net}: {entry['how']}"))
    parts += [Text(""), Text("notes:")] + [Text(f"- {note}") for note in report["notes"]]
    render.print_rich(Group(*parts))


def split_targets(args):
    """PIDs when every argument is a number (a thread id stands for its process; each once), else a
    command to start."""
    if args and all(arg.isascii() and arg.isdigit() for arg in args):
        pids = [int(arg) for arg in args]
        kernel.require_processes(pids)
        return list(dict.fromkeys(kernel.thread_group(pid) for pid in pids)), None
    return [], list(args) or None


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("targets", nargs=-1, type=click.UNPROCESSED)
@click.option("--json", "as_json", is_flag=True, help="The findings as one JSON object.")
@click.option(
    "--timeout",
    type=FiniteRange(min=0),
    default=120,
    show_default=True,
    metavar="SECONDS",
    help="With a command: how long to wait for merging to settle.",
)
@click.option(
    "--as-is",
    is_flag=True,
    help="With a command: run it as it runs without ksmpreload (the shim only watches its own "
    "madvise calls), to learn why it does not merge by itself.",
)
@click.option("--quiet", is_flag=True, help="No progress display while waiting.")
def doctor(targets, as_json, timeout, as_is, quiet):
    """Why KSM is not merging, what it costs, and what to do about it.

    \b
    ksmpreload doctor                  the system (KSM and its knobs)
    ksmpreload doctor PID...           the system and these processes
    ksmpreload doctor -- COMMAND ARGS  start COMMAND under ksm-wrap, wait until merging
                                       settles, diagnose it, stop it
    ksmpreload doctor --as-is -- COMMAND   the same, with COMMAND running as it would
                                       without ksmpreload

    Each finding gives its evidence (numbers read from the kernel), what it costs, the cause
    in one sentence and the fix; they are ordered by cost.
    """
    kernel.require_ksm()
    pids, command = split_targets(targets)
    if as_is and not command:
        raise click.UsageError("--as-is needs a command: ksmpreload doctor --as-is -- COMMAND")
    report = diagnose_command(command, timeout, quiet or as_json, as_is) if command else diagnosis.diagnose(pids)
    attribution.require_read(pids, [process["pid"] for process in report["processes"]])
    if as_json:
        render.print_json(report)
    else:
        print_report(report)
