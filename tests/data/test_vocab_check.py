"""The vocabulary check: the largest token id is scanned once per .bin and then read from its record."""

import json
import os
import shutil

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_patch.data import vocab_check
from megatron_patch.errors import DataError


@pytest.fixture
def prefix(corpus_prefix, tmp_path):
    """A private copy of the preprocessed corpus (so the test may touch and rewrite it)."""
    copy = str(tmp_path / "data" / "corpus_text_document")
    os.makedirs(os.path.dirname(copy))
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpus_prefix + suffix, copy + suffix)
    return copy


def _true_max(prefix):
    dataset = IndexedDataset(prefix)
    return int(numpy.fromfile(prefix + ".bin", dtype=dataset.index.dtype).max()), dataset.index.dtype


def test_scanned_once_then_read_from_the_record(prefix, tmp_path, counted_scans):
    largest, dtype = _true_max(prefix)
    cache = str(tmp_path / "cache")
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    assert len(counted_scans) == 1
    assert [name for name in os.listdir(cache) if name.endswith(vocab_check.RECORD_SUFFIX)]

    stat = os.stat(prefix + ".bin")  # the same file rewritten: a new record, a new scan
    os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    assert len(counted_scans) == 2


def test_a_changed_file_is_scanned_again(prefix, tmp_path):
    largest, dtype = _true_max(prefix)
    cache = str(tmp_path / "cache")
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    tokens = numpy.fromfile(prefix + ".bin", dtype=dtype)
    tokens[len(tokens) // 2] = largest + 7
    tokens.tofile(prefix + ".bin")
    stat = os.stat(prefix + ".bin")
    os.utime(prefix + ".bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest + 7
    with pytest.raises(DataError) as info:
        vocab_check.check_vocab(prefix, dtype, largest + 7, cache)
    message = str(info.value)
    assert prefix in message and f"token id {largest + 7}" in message and "tools/preprocess_data.py" in message
    vocab_check.check_vocab(prefix, dtype, largest + 8, cache)


def test_a_corrupt_or_unwritable_record_only_costs_a_scan(prefix, tmp_path, counted_scans):
    largest, dtype = _true_max(prefix)
    cache = str(tmp_path / "cache")
    vocab_check.max_token_id(prefix, dtype, cache)
    (record,) = [os.path.join(cache, n) for n in os.listdir(cache)]
    with open(record, "w") as handle:
        handle.write("{not json")
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    assert len(counted_scans) == 2
    with open(record) as handle:  # a record of another file under this name is not trusted
        stranger = json.load(handle)
    stranger.update(bin="/elsewhere/other.bin", max_token_id=0)
    with open(record, "w") as handle:
        json.dump(stranger, handle)
    assert vocab_check.max_token_id(prefix, dtype, cache) == largest
    assert len(counted_scans) == 3
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    assert vocab_check.max_token_id(prefix, dtype, str(blocked / "cache")) == largest  # makedirs fails
    assert len(counted_scans) == 4


def test_the_scan_reads_in_windows(prefix, monkeypatch):
    largest, dtype = _true_max(prefix)
    monkeypatch.setattr(vocab_check, "SCAN_CHUNK", 7)
    assert vocab_check.scan_max_token_id(prefix + ".bin", dtype) == largest
