"""Model FLOPs of a training step, and MFU.

FLOPs per decoder position, forward + backward (3x forward), the convention of PaLM's appendix B
and of the Megatron-LM paper (Narayanan et al. 2021): every matmul counts 2 FLOPs per multiply-add;
attention scores and values count the full s x s square (no causal discount); activation recompute
is not counted (model FLOPs, not hardware FLOPs). Current Megatron-LM's training loop counts half the
square for a causal mask (``causal_attention=True``: 13% fewer FLOPs for the 370M preset at T=2048,
so an MFU 0.88x as high); the project's figures use the full square unless they say otherwise:

    per layer, forward:  2*h*(h + 2*g*d)   QKV projection (g key/value groups of width d)
                       + 2*h*h             attention output projection
                       + 2*3*h*f           SwiGLU MLP (gate, up, down)
                       + 2*2*s*h           QK^T and attention x V
    output layer:        2*h*V
    (causal_attention: 2*s*h in place of 2*2*s*h)
    step FLOPs = 3 * (L * per_layer + output) * positions

A patch-stage step feeds T patches per sample to the same decoder, so its FLOPs per token are
1/K of the token stage's (patch averaging and the K-target gather are O(s*b*h), negligible).
"""

import time

import torch

from megatron_patch.architecture.presets import ModelPreset


def flops_per_position(preset: ModelPreset, seq_length: int, vocab_size: int, causal_attention: bool = False) -> float:
    """Model FLOPs (forward + backward, the convention above) of one decoder position.

    Args:
        preset: the model's shape.
        seq_length: T, the decoder positions of a sample: tokens in the token stage, patches in the
            patch stage (a patch-stage sample of K*T tokens has T positions); sets the attention term.
        vocab_size: rows of the output layer (the padded vocabulary).
        causal_attention: count half of the s x s attention square (current Megatron-LM's count).

    Returns:
        FLOPs per decoder position (one token, or one patch of K tokens); times the positions of a
        step gives the step's FLOPs.
    """
    h, f, s = preset.hidden_size, preset.ffn_hidden_size, seq_length
    groups = preset.num_query_groups or preset.num_attention_heads
    head_dim = h // preset.num_attention_heads
    attention = (1 if causal_attention else 2) * 2 * s * h  # QK^T and attention x V: the square or half of it
    per_layer = 2 * h * (h + 2 * groups * head_dim) + 2 * h * h + 2 * 3 * h * f + attention
    return 3.0 * (preset.num_layers * per_layer + 2 * h * vocab_size)


def measure_bf16_matmul_tflops(size: int = 8192, repeats: int = 20, tries: int = 5, warmup: int = 50) -> float:
    """The measured bf16 matmul ceiling of the current GPU (TFLOP/s), the MFU denominator: the best
    of ``tries`` timings of ``repeats`` [size, size] x [size, size] products, after ``warmup`` of
    them (about 0.2 s on an H100: clocks ramp up first, and one short timing varies by a few percent)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best / 1e12
