"""Token-level evaluation of a checkpoint at any TP/PP/V: loss, perplexity, bits per byte.

The model runs in token mode (K=1) through megatron's pipeline schedules, forward only; each
micro-batch's per-token losses (megatron's vocab-parallel cross-entropy, fp32) are summed over
the scored labels in float64. Windows are spread over the data-parallel replicas (micro-batch m
goes to replica m mod DP); the sums of every replica are added at the end, and the number of
scored targets must equal the stream's (a self-check). With virtual pipeline stages each
replica's micro-batches are padded with empty ones (nothing scored) to a multiple of PP, as the
interleaved schedule runs them in groups of PP.

    loss = sum of -log p(target) / scored targets            (nats per token)
    perplexity = exp(loss)
    bits per byte = sum of -log p(target) / ln 2 / UTF-8 bytes of the text
"""

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patch.errors import ArgumentError, VerificationError
from megatron_patch.evaluation.token_stream import EvalCorpus, micro_batch, windows
from megatron_patch.runtime.parallel import chunk_iterators, collective_device, microbatch_multiple

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """How to score: T positions per window, stride S (= T for non-overlapping), b windows per micro-batch."""

    seq_length: int
    micro_batch_size: int = 1
    window: str = "non-overlapping"  # | "sliding"
    stride: Optional[int] = None  # sliding only; default T // 2

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise ArgumentError(f"--seq-length {self.seq_length} must be >= 1")
        if self.micro_batch_size < 1:
            raise ArgumentError(f"--micro-batch-size {self.micro_batch_size} must be >= 1")
        if self.window not in ("non-overlapping", "sliding"):
            raise ArgumentError(f"--window {self.window!r}: use non-overlapping or sliding")
        if self.window == "non-overlapping":
            if self.stride not in (None, self.seq_length):
                raise ArgumentError(
                    f"--stride {self.stride} needs --window sliding (non-overlapping windows move by "
                    f"--seq-length {self.seq_length})"
                )
            self.stride = self.seq_length
        elif self.stride is None:
            self.stride = max(1, self.seq_length // 2)
        if not 1 <= self.stride <= self.seq_length:
            raise ArgumentError(f"--stride {self.stride} must lie in [1, --seq-length {self.seq_length}]")


@dataclass
class EvalResult:
    """Totals over the evaluated text (see the module docstring for the formulas)."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int  # scored targets, EODs included
    documents: int
    bytes: int
    empty_documents_skipped: int
    window: str
    stride: int
    seq_length: int
    loss_sum_nats: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _schedule(model: List[torch.nn.Module], corpus: EvalCorpus, settings: EvalSettings, pad: int) -> torch.Tensor:
    """``[loss_sum, count]`` (float64, CPU) of this rank's windows; nonzero only on the ranks that
    report (last stage, TP rank 0)."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    all_windows = list(windows(corpus.targets, settings.seq_length, settings.stride))
    b = settings.micro_batch_size
    per_replica = math.ceil(math.ceil(len(all_windows) / b) / dp_size)  # micro-batches per replica
    multiple = microbatch_multiple(model)
    per_replica = math.ceil(per_replica / multiple) * multiple
    mine = [all_windows[m * b : (m + 1) * b] for m in range(dp_rank, per_replica * dp_size, dp_size)]
    device = next(model[0].parameters()).device
    totals = torch.zeros(2, dtype=torch.float64)
    reports = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    done = [0]

    def batches():
        for chunk in mine:
            yield micro_batch(corpus.stream, chunk + [None] * (b - len(chunk)), settings.seq_length, pad)

    def forward_step(iterator, chunk):
        batch = next(iterator)
        loss_mask = batch["loss_mask"].to(device)
        output = chunk(batch["tokens"].to(device), None, None, labels=batch["labels"].to(device))  # [b, s] fp32

        def loss_func(losses):
            loss_sum = (losses.double() * loss_mask.double()).sum()
            count = loss_mask.sum()
            if reports:
                totals[0] += loss_sum.item()
                totals[1] += count.item()
            done[0] += 1
            if done[0] % max(1, len(mine) // 10) == 0 or done[0] == len(mine):
                logger.info("evaluated %d of %d micro-batches", done[0], len(mine))
            return loss_sum.float(), count.to(torch.int), {}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=chunk_iterators(batches(), model),
        model=model,
        num_microbatches=len(mine),
        seq_length=settings.seq_length,
        micro_batch_size=b,
        forward_only=True,
    )
    return totals


@torch.no_grad()
def evaluate(model: List[torch.nn.Module], corpus: EvalCorpus, settings: EvalSettings, pad: int) -> EvalResult:
    """Score ``corpus`` with ``model`` (this rank's chunks, token mode). Collective."""
    start = time.perf_counter()
    totals = _schedule(model, corpus, settings, pad)
    totals = totals.to(collective_device())
    dist.all_reduce(totals)
    loss_sum, count = totals[0].item(), int(round(totals[1].item()))
    if count != corpus.targets:
        raise VerificationError(
            f"scored {count} targets but the stream holds {corpus.targets}: windows or "
            f"data-parallel split are wrong; please report this"
        )
    loss = loss_sum / count
    return EvalResult(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=loss_sum / math.log(2) / max(corpus.text_bytes, 1),
        tokens=count,
        documents=corpus.documents,
        bytes=corpus.text_bytes,
        empty_documents_skipped=corpus.empty_skipped,
        window=settings.window,
        stride=settings.stride,
        seq_length=settings.seq_length,
        loss_sum_nats=loss_sum,
        seconds=time.perf_counter() - start,
    )
