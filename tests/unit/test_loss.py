"""The K-target vocab-parallel cross-entropy at TP=1 against the float64 reference of paper Eq. 2.

Tolerances (relative error = max|a - b| / max|b|, see ``reference.relative_error``):
* fp32 logits: 1e-6 on the losses and on the gradient.
* bf16 logits: the reference is evaluated on the bf16-rounded logits, so the only extra error is
  the gradient, which autograd returns in the input's dtype (bf16, 8 significant bits): rounding
  to nearest moves each element by at most half a bf16 ulp, which is at most 2**-8 of its
  magnitude, so we allow 2**-8 plus the fp32 bound (observed: 1.5e-3 to 3.0e-3). The losses are
  computed in fp32 from exactly representable inputs and keep the 1e-6 bound.
"""

import pytest
import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_patch.loss import vocab_parallel_patch_cross_entropy
from tests.loss_helpers import loss_and_grad
from tests.reference import (
    reference_patch_loss_grad,
    reference_per_target_grad,
    reference_per_target_loss,
    relative_error,
)

FP32_TOL = 1e-6
BF16_GRAD_TOL = 2.0**-8 + FP32_TOL
SEQ, BATCH, VOCAB = 5, 3, 64
PATCH_SIZES = [1, 2, 3, 4, 8]  # 3: an odd K
DTYPES = [torch.float32, torch.bfloat16]
BOTH_VARIANTS = pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])


def _logits(seed, dtype=torch.float32, shape=(SEQ, BATCH, VOCAB), scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _targets(seed, patch_size, vocab=VOCAB, shape=(SEQ, BATCH)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (*shape, patch_size), generator=gen)


def _upstream(seed, shape):
    # non-uniform and of both signs, so a wrong per-target weighting cannot cancel out
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) * 2.0 - 0.5


def _run(logits, targets, upstream=None, mask=None, fused=False):
    """Our loss on a fresh copy of ``logits`` (fp32 inputs are clobbered); returns loss, grad."""
    return loss_and_grad(logits.detach().clone().requires_grad_(True), targets, upstream, mask, fused=fused)


def _grad_tol(dtype):
    return FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL


# ---------------------------------------------------------------- against the float64 reference


def test_reference_agrees_with_torch_cross_entropy():
    # the oracle itself, against an independent implementation of the same formula
    logits = _logits(40).double()
    targets = _targets(41, 3)
    ref = reference_per_target_loss(logits, targets)
    for k in range(3):
        # [s, b, V] -> [s*b, V]
        expected = torch.nn.functional.cross_entropy(
            logits.view(-1, VOCAB), targets[..., k].reshape(-1), reduction="none"
        ).view(SEQ, BATCH)
        torch.testing.assert_close(ref[..., k], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", PATCH_SIZES)
@BOTH_VARIANTS
def test_per_target_loss_and_grad_match_reference(tp1, patch_size, dtype, fused):
    logits = _logits(1, dtype)
    targets = _targets(2, patch_size)
    targets_before = targets.clone()
    upstream = _upstream(3, targets.shape)
    losses, grad = _run(logits, targets, upstream, fused=fused)
    assert losses.shape == (SEQ, BATCH, patch_size) and losses.dtype == torch.float32
    assert grad.dtype == dtype
    ref_losses, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)
    torch.testing.assert_close(targets, targets_before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", PATCH_SIZES)
@BOTH_VARIANTS
def test_masked_patch_loss_and_grad_match_reference(tp1, patch_size, dtype, fused):
    logits = _logits(4, dtype)
    targets = _targets(5, patch_size)
    gen = torch.Generator().manual_seed(6)
    mask = (torch.rand(SEQ, BATCH, patch_size, generator=gen) > 0.3).float()
    mask[0, 0, 0] = 1.0
    loss, grad = _run(logits, targets, mask=mask, fused=fused)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    ref_loss, ref_grad = reference_patch_loss_grad(logits, targets, mask)
    assert relative_error(loss, ref_loss) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)


