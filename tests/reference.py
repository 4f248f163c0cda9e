"""Float64 reference implementations of the patch-level method, written plainly from the paper.

These are the oracle of the tests: no megatron, no in-place tricks, no fused kernels, only the
formulas of Shao et al. 2024 (paper Eq. 1 and Eq. 2) evaluated in float64 on full (unsharded)
tensors, with gradients from float64 autograd.

* Aggregation (Eq. 1): patch i is the mean of token embeddings iK .. iK+K-1.
* Targets: a sample of ``K*T + 1`` tokens x_0..x_{KT} gives ``labels[j] = x_{j+1}``; the output at
  patch i is scored against the K tokens of patch i+1, x_{(i+1)K} .. x_{(i+1)K+K-1}. A patch whose K
  targets are not all inside the sample (the last one when K > 1) is not scored.
* Loss (Eq. 2): one softmax per position, ``loss_k = logsumexp(z) - z[target_k]`` for each of the
  K targets; the patch loss is the mean of ``loss_k`` over the scored targets.
"""

from typing import List, Optional, Sequence, Tuple

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` in float64 (0 when both are all zeros)."""
    actual = actual.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def reference_per_target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target cross-entropy ``logsumexp(z) - z[target_k]`` in float64.

    Args:
        logits: ``[s, b, V]`` full-vocabulary logits (any float dtype; cast to float64, so
            gradients flow back to a float64 leaf unchanged).
        targets: ``[s, b, K]`` token ids in ``[0, V)``; duplicates allowed.

    Returns:
        ``[s, b, K]`` float64 losses.
    """
    z = logits.to(torch.float64)
    # [s, b, V] -> [s, b, 1]
    log_normaliser = torch.logsumexp(z, dim=-1, keepdim=True)
    losses = []
    for k in range(targets.size(-1)):
        # [s, b, V] -> [s, b, 1]: the logit of target k at every position
        target_logit = torch.gather(z, -1, targets[..., k : k + 1].long())
        losses.append(log_normaliser - target_logit)
    # K x [s, b, 1] -> [s, b, K]
    return torch.cat(losses, dim=-1)


def reference_patch_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The patch loss: mean of the per-target losses over the scored (``mask == 1``) targets.

    Args:
        logits: ``[s, b, V]`` full-vocabulary logits (cast to float64).
        targets: ``[s, b, K]`` token ids.
        mask: ``[s, b, K]`` 1 = scored, 0 = skipped.

    Returns:
        float64 scalar; 0 when nothing is scored.
    """
    losses = reference_per_target_loss(logits, targets)
    mask = mask.to(torch.float64)
    total = (losses * mask).sum()
    count = mask.sum()
    return total / count if count.item() > 0 else total * 0.0


def reference_per_target_grad(
    logits: torch.Tensor, targets: torch.Tensor, upstream: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-target losses and ``d/dz sum(upstream * loss)`` by float64 autograd.

    Args:
        logits: ``[s, b, V]`` full-vocabulary logits (values are taken as they are, in float64).
        targets: ``[s, b, K]`` token ids.
        upstream: ``[s, b, K]`` gradient arriving at the per-target losses.

    Returns:
        (losses ``[s, b, K]``, grad ``[s, b, V]``), both float64.
    """
    z = logits.detach().to(torch.float64).requires_grad_(True)
    losses = reference_per_target_loss(z, targets)
    (losses * upstream.to(torch.float64)).sum().backward()
    return losses.detach(), z.grad


def reference_patch_loss_grad(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch loss and its gradient ``d loss / dz`` by float64 autograd.

    Returns:
        (scalar loss, grad ``[s, b, V]``), both float64.
    """
    z = logits.detach().to(torch.float64).requires_grad_(True)
    loss = reference_patch_loss(z, targets, mask)
    loss.backward()
    return loss.detach(), z.grad


def reference_patch_targets(
    tokens: Sequence[int], patch_size: int, loss_mask: Optional[Sequence[float]] = None
) -> Tuple[List[List[Optional[int]]], List[List[float]]]:
    """Next-patch targets of one sample, by plain loops.

    Args:
        tokens: the sample x_0..x_{KT}, ``K*T + 1`` token ids.
        patch_size: K.
        loss_mask: ``K*T`` values aligned with the labels (``loss_mask[j]`` scores x_{j+1}), or None
            for all ones.

    Returns:
        (targets, mask), both ``T`` rows of ``K`` entries: ``targets[i][k]`` is x_{(i+1)K+k}, or
        None when that token is past the end of the sample; ``mask[i][k]`` is 1.0 when the target is
        scored: all K tokens of patch i+1 are inside the sample and its label is not masked.
    """
    K = patch_size
    num_labels = len(tokens) - 1
    if num_labels % K != 0:
        raise ValueError(f"{len(tokens)} tokens is not K*T + 1 for K={K}")
    T = num_labels // K
    targets, mask = [], []
    for i in range(T):
        row_targets, row_mask = [], []
        patch_inside = (i + 1) * K + K - 1 <= num_labels  # last token of patch i+1 exists
        for k in range(K):
            position = (i + 1) * K + k  # index of the target token in x
            row_targets.append(tokens[position] if position <= num_labels else None)
            scored = 1.0 if patch_inside else 0.0
            if loss_mask is not None and patch_inside:
                scored *= float(loss_mask[position - 1])  # label j = position - 1 holds x_position
            row_mask.append(scored)
        targets.append(row_targets)
        mask.append(row_mask)
    return targets, mask


def reference_aggregate_patches(embeddings: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch embeddings by a python loop, in float64: ``E(p_i) = (1/K) sum_k E(x_{iK+k})``.

    Args:
        embeddings: ``[s*K, b, h]`` token embeddings, sequence first.
        patch_size: K.

    Returns:
        ``[s, b, h]`` float64.
    """
    K = patch_size
    tokens, batch, hidden = embeddings.shape
    e = embeddings.detach().to(torch.float64)
    out = torch.zeros(tokens // K, batch, hidden, dtype=torch.float64)
    for i in range(tokens // K):
        for b in range(batch):
            total = torch.zeros(hidden, dtype=torch.float64)
            for k in range(K):
                total = total + e[i * K + k, b]
            out[i, b] = total / K
    return out
