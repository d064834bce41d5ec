"""The console scripts catch Ctrl-C only once ksmpreload.entry has run; until then nothing of
ours may load another module (each one read from disk is a moment where an interrupt shows a
traceback through ksmpreload's files)."""

import ast
import subprocess
import sys


def test_importing_the_entry_loads_no_module_besides_our_own():
    probe = "import sys; before = set(sys.modules); import ksmpreload.entry; print(sorted(set(sys.modules) - before))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert ast.literal_eval(loaded) == ["ksmpreload", "ksmpreload.entry"]
