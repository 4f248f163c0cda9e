"""Pieces shared by the benchmark scripts: a flag type, the world of one, environment record, the tiny
trainer run, trainer arguments, synthetic data, step timing and output helpers.

The scripts' flags and errors follow the package's convention (``megatron_patch.runtime.command``):
``ArgumentParser`` and ``run_main``, so a bad flag is one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import List

_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:  # the package, for scripts run from anywhere
    sys.path.insert(0, _REPO_ROOT)

# the scripts' writers of JSON and reports: a half-written file never looks complete
from megatron_patch.runtime.atomic_file import write_json, write_text  # noqa: E402, F401


# --------------------------------------------------------------------------- flags
def positive_int_list(text: str) -> List[int]:
    """``"8,16"`` -> ``[8, 16]``; argparse ``type`` for flags that sweep; every value >= 1."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be an integer >= 1")
    return values


# --------------------------------------------------------------------------- world
def enter_one_rank_world(stack: contextlib.ExitStack, cpu: bool, seed: int) -> None:
    """Enter, on ``stack``, a world of one process at TP=PP=1 (CPU mode over gloo with ``cpu``).

    A world that cannot be formed (no GPU without --cpu, or --cpu beside a GPU) raises the package's
    ``UserError``, which the script's ``run_main`` prints as one line (exit code 2).
    """
    from megatron_patch.runtime import parallel

    stack.enter_context(parallel.distributed_world(cpu=cpu))
    parallel.init_model_parallel(1, 1, seed=seed)


# --------------------------------------------------------------------------- environment and output
MIB = 2**20


def environment(cpu: bool) -> dict:
    import megatron.core
    import torch

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "cuda": torch.version.cuda,
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)" if cpu else torch.cuda.get_device_name(),
    }


def command_line(script: str, argv: List[str]) -> str:
    return (f"python benchmarks/{script} " + shlex.join(argv)).strip()


def fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


# --------------------------------------------------------------------------- the tiny run
def tiny_run_flags(data_path: str, tokenizer_model: str, train_iters: int = 12) -> List[str]:
    """The trainer flags of the tiny two-stage CPU run that the chaos trials, the bad-input matrix and
    the trainer tests drive: the ``tiny`` preset, T=32, K=4 and lambda=2/3 (the defaults), global
    batch 16 in micro-batches of 4, so ``train_iters`` 12 is 8 patch steps of 4 x 128 tokens and 4
    token steps of 16 x 32; lr 3e-3 with 2 warmup steps in each stage; 3% of the documents held
    out; every step logged. Callers add the evaluation, saving and layout flags."""
    return [
        "--cpu",
        "--model",
        "tiny",
        "--seq-length",
        "32",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "16",
        "--train-iters",
        str(train_iters),
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "2",
        "--data-path",
        str(data_path),
        "--split",
        "97,3,0",
        "--tokenizer-model",
        str(tokenizer_model),
        "--log-interval",
        "1",
    ]


# --------------------------------------------------------------------------- model and data
def trainer_config(opts, recompute: str):
    """The trainer's own configuration (every optimizer/model default is the trainer's) for a world
    of one, with the benchmark's synthetic vocabulary of ``opts.vocab_size`` ids: the data path and
    tokenizer below are never opened."""
    from megatron_patch.training.arguments import make_config
    from megatron_patch.training.flags import build_parser as trainer_parser

    argv = [
        "--model",
        opts.model,
        "--seq-length",
        str(opts.seq_length),
        "--micro-batch-size",
        str(opts.micro_batch_size[0]),
        "--global-batch-size",
        str(opts.micro_batch_size[0]),
        "--train-iters",
        "1",
        "--lr",
        str(opts.lr),
        "--lr-decay-style",
        "constant",
        "--patch-size",
        "1",
        "--recompute-granularity",
        recompute,
        "--transformer-impl",
        opts.transformer_impl,
        "--data-path",
        "synthetic-not-read",
        "--tokenizer-model",
        "synthetic-not-read",
        "--seed",
        str(opts.seed),
        "--torch-adam-impl",
        opts.torch_adam_impl,
        "--sdpa-backend",
        opts.sdpa_backend,
        "--cpu" if opts.cpu else "--bf16",
    ]
    if opts.use_distributed_optimizer:
        argv.append("--use-distributed-optimizer")
    if opts.bias_swiglu_fusion:
        argv.append("--bias-swiglu-fusion")
    if opts.rope_fusion:
        argv.append("--rope-fusion")
    if opts.cross_entropy_fusion:
        argv.append("--cross-entropy-fusion")
    return make_config(trainer_parser().parse_args(argv), world_size=1, tokenizer_vocab_size=opts.vocab_size)


def step_plan(patch_size: int, micro_batch_size: int, num_microbatches: int, seq_length: int):
    """One optimizer step of ``num_microbatches`` micro-batches of ``micro_batch_size`` samples of
    K*T tokens on one rank, as the trainer's ``StagePlan``."""
    from megatron_patch.training.plan import StagePlan

    return StagePlan(
        "token" if patch_size == 1 else "patch",
        patch_size,
        1,
        0,
        num_microbatches * micro_batch_size,
        seq_length,
        micro_batch_size,
        num_microbatches,
    )


def synthetic_batches(micro_batch_size: int, tokens: int, vocab_size: int, count: int, seed: int, pin: bool):
    """``count`` micro-batches ``{tokens, labels, loss_mask}`` of ``[b, tokens]``, uniform random ids."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (micro_batch_size, tokens + 1), generator=generator)  # [b, K*T + 1]
        batch = {
            "tokens": ids[:, :-1].contiguous(),
            "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.ones(micro_batch_size, tokens, dtype=torch.float32),
        }
        batches.append({k: v.pin_memory() for k, v in batch.items()} if pin else batch)
    return batches


class StepTimer:
    """Per-step times (s): CUDA events around each step on GPU, the host clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def time(self, fn):
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            self.marks.append((start, end))
        else:
            start = time.perf_counter()
            result = fn()
            self.marks.append((start, time.perf_counter()))
        return result

    def seconds(self):
        """(per-step times, back-to-back mean from the first start to the last end)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            per = [a.elapsed_time(b) / 1e3 for a, b in self.marks]
            span = self.marks[0][0].elapsed_time(self.marks[-1][1]) / 1e3
        else:
            per = [b - a for a, b in self.marks]
            span = self.marks[-1][1] - self.marks[0][0]
        return per, span / len(self.marks)


def free_memory(cuda: bool) -> None:
    import torch

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
