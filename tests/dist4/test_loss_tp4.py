"""The K-target vocab-parallel cross-entropy at TP=4 (run under ``torchrun --nproc_per_node=4``).

Each rank takes its quarter of the same full logits; targets span all four shards; large-logit
rows put the global maximum on a different rank per position. Tolerances as in
``tests/unit/test_loss.py``: relative error 1e-6 for fp32 and for bf16 losses (reference on the
bf16-rounded logits), 2**-8 + 1e-6 for bf16 gradients (autograd rounds them to bf16).
"""

import re

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tests.loss_helpers import loss_and_grad
from tests.reference import reference_patch_loss_grad, reference_per_target_grad, relative_error

TP = 4
SEQ, BATCH, VOCAB = 4, 2, 64
SHARD = VOCAB // TP
FP32_TOL = 1e-6
BF16_GRAD_TOL = 2.0**-8 + FP32_TOL


def _full_logits(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(SEQ, BATCH, VOCAB, generator=gen) * 3.0
    logits[0, 0, 3 * SHARD + 2] = 3e4  # spike on rank 3
    logits[0, 1, SHARD + 7] = 3e4  # spike on rank 1
    logits[1] = 1e4 + logits[1]
    return logits.to(dtype)


def _targets(seed, patch_size):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, VOCAB, (SEQ, BATCH, patch_size), generator=gen)
    # the first targets of rows 2 and 3 hit each shard once; position (2, 0) cycles through the
    # four shards over its K targets; (0, 0) targets the spike
    targets[2:, :, 0] = torch.tensor([[1, SHARD + 1], [2 * SHARD + 1, 3 * SHARD + 1]])
    targets[2, 0] = (torch.arange(patch_size) % TP) * SHARD + 1
    targets[0, 0, 0] = 3 * SHARD + 2
    return targets


def _gather(tensor):
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(TP)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def _run(full, targets, upstream=None, mask=None):
    rank = parallel_state.get_tensor_model_parallel_rank()
    # [s, b, V] -> [s, b, V/tp]
    return loss_and_grad(full.chunk(TP, dim=-1)[rank].contiguous().requires_grad_(True), targets, upstream, mask)


def test_tp4_losses_and_gradients_match_reference(model_parallel):
    """Per-target losses with a non-uniform upstream gradient and the masked patch loss, for
    K in {1, 2, 4, 8}, fp32 and bf16: same loss on every rank, gathered gradient = reference."""
    model_parallel(TP, 1)
    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        grad_tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL
        for patch_size in (1, 2, 4, 8):
            case = f"{dtype} K={patch_size}"
            full = _full_logits(patch_size, dtype)
            targets = _targets(10 + patch_size, patch_size)
            for shard in range(TP):
                assert ((targets >= shard * SHARD) & (targets < (shard + 1) * SHARD)).any(), case

            gen = torch.Generator().manual_seed(20 + patch_size)
            upstream = torch.rand(SEQ, BATCH, patch_size, generator=gen) * 2.0 - 0.5
            losses, grad_shard = _run(full, targets, upstream)
            ref_losses, ref_grad = reference_per_target_grad(full, targets, upstream)
            if not all(torch.equal(part, losses) for part in _gather(losses)):
                failures.append(f"{case}: losses differ between ranks")
            errors = {
                "losses": relative_error(losses, ref_losses),
                "grad": relative_error(torch.cat(_gather(grad_shard), dim=-1), ref_grad),
            }

            # masked patch loss, with duplicates: position (3, 1) repeats one id of rank 2
            targets[3, 1] = 2 * SHARD + 5
            mask = (torch.rand(SEQ, BATCH, patch_size, generator=gen) > 0.3).float()
            mask[3, 1] = 1.0
            loss, grad_shard = _run(full, targets, mask=mask)
            ref_loss, ref_grad = reference_patch_loss_grad(full, targets, mask)
            if not all(torch.equal(part, loss) for part in _gather(loss)):
                failures.append(f"{case}: masked loss differs between ranks")
            errors["masked loss"] = relative_error(loss, ref_loss)
            errors["masked grad"] = relative_error(torch.cat(_gather(grad_shard), dim=-1), ref_grad)

            for name, error in errors.items():
                tol = grad_tol if "grad" in name else FP32_TOL
                if not error <= tol:
                    failures.append(f"{case}: {name} relative error {error:.3g} > {tol:.3g}")
    assert not failures, "; ".join(failures)


def test_tp4_out_of_range_id_names_the_global_vocabulary(model_parallel):
    model_parallel(TP, 1)
    targets = _targets(30, 2)
    targets[1, 1, 0] = VOCAB + 5
    low = int(targets.min())
    with pytest.raises(ValueError) as excinfo:
        _run(_full_logits(31, torch.float32), targets, torch.ones(SEQ, BATCH, 2))
    message = str(excinfo.value)
    assert "\n" not in message and f"[{low}, {VOCAB + 5}]" in message, message
    # the global vocabulary (V/tp * tp = 64), not this rank's shard of 16
    assert re.search(rf"(?<!\d){VOCAB}(?!\d)", message), message
