"""One training or evaluation step through megatron's pipeline schedules.

The schedule is handed T (the positions the decoder sees), not the K*T tokens of a patch sample.
Every loss is a sum over scored targets plus their count (``calculate_per_token_loss``), so the
step's loss is the mean over every scored target of the global batch whatever the data-parallel
and micro-batch split, and its gradient is that mean's.
"""

import math
from functools import partial
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.loss import patch_targets
from megatron_patch.training.builders import unwrap


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or Inf; the step was not applied."""


def _loss_func(patch_size: int, labels: torch.Tensor, loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of per-target losses over scored targets, their count, and both for logging.

    output: ``[b, s]`` (K=1) or ``[b, T, K]`` per-target fp32 losses from the model.
    """
    if patch_size == 1:
        mask = loss_mask.to(torch.float32)  # [b, s]
    else:
        _, mask = patch_targets(labels, loss_mask, patch_size)  # [T, b, K]
        mask = mask.transpose(0, 1)  # [b, T, K]
    loss_sum = (output.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"loss": torch.stack([loss_sum.detach().clone(), count.to(torch.float32)])}


def forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """megatron ``forward_step_func``: one micro-batch ``{tokens, labels, loss_mask}`` of ``[b, K*T]``."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    patch_size = unwrap(model).patch_size
    output = model(tokens, None, None, labels=labels)
    return output, partial(_loss_func, patch_size, labels, loss_mask)


def run_schedule(
    model: List[torch.nn.Module],
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> torch.Tensor:
    """Forward (and backward) of one global batch. Returns ``[loss_sum, count]`` summed over the
    whole world's data-parallel replicas, identical on every rank (fp32, on the model's device)."""
    forward_backward = get_forward_backward_func()
    losses: List[Dict[str, torch.Tensor]] = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    # only one tensor-parallel rank of the last pipeline stage contributes, so each replica counts once
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        for entry in losses:
            totals += entry["loss"].to(device)
    dist.all_reduce(totals)
    return totals


def train_step(model, optimizer, scheduler, data_iterator, num_microbatches, seq_length, micro_batch_size):
    """One optimizer step. Raises ``NonFiniteLossError`` (before updating anything) on NaN/Inf.

    Returns ``(loss, grad_norm, skipped)``: the mean loss over scored targets, the gradient norm
    before clipping (None when unavailable) and whether the optimizer skipped the update.
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    totals = run_schedule(model, data_iterator, num_microbatches, seq_length, micro_batch_size, False)
    loss = (totals[0] / totals[1].clamp(min=1.0)).item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss}: stopping without applying this step or saving its state; lower --lr, "
            f"raise --lr-warmup-iters or check the data, then resume from the last checkpoint"
        )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return loss, grad_norm, not update_successful


@torch.no_grad()
def evaluate(model, data_iterator_factory, eval_iters, num_microbatches, seq_length, micro_batch_size) -> float:
    """Token-level loss (K=1) over ``eval_iters`` global batches from a fresh validation iterator,
    so both stages' validation curves are comparable; restores the model's patch size after."""
    inner = [unwrap(chunk) for chunk in model]
    saved_patch_size = inner[0].patch_size
    for chunk in model:
        chunk.eval()
    for m in inner:
        m.set_patch_size(1)
    try:
        iterator = data_iterator_factory()
        totals = None
        for _ in range(eval_iters):
            step_totals = run_schedule(model, iterator, num_microbatches, seq_length, micro_batch_size, True)
            totals = step_totals if totals is None else totals + step_totals
    finally:
        for m in inner:
            m.set_patch_size(saved_patch_size)
        for chunk in model:
            chunk.train()
    return (totals[0] / totals[1].clamp(min=1.0)).item()
