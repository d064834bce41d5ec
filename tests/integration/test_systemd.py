"""`ksmpreload systemd UNIT` (issue 16, item 3): the drop-in it writes, checked by Debian's
systemd-analyze verify on a unit made for the test."""

import os
import shutil
import subprocess

import pytest

from conftest import require

UNIT = """\
[Unit]
Description=ksmpreload test service
[Service]
ExecStart=/bin/sleep 1000
"""


def ksmpreload(*args):
    return subprocess.run(["ksmpreload", *args], capture_output=True, text=True, timeout=60)


def verify(unit_dir, unit):
    """systemd-analyze verify, reading units and drop-ins from unit_dir only (and the system's)."""
    require(shutil.which("systemd-analyze"), "systemd-analyze is missing (apt-get install systemd)")
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    return subprocess.run(["systemd-analyze", "verify", unit], cwd=unit_dir, env=env, capture_output=True, text=True)


def systemd_major():
    done = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True)
    return int(done.stdout.split()[1])


def test_the_preload_drop_in_passes_systemd_analyze_verify(tmp_path):
    (tmp_path / "ksmtest.service").write_text(UNIT)
    done = ksmpreload("systemd", "ksmtest", "--strategy", "prctl", "--install", "--unit-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    drop_in = tmp_path / "ksmtest.service.d" / "ksmpreload.conf"
    assert done.stdout.startswith(f"wrote {drop_in}; now: systemctl daemon-reload")
    text = drop_in.read_text()
    assert 'Environment="LD_PRELOAD=/' in text and "libksmpreload.so" in text
    assert 'Environment="KSMPRELOAD_STRATEGY=prctl"' in text
    checked = verify(tmp_path, "ksmtest.service")
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr
    # systemd-analyze would say so for a key it does not know: the check can fail
    drop_in.write_text(text + "NoSuchKey=1\n")
    assert "Unknown key" in verify(tmp_path, "ksmtest.service").stderr


def test_memory_ksm_only_where_systemd_has_a_working_one(tmp_path):
    (tmp_path / "ksmtest.service").write_text(UNIT)
    require(shutil.which("systemd-analyze"), "systemd-analyze is missing (apt-get install systemd)")
    done = ksmpreload("systemd", "ksmtest.service", "--memory-ksm", "--install", "--unit-dir", str(tmp_path))
    if systemd_major() < 256:
        assert done.returncode == 1 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr
        assert "MemoryKSM= works from systemd 256" in done.stderr
        assert not (tmp_path / "ksmtest.service.d").exists()
    else:
        assert done.returncode == 0, done.stderr
        checked = verify(tmp_path, "ksmtest.service")
        assert checked.returncode == 0 and checked.stderr == "", checked.stderr


@pytest.mark.parametrize("bad", ["../etc/passwd", "a b", "x.socket", "", "redis\n[Service]"])
def test_a_bad_unit_name_is_refused_in_one_line(bad):
    done = ksmpreload("systemd", bad)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
