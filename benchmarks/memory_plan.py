"""Memory per GPU of a preset under tensor/pipeline/data parallelism, and the feasible layouts.

Usage::

    python benchmarks/memory_plan.py                                   # 6.7b and 13b on 8 and 64 GPUs
    python benchmarks/memory_plan.py --model 6.7b,13b --measured acts_6.7b.json acts_13b.json --require-measured
    python benchmarks/memory_plan.py --model 2.7b --gpus 8 --budget-gib 72 --all

The bytes of one layout (parameters per rank; weights, gradients and optimizer state;
activations from the formula, Korthikanti et al. 2022 redone for this project's layer, or from
measured figures) are ``memory_model.py``'s, whose docstring states every term.

A layout is feasible when the larger of the first and last stage's totals fits ``--budget-gib``
(allocated bytes, as ``torch.cuda.max_memory_allocated`` counts them; the rest of the card is left
for the CUDA context, NCCL buffers and allocator fragmentation). The chosen layout has the least
model parallelism TP x PP, then the least recompute, then the smaller PP, then the largest
micro-batch. Compute time, pipeline bubbles and the global batch are not modelled.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import command_line, write_json  # noqa: E402
from memory_model import Activations, Layout, formula_activations, measured_activations, stage_memory  # noqa: E402

from megatron_patch import quiet_known_notices  # noqa: E402
from megatron_patch.errors import ArgumentError  # noqa: E402
from megatron_patch.runtime.command import ArgumentParser, run_main  # noqa: E402

quiet_known_notices()  # the presets import megatron.core, whose import prints them
from megatron_patch.architecture.build import padded_vocab_size  # noqa: E402
from megatron_patch.architecture.presets import PRESETS, ModelPreset, check_layout, get_preset  # noqa: E402

GIB = 2**30
RECOMPUTE_ORDER = ("none", "selective", "full")


def _fits(preset: ModelPreset, tensor_parallel: int) -> bool:
    """Whether the trainer takes this TP for the preset (``presets.check_layout``: heads, query
    groups and SwiGLU width)."""
    try:
        check_layout(preset, tensor_parallel, 1)
    except ArgumentError:
        return False
    return True


def candidates(preset: ModelPreset, gpus: int, opts, activations: Dict[str, Activations]) -> List[dict]:
    """Every layout (TP, PP, b, recompute) with its memory, sorted by preference."""
    rows = []
    for tp in opts.tensor_parallel_sizes:
        if tp > min(gpus, opts.gpus_per_node) or not _fits(preset, tp):
            continue
        vocab = padded_vocab_size(opts.vocab_size, opts.make_vocab_size_divisible_by, tp)
        for pp in (d for d in range(1, preset.num_layers + 1) if preset.num_layers % d == 0):
            if gpus % (tp * pp):
                continue
            for recompute in opts.recompute:
                for b in opts.micro_batch_sizes:
                    layout = Layout(tp, pp, gpus // (tp * pp), b, recompute)
                    memory = stage_memory(preset, vocab, layout, activations[recompute], opts.distributed_optimizer)
                    worst = max(memory.values(), key=lambda m: m["total_bytes"])
                    rows.append(
                        {
                            "model": preset.name,
                            "gpus": gpus,
                            **asdict(layout),
                            "vocab": vocab,
                            "parameters_per_rank": worst["parameters"],
                            "static_gib": worst["static_bytes"] / GIB,
                            "activation_gib": worst["activation_bytes"] / GIB,
                            "total_gib": worst["total_bytes"] / GIB,
                            "feasible": worst["total_bytes"] <= opts.budget_gib * GIB,
                            "activations_from": activations[recompute].source,
                        }
                    )
    rows.sort(key=lambda r: (r["tp"] * r["pp"], RECOMPUTE_ORDER.index(r["recompute"]), r["pp"], -r["micro_batch_size"]))
    return rows


# --------------------------------------------------------------------------- command line
def _list(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
        if not values:
            raise argparse.ArgumentTypeError("empty list")
        return values

    return parse


def parse_options(argv: Optional[List[str]]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmarks/memory_plan.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=_list(str), default=["6.7b", "13b"], help="presets, comma-separated")
    p.add_argument("--gpus", type=_list(int), default=[8, 64], help="world sizes to plan for")
    p.add_argument("--gpus-per-node", type=int, default=8, help="TP stays inside a node")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--budget-gib", type=float, default=72.0, help="allocated bytes a layout may use per GPU")
    p.add_argument("--seq-length", type=int, default=None, help="T (default: each preset's)")
    p.add_argument("--patch-size", type=int, default=4, help="K of the patch stage (embedding term of the formula)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--micro-batch-sizes", type=_list(int), default=[1, 2, 4, 8])
    p.add_argument("--tensor-parallel-sizes", type=_list(int), default=[1, 2, 4, 8])
    p.add_argument("--recompute", type=_list(str), default=list(RECOMPUTE_ORDER))
    p.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false")
    p.add_argument("--measured", nargs="+", default=[], help="JSON from throughput.py --measure-layer-activations")
    p.add_argument("--require-measured", action="store_true", help="fail unless every plan uses measured figures")
    p.add_argument("--all", action="store_true", help="print every layout considered, not only the choice")
    p.add_argument("--output-json", default=None)
    opts = p.parse_args(argv)
    for name in opts.model:
        if name not in PRESETS:
            raise ArgumentError(f"--model {name}: choose from {', '.join(PRESETS)}")
    bad = [r for r in opts.recompute if r not in RECOMPUTE_ORDER]
    if bad:
        raise ArgumentError(f"--recompute {','.join(bad)}: use none, selective, full")
    for name in ("gpus", "micro_batch_sizes", "tensor_parallel_sizes"):
        if min(getattr(opts, name)) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} values must be >= 1")
    for name in ("gpus_per_node", "patch_size", "vocab_size", "make_vocab_size_divisible_by"):
        if getattr(opts, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if opts.seq_length is not None and opts.seq_length < 1:
        raise ArgumentError(f"--seq-length {opts.seq_length} must be >= 1")
    if not 0 < opts.budget_gib <= opts.gpu_memory_gib:
        raise ArgumentError(f"--budget-gib {opts.budget_gib} must lie in (0, --gpu-memory-gib {opts.gpu_memory_gib}]")
    return opts


def load_measured(paths: List[str]) -> List[dict]:
    records = []
    for path in paths:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ArgumentError(f"--measured {path}: {error}") from None
        if "layer_activations" not in payload:
            raise ArgumentError(
                f"--measured {path}: no 'layer_activations' (write it with throughput.py "
                f"--measure-layer-activations --output-json)"
            )
        records += payload["layer_activations"]
    return records


def gib(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def plan_table(chosen: List[dict], fits_column: bool = False) -> str:
    """The layouts as a markdown table; ``fits_column``: also whether each fits the budget (``--all``)."""
    header = "| model | GPUs | TP | PP | DP | micro-batch | recompute | params/rank (M) | weights+grads+optimizer GiB "
    header += "| activations GiB | total GiB | activations from |" + (" fits |" if fits_column else "")
    lines = [header, "| --- " * (12 + fits_column) + "|"]
    for r in chosen:
        if r.get("none_feasible"):
            lines.append(f"| {r['model']} | {r['gpus']} | no feasible layout |" + " |" * (9 + fits_column))
            continue
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['tp']} | {r['pp']} | {r['dp']} | {r['micro_batch_size']} "
            f"| {r['recompute']} | {r['parameters_per_rank'] / 1e6:,.1f} | {gib(r['static_gib'])} "
            f"| {gib(r['activation_gib'])} | {gib(r['total_gib'])} | {r['activations_from']} |"
            + ((" yes |" if r["feasible"] else " over budget |") if fits_column else "")
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(lambda: _memory_plan(argv))


def _memory_plan(argv: List[str]) -> int:
    opts = parse_options(argv)
    records = load_measured(opts.measured)
    chosen, considered, notes = [], [], []
    for name in opts.model:
        preset = get_preset(name)
        seq = opts.seq_length or preset.seq_length
        vocab1 = padded_vocab_size(opts.vocab_size, opts.make_vocab_size_divisible_by, 1)
        acts = {}
        for recompute in opts.recompute:
            formula = formula_activations(preset, seq, vocab1, recompute, opts.patch_size)
            acts[recompute] = measured_activations(records, preset, seq, vocab1, recompute, formula) or formula
            if opts.require_measured and acts[recompute].source == "formula":
                raise ArgumentError(
                    f"--require-measured: no measured record for {name}, T={seq}, recompute "
                    f"{recompute}, padded vocab {vocab1} in {opts.measured or 'no --measured files'}"
                )
            if "float32" in acts[recompute].source:
                notes.append(f"{name} {recompute}: measured in float32; bf16 training keeps about half")
        for gpus in opts.gpus:
            rows = candidates(preset, gpus, opts, acts)
            considered += rows
            feasible = [r for r in rows if r["feasible"]]
            if feasible:
                best = feasible[0]
                chosen.append(best)
                less = [r for r in rows if r["tp"] * r["pp"] < best["tp"] * best["pp"]]
                if less:
                    t = min(less, key=lambda r: r["total_gib"])
                    notes.append(
                        f"{name} on {gpus} GPUs: less model parallelism does not fit; the smallest "
                        f"such layout (TP={t['tp']} PP={t['pp']} b={t['micro_batch_size']} "
                        f"{t['recompute']}) needs {t['total_gib']:.1f} GiB > {opts.budget_gib:g}"
                    )
            else:
                chosen.append({"model": name, "gpus": gpus, "none_feasible": True})
    print(
        f"### Memory plan: {opts.budget_gib:g} GiB of {opts.gpu_memory_gib:g} GiB per GPU, "
        f"{'distributed' if opts.distributed_optimizer else 'plain'} optimizer, bf16, vocab {opts.vocab_size}\n"
    )
    print(f"Command: `{command_line('memory_plan.py', argv)}`\n")
    print(plan_table(chosen))
    if notes:
        print()
        for note in notes:
            print(f"- {note}")
    if opts.all:
        print("\nAll layouts considered (preference order):\n")
        print(plan_table(considered, fits_column=True))
    if opts.output_json:
        write_json(
            opts.output_json,
            {
                "command": command_line("memory_plan.py", argv),
                "budget_gib": opts.budget_gib,
                "chosen": chosen,
                "considered": considered,
                "notes": notes,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
