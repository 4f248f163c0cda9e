"""Runs the K-way cross-entropy the way every loss test does, on a leaf it can differentiate."""

import torch

from megatron_patch.loss import vocab_parallel_patch_cross_entropy


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``losses`` over entries where ``mask`` is 1 (any matching shape): the patch loss."""
    mask = mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


def loss_and_grad(leaf, targets, upstream=None, mask=None, tp_group=None, fused=False):
    """Our loss on a copy of ``leaf`` (fp32 inputs are clobbered), then backward.

    With ``mask``: the masked patch loss (a scalar) and d loss / d leaf. Without: the per-target
    losses ``[s, b, K]`` and their gradient against ``upstream``. ``fused``: the fused variant
    (``--cross-entropy-fusion``).
    """
    losses = vocab_parallel_patch_cross_entropy(leaf.clone(), targets, tp_group=tp_group, fused=fused)
    if mask is not None:
        loss = masked_mean(losses, mask)
        loss.backward()
        return loss.detach(), leaf.grad
    losses.backward(upstream)
    return losses.detach(), leaf.grad
