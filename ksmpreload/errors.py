"""Errors that carry an exit code, raised anywhere, and the one place that turns them
into one clear line on stderr and that code (run_cli, used by both entry points)."""
import sys

import click

EXIT_FAILURE = 1      # the request could not be carried out (no root, KSM missing, ...)
EXIT_USAGE = 2        # bad input: unknown option, invalid value
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_NOT_FOUND = 127  # the command to run does not exist (as a shell says)


class KsmError(click.ClickException):
    """One clear line on stderr and a non-zero exit code."""

    def __init__(self, message, exit_code=EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


class NeedsRoot(KsmError):
    def __init__(self, what):
        super().__init__(f"{what} needs root (run it with sudo)", EXIT_FAILURE)


def _one_line(error):
    message = error.format_message().replace("\n", " ")
    if isinstance(error, click.UsageError):
        command = error.ctx.command_path if error.ctx else ""
        return f"{message} (see '{command} --help')" if command else message
    return message


def run_cli(command, prog_name):
    """Run a click command; any error becomes '<prog_name>: <what is wrong>' and its exit code."""
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.ClickException as error:
        click.echo(f"{prog_name}: {_one_line(error)}", err=True)
        sys.exit(error.exit_code)
    except click.Abort:
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(0)
