"""The K-way patch cross-entropy against K calls of megatron's CE and against one token-level CE.

Usage::

    python benchmarks/loss_benchmark.py                              # GPU: [2048, 8, V] bf16, V = 32000, 128000
    python benchmarks/loss_benchmark.py --cpu                        # smoke mode, small sizes

For bf16 logits ``[s, b, V]`` (a leaf tensor, as the output layer's output is to the loss) and
random targets, each method runs forward + backward (``losses.sum().backward()``):

* ``token CE``: one ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (the token
  stage's loss; the reference);
* ``patch CE``: ``megatron_patch.loss.vocab_parallel_patch_cross_entropy`` with K targets per
  position (one softmax, K gathered target logits);
* ``fused patch CE``: the same with ``fused=True`` (``megatron_patch.architecture.fused_cross_entropy``, the
  trainer's ``--cross-entropy-fusion``: no fp32 softmax buffer, compiled element-wise passes);
* ``K x megatron CE``: K calls of megatron's CE, one per target, stacked.

Time: CUDA events around each repeat (host clock on CPU), median over ``--repeats`` after
``--warmup``. Memory (GPU): ``torch.cuda.max_memory_allocated`` during one forward+backward minus
what was allocated before it (the logits and targets), so it includes the logits' gradient; it is
given in GiB and in units of the bf16 logits' size. Every method is also checked on the first
positions against ``logsumexp(z) - z[target_k]`` computed in float64 from the same bf16 logits:
the largest loss error and the relative gradient error (bf16 rounding of the gradient is ~1e-3).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import (  # noqa: E402
    command_line,
    enter_one_rank_world,
    environment,
    positive_int_list,
    write_json,
)

from megatron_patch import quiet_known_notices  # noqa: E402
from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

CHECK_ROWS = 64  # sequence positions used for the agreement check


def parse_options(argv: Optional[List[str]]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmarks/loss_benchmark.py", description=__doc__.split("\n")[0])
    p.add_argument("--seq-length", type=int, default=None, help="s, positions (default 2048; 64 with --cpu)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="b (default 8; 2 with --cpu)")
    p.add_argument(
        "--vocab-sizes",
        type=positive_int_list,
        default=None,
        help="V values (default 32000,128000; 512,2048 with --cpu)",
    )
    p.add_argument("--patch-sizes", type=positive_int_list, default=[1, 2, 4, 8], help="K values")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 3 with --cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 3; 1 with --cpu)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--output-json", default=None)
    p.add_argument("--cpu", action="store_true", help="smoke mode: CPU (gloo), small sizes, no memory figures")
    opts = p.parse_args(argv)
    opts.seq_length = opts.seq_length or (64 if opts.cpu else 2048)
    opts.micro_batch_size = opts.micro_batch_size or (2 if opts.cpu else 8)
    opts.vocab_sizes = opts.vocab_sizes or ([512, 2048] if opts.cpu else [32000, 128000])
    opts.repeats = opts.repeats if opts.repeats is not None else (3 if opts.cpu else 20)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.cpu else 3)
    for name in ("seq_length", "micro_batch_size", "repeats"):
        if getattr(opts, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if opts.warmup < 0:
        raise ArgumentError(f"--warmup {opts.warmup} must be >= 0")
    return opts


# --------------------------------------------------------------------------- the three methods
def token_ce(logits, targets):
    """megatron's CE against the first target: ``[s, b]``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return vocab_parallel_cross_entropy(logits, targets[..., 0].contiguous())


def patch_ce(logits, targets):
    """The K-way CE: ``[s, b, K]``."""
    from megatron_patch.loss import vocab_parallel_patch_cross_entropy

    return vocab_parallel_patch_cross_entropy(logits, targets)


def fused_patch_ce(logits, targets):
    """The fused K-way CE: ``[s, b, K]``."""
    from megatron_patch.loss import vocab_parallel_patch_cross_entropy

    return vocab_parallel_patch_cross_entropy(logits, targets, fused=True)


def k_megatron_ce(logits, targets):
    """K calls of megatron's CE, one per target: ``[s, b, K]``."""
    import torch
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return torch.stack(
        [vocab_parallel_cross_entropy(logits, targets[..., k].contiguous()) for k in range(targets.size(-1))], dim=-1
    )


def fwd_bwd(method, logits, targets) -> None:
    logits.grad = None
    method(logits, targets).sum().backward()


def time_method(method, logits, targets, opts, cuda: bool) -> List[float]:
    """Seconds per forward+backward, one figure per repeat."""
    import torch

    for _ in range(opts.warmup):
        fwd_bwd(method, logits, targets)
    marks = []
    for _ in range(opts.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fwd_bwd(method, logits, targets)
            end.record()
            marks.append((start, end))
        else:
            start = time.perf_counter()
            fwd_bwd(method, logits, targets)
            marks.append((start, time.perf_counter()))
    if cuda:
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in marks]
    return [b - a for a, b in marks]


def peak_above_base(method, logits, targets, cuda: bool) -> Optional[int]:
    """Peak bytes of one forward+backward above what is allocated before it (None on CPU)."""
    import torch

    logits.grad = None
    gc.collect()
    if not cuda:
        return None
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd(method, logits, targets)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits.grad = None
    return peak


