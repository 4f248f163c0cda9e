"""The flags of ``throughput.py`` and their defaults (which depend on ``--cpu`` and
``--measure-layer-activations``), checked into one ``error:`` line each.
"""

from __future__ import annotations

import argparse
import math
from typing import List, Optional

from common import positive_int_list

from megatron_patch.errors import ArgumentError
from megatron_patch.runtime.command import ArgumentParser

# throughput.py's first docstring line, its --help description
DESCRIPTION = "Training throughput of the real trainer step on one device: token stage and patch stage (K = 2, 4, 8)."
RECOMPUTE_CHOICES = ("none", "selective", "full")


def _recompute_list(text: str) -> List[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in RECOMPUTE_CHOICES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {', '.join(RECOMPUTE_CHOICES)}")
    return values


def _flatten(lists):
    return None if lists is None else [v for values in lists for v in values]


def build_parser() -> ArgumentParser:
    from megatron_patch.architecture.attention import SDPA_BACKEND_CHOICES  # imports megatron: not at import

    p = ArgumentParser(prog="benchmarks/throughput.py", description=DESCRIPTION)
    p.add_argument("--model", default=None, help="preset (default 370m; tiny with --cpu)")
    p.add_argument(
        "--micro-batch-size",
        type=positive_int_list,
        nargs="+",
        default=None,
        help="b, sequences per micro-batch; a list sweeps (default 8,16; 2 with --cpu; "
        "1,2 with --measure-layer-activations)",
    )
    p.add_argument("--seq-length", type=int, default=None, help="T, decoder positions (default: the preset's)")
    p.add_argument("--patch-sizes", type=positive_int_list, default=[1, 2, 4, 8], help="K values; 1 = token stage")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 20; 3 with --cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; 1 with --cpu)")
    p.add_argument("--num-microbatches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="tokenizer vocabulary; the model pads it like the trainer (default 32000; 512 with --cpu)",
    )
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bias-swiglu-fusion", action="store_true", help="as in the trainer: megatron's fused SwiGLU")
    p.add_argument("--rope-fusion", action="store_true", help="as in the trainer: fused RoPE in the core attention")
    p.add_argument(
        "--cross-entropy-fusion",
        action="store_true",
        help="as in the trainer: the fused K-way cross-entropy in both stages",
    )
    p.add_argument(
        "--sdpa-backend",
        choices=SDPA_BACKEND_CHOICES,
        default="auto",
        help="as in the trainer: the attention kernel SDPA tries first",
    )
    p.add_argument(
        "--torch-adam-impl",
        choices=["foreach", "fused"],
        default="foreach",
        help="as in the trainer: the kernel of torch's AdamW (megatron's fallback without TE/Apex)",
    )
    p.add_argument(
        "--recompute-granularity",
        type=_recompute_list,
        default=None,
        help="none, selective or full; a comma list sweeps (default: the preset's layout)",
    )
    p.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default="auto")
    p.add_argument("--lr", type=float, default=1e-5, help="constant learning rate of the timed steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--measure-layer-activations",
        action="store_true",
        help="measure activation bytes per layer (for memory_plan.py) instead of throughput",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="with --measure-layer-activations: build this many layers of the preset's width",
    )
    p.add_argument(
        "--phase-times",
        action="store_true",
        help="also time megatron's own step phases (forward-backward, optimizer, ...) through its "
        "config.timers hooks; off by default so the headline figures run without the hooks",
    )
    p.add_argument(
        "--kernel-table",
        type=int,
        default=0,
        metavar="N",
        help="also profile one more step of each row at the first --micro-batch-size (after its timed "
        "steps) and list its N longest kernels (CPU: operators), e.g. which attention kernel SDPA runs "
        "(default 0: none)",
    )
    p.add_argument("--output-json", default=None, help="also write every figure here")
    p.add_argument("--cpu", action="store_true", help="smoke mode: CPU mode (gloo), fp32, tiny preset, no MFU")
    return p


def parse_options(argv: Optional[List[str]]) -> argparse.Namespace:
    opts = build_parser().parse_args(argv)
    from megatron_patch.architecture.presets import PRESETS, get_preset

    opts.model = opts.model or ("tiny" if opts.cpu else "370m")
    if opts.model not in PRESETS:
        raise ArgumentError(f"--model {opts.model}: choose one of {', '.join(PRESETS)}")
    preset = get_preset(opts.model)
    opts.micro_batch_size = _flatten(opts.micro_batch_size) or (
        [1, 2] if opts.measure_layer_activations else [2] if opts.cpu else [8, 16]
    )
    opts.seq_length = opts.seq_length or preset.seq_length
    opts.steps = opts.steps if opts.steps is not None else (3 if opts.cpu else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.cpu else 5)
    opts.vocab_size = opts.vocab_size or (512 if opts.cpu else 32000)
    opts.recompute_granularity = opts.recompute_granularity or [preset.layout.recompute]
    for name in ("seq_length", "steps", "num_microbatches", "vocab_size"):
        if getattr(opts, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if opts.warmup < 0:
        raise ArgumentError(f"--warmup {opts.warmup} must be >= 0")
    if opts.layers is not None and not opts.measure_layer_activations:
        raise ArgumentError("--layers is for --measure-layer-activations (throughput runs the whole preset)")
    for flag, given in (("--phase-times", opts.phase_times), ("--kernel-table", opts.kernel_table)):
        if given and opts.measure_layer_activations:
            raise ArgumentError(f"{flag} is for throughput steps; drop it with --measure-layer-activations")
    if opts.kernel_table < 0:
        raise ArgumentError(f"--kernel-table {opts.kernel_table} must be >= 0 (kernels to list; 0: no profile)")
    if opts.layers is not None and not 1 <= opts.layers <= preset.num_layers:
        raise ArgumentError(f"--layers {opts.layers} must lie in 1..{preset.num_layers} (the preset's layers)")
    if not math.isfinite(opts.lr) or opts.lr <= 0:
        raise ArgumentError(f"--lr {opts.lr} must be > 0")
    return opts
