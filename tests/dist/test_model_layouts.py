"""PatchGPTModel at K=4 across layouts (2 ranks): TP=2 equals TP=1, PP=2 equals PP=1, SP equals no SP,
and TP=2 with SP and fused RoPE in the core attention equals TP=1 with megatron's RoPE.

Weights move between layouts through dist_checkpointing (megatron's resharding); gradients are
compared the same way, each saved under its parameter's key and read back unsharded.
"""

import os

import pytest
import torch
import torch.distributed as dist

from tests import model_helpers as mh

PATCH_SIZE = 4


def _reference(tmp, patch_size=PATCH_SIZE):
    """TP=1 PP=1 run: saves its initial weights and gradients, returns its loss."""
    model = mh.build(1, 1)
    mh.save_weights(model, os.path.join(tmp, "weights"))
    loss = mh.train_forward_backward(model, mh.batches(patch_size), patch_size)
    mh.save_gradients(model, os.path.join(tmp, "grads_ref"))
    return loss


def _compare_gradients(tmp, name):
    reference, other = mh.plain(os.path.join(tmp, "grads_ref")), mh.plain(os.path.join(tmp, name))
    assert reference.keys() == other.keys()
    for key in reference:
        scale = reference[key].abs().max().clamp(min=1e-12)
        error = ((other[key] - reference[key]).abs().max() / scale).item()
        assert error < 1e-5, f"{key}: relative gradient error {error:.2e}"


@pytest.mark.parametrize(
    "layout",
    [dict(tp=2), dict(pp=2), dict(tp=2, sequence_parallel=True), dict(tp=2, sequence_parallel=True, fused_rope=True)],
    ids=["tp2", "pp2", "tp2-sp", "tp2-sp-fused-rope"],
)
def test_patch_mode_layout_equals_single_rank(world, tmp_path_factory, layout):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    tmp = mh.shared_tmp(tmp_path_factory, "layout")
    reference_loss = _reference(tmp)
    model = mh.build(
        layout.get("tp", 1),
        layout.get("pp", 1),
        sequence_parallel=layout.get("sequence_parallel", False),
        seed=999,
        fused_rope=layout.get("fused_rope", False),
    )
    mh.load_weights(model, os.path.join(tmp, "weights"))
    loss = mh.train_forward_backward(model, mh.batches(PATCH_SIZE), PATCH_SIZE)
    assert abs(loss - reference_loss) <= 1e-6 * abs(reference_loss), (loss, reference_loss)
    mh.save_gradients(model, os.path.join(tmp, "grads"))
    _compare_gradients(tmp, "grads")
    dist.barrier()


def test_data_parallel_equals_single_rank(world, tmp_path_factory):
    """DP=2 (one micro-batch per replica) equals one rank taking both micro-batches."""
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    tmp = mh.shared_tmp(tmp_path_factory, "dp")
    reference_loss = _reference(tmp)
    model = mh.build(1, 1, seed=999)
    mh.load_weights(model, os.path.join(tmp, "weights"))
    mine = mh.batches(PATCH_SIZE)[dist.get_rank()]
    loss = mh.train_forward_backward(model, [mine], PATCH_SIZE)
    # the schedule's totals are summed over replicas, so the loss is the global mean
    assert abs(loss - reference_loss) <= 1e-6 * abs(reference_loss)
    torch.distributed.barrier()
