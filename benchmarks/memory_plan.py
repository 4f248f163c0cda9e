"""Memory per GPU of a preset under tensor/pipeline/data parallelism, and the feasible layouts.

Usage::

    python benchmarks/memory_plan.py                                   # 6.7b and 13b on 8 and 64 GPUs
    python benchmarks/memory_plan.py --model 6.7b,13b --measured acts_6.7b.json acts_13b.json --require-measured
    python benchmarks/memory_plan.py --model 2.7b --gpus 8 --budget-gib 72 --all

Per GPU (bytes; P = parameters on the rank, b = micro-batch, s = sequence length T, t = TP size):

* **Parameters per rank**: each layer's matrices (QKV h(h+2gd), projection h^2, SwiGLU 3hf) split
  by t, its two norm weights (2h) replicated; the first pipeline stage adds the embedding (V h / t),
  the last the output layer (V h / t) and the final norm (h). V is padded like the trainer
  (a multiple of 128 t).
* **Weights, gradients, optimizer**: bf16 parameters 2P, megatron's fp32 gradient buffer 4P
  (``grad_reduce_in_fp32``), fp32 main parameters and Adam's two moments 12P; the distributed
  optimizer divides the 12P by the data-parallel size DP.
* **Activations** (1F1B pipeline schedule): the first stage holds PP micro-batches of L/PP layers,
  i.e. all L layers of one micro-batch; the last stage one micro-batch of its L/PP layers plus the
  output layer and loss. The working memory (below) is counted on both stages, which overstates the
  first stage's by the logits' share. Every term is divided by t (sequence parallelism, assumed whenever t > 1).
  Per sequence, at t = 1 and in bf16, from **measured** figures when ``--measured`` JSON from
  ``throughput.py --measure-layer-activations`` covers the preset, sequence length and recompute
  mode, otherwise from the formula below.

The formula follows Korthikanti et al. 2022 ("Reducing activation recomputation in large
transformer models"), whose GPT-3 layer keeps ``s b h (34 + 5 a s / h)`` bytes, redone term by term
for this project's layer (pre-norm RMSNorm, RoPE, SDPA core attention, SwiGLU, no dropout), per
sequence (b = 1), 2 bytes per element:

* norms: each of the two keeps its bf16 input: 2 x 2sh (the fused ``torch.rms_norm`` of CUDA; its fp32
  rstd, 4s, is ignored)
* attention: QKV input 2sh; Q and K after RoPE 2sh + 2sgd; V 2sgd (``SDPAttention`` copies it out of
  the fused QKV output, which would otherwise stay alive whole through the view: 2s(h + 2gd)); SDPA
  (flash/cuDNN) keeps its output 2sh, which is also the projection's input (SDPA lays its output out
  like the query, ``[s, b, n, d]``, so the reshape is a view), and an fp32 log-sum-exp 4as. No
  ``5 a s^2`` score term: SDPA never stores the scores
  (Korthikanti's term is for unfused attention). RoPE's batch-independent cos/sin tables are ignored
* SwiGLU MLP: fc1 input 2sh; gate|up output 4sf; SiLU output and megatron's ``up + offset`` copy 4sf;
  fc2 input 2sf
* together, for multi-head attention (gd = h): 16sh + 10sf + 4as bytes per layer
  (46.9 sh for the 370M shape, against Korthikanti's 34 sh for a GeLU 4h MLP with dropout)
* selective recompute (megatron's ``core_attn``): the log-sum-exp is recomputed, -4as; SDPA's output
  stays (the projection keeps it)
* full recompute (one layer per checkpoint): each layer keeps its input 2sh; the layer being
  back-propagated is rebuilt whole (its no-recompute figure, counted once as working memory)
* outside the layers: embedding token ids 8Ks (int64, K tokens per position); final-norm input 2sh,
  output-layer input 2sh, the loss's fp32 softmax 4sV kept for backward; working memory 2sV (the bf16
  logits beside their fp32 copy in forward, the bf16 logits gradient in backward)

On the CPU (bf16, tiny preset) ``throughput.py --measure-layer-activations`` gives exactly this plus
what CPU's unfused ``rms_norm`` keeps instead (fp32 input and output, 8sh per norm, instead of 2sh);
the GPU's figures are measured on the GPU.

Measured figures (``SavedTensorMeter`` in throughput.py) are the bytes autograd actually saves per
layer, and the working memory is the per-sequence slope of the fwd+bwd peak minus that of the saved
bytes (needs two micro-batch sizes); a measured record without a peak (CPU) keeps the formula's
working memory.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, Path(__file__).resolve().parent):  # the package, and common.py beside this file
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import FlagParser, UsageError, command_line, write_json  # noqa: E402

from megatron_patch import quiet_known_notices  # noqa: E402

quiet_known_notices()  # the presets import megatron.core, whose import prints them
from megatron_patch.architecture.build import padded_vocab_size  # noqa: E402
from megatron_patch.architecture.presets import PRESETS, ModelPreset, get_preset  # noqa: E402

GIB = 2**30
RECOMPUTE_ORDER = ("none", "selective", "full")
BF16 = 2


# --------------------------------------------------------------------------- model arithmetic
@dataclass(frozen=True)
class Activations:
    """Activation bytes per sequence (b = 1) at TP = 1 for one recompute mode."""

    layer: float  # kept by each transformer layer until its backward
    pre: float  # kept by the embedding (first stage)
    post: float  # kept by the final norm, output layer and loss (last stage)
    working: float  # on top of what is kept, at the peak of backward (logits, a rebuilt layer)
    source: str


def formula_activations(
    preset: ModelPreset, seq_length: int, vocab_size: int, recompute: str, patch_size: int = 1
) -> Activations:
    """The formula of the module docstring (bytes per sequence, bf16, t = 1)."""
    s, h, f, a = seq_length, preset.hidden_size, preset.ffn_hidden_size, preset.num_attention_heads
    gd = (preset.num_query_groups or a) * (h // a)  # key/value width
    norms = 2 * BF16 * s * h
    lse = 4 * a * s  # SDPA's fp32 log-sum-exp
    # QKV input, Q and K after RoPE, V (copied out of the fused QKV output), SDPA output = projection input
    attention = BF16 * (s * h + (s * h + s * gd) + s * gd + s * h) + lse
    mlp = BF16 * (s * h + 2 * s * f + 2 * s * f + s * f)  # fc1 input, gate|up, SiLU and up copies, fc2 input
    full_layer = norms + attention + mlp
    logits_working = BF16 * s * vocab_size
    if recompute == "none":
        layer, working = full_layer, logits_working
    elif recompute == "selective":
        layer, working = full_layer - lse, logits_working
    elif recompute == "full":
        layer, working = BF16 * s * h, logits_working + full_layer
    else:
        raise ValueError(f"recompute {recompute!r}: use none, selective or full")
    post = 2 * BF16 * s * h + 4 * s * vocab_size
    return Activations(layer, 8 * patch_size * s, post, working, "formula")


def measured_activations(
    records: List[dict], preset: ModelPreset, seq_length: int, vocab_size: int, recompute: str, fallback: Activations
) -> Optional[Activations]:
    """Per-sequence figures from ``throughput.py --measure-layer-activations`` records of this
    preset, sequence length, padded vocabulary and recompute mode (the largest over K); None if
    there are none."""
    mine = [
        r
        for r in records
        if "error" not in r
        and r["model"] == preset.name
        and r["seq_length"] == seq_length
        and r["vocab_size"] == vocab_size
        and r["recompute"] == recompute
    ]
    if not mine:
        return None
    layer = max(max(r["layer_bytes"]) / r["micro_batch_size"] for r in mine)
    pre = max(r["pre_bytes"] / r["micro_batch_size"] for r in mine)
    post = max(r["post_bytes"] / r["micro_batch_size"] for r in mine)
    slopes = []
    for K in sorted({r["patch_size"] for r in mine}):
        peaks = sorted(
            (r["micro_batch_size"], r["peak_above_base_bytes"], r["saved_total_bytes"])
            for r in mine
            if r["patch_size"] == K and r.get("peak_above_base_bytes") is not None
        )
        if len(peaks) >= 2 and peaks[-1][0] > peaks[0][0]:
            (b1, p1, s1), (b2, p2, s2) = peaks[0], peaks[-1]
            slopes.append(max(0.0, ((p2 - p1) - (s2 - s1)) / (b2 - b1)))
    working = max(slopes) if slopes else fallback.working
    dtypes = sorted({r["dtype"] for r in mine})
    devices = sorted({r["device"] for r in mine})
    source = f"measured ({'/'.join(dtypes)}, {'/'.join(devices)}" + ("" if slopes else "; formula working memory") + ")"
    return Activations(layer, pre, post, working, source)


def layer_parameters(preset: ModelPreset, tp: int) -> float:
    """Parameters of one transformer layer on one tensor-parallel rank."""
    h, f, a = preset.hidden_size, preset.ffn_hidden_size, preset.num_attention_heads
    gd = (preset.num_query_groups or a) * (h // a)
    matrices = h * (h + 2 * gd) + h * h + 3 * h * f
    return matrices / tp + 2 * h


def stage_parameters(preset: ModelPreset, vocab: int, tp: int, pp: int) -> Dict[str, float]:
    """Parameters per rank of the first and the last pipeline stage (the same stage when PP = 1)."""
    layers = preset.num_layers // pp * layer_parameters(preset, tp)
    embedding = vocab * preset.hidden_size / tp
    output = vocab * preset.hidden_size / tp + preset.hidden_size
    if pp == 1:
        return {"first": layers + embedding + output, "last": layers + embedding + output}
    return {"first": layers + embedding, "last": layers + output}


def static_bytes(parameters: float, dp: int, distributed_optimizer: bool) -> float:
    """bf16 weights (2) + fp32 gradient buffer (4) + fp32 main weights and Adam moments (12, / DP if distributed)."""
    return parameters * (2 + 4 + 12 / (dp if distributed_optimizer else 1))


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: str


def stage_memory(
    preset: ModelPreset, vocab: int, layout: Layout, acts: Activations, distributed_optimizer: bool
) -> Dict[str, Dict[str, float]]:
    """Bytes per rank of the first and last pipeline stage: parameters, static, activations, total."""
    t, pp, b = layout.tp, layout.pp, layout.micro_batch_size
    params = stage_parameters(preset, vocab, t, pp)
    per_stage_layers = preset.num_layers // pp
    if pp == 1:
        activations = {"first": b * (preset.num_layers * acts.layer + acts.pre + acts.post + acts.working) / t}
        activations["last"] = activations["first"]
    else:  # 1F1B: the first stage holds PP micro-batches, the last one
        activations = {
            "first": b * (pp * (per_stage_layers * acts.layer + acts.pre) + acts.working) / t,
            "last": b * (per_stage_layers * acts.layer + acts.post + acts.working) / t,
        }
    out = {}
    for stage in ("first", "last"):
        static = static_bytes(params[stage], layout.dp, distributed_optimizer)
        out[stage] = {
            "parameters": params[stage],
            "static_bytes": static,
            "activation_bytes": activations[stage],
            "total_bytes": static + activations[stage],
        }
    return out


def candidates(preset: ModelPreset, gpus: int, opts, activations: Dict[str, Activations]) -> List[dict]:
    """Every layout (TP, PP, b, recompute) with its memory, sorted by preference."""
    heads, groups = preset.num_attention_heads, preset.num_query_groups or preset.num_attention_heads
    rows = []
    for tp in opts.tensor_parallel_sizes:
        if tp > min(gpus, opts.gpus_per_node) or heads % tp or groups % tp:
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
    p = FlagParser(prog="benchmarks/memory_plan.py", description=__doc__.split("\n")[0], allow_abbrev=False)
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
            raise UsageError(f"--model {name}: choose from {', '.join(PRESETS)}")
    bad = [r for r in opts.recompute if r not in RECOMPUTE_ORDER]
    if bad:
        raise UsageError(f"--recompute {','.join(bad)}: use none, selective, full")
    for name in ("gpus", "micro_batch_sizes", "tensor_parallel_sizes"):
        if min(getattr(opts, name)) < 1:
            raise UsageError(f"--{name.replace('_', '-')} values must be >= 1")
    for name in ("gpus_per_node", "patch_size", "vocab_size", "make_vocab_size_divisible_by"):
        if getattr(opts, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(opts, name)} must be >= 1")
    if opts.seq_length is not None and opts.seq_length < 1:
        raise UsageError(f"--seq-length {opts.seq_length} must be >= 1")
    if not 0 < opts.budget_gib <= opts.gpu_memory_gib:
        raise UsageError(f"--budget-gib {opts.budget_gib} must lie in (0, --gpu-memory-gib {opts.gpu_memory_gib}]")
    return opts


def load_measured(paths: List[str]) -> List[dict]:
    records = []
    for path in paths:
        try:
            with open(path) as f:
                payload = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise UsageError(f"--measured {path}: {error}") from None
        if "layer_activations" not in payload:
            raise UsageError(
                f"--measured {path}: no 'layer_activations' (write it with throughput.py "
                f"--measure-layer-activations --output-json)"
            )
        records += payload["layer_activations"]
    return records


def gib(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def plan_table(chosen: List[dict]) -> str:
    lines = [
        "| model | GPUs | TP | PP | DP | micro-batch | recompute | params/rank (M) | weights+grads+optimizer GiB "
        "| activations GiB | total GiB | activations from |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in chosen:
        if r.get("none_feasible"):
            lines.append(f"| {r['model']} | {r['gpus']} | no feasible layout | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['tp']} | {r['pp']} | {r['dp']} | {r['micro_batch_size']} "
            f"| {r['recompute']} | {r['parameters_per_rank'] / 1e6:,.1f} | {gib(r['static_gib'])} "
            f"| {gib(r['activation_gib'])} | {gib(r['total_gib'])} | {r['activations_from']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
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
                    raise UsageError(
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
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
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
        print(plan_table([dict(r, activations_from=("fits" if r["feasible"] else "over budget")) for r in considered]))
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
