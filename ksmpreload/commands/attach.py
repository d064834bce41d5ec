"""`ksmpreload attach PID...` and `ksmpreload detach PID...`: merging on or off in running processes."""

import functools

import click
import psutil

from .. import attach as attaching
from .. import diagnosis, kernel, render
from ..errors import KsmError
from ..sizes import SizeParam
from ..wrap import MAX_THRESHOLD


def targets(pids, tree):
    """(the pids, and with --tree their descendants, each once, parents first; the descendants)."""
    found, descendants = list(dict.fromkeys(pids)), []
    for pid in pids if tree else ():
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            raise KsmError(f"no process {pid}") from None
        descendants += [child.pid for child in children if child.pid not in found + descendants]
    return found + descendants, set(descendants)


def predict(pids):
    """The doctor's predictions for `pids` as they are now, or a line saying why there are none."""
    try:
        return diagnosis.remedy_predictions(pids), None
    except (KsmError, ProcessLookupError) as error:
        return None, f"no prediction: {getattr(error, 'message', error)}"


def prediction_lines(predictions, strategy):
    saved = {entry["remedy"]: entry for entry in predictions}
    as_is, wrapped = saved["as-is"]["saved_bytes"], saved["ksm-wrap"]["net_saved_bytes"]
    where = " (madvise: the part in the regions marked)" if strategy == "madvise" else ""
    return [
        f"predicted (ksmpreload doctor's model): attach saves {render.human_bytes(as_is)} as the memory lies now{where};",
        f"ksm-wrap at the next restart would save {render.human_bytes(wrapped)} net, "
        f"{render.human_bytes(max(wrapped - as_is, 0))} more: attach cannot page-align blocks",
    ]


def result_line(result):
    what = "on" if result.enabled else "off"
    if result.strategy == "prctl":
        was = "already" if result.previous == result.enabled else "now"
        line = f"{result.pid}: merging {what} ({was}; prctl PR_SET_MEMORY_MERGE)"
    else:
        verb = "marked" if result.enabled else "unmarked"
        line = (
            f"{result.pid}: merging {what} in {result.regions} regions {verb} "
            f"({render.human_bytes(result.region_bytes)}; madvise)"
        )
        if result.failed_regions:
            line += f", {result.failed_regions} refused (unmapped meanwhile, or no memory to unmerge)"
    return line + (f"; {result.note}" if result.note else "")


def each_process(chosen, descendants, operation):
    """operation(pid) for each pid in turn: (results, skipped, failed). A descendant that ended
    or became a zombie meanwhile is skipped; a deferred Ctrl-C stops before the next pid."""
    results, skipped, failed = [], [], []
    for pid in chosen:
        if attaching.interrupted():
            break
        try:
            results.append(operation(pid))
        except KsmError as error:
            gone = not kernel.process_alive(pid)
            (skipped if pid in descendants and gone else failed).append({"pid": pid, "error": error.message})
    return results, skipped, failed


def report(results, skipped, failed, predictions, why_none, as_json):
    if as_json:
        render.print_json(
            {
                "processes": [vars(result) for result in results],
                "skipped": skipped,
                "failed": failed,
                "predictions": predictions,
            }  # fmt: skip
        )
    else:
        for result in results:
            click.echo(result_line(result))
        for entry in skipped:
            click.echo(f"{entry['pid']}: skipped, it ended meanwhile")
        if predictions:
            click.echo("\n".join(prediction_lines(predictions, results[0].strategy if results else None)))
        elif why_none:
            click.echo(why_none)
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise KsmError(f"{first['pid']}: {first['error']}{more}")


def run(
    pids, tree, force, as_json, enabled, strategy=None, threshold=attaching.DEFAULT_THRESHOLD, with_prediction=False
):
    chosen, descendants = targets(pids, tree)
    predictions, why_none = predict(chosen) if with_prediction else (None, None)
    if enabled:
        operation = functools.partial(attaching.attach, strategy=strategy, threshold=threshold, force=force)
    else:
        operation = functools.partial(attaching.detach, force=force)
    with attaching.signals_deferred():  # Ctrl-C: the process in hand is let go, what was done is shown
        results, skipped, failed = each_process(chosen, descendants, operation)
        report(results, skipped, failed, predictions, why_none, as_json)


PIDS = click.argument("pids", nargs=-1, required=True, type=click.IntRange(min=1))
TREE = click.option("--tree", is_flag=True, help="The processes and all their descendants.")
FORCE = click.option(
    "--force",
    is_flag=True,
    help="A process under a seccomp filter too; for detach, also one with no record of an attach "
    "(its own prctl merging is turned off).",
)
JSON = click.option(
    "--json", "as_json", is_flag=True, help="One JSON object: the processes, and the predictions (attach)."
)


@click.command()
@PIDS
@TREE
@click.option(
    "--strategy",
    type=click.Choice(attaching.STRATEGIES),
    help="prctl: the whole process, and memory it maps later (6.4+; the default where the kernel has it). "
    "madvise: its private anonymous regions as they are now.",
)
@click.option(
    "--threshold",
    type=SizeParam(0, MAX_THRESHOLD),
    default=attaching.DEFAULT_THRESHOLD,
    show_default=True,
    help="madvise: regions smaller than this are left alone.",
)
@click.option(
    "--predict/--no-predict",
    default=True,
    show_default=True,
    help="First read the processes' memory for the doctor's prediction of what attach and ksm-wrap save.",
)
@FORCE
@JSON
def attach(pids, tree, strategy, threshold, predict, force, as_json):
    """Turn merging on in running processes, without a restart (root; x86-64, aarch64).

    Runs one system call inside each process: prctl(PR_SET_MEMORY_MERGE, 1), or
    madvise(MADV_MERGEABLE) over each region; ptrace holds one of its threads for the call, then
    restores it exactly (docs/ATTACH.md). Refused, the process untouched, when it is traced
    already, a kernel thread, under a seccomp filter (unless --force), or the kernel lacks the
    strategy. Children it forks later inherit the merging (and, with prctl on 6.7+, what they exec).
    """
    run(pids, tree, force, as_json, True, strategy, threshold, predict)


@click.command()
@PIDS
@TREE
@FORCE
@JSON
def detach(pids, tree, force, as_json):
    """Turn merging off again where attach turned it on: prctl(PR_SET_MEMORY_MERGE, 0), or
    MADV_UNMERGEABLE over the regions attach marked; the kernel unmerges their pages."""
    run(pids, tree, force, as_json, False)
