"""The console scripts. The CLI's imports (click, rich, psutil) take a moment: a Ctrl-C in it
ends quietly with 130, as one while the command runs does (errors.run_cli)."""
import importlib
import sys

EXIT_INTERRUPTED = 130  # errors.EXIT_INTERRUPTED, not imported: errors imports click


def _run(module):
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    main()


def ksmpreload():
    _run("ksmpreload.cli")


def ksm_wrap():
    _run("ksmpreload.wrap")
