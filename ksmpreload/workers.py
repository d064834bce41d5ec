"""Worker processes that print one JSON line when their data is ready and hold it until their
stdin closes (the demo's and the benchmarks')."""
import json
import subprocess

from .errors import KsmError


def start_workers(commands):
    """Starts every command, then waits for each one's JSON line (kept as `proc.report`)."""
    # cwd "/": started in a source checkout, `-m ksmpreload...` would import the unbuilt package there.
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
               for command in commands]
    for proc in workers:
        line = proc.stdout.readline()
        if not line:
            stop_workers(workers)
            raise KsmError(f"a worker ({' '.join(proc.args[:4])} ...) exited before it was ready")
        proc.report = json.loads(line)
    return workers


def stop_workers(workers):
    for proc in workers:
        if proc.stdin and not proc.stdin.closed:
            proc.stdin.close()
    for proc in workers:
        proc.wait(timeout=30)
