"""PatchGPTModel on one rank: K=1 is stock GPTModel bit for bit, patch mode matches a plain
re-computation, checkpoints cross modes without conversion, and bad settings fail clearly."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.models.gpt import GPTModel

from megatron_patch.architecture.build import padded_vocab_size
from megatron_patch.architecture.presets import get_preset, transformer_config
from megatron_patch.architecture.specs import get_decoder_block_spec, get_local_layer_spec
from megatron_patch.embedding import aggregate_patches
from megatron_patch.model import build_patch_gpt_model
from tests import model_helpers as mh
from tests.reference import reference_per_target_loss, relative_error

T = mh.SEQ


def _tiny(model_parallel, seed=1234):
    model_parallel(1, 1, seed=seed)
    return mh.build(1, 1, seed=seed, ddp=False)


def _stock(config, seed):
    from megatron_patch.runtime import parallel

    parallel.seed_all(seed)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_decoder_block_spec(config),
        vocab_size=mh.VOCAB,
        max_sequence_length=T,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def test_token_mode_equals_stock_gpt_bitwise(model_parallel):
    patch_model = _tiny(model_parallel, seed=5)
    stock = _stock(patch_model.config, seed=5)
    batch = mh.batches(1)[0]
    for model in (patch_model, stock):
        loss = model(batch["tokens"], None, None, labels=batch["labels"])
        (loss * batch["loss_mask"]).sum().backward()
    assert torch.equal(
        patch_model(batch["tokens"], None, None, labels=batch["labels"]),
        stock(batch["tokens"], None, None, labels=batch["labels"]),
    )
    stock_params = dict(stock.named_parameters())
    for name, param in patch_model.named_parameters():
        assert torch.equal(param, stock_params[name]), name
        assert torch.equal(param.grad, stock_params[name].grad), name


def test_patch_mode_matches_plain_recomputation(model_parallel):
    """Aggregate by hand, run the decoder as stock GPT on T positions, score K targets in float64."""
    model = _tiny(model_parallel)
    batch = mh.batches(4)[0]
    losses, _ = mh.forward_losses(model, batch, 4)  # [b, T, K]
    assert losses.shape == (2, T, 4)

    embeddings = model.embedding(input_ids=batch["tokens"], position_ids=None)  # [4T, b, h]
    manual = embeddings.view(T, 4, 2, -1).mean(1)
    assert torch.equal(aggregate_patches(embeddings, 4), manual)
    logits = model(None, None, None, decoder_input=manual)  # [b, T, V]
    tokens = torch.cat([batch["tokens"], batch["labels"][:, -1:]], dim=1)  # x_0..x_{KT}
    targets = torch.stack([tokens[:, (i + 1) * 4 : (i + 2) * 4] for i in range(T - 1)], dim=1)  # [b, T-1, K]
    expected = reference_per_target_loss(logits[:, : T - 1].transpose(0, 1).double(), targets.transpose(0, 1))
    torch.testing.assert_close(losses[:, : T - 1].double(), expected.transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("patch_size", [1, 4])
def test_the_model_s_loss_does_not_wait_for_the_device(model_parallel, monkeypatch, patch_size):
    """The loss function's range check copies the targets' min and max to the host, a sync per
    micro-batch on a GPU; the model skips it (its data is checked when the datasets are built)."""

    def synced(*args, **kwargs):
        raise AssertionError("the target range was checked, with a device-to-host copy")

    monkeypatch.setattr(torch, "aminmax", synced)
    model = _tiny(model_parallel)
    model.fused_cross_entropy = patch_size == 1  # token mode scores with megatron's CE unless fused
    losses, _ = mh.forward_losses(model, mh.batches(patch_size)[0], patch_size)
    assert torch.isfinite(losses).all()


def test_patch_checkpoint_loads_into_token_mode_and_stock_gpt(model_parallel, tmp_path):
    patch_model = _tiny(model_parallel, seed=11)
    dist_checkpointing.save(patch_model.sharded_state_dict(), str(tmp_path))
    for target in (_tiny(model_parallel, seed=12), _stock(patch_model.config, seed=12)):
        target.load_state_dict(dist_checkpointing.load(target.sharded_state_dict(), str(tmp_path)), strict=True)
        for (name, a), (_, b) in zip(patch_model.named_parameters(), target.named_parameters()):
            assert torch.equal(a, b), name
    assert set(dict(patch_model.named_parameters())) == set(dict(target.named_parameters()))


def test_sdpa_spec_equals_megatron_local_attention(model_parallel):
    """The SDPA core attention against megatron's own DotProductAttention (fp32, CPU)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_patch.architecture.norm import RMSNorm

    model = _tiny(model_parallel, seed=3)
    local = get_gpt_layer_local_spec(normalization="RMSNorm")
    local.submodules.input_layernorm = RMSNorm
    local.submodules.pre_mlp_layernorm = RMSNorm
    model_parallel(1, 1, seed=3)
    reference = GPTModel(
        config=model.config,
        transformer_layer_spec=TransformerBlockSubmodules(
            layer_specs=[local] * model.config.num_layers, layer_norm=RMSNorm
        ),
        vocab_size=mh.VOCAB,
        max_sequence_length=T,
        position_embedding_type="rope",
    )
    reference.load_state_dict(model.state_dict(), strict=False)
    batch = mh.batches(1)[0]
    torch.testing.assert_close(
        model(batch["tokens"], None, None), reference(batch["tokens"], None, None), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_applies_a_given_mask_as_megatron_local_attention_does(model_parallel, dtype):
    """A boolean attention_mask (True = masked out) given with the causal mask type replaces the causal
    mask in megatron's DotProductAttention; SDPAttention gives its output (GQA: 4 heads, 2 groups),
    which differs from plain causal attention. Every query keeps one key (megatron and SDPA differ
    only on fully masked rows)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.architecture.attention import SDPAttention

    model_parallel(1, 1)
    config = transformer_config(get_preset("tiny"), cpu=True, num_query_groups=2)
    seq, batch, head_dim = 12, 2, config.kv_channels
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(seq, batch, 4, head_dim, generator=generator, dtype=dtype)  # [s, b, np, hn]
    key, value = (torch.randn(seq, batch, 2, head_dim, generator=generator, dtype=dtype) for _ in range(2))
    # [b, 1, s, s], True = masked: random keys hidden (both directions), each query's own key kept
    mask = torch.rand(batch, 1, seq, seq, generator=generator) < 0.4
    mask &= ~torch.eye(seq, dtype=torch.bool)
    local = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self")
    expected = local(query, key, value, mask)  # [s, b, np*hn]
    got = sdpa(query, key, value, mask)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    causal = sdpa(query, key, value, None)
    assert (causal - expected).abs().max() > 0.1  # the mask was applied, not the causal one
    torch.testing.assert_close(causal, local(query, key, value, None), rtol=tolerance, atol=tolerance)


def test_bad_settings_fail_with_one_line_errors(model_parallel):
    model = _tiny(model_parallel)
    tokens = torch.zeros(2, 4 * T + 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"not a multiple of patch_size K=4") as error:
        model(tokens, None, None, patch_size=4)
    assert "\n" not in str(error.value)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="integer K >= 1"):
            model(tokens, None, None, patch_size=bad)
    batch = mh.batches(4)[0]  # token labels [b, K*T], not the next-patch targets [b, T, K]
    for labels in (batch["labels"], batch["labels"].view(2, T, 4)[..., :2]):
        with pytest.raises(ValueError, match=r"labels of shape \[2, (64|16, 2)\] at patch_size K=4: .*patch_targets"):
            model(batch["tokens"], None, None, labels=labels, patch_size=4)
    k4_targets = batch["labels"].view(2, T, 4)  # [b, K*T] -> [b, T, K]: K=4 targets given at K=1
    with pytest.raises(ValueError, match=r"labels of shape \[2, 16, 4\] at patch_size K=1"):
        model(batch["tokens"][:, :T], None, None, labels=k4_targets, patch_size=1)
    preset = get_preset("tiny")
    with pytest.raises(ValueError, match="does not divide the 4 attention heads") as error:
        transformer_config(preset, tensor_parallel=3)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="^--tensor-model-parallel-size 5 does not divide the 13824 FFN hidden size"):
        transformer_config(get_preset("13b"), tensor_parallel=5)  # 40 heads: only the SwiGLU width does not split
    with pytest.raises(ValueError, match="does not divide the 4 layers"):
        transformer_config(preset, pipeline_parallel=3)
    with pytest.raises(ValueError, match="not divisible by --tensor-model-parallel-size 2"):
        build_patch_gpt_model(transformer_config(preset, tensor_parallel=2, cpu=True), 129, T)
    assert padded_vocab_size(129, 128, 2) == 256
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_sdpa_spec_is_used_without_transformer_engine():
    from megatron_patch.architecture.attention import SDPAttention
    from megatron_patch.architecture.norm import RMSNorm

    spec = get_local_layer_spec()
    assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    assert spec.submodules.input_layernorm is RMSNorm


@pytest.mark.parametrize("fused_rope", [False, True], ids=["megatron-rope", "fused-rope"])
def test_attention_saves_no_fused_qkv_buffer_for_backward(model_parallel, fused_rope):
    """After RoPE only the value still points into megatron's fused QKV output; SDPA must not keep
    that whole buffer (3x the value here) alive until backward, with either RoPE path. The loss and
    gradients are unchanged: token mode stays bit-equal to stock GPT (test above)."""
    model_parallel(1, 1, seed=2)
    model = mh.build(1, 1, ddp=False, fused_rope=fused_rope)
    qkv_outputs = []  # the buffers themselves, held so that no later tensor can reuse their addresses
    for layer in model.decoder.layers:
        layer.self_attention.linear_qkv.register_forward_hook(
            lambda module, inputs, output: qkv_outputs.append(output[0].untyped_storage())
        )
    saved = []

    def pack(tensor):
        saved.append(tensor.untyped_storage().data_ptr())
        return tensor

    batch = mh.batches(1)[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch["tokens"], None, None, labels=batch["labels"]).sum()
    assert len(qkv_outputs) == model.config.num_layers and saved
    assert not {storage.data_ptr() for storage in qkv_outputs} & set(saved)
    loss.backward()


def test_value_leaves_the_fused_buffer_only_when_query_and_key_have():
    from megatron_patch.architecture.attention import value_in_own_storage

    mixed = torch.randn(5, 2, 4, 3 * 8, requires_grad=True)  # [s, b, ng, 3 hn]: one group per head
    query, key, value = torch.split(mixed, 8, dim=-1)  # views [s, b, ng, hn]
    assert value_in_own_storage(value, query, key) is value  # no RoPE: query and key still use the buffer
    rotated_query, rotated_key = query * 2, key * 2  # new storages, as RoPE makes them
    own = value_in_own_storage(value, rotated_query, rotated_key)
    assert own.untyped_storage().data_ptr() != mixed.untyped_storage().data_ptr() and torch.equal(own, value)
    assert own.is_contiguous() and value_in_own_storage(own, rotated_query, rotated_key) is own
    (own * torch.arange(8.0)).sum().backward()
    assert torch.equal(mixed.grad[..., 16:], torch.arange(8.0).expand(5, 2, 4, 8))
    assert torch.equal(mixed.grad[..., :16], torch.zeros(5, 2, 4, 16))


def test_fused_swiglu_flag_gives_the_unfused_loss_and_gradients(model_parallel, monkeypatch, tiny_corpus):
    """--bias-swiglu-fusion switches megatron's fused SwiGLU on through the trainer's builders; the
    loss and every gradient equal the unfused model's at K=4 and K=1 (fp32, CPU). megatron's jit_fuser runs
    the fused function eagerly here: the tests set TORCHDYNAMO_DISABLE=1 (tests/conftest.py)."""
    from megatron.core.transformer import mlp

    fused_calls = []
    fused_swiglu = mlp.bias_swiglu_impl
    monkeypatch.setattr(mlp, "bias_swiglu_impl", lambda *a, **k: fused_calls.append(1) or fused_swiglu(*a, **k))
    results = {}
    for fused in (False, True):
        flags = ["--bias-swiglu-fusion"] if fused else []
        config = mh.trainer_config(*flags, tokenizer_model=tiny_corpus["tokenizer"])
        assert config.model.transformer_config(cpu=True).bias_activation_fusion is fused
        model, results[fused] = mh.runs_through_trainer_builders(model_parallel, flags, 11, tiny_corpus["tokenizer"])
        assert len(fused_calls) == (2 * model.config.num_layers if fused else 0)  # per layer, per forward
    for patch_size in (4, 1):
        (_, loss_plain, grads_plain), (_, loss_fused, grads_fused) = (
            results[False][patch_size],
            results[True][patch_size],
        )
        assert torch.allclose(loss_fused, loss_plain, rtol=1e-6, atol=0), patch_size
        for name, grad in grads_plain.items():
            assert grad.abs().sum() > 0, name
            torch.testing.assert_close(grads_fused[name], grad, rtol=1e-5, atol=1e-7, msg=f"K={patch_size} {name}")


def test_cross_entropy_fusion_flag_scores_both_modes_with_the_fused_loss(model_parallel, monkeypatch, tiny_corpus):
    """--cross-entropy-fusion through the trainer's builders: both modes (K=4 and K=1, where the
    unfused model uses megatron's CE) score with the fused K-way CE, giving the unfused model's
    losses ([b, T, K] and [b, s]) and gradients within fp32 rounding (relative to each gradient's
    largest element)."""
    from megatron_patch.architecture import fused_cross_entropy

    fused_calls = []
    original = fused_cross_entropy.FusedVocabParallelPatchCrossEntropy.forward
    monkeypatch.setattr(
        fused_cross_entropy.FusedVocabParallelPatchCrossEntropy,
        "forward",
        staticmethod(lambda *a: fused_calls.append(1) or original(*a)),
    )
    results = {}
    for fused in (False, True):
        _, results[fused] = mh.runs_through_trainer_builders(
            model_parallel, ["--cross-entropy-fusion"] if fused else [], 13, tiny_corpus["tokenizer"]
        )
        assert len(fused_calls) == (2 if fused else 0)
    for patch_size in (4, 1):
        (losses_plain, _, grads_plain), (losses_fused, _, grads_fused) = (
            results[False][patch_size],
            results[True][patch_size],
        )
        assert losses_fused.shape == ((2, T, 4) if patch_size == 4 else (2, T))
        torch.testing.assert_close(losses_fused, losses_plain, rtol=1e-6, atol=1e-6)
        for name, grad in grads_plain.items():
            assert grad.abs().sum() > 0, name
            assert relative_error(grads_fused[name], grad) <= 1e-5, (patch_size, name)


def test_sdpa_backend_flag_sets_the_kernel_order_of_every_attention_call(model_parallel, monkeypatch, tiny_corpus):
    """--sdpa-backend through the trainer's builders: every SDPA call (forward, and the backward it
    sets up) runs with the named kernel first and torch's others after it, so a kernel the device
    lacks (cuDNN on CPU) falls back; the model is the same function: at K=4 and K=1 the loss and
    every gradient equal the default's bit for bit on CPU (no cuDNN: the same kernel runs)."""
    from megatron_patch.architecture import attention

    orders = []  # the priority order in force at each call
    sdpa = attention.F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        orders.append(torch._C._get_sdp_priority_order())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    default_order = torch._C._get_sdp_priority_order()
    results = {}
    for backend in ("auto", "cudnn"):
        orders.clear()
        _, results[backend] = mh.runs_through_trainer_builders(
            model_parallel, ["--sdpa-backend", backend], 17, tiny_corpus["tokenizer"]
        )
        expected = default_order if backend == "auto" else [int(attention.SDPBackend.CUDNN_ATTENTION)]
        assert orders and all(order[: len(expected)] == expected for order in orders), (backend, orders)
    assert torch._C._get_sdp_priority_order() == default_order  # restored after each call
    assert attention.sdpa_preference("math")[0] == attention.SDPBackend.MATH
    assert sorted(map(int, attention.sdpa_preference("math"))) == sorted(map(int, attention.SDPA_BACKENDS.values()))
    for patch_size in (4, 1):
        (_, loss_auto, grads_auto), (_, loss_cudnn, grads_cudnn) = (
            results["auto"][patch_size],
            results["cudnn"][patch_size],
        )
        assert torch.equal(loss_cudnn, loss_auto), patch_size
        assert all(torch.equal(grads_cudnn[name], grad) for name, grad in grads_auto.items()), patch_size


