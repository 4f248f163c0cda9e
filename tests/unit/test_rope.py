"""Fused RoPE (``rope.apply_rotary`` in the SDPA core attention, ``--rope-fusion``): the same
rotation as megatron's unfused RoPE, compiled or not, and the same model through the trainer.

The test processes set ``TORCHDYNAMO_DISABLE=1`` (tests/conftest.py), which turns megatron's
``jit_fuser`` (``torch.compile``) into a no-op at import: model-level tests here run the eager
function. ``_compiled_apply_rotary`` compiles it explicitly, as ``jit_fuser`` does outside tests.
"""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_patch.architecture import rope
from megatron_patch.architecture.presets import get_preset, transformer_config
from tests import model_helpers as mh

SEQ, HEAD_DIM = 24, 16


def _freqs(seq=SEQ, head_dim=HEAD_DIM):
    """megatron's angles ``[s, 1, 1, d]`` (fp32) for positions 0..s-1, base 10000 (CPU mode: the
    ``world`` fixture; megatron moves the frequencies to the current device)."""
    return RotaryEmbedding(kv_channels=head_dim, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)(
        seq
    )


def _megatron_rope(x, freqs):
    config = transformer_config(get_preset("tiny"), cpu=True)
    return apply_rotary_pos_emb(x, freqs, config, cp_group=object())  # bshd path; the group is unused there


def _compiled_apply_rotary(monkeypatch):
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    torch._dynamo.reset()
    return torch.compile(rope.apply_rotary)


def _query_key(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(SEQ, 2, 4, HEAD_DIM, generator=generator, dtype=torch.float64)
    key = torch.randn(SEQ, 2, 2, HEAD_DIM, generator=generator, dtype=torch.float64)
    return query.to(dtype).requires_grad_(), key.to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_apply_rotary_is_megatrons_rope_bit_for_bit(world, dtype):
    freqs = _freqs()
    query, key = _query_key(dtype)
    with torch.compiler.set_stance("force_eager"):
        fused_query, fused_key = rope.apply_rotary(query, key, freqs)
    (fused_query.square().sum() + 3 * fused_key.sum()).backward()
    fused_grads = query.grad.clone(), key.grad.clone()
    query.grad = key.grad = None
    plain_query, plain_key = _megatron_rope(query, freqs), _megatron_rope(key, freqs)
    (plain_query.square().sum() + 3 * plain_key.sum()).backward()
    assert torch.equal(fused_query, plain_query) and torch.equal(fused_key, plain_key)
    assert torch.equal(fused_grads[0], query.grad) and torch.equal(fused_grads[1], key.grad)


def test_compiled_apply_rotary_matches_megatron_in_float64(world, monkeypatch):
    """Compiled, the angles' cos/sin may come from another fp32 routine: equal to fp32 rounding."""
    compiled = _compiled_apply_rotary(monkeypatch)
    freqs = _freqs()
    query, key = _query_key(torch.float64)
    fused_query, fused_key = compiled(query, key, freqs)
    (fused_query.square().sum() + 3 * fused_key.sum()).backward()
    fused_grads = query.grad.clone(), key.grad.clone()
    query.grad = key.grad = None
    plain_query, plain_key = _megatron_rope(query, freqs), _megatron_rope(key, freqs)
    (plain_query.square().sum() + 3 * plain_key.sum()).backward()
    torch.testing.assert_close(fused_query, plain_query, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused_key, plain_key, rtol=0, atol=1e-6)
    torch.testing.assert_close(fused_grads[0], query.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(fused_grads[1], key.grad, rtol=0, atol=1e-5)
    assert not torch.equal(fused_query, query)  # it did rotate


def test_compiled_apply_rotary_in_bf16_is_as_accurate_as_megatrons(world, monkeypatch):
    """Against a float64 rotation: the fused bf16 result rounds once, megatron's after each step."""
    compiled = _compiled_apply_rotary(monkeypatch)
    freqs = _freqs()
    query, key = _query_key(torch.bfloat16)
    exact = _megatron_rope(query.detach().double(), freqs.double())
    fused_error = (compiled(query, key, freqs)[0].double() - exact).abs().max()
    plain_error = (_megatron_rope(query, freqs).double() - exact).abs().max()
    assert fused_error <= plain_error
    assert fused_error < 0.02  # bf16 has 8 bits of mantissa; |values| stay below 4 here


def test_rope_fusion_flag_builds_the_same_model(model_parallel, monkeypatch, tiny_corpus):
    """--rope-fusion through the trainer's builders: no megatron RoPE, one fused call per layer, the
    same parameters and state-dict keys, and the unfused model's loss and gradients (K=4 and K=1)."""
    from megatron_patch.architecture import attention

    fused_calls = []
    eager_rotary = attention.apply_rotary
    monkeypatch.setattr(attention, "apply_rotary", lambda *a: fused_calls.append(1) or eager_rotary(*a))
    results = {}
    for fused in (False, True):
        model, runs = mh.runs_through_trainer_builders(
            model_parallel, ["--rope-fusion"] if fused else [], 11, tiny_corpus["tokenizer"]
        )
        assert (getattr(model, "rotary_pos_emb", None) is None) is fused
        results[fused] = (
            runs,
            {name: param.detach().clone() for name, param in model.named_parameters()},
            sorted(model.state_dict()),
        )
        assert len(fused_calls) == (2 * model.config.num_layers if fused else 0)  # per layer, per forward
    (runs_plain, params_plain, keys_plain), (runs_fused, params_fused, keys_fused) = results[False], results[True]
    assert keys_fused == keys_plain
    for name, param in params_plain.items():
        assert torch.equal(params_fused[name], param), name
    for patch_size in (4, 1):
        (_, loss_plain, grads_plain), (_, loss_fused, grads_fused) = runs_plain[patch_size], runs_fused[patch_size]
        assert torch.allclose(loss_fused, loss_plain, rtol=1e-6, atol=0), patch_size
        for name, grad in grads_plain.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads_fused[name], grad, rtol=1e-5, atol=1e-7, msg=f"K={patch_size} {name}")


@pytest.mark.gpu
def test_compiled_apply_rotary_on_gpu_matches_megatron_in_bf16(world, monkeypatch):
    compiled = _compiled_apply_rotary(monkeypatch)
    freqs = _freqs().cuda()
    query, key = (t.detach().cuda().requires_grad_() for t in _query_key(torch.bfloat16))
    exact = _megatron_rope(query.detach().double(), freqs.double())
    fused_query, fused_key = compiled(query, key, freqs)
    (fused_query.float().square().sum() + fused_key.float().sum()).backward()
    assert (fused_query.double() - exact).abs().max() <= (_megatron_rope(query, freqs).double() - exact).abs().max()
    assert torch.isfinite(query.grad).all() and torch.isfinite(key.grad).all()
