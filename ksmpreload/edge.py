"""The one place where an error becomes what the user sees: '<program>: <what is wrong>' on
stderr, one line, and its exit code (run_cli, used by both console scripts)."""

import sys

import click

from .errors import EXIT_INTERRUPTED, KsmError


def _one_line(error):
    if isinstance(error, KsmError):
        return error.message.replace("\n", " ")
    message = error.format_message().replace("\n", " ")
    if isinstance(error, click.UsageError):
        command = error.ctx.command_path if error.ctx else ""
        return f"{message} (see '{command} --help')" if command else message
    return message


def run_cli(command, prog_name):
    """Run a click command; any error becomes '<prog_name>: <what is wrong>' and its exit code."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except (KsmError, click.ClickException) as error:
        click.echo(f"{prog_name}: {_one_line(error)}", err=True)
        sys.exit(error.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0)
