"""The README's install, on the system's own Python (issue 17): Debian 12 refuses `pip install`
into it (PEP 668), so the README installs into a virtual environment; done here with
/usr/bin/python3 from a copy of the repository, the commands work from there."""

import os
import re
import shutil
import subprocess

from conftest import REPO, require

SYSTEM_PYTHON = "/usr/bin/python3"


def readme_command(heading):
    """The command under a heading of the README (its first indented line)."""
    with open(os.path.join(REPO, "README.md")) as readme:
        text = readme.read()
    section = text[text.index(heading) :]
    return re.search(r"^    (\S.*)$", section, re.M).group(1)


def test_the_ci_runs_the_readmes_test_command():
    with open(os.path.join(REPO, ".ci", "run")) as run:
        assert run.read().rstrip().splitlines()[-1] == readme_command("## Run the tests")


def test_the_readmes_install_works_on_debians_own_python(tmp_path):
    require(os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} is missing")
    command = readme_command("## Try it")
    assert "-m venv /opt/ksmpreload" in command and "/opt/ksmpreload/bin/pip install ." in command
    stdlib = subprocess.run([SYSTEM_PYTHON, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    require(os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED")),
            f"{SYSTEM_PYTHON} is not marked externally managed (PEP 668): not a stock Debian 12 Python")  # fmt: skip
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "*.so"))
    venv = tmp_path / "venv"
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "."], cwd=source, capture_output=True,
                               text=True, timeout=600)  # fmt: skip
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    status = subprocess.run([str(venv / "bin" / "ksmpreload"), "status", "--json"], capture_output=True, text=True)
    assert status.returncode == 0 and '"ksm"' in status.stdout, status.stderr
    wrapped = subprocess.run([str(venv / "bin" / "ksm-wrap"), "--quiet", "true"], capture_output=True, text=True)
    assert wrapped.returncode == 0, wrapped.stderr
