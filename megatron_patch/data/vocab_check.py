"""The vocabulary check of an indexed dataset: every token id must be below the tokenizer's size.

Finding a ``.bin``'s largest token id means reading the whole file: milliseconds on the bundled
corpus, minutes on hundreds of GB. So the file is scanned once and its largest id kept in a small
JSON record beside megatron's index cache (``<cache folder>/<key>-max_token_id.json``), keyed by
the ``.bin``'s absolute path, size, modification time and dtype; a resume, the token stage or an
evaluation of the same file reads the record instead. A changed file has another key and is
scanned again; a record that cannot be read or written only costs a scan.

With torch.distributed initialised, rank 0 alone reads or scans and broadcasts the result, so a
job of many ranks reads the file once and every rank raises the same error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import numpy

from megatron_patch.errors import DataError
from megatron_patch.runtime import atomic_file
from megatron_patch.runtime.rank_zero import on_rank_zero

logger = logging.getLogger(__name__)

RECORD_SUFFIX = "-max_token_id.json"
SCAN_CHUNK = 1 << 24
"""Token ids read per step of the scan (a bounded window of the memory-mapped file)."""


def check_vocab(prefix: str, dtype, vocab_size: int, cache_folder: str) -> None:
    """Raise DataError when ``prefix.bin`` holds a token id >= ``vocab_size``.

    Args:
        prefix: dataset path without ``.bin``/``.idx``.
        dtype: the token dtype of the ``.bin`` (``IndexedDataset.index.dtype``).
        vocab_size: the tokenizer's vocabulary size.
        cache_folder: where the max-id record is kept (megatron's index cache folder).
    """
    largest = on_rank_zero(max_token_id, prefix, dtype, cache_folder)
    if largest >= vocab_size:
        raise DataError(
            f"'{prefix}' holds token id {largest} but the tokenizer has only {vocab_size} ids; "
            f"use the tokenizer the data was preprocessed with, or re-run tools/preprocess_data.py"
        )


def max_token_id(prefix: str, dtype, cache_folder: str) -> int:
    """The largest token id of ``prefix.bin``: from its record in ``cache_folder``, else scanned
    (and the record written)."""
    bin_path = os.path.abspath(prefix + ".bin")
    status = os.stat(bin_path)
    key = {"bin": bin_path, "bytes": status.st_size, "mtime_ns": status.st_mtime_ns, "dtype": numpy.dtype(dtype).name}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    record_path = os.path.join(cache_folder, digest + RECORD_SUFFIX)
    recorded = _read_record(record_path, key)
    if recorded is not None:
        logger.info(f"{prefix}: max token id {recorded} (recorded in {record_path})")
        return recorded
    start = time.time()
    largest = scan_max_token_id(bin_path, dtype)
    logger.info(f"{prefix}: max token id {largest} ({time.time() - start:.2f} s to scan)")
    _write_record(record_path, dict(key, max_token_id=largest))
    return largest


def scan_max_token_id(bin_path: str, dtype) -> int:
    """The largest token id of a ``.bin`` file, read in windows of SCAN_CHUNK ids (0 if empty)."""
    if os.path.getsize(bin_path) == 0:
        return 0
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    try:
        return max(int(tokens[i : i + SCAN_CHUNK].max()) for i in range(0, len(tokens), SCAN_CHUNK))
    finally:
        del tokens


def _read_record(record_path: str, key: dict):
    """The recorded max id when the record exists and matches ``key``; None otherwise."""
    try:
        with open(record_path, encoding="utf-8") as handle:
            record = json.load(handle)
        if all(record.get(name) == value for name, value in key.items()):
            return int(record["max_token_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _write_record(record_path: str, record: dict) -> None:
    """Write the record atomically (a temporary name, then a rename); a failure only logs."""
    try:
        os.makedirs(os.path.dirname(record_path), exist_ok=True)
        atomic_file.write_json(record_path, record)
    except OSError as error:
        logger.warning(
            f"could not record the max token id in {record_path} ({error}); the next run scans the file again"
        )
