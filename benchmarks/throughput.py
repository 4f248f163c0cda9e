"""Training throughput of the real trainer step on one device: token stage and patch stage (K = 2, 4, 8).

Usage (one GPU; see benchmarks/README.md for the GPU machine)::

    python benchmarks/throughput.py --model 370m --micro-batch-size 8 16 --patch-sizes 1,2,4,8
    python benchmarks/throughput.py --model 6.7b --layers 2 --measure-layer-activations \
        --micro-batch-size 1,2 --recompute-granularity none,selective,full --output-json acts.json
    python benchmarks/throughput.py --cpu                      # smoke mode: tiny preset, fp32, CPU

Throughput mode runs ``train_step`` (forward, backward and megatron's optimizer step through
megatron's pipeline schedule) on the model, optimizer and LR schedule of
``megatron_patch.training.builders``, in bf16 (fp32 with ``--cpu``). The data are synthetic token
ids (uniform, seeded) fed as ``{tokens, labels, loss_mask}`` micro-batches of ``[b, K*T]``. For every
(recompute, micro-batch b, K): ``--warmup`` steps, then ``--steps`` timed steps, each between two CUDA
events (host clock on CPU). Reported: median and mean step time; tokens/s = tokens per step
(micro-batches x b x K x T) / median step time; model TFLOP/s = ``flops_per_position`` (flops.py,
which states the formula) x positions per step (micro-batches x b x T) / median step time; MFU =
TFLOP/s / the bf16 matmul rate measured on the same GPU at start-up (``measure_bf16_matmul_tflops``);
peak memory = ``torch.cuda.max_memory_allocated`` since a reset just before the warm-up, so it
includes weights, gradient buffers and optimizer state; and the patch/token tokens/s ratio at equal b.
A configuration that runs out of memory is reported as OOM and the sweep goes on.

``--phase-times`` (off by default, so the headline figures never include the hooks) also breaks each
timed step into megatron-core's own timed phases: ``phase_timers.PhaseTimers`` is set as ``timers``
on the model's TransformerConfig and on every sub-optimizer's OptimizerConfig (the objects megatron's
schedule, ``finalize_model_grads`` and optimizers read), records a CUDA event at each start and stop
(host clock on CPU; no synchronisation inside the step), and is removed again after the sweep. Per
row: the median over the timed steps of each phase's per-step total, and the step median minus the
top-level phases (forward-backward and the optimizer phases; phase_timers.py says which nest inside
which). The warm-up steps run with the hooks too, so they run the same code as the timed steps.

``--measure-layer-activations`` instead measures activation memory for ``memory_plan.py``. The model
is the trainer's (``build_patch_gpt_model`` with ``builders.model_config``, wrapped in megatron's
Float16Module for bf16; no DDP or optimizer, which hold no activations), optionally cut to
``--layers`` layers of the preset's width so that 6.7B/13B shapes fit on one GPU. Per (recompute,
K, b) it records (1) the bytes of every tensor autograd saves for backward during one forward,
counted once per storage, parameters excluded, and attributed to the transformer layer running when
the tensor was first saved, or to ``pre`` (embedding) / ``post`` (final norm, output layer, loss);
(2) on GPU, the peak allocated memory of one forward+backward above what was allocated before it
(after one untimed forward+backward of the same shape).
Two or more micro-batch sizes give the per-sequence slope of that peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import math
import statistics
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import (  # noqa: E402
    FlagParser,
    StepTimer,
    UsageError,
    command_line,
    enter_one_rank_world,
    environment,
    fmt,
    free_memory,
    positive_int_list,
    step_plan,
    synthetic_batches,
    trainer_config,
    write_json,
)
from phase_timers import PhaseTimers, installed, outside_ms, phase_medians, phase_table  # noqa: E402

from megatron_patch import quiet_known_notices  # noqa: E402

RECOMPUTE_CHOICES = ("none", "selective", "full")
SCHEMA = "megatron_patch.throughput/1"


def _recompute_list(text: str) -> List[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    bad = [v for v in values if v not in RECOMPUTE_CHOICES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {', '.join(RECOMPUTE_CHOICES)}")
    return values


def _flatten(lists):
    return None if lists is None else [v for values in lists for v in values]


def build_parser() -> FlagParser:
    p = FlagParser(prog="benchmarks/throughput.py", description=__doc__.split("\n")[0], allow_abbrev=False)
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
    p.add_argument("--output-json", default=None, help="also write every figure here")
    p.add_argument("--cpu", action="store_true", help="smoke mode: CPU mode (gloo), fp32, tiny preset, no MFU")
    return p


def parse_options(argv: Optional[List[str]]) -> argparse.Namespace:
    opts = build_parser().parse_args(argv)
    from megatron_patch.architecture.presets import PRESETS, get_preset

    opts.model = opts.model or ("tiny" if opts.cpu else "370m")
    if opts.model not in PRESETS:
        raise UsageError(f"--model {opts.model}: choose one of {', '.join(PRESETS)}")
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
            raise UsageError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if opts.warmup < 0:
        raise UsageError(f"--warmup {opts.warmup} must be >= 0")
    if opts.layers is not None and not opts.measure_layer_activations:
        raise UsageError("--layers is for --measure-layer-activations (throughput runs the whole preset)")
    if opts.phase_times and opts.measure_layer_activations:
        raise UsageError("--phase-times times throughput steps; drop it with --measure-layer-activations")
    if opts.layers is not None and not 1 <= opts.layers <= preset.num_layers:
        raise UsageError(f"--layers {opts.layers} must lie in 1..{preset.num_layers} (the preset's layers)")
    if not math.isfinite(opts.lr) or opts.lr <= 0:
        raise UsageError(f"--lr {opts.lr} must be > 0")
    return opts


# --------------------------------------------------------------------------- throughput
def rates(flops_per_position: float, positions: int, tokens: int, seconds: float, peak_tflops: Optional[float]) -> dict:
    """tokens/s, model TFLOP/s (flops.py's FLOPs per decoder position x positions) and MFU
    against the measured matmul rate (None without one)."""
    tflops = flops_per_position * positions / seconds / 1e12
    return {"tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / peak_tflops if peak_tflops else None}


def run_throughput(opts, peak_tflops: Optional[float]) -> List[dict]:
    from megatron.core.utils import get_model_config

    from megatron_patch.architecture.presets import get_preset
    from megatron_patch.training.builders import build_model, build_optimizer, build_scheduler, sub_optimizers
    from megatron_patch.training.flops import flops_per_position

    cuda = not opts.cpu
    preset = get_preset(opts.model)
    rows = []
    for recompute in opts.recompute_granularity:
        config = trainer_config(opts, recompute)
        per_position = flops_per_position(preset, opts.seq_length, config.model.padded_vocab_size)
        model = build_model(config)
        optimizer = build_optimizer(config.optimizer, model)
        total_steps = len(opts.micro_batch_size) * len(opts.patch_sizes) * (opts.warmup + opts.steps)
        scheduler = build_scheduler(config.optimizer, optimizer, total_steps)
        phases = PhaseTimers(cuda) if opts.phase_times else None
        # megatron reads config.timers from get_model_config(chunk) in its schedules and finalize_model_grads
        # (the TransformerConfig the model was built with) and from each optimizer's own OptimizerConfig
        configs = [get_model_config(chunk) for chunk in model] + [sub.config for sub in sub_optimizers(optimizer)]
        with installed(phases, configs) if phases is not None else contextlib.nullcontext():
            rows += _sweep(opts, model, optimizer, scheduler, recompute, per_position, peak_tflops, phases)
        del model, optimizer, scheduler
        free_memory(cuda)
    _add_ratios(rows)
    return rows


def _sweep(opts, model, optimizer, scheduler, recompute, per_position, peak_tflops, phases) -> List[dict]:
    """Every (b, K) row of one model, optimizer and schedule; ``phases`` (or None) is already installed."""
    import torch

    from megatron_patch.errors import NonFiniteLossError
    from megatron_patch.training.step import train_step

    cuda = not opts.cpu
    rows = []
    for b, K in itertools.product(opts.micro_batch_size, opts.patch_sizes):
        row = {
            "recompute": recompute,
            "micro_batch_size": b,
            "patch_size": K,
            "stage": "token" if K == 1 else "patch",
            "num_microbatches": opts.num_microbatches,
            "tokens_per_step": opts.num_microbatches * b * K * opts.seq_length,
            "positions_per_step": opts.num_microbatches * b * opts.seq_length,
            "flops_per_position": per_position,
        }
        stage = step_plan(K, b, opts.num_microbatches, opts.seq_length)
        data = itertools.cycle(synthetic_batches(b, stage.sample_tokens, opts.vocab_size, 4, opts.seed + K, pin=cuda))
        step = functools.partial(train_step, model, optimizer, scheduler, data, stage)

        free_memory(cuda)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(opts.warmup):
                step()
            timer, losses = StepTimer(cuda), []
            if phases is not None:
                phases.clear()  # drop the warm-up's intervals
            for _ in range(opts.steps):
                losses.append(timer.time(step)[0])
                if phases is not None:
                    phases.end_step()  # no synchronisation: the events are read after timer.seconds()
            per, mean = timer.seconds()
        except torch.OutOfMemoryError as error:
            row["error"] = "OOM: " + str(error).split("\n")[0][:160]
        except NonFiniteLossError as error:
            row["error"] = f"non-finite loss ({error})"[:200]
        else:
            median = statistics.median(per)
            row.update(
                step_s_median=median,
                step_s_mean=mean,
                step_s_min=min(per),
                step_s_max=max(per),
                **rates(per_position, row["positions_per_step"], row["tokens_per_step"], median, peak_tflops),
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                loss_first=losses[0],
                loss_last=losses[-1],
            )
            if phases is not None:  # after timer.seconds(), which synchronised: every event has completed
                row["phases_ms"] = phase_medians(phases.per_step_ms(), phases.names)
                row["phases_outside_ms"] = outside_ms(1e3 * median, row["phases_ms"])
        if "error" in row:  # leave the model and optimizer clean for the next configuration
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
        if phases is not None:
            phases.clear()
        rows.append(row)
        print(f"  {_row_line(row)}", flush=True)
    return rows


def _row_line(row: dict) -> str:
    head = f"recompute={row['recompute']} b={row['micro_batch_size']} K={row['patch_size']}:"
    if "error" in row:
        return f"{head} {row['error']}"
    return (
        f"{head} {1e3 * row['step_s_median']:.1f} ms, {row['tokens_per_s']:,.0f} tok/s, "
        f"{row['tflops']:.3g} TFLOP/s, loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}"
    )


def _add_ratios(rows: List[dict]) -> None:
    """patch/token tokens-per-second ratio at the same recompute and micro-batch (ideal: K)."""
    token = {(r["recompute"], r["micro_batch_size"]): r for r in rows if r["patch_size"] == 1 and "error" not in r}
    for row in rows:
        base = token.get((row["recompute"], row["micro_batch_size"]))
        row["ratio_vs_token"] = (
            row["tokens_per_s"] / base["tokens_per_s"] if base is not None and "error" not in row else None
        )


def throughput_table(rows: List[dict]) -> str:
    lines = [
        "| recompute | stage | K | b | step ms (median) | step ms (mean) | tokens/s | TFLOP/s | MFU "
        "| peak GiB | patch/token tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["recompute"], r["stage"], str(r["patch_size"]), str(r["micro_batch_size"])]
        if "error" in r:
            cells += ["OOM" if r["error"].startswith("OOM") else r["error"]] + [""] * 7
        else:
            cells += [
                f"{1e3 * r['step_s_median']:.1f}",
                f"{1e3 * r['step_s_mean']:.1f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tflops']:.4g}",
                fmt(r["mfu"], ".3f", "n/a"),
                fmt(r["peak_memory_gib"], ".2f", "n/a"),
                fmt(r["ratio_vs_token"], ".3f", ""),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_notices()
    try:
        opts = parse_options(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if not enter_one_rank_world(stack, opts.cpu, opts.seed):
            return 2
        from megatron_patch.architecture.presets import get_preset
        from megatron_patch.training.flops import measure_bf16_matmul_tflops

        env = environment(opts.cpu)
        payload = {
            "schema": SCHEMA,
            "command": command_line("throughput.py", argv),
            "environment": env,
            "settings": dict(vars(opts)),
            "preset": dataclasses.asdict(get_preset(opts.model)),
        }
        if opts.measure_layer_activations:
            from layer_activations import activation_table, run_layer_activations

            payload["layer_activations"] = run_layer_activations(opts)
            table = activation_table(payload["layer_activations"])
            title = f"Activation memory: {opts.model}, T={opts.seq_length}, {payload['layer_activations'][0]['dtype']}"
        else:
            peak = None if opts.cpu else measure_bf16_matmul_tflops()
            payload["matmul_peak_tflops"] = peak
            payload["results"] = run_throughput(opts, peak)
            table = throughput_table(payload["results"])
            title = f"Throughput: {opts.model}, T={opts.seq_length}, {'fp32 (CPU smoke)' if opts.cpu else 'bf16'}"
    if opts.output_json:
        write_json(opts.output_json, payload)
    print(f"\n### {title}\n")
    print(f"Command: `{payload['command']}`  ")
    print(
        f"Date: {env['date_utc']}; device: {env['device']}; Python {env['python']}, torch {env['torch']} "
        f"(CUDA {env['cuda']}), megatron-core {env['megatron_core']}  "
    )
    if not opts.measure_layer_activations:
        peak = payload["matmul_peak_tflops"]
        print(
            "MFU denominator: "
            + (f"measured bf16 8192^3 matmul, {peak:.1f} TFLOP/s" if peak else "none (CPU)")
            + f"; {opts.warmup} warm-up + {opts.steps} timed steps per row, {opts.num_microbatches} "
            f"micro-batch(es) per step, synthetic uniform token ids, vocab {opts.vocab_size}  "
        )
    print()
    print(table)
    if opts.phase_times:
        print("\n### Step phases (median ms per step)\n")
        print(
            "megatron-core's own timers (`--phase-times`). forward-compute, backward-compute, all-grads-sync "
            "and the *-grads-all-reduce phases run inside forward-backward; the optimizer-* phases and "
            "params-all-gather after it. Outside timed phases = step median - forward-backward - the "
            "optimizer phases (differences of medians): zero_grad, the loss all-reduce, the chained "
            "optimizer's grad norm and clipping, the LR step.\n"
        )
        print(phase_table(payload["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
