"""A save that fails on one rank only stops every rank with the same one-line error, in a 2-rank
world (DP=2): rank 0 cannot write the checkpoint's metadata (a full disk), or rank 1 cannot read
back its own shard for the manifest (an I/O error). Either way the other rank, which would
otherwise wait in the next collective until the process group's timeout, ends at once, and the
previous checkpoint stays the one the tracker names."""

import errno
import os

import pytest
import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.training import cli
from tests.model_helpers import shared_tmp
from tests.training.common import metadata_write_fails_in, trainer_args

FAILING = "iter_0000004.tmp"


def _shard_unreadable_in(monkeypatch, folder_name):
    from megatron_patch.checkpoint import manifest

    crc32_of = manifest.crc32_of

    def unreadable(path, **options):
        if os.path.basename(os.path.dirname(path)) == folder_name:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return crc32_of(path, **options)

    monkeypatch.setattr(manifest, "crc32_of", unreadable)


@pytest.mark.parametrize(
    "failing_rank, failing", [(0, metadata_write_fails_in), (1, _shard_unreadable_in)], ids=["metadata", "manifest"]
)
def test_a_save_failing_on_one_rank_stops_every_rank_with_one_line(
    world, tiny_corpus, tmp_path_factory, monkeypatch, capsys, caplog, failing_rank, failing
):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    save = os.path.join(shared_tmp(tmp_path_factory, f"failed-save-{failing_rank}"), "run")
    args = trainer_args(tiny_corpus, save, "--micro-batch-size", "2", "--eval-iters", "0", "--save-interval", "2")
    if dist.get_rank() == failing_rank:
        failing(monkeypatch, FAILING)
    capsys.readouterr()
    assert cli.main(args) == 2  # on both ranks
    expected = os.strerror(errno.ENOSPC if failing_rank == 0 else errno.EIO)
    if dist.get_rank() == 0:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: the save of ") and expected in err[0], err
        assert folders.read_tracker(save) == 2 and os.path.isdir(os.path.join(save, FAILING)), os.listdir(save)
    else:  # the other ranks log the same line
        assert "error: the save of " in caplog.text and expected in caplog.text, caplog.text[-2000:]
    dist.barrier()
