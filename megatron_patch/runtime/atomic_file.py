"""Small files replaced whole: written beside the target under a temporary name, then renamed.

Every record, report and marker the project writes (a checkpoint's tracker and metadata, its
manifest, the metrics summary, a tool's ``--output-json``, a benchmark's JSON) goes through
:func:`write_text` or :func:`write_json`, so a reader sees the old file, or the complete new
one, never a half-written one: the text is written to ``.NAME.PID@HOST.tmp`` in the target's
folder (the same file system, so ``os.replace`` is atomic), flushed to disk, and renamed over
``NAME``, and the folder is flushed too (the rename survives a power loss). A failed write removes
its temporary file. One left by a process killed outright
(kill -9) is removed by the next write of the same file from the same host, once its process
has exited; a temporary file of another host (a shared file system) is never touched.
"""

import errno
import json
import os
import socket
from typing import Any, Callable

TEMPORARY_SUFFIX = ".tmp"


def _temporary_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _process_exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_abandoned(path: str) -> None:
    """Remove the temporary files of earlier writes of ``path`` whose process (on this host) has exited."""
    folder = os.path.dirname(os.path.abspath(path))
    prefix = _temporary_prefix(path)
    host = socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMPORARY_SUFFIX)):
            continue
        pid_text, _, writer_host = name[len(prefix) : -len(TEMPORARY_SUFFIX)].partition("@")
        if writer_host != host or not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        if _process_exited(int(pid_text)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:  # another writer removed it first
                pass


def write_with(path: str, write: Callable[[str], None]) -> None:
    """Replace ``path`` by what ``write(temporary_path)`` writes (for writers that take a file name,
    e.g. a profiler's trace export): absent, the old file or the whole new one, never a part."""
    path = os.fspath(path)
    remove_abandoned(path)
    folder = os.path.dirname(os.path.abspath(path))
    partial = os.path.join(folder, f"{_temporary_prefix(path)}{os.getpid()}@{socket.gethostname()}{TEMPORARY_SUFFIX}")
    try:
        write(partial)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
        sync_folder(folder)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


# what file systems answer that cannot open or flush a folder (network and FUSE ones among them):
# the rename stands, only its flush is not possible there
FOLDER_SYNC_REFUSED = (errno.EINVAL, errno.EBADF, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


def sync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (the names renamed or created in it) to disk, where the file system
    can; one that refuses (:data:`FOLDER_SYNC_REFUSED`) is left as it is, other errors (EIO) raise."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno not in FOLDER_SYNC_REFUSED:
            raise


def write_text(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8): absent, the old file or the whole new one, never a part."""

    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_with(path, write)


def write_json(path: str, payload: Any, *, sort_keys: bool = False) -> None:
    """:func:`write_text` of ``payload`` as indented JSON with a final newline."""
    write_text(path, json.dumps(payload, indent=1, sort_keys=sort_keys) + "\n")
