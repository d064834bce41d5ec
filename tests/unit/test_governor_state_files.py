"""The governor's files in /run when /run cannot take them: one clear error, no half file left."""

import errno
import json
import os

import pytest

from ksmpreload import governor
from ksmpreload.errors import KsmError


def test_a_full_disk_leaves_no_half_state_file(tmp_path, monkeypatch):
    monkeypatch.setattr(governor, "STATE_FILE", str(tmp_path / "governor.json"))

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(KsmError, match=r"cannot write .*governor.json: No space left on device"):
        governor.write_state({"pid": 1})
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(governor, "STATE_FILE", str(tmp_path / "gone" / "governor.json"))
    with pytest.raises(KsmError, match=r"cannot write .*gone/governor.json: No such file or directory"):
        governor.write_state({"pid": 1})


def test_a_lock_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(governor, "STATE_DIR", str(tmp_path / "file"))
    monkeypatch.setattr(governor, "LOCK_FILE", str(tmp_path / "file" / "governor.lock"))
    with pytest.raises(KsmError, match="cannot open the governor's lock"):
        governor._lock()


def test_a_write_that_cannot_be_recorded_first_is_not_made_nor_remembered(monkeypatch):
    knobs = {"pages_to_scan": 100}
    monkeypatch.setattr(governor.kernel, "read_knob", lambda name: knobs[name])
    monkeypatch.setattr(governor.kernel, "write_knob", lambda name, value: knobs.__setitem__(name, value))

    def full(*_):
        raise KsmError("cannot write /run/ksmpreload/governor-originals.json: No space left on device")

    keeper = governor.Governor(governor.Settings())
    keeper._write("pages_to_scan", 545)
    monkeypatch.setattr(governor, "_save_originals", full)
    with pytest.raises(KsmError):
        keeper._write("pages_to_scan", 800)
    assert knobs["pages_to_scan"] == 545 and keeper.written == {"pages_to_scan": 545}
    keeper.restore()
    assert knobs["pages_to_scan"] == 100, "what it did write is put back"


@pytest.mark.parametrize("kind", ["symlink", "not root's", "nested too deep"])
def test_left_over_originals_that_a_governor_did_not_write_are_dropped_unapplied(tmp_path, monkeypatch, kind):
    originals = tmp_path / "governor-originals.json"
    good = json.dumps({"original": {"pages_to_scan": 100}, "written": {"pages_to_scan": 545}})
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text(good)
        originals.symlink_to(tmp_path / "elsewhere")
    elif kind == "not root's":
        originals.write_text(good)
        os.chown(originals, 65534, 65534)
    else:
        originals.write_text("[" * 100_000 + "]" * 100_000)
    monkeypatch.setattr(governor, "ORIGINALS_FILE", str(originals))
    applied = []
    monkeypatch.setattr(governor, "_restore", lambda *args: applied.append(args))
    governor.restore_left_over()
    assert applied == [] and not os.path.lexists(originals)


def test_without_access_to_the_lock_whether_one_runs_is_not_known(monkeypatch):
    def refused(*_):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(governor.os, "open", refused)
    assert not governor.state_known()
