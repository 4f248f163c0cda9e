"""Parity with the official PatchTrain recipe at TP=2 (2-rank world; tests/parity_official.py has
the float64 reference on transformers' Llama and the comparison): a tiny run trained at TP=2, its
export, and the project's model at TP=2 (vocab-parallel embedding, output layer and K-way
cross-entropy; split qkv and [gate; up]) against the recipe: patch loss and every parameter's
gradient, unsharded, at K = 2, 4, 8, and token-level logits at K=1."""

import pytest
import torch

from tests.model_helpers import shared_tmp
from tests.parity_official import (
    MISTAKES,
    T,
    corpus_sample,
    parity_mismatches,
    project_model,
    relative_error,
    trained_and_exported,
)

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def parity(world, tiny_corpus, tmp_path_factory):
    if world != 2:
        pytest.skip("runs in a 2-rank world")
    return trained_and_exported(
        tiny_corpus, shared_tmp(tmp_path_factory, "parity_tp2"), "--tensor-model-parallel-size", "2"
    )


@pytest.mark.parametrize("patch_size", [2, 4, 8])
def test_patch_loss_and_gradients_at_tp2_equal_the_official_recipe(parity, patch_size, tmp_path_factory):
    x = corpus_sample(parity["prefix"], 2, patch_size * T + 1)
    folder = shared_tmp(tmp_path_factory, f"grads_k{patch_size}")
    assert parity_mismatches(parity, x, patch_size, folder, tensor_parallel=2) == []


def test_a_planted_mistake_is_detected_at_tp2(parity, tmp_path_factory):
    x = corpus_sample(parity["prefix"], 2, 4 * T + 1)
    folder = shared_tmp(tmp_path_factory, "grads_mistake")
    assert parity_mismatches(parity, x, 4, folder, tensor_parallel=2, mistake=MISTAKES[0]) != []


def test_token_logits_at_tp2_equal_the_reference(parity):
    from megatron_patch.evaluation.logits import forward_logits

    x = corpus_sample(parity["prefix"], 2, T)
    ours = forward_logits([project_model(parity, tensor_parallel=2)], x, parity["info"].padded_vocab_size)  # [b, s, V]
    with torch.no_grad():
        reference = parity["hf"](input_ids=x).logits  # [b, s, V] float64
    assert relative_error(ours, reference) <= 1e-5