def test_sdpa_backend_with_transformer_engine_is_refused(tiny_corpus, monkeypatch):
    from megatron_patch.architecture import specs
    from megatron_patch.errors import ArgumentError

    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    with pytest.raises(ArgumentError, match="--sdpa-backend cudnn is for the local layers' SDPA attention"):
        mh.trainer_config("--sdpa-backend", "cudnn", tokenizer_model=tiny_corpus["tokenizer"])
    config = mh.trainer_config(
        "--sdpa-backend", "cudnn", "--transformer-impl", "local", tokenizer_model=tiny_corpus["tokenizer"]
    )
    assert config.model.sdpa_backend == "cudnn" and config.model.transformer_impl == "local"


@pytest.mark.gpu
def test_bf16_patch_model_forward_backward_on_gpu(model_parallel):
    from tests.loss_helpers import masked_mean

    model_parallel(1, 1)
    config = transformer_config(get_preset("tiny"), bf16=True)
    model = build_patch_gpt_model(config, mh.VOCAB, T).cuda()
    batch = {k: v.cuda() for k, v in mh.batches(4)[0].items()}
    losses, mask = mh.forward_losses(model, batch, 4)
    loss = masked_mean(losses, mask)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_all_opt_in_fusions_compiled_match_the_unfused_model(model_parallel, monkeypatch, device):
    """--bias-swiglu-fusion, --rope-fusion and --cross-entropy-fusion together, their kernels
    compiled as in GPU training, bf16: the unfused model's losses at K=4 and K=1 within bf16
    rounding, finite gradients."""
    import dataclasses

    mh.compile_fused_kernels(monkeypatch)
    model_parallel(1, 1)
    config = transformer_config(get_preset("tiny"), bf16=True, cpu=device == "cpu")
    plain = build_patch_gpt_model(config, mh.VOCAB, T).to(device)
    fused = build_patch_gpt_model(
        dataclasses.replace(config, bias_activation_fusion=True), mh.VOCAB, T, fused_rope=True, fused_cross_entropy=True
    ).to(device)
    fused.load_state_dict(plain.state_dict())
    for patch_size in (4, 1):
        batch = {k: v.to(device) for k, v in mh.batches(patch_size)[0].items()}
        losses = {}
        for name, model in (("plain", plain), ("fused", fused)):
            out = mh.forward_losses(model, batch, patch_size)[0].float()
            out.mean().backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
            losses[name] = out.detach()
        assert relative_error(losses["fused"], losses["plain"]) < 2e-2, patch_size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 6  # every kernel above ran compiled


