"""Architecture glue: the paper's LLaMA-style GPT expressed in megatron.core's terms.

* :mod:`~megatron_patch.architecture.presets` -- model shapes and their ``TransformerConfig``.
* :mod:`~megatron_patch.architecture.specs` -- layer specs (Transformer Engine, or the local spec).
* :mod:`~megatron_patch.architecture.attention` -- SDPA core attention for the local spec.
* :mod:`~megatron_patch.architecture.norm` -- a sequence-parallel RMSNorm for the local spec.
* :mod:`~megatron_patch.architecture.rope` -- RoPE as one fused kernel (``--rope-fusion``).
* :mod:`~megatron_patch.architecture.fused_cross_entropy` -- the K-way CE without an fp32 logits
  buffer (``--cross-entropy-fusion``).
"""
