"""The --save folder lock: a second writer fails at once with a line naming the holder; the lock
dies with its holder (kill -9 included) and leaves no file after a release."""

import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_patch.checkpoint.lock import LOCK, SaveDirLock
from megatron_patch.checkpoint.store import CheckpointError

HOLD = """
import sys, time
from megatron_patch.checkpoint.lock import SaveDirLock
with SaveDirLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(root):
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
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
