"""Throughput mode of ``throughput.py``: for every (recompute, micro-batch b, K), warm-up steps and
then timed ``train_step`` calls on the trainer's own model, optimizer and schedule; each row's step
times, tokens/s, model TFLOP/s, MFU, peak memory, optional megatron phase times and kernel profile
(``kernel_profile.py``), and the patch/token ratio at equal b; and the markdown table of the rows.
Units: seconds (ms in the table), tokens, GiB.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
import sys
from typing import List, Optional

from common import StepTimer, fmt, free_memory, step_plan, synthetic_batches, trainer_config
from kernel_profile import profile_step
from phase_timers import PhaseTimers, installed, outside_ms, phase_medians


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
        per_position_causal = flops_per_position(
            preset, opts.seq_length, config.model.padded_vocab_size, causal_attention=True
        )
        model = build_model(config)
        optimizer = build_optimizer(config.optimizer, model)
        total_steps = len(opts.micro_batch_size) * len(opts.patch_sizes) * (opts.warmup + opts.steps)
        scheduler = build_scheduler(config.optimizer, optimizer, total_steps)
        phases = PhaseTimers(cuda) if opts.phase_times else None
        # megatron reads config.timers from get_model_config(chunk) in its schedules and finalize_model_grads
        # (the TransformerConfig the model was built with) and from each optimizer's own OptimizerConfig
        configs = [get_model_config(chunk) for chunk in model] + [sub.config for sub in sub_optimizers(optimizer)]
        with installed(phases, configs) if phases is not None else contextlib.nullcontext():
            swept = _sweep(opts, model, optimizer, scheduler, recompute, per_position, peak_tflops, phases)
        for row in swept:  # the same steps counted as current Megatron-LM counts causal attention
            row["flops_per_position_causal"] = per_position_causal
        rows += swept
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
        rows.append(row)
        # printed before the profiled step: a run stopped or killed there keeps the row in its output
        print(f"  {_row_line(row)}", flush=True)
        if "error" not in row and opts.kernel_table and b == opts.micro_batch_size[0]:
            _profile(row, step, cuda, opts.kernel_table)  # one more step, after the timed ones
        if "error" in row or "kernel_profile_error" in row:  # leave the model and optimizer clean for the next
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
        if phases is not None:
            phases.clear()
    return rows


def _profile(row: dict, step, cuda: bool, top: int) -> None:
    """``row["kernel_profile"]`` from one profiled step; any exception (the profiler's CUDA path never
    runs on CPU) becomes ``row["kernel_profile_error"]`` and one line on stderr: the row's timings stand."""
    try:
        row["kernel_profile"] = profile_step(step, cuda, top)
    except Exception as error:  # whatever it is, it costs the kernel table only
        row["kernel_profile_error"] = f"{type(error).__name__}: " + str(error).split("\n")[0][:160]
        where = f"recompute={row['recompute']} b={row['micro_batch_size']} K={row['patch_size']}"
        print(f"kernel profile error at {where}: {row['kernel_profile_error']}", file=sys.stderr, flush=True)


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
