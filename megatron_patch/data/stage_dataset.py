"""megatron's ``GPTDataset`` for one stage of one prefix, with a cache key that tells stages and
rewritten files apart, and where its sample indices are cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_patch.data.staging import nearest_existing
from megatron_patch.errors import DataError

if TYPE_CHECKING:
    from megatron_patch.data.datasets import StageDataConfig


@dataclass
class StageGPTDatasetConfig(GPTDatasetConfig):
    """``GPTDatasetConfig`` plus the stage, its document range, the stage split and the identity of
    the prefix's files (:func:`prefix_files`), all part of the cache key."""

    stage: str = ""
    stage_documents: tuple[int, int] = (0, 0)
    stage_split: str = "documents"
    prefix_files: dict[str, int] = field(default_factory=dict)


class StageGPTDataset(GPTDataset):
    """A ``GPTDataset`` whose cache key also holds the stage, its document range and the identity
    of the prefix's files.

    Megatron's key (``_key_config_attributes``) holds neither the document indices nor λ, so two
    stages of one prefix, or one stage before and after a change of λ, would share index files.
    The stage split is in the key too: a token-only run's token stage covers all training documents
    in either split. Nor does it depend on the ``.bin``/``.idx`` contents (only on the path and the
    sample count), so a prefix re-preprocessed in place with as many documents would be served the
    old document/sample indices: samples cut at the old lengths, or an IndexError past the end.
    """

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["stage", "stage_documents", "stage_split", "prefix_files"]


def prefix_files(prefixes: list[str]) -> dict[str, dict[str, int]]:
    """``{prefix: {"bin_bytes", "bin_mtime_ns", "idx_bytes", "idx_mtime_ns"}}``: what identifies
    the current files of each prefix in the cache key (as the vocabulary check keys its record).

    A rewritten file has a new modification time (and usually a new size), hence a new key and
    fresh indices; reading it costs two ``stat`` calls per prefix, not a scan. Taken on rank 0 and
    broadcast (:func:`~megatron_patch.runtime.rank_zero.on_rank_zero`), so every rank looks for
    the index files rank 0 wrote even where hosts see other times for the same file.
    """
    identities = {}
    for prefix in dict.fromkeys(prefixes):
        identity = {}
        for suffix in ("bin", "idx"):
            status = os.stat(f"{prefix}.{suffix}")
            identity[f"{suffix}_bytes"] = status.st_size
            identity[f"{suffix}_mtime_ns"] = status.st_mtime_ns
        identities[prefix] = identity
    return identities


def index_cache_folder(config: StageDataConfig, prefix: str) -> str:
    """Where megatron caches the sample indices of ``prefix``'s datasets (and where the
    vocabulary check records the largest token id)."""
    if config.cache_dir:
        return config.cache_dir
    return os.path.join(prefix, "cache", f"{StageGPTDataset.__name__}_indices")


def check_cache_folder(config: StageDataConfig) -> None:
    """DataError when megatron could not write its index cache (a read-only data folder)."""
    for folder in dict.fromkeys(index_cache_folder(config, prefix) for prefix in config.prefixes):
        existing = nearest_existing(folder)
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK)):
            raise DataError(
                f"cannot write megatron's dataset index cache to '{folder}' ('{existing}' is not "
                f"a writable folder); set cache_dir (--data-cache-path) to a writable folder"
            )