def error_vs_fp64(method, logits, targets):
    """(max |loss - reference|, ||grad - reference|| / ||reference||) on the first ``CHECK_ROWS``
    positions; the reference is ``logsumexp(z) - z[target_k]`` in float64 on the same bf16 logits."""
    import torch

    rows = logits[:CHECK_ROWS].detach().clone().requires_grad_(True)
    targets = targets[:CHECK_ROWS].contiguous()
    if method is token_ce:
        targets = targets[..., :1]  # the token CE scores the first target only
    losses = method(rows, targets)
    losses.sum().backward()
    losses = losses.detach().double().reshape(targets.shape)  # [s, b] -> [s, b, 1] for the token CE
    z = rows.detach().double().requires_grad_(True)
    reference = torch.logsumexp(z, dim=-1, keepdim=True) - torch.gather(z, -1, targets)  # [s, b, K]
    reference.sum().backward()
    loss_error = (losses - reference.detach()).abs().max().item()
    grad_error = ((rows.grad.double() - z.grad).norm() / z.grad.norm()).item()
    return loss_error, grad_error


# --------------------------------------------------------------------------- run and report
def run(opts) -> List[dict]:
    import torch

    cuda = not opts.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    s, b = opts.seq_length, opts.micro_batch_size
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    rows = []
    for V in opts.vocab_sizes:
        logits = torch.randn(s, b, V, device=device, dtype=torch.bfloat16, generator=generator).requires_grad_(True)
        all_targets = torch.randint(0, V, (s, b, max(opts.patch_sizes)), device=device, generator=generator)
        logits_bytes = logits.numel() * logits.element_size()
        configs = [("token CE (megatron)", 1, token_ce)]
        for K in opts.patch_sizes:
            configs += [
                ("patch CE", K, patch_ce),
                ("fused patch CE", K, fused_patch_ce),
                ("K x megatron CE", K, k_megatron_ce),
            ]
        for name, K, method in configs:
            targets = all_targets[..., :K].contiguous()
            row = {
                "vocab_size": V,
                "patch_size": K,
                "method": name,
                "seq_length": s,
                "micro_batch_size": b,
                "logits_bytes": logits_bytes,
            }
            try:
                row["loss_error_vs_fp64"], row["grad_error_vs_fp64"] = error_vs_fp64(method, logits, targets)
                row["peak_above_base_bytes"] = peak_above_base(method, logits, targets, cuda)
                per = time_method(method, logits, targets, opts, cuda)
            except torch.OutOfMemoryError as error:
                row["error"] = "OOM: " + str(error).split("\n")[0][:160]
                logits.grad = None
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            else:
                row.update(ms_median=1e3 * statistics.median(per), ms_mean=1e3 * statistics.fmean(per))
            rows.append(row)
            print(
                f"  V={V} K={K} {name}: " + (row["error"] if "error" in row else f"{row['ms_median']:.3f} ms"),
                flush=True,
            )
        del logits, all_targets
        gc.collect()
    _relative_to_token(rows)
    return rows


def _relative_to_token(rows: List[dict]) -> None:
    token = {r["vocab_size"]: r for r in rows if r["method"].startswith("token") and "error" not in r}
    for r in rows:
        ref = token.get(r["vocab_size"])
        ok = ref is not None and "error" not in r
        r["time_vs_token"] = r["ms_median"] / ref["ms_median"] if ok else None
        peak, ref_peak = r.get("peak_above_base_bytes"), ref.get("peak_above_base_bytes") if ref else None
        r["extra_vs_token_logits"] = (
            (peak - ref_peak) / r["logits_bytes"] if ok and peak is not None and ref_peak is not None else None
        )


def _f(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def table(rows: List[dict]) -> str:
    lines = [
        "| V | K | method | fwd+bwd ms (median) | time / token CE | peak above logits GiB | peak / logits size "
        "| extra vs token CE (logits sizes) | max abs loss error vs fp64 | grad rel error vs fp64 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [str(r["vocab_size"]), str(r["patch_size"]), r["method"]]
        if "error" in r:
            cells += ["OOM" if r["error"].startswith("OOM") else r["error"]] + [""] * 6
        else:
            peak = r["peak_above_base_bytes"]
            cells += [
                f"{r['ms_median']:.3f}",
                _f(r["time_vs_token"], ".3f"),
                _f(None if peak is None else peak / 2**30, ".3f"),
                _f(None if peak is None else peak / r["logits_bytes"], ".2f"),
                _f(r["extra_vs_token_logits"], "+.3f"),
                _f(r["loss_error_vs_fp64"], ".1e"),
                _f(r["grad_error_vs_fp64"], ".1e"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_notices()
    return run_main(lambda: _loss_benchmark(argv))


def _loss_benchmark(argv: List[str]) -> int:
    opts = parse_options(argv)
    with contextlib.ExitStack() as stack:
        enter_one_rank_world(stack, opts.cpu, opts.seed)
        rows = run(opts)
    env = environment(opts.cpu)
    command = command_line("loss_benchmark.py", argv)
    if opts.output_json:
        write_json(opts.output_json, {"command": command, "environment": env, "settings": vars(opts), "results": rows})
    print(f"\n### Loss: [s={opts.seq_length}, b={opts.micro_batch_size}, V] bf16 logits, forward + backward\n")
    print(f"Command: `{command}`  ")
    print(
        f"Date: {env['date_utc']}; device: {env['device']}; Python {env['python']}, torch {env['torch']} "
        f"(CUDA {env['cuda']}), megatron-core {env['megatron_core']}; median of {opts.repeats} after "
        f"{opts.warmup} warm-up  "
    )
    print(
        "Targets to record (not asserted): patch CE time / token CE within 1.05; patch CE extra memory vs "
        "token CE well under one logits size.\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
