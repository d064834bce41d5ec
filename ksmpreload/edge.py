"""The one place where an error becomes what the user sees: '<program>: <what is wrong>' on
stderr, one line, and its exit code (run_cli, used by both console scripts)."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import click

from .errors import EXIT_INTERRUPTED, KsmError, Terminated

ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _one_line(error):
    if isinstance(error, KsmError):
        return error.message.replace("\n", " ")
    message = error.format_message().replace("\n", " ")
    if isinstance(error, click.UsageError):
        command = error.ctx.command_path if error.ctx else ""
        return f"{message} (see '{command} --help')" if command else message
    return message


def _terminate(signal_number, frame):
    for ending in ENDING_SIGNALS:  # once: a second signal must not interrupt the cleanup
        signal.signal(ending, signal.SIG_IGN)
    raise Terminated(signal_number)


def run_cli(command: click.Command, prog_name: str) -> NoReturn:
    """Run a click command; any error becomes '<prog_name>: <what is wrong>' and its exit code.
    SIGTERM and SIGHUP unwind the stack as Ctrl-C does, then exit 128 + the signal."""
    for ending in ENDING_SIGNALS:
        if signal.getsignal(ending) is signal.SIG_DFL:  # one the caller ignores stays ignored
            signal.signal(ending, _terminate)
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except (KsmError, click.ClickException) as error:
        click.echo(f"{prog_name}: {_one_line(error)}", err=True)
        sys.exit(error.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(EXIT_INTERRUPTED)
    except Terminated as ended:
        sys.exit(ended.exit_code)
    sys.exit(0)
