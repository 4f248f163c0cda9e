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
import tempfile

import torch.distributed as dist

from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.owned_temp import OwnedTempDir, remove_abandoned

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

    def __init__(self, final: str) -> None:
        self.final = final
        self.committed = False
        self._prefix = f".{os.path.basename(final)}.partial-"
        self._owned = None
        holder = [None]
        if dist.get_rank() == 0:
            parent = os.path.dirname(final)
            try:
                os.makedirs(parent, exist_ok=True)
                self._owned = OwnedTempDir(parent, self._prefix)
                holder[0] = self._owned.path
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(holder[0], 0o777 & ~umask)  # mkdtemp makes it private; the output is not
            except OSError as error:
                holder[0] = ArgumentError(f"cannot write into {parent}: {error.strerror}; choose a writable folder")
        dist.broadcast_object_list(holder, src=0)
        if isinstance(holder[0], ArgumentError):
            raise holder[0]
        self.path = holder[0]

    def commit(self) -> str:
        """Rename the temporary folder to the final name (replacing an old one); returns it."""
        dist.barrier()
        if dist.get_rank() == 0:
            old = None
            if os.path.exists(self.final):
                old = tempfile.mkdtemp(
                    prefix=f".{os.path.basename(self.final)}.replaced-", dir=os.path.dirname(self.final)
                )
                os.rmdir(old)
                os.replace(self.final, old)
            self._owned.forget_owner()
            os.replace(self.path, self.final)
            self._owned.release()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                logger.info("replaced %s", self.final)
            remove_abandoned(os.path.dirname(self.final), self._prefix)
        self.committed = True
        dist.barrier()
        return self.final

    def __enter__(self) -> "StagedFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and dist.get_rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
            self._owned.release()
