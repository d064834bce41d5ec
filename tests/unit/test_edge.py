"""The one edge where errors become what the user sees (ksmpreload/edge.py): a line on stderr
naming the program, and the exit code the error carries. No root, no KSM."""

import os
import signal
import time

import click
import pytest

from ksmpreload.edge import run_cli
from ksmpreload.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, KsmError, NeedsRoot, NoSuchProcess


@pytest.fixture(autouse=True)
def no_arguments(monkeypatch):
    """click reads sys.argv: the tool's own, not pytest's."""
    monkeypatch.setattr("sys.argv", ["tool"])


def command_raising(error):
    @click.command()
    @click.option("--count", type=int, default=1)
    def command(count):
        raise error

    return command


@pytest.mark.parametrize(
    "error,code,line",
    [
        (NoSuchProcess([41, 42]), EXIT_USAGE, "tool: no such process: 41, 42"),
        (NoSuchProcess([7], while_read=True), EXIT_FAILURE, "tool: no such process: 7 (it ended while being read)"),
        (
            NeedsRoot("reading /proc/1/pagemap"),
            EXIT_FAILURE,
            "tool: reading /proc/1/pagemap needs root (run it with sudo)",
        ),
        (KsmError("two\nlines", 127), 127, "tool: two lines"),
    ],
)
def test_library_errors_become_one_line_and_their_exit_code(capsys, error, code, line):
    with pytest.raises(SystemExit) as leaving:
        run_cli(command_raising(error), "tool")
    assert leaving.value.code == code
    assert capsys.readouterr().err == line + "\n"


def test_library_errors_are_not_click_types():
    """The library knows nothing of its command line (issue 13)."""
    assert not issubclass(KsmError, click.ClickException)


def test_usage_errors_point_at_help(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tool", "--count", "many"])
    with pytest.raises(SystemExit) as leaving:
        run_cli(command_raising(KsmError("unused")), "tool")
    assert leaving.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("tool: Invalid value for '--count'") and err.endswith("(see 'tool --help')\n"), err


def test_ctrl_c_exits_130_quietly(capsys):
    """click ends the ^C line with a newline; nothing else is said."""
    with pytest.raises(SystemExit) as leaving:
        run_cli(command_raising(KeyboardInterrupt()), "tool")
    assert leaving.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == ""


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_unwind_the_stack_and_exit_128_plus_the_signal(capsys, ending):
    """Like Ctrl-C: a `finally` (the knobs put back, the servers stopped) runs before the exit."""
    cleaned = []

    @click.command()
    def command():
        try:
            os.kill(os.getpid(), ending)
            time.sleep(5)  # the handler raises here
        finally:
            cleaned.append(True)

    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as leaving:
            run_cli(command, "tool")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    assert leaving.value.code == 128 + ending and cleaned == [True]
    assert capsys.readouterr().err == ""
