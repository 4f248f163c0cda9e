"""The memory model of ``memory_plan.py``: the bytes one GPU holds under one TP/PP/DP layout.

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
  (42.9 sh for the 370M shape, against Korthikanti's 34 sh for a GeLU 4h MLP with dropout)
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

Measured figures (``SavedTensorMeter`` in layer_activations.py) are the bytes autograd actually saves per
layer, and the working memory is the per-sequence slope of the fwd+bwd peak minus that of the saved
bytes (needs two micro-batch sizes); a measured record without a peak (CPU) keeps the formula's
working memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    from megatron_patch.architecture.presets import ModelPreset

BF16 = 2


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
