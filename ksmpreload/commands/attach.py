"""`ksmpreload attach PID...` and `ksmpreload detach PID...`: merging on or off in running processes."""

import click
import psutil

from .. import attach as attaching
from .. import render
from ..errors import KsmError


def targets(pids, tree):
    """The pids, and with --tree their descendants, each once, parents first."""
    found = list(dict.fromkeys(pids))
    for pid in pids if tree else ():
        try:
            found += [child.pid for child in psutil.Process(pid).children(recursive=True) if child.pid not in found]
        except psutil.NoSuchProcess:
            raise KsmError(f"no process {pid}") from None
    return found


def run(pids, tree, force, as_json, enabled):
    done = [attaching.set_merging(pid, enabled, force) for pid in targets(pids, tree)]
    if as_json:
        render.print_json([vars(result) for result in done])
        return
    for result in done:
        was = "already" if result.previous == enabled else "now"
        click.echo(f"{result.pid}: merging {'on' if enabled else 'off'} ({was}; prctl PR_SET_MEMORY_MERGE)")
    if enabled:
        click.echo(
            "attach marks the memory as it lies: blocks are not page-aligned (ksmpreload doctor PID predicts "
            "what ksm-wrap would add at the next restart)"
        )


PIDS = click.argument("pids", nargs=-1, required=True, type=click.IntRange(min=1))
TREE = click.option("--tree", is_flag=True, help="The processes and all their descendants.")
FORCE = click.option("--force", is_flag=True, help="Attach to a process under a seccomp filter too.")
JSON = click.option("--json", "as_json", is_flag=True, help="One JSON list, an object per process.")


@click.command()
@PIDS
@TREE
@FORCE
@JSON
def attach(pids, tree, force, as_json):
    """Turn merging on in running processes, without a restart (root, x86-64).

    Runs prctl(PR_SET_MEMORY_MERGE, 1) inside each process: ptrace holds one of its threads for
    the one system call, then restores it exactly (docs/ATTACH.md). Refused, the process
    untouched, when it is traced already, a kernel thread, under a seccomp filter (unless
    --force) or this kernel has no PR_SET_MEMORY_MERGE. Processes it starts later inherit it.
    """
    run(pids, tree, force, as_json, True)


@click.command()
@PIDS
@TREE
@FORCE
@JSON
def detach(pids, tree, force, as_json):
    """Turn merging off again in processes attach turned it on in (prctl(PR_SET_MEMORY_MERGE, 0):
    the kernel unmerges their pages)."""
    run(pids, tree, force, as_json, False)
