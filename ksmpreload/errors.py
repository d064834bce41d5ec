"""The errors the library raises, each with the exit code the command line gives it. Plain
exceptions: the library knows nothing of its command line; ksmpreload/edge.py, the one place
that turns them into a message, is where click lives."""

from __future__ import annotations

from collections.abc import Sequence

EXIT_FAILURE = 1  # the request could not be carried out (no root, KSM missing, ...)
EXIT_USAGE = 2  # bad input: unknown option, invalid value
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_NOT_FOUND = 127  # the command to run does not exist (as a shell says)


class KsmError(Exception):
    """One clear line on stderr and a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (edge.run_cli turns them into this): like Ctrl-C, it unwinds
    the stack, so that every knob changed is put back and every process started is stopped."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(f"signal {signal_number}")
        self.exit_code = 128 + signal_number


class NeedsRoot(KsmError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs root (run it with sudo)", EXIT_FAILURE)


class NoSuchProcess(KsmError):
    """Processes the user named that do not exist (bad input), or that ended while they
    were being read (the request could not be carried out)."""

    def __init__(self, pids: Sequence[int], while_read: bool = False) -> None:
        listed = ", ".join(map(str, pids))
        if while_read:
            super().__init__(f"no such process: {listed} (it ended while being read)", EXIT_FAILURE)
        else:
            super().__init__(f"no such process: {listed}", EXIT_USAGE)
        self.pids = list(pids)
