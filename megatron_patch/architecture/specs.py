"""Layer specs for the paper's LLaMA-style GPT: RMSNorm, SwiGLU, RoPE, no biases.

With Transformer Engine importable, megatron's TE spec (fused norm+linear, TE attention). Without
it, megatron's local spec with two modules swapped through the spec (nothing patched): the core
attention becomes ``SDPAttention`` and every norm, the final one included, ``RMSNorm`` (which,
unlike torch's wrapped norm, supports sequence parallelism). With ``fused_rope_base`` the local
spec's core attention also applies RoPE itself, fused (``SDPAttention(rotary_base=...)``); the
model must then be built without megatron's own RoPE (``model.build_patch_gpt_model`` does this).
"""

import functools
import logging
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_patch.architecture.attention import SDPAttention
from megatron_patch.architecture.norm import RMSNorm
from megatron_patch.errors import ArgumentError

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when transformer_engine imports (it never does on a CPU-only machine)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises assorted errors without a GPU or with a mismatched torch
        return False
    return True


def resolve_transformer_impl(transformer_impl: str) -> str:
    """``--transformer-impl`` as the model will be built: "local" or "transformer_engine" ("auto":
    Transformer Engine when it imports, else local), decided when the flags are read.

    Raises ``ArgumentError`` (one line, with the fix) for Transformer Engine asked for where it does
    not import.
    """
    available = transformer_engine_available()
    if transformer_impl == "transformer_engine" and not available:
        raise ArgumentError(
            "--transformer-impl transformer_engine: transformer_engine does not import here: install "
            "transformer-engine[pytorch] or use --transformer-impl local (or auto)"
        )
    if transformer_impl == "auto":
        return "transformer_engine" if available else "local"
    if transformer_impl not in ("local", "transformer_engine"):
        raise ArgumentError(f"--transformer-impl {transformer_impl!r}: use auto, local or transformer_engine")
    return transformer_impl


def get_local_layer_spec(fused_rope_base: Optional[float] = None, sdpa_backend: str = "auto") -> ModuleSpec:
    """megatron's local GPT layer spec with SDPA core attention and sequence-parallel RMSNorm.

    ``fused_rope_base``: the core attention applies fused RoPE with this base (see module doc).
    ``sdpa_backend``: the SDPA kernel it tries first (``attention.SDPAttention``; "auto": torch's order).
    """
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    options = {}
    if fused_rope_base is not None:
        options["rotary_base"] = fused_rope_base
    if sdpa_backend != "auto":
        options["backend"] = sdpa_backend
    core_attention = functools.partial(SDPAttention, **options) if options else SDPAttention
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def resolve_transformer_engine(use_transformer_engine: Optional[bool]) -> bool:
    """True for TE's spec: when asked for (and importable) or, given None, when it imports."""
    if use_transformer_engine is None:
        return transformer_engine_available()
    if use_transformer_engine and not transformer_engine_available():
        raise RuntimeError(
            "use_transformer_engine=True but transformer_engine does not import: install "
            "transformer-engine[pytorch] or use the local spec"
        )
    return use_transformer_engine


def get_layer_spec(
    use_transformer_engine: Optional[bool] = None, fused_rope_base: Optional[float] = None, sdpa_backend: str = "auto"
) -> ModuleSpec:
    """The transformer-layer spec: TE when available (or asked for), else the local SDPA spec."""
    if resolve_transformer_engine(use_transformer_engine):
        if fused_rope_base is not None:
            raise ValueError(
                "fused RoPE in the core attention is the local spec's; with Transformer Engine, megatron's "
                "apply_rope_fusion fuses it (what ModelSettings sets for --rope-fusion)"
            )
        if sdpa_backend != "auto":
            raise ValueError(f"sdpa_backend={sdpa_backend!r} is the local spec's: Transformer Engine picks its own")
        return get_gpt_layer_with_transformer_engine_spec()
    return get_local_layer_spec(fused_rope_base, sdpa_backend)


def get_decoder_block_spec(
    config: TransformerConfig,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    fused_rope_base: Optional[float] = None,
    sdpa_backend: str = "auto",
):
    """The decoder spec for this pipeline stage: the layer spec and the final norm.

    TE's layer spec is returned as is (megatron picks TE's final norm). The local one is wrapped in
    ``TransformerBlockSubmodules`` so that the final norm is ``RMSNorm`` as well.
    """
    use_transformer_engine = resolve_transformer_engine(use_transformer_engine)
    layer_spec = get_layer_spec(use_transformer_engine, fused_rope_base, sdpa_backend)
    if use_transformer_engine:
        return layer_spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=RMSNorm)
