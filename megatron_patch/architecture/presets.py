"""Model presets: the paper's LLaMA-style models (its model table: 370M to 2.7B), larger ones, tiny CPU ones.

Presets are data. ``transformer_config`` turns one into megatron's ``TransformerConfig`` with
the paper's architecture: pre-norm RMSNorm (eps 1e-6), SwiGLU, RoPE (base 10000), no biases,
untied embeddings, no dropout, init std 0.02.

The ``layout`` of each preset is a starting point for 80 GB H100s (bf16, distributed optimizer,
8 or more GPUs, sequence length 2048): tensor- and pipeline-parallel sizes and a micro-batch
size. The 370M micro-batch follows the H100 throughput measurement in benchmarks/RESULTS.md;
the others come from the memory formula of ``benchmarks/memory_model.py`` (which
``benchmarks/memory_plan.py`` searches with; the 6.7B one with a 64 GiB budget for headroom)
and are to be confirmed with measured per-layer figures.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_patch.errors import ArgumentError


@dataclass(frozen=True)
class Layout:
    """A recommended parallel layout: tensor/pipeline sizes and micro-batch (sequences)."""

    tensor_parallel: int
    pipeline_parallel: int
    micro_batch_size: int
    recompute: str = "none"  # "none" | "selective" | "full"


@dataclass(frozen=True)
class ModelPreset:
    """One model shape. ``seq_length`` is T, the positions the transformer sees."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    seq_length: int
    layout: Layout
    num_query_groups: int = 0  # 0 = multi-head attention (groups = heads), as in the paper

    def parameter_count(self, vocab_size: int) -> int:
        """Parameters with an untied ``vocab_size`` embedding and output layer."""
        h, f, n_layers = self.hidden_size, self.ffn_hidden_size, self.num_layers
        groups = self.num_query_groups or self.num_attention_heads
        head_dim = h // self.num_attention_heads
        attention = h * h + 2 * h * groups * head_dim + h * h
        mlp = 3 * h * f
        per_layer = attention + mlp + 2 * h
        return n_layers * per_layer + h + 2 * vocab_size * h


