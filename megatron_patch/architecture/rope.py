"""Rotary position embedding as one fused kernel, for the local (non-Transformer-Engine) spec.

megatron.core fuses RoPE only through Transformer Engine (``apply_rope_fusion``). Without it,
``SelfAttention`` runs the eager ``_apply_rotary_pos_emb_bshd`` on the query and on the key: a
slice, two casts of cos/sin, three multiplications, a negation, two concatenations and an add per
tensor, forward and backward, which was about 15% of the kernel time of a 370M step on an H100
(a profile of a bare megatron-core step, before this project; see benchmarks/RESULTS.md).
``apply_rotary`` is the same arithmetic written as one function for megatron's ``jit_fuser``
(``torch.compile``), so query and key are rotated, and their gradients un-rotated, in one generated
kernel each way.

The angles are megatron's: ``RotaryEmbedding`` (same inverse frequencies and positions 0..s-1,
cached per length) gives ``freqs``. In eager mode ``apply_rotary`` equals megatron's unfused RoPE
bit for bit; compiled, bf16 inputs are rotated in fp32 and rounded once (megatron rounds after
each operation), so the two differ by bf16 rounding.
"""

from typing import Tuple

import torch
from megatron.core.jit import jit_fuser


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` over the last dimension (non-interleaved halves)."""
    first_half, second_half = torch.chunk(x, 2, dim=-1)
    rotated = torch.cat((-second_half, first_half), dim=-1)
    return x * cos + rotated * sin


@jit_fuser
def apply_rotary(query: torch.Tensor, key: torch.Tensor, freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key by the angles ``freqs``.

    Args:
        query: ``[s, b, np, d]``.
        key: ``[s, b, ng, d]``.
        freqs: ``[s, 1, 1, d]`` fp32 angles (megatron's ``RotaryEmbedding(s)``); the whole head
            dimension is rotated.

    Returns:
        rotated query ``[s, b, np, d]`` and key ``[s, b, ng, d]`` in their input dtype.
    """
    cos = torch.cos(freqs).to(query.dtype)
    sin = torch.sin(freqs).to(query.dtype)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)
