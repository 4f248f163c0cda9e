"""One training or evaluation step through megatron's pipeline schedules.

A micro-batch ``{tokens, labels, loss_mask}`` of ``[b, K*T]`` becomes next-patch targets and their
mask, ``[b, T, K]`` each, once, here (``loss.patch_targets``); the model scores the targets and the
loss function weighs its per-target losses with the mask. K and the batch shapes come from the
stage's plan (``plan.StagePlan``), never from the model; the schedule is handed T, the positions
the decoder sees. Every loss is a sum over scored targets plus their count
(``calculate_per_token_loss``), so a step's loss is the mean over every scored target of the global
batch whatever the data-parallel and micro-batch split, and its gradient is that mean's.
"""

import math
from functools import partial
from typing import Callable, Dict, Iterator, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.errors import NonFiniteLossError
from megatron_patch.loss import patch_targets
from megatron_patch.runtime.parallel import chunk_iterators
from megatron_patch.training.plan import StagePlan


def _loss_func(mask: torch.Tensor, losses: torch.Tensor):
    """Sum of per-target losses over scored targets, their count, and both for logging.

    mask, losses: ``[b, T, K]`` (fp32 1/0, and the model's fp32 per-target losses).
    """
    loss_sum = (losses.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"loss": torch.stack([loss_sum.detach().clone(), count.to(torch.float32)])}


def forward_step(patch_size: int, data_iterator: Iterator, model: torch.nn.Module):
    """megatron ``forward_step_func`` (bind ``patch_size`` first): one micro-batch of ``[b, K*T]``."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    targets, mask = patch_targets(labels, loss_mask, patch_size)  # [b, T, K] each
    losses = model(tokens, None, None, labels=targets, patch_size=patch_size)  # [b, T, K] fp32
    return losses, partial(_loss_func, mask)


def run_schedule(
    model: List[torch.nn.Module], data_iterator: Iterator, stage: StagePlan, forward_only: bool
) -> torch.Tensor:
    """Forward (and backward) of one global batch of ``stage`` through this rank's model chunks
    (several with virtual pipeline stages: the interleaved schedule, each chunk reading the same
    micro-batches). Returns ``[loss_sum, count]`` summed over the whole world's data-parallel
    replicas, identical on every rank (fp32, model's device)."""
    losses: List[Dict[str, torch.Tensor]] = get_forward_backward_func()(
        forward_step_func=partial(forward_step, stage.patch_size),
        data_iterator=chunk_iterators(data_iterator, model),
        model=model,
        num_microbatches=stage.num_microbatches,
        seq_length=stage.decoder_length,
        micro_batch_size=stage.micro_batch_size,
        forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    # only one tensor-parallel rank of the last pipeline stage contributes, so each replica counts
    # once (with virtual stages, the schedule returns the losses of the last chunk only)
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for entry in losses:
            totals += entry["loss"].to(device)
    dist.all_reduce(totals)
    return totals


NON_FINITE_ADVICE = (
    ": stopping without applying this step or saving its state; lower --lr, raise --lr-warmup-iters or "
    "check the data, then resume from the last checkpoint"
)


def gradients_finite(model) -> bool:
    """Whether every rank's gradients are finite: the reduced gradients (megatron's ``main_grad``)
    the optimizer is about to apply, their largest magnitude checked per rank and the verdict
    all-reduced over the world, so every rank stops, or goes on, alike. bf16 has no loss scaler to
    skip such a step, and megatron's clipping lets a NaN norm through (``clip_coeff < 1`` is
    False), so without this a finite loss with a NaN gradient would be applied (and saved)."""
    grads = [p.main_grad for chunk in model for p in chunk.parameters() if getattr(p, "main_grad", None) is not None]
    device = next(model[0].parameters()).device
    largest = torch.nn.utils.get_total_norm(grads, norm_type=math.inf) if grads else torch.zeros((), device=device)
    bad = (~torch.isfinite(largest)).to(torch.float32).reshape(1).to(device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


def train_step(model, optimizer, scheduler, data_iterator, stage: StagePlan):
    """One optimizer step of ``stage``. Raises ``NonFiniteLossError`` (before updating anything) on
    a NaN/Inf loss or gradient.

    Returns ``(loss, grad_norm, skipped)``: the mean loss over scored targets, the gradient norm
    before clipping (None when unavailable) and whether the optimizer skipped the update.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    totals = run_schedule(model, data_iterator, stage, forward_only=False)
    loss = (totals[0] / totals[1].clamp(min=1.0)).item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss}{NON_FINITE_ADVICE}")
    if not gradients_finite(model):
        raise NonFiniteLossError(f"a gradient is NaN or Inf (the loss, {loss:.4f}, is not){NON_FINITE_ADVICE}")
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return loss, grad_norm, not update_successful


class ValidationStopped(Exception):
    """A stop (a signal, the time limit) came during a validation, which was cut short: the run
    saves at once instead of finishing it."""


@torch.no_grad()
def evaluate(
    model,
    data_iterator_factory: Callable[[], Iterator],
    validation: StagePlan,
    stopped: Callable[[], bool] = lambda: False,
) -> float:
    """Token-level loss (``validation.patch_size`` is 1) over ``validation.iterations`` global
    batches from a fresh validation iterator, so both stages' validation curves are comparable.

    ``stopped`` is asked before each global batch but the first (on every rank: it must agree
    across ranks); :class:`ValidationStopped` when it says so."""
    for chunk in model:
        chunk.eval()
    try:
        iterator = data_iterator_factory()
        totals = 0
        for index in range(validation.iterations):
            if index and stopped():
                raise ValidationStopped()
            totals = totals + run_schedule(model, iterator, validation, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    return (totals[0] / totals[1].clamp(min=1.0)).item()
