"""The Python code passes ruff's lint and is in ruff's format (pyproject.toml, [tool.ruff]):
`ruff check` and `ruff format` from the repository root fix most of what this reports."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = ["."]  # the whole repository (pyproject.toml says what ruff leaves out)


def ruff(*args):
    if not importlib.util.find_spec("ruff") and os.environ.get("CI") != "true":
        pytest.skip("ruff is not installed (pip install '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, *CODE], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_python_passes_lint():
    result = ruff("check", "--no-cache", "--output-format", "concise")
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_is_formatted():
    result = ruff("format", "--no-cache", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def c_sources():
    listed = subprocess.run(
        ["git", "ls-files", "shim/*.c", "shim/*.h", "python/*.c", "tests/c/*.c", "tests/c/*.h"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed, "no C sources found: not a git checkout?"
    return listed


def test_c_is_formatted():
    """clang-format (Debian's clang-format 14, .clang-format at the root): `clang-format -i FILE` mends it."""
    if not shutil.which("clang-format") and os.environ.get("CI") != "true":
        pytest.skip("clang-format is not installed (apt-get install clang-format)")
    result = subprocess.run(
        ["clang-format", "--dry-run", "--Werror", *c_sources()], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
