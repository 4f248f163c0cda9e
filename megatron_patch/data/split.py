"""Document ranges of the two training stages and of validation, per data prefix (pure numpy).

For one prefix with N documents of lengths ``sequence_lengths`` (tokens):

1. Megatron's split (``"949,50,1"``): the split string becomes megatron's split matrix of
   ``[begin, end)`` fractions, and split ``s`` gets the documents
   ``[round(begin_s * N), round(end_s * N))``, exactly as ``BlendedMegatronDatasetBuilder``
   takes them: contiguous ranges by document count, train first, then validation, then test.
2. The λ cut: the training documents ``[b0, b1)`` holding ``W`` tokens are cut at the first
   document boundary where the cumulative token count reaches ``λ·W``. Documents before the cut
   go to the patch stage, the rest to the token stage. So the patch stage holds at least ``λ·W``
   tokens and less than ``λ·W + (longest training document)``: each stage's token share is λ
   (resp. 1-λ) up to one document. With ``patch_data_fraction == 0`` (no patch stage) every
   training document goes to the token stage.
3. Or, with ``stage_split="epochs"`` (the paper's multi-epoch recipe), no cut: both stages get all
   training documents ``[b0, b1)``, and the budget alone decides how many passes each stage makes.

The test range is computed (so that it is never used for training) but no dataset is built on it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass

import numpy
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)

from megatron_patch.errors import DataError


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float] | None]:
    """``["p"]`` / ``["p1", "p2"]`` / ``["0.7", "p1", "0.3", "p2"]`` -> (prefixes, weights or None).

    Raises DataError for an empty list, a bad weight, or weights without a prefix.
    """
    if isinstance(data_path, str) or not data_path:
        raise DataError(
            f"data_path {data_path!r} must be a non-empty list: ['prefix'] or "
            f"['0.7', 'prefix1', '0.3', 'prefix2'] (--data-path)"
        )
    items = [str(item).strip() for item in data_path]
    weights = [_as_float(item) for item in items[0::2]]
    if len(items) % 2 == 1 or all(w is None for w in weights):
        if len(items) > 1 and any(_as_float(item) is not None for item in items):
            raise DataError(
                f"data_path {items} mixes numbers and prefixes; give 'weight prefix' pairs, "
                f"e.g. ['0.7', 'p1', '0.3', 'p2'], or prefixes only"
            )
        _check_listed_once(items)
        return items, None
    prefixes = items[1::2]
    if any(w is None for w in weights) or any(_as_float(p) is not None for p in prefixes):
        raise DataError(f"data_path {items} must alternate weight and prefix, e.g. ['0.7', 'p1', '0.3', 'p2']")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise DataError(f"data_path weights {weights} must be finite and > 0; drop prefixes of weight 0")
    _check_listed_once(prefixes)
    return prefixes, weights


def _check_listed_once(prefixes: list[str]) -> None:
    """DataError for a prefix listed twice (also by another path to the same files): its documents
    would count, and be split, twice."""
    seen = {}
    for prefix in prefixes:
        real = os.path.realpath(prefix)
        if real in seen:
            raise DataError(
                f"--data-path lists '{prefix}' twice{'' if seen[real] == prefix else f' (as {seen[real]!r} too)'}; "
                f"list each prefix once (with a larger weight to draw it more often)"
            )
        seen[real] = prefix


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_split(split: str) -> list[tuple[float, float] | None]:
    """Megatron's split matrix for ``"949,50,1"`` (train, valid, test shares of the documents)."""
    parts = [p for p in re.split(r"[,/]", str(split)) if p.strip()]
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(not math.isfinite(s) or s < 0 for s in shares) or sum(shares) <= 0:
        raise DataError(
            f"split {split!r} must be 1 to 3 finite non-negative numbers with a positive sum: "
            f"train,valid,test shares of the documents, e.g. '949,50,1' (--split)"
        )
    shares += [0.0] * (3 - len(shares))
    total = sum(shares)
    return convert_split_vector_to_split_matrix([s / total for s in shares])


