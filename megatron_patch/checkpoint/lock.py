"""One writer per ``--save`` folder: an exclusive lock that a second trainer fails on at once.

The lock is ``flock`` on ``DIR/.lock`` (rank 0 takes it for the run). The kernel drops it when
the holder, and every process it forked (they share the open file), have exited in any way,
kill -9 included; the trainer's forked helpers (checkpoint writers, data workers) end with it
(``runtime/child_processes.py``), so a stale lock never blocks a resume. The file
records the holder (host, pid, start time) for the message the second writer prints, and is
removed on release. ``flock`` is exclusive between the processes of one machine and, on a shared
file system, as far as that file system implements it (NFSv4 and Lustre mounted with ``flock``
do); across nodes of a file system that does not, the lock only guards the node it runs on.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Optional

from megatron_patch.checkpoint.folders import METADATA
from megatron_patch.errors import CheckpointError
from megatron_patch.runtime.rank_zero import on_rank_zero

LOCK = ".lock"


class SaveDirLock:
    """``with SaveDirLock(root):`` holds the lock on ``root`` (created if missing, as saving would);
    CheckpointError (one line, naming the holder) when another process holds it."""

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LOCK)
        self._fd: Optional[int] = None

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                info = json.load(f)
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def acquire(self) -> "SaveDirLock":
        os.makedirs(self.root, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointError(
                    f"--save {self.root} is in use by another trainer ({self._holder()}; lock "
                    f"{self.path}): wait for it to end, or save to another folder"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released (and removed) the file between our open and flock
                break
            os.close(fd)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still holding it: a waiting opener sees another inode and retries
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "SaveDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def locked_save_folder(save: Optional[str]):
    """Rank 0 holds the lock of the ``--save`` folder ``save`` (None: nothing to lock) for the
    ``with`` block; every rank raises the same one-line error when another trainer holds it, when
    ``save`` cannot be created (a file on its path, no permission) or when it is one checkpoint
    (``iter_N``) rather than a ``--save`` folder. A folder created here and left empty (a failed
    start) is removed."""
    if not save:
        yield
        return
    taken = {}  # rank 0's lock stays in rank 0's process: only the verdict is shared
    on_rank_zero(lambda: taken.update(_lock(save)))
    lock, created = taken.get("lock"), taken.get("created", False)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            if created and not os.listdir(save):
                os.rmdir(save)


def _lock(save: str) -> dict:
    """Take the lock of ``save``: ``{"lock": SaveDirLock, "created": whether save was made here}``."""
    if os.path.isfile(os.path.join(save, METADATA)):
        raise CheckpointError(
            f"--save {save} is one checkpoint (it holds {METADATA}), not a --save folder: pass its parent "
            f"to resume that run, or a new folder"
        )
    created = not os.path.exists(save)
    try:
        return {"lock": SaveDirLock(save).acquire(), "created": created}
    except OSError as error:
        raise CheckpointError(
            f"--save {save} cannot be created or locked ({error.strerror or error}): choose a writable folder"
        ) from None
