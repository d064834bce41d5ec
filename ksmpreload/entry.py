"""The console scripts. The CLI's imports (click, rich, psutil) take a moment: a Ctrl-C in it
ends quietly with 130, as one while the command runs does (errors.run_cli)."""

import sys

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, not imported: errors imports click


def _interrupted(error):
    """Ctrl-C, or an error it caused: Python wraps an interrupt inside a class body's
    __set_name__ (pyelftools' cached_property) in a RuntimeError."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def _run(module):
    try:
        main = __import__(module, fromlist=["main"]).main  # importlib may not be loaded yet: no file read
    except BaseException as error:
        if _interrupted(error):
            sys.exit(EXIT_INTERRUPTED)
        raise
    main()


def ksmpreload() -> None:
    _run("ksmpreload.cli")


def ksm_wrap() -> None:
    _run("ksmpreload.wrap")
