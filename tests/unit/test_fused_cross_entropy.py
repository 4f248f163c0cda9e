"""The fused K-way cross-entropy (``fused_cross_entropy``, ``--cross-entropy-fusion``) beyond what
it shares with the unfused one: every reference test of ``test_loss.py`` runs for both variants;
here, what it keeps for backward, K=1 against megatron's CE, and its compiled kernels."""

import pytest
import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_patch.loss import vocab_parallel_patch_cross_entropy
from tests import model_helpers as mh
from tests.reference import reference_per_target_grad, relative_error
from tests.unit.test_loss import (
    BATCH,
    BF16_GRAD_TOL,
    DTYPES,
    FP32_TOL,
    SEQ,
    VOCAB,
    _grad_tol,
    _logits,
    _run,
    _saved_during,
    _targets,
    _upstream,
)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", [1, 4])
def test_fused_keeps_only_the_logits_and_modifies_nothing(tp1, patch_size, dtype):
    """No fp32 logits-sized buffer: the one logits-sized tensor kept for backward is the input
    itself, unchanged through forward and backward; the rest is per-row or per-target."""
    logits = _logits(50, dtype).requires_grad_(True)
    before = logits.detach().clone()
    targets = _targets(51, patch_size)
    losses, saved = _saved_during(lambda: vocab_parallel_patch_cross_entropy(logits, targets, fused=True))
    logits_sized = [t for t in saved if t.numel() >= SEQ * BATCH * VOCAB]
    assert [(t.data_ptr(), t.dtype) for t in logits_sized] == [(logits.data_ptr(), dtype)]
    assert all(t.numel() <= SEQ * BATCH * patch_size for t in saved if t is not logits_sized[0])
    losses.backward(_upstream(52, losses.shape))
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_fused_k1_matches_megatron_within_rounding(tp1, dtype):
    """Not bit for bit (the unfused variant is): the same losses to fp32 rounding, gradients to
    the gradient dtype's rounding."""
    logits = _logits(56, dtype)
    target = _targets(57, 1).squeeze(-1)  # [s, b]
    upstream = _upstream(58, target.shape)
    ours, ours_grad = _run(logits, target.unsqueeze(-1), upstream.unsqueeze(-1), fused=True)
    theirs_leaf = logits.clone().requires_grad_(True)
    theirs = vocab_parallel_cross_entropy(theirs_leaf.clone(), target)
    theirs.backward(upstream)
    assert relative_error(ours.squeeze(-1), theirs) <= FP32_TOL
    assert relative_error(ours_grad, theirs_leaf.grad) <= _grad_tol(dtype)


def test_compiled_fused_kernels_match_eager(tp1, monkeypatch):
    """Outside the tests (which run with dynamo off) megatron's jit_fuser compiles the fused
    variant's element-wise parts; compiled explicitly here, they give the eager results to fp32
    rounding before the bf16 cast."""
    logits, targets = _logits(59, torch.bfloat16), _targets(60, 4)
    upstream = _upstream(61, targets.shape)
    eager_losses, eager_grad = _run(logits, targets, upstream, fused=True)
    mh.compile_fused_kernels(monkeypatch)
    compiled_losses, compiled_grad = _run(logits, targets, upstream, fused=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 3
    assert relative_error(compiled_losses, eager_losses) <= FP32_TOL
    assert relative_error(compiled_grad, eager_grad) <= 2.0**-8  # at most a flipped last bf16 bit
    _, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(compiled_grad, ref_grad) <= BF16_GRAD_TOL


@pytest.mark.gpu
def test_fused_on_gpu_compiled_matches_reference(tp1, monkeypatch):
    """The fused variant as it runs in GPU training: bf16 logits at a 32k vocabulary, compiled."""
    mh.compile_fused_kernels(monkeypatch)
    logits = _logits(62, torch.bfloat16, shape=(64, 2, 32000)).cuda()
    targets = _targets(63, 4, vocab=32000, shape=(64, 2)).cuda()
    upstream = _upstream(64, targets.shape).cuda()
    losses, grad = _run(logits, targets, upstream, fused=True)
    unfused_losses, unfused_grad = _run(logits, targets, upstream)
    ref_losses, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL and relative_error(grad, ref_grad) <= BF16_GRAD_TOL
    assert relative_error(grad, unfused_grad) <= BF16_GRAD_TOL and grad.dtype == torch.bfloat16