PRESETS: Dict[str, ModelPreset] = {
    p.name: p
    for p in (
        # tests and the CPU quick start
        ModelPreset(
            name="tiny",
            num_layers=4,
            hidden_size=64,
            ffn_hidden_size=176,
            num_attention_heads=4,
            seq_length=64,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=4),
        ),
        ModelPreset(
            name="cpu-small",
            num_layers=4,
            hidden_size=128,
            ffn_hidden_size=352,
            num_attention_heads=4,
            seq_length=128,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=8),
        ),
        # sized for the ~30 M-token corpus of the small-scale reproduction (examples/reproduce_small.py)
        ModelPreset(
            name="repro-34m",
            num_layers=8,
            hidden_size=512,
            ffn_hidden_size=1376,
            num_attention_heads=8,
            seq_length=1024,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=32),
        ),
        # the paper's models
        ModelPreset(
            name="370m",
            num_layers=24,
            hidden_size=1024,
            ffn_hidden_size=2752,
            num_attention_heads=16,
            seq_length=2048,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=16),
        ),
        ModelPreset(
            name="780m",
            num_layers=24,
            hidden_size=1536,
            ffn_hidden_size=4128,
            num_attention_heads=16,
            seq_length=2048,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=8),
        ),
        ModelPreset(
            name="1.3b",
            num_layers=24,
            hidden_size=2048,
            ffn_hidden_size=5504,
            num_attention_heads=16,
            seq_length=2048,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=8),
        ),
        ModelPreset(
            name="2.7b",
            num_layers=32,
            hidden_size=2560,
            ffn_hidden_size=6880,
            num_attention_heads=32,
            seq_length=2048,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=4),
        ),
        # scaling past 2.7B (LLaMA-7B / 13B shapes)
        ModelPreset(
            name="6.7b",
            num_layers=32,
            hidden_size=4096,
            ffn_hidden_size=11008,
            num_attention_heads=32,
            seq_length=2048,
            layout=Layout(tensor_parallel=1, pipeline_parallel=1, micro_batch_size=1),
        ),
        ModelPreset(
            name="13b",
            num_layers=40,
            hidden_size=5120,
            ffn_hidden_size=13824,
            num_attention_heads=40,
            seq_length=2048,
            layout=Layout(tensor_parallel=2, pipeline_parallel=1, micro_batch_size=1),
        ),
    )
}


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name``; a one-line error listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ArgumentError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def check_layout(
    preset: ModelPreset,
    tensor_parallel: int,
    pipeline_parallel: int,
    where: Optional[str] = None,
    padded_vocab_size: Optional[int] = None,
) -> None:
    """Raise ``ArgumentError`` (one line: the flag, the size it must divide, the sizes that fit) unless
    both sizes are >= 1, the tensor-parallel size divides the attention heads, the query groups, the
    FFN (SwiGLU) width and, when given, the padded vocabulary rows (megatron splits each across the
    TP ranks), and the pipeline-parallel size divides the layers.

    ``where``: what the model is, for the message (default ``model preset 'NAME'``).
    """
    where = where or f"model preset {preset.name!r}"
    for flag, value in (
        ("--tensor-model-parallel-size", tensor_parallel),
        ("--pipeline-model-parallel-size", pipeline_parallel),
    ):
        if value < 1:
            raise ArgumentError(f"{flag} {value} must be >= 1")
    groups = preset.num_query_groups or preset.num_attention_heads
    counts = [
        ("attention heads", preset.num_attention_heads),
        ("query groups", groups),
        ("FFN hidden size", preset.ffn_hidden_size),
    ]
    if padded_vocab_size is not None:
        counts.append(("vocabulary rows", padded_vocab_size))
    for what, count in counts:
        if count % tensor_parallel:
            fits = [d for d in range(1, groups + 1) if all(n % d == 0 for _, n in counts)]
            raise ArgumentError(
                f"--tensor-model-parallel-size {tensor_parallel} does not divide the {count} {what} of {where}: "
                f"use one of {', '.join(map(str, fits))}"
            )
    if preset.num_layers % pipeline_parallel:
        fits = [d for d in range(1, preset.num_layers + 1) if preset.num_layers % d == 0]
        raise ArgumentError(
            f"--pipeline-model-parallel-size {pipeline_parallel} does not divide the {preset.num_layers} layers "
            f"of {where}: use one of {', '.join(map(str, fits))}"
        )


def transformer_config(
    preset: ModelPreset,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    bf16: bool = False,
    cpu: bool = False,
    recompute: str = "none",
    **overrides,
) -> TransformerConfig:
    """megatron ``TransformerConfig`` for ``preset`` in the paper's architecture.

    Args:
        tensor_parallel, pipeline_parallel: model-parallel sizes (``check_layout``).
        sequence_parallel: megatron sequence parallelism (needs tensor_parallel > 1).
        bf16: bf16 parameters and compute (fp32 main weights live in the optimizer).
        cpu: build weights on the CPU (CPU mode), which also makes tensor-parallel shards exact
            slices of the unsplit weights.
        recompute: "none", "selective" (attention core) or "full" (every layer).
        overrides: any further ``TransformerConfig`` field.
    """
    check_layout(preset, tensor_parallel, pipeline_parallel)
    if sequence_parallel and tensor_parallel == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1: drop the flag")
    recompute_settings = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }
    if recompute not in recompute_settings:
        raise ArgumentError(f"--recompute-granularity {recompute!r}: use none, selective or full")
    dtype = torch.bfloat16 if bf16 else torch.float32
    settings = dict(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        ffn_hidden_size=preset.ffn_hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.num_query_groups or preset.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=1e-6,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=cpu,
        **recompute_settings[recompute],
    )
    settings.update(overrides)
    return TransformerConfig(**settings)