@pytest.mark.gpu
def test_sdpa_attention_matches_local_attention_bf16_on_gpu(model_parallel):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.architecture.attention import SDPAttention

    model_parallel(1, 1)
    config = transformer_config(get_preset("370m"), bf16=True)
    q, k, v = (torch.randn(512, 2, 16, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    sdpa = SDPAttention(config, 1, AttnMaskType.causal, "self")
    local = DotProductAttention(config, 1, AttnMaskType.causal, "self").cuda()
    mask = torch.triu(torch.ones(512, 512, dtype=torch.bool, device="cuda"), 1).view(1, 1, 512, 512)
    expected = local(q, k, v, mask).float()
    got = sdpa(q, k, v, None).float()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 2e-2
    # --sdpa-backend cudnn (cuDNN's kernel where this GPU has it): the same output and input gradients
    cudnn = SDPAttention(config, 1, AttnMaskType.causal, "self", backend="cudnn")
    grads = {}
    for name, module in (("auto", sdpa), ("cudnn", cudnn)):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = module(*inputs, None).float()
        assert ((out - expected).abs().max() / expected.abs().max()).item() < 2e-2, name
        out.pow(2).sum().backward()
        grads[name] = [t.grad.float() for t in inputs]
    for auto, preferred in zip(grads["auto"], grads["cudnn"]):
        assert ((preferred - auto).abs().max() / auto.abs().max()).item() < 2e-2
