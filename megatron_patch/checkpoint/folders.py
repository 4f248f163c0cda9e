"""The folders of a ``--save`` root: one ``iter_NNNNNNN`` per checkpoint and the tracker file that
names the newest complete one.

A checkpoint folder is complete once it holds ``megatron_patch.json`` (``store.save_checkpoint``
writes it last, then renames ``iter_N.tmp`` into place and rewrites the tracker). A kill between
the rename and the tracker write leaves a complete checkpoint newer than the tracker, which
``read_tracker`` takes and ``repair_tracker`` records.
"""

import logging
import os
import re
import shutil
from typing import List, Optional

from megatron_patch.errors import CheckpointError
from megatron_patch.runtime import atomic_file

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_patch.json"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_PARTIAL_DIR = re.compile(r"^iter_\d{7,}\.tmp$")  # a save in progress, or one that was killed
_WARNED = set()  # (root, tracker, newest) already reported by read_tracker


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tracker_value(root: str) -> Optional[int]:
    """The iteration written in ``root``'s tracker file, or None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: unreadable tracker ({error}); fix or delete it") from None
    if not text.isdigit():
        raise CheckpointError(f"{path}: tracker holds {text[:40]!r}, not an iteration number; fix or delete it")
    return int(text)


def complete_iterations(root: str) -> List[int]:
    """Every N with a complete ``root/iter_N`` (renamed into place, so it holds its metadata), in order."""
    if not os.path.isdir(root):
        return []
    return sorted(
        int(m.group(1))
        for m in map(_ITER_DIR.match, os.listdir(root))
        if m and os.path.isfile(os.path.join(root, m.group(0), METADATA))
    )


def newest_complete(root: str) -> Optional[int]:
    """The highest N with a complete ``root/iter_N``."""
    return max(complete_iterations(root), default=None)


def read_tracker(root: str) -> Optional[int]:
    """The iteration to resume from: the tracker's, or a newer complete checkpoint's where a kill
    came between renaming it into place and writing the tracker; None when ``root`` holds none."""
    named, newest = tracker_value(root), newest_complete(root)
    if newest is not None and (named is None or newest > named):
        if (root, named, newest) not in _WARNED:
            _WARNED.add((root, named, newest))
            logger.warning(
                "%s: %s names %s but %s is complete and newer (the save was interrupted before the "
                "tracker write): using it",
                root,
                TRACKER,
                named,
                checkpoint_dir(root, newest),
            )
        return newest
    return named


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from either a ``--save`` root (via its tracker) or a checkpoint itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if os.path.exists(os.path.join(path, METADATA)):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {TRACKER} or {METADATA}): point at a --save directory")
    found = checkpoint_dir(path, iteration)
    if not os.path.exists(os.path.join(found, METADATA)):
        raise CheckpointError(f"{found}: named by {TRACKER} but missing or incomplete; restore it or fix the tracker")
    return found


def repair_tracker(root: str, writer: bool) -> None:
    """Make ``root``'s tracker name its newest complete checkpoint, where a kill between the rename
    and the tracker write left it behind (a resumed run may save nothing more). ``writer``: this
    process writes it (rank 0); the others only read."""
    named, newest = tracker_value(root), newest_complete(root)
    if writer and newest is not None and named != newest:
        atomic_file.write_text(os.path.join(root, TRACKER), f"{newest}\n")
        logger.warning("%s named %s; now names %s, the newest complete checkpoint", TRACKER, named, newest)


def prune(root: str, keep_last: int, retain=()) -> None:
    """Remove all but the ``keep_last`` newest complete checkpoints of ``root``, counting and
    removing none of the iterations in ``retain``."""
    if keep_last <= 0:
        return
    prunable = [iteration for iteration in complete_iterations(root) if iteration not in retain]
    for iteration in prunable[:-keep_last]:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)


def remove_partial_saves(root: str) -> None:
    """Remove every ``iter_N.tmp`` of ``root``. Called after a save completed: saves are synchronous
    and the ``--save`` lock admits one trainer, so any that is left comes from a save that was
    killed (at an iteration that may never be saved again, e.g. a pre-emption's)."""
    for name in os.listdir(root):
        if _PARTIAL_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            logger.info("removed %s, left by an interrupted save", os.path.join(root, name))
