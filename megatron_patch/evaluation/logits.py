"""Full-vocabulary logits of a model at any TP/PP/V layout, through megatron's pipeline schedules.

The last pipeline stage gathers its vocabulary shards (``[b, s, V/tp]`` -> ``[b, s, V]``); one
rank of it (TP rank 0 of data-parallel replica 0) contributes the result to a sum over the whole
world, so every rank ends with the same fp32 logits (adding zeros is exact). With virtual
pipeline stages the interleaved schedule needs micro-batches in groups of PP: the batch is run PP
times and the first result kept.
"""

from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_patch.runtime.parallel import chunk_iterators, collective_device, microbatch_multiple


def fixed_tokens(vocab_size: int, batch: int, length: int, seed: int = 20240607) -> torch.Tensor:
    """``[b, s]`` token ids in ``[0, vocab_size)`` from a fixed seed (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def forward_logits(model: List[torch.nn.Module], tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Logits ``[b, s, V]`` (fp32, CPU) of ``tokens`` ``[b, s]`` on every rank.

    Args:
        model: this rank's chunks (token mode; one per virtual stage), built by
            ``checkpoint.info.build_model``.
        tokens: the same ``[b, s]`` ids on every rank.
        vocab_size: V, the padded vocabulary (the model's output rows).
    """
    device = next(model[0].parameters()).device
    collected = []

    def forward_step(iterator, chunk):
        batch = next(iterator).to(device)
        output = chunk(batch, None, None)  # last stage: [b, s, V/tp]; other stages: [s, b, h]

        def collect(output_tensor, non_loss_data=False):
            full = gather_from_tensor_model_parallel_region(output_tensor)  # [b, s, V/tp] -> [b, s, V]
            collected.append(full.float().cpu())
            return full

        return output, collect

    batch, length = tokens.shape
    repeats = microbatch_multiple(model)  # 1, or PP for the interleaved schedule
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=chunk_iterators(iter([tokens] * repeats), model),
        model=model,
        num_microbatches=repeats,
        seq_length=length,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,
    )
    logits = torch.zeros(batch, length, vocab_size, dtype=torch.float32)
    if (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    ):
        logits = collected[0]
    logits = logits.to(collective_device())
    dist.all_reduce(logits)
    return logits.cpu()
