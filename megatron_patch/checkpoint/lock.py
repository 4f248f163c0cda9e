"""One writer per ``--save`` folder: an exclusive lock that a second trainer fails on (at once on
the same host, after a bounded wait when the holder is another host).

The lock is ``flock`` on ``DIR/.lock`` (rank 0 takes it for the run). The kernel drops it when
the holder, and every process it forked (they share the open file), have exited in any way,
kill -9 included; the trainer's forked helpers (checkpoint writers, data workers) end with it
(``runtime/child_processes.py``), so a stale lock never blocks a resume. The file
records the holder (host, pid, start time) for the message the second writer prints, and is
removed on release. ``flock`` is exclusive between the processes of one machine and, on a shared
file system, as far as that file system implements it (NFSv4 and Lustre mounted with ``flock``
do); across nodes of a file system that does not, the lock only guards the node it runs on. On
one that refuses ``flock`` outright (Lustre mounted ``noflock``, NFS without its lock service) the
run goes on unguarded, with a warning.

A node that fails outright (a crash, a power loss) cannot release its lock: the file system keeps
it until the node's lease runs out (about 90 s on NFSv4, the client's eviction on Lustre), and a
job requeued at once onto other nodes would find it held. So a lock whose recorded holder is on
another host (or unknown) is waited for, up to ``wait_seconds`` (the trainer's
``--save-lock-wait``, 300 s by default), before the run is refused; a holder on this host is a
live process (the kernel drops a dead one's lock) and is refused at once. A stop signal or the
time limit that comes during the wait ends it at once (the scheduler's grace period is shorter than
the wait), with the same one-line refusal naming what stopped it.

Every rank writes its shards into ``--save``, but only rank 0 creates and locks it; so, once the
lock is held, :func:`locked_save_folder` checks that every rank sees the same folder (a node-local
disk or a missing mount on one node would otherwise fail the first save, hours later): rank 0
writes a new file there, every rank reads it back, and a rank that does not see it stops the run
at once, on every rank, with a line naming that rank and its host.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from typing import Callable, Optional

import torch.distributed as dist

from megatron_patch.checkpoint.folders import METADATA
from megatron_patch.errors import CheckpointError
from megatron_patch.runtime.rank_zero import on_rank_zero

logger = logging.getLogger(__name__)

LOCK = ".lock"
PROBE = ".same-folder-"  # + a new random name per run: the file every rank reads back at start-up
RETRY_S = 5.0  # between two tries while the holder is another host
STOP_POLL_S = 0.25  # how often a stop is looked for during that pause
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)  # the file system has no flock


class SaveDirLock:
    """``with SaveDirLock(root):`` holds the lock on ``root`` (created if missing, as saving would);
    CheckpointError (one line, naming the holder) when another process holds it: at once when the
    holder is on this host, after ``wait_seconds`` of tries when it is on another (or unknown), or
    as soon as ``stop_reason`` (the trainer's :meth:`StopSignals.reason`) names a reason to stop."""

    def __init__(self, root: str, wait_seconds: float = 0.0, stop_reason: Callable[[], Optional[str]] = lambda: None):
        self.root = root
        self.path = os.path.join(root, LOCK)
        self.wait_seconds = wait_seconds
        self.stop_reason = stop_reason
        self._fd: Optional[int] = None

    def _holder(self) -> Optional[dict]:
        """The holder's record (host, pid, since), or None when it cannot be read."""
        try:
            with open(self.path) as f:
                info = json.load(f)
            return {key: info[key] for key in ("host", "pid", "since")}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def acquire(self) -> "SaveDirLock":
        os.makedirs(self.root, exist_ok=True)
        try:
            fd = self._try_lock()
        except OSError as error:
            if error.errno not in NO_FLOCK:
                raise
            logger.warning(
                "--save %s: its file system does not lock files (flock: %s), so nothing stops a second trainer "
                "from writing into it: run one trainer per --save folder",
                self.root,
                error.strerror or error,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return self
        if fd is None:
            fd = self._wait_for_lock()
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime()),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        return self

    def _wait_for_lock(self) -> int:
        """Try again every :data:`RETRY_S` while the holder is another host, up to ``wait_seconds``
        or a stop: the locked descriptor, or the one-line CheckpointError naming the holder."""
        started = report_at = time.monotonic()
        while True:
            holder = self._holder()
            described = f"host {holder['host']}, pid {holder['pid']}" if holder else "holder unknown"
            waited = time.monotonic() - started
            stopped = self.stop_reason()
            if (
                (holder is not None and holder["host"] == socket.gethostname())
                or waited >= self.wait_seconds
                or stopped
            ):
                since = f", since {holder['since']}" if holder else ""
                after = f"; waited {waited:.0f} s" if waited >= 1 else ""
                after += f", then {stopped} stopped the wait" if stopped else ""
                raise CheckpointError(
                    f"--save {self.root} is in use by another trainer ({described}{since}; lock {self.path}{after}): "
                    f"wait for it to end, or save to another folder"
                ) from None
            if time.monotonic() >= report_at:  # at the first try, then once a minute
                logger.warning(
                    "--save %s is locked by %s: waiting up to %.0f s (--save-lock-wait), as a node that failed "
                    "keeps its lock until the file system's lease on it runs out",
                    self.root,
                    described,
                    self.wait_seconds,
                )
                report_at += 60.0
            self._pause(min(RETRY_S, self.wait_seconds - waited))
            if (fd := self._try_lock()) is not None:
                return fd

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less once a stop is asked for."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0 and not self.stop_reason():
            time.sleep(min(STOP_POLL_S, left))

    def _try_lock(self) -> Optional[int]:
        """The open, locked lock file's descriptor, or None when another process holds the lock."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError:  # no flock on this file system (NO_FLOCK), or another failure
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released (and removed) the file between our open and flock
                return fd
            os.close(fd)

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
def locked_save_folder(
    save: Optional[str], wait_seconds: float = 0.0, stop_reason: Callable[[], Optional[str]] = lambda: None
):
    """Rank 0 holds the lock of the ``--save`` folder ``save`` (None: nothing to lock) for the
    ``with`` block; every rank raises the same one-line error when another trainer holds it (one on
    another host after ``wait_seconds`` of tries, or when rank 0's ``stop_reason`` names a stop
    first: :class:`SaveDirLock`), when
    ``save`` cannot be created (a file on its path, no permission) or when it is one checkpoint
    (``iter_N``) rather than a ``--save`` folder, and when a rank does not see the folder rank 0
    locked (:func:`_check_same_folder`). A folder created here and left empty (a failed start) is
    removed."""
    if not save:
        yield
        return
    taken = {}  # rank 0's lock stays in rank 0's process: only the verdict is shared
    on_rank_zero(lambda: taken.update(_lock(save, wait_seconds, stop_reason)))
    lock, created = taken.get("lock"), taken.get("created", False)
    try:
        _check_same_folder(save)
        yield
    finally:
        if lock is not None:
            lock.release()
            if created and not os.listdir(save):
                os.rmdir(save)


def _lock(save: str, wait_seconds: float, stop_reason: Callable[[], Optional[str]]) -> dict:
    """Take the lock of ``save``: ``{"lock": SaveDirLock, "created": whether save was made here}``."""
    if os.path.isfile(os.path.join(save, METADATA)):
        raise CheckpointError(
            f"--save {save} is one checkpoint (it holds {METADATA}), not a --save folder: pass its parent "
            f"to resume that run, or a new folder"
        )
    created = not os.path.exists(save)
    try:
        return {"lock": SaveDirLock(save, wait_seconds, stop_reason).acquire(), "created": created}
    except OSError as error:
        raise CheckpointError(
            f"--save {save} cannot be created or locked ({error.strerror or error}): choose a writable folder"
        ) from None


def _check_same_folder(save: str) -> None:
    """Collective (nothing in a world of one): the same one-line CheckpointError on every rank when
    a rank does not see, in its ``save``, the file rank 0 has just written into its own; the file is
    removed again. What makes a shared file system show it at once: the name is new (random), so no
    client holds a cached "no such file" for it (nor for ``save`` itself, which no other rank has
    looked up before: rank 0 takes the start-up decisions about it); rank 0 flushes and closes the
    file before it names it to the others; and NFS is close-to-open consistent (a reader's open asks
    the server), Lustre and GPFS coherent."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    root, name = on_rank_zero(lambda: (save, _write_probe(save)))
    try:
        try:
            with open(os.path.join(save, name), "rb") as f:
                sees = f.read() == name.encode()
        except OSError:  # missing (another folder), or not readable: not the folder rank 0 wrote
            sees = False
        views = [None] * dist.get_world_size()
        dist.all_gather_object(views, (sees, socket.gethostname()))  # every rank has read once it returns
    finally:
        if dist.get_rank() == 0:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(save, name))
    blind = next((rank for rank, (seen, _) in enumerate(views) if not seen), None)
    if blind is not None:
        raise CheckpointError(
            f"--save {root} is not the same folder on rank {blind} (host {views[blind][1]}) as on rank 0 "
            f"({views[0][1]}): put --save on a file system every node shares"
        )


def _write_probe(save: str) -> str:
    """Rank 0: write a new file into ``save`` (its content is its name), flushed to the file system; its name."""
    name = PROBE + secrets.token_hex(8)
    path = os.path.join(save, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, name.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise CheckpointError(
            f"--save {save} cannot be written ({error.strerror or error}): choose a writable folder"
        ) from None
    return name
