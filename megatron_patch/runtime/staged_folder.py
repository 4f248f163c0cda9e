"""Folder outputs (a converted checkpoint, a Hugging Face model) written under a temporary name.

Every rank writes into ``PARENT/.NAME.partial-XXXXXX``; only when the tool has written *and
checked* everything does rank 0 rename it to ``PARENT/NAME`` (replacing an existing folder only
with ``--force``, and only at that last moment). On any failure the temporary folder is removed,
so no half-written output that looks complete is ever left; the temporary folder of a run killed
outright (kill -9) is removed by the next run that commits into the same parent folder
(:mod:`~megatron_patch.runtime.owned_temp`).
"""

import logging
import os
import shutil
from typing import Callable, Optional

import torch.distributed as dist

from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.owned_temp import OwnedTempDir, remove_abandoned
from megatron_patch.runtime.rank_zero import on_rank_zero

logger = logging.getLogger(__name__)


def check_output_folder(path: str, force: bool, flag: str) -> str:
    """The absolute output path; ArgumentError when it exists (without ``force``) or is a file."""
    if not path:
        raise ArgumentError(f"{flag} is empty: name the output folder")
    final = os.path.abspath(path)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ArgumentError(f"{flag} {path} is a file: name a folder to create")
    if os.path.exists(final) and not force:
        raise ArgumentError(f"{flag} {path} already exists: pass --force to replace it, or choose a new folder")
    return final


class StagedFolder:
    """A temporary sibling of ``final`` that becomes ``final`` on :meth:`commit` (collective).

    Use as a context manager on every rank; leaving the block without ``commit`` removes it.
    """

    def __init__(self, final: str, force: bool = False, check_replace: Optional[Callable[[str], None]] = None) -> None:
        self.final = final
        self.force = force  # replace a folder at ``final`` (checked again at commit: one may have appeared)
        self.check_replace = check_replace  # raises when the folder at ``final`` may not be replaced
        self.committed = False
        self._prefix = f".{os.path.basename(final)}.partial-"
        self._owned = None
        self.path = on_rank_zero(self._create)

    def _create(self) -> str:
        """Rank 0: make the temporary folder (readable like any output) and own it."""
        parent = os.path.dirname(self.final)
        try:
            os.makedirs(parent, exist_ok=True)
            self._owned = OwnedTempDir(parent, self._prefix)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._owned.path, 0o777 & ~umask)  # mkdtemp makes it private; the output is not
        except OSError as error:
            raise ArgumentError(f"cannot write into {parent}: {error.strerror}; choose a writable folder") from None
        return self._owned.path

    def commit(self) -> str:
        """Rename the temporary folder to the final name (replacing an old one); returns it."""
        dist.barrier()
        on_rank_zero(self._publish)
        self.committed = True
        dist.barrier()
        return self.final

    def _publish(self) -> None:
        """Rank 0: move an old ``final`` aside, rename the temporary folder into place, remove the old.

        The old output is moved into an owned ``.NAME.replaced-XXXX`` folder, so that a kill before
        its removal leaves a folder the next commit into the same parent removes; a rename that
        fails (OSError) moves it back."""
        parent, name = os.path.dirname(self.final), os.path.basename(self.final)
        replaced = None
        if os.path.exists(self.final):
            if not self.force:
                raise ArgumentError(
                    f"{self.final} was created by someone else while this ran: pass --force to replace it, "
                    f"or choose a new folder"
                )
            if self.check_replace is not None:
                self.check_replace(self.final)  # what is there now, not what was there at the start
            replaced = OwnedTempDir(parent, f".{name}.replaced-")
            os.replace(self.final, os.path.join(replaced.path, name))
        self._owned.forget_owner()
        try:
            os.replace(self.path, self.final)
        except OSError:
            if replaced is not None:  # the old output back in place: a failed commit replaces nothing
                os.replace(os.path.join(replaced.path, name), self.final)
                shutil.rmtree(replaced.path, ignore_errors=True)
                replaced.release()
            raise
        self._owned.release()
        if replaced is not None:
            shutil.rmtree(replaced.path, ignore_errors=True)
            replaced.release()
            logger.info("replaced %s", self.final)
        remove_abandoned(parent, f".{name}.replaced-")
        remove_abandoned(parent, self._prefix)

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and dist.get_rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
            self._owned.release()
