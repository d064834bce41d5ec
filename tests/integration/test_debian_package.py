"""The Debian package (issue 17): built from the repository with dpkg-buildpackage, lintian
finds no error, dpkg -i installs it, and ksm-wrap and ksmpreload from /usr/bin make two
processes of Debian's own python3 merge; its man pages, completion and the exporter's unit
come from the installed commands. Installing changes the system, so these run where CI=true
(or KSMPRELOAD_TEST_DEB=1), and the package is purged afterwards."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import IN_CI, REPO, require, require_root_ksm
from ksmpreload import kernel, scanning
from ksmpreload.processes import merged_pages

UNIT = "/lib/systemd/system/ksmpreload-exporter.service"
GOVERNOR_UNIT = "/lib/systemd/system/ksmpreload-governor.service"
HOLDER = """
import random, sys
data = [random.Random(7).randbytes(64 << 10) for _ in range(256)]  # 16 MiB in 64 KiB blocks
print("ready", flush=True)
sys.stdin.read()
"""


def clean_env(home):
    """A package build's environment: the system's own tools, not this interpreter's."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LC_ALL": "C.UTF-8"}


def source_files():
    """The repository's files as a clean clone has them."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()  # fmt: skip
    return [path for path in listed if os.path.isfile(os.path.join(REPO, path))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    require(shutil.which("dpkg-buildpackage") and shutil.which("lintian"),
            "dpkg-buildpackage or lintian is missing (the README's apt-get line installs them)")  # fmt: skip
    root = tmp_path_factory.mktemp("deb")
    for path in source_files():
        os.makedirs(os.path.dirname(root / "src" / path), exist_ok=True)
        shutil.copy2(os.path.join(REPO, path), root / "src" / path)
    done = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=root / "src", env=clean_env(root),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (deb,) = [path for path in glob.glob(str(root / "ksmpreload_*.deb"))]
    return root, deb


@pytest.fixture(scope="module")
def installed(built):
    require_root_ksm()
    require(IN_CI or os.environ.get("KSMPRELOAD_TEST_DEB") == "1",
            "installs a package: runs where CI=true or KSMPRELOAD_TEST_DEB=1")  # fmt: skip
    was = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "ksmpreload"], capture_output=True, text=True)
    require("installed" not in was.stdout.split(), "a ksmpreload package is installed here already")
    done = subprocess.run(["dpkg", "-i", built[1]], capture_output=True, text=True, timeout=300)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        yield
    finally:
        subprocess.run(["dpkg", "--purge", "ksmpreload"], capture_output=True, timeout=300)


def test_lintian_finds_no_error(built):
    root, _ = built
    (changes,) = glob.glob(str(root / "ksmpreload_*.changes"))
    done = subprocess.run(["lintian", "--fail-on", "error", changes], env=clean_env(root), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0 and not re.search(r"^E: ", done.stdout, re.M), done.stdout + done.stderr


def test_the_installed_commands_make_debian_python_merge(installed):
    holders = [subprocess.Popen(["/usr/bin/ksm-wrap", "/usr/bin/python3", "-c", HOLDER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
    try:
        pids = [holder.pid for holder in holders]
        for holder in holders:
            assert holder.stdout.readline() == "ready\n"
        shim = f"/usr/lib/{sys.implementation._multiarch}/ksmpreload/libksmpreload.so"
        assert all(shim in kernel.process_maps_text(pid) for pid in pids), "the package's shim is loaded"
        with scanning.fast_scanning():
            merged = scanning.wait_until_settled(lambda: merged_pages(pids), timeout=60)
        assert merged >= 0.9 * 2 * 4096, merged  # all but one copy of the 16 MiB, aligned by the shim
        status = subprocess.run(["/usr/bin/ksmpreload", "status", "--json"], capture_output=True, text=True)
        assert status.returncode == 0 and set(pids) <= {p["pid"] for p in json.loads(status.stdout)["processes"]}
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def test_man_pages_and_completion_come_from_the_installed_commands(installed):
    from ksmpreload.cli import group

    for name, command in group.commands.items():
        page = subprocess.run(["zcat", f"/usr/share/man/man1/ksmpreload-{name}.1.gz"], capture_output=True, text=True)
        text = " ".join(page.stdout.replace("\\", "").split())  # roff escapes and line breaks away
        first_words = " ".join(command.help.split("\n")[0].split()[:5])
        assert page.returncode == 0 and first_words in text, (name, first_words)
    assert os.path.exists("/usr/share/man/man1/ksm-wrap.1.gz")
    script = (
        "source /usr/share/bash-completion/completions/ksmpreload; COMP_WORDS=(ksmpreload sta); COMP_CWORD=1; "
        '_ksmpreload_completion ksmpreload; echo "${COMPREPLY[@]}"'
    )
    completed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean_env("/tmp"))
    assert "status" in completed.stdout.split(), completed.stdout + completed.stderr
    assert os.path.exists("/usr/share/zsh/vendor-completions/_ksmpreload")


def unit_capabilities(path=UNIT):
    """A unit's CapabilityBoundingSet, as setpriv's --bounding-set takes it."""
    with open(path) as unit:
        (line,) = [line for line in unit if line.startswith("CapabilityBoundingSet=")]
    return ",".join("+" + cap.lower().removeprefix("cap_") for cap in line.split("=", 1)[1].split())


def exporter_sees(pid, capabilities):
    """Whether `ksmpreload exporter --once`, run as root with only `capabilities`, shows `pid`."""
    done = subprocess.run(["setpriv", "--bounding-set", f"-all{capabilities}", "--no-new-privs",
                           "/usr/bin/ksmpreload", "exporter", "--once"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return re.search(rf'^ksmpreload_process_ksm_merging_pages{{[^}}]*pid="{pid}"', done.stdout, re.M) is not None


def test_the_exporter_unit_verifies_and_its_capabilities_are_enough(installed):
    require(shutil.which("systemd-analyze") and shutil.which("setpriv"), "systemd-analyze or setpriv is missing")
    for unit in (UNIT, GOVERNOR_UNIT):
        verified = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True)
        assert verified.returncode == 0 and not verified.stderr.strip(), (unit, verified.stderr)
    other_user = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "/usr/bin/python3", "-c",
                  "import ctypes, sys; ctypes.CDLL(None).prctl(67, 1, 0, 0, 0); data = bytes(8 << 20); "
                  "print('ready', flush=True); sys.stdin.read()"]  # fmt: skip
    holder = subprocess.Popen(other_user, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "ready\n"
        assert exporter_sees(holder.pid, "," + unit_capabilities())
        assert not exporter_sees(holder.pid, ""), "without them another user's process is out of reach"
    finally:
        holder.kill()
        holder.wait()


def test_the_governor_runs_with_its_units_capabilities(installed):
    """The installed governor, with only the governor unit's capabilities: it sets the knobs
    (KSM on for a process that merges as a whole), and SIGTERM puts them back (exit 143, which
    the unit counts as success)."""
    before = {name: kernel.read_knob(name) for name in ("run", "pages_to_scan", "sleep_millisecs")}
    drop = ["setpriv", "--bounding-set", f"-all,{unit_capabilities(GOVERNOR_UNIT)}", "--no-new-privs"]
    holder = subprocess.Popen(["/usr/bin/python3", "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(67, 1, 0, 0, 0); "
                               "data = bytes(range(256)) * 65536; print('ready', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    governor = None
    try:
        assert holder.stdout.readline() == "ready\n"
        governor = subprocess.Popen([*drop, "/usr/bin/ksmpreload", "governor", "--tick", "0.5"],
                                    stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while kernel.read_knob("run") != 1:
            assert governor.poll() is None and time.monotonic() < deadline, governor.stderr.read()
            time.sleep(0.1)
        governor.send_signal(signal.SIGTERM)
        assert governor.wait(timeout=30) == 143
        assert "SuccessExitStatus=143" in open(GOVERNOR_UNIT).read()
        assert {name: kernel.read_knob(name) for name in before} == before
    finally:
        for proc in (holder, governor):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for name, value in before.items():
            if kernel.read_knob(name) != value:
                kernel.write_knob(name, value)
