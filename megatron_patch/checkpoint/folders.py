"""The folders of a ``--save`` root: one ``iter_NNNNNNN`` per checkpoint and the tracker file that
names the newest complete one.

A checkpoint folder is complete once it holds ``megatron_patch.json`` (``store.save_checkpoint``
writes it last, then renames ``iter_N.tmp`` into place and rewrites the tracker). A kill between
the rename and the tracker write leaves a complete checkpoint newer than the tracker, which
``read_tracker`` takes and ``repair_tracker`` records.
"""

import json
import logging
import os
import re
import shutil
from typing import Callable, Collection, List, Optional, Sequence

from megatron_patch.errors import ArgumentError, CheckpointError
from megatron_patch.runtime import atomic_file

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "megatron_patch.json"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# a save in progress or killed (.tmp), or a pruned checkpoint being removed (.removing)
_PARTIAL_DIR = re.compile(r"^iter_\d{7,}\.(tmp|removing)$")
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
    path = os.path.normpath(path)  # "ROOT/iter_N/" is ROOT's checkpoint, as "ROOT/iter_N" is
    if os.path.exists(os.path.join(path, METADATA)):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        raise CheckpointError(f"{path} holds no checkpoint (no {TRACKER} or {METADATA}): point at a --save directory")
    found = checkpoint_dir(path, iteration)
    if not os.path.exists(os.path.join(found, METADATA)):
        raise CheckpointError(f"{found}: named by {TRACKER} but missing or incomplete; restore it or fix the tracker")
    return found


def check_replaceable(
    final: str, flag: str, sources: Sequence[str], output_names: Collection[str], is_output: Callable[[str], bool]
) -> None:
    """ArgumentError unless ``--force`` may replace the tool's output folder ``final``: it must not
    be, or hold, one of the ``sources`` the tool reads, and it must be empty or hold an earlier
    output of the same tool (``is_output(final)``, and nothing but ``output_names``), so that a
    training run, another tool's output or a user's own files are never deleted."""
    real = os.path.realpath(final)
    for source in sources:
        source_real = os.path.realpath(source)
        if source_real == real or source_real.startswith(real + os.sep):
            raise ArgumentError(f"{flag} {final} would replace the source checkpoint {source}: choose another folder")
    if not os.path.isdir(final):
        return
    candidates = [final] + [checkpoint_dir(final, iteration) for iteration in complete_iterations(final)]
    trained = [path for path in candidates if os.path.isfile(os.path.join(path, METADATA)) and not _converted(path)]
    if trained:
        raise ArgumentError(
            f"{flag} {final} holds the training checkpoint {trained[-1]}; --force replaces only a tool's earlier "
            f"output: choose another folder"
        )
    entries = sorted(os.listdir(final))
    foreign = [name for name in entries if name not in output_names]
    if foreign or (entries and not is_output(final)):
        shown = f"'{(foreign or entries)[0]}'" + (f" and {len(foreign) - 1} more" if len(foreign) > 1 else "")
        raise ArgumentError(
            f"{flag} {final} holds {shown}, not this tool's earlier output; --force replaces only an empty folder "
            f"or that output: choose another folder, or empty it"
        )


CONVERTED_OUTPUT = (TRACKER, os.path.basename(checkpoint_dir("", 0)))  # what the conversion tool writes


def is_converted_output(folder: str) -> bool:
    """Whether ``folder`` holds the conversion tool's output: its one checkpoint, iteration 0."""
    return _converted(checkpoint_dir(folder, 0))


def _converted(checkpoint: str) -> bool:
    """Whether ``checkpoint`` was written by the conversion tool (an unreadable one counts as not)."""
    try:
        with open(os.path.join(checkpoint, METADATA)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "conversion" in meta


def repair_tracker(root: str) -> None:
    """Make ``root``'s tracker name its newest complete checkpoint, where a kill between the rename
    and the tracker write left it behind (a resumed run may save nothing more). Rank 0's work."""
    named, newest = tracker_value(root), newest_complete(root)
    if newest is not None and named != newest:
        atomic_file.write_text(os.path.join(root, TRACKER), f"{newest}\n")
        logger.warning("%s named %s; now names %s, the newest complete checkpoint", TRACKER, named, newest)


def prune(root: str, keep_last: int, retain=()) -> None:
    """Remove all but the ``keep_last`` newest complete checkpoints of ``root``, counting and
    removing none of the iterations in ``retain``."""
    if keep_last <= 0:
        return
    prunable = [iteration for iteration in complete_iterations(root) if iteration not in retain]
    for iteration in prunable[:-keep_last]:
        # renamed first, so a removal cut short (a kill, a busy file) never leaves an iter_N that
        # holds its metadata but lacks shards; the next save's remove_partial_saves finishes it
        removing = checkpoint_dir(root, iteration) + ".removing"
        try:
            shutil.rmtree(removing, ignore_errors=True)  # one left by a removal that was cut short
            os.replace(checkpoint_dir(root, iteration), removing)
        except OSError as error:  # pruning must not end the run (the other ranks wait in a barrier)
            logger.warning("could not remove %s (%s); it is kept", checkpoint_dir(root, iteration), error)
            continue
        shutil.rmtree(removing, ignore_errors=True)


def remove_partial_saves(root: str) -> None:
    """Remove every ``iter_N.tmp`` and ``iter_N.removing`` of ``root``. Called after a save
    completed: one save is in flight at a time and the ``--save`` lock admits one trainer, so any
    that is left comes from a save that was killed (at an iteration that may never be saved again,
    e.g. a pre-emption's) or from pruning that was."""
    for name in os.listdir(root):
        if _PARTIAL_DIR.match(name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            logger.info("removed %s, left by an interrupted save or removal", os.path.join(root, name))