@dataclass(frozen=True)
class DocumentRange:
    """Documents ``[begin, end)`` of one prefix and the ``tokens`` they hold."""

    begin: int
    end: int
    tokens: int

    @property
    def documents(self) -> int:
        return self.end - self.begin

    def indices(self) -> numpy.ndarray:
        """Document indices as megatron's ``GPTDataset(indexed_indices=...)`` wants them (int32)."""
        return numpy.arange(self.begin, self.end, dtype=numpy.int32)


STAGE_SPLITS = ("documents", "epochs")


@dataclass(frozen=True)
class PrefixSplit:
    """The stage ranges of one prefix of ``documents`` documents holding ``tokens`` tokens, whose
    lengths in order have the digest ``lengths_sha256`` (with the counts, what identifies the
    corpus on any path); ``longest_train_document`` in tokens bounds the λ error.

    ``train`` is the whole training range: the patch and token ranges partition it in the
    ``documents`` split and both equal it in the ``epochs`` split."""

    prefix: str
    documents: int
    tokens: int
    lengths_sha256: str
    train: DocumentRange
    patch: DocumentRange
    token: DocumentRange
    valid: DocumentRange
    test: DocumentRange
    longest_train_document: int

    @property
    def train_tokens(self) -> int:
        return self.train.tokens


def _bounds(fractions: tuple[float, float] | None, count: int) -> tuple[int, int]:
    if fractions is None:
        return 0, 0
    return int(round(fractions[0] * float(count))), int(round(fractions[1] * float(count)))


def split_prefix(
    prefix: str,
    sequence_lengths: numpy.ndarray,
    split_matrix: list[tuple[float, float] | None],
    patch_data_fraction: float,
    stage_split: str = "documents",
) -> PrefixSplit:
    """Document ranges of the patch stage, token stage, validation and test for one prefix.

    Args:
        sequence_lengths: [N] tokens per document (megatron's ``IndexedDataset.sequence_lengths``).
        split_matrix: from :func:`parse_split`.
        patch_data_fraction: λ in (0, 1), the patch stage's share of the training tokens; 0 (no
            patch stage) sends every training document to the token stage.
        stage_split: ``"documents"`` (the λ cut) or ``"epochs"`` (both stages get every training
            document; see the module docstring).
    """
    if stage_split not in STAGE_SPLITS:
        raise DataError(f"stage split {stage_split!r} must be one of {', '.join(STAGE_SPLITS)} (--stage-split)")
    lengths = numpy.asarray(sequence_lengths, dtype=numpy.int64)
    count = len(lengths)
    cumulative = numpy.concatenate([[0], numpy.cumsum(lengths)])

    def document_range(begin: int, end: int) -> DocumentRange:
        return DocumentRange(begin, end, int(cumulative[end] - cumulative[begin]))

    train_begin, train_end = _bounds(split_matrix[0], count)
    if train_end <= train_begin:
        raise DataError(
            f"split leaves no training documents in '{prefix}' ({count} documents); raise the "
            f"first (train) share of the split, e.g. '949,50,1'"
        )
    train = document_range(train_begin, train_end)
    if patch_data_fraction == 0:
        cut = train_begin
    elif stage_split == "epochs":
        cut = None
    else:
        running = cumulative[train_begin + 1 : train_end + 1] - cumulative[train_begin]  # [documents] tokens
        target = patch_data_fraction * float(running[-1])
        cut = train_begin + int(numpy.searchsorted(running, target, side="left")) + 1
    return PrefixSplit(
        prefix=prefix,
        documents=count,
        tokens=int(cumulative[-1]),
        lengths_sha256=hashlib.sha256(memoryview(lengths)).hexdigest()[:16],  # int64, no copy
        train=train,
        patch=train if cut is None else document_range(train_begin, cut),
        token=train if cut is None else document_range(cut, train_end),
        valid=document_range(*_bounds(split_matrix[1], count)),
        test=document_range(*_bounds(split_matrix[2], count)),
        longest_train_document=int(lengths[train_begin:train_end].max()),
    )
