"""The `ksmpreload` command: a click group; each subcommand lives in ksmpreload/commands/."""

from __future__ import annotations

import click

from . import __version__
from .commands import COMMANDS
from .edge import run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ksmpreload")
def group() -> None:
    """Kernel Samepage Merging for unmodified programs: status, control and demo.

    Run programs with KSM using `ksm-wrap COMMAND`; inspect the result here.
    """


for command in COMMANDS:
    group.add_command(command)


def main() -> None:
    run_cli(group, "ksmpreload")