@BOTH_VARIANTS
def test_bf16_logits_are_left_untouched(tp1, fused):
    logits = _logits(7, torch.bfloat16).requires_grad_(True)
    before = logits.detach().clone()
    losses = vocab_parallel_patch_cross_entropy(logits, _targets(8, 4), fused=fused)
    losses.backward(_upstream(9, losses.shape))
    torch.testing.assert_close(logits.detach(), before, rtol=0, atol=0)


# ---------------------------------------------------------------- duplicates and masks


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("patch_size", [2, 4, 8])
@BOTH_VARIANTS
def test_all_targets_equal_counts_every_duplicate(tp1, patch_size, dtype, fused):
    logits = _logits(10, dtype)
    gen = torch.Generator().manual_seed(11)
    one_id = torch.randint(0, VOCAB, (SEQ, BATCH, 1), generator=gen)
    targets = one_id.expand(SEQ, BATCH, patch_size).contiguous()
    upstream = _upstream(12, targets.shape)
    losses, grad = _run(logits, targets, upstream, fused=fused)
    ref_losses, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)
    # explicitly: d/dz = (sum_k g_k) * (softmax - onehot(id)); one subtraction per duplicate
    weight = upstream.double().sum(-1, keepdim=True)  # [s, b, 1]
    softmax = torch.softmax(logits.double(), dim=-1)
    expected = weight * (softmax - torch.nn.functional.one_hot(one_id.squeeze(-1), VOCAB).double())
    assert relative_error(grad, expected) <= _grad_tol(dtype)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
@BOTH_VARIANTS
def test_many_duplicates_with_masks_match_reference(tp1, patch_size, fused):
    logits = _logits(13)
    targets = _targets(14, patch_size, vocab=3)  # ids 0..2 only: most rows repeat ids
    gen = torch.Generator().manual_seed(15)
    mask = (torch.rand(SEQ, BATCH, patch_size, generator=gen) > 0.4).float()
    mask[0, 0, 0] = 1.0
    loss, grad = _run(logits, targets, mask=mask, fused=fused)
    ref_loss, ref_grad = reference_patch_loss_grad(logits, targets, mask)
    assert relative_error(loss, ref_loss) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= FP32_TOL


@pytest.mark.parametrize("patch_size", [1, 4])
@BOTH_VARIANTS
def test_masked_targets_contribute_nothing(tp1, patch_size, fused):
    logits = _logits(16)
    targets = _targets(17, patch_size)
    mask = torch.ones(SEQ, BATCH, patch_size)
    mask[1, 0, :] = 0.0
    mask[2, 2, -1] = 0.0
    mask[4, 1, 0] = 0.0
    loss, grad = _run(logits, targets, mask=mask, fused=fused)
    # another id in every masked slot: the patch loss and the gradient do not move, bit for bit
    moved = targets.clone()
    moved[mask == 0] = (moved[mask == 0] + 17) % VOCAB
    moved_loss, moved_grad = _run(logits, moved, mask=mask, fused=fused)
    assert torch.equal(loss, moved_loss) and torch.equal(grad, moved_grad)
    # a fully masked position gets no gradient at all
    assert torch.count_nonzero(grad[1, 0]) == 0
    ref_loss, ref_grad = reference_patch_loss_grad(logits, targets, mask)
    assert relative_error(loss, ref_loss) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= FP32_TOL


@BOTH_VARIANTS
def test_everything_masked_gives_zero_loss_and_grad(tp1, fused):
    loss, grad = _run(_logits(18), _targets(19, 4), mask=torch.zeros(SEQ, BATCH, 4), fused=fused)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------- large logits


