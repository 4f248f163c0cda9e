"""A NaN gradient on one data-parallel rank only, with a finite loss, in a 2-rank world: the
verdict is all-reduced, so both ranks stop before the update with exit code 1, rank 0 prints one
line, and no checkpoint of the bad step is written (a check of each rank's local gradients, as
megatron's DDP offers, stops only the rank that sees the NaN while the other waits in the
gradient reduction)."""

import pytest
import torch
import torch.distributed as dist

from megatron_patch.checkpoint import folders
from megatron_patch.training import builders, cli
from tests.model_helpers import shared_tmp
from tests.training.common import train_records, trainer_args


def test_a_nan_gradient_on_one_rank_stops_every_rank_alike(world, tiny_corpus, tmp_path_factory, capsys, monkeypatch):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    build, backwards = builders.build_model_chunks, []

    def nan_on_rank_1_from_the_third_backward(gradient):
        backwards.append(1)
        return gradient * float("nan") if dist.get_rank() == 1 and len(backwards) >= 3 else gradient

    def chunks_with_a_nan_gradient(*args, **kwargs):
        chunks = build(*args, **kwargs)
        next(chunks[0].parameters()).register_hook(nan_on_rank_1_from_the_third_backward)
        return chunks

    monkeypatch.setattr(builders, "build_model_chunks", chunks_with_a_nan_gradient)
    save = shared_tmp(tmp_path_factory, "nan-on-one-rank")
    argv = trainer_args(tiny_corpus, save, "--micro-batch-size", "2", "--save-interval", "1", "--eval-iters", "0")
    capsys.readouterr()
    assert cli.main(argv) == 1  # on both ranks
    if dist.get_rank() != 0:
        return
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a gradient is NaN or Inf (the loss, "), err
    records = train_records(save)
    assert sorted(records) == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert folders.read_tracker(str(save)) == 2
