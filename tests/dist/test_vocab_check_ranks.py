"""The vocabulary check in a 2-rank world: rank 0 alone reads the .bin, every rank gets its verdict."""

import pytest
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_patch.data import vocab_check
from megatron_patch.errors import DataError
from tests.model_helpers import shared_tmp


def test_rank_zero_scans_once_and_every_rank_gets_the_error(world, tiny_corpus, tmp_path_factory, counted_scans):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    prefix = tiny_corpus["prefix"]
    dtype = IndexedDataset(prefix).index.dtype
    cache = shared_tmp(tmp_path_factory, "vocab_cache")
    vocab_check.check_vocab(prefix, dtype, 512, cache)
    with pytest.raises(DataError, match="holds token id"):
        vocab_check.check_vocab(prefix, dtype, 10, cache)
    assert len(counted_scans) == (1 if dist.get_rank() == 0 else 0)


def test_a_failure_on_rank_zero_reaches_every_rank(world, tiny_corpus, tmp_path_factory, monkeypatch):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    prefix = tiny_corpus["prefix"]
    dtype = IndexedDataset(prefix).index.dtype

    def unreadable(bin_path, dtype):
        raise PermissionError(13, "Permission denied", bin_path)

    monkeypatch.setattr(vocab_check, "scan_max_token_id", unreadable)
    expected = PermissionError if dist.get_rank() == 0 else RuntimeError
    with pytest.raises(expected, match="Permission denied"):
        vocab_check.check_vocab(prefix, dtype, 512, shared_tmp(tmp_path_factory, "fresh_cache"))
