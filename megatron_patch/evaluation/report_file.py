"""The report file an evaluation tool writes (``--output-json``), checked before any work: a file
in an existing folder that replaces nothing the tool reads; written whole or not at all."""

import os
from typing import Iterable, List, Tuple

from megatron_patch.checkpoint import folders
from megatron_patch.errors import ArgumentError, DataError
from megatron_patch.runtime import atomic_file


def checkpoint_folders(load: str) -> List[Tuple[str, str]]:
    """The folders ``--load load`` reads, as ``(flag, path)`` pairs for :func:`check_report_path`:
    the folder named, the checkpoint it resolves to, and the ``--save`` root that checkpoint is in
    (its tracker beside it), whose files the tool's report must not replace either."""
    checkpoint = folders.resolve_checkpoint(load)
    root = os.path.dirname(checkpoint)
    found = [("--load", load), ("--load", checkpoint)]
    return found + ([("--load", root)] if os.path.isfile(os.path.join(root, folders.TRACKER)) else [])


def check_report_path(
    path: str, read_folders: Iterable[Tuple[str, str]] = (), read_files: Iterable[Tuple[str, str]] = ()
) -> None:
    """ArgumentError unless ``--output-json path`` can be written: its folder exists, it is not a
    folder, it is not inside a folder the tool reads and it is not a file the tool reads (each a
    ``(flag, path)`` pair: ``("--load", "runs/final")``), compared by real path (symlinks followed)."""
    flag = "--output-json"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ArgumentError(f"{flag} {path}: its folder does not exist; create it first")
    if os.path.isdir(path):
        raise ArgumentError(f"{flag} {path} is a folder: name the report file to write")
    real = os.path.realpath(path)
    for source_flag, folder in read_folders:
        if real.startswith(os.path.realpath(folder) + os.sep):
            raise ArgumentError(
                f"{flag} {path} is inside {source_flag} {folder}, which this tool reads: write the report outside it"
            )
    for source_flag, file in read_files:
        if real == os.path.realpath(file):
            raise ArgumentError(
                f"{flag} {path} is {source_flag} {file}, which this tool reads: name another file for the report"
            )


def write_report(path: str, report: dict) -> None:
    """Write ``report`` to ``--output-json path`` as JSON, atomically (a temporary name renamed when
    complete: a failed write leaves the old file or none, never a part). A failed write (a full
    disk, a file-size limit, no permission) raises DataError naming the file."""
    try:
        atomic_file.write_json(path, report)
    except OSError as error:
        raise DataError(
            f"--output-json {path} could not be written ({error.strerror or error}); check the free space, "
            f"file-size limit (ulimit -f) and permissions of its folder, or name another file"
        ) from None
