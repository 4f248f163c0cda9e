"""A checkpoint's manifest: every file's size and CRC-32, written at save and checked at load.

``iter_N/manifest.json``::

    {"format_version": 1, "checksum": "crc32",
     "files": {"__0_0.distcp": {"size": 908940, "crc32": 3735928559}, "common.pt": {...}, ...}}

Each rank checksums the files it wrote (dist_checkpointing names them ``__<global rank>_<i>.distcp``);
rank 0 also takes the shared files (``common.pt``, ``metadata.json``, ``.metadata``,
``megatron_patch.json``). At load, the ranks split the files between them, so both directions
cost one read of the checkpoint spread over the ranks. CRC-32 (``zlib``) runs at about 2.1 GB/s
on one core of the Xeon this was measured on (256 MiB buffer): about 0.5 s per GB on the slowest
rank, on top of reading the bytes, which the page cache usually still holds right after a save.
A size mismatch (truncation) is caught without reading; a same-size overwrite (zeroed blocks)
by the checksum.
"""

import json
import logging
import os
import zlib
from typing import Dict, Iterable, List, Optional, Union

import torch.distributed as dist

from megatron_patch.runtime import atomic_file
from megatron_patch.runtime.rank_zero import on_rank_zero

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BLOCK = 16 << 20  # bytes read per call while checksumming


class ManifestError(RuntimeError):
    """A checkpoint file that is missing, of another size or checksum than its manifest says (one line)."""


def crc32_of(path: str, sync: bool = False) -> int:
    """CRC-32 of the file's bytes, read in 16 MiB blocks; ``sync``: also flush the file to disk."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = zlib.crc32(block, crc)
        if sync:
            os.fsync(f.fileno())
    return crc


def describe(folder: str, names: Iterable[str]) -> Dict[str, dict]:
    """``{name: {"size": bytes, "crc32": int}}`` for files ``names`` of ``folder``, each flushed to
    disk on the way (megatron writes common.pt and metadata.json without an fsync: after a power
    loss the manifest would list bytes the disk never got)."""
    return {
        name: {
            "size": os.path.getsize(os.path.join(folder, name)),
            "crc32": crc32_of(os.path.join(folder, name), sync=True),
        }
        for name in names
    }


def _own_files(folder: str, rank: int) -> List[str]:
    """The files of ``folder`` this rank checksums at save: its own ``__<rank>_*`` shards; rank 0
    also everything that is not a rank's shard (``common.pt``, ``.metadata``, ...)."""
    names = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    if rank == 0:
        return [name for name in names if not name.startswith("__") or name.startswith("__0_")]
    return [name for name in names if name.startswith(f"__{rank}_")]


def write_manifest(folder: str) -> str:
    """Called on every rank once all files of ``folder`` are written (after a barrier), and before
    anything else is added to it (collective): each rank checksums its own files, rank 0 writes
    ``folder/manifest.json``; returns its path. An ``OSError`` of any rank (a file it cannot
    read, a manifest rank 0 cannot write) is raised on every rank, so none waits for the others."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        entries: Union[Dict[str, dict], OSError] = describe(folder, _own_files(folder, rank))
    except OSError as error:
        entries = error
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: List[Union[Dict[str, dict], OSError, None]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    if isinstance(entries, OSError):
        raise entries
    failures = [part for part in gathered if isinstance(part, OSError)]
    if failures:
        raise failures[0]
    return on_rank_zero(_write, folder, gathered)


def _write(folder: str, gathered: List[Dict[str, dict]]) -> str:
    """Write ``folder/manifest.json`` from every rank's entries (rank 0's work); returns its path."""
    files = {}
    for part in gathered:
        files.update(part)
    path = os.path.join(folder, MANIFEST)
    atomic_file.write_json(
        path, {"format_version": FORMAT_VERSION, "checksum": "crc32", "files": files}, sort_keys=True
    )
    return path


def read_manifest(folder: str) -> Optional[dict]:
    """The manifest's ``files`` table, or None when ``folder`` has none (a checkpoint written before
    manifests existed). ManifestError for an unreadable one."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format_version") != FORMAT_VERSION or not isinstance(files, dict):
            raise ValueError(f"format_version {manifest.get('format_version')!r}")
        for name, entry in files.items():
            int(entry["size"]), int(entry["crc32"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ManifestError(
            f"{path}: unreadable manifest ({type(error).__name__}: {error}); the checkpoint is "
            f"corrupt: load an earlier one, or pass --no-checkpoint-verify to skip the check"
        ) from None
    return files


def check_file(folder: str, name: str, entry: dict) -> Optional[str]:
    """A one-line description of how ``folder/name`` differs from its manifest ``entry`` (or why it
    cannot be read: an I/O error, no permission), or None."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return f"{path} is missing (listed in {MANIFEST})"
    try:
        size = os.path.getsize(path)
        crc = crc32_of(path) if size == int(entry["size"]) else None
    except OSError as error:
        return f"{path} cannot be read ({error.strerror or error})"
    if size != int(entry["size"]):
        return f"{path} has {size} bytes, {MANIFEST} says {entry['size']} (truncated or replaced)"
    if crc is not None:
        if crc != int(entry["crc32"]):
            return (
                f"{path} has CRC-32 {crc:08x}, {MANIFEST} says {int(entry['crc32']):08x} (same size: overwritten bytes)"
            )
    return None


def verify(folder: str, group=None, required: bool = False) -> bool:
    """Check every file ``folder``'s manifest lists (size and checksum; the files split over the ranks
    of ``group``, so that a thousand ranks do not each look up every file of a shared file system),
    collectively: every rank raises the same one-line ManifestError, or none does. Returns False
    (after a warning) for a checkpoint without a manifest, unless ``required`` (its metadata says it
    was written with one): then that is the error."""
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    try:
        files, problem = read_manifest(folder), None
    except ManifestError as error:
        files, problem = None, str(error)
    if files is None and problem is None and required:
        problem = (
            f"{os.path.join(folder, MANIFEST)} is missing, though the checkpoint was written with one: it is "
            f"incomplete (copied in part?); load an earlier one, or pass --no-checkpoint-verify to skip the check"
        )
    if files is not None:
        rank = dist.get_rank(group) if distributed else 0
        world = dist.get_world_size(group) if distributed else 1
        for name in sorted(files)[rank::world]:
            problem = check_file(folder, name, files[name])
            if problem:
                problem += (
                    ": the checkpoint is corrupt: load an earlier one, or pass --no-checkpoint-verify to skip the check"
                )
                break
    if distributed:
        problems: List[Optional[str]] = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
        problem = next((p for p in problems if p), None)
    if problem:
        raise ManifestError(problem)
    if files is None:
        logger.warning(
            "checkpoint %s has no %s (written before manifests): its files are not verified", folder, MANIFEST
        )
        return False
    return True
