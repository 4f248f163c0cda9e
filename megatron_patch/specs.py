"""Layer specs for the paper's LLaMA-style GPT: RMSNorm, SwiGLU, RoPE, no biases.

With Transformer Engine importable, megatron's TE spec (fused norm+linear, TE attention). Without
it, megatron's local spec with two modules swapped through the spec (nothing patched): the core
attention becomes ``SDPAttention`` and every norm, the final one included, ``RMSNorm`` (which,
unlike torch's wrapped norm, supports sequence parallelism).
"""

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

from megatron_patch.attention import SDPAttention
from megatron_patch.norm import RMSNorm

logger = logging.getLogger(__name__)


def transformer_engine_available() -> bool:
    """True when transformer_engine imports (it never does on a CPU-only machine)."""
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises assorted errors without a GPU or with a mismatched torch
        return False
    return True


def get_local_layer_spec() -> ModuleSpec:
    """megatron's local GPT layer spec with SDPA core attention and sequence-parallel RMSNorm."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def get_layer_spec(use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """The transformer-layer spec: TE when available (or asked for), else the local SDPA spec."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        if not transformer_engine_available():
            raise RuntimeError(
                "use_transformer_engine=True but transformer_engine does not import: install "
                "transformer-engine[pytorch] or use the local spec"
            )
        return get_gpt_layer_with_transformer_engine_spec()
    return get_local_layer_spec()


def get_decoder_block_spec(
    config: TransformerConfig,
    use_transformer_engine: Optional[bool] = None,
    vp_stage: Optional[int] = None,
):
    """The decoder spec for this pipeline stage: the layer spec and the final norm.

    TE's layer spec is returned as is (megatron picks TE's final norm). The local one is wrapped in
    ``TransformerBlockSubmodules`` so that the final norm is ``RMSNorm`` as well.
    """
    layer_spec = get_layer_spec(use_transformer_engine)
    if layer_spec.submodules.self_attention.submodules.core_attention is not SDPAttention:
        return layer_spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=RMSNorm)
