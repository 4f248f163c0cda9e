"""Atomic outputs for the data tools: write under temporary names, rename when complete.

A tool writes every output file into a hidden temporary folder inside the output folder (same
file system, so the final ``os.replace`` is atomic per file) and moves them into place only after
all of them are complete. On any failure, including Ctrl-C, the temporary folder is removed and
no output that looks complete is left behind; the temporary folder of a run killed outright (kill
-9) is removed by the next run of the same tool that completes
(:mod:`~megatron_patch.runtime.owned_temp`).

A tool that must not replace an existing output unasked checks its final paths with
:func:`check_outputs` before any work and passes ``force`` on to :class:`StagedOutputs`, whose
commit checks again (a file may have appeared while the tool ran).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

from megatron_patch.errors import DataError
from megatron_patch.runtime.owned_temp import OwnedTempDir, remove_abandoned

logger = logging.getLogger(__name__)


def nearest_existing(path: str) -> str:
    """``path`` itself, or the nearest folder above it that exists (``/`` at the most): what
    decides whether ``path`` can be created, and by whom."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return existing


def output_folder(prefix: str, flag: str = "--output-prefix") -> str:
    """The folder of an output prefix (``out/corpus`` -> ``out``); DataError if it is missing or
    it, or a folder above it, is a file."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if os.path.basename(prefix) in ("", ".", ".."):
        raise DataError(f"{flag} '{prefix}' names a folder; add a file name prefix, e.g. out/corpus")
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        what = "is a file, not a folder" if existing == folder else f"cannot exist: '{existing}' is a file"
        raise DataError(f"output folder '{folder}' of {flag} '{prefix}' {what}; choose a folder for the outputs")
    if not os.path.isdir(folder):
        raise DataError(
            f"output folder '{folder}' of {flag} '{prefix}' does not exist; create it first "
            f"(mkdir -p '{folder}') or fix {flag}"
        )
    return folder


NAME_MAX = 255
"""The longest file name in bytes on common file systems (ext4, XFS, NFS, Lustre)."""


def check_outputs(paths: list[str], force: bool, flag: str = "--output-prefix") -> list[str]:
    """Check the final output ``paths`` of a tool before any work: DataError for a file name over
    :data:`NAME_MAX` bytes, a path that is a folder, or an existing file unless ``force``. Returns the
    paths that exist (to be replaced, reported as such)."""
    for path in paths:
        name = os.path.basename(path)
        size = len(os.fsencode(name))
        if size > NAME_MAX:
            raise DataError(
                f"{flag}: the output file name {name[:40]}...{name[-12:]} would be {size} bytes, over the {NAME_MAX} "
                f"a file name may have; shorten the file name part of {flag}"
            )
    existing = [path for path in paths if os.path.lexists(path)]
    for path in existing:
        if os.path.isdir(path):
            raise DataError(f"{flag}: the output {path} is a folder, not a file; choose another {flag}")
    if existing and not force:
        raise DataError(f"{existing[0]} already exists: pass --force to replace it, or choose another {flag}")
    return existing


class StagedOutputs:
    """Context manager that stages output files and moves them into place on :meth:`commit`.

    Usage::

        with StagedOutputs(folder, "preprocess") as staged:
            tmp = staged.path("/out/corpus_text_document.bin")   # write here
            ...
            staged.commit()   # renames every staged file to its final path, in staging order

    An OSError while writing the staged files (a full disk) leaves the block as a DataError that
    names the output folder. ``force=False``: :meth:`commit` refuses (DataError, nothing moved) when
    a final path exists by then; with ``force`` it replaces it and lists it in ``replaced``.
    """

    def __init__(self, folder: str, tag: str, force: bool = True) -> None:
        self._prefix = f".{tag}-"
        try:
            self._owned = OwnedTempDir(folder, self._prefix, ".tmp")
            self.temp_dir = self._owned.path
        except OSError as err:
            raise DataError(
                f"cannot write to output folder '{folder}': {err.strerror}; choose a writable folder for the outputs"
            ) from None
        self.folder = folder
        self.force = force
        self.replaced: list[str] = []  # final paths that existed and were replaced, set by commit
        self._final_paths: list[str] = []
        self._committed = False

    def path(self, final_path: str) -> str:
        """The temporary path to write instead of ``final_path`` (which must be in the folder)."""
        final_path = os.path.abspath(final_path)
        if os.path.dirname(final_path) != os.path.abspath(self.folder):
            raise ValueError(f"{final_path} is not in the staged folder {self.folder}")
        if final_path in self._final_paths:
            raise ValueError(f"{final_path} is staged twice")
        self._final_paths.append(final_path)
        return os.path.join(self.temp_dir, os.path.basename(final_path))

    def commit(self) -> list[str]:
        """Move all staged files into place (in staging order); returns their final paths."""
        for final_path in self._final_paths:
            temp_path = os.path.join(self.temp_dir, os.path.basename(final_path))
            if not os.path.isfile(temp_path):
                raise RuntimeError(f"staged output {temp_path} was never written")
        self.replaced = [path for path in self._final_paths if os.path.lexists(path)]
        if self.replaced and not self.force:
            raise DataError(
                f"{self.replaced[0]} was created by someone else while this ran: pass --force to replace it, "
                f"or choose another output name; nothing was written"
            )
        for final_path in self._final_paths:
            if final_path in self.replaced:
                logger.info("replacing %s", final_path)
            os.replace(os.path.join(self.temp_dir, os.path.basename(final_path)), final_path)
        self._committed = True
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self._owned.release()
        remove_abandoned(self.folder, self._prefix, ".tmp")
        return list(self._final_paths)

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self._owned.release()
        # an OSError raised writing an open file (a full disk) names no file: name the folder
        if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename).startswith(self.temp_dir)):
            if exc.errno == errno.ENAMETOOLONG:
                name = os.path.basename(str(exc.filename or ""))
                raise DataError(
                    f"writing the outputs in output folder '{self.folder}' failed: the file name "
                    f"{name[:40]}...{name[-12:]} ({len(os.fsencode(name))} bytes) is too long for its file system; "
                    f"shorten the output name; nothing was written"
                ) from None
            raise DataError(
                f"writing the outputs in output folder '{self.folder}' failed: {exc.strerror or exc}; "
                f"free space there (or fix its permissions) or choose another output folder; nothing was written"
            ) from None
