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
from typing import NamedTuple

import numpy
from megatron.core.datasets.indexed_dataset import (
    _INDEX_HEADER,
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
)

from megatron_patch.errors import DataError


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
        raise DataError(f"'{prefix}.idx' is not a megatron index file; re-create it with tools/preprocess_data.py")
    (code,) = struct.unpack("<B", header[-1:])
    return DType.dtype_from_code(code)


def check_prefix(prefix: str) -> None:
    """DataError naming the prefix and the fix when ``prefix.bin`` or ``prefix.idx`` is missing,
    or when the pair does not agree (``check_pair``)."""
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise DataError(
            f"data prefix '{prefix}' not found ({' and '.join(missing)} missing); give the prefix "
            f"without .bin/.idx, as written by tools/preprocess_data.py "
            f"(e.g. out/corpus_text_document), or run that tool first"
        )
    check_pair(prefix)


# .idx layout (megatron.core IndexedDatasetBuilder.finalize): header, version <Q, dtype code <B,
# sequence count S <Q, document count D <Q, then int32 lengths[S], int64 byte offsets[S],
# int64 document indices[D] and, for multimodal sets only, int8 modes[S]
_FIXED_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
_REMAKE = "re-create the pair with tools/preprocess_data.py (or copy both files again)"


def check_pair(prefix: str) -> None:
    """DataError (one line, naming the file) unless ``prefix.idx`` is a well-formed megatron index
    and ``prefix.bin`` has exactly the bytes it describes: the offsets follow from the lengths,
    the document indices run from 0 to the sequence count, and the .bin ends where the last
    sequence ends. Reads the index only (time proportional to it, not to the data): a truncated
    or extended .bin, a truncated, empty or random .idx are caught; tokens overwritten inside the
    .bin are not (the vocabulary check scans those)."""
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    size = os.path.getsize(idx)
    with open(idx, "rb") as stream:
        head = stream.read(_FIXED_BYTES)
        if len(head) < _FIXED_BYTES or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
            raise DataError(
                f"{idx} is not a megatron index file ({size} bytes, no {_INDEX_HEADER!r} header); {_REMAKE}"
            )
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(_INDEX_HEADER) :])
        if version != 1:
            raise DataError(f"{idx}: index version {version}, megatron-core reads version 1; {_REMAKE}")
        try:
            itemsize = numpy.dtype(DType.dtype_from_code(code)).itemsize
        except (KeyError, ValueError):
            raise DataError(f"{idx}: unknown token dtype code {code}; the index is corrupt; {_REMAKE}") from None
        expected = _FIXED_BYTES + 12 * sequences + 8 * documents
        if size not in (expected, expected + sequences):
            raise DataError(
                f"{idx} has {size} bytes but its header's {sequences} sequences and {documents} "
                f"documents need {expected}: truncated or corrupt; {_REMAKE}"
            )
        lengths = numpy.fromfile(stream, dtype=numpy.int32, count=sequences).astype(numpy.int64)
        offsets = numpy.fromfile(stream, dtype=numpy.int64, count=sequences)
        document_indices = numpy.fromfile(stream, dtype=numpy.int64, count=documents)
    starts = numpy.concatenate(([0], numpy.cumsum(lengths * itemsize)))  # [S + 1] byte offsets
    bad = numpy.flatnonzero((lengths < 0) | (offsets != starts[:-1]))
    if bad.size:
        raise DataError(
            f"{idx}: sequence {bad[0]} has length {lengths[bad[0]]} and byte offset {offsets[bad[0]]}, "
            f"which do not follow from the sequences before it; the index is corrupt; {_REMAKE}"
        )
    if (
        documents < 1
        or document_indices[0] != 0
        or document_indices[-1] != sequences
        or numpy.any(numpy.diff(document_indices) < 0)
    ):
        raise DataError(
            f"{idx}: its document indices do not run from 0 to its {sequences} sequences; "
            f"the index is corrupt; {_REMAKE}"
        )
    end = int(starts[-1])
    bin_size = os.path.getsize(bin_path)
    if bin_size != end:
        state = "truncated" if bin_size < end else "longer than its index says"
        raise DataError(
            f"{bin_path} has {bin_size} bytes but {idx} says its {sequences} sequences end at byte "
            f"{end}: {state}; {_REMAKE}"
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


def check_one_corpus(folder: str, prefixes: list[str]) -> None:
    """DataError unless the pairs ``prefixes`` of ``folder`` can be merged as one corpus.

    Refused, as each would put documents into the merge that do not belong there:

    * partition shards next to their merge, ``P_{i}_K_document`` and ``P_K_document``
      (``tools/preprocess_data.py --partitions`` writes both): every document twice;
    * pairs of more than one JSON key (names ending in ``_text_document`` and
      ``_title_document``): another field's texts as documents. The key is taken to be the last
      ``_``-separated word before ``_document``; names without ``_document`` are not checked.

    The fix in both cases is to pass the prefixes to merge explicitly.
    """
    names = {os.path.basename(prefix) for prefix in prefixes}
    shards_of: dict[str, list[str]] = {}  # merge name -> its shards in the folder
    for name in names:
        if name.endswith("_document"):
            # a shard without its "_{i}" is the name of the merge of the shards
            for number in re.finditer(r"_\d+(?=_)", name):
                merge = name[: number.start()] + name[number.end() :]
                if merge in names:
                    shards_of.setdefault(merge, []).append(name)
    if shards_of:
        merge = min(shards_of, key=natural_key)
        shards = sorted(shards_of[merge], key=natural_key)
        raise DataError(
            f"folder '{folder}' holds both the partition shards {shards[0]} .. {shards[-1]} "
            f"({len(shards)} pairs) and their merge {merge} (tools/preprocess_data.py --partitions "
            f"writes both), so every document would be merged twice; pass the prefixes to merge "
            f"explicitly (--input PREFIX [PREFIX ...]), or move the shards or the merge out of the folder"
        )
    keys: dict[str, str] = {}  # key -> first name with it
    for name in sorted(names, key=natural_key):
        key = re.fullmatch(r".*_([^_]+)_document", name)
        if key:
            keys.setdefault(key.group(1), name)
    if len(keys) > 1:
        shown = ", ".join(f"{name} (key '{key}')" for key, name in list(keys.items())[:3])
        raise DataError(
            f"folder '{folder}' holds pairs of {len(keys)} JSON keys ({shown}), whose documents would be "
            f"merged into one dataset; pass the prefixes of one key explicitly (--input PREFIX [PREFIX ...]), "
            f"or move the other keys' pairs out of the folder"
        )


class MergeCounts(NamedTuple):
    """What :func:`merge_datasets` wrote. ``sequences``: entries of ``sequence_lengths``, the
    samples GPT training draws from (one per document with tokens, as
    ``tools/preprocess_data.py`` writes); ``tokens``: their tokens; ``documents``: entries of
    ``document_indices`` minus one, ``empty`` of them without a sequence."""

    sequences: int
    tokens: int
    documents: int
    empty: int


def merge_datasets(prefixes: list[str], bin_path: str, idx_path: str) -> MergeCounts:
    """Concatenate the pairs of ``prefixes`` (in order) into ``bin_path``/``idx_path``.

    Returns the counts of the result. All inputs must share one token dtype.
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
    document_indices = numpy.asarray(builder.document_indices)  # [documents + 1] sequence offsets
    empty = int(numpy.count_nonzero(numpy.diff(document_indices) == 0))
    return MergeCounts(len(builder.sequence_lengths), tokens, len(document_indices) - 1, empty)


def verify_dataset(prefix: str, sequences: int, tokens: int, documents: int | None = None) -> None:
    """Re-open ``prefix`` with megatron's reader and check its counts: ``sequences`` (entries of
    ``sequence_lengths``, one per document with text), ``tokens`` and, when given, ``documents``
    (entries of ``document_indices`` minus one, empty documents included)."""
    dataset = IndexedDataset(prefix, mmap=False)  # mmap cannot open the empty .bin of 0 tokens
    got = (len(dataset), int(numpy.sum(dataset.sequence_lengths, dtype=numpy.int64)), len(dataset.document_indices) - 1)
    want = (sequences, tokens, got[2] if documents is None else documents)
    if got != want:
        raise RuntimeError(
            f"{prefix}: wrote {want[0]} sequences / {want[1]} tokens / {want[2]} documents but "
            f"read back {got[0]} / {got[1]} / {got[2]}"
        )
