"""The K-way vocab-parallel cross-entropy without a logits-sized fp32 buffer (``--cross-entropy-fusion``).

``loss.vocab_parallel_patch_cross_entropy`` follows megatron's CE: it copies the logits to fp32,
turns that buffer into the softmax in place with several element-wise passes and keeps it for
backward (4 bytes per logit, twice the bf16 logits). This variant computes the same losses and
gradients from the logits themselves:

* forward: the row max, then the row sum of ``exp(z - max)`` (two reductions that read the logits
  once each; fp32 inside the kernel), and the K target logits; the same all-reduces as megatron's
  CE (max, then the sums and target logits together);
* backward: ``exp(z - max) * (sum_k g_k / sum_exp)`` written once in the logits' dtype, then, at
  the K target ids only, the same value recomputed in fp32 minus the weights of every target on
  that id before rounding, so a confident target (softmax near 1/K or 1) keeps fp32 accuracy.

It keeps the logits (which the output layer made anyway), two ``[s, b]`` fp32 rows and the
``[s, b, K]`` targets, and modifies nothing it is given. The element-wise parts are megatron's
``jit_fuser`` (``torch.compile``) functions: one generated kernel each on a GPU, eager where
dynamo is off (CPU mode and the tests).
"""

import torch
import torch.distributed as dist
from megatron.core.jit import jit_fuser
from megatron.core.tensor_parallel.utils import VocabUtility


@jit_fuser
def _row_max(logits: torch.Tensor) -> torch.Tensor:
    """``[s, b, V/tp]`` -> ``[s, b]`` fp32."""
    return logits.amax(dim=-1).float()


@jit_fuser
def _row_sum_exp(logits: torch.Tensor, logits_max: torch.Tensor) -> torch.Tensor:
    """``sum_j exp(z_j - max)``: ``[s, b, V/tp]``, ``[s, b]`` -> ``[s, b]`` fp32."""
    return torch.exp(logits.float() - logits_max.unsqueeze(-1)).sum(dim=-1)


@jit_fuser
def _scaled_exp(logits: torch.Tensor, logits_max: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """``exp(z - max) * scale`` in the logits' dtype: ``[s, b, V/tp]``, ``[s, b]``, ``[s, b]`` -> ``[s, b, V/tp]``."""
    return (torch.exp(logits.float() - logits_max.unsqueeze(-1)) * row_scale.unsqueeze(-1)).to(logits.dtype)


class FusedVocabParallelPatchCrossEntropy(torch.autograd.Function):
    """Per-target losses ``[s, b, K]`` of logits ``[s, b, V/tp]`` and targets ``[s, b, K]``
    (global ids, int64); see the module docstring. Inputs are checked by the caller
    (``loss.vocab_parallel_patch_cross_entropy(..., fused=True)``)."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, targets, tp_group):
        logits_max = _row_max(vocab_parallel_logits)  # [s, b]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            vocab_parallel_logits.size(-1), dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)
        )
        # targets held by other ranks contribute 0 here and arrive through the all-reduce
        target_mask = (targets < vocab_start) | (targets >= vocab_end)  # [s, b, K]
        local_targets = (targets - vocab_start).masked_fill(target_mask, 0)
        shifted_targets = torch.gather(vocab_parallel_logits, -1, local_targets).float() - logits_max.unsqueeze(-1)
        shifted_targets.masked_fill_(target_mask, 0.0)  # [s, b, K]: z_t - max
        sum_exp = _row_sum_exp(vocab_parallel_logits, logits_max)  # [s, b]
        # one all-reduce for both: [s, b, K] + [s, b] -> [s, b, K + 1]
        reduced = torch.cat((shifted_targets, sum_exp.unsqueeze(-1)), dim=-1)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=tp_group)
        shifted_targets, sum_exp = reduced[..., :-1], reduced[..., -1]
        ctx.save_for_backward(vocab_parallel_logits, logits_max, sum_exp, local_targets, target_mask)
        return torch.log(sum_exp).unsqueeze(-1) - shifted_targets  # [s, b, K]

    @staticmethod
    def backward(ctx, grad_output):
        # d loss_k / d z = softmax - onehot(target_k); grad = softmax * sum_k g_k - sum_k g_k onehot_k
        logits, logits_max, sum_exp, local_targets, target_mask = ctx.saved_tensors
        grad_sum = grad_output.sum(dim=-1)  # [s, b]
        row_scale = grad_sum / sum_exp  # [s, b]
        grad_input = _scaled_exp(logits, logits_max, row_scale)  # [s, b, V/tp]
        # at each target id of this rank: every weight on that id, subtracted in fp32. An off-rank
        # target sits at local id 0 with weight 0 and writes what a target at 0 would, so duplicate
        # writes agree.
        weights = grad_output.masked_fill(target_mask, 0.0)  # [s, b, K]
        same_id = local_targets.unsqueeze(-1) == local_targets.unsqueeze(-2)  # [s, b, K, K]
        weight_on_id = (same_id * weights.unsqueeze(-2)).sum(dim=-1)  # [s, b, K]
        target_logits = torch.gather(logits, -1, local_targets).float()  # [s, b, K]
        at_targets = torch.exp(target_logits - logits_max.unsqueeze(-1)) * row_scale.unsqueeze(-1) - weight_on_id
        grad_input.scatter_(-1, local_targets, at_targets.to(grad_input.dtype))
        return grad_input, None, None
