"""The --save folder lock: a second writer on the same host fails at once with a line naming the
holder; one whose holder is on another host (a failed node's lock, held until the file system's
lease runs out) waits up to --save-lock-wait, then runs or fails; the lock dies with its holder
(kill -9 included) and leaves no file after a release."""

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from megatron_patch.checkpoint import folders
from megatron_patch.checkpoint.lock import LOCK, SaveDirLock
from megatron_patch.checkpoint.store import CheckpointError
from tests.training.common import refused_line, trainer_args

HOLD = """
import json, os, sys, time
from megatron_patch.checkpoint.lock import SaveDirLock
with SaveDirLock(sys.argv[1]) as lock:
    if sys.argv[2]:  # record another host as the holder, as a node of a shared file system would
        os.ftruncate(lock._fd, 0)
        os.pwrite(lock._fd, json.dumps({"host": sys.argv[2], "pid": 4242, "since": "earlier"}).encode(), 0)
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def _holder(root, host="", seconds=120):
    """A process holding the lock of ``root`` for ``seconds``, recorded as on ``host`` (this host when empty)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), host, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def test_second_writer_fails_naming_the_holder(tmp_path):
    root = tmp_path / "save"
    holder = _holder(root)
    try:
        with pytest.raises(CheckpointError) as error:
            SaveDirLock(str(root)).acquire()
        message = str(error.value)
        assert "\n" not in message and f"--save {root} is in use by another trainer" in message
        assert f"pid {holder.pid}" in message and "save to another folder" in message
        assert json.loads((root / LOCK).read_text())["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with SaveDirLock(str(root)) as lock:  # the kernel dropped the killed holder's lock
        assert json.loads((root / LOCK).read_text())["pid"] == os.getpid()
        lock.release()
    assert not (root / LOCK).exists()


def test_released_lock_can_be_taken_again_in_process(tmp_path):
    for _ in range(2):
        with SaveDirLock(str(tmp_path)):
            with pytest.raises(CheckpointError, match="in use by another trainer"):
                SaveDirLock(str(tmp_path)).acquire()  # flock is per open file: also within one process
        assert os.listdir(tmp_path) == []


def test_a_lock_held_by_another_host_is_waited_for_then_refused(tmp_path):
    root = tmp_path / "save"
    holder = _holder(root, host="node-17")
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointError) as error:
            SaveDirLock(str(root), wait_seconds=2).acquire()
        assert time.monotonic() - started >= 2
        message = str(error.value)
        assert "(host node-17, pid 4242, since earlier;" in message and "; waited 2 s)" in message, message
    finally:
        holder.kill()
        holder.wait()


def test_the_trainer_waits_for_a_lock_another_host_releases(cpu_world, tiny_corpus, tmp_path, caplog):
    """The requeued job's trainer meets the failed node's lock, waits, and trains once it is released."""
    from megatron_patch.training import cli

    save = tmp_path / "save"
    holder = _holder(save, host="node-17", seconds=3)
    try:
        args = trainer_args(tiny_corpus, save, "--eval-iters", "0", "--save-lock-wait", "60", train_iters=2)
        assert cli.main(args) == 0
    finally:
        holder.kill()
        holder.wait()
    assert "is locked by host node-17, pid 4242: waiting up to 60 s (--save-lock-wait)" in caplog.text
    assert folders.tracker_value(str(save)) == 2


def test_the_trainer_refuses_a_lock_of_another_host_after_its_wait(cpu_world, tiny_corpus, tmp_path, capsys):
    save = tmp_path / "save"
    holder = _holder(save, host="node-17")
    try:
        line = refused_line(capsys, trainer_args(tiny_corpus, save, "--save-lock-wait", "1", train_iters=2))
    finally:
        holder.kill()
        holder.wait()
    assert f"--save {save} is in use by another trainer (host node-17" in line and "waited 1 s" in line, line


def test_a_stop_signal_ends_the_wait_for_a_lock(cpu_world, tiny_corpus, tmp_path, capsys):
    """A job cancelled while it waits for a failed node's lock ends within the scheduler's grace
    period, with the refusal naming the signal, instead of waiting out --save-lock-wait."""
    save = tmp_path / "save"
    holder = _holder(save, host="node-17")
    signal_soon = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        started = time.monotonic()
        signal_soon.start()
        line = refused_line(capsys, trainer_args(tiny_corpus, save, "--save-lock-wait", "120", train_iters=2))
        waited = time.monotonic() - started
    finally:
        signal_soon.cancel()
        holder.kill()
        holder.wait()
    assert "(host node-17, pid 4242, since earlier;" in line and "then SIGTERM stopped the wait" in line, line
    assert waited < 60, waited
    assert folders.tracker_value(str(save)) is None


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_negative_lock_wait_is_refused(cpu_world, tiny_corpus, tmp_path, capsys, value):
    line = refused_line(capsys, trainer_args(tiny_corpus, tmp_path / "save", "--save-lock-wait", value))
    assert line == f"error: --save-lock-wait {float(value)} must be a number of seconds >= 0", line


def test_a_file_system_without_flock_trains_unguarded_with_a_warning(
    cpu_world, tiny_corpus, tmp_path, caplog, monkeypatch
):
    """Lustre mounted noflock, NFS without its lock service: flock fails with ENOLCK or ENOSYS,
    which is no reason to refuse the run; it goes on with a warning and leaves no lock file."""
    from megatron_patch.checkpoint import lock
    from megatron_patch.training import cli

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock.fcntl, "flock", no_flock)
    save = tmp_path / "save"
    assert cli.main(trainer_args(tiny_corpus, save, "--eval-iters", "0", train_iters=2)) == 0
    assert f"--save {save}: its file system does not lock files (flock: No locks available)" in caplog.text
    assert folders.tracker_value(str(save)) == 2 and not (save / LOCK).exists()
