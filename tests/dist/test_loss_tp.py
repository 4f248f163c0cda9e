"""The K-target vocab-parallel cross-entropy at TP=2 (run under ``torchrun --nproc_per_node=2``).

Every rank builds the same full logits ``[s, b, V]`` from a fixed seed and takes its vocabulary
shard (the last dim split in two); the targets span both shards. The float64 reference sees the
full logits. Tolerances as in ``tests/unit/test_loss.py``: relative error 1e-6 for fp32 losses and
gradients and for bf16 losses (the reference uses the bf16-rounded logits); 2**-8 + 1e-6 for bf16
gradients, which autograd rounds to bf16 (half an ulp is at most 2**-8 of an element).
"""

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_patch.loss import vocab_parallel_patch_cross_entropy
from tests.loss_helpers import loss_and_grad
from tests.reference import reference_patch_loss_grad, reference_per_target_grad, relative_error

TP = 2
SEQ, BATCH, VOCAB = 4, 3, 64
SHARD = VOCAB // TP
FP32_TOL = 1e-6
BF16_GRAD_TOL = 2.0**-8 + FP32_TOL
DTYPES = [torch.float32, torch.bfloat16]
BOTH_VARIANTS = pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])


@pytest.fixture(scope="module")
def single_rank_group(world):
    """A process group holding only this rank: the TP=1 result inside the 2-rank world."""
    groups = [dist.new_group([rank]) for rank in range(world)]  # every rank creates every group
    return groups[dist.get_rank()]


@pytest.fixture
def tp2(model_parallel):
    model_parallel(TP, 1)
    assert parallel_state.get_tensor_model_parallel_world_size() == TP


def _full_logits(seed, dtype):
    """[s, b, V], identical on every rank; row 0 has a 3e4 spike (in shard 1 for batch 0, in
    shard 0 for batch 1) and row 1 sits at ~1e4: both overflow exp without the global max."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=gen) * 3.0
    logits[0, 0, SHARD + 5] = 3e4
    logits[0, 1, 3] = 3e4
    logits[1] = 1e4 + logits[1]
    return logits.to(dtype)


def _targets(seed, patch_size, ids=VOCAB):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, ids, (SEQ, BATCH, patch_size), generator=gen)
    if ids == VOCAB:
        targets[2, 0] = torch.randint(0, SHARD, (patch_size,), generator=gen)  # all in shard 0
        targets[2, 1] = torch.randint(SHARD, VOCAB, (patch_size,), generator=gen)  # all in shard 1
        targets[0, 0, 0] = SHARD + 5  # the spike, on the other shard than row 0 batch 1's max
        _assert_spans_both_shards(targets)
    return targets


def _assert_spans_both_shards(targets):
    assert (targets < SHARD).any() and (targets >= SHARD).any(), "targets must span both shards"


def _upstream(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * 2.0 - 0.5


def _shard(full):
    rank = parallel_state.get_tensor_model_parallel_rank()
    # [s, b, V] -> [s, b, V/tp]
    return full.chunk(TP, dim=-1)[rank].contiguous()


def _gather_vocab(shard):
    """[s, b, V/tp] on each rank -> [s, b, V]."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(TP)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _same_on_all_ranks(tensor):
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(TP)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return all(torch.equal(part, tensor) for part in parts)


def _run(logits, targets, upstream=None, mask=None, tp_group=None, fused=False):
    return loss_and_grad(logits.detach().clone().requires_grad_(True), targets, upstream, mask, tp_group, fused)


def _grad_tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL


@BOTH_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_tp2_per_target_matches_reference_and_tp1(tp2, single_rank_group, patch_size, dtype, fused):
    full = _full_logits(1, dtype)
    targets = _targets(2, patch_size)
    if patch_size > 1:
        targets[3, 2, :2] = torch.tensor([0, SHARD])  # local id 0 on both ranks: where off-rank targets sit
    upstream = _upstream(3, targets.shape)
    tp1_losses, tp1_grad = _run(full, targets, upstream, tp_group=single_rank_group, fused=fused)

    losses, grad_shard = _run(_shard(full), targets, upstream, fused=fused)
    assert losses.shape == (SEQ, BATCH, patch_size) and grad_shard.shape == (SEQ, BATCH, SHARD)
    assert torch.isfinite(losses).all() and torch.isfinite(grad_shard).all()
    assert _same_on_all_ranks(losses)
    grad = _gather_vocab(grad_shard)

    ref_losses, ref_grad = reference_per_target_grad(full, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)
    assert relative_error(losses, tp1_losses) <= FP32_TOL
    assert relative_error(grad, tp1_grad) <= _grad_tol(dtype)


