"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

Drop-in for megatron's local ``DotProductAttention`` (same constructor and forward), which
materialises the ``[b, np, s, s]`` scores in fp32 and was 4-5x slower on an H100 (measured with
megatron-core alone, before this project). SDPA dispatches to cuDNN / flash attention on GPU and to
a fused math kernel on CPU.

``backend`` names the SDPA kernel tried first (``--sdpa-backend``): torch's own order tries flash
attention first and cuDNN's last, and cuDNN's is reported faster on Hopper GPUs; the others stay
behind it in torch's order, so a shape the preferred kernel cannot serve (or a CPU, which has no
cuDNN) runs as before. "auto" leaves torch's order alone.

With ``rotary_base`` it also applies RoPE (``rope.apply_rotary``, one fused kernel) to the query and
key of positions 0..s-1; the model is then built without megatron's RoPE
(``position_embedding_type="none"``), which would apply it unfused before this module.
"""

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_patch.architecture.rope import apply_rotary

# torch's default order (flash, memory-efficient, math, cuDNN); a preferred backend goes before it
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
SDPA_BACKEND_CHOICES = ("auto", *SDPA_BACKENDS)


def sdpa_preference(backend: str) -> Optional[list]:
    """The SDPA kernels in the order to try them, ``backend``'s first; None for "auto" (torch's order)."""
    if backend == "auto":
        return None
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"SDPA backend {backend!r}: choose one of {', '.join(SDPA_BACKEND_CHOICES)}")
    return [SDPA_BACKENDS[backend], *(kernel for name, kernel in SDPA_BACKENDS.items() if name != backend)]


class SDPAttention(MegatronModule):
    """Causal (or explicitly masked) attention with SDPA; supports GQA and attention dropout.

    Shapes: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` -> context ``[sq, b, np*hn]``
    (np, ng: this rank's query heads and key/value groups).

    Masks as in megatron's local ``DotProductAttention``: ``attention_mask`` None gives causal
    attention (mask type ``causal``) or none; a given boolean mask (``[b or 1, 1, sq, sk]``, True =
    masked out) is applied instead of the causal one. Unlike megatron's, a query whose keys are all
    masked gets a zero context (megatron: the mean of the values).

    ``rotary_base``: rotate query and key here (fused RoPE over the whole head dimension, positions
    0..s-1, megatron's frequencies for this base); None leaves positions to the caller.
    ``backend``: the SDPA kernel to try first (module doc). Bind both with ``functools.partial`` in
    the layer spec (megatron calls the core-attention builder with its own keyword arguments only).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        rotary_base: Optional[float] = None,
        backend: str = "auto",
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size} needs Transformer Engine "
                f"attention: install transformer-engine or use context parallel size 1"
            )
        if config.apply_query_key_layer_scaling:
            raise ValueError("apply_query_key_layer_scaling is not supported by SDPAttention: turn it off")
        if config.softmax_type != "vanilla" or config.window_size is not None:
            raise ValueError("SDPAttention supports vanilla softmax without sliding windows only")
        tp_size = config.tensor_model_parallel_size
        self.attn_mask_type = attn_mask_type
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.kernel_order = sdpa_preference(backend)
        self.rotary = None
        if rotary_base is not None:
            if attention_type != "self":
                raise ValueError(
                    f"rotary_base with attention_type={attention_type!r}: fused RoPE is for self-attention only"
                )
            self.rotary = RotaryEmbedding(
                kv_channels=self.head_dim,
                rotary_percent=1.0,
                rotary_base=rotary_base,
                use_cpu_initialization=config.use_cpu_initialization,
            )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed sequences nor an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if attention_mask is None:
            sdpa_mask, causal = None, mask_type == AttnMaskType.causal
        else:
            # as megatron's local attention: a given mask replaces the causal one, whatever the mask
            # type; megatron's masks are True where attention is forbidden, SDPA's boolean ones the opposite
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"attention_mask of dtype {attention_mask.dtype}: SDPAttention takes megatron's boolean "
                    f"masks (True = masked out)"
                )
            sdpa_mask, causal = ~attention_mask, False
        seq_q, batch = query.shape[0], query.shape[1]
        if self.rotary is not None:
            if key.shape[0] != seq_q:
                raise ValueError(f"fused RoPE needs the key's {key.shape[0]} positions to be the query's {seq_q}")
            freqs = self.rotary(seq_q)  # [s, 1, 1, hn] fp32, cached per length
            query, key = apply_rotary(query, key, freqs)
        value = value_in_own_storage(value, query, key)
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout_p = self.dropout_p if self.training else 0.0
        with self._rng_context(dropout_p), self._kernel_context():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=sdpa_mask,
                dropout_p=dropout_p,
                is_causal=causal,
                scale=self.softmax_scale,
                enable_gqa=self.num_heads_per_partition != self.num_groups_per_partition,
            )
        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, np*hn]
        return context.permute(2, 0, 1, 3).reshape(seq_q, batch, -1)

    def _kernel_context(self):
        if self.kernel_order is None:
            return contextlib.nullcontext()
        return sdpa_kernel(self.kernel_order, set_priority=True)

    def _rng_context(self, dropout_p: float):
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()


def value_in_own_storage(value: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``value`` copied out of megatron's fused QKV projection output once query and key have left it.

    megatron's ``SelfAttention`` splits one ``[s, b, ng, (np/ng + 2) * hn]`` buffer into query, key
    and value views. RoPE gives query and key new tensors, so only the value view still points into
    the buffer; SDPA saves its inputs for backward, and that view would keep the whole buffer alive
    until the layer's backward: ``np/ng + 2`` times the value's bytes (3x with one group per head:
    4h bytes more per token and layer in bf16). The copy costs one write of the value.

    Shapes: value ``[sk, b, ng, hn]`` (returned unchanged when it owns its storage or when query or key
    still share it), query ``[sq, b, np, hn]``, key ``[sk, b, ng, hn]``.
    """
    storage = value.untyped_storage()
    if storage.nbytes() == value.numel() * value.element_size():
        return value
    if any(t.untyped_storage().data_ptr() == storage.data_ptr() for t in (query, key)):
        return value
    return value.clone(memory_format=torch.contiguous_format)
