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

``--kernel-table N`` profiles one more step of each row at the first micro-batch size, after its
timed steps, and lists its N longest kernels with the device's busy share (``kernel_profile.py``).

``--measure-layer-activations`` instead measures activation memory for ``memory_plan.py``. The model
is the trainer's (``build_patch_gpt_model`` on the ``TransformerConfig`` of the trainer's own
configuration, wrapped in megatron's Float16Module for bf16; no DDP or optimizer, which hold no
activations), optionally cut to ``--layers`` layers of the preset's width so that 6.7B/13B shapes
fit on one GPU. Per (recompute, K, b) it records (1) the bytes of every tensor autograd saves for
backward during one forward, counted once per storage, parameters excluded, and attributed to the
transformer layer running when the tensor was first saved, or to ``pre`` (embedding) / ``post``
(final norm, output layer, loss); (2) on GPU, the peak allocated memory of one forward+backward
above what was allocated before it (after one untimed forward+backward of the same shape). Two or
more micro-batch sizes give the per-sequence slope of that peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import command_line, enter_one_rank_world, environment, write_json  # noqa: E402
from kernel_profile import kernel_tables  # noqa: E402
from phase_timers import phase_table  # noqa: E402
from throughput_options import parse_options  # noqa: E402
from throughput_sweep import run_throughput, throughput_table  # noqa: E402

from megatron_patch import quiet_known_notices  # noqa: E402
from megatron_patch.runtime.command import run_main  # noqa: E402

SCHEMA = "megatron_patch.throughput/1"


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_known_notices()
    return run_main(lambda: _throughput(argv))


def _throughput(argv: List[str]) -> int:
    opts = parse_options(argv)
    with contextlib.ExitStack() as stack:
        enter_one_rank_world(stack, opts.cpu, opts.seed)
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
    if opts.kernel_table:
        what = "operators by self CPU time (CPU)" if opts.cpu else "kernels by device time"
        print(f"\n### One profiled step: the {opts.kernel_table} longest {what} (`--kernel-table`)\n")
        print(kernel_tables(payload["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
