"""The patch-level loss: targets of the next patch and a K-way vocab-parallel cross-entropy.

At patch position i the model emits one distribution; it is scored against each of the K tokens
of patch i+1 and the K cross-entropies are averaged (paper Eq. 2). The cross-entropy below
computes one softmax per position over the vocab-parallel logits and gathers the K target logits,
with the same communication as ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy``
(max, sum-exp and the gathered target logits, all-reduced over the tensor-parallel group) and
none in backward. It reuses megatron's own static helpers where the math is the same.
"""

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_patch.architecture.fused_cross_entropy import FusedVocabParallelPatchCrossEntropy
from megatron_patch.embedding import check_patch_size


def patch_targets(
    labels: torch.Tensor, loss_mask: Optional[torch.Tensor], patch_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Build next-patch targets from Megatron GPT labels, batch first.

    A Megatron sample of ``K*T + 1`` tokens x_0..x_{KT} gives ``tokens = x[:-1]`` and
    ``labels = x[1:]``, so ``labels[j] = x_{j+1}``. The output at patch i is scored against the K
    tokens of patch i+1, x_{(i+1)K+k} = ``labels[(i+1)K+k-1]`` for k in 0..K-1. A patch whose K
    targets do not all lie in the sample (the last one, when K > 1) is masked. At K=1 this is
    exactly next-token prediction over all T positions (``targets[..., 0] == labels``).

    Args:
        labels: ``[b, K*T]`` token ids (tokens shifted by one).
        loss_mask: ``[b, K*T]`` 1 for tokens to score, 0 to skip, or None for all ones.
        patch_size: K >= 1.

    Returns:
        targets ``[b, T, K]`` (int64 token ids; masked entries hold a valid placeholder id) and
        mask ``[b, T, K]`` (float32, 1 = scored).
    """
    check_patch_size(patch_size)
    batch, tokens = labels.shape
    if tokens % patch_size != 0:
        raise ValueError(
            f"labels of {tokens} tokens are not a multiple of patch_size K={patch_size}: "
            f"build patch samples of K*T tokens"
        )
    num_patches = tokens // patch_size
    device = labels.device
    # label index of target k of patch i: (i+1)K + k - 1, [T, K]
    index = (
        torch.arange(num_patches, device=device).unsqueeze(1) * patch_size
        + torch.arange(patch_size, device=device)
        + (patch_size - 1)
    )
    has_full_target = index[:, -1] <= tokens - 1  # [T]
    index = index.clamp(max=tokens - 1)
    targets = labels[:, index].long()  # [b, K*T] gathered at [T, K] -> [b, T, K]
    # [T] -> [1, T, 1] -> [b, T, K]
    mask = has_full_target.view(1, num_patches, 1).to(torch.float32).expand(batch, num_patches, patch_size)
    if loss_mask is not None:
        if loss_mask.shape != labels.shape:
            raise ValueError(
                f"loss_mask shape {tuple(loss_mask.shape)} differs from labels shape "
                f"{tuple(labels.shape)}: pass the sample's own loss_mask"
            )
        mask = mask * loss_mask[:, index].to(torch.float32)  # [b, K*T] gathered at [T, K] -> [b, T, K]
    return targets, mask.contiguous()


class _VocabParallelPatchCrossEntropy(torch.autograd.Function):
    """One softmax per position, K target logits gathered; see ``vocab_parallel_patch_cross_entropy``."""

    @staticmethod
    def forward(ctx, vocab_parallel_logits, targets, tp_group):
        # [s, b, V/tp] in fp32; an fp32 input is this very buffer (megatron does the same)
        logits, logits_max = VocabParallelCrossEntropy.calculate_logits_max(vocab_parallel_logits)
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=tp_group)
        partition_vocab = logits.size(-1)
        rank = dist.get_rank(group=tp_group)
        world = dist.get_world_size(group=tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(partition_vocab, rank, world)
        logits -= logits_max.unsqueeze(-1)

        # targets held by other ranks contribute 0 here and arrive through the all-reduce
        target_mask = (targets < vocab_start) | (targets >= vocab_end)  # [s, b, K]
        local_targets = targets - vocab_start
        local_targets[target_mask] = 0
        predicted_logits = torch.gather(logits, -1, local_targets)  # [s, b, K]
        predicted_logits[target_mask] = 0.0

        exp_logits = logits
        torch.exp(logits, out=exp_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)  # [s, b]
        dist.all_reduce(predicted_logits, op=dist.ReduceOp.SUM, group=tp_group)
        dist.all_reduce(sum_exp_logits, op=dist.ReduceOp.SUM, group=tp_group)

        loss = torch.log(sum_exp_logits).unsqueeze(-1) - predicted_logits  # [s, b, K]
        softmax = exp_logits.div_(sum_exp_logits.unsqueeze(-1))
        ctx.save_for_backward(softmax, target_mask, local_targets)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # d loss_k / d z = softmax - onehot(target_k); grad = softmax * sum_k g_k - sum_k g_k onehot_k
        softmax, target_mask, local_targets = ctx.saved_tensors
        patch_size = local_targets.size(-1)
        if patch_size == 1:
            # megatron's own gradient code, so K=1 matches vocab_parallel_cross_entropy bit for bit
            grad_2d, arange_1d, softmax_update, grad_input = (
                VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
            )
            grad_input = VocabParallelCrossEntropy.calculate_gradients(
                grad_2d,
                arange_1d,
                local_targets.reshape(-1),  # [s, b, 1] -> [s*b]
                softmax_update,
                grad_input,
                grad_output.squeeze(-1),  # [s, b, 1] -> [s, b]
            )
            return grad_input, None, None
        grad_input = softmax.mul_(grad_output.sum(dim=-1, keepdim=True))
        partition_vocab = grad_input.size(-1)
        # [s, b, V/tp] -> [s*b, V/tp]
        grad_2d = grad_input.view(-1, partition_vocab)
        rows = torch.arange(grad_2d.size(0), device=grad_2d.device).repeat_interleave(patch_size)
        weights = grad_output.to(grad_2d.dtype) * (~target_mask).to(grad_2d.dtype)  # [s, b, K]
        # accumulate=True: duplicate ids among the K targets each subtract their own weight
        # targets and weights [s, b, K] -> [s*b*K], row-major like ``rows``
        grad_2d.index_put_((rows, local_targets.reshape(-1)), -weights.reshape(-1), accumulate=True)
        return grad_input, None, None


def vocab_parallel_patch_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    *,
    fused: bool = False,
    check_targets: bool = True,
) -> torch.Tensor:
    """Per-target cross-entropy of K targets against one vocab-parallel softmax per position.

    Args:
        vocab_parallel_logits: ``[s, b, V/tp]`` fp32 or bf16 logits, this rank's vocabulary shard.
            Unfused, like megatron's CE, an fp32 tensor is overwritten in place (it becomes the
            softmax kept for backward); clone it first if you need it again. bf16 logits are
            copied once to fp32 and left untouched. Fused, nothing is modified.
        targets: ``[s, b, K]`` global vocabulary ids (duplicates allowed).
        tp_group: tensor-parallel group; default megatron's current one.
        fused: ``fused_cross_entropy``'s variant, which keeps the logits instead of an fp32
            softmax buffer and reads them in fewer passes; the same losses, and gradients within
            rounding (at K=1 the unfused one equals megatron's CE bit for bit, this one does not).
        check_targets: ValueError for a target id outside the vocabulary; it waits for the device
            (one copy to the host per call), so callers whose ids were checked already skip it.

    Returns:
        ``[s, b, K]`` fp32 losses, ``loss_k = logsumexp(z) - z[target_k]``.
    """
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if vocab_parallel_logits.dim() != 3 or targets.dim() != 3:
        raise ValueError(
            f"expected logits [s, b, V/tp] and targets [s, b, K], got "
            f"{tuple(vocab_parallel_logits.shape)} and {tuple(targets.shape)}"
        )
    if vocab_parallel_logits.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f"logits {tuple(vocab_parallel_logits.shape)} and targets {tuple(targets.shape)} "
            f"disagree on [s, b]: pass patch_targets() of the same batch, transposed to [s, b, K]"
        )
    vocab_size = vocab_parallel_logits.size(-1) * dist.get_world_size(group=tp_group)
    if check_targets and targets.numel() > 0:
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # one device-to-host copy
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"target ids span [{low}, {high}] but the model vocabulary has {vocab_size} "
                f"entries: the tokenizer and the model's --vocab-size disagree"
            )
    function = FusedVocabParallelPatchCrossEntropy if fused else _VocabParallelPatchCrossEntropy
    return function.apply(vocab_parallel_logits, targets.long().contiguous(), tp_group)
