"""Pipeline stages initialise from their own random streams (2 ranks, PP=2): stage 1's decoder
layers are not drawn from the numbers stage 0's layers were drawn from (Megatron-LM seeds each
stage with seed + 100 x its pipeline rank), and a stage rebuilt with the same seed is the same."""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tests import model_helpers as mh


def _decoder_matrices(seed):
    """This stage's decoder weight matrices ``{local name: tensor}`` (norm weights, all ones, left out)."""
    model = mh.build(1, 2, seed=seed, ddp=False)
    return {name: param.detach().clone() for name, param in model.decoder.named_parameters() if param.dim() == 2}


def test_pipeline_stages_do_not_share_initial_weights(world):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    mine = _decoder_matrices(seed=1234)
    assert parallel_state.get_pipeline_model_parallel_world_size() == 2
    stages = [None, None]
    dist.all_gather_object(stages, (parallel_state.get_pipeline_model_parallel_rank(), mine))
    first, second = (weights for _, weights in sorted(stages, key=lambda stage: stage[0]))
    assert first.keys() == second.keys() and first  # local layer names: decoder.layers.0 on both stages
    for name in first:
        assert not torch.equal(first[name], second[name]), name
    # stage 1's values reappear in stage 0's only by chance (float32 draws of one distribution: about
    # 0.1% here); from one shared stream, two thirds of them were copies
    values_first = torch.cat([w.flatten() for w in first.values()])
    values_second = torch.cat([w.flatten() for w in second.values()])
    shared = torch.isin(values_second, values_first).float().mean().item()
    assert shared < 1e-2, f"{shared:.1%} of stage 1's initial decoder values also appear in stage 0"
    again = _decoder_matrices(seed=1234)
    for name, weight in mine.items():
        assert torch.equal(again[name], weight), name
