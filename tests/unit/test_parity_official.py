"""Parity with the official PatchTrain recipe at TP=1 (tests/parity_official.py has the float64
reference on transformers' Llama and the comparison): the project's patch loss and gradients, on a
checkpoint the project trained and tools/export_hf.py exported, at K = 2, 4, 8; token-level
logits at K=1; bf16 with the official cast within a bf16 tolerance; and the same comparison
against the recipe with each planted mistake must fail.
"""

import pytest
import torch

from tests.parity_official import (
    BF16_TOLERANCE,
    LOSS_TOLERANCE,
    MISTAKES,
    T,
    corpus_sample,
    official_patch_loss,
    parity_mismatches,
    project_model,
    project_patch_loss,
    reference_loss_and_gradients,
    relative_error,
    trained_and_exported,
)

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def parity(world, tiny_corpus, tmp_path_factory):
    return trained_and_exported(tiny_corpus, str(tmp_path_factory.mktemp("parity")))


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_patch_loss_and_gradients_equal_the_official_recipe(parity, patch_size, tmp_path):
    x = corpus_sample(parity["prefix"], 2, patch_size * T + 1)
    assert parity_mismatches(parity, x, patch_size, str(tmp_path / "grads")) == []
    # the gradients compared are not trivially small: embedding, a layer's weights and the output layer
    _, reference_grads = reference_loss_and_gradients(parity["hf"], x, patch_size)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "lm_head.weight",
    ):
        assert reference_grads[name].abs().max() > 1e-4, name


@pytest.mark.parametrize("mistake", MISTAKES)
def test_each_planted_mistake_is_detected(parity, mistake, tmp_path):
    """The same comparison against the recipe with one planted mistake fails, so a project carrying
    that mistake would fail the parity test above."""
    x = corpus_sample(parity["prefix"], 2, 4 * T + 1)
    assert parity_mismatches(parity, x, 4, str(tmp_path / "grads"), mistake=mistake) != []


def test_token_logits_at_k1_equal_the_reference(parity):
    from megatron_patch.evaluation.logits import forward_logits

    x = corpus_sample(parity["prefix"], 2, T + 2)
    info = parity["info"]
    ours = forward_logits([project_model(parity)], x[:, :-2], info.padded_vocab_size)  # [b, s, V]
    with torch.no_grad():
        reference = parity["hf"](input_ids=x[:, :-2]).logits  # [b, s, V] float64
    assert relative_error(ours, reference) <= 1e-5
    # and the K=1 loss is next-token cross-entropy on both sides. The project scores all T positions
    # of a sample of T+1 tokens; the official recipe drops the last position's logits, so its sample
    # is those T+1 tokens (official_patch_loss reads x[:, :-1] as the sample).
    with torch.no_grad():
        ours_loss = project_patch_loss(project_model(parity), x[:, :-1], 1).item()
        reference_loss = official_patch_loss(parity["hf"], x, 1).item()
    assert abs(ours_loss - reference_loss) <= LOSS_TOLERANCE, (ours_loss, reference_loss)


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_bf16_patch_loss_matches_the_official_bf16_cast(parity, patch_size):
    """The project's bf16 model (bf16 weights, as the trainer runs --bf16) against the float64
    reference with the official bf16 cast of the embeddings before the mean."""
    x = corpus_sample(parity["prefix"], 2, patch_size * T + 1)
    with torch.no_grad():
        ours = project_patch_loss(project_model(parity, bf16=True), x, patch_size).item()
        reference = official_patch_loss(parity["hf"], x, patch_size, bf16_cast=True).item()
        fp32 = project_patch_loss(project_model(parity), x, patch_size).item()
    assert abs(ours - reference) <= BF16_TOLERANCE, (ours, reference)
    assert ours != fp32  # the bf16 path really ran in bf16