def _large_logits(dtype):
    """Rows that overflow a naive exp: ~1e4 with noise, spread of 1e4, one 3e4 spike."""
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(4, 2, VOCAB, generator=gen)
    logits[0] = 1e4 + logits[0]  # all ~1e4
    logits[1] = 1e4 * logits[1]  # values up to a few 1e4, both signs
    logits[2, :, 5] = 3e4  # one 3e4 entry in an ordinary row
    logits[3] = -1e4 + logits[3]
    logits[3, 0, 40] = 3e4
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@BOTH_VARIANTS
def test_large_logits_are_finite_and_match_reference(tp1, dtype, fused):
    logits = _large_logits(dtype)
    targets = _targets(21, 4, shape=(4, 2))
    targets[2, 0] = torch.tensor([5, 5, 6, 0])  # the spike itself, twice, and two others
    targets[3, 0, 0] = 40
    upstream = _upstream(22, targets.shape)
    losses, grad = _run(logits, targets, upstream, fused=fused)
    assert torch.isfinite(losses).all() and torch.isfinite(grad).all()
    ref_losses, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)
    # the spike: ~0 loss when targeted, ~3e4 - z otherwise
    assert losses[2, 0, 0].item() == pytest.approx(0.0, abs=1e-3)
    assert losses[2, 0, 2].item() > 2e4

    mask = torch.ones_like(losses)
    mask[0, 1] = 0.0
    loss, grad = _run(logits, targets, mask=mask, fused=fused)
    ref_loss, ref_grad = reference_patch_loss_grad(logits, targets, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert relative_error(loss, ref_loss) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= _grad_tol(dtype)


# ---------------------------------------------------------------- K=1 is stock megatron


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_k1_equals_megatron_vocab_parallel_cross_entropy(tp1, dtype):
    logits = _logits(23, dtype)
    target = _targets(24, 1).squeeze(-1)  # [s, b]
    upstream = _upstream(25, target.shape)

    ours_leaf = logits.clone().requires_grad_(True)
    ours = vocab_parallel_patch_cross_entropy(ours_leaf.clone(), target.unsqueeze(-1))
    ours.backward(upstream.unsqueeze(-1))

    theirs_leaf = logits.clone().requires_grad_(True)
    theirs = vocab_parallel_cross_entropy(theirs_leaf.clone(), target)
    theirs.backward(upstream)

    assert ours.shape == (SEQ, BATCH, 1)
    assert torch.equal(ours.squeeze(-1), theirs)
    assert torch.equal(ours_leaf.grad, theirs_leaf.grad)


@pytest.mark.parametrize(
    "patch_size",
    [
        1,
        4,
    ],
)
@BOTH_VARIANTS
def test_non_contiguous_targets(tp1, patch_size, fused):
    logits = _logits(26)
    # [b, s, K] -> [s, b, K]: the layout megatron's [b, s] labels have before .contiguous()
    targets = _targets(27, patch_size, shape=(BATCH, SEQ)).transpose(0, 1)
    assert not targets.is_contiguous()
    upstream = _upstream(28, targets.shape)
    losses, grad = _run(logits, targets, upstream, fused=fused)
    ref_losses, ref_grad = reference_per_target_grad(logits, targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= FP32_TOL


# ---------------------------------------------------------------- one softmax buffer


def _saved_during(fn):
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, saved


@pytest.mark.parametrize("patch_size", [1, 4])
def test_bf16_saves_one_fp32_softmax(tp1, patch_size):
    logits = _logits(29, torch.bfloat16).requires_grad_(True)
    targets = _targets(30, patch_size)
    losses, saved = _saved_during(lambda: vocab_parallel_patch_cross_entropy(logits, targets))
    logits_sized = [t for t in saved if t.numel() >= SEQ * BATCH * VOCAB]
    assert len(logits_sized) == 1, [(tuple(t.shape), t.dtype) for t in saved]
    assert logits_sized[0].shape == (SEQ, BATCH, VOCAB) and logits_sized[0].dtype == torch.float32
    # the rest is per-target bookkeeping, [s, b, K]
    assert all(t.numel() <= SEQ * BATCH * patch_size for t in saved if t is not logits_sized[0])
    # and the saved buffer is the softmax
    torch.testing.assert_close(logits_sized[0], torch.softmax(logits.detach().float(), -1), rtol=1e-6, atol=1e-7)
    losses.backward(_upstream(31, losses.shape))


@pytest.mark.parametrize("patch_size", [1, 4])
def test_fp32_saves_no_logits_sized_tensor_but_the_input(tp1, patch_size):
    leaf = _logits(32).requires_grad_(True)
    logits = leaf.clone()
    targets = _targets(33, patch_size)
    losses, saved = _saved_during(lambda: vocab_parallel_patch_cross_entropy(logits, targets))
    logits_sized = [t for t in saved if t.numel() >= SEQ * BATCH * VOCAB]
    assert logits_sized, [(tuple(t.shape), t.dtype) for t in saved]
    # the softmax kept for backward is the input buffer itself, overwritten in place: no copy
    assert all(t.data_ptr() == logits.data_ptr() for t in logits_sized)
    others = [t for t in saved if t.numel() < SEQ * BATCH * VOCAB]
    assert all(t.numel() <= SEQ * BATCH * patch_size for t in others)
    losses.backward(_upstream(34, losses.shape))


# ---------------------------------------------------------------- confident targets


@BOTH_VARIANTS
@pytest.mark.parametrize("patch_size", [1, 4])
def test_bf16_gradient_at_confident_targets_keeps_fp32_accuracy(tp1, patch_size, fused):
    """Where the softmax nearly equals the weight on the target (a confident prediction, all K
    targets on one id), softmax * sum(g) - sum(g) nearly cancels. Both variants subtract in fp32
    before rounding to bf16, so each gradient element at a target is within half a bf16 ulp of the
    float64 value (relative 2**-8); rounding first would leave errors of the order of the result."""
    logits = _logits(53, torch.bfloat16)
    one_id = _targets(54, 1)
    logits.scatter_(-1, one_id, 16.0)  # softmax at the target: ~0.999
    targets = one_id.expand(SEQ, BATCH, patch_size).contiguous()
    upstream = _upstream(55, targets.shape)
    _, grad = _run(logits, targets, upstream, fused=fused)
    _, ref_grad = reference_per_target_grad(logits, targets, upstream)
    at_target, ref_at_target = (torch.gather(g.double(), -1, one_id) for g in (grad, ref_grad))  # [s, b, 1]
    assert ((at_target - ref_at_target).abs() <= 2.0**-8 * ref_at_target.abs()).all()
    assert relative_error(grad, ref_grad) <= BF16_GRAD_TOL


# ---------------------------------------------------------------- bad input


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    return message


@BOTH_VARIANTS
@pytest.mark.parametrize("bad_id", [-3, VOCAB, VOCAB + 7])
def test_target_outside_vocabulary_is_rejected(tp1, bad_id, fused):
    logits = _logits(35)
    before = logits.clone()
    targets = _targets(36, 4)
    targets[2, 1, 3] = bad_id
    low, high = int(targets.min()), int(targets.max())
    with pytest.raises(ValueError) as excinfo:
        vocab_parallel_patch_cross_entropy(logits, targets, fused=fused)
    message = _one_line(excinfo)
    assert f"[{low}, {high}]" in message and str(VOCAB) in message, message
    # rejected before anything is computed: the fp32 logits are not clobbered
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


@BOTH_VARIANTS
def test_targets_at_the_vocabulary_edges_are_accepted(tp1, fused):
    targets = _targets(37, 2)
    targets[0, 0] = torch.tensor([0, VOCAB - 1])
    upstream = _upstream(38, targets.shape)
    losses, grad = _run(_logits(39), targets, upstream, fused=fused)
    ref_losses, ref_grad = reference_per_target_grad(_logits(39), targets, upstream)
    assert relative_error(losses, ref_losses) <= FP32_TOL
    assert relative_error(grad, ref_grad) <= FP32_TOL


@pytest.mark.parametrize(
    "logits_shape, targets_shape",
    [
        ((SEQ * BATCH, VOCAB), (SEQ, BATCH, 2)),  # 2-D logits
        ((SEQ, BATCH, VOCAB), (SEQ, BATCH)),  # 2-D targets
        ((SEQ, BATCH, VOCAB), (SEQ + 1, BATCH, 2)),  # another sequence length
        ((SEQ, BATCH, VOCAB), (SEQ, BATCH + 1, 2)),  # another batch
    ],
)
def test_mismatched_shapes_are_rejected(tp1, logits_shape, targets_shape):
    with pytest.raises(ValueError) as excinfo:
        vocab_parallel_patch_cross_entropy(torch.zeros(logits_shape), torch.zeros(targets_shape, dtype=torch.long))
    message = _one_line(excinfo)
    assert str(tuple(logits_shape)) in message and str(tuple(targets_shape)) in message, message
