"""Atomic writes: the previous version survives a full disk or a failing writer; no temporary is left."""
from __future__ import annotations

import errno
import os

import pytest

from workbench.files import DiskFullError, atomic_path, write_atomic


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_atomic_replaces_and_keeps_permissions(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "one")
    os.chmod(target, 0o640)
    write_atomic(target, b"two")
    assert target.read_text() == "two"
    assert target.stat().st_mode & 0o777 == 0o640
    assert _leftovers(tmp_path) == []


def test_full_disk_keeps_previous_version_and_says_so(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_atomic(target, '{"old": true}')
    real_write = os.write

    def full(fd, data):  # the first write of the new version hits a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError, match="No space left on device") as caught:
        with atomic_path(target) as temporary:
            handle = os.open(temporary, os.O_WRONLY)
            monkeypatch.setattr(os, "write", full)
            try:
                os.write(handle, b"new")
            finally:
                monkeypatch.setattr(os, "write", real_write)
                os.close(handle)
    assert str(target) in str(caught.value)
    assert target.read_text() == '{"old": true}'
    assert _leftovers(tmp_path) == []


def test_failing_writer_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "previous"
    assert _leftovers(tmp_path) == []


def test_folder_target_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        write_atomic(tmp_path, "x")
