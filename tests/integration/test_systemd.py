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


@pytest.mark.parametrize("threshold", ["8K\nExecStartPre=/bin/true\n#", "banana"])
def test_a_threshold_that_is_no_size_is_refused_and_nothing_is_written(tmp_path, threshold):
    done = ksmpreload("systemd", "ksmtest", "--threshold", threshold, "--install", "--unit-dir", str(tmp_path))
    assert done.returncode == 2 and "is not a size" in done.stderr and not (tmp_path / "ksmtest.service.d").exists()


def test_a_shim_the_loader_cannot_preload_is_refused(tmp_path):
    spaced = tmp_path / "a shim" / "libksmpreload.so"
    spaced.parent.mkdir()
    spaced.write_bytes(b"")
    for shim, says in ((spaced, "LD_PRELOAD cannot carry"), (tmp_path / "missing.so", "the shim is missing")):
        done = subprocess.run(["ksmpreload", "systemd", "ksmtest"], capture_output=True, text=True,
                              env={**os.environ, "KSMPRELOAD_SHIM": str(shim)})  # fmt: skip
        assert done.returncode == 1 and says in done.stderr and done.stdout == "", done.stderr


def test_install_follows_nothing_planted_and_needs_an_existing_directory(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    drop_ins = tmp_path / "ksmtest.service.d"
    drop_ins.mkdir()
    (drop_ins / "ksmpreload.conf.partial").symlink_to(victim)
    assert ksmpreload("systemd", "ksmtest", "--install", "--unit-dir", str(tmp_path)).returncode == 0
    assert victim.read_text() == "secret" and oct(victim.stat().st_mode & 0o777) == "0o600"
    assert not (drop_ins / "ksmpreload.conf").is_symlink()
    assert sorted(path.name for path in drop_ins.iterdir()) == ["ksmpreload.conf", "ksmpreload.conf.partial"]
    done = ksmpreload("systemd", "ksmtest", "--install", "--unit-dir", str(tmp_path / "typo"))
    assert done.returncode == 2 and "does not exist" in done.stderr and not (tmp_path / "typo").exists()
