"""Temporary folders that say whether their owner is alive, so that a later run can remove the
leftovers of a killed one without touching a live one's.

A tool stages its outputs in a hidden sibling folder (``.preprocess-XXXX.tmp``,
``.NAME.partial-XXXX``) and renames them into place when complete; kill -9 leaves that folder
behind. Each such folder holds ``.owner``, a file its creator keeps ``flock``-ed for as long as it
works in it. The kernel drops the lock when the creator exits in any way, so a folder whose
``.owner`` can be locked by someone else is abandoned: :func:`remove_abandoned`, called by the next
run that finishes, deletes it. A folder without ``.owner`` (one staged by an older version, or one
whose creator died between creating the folder and the file) is never judged and stays.

``flock`` guards processes of one machine and, on a shared file system, as far as that file
system implements it (NFSv4 and Lustre mounted with ``flock`` do).
"""

import fcntl
import logging
import os
import shutil
import socket
import tempfile
from typing import List, Optional

logger = logging.getLogger(__name__)

OWNER = ".owner"


class OwnedTempDir:
    """``tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)`` whose ``.owner`` this process
    holds locked until :meth:`release` (or its exit). Raises OSError as mkdtemp does."""

    def __init__(self, parent: str, prefix: str, suffix: str = "") -> None:
        self._fd: Optional[int] = None
        while self._fd is None:
            self.path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
            try:
                fd = os.open(os.path.join(self.path, OWNER), os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a cleaner judged the empty folder abandoned and removed it
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # removed by a cleaner between our open and flock
                os.close(fd)
                continue
            os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
            self._fd = fd

    def forget_owner(self) -> None:
        """Delete ``.owner`` (keeping the lock) before the folder itself becomes an output."""
        try:
            os.remove(os.path.join(self.path, OWNER))
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Drop the lock; the folder, if it still exists, is then judged abandoned."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_abandoned(parent: str, prefix: str, suffix: str = "") -> List[str]:
    """Delete the folders ``parent/prefix*suffix`` whose owner has exited; returns their paths.

    A folder whose ``.owner`` is missing, or locked by a live process, is left alone. Failures to
    delete are logged, never raised: cleaning up after another run must not fail this one.
    """
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in sorted(names):
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(os.path.join(path, OWNER), os.O_RDONLY)
        except OSError:  # not a folder, no owner file, or gone meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its owner is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(path)  # while holding the lock: a creator racing us sees its file unlinked
            removed.append(path)
            logger.info("removed %s, left behind by an earlier run that was killed", path)
        except OSError as error:
            logger.warning("could not remove %s, left behind by an earlier run: %s", path, error)
        finally:
            os.close(fd)
    return removed
