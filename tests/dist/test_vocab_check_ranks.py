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


@pytest.mark.parametrize(
    "failure, elsewhere",
    [(PermissionError(13, "Permission denied", "tiny.bin"), PermissionError), (ValueError("bad scan"), RuntimeError)],
    ids=["os-error", "bug"],
)
def test_a_failure_on_rank_zero_reaches_every_rank(world, tiny_corpus, tmp_path_factory, monkeypatch, failure, elsewhere):
    """An OSError (an unreadable file, a full disk) is the same OSError on every rank; anything else
    (a bug) is raised as itself on rank 0 and as a RuntimeError naming it on the others."""
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    prefix = tiny_corpus["prefix"]
    dtype = IndexedDataset(prefix).index.dtype

    def failing_scan(bin_path, dtype):
        raise failure

    monkeypatch.setattr(vocab_check, "scan_max_token_id", failing_scan)
    expected = type(failure) if dist.get_rank() == 0 else elsewhere
    with pytest.raises(expected, match=str(failure.args[-1])) as raised:
        vocab_check.check_vocab(prefix, dtype, 512, shared_tmp(tmp_path_factory, f"fresh_cache_{elsewhere.__name__}"))
    if isinstance(failure, OSError):
        assert raised.value.filename == "tiny.bin" and raised.value.errno == 13
