"""Naming, checking and merging megatron.core ``IndexedDataset`` files (``.bin`` + ``.idx``).

A *prefix* names a pair: ``corpus_text_document`` means ``corpus_text_document.bin`` (the token
ids of all documents, back to back) and ``corpus_text_document.idx`` (document lengths in tokens,
byte offsets, dtype). Names follow Megatron's ``preprocess_data.py``:
``{output_prefix}_{key}_document`` and, for shard ``i`` of ``--partitions``,
``{output_prefix}_{i}_{key}_document``.
"""

from __future__ import annotations

import os
import re
import struct

import numpy
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_patch.data.errors import DataError


def dataset_prefix(output_prefix: str, key: str, shard: int | None = None) -> str:
    """``{output_prefix}_{key}_document``, or ``{output_prefix}_{shard}_{key}_document``."""
    middle = key if shard is None else f"{shard}_{key}"
    return f"{output_prefix}_{middle}_document"


def index_dtype(prefix: str) -> type[numpy.number]:
    """Token dtype recorded in ``prefix.idx``; DataError if the pair is missing or not an index."""
    check_prefix(prefix)
    with open(prefix + ".idx", "rb") as stream:
        header = stream.read(len(_INDEX_HEADER) + 9)
    if len(header) < len(_INDEX_HEADER) + 9 or header[: len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise DataError(
            f"'{prefix}.idx' is not a megatron index file; re-create it with "
            f"tools/preprocess_data.py"
        )
    (code,) = struct.unpack("<B", header[-1:])
    return DType.dtype_from_code(code)


def check_prefix(prefix: str) -> None:
    """DataError naming the prefix and the fix when ``prefix.bin`` or ``prefix.idx`` is missing."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise DataError(
            f"data prefix '{prefix}' not found ({' and '.join(missing)} missing); give the prefix "
            f"without .bin/.idx, as written by tools/preprocess_data.py "
            f"(e.g. out/corpus_text_document), or run that tool first"
        )


def natural_key(text: str) -> list:
    """Sort key that orders ``x_2`` before ``x_10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def prefixes_in_folder(folder: str) -> list[str]:
    """All ``.bin``/``.idx`` pairs in ``folder``, in natural order of their names."""
    names = {
        name[: -len(".idx")]
        for name in os.listdir(folder)
        if name.endswith(".idx") and os.path.isfile(os.path.join(folder, name[:-4] + ".bin"))
    }
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


def merge_datasets(prefixes: list[str], bin_path: str, idx_path: str) -> tuple[int, int]:
    """Concatenate the pairs of ``prefixes`` (in order) into ``bin_path``/``idx_path``.

    Returns ``(documents, tokens)`` of the result. All inputs must share one token dtype.
    """
    if not prefixes:
        raise DataError("nothing to merge; pass at least one prefix or a folder with .bin/.idx")
    dtypes = {prefix: index_dtype(prefix) for prefix in prefixes}
    dtype = dtypes[prefixes[0]]
    for prefix, other in dtypes.items():
        if other != dtype:
            raise DataError(
                f"cannot merge '{prefix}' ({other.__name__} tokens) with '{prefixes[0]}' "
                f"({dtype.__name__} tokens); re-create them with the same tokenizer"
            )
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(idx_path)
    tokens = int(numpy.sum(builder.sequence_lengths, dtype=numpy.int64))
    return len(builder.sequence_lengths), tokens


def verify_dataset(prefix: str, sequences: int, tokens: int, documents: int | None = None) -> None:
    """Re-open ``prefix`` with megatron's reader and check its counts: ``sequences`` (entries of
    ``sequence_lengths``, one per document with text), ``tokens`` and, when given, ``documents``
    (entries of ``document_indices`` minus one, empty documents included)."""
    dataset = IndexedDataset(prefix, mmap=False)  # mmap cannot open the empty .bin of 0 tokens
    got = (len(dataset), int(numpy.sum(dataset.sequence_lengths, dtype=numpy.int64)),
           len(dataset.document_indices) - 1)
    want = (sequences, tokens, got[2] if documents is None else documents)
    if got != want:
        raise RuntimeError(
            f"{prefix}: wrote {want[0]} sequences / {want[1]} tokens / {want[2]} documents but "
            f"read back {got[0]} / {got[1]} / {got[2]}"
        )
