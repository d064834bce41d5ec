"""python -m ksmpreload.workloads serve NAME: the command `ksmpreload compare --workload` runs."""

from __future__ import annotations

import click

from ..edge import run_cli
from . import SIZES
from .runner import METHODS, WORKLOADS, serve


@click.group()
def main() -> None:
    """The workloads of ksmpreload (see `ksmpreload demo --workload` and `compare --workload`)."""


@main.command("serve")
@click.argument("name", type=click.Choice(list(WORKLOADS)))
@click.option("--size", type=click.Choice(list(SIZES)), default="small", show_default=True)
@click.option("--processes", type=click.IntRange(1, 64), help="Servers or workers (default: the workload's).")
@click.option("--method", type=click.Choice(METHODS), help="stress-ng: the fill method (default zero-one).")
def serve_command(name: str, size: str, processes: int | None, method: str | None) -> None:
    """Start and load workload NAME, print a JSON ready line with its pids, hold it until SIGTERM."""
    serve(name, size, "none", processes, method)


if __name__ == "__main__":
    run_cli(main, "python -m ksmpreload.workloads")
