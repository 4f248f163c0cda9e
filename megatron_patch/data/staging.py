"""Atomic outputs for the data tools: write under temporary names, rename when complete.

A tool writes every output file into a hidden temporary folder inside the output folder (same
file system, so the final ``os.replace`` is atomic per file) and moves them into place only after
all of them are complete. On any failure, including Ctrl-C, the temporary folder is removed and
no output that looks complete is left behind; the temporary folder of a run killed outright (kill
-9) is removed by the next run of the same tool that completes
(:mod:`~megatron_patch.runtime.owned_temp`).
"""

from __future__ import annotations

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


class StagedOutputs:
    """Context manager that stages output files and moves them into place on :meth:`commit`.

    Usage::

        with StagedOutputs(folder, "preprocess") as staged:
            tmp = staged.path("/out/corpus_text_document.bin")   # write here
            ...
            staged.commit()   # renames every staged file to its final path, in staging order

    An OSError while writing the staged files (a full disk) leaves the block as a DataError that
    names the output folder.
    """

    def __init__(self, folder: str, tag: str) -> None:
        self._prefix = f".{tag}-"
        try:
            self._owned = OwnedTempDir(folder, self._prefix, ".tmp")
            self.temp_dir = self._owned.path
        except OSError as err:
            raise DataError(
                f"cannot write to output folder '{folder}': {err.strerror}; choose a writable folder for the outputs"
            ) from None
        self.folder = folder
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
        for final_path in self._final_paths:
            if os.path.exists(final_path):
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
            raise DataError(
                f"writing the outputs in output folder '{self.folder}' failed: {exc.strerror or exc}; "
                f"free space there (or fix its permissions) or choose another output folder; nothing was written"
            ) from None
