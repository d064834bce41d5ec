"""Usage errors of the workload options: one line, exit status 2, before anything starts."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "arguments, says",
    [
        (["compare", "--workload", "redis", "--", "true"], "give either COMMAND or --workload NAME"),
        (["compare"], "give either COMMAND or --workload NAME"),
        (["compare", "--workload", "nginx"], "'nginx' is not one of"),
        (["demo", "--workload", "redis", "--size", "huge"], "'huge' is not one of"),
        (["demo", "--workload", "redis", "--workers", "3"], "--workers is for the demo's own workers"),
        (["demo", "--size", "full"], "--size only with --workload"),
        (["compare", "--processes", "2", "--", "true"], "--processes only with --workload"),
        (["demo", "--workload", "stress-ng", "--processes", "3"], "--processes does not apply"),
        (["demo", "--workload", "redis", "--method", "flip"], "--method is for the stress-ng workload"),
        (["demo", "--workload", "redis", "--markdown", "/nonexistent/x.md"], "no directory /nonexistent"),
        (["compare", "--plot", "/", "--", "true"], "'/' is a directory"),
    ],
)
def test_compare_and_demo_reject_bad_workload_options(arguments, says):
    done = subprocess.run(["ksmpreload", *arguments], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and says in done.stderr, done.stderr
    assert done.stdout == ""


def test_serving_an_unknown_workload_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "ksmpreload.workloads", "serve", "nginx"], capture_output=True, text=True, cwd="/"
    )
    assert done.returncode == 2 and "'nginx' is not one of" in done.stderr and done.stderr.count("\n") == 1