@BOTH_VARIANTS
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_tp2_masked_patch_loss_with_duplicates(tp2, single_rank_group, patch_size, dtype, fused):
    full = _full_logits(4, dtype)
    # few ids on both shards, so the K targets of a position repeat ids held by either rank
    id_pool = torch.tensor([0, 2, SHARD, SHARD + 2])  # 0 and SHARD: local id 0, where off-rank targets sit
    targets = id_pool[_targets(5, patch_size, ids=len(id_pool))]
    targets[3, 0] = SHARD + 1  # every target of this position on the same id of shard 1
    gen = torch.Generator().manual_seed(6)
    mask = (torch.rand(SEQ, BATCH, patch_size, generator=gen) > 0.3).float()
    mask[3, 0] = 1.0
    mask[3, 1, 0] = 0.0
    _assert_spans_both_shards(targets[mask == 1])

    tp1_loss, tp1_grad = _run(full, targets, mask=mask, tp_group=single_rank_group, fused=fused)
    loss, grad_shard = _run(_shard(full), targets, mask=mask, fused=fused)
    assert _same_on_all_ranks(loss)
    grad = _gather_vocab(grad_shard)

    ref_loss, ref_grad = reference_patch_loss_grad(full, targets, mask)
    assert relative_error(loss, ref_loss) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)
    assert relative_error(loss, tp1_loss) <= FP32_TOL
    assert relative_error(grad, tp1_grad) <= _grad_tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_tp2_k1_equals_megatron_vocab_parallel_cross_entropy(tp2, dtype):
    shard = _shard(_full_logits(7, dtype))
    target = _targets(8, 1).squeeze(-1)  # [s, b]
    upstream = _upstream(9, target.shape)

    ours_leaf = shard.clone().requires_grad_(True)
    ours = vocab_parallel_patch_cross_entropy(ours_leaf.clone(), target.unsqueeze(-1))
    ours.backward(upstream.unsqueeze(-1))

    theirs_leaf = shard.clone().requires_grad_(True)
    theirs = vocab_parallel_cross_entropy(theirs_leaf.clone(), target)
    theirs.backward(upstream)

    assert torch.equal(ours.squeeze(-1), theirs)
    assert torch.equal(ours_leaf.grad, theirs_leaf.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_tp2_saves_one_fp32_softmax_shard(tp2, dtype):
    leaf = _shard(_full_logits(10, dtype)).requires_grad_(True)
    logits = leaf.clone()
    targets = _targets(11, 4)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        losses = vocab_parallel_patch_cross_entropy(logits, targets)
    logits_sized = [t for t in saved if t.numel() >= SEQ * BATCH * SHARD]
    shapes = [(tuple(t.shape), t.dtype) for t in saved]
    if dtype == torch.float32:
        # the input buffer itself, overwritten in place: no logits-sized copy
        assert logits_sized and all(t.data_ptr() == logits.data_ptr() for t in logits_sized), shapes
    else:
        assert len(logits_sized) == 1, shapes  # one fp32 copy, the softmax; no bf16 input kept
    assert all(t.shape == (SEQ, BATCH, SHARD) and t.dtype == torch.float32 for t in logits_sized)
    assert all(t.numel() <= SEQ * BATCH * 4 for t in saved if t.numel() < SEQ * BATCH * SHARD)
    losses.backward(_upstream(12, losses.shape))


@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 3])
def test_tp2_targets_outside_the_global_vocabulary_are_rejected(tp2, bad_id):
    targets = _targets(13, 2)
    targets[1, 2, 1] = bad_id
    with pytest.raises(ValueError) as excinfo:
        vocab_parallel_patch_cross_entropy(_shard(_full_logits(14, torch.float32)), targets)
    message = str(excinfo.value)
    assert "\n" not in message
    low, high = int(targets.min()), int(targets.max())
    # the vocabulary named is the global one, V = V/tp * tp, not this rank's shard
    assert f"[{low}, {high}]" in message and str(VOCAB) in message, message


def test_tp2_ids_of_the_last_shard_are_in_range(tp2):
    # ids in [V/tp, V) exceed a rank's shard size but are valid global ids
    targets = torch.full((SEQ, BATCH, 2), VOCAB - 1)
    targets[:, :, 0] = SHARD
    upstream = _upstream(15, targets.shape)
    full = _full_logits(16, torch.float32)
    losses, grad_shard = _run(_shard(full), targets, upstream)
    ref_losses, ref_grad = reference_per_target_grad(full, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(_gather_vocab(grad_shard), ref_grad) <= FP32_TOL
