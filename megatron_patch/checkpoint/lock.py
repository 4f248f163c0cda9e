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

import torch.distributed as dist

from megatron_patch.errors import CheckpointError

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
    ``with`` block; every rank raises the same one-line error when another trainer holds it. A
    folder created here and left empty (a failed start) is removed."""
    lock, created, refusal = None, False, [None]
    if save and dist.get_rank() == 0:
        created = not os.path.exists(save)
        try:
            lock = SaveDirLock(save).acquire()
        except CheckpointError as error:
            refusal[0] = str(error)
    if save and dist.get_world_size() > 1:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise CheckpointError(refusal[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
            if created and not os.listdir(save):
                os.rmdir(save)
