"""Every rank must read the same corpus: a node whose copy of the --data-path files differs (here
rank 1 reads a copy with one document fewer) stops the run on every rank with the same one-line
error before anything trains, instead of training that rank on other samples."""

import pytest
import torch.distributed as dist

from megatron_patch.training import cli
from tests.training.common import copy_corpus, trainer_args


def test_a_rank_reading_another_corpus_stops_every_rank(world, tiny_corpus, tmp_path, capsys):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    corpus = tiny_corpus
    if dist.get_rank() == 1:  # a stale copy on the second node
        corpus = dict(tiny_corpus, prefix=copy_corpus(tiny_corpus["prefix"], tmp_path / "stale" / "tiny", drop_last=1))
    capsys.readouterr()
    assert cli.main(trainer_args(corpus, None, "--micro-batch-size", "2", "--eval-iters", "0")) == 2  # both ranks
    if dist.get_rank() == 0:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds another corpus on rank 1" in err[0], err
        assert err[0].endswith("give every node the same files"), err
