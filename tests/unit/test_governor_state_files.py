"""The governor's files in /run when /run cannot take them: one clear error, no half file left."""

import errno
import json

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
