"""Small files replaced whole (runtime/atomic_file.py): the target is the old file or the complete
new one; a failed write leaves no temporary file; a killed writer's temporary file is removed by
the next write of the same file, and nothing of a live writer, another host or another file."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_patch.runtime import atomic_file


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temporary(folder, name: str, pid: int, host: str = None) -> str:
    path = folder / f".{name}.{pid}@{host or socket.gethostname()}.tmp"
    path.write_text("half")
    return str(path)


def test_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "report.json"
    atomic_file.write_json(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    assert target.read_text().endswith("\n")
    atomic_file.write_text(str(target), "second\n")
    assert target.read_text() == "second\n"
    assert os.listdir(tmp_path) == ["report.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path, monkeypatch):
    target = tmp_path / "tracker.txt"
    target.write_text("7\n")

    def refuse(source, destination):
        raise OSError(28, "No space left on device", destination)

    monkeypatch.setattr(atomic_file.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        atomic_file.write_text(str(target), "8\n")
    assert target.read_text() == "7\n"
    assert os.listdir(tmp_path) == ["tracker.txt"]


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    killed = _temporary(tmp_path, "summary.json", _exited_pid())
    live = _temporary(tmp_path, "summary.json", os.getppid())  # a writer still running
    other_host = _temporary(tmp_path, "summary.json", _exited_pid(), host="another-node")
    other_file = _temporary(tmp_path, "metrics.jsonl", _exited_pid())
    atomic_file.write_json(tmp_path / "summary.json", {"loss": 1.5})
    assert not os.path.exists(killed)
    assert all(os.path.exists(path) for path in (live, other_host, other_file))
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": 1.5}


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.EACCES, errno.EIO])
def test_a_folder_that_cannot_be_flushed_keeps_the_write_unless_the_disk_failed(tmp_path, monkeypatch, refusal):
    """The folder's fsync after the rename: a file system that refuses it (EINVAL, EACCES: network and
    FUSE ones) leaves the written file in place; an I/O error is one."""
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(refusal, os.strerror(refusal))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "record.json"
    if refusal == errno.EIO:
        with pytest.raises(OSError, match=os.strerror(errno.EIO)):
            atomic_file.write_text(str(path), "new\n")
    else:
        atomic_file.write_text(str(path), "new\n")
    assert path.read_text() == "new\n"  # renamed in either case; only its flush failed
