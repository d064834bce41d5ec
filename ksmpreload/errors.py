"""Errors that carry an exit code. Raised anywhere; click prints one line and exits with it."""
import click

EXIT_FAILURE = 1     # the request could not be carried out (no root, KSM missing, ...)
EXIT_USAGE = 2       # bad input: unknown option, invalid value (click's own code)
EXIT_NOT_FOUND = 127  # the command to run does not exist (as a shell says)


class KsmError(click.ClickException):
    """One clear line on stderr and a non-zero exit code."""

    def __init__(self, message, exit_code=EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None):
        click.echo(f"ksmpreload: {self.format_message()}", err=True, file=file)


class NeedsRoot(KsmError):
    def __init__(self, what):
        super().__init__(f"{what} needs root (run it with sudo)", EXIT_FAILURE)
